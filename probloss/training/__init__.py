"""Training: the typed config, the loop, run folders and checkpoints, evaluation during a run, Fabric launch.

Above the models, data and evaluation; below the studies and the command line (docs/design.md).
"""
