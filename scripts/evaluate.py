"""Evaluate a checkpoint on its run's validation data (or other shards) and print the metrics table.

    python scripts/evaluate.py checkpoint=runs/default/gaussian_var/<run>/checkpoints/step-00000500.ckpt
    python scripts/evaluate.py checkpoint=<ckpt> "data.val_shards='/data/val/{00000..00003}.tar'"

Writes <run>/eval-step-<step>.json next to the checkpoints folder. Every other key=value changes the config
saved in the checkpoint (e.g. the val shards, data.classnames or eval.max_samples).
"""

from probloss.cli import run_script
from probloss.eval.runtime import evaluate_command

if __name__ == "__main__":
    run_script(evaluate_command, "evaluate", __doc__)
