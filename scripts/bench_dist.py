"""Per-rank peak memory and step time of the distributed loss modes, with real gloo processes on CPU.

    python scripts/bench_dist.py                          # W in {1,2,4}, B_local in {256,1024}, D=512
    python scripts/bench_dist.py --worlds 1 2 --batches 256 --repeats 2 --out bench_results/dist.json

Each (mode, W, B_local) case runs in W fresh processes. Memory: after one warm-up step, each rank resets its peak
resident set size (/proc/self/clear_refs, Linux), runs one forward+backward, and reports VmHWM minus the
resident size before: the memory the loss step itself touched. MALLOC_MMAP_THRESHOLD_ is fixed so that glibc
returns large tensors to the system when freed (otherwise the warm-up's memory would be reused unseen). Time: the median of --repeats further steps
(all ranks start each step at a barrier; the slowest rank's time is reported). With W ranks on fewer cores the
times are oversubscribed; memory is not affected.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

import probloss
from probloss import dist
from probloss.testing import free_port

MODES = {
    "sigmoid ring dense": ("sigmoid", {"dist_impl": "ring", "impl": "dense"}),
    "sigmoid ring tiled": ("sigmoid", {"dist_impl": "ring", "impl": "tiled", "block_size": 256}),
    "sigmoid shift tiled": ("sigmoid", {"dist_impl": "shift", "impl": "tiled", "block_size": 256}),
    "sigmoid gather tiled": ("sigmoid", {"dist_impl": "gather", "impl": "tiled", "block_size": 256}),
    "infonce local_loss": ("infonce", {"local_loss": True}),
    "infonce full": ("infonce", {"local_loss": False}),
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _worker(rank, world, init, out, name, kwargs, batch, dim, repeats):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init, rank, world)
    loss = probloss.build_loss(name, **kwargs)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, dim, generator=gen, requires_grad=True)
    y = torch.randn(batch, dim, generator=gen, requires_grad=True)
    loss(x, y).backward()  # warm-up: thread pools, autograd engine, lazy initialisation
    x.grad = y.grad = None
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size to the current one
    before = _status_kib("VmRSS")
    loss(x, y).backward()
    peak_mib = (_status_kib("VmHWM") - before) / 1024
    times = []
    for _ in range(repeats):
        x.grad = y.grad = None
        dist.barrier()
        start = time.perf_counter()
        loss(x, y).backward()
        times.append(time.perf_counter() - start)
    slowest = torch.tensor([statistics.median(times), peak_mib])
    gathered = [torch.zeros(2, dtype=slowest.dtype) for _ in range(world)]
    dist.all_gather_list(gathered, slowest)
    if rank == 0:
        stacked = torch.stack(gathered)
        with open(out, "w") as f:
            json.dump({"step_s": stacked[:, 0].max().item(), "peak_mib_max": stacked[:, 1].max().item(),
                       "peak_mib_per_rank": stacked[:, 1].tolist()}, f)
    dist.finish(ok=True)


def run_case(name, kwargs, world, batch, dim, repeats):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        init = f"tcp://127.0.0.1:{free_port()}"
        mp.start_processes(_worker, args=(world, init, out, name, kwargs, batch, dim, repeats), nprocs=world,
                           start_method="spawn", join=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024], help="B_local per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_results/bench_dist.json")
    args = parser.parse_args(argv)

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # inherited by the spawned ranks
    rows = []
    header = "| mode | W | B_local | B_global | step ms (slowest rank) | peak MiB per rank (max) |"
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, D={args.dim}, float32, gloo", flush=True)
    print(header + "\n|---|---|---|---|---|---|", flush=True)
    for mode in args.modes:
        name, kwargs = MODES[mode]
        for batch in args.batches:
            for world in args.worlds:
                result = run_case(name, kwargs, world, batch, args.dim, args.repeats)
                rows.append({"mode": mode, "world_size": world, "batch_local": batch, "dim": args.dim, **result})
                print(f"| {mode} | {world} | {batch} | {world * batch} | {1000 * result['step_s']:.1f} | "
                      f"{result['peak_mib_max']:.1f} |", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "platform": sys.platform},
                   "results": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
