"""Benchmarks the field reports, read from the formats researchers have on disk (issue 31).

::

    probloss evaluate checkpoint=<ckpt> benchmark=[karpathy,eccv_caption] \
        benchmark.karpathy.annotations=coco/dataset_coco.json benchmark.karpathy.images=coco/images ...

- :mod:`.readers`: Karpathy split files (COCO, Flickr30k), ECCV Caption / CxC association files, CLIP_benchmark
  webdataset folders, ImageNet-style class folders -> :class:`.readers.Benchmark`;
- :mod:`.run`: the run's own preprocessing and tokenizer, batched encoding, blockwise scoring
  (:func:`probloss.eval.retrieval.rank_retrieval`), the results JSON ``<benchmark>/<metric>`` and the embeddings;
  its docstring gives every definition;
- :mod:`.export`: a shapes split written in each format, and the agreement check with the built-in evaluator
  (``scripts/check_benchmarks.py``).

Configs: configs/benchmark/<name>.yaml (their keys and defaults: :mod:`.settings`); docs: docs/benchmarks.md.
"""

from probloss.eval.benchmarks.readers import Benchmark
from probloss.eval.benchmarks.run import NAMES, evaluate_benchmarks, prepare, run_benchmarks

__all__ = ["NAMES", "Benchmark", "evaluate_benchmarks", "prepare", "run_benchmarks"]
