"""The run configuration: compose API, unknown keys/choices/loss keywords fail before any work, listing what exists."""

import pytest

import probloss
import probloss.studies.settings  # noqa: F401  (registers the sweep/recipe defaults the studies' configs compose)
from probloss.errors import ConfigError
from probloss.training.config import compose_config, loss_kwargs, save_config


def test_defaults_compose_and_resolve():
    cfg = compose_config([])
    assert cfg.loss.name in probloss.list_losses()
    assert cfg.model.name == "tiny" and cfg.data.name == "shapes"
    for key in ("max_steps", "batch_size", "lr", "eval_every", "ckpt_every", "accum_steps", "on_nonfinite"):
        assert key in cfg.trainer
    for key in ("seed", "out_dir", "experiment", "run_name", "resume"):
        assert key in cfg


@pytest.mark.parametrize("name", probloss.list_losses())
def test_every_registered_loss_is_a_choice_and_its_kwargs_build(name):
    cfg = compose_config([f"loss={name}"])
    assert cfg.loss.name == name
    probloss.build_loss(name, **loss_kwargs(cfg))


def test_overrides_reach_the_config():
    cfg = compose_config(["loss=sigmoid", "loss.init_logit_bias=-5", "trainer.max_steps=7", "seed=3"])
    assert cfg.loss.init_logit_bias == -5 and cfg.trainer.max_steps == 7 and cfg.seed == 3


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["trainer.max_step=5"], ["trainer.max_step", "max_steps", "batch_size"]),  # names the key, lists the others
        (["foo=1"], ["'foo'", "trainer", "seed"]),
        (["+trainer.new_key=1"], ["trainer.new_key", "max_steps"]),
        (["loss=nope"], ["loss choice 'nope'", "infonce", "sigmoid", "gaussian_var"]),
        (["model=nope"], ["model choice 'nope'", "tiny"]),
        (["data=nope"], ["data choice 'nope'", "shapes", "webdataset"]),
        (["loss=sigmoid", "loss.temperature=2"], ["temperature", "init_logit_scale", "init_logit_bias"]),
        (["model.embed_dimm=8"], ["model.embed_dimm", "embed_dim"]),
        (["seed=abc"], ["seed", "int"]),
        (["data=webdataset"], ["data.train_shards", "data.val_shards"]),  # required (???) values
    ],
)
def test_bad_config_errors_name_the_key_and_list_what_exists(overrides, expected):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    for text in expected:
        assert text in str(err.value), (text, str(err.value))


def test_loss_kwarg_missing_from_the_yaml_but_accepted_by_the_loss(tmp_path):
    # sigmoid.yaml lists every keyword; a keyword left out of a yaml would still be accepted by signature:
    cfg = compose_config(["loss=infonce", "loss.local_loss=false"])
    assert cfg.loss.local_loss is False


def test_plugin_loss_without_a_yaml_is_a_choice():
    @probloss.register_loss("_cfg_test_loss")
    class _Loss(probloss.ContrastiveLoss):
        def __init__(self, alpha: float = 0.5):
            super().__init__()
            self.alpha = alpha

    try:
        cfg = compose_config(["loss=_cfg_test_loss", "loss.alpha=0.25"])
        assert cfg.loss.name == "_cfg_test_loss" and cfg.loss.alpha == 0.25
        with pytest.raises(ConfigError, match="alpha"):
            compose_config(["loss=_cfg_test_loss", "loss.beta=1"])
    finally:
        probloss.LOSSES.remove("_cfg_test_loss")


def test_save_config_round_trip(tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_config(["trainer.max_steps=9"])
    path = save_config(cfg, tmp_path)
    assert OmegaConf.load(path).trainer.max_steps == 9


# --- one source for each default, one command-line system -----------------------------------------------------


def test_settings_fields_are_exactly_the_config_keys():
    """probloss/training/settings.py and probloss/data/settings.py hold the defaults (the schema), configs/ chooses
    and overrides: the composed sections have exactly the dataclasses' keys, and a data file sets only keys there
    are (issue 32: before, the YAML files held the defaults and this test kept the dataclasses in step)."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from probloss.schema import NODE
    from probloss.training.config import config_dir
    from probloss.training.settings import DataSettings, EvalSettings, FabricSettings, RunSettings, TrainerSettings

    cfg = compose_config([])
    for section, cls in (("trainer", TrainerSettings), ("fabric", FabricSettings), ("eval", EvalSettings)):
        assert set(cfg[section].keys()) == {f.name for f in fields(cls)}, section
    data_fields = {f.name for f in fields(DataSettings)}
    common = {f.name for f in fields(DataSettings) if f.metadata.get(NODE, True)}
    for path in (config_dir() / "data").glob("*.yaml"):
        keys = set(OmegaConf.load(path).keys()) - {"defaults"}
        assert keys <= data_fields, path.name
    for name in ("shapes", "webdataset"):
        overrides = [f"data={name}"] + (["data.train_shards=a", "data.val_shards=b"] if name == "webdataset" else [])
        composed = compose_config(overrides)
        assert common <= set(composed.data.keys()) <= data_fields
        run = RunSettings.from_config(composed)
        assert run.data.name == name and run.trainer.max_steps == TrainerSettings().max_steps


SCRIPTS = {"train": [], "sweep": ["sweep=lr"], "run_recipe": ["recipe=bias_init"],
           "make_data": ["out=x", "train_size=1", "val_size=1"], "evaluate": ["checkpoint=x.ckpt"]}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_script_has_the_same_help_and_unknown_key_error(script, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{script}.py"
    shown = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "key=value overrides" in shown.stdout and "defaults (" in shown.stdout
    bad = subprocess.run([sys.executable, str(path), *SCRIPTS[script], "seedd=1"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.startswith("config error: ") and "Traceback" not in bad.stderr
    if script != "evaluate":  # evaluate checks its other keys against the checkpoint's config (test_train.py)
        assert "unknown config key 'seedd'. Did you mean 'seed'" in bad.stderr


def test_dict_overrides_of_a_recipe_replace_the_dict():
    from omegaconf import OmegaConf

    cfg = compose_config(["recipe=proposal", "recipe.arms={a: ['loss=infonce'], b: ['loss=sigmoid']}"],
                         config_name="recipe")
    assert OmegaConf.to_container(cfg.recipe.arms) == {"a": ["loss=infonce"], "b": ["loss=sigmoid"]}


@pytest.mark.slow
def test_unknown_hard_negatives_exits_2_listing_the_choices(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    bad = subprocess.run([sys.executable, str(script), "data.hard_negatives=foo", f"data.cache_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.startswith("config error: ") and "Traceback" not in bad.stderr
    assert "'foo'" in bad.stderr and "none, relation, binding, control, all" in bad.stderr
    assert not list(tmp_path.iterdir())  # failed before any work (no data generated)
