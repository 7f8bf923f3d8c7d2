"""Fabric and process launch, shared by training and sweeps.

::

    python scripts/train.py loss=gaussian_var                    # one process
    fabric run --devices=2 scripts/train.py loss=sigmoid          # `fabric run` starts the processes (DDP)
    python scripts/train.py fabric.accelerator=tpu fabric.devices=8   # Fabric's own (XLA) launcher

Under ``fabric run`` (``LT_CLI_USED`` set) the processes exist already and ``fabric.launch()`` would raise;
otherwise :func:`launch` calls it (one process, or Fabric's own DDP-spawn/XLA launcher).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from probloss import dist
from probloss.errors import ConfigError
from probloss.training.settings import FabricSettings


def under_fabric_cli() -> bool:
    return bool(int(os.environ.get("LT_CLI_USED", "0")))


def make_fabric(settings: FabricSettings, deterministic: bool):
    """A Fabric from ``fabric.*``; values that ``fabric run`` sets through the environment are not passed
    (Fabric raises on a mismatch between the two)."""
    from lightning_fabric import Fabric

    kwargs: dict[str, Any] = {}
    cli = under_fabric_cli()
    check_strategy(os.environ["LT_STRATEGY"] if cli and "LT_STRATEGY" in os.environ else settings.strategy)
    if not cli:
        kwargs.update(accelerator=settings.accelerator, devices=settings.devices, num_nodes=settings.num_nodes)
    if not (cli and "LT_STRATEGY" in os.environ):
        kwargs["strategy"] = settings.strategy
    if not (cli and "LT_PRECISION" in os.environ):
        kwargs["precision"] = resolve_precision(settings.precision,
                                                os.environ.get("LT_ACCELERATOR") or settings.accelerator)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts, for determinism
    return Fabric(**kwargs)


def check_strategy(name: str) -> None:
    """Only data-parallel strategies (DDP, one device, XLA's DDP) are supported; others are a config error.

    Why: the loss runs outside the model's wrapped forward (it exchanges embeddings between ranks and owns
    parameters, logit_scale and bias). FSDP and DeepSpeed shard parameters and gather them only inside
    forward, so the loss would see shards; DataParallel would split the batch the loss needs whole.
    """
    lowered = str(name).lower()
    if lowered.startswith(("auto", "ddp", "single", "xla")) and not lowered.startswith("xla_fsdp"):
        return
    raise ConfigError(
        f"strategy {name!r} is not supported: probloss trains data-parallel replicas only (ddp, one device, or "
        "xla on TPU). Its losses run outside the model's wrapped forward and own parameters that FSDP/DeepSpeed "
        "would shard. Use `fabric run --strategy=ddp` or fabric.strategy=auto|ddp.")


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed on GPU/TPU (where bf16 is supported), 32-true on CPU/MPS."""
    if precision != "auto":
        return precision
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator == "tpu":
        return "bf16-mixed"
    return "32-true"


def launch(fabric, function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(fabric, *args)`` on every process and end the process group cleanly (also on error)."""
    try:
        result = function(fabric, *args) if under_fabric_cli() else fabric.launch(function, *args)
    except BaseException:
        dist.finish(ok=False)
        raise
    dist.finish(ok=True)
    return result
