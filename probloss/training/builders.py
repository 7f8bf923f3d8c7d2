"""Building what a run trains: tokenizer, dual encoder + loss (one module), optimizer, schedule, tracker.

::

    run = RunSettings.from_config(cfg)
    tokenizer = make_tokenizer(run)
    trainee = make_trainee(run, tokenizer)           # Trainee(model, loss); log-std heads if the loss needs them
    optimizer = make_optimizer(trainee, run.trainer)
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

import probloss
from probloss.data.settings import DataSettings
from probloss.data.shapes import caption_words
from probloss.errors import ConfigError
from probloss.eval.stability import StabilityTracker, uninformative_loss
from probloss.models import build_dual_encoder, build_tokenizer
from probloss.training.settings import RunSettings, TrainerSettings


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
        # Embeddings: (B, D) images, (M, D) texts (M > B with extra texts after the positives) and their
        # log-stds (rows,) | (rows, D) | None
        return self.model(images, tokens)


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


def check_partial_views(loss, data: DataSettings, accum_steps: int) -> None:
    """A loss with partial views (``loss.uses_partial_views``) and ``data.partial_captions`` go together."""
    name = loss.loss_name
    if loss.uses_partial_views and not data.partial_captions:
        raise ConfigError(f"loss {name!r} as configured uses partial views of the captions: set "
                          "data.partial_captions=true (or turn its partial-view term off)")
    if data.partial_captions and not loss.uses_partial_views:
        raise ConfigError(f"data.partial_captions=true, but loss {name!r} as configured takes no partial views "
                          "(e.g. loss=prolip loss.partial_alpha=1e-7); set data.partial_captions=false")
    if data.partial_captions and accum_steps > 1:
        raise ConfigError("partial views are not supported with GradCache (trainer.accum_steps > 1): use "
                          "trainer.accum_steps=1")


def make_tokenizer(run: RunSettings):
    """The data's tokenizer (``data.tokenizer``; with an ``hf:`` text tower, the tower's own)."""
    data = run.data
    vocab = caption_words() if data.tokenizer == "word" else None
    try:
        return build_tokenizer(data.tokenizer, max_len=data.max_len, vocab=vocab,
                               allow_download=bool(run.model.allow_download))
    except ValueError as err:
        raise ConfigError(f"data.tokenizer={data.tokenizer}: {err}") from None


def make_trainee(run: RunSettings, tokenizer, from_checkpoint: bool = False) -> Trainee:
    """The run's loss and a dual encoder with log-std heads where the loss needs them.

    ``from_checkpoint``: a checkpoint's weights are loaded next (resume, evaluation), so pretrained tower
    weights are not read: the run's weights file need not exist any more.
    """
    loss = probloss.build_loss(run.loss_name, **run.loss_kwargs)
    model_cfg = run.model
    if model_cfg.init_log_std is None:  # null: where the loss's paper starts its log-std heads
        model_cfg = dataclasses.replace(model_cfg, init_log_std=loss.init_log_std)
    if from_checkpoint:
        weights = ("image_pretrained", "text_pretrained")
        towers = {k: False if k in weights else v for k, v in model_cfg.towers.items()}
        model_cfg = dataclasses.replace(model_cfg, towers=towers)
    try:
        model = build_dual_encoder(model_cfg, vocab_size=tokenizer.vocab_size, max_len=tokenizer.max_len,
                                   image_size=run.data.image_size, log_std=loss.needs_log_std,
                                   cache_size=run.trainer.accum_steps)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"model config {run.model.label!r}: {err}") from None
    return Trainee(model, loss)


def make_optimizer(trainee: nn.Module, trainer: TrainerSettings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases, other rank<2 tensors and the loss's parameters (temperature, bias)."""
    decay, no_decay = [], []
    for name, param in trainee.named_parameters():
        if not param.requires_grad:
            continue
        exempt = name.startswith("loss.") or param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": float(trainer.weight_decay)},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=float(trainer.lr), betas=tuple(trainer.betas),
                             eps=float(trainer.eps))


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``max_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, trainer: TrainerSettings):
    warmup, max_steps, min_ratio = trainer.warmup_steps, trainer.max_steps, float(trainer.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, max_steps, min_ratio))


def uninformative_reference(trainee: Trainee, run: RunSettings, batch_size: int) -> float:
    """The run's loss at equal scores for a global batch of ``batch_size`` (probloss/eval/stability.py
    ``uninformative_loss``), with the model's embedding size and log-std shape."""
    dim = int(getattr(trainee.model, "embed_dim", run.model.embed_dim))
    return uninformative_loss(trainee.loss, batch_size, dim, bool(run.model.log_std_per_dim))


def make_stability_tracker(trainer: TrainerSettings, reference: float | None = None):
    """The run's StabilityTracker: divergence and collapse against ``reference`` (the loss's uninformative value
    at the training batch, :func:`uninformative_reference`), the rest as probloss/eval/stability.py defines.

    ``trainer.max_nonfinite`` is the one setting for "too many non-finite steps in a row": the tracker marks
    the run diverged at the same count at which the loop stops it. Warmup steps (``trainer.warmup_steps``) are
    never spikes or jumps and never count towards divergence.
    """
    return StabilityTracker(reference=reference, warmup_steps=trainer.warmup_steps,
                            nonfinite_patience=trainer.max_nonfinite)
