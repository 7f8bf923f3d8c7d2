"""What a run prints: on the console and in ``<run folder>/out.log``, without garbling the progress bar.

::

    with tee_output(run_dir / "out.log"):   # rank 0, for the whole run
        say("step 200 | val/loss 1.23")      # printed above the progress bar, and into out.log
        say("warning: ...", error=True)

Everything the process writes to ``sys.stdout``/``sys.stderr`` while the block runs (prints, logging, forked
data-loader workers) goes to both, and Python warnings are printed like :func:`say`; the progress bar's
redraws (they start with a carriage return) stay on the console only, so out.log reads as a log.

A run that is one of many (a sweep's trial, a recipe's cell: ``train(..., table=False)``) keeps its progress
lines (``[eval step N] ...``, ``resumed from ...``, written with :func:`note`) in out.log only, so a study's console
shows one line per trial or run, plus warnings and errors; a plain ``probloss train`` prints them as well.

A log that cannot be written (disk full) never breaks the console (before, a full disk made every print fail and
the process died with "lost sys.stderr" and no reason): the first failure is remembered (:func:`log_error`),
the log is left alone from then on, and the training loop ends the run at its next step boundary with one line,
``write error: cannot write <run>/out.log: [Errno 28] No space left on device`` (exit 1).
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from pathlib import Path

from tqdm import tqdm


class Tee(io.TextIOBase):
    """A text stream that writes to the console stream and to a log file (see the module docstring)."""

    def __init__(self, console, log):
        self.console, self.log, self._after_bar = console, log, False

    def write(self, text: str) -> int:
        self.console.write(text)
        if "\r" in text:  # a progress-bar redraw: console only
            self._after_bar = True
        elif not (self._after_bar and text == "\n"):  # (and the newline a closing bar ends with)
            _log_write(self.log, text, self.console)
            self._after_bar = False
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        _log_write(self.log, None, self.console)

    def isatty(self) -> bool:
        return self.console.isatty()

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.console, "encoding", "utf-8")


def _log_write(log, text: str | None, console) -> None:
    """Write (or, with ``text=None``, flush) the log; on an OS error remember it (:func:`log_error`: the run ends
    at its next step boundary with one line naming out.log and the error) and stop writing the log."""
    if getattr(log, "failed", False):
        return
    try:
        log.write(text) if text is not None else log.flush()
    except OSError as err:
        log.failed, log.error = True, err


class _Log:
    """The log file, remembering whether a write to it failed (file objects take no new attributes)."""

    def __init__(self, file):
        self.file, self.failed, self.error, self.name = file, False, None, file.name

    def write(self, text: str) -> None:
        self.file.write(text)

    def flush(self) -> None:
        self.file.flush()


_LOGS: list[_Log] = []  # the logs of the tee_output blocks now open, innermost last
_QUIET: list[bool] = []  # quiet_runs blocks now open


@contextlib.contextmanager
def quiet_runs(quiet: bool = True):
    """For the block, :func:`note` lines go to the open out.log only (``quiet=False``: nothing changes)."""
    _QUIET.append(bool(quiet))
    try:
        yield
    finally:
        _QUIET.pop()


def log_error() -> tuple[str, OSError] | None:
    """(path, OS error) of the first failed write to the innermost open out.log (disk full), or None."""
    log = _LOGS[-1] if _LOGS else None
    return (log.name, log.error) if log is not None and log.error is not None else None


def note(message: str) -> None:
    """A run's progress line: printed like :func:`say`, or inside :func:`quiet_runs` (a sweep's trial, a
    recipe's run) written to the run's out.log only."""
    if _QUIET and _QUIET[-1] and _LOGS:
        _log_write(_LOGS[-1], message + "\n", sys.__stderr__)
    else:
        say(message)


@contextlib.contextmanager
def tee_output(path: str | Path):
    """Copy stdout and stderr into ``path`` (appended: a resumed run continues its log) for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", buffering=1) as file:
        log = _Log(file)
        saved = sys.stdout, sys.stderr, warnings.showwarning
        sys.stdout, sys.stderr = Tee(saved[0], log), Tee(saved[1], log)
        warnings.showwarning = _show_warning
        _LOGS.append(log)
        try:
            yield
        except BaseException as err:  # the reason a run stopped belongs in its log too
            _log_write(log, f"stopped: {type(err).__name__}: {err}\n", saved[1])
            raise
        finally:
            _LOGS.remove(log)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            sys.stdout, sys.stderr, warnings.showwarning = saved
            with contextlib.suppress(OSError):  # closing flushes: a full disk must not replace the real error
                file.close()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings (``warnings.warn``) printed above the progress bar, like :func:`say`."""
    say(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"), error=True)


def say(message: str, error: bool = False) -> None:
    """Print a line above any progress bar (tqdm.write), to stderr for warnings."""
    tqdm.write(message, file=sys.stderr if error else sys.stdout)
