"""A run's eval split written in every benchmark format, and the agreement check with the built-in evaluator.

::

    python scripts/check_benchmarks.py checkpoint=runs/default/infonce/<run>/checkpoints/step-00000020.ckpt

:func:`export_split` writes the shapes test split (the run's own shards, each image's PNG bytes copied unchanged)
into ``out/``:

- ``karpathy/dataset_shapes.json`` + ``karpathy/images/test/<key>.png``: a Karpathy split file, one image per
  sample with its own caption as its one sentence; ids as in COCO (``cocoid`` = index + 1, the sentence's ``id``
  = 1000000 + index, ``sentid`` = index);
- ``eccv/image_to_caption.json``, ``eccv/caption_to_image.json``: ECCV-Caption-style association files whose
  extra positives are the split's plausible matches (a caption whose facts hold for the scene:
  :func:`probloss.data.shapes.plausible_matrix`, identical caption strings included), every image and caption a
  query; the check uses them for ``eccv_caption`` and ``cxc`` both;
- ``wds/test/0.tar`` (``<key>.png``, ``<key>.txt``, ``<key>.cls`` for the labelled ones), ``wds/classnames.txt``,
  ``wds/zeroshot_classification_templates.txt``: CLIP_benchmark's layout;
- ``folder/<NNN>_<class name>/<key>.png`` (labelled images), ``folder/classnames.txt``, ``folder/templates.txt``.

:func:`check` evaluates the checkpoint on every format and with :func:`probloss.training.evaluation.evaluate_model` on
the same split and returns the table :data:`AGREEMENT` of paired keys: they must agree exactly where they measure
the same thing (same positives, same pessimistic ties); the rows marked "by design" differ, and say why.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import webdataset as wds
from lightning_fabric import Fabric

from probloss.data.loader import IMAGE_EXTS, expand_shards
from probloss.data.prepare import load_eval, prepare_data
from probloss.errors import ConfigError
from probloss.eval import metrics
from probloss.eval.benchmarks.run import evaluate_benchmarks, prepare
from probloss.eval.dual_encoder import _plausible_positives
from probloss.models.linear import cpu_matmul
from probloss.training import checkpoint as ckpt
from probloss.training.builders import make_tokenizer, make_trainee
from probloss.training.config import apply_overrides, compose_config
from probloss.training.evaluation import evaluate_model
from probloss.training.settings import RunSettings

CAPTION_ID_BASE = 1_000_000
# (benchmark key, built-in key, what differs: "" = the same measurement, must agree exactly)
AGREEMENT = (
    ("karpathy/i2t_r@1", "test/i2t_r@1_strict", ""),
    ("karpathy/i2t_r@5", "test/i2t_r@5_strict", ""),
    ("karpathy/t2i_r@1", "test/t2i_r@1_strict", ""),
    ("karpathy/t2i_r@10", "test/t2i_r@10_strict", ""),
    ("karpathy/i2t_r@1", "test/i2t_r@1",
     "by design: the built-in multi-positive R@1 also counts another image's identical caption string as a hit; "
     "a Karpathy file knows only each image's own captions"),
    ("eccv_caption/i2t_map@r", "test/i2t_map@r", ""),
    ("eccv_caption/t2i_map@r", "test/t2i_map@r", ""),
    ("eccv_caption/i2t_rprecision", "test/i2t_rprecision", ""),
    ("eccv_caption/t2i_rprecision", "test/t2i_rprecision", ""),
    ("eccv_caption/i2t_r@1", "test/i2t_r@1_plausible", ""),
    ("eccv_caption/t2i_r@1", "test/t2i_r@1_plausible", ""),
    ("cxc/i2t_r@5", "test/i2t_r@5_plausible", ""),
    ("cxc/t2i_r@5", "test/t2i_r@5_plausible", ""),
    ("wds/i2t_r@1", "test/i2t_r@1_strict", ""),
    ("wds/t2i_r@5", "test/t2i_r@5_strict", ""),
    ("wds/zeroshot_top1", "test/zeroshot_top1", ""),
    ("folder/zeroshot_top1", "test/zeroshot_top1", ""),
    ("folder/zeroshot_top5", "test/zeroshot_top5", ""),
)


def read_split(pattern: str) -> list[dict[str, Any]]:
    """The raw samples of a split's shards in reading order: ``key``, ``png`` (bytes), ``caption``, ``json``."""

    out = []
    for raw in wds.tarfile_to_samples()(iter([{"url": u} for u in expand_shards(pattern)])):
        ext = next(e for e in IMAGE_EXTS if e in raw)
        out.append({"key": raw["__key__"], "image": raw[ext], "ext": ext, "caption": raw["txt"].decode().strip(),
                    "json": json.loads(raw["json"]) if "json" in raw else {}})
    return out


def positives_of(samples: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``(N, N)`` bool, image i x caption j: the built-in evaluator's plausible-match positives (identical caption
    strings or every fact of caption j true of scene i)."""
    captions = [s["caption"] for s in samples]
    ids: dict[str, int] = {}
    same = metrics.same_group(torch.tensor([ids.setdefault(c, len(ids)) for c in captions]))
    plausible = _plausible_positives(captions, [s["json"] for s in samples])
    return same if plausible is None else same | plausible


def export_split(samples: Sequence[dict[str, Any]], out: str | Path, classnames: Sequence[str] | None,
                 templates: Sequence[str] | None) -> dict[str, str]:
    """Write every format (module docstring) under ``out``; returns the benchmark overrides that read them."""
    out = Path(out)
    kdir = out / "karpathy" / "images" / "test"
    kdir.mkdir(parents=True, exist_ok=True)
    images = []
    for i, s in enumerate(samples):
        name = f"{s['key']}.{s['ext']}"
        (kdir / name).write_bytes(s["image"])
        images.append({"filepath": "test", "filename": name, "split": "test", "cocoid": i + 1, "imgid": i,
                       "sentids": [i], "sentences": [{"raw": s["caption"], "tokens": s["caption"].split(),
                                                       "imgid": i, "sentid": i, "id": CAPTION_ID_BASE + i}]})
    (out / "karpathy" / "dataset_shapes.json").write_text(json.dumps({"dataset": "shapes", "images": images}))

    pos = positives_of(samples)
    n = len(samples)
    eye = torch.eye(n, dtype=torch.bool)
    extra = pos & ~eye  # the own pair is always a positive; the files hold the added ones
    (out / "eccv").mkdir(exist_ok=True)
    (out / "eccv" / "image_to_caption.json").write_text(json.dumps(
        {str(i + 1): [CAPTION_ID_BASE + int(j) for j in torch.nonzero(extra[i]).flatten()] for i in range(n)}))
    (out / "eccv" / "caption_to_image.json").write_text(json.dumps(
        {str(CAPTION_ID_BASE + j): [int(i) + 1 for i in torch.nonzero(extra[:, j]).flatten()] for j in range(n)}))

    (out / "wds" / "test").mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(out / "wds" / "test" / "0.tar")) as sink:
        for s in samples:
            record = {"__key__": s["key"], s["ext"]: s["image"], "txt": s["caption"]}
            if s["json"].get("label") is not None:
                record["cls"] = str(int(s["json"]["label"]))
            sink.write(record)
    overrides = {"benchmark.karpathy.annotations": str(out / "karpathy" / "dataset_shapes.json"),
                 "benchmark.karpathy.images": str(out / "karpathy" / "images"),
                 "benchmark.wds.shards": str(out / "wds" / "test" / "0.tar")}
    for b in ("eccv_caption", "cxc"):
        overrides.update({f"benchmark.{b}.annotations": overrides["benchmark.karpathy.annotations"],
                          f"benchmark.{b}.images": overrides["benchmark.karpathy.images"],
                          f"benchmark.{b}.extra_positives": str(out / "eccv")})
    if classnames:
        templates = list(templates or ("a {}",))
        for folder in ("wds", "folder"):
            (out / folder).mkdir(exist_ok=True)
            (out / folder / "classnames.txt").write_text("\n".join(classnames) + "\n")
        (out / "wds" / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
        (out / "folder" / "templates.txt").write_text("\n".join(templates) + "\n")
        width = len(str(len(classnames)))
        for label, name in enumerate(classnames):  # every class a folder (empty ones too: C classes ranked)
            (out / "folder" / f"{label:0{width}d}_{name.replace(' ', '_')}").mkdir(exist_ok=True)
        for s in samples:
            label = s["json"].get("label")
            if label is None:
                continue
            d = out / "folder" / f"{int(label):0{width}d}_{classnames[int(label)].replace(' ', '_')}"
            (d / f"{s['key']}.{s['ext']}").write_bytes(s["image"])
        overrides.update({"benchmark.folder.root": str(out / "folder"),
                          "benchmark.folder.classnames": str(out / "folder" / "classnames.txt"),
                          "benchmark.folder.templates": str(out / "folder" / "templates.txt")})
    return overrides


def agreement_table(bench: dict[str, float], builtin: dict[str, float]) -> list[dict[str, Any]]:
    """The rows of :data:`AGREEMENT` that both sides have: values, difference, and whether they agree."""
    rows = []
    for key, ref, why in AGREEMENT:
        if key in bench and ref in builtin:
            diff = bench[key] - builtin[ref]
            rows.append({"benchmark": key, "builtin": ref, "value": bench[key], "builtin_value": builtin[ref],
                         "diff": diff, "same_measure": not why, "agree": abs(diff) < 1e-12, "why": why})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"| {'benchmark key':<28} | {'value':>7} | {'built-in key':<24} | {'value':>7} | {'diff':>8} | agrees |",
             "|" + "|".join("-" * w for w in (30, 9, 26, 9, 10, 8)) + "|"]
    for r in rows:
        verdict = ("yes" if r["agree"] else "NO") if r["same_measure"] else "n/a"
        lines.append(f"| {r['benchmark']:<28} | {r['value']:7.4f} | {r['builtin']:<24} | {r['builtin_value']:7.4f} | "
                     f"{r['diff']:+8.4f} | {verdict:<6} |")
    notes = {r["why"] for r in rows if r["why"]}
    return "\n".join(lines + [f"n/a: {note}" for note in sorted(notes)])


def check(checkpoint: str | Path, out: str | Path | None = None, progress: bool = False) -> dict[str, Any]:
    """Export the checkpoint's test split (into ``out``, default a temporary folder), evaluate it with every
    benchmark reader and with the built-in evaluator; ``{"rows": agreement rows, "benchmarks": ...,
    "builtin": ...}``."""

    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint={checkpoint}: no such file")
    raw = ckpt.read_checkpoint(checkpoint)

    run = RunSettings.from_config(apply_overrides(raw["config"], [], what=f"the config saved in {checkpoint}"))
    tokenizer = make_tokenizer(run)
    trainee = make_trainee(run, tokenizer, from_checkpoint=True)
    trainee.load_state_dict(raw["model"])
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    trainee = fabric.setup_module(trainee)
    model, loss = trainee.module.model, trainee.module.loss
    spec = prepare_data(run.data, run.trainer.batch_size)
    if spec.test is None:
        raise FileNotFoundError("the run has no test split to export (data.test_shards)")
    templates = list(spec.templates) if spec.templates else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out) if out is not None else Path(tmp)
        overrides = export_split(read_split(spec.test), folder, spec.classnames, templates)
        names = ["karpathy", "eccv_caption", "cxc", "wds"] + (["folder"] if spec.classnames else [])
        cfg = compose_config([f"checkpoint={checkpoint}", f"benchmark=[{','.join(names)}]",
                              *[f"{k}={v}" for k, v in overrides.items()]], config_name="evaluate")
        benches = prepare(cfg.benchmark, names)
        with cpu_matmul(run.trainer.cpu_matmul or "blas"):
            test_set = load_eval(spec, run.data, tokenizer, split="test", seed=run.seed)
            builtin = evaluate_model(model, loss, test_set, spec, tokenizer, device=fabric.device, prefix="test")
            results, _ = evaluate_benchmarks(model, loss, tokenizer, benches, image_size=run.data.image_size,
                                             lowercase=True, device=fabric.device, progress=progress)
    rows = agreement_table(results, builtin)
    return {"loss": run.loss_name, "n_test": len(test_set.captions), "rows": rows, "benchmarks": results,
            "builtin": {k: v for k, v in builtin.items() if isinstance(v, float)}}


def check_main(argv: Sequence[str]) -> dict[str, Any]:
    """``scripts/check_benchmarks.py checkpoint=<ckpt> [out=<folder>] [json=<file>]``: print the agreement
    table; exit 1 when a row that measures the same thing disagrees."""
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(args) - {"checkpoint", "out", "json"}) + [a for a in argv if "=" not in a]
    if unknown or "checkpoint" not in args:
        raise ConfigError(f"usage: check_benchmarks.py checkpoint=<ckpt> [out=<folder>] [json=<file>]"
                          f"{'; unknown: ' + ', '.join(unknown) if unknown else ''}")
    result = check(args["checkpoint"], args.get("out"))
    print(f"\n{result['loss']}: {result['n_test']} test pairs, benchmark readers vs the built-in evaluator")
    print(format_table(result["rows"]))
    if args.get("json"):
        Path(args["json"]).write_text(json.dumps(result, indent=1))
        print(f"wrote {args['json']}")
    if any(r["same_measure"] and not r["agree"] for r in result["rows"]):
        print("DISAGREEMENT: a benchmark reader and the built-in evaluator differ on the same measurement",
              file=sys.stderr)
        sys.exit(1)
    return result
