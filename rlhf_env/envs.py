"""``rlhf_env.envs``: the ``envs`` package (``from rlhf_env.envs import TextRLHFEnv``), under a
name that a user's own ``envs.py`` next to their script cannot shadow.
See :mod:`rlhf_env._packages`."""

from rlhf_env._packages import alias

alias(__name__, "envs")
