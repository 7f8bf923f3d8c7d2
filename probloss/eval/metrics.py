"""Evaluation metrics as pure functions on tensors (no model, no loss, no I/O).

Conventions shared by every function here:

- Scores are "higher = better match" (what ``loss.score`` returns). NaN scores count as the worst score.
- Ranking ties are broken **pessimistically**: the positive is ranked below every candidate with an equal score,
  so a collapsed model that gives every candidate the same score gets R@1 = 1/N-ish -> 0, never 1. With several
  positives per query (:func:`multi_positive_ranks`) ties *among positives* cost nothing (identical captions get
  identical embeddings, so a perfect model ties them), ties of a positive with a *non-positive* stay pessimistic.
- Embedding-space metrics (:func:`uniformity`, :func:`alignment`, :func:`modality_gap`) L2-normalise their inputs
  themselves, as in the papers, unless ``normalize=False`` (then they measure the vectors as given: the view a
  distance loss scores); :func:`effective_rank` and :func:`participation_ratio` use the embeddings as given
  (``probloss.eval.dual_encoder`` chooses the view: its ``embed/*`` and ``embed/scored/*`` keys).
- Plausible-match retrieval (:func:`plausible_ranking`): many positives per query, ranked with pessimistic ties
  (every non-positive tied with a positive ranks first); R-Precision and mAP@R as in Musgrave et al. (2020).
- Uncertainty curves (:func:`binned_means`, :func:`risk_coverage`) take an uncertainty per query (higher = less
  certain) and average over tie groups, i.e. report the expectation over a random order of tied queries, so a
  discrete uncertainty (a word count) is not credited with the order of the inputs.
- Everything is computed in float64 on the input's device and returned as Python floats (or dicts of them).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _as_float64(x: Tensor) -> Tensor:
    return torch.as_tensor(x).detach().to(torch.float64)


def positive_ranks(scores: Tensor, positives: Tensor) -> Tensor:
    """1-based rank of each row's positive, ties pessimistic.

    Args:
        scores: ``(Q, C)`` higher = better; NaN counts as -inf.
        positives: ``(Q,)`` long, the column of each row's positive.

    Returns:
        ``(Q,)`` long: ``#{c : s[q, c] >= s[q, pos_q]}`` (the positive counts itself, so the best rank is 1).
    """
    scores = _as_float64(scores).nan_to_num(nan=-math.inf)
    pos = scores.gather(1, positives.view(-1, 1).to(scores.device))  # (Q, 1)
    return (scores >= pos).sum(1)


def multi_positive_ranks(scores: Tensor, positive: Tensor) -> Tensor:
    """1-based rank of each row's best-scoring positive among the non-positives (several positives per row).

    ``rank_q = 1 + #{c not positive : s[q, c] >= max_{p positive} s[q, p]}``: ties among positives cost nothing,
    a tie with a non-positive counts against the query (pessimistic, as :func:`positive_ranks`). With one positive
    per row it equals :func:`positive_ranks`. A row without positives gets ``1 + C`` (a miss at every K < C + 1).

    Args:
        scores: ``(Q, C)`` higher = better; NaN counts as -inf.
        positive: ``(Q, C)`` bool, True where candidate c is a positive of query q.

    Returns:
        ``(Q,)`` long ranks.
    """
    scores = _as_float64(scores).nan_to_num(nan=-math.inf)
    positive = torch.as_tensor(positive, dtype=torch.bool, device=scores.device)
    if positive.shape != scores.shape:
        raise ValueError(f"multi_positive_ranks: positive {tuple(positive.shape)} must match scores "
                         f"{tuple(scores.shape)}")
    best = scores.masked_fill(~positive, -math.inf).max(1, keepdim=True).values  # (Q, 1)
    return 1 + ((scores >= best) & ~positive).sum(1)


def same_group(groups: Tensor) -> Tensor:
    """``(N, N)`` bool: ``groups[i] == groups[j]`` (e.g. ids of caption strings: identical captions are positives)."""
    groups = torch.as_tensor(groups).flatten()
    return groups[:, None] == groups[None, :]


def retrieval_recall(scores: Tensor, ks: Sequence[int] = (1, 5, 10), groups: Tensor | None = None) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@K with the positive of image i at text i.

    ``i2t_r@K = mean_i [rank_i <= K]`` where ``rank_i = #{j : s_ij >= s_ii}`` over the texts (row i), and
    ``t2i_r@K`` the same over the images (column j). One caption per image, as in the CLIP / ALIGN retrieval
    tables (Radford et al. 2021). Ties are pessimistic (see the module docstring).

    With ``groups`` (multi-positive, as COCO's five captions per image): text j is a positive of image i (and
    image i of text j) when ``groups[i] == groups[j]``; ranks from :func:`multi_positive_ranks`.

    Args:
        scores: ``(N, N)`` scores, row = image, column = text, positives on the diagonal.
        ks: the K values.
        groups: ``(N,)`` ids, or None for one positive per query (the diagonal).

    Returns:
        ``{"i2t_r@K": ..., "t2i_r@K": ...}`` for each K, in [0, 1].
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"retrieval_recall: scores must be square (N, N) with positives on the diagonal, "
                         f"got {tuple(scores.shape)}")
    n = scores.shape[0]
    if groups is None:
        diag = torch.arange(n, device=scores.device)
        ranks = {"i2t": positive_ranks(scores, diag), "t2i": positive_ranks(scores.T, diag)}
    else:
        positive = same_group(groups)  # symmetric: the same mask serves both directions
        ranks = {"i2t": multi_positive_ranks(scores, positive), "t2i": multi_positive_ranks(scores.T, positive)}
    return {f"{d}_r@{k}": (r <= k).double().mean().item() for d, r in ranks.items() for k in ks}


def zeroshot_accuracy(scores: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-K zero-shot classification accuracy (CLIP's protocol; Radford et al. 2021).

    ``topK = mean_i [#{c : s_ic >= s_i,y_i} <= K]`` (ties pessimistic).

    Args:
        scores: ``(N, C)`` image-vs-class-prompt scores.
        labels: ``(N,)`` class indices in [0, C).
        ks: the K values.

    Returns:
        ``{"top1": ..., "top5": ...}`` in [0, 1].
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if scores.dim() != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"zeroshot_accuracy: need scores (N, C) and labels (N,), got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"zeroshot_accuracy: labels must lie in [0, {scores.shape[1]}), got "
                         f"[{labels.min().item()}, {labels.max().item()}]")
    ranks = positive_ranks(scores, labels)
    return {f"top{k}": (ranks <= k).double().mean().item() for k in ks}


def effective_rank(emb: Tensor, rtol: float | None = None) -> float:
    """Effective rank of an embedding matrix (Roy & Vetterli 2007; RankMe, Garrido et al. 2023).

    ``erank = exp(H(p))``, ``p_k = s_k / sum_k s_k`` over the singular values ``s_k`` of ``emb`` (N, D), with
    ``H(p) = -sum_k p_k ln p_k`` (0 ln 0 = 0). Lies in [1, min(N, D)]; 1 for rank-1 embeddings.

    Computed on the embeddings **as given, not mean-centred** (as RankMe does): centring would map a rank-1 set
    of identical rows to zero and make the value undefined. An all-zero matrix gives 0.

    Args:
        emb: ``(N, D)`` embeddings.
        rtol: singular values below ``rtol * max`` count as zero (rounding noise of the input's precision);
            default ``max(N, D) * eps(dtype)``, the threshold of ``numpy.linalg.matrix_rank``.
    """
    emb = torch.as_tensor(emb)
    if rtol is None:
        dtype = emb.dtype if emb.is_floating_point() else torch.float64
        rtol = max(emb.shape) * torch.finfo(dtype).eps
    if not torch.isfinite(emb).all():  # a diverged model: no spectrum to speak of
        return float("nan")
    s = torch.linalg.svdvals(_as_float64(emb))
    if s.numel() == 0 or s.max() <= 0:
        return 0.0
    s = s[s > rtol * s.max()]
    p = s / s.sum()
    return math.exp(-(p * p.log()).sum().item())


def uniformity(emb: Tensor, t: float = 2.0, normalize: bool = True) -> float:
    """Uniformity loss of Wang & Isola (2020) on L2-normalised embeddings (lower = more uniform).

    ``U = log mean_{i<j} exp(-t ||x_i - x_j||^2)``, ``x = emb / ||emb||``. In [-4t, 0]: 0 when all points
    coincide, -4t for an antipodal pair. Computed with a log-sum-exp over the N(N-1)/2 pairs.

    Args:
        emb: ``(N, D)`` embeddings, N >= 2.
        t: the kernel's scale (the paper uses 2).
        normalize: False uses ``x = emb`` as given (at most 0; no lower bound).
    """
    x = F.normalize(_as_float64(emb), dim=-1) if normalize else _as_float64(emb)
    if x.shape[0] < 2:
        raise ValueError("uniformity: needs at least two embeddings")
    sq = torch.pdist(x).pow(2)  # (N (N-1) / 2,)
    return (torch.logsumexp(-t * sq, 0) - math.log(sq.numel())).item()


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0, normalize: bool = True) -> float:
    """Alignment loss of Wang & Isola (2020) on L2-normalised positive pairs (lower = better aligned).

    ``A = mean_i ||x_i - y_i||^alpha`` with ``x``, ``y`` L2-normalised; in [0, 2^alpha].

    Args:
        x, y: ``(N, D)`` embeddings, row i of each a positive pair (image i, caption i).
        alpha: the exponent (the paper uses 2).
        normalize: False measures the vectors as given (in [0, inf)).
    """
    if x.shape != y.shape:
        raise ValueError(f"alignment: x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape")
    x, y = _as_float64(x), _as_float64(y)
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).pow(alpha).mean().item()


def modality_gap(x: Tensor, y: Tensor, normalize: bool = True) -> float:
    """Modality gap of Liang et al. (2022, "Mind the Gap"): distance between the modality centroids.

    ``gap = || mean_i x_i / ||x_i|| - mean_j y_j / ||y_j|| ||_2``, in [0, 2]. x and y need not be paired.

    Args:
        x: ``(N, D)`` image embeddings.
        y: ``(M, D)`` text embeddings.
        normalize: False uses the vectors as given (in [0, inf)).
    """
    x, y = _as_float64(x), _as_float64(y)
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    cx, cy = x.mean(0), y.mean(0)
    return (cx - cy).norm().item()


def participation_ratio(emb: Tensor, normalized: bool = False) -> float:
    """Participation ratio of the per-dimension variances (how many embedding coordinates carry variance).

    ``PR = (sum_d v_d)^2 / sum_d v_d^2`` with ``v_d`` the variance of coordinate d over the N samples; in
    [1, D]: 1 when a single coordinate varies, D when all vary equally (Gao et al. 2017 use the same form on
    covariance eigenvalues; this per-coordinate version measures use of the axes and is not rotation
    invariant). ``normalized=True`` returns ``PR / D`` in [1/D, 1]. Constant embeddings give 0.

    Args:
        emb: ``(N, D)`` embeddings, N >= 2.
        normalized: divide by D.
    """
    e = _as_float64(emb)
    v = e.var(0, unbiased=False)  # (D,)
    denom = v.pow(2).sum()
    if denom <= 0:
        return 0.0
    pr = (v.sum().pow(2) / denom).item()
    return pr / e.shape[1] if normalized else pr


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor with ties given their average rank (scipy.stats.rankdata "average")."""
    x = _as_float64(x).flatten()
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # last 1-based rank of each tie group
    group_rank = ends - (counts.double() - 1) / 2  # mean of start..end
    ranks = torch.empty_like(x)
    ranks[order] = group_rank[inverse]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation with ties (the Pearson correlation of average ranks; Spearman 1904).

    Matches ``scipy.stats.spearmanr(a, b).statistic``. NaN when either input is constant or has < 2 values.

    Args:
        a, b: 1-D tensors (or sequences) of the same length.
    """
    a, b = _as_float64(a).flatten(), _as_float64(b).flatten()
    if a.shape != b.shape:
        raise ValueError(f"spearman: a {tuple(a.shape)} and b {tuple(b.shape)} must have the same length")
    if a.numel() < 2:
        return float("nan")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.pow(2).sum() * rb.pow(2).sum()).sqrt()
    if denom <= 0:
        return float("nan")
    return ((ra * rb).sum() / denom).clamp(-1, 1).item()


def percentile_ranks(x: Tensor) -> Tensor:
    """Ranks scaled to [0, 1]: ``(average_rank - 1) / (n - 1)``; 0 = smallest, 1 = largest, ties averaged.

    A single value gets 0.5.
    """
    x = _as_float64(x).flatten()
    if x.numel() < 2:
        return torch.full_like(x, 0.5)
    return (average_ranks(x) - 1) / (x.numel() - 1)


def partial_spearman(x: Tensor, y: Tensor, z: Tensor) -> float:
    """Partial Spearman correlation of x and y controlling for z (rank-transform, then partial correlation).

    ``r_xy.z = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2) (1 - r_yz^2))`` with the ``r`` Spearman correlations
    (:func:`spearman`, ties averaged): the Pearson correlation of the ranks of x and y after each is linearly
    regressed on the ranks of z. When x or y is a monotone function of z (``|r| = 1``) nothing is left beyond z
    and the value is defined as 0 (no association beyond z). NaN when any of the three correlations is NaN
    (a constant input or fewer than 2 values).

    Args:
        x, y, z: 1-D tensors (or sequences) of the same length.
    """
    r_xy, r_xz, r_yz = spearman(x, y), spearman(x, z), spearman(y, z)
    if any(math.isnan(r) for r in (r_xy, r_xz, r_yz)):
        return float("nan")
    if min(1 - r_xz ** 2, 1 - r_yz ** 2) <= 1e-9:
        return 0.0
    r = (r_xy - r_xz * r_yz) / math.sqrt((1 - r_xz ** 2) * (1 - r_yz ** 2))
    return max(-1.0, min(1.0, r))


def plausible_ranking(scores: Tensor, positive: Tensor, block: int = 1024) -> dict[str, Tensor]:
    """Per-query ranking metrics with many positives (plausible matches; PCME, Chun et al. 2021; ECCV Caption,
    Chun et al. 2022).

    Candidates are ranked by score, highest first; among equal scores every non-positive ranks before every
    positive (pessimistic ties, as :func:`positive_ranks`). With R = the number of positives of a query and
    ``hit_k`` = whether the candidate at rank k is a positive (Musgrave et al. 2020, "A Metric Learning Reality
    Check")::

        rank        = 1 + #{non-positives scoring >= the best positive}       (R@K = [rank <= K])
        rprecision  = (1 / R) sum_{k <= R} hit_k                               (precision in the top R)
        map_at_r    = (1 / R) sum_{k <= R} hit_k * (sum_{j <= k} hit_j) / k   (mean precision@k at the hits)

    A scorer that ranks every positive above every non-positive scores 1 on all three. A query without
    positives gets rank C + 1 and NaN R-Precision and mAP@R (callers leave it out of means).

    Args:
        scores: ``(Q, C)`` higher = better; NaN counts as -inf.
        positive: ``(Q, C)`` bool.
        block: queries sorted at a time (bounds the ``(block, C)`` temporaries).

    Returns:
        ``{"rank": (Q,) long, "rprecision": (Q,) float64, "map_at_r": (Q,) float64, "n_positive": (Q,) long}``.
    """
    scores = torch.as_tensor(scores)
    positive = torch.as_tensor(positive, dtype=torch.bool, device=scores.device)
    if scores.dim() != 2 or positive.shape != scores.shape:
        raise ValueError(f"plausible_ranking: need scores (Q, C) and positive of the same shape, got "
                         f"{tuple(scores.shape)} and {tuple(positive.shape)}")
    q, c = scores.shape
    n_pos = positive.sum(1)
    rank = torch.empty(q, dtype=torch.long, device=scores.device)
    rprecision = torch.empty(q, dtype=torch.float64, device=scores.device)
    map_at_r = torch.empty_like(rprecision)
    k = torch.arange(1, c + 1, device=scores.device, dtype=torch.float64)  # 1-based ranks
    for start in range(0, q, block):
        rows = slice(start, start + block)
        sc, po, r = scores[rows].nan_to_num(nan=-math.inf), positive[rows], n_pos[rows]
        # Pessimistic order with two stable sorts: non-positives first, then by score (descending), which keeps
        # that order among equal scores. Sorting the scores in their own dtype keeps float32 matrices cheap.
        by_flag = torch.argsort(po.to(torch.uint8), dim=1, stable=True)
        by_score = torch.argsort(sc.gather(1, by_flag), dim=1, descending=True, stable=True)
        hits = po.gather(1, by_flag.gather(1, by_score))  # (b, C) positive flag at each rank
        cum = hits.cumsum(1, dtype=torch.float64)  # hits within the top k
        has, rr = r > 0, r.clamp_min(1)
        # the first hit's position is 1 + #{non-positives ranked above the best positive}
        rank[rows] = torch.where(has, hits.to(torch.uint8).argmax(1) + 1, c + 1)
        in_top_r = hits & (k[None, :] <= rr[:, None])
        rprecision[rows] = torch.where(has, cum.gather(1, (rr - 1)[:, None]).squeeze(1) / rr, math.nan)
        map_at_r[rows] = torch.where(has, torch.where(in_top_r, cum / k, 0.0).sum(1) / rr, math.nan)
    return {"rank": rank, "rprecision": rprecision, "map_at_r": map_at_r, "n_positive": n_pos}


def tie_averaged(values: Tensor, key: Tensor) -> Tensor:
    """``values`` with each entry replaced by the mean over the entries of equal ``key`` (1-D, same length).

    The expectation under a random order of tied keys: sorting by ``key`` and then reading ``values`` in that
    order gives, at every position, the expected value over all orders of the ties.
    """
    values, key = _as_float64(values).flatten(), _as_float64(key).flatten()
    _, inverse = torch.unique(key, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0, dtype=torch.float64,
                       device=values.device).index_add_(0, inverse, values)
    counts = torch.bincount(inverse).to(torch.float64)
    return (sums / counts)[inverse]


def binned_means(values: Tensor, uncertainty: Tensor, n_bins: int = 10) -> list[float]:
    """Mean of ``values`` over ``n_bins`` equal-count bins of the queries sorted by ``uncertainty``, lowest first
    (PCME++, Chun 2024; ProLIP, Chun et al. 2024: recall per uncertainty bin).

    Bins come from ``torch.tensor_split`` of the sorted queries (sizes differ by at most one); values of queries
    with tied uncertainty are averaged over their tie group first (module docstring), so a tie group that
    straddles a bin edge counts its mean on both sides. A calibrated uncertainty gives values falling from the
    first to the last bin. Empty bins (fewer queries than bins) give NaN.

    Args:
        values: ``(Q,)`` per-query score (a hit, an R-Precision).
        uncertainty: ``(Q,)`` higher = less certain (sigma, or minus a confidence).
        n_bins: number of bins (10 = deciles).
    """
    values, uncertainty = _as_float64(values).flatten(), _as_float64(uncertainty).flatten()
    if values.shape != uncertainty.shape:
        raise ValueError(f"binned_means: values {tuple(values.shape)} and uncertainty {tuple(uncertainty.shape)}")
    order = torch.argsort(uncertainty, stable=True)
    v = tie_averaged(values, uncertainty)[order]
    return [b.mean().item() if b.numel() else math.nan for b in torch.tensor_split(v, n_bins)]


def risk_coverage(hits: Tensor, uncertainty: Tensor) -> Tensor:
    """Selective-prediction risk at every coverage (Geifman & El-Yaniv 2017): the queries are kept most certain
    first, and ``risk[k - 1] = 1 - mean(hits of the k kept)``, k = 1..Q (tied uncertainties: the expectation over
    their order). ``AURC = risk.mean()`` (Geifman et al. 2019; lower is better). For reading it: ordering by
    the hits themselves gives the oracle AURC, and any order's expected AURC under random ordering is
    ``1 - mean(hits)``.

    Args:
        hits: ``(Q,)`` 1 for a correct query, 0 for a miss (or a per-query score in [0, 1]).
        uncertainty: ``(Q,)`` higher = less certain.

    Returns:
        ``(Q,)`` float64 risks.
    """
    hits, uncertainty = _as_float64(hits).flatten(), _as_float64(uncertainty).flatten()
    if hits.shape != uncertainty.shape or hits.numel() == 0:
        raise ValueError(f"risk_coverage: need hits and uncertainty of one non-empty length, got "
                         f"{tuple(hits.shape)} and {tuple(uncertainty.shape)}")
    order = torch.argsort(uncertainty, stable=True)
    kept = tie_averaged(hits, uncertainty)[order].cumsum(0)
    return 1 - kept / torch.arange(1, hits.numel() + 1, dtype=torch.float64, device=hits.device)


def uncertainty_curves(hits: Tensor, values: dict[str, Tensor], uncertainty: Tensor, n_bins: int = 10
                       ) -> dict[str, float]:
    """How a per-query uncertainty reads against retrieval: the one definition the built-in evaluator and the
    benchmarks share (PCME++, Chun 2024; ProLIP, Chun et al. 2024).

    For each ``values[name]`` (a per-query score: R@1 hits, an R-Precision, an mAP@R): ``bin_{b}_{name}`` the
    mean over the b-th of ``n_bins`` equal-count uncertainty bins, lowest uncertainty first
    (:func:`binned_means`), and ``bin_{name}_spearman`` the Spearman correlation of the non-empty bins' means with
    the bin index (-1: the score falls with every step of uncertainty; NaN for a constant curve). From ``hits``:
    ``aurc`` = the mean risk of :func:`risk_coverage` (lower = better), beside its two references ``aurc_oracle``
    (the queries ordered by their own hits) and ``aurc_random`` = ``1 - mean(hits)`` (any order's expectation).

    Args:
        hits: ``(Q,)`` 1 for a query whose top candidate is a positive, else 0.
        values: name -> ``(Q,)`` per-query score.
        uncertainty: ``(Q,)`` higher = less certain (NaN: map it to +inf first, the least certain).
        n_bins: number of bins.
    """
    hits = _as_float64(hits).flatten()
    out = {}
    for name, v in values.items():
        bins = binned_means(v, uncertainty, n_bins)
        out.update({f"bin_{b}_{name}": m for b, m in enumerate(bins)})
        ok = [b for b, m in enumerate(bins) if not math.isnan(m)]
        out[f"bin_{name}_spearman"] = spearman(torch.tensor(ok), torch.tensor([bins[b] for b in ok]))
    out["aurc"] = risk_coverage(hits, uncertainty).mean().item()
    out["aurc_oracle"] = risk_coverage(hits, -hits).mean().item()
    out["aurc_random"] = 1 - hits.mean().item()
    return out


def training_free(scores: Tensor) -> dict[str, Tensor]:
    """The training-free uncertainties of the queries (rows) of ``scores`` (Q, C), float64: ``top1`` = minus the
    best score (a high best score = confident), ``margin`` = minus its margin over the runner-up (a wide margin =
    confident). NaN scores count as -inf; with one candidate the margin is 0."""
    top2 = torch.as_tensor(scores).nan_to_num(nan=-math.inf).topk(min(2, scores.shape[1]), dim=1).values.double()
    return {"top1": -top2[:, 0], "margin": -(top2[:, 0] - top2[:, -1])}


def exact_sum(x: Tensor) -> float:
    """The correctly rounded float64 sum of a tensor's elements (``math.fsum``): the same bits whatever the
    memory alignment, thread count or BLAS, unlike a vectorised reduction (two processes training identically
    must report identical statistics)."""
    return math.fsum(_as_float64(x).flatten().tolist())


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """``a^-1 b`` for a small symmetric positive (semi)definite ``a`` by Gaussian elimination with partial pivoting
    in plain Python floats (deterministic); None when a pivot vanishes (singular ``a``)."""
    n = len(a)
    m = [list(row) + [v] for row, v in zip(a, b)]
    scale = max(abs(m[i][i]) for i in range(n)) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) <= 1e-12 * scale:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [vr - f * vc for vr, vc in zip(m[r], m[col])]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][c] * out[c] for c in range(r + 1, n))) / m[r][r]
    return out


def ols(y: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Ordinary least squares ``y = x b + e`` with the classical standard errors.

    ``b = (x^T x)^-1 x^T y``; ``se_k = sqrt(s^2 [(x^T x)^-1]_kk)`` with ``s^2 = RSS / (n - p)``. Include a column
    of ones in ``x`` for an intercept. Float64; every sum over the n rows is correctly rounded (:func:`exact_sum`)
    and the p x p system is solved in plain Python, so the result is bit for bit the same in every process
    (LAPACK's least squares was not: 1e-15 differences between two workers of one recipe). For the small p of a
    regression on a few cues.

    Args:
        y: ``(n,)`` response.
        x: ``(n, p)`` design matrix of full column rank, n > p.

    Returns:
        ``(coef (p,), se (p,))``.

    Raises:
        ValueError: n <= p or ``x`` not of full column rank.
    """
    y, x = _as_float64(y).flatten(), _as_float64(x)
    n, p = x.shape
    if y.shape != (n,) or n <= p:
        raise ValueError(f"ols: need y (n,) and x (n, p) with n > p, got {tuple(y.shape)} and {tuple(x.shape)}")
    gram = [[exact_sum(x[:, i] * x[:, j]) for j in range(p)] for i in range(p)]
    coef = _solve(gram, [exact_sum(x[:, i] * y) for i in range(p)])
    if coef is None:
        raise ValueError("ols: the design matrix is not of full column rank")
    fitted = sum(x[:, k] * coef[k] for k in range(p))  # elementwise: the same bits everywhere
    rss = exact_sum((y - fitted).pow(2))
    inv_diag = [_solve(gram, [float(i == k) for i in range(p)])[k] for k in range(p)]
    se = [math.sqrt(max(rss / (n - p) * v, 0.0)) for v in inv_diag]
    return torch.tensor(coef, dtype=torch.float64), torch.tensor(se, dtype=torch.float64)


def pair_probe_accuracy(score_true: Tensor, score_false: Tensor) -> float:
    """Two-alternative probe accuracy: how often the true caption outscores its hard negative.

    ``acc = mean_i ( [s_true_i > s_false_i] + 0.5 [s_true_i == s_false_i] )``: an exact tie counts half, so a
    model that cannot tell the captions apart (e.g. a bag-of-words text tower on a relation-reversed caption)
    scores chance, 0.5, as in ARO's relation and attribution tests (Yuksekgonul et al. 2023). NaN scores lose.

    Args:
        score_true, score_false: ``(N,)`` score of image i with its true caption and with its negative.

    Returns:
        accuracy in [0, 1]; NaN for N = 0.
    """
    t, f = _as_float64(score_true).flatten(), _as_float64(score_false).flatten()
    if t.shape != f.shape:
        raise ValueError(f"pair_probe_accuracy: {tuple(t.shape)} vs {tuple(f.shape)} scores")
    if t.numel() == 0:
        return float("nan")
    t, f = t.nan_to_num(nan=-math.inf), f.nan_to_num(nan=math.inf)
    return ((t > f).double() + 0.5 * (t == f).double()).mean().item()


def auroc(score: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``score`` for the ``positive`` class: P(score of a positive > score of a
    negative) + P(tie) / 2 (the Mann-Whitney U / (n1 n0), average ranks). NaN without both classes."""
    score, positive = _as_float64(score).flatten(), torch.as_tensor(positive, dtype=torch.bool).flatten()
    n1 = int(positive.sum())
    n0 = positive.numel() - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = average_ranks(score)
    return ((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)).item()


def hanley_mcneil_se(a: float, n1: int, n0: int) -> float:
    """Standard error of an AUROC ``a`` from ``n1`` positives and ``n0`` negatives (Hanley & McNeil 1982):
    ``SE^2 = (a (1 - a) + (n1 - 1) (Q1 - a^2) + (n0 - 1) (Q2 - a^2)) / (n1 n0)``, Q1 = a / (2 - a),
    Q2 = 2 a^2 / (1 + a) (exponential-score model; close to DeLong's for continuous scores)."""
    if math.isnan(a) or n1 < 1 or n0 < 1:
        return float("nan")
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0)
    return math.sqrt(max(var, 0.0))


def stratified_auroc(score: Tensor, positive: Tensor, strata: Tensor) -> dict[str, float]:
    """AUROC of ``score`` for ``positive`` within each stratum, averaged over strata weighted by their positives.

    Only strata holding both classes count. The weighted mean reads: the probability that a positive's score
    exceeds that of a random negative OF ITS OWN STRATUM (ties half), averaged over positives; so a cue that is
    constant within strata (what they are built from) scores exactly 0.5. Its standard error combines the
    strata's Hanley-McNeil SEs (independent strata): ``sqrt(sum_s w_s^2 SE_s^2)``, w_s = n1_s / sum n1.

    Args:
        score: (n,) higher = more likely positive (e.g. a sigma).
        positive: (n,) bool.
        strata: (n,) integer stratum ids.

    Returns:
        ``{"auroc", "se", "n_positive", "n_negative"}`` (the last two over the strata that count); NaN auroc and
        se when no stratum has both classes.
    """
    score, positive = _as_float64(score).flatten(), torch.as_tensor(positive, dtype=torch.bool).flatten()
    strata = torch.as_tensor(strata).flatten()
    parts = []  # (n1, n0, auroc) per usable stratum
    for s in torch.unique(strata):
        member = strata == s
        n1 = int((positive & member).sum())
        n0 = int(member.sum()) - n1
        if n1 and n0:
            parts.append((n1, n0, auroc(score[member], positive[member])))
    total = sum(n1 for n1, _, _ in parts)
    if not total:
        return {"auroc": float("nan"), "se": float("nan"), "n_positive": 0.0, "n_negative": 0.0}
    value = sum(n1 * a for n1, _, a in parts) / total
    se = math.sqrt(sum((n1 / total) ** 2 * hanley_mcneil_se(a, n1, n0) ** 2 for n1, n0, a in parts))
    return {"auroc": value, "se": se, "n_positive": float(total), "n_negative": float(sum(n0 for _, n0, _ in parts))}
