"""Float32 CPU matrix products: torch's BLAS (``F.linear``, MKL in torch's x86 wheels) against oneDNN
(``probloss.models.linear``), forward and both backward products, at the default tiny model's layer shapes.

    python scripts/bench_linear.py                      # prints a markdown table, writes bench_linear.json
    python scripts/bench_linear.py --threads 2 --out linear.json

MKL picks its code path by CPU vendor: on AMD CPUs it runs AVX2 even where AVX-512 exists, and oneDNN does
not. The table says which one wins on the machine it runs on; ``trainer.cpu_matmul`` chooses (configs/train.yaml).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from probloss.models.linear import _OneDNNLinear, onednn_available
from probloss.training.launch import reuse_freed_memory

# (rows = batch 128 x tokens 17, in, out): the tiny ViT's qkv, attention output, MLP in and out; then one large.
SHAPES = [(2176, 64, 192), (2176, 64, 64), (2176, 64, 256), (2176, 256, 64), (4096, 1024, 1024)]


def _seconds(fn, min_time: float = 0.3) -> float:
    """Median seconds per call over ~min_time of calls (after warm-up)."""
    for _ in range(3):
        fn()
    times, started = [], time.perf_counter()
    while time.perf_counter() - started < min_time or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _fwd_bwd(impl, x, w, b):
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    upstream = torch.ones(x.shape[0], w.shape[0])

    def run():  # the three gradients, returned rather than accumulated into .grad
        torch.autograd.grad(impl(x, w, b), (x, w, b), upstream)

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (training uses 1)")
    parser.add_argument("--out", default="bench_linear.json", help="JSON output path")
    args = parser.parse_args(argv)
    if not onednn_available():
        raise SystemExit("this torch build has no oneDNN linear op: nothing to compare")
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as in training: outputs come from freed memory, not fresh pages
    torch.manual_seed(0)
    rows = []
    for m, k, n in SHAPES:
        x, w, b = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.zeros(n)
        flops = 2 * m * k * n
        blas_fwd = _seconds(lambda: F.linear(x, w, b))
        onednn_fwd = _seconds(lambda: _OneDNNLinear.apply(x, w, b))
        blas_all = _seconds(_fwd_bwd(F.linear, x, w, b))
        onednn_all = _seconds(_fwd_bwd(_OneDNNLinear.apply, x, w, b))
        rows.append({"rows": m, "in": k, "out": n,
                     "blas_fwd_gflops": flops / blas_fwd / 1e9, "onednn_fwd_gflops": flops / onednn_fwd / 1e9,
                     "blas_fwd_bwd_ms": 1e3 * blas_all, "onednn_fwd_bwd_ms": 1e3 * onednn_all,
                     "speedup_fwd_bwd": blas_all / onednn_all})
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    print(f"{machine}, {args.threads} thread(s), torch {torch.__version__}\n")
    print("| rows x in -> out | BLAS fwd GFLOP/s | oneDNN fwd GFLOP/s | BLAS fwd+bwd ms | oneDNN fwd+bwd ms "
          "| speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rows']} x {r['in']} -> {r['out']} | {r['blas_fwd_gflops']:.0f} | {r['onednn_fwd_gflops']:.0f} | "
              f"{r['blas_fwd_bwd_ms']:.3f} | {r['onednn_fwd_bwd_ms']:.3f} | {r['speedup_fwd_bwd']:.2f}x |")
    result = {"machine": machine, "threads": args.threads, "torch": torch.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
