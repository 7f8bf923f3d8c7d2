"""Evaluate a checkpoint on its run's validation data (or other shards) and print the metrics table.

    python scripts/evaluate.py runs/default/gaussian_var/<run>/checkpoints/step-00000500.ckpt
    python scripts/evaluate.py <checkpoint> data.val_shards='/data/val/{00000..00003}.tar'

Writes <run>/eval-step-<step>.json next to the checkpoints folder. Extra arguments (key=value) change the
config saved in the checkpoint, e.g. the val shards, data.classnames or eval.max_samples.
"""

import sys

from probloss.config import ConfigError
from probloss.train import evaluate_checkpoint

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    try:
        evaluate_checkpoint(sys.argv[1], sys.argv[2:])
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
