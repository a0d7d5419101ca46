"""``rlhf_env.agents`` and ``rlhf_env.envs``: the top-level ``agents`` and ``envs`` packages
under names that a user's own ``agents.py`` or ``envs.py`` cannot shadow.

The short names ``agents`` and ``envs`` stay (the repository's layout), but they are generic:
a file ``agents.py`` next to a user's script comes first on ``sys.path``, so
``from agents import PPO`` would import it instead. ``rlhf_env.agents`` always reaches the
package shipped beside ``rlhf_env``, by one of two standard import hooks:

* normally (the top-level name resolves to the shipped package) ``rlhf_env.agents`` IS
  ``agents``: the same module objects, so classes, registries and pickles are shared; a
  meta-path finder makes ``rlhf_env.agents.X`` the already imported (or now imported)
  ``agents.X``, never a second copy;
* when a user's module holds the name, the shipped package is loaded from its folder under
  the private name ``rlhf_env.agents``, its source and bytecode unchanged: its modules get
  their own ``__builtins__`` whose ``__import__`` (the function every ``import`` statement
  calls) maps absolute imports of a shadowed short name (``from agents.base import ...``,
  ``import envs.spaces``) to the private name. The user's module keeps the short name, and
  both work side by side. (Imports by string inside the packages are relative to their
  ``__name__``/``__package__``, so they need no mapping.)
"""

from __future__ import annotations

import builtins
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
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


def _private_import(name, globals=None, locals=None, fromlist=(), level=0):
    """``__import__`` of the privately loaded packages: ``agents[.X]`` -> ``rlhf_env.agents[.X]``
    for a shadowed short name; everything else as usual."""
    short = name.partition(".")[0]
    if level == 0 and short in _SHADOWED:
        module = builtins.__import__("rlhf_env." + name, globals, locals, fromlist, 0)
        # `import agents.x` binds the name `agents`: the private top package, not `rlhf_env`
        return module if fromlist else sys.modules["rlhf_env." + short]
    return builtins.__import__(name, globals, locals, fromlist, level)


_PRIVATE_BUILTINS = dict(vars(builtins), __import__=_private_import)


class _PrivateLoader(importlib.machinery.SourceFileLoader):
    """Runs a shipped module under its private name with :data:`_PRIVATE_BUILTINS`."""

    def exec_module(self, module: ModuleType) -> None:
        module.__builtins__ = _PRIVATE_BUILTINS
        super().exec_module(module)


class _Existing(importlib.abc.Loader):
    """Loader of a module that is already imported under its short name."""

    def __init__(self, module: ModuleType):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        pass


def _private_spec(fullname: str, short: str, rest: list[str]):
    """The spec of the shipped file behind ``rlhf_env.<short>.<rest>``, loaded privately."""
    base = os.path.join(_shipped_dir(short), *rest)
    if os.path.isfile(os.path.join(base, "__init__.py")):
        init = os.path.join(base, "__init__.py")
        return importlib.util.spec_from_file_location(
            fullname, init, loader=_PrivateLoader(fullname, init), submodule_search_locations=[base])
    if os.path.isfile(base + ".py"):
        return importlib.util.spec_from_file_location(fullname, base + ".py", loader=_PrivateLoader(fullname, base + ".py"))
    return None


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
            return _private_spec(fullname, short, fullname[len(prefix) :].split("."))
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
        spec = _private_spec(name, short, [])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    sys.modules[name] = module
    return module
