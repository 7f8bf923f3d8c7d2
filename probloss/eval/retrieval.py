"""Retrieval between a gallery of images and a gallery of captions with a sparse positive relation, scored in
blocks of queries so that 5k images x 25k captions (COCO 5K) fits a laptop: the benchmarks' metric engine.

A positive pair is (image index, caption index); every caption of an image is a positive (COCO / Flickr30k: five
per image) and a benchmark may add extra ones (ECCV Caption, CxC). Scores come from ``loss.score`` (the loss
owns its geometry and its use of sigma), one ``(block, gallery)`` slice at a time, and each slice is ranked by
:func:`probloss.eval.metrics.plausible_ranking` (pessimistic ties, R = the query's number of positives), so every
per-query number has one definition across the built-in evaluator and the benchmarks.

    pos = positive_pairs(caption_image=torch.tensor([0, 0, 1, 1]))          # two captions per image
    per_query = rank_retrieval(loss, image_emb, text_emb, None, None, pos)   # {"i2t": {...}, "t2i": {...}}
    summary = summarize(per_query)                                           # {"i2t_r@1": ..., "rsum": ...}

Shapes: ``image_emb`` (N_img, D), ``text_emb`` (N_txt, D), log-stds (N, ) / (N, D) or None; ``positives``
(P, 2) long (image, caption).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from probloss.eval import metrics


def positive_pairs(caption_image: Tensor, extra: Tensor | None = None) -> Tensor:
    """``(P, 2)`` unique (image, caption) positives: each caption with its own image (``caption_image[c]``) plus
    the ``extra`` (E, 2) pairs (a benchmark's added positives)."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    own = torch.stack([caption_image, torch.arange(caption_image.numel())], 1)
    pairs = own if extra is None or len(extra) == 0 else torch.cat([own, torch.as_tensor(extra, dtype=torch.long)])
    return torch.unique(pairs, dim=0)


def _positive_rows(pairs: Tensor, rows: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """Dense ``(len(rows), n_cols)`` bool block of the relation ``pairs`` (row, col) for the given row indices."""
    where = torch.full((n_rows,), -1, dtype=torch.long)
    where[rows] = torch.arange(rows.numel())
    keep = where[pairs[:, 0]] >= 0
    block = torch.zeros(rows.numel(), n_cols, dtype=torch.bool)
    block[where[pairs[keep, 0]], pairs[keep, 1]] = True
    return block


@torch.no_grad()
def rank_retrieval(loss: nn.Module, image_emb: Tensor, text_emb: Tensor, image_log_std: Tensor | None,
                   text_log_std: Tensor | None, positives: Tensor, *, image_queries: Tensor | None = None,
                   caption_queries: Tensor | None = None, block: int = 256,
                   progress: Callable[[int], None] | None = None) -> dict[str, dict[str, Tensor]]:
    """Per-query rankings in both directions: image queries against every caption (``i2t``) and caption queries
    against every image (``t2i``).

    Args:
        positives: ``(P, 2)`` (image, caption) pairs (:func:`positive_pairs`).
        image_queries, caption_queries: the query subsets (long indices; None = every item). The gallery is
            always every item (ECCV Caption: a subset of queries against the whole 5K gallery).
        block: queries scored and ranked at a time; memory is O(block x gallery).
        progress: called with the number of queries done after each block (e.g. a tqdm ``update``).

    Returns:
        ``{"i2t": q, "t2i": q}``, ``q`` as :func:`probloss.eval.metrics.plausible_ranking` returns it plus
        ``query`` (the query indices) and the training-free uncertainties of each query: ``top1`` (minus its best
        score) and ``margin`` (minus the best score's margin over the runner-up); higher = less certain.
    """
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    positives = torch.as_tensor(positives, dtype=torch.long).reshape(-1, 2)
    out = {}
    for d, queries, n_q, n_c, pairs in (("i2t", image_queries, n_img, n_txt, positives),
                                        ("t2i", caption_queries, n_txt, n_img, positives.flip(1))):
        queries = torch.arange(n_q) if queries is None else torch.as_tensor(queries, dtype=torch.long)
        parts: dict[str, list[Tensor]] = {}
        for start in range(0, queries.numel(), block):
            rows = queries[start: start + block]
            if d == "i2t":
                s = loss.score(image_emb[rows], text_emb, _take(image_log_std, rows), text_log_std)
            else:  # (N_img, b) -> (b, N_img): the loss scores images against texts
                s = loss.score(image_emb, text_emb[rows], image_log_std, _take(text_log_std, rows)).T
            s = s.float().cpu()
            q = metrics.plausible_ranking(s, _positive_rows(pairs, rows, n_q, n_c), block=block)
            top2 = s.nan_to_num(nan=-math.inf).topk(min(2, n_c), dim=1).values.double()
            q["top1"], q["margin"] = -top2[:, 0], -(top2[:, 0] - top2[:, -1])
            for key, value in q.items():
                parts.setdefault(key, []).append(value)
            if progress is not None:
                progress(rows.numel())
        out[d] = {key: torch.cat(values) for key, values in parts.items()} if parts else {}
        out[d]["query"] = queries
    return out


def _take(x: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if x is None else x[rows]


def summarize(per_query: dict[str, dict[str, Tensor]], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{d}_r@{k}`` (a positive in the top k), ``{d}_rprecision``, ``{d}_map@r`` for d in i2t, t2i, means over
    the queries with at least one positive, and ``rsum`` (the sum of the six R@{1,5,10} in percent, as VSE++ and
    PCME++ report it; only when ks covers 1, 5, 10)."""
    out = {}
    for d, q in per_query.items():
        has = q["n_positive"] > 0
        for k in ks:
            out[f"{d}_r@{k}"] = (q["rank"][has] <= k).double().mean().item()
        out[f"{d}_rprecision"] = q["rprecision"][has].mean().item()
        out[f"{d}_map@r"] = q["map_at_r"][has].mean().item()
        out[f"{d}_n_queries"] = float(has.sum())
    if set(ks) >= {1, 5, 10} and {"i2t", "t2i"} <= set(per_query):
        out["rsum"] = 100 * sum(out[f"{d}_r@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out
