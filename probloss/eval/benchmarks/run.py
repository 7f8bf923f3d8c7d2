"""``probloss evaluate checkpoint=<ckpt> benchmark=[...]``: encode each benchmark with the run's own model,
preprocessing and tokenizer, score it with the blockwise engine, write one JSON (and optionally the embeddings).

Preprocessing is the run's, so a number here is the number of the model as trained:

- images: opened with PIL, RGB, centre-cropped/resized to ``data.image_size`` (bicubic) and normalised to
  [-1, 1] by exactly the code that decodes training shards (:func:`probloss.data.loader.decode_clean`,
  :func:`probloss.data.loader._to_tensor`); timm/HF towers then do their own resize, mean/std and interpolation;
- text: the run's tokenizer and maximum length (:func:`probloss.training.builders.make_tokenizer`), after the tower
  family's normalisation (``benchmark.lowercase``: ``auto`` lower-cases for the built-in towers, whose word and
  byte tokenizers were trained on lower-case captions, and leaves hf: towers to their tokenizer's own handling).
  Why it matters: COCO captions start with a capital letter, and a SigLIP reproduction lost 3.5 points of COCO
  text-to-image R@1 (48.6 vs 52.1) by feeding them to a tokenizer trained on lower-case text.

Scoring goes through ``loss.score`` (the loss owns its geometry and its use of sigma) in blocks of
``benchmark.block`` queries (:func:`probloss.eval.retrieval.rank_retrieval`), so 5k images x 25k captions never
becomes one dense matrix; ranks use pessimistic ties (a non-positive tied with a positive ranks first).

Definitions (``<b>/`` is the benchmark's name; i2t = image queries against every caption, t2i = caption queries
against every image; R@K = the fraction of queries with a positive in the top K; R-Precision and mAP@R as in
:func:`probloss.eval.metrics.plausible_ranking`, R = the query's number of positives):

- ``karpathy`` (Karpathy & Fei-Fei 2015 splits of COCO and Flickr30k): every caption of an image is a positive
  (five per image), so i2t R@K = one of the image's captions in the top K, t2i R@K = the caption's image in the
  top K; ``rsum`` = the sum of the six R@{1,5,10} in percent (VSE++, Faghri et al. 2018); ``1k/...``: COCO's 1K
  protocol, the mean over 5 folds of 1000 consecutive test images, each with its own captions only.
- ``eccv_caption`` (ECCV Caption, Chun et al. 2022, arXiv 2204.03359): queries = the images / captions that are
  keys of the association files, gallery = the whole split (COCO 5K), positives = the item's own COCO pairs plus
  the file's for that direction; ``i2t_map@r``, ``i2t_rprecision``, ``i2t_r@1`` and the same for t2i.
- ``cxc`` (Crisscrossed Captions, Parekh et al. 2021, arXiv 2004.15020): the same mechanism with CxC's positives;
  R@1/5/10.
- ``wds`` (CLIP_benchmark): retrieval as ``karpathy`` (every line of a sample's .txt is a positive) and zero-shot
  as ``folder`` on the samples with a .cls.
- ``folder``: zero-shot classification; the prompt of class c and template t is ``fill_template(t, name_c)``
  (:func:`probloss.eval.dual_encoder.fill_template`), scores averaged over templates (CLIP averages normalised text
  embeddings; a loss with its own geometry and sigma cannot, so the scores are averaged, as the built-in
  evaluator does); ``zeroshot_top1`` / ``zeroshot_top5`` with pessimistic ties, ``zeroshot_n_labelled``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from probloss.data.loader import BadSample, _to_tensor, decode_clean
from probloss.errors import ConfigError, DataError
from probloss.eval.benchmarks import readers
from probloss.eval.benchmarks.readers import Benchmark
from probloss.eval.benchmarks.settings import ASSOCIATION_NAMES, BenchmarkRunSettings
from probloss.eval.dual_encoder import _rows, _zeroshot
from probloss.eval.retrieval import fold_summary, positive_pairs, rank_retrieval, summarize
from probloss.eval.uncertainty import benchmark_uncertainty, plot_uncertainty_bins
from probloss.files import write_json

NAMES = ("karpathy", "eccv_caption", "cxc", "wds", "folder")
SHOWN = {  # the console line of each benchmark (every value: the JSON)
    "karpathy": ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5", "rsum", "1k/i2t_r@1", "1k/t2i_r@1"),
    "eccv_caption": ("i2t_map@r", "t2i_map@r", "i2t_rprecision", "t2i_rprecision", "i2t_r@1", "t2i_r@1"),
    "cxc": ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5"),
    "wds": ("i2t_r@1", "t2i_r@1", "rsum", "zeroshot_top1", "zeroshot_top5"),
    "folder": ("zeroshot_top1", "zeroshot_top5", "zeroshot_n_labelled"),
}
KEPT = {"eccv_caption": ("i2t_map@r", "t2i_map@r", "i2t_rprecision", "t2i_rprecision", "i2t_r@1", "t2i_r@1",
                         "i2t_n_queries", "t2i_n_queries"),
        "cxc": tuple(f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r@1", "r@5", "r@10", "n_queries"))}


class CaseTokenizer:
    """The run's tokenizer behind a text normalisation: ``lower`` lower-cases every string before tokenising."""

    def __init__(self, tokenizer, lower: bool):
        self.tokenizer, self.lower = tokenizer, lower
        self.max_len, self.vocab_size = tokenizer.max_len, tokenizer.vocab_size

    def __call__(self, texts: Sequence[str] | str) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer([t.lower() for t in texts] if self.lower else texts)


def lowercase_for(setting: Any, tokenizer_kind: str) -> bool:
    """``benchmark.lowercase``: true / false, or auto = lower-case unless the tokenizer is a Hugging Face one."""
    if setting in (True, False):
        return bool(setting)
    if str(setting) != "auto":
        raise ConfigError(f"benchmark.lowercase={setting!r}: use auto, true or false")
    return not str(tokenizer_kind).startswith("hf:")


# --- reading ----------------------------------------------------------------------------------------------------


def prepare(cfg: Mapping[str, Any], selected: Sequence[str]) -> list[Benchmark]:
    """Every selected benchmark's reader run: files checked, annotations read (nothing encoded yet)."""
    out = []
    for name in selected:
        section = cfg[name]
        if name == "karpathy":
            out.append(readers.read_karpathy(section, name))
        elif name in ASSOCIATION_NAMES:
            bench = readers.read_karpathy(section, name, need_caption_ids=True)
            bench.associations = readers.read_associations(section, name)
            bench.folds = None
            out.append(bench)
        elif name == "wds":
            out.append(readers.read_wds(section, name))
        elif name == "folder":
            out.append(readers.read_folder(section, name))
        else:
            raise ConfigError(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
    return out


# --- encoding ---------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """A benchmark's gallery in embedding space: images (N_img, D) and captions (N_txt, D) with their log-stds
    (None for a loss without them), ids, each caption's image index (N_txt,) and each image's label (or None)."""

    image_emb: Tensor
    image_log_std: Tensor | None
    text_emb: Tensor
    text_log_std: Tensor | None
    image_ids: list[Any]
    caption_ids: list[Any]
    caption_image: Tensor
    labels: list[int | None]


def decode_image(sample: readers.Sample, image_size: int) -> np.ndarray:
    """uint8 (H, W, 3): the training decode path (RGB, centre crop/resize to ``image_size``, bicubic)."""
    try:
        data = sample.source if isinstance(sample.source, bytes) else Path(sample.source).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read image {sample.where}: {err.strerror}") from None
    # decode_clean takes a webdataset sample; the placeholder caption is not used
    raw = {"__key__": str(sample.image_id), "__url__": sample.where, "jpg": data, "txt": b"-"}
    try:
        return decode_clean(raw, image_size)["image"]
    except BadSample as err:
        raise DataError(f"image {sample.where} cannot be decoded ({err}); fix or remove it") from None


def _bar(total: int | None, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0)


@torch.no_grad()
def encode(model: nn.Module, bench: Benchmark, tokenizer, *, image_size: int, batch_size: int, device,
           needs_log_std: bool, progress: bool = False) -> Encoded:
    """Read the gallery once, encode its images and then its captions in batches of ``batch_size``."""
    images, image_stds, image_ids, labels, captions, caption_ids, caption_image = [], [], [], [], [], [], []
    pixels: list[np.ndarray] = []

    def flush() -> None:
        if pixels:
            emb, log_std = model.encode_image(_to_tensor(pixels).to(device))
            images.append(emb.float().cpu())
            if log_std is not None:
                image_stds.append(log_std.float().cpu())
            pixels.clear()

    with _bar(bench.n_images, f"{bench.name} images", progress) as bar:
        for sample in bench.samples():
            pixels.append(decode_image(sample, image_size))
            for text, cid in zip(sample.captions, sample.caption_ids):
                captions.append(text)
                caption_ids.append(cid)
                caption_image.append(len(image_ids))
            image_ids.append(sample.image_id)
            labels.append(sample.label)
            if len(pixels) == batch_size:
                flush()
            bar.update(1)
        flush()
    if not image_ids:
        raise DataError(f"benchmark {bench.name}: no image was read; check its files")
    texts, text_stds = [], []
    with _bar(len(captions), f"{bench.name} captions", progress and bool(captions)) as bar:
        for start in range(0, len(captions), batch_size):
            emb, log_std = model.encode_text(tokenizer(captions[start: start + batch_size]).to(device))
            texts.append(emb.float().cpu())
            if log_std is not None:
                text_stds.append(log_std.float().cpu())
            bar.update(len(captions[start: start + batch_size]))
    image_emb = torch.cat(images)
    text_emb = torch.cat(texts) if texts else image_emb.new_zeros(0, image_emb.shape[1])
    with_std = needs_log_std and bool(image_stds)  # scores and loss ignore log-stds of a loss without them
    return Encoded(image_emb, torch.cat(image_stds) if with_std else None, text_emb,
                   torch.cat(text_stds) if with_std and text_stds else None, image_ids, caption_ids,
                   torch.tensor(caption_image, dtype=torch.long), labels)


def with_ids(enc: Encoded, bench: Benchmark) -> Encoded:
    """``enc`` (the same gallery, encoded for an earlier benchmark) with ``bench``'s image and caption ids: the
    Karpathy file's own ids and the COCO caption ids of ECCV Caption / CxC differ, the images and texts do not."""
    samples = list(bench.samples())
    return dataclasses.replace(enc, image_ids=[s.image_id for s in samples],
                               caption_ids=[cid for s in samples for cid in s.caption_ids])


# --- scoring ----------------------------------------------------------------------------------------------------


def _rank(loss, enc: Encoded, positives: Tensor, block: int, progress: bool, desc: str, image_queries=None,
          caption_queries=None, rows: tuple[Tensor, Tensor] | None = None) -> dict[str, dict[str, Tensor]]:
    img, cap = rows if rows is not None else (slice(None), slice(None))
    image_emb, text_emb = enc.image_emb[img], enc.text_emb[cap]
    ils, tls = _rows(enc.image_log_std, img), _rows(enc.text_log_std, cap)
    n_q = (image_emb.shape[0] if image_queries is None else len(image_queries)) + \
        (text_emb.shape[0] if caption_queries is None else len(caption_queries))
    with _bar(n_q, desc, progress) as bar:
        return rank_retrieval(loss, image_emb, text_emb, ils, tls, positives, image_queries=image_queries,
                              caption_queries=caption_queries, block=block, progress=bar.update)


def retrieval_metrics(loss: nn.Module, enc: Encoded, bench: Benchmark, *, block: int = 256,
                      progress: bool = False) -> tuple[dict[str, float], dict[str, dict[str, Tensor]]]:
    """The benchmark's retrieval keys (module docstring; without the ``<b>/`` prefix) and the per-query rankings
    (``{"i2t": ..., "t2i": ...}`` of :func:`probloss.eval.retrieval.rank_retrieval`)."""
    if bench.associations is not None:  # ECCV Caption / CxC: each direction its own queries and positives
        pairs, queries = readers.match_associations(bench.associations, enc.image_ids, enc.caption_ids, bench.name)
        per_query = {}
        for d in ("i2t", "t2i"):
            extra = torch.tensor(pairs[d], dtype=torch.long).reshape(-1, 2)
            q = torch.tensor(sorted(queries[d]), dtype=torch.long)
            none = torch.empty(0, dtype=torch.long)
            ranked = _rank(loss, enc, positive_pairs(enc.caption_image, extra), block, progress,
                           f"{bench.name} {d}", image_queries=q if d == "i2t" else none,
                           caption_queries=q if d == "t2i" else none)
            per_query[d] = ranked[d]
        out = summarize(per_query)
        return {k: v for k, v in out.items() if k in KEPT.get(bench.name, out)}, per_query
    per_query = _rank(loss, enc, positive_pairs(enc.caption_image), block, progress, f"{bench.name} retrieval")
    out = summarize(per_query)
    n_img = enc.image_emb.shape[0]
    if bench.folds is not None:
        n_folds, size = bench.folds
        if n_img >= n_folds * size:
            folds = fold_summary(loss, enc.image_emb, enc.text_emb, enc.image_log_std, enc.text_log_std,
                                 enc.caption_image, n_folds=n_folds, fold_size=size, block=block)
            out.update({f"1k/{k}": v for k, v in folds.items()})
        else:
            print(f"note: {bench.name}: {n_img} images, fewer than {n_folds} folds x {size}: no 1k/ keys",
                  file=sys.stderr)
    return out, per_query


def zeroshot_metrics(model: nn.Module, loss: nn.Module, tokenizer, enc: Encoded, bench: Benchmark, *,
                     batch_size: int, device) -> dict[str, float]:
    """Top-1 / top-5 over the labelled images (the built-in evaluator's zero-shot, so both agree exactly)."""
    return _zeroshot(model, loss, tokenizer, enc.image_emb, enc.image_log_std, enc.labels, list(bench.classnames),
                     list(bench.templates), None, batch_size, device)


# --- the command's part ---------------------------------------------------------------------------------------------


def _id_array(ids: Sequence[Any]) -> np.ndarray:
    try:
        return np.asarray([int(i) for i in ids], dtype=np.int64)
    except (TypeError, ValueError):
        return np.asarray([str(i) for i in ids])


def save_embeddings(path: Path, enc: Encoded) -> Path:
    """``image_emb``, ``text_emb``, ``image_ids``, ``caption_ids`` (ints where every id is one, else strings),
    ``caption_image``, ``labels`` (-1: none) and ``image_log_std`` / ``text_log_std`` where the loss has them."""
    arrays = {"image_emb": enc.image_emb.numpy(), "text_emb": enc.text_emb.numpy(),
              "image_ids": _id_array(enc.image_ids), "caption_ids": _id_array(enc.caption_ids),
              "caption_image": enc.caption_image.numpy(),
              "labels": np.asarray([-1 if x is None else x for x in enc.labels], dtype=np.int64)}
    if enc.image_log_std is not None:
        arrays["image_log_std"] = enc.image_log_std.numpy()
    if enc.text_log_std is not None:
        arrays["text_log_std"] = enc.text_log_std.numpy()
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def evaluate_benchmarks(model: nn.Module, loss: nn.Module, tokenizer, benches: Sequence[Benchmark], *,
                        image_size: int, lowercase: bool, batch_size: int = 256, block: int = 256, device=None,
                        progress: bool = False) -> tuple[dict[str, float], dict[str, Encoded]]:
    """Every benchmark's keys ``<b>/<metric>`` (module docstring) and each benchmark's embeddings."""
    device = device or next(model.parameters()).device
    text = CaseTokenizer(tokenizer, lowercase)
    results: dict[str, float] = {}
    encoded: dict[str, Encoded] = {}
    galleries: dict[tuple, Encoded] = {}  # gallery -> its encoding (one encoding per gallery)
    was_training = model.training
    model.eval()
    try:
        for bench in benches:
            if bench.gallery in galleries:
                enc = with_ids(galleries[bench.gallery], bench)
            else:
                enc = encode(model, bench, text, image_size=image_size, batch_size=batch_size, device=device,
                             needs_log_std=bool(loss.needs_log_std), progress=progress)
                if bench.gallery is not None:
                    galleries[bench.gallery] = enc
            encoded[bench.name] = enc
            out: dict[str, float] = {}
            if len(enc.caption_ids):
                metrics, per_query = retrieval_metrics(loss, enc, bench, block=block, progress=progress)
                out.update(metrics)
                if enc.image_log_std is not None:  # sigma bins, risk-coverage, training-free baselines
                    out.update(benchmark_uncertainty(per_query, enc.image_log_std, enc.text_log_std))
            labelled = any(label is not None for label in enc.labels)
            if bench.classnames and labelled:
                out.update(zeroshot_metrics(model, loss, text, enc, bench, batch_size=batch_size, device=device))
            elif labelled:
                print(f"note: {bench.name}: the samples have classes (.cls) but no class names were found "
                      f"(benchmark.{bench.name}.classnames or classnames.txt beside the shards): no zero-shot keys",
                      file=sys.stderr)
            results.update({f"{bench.name}/{k}": v for k, v in out.items()})
    finally:
        model.train(was_training)
    return results, encoded


def print_table(results: Mapping[str, float], names: Sequence[str]) -> None:
    """One line per benchmark with its headline values (every value: the JSON)."""
    width = max(len(n) for n in names)
    for name in names:
        shown = [f"{k} {results[f'{name}/{k}']:.4f}" for k in SHOWN[name]
                 if isinstance(results.get(f"{name}/{k}"), float) and math.isfinite(results[f"{name}/{k}"])]
        print(f"{name:<{width}} | " + " | ".join(shown), flush=True)


def default_output(checkpoint: str | Path) -> Path:
    """``<checkpoint folder>/<checkpoint name>.benchmarks.json``."""
    path = Path(checkpoint)
    return path.with_name(path.stem + ".benchmarks.json")


def npz_path(output: Path, name: str) -> Path:
    """``<output without .json>.<benchmark>.npz``."""
    base = output.with_suffix("") if output.suffix == ".json" else output
    return base.with_name(f"{base.name}.{name}.npz")


def run_benchmarks(model: nn.Module, loss: nn.Module, tokenizer, benches: Sequence[Benchmark], *,
                   image_size: int, tokenizer_kind: str, cfg: Mapping[str, Any] | BenchmarkRunSettings,
                   output: str | Path, save: bool = False, device=None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate, then write the results JSON (and with ``save`` the embeddings) and print the table. Nothing is
    written when any benchmark fails. ``cfg``: the ``benchmark`` section (:class:`BenchmarkRunSettings`)."""
    how = cfg if isinstance(cfg, BenchmarkRunSettings) else BenchmarkRunSettings.of(cfg)
    results, encoded = evaluate_benchmarks(
        model, loss, tokenizer, benches, image_size=image_size,
        lowercase=lowercase_for(how.lowercase, tokenizer_kind), batch_size=int(how.batch_size),
        block=int(how.block), device=device, progress=bool(how.progress))
    results = {**results, **(extra or {})}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output, results)
    if save:
        for name, enc in encoded.items():
            print(f"wrote {save_embeddings(npz_path(output, name), enc)}")
    for bench in benches:  # one plot of score against sigma bin per retrieval benchmark of a loss with sigma
        if any(k.startswith(f"{bench.name}/unc/") for k in results):
            png = npz_path(output, bench.name).with_suffix(".uncertainty.png")
            bench_keys = {k: v for k, v in results.items() if k.startswith(f"{bench.name}/unc/")}
            print(f"wrote {plot_uncertainty_bins(bench_keys, png, bench.name)}")
    print_table(results, [b.name for b in benches])
    print(f"wrote {output}", flush=True)
    return results
