"""The run configuration: compose API, unknown keys/choices/loss keywords fail before any work, listing what exists."""

import pytest

import probloss
from probloss.config import ConfigError, compose_config, loss_kwargs, save_config


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
