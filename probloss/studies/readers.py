"""What the study reports read: a sweep's Optuna studies (from its storage or its committed per-trial table), the
TensorBoard scalars of a run folder, and a finished recipe folder's recipe.json and results.json.

The per-trial table (``trials.json``, :func:`trial_table`) is the small, committable form of a sweep's studies:
:func:`studies_from_table` rebuilds in-memory studies from it that probloss.studies.stats.summarise reads as it
reads the storage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import optuna
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from probloss.studies.stats import SEED_METRICS
from probloss.studies.sweep import storage_for


# --- a sweep's per-trial table: what a study's report needs, small enough to commit ------------------------------

TRIAL_TABLE = "trials.json"
TRIAL_KEYS = (*SEED_METRICS, "val/zeroshot_top1", "stability/diverged", "seed", "steps", "error")


def trial_table(studies: Mapping[str, tuple[optuna.Study, optuna.Study | None]]) -> dict[str, Any]:
    """The per-trial table of a sweep's studies ({loss: (search, seed re-run or None)}): per loss its directions,
    study attributes and, per trial, its number, state, parameters (with their distributions), objective values
    and the ``TRIAL_KEYS`` of its metrics. :func:`studies_from_table` rebuilds studies that stats.summarise
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


def tensorboard_scalars(run_dir: str | None, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard tag in a run folder (empty when missing)."""
    if not run_dir or not Path(run_dir).is_dir():
        return []

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def read_recipe_folder(exp_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(recipe.json, results.json) of a finished recipe folder."""
    exp_dir = Path(exp_dir)
    results_path, exp_path = exp_dir / "results.json", exp_dir / "recipe.json"
    for path in (results_path, exp_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run python scripts/run_recipe.py "
                                    f"recipe={exp_dir.name} first")
    return json.loads(exp_path.read_text()), json.loads(results_path.read_text())
