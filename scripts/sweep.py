"""Optuna studies over training runs (probloss/sweep.py has the details).

    python scripts/sweep.py sweep=lr loss=sigmoid [sweep.n_trials=..] [training overrides]
    OMP_NUM_THREADS=1 fabric run --devices=2 --main-port=29501 scripts/sweep.py sweep=lr loss=infonce
"""

import sys

from probloss.config import ConfigError
from probloss.sweep import main

if __name__ == "__main__":
    try:
        main()
    except (ConfigError, FileNotFoundError) as err:  # bad config or missing data: one line, no traceback
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
