"""Optuna studies over training runs (probloss/sweep.py has the details).

    python scripts/sweep.py sweep=lr loss=sigmoid [sweep.n_trials=..] [training overrides]
    OMP_NUM_THREADS=1 fabric run --devices=2 --main-port=29501 scripts/sweep.py sweep=lr loss=infonce
"""

from probloss.cli import run_script
from probloss.sweep import main

if __name__ == "__main__":
    run_script(main, "sweep", __doc__)
