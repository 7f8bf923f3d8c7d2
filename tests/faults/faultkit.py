"""Pieces the fault suite's modules share (imported as ``faultkit``: pytest puts this folder on sys.path).

- :data:`SLOW_HOOK`: patches ``probloss.training.loop.train_step`` so that after optimizer step ``$SLOW_AFTER_STEP`` the
  process writes its pid to ``$MARK`` and holds every later step for a moment; a signal the test sends on
  seeing MARK then lands in the middle of the run (nothing is timed: tests read the step a run stopped at from
  its message). As a ``sitecustomize.py`` it reaches every worker process a study starts.
- :data:`SLOW`: a script that applies the hook and runs ``probloss $COMMAND <args>`` (default ``train``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from probloss.data import write_shapes_shards

SLOW_HOOK = """
import os, sys, time
from pathlib import Path
import probloss.training.loop as T
after, original, done = int(os.environ.get("SLOW_AFTER_STEP", 0)), T.train_step, [0]
def train_step(*args, **kwargs):
    out = original(*args, **kwargs)
    done[0] += 1
    if after and done[0] == after:
        Path(os.environ["MARK"]).write_text(str(os.getpid()))
    if after and done[0] >= after:
        time.sleep(0.5)
    return out
T.train_step = train_step
"""

SLOW = SLOW_HOOK + """
from probloss.cli import main
main([os.environ.get("COMMAND", "train"), *sys.argv[1:]])
"""


def one_line_error(out: subprocess.CompletedProcess, prefix: str, once: bool = False) -> str:
    """The last stderr line, after checking there is no traceback and it is the expected kind of error;
    ``once``: printed exactly once (by rank 0 only, in a multi-process run)."""
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith(prefix), out.stderr[-3000:]
    if once:
        assert out.stderr.count(line) == 1, out.stderr[-3000:]
    return line


def small_shards(out: Path) -> Path:
    """A small shapes dataset written as real shards into ``out`` (train 200, val 60, test 60)."""
    write_shapes_shards(out, 200, 60, test_size=60, num_workers=1, progress=False)
    return out
