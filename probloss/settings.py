"""Typed, frozen views of the run config, built once per run and passed to the functions that need them.

The defaults live in ``configs/`` only (one flat, commented block each, nanoGPT style); these classes list the
keys and their types, nothing else, so a function says what it reads (``train_step(..., grad_clip)``) instead
of taking the whole config. A test checks that the keys of ``configs/train.yaml`` and of every
``configs/data/*.yaml`` are exactly these fields, so the two cannot drift apart.

Every value is checked here, in one place, when a run's settings are built (``__post_init__`` of each class,
:func:`check_path_component`, :func:`check_loss_choices`, :func:`check_make_data`): types, ranges (batch and
sizes positive, learning rates finite and positive, steps and intervals sensible) and choices, each a one-line
:class:`probloss.config.ConfigError` (exit 2) raised before anything is built or written, so a bad command
leaves no run folder behind.

::

    run = RunSettings.from_config(compose_config(["trainer.max_steps=10"]))
    run.trainer.max_steps, run.data.image_size, run.loss_name      # 10, 32, "infonce"
"""

from __future__ import annotations

import math
import os
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


# --- value checks (one line each, raised as ConfigError: exit 2) ------------------------------------------------


def _fail(message: str):
    from probloss.config import ConfigError

    raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_at_least(key: str, value: Any, minimum: int, optional: bool = False, why: str = "") -> None:
    """``key`` must be an integer >= ``minimum`` (or None where ``optional``)."""
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        _fail(f"{key} must be {what}{' or null' if optional else ''}{why}, got {value!r}")


def _finite(key: str, value: Any, low: float | None = None, high: float | None = None, *, positive: bool = False,
            optional: bool = False, why: str = "") -> None:
    """``key`` must be a finite number (> 0 where ``positive``; within [low, high] where given)."""
    if optional and value is None:
        return
    ok = _is_number(value) and math.isfinite(float(value))
    ok = ok and not (positive and value <= 0) and not (low is not None and value < low) \
        and not (high is not None and value > high)
    if not ok:
        if positive:
            what = "a finite number > 0"
        elif low is not None and high is not None:
            what = f"a finite number in [{low:g}, {high:g}]"
        elif low is not None:
            what = f"a finite number >= {low:g}"
        else:
            what = "a finite number"
        _fail(f"{key} must be {what}{' or null' if optional else ''}{why}, got {value!r}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(f"{key}={value!r} is not one of {'|'.join(choices)}")


def check_path_component(key: str, value: Any) -> None:
    """``run_name`` and ``experiment`` name one folder inside the run folder's parent: a single path component
    (not empty, no ``/`` or ``\\``, not ``.`` or ``..``, not absolute), so a run never writes outside
    ``out_dir``."""
    text = "" if value is None else str(value)
    bad = (not text or text.strip() != text or text in (".", "..") or "/" in text or "\\" in text
           or os.sep in text or (os.altsep and os.altsep in text) or "\0" in text or os.path.isabs(text))
    if bad:
        _fail(f"{key}={value!r} must be one folder name (not empty, no '/', no '..', not absolute, no leading or "
              f"trailing spaces): the run folder is <out_dir>/<experiment>/<loss>/<run_name>; e.g. {key}=my_run")


def check_make_data(values: Mapping[str, Any]) -> None:
    """The keys of configs/make_data.yaml (scripts/make_data.py), before anything is written."""
    _int_at_least("train_size", values.get("train_size"), 1)
    _int_at_least("val_size", values.get("val_size"), 1)
    _int_at_least("test_size", values.get("test_size"), 0, why=" (0: no test split)")
    _int_at_least("seed", values.get("seed"), 0)
    _int_at_least("image_size", values.get("image_size"), 1)
    _int_at_least("shard_size", values.get("shard_size"), 1)
    _int_at_least("num_workers", values.get("num_workers"), 1, optional=True)
    heldout = values.get("heldout_combos")
    if not _is_int(heldout) or not 0 <= heldout <= 20:
        _fail(f"heldout_combos must be an integer in [0, 20] (at most half the 40 classes), got {heldout!r}")
    if not str(values.get("out") or "").strip():
        _fail("out must be a folder, e.g. out=data/shapes")


def check_loss_choices(name: str, kwargs: Mapping[str, Any]) -> None:
    """Build the loss once (a few parameters, no data): a keyword its constructor refuses (``loss.impl=fused``,
    ``loss.false_negatives=drop``, a negative init) is a one-line error now, not a traceback later."""
    import probloss

    try:
        probloss.build_loss(name, **kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)
        _fail(f"loss {name!r}: {message[len(name) + 2:] if message.startswith(name + ': ') else message}")


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
        _int_at_least("trainer.max_steps", self.max_steps, 1)
        _int_at_least("trainer.batch_size", self.batch_size, 1, why=" (the global batch)")
        _int_at_least("trainer.accum_steps", self.accum_steps, 1)
        _finite("trainer.lr", self.lr, positive=True)
        _finite("trainer.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _int_at_least("trainer.warmup_steps", self.warmup_steps, 0)
        _finite("trainer.weight_decay", self.weight_decay, 0.0)
        betas = self.betas
        if not (isinstance(betas, tuple) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            _fail(f"trainer.betas must be two numbers in [0, 1), e.g. [0.9, 0.98], got {betas!r}")
        _finite("trainer.eps", self.eps, positive=True)
        _finite("trainer.grad_clip", self.grad_clip, 0.0, optional=True, why=" (0 or null: no clipping)")
        _int_at_least("trainer.eval_every", self.eval_every, 0, why=" (0: only at the end)")
        _int_at_least("trainer.ckpt_every", self.ckpt_every, 0, why=" (0: only at the end)")
        _int_at_least("trainer.keep_last", self.keep_last, 1)
        _int_at_least("trainer.log_every", self.log_every, 1)
        _choice("trainer.on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        _int_at_least("trainer.max_nonfinite", self.max_nonfinite, 1)
        _int_at_least("trainer.num_threads", self.num_threads, 1, optional=True)


@dataclass(frozen=True)
class FabricSettings:
    """``fabric.*``: what Fabric is built with (values ``fabric run`` sets are ignored under it)."""

    accelerator: str
    devices: Any  # an int, a list of device ids or "auto"
    num_nodes: int
    strategy: str
    precision: str

    def __post_init__(self) -> None:
        _int_at_least("fabric.num_nodes", self.num_nodes, 1)
        devices = self.devices
        ok = devices == "auto" or (_is_int(devices) and (devices >= 1 or devices == -1)) or (
            isinstance(devices, tuple) and devices and all(_is_int(d) and d >= 0 for d in devices))
        if not ok:
            _fail(f"fabric.devices must be a positive integer, -1, auto or a list of device ids, got {devices!r}")


@dataclass(frozen=True)
class EvalSettings:
    """``eval.*``: what the run-time evaluation does."""

    max_samples: int | None
    projector_samples: int
    noise_std: float
    image_noise: float

    def __post_init__(self) -> None:
        _int_at_least("eval.max_samples", self.max_samples, 1, optional=True, why=" (null: the whole val split)")
        _int_at_least("eval.projector_samples", self.projector_samples, 0)
        _finite("eval.noise_std", self.noise_std, 0.0, why=" (0: skip)")
        _finite("eval.image_noise", self.image_noise, 0.0, why=" (0: clean)")


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
    # Skipped (corrupt or undecodable) samples allowed, as a fraction of those read, before the run stops with a
    # data error naming the worst shards; None (a config saved before the key existed): no limit.
    max_skipped_fraction: float | None = None

    def __post_init__(self) -> None:
        # Choices are checked here, when a run's settings are built: a bad value fails before any work (exit 2).
        from probloss.config import ConfigError, _unknown
        from probloss.data.shapes import COLOURS, HARD_NEGATIVES, SHAPES

        _int_at_least("data.image_size", self.image_size, 1)
        _int_at_least("data.max_len", self.max_len, 1, optional=True)
        _int_at_least("data.num_workers", self.num_workers, 0)
        _finite("data.decoded_cache_mb", self.decoded_cache_mb, 0.0, why=" (0: off)")
        _int_at_least("data.batches_per_epoch", self.batches_per_epoch, 1, optional=True)
        _finite("data.image_noise", self.image_noise, 0.0, optional=True)
        _finite("data.caption_noise", self.caption_noise, 0.0, 1.0, optional=True)
        _finite("data.max_skipped_fraction", self.max_skipped_fraction, 0.0, 1.0, optional=True)
        for split in ("train", "val", "test"):
            pattern = getattr(self, f"{split}_shards")
            if pattern is not None and not str(pattern).strip():
                _fail(f"data.{split}_shards is empty: give a brace pattern of shards, e.g. "
                      f"data.{split}_shards='/data/{split}/{{00000..00009}}.tar', or null")
        if self.name == "shapes":  # the generator's sizes (other sources leave them None)
            _int_at_least("data.train_size", self.train_size, 1, optional=True)
            _int_at_least("data.val_size", self.val_size, 1, optional=True)
            _int_at_least("data.test_size", self.test_size, 0, optional=True, why=" (0: no test split)")
            _int_at_least("data.gen_seed", self.gen_seed, 0, optional=True)

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

    def __post_init__(self) -> None:
        _int_at_least("seed", self.seed, 0)
        if not str(self.out_dir).strip():
            _fail("out_dir must be a folder, e.g. out_dir=runs")
        check_path_component("experiment", self.experiment)
        if self.run_name is not None:
            check_path_component("run_name", self.run_name)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "RunSettings":
        from probloss.config import loss_kwargs, to_dict

        plain = to_dict(cfg)
        top = {"seed", "out_dir", "experiment", "run_name", "resume", "loss", "model", "trainer", "fabric", "eval",
               "data"}
        extra = sorted(set(plain) - top)
        if extra:
            raise KeyError(f"config: top-level keys {extra} have no field in RunSettings")
        if not _is_int(plain["seed"]):
            _fail(f"seed must be a non-negative integer, got {plain['seed']!r}")
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
