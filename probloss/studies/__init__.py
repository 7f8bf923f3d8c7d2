"""Studies over training runs: recipes (arms x seeds), Optuna sweeps, their workers, statistics and reports.

Above training; below the command line (docs/design.md).
"""
