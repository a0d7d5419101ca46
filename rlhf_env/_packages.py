"""``rlhf_env.agents`` and ``rlhf_env.envs``: the top-level ``agents`` and ``envs`` packages
under names that a user's own ``agents.py`` or ``envs.py`` cannot shadow.

The short names ``agents`` and ``envs`` stay (the repository's layout), but they are generic:
a file ``agents.py`` next to a user's script comes first on ``sys.path``, so
``from agents import PPO`` would import it instead. ``rlhf_env.agents`` always reaches the
package shipped beside ``rlhf_env``:

* normally (the top-level name resolves to the shipped package) ``rlhf_env.agents`` IS
  ``agents``: the same module objects, so classes, registries and pickles are shared, and
  ``rlhf_env.agents.X`` is ``agents.X`` (a finder maps the submodules, no second copy);
* when a user's module holds the name, the shipped package is loaded from its folder under
  the private name ``rlhf_env.agents``, its own absolute imports (``from agents.base
  import ...``, ``from envs.spaces import ...``) rewritten to the private names as the
  source is compiled (never cached to ``__pycache__``), so the user's module keeps the
  short name and both work side by side.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
from types import ModuleType

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("agents", "envs")  # short name -> rlhf_env.<short name>
_SHADOWED: set[str] = set()  # short names a user's module holds in this process


def _shipped_dir(short: str) -> str:
    return os.path.join(_ROOT, short)


def _is_shipped(short: str) -> bool:
    """Whether the top-level ``short`` is (or would import) the package beside rlhf_env."""
    module = sys.modules.get(short)
    if module is not None:
        origin = getattr(module, "__file__", None)
    else:
        try:
            spec = importlib.util.find_spec(short)
        except (ImportError, ValueError):
            spec = None
        origin = spec.origin if spec is not None else None
    expected = os.path.join(_shipped_dir(short), "__init__.py")
    return origin is not None and os.path.realpath(origin) == os.path.realpath(expected)


def _rewrite(source: str) -> str:
    """Absolute imports of the shadowed short names -> the private names."""
    for short in _SHADOWED:
        source = re.sub(rf"(^|[\s;(])(from|import)(\s+){short}(?=[\s.])", rf"\1\2\3rlhf_env.{short}", source, flags=re.M)
        source = re.sub(rf"([\"']){short}\.", rf"\1rlhf_env.{short}.", source)  # "agents.policies.lm" strings
    return source


class _PrivateLoader(importlib.machinery.SourceFileLoader):
    """Compiles the shipped source with :func:`_rewrite` applied; no bytecode cache (the
    rewritten code must never be what a plain ``import agents`` reads back)."""

    def get_code(self, fullname: str):
        source = self.get_data(self.path).decode("utf-8")
        return compile(_rewrite(source), self.path, "exec", dont_inherit=True)


class _Existing(importlib.abc.Loader):
    """Loader of a module that is already imported under its short name."""

    def __init__(self, module: ModuleType):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        pass


class _Finder(importlib.abc.MetaPathFinder):
    """``rlhf_env.<short>.X``: ``<short>.X`` itself, or (shadowed) the shipped file loaded privately."""

    def find_spec(self, fullname, path=None, target=None):
        for short in PACKAGES:
            prefix = f"rlhf_env.{short}."
            if not fullname.startswith(prefix):
                continue
            if short not in _SHADOWED:
                module = importlib.import_module(short + fullname[len(prefix) - 1 :])
                return importlib.util.spec_from_loader(fullname, _Existing(module))
            base = os.path.join(_shipped_dir(short), *fullname[len(prefix) :].split("."))
            if os.path.isdir(base) and os.path.isfile(os.path.join(base, "__init__.py")):
                init = os.path.join(base, "__init__.py")
                return importlib.util.spec_from_file_location(
                    fullname, init, loader=_PrivateLoader(fullname, init), submodule_search_locations=[base])
            if os.path.isfile(base + ".py"):
                return importlib.util.spec_from_file_location(fullname, base + ".py", loader=_PrivateLoader(fullname, base + ".py"))
            return None
        return None


_FINDER = _Finder()


def alias(name: str, short: str) -> ModuleType:
    """Make ``sys.modules[name]`` (``rlhf_env.agents``) the shipped ``short`` package."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    for other in PACKAGES:  # decide for both before loading either: each imports the other
        if other not in _SHADOWED and not _is_shipped(other):
            _SHADOWED.add(other)
    if short not in _SHADOWED:
        module = importlib.import_module(short)
    else:
        init = os.path.join(_shipped_dir(short), "__init__.py")
        spec = importlib.util.spec_from_file_location(
            name, init, loader=_PrivateLoader(name, init), submodule_search_locations=[_shipped_dir(short)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    sys.modules[name] = module
    return module
