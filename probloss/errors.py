"""The errors a command turns into one line and an exit status (probloss/cli.py), defined at the bottom of the
house so that every layer can raise them without importing the layers above.

====================  ============================================================  ====
error                 raised when                                                   exit
====================  ============================================================  ====
ConfigError           a bad key, choice or value in the configuration               2
DataError             input data that cannot be used as asked                       2
NonFiniteLossError    training stopped on a NaN/Inf loss, gradient or parameter     1
WriteError            a run file (checkpoint, summary, log) could not be written    1
Preempted             SIGTERM / SIGINT stopped the run (after saving a checkpoint)  143 / 130
====================  ============================================================  ====
"""
from __future__ import annotations

import signal
from pathlib import Path


class ConfigError(ValueError):
    """A bad key, choice or value in the run configuration."""


class DataError(ValueError):
    """Input data that cannot be used as asked (e.g. a truncated shard with ``data.strict=true``)."""


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss or gradient with ``trainer.on_nonfinite=stop`` (or too many in a row with ``skip``), or
    non-finite parameters after an update."""


class WriteError(OSError):
    """A checkpoint (or another run file) could not be written; the message names the path and the OS error."""

    def __init__(self, path: str | Path, err: OSError):
        reason = f"[Errno {err.errno}] {err.strerror}" if err.errno else str(err)
        super().__init__(err.errno or 0, f"cannot write {path}: {reason}")

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # pickled whole (dist.raise_together hands rank 0's error to the other ranks)
        return _write_error, (self.errno, self.strerror)


def _write_error(errno: int, message: str) -> WriteError:
    error = WriteError.__new__(WriteError)
    OSError.__init__(error, errno, message)
    return error


class Preempted(Exception):
    """SIGTERM or SIGINT stopped the run; ``checkpoint`` (None: none yet) holds step ``step`` of ``run_dir``.

    ``where``: what stopped, in place of "at step N: saved <checkpoint>" (a sweep names its trial)."""

    def __init__(self, signum: int, step: int | None, checkpoint: str | Path | None, run_dir: str | Path | None,
                 where: str | None = None):
        self.signum, self.step, self.checkpoint, self.run_dir = signum, step, checkpoint, run_dir
        self.exit_code = 128 + int(signum)
        name = signal.Signals(signum).name
        if where is not None:
            message = f"{name} {where}"
        elif checkpoint is not None:
            message = f"{name} at step {step}: saved {checkpoint}"
        else:
            message = f"{name} before the first checkpoint: nothing to resume"
        super().__init__(message)
