"""The benchmark formats researchers have on disk, read into one :class:`Benchmark` each (no model needed here).

A reader checks every file and key it needs and reads the (small) annotation files at once, so a bad command
fails before anything is encoded or written; the images themselves are read later, once, in gallery order
(:attr:`Benchmark.samples`). Formats (docs/benchmarks.md has the layouts):

- :func:`read_karpathy`: a Karpathy split file (``dataset_coco.json`` / ``dataset_flickr30k.json``: ``images``,
  each with ``filepath`` (COCO), ``filename``, ``split``, ``cocoid`` (COCO) / ``imgid``, ``sentences`` with
  ``raw``, ``sentid`` and in some releases ``id``) and the images folder.
- :func:`read_associations`: ECCV Caption / CxC extra positives, ``image_to_caption.json`` ({COCO image id:
  [COCO caption ids]}) and ``caption_to_image.json`` ({caption id: [image ids]}) in one folder; the released
  names ``eccv_image_to_caption.json`` / ``cxc_image_to_caption.json`` (naver-ai/eccv-caption, package data) are
  found too. Those files key captions by COCO annotation id, which the released Karpathy file lacks (its
  ``sentid`` is its own running index): with ``coco_captions`` (COCO's ``captions_val2014.json``) a sentence gets
  the id of the annotation of its image with the same text (whitespace collapsed).
- :func:`read_wds`: a CLIP_benchmark webdataset folder (``<key>.webp|jpg|png`` with ``<key>.txt``, one caption
  per line, and/or ``<key>.cls``; ``classnames.txt`` and ``zeroshot_classification_templates.txt`` beside).
- :func:`read_folder`: ``root/<class dir>/<image>``, dirs sorted as torchvision's ImageFolder, with a class-names
  file (one per line in that order, or a JSON {dir: name}) and prompt templates (default: CLIP's 80 ImageNet
  prompts, :data:`CLIP_TEMPLATES_FILE`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import webdataset as wds

from probloss.data.loader import IMAGE_EXTS, expand_shards
from probloss.errors import ConfigError, DataError
from probloss.eval.benchmarks.settings import (ASSOCIATION_NAMES, AssociationSettings, FolderSettings,
                                               KarpathySettings, WdsSettings, benchmark_settings)

CLIP_TEMPLATES_FILE = Path(__file__).resolve().parent / "clip_imagenet_templates.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
UNMATCHED_WARN_FRACTION = 0.01  # association ids matching nothing: up to this fraction a warning, more an error


@dataclass
class Sample:
    """One gallery image: its id, where its bytes are (a path or the bytes), its captions and their ids, its class
    index (or None), and ``where`` (how an error names it)."""

    image_id: Any
    source: str | bytes
    captions: list[str] = field(default_factory=list)
    caption_ids: list[Any] = field(default_factory=list)
    label: int | None = None
    where: str = ""


@dataclass
class Benchmark:
    """A benchmark ready to encode: ``samples()`` yields the gallery in order (read once); ``n_images`` (None:
    unknown until read) sizes the progress bar. Retrieval when the samples carry captions; zero-shot when they
    carry labels and ``classnames`` is set. ``associations`` (ECCV Caption, CxC): ``{"i2t": {image id: [caption
    ids]}, "t2i": {caption id: [image ids]}, "file": where}``; ``folds`` (Karpathy): ``(n_folds, fold_size)``;
    ``gallery``: what identifies its images and captions (two benchmarks with one gallery, e.g. karpathy,
    eccv_caption and cxc on one COCO split, are encoded once; None: not shared)."""

    name: str
    samples: Callable[[], Iterator[Sample]]
    n_images: int | None = None
    classnames: list[str] | None = None
    templates: list[str] | None = None
    associations: dict[str, Any] | None = None
    folds: tuple[int, int] | None = None
    gallery: tuple | None = None


def _need_path(path: Any, key: str, folder: bool = False) -> Path:
    """``key``'s value as an existing file (or ``folder``), else the one-line error that names the key."""
    kind = "folder" if folder else "file"
    if path is None or str(path) == "":
        raise ConfigError(f"{key} is not set: give it as {key}=<{'folder' if folder else 'path'}>")
    p = Path(os.path.expanduser(str(path)))
    if not (p.is_dir() if folder else p.is_file()):
        raise FileNotFoundError(f"{key}={path}: no such {kind}; fix the path")
    return p


def _read_json(path: Path, key: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{key}={path}: not valid JSON ({err}); fix or replace the file") from None


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file (class names, templates)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_templates(path: Any, key: str) -> list[str]:
    """Prompt templates, one per line, each with one ``{}``; None: CLIP's 80 ImageNet prompts."""
    p = CLIP_TEMPLATES_FILE if path is None else _need_path(path, key)
    templates = read_lines(p)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise DataError(f"{key}={p}: every template needs exactly one {{}} (e.g. 'a photo of a {{}}.'), got "
                        f"{bad[0] if bad else 'no template'!r}; fix the file")
    return templates


# --- Karpathy split files (COCO, Flickr30k) -------------------------------------------------------------------


def _normal_text(text: str) -> str:
    return " ".join(str(text).split())


def coco_caption_ids(path: Path, key: str) -> dict[tuple[int, str], int]:
    """``{(COCO image id, caption text with whitespace collapsed): annotation id}`` from COCO's captions file."""
    coco = _read_json(path, key)
    anns = coco.get("annotations") if isinstance(coco, dict) else None
    if not isinstance(anns, list) or not all(isinstance(a, dict) and {"id", "image_id", "caption"} <= set(a)
                                             for a in anns[:100]):
        raise DataError(f"{key}={path}: not a COCO captions file (annotations with id, image_id, caption); give "
                        "captions_val2014.json of COCO's annotations")
    return {(int(a["image_id"]), _normal_text(a["caption"])): int(a["id"]) for a in anns}


def read_karpathy(section: Mapping[str, Any] | KarpathySettings, name: str,
                  need_caption_ids: bool = False) -> Benchmark:
    """The images of ``section.split`` in file order, each with all its sentences (``raw``) as captions.

    ``section.max_captions``: keep the first k sentences of each image (None: all). Image id: ``cocoid`` (COCO)
    else ``imgid`` (Flickr30k) else the filename. Caption id: the sentence's ``id``
    (a COCO annotation id) where the file has it, else the one matched in ``section.coco_captions``, else (only
    when ``need_caption_ids`` is False) its ``sentid``.
    """
    prefix = f"benchmark.{name}"
    section = benchmark_settings(AssociationSettings if name in ASSOCIATION_NAMES else KarpathySettings, section, name)
    path = _need_path(section.annotations, f"{prefix}.annotations")
    root = _need_path(section.images, f"{prefix}.images", folder=True)
    data = _read_json(path, f"{prefix}.annotations")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{prefix}.annotations={path}: not a Karpathy split file (a JSON object with 'images'); "
                        "give dataset_coco.json or dataset_flickr30k.json")
    split = str(section.split)
    chosen = [im for im in images if im.get("split") == split]
    if not chosen:
        splits = sorted({str(im.get("split")) for im in images})
        raise ConfigError(f"{prefix}.split={split}: no image of {path} is in that split; its splits: "
                          f"{', '.join(splits)}")
    coco_ids = None
    if section.coco_captions:
        coco_ids = coco_caption_ids(_need_path(section.coco_captions, f"{prefix}.coco_captions"),
                                    f"{prefix}.coco_captions")
    has_ids = all("id" in s for im in chosen for s in im.get("sentences", []))
    if need_caption_ids and not has_ids and coco_ids is None:
        raise ConfigError(f"the sentences of {path} have no COCO caption id ('id'; the released file has only "
                          f"sentid): pass {prefix}.coco_captions=<COCO annotations/captions_val2014.json>")
    samples = []
    unmatched = 0
    keep = section.max_captions  # the first k sentences of each image (None: all)
    for im in chosen:
        image_id = im.get("cocoid", im.get("imgid", im.get("filename")))
        file = root / str(im.get("filepath", "")) / str(im["filename"])
        captions, ids = [], []
        for s in im.get("sentences", [])[:keep]:
            text = s.get("raw") if s.get("raw") is not None else " ".join(s.get("tokens", []))
            captions.append(str(text).strip())
            if has_ids:
                ids.append(s["id"])
            elif coco_ids is not None:
                cid = coco_ids.get((int(image_id), _normal_text(text)))
                unmatched += cid is None
                ids.append(cid)
            else:
                ids.append(s.get("sentid"))
        samples.append(Sample(image_id, str(file), captions, ids, where=str(file)))
    if unmatched:
        print(f"warning: {prefix}: {unmatched} sentences of {path} match no caption of {section.coco_captions} "
              "(same image id and text); they stay in the gallery without a COCO caption id", file=sys.stderr)
    missing = [s.source for s in samples if not os.path.isfile(s.source)]
    if missing:
        raise FileNotFoundError(f"{prefix}.images={root}: {len(missing)} of {len(samples)} images of split {split} "
                                f"are missing (e.g. {missing[0]}); point it at the folder the file's "
                                "filepath/filename are relative to")
    folds = None
    if section.n_folds and section.fold_size:
        folds = (int(section.n_folds), int(section.fold_size))
    return Benchmark(name, lambda: iter(samples), len(samples), folds=folds,
                     gallery=("karpathy", str(path.resolve()), str(root.resolve()), split, keep))


# --- ECCV Caption / CxC association files ---------------------------------------------------------------------


def _association_file(folder: Path, kind: str, name: str, key: str) -> Path:
    prefix = {"eccv_caption": "eccv", "cxc": "cxc"}.get(name, name)
    for candidate in (folder / f"{kind}.json", folder / f"{prefix}_{kind}.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{key}={folder}: no {kind}.json (nor {prefix}_{kind}.json) there; give the folder "
                            "with the benchmark's image_to_caption.json and caption_to_image.json")


def read_associations(section: Mapping[str, Any] | AssociationSettings, name: str) -> dict[str, Any]:
    """``{"i2t": {image id: [caption ids]}, "t2i": {caption id: [image ids]}, "file": folder}`` with int ids."""
    key = f"benchmark.{name}.extra_positives"
    folder = _need_path(benchmark_settings(AssociationSettings, section, name).extra_positives, key, folder=True)
    out: dict[str, Any] = {"file": str(folder)}
    for d, kind in (("i2t", "image_to_caption"), ("t2i", "caption_to_image")):
        path = _association_file(folder, kind, name, key)
        raw = _read_json(path, key)
        try:
            out[d] = {int(k): [int(v) for v in vs] for k, vs in raw.items()}
        except (AttributeError, TypeError, ValueError):
            raise DataError(f"{key}: {path} is not a map of ids to lists of ids ({{\"123\": [456, ...]}}); fix the "
                            "file") from None
    return out


def match_associations(assoc: Mapping[str, Any], image_ids: Sequence[Any], caption_ids: Sequence[Any],
                       name: str) -> tuple[dict[str, list[list[int]]], dict[str, list[int]]]:
    """Ids -> gallery indices, per direction as the files give them (the caller ranks each direction with its own
    relation): ``({"i2t": [[image, caption], ...], "t2i": [...]}, {"i2t": image query indices, "t2i": caption
    query indices})``, the queries being the keys of each file. Ids that match nothing: a warning with the count when
    they are at most 1 % of the ids in the files, else a :class:`probloss.errors.DataError` naming how many and one."""
    img = {int(i): k for k, i in enumerate(image_ids)}
    cap = {int(c): k for k, c in enumerate(caption_ids) if c is not None}
    missing_img, missing_cap, total = [], [], 0
    pairs: dict[str, list[list[int]]] = {"i2t": [], "t2i": []}
    queries: dict[str, list[int]] = {"i2t": [], "t2i": []}
    for d, (own, other, miss_own, miss_other) in {"i2t": (img, cap, missing_img, missing_cap),
                                                  "t2i": (cap, img, missing_cap, missing_img)}.items():
        for q, targets in assoc[d].items():
            total += 1 + len(targets)
            if q not in own:
                miss_own.append(q)
                continue
            queries[d].append(own[q])
            for t in targets:
                if t not in other:
                    miss_other.append(t)
                    continue
                pairs[d].append([own[q], other[t]] if d == "i2t" else [other[t], own[q]])
    n_missing = len(missing_img) + len(missing_cap)
    if n_missing:
        example = (f"image id {missing_img[0]}" if missing_img else f"caption id {missing_cap[0]}")
        what = (f"benchmark.{name}: {n_missing} of {total} ids in the association files of {assoc['file']} match no "
                f"image or caption of the split (e.g. {example})")
        if n_missing > UNMATCHED_WARN_FRACTION * total:
            raise DataError(f"{what}; the files must be made on this split (COCO's Karpathy 5K test) with COCO "
                            f"image ids and COCO caption ids (benchmark.{name}.coco_captions gives the latter)")
        print(f"warning: {what}; they are left out", file=sys.stderr)
    return pairs, queries


# --- CLIP_benchmark webdataset ----------------------------------------------------------------------------------


def _beside(shards: list[str], filename: str) -> Path | None:
    folder = Path(shards[0]).parent
    for f in (folder / filename, folder.parent / filename):
        if f.is_file():
            return f
    return None


def read_wds(section: Mapping[str, Any] | WdsSettings, name: str = "wds") -> Benchmark:
    """CLIP_benchmark's layout, read in shard order with webdataset (probloss's shard patterns: braces, globs,
    ``::``). A sample's ``.txt`` lines are its captions; its ``.cls`` its class index."""
    prefix = f"benchmark.{name}"
    section = benchmark_settings(WdsSettings, section, name)
    pattern = section.shards
    if not pattern:
        raise ConfigError(f"{prefix}.shards is not set: give it as {prefix}=<brace pattern of the tar shards>")
    shards = expand_shards(str(pattern))  # FileNotFoundError naming the pattern
    names_file = _need_path(section.classnames, f"{prefix}.classnames") if section.classnames \
        else _beside(shards, "classnames.txt")
    templates_file = section.templates or _beside(shards, "zeroshot_classification_templates.txt")
    classnames = read_lines(names_file) if names_file is not None else None
    templates = read_templates(templates_file, f"{prefix}.templates") if classnames else None

    def samples() -> Iterator[Sample]:

        stream = wds.tarfile_to_samples()(iter([{"url": u} for u in shards]))
        for raw in stream:
            key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
            ext = next((e for e in IMAGE_EXTS if e in raw), None)
            if ext is None:
                raise DataError(f"{prefix}: sample {key} in {url} has no image ({'/'.join(IMAGE_EXTS)}); fix the shard")
            captions = [c.strip() for c in raw["txt"].decode("utf-8").splitlines() if c.strip()] if "txt" in raw else []
            label = None
            if "cls" in raw:
                try:
                    label = int(raw["cls"].decode("utf-8").strip())
                except ValueError:
                    raise DataError(f"{prefix}: sample {key} in {url} has class {raw['cls'][:20]!r}, not an integer; "
                                    "fix the shard") from None
                if classnames is not None and not 0 <= label < len(classnames):
                    raise DataError(f"{prefix}: sample {key} in {url} has class {label}, not in [0, {len(classnames)}) "
                                    f"({names_file} has {len(classnames)} names); fix the shard or the names")
            yield Sample(key, raw[ext], captions, [f"{key}#{i}" for i in range(len(captions))], label,
                         where=f"{key} in {url}")

    return Benchmark(name, samples, None, classnames=classnames, templates=templates)


# --- class folders (ImageNet style) -----------------------------------------------------------------------------


def read_folder(section: Mapping[str, Any] | FolderSettings, name: str = "folder") -> Benchmark:
    """``root/<class dir>/<image>``: class k is the k-th dir in sorted order (torchvision ImageFolder); images
    sorted within each dir. Class names: the file (lines in dir order, or JSON {dir: name} or [names]), else the
    dir names with ``_`` as spaces."""
    prefix = f"benchmark.{name}"
    section = benchmark_settings(FolderSettings, section, name)
    root = _need_path(section.root, f"{prefix}.root", folder=True)
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not dirs:
        raise DataError(f"{prefix}.root={root}: no class folders in it; give the folder that holds one folder per "
                        "class")
    if section.classnames:
        path = _need_path(section.classnames, f"{prefix}.classnames")
        if path.suffix == ".json":
            raw = _read_json(path, f"{prefix}.classnames")
            classnames = [raw.get(d) for d in dirs] if isinstance(raw, dict) else list(raw)
            if isinstance(raw, dict) and None in classnames:
                raise DataError(f"{prefix}.classnames={path}: no name for class folder "
                                f"{dirs[classnames.index(None)]!r}; add it to the JSON map")
        else:
            classnames = read_lines(path)
        if len(classnames) != len(dirs):
            raise DataError(f"{prefix}.classnames={path}: {len(classnames)} names for {len(dirs)} class folders in "
                            f"{root}; give one name per folder, in sorted folder order")
    else:
        classnames = [d.replace("_", " ") for d in dirs]
    templates = read_templates(section.templates, f"{prefix}.templates")
    files = [(f, label) for label, d in enumerate(dirs) for f in sorted((root / d).iterdir())
             if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{prefix}.root={root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    samples = [Sample(f"{f.parent.name}/{f.name}", str(f), label=label, where=str(f)) for f, label in files]
    return Benchmark(name, lambda: iter(samples), len(samples), classnames=classnames, templates=templates)


READERS = {"karpathy": read_karpathy, "wds": read_wds, "folder": read_folder}
