"""``data.*`` of a run (the defaults here, configs/data/<name>.yaml per source) and the keys of ``probloss
make-data`` (the defaults here, configs/make_data.yaml its run commands): typed, frozen, every value checked when
built (one-line :class:`probloss.errors.ConfigError`, exit 2)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from probloss.checks import fail, finite, int_at_least, is_int, unknown
from probloss.data.shapes import COLOURS, HARD_NEGATIVES, SHAPES
from probloss.errors import ConfigError
from probloss.schema import REQUIRED, setting


@dataclass(frozen=True)
class DataSettings:
    """``data.*``: every data source's keys with their defaults (the comment above each says what it means);
    configs/data/<name>.yaml composes them (the node ``data/_settings``) and sets what differs for its source.
    Keys only the built-in shapes data has (``node=False``: ``cache_dir``, ``train_size``, ``val_size``,
    ``test_size``, ``heldout_combos``, ``gen_seed``) live in configs/data/shapes.yaml and are ``None`` for other
    sources."""

    # the data source, set by its config file: shapes (built in, generated and cached) | webdataset (your shards)
    name: str = REQUIRED
    # required: brace pattern of the training shards, e.g. /data/train/{00000..00099}.tar; null: generate
    # (shapes only)
    train_shards: str | None = REQUIRED
    # required: brace pattern of the validation shards (selection); null: generate (shapes only)
    val_shards: str | None = REQUIRED
    # brace pattern of a test split (reporting, at the end of a run); null: generate (shapes), else none
    test_shards: str | None = None
    # images are resized to image_size x image_size (pixels per side)
    image_size: int = 32
    # zero-shot class names (a val json's integer `label` indexes them); null: classes.json next to the shards
    # (the shapes data writes one), else no zero-shot
    classnames: tuple[str, ...] | None = None
    # zero-shot prompt templates with {}; null: those of splits.json beside the shards, else
    # probloss.data.shapes.DEFAULT_TEMPLATES (prompts that no shapes caption equals)
    templates: tuple[str, ...] | None = None
    # word (the shapes vocabulary) | byte (any text)
    tokenizer: str = "word"
    # tokens per caption (pad 0); null: an hf: tokenizer's own maximum (resolved when the config is composed)
    max_len: int | None = 16
    # DataLoader workers per rank (0: load in the training process; with the decoded cache below, in-process is
    # the faster here: docs/performance.md). On a GPU try 1 or 2
    num_workers: int = 0
    # per reader (worker): MiB of decoded samples kept after the first pass over its shards, so later passes read
    # and decode nothing (the batches are the same). Worth it when a reader's part fits: a decoded image is
    # H x W x 3 bytes. 0: off
    decoded_cache_mb: float = 512
    # batches per rank per "epoch": every rank reads its part of the shards (a seeded shuffled order per pass,
    # cycled, not resampled) for exactly this many batches, so ranks stay in step; null: samples // batch_size
    # (shapes: train_size // batch_size; shards: counted from sizes.json beside them, else by reading every tar
    # header, slow for many shards; img2dataset writes no sizes.json)
    batches_per_epoch: int | None = None
    # augmentation noise on training images; null: the loader's default
    image_noise: float | None = None
    # caption noise in training; null: the loader's default
    caption_noise: float | None = None
    # none | relation | binding | control | all: each sample's negative captions (json `negatives`) in the
    # training batch (batch["negative_tokens"], (B, k, L)) for losses that use them
    hard_negatives: str = "none"
    # each caption's partial view (the caption one level less specific, from the json) for losses with partial
    # views (loss=prolip loss.partial_alpha=...)
    partial_captions: bool = setting(False, absent=False)
    # a shard cut short (no end-of-archive blocks) is named and counted (data/truncated_shards) and read up to
    # its cut; true: an error before training
    strict: bool = setting(False, absent=False)
    # planted noise (issue 33, recipe=planted_noise): a colour or shape word (e.g. magenta); in TRAINING batches
    # a sample whose scene holds it gets, with probability noise_rate, the caption of another sample that is
    # false of its scene (val/test stay clean). Needs json `objects` (shapes data). With it the evaluator adds
    # the planted keys (test/unc/planted_*)
    noise_attribute: str | None = None
    # planted noise: that probability, in [0, 1] (0 with an attribute: the clean control arm)
    noise_rate: float = setting(0.0, absent=0.0)
    # corrupt/undecodable samples (skipped, each warning names its key and shard) allowed as a fraction of the
    # samples read, per split and over training; more is a data error (exit 2) naming the worst shards. 1.0:
    # never stop; 0: any skip stops the run. A config saved before the key existed: null (no limit)
    max_skipped_fraction: float | None = 0.01
    # --- the shapes generator's keys (configs/data/shapes.yaml; None for other sources) ---
    cache_dir: str | None = setting(None, node=False)
    train_size: int | None = setting(None, node=False)
    val_size: int | None = setting(None, node=False)
    test_size: int | None = setting(None, node=False)
    heldout_combos: int | None = setting(None, node=False)
    gen_seed: int | None = setting(None, node=False)

    def __post_init__(self) -> None:
        # Choices are checked here, when a run's settings are built: a bad value fails before any work (exit 2).
        int_at_least("data.image_size", self.image_size, 1)
        int_at_least("data.max_len", self.max_len, 1, optional=True)
        int_at_least("data.num_workers", self.num_workers, 0)
        finite("data.decoded_cache_mb", self.decoded_cache_mb, 0.0, why=" (0: off)")
        int_at_least("data.batches_per_epoch", self.batches_per_epoch, 1, optional=True)
        finite("data.image_noise", self.image_noise, 0.0, optional=True)
        finite("data.caption_noise", self.caption_noise, 0.0, 1.0, optional=True)
        finite("data.max_skipped_fraction", self.max_skipped_fraction, 0.0, 1.0, optional=True)
        for split in ("train", "val", "test"):
            pattern = getattr(self, f"{split}_shards")
            if pattern is not None and not str(pattern).strip():
                fail(f"data.{split}_shards is empty: give a brace pattern of shards, e.g. "
                      f"data.{split}_shards='/data/{split}/{{00000..00009}}.tar', or null")
        if self.name == "shapes":  # the generator's sizes (other sources leave them None)
            int_at_least("data.train_size", self.train_size, 1, optional=True)
            int_at_least("data.val_size", self.val_size, 1, optional=True)
            int_at_least("data.test_size", self.test_size, 0, optional=True, why=" (0: no test split)")
            int_at_least("data.gen_seed", self.gen_seed, 0, optional=True)

        if self.hard_negatives not in HARD_NEGATIVES:
            raise ConfigError(unknown("data.hard_negatives choice", str(self.hard_negatives), list(HARD_NEGATIVES),
                                       "data.hard_negatives"))
        if self.noise_attribute is not None:
            if self.noise_attribute not in (*COLOURS, *SHAPES):
                raise ConfigError(unknown("data.noise_attribute (a colour or shape)", str(self.noise_attribute),
                                           [*COLOURS, *SHAPES], "data.noise_attribute"))
        if not isinstance(self.noise_rate, (int, float)) or not 0.0 <= float(self.noise_rate) <= 1.0:
            raise ConfigError(f"data.noise_rate must be a probability in [0, 1], got {self.noise_rate}")
        if self.noise_rate and self.noise_attribute is None:
            raise ConfigError(f"data.noise_rate={self.noise_rate} needs data.noise_attribute=<colour or shape>: the "
                              "scenes whose captions are replaced")
        if self.heldout_combos is not None and not 0 <= self.heldout_combos <= 20:
            raise ConfigError(f"data.heldout_combos must be in [0, 20] (at most half the 40 classes), "
                              f"got {self.heldout_combos}")

    def loader_noise(self) -> dict[str, float]:
        """The augmentation noise the config sets (``None``: the loader's defaults)."""
        return {k: getattr(self, k) for k in ("image_noise", "caption_noise") if getattr(self, k) is not None}


@dataclass(frozen=True)
class MakeDataSettings:
    """The keys of ``probloss make-data`` (scripts/make_data.py): write the built-in shapes dataset as webdataset
    shards. configs/make_data.yaml composes them (the node ``_make_data_settings``) and keeps the run commands;
    every value is checked when built, before anything is written."""

    # output folder (required): new, or one make_data wrote (its probloss-manifest.json lists its files); a folder
    # with any other file is refused, nothing in it is deleted
    out: str = REQUIRED
    # training samples (required)
    train_size: int = REQUIRED
    # validation samples (required): for selection (learning rates, early stopping)
    val_size: int = REQUIRED
    # test samples: for reporting only (0: no test split)
    test_size: int = 5000
    # dataset seed (sample i of a split depends only on it and i; it also draws the held-out set)
    seed: int = 0
    # colour x shape combinations never in train (listed in splits.json; 0 to 20, 0: none)
    heldout_combos: int = 8
    # pixels per side
    image_size: int = 32
    # samples per shard
    shard_size: int = 1000
    # processes (null: every CPU core, at most one per shard)
    num_workers: int | None = None
    # regenerate even if a finished dataset with these parameters is there
    overwrite: bool = False

    def __post_init__(self) -> None:
        int_at_least("train_size", self.train_size, 1)
        int_at_least("val_size", self.val_size, 1)
        int_at_least("test_size", self.test_size, 0, why=" (0: no test split)")
        int_at_least("seed", self.seed, 0)
        int_at_least("image_size", self.image_size, 1)
        int_at_least("shard_size", self.shard_size, 1)
        int_at_least("num_workers", self.num_workers, 1, optional=True)
        heldout = self.heldout_combos
        if not is_int(heldout) or not 0 <= heldout <= 20:
            fail(f"heldout_combos must be an integer in [0, 20] (at most half the 40 classes), got {heldout!r}")
        if not str(self.out or "").strip():
            fail("out must be a folder, e.g. out=data/shapes")

    def shard_kwargs(self) -> dict[str, Any]:
        """The keywords of ``write_shapes_shards(out, **kwargs)`` (probloss/data/shards.py)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "out"}
