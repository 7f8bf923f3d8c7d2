"""``data.*`` of a run (configs/data/<name>.yaml) and the keys of ``probloss make-data`` (configs/make_data.yaml):
typed, frozen, every value checked when built (one-line :class:`probloss.errors.ConfigError`, exit 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from probloss.checks import fail, finite, int_at_least, is_int, unknown
from probloss.data.shapes import COLOURS, HARD_NEGATIVES, SHAPES
from probloss.errors import ConfigError


@dataclass(frozen=True)
class DataSettings:
    """``data.*`` of configs/data/<name>.yaml. Keys that only the built-in shapes data has are ``None`` for
    other sources (``cache_dir``, ``train_size``, ``val_size``, ``test_size``, ``heldout_combos``,
    ``gen_seed``)."""

    name: str
    train_shards: str | None
    val_shards: str | None
    test_shards: str | None
    image_size: int
    classnames: tuple[str, ...] | None
    templates: tuple[str, ...] | None
    tokenizer: str
    max_len: int | None  # null: an hf: tokenizer's own maximum (resolved when the config is composed)
    num_workers: int
    decoded_cache_mb: float
    batches_per_epoch: int | None
    image_noise: float | None
    caption_noise: float | None
    hard_negatives: str
    partial_captions: bool = False
    strict: bool = False
    noise_attribute: str | None = None  # planted noise (issue 33): a colour or shape of the shapes generator
    noise_rate: float = 0.0  # planted noise: the probability that a scene with the attribute gets a wrong caption
    cache_dir: str | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    heldout_combos: int | None = None
    gen_seed: int | None = None
    # Skipped (corrupt or undecodable) samples allowed, as a fraction of those read, before the run stops with a
    # data error naming the worst shards; None (a config saved before the key existed): no limit.
    max_skipped_fraction: float | None = None

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


def check_make_data(values: Mapping[str, Any]) -> None:
    """The keys of configs/make_data.yaml (scripts/make_data.py), before anything is written."""
    int_at_least("train_size", values.get("train_size"), 1)
    int_at_least("val_size", values.get("val_size"), 1)
    int_at_least("test_size", values.get("test_size"), 0, why=" (0: no test split)")
    int_at_least("seed", values.get("seed"), 0)
    int_at_least("image_size", values.get("image_size"), 1)
    int_at_least("shard_size", values.get("shard_size"), 1)
    int_at_least("num_workers", values.get("num_workers"), 1, optional=True)
    heldout = values.get("heldout_combos")
    if not is_int(heldout) or not 0 <= heldout <= 20:
        fail(f"heldout_combos must be an integer in [0, 20] (at most half the 40 classes), got {heldout!r}")
    if not str(values.get("out") or "").strip():
        fail("out must be a folder, e.g. out=data/shapes")
