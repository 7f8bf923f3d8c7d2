"""Retrieval between a gallery of images and a gallery of captions with a sparse positive relation, scored in
blocks of queries so that 5k images x 25k captions (COCO 5K) fits a laptop: the benchmarks' metric engine.

A positive pair is (image index, caption index); every caption of an image is a positive (COCO / Flickr30k: five
per image) and a benchmark may add extra ones (ECCV Caption, CxC). Scores come from ``loss.score`` (the loss
owns its geometry and its use of sigma), one ``(block, gallery)`` slice at a time, and each slice is ranked by
:func:`rank_block`: the numbers of :func:`probloss.eval.metrics.plausible_ranking` (pessimistic ties, R = the
query's number of positives; the built-in evaluator's definition) without sorting the gallery, so every per-query
number has one definition across the built-in evaluator and the benchmarks.

    pos = positive_pairs(caption_image=torch.tensor([0, 0, 1, 1]))          # two captions per image
    per_query = rank_retrieval(loss, image_emb, text_emb, None, None, pos)   # {"i2t": {...}, "t2i": {...}}
    summary = summarize(per_query)                                           # {"i2t_r@1": ..., "rsum": ...}
    coco_1k = fold_summary(loss, image_emb, text_emb, None, None, caption_image)  # mean over 5 folds of 1000

The uncertainty keys and plot of a benchmark: :mod:`probloss.eval.uncertainty`.

Shapes: ``image_emb`` (N_img, D), ``text_emb`` (N_txt, D), log-stds (N, ) / (N, D) or None; ``positives``
(P, 2) long (image, caption).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from probloss.eval.dual_encoder import _rows  # x[rows], or None for a loss without log-stds


def positive_pairs(caption_image: Tensor, extra: Tensor | None = None) -> Tensor:
    """``(P, 2)`` unique (image, caption) positives: each caption with its own image (``caption_image[c]``) plus
    the ``extra`` (E, 2) pairs (a benchmark's added positives)."""
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    own = torch.stack([caption_image, torch.arange(caption_image.numel())], 1)
    pairs = own if extra is None or len(extra) == 0 else torch.cat([own, torch.as_tensor(extra, dtype=torch.long)])
    return torch.unique(pairs, dim=0)


def _positive_rows(pairs: Tensor, rows: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """Dense ``(len(rows), n_cols)`` bool block of the relation ``pairs`` (row, col) for the given row indices
    (a row index may repeat)."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    where = torch.full((n_rows,), -1, dtype=torch.long)
    where[unique] = torch.arange(unique.numel())
    keep = where[pairs[:, 0]] >= 0
    block = torch.zeros(unique.numel(), n_cols, dtype=torch.bool)
    block[where[pairs[keep, 0]], pairs[keep, 1]] = True
    return block[inverse]


def rank_block(scores: Tensor, positive: Tensor) -> dict[str, Tensor]:
    """:func:`probloss.eval.metrics.plausible_ranking` (same definitions, pessimistic ties, same results) without
    sorting the gallery: O(Q C) comparisons plus one top-k selection, k = max(2, R_max), R_max = the most
    positives of a query.

    With R positives of a query, their scores ``p_0 >= p_1 >= ... >= p_{R-1}`` and
    ``m_j = #{non-positives scoring >= p_j}``, the j-th positive sits at position ``pos_j = 1 + j + m_j`` of the
    pessimistic order (j positives and m_j non-positives before it; ties among positives do not matter, they are
    all hits). So ``rank = pos_0``; the hits in the top R are the positives with ``pos_j <= R``, and the j-th of
    them has ``j + 1`` hits in its top ``pos_j``::

        rprecision = #{j : pos_j <= R} / R,   map_at_r = (1 / R) sum_{j : pos_j <= R} (j + 1) / pos_j

    Only ``m_j < R`` matters, so m_j is counted among the top R_max non-positive scores (a count of R_max or
    more means pos_j > R). mAP@R sums the same terms as :func:`~probloss.eval.metrics.plausible_ranking` in
    another order (equal up to float64 rounding, ~1e-16); rank and R-Precision are identical.

    Args:
        scores: ``(Q, C)`` higher = better; NaN counts as -inf. Compared in their own dtype.
        positive: ``(Q, C)`` bool.

    Returns:
        ``{"rank": (Q,) long, "rprecision": (Q,) float64, "map_at_r": (Q,) float64, "n_positive": (Q,) long}``
        (a query without positives gets rank C + 1 and NaN R-Precision and mAP@R), and the training-free
        uncertainties ``top1``, ``margin`` (Q,) float64 of :func:`probloss.eval.metrics.training_free`.
    """
    s = torch.as_tensor(scores).nan_to_num(nan=-math.inf)
    positive = torch.as_tensor(positive, dtype=torch.bool)
    if s.dim() != 2 or positive.shape != s.shape:
        raise ValueError(f"rank_block: need scores (Q, C) and positive of the same shape, got {tuple(s.shape)} and "
                         f"{tuple(positive.shape)}")
    q, c = s.shape
    n_pos = positive.sum(1)
    k = min(max(int(n_pos.max()) if q else 0, 2), c)  # >= R_max; >= 2 for the runner-up of the training-free margin
    top_neg = s.masked_fill(positive, -math.inf).topk(k, dim=1).values  # (Q, k) the top k non-positives, best first
    # p (Q, k): each row's positive scores, best first, padded with -inf (positives are few: no pass over C)
    row, col = positive.nonzero(as_tuple=True)
    slot = torch.arange(row.numel()) - (n_pos.cumsum(0) - n_pos)[row]
    p = s.new_full((q, k), -math.inf).index_put_((row, slot), s[row, col]).sort(1, descending=True).values
    rank = 1 + ((s >= p[:, :1]) & ~positive).sum(1)
    # m_j = #{top non-positives >= p_j}; the -inf pads (masked positives) only match p_j = -inf, where every
    # non-positive counts: hence the cap at their number
    m = k - torch.searchsorted(top_neg.flip(1).contiguous(), p.contiguous(), side="left")
    m = torch.minimum(m, (c - n_pos)[:, None])
    j = torch.arange(k)[None, :]
    pos = (1 + j + m).double()
    r = n_pos[:, None]
    hit = (j < r) & (pos <= r)  # the positives within the top R
    rr = n_pos.clamp_min(1).double()
    has = n_pos > 0
    rprecision = torch.where(has, hit.sum(1) / rr, math.nan)
    map_at_r = torch.where(has, torch.where(hit, (j + 1) / pos, 0.0).sum(1) / rr, math.nan)
    # the two best scores of the row are among the two best positives and the two best non-positives
    top2 = torch.cat([p[:, :2], top_neg[:, :2]], 1).topk(min(2, c), dim=1).values.double()
    return {"rank": rank, "rprecision": rprecision, "map_at_r": map_at_r, "n_positive": n_pos,
            "top1": -top2[:, 0], "margin": -(top2[:, 0] - top2[:, -1])}


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
        ``{"i2t": q, "t2i": q}``, ``q`` as :func:`probloss.eval.metrics.plausible_ranking` returns it (``rank``,
        ``rprecision``, ``map_at_r``, ``n_positive``, one entry per query; :func:`rank_block`) plus ``query``
        (the query indices) and the training-free uncertainties of each query (:func:`metrics.training_free`):
        ``top1`` (minus its best score) and ``margin`` (minus the best score's margin over the runner-up);
        higher = less certain. Scores are ranked in float32, as the built-in evaluator ranks them.
    """
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if not (n_img and n_txt):
        raise ValueError(f"rank_retrieval: empty gallery ({n_img} images, {n_txt} captions)")
    positives = torch.as_tensor(positives, dtype=torch.long).reshape(-1, 2)
    if len(positives) and (positives.min() < 0 or positives[:, 0].max() >= n_img or positives[:, 1].max() >= n_txt):
        raise ValueError(f"rank_retrieval: positives must be (image, caption) pairs within {n_img} images and {n_txt} "
                         f"captions, got images {positives[:, 0].min().item()}..{positives[:, 0].max().item()} and "
                         f"captions {positives[:, 1].min().item()}..{positives[:, 1].max().item()}")
    out = {}
    for d, queries, n_q, n_c, pairs in (("i2t", image_queries, n_img, n_txt, positives),
                                        ("t2i", caption_queries, n_txt, n_img, positives.flip(1))):
        queries = torch.arange(n_q) if queries is None else torch.as_tensor(queries, dtype=torch.long)
        parts = [rank_block(torch.empty(0, n_c), torch.zeros(0, n_c, dtype=torch.bool))]  # no queries: empty
        for start in range(0, queries.numel(), block):
            rows = queries[start: start + block]
            if d == "i2t":
                s = loss.score(image_emb[rows], text_emb, _rows(image_log_std, rows), text_log_std)
            else:  # (N_img, b) -> (b, N_img): the loss scores images against texts
                s = loss.score(image_emb, text_emb[rows], image_log_std, _rows(text_log_std, rows)).T
            parts.append(rank_block(s.float().cpu(), _positive_rows(pairs, rows, n_q, n_c)))
            if progress is not None:
                progress(rows.numel())
        out[d] = {key: torch.cat([q[key] for q in parts]) for key in parts[0]}
        out[d]["query"] = queries
    return out


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


def fold_summary(loss: nn.Module, image_emb: Tensor, text_emb: Tensor, image_log_std: Tensor | None,
                 text_log_std: Tensor | None, caption_image: Tensor, extra: Tensor | None = None, *,
                 n_folds: int = 5, fold_size: int = 1000, block: int = 256, ks: Sequence[int] = (1, 5, 10),
                 progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """The COCO 1K protocol: :func:`summarize` of each of ``n_folds`` folds, then the mean of every key over the
    folds (VSE++, Faghri et al. 2018; PCME++ "COCO 1K"). Fold f holds images ``[f * fold_size, (f + 1) *
    fold_size)`` and their own captions (``caption_image[c]`` in the fold), retrieved only among each other;
    ``extra`` (image, caption) positives count where both ends lie in the fold.

    Args:
        caption_image: ``(N_txt,)`` long, each caption's own image (as :func:`positive_pairs` takes it).
        extra: ``(E, 2)`` added positives over the whole galleries' indices, or None.
        n_folds, fold_size: 5 x 1000 for COCO's 5K test images (the first n_folds * fold_size images are used).

    Returns:
        :func:`summarize`'s keys, each the mean over the folds (``{d}_n_queries`` too: per fold).

    Raises:
        ValueError: fewer than ``n_folds * fold_size`` images.
    """
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    if image_emb.shape[0] < n_folds * fold_size:
        raise ValueError(f"fold_summary: {n_folds} folds of {fold_size} images need {n_folds * fold_size} images, "
                         f"got {image_emb.shape[0]}")
    folds = []
    for f in range(n_folds):
        images = torch.arange(f * fold_size, (f + 1) * fold_size)
        captions = torch.nonzero((caption_image >= images[0]) & (caption_image <= images[-1])).flatten()
        # global -> fold-local caption index for the extra pairs (-1: outside the fold)
        local = torch.full((text_emb.shape[0],), -1, dtype=torch.long)
        local[captions] = torch.arange(captions.numel())
        fold_extra = None
        if extra is not None and len(extra):
            e = torch.as_tensor(extra, dtype=torch.long).reshape(-1, 2)
            e = e[(e[:, 0] >= images[0]) & (e[:, 0] <= images[-1]) & (local[e[:, 1]] >= 0)]
            fold_extra = torch.stack([e[:, 0] - images[0], local[e[:, 1]]], 1)
        per_query = rank_retrieval(loss, image_emb[images], text_emb[captions], _rows(image_log_std, images),
                                   _rows(text_log_std, captions),
                                   positive_pairs(caption_image[captions] - images[0], fold_extra),
                                   block=block, progress=progress)
        folds.append(summarize(per_query, ks))
    return {key: sum(s[key] for s in folds) / n_folds for key in folds[0]}
