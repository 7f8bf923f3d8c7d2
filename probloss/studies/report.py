"""Turn an experiment's Optuna studies and run folders into report.md with tables and PNG plots; and the shared
statistics of every report (this module and probloss/studies/recipe.py).

    python scripts/report.py runs/compare_losses       # reads runs/sweeps/compare_losses.journal + run folders

Per loss: trials (complete, pruned, failed), best and median accuracy over trials, fraction diverged, the
LR-robust width, and, over the seed re-runs of the best configuration (the ``<study>-best`` study), every
embedding-space and uncertainty metric as mean and 95% interval (Student t), clipped to the metric's range, with
the seeds whose value is missing or non-finite (diverged) counted in the cell, never silently dropped. For a
grid over seeds, the LR-robust width against the loss's own best and against the best of all losses, each with a
bootstrap interval over seeds, the paired width difference against a baseline with its verdict, and the test
zero-shot accuracy at the learning rate chosen on val (``lr_robustness``, ``robustness_lines``), and the
fraction of the best val score kept at 3x and 10x the best learning rate with the same bootstrap
(``lr_retention``, ``retention_lines``; row key ``lr_retention``). Plots:
accuracy vs learning rate, the best trials' loss curves, effective rank over training, and text sigma vs caption
specificity level.

Shared statistics: ``mean_ci`` (mean, 95% Student t interval clipped to a range, non-finite values counted),
``metric_range`` / ``metric_direction`` (which values a metric can take, which way is better), ``verdict`` (the
word a paired-difference interval earns), ``paired_p`` / ``holm`` / ``adjusted_verdict`` (the p-value of the
same paired t, Holm's step-down adjustment, the verdict of a comparison that is not primary) and ``fmt_ci`` (the
table cell).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import optuna

from probloss.files import pyplot, save_figure
from probloss.studies.sweep import storage_for

# two-sided 95% Student t quantiles by degrees of freedom (1..30); 1.96 beyond
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
SEED_METRICS = [  # reported on test; the study selects (best learning rate, best trial) on val
    "test/zeroshot_top1", "test/zeroshot_unseen_top1", "test/i2t_r@1_plausible", "test/t2i_r@1_plausible",
    "test/i2t_map@r", "test/t2i_map@r", "test/relation_probe_acc", "test/binding_probe_acc", "test/control_probe_acc",
    "test/embed/effective_rank", "test/embed/uniformity", "test/embed/alignment", "test/embed/modality_gap",
    "test/unc/specificity_level_coef", "test/unc/specificity_matched_acc", "stability/max_loss_jump",
    "stability/collapsed", "stability/grad_norm_ratio"]
LR_KEY = "trainer.lr"
INF = math.inf

# Where a metric's values can lie, by key (matched at the end of the key after a "/" or the start, so val/, test/
# and evaluation prefixes share a rule; the first match wins). Intervals are clipped to it: a t interval knows
# nothing of bounds and would otherwise claim e.g. an accuracy above 1. Unknown metrics are not clipped.
RANGES = [
    (r"\w*_frac(_image|_text)?|(i2t|t2i)_r@\d+(_strict|_plausible)?(_L\d)?|(i2t|t2i)_(rprecision|map@r)"
     r"|r@1_chance(_L\d)?|zeroshot_(seen_|unseen_)?top\d+|\w+_probe_acc"
     r"|unc/(cue/\w+/)?(specificity_(matched|within_scene\w*)_acc|sigma_text_rank_L\d)"
     r"|unc/(free/\w+/)?(i2t|t2i)_(bin_\d+_(r@1|rprecision)|aurc\w*)|stability/diverged"
     r"|unc/(cue/\w+/|free/\w+/)?planted_auroc(_image)?|(i2t|t2i)_r@1(_plausible)?_(un)?planted", (0.0, 1.0)),
    (r"unc/(cue/\w+/|free/\w+/)?[\w@]*spearman|unc/image_sigma_vs_objects", (-1.0, 1.0)),
    (r"embed/(scored/)?effective_rank(_image|_text)?", (1.0, INF)),
    (r"embed/scored/uniformity(_image|_text)?", (-INF, 0.0)),  # unnormalised: no lower bound
    (r"embed/uniformity(_image|_text)?", (-8.0, 0.0)),  # [-4t, 0] with the evaluator's t = 2
    (r"embed/alignment", (0.0, 4.0)),
    (r"embed/modality_gap", (0.0, 2.0)),
    (r"stability/(loss_spikes|nonfinite_steps|grad_norm_ratio)|data/skipped|steps|\w*participation_ratio\w*"
     r"|unc/(cue/\w+/)?sigma_text_ratio_L0_L3|unc/sigma_\w+_mean|embed/scored/(alignment\w*|modality_gap)|\w+_probe_n"
     r"|unc/specificity_within_scene\w*_n|unc/(cue/\w+/)?specificity_level_se|wall_time_s|eval_test_s|samples_per_s"
     r"|unc/(cue/\w+/|free/\w+/)?planted_auroc(_image)?_se|unc/planted_n(_image)?",
     (0.0, INF)),
    (r"stability/collapsed(_loss|_zeroshot)?|stability/zeroshot_p_above_chance", (0.0, 1.0)),  # eval/stability.py
    (r"stability/(max_loss_jump|grad_norm_init|grad_norm_median)", (0.0, INF)),
]
# Which way is better (same matching). Anything else: higher is better. "Better" for the specificity statistics
# means a stronger effect of the kind the proposal predicts (more negative Spearman, smaller sigma ratio).
LOWER_IS_BETTER = (r"loss|stability/(loss_spikes|grad_norm_ratio|nonfinite_steps|diverged)|data/skipped"
                   r"|stability/(collapsed(_loss|_zeroshot)?|max_loss_jump)"
                   r"|embed/(scored/)?uniformity(_image|_text)?|unc/specificity_(partial_)?spearman"
                   r"|unc/specificity_matched_log_ratio|unc/specificity_level_(coef|t)"
                   r"|unc/(free/\w+/)?(i2t|t2i)_(bin_[\w@]+_spearman|aurc)|wall_time_s|eval_test_s")
# Descriptive metrics: a difference is "higher" or "lower", never "better" or "worse".
NO_DIRECTION = (r"embed/modality_gap|embed/alignment|embed/scored/(alignment\w*|modality_gap)|unc/sigma_\w+_mean"
                r"|unc/sigma_text_image_log_ratio|unc/sigma_text_rank_L\d|unc/image_sigma_vs_objects"
                r"|unc/cue/\w+/[\w@]+|unc/(free/\w+/)?(i2t|t2i)_aurc_(oracle|random)|\w+_probe_n"
                r"|unc/specificity_within_scene\w*_n"
                r"|unc/specificity_level_se|r@1_chance(_L\d)?|zeroshot_n_\w+|steps"
                r"|stability/(grad_norm_init|grad_norm_median|reference_loss|zeroshot_p_above_chance|\w+_step)"
                r"|unc/(free/\w+/)?planted_auroc(_image)?_se|unc/planted_n(_image)?|data/planted_\w+")


def _matches(pattern: str, metric: str) -> bool:
    return re.search(rf"(^|/)(?:{pattern})$", metric) is not None


def metric_range(metric: str | None) -> tuple[float, float]:
    """(low, high) that ``metric`` can take; (-inf, inf) when unknown."""
    for pattern, bounds in RANGES:
        if metric and _matches(pattern, metric):
            return bounds
    return -INF, INF


def diff_range(metric: str | None) -> tuple[float, float]:
    """Where a difference of two values of ``metric`` can lie: [low - high, high - low]."""
    low, high = metric_range(metric)
    return low - high, high - low


def metric_direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 for a metric without a better direction."""
    if _matches(NO_DIRECTION, metric):
        return 0
    return -1 if _matches(LOWER_IS_BETTER, metric) else 1


class CI(NamedTuple):
    """A mean over the finite values with its 95% interval [low, high] (clipped) and unclipped half-width."""
    mean: float
    half: float
    low: float
    high: float
    n: int           # finite values used
    n_nonfinite: int  # values given as nan/inf (diverged seeds, failed pairs): counted, not averaged

    @property
    def clipped(self) -> bool:
        return math.isfinite(self.half) and (self.low > self.mean - self.half or self.high < self.mean + self.half)


def t_975(dof: int) -> float:
    """Two-sided 95% Student t quantile with ``dof`` degrees of freedom (1.96 beyond the table)."""
    return T_975[dof - 1] if dof <= len(T_975) else 1.96


def as_value(value: Any) -> float | None:
    """A metric value as float (nan/inf kept; Optuna user attrs store them as strings), None when absent."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            return float(value)  # "nan", "inf"
        except ValueError:
            return None
    return float(value) if isinstance(value, (int, float)) else None


def mean_ci(values: Sequence[float | None], bounds: tuple[float, float] = (-INF, INF)) -> CI:
    """Mean and 95% Student t interval of the finite values, clipped to ``bounds``.

    ``None`` means "does not apply" and is ignored; nan/inf is a seed that produced no number (a diverged run)
    and is counted in ``n_nonfinite`` so that the caller can show it. Fewer than two finite values: no interval
    (nan half-width, low and high).
    """
    present = [float(v) for v in values if v is not None]
    finite = [v for v in present if math.isfinite(v)]
    n_bad = len(present) - len(finite)
    if not finite:
        return CI(math.nan, math.nan, math.nan, math.nan, 0, n_bad)
    mean = statistics.fmean(finite)
    if len(finite) < 2:
        return CI(mean, math.nan, math.nan, math.nan, 1, n_bad)
    half = t_975(len(finite) - 1) * statistics.stdev(finite) / math.sqrt(len(finite))
    # clip, but never past the mean (a mean outside the bounds means the bounds table is wrong, not the data)
    low = min(max(mean - half, bounds[0]), mean)
    high = max(min(mean + half, bounds[1]), mean)
    return CI(mean, half, low, high, len(finite), n_bad)


def verdict(metric: str, diff: CI) -> str:
    """The word a paired-difference interval earns: better / worse (or higher / lower for a metric without a
    better direction) only when the interval excludes 0; inside noise otherwise; one seed (no data) when fewer
    than two (no) seeds pair."""
    if diff.n == 0:
        return "no data"
    if diff.n < 2:
        return "one seed"
    if diff.low <= 0 <= diff.high:
        return "inside noise"
    up = diff.low > 0
    direction = metric_direction(metric)
    if direction == 0:
        return "higher" if up else "lower"
    return "better" if up == (direction > 0) else "worse"


# --- Multiplicity: p-values of the paired t and Holm's step-down adjustment ---------------------------------------
#
# A recipe's comparisons.json holds many rows (arms x baselines x metrics); at 5% each, about one in twenty rows of
# a recipe where nothing differs would earn better / worse by chance. A recipe declares its few primary comparisons
# before it runs (configs/recipe/<name>.yaml ``primary``): those keep the interval's verdict; every other row is
# judged on its p-value Holm-adjusted over the recipe's other rows (``adjusted_verdict``). scipy is a dev
# dependency only, so the t distribution's tail is computed here (``t_two_sided_p``) and tested against it.

ALPHA = 0.05


def incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b) = B(x; a, b) / B(a, b), for 0 <= x <= 1 and a, b > 0.

    Lentz's continued fraction (Numerical Recipes, betacf), which converges fast for x < (a + 1) / (a + b + 2);
    beyond it the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps it there.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - incomplete_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),              # even step d_{2m}
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step d_{2m+1}
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return math.exp(log_front) * fraction / a


def t_two_sided_p(t: float, dof: int) -> float:
    """P(|T| >= |t|) for Student's T with ``dof`` degrees of freedom: I_{dof / (dof + t^2)}(dof / 2, 1 / 2)."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0
    return min(1.0, incomplete_beta(dof / (dof + t * t), dof / 2.0, 0.5))


def paired_p(diffs: Sequence[float | None]) -> float | None:
    """Two-sided p of the paired Student t test (H0: mean difference 0) over the finite differences, the same t
    as ``mean_ci``'s interval: t = mean / (sd / sqrt(n)), n - 1 dof. None with fewer than two finite values; a
    zero spread gives p = 1 for a zero mean (nothing differs) and p = 0 otherwise (every seed moved alike)."""
    finite = [float(v) for v in diffs if v is not None and math.isfinite(v)]
    if len(finite) < 2:
        return None
    mean, sd = statistics.fmean(finite), statistics.stdev(finite)
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return t_two_sided_p(mean / (sd / math.sqrt(len(finite))), len(finite) - 1)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and does not count towards m).

    With the m present p-values sorted, p_(1) <= ... <= p_(m): adjusted p_(i) = max over j <= i of
    min(1, (m - j + 1) p_(j)). Rejecting where the adjusted p < alpha controls the family-wise error rate at
    alpha under any dependence between the comparisons (Holm 1979).
    """
    order = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def adjusted_verdict(metric: str, diff: CI, p_adjusted: float | None) -> str:
    """``verdict`` of a non-primary comparison: better / worse (higher / lower) only when its interval excludes 0
    and its Holm-adjusted p is below ``ALPHA``; inside noise otherwise."""
    word = verdict(metric, diff)
    if word in ("no data", "one seed") or (p_adjusted is not None and p_adjusted < ALPHA):
        return word
    return "inside noise"


def fmt_ci(ci: CI) -> str:
    """A table cell: ``mean ± half``, ``mean [low, high]`` when clipped, then ``(k of n seeds diverged)``."""
    text = "-" if ci.n == 0 else f"{ci.mean:.3f}"
    if ci.n >= 2:
        text += f" [{ci.low:.3f}, {ci.high:.3f}]" if ci.clipped else f" ± {ci.half:.3f}"
    if ci.n_nonfinite:
        text += f" ({ci.n_nonfinite} of {ci.n + ci.n_nonfinite} seeds diverged)"
    return text


def row_value(row: Mapping[str, Any], metric: str) -> float | None:
    """``metric`` of one run (a results row or a trial's user attrs): a float, nan when the run stopped without
    producing it (diverged: counted, not dropped), None when it does not apply to this run."""
    value = as_value(row.get(metric))
    return math.nan if value is None and run_stopped(row) else value


def run_stopped(row: Mapping[str, Any]) -> bool:
    """Whether a run stopped on a non-finite loss (its summary, or a trial's attrs, carry the error)."""
    return "error" in row or row.get("status") == "stopped"


def lr_robust_width(lrs: Sequence[float], scores: Sequence[float], fraction: float = 0.9) -> float:
    """Width in decades of the widest contiguous learning-rate range whose scores all reach ``fraction`` x best.

    Trials at the same learning rate (seeds of a grid) are averaged first; a diverged trial (score -inf or nan)
    makes its learning rate fail. A run of consecutive good learning rates spans log10(lr_last / lr_first), so
    one good learning rate alone has width 0.
    """
    by_lr = per_lr_mean(lrs, scores)
    return width_above(by_lr, fraction * best_mean(by_lr))


def per_lr_mean(lrs: Sequence[float], scores: Sequence[float]) -> dict[float, float]:
    """{learning rate: mean score} in increasing learning rate; any non-finite score makes the mean -inf."""
    grouped: dict[float, list[float]] = {}
    for lr, score in zip(lrs, scores):
        if lr and lr > 0:
            grouped.setdefault(lr, []).append(score if math.isfinite(score) else -math.inf)
    return {lr: statistics.fmean(grouped[lr]) for lr in sorted(grouped)}


def best_mean(by_lr: Mapping[float, float]) -> float:
    """The highest finite per-learning-rate mean; nan when there is none."""
    finite = [s for s in by_lr.values() if math.isfinite(s)]
    return max(finite) if finite else math.nan


def width_above(by_lr: Mapping[float, float], threshold: float) -> float:
    """Decades spanned by the widest run of consecutive learning rates (increasing) whose mean is finite and
    >= ``threshold``; 0 when none is (or the threshold is nan)."""
    best, start = 0.0, None
    for lr, score in sorted(by_lr.items()):
        if math.isfinite(score) and score >= threshold:
            start = lr if start is None else start
            best = max(best, math.log10(lr / start))
        else:
            start = None
    return best


# --- LR robustness with intervals: seeds resampled jointly -------------------------------------------------------
#
# A score table is {learning rate: {seed: score}} for one loss. Seed s of a grid (configs/sweep/lr_grid.yaml) is
# the same data order and initial weights at every learning rate and for every loss, so a bootstrap resample
# draws seed ids once and uses that draw everywhere: at every learning rate (the width is a function of the
# whole curve, and a seed's luck is shared along it) and for every loss (the shared reference and the paired
# difference see the same seeds). The width is a step function of the means, so its percentile interval is
# coarse; the point estimate is itself a resample (each seed once: probability n!/n^n, 22% for 3 seeds), which
# keeps it inside the interval for up to 5 seeds but not necessarily beyond.

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same studies give the same report
FRACTIONS = (0.9, 0.8)


class Width(NamedTuple):
    """A width (or a difference of widths) in decades: the estimate on all seeds, the bootstrap median and the
    2.5 / 97.5 percentiles of the resampled values; ``n`` distinct seeds."""
    point: float
    median: float
    low: float
    high: float
    n: int


def score_table(lrs: Sequence[float | None], seeds: Sequence[Any], scores: Sequence[float]) -> dict[float, dict[Any, float]]:
    """{learning rate: {seed: score}} from trials; a non-finite score (diverged) is -inf; trials sharing a
    learning rate and seed (a re-queued grid point) are averaged."""
    cells: dict[float, dict[Any, list[float]]] = {}
    for lr, seed, score in zip(lrs, seeds, scores):
        if lr and lr > 0:
            cells.setdefault(lr, {}).setdefault(seed, []).append(score if math.isfinite(score) else -math.inf)
    return {lr: {seed: statistics.fmean(v) for seed, v in cells[lr].items()} for lr in sorted(cells)}


def table_seeds(tables: Mapping[str, Mapping[float, Mapping[Any, float]]]) -> list[Any]:
    """Every seed id in the tables, in a fixed order."""
    return sorted({seed for table in tables.values() for row in table.values() for seed in row}, key=str)


def draw_means(table: Mapping[float, Mapping[Any, float]], draw: Sequence[Any]) -> dict[float, float]:
    """{learning rate: mean over the drawn seeds (repeats count)}: -inf when a drawn seed diverged there or
    when no drawn seed ran there (no evidence that it trains)."""
    means = {}
    for lr, row in table.items():
        values = [row[seed] for seed in draw if seed in row]
        means[lr] = statistics.fmean(values) if values else -math.inf
    return means


def draw_widths(tables: Mapping[str, Mapping[float, Mapping[Any, float]]], draw: Sequence[Any],
                fraction: float) -> dict[str, tuple[float, float]]:
    """{loss: (width against its own best mean, width against the best mean of all losses)} for one draw."""
    means = {loss: draw_means(table, draw) for loss, table in tables.items()}
    own = {loss: best_mean(m) for loss, m in means.items()}
    shared = max((b for b in own.values() if math.isfinite(b)), default=math.nan)
    return {loss: (width_above(m, fraction * own[loss]), width_above(m, fraction * shared)) for loss, m in means.items()}


def seed_draws(seeds: Sequence[Any], resamples: int = BOOTSTRAP_RESAMPLES, rng_seed: int = BOOTSTRAP_SEED) -> list[list[Any]]:
    """``resamples`` draws of len(seeds) seed ids with replacement (numpy's PCG64 seeded by ``rng_seed``)."""
    import numpy as np

    picks = np.random.default_rng(rng_seed).integers(0, len(seeds), size=(resamples, len(seeds)))
    return [[seeds[i] for i in row] for row in picks]


def percentile_width(point: float, samples: Sequence[float], n: int) -> Width:
    """The 2.5 / 97.5 percentiles as values the samples take (lower / higher order statistic), and the median."""
    import numpy as np

    low, high = np.percentile(samples, 2.5, method="lower"), np.percentile(samples, 97.5, method="higher")
    return Width(point, float(np.median(samples)), float(low), float(high), n)


def lr_robustness(tables: Mapping[str, Mapping[float, Mapping[Any, float]]], baseline: str, fraction: float = 0.9,
                  resamples: int = BOOTSTRAP_RESAMPLES, rng_seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, Width]]:
    """Per loss: ``own`` and ``shared`` widths at ``fraction`` and the paired differences ``diff_own`` and
    ``diff_shared`` (loss - baseline), each with its bootstrap over seeds drawn jointly (see above)."""
    seeds = table_seeds(tables)
    if not seeds:
        return {}
    point = draw_widths(tables, seeds, fraction)
    samples = [draw_widths(tables, draw, fraction) for draw in seed_draws(seeds, resamples, rng_seed)]
    out = {}
    for loss in tables:
        out[loss] = {}
        for k, ref in enumerate(("own", "shared")):
            out[loss][ref] = percentile_width(point[loss][k], [s[loss][k] for s in samples], len(seeds))
            out[loss]["diff_" + ref] = percentile_width(point[loss][k] - point[baseline][k],
                                                        [s[loss][k] - s[baseline][k] for s in samples], len(seeds))
    return out


# --- LR retention: how much of its best score a loss keeps at a multiple of its best learning rate ---------------
#
# The width above is a step function of a few grid points; retention is a number per multiple. For one loss:
# lr* = the grid learning rate with the best mean val score over seeds (selection on val, as everywhere; a
# learning rate where a seed diverged cannot be lr*), and for m in RETENTION_MULTIPLES the retained fraction
#     R_m = mean over seeds of score(m lr*) / mean over seeds of score(lr*)
# where score(m lr*) is the grid point when m lr* is one (relative tolerance 1e-6) and otherwise linear
# interpolation in log10(lr) between the two grid points around it (the half-decade grid 1e-4, 3e-4, 1e-3, ...
# has 3 lr* on it only from 1e-3, 1e-2, ...: 3 x 3e-4 lies 0.05 decades below 1e-3); beyond the grid: not
# measured (None). A seed that diverged at a learning rate scores 0 there (it retained nothing; scores are
# non-negative accuracies, as for the width). Interval: the 2.5 / 97.5 percentiles of the same joint seed
# bootstrap as the widths (seed ids drawn once per resample for every learning rate; lr* re-selected in each
# resample, so the selection's own noise is inside the interval). Fewer than MIN_RETENTION_SEEDS seeds: the cell
# says so (the bootstrap of 3 seeds knows 10 distinct resamples).

RETENTION_MULTIPLES = (3, 10)
MIN_RETENTION_SEEDS = 5


def curve_at(by_lr: Mapping[float, float], lr: float) -> float | None:
    """A per-learning-rate curve at ``lr``: the grid point (relative tolerance 1e-6), else linear in log10(lr)
    between its two neighbours; None outside the grid or where a neighbour is not finite."""
    grid = sorted(by_lr)
    for point in grid:
        if math.isclose(point, lr, rel_tol=1e-6):
            return by_lr[point]
    below, above = [g for g in grid if g < lr], [g for g in grid if g > lr]
    if not below or not above:
        return None
    lo, hi = below[-1], above[0]
    if not (math.isfinite(by_lr[lo]) and math.isfinite(by_lr[hi])):
        return None
    w = math.log10(lr / lo) / math.log10(hi / lo)
    return (1 - w) * by_lr[lo] + w * by_lr[hi]


def retention_at(table: Mapping[float, Mapping[Any, float]], draw: Sequence[Any], multiple: float) -> float | None:
    """R_multiple for one loss on the drawn seeds (see above); None when not measured (beyond the grid, no
    finite best)."""
    selection = draw_means(table, draw)  # a diverged seed fails its learning rate
    best = best_mean(selection)
    if not math.isfinite(best) or best <= 0:
        return None
    lr_best = next(lr for lr, mean in selection.items() if mean == best)
    floored = {}  # diverged seeds score 0: what the curve retains
    for lr, row in table.items():
        values = [row[seed] if math.isfinite(row[seed]) else 0.0 for seed in draw if seed in row]
        floored[lr] = statistics.fmean(values) if values else math.nan
    value = curve_at(floored, multiple * lr_best)
    return None if value is None else value / best


def lr_retention(table: Mapping[float, Mapping[Any, float]], seeds: Sequence[Any] | None = None,
                 multiples: Sequence[float] = RETENTION_MULTIPLES, resamples: int = BOOTSTRAP_RESAMPLES,
                 rng_seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, Any]]:
    """{"x3": {...}, "x10": {...}} for one loss's score table: ``point`` (all seeds), ``median``, ``low``,
    ``high`` (bootstrap percentiles over the resamples where it is measured), ``n`` seeds, ``best_lr``, ``lr``
    (multiple x best_lr), ``interpolated`` (not a grid point), ``few_seeds`` (n < MIN_RETENTION_SEEDS).
    Plain values (the report rows are JSON). ``seeds``: the seed ids to resample (default: the table's)."""
    import numpy as np

    seeds = list(seeds) if seeds is not None else table_seeds({"_": table})
    out: dict[str, dict[str, Any]] = {}
    if not seeds:
        return out
    selection = draw_means(table, seeds)
    best = best_mean(selection)
    lr_best = next((lr for lr, mean in selection.items() if mean == best), None) if math.isfinite(best) else None
    draws = seed_draws(seeds, resamples, rng_seed)
    for m in multiples:
        point = retention_at(table, seeds, m)
        samples = [r for r in (retention_at(table, draw, m) for draw in draws) if r is not None]
        low = high = median = math.nan
        if samples and point is not None:
            low = float(np.percentile(samples, 2.5, method="lower"))
            high = float(np.percentile(samples, 97.5, method="higher"))
            median = float(np.median(samples))
        target = None if lr_best is None else m * lr_best
        out[f"x{m:g}"] = {
            "point": math.nan if point is None else point, "median": median, "low": low, "high": high,
            "n": len(seeds), "best_lr": lr_best, "lr": target,
            "interpolated": target is not None and not any(math.isclose(g, target, rel_tol=1e-6) for g in table),
            "few_seeds": len(seeds) < MIN_RETENTION_SEEDS}
    return out


def add_lr_retention(rows: Mapping[str, dict[str, Any]]) -> None:
    """Add ``lr_retention`` (:func:`lr_retention`) to every row with a score table; the seeds resampled are
    those of all rows together (the same draws as the widths)."""
    tables = {loss: row["lr_seed_scores"] for loss, row in rows.items() if row.get("lr_seed_scores")}
    seeds = table_seeds(tables)
    for loss, table in tables.items():
        rows[loss]["lr_retention"] = lr_retention(table, seeds)


def fmt_retention(cell: Mapping[str, Any] | None) -> str:
    """``point [low, high]`` of a retained fraction, with its learning rate; ``(n seeds < 5)`` when few."""
    if not cell or not math.isfinite(cell["point"]):
        return "- (beyond the grid)" if cell and cell["lr"] is not None else "-"
    where = f" at {cell['lr']:.3g}{' (interp.)' if cell['interpolated'] else ''}"
    if cell["n"] < 2:
        return f"{cell['point']:.2f}{where} (one seed)"
    text = f"{cell['point']:.2f} [{cell['low']:.2f}, {cell['high']:.2f}]{where}"
    return text + (f" ({cell['n']} seeds < {MIN_RETENTION_SEEDS})" if cell["few_seeds"] else "")


RETENTION_NOTE = ("LR retention: the fraction of its best mean val score (at its best learning rate on val, lr*) a "
                  "loss keeps at 3 x and 10 x lr*, the grid point there or linear in log10(lr) between the two around "
                  "it (interp.); a seed that diverged scores 0. Cells: fraction on all seeds [2.5, 97.5 percentiles "
                  "of {n} bootstrap resamples of the seed ids, drawn jointly over learning rates, lr* re-selected in "
                  "each]; fewer than {k} seeds are labelled.")


def retention_lines(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The LR-retention table of the sweep report (empty without score tables)."""
    have = {loss: row["lr_retention"] for loss, row in rows.items() if row.get("lr_retention")}
    if not have:
        return []
    keys = [f"x{m:g}" for m in RETENTION_MULTIPLES]
    lines = ["", RETENTION_NOTE.format(n=BOOTSTRAP_RESAMPLES, k=MIN_RETENTION_SEEDS), "",
             "| loss | seeds | best lr (val) | " + " | ".join(f"retained at {k[1:]} x best lr" for k in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for loss, cells in have.items():
        first = cells[keys[0]]
        best = "-" if first["best_lr"] is None else format(first["best_lr"], "g")
        cells_text = " | ".join(fmt_retention(cells.get(k)) for k in keys)
        lines.append(f"| {loss} | {first['n']} | {best} | {cells_text} |")
    return lines


def width_ci(width: Width) -> CI:
    """A difference of widths as the CI that ``verdict`` reads (the bootstrap percentiles as its interval)."""
    return CI(width.point, math.nan, width.low, width.high, width.n, 0)


def fmt_width(width: Width | None) -> str:
    """A table cell: ``point [low, high]`` in decades; ``point (one seed)`` without an interval."""
    if width is None or not math.isfinite(width.point):
        return "-"
    if width.n < 2:
        return f"{width.point:.2f} (one seed)"
    return f"{width.point:.2f} [{width.low:.2f}, {width.high:.2f}]"


def _studies(storage, experiment: str) -> dict[str, tuple[optuna.Study, optuna.Study | None]]:
    """{loss: (search study, seed re-run study or None)} for the experiment's studies in ``storage``."""
    names = optuna.get_all_study_names(storage)
    found = {}
    for name in names:
        if not name.startswith(experiment + "-") or name.endswith("-best"):
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        loss = name[len(experiment) + 1:]
        rerun = optuna.load_study(study_name=name + "-best", storage=storage) if name + "-best" in names else None
        found[loss] = (study, rerun)
    return found


def _first_value(trial) -> float:
    if trial.values is None:
        return math.nan
    return trial.values[0]


def _scalars(run_dir: str | None, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard tag in a run folder (empty when missing)."""
    if not run_dir or not Path(run_dir).is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def summarise(studies: Mapping[str, tuple[optuna.Study, optuna.Study | None]]) -> dict[str, dict[str, Any]]:
    """The numbers of the report, per loss."""
    rows = {}
    for loss, (study, rerun) in studies.items():
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        scores = [_first_value(t) for t in complete]
        finite = [s for s in scores if math.isfinite(s)]
        diverged = [t for t in trials if t.user_attrs.get("stability/diverged")]
        lrs = [t.params.get(LR_KEY) for t in complete]
        row: dict[str, Any] = {
            "objective": study.user_attrs.get("objective", "first objective"),
            "complete": len(complete),
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
            "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
            "best": max(finite) if finite else math.nan,
            "median": statistics.median(finite) if finite else math.nan,
            "diverged_fraction": len(diverged) / len(trials) if trials else math.nan,
            "lr_robust_width": lr_robust_width(lrs, scores) if any(lrs) else math.nan,
            "lr_robust_width_80": lr_robust_width(lrs, scores, fraction=0.8) if any(lrs) else math.nan,
            "best_params": dict(max(complete, key=_first_value).params) if finite else {},
            "best_run_dir": max(complete, key=_first_value).user_attrs.get("run_dir") if finite else None,
            "trials": [(t.params.get(LR_KEY), _first_value(t), bool(t.user_attrs.get("stability/diverged")))
                       for t in trials if t.state == optuna.trial.TrialState.COMPLETE],
        }
        seeds = [t for t in (rerun.get_trials(deepcopy=False) if rerun else []) if t.state == optuna.trial.TrialState.COMPLETE]
        by_lr = row["per_lr_mean"] = per_lr_mean(lrs, scores)
        row["lr_seed_scores"] = score_table(lrs, [_seed(t) for t in complete], scores)
        row.update(best_lr_cells(complete, by_lr))
        if not seeds and finite and len(by_lr) < len(complete):  # a grid over seeds: the best learning rate's seeds
            best_lr = max(by_lr, key=by_lr.get)
            seeds = [t for t in complete if t.params.get(LR_KEY) == best_lr]
        row["seeds"] = len(seeds)
        row["seed_run_dirs"] = [t.user_attrs.get("run_dir") for t in seeds]
        source = seeds or ([max(complete, key=_first_value)] if finite else [])
        for metric in SEED_METRICS + sorted({k for t in source for k in t.user_attrs if re.match(r"test/unc/sigma_text_rank_L\d", k)}):
            row[metric] = mean_ci([row_value(t.user_attrs, metric) for t in source], metric_range(metric))
        rows[loss] = row
    add_lr_robustness(rows)
    add_lr_retention(rows)
    return rows


def _seed(trial) -> Any:
    """A trial's seed: the grid's ``seed`` parameter, a re-run's attribute, or None (the config's one seed)."""
    return trial.params.get("seed", trial.user_attrs.get("seed"))


def best_lr_cells(complete: Sequence, by_lr: Mapping[float, float], metric: str = "test/zeroshot_top1") -> dict[str, Any]:
    """The learning rate with the best mean objective (val: selection) and, over its seeds, the objective and
    ``metric`` (test: reported) as mean and 95% interval; diverged seeds counted, a missing key (older studies)
    gives no value."""
    best = best_mean(by_lr)
    if not math.isfinite(best):
        return {"best_lr": None, "best_lr_val": mean_ci([]), "best_lr_test": mean_ci([])}
    lr = next(lr for lr, mean in by_lr.items() if mean == best)
    seeds = [t for t in complete if t.params.get(LR_KEY) == lr]
    return {"best_lr": lr, "best_lr_val": mean_ci([_first_value(t) for t in seeds]),
            "best_lr_test": mean_ci([row_value(t.user_attrs, metric) for t in seeds], metric_range(metric))}


def add_lr_robustness(rows: Mapping[str, dict[str, Any]], baseline: str | None = None) -> str | None:
    """Add ``width_<pct>`` (own, shared, diff_own, diff_shared: ``Width``) to every row with learning rates;
    returns the baseline of the differences (infonce when present, else the first loss)."""
    tables = {loss: row["lr_seed_scores"] for loss, row in rows.items() if row.get("lr_seed_scores")}
    if not tables:
        return None
    baseline = baseline or ("infonce" if "infonce" in tables else next(iter(tables)))
    for fraction in FRACTIONS:
        for loss, widths in lr_robustness(tables, baseline, fraction).items():
            rows[loss][f"width_{round(fraction * 100)}"] = widths
    for row in rows.values():
        row["width_baseline"] = baseline
    return baseline


def lr_table(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Mean objective per learning rate and loss, for studies that repeat learning rates (a grid over seeds)."""
    means = {loss: row["per_lr_mean"] for loss, row in rows.items()}
    if not any(len(m) < len(rows[loss]["trials"]) for loss, m in means.items()):
        return []
    lrs = sorted({lr for m in means.values() for lr in m})
    lines = ["", "Mean objective per learning rate (over seeds; - : diverged or not run):", "",
             "| learning rate | " + " | ".join(means) + " |", "|---|" + "---|" * len(means)]
    for lr in lrs:
        lines.append(f"| {lr:g} | " + " | ".join(_fmt(m.get(lr, math.nan)) for m in means.values()) + " |")
    return lines


WIDTH_NOTE = ("LR robustness. Selection on val: the study's objective is averaged over seeds at each learning rate "
              "(a seed that diverged there makes the learning rate fail); the width is the span in decades of the "
              "widest run of consecutive grid learning rates whose means all reach 90% (80%) of a reference: the "
              "loss's own best mean (own), or the best mean of any loss in this report (shared). Cells: width on all "
              "seeds [2.5, 97.5 percentiles of {n} bootstrap resamples, RNG seed {seed}]: the seed ids are drawn with "
              "replacement once per resample and used at every learning rate and for every loss (seed s is the same "
              "data order and initial weights everywhere), so the shared reference and the differences are resampled "
              "with them. With few seeds the bootstrap knows few distinct resamples (10 for 3 seeds) and its interval "
              "is narrower than the truth. Best lr: the learning rate with the best mean on val; val and test at it: "
              "mean ± 95% interval (Student t) over its seeds; - : not recorded (older studies).")
DIFF_WIDTH_NOTE = ("Paired difference of widths (loss - {base}, the same resampled seeds for both), point [2.5, 97.5 "
                   "percentiles]; verdict: better / worse only when the interval excludes 0 (wider is better), inside "
                   "noise when it holds 0, one seed with a single seed.")


def robustness_lines(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The LR-robustness table and the paired width comparison against the baseline (empty without widths)."""
    have = {loss: row for loss, row in rows.items() if "width_90" in row}
    if not have:
        return []
    base = next(iter(have.values()))["width_baseline"]
    lines = ["", WIDTH_NOTE.format(n=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED), "",
             "| loss | seeds | width 90%, own best | width 90%, shared best | width 80%, own best | width 80%, shared best "
             "| best lr (val) | val at best lr | test/zeroshot_top1 at best lr |", "|---|" + "---|" * 8]
    for loss, row in have.items():
        w90, w80 = row["width_90"], row["width_80"]
        lines.append(f"| {loss} | {w90['own'].n} | {fmt_width(w90['own'])} | {fmt_width(w90['shared'])} | "
                     f"{fmt_width(w80['own'])} | {fmt_width(w80['shared'])} | {'-' if row['best_lr'] is None else format(row['best_lr'], 'g')} | "
                     f"{_fmt(row['best_lr_val'])} | {_fmt(row['best_lr_test'])} |")
    lines += ["", DIFF_WIDTH_NOTE.format(base=base), "",
              f"| loss - {base} | width 90%, own best | verdict | width 90%, shared best | verdict |", "|---|---|---|---|---|"]
    for loss, row in have.items():
        if loss != base:
            own, shared = row["width_90"]["diff_own"], row["width_90"]["diff_shared"]
            lines.append(f"| {loss} | {fmt_width(own)} | {width_verdict(own)} | {fmt_width(shared)} | {width_verdict(shared)} |")
    return lines


def width_verdict(diff: Width) -> str:
    """``verdict`` of a paired width difference (wider is better)."""
    return verdict("lr_robust_width", width_ci(diff))


def _fmt(value: Any) -> str:
    if isinstance(value, CI):
        return fmt_ci(value)
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def plot(rows: Mapping[str, Mapping[str, Any]], out_dir: Path) -> list[Path]:
    plt = pyplot()

    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (loss, row) in enumerate(rows.items()):
        points = [(lr, s) for lr, s, _ in row["trials"] if lr and math.isfinite(s)]
        bad = [lr for lr, s, d in row["trials"] if lr and (d or not math.isfinite(s))]
        if points:  # every trial as a dot, the mean per learning rate (over seeds) as the line
            ax.plot(*zip(*points), "o", color=f"C{k}", alpha=0.35, markersize=4)
            means = per_lr_mean(*zip(*points))
            ax.plot(list(means), list(means.values()), "-", color=f"C{k}", label=loss)
        if bad:
            ax.plot(bad, [0.0] * len(bad), "x", color="red")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="objective (val)", title="Accuracy vs learning rate (x: diverged)")
    ax.legend()
    paths.append(save_figure(fig, out_dir / "accuracy_vs_lr.png"))

    for tag, name, title in (("train/loss", "loss_curves.png", "Training loss of the best trial"),
                             ("embed/effective_rank", "effective_rank.png", "Effective rank over training")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for loss, row in rows.items():
            for k, run_dir in enumerate(row["seed_run_dirs"] or [row["best_run_dir"]]):
                curve = _scalars(run_dir, tag)
                if curve:
                    ax.plot(*zip(*curve), label=loss if k == 0 else None, color=f"C{list(rows).index(loss)}", alpha=0.7)
        ax.set(xlabel="step", ylabel=tag, title=title)
        if ax.lines:
            ax.legend()
        paths.append(save_figure(fig, out_dir / name))

    fig, ax = plt.subplots(figsize=(6, 4))
    for loss, row in rows.items():
        levels = sorted(int(k[-1]) for k in row if re.fullmatch(r"test/unc/sigma_text_rank_L\d", k))
        means = [row[f"test/unc/sigma_text_rank_L{level}"] for level in levels]
        if means and all(math.isfinite(ci.mean) for ci in means):
            ax.errorbar(levels, [ci.mean for ci in means], yerr=error_bars(means), marker="o", capsize=3, label=loss)
    ax.set(xlabel="caption specificity level (L0 vague .. L3 specific)", ylabel="text sigma: mean rank within the model",
           title="Predicted sigma vs caption specificity")
    if ax.lines:
        ax.legend()
    paths.append(save_figure(fig, out_dir / "sigma_vs_specificity.png"))
    return paths


def error_bars(cis: Sequence[CI]) -> list[list[float]]:
    """matplotlib's asymmetric ``yerr`` of clipped intervals (0 where there is none)."""
    below = [ci.mean - ci.low if math.isfinite(ci.low) else 0.0 for ci in cis]
    above = [ci.high - ci.mean if math.isfinite(ci.high) else 0.0 for ci in cis]
    return [below, above]


def sweep_studies(experiment_dir: str | Path, storage=None) -> dict[str, tuple]:
    """The studies ``<experiment>-<loss>`` of a sweep folder: from ``storage`` (URL or journal path), by default
    the journal ``<out_dir>/sweeps/<experiment>.journal`` next to the folder."""
    experiment_dir = Path(experiment_dir)
    experiment = experiment_dir.name
    journal = experiment_dir.parent / "sweeps" / f"{experiment}.journal"
    if storage is None:
        if not journal.is_file():
            raise FileNotFoundError(f"no study storage for {experiment!r}: {journal} does not exist; pass the "
                                    "storage URL used for the sweep (--storage)")
        storage = storage_for(str(journal), experiment_dir.parent, experiment)
    elif isinstance(storage, str):
        storage = storage_for(storage, experiment_dir.parent, experiment)
    studies = _studies(storage, experiment)
    if not studies:
        raise FileNotFoundError(f"no studies named {experiment}-<loss> in the storage")
    return studies


def report_lines(experiment: str, rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The sweep report's markdown (title, tables, LR robustness, best configurations), without plots."""
    lines = [f"# {experiment}: loss comparison", "",
             "Search: best and median of the first objective over complete trials, the fraction of trials that "
             "diverged, and the LR-robust width (decades of the widest learning-rate range whose trials, averaged "
             "over seeds at one learning rate, all reach >= 90% (>= 80%) of the best such mean). Seeds: the best "
             "configuration re-run per seed, or for a grid over seeds the seeds of the learning rate with the best "
             "mean; mean ± 95% interval (Student t), or mean [low, high] where the interval is clipped to the "
             "metric's range; seeds without a finite value are counted in the cell (k of n seeds diverged), not "
             "averaged; without either, the best trial alone.", "",
             "| loss | trials (complete/pruned/failed) | best | median | diverged | LR-robust width, decades (90% / 80%) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for loss, row in rows.items():
        lines.append(f"| {loss} | {row['complete']}/{row['pruned']}/{row['failed']} | {_fmt(row['best'])} | "
                     f"{_fmt(row['median'])} | {row['diverged_fraction']:.0%} | {_fmt(row['lr_robust_width'])} / {_fmt(row['lr_robust_width_80'])} | "
                     f"{row['seeds']} |")
    metrics = [m for m in SEED_METRICS if any(r[m].n + r[m].n_nonfinite for r in rows.values())]
    lines += ["", "| loss | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for loss, row in rows.items():
        lines.append(f"| {loss} | " + " | ".join(_fmt(row[m]) for m in metrics) + " |")
    lines += lr_table(rows)
    lines += robustness_lines(rows)
    lines += retention_lines(rows)
    lines += ["", "Best configurations:", ""]
    lines += [f"- {loss}: `{row['best_params']}`" for loss, row in rows.items()]
    return lines


# --- a sweep's per-trial table: what a study's report needs, small enough to commit ------------------------------

TRIAL_TABLE = "trials.json"
TRIAL_KEYS = (*SEED_METRICS, "val/zeroshot_top1", "stability/diverged", "seed", "steps", "error")


def trial_table(studies: Mapping[str, tuple[optuna.Study, optuna.Study | None]]) -> dict[str, Any]:
    """The per-trial table of a sweep's studies ({loss: (search, seed re-run or None)}): per loss its directions,
    study attributes and, per trial, its number, state, parameters (with their distributions), objective values
    and the ``TRIAL_KEYS`` of its metrics. :func:`studies_from_table` rebuilds studies that :func:`summarise`
    reads as it reads the storage (a journal holds every metric of every trial, megabytes for a grid)."""
    def trials(study):
        return [{"number": t.number, "state": t.state.name, "params": t.params,
                 "distributions": {k: optuna.distributions.distribution_to_json(d) for k, d in t.distributions.items()},
                 "values": t.values, "user_attrs": {k: t.user_attrs[k] for k in TRIAL_KEYS if k in t.user_attrs}}
                for t in study.get_trials(deepcopy=False)]

    return {loss: {"directions": [d.name for d in study.directions], "user_attrs": dict(study.user_attrs),
                   "trials": trials(study), "rerun": trials(rerun) if rerun is not None else None}
            for loss, (study, rerun) in studies.items()}


def studies_from_table(table: Mapping[str, Any]) -> dict[str, tuple[optuna.Study, optuna.Study | None]]:
    """In-memory studies holding a :func:`trial_table`'s trials (the inverse of it, for the keys it keeps)."""
    def study_of(spec, rows):
        study = optuna.create_study(storage=optuna.storages.InMemoryStorage(),
                                    directions=[d.lower() for d in spec["directions"]])
        for key, value in spec["user_attrs"].items():
            study.set_user_attr(key, value)
        for row in rows:
            state = optuna.trial.TrialState[row["state"]]
            study.add_trial(optuna.trial.create_trial(
                state=state, params=row["params"], user_attrs=row["user_attrs"],
                distributions={k: optuna.distributions.json_to_distribution(d) for k, d in row["distributions"].items()},
                values=row["values"] if state == optuna.trial.TrialState.COMPLETE else None))
        return study

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per rebuilt study
    try:
        return {loss: (study_of(spec, spec["trials"]),
                       study_of(spec, spec["rerun"]) if spec["rerun"] is not None else None)
                for loss, spec in table.items()}
    finally:
        optuna.logging.set_verbosity(verbosity)


def read_sweep(source: str | Path) -> dict[str, tuple[optuna.Study, optuna.Study | None]]:
    """The studies of a finished sweep from its per-trial table (``trials.json``, or a folder holding one) or its
    Optuna journal (``<out_dir>/sweeps/<sweep>.journal``)."""
    path = Path(source)
    if path.is_dir():
        path = path / TRIAL_TABLE
    if path.suffix == ".journal" and path.is_file():
        return sweep_studies(path.with_suffix(""), storage=str(path))
    if not path.is_file():
        raise FileNotFoundError(f"{source} is neither a sweep's {TRIAL_TABLE} (python scripts/report.py "
                                "<out_dir>/<sweep> writes it) nor a sweep journal (<out_dir>/sweeps/<sweep>.journal)")
    return studies_from_table(json.loads(path.read_text()))


def write_report(experiment_dir: str | Path, storage=None) -> Path:
    """Write ``<experiment_dir>/report.md``, its PNGs and the per-trial table ``trials.json``; returns the report's
    path."""
    experiment_dir = Path(experiment_dir)
    studies = sweep_studies(experiment_dir, storage)
    rows = summarise(studies)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    (experiment_dir / TRIAL_TABLE).write_text(json.dumps(trial_table(studies), indent=1) + "\n")
    plots = plot(rows, experiment_dir)
    lines = report_lines(experiment_dir.name, rows) + [""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = experiment_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- one run's instruments beside their trivial cues ------------------------------------------------------------

CUES = ("words", "frequency", "objects", "token")  # probloss/eval/dual_encoder.py: unc/cue/<c>/<stat>
SPECIFICITY_STATS = ("specificity_level_coef", "specificity_level_t", "specificity_within_scene_acc",
                     "specificity_within_scene_same_words_acc", "specificity_matched_acc",
                     "specificity_matched_log_ratio", "specificity_spearman", "specificity_partial_spearman",
                     "sigma_text_ratio_L0_L3", "sigma_vs_images_fit_spearman", "sigma_vs_images_fit_partial_spearman")
UNCERTAINTY_STATS = ("aurc", "aurc_oracle", "aurc_random", "bin_r@1_spearman", "bin_rprecision_spearman")
RUN_KEYS = ("{p}/zeroshot_top1", "{p}/zeroshot_unseen_top1", "{p}/i2t_r@1_plausible", "{p}/t2i_r@1_plausible",
            "{p}/i2t_map@r", "{p}/t2i_map@r", "{p}/i2t_r@1", "{p}/t2i_r@1", "{p}/binding_probe_acc",
            "{p}/binding_probe_n", "{p}/embed/effective_rank", "{p}/embed/uniformity", "{p}/embed/modality_gap",
            "{p}/embed/scored/effective_rank", "{p}/embed/scored/alignment_ratio", "stability/collapsed",
            "stability/diverged", "stability/max_loss_jump", "stability/loss_spikes", "stability/grad_norm_init",
            "stability/reference_loss", "val/loss")


def instrument_tables(summaries: Mapping[str, Mapping[str, Any]], prefix: str = "test") -> str:
    """Markdown tables of the instruments of several runs (``{label: summary.json}``), each statistic beside what
    the trivial cues and the training-free baselines score on it.

    Cue values depend on the data only, so they are shown once, from the first run that has them (a note names
    any run whose cue values differ, i.e. another data draw). Keys a run lacks print as "-".
    """
    runs = list(summaries)
    unc = f"{prefix}/unc/"

    def cell(summary: Mapping[str, Any], key: str) -> str:
        value = summary.get(key)
        if isinstance(value, bool):
            return str(value).lower()
        return _fmt(as_value(value) if value is not None else float("nan"))

    lines = ["Accuracy, retrieval (plausible first, exact strings after), geometry (common view, then the loss's own) "
             "and stability:", "", "| key | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for key in (k.format(p=prefix) for k in RUN_KEYS):
        lines.append(f"| {key} | " + " | ".join(cell(summaries[r], key) for r in runs) + " |")
    lines += ["", f"Specificity of the text sigma (`{unc}<stat>`), beside each cue used as sigma (`{unc}cue/<c>/<stat>`; "
              "a cue that is itself a covariate of the level regression scores 0 there by construction):",
             "", "| stat | " + " | ".join(runs) + " | " + " | ".join(f"cue: {c}" for c in CUES) + " |",
             "|---|" + "---|" * (len(runs) + len(CUES))]
    differing = set()
    for stat in SPECIFICITY_STATS:
        cues = []
        for c in CUES:
            key = f"{unc}cue/{c}/{stat}"
            values = [s[key] for s in summaries.values() if s.get(key) is not None]
            differing |= {r for r, s in summaries.items() if s.get(key) is not None and values
                          and not math.isclose(s[key], values[0], rel_tol=1e-9, abs_tol=1e-12)}
            cues.append(_fmt(float(values[0])) if values else "-")
        lines.append(f"| {stat} | " + " | ".join(cell(summaries[r], f"{unc}{stat}") for r in runs) + " | "
                     + " | ".join(cues) + " |")
    if differing:
        lines += ["", f"Cue values differ in {sorted(differing)} (another data draw): the cue columns are the first run's."]
    lines += ["", f"Uncertainty against plausible retrieval (`{unc}<d>_<stat>`; rows: sigma, then the training-free "
              f"baselines `{unc}free/top1/...` and `{unc}free/margin/...`):", "",
              "| direction, u | stat | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for d in ("i2t", "t2i"):
        for source, label in (("", "sigma"), ("free/top1/", "top-1 score"), ("free/margin/", "top-1 margin")):
            for stat in UNCERTAINTY_STATS:
                lines.append(f"| {d}, {label} | {stat} | "
                             + " | ".join(cell(summaries[r], f"{unc}{source}{d}_{stat}") for r in runs) + " |")
    return "\n".join(lines) + "\n"
