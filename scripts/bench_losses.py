"""Benchmark every built-in loss's dense and tiled implementations against the matrix-product floor.

    python scripts/bench_losses.py                                   # full CPU run (B up to 16384; minutes)
    python scripts/bench_losses.py --sizes 1024 --repeats 2          # quick run
    python scripts/bench_losses.py --device cuda --sizes 4096 16384 65536 --block-size 4096
    python scripts/bench_losses.py --sizes 128 1024 --dim 64 --losses infonce --impls auto \
        --false-negatives keep mask positive                         # the cost of loss.false_negatives

For each loss x impl x B (D = 512, float32 by default) one fresh subprocess creates the inputs, runs forward +
backward once to measure peak memory, then ``--repeats`` more times for the median time. Cases:

- ``floor``: ``(X @ Y.T).sum()`` forward + backward, the three B x B x D matrix products any loss pays;
- ``infonce``, ``sigmoid``, ``gaussian_var``, ``sigmoid_var``, ``pcmepp`` and ``prolip`` (per-sample log-std,
  each loss's default options) with ``impl`` in ``dense`` and ``tiled``;
- ``gaussian_var_diag`` (per-dimension log-std; not in the default set);
- ``--false-negatives mask positive``: the losses also with ``loss.false_negatives`` (probloss/false_negatives.py),
  given caption ids where 30% of the B captions are drawn from 12 frequent ones (about the share of the shapes
  data's least specific captions) and every image its own scene; ``keep`` passes no ids, as training does;
- ``pseudocode``: the proposal's plain PyTorch pseudocode for gaussian_var (docs/design.md, Sources), with its
  ``(n, n, d)`` broadcast, only up to ``--pseudocode-max`` (default 2048; at B = 1024 it already needs GiBs).

Peak memory above the inputs (CPU): the process's resident-set high-water mark (``VmHWM`` in
``/proc/self/status``) during the first forward + backward minus the resident set just before it, after the
inputs exist and the BLAS threads are warm. The high-water mark is reset before the measured step by writing
"5" to ``/proc/self/clear_refs`` (Linux >= 4.0); torch's CPU allocator returns large blocks to the OS, so
this is what the step really needs, including the gradients of the inputs. (``tracemalloc`` does not see
torch's allocator.) On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the step, and
times from CUDA events.

Prints a markdown table and writes JSON to ``--out``. Timings on a shared machine are noisy: compare a loss
with the floor measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPL_LOSSES = ("infonce", "sigmoid", "gaussian_var", "sigmoid_var", "pcmepp", "prolip", "gaussian_var_diag")
DEFAULT_LOSSES = ("floor", "infonce", "sigmoid", "gaussian_var", "sigmoid_var", "pcmepp", "prolip", "pseudocode")
MIB = 2**20


# --- worker: one case in a fresh process ------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proposal_pseudocode(I_f, I_ln_std, T_f, T_ln_std):  # noqa: N803 - the proposal's names
    """The proposal's PyTorch pseudocode verbatim (its ``(n, n, d)`` broadcast included)."""
    import torch
    from torch import nn

    n = I_f.size(0)
    ce_loss = nn.CrossEntropyLoss()
    I_f = I_f.unsqueeze(1)  # noqa: N806
    T_f = T_f.unsqueeze(0)  # noqa: N806
    distances = torch.sum((I_f - T_f) ** 2, dim=2)  # (n, n) from an (n, n, d) tensor
    I_var = I_ln_std.exp() ** 2  # noqa: N806
    T_var = T_ln_std.exp() ** 2  # noqa: N806
    T_ln_std = T_ln_std.unsqueeze(0)  # noqa: N806
    T_var = T_var.unsqueeze(0)  # noqa: N806
    I_ln_std = I_ln_std.unsqueeze(0)  # noqa: N806
    I_var = I_var.unsqueeze(0)  # noqa: N806
    label = torch.arange(n, device=I_f.device)
    loss_t = ce_loss(-T_ln_std - distances / T_var, label)
    loss_i = ce_loss(-I_ln_std - distances.t() / I_var, label)
    return (loss_t + loss_i) / 2


def make_step(case: dict):
    """Inputs and a closure running one forward + backward of the case."""
    import torch

    import probloss

    device, dtype = torch.device(case["device"]), getattr(torch, case["dtype"])
    b, d, loss_name = case["batch"], case["dim"], case["loss"]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=dtype)).to(device).requires_grad_()

    x, y = leaf(b, d), leaf(b, d)
    inputs = [x, y]
    if loss_name == "floor":
        def forward():
            return (x @ y.T).sum()
    elif loss_name == "pseudocode":
        lx, ly = leaf(b, scale=0.1), leaf(b, scale=0.1)
        inputs += [lx, ly]

        def forward():
            return proposal_pseudocode(x, lx, y, ly)
    else:
        name = "gaussian_var" if loss_name.startswith("gaussian_var") else loss_name
        false_negatives = case.get("false_negatives", "keep")
        loss = probloss.build_loss(name, impl=case["impl"], block_size=case["block_size"],
                                   false_negatives=false_negatives).to(device=device, dtype=dtype)
        args = [x, y]
        groups = {}
        if false_negatives != "keep":
            frequent = torch.randint(0, 12, (b,), generator=gen)
            shared = torch.rand(b, generator=gen) < 0.3
            groups = {"text_groups": torch.where(shared, frequent, 1000 + torch.arange(b)).to(device),
                      "image_groups": torch.arange(b, device=device)}
        if loss.needs_log_std:
            shape = (b, d) if loss_name == "gaussian_var_diag" else (b,)
            lx, ly = leaf(*shape, scale=0.1), leaf(*shape, scale=0.1)
            args += [lx, ly]
            inputs += [lx, ly]

        def forward():
            return loss(*args, **groups)

    def step():
        for t in inputs:
            t.grad = None
        forward().backward()

    return step, inputs


def run_case(case: dict) -> dict:
    if case.get("mem_limit_gib") and not case["device"].startswith("cuda"):
        # A clean "out of memory" error in this worker instead of the kernel's OOM killer on a shared machine.
        import resource

        limit = int(case["mem_limit_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    step, inputs = make_step(case)
    cuda = case["device"].startswith("cuda")
    out = dict(case)
    # Warm the BLAS thread pool / CUDA context with a small product, so it is not counted as loss memory.
    warm = torch.randn(256, 256, device=case["device"])
    (warm @ warm).sum().item()
    del warm
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / MIB
    else:
        rss_before = _proc_status_kib("VmRSS")
        out["peak_reset"] = _reset_peak_rss()
        step()
        hwm = _proc_status_kib("VmHWM")
        out["peak_mib"] = (hwm - rss_before) / 1024 if hwm is not None and rss_before is not None else None
    times = []
    for _ in range(case["repeats"]):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    out["times_s"] = times
    out["median_s"] = statistics.median(times) if times else None
    out["threads"] = torch.get_num_threads()
    return out


# --- driver -------------------------------------------------------------------------------------------------------


def build_cases(args) -> list[dict]:
    cases = []
    for b in args.sizes:
        for loss in args.losses:
            if loss == "pseudocode" and b > args.pseudocode_max:
                continue
            impls = args.impls if loss in IMPL_LOSSES else ["-"]
            modes = args.false_negatives if loss in IMPL_LOSSES else ["keep"]
            for impl in impls:
                if impl == "dense" and args.dense_max is not None and b > args.dense_max:
                    continue
                for mode in modes:
                    cases.append({
                        "loss": loss, "impl": impl, "batch": b, "dim": args.dim, "dtype": args.dtype,
                        "device": args.device, "block_size": args.block_size, "repeats": args.repeats,
                        "threads": args.threads, "mem_limit_gib": args.mem_limit_gib, "false_negatives": mode,
                    })
    return cases


def spawn(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {**case, "error": f"{reason}: {proc.stderr.strip().splitlines()[-1:] or ''}"}
    return json.loads(lines[-1])


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    floors = {(r["batch"], r["dim"]): r.get("median_s") for r in results if r["loss"] == "floor"}
    rows = [
        "| loss | impl | B | D | fwd+bwd median (s) | x floor | peak above inputs (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        floor = floors.get((r["batch"], r["dim"]))
        fn = r.get("false_negatives", "keep")
        r = {**r, "loss": r["loss"] if fn == "keep" else f"{r['loss']} false_negatives={fn}"}
        if "error" in r:
            rows.append(f"| {r['loss']} | {r['impl']} | {r['batch']} | {r['dim']} | failed: {r['error']} | - | - |")
            continue
        ratio = r["median_s"] / floor if floor and r.get("median_s") else None
        rows.append(
            f"| {r['loss']} | {r['impl']} | {r['batch']} | {r['dim']} | {fmt(r['median_s'], '.3f')} | "
            f"{fmt(ratio, '.2f')} | {fmt(r.get('peak_mib'), '.0f')} |"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384], help="batch sizes B")
    parser.add_argument("--losses", nargs="+", default=list(DEFAULT_LOSSES),
                        choices=["floor", "pseudocode", *IMPL_LOSSES], help="cases to run")
    parser.add_argument("--impls", nargs="+", default=["dense", "tiled"], choices=["dense", "tiled", "auto"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--block-size", type=int, default=512, help="tile side of the tiled kernels (CPU: 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (after one untimed run)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each worker")
    parser.add_argument("--pseudocode-max", type=int, default=2048, help="largest B for the (n, n, d) pseudocode")
    parser.add_argument("--dense-max", type=int, default=None, help="skip dense cases above this B")
    parser.add_argument("--false-negatives", nargs="+", default=["keep"], choices=["keep", "mask", "positive"],
                        help="loss.false_negatives options to run each loss with (module docstring)")
    parser.add_argument("--mem-limit-gib", type=float, default=16.0,
                        help="CPU: address-space limit per worker (a failing case reports an error); 0 = none")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument("--out", default="bench_results/bench_losses.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_case(json.loads(args.worker))), flush=True)
        return

    results = []
    started = time.time()
    for case in build_cases(args):
        result = spawn(case, args.timeout)
        results.append(result)
        status = result.get("error") or f"{result['median_s']:.3f} s, {fmt(result.get('peak_mib'), '.0f')} MiB"
        print(f"[{time.time() - started:6.0f} s] {case['loss']:<18} {case['impl']:<5} {case['false_negatives']:<8} "
              f"B={case['batch']:<6} {status}",
              file=sys.stderr, flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(table(results))
    meta = {"argv": sys.argv[1:], "cpu_count": os.cpu_count(), "loadavg_end": load, "wall_s": time.time() - started}
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["cuda_device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    except Exception:  # noqa: BLE001 - metadata only
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
