"""The run config's schema: typed, frozen sections with every key's default and what it means, built once per run
and passed to the functions that need them.

These classes are where the defaults live (the comment above each field documents it); configs/train.yaml
composes them (the node ``_run_settings``, registered by probloss/training/config.py) after its group choices,
and keeps only its run commands and those choices. A function says what it reads (``train_step(...,
grad_clip)``) instead of taking the whole config. A key a saved config (an older run's config.yaml) lacks takes
its field's ``absent`` value (None unless the field says otherwise: probloss/schema.py), not today's default, so
an old run resumes and evaluates as it ran.

Every value is checked here, in one place, when a run's settings are built (``__post_init__`` of each class,
:func:`check_path_component`, :func:`check_loss_choices`): types, ranges (batch and
sizes positive, learning rates finite and positive, steps and intervals sensible) and choices, each a one-line
:class:`probloss.errors.ConfigError` (exit 2) raised before anything is built or written, so a bad command
leaves no run folder behind.

::

    run = RunSettings.from_config(compose_config(["trainer.max_steps=10"]))
    run.trainer.max_steps, run.data.image_size, run.loss_name      # 10, 32, "infonce"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

import probloss
from probloss.checks import check_path_component, choice, fail, finite, int_at_least, is_int, is_number
from probloss.data.settings import DataSettings
from probloss.errors import ConfigError
from probloss.models.linear import BACKENDS
from probloss.models.settings import ModelSettings
from probloss.schema import build, defaults, setting


def to_dict(cfg: Mapping) -> dict[str, Any]:
    """A plain, resolved dict (for checkpoints, hparams, json)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def loss_kwargs(cfg: Mapping) -> dict[str, Any]:
    """The keyword arguments of ``probloss.build_loss(cfg.loss.name, **kwargs)``: the loss section minus name."""
    section = cfg["loss"]
    section = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    return {k: v for k, v in section.items() if k != "name"}


def run_defaults() -> dict[str, Any]:
    """The composed defaults of a run below its groups (loss, model, data): the top keys and the trainer, fabric
    and eval sections, as plain data (the node configs/train.yaml starts from)."""
    return defaults(RunSettings)


def check_loss_choices(name: str, kwargs: Mapping[str, Any]) -> None:
    """Build the loss once (a few parameters, no data): a keyword its constructor refuses (``loss.impl=fused``,
    ``loss.false_negatives=drop``, a negative init) is a one-line error now, not a traceback later."""
    try:
        probloss.build_loss(name, **kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        fail(f"loss {name!r}: {message[len(name) + 2:] if message.startswith(name + ': ') else message}")


@dataclass(frozen=True)
class TrainerSettings:
    """``trainer.*``: the optimisation, its schedule, evaluation and checkpoint cadence, and the numerics."""

    # optimizer steps
    max_steps: int = 2000
    # GLOBAL batch (all ranks together); per rank = batch_size / world_size
    batch_size: int = 128
    # GradCache micro-batches per rank per step (same update as one big batch, less memory)
    accum_steps: int = 1
    # peak learning rate of AdamW
    lr: float = 2.0e-3
    # cosine decays to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    # linear warmup from 0
    warmup_steps: int = 100
    # not applied to norms, biases, embeddings of rank < 2 or the loss's own parameters
    weight_decay: float = 0.1
    # AdamW betas (CLIP's)
    betas: tuple[float, float] = (0.9, 0.98)
    # AdamW eps
    eps: float = 1.0e-6
    # max global grad norm (0 or null: no clipping, the norm is still logged)
    grad_clip: float | None = 1.0
    # absolute: clip at grad_clip | relative: at grad_clip x the median pre-clip norm of the run's first 20 steps
    # (each loss against its own gradient scale, which differs by an order of magnitude at init between the
    # proposal and infonce: docs/performance.md). stability/grad_norm_init reports it. A run saved before the key
    # existed: null (absolute)
    grad_clip_mode: str | None = setting("absolute")
    # evaluate every N steps (0: only at the end)
    eval_every: int = 500
    # checkpoint every N steps (0: only at the end)
    ckpt_every: int = 500
    # checkpoints kept in <run>/checkpoints/
    keep_last: int = 2
    # TensorBoard scalars every N steps (loss diagnostics too)
    log_every: int = 10
    # NaN/Inf loss or grads: skip (skip the update and count it) | stop (exit non-zero)
    on_nonfinite: str = "skip"
    # stop anyway after this many consecutive non-finite steps (diverged)
    max_nonfinite: int = 20
    # torch.use_deterministic_algorithms (CPU runs are bit-reproducible)
    deterministic: bool = True
    # progress bar on rank 0
    progress: bool = True
    # torch intra-op threads per rank (null: torch's default, split between local CPU ranks). 1: the tiny model's
    # operators are too small to split (more threads are slower on a CPU: docs/performance.md); on GPUs it does
    # not matter
    num_threads: int | None = 1
    # float32 CPU linear layers of the built-in towers: auto (onednn where torch has it) | onednn | blas (MKL;
    # bit-identical to runs from before this key; speeds: docs/performance.md). Not used on GPUs
    # (probloss/models/linear.py). A run saved before the key existed: null (trained on blas)
    cpu_matmul: str | None = setting("auto")

    def __post_init__(self) -> None:
        if self.grad_clip_mode not in (None, "absolute", "relative"):
            raise ConfigError(f"trainer.grad_clip_mode={self.grad_clip_mode}: choose one of absolute|relative")
        if self.cpu_matmul is not None and self.cpu_matmul not in BACKENDS:
            raise ConfigError(f"trainer.cpu_matmul={self.cpu_matmul}: choose one of {'|'.join(BACKENDS)}")
        int_at_least("trainer.max_steps", self.max_steps, 1)
        int_at_least("trainer.batch_size", self.batch_size, 1, why=" (the global batch)")
        int_at_least("trainer.accum_steps", self.accum_steps, 1)
        finite("trainer.lr", self.lr, positive=True)
        finite("trainer.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        int_at_least("trainer.warmup_steps", self.warmup_steps, 0)
        finite("trainer.weight_decay", self.weight_decay, 0.0)
        betas = self.betas
        if not (isinstance(betas, tuple) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
            fail(f"trainer.betas must be two numbers in [0, 1), e.g. [0.9, 0.98], got {betas!r}")
        finite("trainer.eps", self.eps, positive=True)
        finite("trainer.grad_clip", self.grad_clip, 0.0, optional=True, why=" (0 or null: no clipping)")
        int_at_least("trainer.eval_every", self.eval_every, 0, why=" (0: only at the end)")
        int_at_least("trainer.ckpt_every", self.ckpt_every, 0, why=" (0: only at the end)")
        int_at_least("trainer.keep_last", self.keep_last, 1)
        int_at_least("trainer.log_every", self.log_every, 1)
        choice("trainer.on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        int_at_least("trainer.max_nonfinite", self.max_nonfinite, 1)
        int_at_least("trainer.num_threads", self.num_threads, 1, optional=True)


@dataclass(frozen=True)
class FabricSettings:
    """``fabric.*``: what Fabric is built with (values ``fabric run`` sets are ignored under it)."""

    # auto | cpu | cuda | mps | tpu   (ignored under `fabric run`, which sets it)
    accelerator: str = "auto"
    # per node: an int, -1, a list of device ids or auto (ignored under `fabric run`, use --devices)
    devices: Any = 1
    num_nodes: int = 1
    # auto | ddp | ddp_find_unused_parameters_true | xla: data-parallel only (probloss/training/launch.py)
    strategy: str = "auto"
    # auto: bf16-mixed on GPU/TPU, 32-true on CPU | 32-true | bf16-mixed | 64-true | ...
    precision: str = "auto"

    def __post_init__(self) -> None:
        int_at_least("fabric.num_nodes", self.num_nodes, 1)
        devices = self.devices
        ok = devices == "auto" or (is_int(devices) and (devices >= 1 or devices == -1)) or (
            isinstance(devices, tuple) and devices and all(is_int(d) and d >= 0 for d in devices))
        if not ok:
            fail(f"fabric.devices must be a positive integer, -1, auto or a list of device ids, got {devices!r}")


@dataclass(frozen=True)
class EvalSettings:
    """``eval.*``: what the run-time evaluation does."""

    # cap on val samples (null: the whole val split)
    max_samples: int | None = None
    # val embeddings written to TensorBoard's projector at the end (0: none)
    projector_samples: int = 512
    # losses with log-std, at the end: image sigma on val images with this pixel noise vs clean
    # (unc/image_sigma_noise_ratio > 1: noise raises sigma); 0: skip
    noise_std: float = 0.1
    # Gaussian pixel noise (std) on every val image: robustness evaluation (0: clean)
    image_noise: float = 0.0

    def __post_init__(self) -> None:
        int_at_least("eval.max_samples", self.max_samples, 1, optional=True, why=" (null: the whole val split)")
        int_at_least("eval.projector_samples", self.projector_samples, 0)
        finite("eval.noise_std", self.noise_std, 0.0, why=" (0: skip)")
        finite("eval.image_noise", self.image_noise, 0.0, why=" (0: clean)")


@dataclass(frozen=True)
class RunSettings:
    """The whole run: the sections above plus the run folder keys. ``loss`` stays a plain dict: a loss's keywords
    are its constructor's (the ``loss`` group is generated from it), which checks them; ``model`` comes from
    configs/model/<name>.yaml over :class:`probloss.models.settings.ModelSettings` (its towers' arguments checked
    by the towers' constructors) and ``data`` from configs/data/<name>.yaml over
    :class:`probloss.data.settings.DataSettings`."""

    loss_name: str
    loss_kwargs: Mapping[str, Any]
    model: ModelSettings
    data: DataSettings
    # one seed for model init, data order, noise and dropout (per step and rank)
    seed: int = 0
    # run folder: <out_dir>/<experiment>/<loss>/<run_name>/
    out_dir: str = "runs"
    # a name grouping runs you want to compare
    experiment: str = "default"
    # null: a timestamp chosen by rank 0
    run_name: str | None = None
    # null: fresh run | auto: continue run_name (it must exist), or without run_name the run with the newest
    # checkpoint in the experiment | a run folder or checkpoint. A resumed run keeps its saved config.yaml: other
    # values on the command line are refused, except trainer.max_steps (an extension, announced). SIGTERM/SIGINT
    # save and print the command
    resume: str | None = None
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    fabric: FabricSettings = field(default_factory=FabricSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        int_at_least("seed", self.seed, 0)
        if not str(self.out_dir).strip():
            fail("out_dir must be a folder, e.g. out_dir=runs")
        check_path_component("experiment", self.experiment)
        if self.run_name is not None:
            check_path_component("run_name", self.run_name)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "RunSettings":
        plain = to_dict(cfg)
        top = {"seed", "out_dir", "experiment", "run_name", "resume", "loss", "model", "trainer", "fabric", "eval",
               "data"}
        extra = sorted(set(plain) - top)
        if extra:
            raise KeyError(f"config: top-level keys {extra} have no field in RunSettings")
        if not is_int(plain["seed"]):
            fail(f"seed must be a non-negative integer, got {plain['seed']!r}")
        kwargs = loss_kwargs(plain)
        check_loss_choices(str(plain["loss"]["name"]), kwargs)
        try:
            model = ModelSettings.of(plain["model"])
        except ValueError as err:
            name = ModelSettings.value(plain["model"], "name")
            raise ConfigError(f"model config {'?' if name is None else name!r}: {err}") from None
        return cls(
            seed=int(plain["seed"]), out_dir=str(plain["out_dir"]), experiment=str(plain["experiment"]),
            run_name=None if plain["run_name"] is None else str(plain["run_name"]),
            resume=None if plain["resume"] is None else str(plain["resume"]),
            loss_name=str(plain["loss"]["name"]), loss_kwargs=kwargs, model=model,
            trainer=build(TrainerSettings, plain["trainer"], "trainer"),
            fabric=build(FabricSettings, plain["fabric"], "fabric"),
            eval=build(EvalSettings, plain["eval"], "eval"),
            data=build(DataSettings, plain["data"], "data"),
        )
