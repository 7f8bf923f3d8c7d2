"""Recipes: a grid of training runs (arms x seeds) from configs/recipe/<name>.yaml, and its report.

    python scripts/run_recipe.py recipe=bias_init [recipe.seeds=[0,1,2]] [training overrides]
    python scripts/report.py runs/bias_init              # re-render recipe.md + comparisons.json, no training
    python scripts/report.py --findings runs             # every recipe folder's tables as one markdown page

A recipe names its ``arms`` (arm -> training overrides), the ``seeds``, ``overrides`` shared by every run,
optional extra ``evaluations`` of each final checkpoint (name -> overrides, e.g. image noise), the ``metrics`` to
report and the ``baseline`` arm the others are compared with (configs/recipe/_base.yaml documents every key).
Each run is an ordinary run folder ``<out_dir>/<recipe>/<loss>/<arm>-seed<k>`` (the recipe's name is the runs'
``experiment``); a run whose summary.json exists is not trained again, so an interrupted recipe continues where
it stopped. A run that stops on a non-finite loss (diverged) is a result, not a crash: its row is kept.

The recipe folder ``<out_dir>/<recipe>/`` holds:

- ``recipe.json``: the recipe as run (with overrides) plus ``timing`` (summed run wall time, this invocation's).
- ``results.json``: one row per arm x seed: ``arm``, ``seed``, ``run_dir``, ``wall_time_s``, ``status`` and every
  number of the run's summary.json (and of its extra evaluations, as ``<evaluation>/<key>``). A reported metric
  that a run's summary lacks (added to the instruments after the run) is filled from its final checkpoint and
  named in ``backfilled`` (``backfill_metrics``).
- ``comparisons.json``: one row per compared arm x metric (``compare``): the paired difference against the
  baseline over seeds, its 95% interval and the verdict word (probloss.report.verdict).
- ``recipe.md`` + one PNG per metric, rendered from the two files above: the arms x metrics table (mean ± 95%
  interval, clipped to the metric's range, diverged seeds counted) and the paired comparison table.

Paired design: seed s gives every arm the same data order (the loader is seeded by seed, epoch, rank and world
size) and the same initial weights of the layers the arms share (the towers and projections are built first,
from the same seed; log-std heads come after them) -- as long as the arm keeps the batch size and data
options; arms that change those still pair by seed, but the pairing then removes less noise.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from probloss.config import ConfigError, compose_config, config_groups
from probloss.report import (CI, diff_range, error_bars, fmt_ci, mean_ci, metric_range, row_value, run_stopped,
                             report_lines, save_figure, summarise, sweep_studies, verdict)
from probloss.run_folder import run_base
from probloss.settings import RunSettings


def load_recipe(argv: Sequence[str]) -> tuple[str, dict[str, Any], list[str]]:
    """(name, the recipe section, training overrides) of a ``scripts/run_recipe.py`` command line.

    ``argv`` is composed with configs/recipe.yaml (the training config plus ``recipe=<name>``), so every key is
    checked like a training run's; the training overrides are ``argv`` minus the ``recipe`` ones.
    """
    own = [a for a in argv if a.split("=", 1)[0].lstrip("+~").startswith("recipe")]
    # The recipe's own group choices (model=lit, data=webdataset) come first, so that the command line's keys
    # are checked against the model and data the runs will use.
    groups = config_groups("train")
    shared = compose_config(own, config_name="recipe").recipe.get("overrides") or []
    choices = [o for o in shared if o.split("=", 1)[0] in groups]
    cfg = compose_config([*choices, *argv], config_name="recipe")
    recipe = OmegaConf.to_container(cfg.recipe, resolve=True)
    name = next(a.split("=", 1)[1] for a in argv if a.startswith("recipe="))
    if not recipe.get("arms"):
        raise ConfigError(f"recipe {name!r} has no arms (arm name -> training overrides)")
    baselines(recipe)  # a misspelt baseline fails now, not after hours of training
    return name, recipe, [a for a in argv if a not in own]


def baselines(exp: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(arm, the arm it is compared with) pairs, in arm order.

    ``baseline`` is null (the first arm), an arm name (every other arm against it), or a mapping arm -> baseline
    arm or list of baseline arms (only the listed arms are compared; e.g. sigmoid B=16 against infonce B=16, or
    a masked arm against the unmasked one at equal steps and at equal pairs seen).
    """
    arms = list(exp["arms"])
    spec = exp.get("baseline")
    spec = arms[0] if spec is None else spec
    pairs = dict(spec) if isinstance(spec, Mapping) else {arm: spec for arm in arms if arm != spec}
    pairs = {arm: [base] if isinstance(base, str) else list(base) for arm, base in pairs.items()}
    unknown = sorted({str(a) for arm, bases in pairs.items() for a in (arm, *bases)} - set(arms))
    if unknown:
        raise ConfigError(f"recipe baseline names {unknown}, not arms of the recipe; arms: {arms} "
                          "(set recipe.baseline=<arm>, or null for the first arm)")
    return [(arm, base) for arm in arms for base in pairs.get(arm, [])]


def run_recipe(argv: Sequence[str], log=print) -> Path:
    """Train every arm x seed not trained yet, run the extra evaluations, and write the report."""
    from probloss.train import NonFiniteLossError
    from probloss.train import main as train_main

    started = time.perf_counter()
    name, exp, train_overrides = load_recipe(argv)
    exp_dir = Path(os.path.expanduser(compose_config([*exp.get("overrides", []), *train_overrides])["out_dir"])) / name
    results = []
    for arm, arm_overrides in exp["arms"].items():
        for seed in exp.get("seeds", [0]):
            overrides = [*exp.get("overrides", []), *arm_overrides, *train_overrides, f"experiment={name}",
                         f"seed={seed}", f"run_name={_slug(arm)}-seed{seed}"]
            cfg = compose_config(overrides)  # checks every key before any training
            run_dir = run_base(RunSettings.from_config(cfg)) / f"{_slug(arm)}-seed{seed}"  # as training names it
            summary_path = run_dir / "summary.json"
            trained_for = None
            if not summary_path.is_file():
                log(f"[{name}] training {arm} seed {seed}", flush=True)
                t0 = time.perf_counter()
                try:
                    train_main(overrides)
                except NonFiniteLossError as err:  # diverged: a result to count and show, not a crash
                    log(f"[{name}] {arm} seed {seed} diverged: {err}", flush=True)
                trained_for = time.perf_counter() - t0
            summary = json.loads(summary_path.read_text())  # a stopped run wrote its status and error
            if trained_for is not None:
                summary.setdefault("wall_time_s", trained_for)  # a stopped run's summary has no time of its own
            finished = summary.get("status", "finished") == "finished"
            for evaluation, eval_overrides in (exp.get("evaluations") or {}).items() if finished else ():
                metrics = cached_evaluation(run_dir, evaluation, eval_overrides)
                summary.update({f"{evaluation}/{k}": v for k, v in metrics.items()})
            if finished:
                backfill_metrics(run_dir, summary, exp.get("metrics") or (), log=log)
            results.append({"arm": arm, "seed": seed, "run_dir": str(run_dir), **summary})
    times = [r["wall_time_s"] for r in results if _is_number(r.get("wall_time_s"))]
    exp = {**exp, "timing": {"runs_wall_time_s": sum(times), "runs_timed": len(times),
                             "invocation_wall_time_s": time.perf_counter() - started}}
    (exp_dir / "recipe.json").write_text(json.dumps(exp, indent=1))  # the resolved file, for re-rendering
    (exp_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report = write_recipe_report(exp, name, results, exp_dir)
    log(f"[{name}] wrote {report}", flush=True)
    return report


def read_recipe_folder(exp_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(recipe.json, results.json) of a finished recipe folder."""
    exp_dir = Path(exp_dir)
    results_path, exp_path = exp_dir / "results.json", exp_dir / "recipe.json"
    for path in (results_path, exp_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run python scripts/run_recipe.py "
                                    f"recipe={exp_dir.name} first")
    return json.loads(exp_path.read_text()), json.loads(results_path.read_text())


def render_recipe(exp_dir: str | Path) -> Path:
    """Write ``recipe.md``, its PNGs and ``comparisons.json`` again from a finished recipe folder (no training)."""
    exp, results = read_recipe_folder(exp_dir)  # the recipe as it was run (with overrides)
    return write_recipe_report(exp, Path(exp_dir).name, results, Path(exp_dir))


def cached_evaluation(run_dir: Path, name: str, overrides: Sequence[str] = ()) -> dict[str, float]:
    """The numbers of one evaluation of the run's newest checkpoint with ``overrides``, computed once and kept
    as ``<run>/eval-<name>.json``."""
    from probloss.checkpoint import newest_checkpoint
    from probloss.eval.runtime import evaluate_checkpoint

    cached = run_dir / f"eval-{_slug(name)}.json"
    if not cached.is_file():
        metrics = evaluate_checkpoint(newest_checkpoint(run_dir), overrides)
        cached.write_text(json.dumps({k: v for k, v in metrics.items() if _is_number(v)}, indent=1))
    return json.loads(cached.read_text())


def backfill_metrics(run_dir: Path, summary: dict[str, Any], metrics: Sequence[str], log=print) -> list[str]:
    """Fill the reported ``metrics`` a finished run's summary lacks (the instruments gained a key after the run
    was trained) from one evaluation of its final checkpoint (``cached_evaluation`` "final"); returns the keys
    filled, also listed in the row's ``backfilled``.

    The evaluation is trusted only if it reproduces the summary's own test numbers: a checkpoint that is not the
    final one, or evaluation code whose meaning changed since, fills nothing and says why. Keys absent from the
    evaluation too (e.g. sigma metrics of a loss without sigma) stay absent.
    """
    from probloss.checkpoint import newest_checkpoint

    missing = [k for k in metrics if k not in summary]
    ckpt = newest_checkpoint(run_dir) if missing else None
    if ckpt is None:
        return []
    if not (run_dir / "eval-final.json").is_file():
        if ckpt.name != f"step-{int(summary.get('steps', -1)):08d}.ckpt":
            log(f"warning: {run_dir} lacks {missing}, but its newest checkpoint {ckpt.name} is not of its final "
                f"step {summary.get('steps')}: not filled", flush=True)
            return []
        log(f"re-evaluating {ckpt} for {missing}", flush=True)
    evaluated = cached_evaluation(run_dir, "final")
    shared = [k for k in ("test/zeroshot_top1", "test/i2t_r@1", "test/t2i_r@1") if k in summary and k in evaluated]
    if not shared or any(abs(summary[k] - evaluated[k]) > 1e-9 for k in shared):
        log(f"warning: re-evaluating {ckpt} does not reproduce its summary's {shared or 'test metrics'}: "
            f"{missing} not filled", flush=True)
        return []
    filled = [k for k in missing if _is_number(evaluated.get(k))]
    summary.update({k: evaluated[k] for k in filled})
    if filled:
        summary["backfilled"] = filled
    return filled


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))  # also safe in Hydra overrides


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def report_metrics(exp: Mapping[str, Any]) -> list[str]:
    """The recipe's headline metrics, then the val/test ones again under each extra evaluation's prefix."""
    metrics = list(exp.get("metrics") or ["test/zeroshot_top1"])
    evaluations = list(exp.get("evaluations") or {})
    return metrics + [f"{e}/{m}" for e in evaluations for m in metrics if m.startswith(("val/", "test/"))]


def aggregate(results: Sequence[Mapping[str, Any]], arms: Sequence[str], metrics: Sequence[str]):
    """{arm: {metric: CI}} over seeds; a seed that diverged counts in ``n_nonfinite``."""
    return {arm: {m: mean_ci([row_value(r, m) for r in results if r["arm"] == arm], metric_range(m))
                  for m in metrics} for arm in arms}


def compare(results: Sequence[Mapping[str, Any]], exp: Mapping[str, Any], metrics: Sequence[str]) -> list[dict]:
    """The rows of comparisons.json: per compared arm and metric, the paired difference against its baseline.

    Per seed d = arm - baseline (the same seed: same data order and shared initial weights, so the seed's own
    luck cancels); mean and paired Student t interval (n - 1 dof) over the seeds finite in both arms, clipped to
    the metric's possible differences. A seed where either side is missing or non-finite is left out and
    counted in ``n_dropped``; a seed where the metric applies to neither arm is not a seed of this metric.
    """
    by_run = {(r["arm"], r["seed"]): r for r in results}
    rows = []
    for arm, base in baselines(exp):
        seeds = sorted({seed for a, seed in by_run if a in (arm, base)}, key=str)
        for metric in metrics:
            diffs = []
            for seed in seeds:
                a, b = (row_value(by_run[(x, seed)], metric) if (x, seed) in by_run else None for x in (arm, base))
                if a is None and b is None:
                    continue
                diffs.append(math.nan if a is None or b is None else a - b)  # nan (also from nan - x): left out
            diff = mean_ci(diffs, diff_range(metric))
            rows.append({"arm": arm, "baseline": base, "metric": metric, "mean_diff": _finite(diff.mean),
                         "ci_low": _finite(diff.low), "ci_high": _finite(diff.high), "n": diff.n,
                         "n_dropped": diff.n_nonfinite, "verdict": verdict(metric, diff)})
    return rows


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # comparisons.json stays strict JSON


ARMS_NOTE = ("Mean ± 95% interval (Student t over seeds), or mean [low, high] where the interval is clipped to the "
             "metric's range; - : no value. A seed that diverged (stopped, or a non-finite value) is counted in its "
             "cell, not averaged; seeds: runs per arm, with those stopped on a non-finite loss and those the "
             "stability tracker flagged as diverged.")
DIFF_NOTE = ("Paired per seed (the same seed: same data order, same initial weights of shared layers): mean of "
             "arm - baseline with its 95% interval (paired Student t, n - 1 dof) over the seeds finite in both arms, "
             "clipped to the metric's possible differences; left out: seeds missing or non-finite in either arm. "
             "Verdict: better / worse only when the interval excludes 0 (lower is better for losses, stability "
             "counts, uniformity and the specificity statistics, where more negative is the stronger effect); "
             "higher / lower for metrics without a better direction (modality gap, alignment, ...); inside noise "
             "when the interval holds 0; one seed (no data) when one (no) seed pairs.")


def recipe_sections(exp: Mapping[str, Any], results: Sequence[Mapping[str, Any]], comparisons: Sequence[Mapping],
                    heading: str = "##") -> list[str]:
    """The markdown body shared by recipe.md and the findings page: description, arms table, comparison table."""
    arms, metrics = list(exp["arms"]), report_metrics(exp)
    table = aggregate(results, arms, metrics)
    seeds = sorted({r["seed"] for r in results}, key=str)
    times = [r["wall_time_s"] for r in results if _is_number(r.get("wall_time_s"))]
    lines = [str(exp.get("description") or "").strip(), "",
             f"Seeds {seeds}; {len(results)} runs"
             + (f", {sum(times) / 60:.1f} min of training in total (wall time summed over {len(times)} runs)" if times
                else "") + ".", "",
             f"{heading} Arms", "", ARMS_NOTE, "",
             "| arm | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for arm in arms:
        lines.append(f"| {arm} | {_seeds_cell([r for r in results if r['arm'] == arm])} | "
                     + " | ".join(fmt_ci(table[arm][m]) for m in metrics) + " |")
    lines += ["", f"{heading} Paired differences against the baseline", "", DIFF_NOTE, "",
              "| arm | baseline | metric | difference [95% interval] | seeds paired | verdict |",
              "|---|---|---|---|---|---|"]
    for c in comparisons:
        left_out = f" ({c['n_dropped']} left out)" if c["n_dropped"] else ""
        lines.append(f"| {c['arm']} | {c['baseline']} | {c['metric']} | {_diff_cell(c)} | {c['n']}{left_out} | "
                     f"{c['verdict']} |")
    return lines


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


def write_recipe_report(exp: Mapping[str, Any], name: str, results: Sequence[Mapping[str, Any]],
                        exp_dir: Path) -> Path:
    """Write comparisons.json, then recipe.md and its PNGs (tables and plots from results + comparisons)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, metrics = list(exp["arms"]), report_metrics(exp)
    comparisons = compare(results, exp, metrics)
    (exp_dir / "comparisons.json").write_text(json.dumps(comparisons, indent=1))
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
            ax.set_xlabel(exp.get("x_label", ""))
            ax.legend()
        else:
            ax.bar(range(len(arms)), means, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(arms))])
            ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right")
        ax.set_ylabel(m)
        ax.set_title(f"{name}: {m}")
        plots.append(save_figure(fig, exp_dir / f"{_slug(m).replace('/', '_')}.png"))
    lines = [f"# Recipe {name}", "", *recipe_sections(exp, results, comparisons), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    report = exp_dir / "recipe.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def findings(runs_dir: str | Path) -> str:
    """A markdown page of every recipe folder under ``runs_dir`` with results.json and every sweep with a journal
    in ``runs_dir/sweeps/`` (its report.md, rewritten from the study storage), computed from those files alone."""
    runs_dir = Path(runs_dir)
    folders = sorted(p.parent for p in runs_dir.rglob("results.json"))
    journals = sorted((runs_dir / "sweeps").glob("*.journal"))
    lines = ["# Findings", "",
             f"Generated by `python scripts/report.py --findings {runs_dir}` from the results files below: every "
             "number and verdict word is computed from them (docs/design.md, \"Measurements and claims\"). "
             f"{len(folders)} recipe folder(s), {len(journals)} sweep(s).", ""]
    for folder in folders:
        lines += [f"## {folder.name}", "", f"Source: `{folder / 'results.json'}`.", ""]
        try:
            exp, results = read_recipe_folder(folder)
        except FileNotFoundError as err:
            lines += [f"Not summarised: {err}", ""]
            continue
        lines += recipe_sections(exp, results, compare(results, exp, report_metrics(exp)), heading="###") + [""]
    for journal in journals:
        lines += [f"## {journal.stem} (sweep)", "", f"Source: `{journal}` (Optuna journal storage).", ""]
        try:
            rows = summarise(sweep_studies(runs_dir / journal.stem, storage=str(journal)))
        except FileNotFoundError as err:
            lines += [f"Not summarised: {err}", ""]
            continue
        lines += report_lines(journal.stem, rows)[1:] + [""]  # its title is the section heading above
    return "\n".join(lines)
