"""Train a dual encoder with a contrastive loss (thin entry point; the loop is probloss.train).

    python scripts/train.py loss=gaussian_var                       # one process
    fabric run scripts/train.py loss=gaussian_var                   # the same through Fabric's launcher
    OMP_NUM_THREADS=1 fabric run --devices=2 scripts/train.py loss=sigmoid trainer.max_steps=100
    python scripts/train.py --help                                  # groups, choices and defaults

Exit status: 0 on success, 2 for a bad config (unknown key/choice, bad value, resume mismatch) or missing
data, 1 when training stops on a non-finite loss.
"""

from probloss.cli import run_script
from probloss.train import main

if __name__ == "__main__":
    run_script(main, "train", __doc__)
