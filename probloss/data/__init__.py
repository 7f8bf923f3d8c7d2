"""Data: the built-in "shapes" image-caption generator, webdataset shard writing, and the shard reader.

    from probloss.data import write_shapes_shards, make_train_loader, load_eval_set
    patterns = write_shapes_shards("data/shapes", train_size=50_000, val_size=2_000, test_size=5_000)
    loader = make_train_loader(patterns["train"], tokenizer, 128, image_size=32, rank=0, world_size=1, seed=0)
    val = load_eval_set(patterns["val"], tokenizer, image_size=32)    # selection; patterns["test"]: reporting
"""

from probloss.data.loader import (
    MEAN, STD, EvalSet, ShardStream, SkipCounter, TrainLoader, count_samples, decode_sample, expand_shards,
    load_eval_set, make_train_loader, read_train_captions,
)
from probloss.data.shapes import class_names, generate_sample, heldout_combos
from probloss.data.shards import write_shapes_shards

__all__ = [
    "MEAN", "STD", "EvalSet", "ShardStream", "SkipCounter", "TrainLoader", "class_names", "count_samples",
    "decode_sample", "expand_shards", "generate_sample", "heldout_combos", "load_eval_set", "make_train_loader",
    "read_train_captions", "write_shapes_shards",
]
