"""Data preparation for a run: which shards to read, the built-in shapes cache, the batch stream, the val set.

::

    spec = prepare_data(run.data, global_batch=128, fabric=fabric)   # shapes: generated once into the cache
    for batch in train_batches(spec, run.data, tokenizer, ...): ...   # this rank's batches, epoch after epoch
    val = load_eval(spec, run.data, tokenizer, seed=0)                # selection
    test = load_eval(spec, run.data, tokenizer, split="test", seed=0)  # reporting (spec.test may be None)

The shapes cache is ``<cache_dir>/shapes-<hash of the generation parameters>/``, written by
:func:`probloss.data.write_shapes_shards`, whose ``meta.json`` (written last) is the one completion marker:
a folder without it is regenerated, one with it is reused. ``splits.json`` beside the split folders names the
held-out colour x shape classes (``DataSpec.heldout``) and the dataset's zero-shot templates; ``train_captions.json``
there (shapes data) gives the eval sets ``train_caption_stats``, each training caption's count and level.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import braceexpand

from probloss import dist
from probloss.data import load_eval_set, make_train_loader, shapes, write_shapes_shards
from probloss.data.loader import (
    SKIP_JUDGE_AFTER, check_labels, check_skipped, count_samples, empty_shards, expand_shards, scan_labels,
    truncated_shards,
)
from probloss.data.settings import DataSettings
from probloss.data.shapes import DEFAULT_TEMPLATES
from probloss.data.trust import check_shard_urls
from probloss.errors import DataError


@dataclass(frozen=True)
class DataSpec:
    """The shards and zero-shot classes of a run, resolved once."""

    train: str  # brace pattern of training shards
    val: str  # brace pattern of validation shards (selection)
    classnames: tuple[str, ...] | None  # zero-shot classes (None: no zero-shot)
    templates: tuple[str, ...] | None  # zero-shot prompt templates (None: the evaluator's defaults)
    steps_per_epoch: int  # batches per rank per epoch
    test: str | None = None  # brace pattern of test shards (reporting); None: no test split
    heldout: tuple[str, ...] | None = None  # class names held out of training (splits.json); None: unknown
    truncated: tuple[str, ...] = ()  # shards that were cut short (read up to the cut; data/truncated_shards)
    train_captions: str | None = None  # train_captions.json of the training split (EvalSet.train_caption_stats)


def prepare_data(data: DataSettings, global_batch: int, fabric=None) -> DataSpec:
    """Shard patterns for the run: the configured ones, or (``data=shapes``) generated once into the cache.

    Rank 0 generates while the others wait (``fabric=None``: one process).
    """
    train, val, test, classnames = data.train_shards, data.val_shards, data.test_shards, data.classnames
    # Before any shard is listed or opened: a pattern that runs a command must come from this command line.
    check_shard_urls({"data.train_shards": train, "data.val_shards": val, "data.test_shards": test})
    cache = None  # the shapes cache folder, when the shards are generated
    if data.name == "shapes" and (train is None or val is None):
        folder = cache = shapes_cache_folder(data)
        patterns = generate_shapes(folder, data) if fabric is None or fabric.is_global_zero else None
        dist.barrier(fabric)
        patterns = patterns or generate_shapes(folder, data)  # other ranks: finished by now, only reads meta.json
        train, val, test = train or patterns["train"], val or patterns["val"], test or patterns.get("test")
    else:  # configured shards: classes.json and splits.json sit in the folder above the val split's
        folder = Path(next(iter(braceexpand.braceexpand(str(val).split("::")[0])))).parent.parent
    if data.name == "shapes" and classnames is None:
        classnames = _read_classes(folder / "classes.json")
    splits = json.loads((folder / "splits.json").read_text()) if (folder / "splits.json").is_file() else None
    heldout = None if splits is None else tuple(splits.get("heldout_combos") or ())  # names as in classes.json
    if splits is None and classnames and (fabric is None or fabric.is_global_zero):
        print("no splits.json next to the shards: seen/unseen zero-shot keys are skipped")
    templates = data.templates or (tuple(splits["templates"]) if splits and splits.get("templates") else None)
    if templates is None and data.name == "shapes":
        templates = DEFAULT_TEMPLATES  # prompts no caption equals (shards written before splits.json existed)
    check_not_empty({"train": train, "val": val, "test": test})
    truncated = check_shards({"train": train, "val": val, "test": test}, data.strict, cache, fabric)
    if classnames and cache is None:  # given shards: every zero-shot label names a class, before training

        for split, pattern in (("val", val), ("test", test)):
            if pattern is not None:
                scan_labels(expand_shards(pattern), len(classnames), f"data.{split}_shards")
    train_captions = _train_captions(folder, str(train))
    steps = data.batches_per_epoch
    if steps is None:
        steps = max(1, _train_samples(data, str(train), fabric) // global_batch)
    return DataSpec(str(train), str(val), tuple(classnames) if classnames else None, templates, int(steps),
                    test=None if test is None else str(test), heldout=heldout, truncated=truncated,
                    train_captions=train_captions)


def _train_captions(folder: Path, train: str) -> str | None:
    """``<folder>/train_captions.json`` when it is there and describes these training shards (they lie in
    ``<folder>/train/``): the counts of another training set would be wrong."""
    path = folder / "train_captions.json"
    first = Path(next(iter(braceexpand.braceexpand(train.split("::")[0]))))
    return str(path) if path.is_file() and first.parent.resolve() == (folder / "train").resolve() else None


def check_not_empty(patterns: Mapping[str, str | None]) -> None:
    """A split whose shards hold no sample at all is a DataError (exit 2) before training, not a crash in the
    first batch."""
    for split, pattern in patterns.items():
        if pattern is None:
            continue
        shards = expand_shards(pattern)
        empty = empty_shards(shards)
        if empty and len(empty) == len(shards):
            raise DataError(f"data.{split}_shards={pattern!r}: its {len(shards)} shard(s) hold no sample "
                            f"(e.g. {empty[0]} is an empty tar); give shards with samples")


def check_shards(patterns: Mapping[str, str | None], strict: bool, cache_folder: Path | None, fabric=None
                 ) -> tuple[str, ...]:
    """Find shards that were cut short (rank 0 reads, every rank gets the answer): each is named once, with
    where it ends; ``strict`` makes any of them an error (:class:`probloss.errors.DataError`, exit 2) before
    training. Returns their paths."""
    found: dict[str, tuple[str, str]] = {}
    if fabric is None or fabric.is_global_zero:
        for split, pattern in patterns.items():
            if pattern is not None:
                found.update({path: (split, why) for path, why in truncated_shards(expand_shards(pattern)).items()})
    found = dist.broadcast_object(fabric, found) if fabric is not None else found
    if not found:
        return ()
    fix = (f"delete {cache_folder} and it is generated again" if cache_folder is not None else
           "download or write it again, or leave it out of the shard pattern")
    lines = [f"truncated shard {path} (data.{split}_shards): {why}" for path, (split, why) in found.items()]
    if strict:
        raise DataError("; ".join(lines) + f". Fix: {fix} (data.strict=false reads each up to its cut)")
    if fabric is None or fabric.is_global_zero:
        for line in lines:
            print(f"warning: {line}. Its samples after the cut are not read; fix: {fix} (data.strict=true stops "
                  "instead)", file=sys.stderr)
    return tuple(found)


def _train_samples(data: DataSettings, pattern: str, fabric=None) -> int:
    """Training samples, to size an epoch when ``data.batches_per_epoch`` is null: the shapes data's train_size,
    else sizes.json beside the shards, else every tar header is read (rank 0; slow for many shards)."""
    if data.train_size is not None:
        return int(data.train_size)
    if fabric is not None and not fabric.is_global_zero:
        return dist.broadcast_object(fabric, None)
    count = count_samples(expand_shards(pattern), why="data.batches_per_epoch is null")
    return dist.broadcast_object(fabric, count) if fabric is not None else count


def _read_classes(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    names = json.loads(path.read_text())
    if isinstance(names, Mapping):
        names = names.get("classnames") or names.get("classes") or names.get("names")
    return list(names) if names else None


def shapes_cache_folder(data: DataSettings) -> Path:
    """``<cache_dir>/shapes-<hash of the generation parameters>``."""
    params = {"train_size": int(data.train_size), "val_size": int(data.val_size), "test_size": int(data.test_size),
              "heldout_combos": int(data.heldout_combos), "seed": int(data.gen_seed),
              "image_size": int(data.image_size), "version": shapes.VERSION}
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.path.expanduser(str(data.cache_dir))) / f"shapes-{key}"


def generate_shapes(folder: Path, data: DataSettings) -> dict[str, str]:
    """Write the shapes shards into ``folder`` unless a finished copy is there; return the shard patterns."""
    return write_shapes_shards(folder, train_size=int(data.train_size), val_size=int(data.val_size),
                               test_size=int(data.test_size), heldout_combos=int(data.heldout_combos),
                               seed=int(data.gen_seed), image_size=int(data.image_size), out_key="data.cache_dir")


def train_batches(spec: DataSpec, data: DataSettings, tokenizer, per_rank: int, rank: int, world_size: int,
                  seed: int, pos) -> Iterator[dict]:
    """This rank's batches from the saved position on, forever (epoch after epoch).

    Each epoch's batches are a function of (seed, epoch, rank, world size) alone, and the batches already
    consumed are skipped, so the stream after a resume is the one an uninterrupted run would have seen. The
    loader's workers (and their decoded-sample caches, ``data.decoded_cache_mb``) live for the whole stream.
    ``pos.epoch`` and ``pos.batch`` advance as batches are handed out; ``pos.skipped`` sums the loaders'
    corrupt-sample counts; with ``data.noise_attribute``, ``pos.planted_{samples,scenes,replaced}`` count the
    samples read, those whose scene holds the attribute and those given a wrong caption.
    """
    seen = skipped = 0  # this process's samples read + skipped, and skipped (data.max_skipped_fraction)
    judged_first_epoch = False
    by_shard: dict[str, int] = {}
    # Seeded from its arguments only (the loader draws nothing from torch's global RNG).
    loader = make_train_loader(
        spec.train, tokenizer, per_rank, image_size=data.image_size, rank=rank, world_size=world_size,
        seed=seed, epoch=pos.epoch, num_workers=data.num_workers, batches_per_epoch=spec.steps_per_epoch,
        hard_negatives=data.hard_negatives, partial_captions=data.partial_captions,
        cache_mb=data.decoded_cache_mb or 0, noise_attribute=data.noise_attribute,
        noise_rate=float(data.noise_rate or 0.0), **data.loader_noise())
    first_epoch = pos.epoch
    for epoch, i, batch in loader.stream():
        if epoch == first_epoch and i < pos.batch:
            continue  # consumed before the checkpoint (its skipped samples were counted then)
        pos.skipped += int(batch.get("skipped", 0))  # corrupt samples skipped since the worker's last batch
        # data.max_skipped_fraction: judged at the end of the first epoch read (a small data set's first pass;
        # later passes may come from the decoded cache, which skips nothing again) and whenever
        # SKIP_JUDGE_AFTER samples have been seen
        where = f"training data (rank {rank})"
        if epoch != first_epoch and seen and not judged_first_epoch:
            check_skipped(skipped, seen, by_shard, data.max_skipped_fraction, where)
        judged_first_epoch = judged_first_epoch or epoch != first_epoch
        skipped += int(batch.get("skipped", 0))
        seen += len(batch["caption"]) + int(batch.get("skipped", 0))
        for url, n in (batch.get("skipped_shards") or {}).items():
            by_shard[url] = by_shard.get(url, 0) + int(n)
        if seen >= SKIP_JUDGE_AFTER:
            check_skipped(skipped, seen, by_shard, data.max_skipped_fraction, where)
        if data.noise_attribute is not None:  # planted noise: replaced captions among the attribute's scenes
            pos.planted_samples += len(batch["caption"])
            pos.planted_scenes += int(batch["attribute"].sum())
            pos.planted_replaced += int(batch["planted"].sum())
        pos.epoch, pos.batch = epoch, i + 1
        yield batch


def load_eval(spec: DataSpec, data: DataSettings, tokenizer, *, split: str = "val", seed: int,
              max_samples: int | None = None, image_noise: float = 0.0):
    """The val set (``split="val"``: selection) or the test set (``"test"``: reporting); ``image_noise`` adds
    Gaussian pixel noise (robustness studies, the sigma-vs-noise check).

    Raises:
        ValueError: an unknown split, or ``"test"`` when the run has no test split (``spec.test`` is None).
    """
    patterns = {"val": spec.val, "test": spec.test}
    if split not in patterns:
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    if patterns[split] is None:
        raise ValueError("this run has no test split: set data.test_shards (or use the built-in shapes data)")

    try:
        eval_set = load_eval_set(patterns[split], tokenizer, image_size=data.image_size, max_samples=max_samples,
                                 image_noise=image_noise, seed=seed, train_captions=spec.train_captions)
    except RuntimeError as err:
        if split == "val":  # before training: bad data, exit 2 (the test split's own handling is in evaluate)
            raise DataError(str(err)) from None
        raise
    try:
        check_skipped(eval_set.skipped, len(eval_set) + eval_set.skipped, eval_set.skipped_by_shard,
                      data.max_skipped_fraction, f"data.{split}_shards")
        if spec.classnames:
            check_labels(eval_set.json, [f"{k!r} in {patterns[split]}" for k in eval_set.keys], len(spec.classnames),
                         f"data.{split}_shards")
    except DataError as err:
        if split == "test":  # read after training: reported in the summary (test/error), not a lost run
            raise RuntimeError(str(err)) from None
        raise
    return eval_set
