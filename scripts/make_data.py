"""Generate the built-in shapes image-caption dataset as webdataset shards.

    python scripts/make_data.py out=data/shapes train_size=50000 val_size=2000 [seed=0 image_size=32
        shard_size=1000 num_workers=2 overwrite=false]

Writes out/train/*.tar, out/val/*.tar ({key}.png, {key}.txt, {key}.json), out/classes.json; prints the brace
patterns for data.train_shards / data.val_shards.
"""

import sys

from probloss.data.shards import main

if __name__ == "__main__":
    main(sys.argv[1:])
