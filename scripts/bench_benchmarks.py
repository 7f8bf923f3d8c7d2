"""Scoring time and memory of the benchmarks' metric engine at COCO 5K scale (issue 31): 5,000 images x 25,000
captions (five per image), the tiny towers.

    python scripts/bench_benchmarks.py                                    # infonce and gaussian_var, 5000 images
    python scripts/bench_benchmarks.py --images 1000 --losses infonce     # quick run
    python scripts/bench_benchmarks.py --out bench_results/benchmarks_scale.json --label after

Each loss runs in a fresh process: ``model=tiny`` randomly initialised (the speed and memory of scoring do not
depend on the weights' values), random 32-pixel images and random shapes-grammar captions ("a small red circle
left of a blue square"), the word tokenizer. Timed separately, once each (wall clock):

- ``encode_images_s``: the image tower over the 5,000 images (batches of ``--batch``);
- ``encode_captions_s``: tokenising and encoding the 25,000 captions;
- ``rank_s``: :func:`probloss.eval.retrieval.rank_retrieval` in both directions (125 M scores from
  ``loss.score`` in blocks of ``--block`` queries, ranked);
- ``summarize_s``: :func:`~probloss.eval.retrieval.summarize` + :func:`probloss.eval.uncertainty.benchmark_uncertainty`.

``peak_rss_mib``: the process's resident-set high-water mark at the end (``resource.getrusage``, ru_maxrss),
the whole run's memory (Python, torch, model, embeddings, one block of scores). Each loss runs twice: with
glibc's default allocator settings, and with ``MALLOC_MMAP_THRESHOLD_=1048576`` (every block-sized temporary
mapped and unmapped on its own). The default raises its mmap threshold after the first large free and then serves
the ``(block, gallery)`` temporaries from a heap that fragments, so its resident set grows with the number of
blocks although the live memory does not; the second arm shows the live memory (and costs some time in page
faults). Prints a markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MALLOC_ARMS = {"default": {}, "mmap >= 1 MiB": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}


def _cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def _captions(n: int, seed: int) -> list[str]:
    """``n`` random captions of the shapes grammar (words the word tokenizer knows)."""
    import random

    from probloss.data.shapes import COLOURS, RELATIONS, SHAPES, SIZES

    rng = random.Random(seed)
    pick = lambda xs: rng.choice(list(xs))  # noqa: E731
    return [f"a {pick(SIZES)} {pick(COLOURS)} {pick(SHAPES)} {pick(RELATIONS)} a {pick(COLOURS)} {pick(SHAPES)}"
            for _ in range(n)]


def child(loss_name: str, n_images: int, per_image: int, block: int, batch: int) -> dict:
    """One loss, in this process: encode, rank, summarise; the times and the peak RSS."""
    import torch

    from probloss.training.builders import make_tokenizer, make_trainee
    from probloss.training.config import compose_config
    from probloss.eval.dual_encoder import encode_captions, encode_images
    from probloss.eval.retrieval import positive_pairs, rank_retrieval, summarize
    from probloss.eval.uncertainty import benchmark_uncertainty
    from probloss.training.settings import RunSettings

    run = RunSettings.from_config(compose_config([f"loss={loss_name}", "model=tiny"]))
    tokenizer = make_tokenizer(run)
    torch.manual_seed(0)  # the same random model in every arm: the metrics must agree across arms and versions
    trainee = make_trainee(run, tokenizer).eval()
    model, loss = trainee.model, trainee.loss
    images = torch.rand(n_images, 3, run.data.image_size, run.data.image_size,
                        generator=torch.Generator().manual_seed(0))
    captions = _captions(n_images * per_image, seed=0)
    caption_image = torch.arange(n_images).repeat_interleave(per_image)
    out: dict = {"loss": loss_name, "images": n_images, "captions": len(captions), "block": block,
                 "threads": torch.get_num_threads()}

    t = time.perf_counter()
    image_emb, image_log_std = encode_images(model, images, batch_size=batch)
    out["encode_images_s"] = time.perf_counter() - t
    t = time.perf_counter()
    text_emb, text_log_std = encode_captions(model, tokenizer, captions, batch_size=batch)
    out["encode_captions_s"] = time.perf_counter() - t
    if not loss.needs_log_std:
        image_log_std = text_log_std = None
    t = time.perf_counter()
    per_query = rank_retrieval(loss, image_emb, text_emb, image_log_std, text_log_std,
                               positive_pairs(caption_image), block=block)
    out["rank_s"] = time.perf_counter() - t
    t = time.perf_counter()
    summary = summarize(per_query)
    summary.update(benchmark_uncertainty(per_query, image_log_std, text_log_std))
    out["summarize_s"] = time.perf_counter() - t
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out["metrics"] = {k: summary[k] for k in ("i2t_r@1", "i2t_r@10", "t2i_r@1", "t2i_r@10", "i2t_rprecision",
                                              "t2i_rprecision", "i2t_map@r", "t2i_map@r", "rsum")}
    out["n_keys"] = len(summary)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-image", type=int, default=5)
    parser.add_argument("--losses", nargs="+", default=["infonce", "gaussian_var"])
    parser.add_argument("--block", type=int, default=256, help="queries per block of rank_retrieval")
    parser.add_argument("--batch", type=int, default=512, help="encoding batch size")
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. the commit)")
    parser.add_argument("--out", default="bench_results/benchmarks_scale.json")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child[:1], *map(int, args.child[1:]))))
        return
    rows = []
    for loss in args.losses:
        for malloc, extra_env in MALLOC_ARMS.items():
            cmd = [sys.executable, __file__, "--child", loss, str(args.images), str(args.per_image), str(args.block),
                   str(args.batch)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **extra_env})
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"bench_benchmarks: {loss} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
            rows.append({**json.loads(lines[-1][len("RESULT "):]), "malloc": malloc})
    cpu = _cpu_name()
    print(f"\n{rows[0]['images']} images x {rows[0]['captions']} captions, model=tiny (random init), "
          f"block {args.block}, {rows[0]['threads']} torch thread(s), {cpu}\n")
    print("| loss | malloc | encode images (s) | encode captions (s) | rank both ways (s) | "
          "summarize + uncertainty (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loss']} | {r['malloc']} | {r['encode_images_s']:.1f} | {r['encode_captions_s']:.1f} | "
              f"{r['rank_s']:.1f} | {r['summarize_s']:.2f} | {r['peak_rss_mib']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu, "torch_threads": rows[0]["threads"], "label": args.label,
                                          "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
