"""Optuna studies over training runs: search spaces from configs/sweep/*.yaml, one study per loss.

    python scripts/sweep.py sweep=lr loss=sigmoid                      # one worker, journal storage
    python scripts/sweep.py sweep=compare_losses                       # every loss, then best x 3 seeds
    python scripts/sweep.py sweep=lr loss=sigmoid sweep.workers=4        # four local worker processes
    OMP_NUM_THREADS=1 fabric run --devices=2 --main-port=29501 scripts/sweep.py sweep=lr loss=infonce

Every trial is a normal training run (its own run folder, TensorBoard events with hparams, summary.json)
under ``<out_dir>/<experiment>/<loss>/<study>-trial<N>``. Storage: a journal file
``<out_dir>/sweeps/<experiment>.journal`` by default (safe for several worker processes on one machine), or
PostgreSQL (``sweep.storage=postgresql://...``) for workers on many machines; SQLite only for one machine.
The study (``<experiment>-<loss>``, or ``<experiment>-<sweep>-<loss>`` when ``experiment=`` is not the sweep's
name) is created once and workers load it; it records its search space, and opening it with another one is
an error. Workers started together on a fresh database retry their colliding schema creation. A worker asks
for trials while finished plus running ones are fewer than ``sweep.n_trials`` and returns when
``sweep.n_trials`` have finished, so re-running the same command continues a study, and several workers share
one: ``sweep.workers`` local processes, a Slurm job array (``sweep.launcher=submitit``), or the same command
started by hand anywhere. Workers never repeat each other: trial k samples (TPE, random) with a seed made from
``sweep.seed`` and k (recorded as ``sampler_seed``; TPE with ``constant_liar``), a grid's points are enqueued
units in a seeded order (``grid_point``), and so are the seed re-runs of the best configuration: each run once.

An interrupted trial resumes, it does not restart. A worker stopped by SIGTERM/SIGINT saves a checkpoint at the
next step boundary (probloss/training/loop.py), tells its trial FAIL with the attribute ``interrupted`` and exits 143 /
130 with one line naming the trial and the command that resumes it (the same sweep command). The next worker
that asks for work first takes an interrupted trial nobody has taken over (:func:`interrupted_trials`; also one
whose worker died, below): it enqueues the trial's parameters with ``resumes=<its number>`` (claimed once, like
grid points: :func:`claim`) and trains them in the interrupted trial's run folder with ``resume=auto``, so the
run continues from its checkpoint and ends bit-identically where an uninterrupted trial ends; without a
checkpoint the folder is emptied and the trial starts again with the same parameters. A grid point carries
``resumes`` too; a seed re-run resumes its ``<study>-seed<k>`` folder. A trial whose training raised an error
(``crashed``) is not resumed.

A killed worker loses only its running trial's steps since its last checkpoint, on any storage and any host.
Every running trial records a heartbeat every ``sweep.heartbeat_interval`` seconds (Optuna's own on an RDB
storage, timed by the database's clock; a trial attribute on a journal file), and any live worker marks a
RUNNING trial whose heartbeat is older than ``sweep.grace_period`` FAIL before it counts the budget; on a journal
file a worker on the same host fails a dead process's trial at once (process id check). A failed trial does not
count towards ``sweep.n_trials`` (it is resumed; a grid puts its point back in the queue), and a worker whose
budget is taken by trials of other workers waits for them to finish or go stale, so the study always reaches
its budget. A diverging trial
is recorded with its stability metrics (objective: the worst value), never a crash of the study.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from omegaconf import OmegaConf
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna_integration import TorchDistributedTrial
from sqlalchemy.exc import SQLAlchemyError

from probloss import dist
from probloss.errors import ConfigError, NonFiniteLossError, Preempted
from probloss.studies.settings import SweepSettings
from probloss.studies.workers import choose_workers, run_local, run_submitit, worker_index
from probloss.training.checkpoint import newest_checkpoint
from probloss.training.config import compose_config, override_key
from probloss.training.console import say
from probloss.training.launch import launch, make_fabric
from probloss.training.loop import run_training
from probloss.training.run_folder import run_base
from probloss.training.settings import RunSettings

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


# --- configuration ------------------------------------------------------------------------------------------


def load_sweep(argv: Sequence[str]) -> tuple[SweepSettings, list[str]]:
    """The sweep section (checked: probloss/studies/settings.py) and the training overrides of a
    ``scripts/sweep.py`` command line.

    ``argv`` is composed with configs/sweep.yaml (the training config plus ``sweep=<name>``), so every key is
    checked like a training run's; the training overrides are ``argv`` minus the ``sweep`` ones.
    """
    cfg = compose_config(argv, config_name="sweep")
    sweep = SweepSettings.of(OmegaConf.to_container(cfg.sweep, resolve=True))
    train_overrides = [a for a in argv if not override_key(a).startswith("sweep")]
    return sweep, train_overrides


def storage_for(spec: str | None, out_dir: str | Path, experiment: str, heartbeat_interval: int = 30,
                grace_period: int = 120):
    """The Optuna storage: a journal file by default, an RDB URL (with Optuna's heartbeats), or a journal path.

    Workers started together on a fresh database all create its tables at once; one wins, the others fail on a
    duplicate table or row (IntegrityError on SQLite, duplicate type or relation on PostgreSQL): they retry.
    """
    if spec and "://" in spec:
        def connect():
            with warnings.catch_warnings():  # Optuna marks heartbeats experimental (since 2.9); we need them
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(spec, heartbeat_interval=int(heartbeat_interval),
                                                  grace_period=int(grace_period))
        return retry_concurrent(connect, f"connecting to {spec}")

    path = Path(spec) if spec else Path(out_dir) / "sweeps" / f"{experiment}.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def retry_concurrent(make, what: str, attempts: int = 8):
    """``make()``, retried with a growing random pause when a concurrent worker's insert collided with ours
    (SQLAlchemy errors: duplicate tables, rows or types while the schema or the study is being created)."""
    for attempt in range(attempts):
        try:
            return make()
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
            if attempt == attempts - 1:
                raise
            say(f"warning: {what} collided with another worker ({type(err).__name__}); retrying", error=True)
            time.sleep(random.uniform(0.05, 0.2) * 2 ** attempt)


def grid_space(space: Mapping, loss_name: str) -> dict[str, list]:
    """The grid of ``sampler: grid``: every parameter of ``loss_name`` must be categorical."""
    grid = {}
    for key, spec in space.items():
        if spec.get("losses") and loss_name not in spec["losses"]:
            continue
        if spec["type"] != "categorical":
            raise ConfigError(f"sweep.sampler=grid needs categorical parameters; sweep space {key} is "
                              f"{spec['type']!r}: list its values as {{type: categorical, choices: [...]}}")
        grid[key] = list(spec["choices"])
    return grid


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its ``study.stop()`` after the last point: that call only works inside
    ``study.optimize``, and our workers ask and tell (they stop when the study has ``n_trials`` taken)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(cfg: SweepSettings, multi_objective: bool, loss_name: str = "", seed: int | None = None):
    """The study's sampler, seeded with ``seed`` (default ``sweep.seed``; workers pass :func:`trial_seed`)."""
    seed = cfg.seed if seed is None else seed
    kind = cfg.sampler
    if kind == "grid":  # the points are enqueued (enqueue_grid); the sampler only serves a trial asked without one
        return AskTellGridSampler(grid_space(cfg.space, loss_name), seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        if multi_objective:
            return optuna.samplers.NSGAIISampler(seed=seed)
        # constant_liar: a running trial counts as a bad result, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ConfigError(f"unknown sweep.sampler {kind!r}; choose tpe, random, nsga2 or grid")


def reseeds_per_trial(cfg: SweepSettings, multi_objective: bool) -> bool:
    """Whether the sampler draws every parameter when the trial suggests it (TPE, random): then each trial gets
    a sampler seeded by its own number, known only after ``ask`` (NSGA-II and the grid choose at ``ask``)."""
    return cfg.sampler in ("tpe", "random") and not multi_objective


def trial_seed(sweep_seed: int, identity: str | int) -> int:
    """A sampler seed from the sweep's seed and a trial number (or a worker's identity): reproducible, and
    different for every trial, so two workers asking at the same moment never draw the same parameters
    (with one seed for all, two workers started together repeated each other's trials)."""
    return zlib.crc32(f"{sweep_seed}:{identity}".encode())


def make_pruner(cfg: SweepSettings):
    kind = cfg.pruner
    warmup = int(cfg.pruner_warmup_evals)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"unknown sweep.pruner {kind!r}; choose median, hyperband or none")


def open_study(cfg: SweepSettings, storage, study_name: str, loss_name: str = "") -> optuna.Study:
    """Create the study once (or load it: another worker may have created it a moment ago).

    The study records its search (space, objectives, sampler, grid) as the user attribute ``search``; opening
    it with another search is an error (two sweeps given one name would silently share trials and results).
    """
    directions = [o["direction"] for o in cfg.objectives]
    study = retry_concurrent(lambda: optuna.create_study(
        study_name=study_name, storage=storage, directions=directions, load_if_exists=True,
        sampler=make_sampler(cfg, len(directions) > 1, loss_name), pruner=make_pruner(cfg),
    ), f"creating study {study_name}")
    search = search_signature(cfg, loss_name)
    recorded = study.user_attrs.get("search")
    if recorded is None:
        study.set_user_attr("search", search)
    elif recorded != search:
        raise ConfigError(f"study {study_name!r} in this storage was created with another search ({recorded}); "
                          f"this sweep asks for {search}. Choose another experiment=... or sweep.study_name=..., "
                          "or another storage")
    return study


def search_signature(cfg: SweepSettings, loss_name: str) -> str:
    """What makes two sweeps the same search: the space searched for ``loss_name``, objectives and sampler."""
    space = {k: v for k, v in cfg.space.items() if not v.get("losses") or loss_name in v["losses"]}
    return json.dumps({"space": space, "objectives": list(cfg.objectives), "sampler": cfg.sampler},
                      sort_keys=True, default=str)


def grid_points(cfg: SweepSettings | Mapping, loss_name: str) -> list[dict[str, Any]]:
    """Every point of ``sampler: grid``, in a seeded order (``sweep.seed``): the order trials take them in."""
    cfg = SweepSettings.of(cfg)
    grid = grid_space(cfg.space, loss_name)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    random.Random(int(cfg.seed)).shuffle(points)
    return points


def enqueue_grid(study: optuna.Study, points: Sequence[Mapping[str, Any]]) -> int:
    """Enqueue every grid point that has no live trial (waiting, running or finished) as a unit ``grid_point``;
    returns how many trials wait. Workers that race here may enqueue a point twice: :func:`claim` runs one copy.
    (Optuna's grid sampler picks its point at ``ask`` from its own seeded generator, so two workers asking at the
    same moment took the same point: 3 distinct of 4 in a 2-worker LR grid, one point never run.)"""
    trials = study.get_trials(deepcopy=False)
    interrupted = {t.user_attrs.get("grid_point"): t.number for t in interrupted_trials(trials)}
    for point in points:
        unit = json.dumps(point, sort_keys=True)
        if unit_owner(trials, "grid_point", unit) is None:  # never run, or its worker died (FAIL)
            attrs = {"grid_point": unit}
            if unit in interrupted:  # trained on from its checkpoint, not from step 0
                attrs["resumes"] = interrupted[unit]
            study.enqueue_trial(dict(point), user_attrs=attrs, skip_if_exists=False)
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def trial_budget(cfg: SweepSettings, loss_name: str) -> int:
    """``n_trials``; for a grid without one, the size of the grid."""
    if cfg.n_trials is not None:
        return int(cfg.n_trials)
    if cfg.sampler != "grid":
        raise ConfigError("sweep.n_trials is null; give a number of trials (only sampler=grid can leave it null)")
    return math.prod(len(choices) for choices in grid_space(cfg.space, loss_name).values())


def suggest_overrides(trial, space: Mapping, loss_name: str) -> list[str]:
    """Training overrides for one trial. A parameter with ``losses: [...]`` is searched only for those losses."""
    overrides = []
    for key, spec in space.items():
        if spec.get("losses") and loss_name not in spec["losses"]:
            continue
        if spec["type"] == "float":
            value = trial.suggest_float(key, spec["low"], spec["high"], log=bool(spec.get("log", False)))
        elif spec["type"] == "int":
            value = trial.suggest_int(key, spec["low"], spec["high"], log=bool(spec.get("log", False)))
        else:
            value = trial.suggest_categorical(key, list(spec["choices"]))
        overrides.append(f"{key}={value}")
    return overrides


def objective_values(summary: Mapping[str, Any], objectives: Sequence[Mapping]) -> list[float]:
    """The objectives from a run summary; a missing or non-finite value (a diverged run) is the worst value."""
    values = []
    for objective in objectives:
        value = summary.get(objective["metric"])
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            value = -math.inf if objective["direction"] == "maximize" else math.inf
        values.append(float(value))
    return values


# --- killed workers -------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study: optuna.Study, storage, grace_period: float) -> list[int]:
    """Mark RUNNING trials whose worker died FAIL and return their numbers: on an RDB storage those whose
    heartbeat is older than the storage's grace period (Optuna, any host); on a journal file those whose
    heartbeat attribute is older than ``grace_period`` seconds, or whose process on this host is gone."""
    running = (optuna.trial.TrialState.RUNNING,)
    if isinstance(storage, optuna.storages.RDBStorage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=running)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return sorted(before - {t.number for t in study.get_trials(deepcopy=False, states=running)})
    failed, host, now = [], socket.gethostname(), time.time()
    for trial in study.get_trials(deepcopy=False, states=running):
        attrs = trial.user_attrs
        gone = attrs.get("host") == host and "pid" in attrs and not _alive(int(attrs["pid"]))
        stale = "heartbeat" in attrs and now - float(attrs["heartbeat"]) > grace_period
        if gone or stale:
            with contextlib.suppress(RuntimeError):  # (another worker may have failed it a moment ago)
                study._storage.set_trial_user_attr(trial._trial_id, "interrupted", "its worker died" if gone else
                                                   f"its worker's heartbeat stopped ({attrs.get('host')})")
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            failed.append(trial.number)
    return failed


@contextlib.contextmanager
def heartbeat(storage, trial, interval: float):
    """Record ``trial``'s heartbeat now and every ``interval`` seconds on a daemon thread, until the block ends
    (before the trial is told, so no beat lands on a finished trial). ``trial`` None (ranks other than 0, which
    do not talk to Optuna): nothing."""
    if trial is None:
        yield
        return
    def beat() -> None:
        if isinstance(storage, optuna.storages.RDBStorage):
            storage.record_heartbeat(trial._trial_id)  # Optuna's heartbeat table (what fail_stale_trials reads)
        else:
            trial.set_user_attr("heartbeat", time.time())

    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            try:
                beat()
            except Exception as err:  # a storage hiccup must not kill the trial; the next beat may get through
                say(f"warning: heartbeat of trial {trial.number} failed: {err}", error=True)

    beat()
    thread = threading.Thread(target=loop, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def count_taken(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials: both count towards n_trials (failed ones do not)."""
    trials = study.get_trials(deepcopy=False, states=(*FINISHED, optuna.trial.TrialState.RUNNING))
    running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    return len(trials) - running, running


def interrupted_trials(trials) -> list:
    """FAIL trials whose training was interrupted and that no trial has taken over yet, oldest first.

    Interrupted: the worker was stopped by SIGTERM/SIGINT (``interrupted`` attribute, set as it exits) or died
    (SIGKILL, a lost node: failed by :func:`fail_dead_trials`) while the trial trained (it has a ``run_name``).
    Not interrupted: a trial dropped by :func:`claim` (never trained) or one whose training raised an error
    (``crashed``: running it again would fail again). Taken over: some trial carries ``resumes=<its number>``
    and was not dropped (waiting, running, finished, or itself interrupted: then that one is resumed instead).
    """
    taken = {t.user_attrs["resumes"] for t in trials if "resumes" in t.user_attrs and "dropped" not in t.user_attrs}
    return [t for t in sorted(trials, key=lambda t: t.number)
            if t.state == optuna.trial.TrialState.FAIL and "run_name" in t.user_attrs and t.number not in taken
            and "dropped" not in t.user_attrs and "crashed" not in t.user_attrs]


def enqueue_resumes(study: optuna.Study) -> int:
    """Enqueue every interrupted trial of a sampled search (:func:`interrupted_trials`) as a unit ``resumes``:
    same parameters, trained on in the same run folder; returns how many such units wait. Workers racing here
    may enqueue one twice: :func:`claim` runs one copy."""
    for old in interrupted_trials(study.get_trials(deepcopy=False)):
        study.enqueue_trial(dict(old.params), user_attrs={"resumes": old.number}, skip_if_exists=False)
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    return sum("resumes" in t.user_attrs for t in waiting)


def reap_dead_trials(study: optuna.Study, storage, grace_period: float, log=print) -> None:
    """Fail the trials of dead workers (:func:`fail_dead_trials`); a grid queues their points again
    (:func:`enqueue_grid`, called by the worker: a point whose trial failed has no live trial)."""
    failed = fail_dead_trials(study, storage, float(grace_period))
    if failed:
        log(f"[{study.study_name}] marked trials {failed} failed: their worker died", flush=True)


# --- running trials ---------------------------------------------------------------------------------------------


def run_trial(fabric, trial, base_overrides: list[str], sweep_cfg: SweepSettings, loss_name: str, study_name: str,
              seed: int | None = None, fixed_params: Mapping | None = None, run_name: str | None = None,
              resume: bool = False) -> tuple[list[float], dict]:
    """Train one configuration; report the first objective at every evaluation (for pruning).

    ``run_name``: the run folder's name (default ``<study>-trial<N>``, ``<study>-seed<k>`` for a re-run seed).
    ``resume``: the trial continues an interrupted one under its run folder: from its newest checkpoint
    (``resume=auto``, the run rebuilt from its config.yaml: probloss/training/run_folder.py resume_config), or, where the
    folder holds none, from step 0 in an emptied folder. Called on every rank.
    """
    if fixed_params is not None:
        params = [f"{key}={value}" for key, value in fixed_params.items()]
    else:
        params = suggest_overrides(trial, sweep_cfg.space, loss_name)
    if run_name is None:
        run_name = f"{study_name}-trial{trial.number:04d}" if seed is None else f"{study_name}-seed{seed}"
    overrides = [*base_overrides, *params, f"run_name={run_name}"]
    if seed is not None:
        overrides.append(f"seed={seed}")
    config = compose_config([*overrides, "resume=null"])  # or, resuming, the overrides (run_training rebuilds)
    if resume:
        run_dir = run_base(RunSettings.from_config(config)) / run_name
        resume = dist.broadcast_object(fabric, _resumable(run_dir) if fabric.is_global_zero else None)
    if resume:  # the same overrides as the interrupted trial's: run_training rebuilds the run, refusing any change
        config = [*overrides, "resume=auto"]
    objectives = list(sweep_cfg.objectives)
    single = len(objectives) == 1

    def on_eval(step: int, metrics: Mapping[str, Any]) -> None:
        if single and fixed_params is None:  # every rank takes part (TorchDistributedTrial broadcasts)
            value = dist.broadcast_object(fabric, objective_values(metrics, objectives)[0] if fabric.is_global_zero else None)
            if math.isfinite(value):
                trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

    try:
        summary = run_training(config, fabric, on_eval=on_eval, table=False).summary  # one line per trial
    except NonFiniteLossError as err:  # diverged: a result, not a crash of the study
        summary = {"stability/diverged": 1.0, "error": str(err)}
    return objective_values(summary, objectives), summary


def _resumable(run_dir: Path) -> bool:
    """Whether an interrupted trial's run folder holds a checkpoint to resume from; a folder without one (the
    worker stopped before its first checkpoint) is removed, so the trial starts again in a clean folder (one
    event file, as recipes do). Rank 0 only."""

    if newest_checkpoint(run_dir) is not None:
        return True
    if run_dir.is_dir():
        shutil.rmtree(run_dir)
    return False


def _record(trial, summary: Mapping[str, Any]) -> None:
    """Keep the run's metrics with the trial (report.py and optuna-dashboard show them)."""
    for key, value in summary.items():
        if key.startswith(("val/", "test/", "embed/", "unc/", "stability/")) or key in ("run_dir", "train/loss", "steps", "error"):
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)  # JSON storages cannot hold nan/inf
            if isinstance(value, (bool, int, float, str)):
                trial.set_user_attr(key, value)


def worker(fabric, study: optuna.Study, storage, sweep_cfg: SweepSettings, base_overrides: list[str], loss_name: str,
           n_trials: int, log=print) -> int:
    """Ask, train and tell until the study has ``n_trials`` finished (complete or pruned); rank 0 talks to
    Optuna, other ranks follow. Trials of dead workers are failed first and do not count.

    Returns the number of trials this worker ran.
    """
    ran = 0
    interval = float(sweep_cfg.heartbeat_interval)
    points = grid_points(sweep_cfg, loss_name) if sweep_cfg.sampler == "grid" else None
    while True:
        decision, trial = None, None
        if fabric.is_global_zero:
            reap_dead_trials(study, storage, sweep_cfg.grace_period, log)
            finished, running = count_taken(study)
            decision = "run" if finished + running < n_trials else "wait" if finished < n_trials else "stop"
            if decision == "run" and points is not None:  # a grid: claim an enqueued point, each run once
                if not enqueue_grid(study, points):
                    decision = "wait"  # every point is running or done (n_trials above the grid's size)
                else:
                    trial = claim(study, "grid_point")
                    decision = "run" if trial is not None else "again"  # another worker's copy of that point
            elif decision == "run" and enqueue_resumes(study):  # an interrupted trial first, each resumed once
                trial = claim(study, "resumes")
                decision = "run" if trial is not None else "again"
        decision = dist.broadcast_object(fabric, decision)
        if decision == "stop":
            return ran
        if decision == "again":
            continue
        if decision == "wait":  # the budget is taken by other workers' running trials: they finish or go stale
            time.sleep(min(5.0, interval))
            continue
        if fabric.is_global_zero and trial is None:
            trial = study.ask()
        run_name, resumes = None, None
        if fabric.is_global_zero:
            resumes = trial.user_attrs.get("resumes")
            run_name = (study.trials[resumes].user_attrs["run_name"] if resumes is not None else
                        f"{study.study_name}-trial{trial.number:04d}")
            trial.set_user_attr("run_name", run_name)  # from now on an interruption leaves it to resume
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            if worker_index() is not None:
                trial.set_user_attr("worker", worker_index())
            if reseeds_per_trial(sweep_cfg, len(study.directions) > 1):  # before the trial suggests anything
                seed = trial_seed(int(sweep_cfg.seed), trial.number)
                study.sampler = make_sampler(sweep_cfg, False, loss_name, seed=seed)
                trial.set_user_attr("sampler_seed", seed)
        run_name, resumes = dist.broadcast_object(fabric, (run_name, resumes))
        dist_trial = TorchDistributedTrial(trial) if fabric.world_size > 1 else trial
        start = time.time()
        state, values, summary = optuna.trial.TrialState.COMPLETE, None, {}
        try:
            with interruption(study, trial if fabric.is_global_zero else None), heartbeat(storage, trial, interval):
                values, summary = run_trial(fabric, dist_trial, base_overrides, sweep_cfg, loss_name,
                                            study.study_name, run_name=run_name, resume=resumes is not None)
        except optuna.TrialPruned:
            state = optuna.trial.TrialState.PRUNED
        ran += 1
        if fabric.is_global_zero:
            _record(trial, summary)
            study.tell(trial, values if state == optuna.trial.TrialState.COMPLETE else None, state=state)
            shown = "pruned" if values is None else ", ".join(f"{v:.4g}" for v in values)
            diverged = " DIVERGED" if summary.get("stability/diverged") else ""
            resumed = f" (resumed trial {resumes})" if resumes is not None else ""
            log(f"[{study.study_name}] trial {trial.number:3d} {state.name:8s} objective {shown}{diverged} "
                f"params {trial.params}{resumed} ({time.time() - start:.0f} s)", flush=True)


@contextlib.contextmanager
def interruption(study: optuna.Study, trial):
    """Record how a trial's training ended when it did not return; ``trial`` None (ranks other than 0): only
    re-raise. SIGTERM/SIGINT (:class:`probloss.errors.Preempted`, or a KeyboardInterrupt outside the training
    loop): the trial is told FAIL with the attribute ``interrupted`` and the next worker resumes it
    (:func:`interrupted_trials`); the Preempted re-raised names the trial, so the command's one line says what
    resumes and how. Any other error: FAIL with ``crashed`` (not resumed: it would fail again), re-raised."""
    try:
        yield
    except (Preempted, KeyboardInterrupt) as stop:
        if trial is None:
            raise
        if isinstance(stop, KeyboardInterrupt):
            stop = Preempted(signal.SIGINT, None, None, None)
        saved = f"step {stop.step} saved in {stop.checkpoint}" if stop.checkpoint else "no checkpoint"
        trial.set_user_attr("interrupted", f"{signal.Signals(stop.signum).name} ({saved})")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        where = (f"at step {stop.step} of trial {trial.number} of study {study.study_name}: saved {stop.checkpoint};"
                 " the sweep resumes the trial from it" if stop.checkpoint else
                 f"before the first checkpoint of trial {trial.number} of study {study.study_name}: the sweep "
                 "trains the trial again with the same parameters")
        raise Preempted(stop.signum, stop.step, stop.checkpoint, stop.run_dir, where=where) from None
    except Exception as err:
        if trial is not None and not isinstance(err, optuna.TrialPruned):
            with contextlib.suppress(Exception):  # the storage may be what failed; the error is what matters
                trial.set_user_attr("crashed", f"{type(err).__name__}: {err}"[:500])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise


def best_params(study: optuna.Study) -> dict[str, Any]:
    """The best trial's parameters; for several objectives, the Pareto trial best on the first objective."""
    if len(study.directions) == 1:
        return dict(study.best_trial.params)
    first = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    trials = sorted(study.best_trials, key=lambda t: t.values[0], reverse=first)
    return dict(trials[0].params)


def unit_owner(trials, key: str, value: Any):
    """The trial that runs the unit ``user_attrs[key] == value``: the lowest-numbered one that is not FAIL.

    Units (a recipe's cells, a sweep's re-run seeds) are enqueued with their attributes, so a trial carries its
    unit from its creation; workers racing to enqueue one unit may enqueue it twice, and a worker that is handed
    a trial other than the owner drops it (:func:`claim`). Trial numbers follow creation and a worker sees every
    trial older than the one it was handed, so exactly one trial of each unit runs.
    """
    live = [t for t in trials if t.user_attrs.get(key) == value and t.state != optuna.trial.TrialState.FAIL]
    return min(live, key=lambda t: t.number) if live else None


def claim(study: optuna.Study, key: str):
    """Ask for a waiting unit; returns the trial if it is its unit's owner, else drops it (FAIL, ``dropped``) and
    returns None. The trial records this process (host, pid) for :func:`fail_dead_trials`."""
    trial = study.ask()
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    value = trial.user_attrs.get(key)
    owner = unit_owner(study.get_trials(deepcopy=False), key, value) if value is not None else None
    if owner is not None and owner.number == trial.number:
        return trial
    trial.set_user_attr("dropped", "no unit left" if owner is None else f"duplicate of trial {owner.number}")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return None


def rerun_best(fabric, storage, study: optuna.Study, sweep_cfg: SweepSettings, base_overrides: list[str],
               loss_name: str, seeds: Sequence[int], log=print) -> None:
    """Re-run the best configuration once per seed, as trials of the study ``<study>-best`` (resumable; parallel
    workers share the seeds, each run once: :func:`unit_owner`)."""
    params = dist.broadcast_object(fabric, best_params(study) if fabric.is_global_zero else None)
    rerun = open_study(dataclasses.replace(sweep_cfg, pruner="none"), storage, f"{study.study_name}-best")
    state = optuna.trial.TrialState
    interval = float(sweep_cfg.heartbeat_interval)
    while True:
        decision, trial = None, None
        if fabric.is_global_zero:
            reap_dead_trials(rerun, storage, sweep_cfg.grace_period, log)
            trials = rerun.get_trials(deepcopy=False)
            owners = {seed: unit_owner(trials, "seed", seed) for seed in seeds}
            for seed, owner in owners.items():
                if owner is None:
                    rerun.enqueue_trial({}, user_attrs={"seed": seed, **params})
            if all(o is not None and o.state == state.COMPLETE for o in owners.values()):
                decision = "stop"
            elif not rerun.get_trials(deepcopy=False, states=(state.WAITING,)):
                decision = "wait"  # the other seeds run on other workers: they finish or go stale
            else:
                trial = claim(rerun, "seed")
                decision = "run" if trial is not None else "again"
        decision = dist.broadcast_object(fabric, decision)
        if decision == "stop":
            return
        if decision == "wait":
            time.sleep(min(5.0, interval))
        if decision != "run":
            continue
        seed = dist.broadcast_object(fabric, trial.user_attrs["seed"] if fabric.is_global_zero else None)
        # resume=True: the seed's run folder exists only when an earlier worker was stopped while training it
        with interruption(rerun, trial if fabric.is_global_zero else None), heartbeat(storage, trial, interval):
            values, summary = run_trial(fabric, trial, base_overrides, sweep_cfg, loss_name, study.study_name,
                                        seed=seed, fixed_params=params, resume=True)
        if fabric.is_global_zero:
            _record(trial, summary)
            rerun.tell(trial, values)
            log(f"[{rerun.study_name}] seed {seed}: objective {', '.join(f'{v:.4g}' for v in values)}", flush=True)


def sweep_losses(sweep_cfg: SweepSettings, train_overrides: Sequence[str], default_loss: str) -> list[str]:
    """The losses a sweep studies: the command line's ``loss=`` (the first), else ``sweep.losses``, else the
    config's default loss."""
    chosen = next((o.split("=", 1)[1] for o in train_overrides if o.startswith("loss=")), None)
    return [chosen] if chosen else list(sweep_cfg.losses or [default_loss])


def run_sweep(fabric, argv: Sequence[str], log=print) -> dict[str, optuna.Study]:
    """The whole sweep for ``argv`` (``sweep=<name> [loss=<name>] [sweep.key=..] [training overrides]``)."""
    sweep_cfg, train_overrides = load_sweep(argv)
    name = next(a.split("=", 1)[1] for a in argv if a.startswith("sweep="))
    base = compose_config([*sweep_cfg.overrides, *train_overrides])  # checks every key up front
    if not any(o.startswith("experiment=") for o in train_overrides):
        train_overrides = [*train_overrides, f"experiment={name}"]
    experiment = next(o.split("=", 1)[1] for o in train_overrides if o.startswith("experiment="))
    losses = sweep_losses(sweep_cfg, train_overrides, base["loss"]["name"])
    storage = storage_for(sweep_cfg.storage, base["out_dir"], experiment, sweep_cfg.heartbeat_interval,
                          sweep_cfg.grace_period)
    studies = {}
    for loss_name in losses:
        overrides = [*sweep_cfg.overrides, *[o for o in train_overrides if not o.startswith("loss=")],
                     f"loss={loss_name}", *sweep_cfg.loss_overrides.get(loss_name, [])]
        study_name = sweep_cfg.study_name or default_study_name(experiment, name, loss_name)
        if len(losses) > 1 and sweep_cfg.study_name:
            study_name = f"{sweep_cfg.study_name}-{loss_name}"
        study = open_study(sweep_cfg, storage, study_name, loss_name)
        index = worker_index()
        if index and not reseeds_per_trial(sweep_cfg, len(study.directions) > 1):  # NSGA-II draws at ask
            study.sampler = make_sampler(sweep_cfg, True, loss_name, seed=trial_seed(int(sweep_cfg.seed),
                                                                                     f"worker{index}"))
        n_trials = trial_budget(sweep_cfg, loss_name)
        worker(fabric, study, storage, sweep_cfg, overrides, loss_name, n_trials, log=log)
        if sweep_cfg.rerun_seeds:  # the worker returned: every trial of the search has finished
            rerun_best(fabric, storage, study, sweep_cfg, overrides, loss_name, list(sweep_cfg.rerun_seeds), log)
        studies[loss_name] = study
    if fabric.is_global_zero:
        log(summary_table(studies), flush=True)
    return studies


def default_study_name(experiment: str, sweep_name: str, loss_name: str) -> str:
    """``<experiment>-<loss>`` when the experiment is the sweep's own name (the default), else
    ``<experiment>-<sweep>-<loss>``: two sweeps given one experiment name get studies of their own."""
    return f"{experiment}-{loss_name}" if experiment == sweep_name else f"{experiment}-{sweep_name}-{loss_name}"


def summary_table(studies: Mapping[str, optuna.Study]) -> str:
    lines = ["", "| loss | study | complete | pruned | failed | diverged | best objective | best params |",
             "|---|---|---|---|---|---|---|---|"]
    for loss_name, study in studies.items():
        trials = study.get_trials(deepcopy=False)
        count = lambda state: sum(t.state == state for t in trials)  # noqa: E731
        diverged = sum(bool(t.user_attrs.get("stability/diverged")) for t in trials)
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = ", ".join(f"{v:.4g}" for v in study.best_trials[0].values) if complete else "-"
        params = best_params(study) if complete else {}
        lines.append(f"| {loss_name} | {study.study_name} | {count(optuna.trial.TrialState.COMPLETE)} | "
                     f"{count(optuna.trial.TrialState.PRUNED)} | {count(optuna.trial.TrialState.FAIL)} | {diverged} | "
                     f"{best} | {params} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of scripts/sweep.py: ``sweep.workers`` worker processes (probloss/studies/workers.py), or this process
    as the one worker with one Fabric for all trials (``fabric run`` sets devices; its ranks are one worker)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep_cfg, train_overrides = load_sweep(argv)
    run = RunSettings.from_config(compose_config([*sweep_cfg.overrides, *train_overrides]))
    launcher = sweep_cfg.launcher
    under_fabric_cli = "LT_CLI_USED" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not under_fabric_cli:
        budget = trial_budget(sweep_cfg, sweep_losses(sweep_cfg, train_overrides, run.loss_name)[0])
        n, why = choose_workers(sweep_cfg.workers, budget, run.trainer.num_threads, run.fabric.accelerator)
        if n > 1 or launcher == "submitit":
            say(f"sweep: {n} workers via {launcher} ({why})")
            if launcher == "submitit":
                run_submitit("sweep", argv, "sweep", n, sweep_cfg.slurm,
                             Path(os.path.expanduser(run.out_dir)) / "submitit", run.trainer.num_threads, log=say)
            else:
                run_local("sweep", argv, "sweep", n, run.trainer.num_threads)
            return
    launch(make_fabric(run.fabric, run.trainer.deterministic), run_sweep, argv)
