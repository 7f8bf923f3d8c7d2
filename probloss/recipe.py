"""Recipes: a grid of training runs (arms x seeds) from configs/recipe/<name>.yaml, and its report.

    python scripts/run_recipe.py recipe=bias_init [recipe.seeds=[0,1,2]] [training overrides]

A recipe names its ``arms`` (arm -> training overrides), the ``seeds``, ``overrides`` shared by every run,
optional extra ``evaluations`` of each final checkpoint (name -> overrides, e.g. image noise), and the
``metrics`` to report (configs/recipe/_base.yaml documents every key). Each run is an ordinary run folder
``<out_dir>/<recipe>/<loss>/<arm>-seed<k>`` (the recipe's name is the runs' ``experiment``); a run whose
summary.json exists is not trained again, so an interrupted recipe continues where it stopped. The report
(``<out_dir>/<recipe>/recipe.md`` + PNGs) gives each metric as mean ± 95% interval over seeds per arm.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from probloss.config import ConfigError, compose_config
from probloss.report import mean_ci, save_figure


def load_recipe(argv: Sequence[str]) -> tuple[str, dict[str, Any], list[str]]:
    """(name, the recipe section, training overrides) of a ``scripts/run_recipe.py`` command line.

    ``argv`` is composed with configs/recipe.yaml (the training config plus ``recipe=<name>``), so every key is
    checked like a training run's; the training overrides are ``argv`` minus the ``recipe`` ones.
    """
    cfg = compose_config(argv, config_name="recipe")
    recipe = OmegaConf.to_container(cfg.recipe, resolve=True)
    name = next(a.split("=", 1)[1] for a in argv if a.startswith("recipe="))
    if not recipe.get("arms"):
        raise ConfigError(f"recipe {name!r} has no arms (arm name -> training overrides)")
    train_overrides = [a for a in argv if not a.split("=", 1)[0].lstrip("+~").startswith("recipe")]
    return name, recipe, train_overrides


def run_recipe(argv: Sequence[str], log=print) -> Path:
    """Train every arm x seed not trained yet, run the extra evaluations, and write the report."""
    from probloss.checkpoint import newest_checkpoint
    from probloss.eval.runtime import evaluate_checkpoint
    from probloss.train import main as train_main

    name, exp, train_overrides = load_recipe(argv)
    out_dir = Path(compose_config(train_overrides)["out_dir"])
    results = []
    for arm, arm_overrides in exp["arms"].items():
        for seed in exp.get("seeds", [0]):
            overrides = [*exp.get("overrides", []), *arm_overrides, *train_overrides, f"experiment={name}",
                         f"seed={seed}", f"run_name={_slug(arm)}-seed{seed}"]
            cfg = compose_config(overrides)  # checks every key before any training
            run_dir = out_dir / name / cfg["loss"]["name"] / f"{_slug(arm)}-seed{seed}"
            summary_path = run_dir / "summary.json"
            if not summary_path.is_file():
                log(f"[{name}] training {arm} seed {seed}", flush=True)
                train_main(overrides)
            summary = json.loads(summary_path.read_text())
            for evaluation, eval_overrides in (exp.get("evaluations") or {}).items():
                cached = run_dir / f"eval-{_slug(evaluation)}.json"
                if not cached.is_file():
                    metrics = evaluate_checkpoint(newest_checkpoint(run_dir), eval_overrides)
                    cached.write_text(json.dumps({k: v for k, v in metrics.items() if _is_number(v)}, indent=1))
                summary.update({f"{evaluation}/{k}": v for k, v in json.loads(cached.read_text()).items()})
            results.append({"arm": arm, "seed": seed, "run_dir": str(run_dir), **summary})
    exp_dir = out_dir / name
    (exp_dir / "recipe.json").write_text(json.dumps(exp, indent=1))  # the resolved file, for re-rendering
    (exp_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report = write_recipe_report(exp, name, results, exp_dir)
    log(f"[{name}] wrote {report}", flush=True)
    return report


def render_recipe(exp_dir: str | Path) -> Path:
    """Write ``recipe.md`` and its PNGs again from a finished recipe folder (no training)."""
    exp_dir = Path(exp_dir)
    results_path, exp_path = exp_dir / "results.json", exp_dir / "recipe.json"
    for path in (results_path, exp_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run python scripts/run_recipe.py "
                                    f"recipe={exp_dir.name} first")
    exp = json.loads(exp_path.read_text())  # the recipe as it was run (with overrides)
    return write_recipe_report(exp, exp_dir.name, json.loads(results_path.read_text()), exp_dir)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))  # also safe in Hydra overrides


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def aggregate(results: Sequence[Mapping[str, Any]], arms: Sequence[str], metrics: Sequence[str]):
    """{arm: {metric: (mean, 95% half-width)}} over seeds."""
    table = {}
    for arm in arms:
        rows = [r for r in results if r["arm"] == arm]
        table[arm] = {m: mean_ci([float(r[m]) for r in rows if _is_number(r.get(m))]) for m in metrics}
    return table


def write_recipe_report(exp: Mapping[str, Any], name: str, results: Sequence[Mapping[str, Any]],
                            exp_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(exp["arms"])
    evaluations = list(exp.get("evaluations") or {})
    metrics = list(exp.get("metrics") or ["test/zeroshot_top1"])
    metrics += [f"{e}/{m}" for e in evaluations for m in exp.get("metrics", []) if m.startswith(("val/", "test/"))]
    table = aggregate(results, arms, metrics)
    seeds = sorted({r["seed"] for r in results})
    lines = [f"# Recipe {name}", "", exp.get("description", "").strip(), "",
             f"Mean ± 95% interval (Student t) over seeds {seeds}.", "",
             "| arm | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for arm in arms:
        cells = []
        for m in metrics:
            mean, half = table[arm][m]
            cells.append("-" if not math.isfinite(mean) else f"{mean:.3f}" + (f" ± {half:.3f}" if math.isfinite(half) else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    plots = []
    for m in metrics:
        means = [table[a][m][0] for a in arms]
        if not any(math.isfinite(v) for v in means):
            continue
        errors = [table[a][m][1] if math.isfinite(table[a][m][1]) else 0.0 for a in arms]
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(arms) + 2), 3.6))
        if exp.get("x"):  # numeric arms (e.g. batch sizes): a line per group, x on a log axis
            groups: dict[str, list] = {}
            for arm, mean, err in zip(arms, means, errors):
                group, x = exp["x"][arm]
                groups.setdefault(group, []).append((x, mean, err))
            for group, points in groups.items():
                xs, ys, es = zip(*sorted(points))
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=group)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(exp.get("x_label", ""))
            ax.legend()
        else:
            ax.bar(range(len(arms)), means, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(arms))])
            ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right")
        ax.set_ylabel(m)
        ax.set_title(f"{name}: {m}")
        plots.append(save_figure(fig, exp_dir / f"{_slug(m).replace('/', '_')}.png"))
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    report = exp_dir / "recipe.md"
    report.write_text("\n".join(lines) + "\n")
    return report
