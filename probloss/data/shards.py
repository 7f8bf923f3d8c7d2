"""Write the shapes data as webdataset shards in the img2dataset layout.

    out_dir/
      classes.json              ["red circle", "red square", ...]  (label -> name)
      splits.json               {"heldout_combos": ["red diamond", ...], "seed", "sizes": {"train", "val", "test"},
                                 "templates": [zero-shot prompts no caption equals]}
      meta.json                 the generation parameters, written last; a finished dataset is reused
      train_captions.json       {caption: [count in train, level]} for every training caption string (what the
                                train shards hold), for frequency baselines (EvalSet.train_caption_stats)
      train/00000.tar ...       {key}.png, {key}.txt (training caption), {key}.json (metadata, see shapes.py);
                                no held-out colour x shape combination anywhere in train
      train/sizes.json          {"00000.tar": 1000, ...}  (samples per shard, as open_clip reads it)
      val/00000.tar ...         for selection (natural distribution, held-out combinations included; json
                                heldout_mentions flags the texts that name one)
      test/00000.tar ...        for reporting (likewise)
      probloss-manifest.json    every file this writer wrote (or was writing), folder-relative
      .probloss-make-data.lock  the writers' lock (one writer at a time)

It never deletes or overwrites what it did not write: before writing into a folder, every file there must be
listed in the folder's ``probloss-manifest.json`` (the manifest is written before the first shard, so even a
crashed write is recorded); a folder holding any other file (someone's own ``train/00042.tar``) is refused
with a config error naming them (exit 2): choose another ``out=``. A finished dataset with the same parameters
(``meta.json``) is reused read-only, so folders written before the manifest existed still work.

``python scripts/make_data.py out=data/shapes train_size=50000 val_size=2000 test_size=5000`` calls :func:`main`
(its keys and defaults: configs/make_data.yaml).
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import webdataset as wds
from filelock import FileLock, Timeout
from tqdm import tqdm

from probloss.data.shapes import (
    DEFAULT_LEVEL_PROBS, DEFAULT_TEMPLATES, TEST_INDEX_OFFSET, VAL_INDEX_OFFSET, class_names, generate_sample,
    heldout_combos as draw_heldout,
)
from probloss.errors import ConfigError


def _write_shard(job: tuple) -> tuple[int, Counter]:
    """Write one shard; a pool task. job = (path, first index, count, seed, image_size, level_probs, exclude,
    heldout). Returns the sample count and a Counter of the (caption, level) written."""
    path, start, count, seed, image_size, level_probs, exclude, heldout = job
    tmp = f"{path}.tmp"
    captions = Counter()
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as sink:  # mtime=0: byte-identical reruns
        for index in range(start, start + count):
            image, caption, meta = generate_sample(seed, index, image_size, level_probs, exclude=exclude,
                                                   heldout=heldout)
            png = io.BytesIO()
            image.save(png, format="PNG", compress_level=1)
            sink.write({"__key__": f"{index:010d}", "png": png.getvalue(), "txt": caption,
                        "json": json.dumps(meta).encode()})
            captions[caption, meta["level"]] += 1
    os.replace(tmp, path)  # a crashed run never leaves a complete-looking shard behind
    return count, captions


MANIFEST = "probloss-manifest.json"
LOCK = ".probloss-make-data.lock"


def recorded_files(out: Path) -> set[str]:
    """The folder-relative paths ``out``'s manifest lists (empty without one)."""
    path = out / MANIFEST
    if not path.is_file():
        return set()
    try:
        return set(json.loads(path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()  # an unreadable manifest protects nothing: every file counts as someone else's


def foreign_files(out: Path) -> list[str]:
    """Files (and links) under ``out`` that its manifest does not list: what this writer must not touch."""
    if not out.is_dir():
        return []
    own = recorded_files(out) | {MANIFEST, LOCK}
    return sorted(rel for p in out.rglob("*") if (p.is_file() or p.is_symlink())
                  and (rel := p.relative_to(out).as_posix()) not in own)


def _write_manifest(out: Path, files: set[str]) -> None:
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"written_by": "probloss make-data (probloss/data/shards.py)",
                               "files": sorted(files)}, indent=0))
    os.replace(tmp, out / MANIFEST)


def refuse_foreign(out: Path, out_key: str) -> None:
    """Raise ConfigError (exit 2) naming the files in ``out`` that this writer did not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder: choose another {out_key}=")
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"{out} holds {len(foreign)} file(s) that make_data did not write ({shown}); it writes only "
                          f"into a new folder or one it wrote ({MANIFEST}) and never deletes other files: choose "
                          f"another {out_key}=")


@contextlib.contextmanager
def exclusive(out: Path):
    """Hold ``<out>/.probloss-make-data.lock`` (a file lock, safe across processes, inside the folder it guards)
    for the block; say so when waiting for it."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process that writes {out} (lock {lock.lock_file})", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _pattern(folder: Path, n_shards: int) -> str:
    return str(folder / ("00000.tar" if n_shards == 1 else f"{{00000..{n_shards - 1:05d}}}.tar"))


def write_shapes_shards(
    out_dir: str | os.PathLike,
    train_size: int,
    val_size: int,
    seed: int = 0,
    image_size: int = 32,
    *,
    test_size: int = 5000,
    heldout_combos: int = 8,
    shard_size: int = 1000,
    level_probs: Sequence[float] = DEFAULT_LEVEL_PROBS,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    out_key: str = "out",
) -> dict[str, str]:
    """Generate the shapes dataset into ``out_dir`` and return the shard brace patterns.

    Sample i of train is ``generate_sample(seed, i, exclude=heldout_combos(seed, heldout_combos))``; sample i
    of val is ``generate_sample(seed, VAL_INDEX_OFFSET + i)`` and of test ``generate_sample(seed,
    TEST_INDEX_OFFSET + i)``, so val and test do not depend on ``train_size`` and keep the held-out
    combinations. Val is for selection, test for reporting. If ``out_dir/meta.json`` records the same
    parameters, the existing shards are reused (delete the folder or pass ``overwrite=True`` to redo).

    Args:
        out_dir: output folder.
        train_size, val_size, test_size: number of samples per split (test_size 0: no test split).
        seed: dataset seed (also draws the held-out combinations).
        heldout_combos: colour x shape combinations kept out of train (0 to 20; 0: none), listed in splits.json.
        image_size: image side in pixels.
        shard_size: samples per shard (more shards than ranks x loader workers keeps splitting by shard).
        level_probs: probabilities of the training caption's level L0..L3.
        num_workers: processes (default: all CPU cores, at most one per shard).
        overwrite: regenerate even if a matching dataset exists (only files of the manifest are replaced).
        progress: show a tqdm progress bar.
        out_key: the setting that chose ``out_dir``, named in the refusal (``out``, ``data.cache_dir``).

    Raises:
        ConfigError: ``out_dir`` holds files this writer did not write (see the module docstring).

    Returns:
        ``{"train": "<out_dir>/train/{00000..000NN}.tar", "val": ..., "test": ...}``.
    """
    out = Path(out_dir)
    heldout = draw_heldout(int(seed), int(heldout_combos))
    params = dict(train_size=int(train_size), val_size=int(val_size), test_size=int(test_size), seed=int(seed),
                  image_size=int(image_size), heldout_combos=int(heldout_combos), shard_size=int(shard_size),
                  level_probs=[float(p) for p in level_probs], format=3)  # 3: train_captions.json, heldout flags
    splits = {"train": (0, int(train_size)), "val": (VAL_INDEX_OFFSET, int(val_size)),
              "test": (TEST_INDEX_OFFSET, int(test_size))}
    if int(test_size) == 0:
        del splits["test"]  # no test split: the patterns have no "test"
    n_shards = {s: max(1, -(-n // shard_size)) for s, (_, n) in splits.items()}
    patterns = {s: _pattern(out / s, n_shards[s]) for s in splits}
    meta_path = out / "meta.json"

    def finished() -> bool:  # meta.json is written last: a finished dataset with these parameters
        try:
            return not overwrite and meta_path.is_file() and json.loads(meta_path.read_text()) == params
        except (OSError, ValueError):
            return False

    if finished():
        return patterns  # reused read-only (also a folder written before manifests existed)
    refuse_foreign(out, out_key)  # before the lock: nothing is put into someone else's folder
    with exclusive(out):  # one writer at a time (workers started together): the others wait, then reuse it
        if finished():
            return patterns
        refuse_foreign(out, out_key)
        previous = recorded_files(out)
        planned = {f"{split}/{k:05d}.tar{tmp}" for split in splits for k in range(n_shards[split])
                   for tmp in ("", ".tmp")}
        planned |= {f"{split}/sizes.json" for split in splits}
        planned |= {"classes.json", "train_captions.json", "splits.json", "meta.json"}
        _write_manifest(out, previous | planned)  # before any write: a crash leaves every file recorded
        for rel in sorted(previous, key=lambda rel: rel != "meta.json"):  # meta.json first: it marks completion
            if (out / rel).is_file() or (out / rel).is_symlink():
                (out / rel).unlink()  # a file of an earlier dataset of this writer
        jobs, job_splits, sizes = [], [], {}
        for split, (offset, n) in splits.items():
            folder = out / split
            folder.mkdir(parents=True, exist_ok=True)
            sizes[split] = {}
            for k in range(n_shards[split]):
                count = min(shard_size, n - k * shard_size)
                sizes[split][f"{k:05d}.tar"] = count
                exclude = heldout if split == "train" else ()  # val and test keep the natural distribution
                jobs.append((str(folder / f"{k:05d}.tar"), offset + k * shard_size, count, int(seed), int(image_size),
                             tuple(level_probs), exclude, heldout))  # heldout: only val/test flag mentions
                job_splits.append(split)
        num_workers = max(1, min(num_workers or os.cpu_count() or 1, len(jobs)))
        total = sum(n for _, n in splits.values())
        start = time.perf_counter()
        train_captions = Counter()  # (caption, level) -> count, over the training shards
        with tqdm(total=total, unit="sample", desc=f"shapes -> {out}", disable=not progress) as bar:
            if num_workers == 1:
                for split, job in zip(job_splits, jobs):
                    count, captions = _write_shard(job)
                    bar.update(count)
                    train_captions.update(captions if split == "train" else {})
            else:
                context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                with context.Pool(num_workers) as pool:
                    for split, (count, captions) in zip(job_splits, pool.imap(_write_shard, jobs)):
                        bar.update(count)
                        train_captions.update(captions if split == "train" else {})
        elapsed = time.perf_counter() - start
        for split in splits:
            (out / split / "sizes.json").write_text(json.dumps(sizes[split], indent=0))
        (out / "classes.json").write_text(json.dumps(class_names(), indent=0))
        (out / "train_captions.json").write_text(json.dumps(
            {caption: [n, level] for (caption, level), n in sorted(train_captions.items())}, indent=0))
        (out / "splits.json").write_text(json.dumps({
            "heldout_combos": [f"{c} {s}" for c, s in heldout], "seed": int(seed),  # the names of classes.json
            "sizes": {k: splits.get(k, (0, 0))[1] for k in ("train", "val", "test")},
            "templates": list(DEFAULT_TEMPLATES)}, indent=1))
        _write_manifest(out, {rel for rel in planned if not rel.endswith(".tmp")})
        meta_path.write_text(json.dumps(params))
        if progress:
            print(f"wrote {total} samples in {elapsed:.1f} s "
                  f"({total / max(elapsed, 1e-9):.0f} samples/s, {num_workers} processes)")
        return patterns
