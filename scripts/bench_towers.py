"""Samples/s and memory of a timm image tower locked (LiT) against trained, in real training runs on shapes.

    python scripts/bench_towers.py                                   # timm:resnet18 at 64 px, batch 128, 40 steps
    python scripts/bench_towers.py --tower timm:resnet50 --steps 20 --out bench_results/towers.json

Each arm is one fresh process running ``scripts/train.py model=lit_shapes`` (the tiny text tower trained beside
the timm tower; random image weights: speed and memory do not depend on their values) with the data loaded in
the training process (``data.num_workers=0``), so the process's peak resident set size (VmHWM) is the whole
run's memory. samples/s is the run's own (summary.json: the training steps, data included, evaluation not).
Also printed: the parameters the optimiser holds and its AdamW state (two float32 moments per parameter).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ARMS = {"trained": ["model.lock_image=false"], "locked": ["model.lock_image=true"]}


def child(overrides: list[str]) -> dict:
    """Run one training in this process; its summary numbers and this process's peak memory."""
    import torch

    from probloss.training.builders import make_optimizer, make_tokenizer, make_trainee
    from probloss.training.config import compose_config
    from probloss.training.settings import RunSettings
    from probloss.training.loop import main

    run = RunSettings.from_config(compose_config(overrides))
    trainee = make_trainee(run, make_tokenizer(run))
    held = sum(p.numel() for g in make_optimizer(trainee, run.trainer).param_groups for p in g["params"])
    tower = sum(p.numel() for p in trainee.model.image_tower.parameters())
    del trainee
    summary = main(overrides)
    with open("/proc/self/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"samples_per_s": summary["samples_per_s"], "steps": summary["steps"], "peak_rss_mib": peak_kib / 1024,
            "optimiser_params": held, "image_tower_params": tower, "adamw_state_mib": held * 8 / 2**20,
            "torch_threads": run.trainer.num_threads or torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", default="timm:resnet18")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="bench_results/towers.json")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child)))
        return

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        common = ["model=lit_shapes", f"model.image_tower={args.tower}", "model.image_pretrained=null",
                  f"model.image_input_size={args.input_size}", f"trainer.batch_size={args.batch}",
                  f"trainer.max_steps={args.steps}", "trainer.warmup_steps=5", "trainer.eval_every=0",
                  "trainer.ckpt_every=0", "trainer.progress=false", "eval.projector_samples=0", "eval.noise_std=0",
                  "data.num_workers=0", "data.train_size=4096", "data.val_size=128", "data.test_size=128",
                  f"data.cache_dir={Path(tmp) / 'cache'}", f"out_dir={Path(tmp) / 'runs'}"]
        for arm, extra in ARMS.items():
            print(f"{arm}: training {args.steps} steps ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--child", *common, *extra], capture_output=True,
                                 text=True, check=True).stdout
            rows[arm] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])

    print(f"\n{args.tower} at {args.input_size} px, batch {args.batch}, {args.steps} steps, model=lit_shapes "
          f"({platform.processor() or platform.machine()}, {rows['trained']['torch_threads']} torch thread(s))\n")
    print("| image tower | samples/s | peak RSS (MiB) | params in the optimiser | AdamW state (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for arm, r in rows.items():
        print(f"| {arm} | {r['samples_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['optimiser_params']:,} | "
              f"{r['adamw_state_mib']:.1f} |")
    trained, locked = rows["trained"], rows["locked"]
    print(f"\nlocked / trained samples/s: {locked['samples_per_s'] / trained['samples_per_s']:.2f}x; "
          f"peak memory saved by locking: {trained['peak_rss_mib'] - locked['peak_rss_mib']:.0f} MiB")
    result = {"tower": args.tower, "input_size": args.input_size, "batch": args.batch, "steps": args.steps,
              "machine": platform.platform(), "arms": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
