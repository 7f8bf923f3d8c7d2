"""Every page and plot of the study reports, from the numbers of probloss/studies/stats.py: table cells
(``fmt_ci``, ``fmt_width``, ``fmt_retention``; plain numbers with probloss.files.fmt_number), the sweep report's
markdown (``report_lines``) and plots (``sweep_plots``: accuracy vs learning rate, the best trials' loss curves,
effective rank over training, text sigma vs caption specificity level), a recipe's page (``recipe_sections``,
``write_recipe_page``: the arms x metrics table, the paired comparison table, one PNG per metric and the forest
plot of its primary comparisons), the claims table of the findings page, and one run's instruments beside their
trivial cues (``instrument_tables``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from probloss.files import fmt_number, pyplot, save_figure, slug
from probloss.studies.readers import tensorboard_scalars
from probloss.studies.stats import (
    BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, CI, MIN_RETENTION_SEEDS, RETENTION_MULTIPLES, SEED_METRICS, SURVIVING, Width,
    aggregate, as_value, is_number, multiplicity_counts, per_lr_mean, row_value, run_stopped, width_verdict,
)


# --- Table cells -------------------------------------------------------------------------------------------------

def fmt_ci(ci: CI) -> str:
    """A table cell: ``mean ± half``, ``mean [low, high]`` when clipped, then ``(k of n seeds diverged)``."""
    text = "-" if ci.n == 0 else f"{ci.mean:.3f}"
    if ci.n >= 2:
        text += f" [{ci.low:.3f}, {ci.high:.3f}]" if ci.clipped else f" ± {ci.half:.3f}"
    if ci.n_nonfinite:
        text += f" ({ci.n_nonfinite} of {ci.n + ci.n_nonfinite} seeds diverged)"
    return text


def fmt_width(width: Width | None) -> str:
    """A table cell: ``point [low, high]`` in decades; ``point (one seed)`` without an interval."""
    if width is None or not math.isfinite(width.point):
        return "-"
    if width.n < 2:
        return f"{width.point:.2f} (one seed)"
    return f"{width.point:.2f} [{width.low:.2f}, {width.high:.2f}]"


def fmt_retention(cell: Mapping[str, Any] | None) -> str:
    """``point [low, high]`` of a retained fraction, with its learning rate; ``(n seeds < 5)`` when few."""
    if not cell or not math.isfinite(cell["point"]):
        return "- (beyond the grid)" if cell and cell["lr"] is not None else "-"
    where = f" at {cell['lr']:.3g}{' (interp.)' if cell['interpolated'] else ''}"
    if cell["n"] < 2:
        return f"{cell['point']:.2f}{where} (one seed)"
    text = f"{cell['point']:.2f} [{cell['low']:.2f}, {cell['high']:.2f}]{where}"
    return text + (f" ({cell['n']} seeds < {MIN_RETENTION_SEEDS})" if cell["few_seeds"] else "")


def error_bars(cis: Sequence[CI]) -> list[list[float]]:
    """matplotlib's asymmetric ``yerr`` of clipped intervals (0 where there is none)."""
    below = [ci.mean - ci.low if math.isfinite(ci.low) else 0.0 for ci in cis]
    above = [ci.high - ci.mean if math.isfinite(ci.high) else 0.0 for ci in cis]
    return [below, above]


# --- The sweep report: LR retention and robustness tables, the page, its plots -----------------------------------

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
                     f"{fmt_ci(row['best_lr_val'])} | {fmt_ci(row['best_lr_test'])} |")
    lines += ["", DIFF_WIDTH_NOTE.format(base=base), "",
              f"| loss - {base} | width 90%, own best | verdict | width 90%, shared best | verdict |", "|---|---|---|---|---|"]
    for loss, row in have.items():
        if loss != base:
            own, shared = row["width_90"]["diff_own"], row["width_90"]["diff_shared"]
            lines.append(f"| {loss} | {fmt_width(own)} | {width_verdict(own)} | {fmt_width(shared)} | {width_verdict(shared)} |")
    return lines


def lr_table(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Mean objective per learning rate and loss, for studies that repeat learning rates (a grid over seeds)."""
    means = {loss: row["per_lr_mean"] for loss, row in rows.items()}
    if not any(len(m) < len(rows[loss]["trials"]) for loss, m in means.items()):
        return []
    lrs = sorted({lr for m in means.values() for lr in m})
    lines = ["", "Mean objective per learning rate (over seeds; - : diverged or not run):", "",
             "| learning rate | " + " | ".join(means) + " |", "|---|" + "---|" * len(means)]
    for lr in lrs:
        lines.append(f"| {lr:g} | " + " | ".join(fmt_number(m.get(lr, math.nan)) for m in means.values()) + " |")
    return lines


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
        lines.append(f"| {loss} | {row['complete']}/{row['pruned']}/{row['failed']} | {fmt_number(row['best'])} | "
                     f"{fmt_number(row['median'])} | {row['diverged_fraction']:.0%} | {fmt_number(row['lr_robust_width'])} / {fmt_number(row['lr_robust_width_80'])} | "
                     f"{row['seeds']} |")
    metrics = [m for m in SEED_METRICS if any(r[m].n + r[m].n_nonfinite for r in rows.values())]
    lines += ["", "| loss | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for loss, row in rows.items():
        lines.append(f"| {loss} | " + " | ".join(fmt_ci(row[m]) for m in metrics) + " |")
    lines += lr_table(rows)
    lines += robustness_lines(rows)
    lines += retention_lines(rows)
    lines += ["", "Best configurations:", ""]
    lines += [f"- {loss}: `{row['best_params']}`" for loss, row in rows.items()]
    return lines


def sweep_plots(rows: Mapping[str, Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """The sweep report's PNGs in ``out_dir``: accuracy vs learning rate, the loss curves and effective rank over
    training of the best trial (or its seed re-runs), and text sigma vs caption specificity level."""
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
                curve = tensorboard_scalars(run_dir, tag)
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


# --- A recipe's page: arms x metrics, paired comparisons, a PNG per metric, the forest plot ----------------------

ARMS_NOTE = ("Mean ± 95% interval (Student t over seeds), or mean [low, high] where the interval is clipped to the "
             "metric's range; - : no value. A seed that diverged (stopped, or a non-finite value) is counted in its "
             "cell, not averaged; seeds: runs per arm, with those stopped on a non-finite loss and those the "
             "stability tracker flagged as diverged.")
DIFF_NOTE = ("Paired per seed (the same seed: same data order, same initial weights of shared layers): mean of "
             "arm - baseline with its 95% interval (paired Student t, n - 1 dof) over the seeds finite in both arms, "
             "clipped to the metric's possible differences; left out: seeds missing or non-finite in either arm. "
             "p: two-sided, of the same paired t. Primary comparisons (declared by the recipe before it ran, marked "
             "*) are judged by their interval: better / worse only when it excludes 0. Every other row is one of "
             "many: its p is Holm-adjusted over the recipe's non-primary rows (p adj.), and it is better / worse "
             "only when its interval excludes 0 and p adj. < 0.05. Lower is better for losses, stability counts, "
             "uniformity and the specificity statistics (more negative is the stronger effect); higher / lower "
             "for metrics without a better direction (modality gap, alignment, ...) under the same rule; inside "
             "noise otherwise; one seed (no data) when one (no) seed pairs.")


def multiplicity_line(counts: Mapping[str, int]) -> str:
    """One sentence: comparisons held and surviving, primary and others."""
    total = counts["primary"] + counts["others"]
    return (f"{total} comparison(s) with an interval: {counts['primary']} primary ({counts['primary_survive']} "
            f"survive: interval excludes 0), {counts['others']} others ({counts['others_survive']} survive Holm: "
            "p adj. < 0.05).")


def learning_rate_lines(exp: Mapping[str, Any]) -> list[str]:
    """One sentence: each arm's learning rate and its source (``learning_rates_used``; none when not set)."""
    used = exp.get("learning_rates_used") or {}
    if not used:
        return []
    by_source: dict[str, list[str]] = {}
    for arm, chosen in used.items():
        by_source.setdefault(chosen["source"], []).append(f"{arm} {chosen['lr']:g}")
    return ["Learning rates: " + "; ".join(f"{', '.join(arms)} ({source})" for source, arms in by_source.items())
            + ".", ""]


def recipe_sections(exp: Mapping[str, Any], results: Sequence[Mapping[str, Any]] | None,
                    comparisons: Sequence[Mapping], metrics: Sequence[str], heading: str = "##") -> list[str]:
    """The markdown body shared by recipe.md and the findings page: description, arms table (the recipe's reported
    ``metrics``), comparison table (``results`` None: the comparison table alone)."""
    arms = list(exp["arms"])
    if results is None:  # a committed folder without its runs' rows: the comparisons alone
        return [str(exp.get("description") or "").strip(), "", *learning_rate_lines(exp)] + _comparison_lines(
            comparisons, heading)
    table = aggregate(results, arms, metrics)
    seeds = sorted({r["seed"] for r in results}, key=lambda seed: (not isinstance(seed, int), str(seed).zfill(12)))
    times = [r["wall_time_s"] for r in results if is_number(r.get("wall_time_s"))]
    lines = [str(exp.get("description") or "").strip(), "",
             f"Seeds {seeds}; {len(results)} runs"
             + (f", {sum(times) / 60:.1f} min of training in total (wall time summed over {len(times)} runs)" if times
                else "") + ".", "",
             *learning_rate_lines(exp),
             f"{heading} Arms", "", ARMS_NOTE, "",
             "| arm | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for arm in arms:
        lines.append(f"| {arm} | {_seeds_cell([r for r in results if r['arm'] == arm])} | "
                     + " | ".join(fmt_ci(table[arm][m]) for m in metrics) + " |")
    return lines + [""] + _comparison_lines(comparisons, heading)


def _comparison_lines(comparisons: Sequence[Mapping], heading: str) -> list[str]:
    lines = [f"{heading} Paired differences against the baseline", "", DIFF_NOTE, "",
             multiplicity_line(multiplicity_counts(comparisons)), "",
             "| arm | baseline | metric | difference [95% interval] | seeds paired | p | p adj. | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        left_out = f" ({c['n_dropped']} left out)" if c["n_dropped"] else ""
        star = " *" if c.get("primary") else ""
        lines.append(f"| {c['arm']}{star} | {c['baseline']} | {c['metric']} | {_diff_cell(c)} | {c['n']}{left_out} | "
                     f"{_p_cell(c.get('p'))} | {_p_cell(c.get('p_adjusted'))} | {c['verdict']} |")
    return lines


def _p_cell(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _seeds_cell(rows: Sequence[Mapping[str, Any]]) -> str:
    stopped = sum(run_stopped(r) for r in rows)
    flagged = sum(bool(r.get("stability/diverged")) for r in rows if not run_stopped(r))  # finished, but flagged
    notes = ([f"{stopped} stopped"] if stopped else []) + ([f"{flagged} flagged diverged"] if flagged else [])
    return f"{len(rows)}" + (f" ({', '.join(notes)})" if notes else "")


def _diff_cell(c: Mapping[str, Any]) -> str:
    if c["mean_diff"] is None:
        return "-"
    if c["ci_low"] is None:
        return f"{c['mean_diff']:+.3f}"
    return f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"


def write_recipe_page(exp: Mapping[str, Any], name: str, results: Sequence[Mapping[str, Any]],
                      comparisons: Sequence[Mapping[str, Any]], metrics: Sequence[str], exp_dir: Path) -> Path:
    """Write recipe.md and its PNGs into ``exp_dir``: per reported metric a bar (or, with ``x``, line) plot of the
    arms' means and intervals with every seed's value, the forest plot of the primary comparisons, and the page
    (``recipe_sections``) from ``results`` and the rows of comparisons.json. Returns recipe.md's path."""
    plt = pyplot()

    arms = list(exp["arms"])
    table = aggregate(results, arms, metrics)
    plots = []
    for m in metrics:
        cis: list[CI] = [table[a][m] for a in arms]
        means = [ci.mean for ci in cis]
        if not any(math.isfinite(v) for v in means):
            continue
        errors = error_bars(cis)
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(arms) + 2), 3.6))
        if exp.get("x"):  # numeric arms (e.g. batch sizes): a line per group, x on a log axis
            groups: dict[str, list] = {}
            for arm, mean, below, above in zip(arms, means, *errors):
                group, x = exp["x"][arm]
                groups.setdefault(group, []).append((x, mean, below, above))
            for group, points in groups.items():
                xs, ys, below, above = zip(*sorted(points))
                ax.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=3, label=group)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(exp.get("x_label") or "")
            ax.legend()
        else:
            ax.bar(range(len(arms)), means, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(arms))],
                   alpha=0.6)
            for i, arm in enumerate(arms):  # every seed's own value over its arm's bar
                seeds = [v for v in (row_value(r, m) for r in results if r["arm"] == arm)
                         if v is not None and math.isfinite(v)]
                jitter = [0.25 * ((k % 5) / 4 - 0.5) for k in range(len(seeds))]
                ax.scatter([i + j for j in jitter], seeds, s=9, color="black", zorder=3,
                           label="each dot: one seed" if i == 0 and seeds else None)
            ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right")
        chance = chance_level(exp, m)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:g})")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_ylabel(m)
        ax.set_title(f"{name}: {m}")
        plots.append(save_figure(fig, exp_dir / f"{slug(m).replace('/', '_')}.png"))
    forest = forest_plot([c for c in comparisons if c.get("primary")], exp_dir / "forest.png",
                         f"{name}: primary comparisons")
    lines = [f"# Recipe {name}", "", *recipe_sections(exp, results, comparisons, metrics), ""]
    lines += [f"![{p.stem}]({p.name})" for p in ([forest] if forest else []) + plots]
    report = exp_dir / "recipe.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def chance_level(exp: Mapping[str, Any], metric: str) -> float | None:
    """The metric's chance level for its plot: the recipe's ``chance`` entry, else its ``constants`` value."""
    for source in (exp.get("chance") or {}, exp.get("constants") or {}):
        if metric in source and is_number(source[metric]):
            return float(source[metric])
    return None


def forest_plot(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path | None:
    """A forest plot of comparison rows (comparisons.json): per row the paired difference and its 95% interval
    on its own axis (each metric keeps its units), zero marked, the verdict beside it. None without rows."""
    rows = [r for r in rows if r.get("mean_diff") is not None]
    if not rows:
        return None
    plt = pyplot()

    fig, axes = plt.subplots(len(rows), 1, figsize=(8.5, 0.62 * len(rows) + 0.7), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        low, high, mean = (row[k] if row[k] is not None else row["mean_diff"] for k in ("ci_low", "ci_high", "mean_diff"))
        span = max(abs(low), abs(high), 1e-12) * 1.15
        colour = {"better": "C2", "worse": "C3"}.get(row["verdict"], "C0" if row["verdict"] in SURVIVING else "grey")
        ax.errorbar([mean], [0], xerr=[[mean - low], [high - mean]], fmt="o", color=colour, capsize=4)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlim(-span, span)
        ax.set_yticks([])
        ax.tick_params(axis="x", labelsize=7)
        base = row["baseline"]
        ax.set_title(f"{row['arm']} − {base}: {row['metric']}" if not base.startswith("constant") else
                     f"{row['arm']} − {base[len('constant '):]} ({row['metric']})", fontsize=8, loc="left", pad=2)
        ax.text(1.01, 0.5, f"{row['verdict']}\n{mean:+.3g} [{low:+.3g}, {high:+.3g}], n={row['n']}",
                transform=ax.transAxes, fontsize=7, va="center")
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    fig.suptitle(title + " (paired difference, 95% interval, zero marked)", fontsize=9)
    fig.subplots_adjust(left=0.03, right=0.74, hspace=1.1, top=1 - 0.45 / (0.62 * len(rows) + 0.7))
    return save_figure(fig, path)


# --- The findings page's claims table ----------------------------------------------------------------------------

def claims_lines(claims: Sequence[Mapping[str, Any]]) -> list[str]:
    """The claims table of the findings page: claim -> comparison -> its difference and verdict."""
    lines = ["## Claims", "", "Every sentence the README says about a result, the comparison in the recipe's "
             "comparisons.json that supports it, and that comparison's verdict (tests/test_claims.py checks that "
             "each claim names an existing comparison and copies its verdict word).", "",
             "| claim (README) | recipe: arm − baseline, metric | difference [95% interval] | seeds | verdict |",
             "|---|---|---|---|---|"]
    for claim in claims:
        row = claim["row"]
        where = f"{claim['recipe']}: {claim['arm']} − {claim['baseline']}, {claim['metric']}"
        if row is None:
            lines.append(f"| {claim['claim']} | {where} | no such comparison | - | - |")
            continue
        star = " (primary)" if row.get("primary") else ""
        lines.append(f"| {claim['claim']} | {where}{star} | {_diff_cell(row)} | {row['n']} | {row['verdict']} |")
    return lines + [""]


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
        return fmt_number(as_value(value) if value is not None else float("nan"))

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
            cues.append(fmt_number(float(values[0])) if values else "-")
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
