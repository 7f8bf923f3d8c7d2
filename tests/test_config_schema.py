"""The typed config (issue 32): defaults live in the dataclasses, the YAML files only choose and override.

The composed configs must equal, key by key, what they were when every default was written in YAML (the
commit before the dataclasses took them over): the default training run, a sweep, a recipe, make_data and
evaluate. That check reads the old configs from git and is skipped where the history is not there (a wheel).
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import pytest

from probloss.data.settings import MakeDataSettings
from probloss.errors import ConfigError
from probloss.eval.benchmarks.settings import EvaluateSettings, KarpathySettings, benchmark_settings
from probloss.models.settings import ModelSettings
from probloss.studies.recipe import load_recipe
from probloss.studies.settings import RecipeSettings, SlurmSettings, SweepSettings
from probloss.studies.sweep import load_sweep
from probloss.training.config import compose_config, to_dict
from probloss.training.settings import RunSettings

REPO = Path(__file__).resolve().parents[1]
BEFORE = "e5d48e5"  # the last commit with every default in configs/*.yaml
REQUIRED_BENCHMARK_KEYS = {"karpathy": ["annotations", "images"], "folder": ["root"], "wds": ["shards"],
                           **{name: ["annotations", "images", "extra_positives"] for name in ("cxc", "eccv_caption")}}
COMMANDS = [("train", []), ("recipe", ["recipe=proposal"]),
            *[("sweep", [f"sweep={name}"]) for name in ("lr", "lr_grid", "lr_select", "compare_losses", "stability")],
            *[("evaluate", [f"benchmark=[{name}]", "checkpoint=x.ckpt", *(f"benchmark.{name}.{key}=x" for key in keys)])
              for name, keys in REQUIRED_BENCHMARK_KEYS.items()],
            ("make_data", ["out=x", "train_size=10", "val_size=10"]), ("evaluate", ["checkpoint=x.ckpt"]),
            *[("train", [f"loss={name}"]) for name in ("gaussian_var", "sigmoid", "sigmoid_var", "pcmepp", "prolip")],
            ("train", ["data=webdataset", "data.train_shards=a.tar", "data.val_shards=b.tar"]),
            *[("train", [f"model={name}"]) for name in ("tiny", "base", "cnn_cbow")],
            # the LiT models with a random timm image tower (the towers extra: part of the dev install) and the
            # built-in text tower (no weights, no download)
            ("train", ["model=lit", "model.image_pretrained=null", "model.text_tower=transformer"]),
            ("train", ["model=lit_shapes", "model.image_pretrained=null"])]


@pytest.fixture(scope="module")
def old_configs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("before")
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE, "configs"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with commit {BEFORE}")
    return folder / "configs"


def _differences(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}{key}"
            if key not in new:
                out.append(f"{where}: missing now (was {old[key]!r})")
            elif key not in old:
                out.append(f"{where}: new key ({new[key]!r})")
            else:
                out += _differences(old[key], new[key], f"{where}.")
        return out
    same = old == new and type(old) is type(new)
    return [] if same else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


@pytest.mark.parametrize("config_name, overrides", COMMANDS, ids=[" ".join([c, *o[:2]]) for c, o in COMMANDS])
def test_composed_defaults_are_those_of_the_yaml_era(old_configs, config_name, overrides):
    with warnings.catch_warnings():  # the old loss/*.yaml files meet the generated loss nodes of the same name
        warnings.simplefilter("ignore", UserWarning)
        old = to_dict(compose_config(overrides, config_name=config_name, directory=old_configs))
    new = to_dict(compose_config(overrides, config_name=config_name))
    assert _differences(old, new) == []


def test_sweep_and_recipe_sections_are_their_dataclasses():
    sweep, _ = load_sweep(["sweep=lr"])
    assert isinstance(sweep, SweepSettings) and isinstance(sweep.slurm, SlurmSettings)
    assert sweep.sampler == "tpe" and sweep.pruner == "median" and sweep.launcher == "local"
    _, recipe, _ = load_recipe(["recipe=bias_init", "recipe.slurm.time_min=5"])
    assert isinstance(recipe, RecipeSettings) and recipe.slurm.time_min == 5 and recipe.vary_data is True
    assert recipe["seeds"] == recipe.seeds  # reads as the mapping recipe.json holds


def test_a_partial_mapping_takes_the_dataclass_defaults_and_unknown_keys_fail():
    recipe = RecipeSettings.of({"arms": {"a": ["loss=infonce"]}})
    assert recipe.seeds == [0, 1, 2] and recipe.metrics == ["test/zeroshot_top1"] and recipe.slurm.wait is True
    assert SweepSettings.of({}).objectives == [{"metric": "val/zeroshot_top1", "direction": "maximize"}]
    with pytest.raises(ConfigError, match="unknown config key 'sweep.sampeler'. Did you mean 'sampler'"):
        SweepSettings.of({"sampeler": "tpe"})
    with pytest.raises(ConfigError, match="unknown config key 'recipe.learning_rates_used'"):
        load_recipe(["recipe=bias_init", "recipe.learning_rates_used={}"])  # computed, not a setting


@pytest.mark.parametrize("argv, message", [
    (["sweep=lr", "sweep.sampler=cmaes"], "unknown sweep.sampler 'cmaes'; choose tpe, random, nsga2 or grid"),
    (["sweep=lr", "sweep.pruner=asha"], "unknown sweep.pruner 'asha'; choose median, hyperband or none"),
    (["sweep=lr", "sweep.launcher=ray"], "unknown sweep.launcher 'ray'; choose local or submitit"),
    (["sweep=stability", "sweep.pruner=median"], "multi-objective studies cannot prune"),
    (["sweep=lr", "sweep.space={trainer.lr: {type: loguniform}}"], "sweep space trainer.lr: type must be one of"),
])
def test_bad_sweep_values_fail_when_loaded(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(argv)


def test_model_section_is_its_dataclass_with_tower_arguments_apart():
    run = RunSettings.from_config(compose_config(["model=cnn_cbow"]))
    assert isinstance(run.model, ModelSettings) and run.model.text_tower == "cbow" and run.model.embed_dim == 64
    assert run.model.towers["image_blocks"] == [1, 1, 1] and "image_tower" not in run.model.towers
    assert run.model.lock_image is False and run.model.allow_download is False  # not in its config: absent
    old = ModelSettings.of({"image_patch_size": 8})  # a config saved without the dual encoder's keys
    assert (old.image_tower, old.text_tower, old.embed_dim, old.name) == ("vit", "transformer", 64, None)
    with pytest.raises(ConfigError, match=r"model config 'tiny': unknown model keys \['dropout'\]"):
        RunSettings.from_config(compose_config(["+model.dropout=0.1"]))


def test_evaluate_and_benchmark_sections_are_their_dataclasses():
    given = {"karpathy": ["annotations=a", "images=b"], "cxc": ["annotations=a", "images=b", "extra_positives=c"]}
    cfg = compose_config(["checkpoint=x.ckpt", "benchmark=[karpathy,cxc]", "benchmark.block=64",
                          *(f"benchmark.{name}.{kv}" for name, kvs in given.items() for kv in kvs)],
                         config_name="evaluate")
    settings = EvaluateSettings.of(cfg)
    assert settings.checkpoint == "x.ckpt" and settings.benchmark.block == 64 and settings.benchmark.lowercase == "auto"
    assert settings.eval.output is None and settings.eval.save_embeddings is False
    karpathy = benchmark_settings(KarpathySettings, cfg.benchmark.karpathy, "karpathy")
    assert (karpathy.max_captions, karpathy.split, karpathy.n_folds, karpathy.fold_size) == (5, "test", 5, 1000)
    assert "n_folds" not in cfg.benchmark.cxc and cfg.benchmark.cxc.coco_captions is None  # no 1K protocol there
    # a plain section without the keys reads as the readers always read it: every sentence, no folds
    plain = benchmark_settings(KarpathySettings, {"annotations": "a", "images": "b"}, "karpathy")
    assert (plain.max_captions, plain.split, plain.n_folds) == (None, "test", None)


def test_make_data_keys_are_its_dataclass_and_checked_when_built():
    cfg = compose_config(["out=x", "train_size=10", "val_size=10"], config_name="make_data")
    settings = MakeDataSettings(**cfg)
    assert (settings.test_size, settings.heldout_combos, settings.num_workers) == (5000, 8, None)
    assert settings.shard_kwargs()["shard_size"] == 1000 and "out" not in settings.shard_kwargs()
    with pytest.raises(ConfigError, match=r"heldout_combos must be an integer in \[0, 20\]"):
        MakeDataSettings(**{**cfg, "heldout_combos": 21})
