"""Where a training run's time goes: one short run under torch.profiler, split into the training loop's phases.

    python scripts/profile_step.py                                   # the default run (tiny model, infonce), 300 steps
    python scripts/profile_step.py loss=gaussian_var --steps 500 --out profile.json
    python scripts/profile_step.py --no-profiler trainer.num_threads=2   # wall time and samples/s alone

Options: --steps (300), --top (operators listed, 15), --no-profiler, --out (profile_step.json); every other
argument is a training override, checked like ``probloss train``'s (an unknown key: one line, exit 2).

Runs ``probloss.training.loop.main`` with the given overrides (a throwaway run folder under a temporary out_dir unless
``out_dir=`` is given; ``trainer.eval_every`` and ``ckpt_every`` as configured, so evaluation and checkpoints
cost what they cost in a real run) and reports the time inside each range the loop marks with
``probloss.training.loop.phase``: data (waiting for the next batch), forward (both towers), loss, backward, optimizer
(gradient clipping and the AdamW step), logging (TensorBoard scalars and the loss's diagnostics), evaluation and
checkpoint; "other" is the rest of the run's wall time (setup, data generation, progress bar, scheduler). Then
the top operators by self CPU time. Prints markdown tables and writes JSON (``--out``).

The profiler's own overhead (a few microseconds per operator) inflates the phases made of many small operators;
``--no-profiler`` measures the run's wall time and samples/s without it (compare those across commits).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

PHASES = ("data", "forward", "loss", "backward", "optimizer", "logging", "evaluation", "checkpoint")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="trainer.max_steps of the profiled run")
    parser.add_argument("--top", type=int, default=15, help="operators listed by self CPU time")
    parser.add_argument("--no-profiler", action="store_true", help="time the run without torch.profiler")
    parser.add_argument("--out", default="profile_step.json", help="JSON output path")
    args, user_overrides = parser.parse_known_args(argv)
    from probloss.training.config import compose_config
    from probloss.training.loop import main as train_main

    compose_config(user_overrides)  # every key checked before the profiler starts

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"trainer.max_steps={args.steps}", "trainer.progress=false", "eval.projector_samples=0",
                     f"out_dir={tmp}", *user_overrides]  # later overrides win: out_dir= keeps the run
        started = time.perf_counter()
        if args.no_profiler:
            summary = train_main(overrides)
            prof = None
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                summary = train_main(overrides)
        wall = time.perf_counter() - started
    steps = int(summary["steps"])
    result = {"overrides": user_overrides, "steps": steps, "wall_s": wall, "samples_per_s": summary["samples_per_s"],
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
              "profiler": prof is not None}
    print(f"{steps} steps in {wall:.1f} s wall; samples/s (training loop, data included): "
          f"{summary['samples_per_s']:.0f}{'' if prof is None else ' (under the profiler)'}")
    if prof is not None:
        averages = prof.key_averages()
        inside = {e.key.removeprefix("probloss/"): e.cpu_time_total / 1e6 for e in averages
                  if e.key.startswith("probloss/")}
        phases = {name: inside.get(name, 0.0) for name in PHASES}
        phases["other"] = max(0.0, wall - sum(phases.values()))
        result["phases_s"] = phases
        print("\n| phase | total (s) | ms per step | share of wall |\n|---|---:|---:|---:|")
        for name, seconds in phases.items():
            print(f"| {name} | {seconds:.2f} | {1e3 * seconds / steps:.2f} | {100 * seconds / wall:.1f}% |")
        ops = sorted((e for e in averages if not e.key.startswith("probloss/")), key=lambda e: -e.self_cpu_time_total)
        result["top_ops"] = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                             for e in ops[:args.top]]
        print("\n| operator | self CPU (s) | calls | us per call |\n|---|---:|---:|---:|")
        for e in ops[:args.top]:
            seconds = e.self_cpu_time_total / 1e6
            print(f"| `{e.key}` | {seconds:.2f} | {e.count} | {1e6 * seconds / e.count:.1f} |")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    import sys

    from probloss.cli import run_command

    run_command(main, "train", __doc__, sys.argv[1:])  # the commands' --help, one-line errors and exit codes
