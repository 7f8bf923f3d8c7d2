"""Read image-caption webdataset shards (img2dataset layout) into training batches and in-memory eval sets.

Any shards with ``{key}.jpg|jpeg|png|webp``, ``{key}.txt`` and optionally ``{key}.json`` work, not only the
shapes data. Training batches (:func:`make_train_loader`) are dicts::

    image    float (B, 3, H, W), normalised to [-1, 1] ((x - 0.5) / 0.5)
    tokens   long (B, L), pad 0
    caption  list[str]   the caption actually trained on (after caption noise)
    json     list[dict]  the sample metadata ({} when the shard has none)
    noisy    bool (B,)   True where caption noise replaced the caption
    planted  bool (B,)   True where planted noise (``noise_attribute``, ``noise_rate``) gave the sample a wrong
                         caption; attribute bool (B,): the scene holds the attribute (all False without one)
    skipped  int         corrupt samples skipped by the producing worker since its previous batch;
                         sum it over batches (and ranks) for the total
    negative_tokens  long (B, k, L)   only with ``hard_negatives`` other than "none": the tokenized hard
                         negatives of each sample's image (json ``negatives``), k kinds in the order of
                         ``probloss.data.shapes.HARD_NEGATIVES[hard_negatives]``; a kind a sample lacks
                         (relation/binding of a one-object scene) is filled with its ``control`` negative
    partial_tokens long (B, L)  only with ``partial_captions``: each caption's partial view, the caption of the
                         same scene one specificity level below it (json ``captions`` by level and ``level``)
    partial_mask bool (B,)  where that view exists (not for level-0 captions, nor where caption noise replaced
                         the caption; those rows carry their own caption as a placeholder)

Splitting and equal batch counts. Shards are split between ranks and then DataLoader workers (the
``split_by_node`` / ``split_by_worker`` order of webdataset, but with explicit rank and world size so tests and
launchers need no process group). If there are fewer shards than ranks x workers, every reader walks all shards
and keeps every n-th sample instead. Each reader cycles through its part for as long as needed and stops after
exactly its share of ``batches_per_epoch``, so every rank yields the same number of batches (uneven shards would
otherwise hang DDP; docs/design.md pitfalls). Everything random is seeded from (seed, epoch, rank, world_size,
worker). With ``cache_mb`` a reader keeps the decoded samples of the shards it has read to the end
(:class:`DecodedCache`) and serves later passes from memory; the noise is drawn after the cache, so the batches
are the same with or without it. ``TrainLoader.stream()`` runs epoch after epoch through the same workers (and
caches); a training run reads through it.

Bad input. A truncated or corrupt tar, a sample without an image or caption, an undecodable image, an empty
caption, undecodable text or unparsable json is skipped through webdataset's ``handler`` mechanism: logged
(first few per worker, each naming the sample key and its shard) and counted per shard, never raised mid-epoch;
counted on every pass that reads it, so once where a cache keeps its shard. ``max_skipped_fraction`` bounds it:
more skipped samples than that fraction of those read (an eval split: the whole split; training: judged once
:data:`SKIP_JUDGE_AFTER` samples have been read, per rank) is a :class:`probloss.errors.DataError` naming the worst
shards. A pattern that matches no file raises FileNotFoundError, an unbalanced brace pattern and shards without
a single readable sample a DataError, before any batch is made. :func:`check_labels` checks zero-shot labels
(json ``label``: an integer class index) against the class list, naming the sample.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import glob
import io
import itertools
import json
import logging
import os
import random
import signal
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageFilter, ImageOps

from probloss.data.shapes import HARD_NEGATIVES, NEGATIVE_KINDS, plausible_matrix
from probloss.errors import ConfigError, DataError
from probloss.models._blocks import MEAN, STD  # the images every tower takes: normalised to [-1, 1]

log = logging.getLogger("probloss.data")

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


# --- shard lists ----------------------------------------------------------------------------------------------


def expand_shards(pattern: str | Sequence[str]) -> list[str]:
    """Brace (``{00000..00099}``), glob (``*``) or ``::``-joined patterns, or a list of paths -> shard paths.

    Raises:
        FileNotFoundError: naming the pattern, when it matches nothing or some listed shard is missing.
    """
    parts = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    urls: list[str] = []
    for part in parts:
        for p in str(part).split("::"):
            try:
                expanded = list(braceexpand.braceexpand(p))
            except braceexpand.UnbalancedBracesError:
                raise DataError(f"shard pattern {str(pattern)!r} has unbalanced braces; write a range as "
                                "{00000..00099} or alternatives as {a,b}") from None
            for u in expanded:
                urls.extend(sorted(glob.glob(u)) if any(c in u for c in "*?[") else [u])
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if not urls or missing:
        what = "matches no file" if not urls or len(missing) == len(urls) else f"misses {len(missing)} of {len(urls)} shards"
        example = f" (e.g. {missing[0]!r})" if missing else ""
        raise FileNotFoundError(f"shard pattern {str(pattern)!r} {what}{example}")
    return urls


def count_samples(shards: Sequence[str], why: str = "") -> int:
    """Samples in the shards: from ``sizes.json`` beside them where it lists them (img2dataset and
    scripts/make_data.py write one), else by reading every tar header of the others (slow for many shards:
    said on stdout, with ``why`` the count is needed)."""
    total, unlisted, sizes_cache = 0, [], {}
    for url in shards:
        folder, name = os.path.split(url)
        if folder not in sizes_cache:
            path = os.path.join(folder, "sizes.json")
            try:
                sizes_cache[folder] = json.loads(Path(path).read_text()) if os.path.isfile(path) else {}
            except (OSError, ValueError):
                sizes_cache[folder] = {}
        if name in sizes_cache[folder]:
            total += int(sizes_cache[folder][name])
        else:
            unlisted.append(url)
    if unlisted:
        print(f"{why + ': ' if why else ''}counting the samples of {len(unlisted)} of {len(shards)} shards by reading "
              "their tar headers (no sizes.json beside them lists them)", flush=True)
    for url in unlisted:
        keys = set()
        try:
            with tarfile.open(url, "r|*") as tar:
                for info in tar:
                    if info.isreg() and "." in os.path.basename(info.name):
                        keys.add(info.name.split(".", 1)[0])
        except (OSError, tarfile.TarError):
            pass  # a corrupt shard counts what could be read; the reader skips the rest
        total += len(keys)
    return total


def truncated_shards(shards: Sequence[str]) -> dict[str, str]:
    """``{path: where it ends}`` for local shards that were cut short (an interrupted download or write).

    A complete tar ends with two zero blocks of 512 bytes; Python's tarfile (and so webdataset) stops reading at
    a cut without any error, so the samples after it would be lost in silence. The check reads the last 1024
    bytes of each shard (O(1) per shard); only a shard that fails it has its headers walked, which also says
    where it ends. Remote urls (``pipe:``, ``s3://``) are not checked.
    """
    bad = {}
    for url in shards:
        if "://" in url or url.startswith("pipe:"):
            continue
        size = os.path.getsize(url)
        with open(url, "rb") as f:
            f.seek(max(0, size - 1024))
            if size >= 1024 and size % 512 == 0 and not any(f.read()):
                continue
            problem = _where_tar_ends(f, size)
        if problem:
            bad[url] = problem
    return bad


def empty_shards(shards: Sequence[str]) -> list[str]:
    """The local shards that hold no member at all (an empty file, or a tar whose first block is the end-of-archive
    block): O(1) per shard. Remote urls are not checked."""
    empty = []
    for url in shards:
        if "://" in url or url.startswith("pipe:"):
            continue
        with open(url, "rb") as f:
            if not any(f.read(512)):
                empty.append(url)
    return empty


def scan_labels(shards: Sequence[str], n_classes: int, where: str) -> None:
    """:func:`check_labels` on the json members of local shards, read without decoding any image (so a split
    is checked when it is opened, before training). Remote urls are checked when they are read."""
    for url in shards:
        if "://" in url or url.startswith("pipe:"):
            continue
        metas, keys = [], []
        try:
            with tarfile.open(url, "r|*") as tar:
                for info in tar:
                    if info.isreg() and info.name.endswith(".json"):
                        try:
                            metas.append(json.loads(tar.extractfile(info).read()))
                        except ValueError:
                            continue  # unparsable json: skipped (and counted) when the split is read
                        keys.append(f"{os.path.basename(info.name[:-5])!r} in {url}")
        except (OSError, tarfile.TarError):
            pass  # a corrupt shard: named and counted when it is read
        check_labels(metas, keys, n_classes, where)


def _where_tar_ends(f, size: int) -> str | None:
    """Walk the tar headers of an open shard: where it ends if it was cut short, None if it is complete."""
    position, last = 0, "(none)"
    while position + 512 <= size:
        f.seek(position)
        header = f.read(512)
        if not any(header):  # end-of-archive: complete if the second zero block is there too
            second = f.read(512)
            return None if len(second) == 512 and not any(second) else \
                f"it lacks the second end-of-archive block after member {last}"
        field = header[124:136]  # the member's size: octal text, or base-256 when the high bit is set
        try:
            length = int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.strip(b"\0 ") or b"0", 8)
        except ValueError:
            return f"it has a broken header at byte {position}, after member {last}"
        name = repr(header[:100].split(b"\0", 1)[0].decode("utf-8", "replace"))
        end = position + 512 + -(-length // 512) * 512
        if end > size:
            have = max(0, size - position - 512)
            if have < length:
                return f"it ends inside member {name} ({have} of {length} bytes)"
            return f"it ends without the end-of-archive blocks after member {name} (at byte {size})"
        position, last = end, name
    where = "inside the header" if position < size else "without the end-of-archive blocks"
    return f"it ends {where} after member {last} (at byte {size})"


# --- samples --------------------------------------------------------------------------------------------------


SKIP_JUDGE_AFTER = 1000  # training samples read (per rank) before max_skipped_fraction is judged


class BadSample(ValueError):
    """A sample that cannot be used (no image, no caption, undecodable bytes), with its key and shard."""

    def __init__(self, key: str, url: str, reason: str):
        super().__init__(f"sample {key!r} of {url}: {reason}")
        self.key, self.url = key, url


class SkipCounter:
    """A webdataset handler: log the exception (the first ``max_logs``, naming the sample and shard), count it
    (in total and per shard), and continue."""

    def __init__(self, max_logs: int = 10):
        self.count, self.max_logs = 0, max_logs
        self.by_shard: dict[str, int] = {}

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        url = exn.url if isinstance(exn, BadSample) else \
            (exn.args[-1] if len(exn.args) >= 2 and isinstance(exn.args[-1], str) else "?")  # webdataset appends it
        self.by_shard[url] = self.by_shard.get(url, 0) + 1
        if self.count <= self.max_logs:
            log.warning("skipping corrupt data (%d so far in this reader): %s: %s", self.count, type(exn).__name__,
                        str(exn.args[0] if exn.args else exn)[:300])
        return True  # continue with the next sample / shard


def check_skipped(skipped: int, seen: int, by_shard: Mapping[str, int], max_fraction: float | None,
                  where: str) -> None:
    """Raise DataError when ``skipped`` of ``seen`` samples (read + skipped) exceeds ``max_fraction``, naming the
    shards with the most skipped samples."""
    if max_fraction is None or not skipped or skipped <= max_fraction * seen:
        return

    worst = sorted(by_shard.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    shards = ", ".join(f"{url} ({n})" for url, n in worst)
    raise DataError(f"{where}: {skipped} of {seen} samples were skipped as corrupt or undecodable "
                    f"({skipped / seen:.1%} > data.max_skipped_fraction={max_fraction:g}); worst shards: {shards}. "
                    "Fix or leave out those shards, or raise data.max_skipped_fraction")


def check_labels(metas: Sequence[Mapping], keys: Sequence[str], n_classes: int, where: str) -> None:
    """Every json ``label`` (None or absent: unlabelled) must be an integer class index in [0, n_classes):
    raise DataError naming the first sample that is not (a negative, a float, an out-of-range label). ``keys``
    name the samples as the message shows them (``"'0000000042' in /data/val/00000.tar"``)."""
    for meta, key in zip(metas, keys):
        label = meta.get("label") if isinstance(meta, Mapping) else None
        if label is None:
            continue
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < n_classes:
            raise DataError(f"{where}: sample {key} has label {label!r}, not a class index in [0, {n_classes}) "
                            f"(data.classnames has {n_classes} classes); fix the sample's json or the class list")


def decode_sample(sample: dict[str, Any], image_size: int, *, image_noise: float = 0.0, image_blur: float = 0.0,
                  noise_seed: int = 0) -> dict[str, Any]:
    """Raw webdataset sample (bytes per extension) -> {"image": uint8 (H, W, 3), "caption", "json", "key"}.
    Raises ValueError on a missing image or caption or an empty caption (the handler skips it).

    Images are converted to RGB and centre-cropped/resized to ``image_size``. ``image_blur`` is a Gaussian blur
    radius in pixels and ``image_noise`` the std of additive Gaussian noise in [0, 1] pixel units (the noisy
    image is quantised to 8 bits again, as if saved); the noise is seeded by (noise_seed, key), so an eval set
    is corrupted the same way every time.
    """
    return add_image_noise(decode_clean(sample, image_size, image_blur=image_blur), image_noise, noise_seed)


def decode_clean(sample: dict[str, Any], image_size: int, *, image_blur: float = 0.0) -> dict[str, Any]:
    """:func:`decode_sample` without the noise: the part that is the same in every epoch (and so cached).
    A sample that cannot be used raises :class:`BadSample` (its key, its shard and why)."""
    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample(key, url, f"no image ({'/'.join(IMAGE_EXTS)}); it has {sorted(sample)}")
    if "txt" not in sample:
        raise BadSample(key, url, "no caption (.txt)")
    try:
        caption = sample["txt"].decode("utf-8").strip()
        meta = json.loads(sample["json"]) if "json" in sample else {}
        with Image.open(io.BytesIO(sample[ext])) as img:
            img = img.convert("RGB")
    except Exception as err:  # undecodable text, json or image
        raise BadSample(key, url, f"{type(err).__name__}: {err}") from None
    if not caption:
        raise BadSample(key, url, "an empty caption")
    if img.size != (image_size, image_size):
        img = ImageOps.fit(img, (image_size, image_size), Image.Resampling.BICUBIC)
    if image_blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(image_blur))
    pixels = np.asarray(img)  # (H, W, 3) uint8
    return {"image": pixels, "caption": caption, "json": meta, "key": key, "url": sample.get("__url__", "?"),
            "nbytes": pixels.nbytes + 8 * (len(sample.get("json", b"")) + len(sample["txt"])) + 400}


def add_image_noise(decoded: dict[str, Any], image_noise: float, noise_seed: int) -> dict[str, Any]:
    """The decoded sample with Gaussian pixel noise (see :func:`decode_sample`); a new dict, ``decoded`` (which
    a cache may hold) is left as it is."""
    if image_noise <= 0:
        return decoded
    pixels = decoded["image"]
    rng = np.random.default_rng([noise_seed, zlib.crc32(decoded["key"].encode())])
    noisy = pixels / 255.0 + rng.normal(0.0, image_noise, pixels.shape)
    return {**decoded, "image": np.round(np.clip(noisy, 0.0, 1.0) * 255).astype(np.uint8)}


class DecodedCache:
    """Decoded samples (:func:`decode_clean`) of whole shards, by url, up to ``budget_mb`` (an estimate: pixels
    plus 8 bytes per byte of caption and json, for the parsed objects). A reader keeps one for its lifetime, so
    from the second pass over a shard on, nothing is read or decoded again: reading and decoding were most of
    a batch's cost on the default run (the two costs: docs/performance.md)."""

    def __init__(self, budget_mb: float):
        self.budget, self.used, self.shards = float(budget_mb) * 2**20, 0.0, {}

    def get(self, url: str) -> list[dict] | None:
        return self.shards.get(url)

    def has_room(self) -> bool:
        return self.used < self.budget

    def put(self, url: str, samples: list[dict]) -> None:
        size = sum(s["nbytes"] for s in samples)
        if self.used + size <= self.budget:
            self.shards[url], self.used = samples, self.used + size


def _to_tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    """list of uint8 (H, W, 3) -> normalised float (B, 3, H, W)."""
    chw = np.ascontiguousarray(np.stack(pixels).transpose(0, 3, 1, 2))  # permute while still uint8: 4x less memory
    return torch.from_numpy(chw).float().div_(255.0 * STD).sub_(MEAN / STD)


def _negatives(samples: list[dict], kinds: Sequence[str], option: str) -> list[str]:
    """The negative captions of each sample, ``len(kinds)`` per sample (see the module docstring)."""
    out = []
    for s in samples:
        negatives = s["json"].get("negatives") or {}
        if isinstance(negatives, (list, tuple)):  # the list form: [relation, binding, control]
            negatives = dict(zip(NEGATIVE_KINDS, negatives))
        for kind in kinds:
            text = negatives.get(kind) or negatives.get("control")
            if not text:  # a config error (exit 2): the option asks for what these shards do not have

                raise ConfigError(
                    f"data.hard_negatives={option}: sample {s['key']!r} of shard {s['url']} has no {kind!r} (nor "
                    f"'control') negative in its json; write the shards with scripts/make_data.py (shapes "
                    f"VERSION >= 1) or set data.hard_negatives=none")
            out.append(text)
    return out


def _partial_captions(samples: list[dict], captions: list[str], noisy: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Each caption's partial view and whether it has one (see the module docstring)."""
    partial, mask = [], np.zeros(len(samples), dtype=bool)
    for i, s in enumerate(samples):
        levels, level = s["json"].get("captions"), s["json"].get("level")
        if not levels or not isinstance(level, int):
            raise ConfigError(
                f"data.partial_captions=true: sample {s['key']!r} of shard {s['url']} has no json `captions` by "
                "level and `level`; use the shapes data (scripts/make_data.py) or set data.partial_captions=false")
        mask[i] = level >= 1 and not noisy[i]
        partial.append(levels[level - 1] if mask[i] else captions[i])
    return partial, mask


def holds_attribute(meta: dict, attribute: str) -> bool:
    """Whether a sample's scene has an object of colour or shape ``attribute`` (json ``objects``).

    Raises:
        probloss.errors.ConfigError: the json has no ``objects`` with a colour and a shape (planted noise needs
            the shapes data's scene description).
    """
    objects = meta.get("objects")
    if not isinstance(objects, list) or not objects or not all(isinstance(o, dict) and "colour" in o and "shape" in o
                                                               for o in objects):
        raise ConfigError(f"data.noise_attribute={attribute}: sample {meta.get('index', '?')} has no json `objects` "
                          "(colour and shape of every object); use the shapes data (scripts/make_data.py) or unset "
                          "data.noise_attribute")
    return any(attribute in (o["colour"], o["shape"]) for o in objects)


def _planted_captions(captions: list[str], metas: list[dict], attribute: str | None, rate: float,
                      rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Planted noise (issue 33): each row whose scene holds ``attribute`` gets, with probability ``rate``
    (Bernoulli per row), the caption of another random row of the batch that is a WRONG pair for its scene: a
    row j whose caption is not the same string and not true of scene i (``plausible_matrix``, every fact it
    states holds), uniformly among those; a row with no such j keeps its caption (not counted as replaced).

    Returns:
        (captions, planted (B,) bool: replaced, attribute (B,) bool: the scene holds the attribute).
    """
    n = len(captions)
    if attribute is None:
        return list(captions), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    holds = np.array([holds_attribute(m, attribute) for m in metas], dtype=bool)
    draw = rng.random(n) < rate  # drawn for every row, so the draws do not depend on which scenes hold it
    rows = np.flatnonzero(holds & draw) if rate > 0 else np.array([], dtype=np.int64)
    out, planted = list(captions), np.zeros(n, dtype=bool)
    if len(rows):
        true_of = plausible_matrix(captions, [metas[i] for i in rows]).numpy()  # (R, B): caption j true of scene i
        strings = np.array(captions, dtype=object)
        for k, i in enumerate(rows):
            wrong = np.flatnonzero(~true_of[k] & (strings != captions[i]))
            if len(wrong):
                out[i], planted[i] = captions[wrong[rng.integers(len(wrong))]], True
    return out, planted, holds


def _noisy_captions(captions: list[str], fraction: float, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """Give a ``fraction`` of the rows (Bernoulli per row) the caption of another random row."""
    n = len(captions)
    noisy = (rng.random(n) < fraction) if (fraction > 0 and n > 1) else np.zeros(n, dtype=bool)
    out = list(captions)
    for i in np.flatnonzero(noisy):
        out[i] = captions[(i + rng.integers(1, n)) % n]  # any other row
    return out, noisy


# --- training stream ------------------------------------------------------------------------------------------


class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of batches for one rank (see the module docstring); iterate it directly or through a
    DataLoader with ``batch_size=None``. Built by :func:`make_train_loader`."""

    def __init__(self, shards: list[str], tokenizer: Callable[[list[str]], torch.Tensor], batch_size: int, *,
                 image_size: int, rank: int, world_size: int, seed: int, epoch: int, num_workers: int,
                 batches_per_epoch: int, shuffle_buffer: int, image_noise: float, image_blur: float,
                 caption_noise: float, hard_negatives: str = "none", partial_captions: bool = False,
                 cache_mb: float = 0.0, noise_attribute: str | None = None, noise_rate: float = 0.0):
        super().__init__()
        self.shards, self.tokenizer, self.batch_size = shards, tokenizer, batch_size
        self.image_size, self.rank, self.world_size, self.seed, self.epoch = image_size, rank, world_size, seed, epoch
        self.num_workers, self.batches_per_epoch, self.shuffle_buffer = max(1, num_workers), batches_per_epoch, shuffle_buffer
        self.image_noise, self.image_blur, self.caption_noise = image_noise, image_blur, caption_noise
        self.hard_negatives, self.partial_captions = hard_negatives, partial_captions
        self.noise_attribute, self.noise_rate = noise_attribute, noise_rate
        self.cache_mb, self._cache = cache_mb, None  # the cache is made by the reader that fills it (a worker)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _clean_samples(self, slot: int, n_slots: int, handler: SkipCounter, rng: random.Random,
                       epoch: int) -> Iterator[dict]:
        """This reader's decoded samples (no noise yet), shuffled, pass after pass over its part of the shards
        (endless). The shuffle buffer is flushed at the end of each pass so a sample comes back only in the next
        pass."""
        by_shard = len(self.shards) >= n_slots
        for p in itertools.count():
            order = list(self.shards)
            random.Random(f"shards-{self.seed}-{epoch}-{p}").shuffle(order)  # the same order on every rank
            mine = order[slot::n_slots] if by_shard else order
            samples = self._decoded(mine, handler)
            if not by_shard:
                samples = (s for i, s in enumerate(samples) if i % n_slots == slot)
            samples = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(samples)
            n = 0
            for n, sample in enumerate(samples, 1):
                yield sample
            if n == 0:
                raise DataError(f"no readable sample in shards {mine[:3]}... for rank {self.rank} "
                                f"(reader {slot} of {n_slots}); {handler.count} errors were skipped: the shards are "
                                "empty or corrupt")

    def _decoded(self, urls: list[str], handler: SkipCounter) -> Iterator[dict]:
        """The shards' samples in order, decoded (corrupt ones skipped by ``handler``), from the cache where it
        holds the shard; a shard read to its end is cached while the budget allows."""
        if self._cache is None:
            self._cache = DecodedCache(self.cache_mb)
        decode = functools.partial(decode_clean, image_size=self.image_size, image_blur=self.image_blur)
        for url in urls:
            cached = self._cache.get(url)
            if cached is not None:
                yield from cached
                continue
            keep = [] if self._cache.has_room() else None
            samples = wds.tarfile_to_samples(handler=handler)(iter([{"url": url}]))
            for sample in wds.map(decode, handler=handler)(samples):
                if keep is not None:
                    keep.append(sample)
                yield sample
            if keep is not None:
                self._cache.put(url, keep)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch (``self.epoch``): exactly ``len(self)`` batches over all of this rank's readers."""
        return self._epoch_batches(self.epoch)

    def epochs(self) -> Iterator[dict[str, Any]]:
        """Epoch ``self.epoch``, then the next, for ever: each epoch's batches as :meth:`__iter__` gives them."""
        for epoch in itertools.count(self.epoch):
            yield from self._epoch_batches(epoch)

    def _epoch_batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        # Rank-major like split_by_node then split_by_worker: rank r, worker w reads part r + W * w.
        slot, n_slots = self.rank + self.world_size * worker, self.world_size * workers
        n_batches = self.batches_per_epoch // workers + (worker < self.batches_per_epoch % workers)
        tag = f"{self.seed}-{epoch}-{self.rank}-{self.world_size}-{worker}"
        handler = SkipCounter()
        noise_seed = zlib.crc32(f"image-noise-{self.seed}-{epoch}".encode())
        stream = self._clean_samples(slot, n_slots, handler, random.Random(f"shuffle-{tag}"), epoch)
        caption_rng = np.random.default_rng(zlib.crc32(f"captions-{tag}".encode()))
        planted_rng = np.random.default_rng(zlib.crc32(f"planted-{tag}".encode()))  # its own: caption noise unchanged
        reported, reported_shards = 0, {}
        for _ in range(n_batches):
            samples = [add_image_noise(s, self.image_noise, noise_seed)
                       for s in itertools.islice(stream, self.batch_size)]
            captions, planted, attribute = _planted_captions([s["caption"] for s in samples],
                                                             [s["json"] for s in samples], self.noise_attribute,
                                                             self.noise_rate, planted_rng)
            captions, noisy = _noisy_captions(captions, self.caption_noise, caption_rng)
            batch = {
                "image": _to_tensor([s["image"] for s in samples]),
                "tokens": self.tokenizer(captions),
                "caption": captions,
                "json": [s["json"] for s in samples],
                "noisy": torch.from_numpy(noisy),
                "planted": torch.from_numpy(planted),
                "attribute": torch.from_numpy(attribute),
                "skipped": handler.count - reported,
                "skipped_shards": {u: n - reported_shards.get(u, 0) for u, n in handler.by_shard.items()
                                   if n != reported_shards.get(u, 0)},
            }
            kinds = HARD_NEGATIVES[self.hard_negatives]
            if kinds:  # negatives of the image, so caption noise does not change them
                tokens = self.tokenizer(_negatives(samples, kinds, self.hard_negatives))
                batch["negative_tokens"] = tokens.view(len(samples), len(kinds), -1)
            if self.partial_captions:
                partial, mask = _partial_captions(samples, captions, noisy | planted)
                batch["partial_tokens"], batch["partial_mask"] = self.tokenizer(partial), torch.from_numpy(mask)
            yield batch
            reported, reported_shards = handler.count, dict(handler.by_shard)


class _Epochs(torch.utils.data.IterableDataset):
    """A stream's epochs one after another (:meth:`ShardStream.epochs`), for one DataLoader that keeps its
    workers, and their decoded-sample caches, for the whole run."""

    def __init__(self, stream: ShardStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.stream.epochs()


def _init_worker(parent_pid: int, worker_id: int) -> None:
    """DataLoader worker init.

    - Die with the training process: a worker whose parent is SIGKILLed otherwise hangs for ever at exit, its
      feeder thread blocked on the full result pipe, holding its memory.
    - ``gc.freeze()``: everything imported so far (torch alone is ~10^5 objects) lives as long as the worker;
      out of the collector's sight, the worker's full collections, which stalled a batch now and then, get
      cheap (what they cost before and after: docs/performance.md).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    gc.freeze()


class TrainLoader:
    """An iterable of exactly ``len(self)`` batches per pass. Each new pass is the next epoch (epoch, epoch + 1,
    ...), so ``for batch in loader`` in an outer loop reshuffles; ``make_train_loader(epoch=...)`` sets the first."""

    def __init__(self, dataset: ShardStream, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from (self.dataset if self.num_workers == 0 else self._data_loader(self.dataset))
        self.dataset.epoch += 1

    def stream(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """``(epoch, index in the epoch, batch)`` from ``dataset.epoch`` on, for ever; the batches of
        ``for batch in loader`` pass after pass, but read by workers that live for the whole stream (with their
        decoded-sample caches). Where workers' shares of an epoch differ (``len(self)`` not a multiple of
        ``num_workers``) a persistent DataLoader's round-robin would shift between epochs, so each epoch gets
        its own DataLoader there, as in ``for batch in loader``."""
        n = len(self)
        if self.num_workers == 0 or n % self.num_workers == 0:
            epochs = self.dataset.epochs() if self.num_workers == 0 else self._data_loader(_Epochs(self.dataset))
            for k, batch in enumerate(epochs):
                yield self.dataset.epoch + k // n, k % n, batch
        else:
            while True:
                epoch = self.dataset.epoch
                for i, batch in enumerate(self):
                    yield epoch, i, batch

    def _data_loader(self, dataset: torch.utils.data.IterableDataset) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=4,
                                           worker_init_fn=functools.partial(_init_worker, os.getpid()))


def make_train_loader(pattern: str | Sequence[str], tokenizer: Callable[[list[str]], torch.Tensor], batch_size: int,
                      *, image_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0,
                      num_workers: int = 0, batches_per_epoch: int | None = None, shuffle_buffer: int = 2000,
                      image_noise: float = 0.0, image_blur: float = 0.0, caption_noise: float = 0.0,
                      hard_negatives: str = "none", partial_captions: bool = False,
                      cache_mb: float = 0.0, noise_attribute: str | None = None,
                      noise_rate: float = 0.0) -> TrainLoader:
    """Training batches for one rank (see the module docstring for the batch dict).

    Args:
        pattern: shard brace/glob pattern or list of paths.
        tokenizer: ``list[str] -> (B, L)`` long, e.g. ``probloss.models.build_tokenizer("word", vocab=caption_words())``.
        batch_size: per-rank batch size (the global batch is world_size x batch_size).
        image_size: images are centre-cropped/resized to this side.
        rank, world_size: this process's place among the data-parallel ranks.
        seed, epoch: randomness; the same (seed, epoch, rank, world_size, num_workers) gives the same batches.
        num_workers: DataLoader worker processes (0: read in this process).
        batches_per_epoch: batches per rank per pass; default all samples once over the global batch,
            floor(N / (world_size * batch_size)) (at least 1).
        shuffle_buffer: samples in the shuffle buffer of each reader.
        image_noise, image_blur: Gaussian noise std (pixel units in [0, 1]) and blur radius (px).
        caption_noise: fraction of pairs whose caption is replaced by another sample's in the batch.
        hard_negatives: "none", "relation", "binding", "control" or "all": add ``negative_tokens`` (B, k, L).
        partial_captions: add ``partial_tokens`` (B, L) and ``partial_mask`` (B,) (losses with partial views).
        cache_mb: each reader keeps up to this many MiB of decoded samples (whole shards), so later passes over
            them skip reading and decoding (:class:`DecodedCache`); 0: none. The batches are the same either way.
        noise_attribute, noise_rate: planted noise (issue 33, :func:`_planted_captions`): a sample whose scene
            holds this colour or shape gets, with probability ``noise_rate``, a wrong caption of another sample
            of the batch; applied before ``caption_noise`` and with its own random stream, so that is unchanged.

    Raises:
        FileNotFoundError: the pattern matches no shard (before any reading).
        ValueError: an unknown ``hard_negatives``.
        probloss.errors.ConfigError: while reading, a sample without the negatives ``hard_negatives`` asks for.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if not 0.0 <= caption_noise <= 1.0:
        raise ValueError(f"caption_noise must be a fraction in [0, 1], got {caption_noise}")
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be a fraction in [0, 1], got {noise_rate}")
    if hard_negatives not in HARD_NEGATIVES:
        raise ValueError(f"hard_negatives must be one of {'|'.join(HARD_NEGATIVES)}, got {hard_negatives!r}")
    shards = expand_shards(pattern)
    if batches_per_epoch is None:
        batches_per_epoch = max(1, count_samples(shards) // (world_size * batch_size))
    dataset = ShardStream(shards, tokenizer, batch_size, image_size=image_size, rank=rank, world_size=world_size,
                          seed=seed, epoch=epoch, num_workers=num_workers, batches_per_epoch=int(batches_per_epoch),
                          shuffle_buffer=shuffle_buffer, image_noise=image_noise, image_blur=image_blur,
                          caption_noise=caption_noise, hard_negatives=hard_negatives,
                          partial_captions=partial_captions, cache_mb=cache_mb, noise_attribute=noise_attribute,
                          noise_rate=noise_rate)
    return TrainLoader(dataset, num_workers)


# --- evaluation set -------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """A whole split in memory. images float (N, 3, H, W) normalised; tokens long (N, L); captions (training
    captions, after caption noise); json (metadata dicts); skipped (corrupt samples skipped); keys;
    train_caption_stats ``{caption: (count in the training split, level)}`` for every exact caption string of the
    TRAINING split (the shapes data's ``train_captions.json``, :func:`read_train_captions`), None when unknown."""

    images: torch.Tensor
    tokens: torch.Tensor
    captions: list[str]
    json: list[dict]
    skipped: int = 0
    keys: list[str] = field(default_factory=list)
    train_caption_stats: dict[str, tuple[int, int]] | None = None
    skipped_by_shard: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


def read_train_captions(path: str | os.PathLike | None) -> dict[str, tuple[int, int]] | None:
    """``train_captions.json`` (written with the shapes shards: ``{caption: [count in train, level]}``) as
    ``{caption: (count, level)}``; None for no path or a missing file (e.g. webdataset data without it)."""
    if path is None or not os.path.isfile(path):
        return None
    return {caption: (int(count), int(level)) for caption, (count, level) in json.loads(Path(path).read_text()).items()}


def load_eval_set(pattern: str | Sequence[str], tokenizer: Callable[[list[str]], torch.Tensor], *, image_size: int,
                  max_samples: int | None = None, image_noise: float = 0.0, image_blur: float = 0.0,
                  caption_noise: float = 0.0, seed: int = 0, train_captions: str | os.PathLike | None = None
                  ) -> EvalSet:
    """Read shards in order (no shuffling, no splitting) into an :class:`EvalSet`; corrupt samples are skipped
    and counted. ``image_noise``, ``image_blur``, ``caption_noise`` corrupt the set for robustness studies,
    deterministically given ``seed``. ``train_captions``: the training split's ``train_captions.json``, read into
    ``train_caption_stats`` (None, or a missing file: None).

    Raises:
        FileNotFoundError: the pattern matches no shard.
        RuntimeError: no readable sample.
    """
    shards = expand_shards(pattern)
    handler = SkipCounter()
    stream = wds.tarfile_to_samples(handler=handler)(iter([{"url": u} for u in shards]))
    stream = wds.map(lambda s: decode_sample(s, image_size, image_noise=image_noise, image_blur=image_blur,
                                             noise_seed=seed), handler=handler)(stream)
    samples = list(itertools.islice(stream, max_samples))
    if not samples:
        raise RuntimeError(f"no readable sample in {pattern!r} ({handler.count} corrupt ones skipped): the shards are "
                           "corrupt or truncated; write them again (scripts/make_data.py, or delete the shapes cache "
                           "folder to regenerate it)")
    captions, _ = _noisy_captions([s["caption"] for s in samples], caption_noise, np.random.default_rng(seed))
    return EvalSet(images=_to_tensor([s["image"] for s in samples]), tokens=tokenizer(captions), captions=captions,
                   json=[s["json"] for s in samples], skipped=handler.count, keys=[s["key"] for s in samples],
                   train_caption_stats=read_train_captions(train_captions), skipped_by_shard=dict(handler.by_shard))
