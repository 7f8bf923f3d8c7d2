"""Evaluation of a run: during training (every ``trainer.eval_every`` steps and at the end) and of a saved
checkpoint (``scripts/evaluate.py``).

``val/loss`` is computed here and only here (:func:`val_loss`): the training loss on the val set in global
batches, each rank embedding its slice exactly as in training, so it is comparable with ``train/loss`` and
the same for any world size. Every other metric comes from :func:`probloss.eval.dual_encoder` on rank 0: on val
(selection: sweeps, pruning, best learning rate) at every evaluation, and on test (reporting) at the end.
"""

from __future__ import annotations

import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning_fabric import Fabric

from probloss import dist
from probloss.data.prepare import DataSpec, load_eval, prepare_data
from probloss.errors import ConfigError
from probloss.eval import evaluate, image_sigma_vs_noise
from probloss.eval.benchmarks import prepare, run_benchmarks
from probloss.eval.benchmarks.run import default_output
from probloss.eval.benchmarks.settings import EvaluateOutputSettings, EvaluateSettings
from probloss.files import write_json
from probloss.models.linear import cpu_matmul
from probloss.training import checkpoint as ckpt
from probloss.training.builders import make_tokenizer, make_trainee
from probloss.training.config import apply_overrides, compose_config, override_key
from probloss.training.console import note, say
from probloss.training.run_folder import finite_scalars, print_summary
from probloss.training.settings import RunSettings


@torch.no_grad()
def val_loss(fabric, trainee, eval_set, global_batch: int) -> float:
    """The training loss on the val set in global batches (comparable with train/loss); all ranks take part.

    Always the plain paired loss: hard negatives (``data.hard_negatives``) are a training-time choice, so val/loss
    stays comparable across runs with and without them."""
    module = trainee.module if hasattr(trainee, "module") else trainee  # no DDP forward (no buffer broadcast)
    world, rank = fabric.world_size, fabric.global_rank
    n = len(eval_set.captions)
    batch = min(global_batch, n - n % world)
    per = batch // world
    if per == 0:
        return float("nan")
    total, count = 0.0, 0
    was_training = module.training
    module.eval()
    for start in range(0, n - batch + 1, batch):
        lo = start + rank * per
        images = fabric.to_device(eval_set.images[lo: lo + per])
        tokens = fabric.to_device(eval_set.tokens[lo: lo + per])
        emb = module(images, tokens)
        value, _ = dist.global_mean(fabric, module.loss(*emb.loss_args()))
        total, count = total + value, count + 1
    module.train(was_training)
    return total / max(1, count)


def evaluate_at_step(fabric, run: RunSettings, trainee, eval_set, spec: DataSpec, tokenizer, logger, step: int,
             final: bool = False) -> dict[str, Any]:
    """val/loss (all ranks) and every metric of probloss.eval.dual_encoder (rank 0; the others wait).

    Returns the metrics on rank 0 and ``{}`` elsewhere; logs them to TensorBoard. ``final`` adds the test
    split (``test/*``: reported, never used to choose anything; read from disk only here, so intermediate
    evaluations and sweeps' pruning see val alone; ``eval_test_s`` is its cost in seconds) and, for losses
    with log-std, the image sigma vs pixel-noise check.
    """
    metrics: dict[str, Any] = {"val/loss": val_loss(fabric, trainee, eval_set, run.trainer.batch_size)}
    if fabric.is_global_zero:
        module = trainee.module
        noisy = None
        if final and module.loss.needs_log_std and run.eval.noise_std:
            noisy = load_eval(spec, run.data, tokenizer, seed=run.seed, max_samples=run.eval.max_samples,
                              image_noise=float(run.eval.noise_std))
        metrics.update(evaluate_model(module.model, module.loss, eval_set, spec, tokenizer, device=fabric.device,
                                      noisy_eval_set=noisy, planted_attribute=run.data.noise_attribute))
        if final and spec.test is not None:
            started = time.perf_counter()
            try:
                test_set = load_eval(spec, run.data, tokenizer, split="test", seed=run.seed,
                                     image_noise=float(run.eval.image_noise or 0.0))
            except RuntimeError as err:  # unreadable test shards must not cost the trained run its summary
                say(f"warning: test split skipped: {err}", error=True)
                metrics["test/error"] = str(err)
            else:
                metrics.update(evaluate_model(module.model, module.loss, test_set, spec, tokenizer,
                                              device=fabric.device, prefix="test",
                                              planted_attribute=run.data.noise_attribute))
                metrics["eval_test_s"] = time.perf_counter() - started
        if logger is not None:
            logger.log_metrics(finite_scalars(metrics), step=step)
        note(metrics_line(step, metrics))  # console and out.log; out.log only in sweeps and recipes
    dist.barrier(fabric)
    return metrics if fabric.is_global_zero else {}


HEADLINE = ("val/loss", "val/zeroshot_top1", "val/i2t_r@1", "val/t2i_r@1", "embed/effective_rank",
            "test/zeroshot_top1", "test/i2t_r@1")


def metrics_line(step: int, metrics: dict[str, Any]) -> str:
    """One compact line of an evaluation's headline metrics (the full set: TensorBoard, summary.json)."""
    shown = [f"{key} {metrics[key]:.4g}" for key in HEADLINE if isinstance(metrics.get(key), (int, float))]
    return f"[eval step {step}] " + " | ".join(shown)


def evaluate_model(model, loss, eval_set, spec: DataSpec, tokenizer, device=None, noisy_eval_set=None,
                   prefix: str = "val", planted_attribute: str | None = None) -> dict[str, Any]:
    """probloss.eval.dual_encoder with the run's zero-shot classes, templates and held-out classes (model in eval
    mode); keys under ``prefix`` ("val" or "test").

    With ``noisy_eval_set`` (the same images with Gaussian pixel noise) and a loss with log-std, also the
    image sigma on noisy vs clean images (``unc/image_sigma_noise_ratio``; > 1 when noise raises sigma).
    """
    metrics = dict(evaluate(model, loss, eval_set, tokenizer, device=device, classnames=spec.classnames,
                               templates=spec.templates, prefix=prefix, heldout_classnames=spec.heldout,
                               planted_attribute=planted_attribute))
    if noisy_eval_set is not None and loss.needs_log_std:
        metrics.update(image_sigma_vs_noise(model, eval_set.images, noisy_eval_set.images, device=device))
    return metrics


@torch.no_grad()
def log_projector(model, eval_set, logger, step: int, max_samples: int) -> None:
    """TensorBoard projector: val image and text embeddings with caption, specificity level and sigma."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = min(max_samples, len(eval_set.captions))
    images, tokens = eval_set.images[:n], eval_set.tokens[:n]
    image_emb, image_log_std = model.encode_image(images.to(device))
    text_emb, text_log_std = model.encode_text(tokens.to(device))
    model.train(was_training)
    metas = eval_set.json[:n]

    def sigma(log_std, i):
        if log_std is None:
            return "n/a"
        return f"{log_std[i].float().exp().mean().item():.4f}"  # (B,) or the mean over dims of (B, D)

    header = ["caption", "level", "n_objects", "sigma"]
    text_meta = [[eval_set.captions[i].replace("\t", " "), str(metas[i].get("level", "")),
                  str(len(metas[i].get("objects", []) or [])), sigma(text_log_std, i)] for i in range(n)]
    image_meta = [[row[0], row[1], row[2], sigma(image_log_std, i)] for i, row in enumerate(text_meta)]
    # Thumbnails: min-max scale each normalised image back to [0, 1].
    flat = images.float().reshape(n, -1)
    lo, hi = flat.min(1).values.view(n, 1, 1, 1), flat.max(1).values.view(n, 1, 1, 1)
    thumbs = ((images.float() - lo) / (hi - lo).clamp_min(1e-6)).cpu()
    writer = logger.experiment
    writer.add_embedding(text_emb.float().cpu(), metadata=text_meta, metadata_header=header, global_step=step,
                         tag="val_text")
    writer.add_embedding(image_emb.float().cpu(), metadata=image_meta, metadata_header=header, label_img=thumbs,
                         global_step=step, tag="val_image")
    writer.flush()


# configs/evaluate.yaml's own keys (EvaluateSettings); every other key=value changes the checkpoint's config
BENCHMARK_KEYS = ("checkpoint", "benchmark", *(f"eval.{f.name}" for f in fields(EvaluateOutputSettings)))


def evaluate_command(argv: Sequence[str]) -> dict[str, Any]:
    """``scripts/evaluate.py checkpoint=<path> [benchmark=[...] benchmark.<name>.<key>=...] [key=value ...]``
    (configs/evaluate.yaml; the benchmarks: probloss/eval/benchmarks/)."""
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"{arg!r} is not key=value; pass the checkpoint as checkpoint=<path>")
    own = [a for a in argv if override_key(a) in BENCHMARK_KEYS or override_key(a).startswith("benchmark.")]
    selected = _chosen(own)
    for arg in own:  # a benchmark's key without the benchmark selected would be silently unused
        parts = override_key(arg).split(".")
        if parts[0] == "benchmark" and len(parts) > 2 and parts[1] not in selected:
            raise ConfigError(f"{override_key(arg)} is set but benchmark {parts[1]!r} is not selected; add it: "
                              f"benchmark=[{','.join([*selected, parts[1]])}]")
    cfg = compose_config(own, config_name="evaluate")
    settings = EvaluateSettings.of(cfg)
    if not selected and (settings.eval.output is not None or settings.eval.save_embeddings):
        raise ConfigError("eval.output and eval.save_embeddings are for benchmarks; select one with "
                          "benchmark=[karpathy,...] (the run's own evaluation writes <run>/eval-step-<step>.json)")
    return evaluate_checkpoint(settings.checkpoint, [a for a in argv if a not in own],
                               benchmarks=cfg if selected else None, selected=selected)


def _chosen(overrides: Sequence[str]) -> list[str]:
    """The names of ``benchmark=[a,b]`` (or ``benchmark=a``) among the overrides, in order."""
    names: list[str] = []
    for o in OverridesParser.create().parse_overrides([a for a in overrides if a.split("=", 1)[0] == "benchmark"]):
        value = o.value()
        names += [str(v) for v in (value if isinstance(value, list) else [value])]
    return list(dict.fromkeys(names))


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = (), benchmarks=None,
                        selected: Sequence[str] = ()) -> dict[str, Any]:
    """``scripts/evaluate.py checkpoint=<path> [key=value ...]``: rebuild the run's model and loss from the
    checkpoint, evaluate on its val data (or the data the overrides name) and write ``eval-step-<step>.json``.

    ``overrides`` change the config saved in the checkpoint and are checked against it like any command line
    (an unknown key is an error that lists the keys there). ``benchmarks`` (the composed configs/evaluate.yaml)
    with ``selected`` benchmark names: evaluate those instead (probloss/eval/benchmarks/), every file checked
    before the checkpoint is read, and write ``eval.output``.
    """

    if Path(path).exists():  # a corrupt checkpoint is named and the previous readable one of its run used
        found = ckpt.readable_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no readable checkpoint at {path}")
        path = found
    benches = None
    if benchmarks is not None:  # every benchmark file and key checked before anything is read or encoded

        benches = prepare(benchmarks.benchmark, selected)
    raw = ckpt.read_checkpoint(path)
    cfg = apply_overrides(raw["config"], overrides, what=f"the config saved in {path}")
    run = RunSettings.from_config(cfg)
    tokenizer = make_tokenizer(run)
    trainee = make_trainee(run, tokenizer, from_checkpoint=True)
    trainee.load_state_dict(raw["model"])
    fabric = Fabric(accelerator="auto", devices=1, precision="32-true")
    trainee = fabric.setup_module(trainee)
    if benches is not None:
        own = EvaluateSettings.of(benchmarks)
        step = int(raw.get("position", {}).get("step", 0))
        with cpu_matmul(run.trainer.cpu_matmul or "blas"):  # the products the run was trained with
            return run_benchmarks(trainee.module.model, trainee.module.loss, tokenizer, benches,
                                  image_size=run.data.image_size, tokenizer_kind=run.data.tokenizer,
                                  cfg=own.benchmark, output=own.eval.output or default_output(path),
                                  save=bool(own.eval.save_embeddings), device=fabric.device,
                                  extra={"steps": step, "checkpoint": str(Path(path).resolve())})
    spec = prepare_data(run.data, run.trainer.batch_size)
    eval_set = load_eval(spec, run.data, tokenizer, seed=run.seed, max_samples=run.eval.max_samples,
                         image_noise=float(run.eval.image_noise or 0.0))
    with cpu_matmul(run.trainer.cpu_matmul or "blas"):  # the products the run was trained and evaluated with
        metrics = evaluate_at_step(fabric, run, trainee, eval_set, spec, tokenizer, logger=None, step=0, final=True)
    step = int(raw.get("position", {}).get("step", 0))
    metrics["steps"] = step
    run_dir = Path(path).resolve().parent.parent
    out = run_dir / f"eval-step-{step:08d}.json"
    try:
        write_json(out, metrics)
    except OSError as err:  # a read-only run folder: the table is still printed
        print(f"warning: could not write {out}: {err}", file=sys.stderr)
        out = None
    print_summary(metrics, run_dir, f"{run.loss_name} / checkpoint step {step}", run.out_dir,
                  details=out or "(not written)")
    if out is not None:
        print(f"wrote {out}")
    return metrics
