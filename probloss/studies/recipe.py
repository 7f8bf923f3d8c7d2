"""Recipes: a grid of training runs (arms x seeds) from configs/recipe/<name>.yaml, and its report.

    python scripts/run_recipe.py recipe=bias_init [recipe.seeds=[0,1,2]] [training overrides]
    python scripts/run_recipe.py recipe=proposal recipe.workers=2          # two local worker processes
    python scripts/run_recipe.py recipe=proposal recipe.storage=postgresql://user@host/db   # on every machine
    python scripts/run_recipe.py recipe=proposal recipe.report_only=true   # the report of what is complete
    python scripts/report.py runs/bias_init              # re-render recipe.md + comparisons.json, no training

A recipe names its ``arms`` (arm -> training overrides), the ``seeds``, ``overrides`` shared by every run,
optional extra ``evaluations`` of each final checkpoint (name -> overrides, e.g. image noise), the ``metrics`` to
report, the ``baseline`` arm the others are compared with, fixed values every arm is compared with
(``constants``, e.g. chance), its few ``primary`` comparisons (declared before it runs) and ``vary_data`` (each
seed its own data draw; configs/recipe/_base.yaml documents every key).
Each run is an ordinary run folder ``<out_dir>/<recipe>/<loss>/<arm>-seed<k>`` (the recipe's name is the runs'
``experiment``); a run whose summary.json exists is not trained again, so an interrupted recipe continues where
it stopped. A run that stops on a non-finite loss (diverged) is a result, not a crash: its row is kept.

The grid is a work queue on an Optuna study (``recipe-<name>-<settings hash>`` in ``recipe.storage``, by default
the journal file ``<out_dir>/<recipe>/queue.journal``): each cell is a trial that one worker claims, trains
(heartbeat while it runs) and completes. Any number of workers share it -- ``recipe.workers`` local processes
(probloss/studies/workers.py), the same command started again in another shell or on another machine with the same
storage, or a Slurm job array (``recipe.launcher=submitit``) -- and every cell is trained once. A worker that
dies loses nothing: a live worker fails its trial (process id on this host, heartbeat older than
``recipe.grace_period`` elsewhere), queues the cell again, and the worker that takes it resumes the run from its
newest checkpoint (``resume=auto``; without one the dead worker's folder is removed and the run starts again).
results.json, comparisons.json and recipe.md are written once, by the worker that takes the last unit of the
queue (enqueued once every cell is complete); running the finished command again trains and writes nothing;
``recipe.report_only=true`` writes them from the cells that are complete. Every run is deterministic on its own
(one thread each by default), so the results do not depend on the number of workers, bit for bit.

The recipe folder ``<out_dir>/<recipe>/`` holds:

- ``recipe.json``: the recipe as run (with overrides) plus ``timing``: ``runs_wall_time_s`` summed over the
  ``runs_timed`` runs trained, ``invocation_wall_time_s`` of the worker that wrote it, ``grid_wall_time_s`` from
  the first cell claimed to the report (all workers).
- ``queue.journal``: the work queue (default storage; ``optuna-dashboard queue.journal`` shows it).
- ``results.json``: one row per arm x seed: ``arm``, ``seed``, ``gen_seed`` (the run's data draw; null for data
  without a generator), ``run_dir``, ``wall_time_s``, ``status`` and every
  number of the run's summary.json (and of its extra evaluations, as ``<evaluation>/<key>``). A reported metric
  that a run's summary lacks (added to the instruments after the run) is filled from its final checkpoint and
  named in ``backfilled`` (``backfill_metrics``).
- ``comparisons.json``: one row per compared arm x metric (``compare``), and per arm x ``constants`` entry (its
  ``baseline`` reads "constant <value>": a one-sample t of arm - value): ``arm``, ``baseline``, ``metric``, the
  paired difference against the baseline over seeds (``mean_diff``, ``n``, ``n_dropped``), its 95% interval
  (``ci_low``, ``ci_high``), ``p`` (two-sided, of the same paired t; null below two seeds), ``primary``,
  ``p_adjusted`` (Holm over the recipe's non-primary rows; ``p`` on primary rows) and the verdict word (the
  interval's on primary rows, probloss.studies.stats.verdict; else also p_adjusted < 0.05, adjusted_verdict).
- ``recipe.md`` + one PNG per metric, rendered from the two files above: the arms x metrics table (mean ± 95%
  interval, clipped to the metric's range, diverged seeds counted) and the paired comparison table.

This module runs the grid and collects its rows; the numbers of its report are computed by
probloss/studies/stats.py (``compare`` hands it the recipe's pairs, constants and primaries), its page and plots
drawn by probloss/studies/render.py, and pages across recipes (``--findings``, ``--publish``, ``--multiplicity``)
live in probloss/studies/findings.py.

Paired design: seed s gives every arm the same data order (the loader is seeded by seed, epoch, rank and world
size) and the same initial weights of the layers the arms share (the towers and projections are built first,
from the same seed; log-std heads come after them) and the same data draw (``data.gen_seed=<seed>`` with
``vary_data``: training samples, val and test sets and held-out combinations) -- as long as the arm keeps the
batch size and data options; arms that change those still pair by seed, but the pairing then removes less noise.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from omegaconf import OmegaConf

from probloss.errors import ConfigError, NonFiniteLossError
from probloss.files import slug
from probloss.studies.readers import read_recipe_folder, read_sweep
from probloss.studies.render import write_recipe_page
from probloss.studies.stats import is_number, paired_comparisons, summarise
from probloss.studies.sweep import claim as claim_unit, heartbeat, reap_dead_trials, retry_concurrent, storage_for, unit_owner
from probloss.studies.settings import RecipeSettings
from probloss.studies.workers import choose_workers, run_local, run_submitit
from probloss.training.checkpoint import newest_checkpoint
from probloss.training.config import compose_config, config_dir, config_groups, override_key
from probloss.training.evaluation import evaluate_checkpoint
from probloss.training.loop import run_training
from probloss.training.run_folder import run_base
from probloss.training.settings import RunSettings


def load_recipe(argv: Sequence[str]) -> tuple[str, RecipeSettings, list[str]]:
    """(name, the recipe section (checked: probloss/studies/settings.py), training overrides) of a
    ``scripts/run_recipe.py`` command line.

    ``argv`` is composed with configs/recipe.yaml (the training config plus ``recipe=<name>``), so every key is
    checked like a training run's; the training overrides are ``argv`` minus the ``recipe`` ones.
    """
    own = [a for a in argv if override_key(a).startswith("recipe")]
    # The recipe's own group choices (model=lit, data=webdataset) come first, so that the command line's keys
    # are checked against the model and data the runs will use.
    groups = config_groups("train")
    shared = compose_config(own, config_name="recipe").recipe.overrides
    choices = [o for o in shared if o.split("=", 1)[0] in groups]
    cfg = compose_config([*choices, *argv], config_name="recipe")
    recipe = RecipeSettings.of(OmegaConf.to_container(cfg.recipe, resolve=True))
    name = next(a.split("=", 1)[1] for a in argv if a.startswith("recipe="))
    if not recipe.arms:
        raise ConfigError(f"recipe {name!r} has no arms (arm name -> training overrides)")
    baselines(recipe)  # a misspelt baseline or primary comparison fails now, not after hours of training
    constants(recipe)
    primaries(recipe)
    train_overrides = [a for a in argv if a not in own]
    recipe = dataclasses.replace(recipe, learning_rates_used=arm_learning_rates(recipe, train_overrides))
    return name, recipe, train_overrides


def arm_learning_rates(exp: RecipeSettings | Mapping[str, Any], train_overrides: Sequence[str] = ()
                       ) -> dict[str, dict[str, Any]]:
    """{arm: {"lr", "source"}}: each arm's learning rate and where it came from (recorded in recipe.json).

    ``learning_rates`` is null (every arm trains at what its overrides or the training config say: {} here), a
    mapping {arm or loss name: lr} (an arm's own name first, then its loss's), or a finished learning-rate sweep:
    the path of its per-trial table (``trials.json``, or the sweep folder holding it) or of its Optuna journal,
    from which each arm takes the val-best learning rate of its loss (probloss.studies.stats.summarise: the best mean
    over seeds of the sweep's first objective). A learning rate set by the recipe's shared overrides, the arm or
    the command line wins over both, and is recorded as such.
    """
    exp = RecipeSettings.of(exp)
    spec = exp.learning_rates
    if spec is None:
        return {}
    if isinstance(spec, str):
        path = Path(spec)
        if not path.exists() and (config_dir().parent / spec).exists():  # a committed table, from another folder
            path = config_dir().parent / spec
        try:
            rows = summarise(read_sweep(path))
        except FileNotFoundError as err:
            raise ConfigError(f"recipe learning_rates: {err}") from None
        table = {loss: row["best_lr"] for loss, row in rows.items() if row.get("best_lr") is not None}
        source = f"val-best of the sweep {spec}"
    elif isinstance(spec, Mapping):
        table, source = dict(spec), "the recipe's learning_rates map"
    else:
        raise ConfigError(f"recipe learning_rates must be null, a mapping {{arm or loss: lr}} or the path of a "
                          f"finished sweep (trials.json or journal), got {spec!r}")
    used = {}
    for arm, arm_overrides in exp.arms.items():
        sources = (("the recipe's overrides", exp.overrides), ("the arm", arm_overrides),
                   ("the command line", train_overrides))
        given = [(where, o.split("=", 1)[1]) for where, ovs in sources for o in ovs if override_key(o) == "trainer.lr"]
        if given:
            used[arm] = {"lr": float(given[-1][1]), "source": f"set by {given[-1][0]}"}
            continue
        loss = next((o.split("=", 1)[1] for _, ovs in sources for o in reversed(list(ovs)) if override_key(o) == "loss"),
                    None) or _default_loss()
        key = arm if arm in table else loss
        if key not in table:
            raise ConfigError(f"recipe learning_rates has no learning rate for arm {arm!r} (loss {loss!r}): "
                              f"{source} holds {sorted(table)}; add the arm or its loss, or set trainer.lr in the arm")
        lr = float(table[key])
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"recipe learning_rates: {key}: {table[key]!r} is not a finite learning rate > 0")
        used[arm] = {"lr": lr, "source": f"{source} ({key})"}
    return used


@functools.lru_cache(maxsize=None)
def _default_loss() -> str:
    return str(compose_config([]).loss.name)


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


def constants(exp: Mapping[str, Any]) -> list[tuple[str, str, str, float]]:
    """(arm, baseline label, metric, value): every arm against each fixed value of ``constants``.

    ``constants`` maps a reported metric to a fixed value (e.g. chance, 0.5 for an AUROC): every arm's value is
    compared with it seed by seed (d = arm - value, the same paired t and interval as an arm baseline, i.e. a
    one-sample t against the value). The row's baseline reads ``constant <value>`` (e.g. "constant 0.5"), which
    is also how ``primary`` names it.
    """
    spec = exp.get("constants") or {}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"recipe constants must map a reported metric to a number, got {spec!r}")
    metrics = report_metrics(exp)
    out = []
    for metric, value in spec.items():
        if metric not in metrics or not is_number(value) or not math.isfinite(value):
            raise ConfigError(f"recipe constants: {metric}: {value!r} must be a reported metric ({metrics}) with a "
                              "finite number")
        out.extend((arm, f"constant {value:g}", str(metric), float(value)) for arm in exp["arms"])
    return out


MAX_PRIMARY = 8


def primaries(exp: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    """The recipe's declared primary comparisons as (arm, baseline, metric), checked against its comparisons.

    ``primary`` is a list of at most ``MAX_PRIMARY`` mappings {arm, baseline, metric}: the few comparisons a
    recipe is run to answer, declared before it runs. They keep the interval's verdict; every other row of
    comparisons.json is Holm-adjusted (``compare``). Missing (old recipe folders) or empty: none.
    """
    entries = exp.get("primary") or []
    if len(entries) > MAX_PRIMARY:
        raise ConfigError(f"recipe primary lists {len(entries)} comparisons; at most {MAX_PRIMARY}: a primary "
                          "comparison is one the recipe is run to answer, the rest are Holm-adjusted")
    pairs, metrics = baselines(exp), report_metrics(exp)
    fixed = {(arm, label, metric) for arm, label, metric, _ in constants(exp)}
    declared = set()
    for entry in entries:
        if not isinstance(entry, Mapping) or set(entry) != {"arm", "baseline", "metric"}:
            raise ConfigError(f"recipe primary entry {entry!r} is not a mapping with exactly the keys arm, baseline "
                              "and metric")
        arm, base, metric = (str(entry[k]) for k in ("arm", "baseline", "metric"))
        if (arm, base, metric) in fixed:
            declared.add((arm, base, metric))
            continue
        if (arm, base) not in pairs:
            raise ConfigError(f"recipe primary compares {arm!r} with {base!r}, not a comparison of the recipe; "
                              f"(arm, baseline) pairs: {pairs} (recipe.primary=[...] declares others, [] none)")
        if metric not in metrics:
            raise ConfigError(f"recipe primary names metric {metric!r}, not a reported metric of the recipe; "
                              f"metrics: {metrics} (recipe.primary=[...] declares others, [] none)")
        declared.add((arm, base, metric))
    return declared


def cell_overrides(exp: RecipeSettings | Mapping[str, Any], name: str, arm: str, arm_overrides: Sequence[str],
                   seed: Any, train_overrides: Sequence[str]) -> list[str]:
    """The training overrides of one cell (arm, seed): the recipe's shared ones, the arm's, the command line's,
    then the cell's experiment, seed, run name (``<arm>-seed<k>``) and data draw (:func:`data_draw`); the arm's
    learning rate from ``learning_rates`` (:func:`arm_learning_rates`) comes after the shared overrides."""
    exp = RecipeSettings.of(exp)
    chosen = exp.learning_rates_used.get(arm)
    lr = [f"trainer.lr={chosen['lr']!r}"] if chosen and not chosen["source"].startswith("set by") else []
    overrides = [*exp.overrides, *lr, *arm_overrides, *train_overrides, f"experiment={name}",
                 f"seed={seed}", f"run_name={slug(arm)}-seed{seed}"]
    return [*overrides, *data_draw(exp, overrides, seed)]


def run_recipe(argv: Sequence[str], log=print) -> Path:
    """Run the recipe's grid (arms x seeds) as a work queue and write its report once, when the grid is complete.

    With ``recipe.workers`` > 1 (or ``recipe.launcher=submitit``) this command starts that many workers and waits;
    otherwise it is one worker itself (:func:`recipe_worker`). ``recipe.report_only=true``: no training, the report
    of the cells that are complete. Returns the path of recipe.md.
    """
    name, exp, train_overrides = load_recipe(argv)
    base = RunSettings.from_config(compose_config([*exp.overrides, *train_overrides]))
    exp_dir = Path(os.path.expanduser(base.out_dir)) / name
    exp_dir.mkdir(parents=True, exist_ok=True)
    run_dirs(exp, name, train_overrides)  # every arm's keys are checked before any training
    if exp.report_only:
        return write_results(exp, name, train_overrides, exp_dir, complete_only=True, log=log)
    launcher = exp.launcher
    cells = len(exp.arms) * len(exp.seeds)
    n, why = choose_workers(exp.workers, cells, base.trainer.num_threads, base.fabric.accelerator)
    if n > 1 or launcher == "submitit":
        log(f"[{name}] {n} workers via {launcher} ({why}) for {cells} runs", flush=True)
        if launcher == "submitit":
            run_submitit("recipe", argv, "recipe", n, exp.slurm, exp_dir / "submitit",
                         base.trainer.num_threads, log=log)
        else:
            run_local("recipe", argv, "recipe", n, base.trainer.num_threads)
        return exp_dir / "recipe.md"
    return recipe_worker(exp, name, train_overrides, exp_dir, log=log)


# --- the grid as a work queue -----------------------------------------------------------------------------------
#
# Each cell (arm, seed) is a trial of an Optuna study ``recipe-<name>-<settings hash>`` in the recipe's storage
# (a journal file beside the recipe folder by default): enqueued with the user attribute ``unit`` = the cell's
# key, claimed by whichever worker asks for it (Optuna hands a waiting trial to one worker only), heartbeated
# while it trains, told COMPLETE (its value: the run's wall time) when its run folder holds summary.json.
# Several workers may enqueue the same cell at the same moment: only the unit's lowest-numbered trial that is
# not FAIL runs, and a worker handed another drops it (probloss.studies.sweep.unit_owner, claim), so every unit runs
# once. The report is the last unit: enqueued once every cell is COMPLETE, run by one worker.

def _unit(arm: str, seed: Any) -> str:
    return json.dumps([arm, seed])


def settings_hash(exp: RecipeSettings, name: str, train_overrides: Sequence[str]) -> str:
    """What a cell's run depends on besides its seed (arms, overrides, evaluations, metrics): workers with
    equal hashes share a queue; another recipe with the same name (other arms or overrides) gets its own."""
    arms = {arm: cell_overrides(exp, name, arm, ov, "<seed>", train_overrides) for arm, ov in exp.arms.items()}
    key = json.dumps({"arms": arms, "evaluations": exp.evaluations or {}, "metrics": exp.metrics},
                     sort_keys=True, default=str)
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def open_recipe_study(exp: RecipeSettings, name: str, train_overrides: Sequence[str], exp_dir: Path):
    """(study, storage) of the recipe's queue: ``recipe.storage`` (an RDB URL or a journal path) or the journal
    file ``<out_dir>/<recipe>/queue.journal``."""

    storage = storage_for(exp.storage or str(exp_dir / "queue.journal"), exp_dir, name,
                          exp.heartbeat_interval, exp.grace_period)
    study_name = f"recipe-{name}-{settings_hash(exp, name, train_overrides)}"
    study = retry_concurrent(lambda: optuna.create_study(
        study_name=study_name, storage=storage, direction="minimize", load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(seed=0)), f"creating study {study_name}")  # no parameters to sample
    return study, storage


def recipe_worker(exp: RecipeSettings, name: str, train_overrides: Sequence[str], exp_dir: Path,
                  log=print) -> Path:
    """Claim cells of the recipe's queue and train them until every cell is COMPLETE; the worker that claims the
    report unit writes results.json, comparisons.json and recipe.md. Dead workers' cells (heartbeat or process
    id, probloss.studies.sweep.fail_dead_trials) are failed, queued again and resumed from their newest checkpoint."""

    state = optuna.trial.TrialState
    started = time.perf_counter()
    study, storage = open_recipe_study(exp, name, train_overrides, exp_dir)
    cells = {_unit(arm, seed): (arm, seed) for arm in exp.arms for seed in exp.seeds}
    report_unit = "report:" + hashlib.sha1(json.dumps(sorted(cells)).encode()).hexdigest()[:10]  # of this grid
    interval = float(exp.heartbeat_interval)
    ran = 0
    while True:
        reap_dead_trials(study, storage, exp.grace_period, log)
        trials = study.get_trials(deepcopy=False)
        owners = {unit: unit_owner(trials, "unit", unit) for unit in [*cells, report_unit]}
        grid_done = all(owners[u] is not None and owners[u].state == state.COMPLETE for u in cells)
        if grid_done and owners[report_unit] is not None and owners[report_unit].state == state.COMPLETE:
            if not ran:
                log(f"[{name}] every run is complete and the report was written (recipe.report_only=true writes "
                    "it again)", flush=True)
            return exp_dir / "recipe.md"
        for unit in ([report_unit] if grid_done else cells):
            if owners[unit] is None:
                study.enqueue_trial({}, user_attrs={"unit": unit})
        if not any(t.state == state.WAITING for t in study.get_trials(deepcopy=False, states=(state.WAITING,))):
            time.sleep(min(2.0, interval))  # the rest is running on other workers: they finish or go stale
            continue
        trial = claim_unit(study, "unit")
        if trial is None:  # another worker took the queue's last unit, or this was a second copy of a unit
            continue
        unit = trial.user_attrs["unit"]
        t0 = time.perf_counter()
        try:
            with heartbeat(storage, trial, interval):
                if unit == report_unit:
                    write_results(exp, name, train_overrides, exp_dir, study=study, started=started, log=log)
                else:
                    arm, seed = cells[unit]
                    trained_for = run_cell(exp, name, arm, seed, train_overrides, log=log)
                    if trained_for is not None:
                        trial.set_user_attr("wall_time_s", trained_for)
        except BaseException:  # a crash (or Ctrl-C): the unit goes back to the queue for the next worker
            study.tell(trial, state=state.FAIL)
            raise
        study.tell(trial, time.perf_counter() - t0)
        ran += 1


def run_dirs(exp: RecipeSettings, name: str, train_overrides: Sequence[str]) -> dict[tuple[str, Any], Path]:
    """{(arm, seed): run folder} in arm x seed order, as training names them. One config per arm is composed
    (which checks its keys): the folder ``<out_dir>/<recipe>/<loss>/<arm>-seed<k>`` depends on the seed only
    through its name, and composing takes about half a second."""
    seeds = exp.seeds
    found = {}
    for arm, arm_overrides in exp.arms.items():
        cfg = compose_config(cell_overrides(exp, name, arm, arm_overrides, seeds[0] if seeds else 0, train_overrides))
        base = run_base(RunSettings.from_config(cfg))
        for seed in seeds:
            overrides = cell_overrides(exp, name, arm, arm_overrides, seed, train_overrides)
            found[(arm, seed)] = base / f"{slug(arm)}-seed{seed}"
            _check_reused_draw(found[(arm, seed)],
                               seed if f"data.gen_seed={seed}" in overrides else cfg.data.get("gen_seed"))
    return found


def run_cell(exp: RecipeSettings, name: str, arm: str, seed: Any, train_overrides: Sequence[str],
             log=print) -> float | None:
    """Train one cell unless its run folder holds summary.json (resuming from its newest checkpoint, if a dead
    worker left one), then its extra evaluations; returns the training wall time, None when nothing trained."""
    overrides = cell_overrides(exp, name, arm, exp.arms[arm], seed, train_overrides)
    run_dir = run_base(RunSettings.from_config(compose_config(overrides))) / f"{slug(arm)}-seed{seed}"
    trained_for = None
    if not (run_dir / "summary.json").is_file():
        if run_dir.is_dir() and newest_checkpoint(run_dir) is None:
            shutil.rmtree(run_dir)  # a dead worker's start with nothing to resume: begin again, one event file
        resumed = f" (resuming from {newest_checkpoint(run_dir).name})" if run_dir.is_dir() else ""
        log(f"[{name}] training {arm} seed {seed}{resumed}", flush=True)
        t0 = time.perf_counter()
        try:  # resume=auto (same overrides: the run's saved config must agree) only where there is a checkpoint
            run_dir = run_training([*overrides, "resume=auto"] if run_dir.is_dir() else overrides, table=False).run_dir
        except NonFiniteLossError as err:  # diverged: a result to count and show, not a crash
            log(f"[{name}] {arm} seed {seed} diverged: {err}", flush=True)
        trained_for = time.perf_counter() - t0
    cell_row(exp, arm, seed, run_dir, trained_for, log=log)  # the extra evaluations, cached in the run folder
    return trained_for


def cell_row(exp: RecipeSettings, arm: str, seed: Any, run_dir: Path, trained_for: float | None,
             log=print) -> dict[str, Any]:
    """The results.json row of a trained cell: its summary.json, the extra evaluations (each cached as
    ``<run>/eval-<name>.json``) and backfilled metrics."""
    summary = json.loads((run_dir / "summary.json").read_text())  # a stopped run wrote its status and error
    if trained_for is not None:
        summary.setdefault("wall_time_s", trained_for)  # a stopped run's summary has no time of its own
    finished = summary.get("status", "finished") == "finished"
    for evaluation, eval_overrides in exp.evaluations.items() if finished else ():
        metrics = cached_evaluation(run_dir, evaluation, eval_overrides)
        summary.update({f"{evaluation}/{k}": v for k, v in metrics.items()})
    if finished:
        backfill_metrics(run_dir, summary, exp.metrics, log=log)
    return {"arm": arm, "seed": seed, "gen_seed": _trained_gen_seed(run_dir), "run_dir": str(run_dir), **summary}


def write_results(exp: RecipeSettings, name: str, train_overrides: Sequence[str], exp_dir: Path, study=None,
                  started: float | None = None, complete_only: bool = False, log=print) -> Path:
    """Write recipe.json, results.json and the report from the cells' run folders (``complete_only``: the cells
    whose summary.json exists; otherwise every cell must have one). Training wall times come from the queue."""
    if study is None:
        try:
            study = open_recipe_study(exp, name, train_overrides, exp_dir)[0]
        except Exception:  # no queue (an old recipe folder, or an RDB storage unreachable from here)
            study = None
    times = {}
    if study is not None:
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if "wall_time_s" in t.user_attrs:
                times[t.user_attrs.get("unit")] = t.user_attrs["wall_time_s"]
    results = []
    for (arm, seed), run_dir in run_dirs(exp, name, train_overrides).items():
        if complete_only and not (run_dir / "summary.json").is_file():
            continue
        results.append(cell_row(exp, arm, seed, run_dir, times.get(_unit(arm, seed)), log=log))
    walls = [r["wall_time_s"] for r in results if is_number(r.get("wall_time_s"))]
    first_start = None
    if study is not None:
        starts = [t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start is not None]
        first_start = min(starts).timestamp() if starts else None
    timing = {"runs_wall_time_s": sum(walls), "runs_timed": len(walls)}
    if started is not None:
        timing["invocation_wall_time_s"] = time.perf_counter() - started
    if first_start is not None and not complete_only:
        timing["grid_wall_time_s"] = time.time() - first_start  # the first claim to now, over all workers
    recipe = {**exp.to_dict(), "timing": timing}
    (exp_dir / "recipe.json").write_text(json.dumps(recipe, indent=1))  # the resolved file, for re-rendering
    (exp_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report = write_recipe_report(recipe, name, results, exp_dir)
    log(f"[{name}] wrote {report} ({len(results)} runs)", flush=True)
    return report


def data_draw(exp: RecipeSettings | Mapping[str, Any], overrides: Sequence[str], seed: Any) -> list[str]:
    """The override that gives a run the data draw of its seed: ``data.gen_seed=<seed>``, or nothing.

    With ``vary_data`` (the default) every run generates the shapes data from its own seed (samples, val and test
    sets and the held-out colour x shape combinations: probloss.data.shards), so the intervals over seeds include
    data sampling; arms stay paired, since seed s gives every arm the same draw. Nothing is added when
    ``vary_data`` is false, when the recipe, the arm or the command line sets data.gen_seed itself, or when the
    run's data group has no generator (webdataset shards have no data.gen_seed).
    """
    if not RecipeSettings.of(exp).vary_data or any(override_key(o) == "data.gen_seed" for o in overrides):
        return []
    choice = next((o.split("=", 1)[1] for o in reversed(overrides) if override_key(o) == "data"), None)
    return [f"data.gen_seed={seed}"] if _has_generator(choice) else []


@functools.lru_cache(maxsize=None)
def _has_generator(data_choice: str | None) -> bool:
    """Whether the data group (None: the default one) has a ``gen_seed`` key (read once per choice; its file alone,
    since a group such as webdataset does not compose without its shard keys)."""
    if data_choice is None:
        return "gen_seed" in compose_config([]).data
    path = config_dir() / "data" / f"{data_choice}.yaml"
    return path.is_file() and "gen_seed" in OmegaConf.load(path)


def _trained_gen_seed(run_dir: Path) -> Any:
    """The ``data.gen_seed`` a run folder's config.yaml says it trained with (None: no config, or no such key)."""
    config = run_dir / "config.yaml"
    return OmegaConf.load(config).get("data", {}).get("gen_seed") if config.is_file() else None


def _check_reused_draw(run_dir: Path, gen_seed: Any) -> None:
    """Refuse to reuse a finished run trained on another data draw than the one the recipe now asks for (e.g. a
    folder of a recipe run before ``vary_data``): its row would silently pair different draws."""
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.yaml").is_file():
        return
    trained = _trained_gen_seed(run_dir)
    if trained != gen_seed:
        raise ConfigError(f"{run_dir} was trained with data.gen_seed={trained}, this recipe asks for {gen_seed}: "
                          "use another out_dir, or recipe.vary_data=false (or data.gen_seed=...) to continue a "
                          "study with one data draw")


def render_recipe(exp_dir: str | Path) -> Path:
    """Write ``recipe.md``, its PNGs and ``comparisons.json`` again from a finished recipe folder (no training)."""
    exp, results = read_recipe_folder(exp_dir)  # the recipe as it was run (with overrides)
    return write_recipe_report(exp, Path(exp_dir).name, results, Path(exp_dir))


def cached_evaluation(run_dir: Path, name: str, overrides: Sequence[str] = ()) -> dict[str, float]:
    """The numbers of one evaluation of the run's newest checkpoint with ``overrides``, computed once and kept
    as ``<run>/eval-<name>.json``."""
    cached = run_dir / f"eval-{slug(name)}.json"
    if not cached.is_file():
        metrics = evaluate_checkpoint(newest_checkpoint(run_dir), overrides)
        cached.write_text(json.dumps({k: v for k, v in metrics.items() if is_number(v)}, indent=1))
    return json.loads(cached.read_text())


def backfill_metrics(run_dir: Path, summary: dict[str, Any], metrics: Sequence[str], log=print) -> list[str]:
    """Fill the reported ``metrics`` a finished run's summary lacks (the instruments gained a key after the run
    was trained) from one evaluation of its final checkpoint (``cached_evaluation`` "final"); returns the keys
    filled, also listed in the row's ``backfilled``.

    A sigma statistic of a run without sigma (infonce) is not missing. The evaluation is trusted only if it
    reproduces the summary's own test numbers: a checkpoint that is not the
    final one, or evaluation code whose meaning changed since, fills nothing and says why. Keys absent from the
    evaluation too (e.g. sigma metrics of a loss without sigma) stay absent.
    """
    missing = [k for k in metrics if k not in summary and not _sigma_key_without_sigma(k, summary)]
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
    filled = [k for k in missing if is_number(evaluated.get(k))]
    summary.update({k: evaluated[k] for k in filled})
    if filled:
        summary["backfilled"] = filled
    return filled


def _sigma_key_without_sigma(key: str, summary: Mapping[str, Any]) -> bool:
    """Whether ``key`` is a statistic of the model's sigma (``<split>/unc/<stat>``, not a cue's or a training-free
    baseline's) and the run has none to compute it from (no ``<split>/unc/sigma_text_mean``: a loss without
    log-stds): an evaluation would not produce it, so it is not missing."""
    split, _, rest = key.partition("/unc/")
    if not rest or rest.startswith(("cue/", "free/")):
        return False
    return f"{split}/unc/sigma_text_mean" not in summary


def report_metrics(exp: Mapping[str, Any]) -> list[str]:
    """The recipe's headline metrics, then the val/test ones again under each extra evaluation's prefix."""
    metrics = list(exp.get("metrics") or ["test/zeroshot_top1"])
    evaluations = list(exp.get("evaluations") or {})
    return metrics + [f"{e}/{m}" for e in evaluations for m in metrics if m.startswith(("val/", "test/"))]


def compare(results: Sequence[Mapping[str, Any]], exp: Mapping[str, Any], metrics: Sequence[str]) -> list[dict]:
    """The rows of comparisons.json: the recipe's (arm, baseline) pairs (``baselines``), its fixed values
    (``constants``) and its declared primary comparisons (``primaries``), compared seed by seed
    (probloss.studies.stats.paired_comparisons)."""
    declared = primaries(exp)
    return paired_comparisons(results, baselines(exp), constants(exp), declared, metrics)


def write_recipe_report(exp: Mapping[str, Any], name: str, results: Sequence[Mapping[str, Any]],
                        exp_dir: Path) -> Path:
    """Write comparisons.json, then recipe.md and its PNGs (probloss.studies.render.write_recipe_page)."""
    metrics = report_metrics(exp)
    comparisons = compare(results, exp, metrics)
    (exp_dir / "comparisons.json").write_text(json.dumps(comparisons, indent=1))
    return write_recipe_page(exp, name, results, comparisons, metrics, exp_dir)
