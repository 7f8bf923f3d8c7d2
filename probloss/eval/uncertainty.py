"""Uncertainty evaluation of a retrieval benchmark (issue 31; PCME++, Chun 2024; ProLIP, Chun et al. 2024): does a
query's predicted sigma (or a training-free confidence) say how well it is retrieved?

    per_query = rank_retrieval(loss, image_emb, text_emb, image_log_std, text_log_std, positives)
    keys = benchmark_uncertainty(per_query, image_log_std, text_log_std)     # {"unc/i2t_bin_0_r@1": ..., ...}
    plot_uncertainty_bins(keys, "eccv_caption_uncertainty.png", "eccv_caption")

Keys (d = ``i2t``: the image queries and their image sigma; ``t2i``: the caption queries and their text sigma;
over the queries with at least one positive; b = 0..n_bins-1, bin 0 = the lowest uncertainty):

- ``unc/{d}_bin_{b}_r@1``, ``unc/{d}_bin_{b}_map@r``: R@1 and mAP@R of the b-th of 10 equal-count sigma bins;
- ``unc/{d}_bin_r@1_spearman``, ``unc/{d}_bin_map@r_spearman``: Spearman of each curve with the bin index
  (-1 = the score falls with every step of sigma: a calibrated uncertainty; about 0 for a random one);
- ``unc/{d}_aurc``, ``unc/{d}_aurc_oracle``, ``unc/{d}_aurc_random``: area under the risk-coverage curve of R@1
  (lower = better) and its references (queries ordered by their own hits; ``1 - R@1``, any random order);
- ``unc/free/top1/{d}_...``, ``unc/free/margin/{d}_...``: the same keys for the training-free baselines (minus
  the best score; minus its margin over the runner-up), for every loss.

Without log-stds only the ``unc/free/...`` keys. The curves are :func:`probloss.eval.metrics.uncertainty_curves`,
the built-in evaluator's definition (ties in the uncertainty averaged; NaN sigma = the least certain).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from torch import Tensor

from probloss.eval import metrics
from probloss.eval.dual_encoder import sigma_of
from probloss.files import pyplot, save_figure

DIRECTIONS = {"i2t": "image queries (image sigma)", "t2i": "caption queries (text sigma)"}
SOURCES = {"unc/": "sigma", "unc/free/top1/": "top-1 score", "unc/free/margin/": "margin"}


def benchmark_uncertainty(per_query: dict[str, dict[str, Tensor]], image_log_std: Tensor | None,
                          text_log_std: Tensor | None, n_bins: int = 10) -> dict[str, float]:
    """The module docstring's keys from :func:`probloss.eval.retrieval.rank_retrieval`'s output.

    Args:
        per_query: ``{"i2t": q, "t2i": q}`` with ``rank``, ``map_at_r``, ``n_positive``, ``query``, ``top1``,
            ``margin`` per query.
        image_log_std, text_log_std: the whole galleries' log-stds ``(N,)`` / ``(N, D)`` (indexed by each
            direction's ``query``), or None (a loss without them: only the training-free keys).
        n_bins: number of equal-count bins.
    """
    out = {}
    for d, log_std in (("i2t", image_log_std), ("t2i", text_log_std)):
        if d not in per_query:
            continue
        q = per_query[d]
        has = q["n_positive"] > 0
        if not has.any():
            continue
        hits = (q["rank"][has] <= 1).double()
        values = {"r@1": hits, "map@r": q["map_at_r"][has]}
        sources = {f"unc/free/{name}/": q[name][has] for name in ("top1", "margin")}
        if log_std is not None:
            sources["unc/"] = sigma_of(log_std).cpu().double()[q["query"]][has]
        for src, u in sources.items():
            curves = metrics.uncertainty_curves(hits, values, u.nan_to_num(nan=math.inf), n_bins)
            out.update({f"{src}{d}_{k}": v for k, v in curves.items()})
    return out


_BIN_KEY = re.compile(r"(?:.*/)?(unc/(?:free/(?:top1|margin)/)?)(i2t|t2i)_bin_(\d+)_(r@1|map@r)")


def plot_uncertainty_bins(results: dict[str, float], path: str | Path, title: str) -> Path:
    """One PNG: R@1 (left) and mAP@R (right) against the uncertainty bin, a line per direction; the model's sigma
    solid, the training-free baselines dashed (top-1 score) and dash-dotted (margin).

    Args:
        results: :func:`benchmark_uncertainty`'s keys, bare or with a ``<benchmark>/`` prefix (one benchmark).
        path: the PNG to write (its folder must exist).
        title: the figure's title (the benchmark's name).

    Returns:
        ``path``.
    """
    plt = pyplot()

    curves: dict[tuple[str, str, str], dict[int, float]] = {}
    for key, value in results.items():
        match = _BIN_KEY.fullmatch(key)
        if match:
            src, d, b, metric = match.groups()
            curves.setdefault((metric, d, src), {})[int(b)] = value
    if not curves:
        raise ValueError(f"plot_uncertainty_bins: no unc/..._bin_<b>_<metric> keys in the results for {title!r}")
    n_bins = 1 + max(b for bins in curves.values() for b in bins)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (metric, label) in zip(axes, (("r@1", "R@1"), ("map@r", "mAP@R"))):
        for k, d in enumerate(DIRECTIONS):
            for src, style in zip(SOURCES, ("-o", "--", "-.")):
                bins = curves.get((metric, d, src))
                if bins:
                    xs = sorted(bins)
                    ax.plot(xs, [bins[b] for b in xs], style, color=f"C{k}", markersize=4,
                            label=f"{d}: {SOURCES[src]}")
        ax.set_xticks(range(n_bins))
        ax.set_xticklabels([f"{b}\nlow" if b == 0 else f"{b}\nhigh" if b == n_bins - 1 else str(b)
                            for b in range(n_bins)])
        ax.set(xlabel="uncertainty bin (equal-count, low -> high)", ylabel=label,
               title=f"{title}: {label} by uncertainty bin")
        if ax.lines:
            ax.legend(fontsize=7)
    return save_figure(fig, Path(path))
