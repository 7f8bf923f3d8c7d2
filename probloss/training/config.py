"""Build the run configuration with Hydra's compose API and check it before any work.

Why the compose API and not ``@hydra.main``: under ``fabric run``/torchrun every rank would run Hydra and pick
its own output folder. Here every rank composes the same config from ``configs/`` (no Hydra run folder, no
chdir, no logging setup) and rank 0 makes the run folder (probloss.training.loop).

The schema is the settings dataclasses: every default lives in one place and the YAML files only choose groups
and override (:func:`register_schema` turns the dataclasses into the nodes they compose: probloss/training/
settings.py for the run's keys, probloss/models/settings.py for ``model.*`` (a tower's own arguments: its
constructor), probloss/data/settings.py for ``data.*``, the losses' constructors for ``loss.*``,
probloss/studies/settings.py for ``sweep.*`` and ``recipe.*``). Overrides are checked against the config those
defaults compose to, key by key and type by type, so an error can list the keys that exist.

::

    cfg = compose_config(["loss=sigmoid", "trainer.max_steps=100"])
    cfg.loss.name, loss_kwargs(cfg)        # "sigmoid", {"init_logit_scale": ..., ...}

Errors (all :class:`ConfigError`, raised before anything is built or written):

- an unknown key (``trainer.max_step=5``) names the key and lists the keys that exist at that level;
- an unknown choice (``loss=foo``) names it and lists the choices of the group;
- a loss keyword the loss's constructor does not take lists the keywords it accepts.

The ``loss`` group is generated: every registered loss is a choice ``loss=<name>`` whose config is ``name`` plus
its constructor's keywords with their defaults (:func:`loss_defaults`; the loss's docstring documents each), so a
default lives in the constructor only and a plugin needs no config file. A ``loss/<name>.yaml`` in a config folder
of your own (``PROBLOSS_CONFIG_DIR``) sets the keys of that choice (its values win over the generated defaults).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

import probloss
from probloss.checks import unknown
from probloss.data.settings import DataSettings, MakeDataSettings
from probloss.errors import ConfigError
from probloss.eval.benchmarks.settings import BENCHMARK_SETTINGS, EvaluateSettings
from probloss.models.settings import ModelSettings
from probloss.models.towers import resolve_tower_config
from probloss.schema import comments, defaults
from probloss.training.settings import RunSettings, loss_kwargs, run_defaults, to_dict

# An installed wheel carries the configs as package data (probloss/configs); a source checkout (editable
# install, PYTHONPATH) has them in the top-level configs/ folder, the one copy.
_PACKAGED = Path(__file__).resolve().parents[1] / "configs"
CONFIG_DIR = _PACKAGED if _PACKAGED.is_dir() else Path(__file__).resolve().parents[2] / "configs"
# Sections whose keys are checked by the code that consumes them rather than against the defaults: a loss's
# keywords against its constructor (check_loss_kwargs), a model's against build_dual_encoder.
FREE_SECTIONS = ("loss", "model")


def override_key(override: str) -> str:
    """The key (or group) a command-line override sets: ``+a.b=1``, ``~a.b``, ``a.b=1`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def config_dir() -> Path:
    """The folder of the primary configs and the config groups (``PROBLOSS_CONFIG_DIR`` overrides it)."""
    return Path(os.environ.get("PROBLOSS_CONFIG_DIR", CONFIG_DIR)).resolve()


def group_options(group: str, directory: Path | None = None) -> list[str]:
    """Sorted choices of a config group: its yaml files (not ``_*.yaml``, shared bases), plus every registered
    loss for ``loss``."""
    directory = directory or config_dir()
    names = {p.stem for p in (directory / group).glob("*.yaml") if not p.stem.startswith("_")}
    if group == "loss":
        names |= set(probloss.list_losses())
    return sorted(names)


def config_groups(config_name: str, directory: Path | None = None) -> dict[str, Any]:
    """``{group: default choice}`` of a primary config, following its defaults list (``- train`` included).

    A default of ``"???"`` means the command must choose (``sweep=<name>``).
    """
    directory = directory or config_dir()
    path = directory / f"{config_name}.yaml"
    groups: dict[str, Any] = {}
    try:
        with open(path) as f:  # read from the file, so a YAML error names it
            primary = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error(err, path)) from None
    for entry in primary.get("defaults", []):
        if isinstance(entry, str) and (directory / f"{entry}.yaml").is_file():  # another primary (- train)
            groups.update(config_groups(entry, directory))
        elif isinstance(entry, dict):
            groups.update({key.replace("optional ", ""): value for key, value in entry.items()})
    return groups


def yaml_error(err: Exception, path: str | Path | None = None) -> str:
    """One line for a malformed YAML file: the file, the line and column, and what the parser expected."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = str(path) if path is not None else (mark.name if mark is not None else "a YAML file")
    if mark is not None:
        where += f", line {mark.line + 1}, column {mark.column + 1}"
    problem = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x) or str(err)
    return f"malformed YAML in {where}: {problem}; fix the file"


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "train", directory: str | Path | None = None
) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` with ``key=value`` overrides, checked; see the module docstring.

    Args:
        overrides: Hydra overrides, e.g. ``["loss=sigmoid", "trainer.lr=1e-3", "loss.init_logit_bias=-5"]``.
        config_name: the primary config file (without .yaml).
        directory: the config folder (default: :func:`config_dir`).

    Returns:
        The resolved config (a read-only, struct-mode DictConfig).
    """
    directory = Path(directory).resolve() if directory else config_dir()
    if not (directory / f"{config_name}.yaml").is_file():
        raise ConfigError(f"no config {config_name!r}: {directory / (config_name + '.yaml')} does not exist")
    overrides = list(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(f"cannot parse overrides {overrides}: {err}") from None

    register_schema(directory)
    groups = config_groups(config_name, directory)
    choices = [o for o in parsed if o.key_or_group in groups and not o.is_delete()]
    for o in choices:
        value = o.value()
        options = group_options(o.key_or_group, directory)
        # a group whose default is a list takes several choices at once (benchmark=[karpathy,folder])
        picked = value if isinstance(value, list) and isinstance(groups[o.key_or_group], list) else [value]
        for one in picked:
            if not isinstance(one, str) or one not in options:
                raise ConfigError(unknown(f"{o.key_or_group} choice", str(one), options, o.key_or_group))
    chosen = {o.key_or_group for o in choices}
    own_sections = set(groups) - set(config_groups("train", directory))  # sweep, recipe: the command's own
    for group, default in groups.items():
        if default == "???" and group not in chosen:
            raise ConfigError(f"say which {group} to use: {group}=<name>, one of "
                              f"{', '.join(group_options(group, directory))} ({directory / group}/)")

    with initialize_config_dir(config_dir=str(directory), version_base=None):
        # The defaults with the chosen groups only: the schema the other overrides are checked against.
        choice_strings = [o.input_line for o in choices]
        try:
            schema = compose(config_name=config_name, overrides=choice_strings)
        except yaml.YAMLError as err:  # a malformed config file: Hydra's parser names the file
            raise ConfigError(yaml_error(err)) from None
        replaced: set[str] = set()  # dict-valued keys of the command's own section, replaced whole
        final: list[str] = []
        for o, line in zip(parsed, overrides):
            if o in choices or o.is_add() or o.is_force_add() or o.is_delete():
                final.append(line)
                continue
            if _is_new_loss_kwarg(schema, o.key_or_group):
                final.append("+" + line.lstrip("~"))  # a constructor keyword the loss's yaml leaves out
                continue
            _check_key(schema, o.key_or_group)
            if o.key_or_group.split(".")[0] in own_sections and isinstance(o.value(), dict):
                # recipe.arms={...}, sweep.space={...}: data, not schema; a new dict replaces the old one
                # (Hydra would merge it key by key and refuse new keys)
                replaced.add(o.key_or_group)
                final += [f"~{o.key_or_group}", "+" + line]
                continue
            final.append(line)
        try:
            cfg = compose(config_name=config_name, overrides=final)
        except HydraException as err:
            raise ConfigError(f"bad override: {err}") from None

    # `+key=value` adds keys Hydra does not know: allowed only where the consumer checks them (loss, model).
    _check_no_new_keys(schema, cfg, prefix="", free=replaced)
    _check_types(schema, cfg, prefix="", free=replaced)
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"required config values are missing (???): {', '.join(sorted(missing))}; set them as key=value")
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:  # an interpolation error names its key
        raise ConfigError(f"cannot resolve the config: {err}") from None
    if "loss" in cfg:
        check_loss_kwargs(cfg)
    _resolve_towers(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _resolve_towers(cfg: DictConfig) -> None:
    """Write the preprocessing of a ``timm:``/``hf:`` tower into the config (its input size, mean, std,
    interpolation; its tokenizer and length), so that config.yaml says what the run used (models/towers.py)."""
    if "model" not in cfg or "data" not in cfg:
        return

    before = OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.data)
    try:
        after = resolve_tower_config(*before)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if after != before:
        with open_dict(cfg):
            cfg.model, cfg.data = after


def _is_new_loss_kwarg(schema: DictConfig, key: str) -> bool:
    """Whether ``loss.<kwarg>`` is absent from the loss's config (a keyword without a plain default, a ``**kwargs``
    one, or one a loss yaml of your own leaves out); raise unless the loss's constructor takes it."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] != "loss" or "loss" not in schema or parts[1] in schema.loss.keys():
        return False
    name = schema.loss.name
    accepted, var_kw = loss_signature(name)
    if parts[1] in accepted or var_kw:
        return True
    raise ConfigError(
        unknown(f"keyword for loss {name!r}:", parts[1], list(accepted), f"{name}.__init__")
        + " (set them as loss.<keyword>=value)"
    )


def _check_key(schema: DictConfig, key: str) -> None:
    """Raise if a dotted ``key`` is not in ``schema``."""
    parts = key.split(".")
    node: Any = schema
    for depth, part in enumerate(parts):
        if isinstance(node, DictConfig) and part in node.keys():
            node = node._get_node(part)
            continue
        if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
            continue
        where = ".".join(parts[:depth]) or "the top level"
        existing = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
        hint = "" if existing else f" ({where} is a value, not a section)"
        raise ConfigError(unknown("config key", key, existing, where, candidate=part) + hint)


def _check_no_new_keys(schema: DictConfig, cfg: DictConfig, prefix: str, free: set[str] = frozenset()) -> None:
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if prefix == "" and key in FREE_SECTIONS or full in free:
            continue
        if key not in schema.keys():  # (`in schema` is False for ??? values)
            raise ConfigError(unknown("config key", full, sorted(map(str, schema.keys())), prefix.rstrip(".") or "the top level", candidate=str(key)))
        if isinstance(cfg._get_node(key), DictConfig) and isinstance(schema._get_node(key), DictConfig):
            _check_no_new_keys(schema[key], cfg[key], f"{full}.", free)


def _check_types(schema: DictConfig, cfg: DictConfig, prefix: str, free: set[str] = frozenset()) -> None:
    """A value whose default is a bool/int/float/str must keep that type (int for float is fine)."""
    for key in schema.keys():
        full = f"{prefix}{key}"
        if prefix == "" and key in FREE_SECTIONS or full in free or OmegaConf.is_missing(schema, key) \
                or OmegaConf.is_missing(cfg, key):
            continue
        default, value = schema._get_node(key), cfg._get_node(key)
        if isinstance(default, DictConfig):
            if isinstance(value, DictConfig):
                _check_types(default, value, f"{full}.", free)
            continue
        default, value = schema[key], cfg[key]
        if default is None or value is None or isinstance(default, (ListConfig, list)):
            continue
        expected = type(default)
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        ok = ok or (expected is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"config key {full!r} must be {expected.__name__} (default {default!r}), got {value!r}")


# --- losses ---------------------------------------------------------------------------------------------------


def loss_signature(name: str) -> tuple[dict[str, Any], bool]:
    """``({keyword: default or inspect.Parameter.empty}, accepts **kwargs)`` of a registered loss's constructor."""
    cls = probloss.LOSSES.get(name)
    init = cls.__init__ if isinstance(cls, type) else cls
    params = list(inspect.signature(init).parameters.values())
    if isinstance(cls, type):
        params = params[1:]  # self
    kwargs = {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return kwargs, any(p.kind == p.VAR_KEYWORD for p in params)


def check_loss_kwargs(cfg: Mapping) -> None:
    """Raise ConfigError unless the loss is registered and takes every keyword its config section gives."""
    if "name" not in cfg["loss"]:
        raise ConfigError("the loss config section has no `name` (the registered loss to build)")
    name = cfg["loss"]["name"]
    try:
        accepted, var_kw = loss_signature(name)
    except KeyError as err:
        raise ConfigError(str(err)) from None
    given = loss_kwargs(cfg)
    unknown = sorted(set(given) - set(accepted))
    if unknown and not var_kw:
        raise ConfigError(
            f"loss {name!r} does not accept {', '.join(f'loss.{k}' for k in unknown)}. "
            f"Accepted keywords of {name!r}: {', '.join(accepted) or '(none)'}"
        )
    required = [k for k, v in accepted.items() if v is inspect.Parameter.empty and k not in given]
    if required:
        raise ConfigError(f"loss {name!r} needs {', '.join(f'loss.{k}=...' for k in required)}")


def loss_defaults(name: str) -> dict[str, Any]:
    """The generated config of ``loss=<name>``: ``name``, then every constructor keyword with its default (``???``
    where it has none: the command must set it). A default that is not plain data (a tensor, a callable) is left
    out: set it as ``loss.<keyword>=...`` if needed."""
    accepted, _ = loss_signature(name)
    node: dict[str, Any] = {"name": name}
    for key, default in accepted.items():
        if default is inspect.Parameter.empty:
            node[key] = "???"
        elif default is None or isinstance(default, (bool, int, float, str)):
            node[key] = default
    return node


def register_schema(directory: Path | None = None) -> None:
    """Register the nodes the config files compose: ``_run_settings`` (the run's top keys and its trainer, fabric
    and eval sections: probloss/training/settings.py, after configs/train.yaml's group choices), ``model/_settings``
    (the dual encoder's own keys: probloss/models/settings.py), ``data/_settings`` (every data source's keys:
    probloss/data/settings.py), ``_make_data_settings`` (``probloss make-data``'s keys, there too),
    ``_evaluate_settings`` and ``benchmark/_<name>`` (``probloss evaluate``'s and each benchmark's keys:
    probloss/eval/benchmarks/settings.py) and the ``loss`` group (:func:`register_losses`). Plain
    data, not typed structured configs: the composed config is checked key by key below, with the messages that
    list what exists."""
    store = ConfigStore.instance()
    store.store(name="_run_settings", node=run_defaults())
    store.store(group="data", name="_settings", node=defaults(DataSettings))
    store.store(group="model", name="_settings", node=defaults(ModelSettings))
    store.store(name="_make_data_settings", node=defaults(MakeDataSettings))
    store.store(name="_evaluate_settings", node=defaults(EvaluateSettings))
    for name, cls in BENCHMARK_SETTINGS.items():  # each under its own key, as configs/benchmark/<name>.yaml
        store.store(group="benchmark", name=f"_{name}", node=defaults(cls), package=f"benchmark.{name}")
    register_losses(directory)


def register_losses(directory: Path | None = None) -> None:
    """Make every registered loss a choice of the ``loss`` group (Hydra's ConfigStore, :func:`loss_defaults`),
    except where ``<directory>/loss/<name>.yaml`` exists (a config of your own: its values win)."""
    directory = directory or config_dir()
    store = ConfigStore.instance()
    for name in probloss.list_losses():
        if (directory / "loss" / f"{name}.yaml").is_file():
            continue
        try:
            node = loss_defaults(name)
        except Exception:  # a broken plugin fails later, with its own error, if it is chosen
            continue
        store.store(group="loss", name=name, node=node)


# --- saving and reading back ------------------------------------------------------------------------------------


def save_config(cfg: Mapping, run_dir: str | Path) -> Path:
    """Write the resolved config to ``<run_dir>/config.yaml`` (atomically) and return the path."""
    path = Path(run_dir) / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)), resolve=True))
    os.replace(tmp, path)
    return path


def apply_overrides(saved: Mapping, overrides: Sequence[str], what: str) -> DictConfig:
    """A saved, resolved config (a checkpoint's) with ``key=value`` overrides in the same grammar and with the
    same checks as :func:`compose_config`: an unknown key is an error that lists the keys there."""
    cfg = OmegaConf.create(dict(saved))
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {err}") from None
    schema = cfg.copy()
    for o in parsed:
        if o.is_delete() or o.is_add() or o.is_force_add():
            raise ConfigError(f"{o.input_line!r}: only key=value overrides of existing keys change {what}")
        if o.key_or_group in FREE_SECTIONS or o.key_or_group == "data":
            raise ConfigError(f"{o.input_line!r}: {what} is resolved; change its keys (e.g. data.val_shards=...), "
                              "not its group choice")
        _check_key(schema, o.key_or_group)
        OmegaConf.update(cfg, o.key_or_group, o.value(), merge=False)
    _check_types(schema, cfg, prefix="")
    _resolve_towers(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def describe(config_name: str = "train", directory: Path | None = None) -> str:
    """The ``--help`` text of a command: its groups and choices, and its primary config file."""
    directory = directory or config_dir()
    lines = ["arguments: key=value overrides (Hydra grammar); unknown keys and choices are errors that list what "
             "exists"]
    groups = config_groups(config_name, directory)
    lines += ["", "groups:"] if groups else []
    for group, default in groups.items():
        lines.append(f"  {group}={{{','.join(group_options(group, directory))}}}   (default: {default})")
    if "loss" in groups:
        register_losses(directory)
        lines += ["", "loss keywords (loss.<keyword>=value; their defaults are the constructor's, documented in its "
                  "docstring):"]
        for name in group_options("loss", directory):
            try:
                keywords = {k: v for k, v in loss_defaults(name).items() if k != "name"}
            except Exception:  # a broken plugin: named, not listed
                keywords = {}
            lines.append(f"  {name}: " + " ".join(f"{k}={v}" for k, v in keywords.items()))
    if "data" in groups:  # a training config: the keys the dataclasses hold, with their defaults and comments
        lines += ["", "settings (key=default  # what it means; probloss/training/settings.py, model.*: "
                  "probloss/models/settings.py, a tower's own keys: configs/model/<name>.yaml, data.*: "
                  "probloss/data/settings.py, the shapes generator's own keys: configs/data/shapes.yaml):"]
        lines += schema_lines(RunSettings) + schema_lines(ModelSettings, "model.") + schema_lines(DataSettings, "data.")
    if config_name == "make_data":
        lines += ["", "settings (key=default  # what it means; probloss/data/settings.py, MakeDataSettings):"]
        lines += schema_lines(MakeDataSettings)
    if config_name == "evaluate":
        lines += ["", "settings (key=default  # what it means; probloss/eval/benchmarks/settings.py):"]
        lines += schema_lines(EvaluateSettings)
        for name, cls in BENCHMARK_SETTINGS.items():
            lines += schema_lines(cls, f"benchmark.{name}.")
    path = directory / f"{config_name}.yaml"
    lines += ["", f"defaults ({path}):", "", path.read_text()]
    return "\n".join(lines)


def schema_lines(cls, prefix: str = "") -> list[str]:
    """``  <prefix><key>=<default>  # <comment>`` for every composed field of a settings dataclass, nested
    sections as dotted keys (``trainer.lr``)."""
    lines, notes = [], comments(cls)
    node = defaults(cls)
    for f in dataclasses.fields(cls):
        if f.name not in node:
            continue
        value = node[f.name]
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            lines += schema_lines(type(f.default_factory()), f"{prefix}{f.name}.")
            continue
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        note = f"  # {notes[f.name]}" if f.name in notes else ""
        lines.append(f"  {prefix}{f.name}={shown}{note}")
    return lines
