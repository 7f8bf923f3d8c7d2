"""Run an experiment (arms x seeds of training runs) and write its report (probloss/experiment.py).

    python scripts/run_experiment.py experiment=proposal
    python scripts/run_experiment.py experiment=bias_init seeds=[0] trainer.max_steps=50   # a quick look
"""

import sys

from probloss.config import ConfigError
from probloss.experiment import run_experiment

if __name__ == "__main__":
    try:
        run_experiment(sys.argv[1:])
    except (ConfigError, FileNotFoundError) as err:  # bad config or missing data: one line, no traceback
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
