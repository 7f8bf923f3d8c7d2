"""Train a dual encoder with a contrastive loss (thin entry point; the loop is probloss.train).

    python scripts/train.py loss=gaussian_var                       # one process
    fabric run scripts/train.py loss=gaussian_var                   # the same through Fabric's launcher
    OMP_NUM_THREADS=1 fabric run --devices=2 scripts/train.py loss=sigmoid trainer.max_steps=100
    python scripts/train.py --help                                  # groups, choices and defaults

Arguments are Hydra overrides (key=value); see configs/train.yaml. Exit status: 0 on success, 2 for a bad
config (unknown key/choice, bad value, resume mismatch), 1 when training stops on a non-finite loss.
"""

import sys

from probloss.config import ConfigError, describe
from probloss.train import NonFiniteLossError, main

if __name__ == "__main__":
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(describe())
        sys.exit(0)
    try:
        main(sys.argv[1:])
    except (ConfigError, FileNotFoundError) as err:  # bad config or missing data: one line, no traceback
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as err:
        print(f"training stopped: {err}", file=sys.stderr)
        sys.exit(1)
