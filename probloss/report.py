"""Turn an experiment's Optuna studies and run folders into report.md with tables and PNG plots.

    python scripts/report.py runs/compare_losses       # reads runs/sweeps/compare_losses.journal + run folders

Per loss: trials (complete, pruned, failed), best and median accuracy over trials, fraction diverged, the
LR-robust width, and, over the seed re-runs of the best configuration (the ``<study>-best`` study), every
embedding-space and uncertainty metric as mean and 95% interval (Student t). Plots: accuracy vs learning rate,
the best trials' loss curves, effective rank over training, and text sigma vs caption specificity level.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna

# two-sided 95% Student t quantiles by degrees of freedom (1..30); 1.96 beyond
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
SEED_METRICS = [  # reported on test; the study selects (best learning rate, best trial) on val
    "test/zeroshot_top1", "test/zeroshot_unseen_top1", "test/i2t_r@1", "test/t2i_r@1", "test/relation_probe_acc",
    "test/binding_probe_acc", "test/control_probe_acc", "test/embed/effective_rank", "test/embed/uniformity",
    "test/embed/alignment", "test/embed/modality_gap", "test/unc/specificity_spearman",
    "test/unc/specificity_matched_acc", "stability/loss_spikes", "stability/grad_norm_ratio"]
LR_KEY = "trainer.lr"


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% interval (nan half-width for fewer than two values)."""
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    if len(values) < 2:
        return values[0], math.nan
    t = T_975[len(values) - 2] if len(values) - 1 <= len(T_975) else 1.96
    return statistics.fmean(values), t * statistics.stdev(values) / math.sqrt(len(values))


def lr_robust_width(lrs: Sequence[float], scores: Sequence[float], fraction: float = 0.9) -> float:
    """Width in decades of the widest contiguous learning-rate range whose scores all reach ``fraction`` x best.

    Trials at the same learning rate (seeds of a grid) are averaged first; a diverged trial (score -inf or nan)
    makes its learning rate fail. A run of consecutive good learning rates spans log10(lr_last / lr_first), so
    one good learning rate alone has width 0.
    """
    by_lr = per_lr_mean(lrs, scores)
    finite = [s for s in by_lr.values() if math.isfinite(s)]
    if not finite:
        return 0.0
    threshold = fraction * max(finite)
    best, start = 0.0, None
    for lr, score in by_lr.items():
        if math.isfinite(score) and score >= threshold:
            start = lr if start is None else start
            best = max(best, math.log10(lr / start))
        else:
            start = None
    return best


def per_lr_mean(lrs: Sequence[float], scores: Sequence[float]) -> dict[float, float]:
    """{learning rate: mean score} in increasing learning rate; any non-finite score makes the mean -inf."""
    grouped: dict[float, list[float]] = {}
    for lr, score in zip(lrs, scores):
        if lr and lr > 0:
            grouped.setdefault(lr, []).append(score if math.isfinite(score) else -math.inf)
    return {lr: statistics.fmean(grouped[lr]) for lr in sorted(grouped)}


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
        if not seeds and finite and len(by_lr) < len(complete):  # a grid over seeds: the best learning rate's seeds
            best_lr = max(by_lr, key=by_lr.get)
            seeds = [t for t in complete if t.params.get(LR_KEY) == best_lr]
        row["seeds"] = len(seeds)
        row["seed_run_dirs"] = [t.user_attrs.get("run_dir") for t in seeds]
        source = seeds or ([max(complete, key=_first_value)] if finite else [])
        for metric in SEED_METRICS + sorted({k for t in source for k in t.user_attrs if re.match(r"test/unc/sigma_text_rank_L\d", k)}):
            row[metric] = mean_ci([t.user_attrs.get(metric, math.nan) for t in source])
        rows[loss] = row
    return rows


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


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        mean, half = value
        if not math.isfinite(mean):
            return "-"
        return f"{mean:.3f} ± {half:.3f}" if math.isfinite(half) else f"{mean:.3f}"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def plot(rows: Mapping[str, Mapping[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        if means and all(math.isfinite(m) for m, _ in means):
            ax.errorbar(levels, [m for m, _ in means], yerr=[h if math.isfinite(h) else 0 for _, h in means],
                        marker="o", capsize=3, label=loss)
    ax.set(xlabel="caption specificity level (L0 vague .. L3 specific)", ylabel="text sigma: mean rank within the model",
           title="Predicted sigma vs caption specificity")
    if ax.lines:
        ax.legend()
    paths.append(save_figure(fig, out_dir / "sigma_vs_specificity.png"))
    return paths


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(experiment_dir: str | Path, storage=None) -> Path:
    """Write ``<experiment_dir>/report.md`` and its PNGs; returns the report's path."""
    from probloss.sweep import storage_for

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
    rows = summarise(studies)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(rows, experiment_dir)

    lines = [f"# {experiment}: loss comparison", "",
             "Search: best and median of the first objective over complete trials, the fraction of trials that "
             "diverged, and the LR-robust width (decades of the widest learning-rate range whose trials, averaged "
             "over seeds at one learning rate, all reach >= 90% (>= 80%) of the best such mean). Seeds: the best "
             "configuration re-run per seed, or for a grid over seeds the seeds of the learning rate with the best "
             "mean; mean ± 95% interval (Student t); without either, the best trial alone.", "",
             "| loss | trials (complete/pruned/failed) | best | median | diverged | LR-robust width, decades (90% / 80%) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for loss, row in rows.items():
        lines.append(f"| {loss} | {row['complete']}/{row['pruned']}/{row['failed']} | {_fmt(row['best'])} | "
                     f"{_fmt(row['median'])} | {row['diverged_fraction']:.0%} | {_fmt(row['lr_robust_width'])} / {_fmt(row['lr_robust_width_80'])} | "
                     f"{row['seeds']} |")
    metrics = [m for m in SEED_METRICS if any(math.isfinite(r[m][0]) for r in rows.values())]
    lines += ["", "| loss | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for loss, row in rows.items():
        lines.append(f"| {loss} | " + " | ".join(_fmt(row[m]) for m in metrics) + " |")
    lines += lr_table(rows)
    lines += ["", "Best configurations:", ""]
    lines += [f"- {loss}: `{row['best_params']}`" for loss, row in rows.items()]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = experiment_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
