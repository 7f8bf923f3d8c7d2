"""Generate the built-in shapes image-caption dataset as webdataset shards (probloss/data/shards.py).

    python scripts/make_data.py out=data/shapes train_size=50000 val_size=2000 [seed=0 image_size=32 ...]

Writes out/train/*.tar, out/val/*.tar ({key}.png, {key}.txt, {key}.json), out/classes.json; prints the brace
patterns for data.train_shards / data.val_shards.
"""

from probloss.cli import run_script
from probloss.data.shards import main

if __name__ == "__main__":
    run_script(main, "make_data", __doc__)
