"""Every number of the study reports: plain numbers (or a sweep's in-memory Optuna studies) in, numbers out; no
markdown, no plots, no file reading (probloss/studies/render.py prints them, probloss/studies/readers.py reads
the studies they come from).

- Intervals: ``mean_ci`` (mean and 95% Student t interval of the finite values, clipped to a range, non-finite
  values counted), ``t_975`` (the t table), ``metric_range`` / ``diff_range`` / ``metric_direction`` (which values
  a metric can take, which way is better).
- Tests and corrections: ``verdict`` (the word a paired-difference interval earns), ``paired_p`` /
  ``t_two_sided_p`` (the p of the same paired t), ``holm`` and ``adjusted_verdict`` (the verdict of a comparison
  that is not primary), ``p_from_interval`` (the p of a printed interval).
- A recipe's paired comparisons: ``aggregate`` (arms x metrics over seeds) and ``paired_comparisons`` (the rows of
  comparisons.json), ``multiplicity_counts``.
- A sweep's numbers (``summarise``): per loss the search's best and median, the LR-robust width with its bootstrap
  interval over seeds (``lr_robustness``), the retained fraction at 3x and 10x the best learning rate
  (``lr_retention``), and every seed metric as ``mean_ci``.
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import optuna


# two-sided 95% Student t quantiles by degrees of freedom (1..30); 1.96 beyond
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
INF = math.inf


# --- Intervals and verdicts: what a metric can take, mean and 95% interval, the word it earns --------------------

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


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool): a number a results row can hold."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


def p_from_interval(mean: float, low: float, high: float, n: int) -> float:
    """Two-sided p of the paired t behind a printed mean and 95% interval [low, high] over ``n`` seeds.

    The unclipped half-width is h = t_975(n - 1) * sd / sqrt(n), so t = mean / (h / t_975(n - 1)) with n - 1 dof.
    Clipping to the metric's range cuts one side and never past the mean, so h is the larger of mean - low and
    high - mean ((high - low) / 2 equals it for an unclipped interval, and understates it for a clipped one). A
    zero-width interval gives p = 1 for a zero mean, else 0. Printed values are rounded, so the p is approximate.
    """
    half = max(mean - low, high - mean)
    dof = n - 1
    return (1.0 if mean == 0 else 0.0) if half <= 0 else t_two_sided_p(mean * t_975(dof) / half, dof)

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


# --- A recipe's paired comparisons: arms x metrics over seeds, the rows of comparisons.json ----------------------

def row_value(row: Mapping[str, Any], metric: str) -> float | None:
    """``metric`` of one run (a results row or a trial's user attrs): a float, nan when the run stopped without
    producing it (diverged: counted, not dropped), None when it does not apply to this run."""
    value = as_value(row.get(metric))
    return math.nan if value is None and run_stopped(row) else value


def run_stopped(row: Mapping[str, Any]) -> bool:
    """Whether a run stopped on a non-finite loss (its summary, or a trial's attrs, carry the error)."""
    return "error" in row or row.get("status") == "stopped"


def aggregate(results: Sequence[Mapping[str, Any]], arms: Sequence[str], metrics: Sequence[str]):
    """{arm: {metric: CI}} over seeds; a seed that diverged counts in ``n_nonfinite``."""
    return {arm: {m: mean_ci([row_value(r, m) for r in results if r["arm"] == arm], metric_range(m))
                  for m in metrics} for arm in arms}


def paired_comparisons(results: Sequence[Mapping[str, Any]], pairs: Sequence[tuple[str, str]],
                       fixed: Sequence[tuple[str, str, str, float]], declared: set[tuple[str, str, str]],
                       metrics: Sequence[str]) -> list[dict]:
    """The rows of a recipe's comparisons.json: per compared (arm, baseline) of ``pairs`` and metric, the paired
    difference against the baseline; then per (arm, baseline label, metric, value) of ``fixed`` the difference
    against that value (a one-sample t of arm - value).

    Per seed d = arm - baseline (the same seed: same data order and shared initial weights, so the seed's own
    luck cancels); mean and paired Student t interval (n - 1 dof) over the seeds finite in both arms, clipped to
    the metric's possible differences. A seed where either side is missing or non-finite is left out and
    counted in ``n_dropped``; a seed where the metric applies to neither arm is not a seed of this metric.

    Multiplicity: ``p`` is the two-sided p of the same paired t (None below two seeds); ``primary`` marks the
    ``declared`` comparisons (arm, baseline, metric), whose ``p_adjusted`` is their ``p`` and whose verdict is the
    interval's; every other row's ``p_adjusted`` is Holm's over all non-primary rows with a p, and its verdict
    says better / worse only when that is below 0.05 (``adjusted_verdict``).
    """
    by_run = {(r["arm"], r["seed"]): r for r in results}
    rows, diffs_of = [], []
    for arm, base in pairs:
        seeds = sorted({seed for a, seed in by_run if a in (arm, base)}, key=str)
        for metric in metrics:
            diffs = []
            for seed in seeds:
                a, b = (row_value(by_run[(x, seed)], metric) if (x, seed) in by_run else None for x in (arm, base))
                if a is None and b is None:
                    continue
                diffs.append(math.nan if a is None or b is None else a - b)  # nan (also from nan - x): left out
            diff = mean_ci(diffs, diff_range(metric))
            diffs_of.append(diff)
            rows.append(_comparison_row(arm, base, metric, diff, diffs, declared))
    for arm, base, metric, value in fixed:  # an arm against a fixed value: d = arm - value per seed
        diffs = [None if v is None else v - value
                 for v in (row_value(r, metric) for (a, _), r in by_run.items() if a == arm)]
        low, high = metric_range(metric)
        diff = mean_ci(diffs, (low - value, high - value))
        diffs_of.append(diff)
        rows.append(_comparison_row(arm, base, metric, diff, diffs, declared))
    others = [row for row in rows if not row["primary"]]
    for row, adjusted in zip(others, holm([row["p"] for row in others])):
        row["p_adjusted"] = adjusted
    for row, diff in zip(rows, diffs_of):
        if row["primary"]:
            row["p_adjusted"] = row["p"]
        else:
            row["verdict"] = adjusted_verdict(row["metric"], diff, row["p_adjusted"])
    return rows


def _comparison_row(arm: str, base: str, metric: str, diff: CI, diffs: Sequence[float | None],
                    declared: set[tuple[str, str, str]]) -> dict[str, Any]:
    """One comparisons.json row before the multiplicity adjustment (``paired_comparisons``)."""
    return {"arm": arm, "baseline": base, "metric": metric, "mean_diff": _finite(diff.mean),
            "ci_low": _finite(diff.low), "ci_high": _finite(diff.high), "n": diff.n, "n_dropped": diff.n_nonfinite,
            "verdict": verdict(metric, diff), "p": paired_p(diffs), "p_adjusted": None,
            "primary": (arm, base, metric) in declared}


SURVIVING = ("better", "worse", "higher", "lower")


def multiplicity_counts(comparisons: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """How many comparisons a table holds and how many survive: ``primary`` / ``others`` rows with a p (an
    interval), and of those ``primary_survive`` (by their interval) / ``others_survive`` (after Holm)."""
    counted = [c for c in comparisons if c.get("p") is not None]
    primary = [c for c in counted if c.get("primary")]
    others = [c for c in counted if not c.get("primary")]
    return {"primary": len(primary), "primary_survive": sum(c["verdict"] in SURVIVING for c in primary),
            "others": len(others), "others_survive": sum(c["verdict"] in SURVIVING for c in others)}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # comparisons.json stays strict JSON


# --- LR-robust width: the widest learning-rate range near a loss's best ------------------------------------------

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
    picks = np.random.default_rng(rng_seed).integers(0, len(seeds), size=(resamples, len(seeds)))
    return [[seeds[i] for i in row] for row in picks]


def percentile_width(point: float, samples: Sequence[float], n: int) -> Width:
    """The 2.5 / 97.5 percentiles as values the samples take (lower / higher order statistic), and the median."""
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


def width_ci(width: Width) -> CI:
    """A difference of widths as the CI that ``verdict`` reads (the bootstrap percentiles as its interval)."""
    return CI(width.point, math.nan, width.low, width.high, width.n, 0)


def width_verdict(diff: Width) -> str:
    """``verdict`` of a paired width difference (wider is better)."""
    return verdict("lr_robust_width", width_ci(diff))


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


# --- A sweep's numbers, per loss, from its studies (probloss.studies.readers) ------------------------------------

SEED_METRICS = [  # reported on test; the study selects (best learning rate, best trial) on val
    "test/zeroshot_top1", "test/zeroshot_unseen_top1", "test/i2t_r@1_plausible", "test/t2i_r@1_plausible",
    "test/i2t_map@r", "test/t2i_map@r", "test/relation_probe_acc", "test/binding_probe_acc", "test/control_probe_acc",
    "test/embed/effective_rank", "test/embed/uniformity", "test/embed/alignment", "test/embed/modality_gap",
    "test/unc/specificity_level_coef", "test/unc/specificity_matched_acc", "stability/max_loss_jump",
    "stability/collapsed", "stability/grad_norm_ratio"]
LR_KEY = "trainer.lr"


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


def _first_value(trial) -> float:
    if trial.values is None:
        return math.nan
    return trial.values[0]


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
