"""Typed, frozen views of the run config, built once per run and passed to the functions that need them.

The defaults live in ``configs/`` only (one flat, commented block each, nanoGPT style); these classes list the
keys and their types, nothing else, so a function says what it reads (``train_step(..., grad_clip)``) instead
of taking the whole config. A test checks that the keys of ``configs/train.yaml`` and of every
``configs/data/*.yaml`` are exactly these fields, so the two cannot drift apart.

Every value is checked here, in one place, when a run's settings are built (``__post_init__`` of each class,
:func:`check_path_component`, :func:`check_loss_choices`, :func:`check_make_data`): types, ranges (batch and
sizes positive, learning rates finite and positive, steps and intervals sensible) and choices, each a one-line
:class:`probloss.errors.ConfigError` (exit 2) raised before anything is built or written, so a bad command
leaves no run folder behind.

::

    run = RunSettings.from_config(compose_config(["trainer.max_steps=10"]))
    run.trainer.max_steps, run.data.image_size, run.loss_name      # 10, 32, "infonce"
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import probloss
from probloss.checks import check_path_component, choice, fail, finite, int_at_least, is_int, is_number
from probloss.data.settings import DataSettings
from probloss.errors import ConfigError
from probloss.models.linear import BACKENDS
from probloss.training.config import loss_kwargs, to_dict


def _build(cls, section: Mapping[str, Any], where: str):
    """``cls`` from a config section: every field must be present (no defaults here), no other key allowed."""
    names = [f.name for f in fields(cls)]
    keys = set(section.keys())
    extra = sorted(keys - set(names))
    if extra:  # a key added to a yaml without a field here (caught by the tests, not by users)
        raise KeyError(f"{where}: keys {extra} have no field in {cls.__name__}")
    values = {}
    for name in names:
        value = section.get(name)
        values[name] = tuple(value) if isinstance(value, (list, tuple)) else value
    return cls(**values)


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
    """``trainer.*`` of configs/train.yaml (its comments document each key)."""

    max_steps: int
    batch_size: int  # global, over all ranks
    accum_steps: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float | None
    grad_clip_mode: str | None  # absolute | relative; None: a run saved before the key existed (absolute)
    eval_every: int
    ckpt_every: int
    keep_last: int
    log_every: int
    on_nonfinite: str
    max_nonfinite: int
    deterministic: bool
    progress: bool
    num_threads: int | None
    cpu_matmul: str | None  # None: a run saved before the key existed (trained on blas)

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

    accelerator: str
    devices: Any  # an int, a list of device ids or "auto"
    num_nodes: int
    strategy: str
    precision: str

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

    max_samples: int | None
    projector_samples: int
    noise_std: float
    image_noise: float

    def __post_init__(self) -> None:
        int_at_least("eval.max_samples", self.max_samples, 1, optional=True, why=" (null: the whole val split)")
        int_at_least("eval.projector_samples", self.projector_samples, 0)
        finite("eval.noise_std", self.noise_std, 0.0, why=" (0: skip)")
        finite("eval.image_noise", self.image_noise, 0.0, why=" (0: clean)")


@dataclass(frozen=True)
class RunSettings:
    """The whole run: the sections above plus the run folder keys. ``loss`` and ``model`` stay plain dicts: a
    loss's keywords are its constructor's, a model's are the encoder builder's, and those check them."""

    seed: int
    out_dir: str
    experiment: str
    run_name: str | None
    resume: str | None
    loss_name: str
    loss_kwargs: Mapping[str, Any]
    model: Mapping[str, Any]
    trainer: TrainerSettings
    fabric: FabricSettings
    eval: EvalSettings
    data: DataSettings

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
        check_loss_choices(str(plain["loss"]["name"]), loss_kwargs(plain))
        return cls(
            seed=int(plain["seed"]), out_dir=str(plain["out_dir"]), experiment=str(plain["experiment"]),
            run_name=None if plain["run_name"] is None else str(plain["run_name"]),
            resume=None if plain["resume"] is None else str(plain["resume"]),
            loss_name=str(plain["loss"]["name"]), loss_kwargs=loss_kwargs(plain), model=dict(plain["model"]),
            trainer=_build(TrainerSettings, plain["trainer"], "trainer"),
            fabric=_build(FabricSettings, plain["fabric"], "fabric"),
            eval=_build(EvalSettings, plain["eval"], "eval"),
            data=_build(DataSettings, plain["data"], "data"),
        )
