"""Fabric, process launch and host tuning, shared by training and sweeps.

::

    python scripts/train.py loss=gaussian_var                    # one process
    fabric run --devices=2 scripts/train.py loss=sigmoid          # `fabric run` starts the processes (DDP)
    python scripts/train.py fabric.accelerator=tpu fabric.devices=8   # Fabric's own (XLA) launcher

Under ``fabric run`` (``LT_CLI_USED`` set) the processes exist already and ``fabric.launch()`` would raise;
otherwise :func:`launch` calls it (one process, or Fabric's own DDP-spawn/XLA launcher).

How a run uses the machine it runs on (threads, the C library's allocator, deterministic kernels, the CPU
matrix products) is set in one place, :func:`host_tuning`, entered once per run by the training loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Any, Callable, Iterator, Mapping

import torch
from lightning_fabric import Fabric

from probloss import dist
from probloss.errors import ConfigError
from probloss.models.linear import cpu_matmul
from probloss.training.settings import FabricSettings, TrainerSettings


def under_fabric_cli() -> bool:
    return bool(int(os.environ.get("LT_CLI_USED", "0")))


def make_fabric(settings: FabricSettings, deterministic: bool):
    """A Fabric from ``fabric.*``; values that ``fabric run`` sets through the environment are not passed
    (Fabric raises on a mismatch between the two)."""
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


@contextlib.contextmanager
def host_tuning(fabric, trainer: TrainerSettings, resumed: Mapping[str, Any] | None = None) -> Iterator[str]:
    """How one run uses its host, for the block; yields the CPU matrix-product backend in effect.

    - intra-op threads: ``trainer.num_threads``, or a split of the cores between local CPU ranks (:func:`_set_threads`);
    - glibc keeps freed memory for the next step (:func:`reuse_freed_memory`; process-wide, not undone);
    - ``torch.use_deterministic_algorithms(trainer.deterministic)``, without its NaN fill of new tensors;
    - the float32 CPU products of the built-in towers (``trainer.cpu_matmul``, probloss/models/linear.py). A run
      resumed from a checkpoint whose config (``resumed``) predates the key, or whose settings carry None, runs on
      ``blas``, the products it was trained with.

    Everything but the allocator is restored after the block: a library call must not leave the caller's
    process changed (tests, sweeps, notebooks). Results are bit-identical with and without the allocator change
    and the NaN fill; threads, determinism and the product backend are part of what a run is.
    """
    matmul = trainer.cpu_matmul
    if resumed is not None and "cpu_matmul" not in resumed.get("trainer", {}):
        matmul = None  # trained before the key existed
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.get_num_threads(), torch.utils.deterministic.fill_uninitialized_memory)
    _set_threads(fabric, trainer.num_threads)
    reuse_freed_memory()
    torch.use_deterministic_algorithms(trainer.deterministic, warn_only=True)
    # Deterministic mode also fills every new uninitialised tensor with NaN, a debugging aid for kernels that
    # read memory they never wrote; no kernel here does, and the fills are a visible share of a tiny model's CPU
    # step (docs/performance.md). The algorithms stay deterministic; results are bit-identical.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        with cpu_matmul(matmul or "blas") as backend:
            yield backend
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.set_num_threads(previous[2])
        torch.utils.deterministic.fill_uninitialized_memory = previous[3]


def reuse_freed_memory() -> None:
    """glibc: serve tensors below 64 MiB from freed heap memory instead of fresh ``mmap`` pages, and keep freed
    memory (up to 1 GiB at the heap's top) for the next step.

    glibc's defaults hand every block above a (self-raising) threshold back to the kernel when it is freed, so a
    step that allocates the same activations again page-faults on fresh zeroed pages; with these settings it
    reuses them (the step time with and without: docs/performance.md). Process-wide and result-neutral; a
    no-op where the C library has no ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD (also stops glibc from moving it)
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def _set_threads(fabric, threads: int | None) -> None:
    """Intra-op threads per rank: ``trainer.num_threads`` if set; else several CPU ranks on one machine split
    the cores instead of each taking all; else torch's default."""
    if threads:
        torch.set_num_threads(int(threads))
    elif fabric.device.type == "cpu" and fabric.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        local = max(1, fabric.world_size // max(1, getattr(fabric, "num_nodes", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
