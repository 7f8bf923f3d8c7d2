"""Checkpoints: atomic ``fabric.save`` / ``fabric.load``, keep-last-K, finding the newest, resume checks.

Layout: ``<run>/checkpoints/step-00000500.ckpt``. A checkpoint holds the model with the loss's parameters
(``Trainee``), optimizer, scheduler, step, data position, RNG states, stability-tracker state and the resolved
config; everything is tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``.

Atomic: ``fabric.save`` writes ``.tmp-step-....ckpt`` and rank 0 renames it with ``os.replace``, so a run killed
at any moment leaves either the previous set of checkpoints or the new one, never a half-written file that
``resume=auto`` would pick.

Faults (issue 29): a write that fails (disk full, a file-size limit, a read-only folder) removes its temporary
file and raises :class:`WriteError`, one line naming the path and the OS error. A checkpoint that
cannot be read (zero length, truncated: a disk that filled up under another tool, a copy cut short) is named
in a one-line warning and skipped in favour of the previous readable one (:func:`readable_checkpoint`,
used by resume and evaluate). :func:`last_good_checkpoint` is the newest whose weights are all finite.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from lightning_fabric.wrappers import _unwrap_objects  # rank 0 saves alone when a write may fail (save_checkpoint)

from probloss import dist
from probloss.errors import WriteError

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})\.ckpt$")

# Config keys that decide parameter shapes: a resumed run must match them exactly.
SHAPE_KEYS = ("model", "loss.name", "data.image_size", "data.tokenizer", "data.max_len")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:08d}.ckpt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary files of an interrupted save are ignored)."""
    folder = Path(run_dir) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(fabric, run_dir: str | Path, step: int, state: dict[str, Any], keep_last: int = 2) -> Path:
    """Save ``state`` atomically as ``<run>/checkpoints/step-<step>.ckpt``; keep the newest ``keep_last``.

    Must be called on every rank (``fabric.save`` decides who writes; under DDP only rank 0 does). A write that
    fails (disk full, file-size limit, read-only folder) leaves no half-written file and raises
    :class:`WriteError` on rank 0; the other ranks end with it (dist.raise_together: rank 0's outcome is
    broadcast where the second barrier was, so no rank is left waiting).
    """
    final = checkpoint_path(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    error = None
    try:
        if fabric.is_global_zero:
            final.parent.mkdir(parents=True, exist_ok=True)
        dist.barrier(fabric)
        if fabric.world_size > 1:  # fabric.save ends in a barrier that rank 0 would not reach if its write failed
            fabric.strategy.save_checkpoint(path=tmp, state=_unwrap_objects(state))
        else:
            fabric.save(tmp, state)
        if fabric.is_global_zero:
            if final.exists():  # a resumed run saving the same step again
                _remove(final)
            os.replace(tmp, final)
            for old in list_checkpoints(run_dir)[: -max(1, keep_last)]:
                _remove(old)
    except OSError as err:  # no half-written file stays behind
        with contextlib.suppress(OSError):
            _remove(tmp)
        error = WriteError(final, err)
    dist.raise_together(fabric, error, code=1, only_rank0=True)  # also the barrier after the write
    return final


def _remove(path: Path) -> None:
    if path.is_dir():  # sharded strategies save a folder
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, loaded safely (``weights_only=True``) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be loaded as a checkpoint (empty, truncated, not a checkpoint), or None when it can.

    Reads it whole (``weights_only``, memory-mapped where the format allows): a truncated zip archive is only
    noticed when its tensors are read.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "zero length"
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # EOFError, RuntimeError (zip reader), UnpicklingError, OSError, ...
        first = (str(err).splitlines() or ["unreadable"])[0].split(". ")[0]  # torch appends a paragraph of advice
        return f"{type(err).__name__}: {first}"
    return None


def readable_checkpoint(path: str | Path, warn=None) -> Path | None:
    """``path`` (a checkpoint file, or a run folder: its newest checkpoint) if it loads; otherwise, with a
    one-line warning per skipped file, the newest older checkpoint of the same run that loads; None if none
    does. ``warn(message)`` prints the warning (default: stderr)."""
    warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
    path = Path(path)
    if path.is_dir():
        candidates = list(reversed(list_checkpoints(path)))
    else:
        step = _NAME.match(path.name)
        older = [p for p in reversed(list_checkpoints(path.parent.parent))
                 if step and path.parent.name == CKPT_DIR and int(_NAME.match(p.name).group(1)) < int(step.group(1))]
        candidates = [path, *older]
    for i, candidate in enumerate(candidates):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        fallback = "using the previous one" if i + 1 < len(candidates) else "no older checkpoint to use"
        warn(f"warning: skipping corrupt checkpoint {candidate} ({problem}); {fallback}")
    return None


def last_good_checkpoint(run_dir: str | Path, before_step: int | None = None) -> Path | None:
    """The newest checkpoint of a run, of a step below ``before_step`` (None: any), that loads and whose model
    weights are all finite.

    'Good' is judged by the weights, not by the loss: at lr 1e12 the first update leaves finite but ruined
    weights (|w| ~ 5e11) whose every later loss is NaN, and the checkpoints written during those skipped steps
    hold exactly those weights. The trainer passes ``before_step``: the step before the run's final streak of
    non-finite steps began (those weights produced the first NaN), so only weights that still gave a finite
    loss count as good.
    """
    for path in reversed(list_checkpoints(run_dir)):
        if before_step is not None and int(_NAME.match(path.name).group(1)) >= before_step:
            continue
        if checkpoint_problem(path) is not None:
            continue
        model = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("model", {})
        if all(bool(torch.isfinite(v).all()) for v in model.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point()):
            return path
    return None


def shape_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"key: saved -> current"`` for every shape-deciding config value that differs (SHAPE_KEYS)."""
    out = []
    for key in SHAPE_KEYS:
        a, b = _get(saved, key), _get(current, key)
        if isinstance(a, Mapping) or isinstance(b, Mapping):
            a, b = dict(a or {}), dict(b or {})
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"{key}.{sub}: {a.get(sub)!r} -> {b.get(sub)!r}")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def other_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every other differing value (informational: e.g. a longer trainer.max_steps is a normal resume)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        full = f"{prefix}{key}"
        if any(full == k or full.startswith(k + ".") for k in SHAPE_KEYS) or full in ("resume", "run_name"):
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += other_differences(a, b, f"{full}.")
        elif a != b:
            out.append(f"{full}: {a!r} -> {b!r}")
    return out


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


# --- RNG states (plain tensors and lists, so weights_only loading works) ----------------------------------------


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
        "python": _listify(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def _listify(x: Any) -> Any:
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x
