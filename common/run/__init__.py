"""The experiment runner: pipeline, method registry, stage cache, tracking, config helpers, evaluation, errors
of the run, and the `fp` / `ptq` baselines.

May import every other part of `common`; reaches methods only through the registry (`conf/method/*.yaml`
names the module that registers each one).
"""
