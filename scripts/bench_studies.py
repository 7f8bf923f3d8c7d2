"""Wall time of a recipe and of a grid sweep with 1 and N local workers, and whether their results are identical.

    python scripts/bench_studies.py                                   # recipe=proposal_2e-3 seed 0, lr_grid on infonce
    python scripts/bench_studies.py --seeds 0 1 --workers 1 2 --out bench_results/studies.json
    python scripts/bench_studies.py --steps 50 --sweep-steps 50       # a quick check that it works

Each measurement is one ``probloss recipe`` / ``probloss sweep`` command (``recipe.workers=N`` /
``sweep.workers=N``, one thread per run: trainer.num_threads=1) in a fresh output folder, timed from start to exit,
after one warm-up run has generated the shapes data into a shared cache. The recipe is ``--recipe`` with
``recipe.seeds=--seeds`` and the recipe's own steps unless ``--steps``; the sweep is ``sweep=lr_grid`` on one loss
over ``--lrs`` x seed 0 (a grid: the same trials whatever the number of workers). Identical: every number of every
results.json row (recipe) and every trial's objective and user attributes (sweep) equal bit for bit to the 1-worker
run, except times and speeds (keys ending in ``_s``). Seeds in 90 min: how many seeds of the recipe's arms fit in
90 minutes at the measured time per seed. Run it on an otherwise idle machine: other processes change every time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBLOSS = [sys.executable, "-c", "from probloss.cli import main; main()"]


def timed(args: list[str]) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([*PROBLOSS, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: probloss {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def comparable(row: dict) -> dict:
    """The numbers that a deterministic run reproduces: every key but times, speeds and paths."""
    return {k: v for k, v in row.items() if not k.endswith("_s") and k not in ("run_dir",)}


def recipe_results(out_dir: Path, recipe: str) -> dict:
    rows = json.loads((out_dir / recipe / "results.json").read_text())
    return {f"{r['arm']}|{r['seed']}": comparable(r) for r in rows}


def sweep_results(out_dir: Path, loss: str) -> dict:
    import optuna

    from probloss.studies.sweep import storage_for

    storage = storage_for(None, out_dir, "lr_grid")
    study = optuna.load_study(study_name=f"lr_grid-{loss}", storage=storage)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {json.dumps(t.params, sort_keys=True): {"values": t.values, **comparable(
        {k: v for k, v in t.user_attrs.items() if k not in ("host", "pid", "heartbeat", "worker", "sampler_seed")})}
        for t in trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="proposal_2e-3")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the recipe's own)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loss", default="infonce", help="the sweep's loss")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    parser.add_argument("--sweep-steps", type=int, default=300)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--out", default=None, help="write the table's numbers as JSON here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-studies-"))
    cache = work / "cache"
    common = [f"data.cache_dir={cache}", "trainer.num_threads=1", "trainer.progress=false"]
    steps = [f"trainer.max_steps={args.steps}"] if args.steps else []
    seeds = "[" + ",".join(map(str, args.seeds)) + "]"
    print(f"warm-up (data generation) in {work}", flush=True)
    timed(["train", f"out_dir={work / 'warm'}", *common, "trainer.max_steps=1", "trainer.eval_every=0"])

    rows, reference = [], {}
    for n in args.workers:
        out = work / f"recipe-w{n}"
        wall = timed(["recipe", f"recipe={args.recipe}", f"recipe.seeds={seeds}", f"recipe.workers={n}",
                      f"out_dir={out}", *common, *steps])
        results = recipe_results(out, args.recipe)
        reference.setdefault("recipe", results)
        per_seed = wall / len(args.seeds)
        rows.append({"what": f"recipe={args.recipe} seeds={seeds}" + (f" steps={args.steps}" if args.steps else ""),
                     "workers": n, "runs": len(results), "wall_s": wall,
                     "identical_to_1_worker": results == reference["recipe"],
                     "seeds_in_90_min": math.floor(90 * 60 / per_seed)})
        print(rows[-1], flush=True)
    if not args.skip_sweep:
        space = ("sweep.space={trainer.lr: {type: categorical, choices: [" + ", ".join(map(str, args.lrs))
                 + "]}, seed: {type: categorical, choices: [0]}}")
        for n in args.workers:
            out = work / f"sweep-w{n}"
            wall = timed(["sweep", "sweep=lr_grid", f"sweep.losses=[{args.loss}]", space, f"sweep.workers={n}",
                          f"out_dir={out}", *common, f"trainer.max_steps={args.sweep_steps}"])
            results = sweep_results(out, args.loss)
            reference.setdefault("sweep", results)
            rows.append({"what": f"sweep=lr_grid {args.loss} {len(args.lrs)} lrs steps={args.sweep_steps}",
                         "workers": n, "runs": len(results), "wall_s": wall,
                         "identical_to_1_worker": results == reference["sweep"], "seeds_in_90_min": None})
            print(rows[-1], flush=True)

    print(f"\n{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} usable cores")
    print("| what | workers | runs | wall time | speed-up | identical to 1 worker | seeds in 90 min |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r["wall_s"] for r in rows if r["what"] == row["what"])
        seeds90 = row["seeds_in_90_min"] if row["seeds_in_90_min"] is not None else "-"
        print(f"| {row['what']} | {row['workers']} | {row['runs']} | {row['wall_s'] / 60:.2f} min | "
              f"{base / row['wall_s']:.2f}x | {'yes' if row['identical_to_1_worker'] else 'NO'} | {seeds90} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "cores": len(os.sched_getaffinity(0))}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
