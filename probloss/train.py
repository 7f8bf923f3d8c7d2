"""The training loop as library functions, after Lightning's Fabric examples: ``main -> train -> train_step``
and ``evaluate``. ``scripts/train.py`` and sweeps call :func:`main`.

::

    python scripts/train.py loss=gaussian_var                    # one process
    fabric run --devices=2 scripts/train.py loss=sigmoid          # DDP (gloo on CPU, nccl on GPU)
    python scripts/train.py fabric.accelerator=tpu fabric.devices=8   # Fabric's own (XLA) launcher

What a step does (``trainer.batch_size`` is the global batch; each of W ranks gets a contiguous slice of
``batch_size / W`` samples)::

    images, tokens (B/W, ...) -> dual encoder -> Embeddings (B/W, D) -> loss (all ranks' negatives) -> backward
    -> DDP averages gradients (the loss's own logit_scale/logit_bias included: they live in the same module)
    -> clip -> AdamW -> warmup+cosine schedule

With ``trainer.accum_steps = k`` the step is GradCache (Gao et al. 2021, as open_clip and Inf-CL do it): embed
the k micro-batches without grad, compute the loss on the whole batch with grad w.r.t. the embeddings, then
re-run each micro-batch with grad and back-propagate its cached embedding gradient. The update equals the one
of a k-times larger batch (tested), with the activation memory of one micro-batch.

Reproducibility: one ``seed``. Parameters are initialised from it; every step re-seeds torch from
(seed, step, rank), and the data stream is rebuilt from (seed, epoch, rank, world size) and skipped to the
saved position; so a run killed with SIGKILL and resumed continues with the same loss curve.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

import probloss
from probloss import checkpoint as ckpt
from probloss.config import ConfigError, compose_config, loss_kwargs, save_config, to_dict

SUMMARY_KEYS = (  # DESIGN.md: summary.json keys (those that apply), printed in this order
    "train/loss", "val/loss", "val/zeroshot_top1", "val/i2t_r@1", "val/t2i_r@1", "val/relation_probe_acc",
    "val/binding_probe_acc", "embed/effective_rank", "embed/uniformity", "embed/alignment", "embed/modality_gap",
    "unc/specificity_spearman", "stability/loss_spikes", "stability/grad_norm_ratio", "stability/nonfinite_steps",
    "stability/diverged", "steps", "samples_per_s",
)


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss or gradient with ``trainer.on_nonfinite=stop`` (or too many in a row with ``skip``)."""


class Trainee(nn.Module):
    """The dual encoder and the loss in one module.

    Why one module: DDP, the optimizer, gradient clipping and checkpoints then treat the loss's learnable
    parameters (``logit_scale``, ``logit_bias``) like any other, so they stay identical across ranks. Only the
    encoders run in ``forward`` (under DDP's forward and Fabric's autocast); the loss is called outside it on
    the embeddings (``trainee.loss(...)``) so that GradCache can run it on cached embeddings.
    """

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.model(images, tokens)  # Embeddings: (B, D) x2 and log-stds (B,) | (B, D) | None


# --- main: config, Fabric, launch -------------------------------------------------------------------------------


def main(overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """Compose the config from ``overrides`` (``key=value`` strings), launch Fabric and train.

    Returns:
        The summary dict on rank 0 (``{}`` on other ranks).
    """
    cfg = compose_config(list(sys.argv[1:] if overrides is None else overrides))
    fabric = make_fabric(cfg)
    try:
        if _under_fabric_cli():
            summary = train(fabric, cfg)  # `fabric run` has started the processes: launch() would raise
        else:
            summary = fabric.launch(train, cfg)  # one process, or Fabric's own launcher (DDP spawn, XLA)
        _finish_distributed(ok=True)
    except BaseException:
        _finish_distributed(ok=False)
        raise
    return summary or {}


def _under_fabric_cli() -> bool:
    return bool(int(os.environ.get("LT_CLI_USED", "0")))


def make_fabric(cfg: Mapping):
    """A Fabric from ``cfg.fabric``; values that ``fabric run`` sets through the environment are not passed."""
    from lightning_fabric import Fabric

    f = cfg["fabric"]
    kwargs: dict[str, Any] = {}
    cli = _under_fabric_cli()
    if not cli:  # `fabric run` sets accelerator/devices/num_nodes; passing them too raises on a mismatch
        kwargs.update(accelerator=f["accelerator"], devices=f["devices"], num_nodes=f["num_nodes"])
    if not (cli and "LT_STRATEGY" in os.environ):
        kwargs["strategy"] = f["strategy"]
    if not (cli and "LT_PRECISION" in os.environ):
        kwargs["precision"] = resolve_precision(f["precision"], os.environ.get("LT_ACCELERATOR") or f["accelerator"])
    if cfg["trainer"]["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts, for determinism
    return Fabric(**kwargs)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed on GPU/TPU (where bf16 is supported), 32-true on CPU/MPS."""
    if precision != "auto":
        return precision
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator == "tpu":
        return "bf16-mixed"
    return "32-true"


def _finish_distributed(ok: bool) -> None:
    """End multi-process runs cleanly (DESIGN.md: without this ~1 run in 16 aborted at exit on gloo)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        if ok:
            tdist.barrier()
        tdist.destroy_process_group()


# --- train ----------------------------------------------------------------------------------------------------


class Position:
    """Where the run is: optimizer steps done and the data stream position (epoch, batches consumed).

    A plain class, not a dataclass: Fabric copies dataclasses found in the state dict, and the loop must keep
    the very object that ``fabric.load`` restores.
    """

    def __init__(self) -> None:
        self.step = 0  # optimizer steps done (skipped non-finite steps included)
        self.epoch = 0  # data epoch being read
        self.batch = 0  # batches of that epoch consumed
        self.skipped = 0  # corrupt samples skipped by this rank's data loaders since this process started
        self.skipped_before = 0  # all ranks' skipped samples before this (re)start (from the checkpoint)
        self.nonfinite_in_a_row = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


@dataclass
class Timer:
    """Training throughput, excluding evaluation and checkpointing."""

    samples: int = 0
    seconds: float = 0.0
    _start: float | None = field(default=None, repr=False)

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, samples: int) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.samples += samples
            self._start = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def train(fabric, cfg: Mapping, on_eval: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train, evaluate and checkpoint one run; see the module docstring. Called on every rank.

    ``on_eval(step, metrics)`` is called on every rank after each intermediate evaluation (metrics on rank 0,
    ``{}`` elsewhere); sweeps use it to report to Optuna and to prune by raising.
    """
    t_start = time.perf_counter()
    tcfg = cfg["trainer"]
    per_rank = check_batch_sizes(tcfg["batch_size"], tcfg["accum_steps"], fabric.world_size)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.get_num_threads())
    _set_threads(fabric, tcfg.get("num_threads"))
    torch.use_deterministic_algorithms(bool(tcfg["deterministic"]), warn_only=True)
    try:
        return _train(fabric, cfg, per_rank, t_start, on_eval)
    finally:  # a library call must not leave the caller's process changed (tests, sweeps, notebooks)
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.set_num_threads(previous[2])


def _train(fabric, cfg: Mapping, per_rank: int, t_start: float, on_eval=None) -> dict[str, Any]:
    rank, tcfg = fabric.global_rank, cfg["trainer"]
    fabric.seed_everything(cfg["seed"], verbose=False)

    run_dir, resume_from = _broadcast(fabric, _resolve_run_dir(cfg) if rank == 0 else None)
    run_dir = Path(run_dir)
    data = prepare_data(fabric, cfg)
    tokenizer = make_tokenizer(cfg)
    if resume_from is not None:
        check_resume_config(resume_from, cfg)

    loss_fn = probloss.build_loss(cfg["loss"]["name"], **loss_kwargs(cfg))
    model = make_model(cfg, tokenizer, log_std=loss_fn.needs_log_std)
    trainee = Trainee(model, loss_fn)
    optimizer = make_optimizer(trainee, tcfg)
    trainee, optimizer = fabric.setup(trainee, optimizer)
    scheduler = make_scheduler(optimizer, tcfg)
    tracker = make_stability_tracker(tcfg)
    pos = Position()
    state = {
        "model": trainee, "optimizer": optimizer, "scheduler": scheduler, "position": pos,
        "stability": tracker, "rng": ckpt.rng_state(), "config": to_dict(cfg),
        "train_losses": [],
    }
    if resume_from is not None:
        rest = fabric.load(resume_from, state, weights_only=True)
        pos = state["position"]  # (fabric.load may hand back new objects for non-module entries)
        ckpt.set_rng_state(state["rng"])
        if fabric.is_global_zero:
            print(f"resumed from {resume_from} at step {pos.step}{' (extra keys: ' + str(list(rest)) + ')' if rest else ''}")

    logger = None
    if fabric.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
        logger = make_logger(run_dir, purge_step=pos.step + 1 if resume_from is not None else None)
    eval_set = load_eval(cfg, data, tokenizer)

    try:
        summary = fit(fabric, cfg, trainee, optimizer, scheduler, tracker, pos, state, data, tokenizer, eval_set,
                      logger, run_dir, per_rank, on_eval)
    except BaseException:
        if logger is not None:  # a stopped, diverged or pruned run keeps readable event files
            logger.finalize("failed")
        raise
    summary["wall_time_s"] = time.perf_counter() - t_start
    if fabric.is_global_zero:
        write_summary(run_dir, summary)
        if logger is not None:
            log_hparams(logger, cfg, summary)
            logger.finalize("success")
        print_summary(summary, run_dir, cfg)
    return summary if fabric.is_global_zero else {}


def fit(fabric, cfg, trainee, optimizer, scheduler, tracker, pos, state, data, tokenizer, eval_set, logger,
        run_dir: Path, per_rank: int, on_eval=None) -> dict[str, Any]:
    """The loop: steps, logging, evaluation and checkpoints until ``trainer.max_steps``."""
    tcfg = cfg["trainer"]
    max_steps, global_batch = int(tcfg["max_steps"]), int(tcfg["batch_size"])
    rank = fabric.global_rank
    timer = Timer()
    val_metrics: dict[str, Any] = {}
    losses: list[float] = state["train_losses"]  # the last few, for train/loss in the summary (survives resume)
    bar = _progress(fabric, tcfg, pos.step, max_steps)
    stream = train_batches(cfg, data, tokenizer, fabric, per_rank, pos)
    try:
        while pos.step < max_steps:
            timer.start()  # throughput includes reading the data
            batch = next(stream)
            torch.manual_seed(step_seed(cfg["seed"], pos.step, rank))  # dropout etc.: a function of the step
            out = train_step(fabric, trainee, optimizer, batch, cfg, accum_steps=int(tcfg["accum_steps"]))
            scheduler.step()
            timer.stop(global_batch)
            pos.step += 1
            tracker.update(pos.step, out.loss, out.grad_norm)
            if out.finite:
                pos.nonfinite_in_a_row = 0
                losses.append(out.loss)
                del losses[:-50]
            else:
                try:
                    handle_nonfinite(fabric, cfg, pos, out, run_dir)
                except NonFiniteLossError as err:
                    if fabric.is_global_zero:  # what is known so far; no checkpoint of the bad step is written
                        write_summary(run_dir, {**tracker.summary(), "steps": pos.step, "status": "stopped",
                                                "error": str(err), "loss": cfg["loss"]["name"]})
                    raise

            if logger is not None and (pos.step % tcfg["log_every"] == 0 or pos.step == 1):
                scalars = {"train/loss": out.loss, "train/lr": optimizer.param_groups[0]["lr"],
                           "train/grad_norm": out.grad_norm, "train/samples_per_s": timer.samples_per_s,
                           "train/epoch": pos.epoch, "train/nonfinite_steps": tracker.summary().get(
                               "stability/nonfinite_steps", 0)}
                scalars.update({f"train/{k}": v for k, v in diagnostics(trainee, out.embeddings).items()})
                logger.log_metrics(scalars, step=pos.step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out.loss:.4f}", samples_s=f"{timer.samples_per_s:.0f}", refresh=False)

            last = pos.step == max_steps
            if tcfg["eval_every"] and pos.step % tcfg["eval_every"] == 0 and not last:
                val_metrics = evaluate(fabric, cfg, trainee, eval_set, tokenizer, data, logger, pos.step)
                if on_eval is not None:
                    on_eval(pos.step, {**val_metrics, **tracker.summary()})
            if (tcfg["ckpt_every"] and pos.step % tcfg["ckpt_every"] == 0) or last:
                _save(fabric, run_dir, pos, state, tcfg)
    finally:
        if bar is not None:
            bar.close()
    val_metrics = evaluate(fabric, cfg, trainee, eval_set, tokenizer, data, logger, pos.step, final=True)
    if logger is not None and cfg["eval"]["projector_samples"]:
        log_projector(trainee.module.model, eval_set, logger, pos.step, int(cfg["eval"]["projector_samples"]))

    eval_skipped = int(eval_set.skipped) if rank == 0 else 0
    skipped = _sum_over_ranks(fabric, pos.skipped + eval_skipped) + pos.skipped_before
    summary: dict[str, Any] = {"train/loss": sum(losses[-20:]) / len(losses[-20:]) if losses else float("nan")}
    summary.update(val_metrics)
    summary.update(tracker.summary())
    summary.update({"steps": pos.step, "samples_per_s": timer.samples_per_s, "data/skipped": skipped,
                    "status": "finished", "loss": cfg["loss"]["name"], "world_size": fabric.world_size,
                    "run_dir": str(run_dir)})
    if logger is not None:
        logger.log_metrics({"data/skipped": skipped}, step=pos.step)
    return summary


def _save(fabric, run_dir: Path, pos: Position, state: dict, tcfg: Mapping) -> Path:
    state["rng"] = ckpt.rng_state()
    # Rank 0 writes the checkpoint, so it carries the skipped-sample count of all ranks.
    local = pos.skipped, pos.skipped_before
    pos.skipped, pos.skipped_before = 0, _sum_over_ranks(fabric, pos.skipped) + pos.skipped_before
    try:
        return ckpt.save_checkpoint(fabric, run_dir, pos.step, state, keep_last=int(tcfg["keep_last"]))
    finally:
        pos.skipped, pos.skipped_before = local


def handle_nonfinite(fabric, cfg, pos: Position, out: "StepOutput", run_dir: Path) -> None:
    """A NaN/Inf step was skipped (no update): count it, or stop with a clear message."""
    tcfg = cfg["trainer"]
    pos.nonfinite_in_a_row += 1
    last_good = ckpt.newest_checkpoint(run_dir)
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    what = f"non-finite {out.nonfinite_what} at step {pos.step} (loss={out.loss}, grad_norm={out.grad_norm})"
    if tcfg["on_nonfinite"] == "stop":
        raise NonFiniteLossError(
            f"{what}; stopping (trainer.on_nonfinite=stop). Parameters were not updated with it and {where}. "
            "Try a lower trainer.lr, trainer.grad_clip, or trainer.on_nonfinite=skip.")
    if pos.nonfinite_in_a_row >= int(tcfg["max_nonfinite"]):
        raise NonFiniteLossError(
            f"{what}: {pos.nonfinite_in_a_row} non-finite steps in a row (trainer.max_nonfinite) - the run has "
            f"diverged; {where}. Try a lower trainer.lr.")
    if fabric.is_global_zero:
        print(f"warning: {what}; skipped the update (trainer.on_nonfinite=skip)", file=sys.stderr)


# --- one step ---------------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    loss: float  # the global loss (mean over ranks); nan/inf if non-finite
    grad_norm: float  # total norm before clipping; nan if the step was skipped before backward
    finite: bool  # whether the update was applied
    embeddings: Any = None  # the first micro-batch's Embeddings (detached), for diagnostics
    nonfinite_what: str = ""


def train_step(fabric, trainee, optimizer, batch: Mapping[str, Any], cfg: Mapping, accum_steps: int = 1) -> StepOutput:
    """One optimizer step on this rank's slice of the global batch (GradCache when ``accum_steps > 1``).

    A non-finite loss on any rank skips the step on every rank before backward (so DDP stays in step); a
    non-finite gradient norm (identical on all ranks after DDP's all-reduce) skips it after backward.
    """
    tcfg = cfg["trainer"]
    images, tokens = fabric.to_device(batch["image"]), fabric.to_device(batch["tokens"])
    if accum_steps <= 1:
        emb = trainee(images, tokens)
        loss = trainee.loss(*emb.loss_args())
        value, finite = _global_loss(fabric, loss)
        if not finite:
            return StepOutput(value, float("nan"), False, _detach(emb), "loss")
        fabric.backward(loss)
    else:
        value, finite, emb = _grad_cache_backward(fabric, trainee, images, tokens, accum_steps)
        if not finite:
            return StepOutput(value, float("nan"), False, emb, "loss")
    max_norm = tcfg["grad_clip"] or float("inf")  # inf: no clipping, but the norm is still measured
    grad_norm = float(fabric.clip_gradients(trainee, optimizer, max_norm=max_norm, error_if_nonfinite=False))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepOutput(value, grad_norm, False, _detach(emb), "gradient")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutput(value, grad_norm, True, _detach(emb))


def _grad_cache_backward(fabric, trainee, images, tokens, k: int):
    """GradCache: the loss over the whole local batch, encoder activations of one micro-batch at a time.

    1. Embed the k micro-batches without grad (remembering each one's RNG state, for identical dropout).
    2. The loss on the concatenated embeddings (B_local, D); grads w.r.t. the embeddings and loss parameters.
    3. Re-embed each micro-batch with grad and back-propagate sum(emb * cached_grad); DDP syncs only on the
       last one, whose surrogate also carries the loss parameters' gradients (sum(p * grad_p)) so that DDP
       averages them with the rest.
    """
    n = images.shape[0]
    if n % k:
        raise ValueError(f"per-rank batch {n} is not divisible by trainer.accum_steps={k}")
    chunks = list(zip(images.chunk(k), tokens.chunk(k)))
    rng_states, cached = [], []
    with torch.no_grad():
        for image_chunk, token_chunk in chunks:
            rng_states.append(_rng_snapshot(image_chunk.device))
            cached.append(trainee(image_chunk, token_chunk))
    after = _rng_snapshot(images.device)
    fields = _present_fields(cached[0])
    leaves = [torch.cat([getattr(e, f) for e in cached]).detach().requires_grad_(True) for f in fields]
    full = type(cached[0])(**dict(zip(fields, leaves)))
    loss = trainee.loss(*full.loss_args())
    value, finite = _global_loss(fabric, loss)
    first = _detach(cached[0])
    if not finite:
        return value, False, first
    loss_params = [p for p in trainee.loss.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, leaves + loss_params, allow_unused=True)
    emb_grads, param_grads = grads[: len(leaves)], grads[len(leaves):]
    emb_grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, emb_grads)]
    sizes = [c[0].shape[0] for c in chunks]
    per_chunk = [g.split(sizes) for g in emb_grads]  # per field: k pieces
    for i, (image_chunk, token_chunk) in enumerate(chunks):
        _rng_restore(rng_states[i], image_chunk.device)
        last = i == k - 1
        with fabric.no_backward_sync(trainee, enabled=not last):
            emb = trainee(image_chunk, token_chunk)
            surrogate = sum((getattr(emb, f) * per_chunk[j][i]).sum() for j, f in enumerate(fields))
            if last:
                # Gives each loss parameter its cached gradient inside DDP's synchronised backward.
                surrogate = surrogate + sum((p * g).sum() for p, g in zip(loss_params, param_grads) if g is not None)
            fabric.backward(surrogate)
    _rng_restore(after, images.device)
    return value, True, first


_FIELDS = ("image_emb", "text_emb", "image_log_std", "text_log_std")


def _present_fields(emb) -> list[str]:
    return [f for f in _FIELDS if getattr(emb, f, None) is not None]


def _detach(emb):
    return type(emb)(**{f: getattr(emb, f).detach() for f in _present_fields(emb)})


def _rng_snapshot(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(snapshot, device: torch.device) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)


def _global_loss(fabric, loss: torch.Tensor) -> tuple[float, bool]:
    """(mean of the loss over ranks, whether it is finite on every rank), in one all-reduce."""
    local = loss.detach().float()
    flags = torch.stack([torch.nan_to_num(local, nan=0.0, posinf=0.0, neginf=0.0),
                         (~torch.isfinite(local)).float()])
    if fabric.world_size > 1:
        flags = fabric.all_reduce(flags, reduce_op="sum")
    finite = bool(flags[1].item() == 0)
    value = flags[0].item() / fabric.world_size if finite else float(local.item() if not torch.isfinite(local) else "nan")
    return value, finite


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank (dropout, noise): independent of how the run got there."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def diagnostics(trainee, emb) -> dict[str, float]:
    """The loss's own diagnostics on this rank's (first micro-) batch."""
    if emb is None:
        return {}
    try:
        values = trainee.loss.diagnostics(*emb.loss_args())
    except Exception as err:  # diagnostics must never stop a run
        print(f"warning: loss.diagnostics failed: {err}", file=sys.stderr)
        return {}
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --- building blocks --------------------------------------------------------------------------------------------


def check_batch_sizes(global_batch: int, accum_steps: int, world: int) -> int:
    """Per-rank batch size; errors if the global batch does not split evenly over ranks and micro-batches."""
    if global_batch % world:
        raise ConfigError(
            f"trainer.batch_size={global_batch} is the global batch and must be divisible by the world size "
            f"{world} (each rank gets batch_size / world_size samples)")
    per_rank = global_batch // world
    if accum_steps < 1 or per_rank % accum_steps:
        raise ConfigError(
            f"trainer.accum_steps={accum_steps} must divide the per-rank batch {per_rank} "
            f"(trainer.batch_size={global_batch} / {world} ranks)")
    return per_rank


def _set_threads(fabric, threads: int | None) -> None:
    """Intra-op threads per rank: ``trainer.num_threads`` if set; else several CPU ranks on one machine split
    the cores instead of each taking all (DESIGN.md); else torch's default."""
    if threads:
        torch.set_num_threads(int(threads))
    elif fabric.device.type == "cpu" and fabric.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        local = max(1, fabric.world_size // max(1, getattr(fabric, "num_nodes", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def make_tokenizer(cfg: Mapping):
    from probloss.models import build_tokenizer, shapes_vocab

    d = cfg["data"]
    vocab = shapes_vocab() if d["tokenizer"] == "word" else None
    return build_tokenizer(d["tokenizer"], max_len=int(d["max_len"]), vocab=vocab)


def make_model(cfg: Mapping, tokenizer, log_std: bool) -> nn.Module:
    from probloss.models import build_dual_encoder

    try:
        return build_dual_encoder(to_dict(cfg["model"]), vocab_size=tokenizer.vocab_size, max_len=tokenizer.max_len,
                                  image_size=int(cfg["data"]["image_size"]), log_std=log_std)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"model config {cfg['model'].get('name', '?')!r}: {err}") from None


def make_optimizer(trainee: nn.Module, tcfg: Mapping) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases, other rank<2 tensors and the loss's parameters (temperature, bias)."""
    decay, no_decay = [], []
    for name, param in trainee.named_parameters():
        if not param.requires_grad:
            continue
        exempt = name.startswith("loss.") or param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": float(tcfg["weight_decay"])},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=float(tcfg["lr"]), betas=tuple(tcfg["betas"]),
                             eps=float(tcfg["eps"]))


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``max_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, tcfg: Mapping):
    warmup, max_steps, min_ratio = int(tcfg["warmup_steps"]), int(tcfg["max_steps"]), float(tcfg["min_lr_ratio"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, max_steps, min_ratio))


def make_stability_tracker(tcfg: Mapping):
    """Loss spikes (> 2x the moving average), grad-norm ratio, non-finite steps; warmup steps never spike."""
    from probloss.eval.stability import StabilityTracker

    return StabilityTracker(warmup_steps=int(tcfg["warmup_steps"]))


def make_logger(run_dir: Path, purge_step: int | None = None):
    """Fabric's TensorBoardLogger writing straight into the run folder (so `tensorboard --logdir runs` shows
    every run as <experiment>/<loss>/<run_name>); on resume, events after the checkpoint's step are purged."""
    from lightning_fabric.loggers import TensorBoardLogger

    kwargs = {"purge_step": purge_step} if purge_step is not None else {}
    return TensorBoardLogger(root_dir=str(run_dir), name="", version="", default_hp_metric=False, **kwargs)


def _broadcast(fabric, obj):
    return fabric.broadcast(obj, src=0) if fabric.world_size > 1 else obj


def _sum_over_ranks(fabric, value: int) -> int:
    if fabric.world_size == 1:
        return int(value)
    return int(fabric.all_reduce(torch.tensor(float(value), device=fabric.device), reduce_op="sum").item())


def _progress(fabric, tcfg, start: int, total: int):
    if not (fabric.is_global_zero and tcfg["progress"]):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)


# --- run folder and resume --------------------------------------------------------------------------------------


def _resolve_run_dir(cfg: Mapping) -> tuple[str, str | None]:
    """(run folder, checkpoint to resume from or None); rank 0 only. See ``resume`` in configs/train.yaml."""
    base = Path(os.path.expanduser(str(cfg["out_dir"]))) / str(cfg["experiment"]) / str(cfg["loss"]["name"])
    resume, run_name = cfg["resume"], cfg["run_name"]
    if resume not in (None, "auto"):
        path = Path(os.path.expanduser(str(resume)))
        if path.is_file():
            run_dir = path.parent.parent if path.parent.name == ckpt.CKPT_DIR else path.parent
            return str(run_dir), str(path)
        if path.is_dir():
            found = ckpt.newest_checkpoint(path)
            if found is None:
                raise ConfigError(f"resume={resume}: no checkpoints in {path / ckpt.CKPT_DIR}")
            return str(path), str(found)
        raise ConfigError(f"resume={resume}: no such checkpoint file or run folder")
    if run_name is not None:
        run_dir = base / str(run_name)
        found = ckpt.newest_checkpoint(run_dir)
        if found is not None and resume != "auto":
            raise ConfigError(
                f"run folder {run_dir} already has checkpoints (newest {found.name}); pass resume=auto to continue "
                "it, or choose another run_name")
        return str(run_dir), (str(found) if found is not None else None)
    if resume == "auto" and base.is_dir():
        runs = [(p.stat().st_mtime, d) for d in base.iterdir() if (p := ckpt.newest_checkpoint(d)) is not None]
        if runs:
            run_dir = max(runs)[1]
            return str(run_dir), str(ckpt.newest_checkpoint(run_dir))
    name = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = base / name, 1
    while run_dir.exists():
        run_dir, n = base / f"{name}-{n}", n + 1
    return str(run_dir), None


def check_resume_config(path: str | Path, cfg: Mapping) -> None:
    """Refuse to resume a checkpoint whose parameter shapes come from another config; report other changes."""
    saved = ckpt.read_checkpoint(path).get("config", {})
    current = to_dict(cfg)
    shape = ckpt.shape_differences(saved, current)
    if shape:
        raise ConfigError(
            f"cannot resume {path}: its config differs in what decides the model's shape "
            f"({'; '.join(shape)}). Use the checkpoint's settings, or start a new run (another run_name, no resume).")
    other = ckpt.other_differences(saved, current)
    if other and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        print(f"note: resuming {path} with a changed config: {'; '.join(other)}", file=sys.stderr)


# --- data -------------------------------------------------------------------------------------------------------


@dataclass
class DataSpec:
    train: str  # brace pattern of training shards
    val: str  # brace pattern of validation shards
    classnames: list[str] | None  # zero-shot classes (None: no zero-shot)
    templates: list[str] | None
    steps_per_epoch: int


def prepare_data(fabric, cfg: Mapping) -> DataSpec:
    """Shard patterns for the run: the configured ones, or (data=shapes) generated once into the cache."""
    d = cfg["data"]
    train, val = d.get("train_shards"), d.get("val_shards")
    classnames = list(d["classnames"]) if d.get("classnames") else None
    generated_classes = None
    if d["name"] == "shapes" and (train is None or val is None):
        folder = shapes_cache_folder(d)
        if fabric.is_global_zero:
            generate_shapes(folder, d)
        fabric.barrier()
        meta = json.loads((folder / "DONE").read_text())
        train = train or str(folder / meta["train"])
        val = val or str(folder / meta["val"])
        generated_classes = _read_classes(folder / "classes.json")
    elif d["name"] == "shapes" and classnames is None:
        generated_classes = _read_classes(Path(str(val).split("{")[0]).parent.parent / "classes.json")
    if classnames is None and d["name"] == "shapes":
        classnames = generated_classes
    global_batch = int(cfg["trainer"]["batch_size"])
    spe = d.get("batches_per_epoch")
    if spe is None:
        if "train_size" not in d:
            raise ConfigError("data.batches_per_epoch is required for this data source (shards are resampled)")
        spe = max(1, int(d["train_size"]) // global_batch)
    templates = list(d["templates"]) if d.get("templates") else None
    return DataSpec(str(train), str(val), classnames, templates, int(spe))


def _read_classes(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if isinstance(data, Mapping):
        data = data.get("classnames") or data.get("classes") or data.get("names")
    return list(data) if data else None


def shapes_cache_folder(d: Mapping) -> Path:
    """``<cache_dir>/shapes-<hash of the generation parameters>``."""
    from probloss.data import shapes

    params = {"train_size": int(d["train_size"]), "val_size": int(d["val_size"]), "seed": int(d["gen_seed"]),
              "image_size": int(d["image_size"]), "version": shapes.VERSION}
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.path.expanduser(str(d["cache_dir"]))) / f"shapes-{key}"


def generate_shapes(folder: Path, d: Mapping) -> None:
    """Write the shapes shards into ``folder`` unless a finished copy is there (``DONE`` is written last)."""
    from probloss.data import write_shapes_shards

    if (folder / "DONE").is_file():
        return
    t0 = time.perf_counter()
    print(f"generating shapes data ({d['train_size']} train + {d['val_size']} val, {d['image_size']}px) into "
          f"{folder} ...", flush=True)
    patterns = write_shapes_shards(folder, train_size=int(d["train_size"]), val_size=int(d["val_size"]),
                                   seed=int(d["gen_seed"]), image_size=int(d["image_size"]))
    rel = {k: os.path.relpath(str(v), folder) for k, v in patterns.items() if k in ("train", "val")}
    (folder / "DONE").write_text(json.dumps(rel))
    print(f"generated shapes data in {time.perf_counter() - t0:.0f} s", flush=True)


def train_batches(cfg: Mapping, data: DataSpec, tokenizer, fabric, per_rank: int, pos: Position) -> Iterator[dict]:
    """This rank's batches from the saved position on, forever (epoch after epoch).

    Each epoch's loader is rebuilt from (seed, epoch, rank, world size) and the batches already consumed are
    skipped, so the stream after a resume is the one an uninterrupted run would have seen. ``pos.epoch`` and
    ``pos.batch`` advance as batches are handed out; ``pos.skipped`` sums the loaders' corrupt-sample counts.
    """
    from probloss.data import make_train_loader

    d = cfg["data"]
    extra = {k: d[k] for k in ("image_noise", "caption_noise") if d.get(k) is not None}
    workers = int(d.get("num_workers", 0))
    while True:
        # Seeded from its arguments only (the loader draws nothing from torch's global RNG).
        loader = make_train_loader(
            data.train, tokenizer, per_rank, image_size=int(d["image_size"]), rank=fabric.global_rank,
            world_size=fabric.world_size, seed=int(cfg["seed"]), epoch=pos.epoch, num_workers=workers,
            batches_per_epoch=data.steps_per_epoch, **extra)
        iterator = iter(loader)
        for i, batch in enumerate(iterator):
            if i >= data.steps_per_epoch:
                break
            if i < pos.batch:
                continue  # consumed before the checkpoint (its skipped samples were counted then)
            pos.skipped += int(batch.get("skipped", 0))  # corrupt samples skipped since the worker's last batch
            pos.batch = i + 1
            yield batch
        del iterator, loader
        pos.epoch, pos.batch = pos.epoch + 1, 0


def load_eval(cfg: Mapping, data: DataSpec, tokenizer, image_noise: float | None = None):
    """The val set; ``image_noise`` (default ``eval.image_noise``) adds Gaussian noise for robustness studies."""
    from probloss.data import load_eval_set

    d = cfg["data"]
    if image_noise is None:
        image_noise = float(cfg["eval"].get("image_noise") or 0.0)
    return load_eval_set(data.val, tokenizer, image_size=int(d["image_size"]), max_samples=cfg["eval"]["max_samples"],
                         image_noise=image_noise, seed=int(cfg["seed"]))


# --- evaluation -------------------------------------------------------------------------------------------------


@torch.no_grad()
def val_loss(fabric, trainee, eval_set, global_batch: int) -> float:
    """The training loss on the val set in global batches (comparable with train/loss); all ranks take part.

    Each rank embeds its contiguous slice of every global batch, exactly as in training, so the value is the
    same for any world size.
    """
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
        value, _ = _global_loss(fabric, module.loss(*emb.loss_args()))
        total, count = total + value, count + 1
    module.train(was_training)
    return total / max(1, count)


def evaluate(fabric, cfg: Mapping, trainee, eval_set, tokenizer, data: DataSpec, logger, step: int,
             final: bool = False) -> dict[str, Any]:
    """Every metric of probloss.eval.evaluate on the val set (rank 0; the others wait), plus val/loss.

    Returns the metrics on rank 0 and ``{}`` elsewhere; logs them to TensorBoard. ``final`` adds the image
    sigma vs pixel-noise check (losses with log-std).
    """
    metrics: dict[str, Any] = {"val/loss": val_loss(fabric, trainee, eval_set, int(cfg["trainer"]["batch_size"]))}
    if fabric.is_global_zero:
        noisy = None
        if final and trainee.module.loss.needs_log_std and cfg["eval"]["noise_std"]:
            noisy = load_eval(cfg, data, tokenizer, image_noise=float(cfg["eval"]["noise_std"]))
        metrics.update(evaluate_model(trainee.module.model, trainee.module.loss, eval_set, tokenizer, data,
                                      device=fabric.device, noisy_eval_set=noisy))
        if logger is not None:
            logger.log_metrics(_scalars(metrics), step=step)
    fabric.barrier()
    return metrics if fabric.is_global_zero else {}


def evaluate_model(model, loss, eval_set, tokenizer, data: DataSpec, device=None,
                   noisy_eval_set=None) -> dict[str, Any]:
    """probloss.eval.evaluate with the run's zero-shot classes and templates (model in eval mode).

    With ``noisy_eval_set`` (the same val images with Gaussian pixel noise) and a loss with log-std, also the
    image sigma on noisy vs clean images (``unc/image_sigma_noise_ratio``; > 1 when noise raises sigma).
    """
    from probloss.eval import evaluate as evaluate_fn

    was_training = model.training
    model.eval()
    try:
        # val/loss is computed by val_loss() over global batches on every rank (world-size invariant).
        metrics = dict(evaluate_fn(model, loss, eval_set, tokenizer, device=device, compute_loss=False,
                                   classnames=data.classnames or None, templates=data.templates or None))
        if noisy_eval_set is not None and getattr(loss, "needs_log_std", False):
            from probloss.eval import image_sigma_vs_noise

            metrics.update(image_sigma_vs_noise(model, eval_set.images, noisy_eval_set.images, device=device))
        return metrics
    finally:
        model.train(was_training)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


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


# --- outputs ----------------------------------------------------------------------------------------------------


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    return _write_json(Path(run_dir) / "summary.json", summary)


def _write_json(path: Path, values: Mapping[str, Any]) -> Path:
    """Atomic json write; NaN/Inf become null (json has no NaN)."""
    tmp = path.with_suffix(".json.tmp")
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
    tmp.write_text(json.dumps(clean, indent=2, default=str))
    os.replace(tmp, path)
    return path


def log_hparams(logger, cfg: Mapping, summary: Mapping[str, Any]) -> None:
    """HParams tab: the flattened config against the final metrics."""
    params = {}

    def flatten(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                flatten(f"{prefix}{k}.", v) if isinstance(v, Mapping) else flatten(f"{prefix}{k}", v)
        elif isinstance(node, (list, tuple)):
            params[prefix.rstrip(".")] = str(list(node))
        else:
            params[prefix.rstrip(".")] = node if isinstance(node, (int, float, str, bool)) else str(node)

    flatten("", to_dict(cfg))
    metrics = {f"hparams/{k}": v for k, v in _scalars(summary).items() if "/" in k}
    if metrics:
        logger.log_hyperparams(params, metrics=metrics, step=int(summary.get("steps", 0)))


def print_summary(summary: Mapping[str, Any], run_dir: Path, cfg: Mapping) -> None:
    """The end-of-run table."""
    keys = [k for k in SUMMARY_KEYS if k in summary]
    hidden = ("run_dir", "loss", "world_size", "status")
    keys += sorted(k for k in summary if k not in keys and k not in hidden and "_decile_" not in k)
    rows = [(k, _fmt(summary[k])) for k in keys]
    width = max(len(k) for k, _ in rows) if rows else 10
    vwidth = max(len(v) for _, v in rows) if rows else 10
    title = f"{cfg['loss']['name']} / {cfg['model'].get('name', '?')} / {summary.get('world_size', 1)} rank(s)"
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    print("\n" + title)
    print(line)
    for k, v in rows:
        print(f"| {k:<{width}} | {v:>{vwidth}} |")
    print(line)
    if any("_decile_" in k for k in summary):
        print("(R@1 per sigma decile: unc/*_r1_sigma_decile_* in summary.json and TensorBoard)")
    print(f"run folder: {run_dir}  (tensorboard --logdir {Path(str(cfg['out_dir']))})", flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


# --- evaluating a checkpoint --------------------------------------------------------------------------------------


def evaluate_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``scripts/evaluate.py <checkpoint>``: rebuild the run's model and loss, evaluate, write eval-<step>.json.

    ``overrides`` change the saved config (e.g. ``data.val_shards=...`` to evaluate on other shards).
    """
    from omegaconf import OmegaConf

    raw = ckpt.read_checkpoint(path)
    cfg = OmegaConf.create(raw["config"])
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    loss_fn = probloss.build_loss(cfg.loss.name, **loss_kwargs(cfg))
    tokenizer = make_tokenizer(cfg)
    model = make_model(cfg, tokenizer, log_std=loss_fn.needs_log_std)
    trainee = Trainee(model, loss_fn)
    trainee.load_state_dict(raw["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainee.to(device)

    class _Single:  # the one-process stand-in of Fabric that prepare_data needs
        is_global_zero, world_size, global_rank = True, 1, 0
        device = torch.device("cpu")

        def barrier(self):
            pass

    data = prepare_data(_Single(), cfg)
    eval_set = load_eval(cfg, data, tokenizer)
    noisy = None
    if loss_fn.needs_log_std and cfg.eval.get("noise_std"):
        noisy = load_eval(cfg, data, tokenizer, image_noise=float(cfg.eval.noise_std))
    metrics = evaluate_model(trainee.model, trainee.loss, eval_set, tokenizer, data, device=device,
                             noisy_eval_set=noisy)
    step = int(raw.get("position", {}).get("step", 0))
    metrics["steps"] = step
    run_dir = Path(path).resolve().parent.parent
    out = run_dir / f"eval-step-{step:08d}.json"
    try:
        _write_json(out, metrics)
    except OSError as err:  # a read-only run folder: the table is still printed
        print(f"warning: could not write {out}: {err}", file=sys.stderr)
        out = None
    print_summary(metrics, run_dir, cfg)
    if out is not None:
        print(f"wrote {out}")
    return metrics
