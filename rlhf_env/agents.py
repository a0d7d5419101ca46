"""``rlhf_env.agents``: the ``agents`` package (``from rlhf_env.agents import PPO``), under a
name that a user's own ``agents.py`` next to their script cannot shadow.
See :mod:`rlhf_env._packages`."""

from rlhf_env._packages import alias

alias(__name__, "agents")
