"""The run folder ``<out_dir>/<experiment>/<loss>/<run_name>/``: choosing it, resuming, and what a run writes.

::

    run_dir/
      config.yaml                  the resolved config (probloss.config.save_config)
      events.out.tfevents.*        TensorBoard scalars, hparams, projector (make_logger)
      checkpoints/step-*.ckpt      probloss.checkpoint
      summary.json                 final metrics (write_summary; NaN/Inf written as null)
      .lock                        held by the process that runs in the folder (run_folder_lock)

The run folder is a sandbox: ``experiment`` and ``run_name`` are single folder names (checked with every other
setting in probloss/settings.py, before the folder exists), and one process at a time runs in a folder
(:func:`run_folder_lock`): a second run with the same run_name stops with "run folder X is in use by process P"
(exit 2) and touches nothing of the first. A run that stops on a bad config or bad data before it writes its
config.yaml (before training) removes the folder it made, so a bad command leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from probloss import checkpoint as ckpt
from probloss.config import ConfigError, to_dict
from probloss.settings import RunSettings

SUMMARY_KEYS = (  # docs/design.md: summary.json keys (those that apply), printed in this order
    "train/loss", "val/loss", "val/zeroshot_top1", "val/i2t_r@1_plausible", "test/zeroshot_top1",
    "test/zeroshot_seen_top1", "test/zeroshot_unseen_top1", "test/i2t_r@1_plausible", "test/t2i_r@1_plausible",
    "test/i2t_map@r", "test/t2i_map@r", "test/i2t_r@1", "test/t2i_r@1", "test/relation_probe_acc",
    "test/binding_probe_acc", "test/control_probe_acc", "test/embed/effective_rank", "test/embed/uniformity",
    "test/unc/specificity_level_coef", "test/unc/specificity_level_t", "test/unc/specificity_within_scene_acc",
    "test/unc/specificity_matched_acc", "test/unc/cue/token/specificity_matched_acc", "stability/collapsed",
    "stability/diverged", "stability/max_loss_jump", "stability/loss_spikes", "stability/grad_norm_init",
    "stability/grad_norm_ratio", "stability/nonfinite_steps", "steps", "samples_per_s", "eval_test_s",
)


def run_base(run: RunSettings) -> Path:
    """``<out_dir>/<experiment>/<loss>``: the folder that holds a run's folder."""
    return Path(os.path.expanduser(run.out_dir)) / run.experiment / run.loss_name


def resolve_run_dir(run: RunSettings) -> tuple[str, str | None]:
    """(run folder, checkpoint to resume from or None); rank 0 only. See ``resume`` in configs/train.yaml."""
    base = run_base(run)
    resume, run_name = run.resume, run.run_name
    if resume not in (None, "auto"):
        path = Path(os.path.expanduser(resume))
        if path.is_file():
            run_dir = path.parent.parent if path.parent.name == ckpt.CKPT_DIR else path.parent
            return str(run_dir), str(path)
        if path.is_dir():
            found = ckpt.newest_checkpoint(path)
            if found is None:
                raise ConfigError(f"resume={resume}: no checkpoints in {path / ckpt.CKPT_DIR}")
            return str(path), str(found)
        raise ConfigError(f"resume={resume}: no such checkpoint file or run folder")
    if run_name is not None:
        run_dir = base / run_name
        found = ckpt.newest_checkpoint(run_dir)
        if found is not None and resume != "auto":
            raise ConfigError(
                f"run folder {run_dir} already has checkpoints (newest {found.name}); pass resume=auto to continue "
                "it, or choose another run_name")
        return str(run_dir), (str(found) if found is not None else None)
    if resume == "auto" and base.is_dir():
        runs = [(p.stat().st_mtime, d) for d in base.iterdir() if (p := ckpt.newest_checkpoint(d)) is not None]
        if runs:
            run_dir = max(runs)[1]
            return str(run_dir), str(ckpt.newest_checkpoint(run_dir))
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
        from probloss.cli import DataError

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
    import shutil

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
    other = ckpt.other_differences(saved, current)
    if other and announce:
        print(f"note: resuming {path} with a changed config: {'; '.join(other)}", file=sys.stderr)
    return saved


def make_logger(run_dir: Path, purge_step: int | None = None):
    """Fabric's TensorBoardLogger writing straight into the run folder (so `tensorboard --logdir runs` shows
    every run as <experiment>/<loss>/<run_name>); on resume, events after the checkpoint's step are purged."""
    from lightning_fabric.loggers import TensorBoardLogger

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


def write_json(path: Path, values: Mapping[str, Any]) -> Path:
    """Atomic json write; NaN/Inf become null (json has no NaN)."""
    tmp = path.with_suffix(".json.tmp")
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
    tmp.write_text(json.dumps(clean, indent=2, default=str))
    os.replace(tmp, path)
    return path


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


def print_summary(summary: Mapping[str, Any], run_dir: Path, title: str, out_dir: str) -> None:
    """The end-of-run table."""
    keys = [k for k in SUMMARY_KEYS if k in summary]
    hidden = ("run_dir", "loss", "world_size", "status")
    keys += sorted(k for k in summary if k not in keys and k not in hidden and not _curve_key(k))
    rows = [(k, _fmt(summary[k])) for k in keys]
    width = max(len(k) for k, _ in rows) if rows else 10
    vwidth = max(len(v) for _, v in rows) if rows else 10
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    print("\n" + title)
    print(line)
    for k, v in rows:
        print(f"| {k:<{width}} | {v:>{vwidth}} |")
    print(line)
    if any(_curve_key(k) for k in summary):
        print("(per-bin curves unc/*_bin_*, cue baselines unc/cue/*, training-free baselines unc/free/*: in "
              "summary.json and TensorBoard)")
    print(f"run folder: {run_dir}  (tensorboard --logdir {out_dir})", flush=True)


def _curve_key(key: str) -> bool:
    """Keys left out of the end-of-run table (too many to read there): per-bin curves and baselines."""
    return "_bin_" in key or "/cue/" in key or "/free/" in key


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e5 else f"{value:.4g}"
    return str(value)
