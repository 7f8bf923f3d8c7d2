"""Typed, frozen views of the run config, built once per run and passed to the functions that need them.

The defaults live in ``configs/`` only (one flat, commented block each, nanoGPT style); these classes list the
keys and their types, nothing else, so a function says what it reads (``train_step(..., grad_clip)``) instead
of taking the whole config. A test checks that the keys of ``configs/train.yaml`` and of every
``configs/data/*.yaml`` are exactly these fields, so the two cannot drift apart.

::

    run = RunSettings.from_config(compose_config(["trainer.max_steps=10"]))
    run.trainer.max_steps, run.data.image_size, run.loss_name      # 10, 32, "infonce"
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping


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
        from probloss.models.linear import BACKENDS

        if self.grad_clip_mode not in (None, "absolute", "relative"):
            from probloss.config import ConfigError

            raise ConfigError(f"trainer.grad_clip_mode={self.grad_clip_mode}: choose one of absolute|relative")
        if self.cpu_matmul is not None and self.cpu_matmul not in BACKENDS:
            from probloss.config import ConfigError

            raise ConfigError(f"trainer.cpu_matmul={self.cpu_matmul}: choose one of {'|'.join(BACKENDS)}")


@dataclass(frozen=True)
class FabricSettings:
    """``fabric.*``: what Fabric is built with (values ``fabric run`` sets are ignored under it)."""

    accelerator: str
    devices: Any  # an int, a list of device ids or "auto"
    num_nodes: int
    strategy: str
    precision: str


@dataclass(frozen=True)
class EvalSettings:
    """``eval.*``: what the run-time evaluation does."""

    max_samples: int | None
    projector_samples: int
    noise_std: float
    image_noise: float


@dataclass(frozen=True)
class DataSettings:
    """``data.*`` of configs/data/<name>.yaml. Keys that only the built-in shapes data has are ``None`` for
    other sources (``cache_dir``, ``train_size``, ``val_size``, ``test_size``, ``heldout_combos``,
    ``gen_seed``)."""

    name: str
    train_shards: str | None
    val_shards: str | None
    test_shards: str | None
    image_size: int
    classnames: tuple[str, ...] | None
    templates: tuple[str, ...] | None
    tokenizer: str
    max_len: int | None  # null: an hf: tokenizer's own maximum (resolved when the config is composed)
    num_workers: int
    decoded_cache_mb: float
    batches_per_epoch: int | None
    image_noise: float | None
    caption_noise: float | None
    hard_negatives: str
    partial_captions: bool = False
    strict: bool = False
    noise_attribute: str | None = None  # planted noise (issue 33): a colour or shape of the shapes generator
    noise_rate: float = 0.0  # planted noise: the probability that a scene with the attribute gets a wrong caption
    cache_dir: str | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    heldout_combos: int | None = None
    gen_seed: int | None = None

    def __post_init__(self) -> None:
        # Choices are checked here, when a run's settings are built: a bad value fails before any work (exit 2).
        from probloss.config import ConfigError, _unknown
        from probloss.data.shapes import COLOURS, HARD_NEGATIVES, SHAPES

        if self.hard_negatives not in HARD_NEGATIVES:
            raise ConfigError(_unknown("data.hard_negatives choice", str(self.hard_negatives), list(HARD_NEGATIVES),
                                       "data.hard_negatives"))
        if self.noise_attribute is not None:
            if self.noise_attribute not in (*COLOURS, *SHAPES):
                raise ConfigError(_unknown("data.noise_attribute (a colour or shape)", str(self.noise_attribute),
                                           [*COLOURS, *SHAPES], "data.noise_attribute"))
        if not isinstance(self.noise_rate, (int, float)) or not 0.0 <= float(self.noise_rate) <= 1.0:
            raise ConfigError(f"data.noise_rate must be a probability in [0, 1], got {self.noise_rate}")
        if self.noise_rate and self.noise_attribute is None:
            raise ConfigError(f"data.noise_rate={self.noise_rate} needs data.noise_attribute=<colour or shape>: the "
                              "scenes whose captions are replaced")
        if self.heldout_combos is not None and not 0 <= self.heldout_combos <= 20:
            raise ConfigError(f"data.heldout_combos must be in [0, 20] (at most half the 40 classes), "
                              f"got {self.heldout_combos}")

    def loader_noise(self) -> dict[str, float]:
        """The augmentation noise the config sets (``None``: the loader's defaults)."""
        return {k: getattr(self, k) for k in ("image_noise", "caption_noise") if getattr(self, k) is not None}


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

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "RunSettings":
        from probloss.config import loss_kwargs, to_dict

        plain = to_dict(cfg)
        top = {"seed", "out_dir", "experiment", "run_name", "resume", "loss", "model", "trainer", "fabric", "eval",
               "data"}
        extra = sorted(set(plain) - top)
        if extra:
            raise KeyError(f"config: top-level keys {extra} have no field in RunSettings")
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
