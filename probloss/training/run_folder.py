"""The run folder ``<out_dir>/<experiment>/<loss>/<run_name>/``: choosing it, resuming, and what a run writes.

::

    run_dir/
      config.yaml                  the resolved config (probloss.training.config.save_config)
      events.out.tfevents.*        TensorBoard scalars, hparams, projector (make_logger)
      checkpoints/step-*.ckpt      probloss.training.checkpoint
      summary.json                 final metrics (write_summary; NaN/Inf written as null)
      .lock                        held by the process that runs in the folder (run_folder_lock)

The run folder is a sandbox: ``experiment`` and ``run_name`` are single folder names (checked with every other
setting in probloss/training/settings.py, before the folder exists), and one process at a time runs in a folder
(:func:`run_folder_lock`): a second run with the same run_name stops with "run folder X is in use by process P"
(exit 2) and touches nothing of the first. A run that stops on a bad config or bad data before it writes its
config.yaml (before training) removes the folder it made, so a bad command leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from lightning_fabric.loggers import TensorBoardLogger
from omegaconf import DictConfig
from omegaconf import OmegaConf

from probloss.errors import ConfigError, DataError
from probloss.files import fmt_number, write_json
from probloss.training import checkpoint as ckpt
from probloss.training.config import override_key, to_dict
from probloss.training.settings import RunSettings

def run_base(run: RunSettings) -> Path:
    """``<out_dir>/<experiment>/<loss>``: the folder that holds a run's folder."""
    return Path(os.path.expanduser(run.out_dir)) / run.experiment / run.loss_name


# Resuming (``resume=auto`` / ``resume=<run folder or checkpoint>``) rebuilds the run from its saved config.yaml.
# What a command line may still say on resume: where the run is (it names it), how it is watched and saved
# (results unchanged), and an explicit extension, announced in one line. Any other value that differs from the
# saved one would make the resumed run another experiment than the one begun: refused (ConfigError, exit 2).
LOCATION_KEYS = ("out_dir", "experiment", "run_name", "resume")
OPERATIONAL_KEYS = ("trainer.progress", "trainer.log_every", "trainer.ckpt_every", "trainer.keep_last",
                    "data.cache_dir")
EXTENSION_KEYS = ("trainer.max_steps",)
GROUP_SECTIONS = ("loss", "model", "data")  # chosen whole by a config group: taken whole from the saved config


def find_run_to_resume(run: RunSettings, loss_given: bool) -> tuple[Path | None, str]:
    """The run folder that ``resume`` names, and how it was found (one line); rank 0, before anything is built.

    ``resume=<checkpoint file or run folder>``: that run. ``resume=auto run_name=<name>``: the run of that name
    in the experiment (under the loss given on the command line, or under any loss); it must exist and hold a
    checkpoint. ``resume=auto`` without a name: the run with the newest checkpoint in the experiment (of the
    given loss, or of any), or None (a new run: a job script that always says resume=auto starts the first
    time). Raises ConfigError (exit 2) when a named run or path does not exist or has no checkpoint.
    """
    experiment = Path(os.path.expanduser(run.out_dir)) / run.experiment
    if run.resume != "auto":
        path = Path(os.path.expanduser(run.resume))
        if path.is_file():
            run_dir = path.parent.parent if path.parent.name == ckpt.CKPT_DIR else path.parent
            return run_dir, f"resuming {run_dir} from {path.name}"
        if path.is_dir():
            if ckpt.newest_checkpoint(path) is None:
                raise ConfigError(f"resume={run.resume}: no checkpoints in {path / ckpt.CKPT_DIR}")
            return path, f"resuming {path}"
        raise ConfigError(f"resume={run.resume}: no such checkpoint file or run folder")
    bases = [experiment / run.loss_name] if loss_given else sorted(p for p in experiment.glob("*") if p.is_dir())
    if run.run_name is not None:
        named = [base / run.run_name for base in bases if (base / run.run_name).is_dir()]
        if not named:
            where = experiment / run.loss_name if loss_given else experiment / "*"
            known = sorted({d.name for base in bases if base.is_dir() for d in base.iterdir() if d.is_dir()})
            listing = f"runs there: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}" if known else \
                "there are no runs there"
            elsewhere = sorted(d.parent.name for d in experiment.glob(f"*/{run.run_name}") if d.is_dir())
            if loss_given and elsewhere:
                listing += f"; a run of that name exists for loss {', '.join(elsewhere)}"
            raise ConfigError(f"resume=auto run_name={run.run_name}: no run {where / run.run_name} ({listing}); "
                              "check run_name, out_dir, experiment and loss, or start it without resume=auto")
        if len(named) > 1:
            raise ConfigError(f"resume=auto run_name={run.run_name}: a run of that name exists for several losses "
                              f"({', '.join(str(d) for d in named)}); say which with loss=<name>")
        if ckpt.newest_checkpoint(named[0]) is None:
            raise ConfigError(f"resume=auto run_name={run.run_name}: {named[0]} has no checkpoint to resume from "
                              "(it stopped before its first one); start it again without resume=auto")
        return named[0], f"resuming {named[0]}"
    runs = [(p.stat().st_mtime, d) for base in bases for d in base.iterdir()
            if d.is_dir() and (p := ckpt.newest_checkpoint(d)) is not None]
    if not runs:
        return None, (f"resume=auto: no run with a checkpoint under {experiment}"
                      f"{'/' + run.loss_name if loss_given else ''}; starting a new run")
    run_dir = max(runs)[1]
    return run_dir, f"resume=auto picked {run_dir} (the run with the newest checkpoint under {run_dir.parent.parent})"


def resume_config(cfg: Mapping, overrides: Sequence[str]) -> tuple[DictConfig, list[str]]:
    """The config of the run ``cfg.resume`` names, rebuilt from its saved config.yaml (module comment above).

    Args:
        cfg: the config composed from the command line (defaults + ``overrides``).
        overrides: the command line's ``key=value`` strings.

    Returns:
        (the run's config, read-only, with ``resume`` pointing at its folder; lines to print: which run, what
        was extended).
    """

    run = RunSettings.from_config(cfg)
    keys = [override_key(o) for o in overrides]
    run_dir, found = find_run_to_resume(run, loss_given="loss" in keys)
    if run_dir is None:
        fresh = OmegaConf.create({**to_dict(cfg), "resume": None})
        OmegaConf.set_readonly(fresh, True)
        return fresh, [found]
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    else:  # a run folder from before config.yaml was written: the newest checkpoint's copy
        saved_path = ckpt.newest_checkpoint(run_dir)
        saved = ckpt.read_checkpoint(saved_path).get("config", {})
    given = to_dict(cfg)
    refused, lines = [], [found]
    for key in dict.fromkeys(keys):
        if key in LOCATION_KEYS or key.split(".")[0] in LOCATION_KEYS:
            continue
        before, after = ckpt._get(saved, key), ckpt._get(given, key)
        if before == after:
            continue
        if key in EXTENSION_KEYS:
            lines.append(f"extending {run_dir.name}: {key} {before} -> {after} (the schedule follows the new length)")
        elif key not in OPERATIONAL_KEYS:
            refused += ([f"{key}.{sub}: {(before or {}).get(sub)!r} -> {(after or {}).get(sub)!r}"
                         for sub in sorted(set(before or {}) | set(after or {}))
                         if (before or {}).get(sub) != (after or {}).get(sub)]
                        if isinstance(before, Mapping) or isinstance(after, Mapping) else [f"{key}: {before!r} -> {after!r}"])
    if refused:
        raise ConfigError(f"resuming {run_dir} would change the run ({'; '.join(refused)}; saved in {saved_path}). A "
                          "resumed run keeps its settings: drop those overrides (only "
                          f"{', '.join(EXTENSION_KEYS)} may be extended), or start a new run (another run_name, no resume)")
    rebuilt = _rebuild(given, saved)
    for key in dict.fromkeys(keys):  # the allowed changes, as given
        if key in EXTENSION_KEYS or key in OPERATIONAL_KEYS:
            _set(rebuilt, key, ckpt._get(given, key))
    rebuilt.update(out_dir=str(run_dir.parent.parent.parent), experiment=run_dir.parent.parent.name,
                   run_name=run_dir.name, resume=str(cfg.resume if run.resume != "auto" else run_dir))
    out = OmegaConf.create(rebuilt)
    OmegaConf.set_readonly(out, True)
    return out, lines


def _rebuild(given: Mapping[str, Any], saved: Mapping[str, Any], top: bool = True) -> dict[str, Any]:
    """The saved values over the current defaults: keys added since the run began keep their defaults, keys
    since removed are dropped, and a config group's section (loss, model, data) is the saved one, whole."""
    out = {}
    for key, value in given.items():
        if key not in saved:
            out[key] = value
        elif (top and key in GROUP_SECTIONS) or not (isinstance(value, Mapping) and isinstance(saved[key], Mapping)):
            out[key] = saved[key]
        else:
            out[key] = _rebuild(value, saved[key], top=False)
    return out


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        cfg = cfg.setdefault(part, {})
    cfg[last] = value


def resolve_run_dir(run: RunSettings) -> tuple[str, str | None]:
    """(run folder, checkpoint to resume from or None); rank 0 only. See ``resume`` in configs/train.yaml.

    A corrupt newest checkpoint (empty, truncated) is named in a warning and the previous readable one is used.
    """
    base = run_base(run)
    resume, run_name = run.resume, run.run_name
    if resume not in (None, "auto"):
        path = Path(os.path.expanduser(resume))
        if path.is_file() or path.is_dir():
            run_dir = path if path.is_dir() else path.parent.parent if path.parent.name == ckpt.CKPT_DIR else path.parent
            found = ckpt.readable_checkpoint(path)
            if found is None:
                raise ConfigError(f"resume={resume}: no readable checkpoint in {run_dir / ckpt.CKPT_DIR}")
            return str(run_dir), str(found)
        raise ConfigError(f"resume={resume}: no such checkpoint file or run folder")
    if run_name is not None:
        run_dir = base / run_name
        found = ckpt.newest_checkpoint(run_dir)
        if found is not None and resume != "auto":
            raise ConfigError(
                f"run folder {run_dir} already has checkpoints (newest {found.name}); pass resume=auto to continue "
                "it, or choose another run_name")
        if resume == "auto" and found is None:
            raise ConfigError(f"resume=auto run_name={run_name}: {run_dir} has no checkpoint to resume from; "
                              "start it without resume=auto")
        if found is not None:
            found = ckpt.readable_checkpoint(run_dir)
            if found is None:
                raise ConfigError(f"resume=auto: no readable checkpoint in {run_dir / ckpt.CKPT_DIR}")
        return str(run_dir), (str(found) if found is not None else None)
    if resume == "auto" and base.is_dir():
        runs = [(p.stat().st_mtime, d) for d in base.iterdir() if (p := ckpt.newest_checkpoint(d)) is not None]
        if runs:
            run_dir = max(runs)[1]
            found = ckpt.readable_checkpoint(run_dir)
            if found is not None:
                return str(run_dir), str(found)
    name = time.strftime("%Y%m%d-%H%M%S")
    base.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        run_dir = base / (name if n == 0 else f"{name}-{n}")
        try:
            run_dir.mkdir()  # claimed atomically: runs started in the same second get folders of their own
        except FileExistsError:
            continue
        return str(run_dir), None


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path):
    """Hold ``<run_dir>/.lock`` for the block (an OS file lock, released by the OS even when the process is
    killed); rank 0 only. Raise ConfigError "run folder X is in use by process P" when another process holds it.

    A folder that was new (or empty) when the lock was taken is the run's own: if the block ends with a config or
    data error (a bad command) before the run wrote anything but its out.log (no config.yaml yet, so no step was
    trained), the folder, and the empty ``<experiment>/<loss>`` folders above it, are removed.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(run_dir.iterdir())
    path = run_dir / LOCK_NAME
    handle = open(path, "a+")
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no fcntl (Windows): no lock, as before
        pass
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ConfigError(f"run folder {run_dir} is in use by process {holder}; wait for it to end, or choose "
                          "another run_name") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    try:
        yield
    except Exception as err:

        bad_command = isinstance(err, (ConfigError, DataError, FileNotFoundError))
        nothing_written = {p.name for p in run_dir.iterdir()} <= {LOCK_NAME, "out.log"}
        if fresh and bad_command and nothing_written:
            handle.close()
            _remove_own_folder(run_dir)
            handle = None
        raise
    finally:
        if handle is not None:
            handle.close()  # releases the lock; the file stays (removing it would race with a waiting run)


def _remove_own_folder(run_dir: Path) -> None:
    """Remove a run folder this process made (no checkpoint in it) and the empty folders above it, up to
    ``<out_dir>``."""
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in list(run_dir.parents)[:2]:  # <experiment>/<loss>, the folders resolve_run_dir made for it
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break


def check_resume_config(path: str | Path, cfg: Mapping, announce: bool) -> dict:
    """Refuse to resume a checkpoint whose parameter shapes come from another config; report other changes.
    Returns the checkpoint's config."""
    saved = ckpt.read_checkpoint(path).get("config", {})
    current = to_dict(cfg)
    shape = ckpt.shape_differences(saved, current)
    if shape:
        raise ConfigError(
            f"cannot resume {path}: its config differs in what decides the model's shape "
            f"({'; '.join(shape)}). Use the checkpoint's settings, or start a new run (another run_name, no resume).")
    allowed = LOCATION_KEYS + OPERATIONAL_KEYS + EXTENSION_KEYS  # announced by resume_config when changed
    other = [d for d in ckpt.other_differences(saved, current) if d.split(":")[0] not in allowed]
    if other and announce:
        print(f"note: resuming {path} with a changed config: {'; '.join(other)}", file=sys.stderr)
    return saved


def make_logger(run_dir: Path, purge_step: int | None = None):
    """Fabric's TensorBoardLogger writing straight into the run folder (so `tensorboard --logdir runs` shows
    every run as <experiment>/<loss>/<run_name>); on resume, events after the checkpoint's step are purged."""
    kwargs = {"purge_step": purge_step} if purge_step is not None else {}
    return TensorBoardLogger(root_dir=str(run_dir), name="", version="", default_hp_metric=False, **kwargs)


def finite_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` as floats (what TensorBoard can plot)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    return write_json(Path(run_dir) / "summary.json", summary)


def log_hparams(logger, cfg: Mapping, summary: Mapping[str, Any]) -> None:
    """HParams tab: the flattened config against the final metrics."""
    params = {}

    def flatten(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                flatten(f"{prefix}{k}.", v) if isinstance(v, Mapping) else flatten(f"{prefix}{k}", v)
        elif isinstance(node, (list, tuple)):
            params[prefix.rstrip(".")] = str(list(node))
        else:
            params[prefix.rstrip(".")] = node if isinstance(node, (int, float, str, bool)) else str(node)

    flatten("", to_dict(cfg))
    metrics = {f"hparams/{k}": v for k, v in finite_scalars(summary).items() if "/" in k}
    if metrics:
        logger.log_hyperparams(params, metrics=metrics, step=int(summary.get("steps", 0)))


# The end-of-run table: the headline only, short enough for any terminal; every other key is in summary.json
# and TensorBoard (the table names the file). Printed in this order, those that the run has.
HEADLINE_KEYS = (
    "train/loss", "val/loss", "val/zeroshot_top1",
    "test/zeroshot_top1", "test/zeroshot_seen_top1", "test/zeroshot_unseen_top1",  # zero-shot, seen/unseen classes
    "test/i2t_r@1_plausible", "test/t2i_r@1_plausible",  # retrieval counting every plausible caption, both ways
    "test/embed/effective_rank",
    "test/unc/specificity_level_coef", "test/unc/specificity_within_scene_acc",  # does sigma track specificity
    "stability/diverged", "stability/collapsed", "stability/nonfinite_steps",  # stability flags
    "steps", "samples_per_s",
)
# How the console prints a value (probloss.files.fmt_number): 4 decimals, nan as nan, 4 significant digits from 1e5
CONSOLE_NUMBER = {"places": 4, "nonfinite": None, "general_from": 1e5}


def print_summary(summary: Mapping[str, Any], run_dir: Path, title: str, out_dir: str,
                  details: str | Path | None = None) -> None:
    """The end-of-run table: HEADLINE_KEYS that apply, then where the rest is (``details``, by default
    ``<run_dir>/summary.json``)."""
    rows = [(k, fmt_number(summary[k], **CONSOLE_NUMBER)) for k in HEADLINE_KEYS if k in summary]
    width = max(len(k) for k, _ in rows) if rows else 10
    vwidth = max(len(v) for _, v in rows) if rows else 10
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    print("\n" + title)
    print(line)
    for k, v in rows:
        print(f"| {k:<{width}} | {v:>{vwidth}} |")
    print(line)
    details = Path(details) if details is not None else Path(run_dir) / "summary.json"
    print(f"all {len(summary)} values: {details}", flush=True)
    print(f"run folder: {run_dir}  (tensorboard --logdir {out_dir})", flush=True)


def summary_line(summary: Mapping[str, Any], label: str) -> str:
    """One line for a run inside a sweep or recipe: its headline values that apply, compactly."""
    keys = ("test/zeroshot_top1", "test/i2t_r@1_plausible", "test/embed/effective_rank", "stability/diverged",
            "steps")
    shown = " ".join(f"{k.split('/', 1)[-1]}={fmt_number(summary[k], **CONSOLE_NUMBER)}" for k in keys if k in summary)
    return f"{label}: {shown}  ({summary.get('run_dir', '')})"


def _curve_key(key: str) -> bool:
    """Keys left out of the end-of-run table (too many to read there): per-bin curves and baselines."""
    return "_bin_" in key or "/cue/" in key or "/free/" in key
