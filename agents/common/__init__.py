"""Mirror of ``stable_baselines3.common`` module paths, so replacing ``stable_baselines3``
by ``agents`` in an import line is enough: ``agents.common.evaluation``,
``agents.common.callbacks``, ``agents.common.env_util``."""
