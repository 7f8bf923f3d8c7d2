"""Which probloss source files one training step runs: a measurement of how far a step travels in the code.

    python scripts/step_files.py                          # accum_steps 1 and 2; prints a table, writes step_files.json
    python scripts/step_files.py --out files.json loss=infonce data.hard_negatives=all

A tiny run (3 steps, no intermediate evaluation) is trained once per ``trainer.accum_steps`` value (--accum,
default 1 and 2). During its second step (the first one warms caches), every Python function call is recorded
with ``sys.setprofile`` from the moment ``probloss.training.loop.train_step`` is entered until it returns, and
the files of the called code that lie in this repository (probloss/ and losses/) are listed: the step is
``train_step`` and what it calls (forward, loss, backward, clipping, optimizer), not reading the batch, logging
or evaluation. C++ kernels and library code (torch, Lightning) are not files of the project and are not listed.
Every other argument is a training override. A measurement tool, not a test: run it on two commits and compare.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import probloss
from probloss.training import loop

ROOT = Path(probloss.__file__).resolve().parent.parent
OWN = (ROOT / "probloss", ROOT / "losses")  # the project's source folders

TINY = ["trainer.max_steps=3", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.progress=false",
        "eval.projector_samples=0", "eval.max_samples=64", "trainer.batch_size=32"]


def _own(filename: str) -> str | None:
    """``filename`` relative to the repository when it lies in probloss/ or losses/, else None."""
    path = Path(filename)
    if not path.is_absolute():
        return None
    path = path.resolve()
    return str(path.relative_to(ROOT)) if any(path.is_relative_to(folder) for folder in OWN) else None


def trace_step(overrides: list[str], which: int = 2) -> Counter:
    """Train a tiny run with ``overrides``; the calls per project file during its ``which``-th train_step."""
    calls: Counter = Counter()
    original, seen = loop.train_step, [0]

    def profile(frame, event, arg):
        if event == "call":
            name = _own(frame.f_code.co_filename)
            if name is not None:
                calls[name] += 1

    def train_step(*args, **kwargs):
        seen[0] += 1
        if seen[0] != which:
            return original(*args, **kwargs)
        sys.setprofile(profile)
        try:
            return original(*args, **kwargs)
        finally:
            sys.setprofile(None)

    loop.train_step = train_step  # the loop looks the name up at every step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            loop.main([*TINY, f"out_dir={tmp}", *overrides], table=False)
    finally:
        loop.train_step = original
    if seen[0] < which:
        raise SystemExit(f"the run took {seen[0]} steps, fewer than {which}")
    return calls


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accum", type=int, nargs="+", default=[1, 2], help="trainer.accum_steps values traced")
    parser.add_argument("--out", default="step_files.json", help="JSON output path")
    args, overrides = parser.parse_known_args(argv)
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    result = {"commit": commit, "root": str(ROOT), "overrides": [*TINY, *overrides], "steps": {}}
    for k in args.accum:
        calls = trace_step([*overrides, f"trainer.accum_steps={k}"])
        result["steps"][f"accum_steps={k}"] = {"files": len(calls), "calls": dict(sorted(calls.items()))}
    names = sorted({f for step in result["steps"].values() for f in step["calls"]})
    columns = list(result["steps"])
    print(f"probloss files one training step runs (commit {commit}; Python calls per file during one step)\n")
    print("| file | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name in names:
        print(f"| {name} | " + " | ".join(str(result["steps"][c]["calls"].get(name, "")) for c in columns) + " |")
    print("| **files** | " + " | ".join(f"**{result['steps'][c]['files']}**" for c in columns) + " |")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
