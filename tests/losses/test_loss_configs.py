"""The ``loss`` config group is generated from the registered losses' constructors: the constructor's defaults are
the one source (probloss/training/config.py loss_defaults), so a run's saved config.yaml records every option and
a default changed in the constructor is the default of ``loss=<name>`` at once."""

import inspect
import shutil
import warnings

import pytest

import probloss
from probloss.errors import ConfigError
from probloss.training.config import compose_config, config_dir, describe, loss_kwargs


def constructor_defaults(name):
    """``{keyword: default}`` of the registered loss's constructor (``inspect.Parameter.empty``: required)."""
    params = inspect.signature(probloss.LOSSES.get(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@pytest.mark.parametrize("name", probloss.list_losses())
def test_the_loss_group_is_the_constructor_defaults(name):
    cfg = compose_config([f"loss={name}"])
    assert cfg.loss.name == name
    given, defaults = loss_kwargs(cfg), constructor_defaults(name)
    assert list(given) == list(defaults)  # every keyword, in the constructor's order
    for key, default in defaults.items():
        # type too: 1 == 1.0 == True in Python; a float default must not come back as an int
        assert type(given[key]) is type(default) and given[key] == default, (key, given[key], default)


@pytest.mark.parametrize("name", probloss.list_losses())
def test_the_help_lists_every_loss_with_its_defaults(name):
    text = describe("train")
    line = next(line for line in text.splitlines() if line.startswith(f"  {name}: "))
    for key, default in constructor_defaults(name).items():
        assert f"{key}={default}" in line


def test_a_keyword_override_reaches_the_loss_and_an_unknown_one_lists_the_keywords():
    cfg = compose_config(["loss=sigmoid", "loss.init_logit_bias=-5", "loss.neg_mask=random"])
    assert cfg.loss.init_logit_bias == -5 and cfg.loss.neg_mask == "random"
    assert probloss.build_loss("sigmoid", **loss_kwargs(cfg)).neg_mask == "random"
    with pytest.raises(ConfigError) as err:
        compose_config(["loss=sigmoid", "loss.init_logit_biass=1"])
    message = str(err.value)
    assert "unknown keyword for loss 'sigmoid': 'init_logit_biass'. Did you mean 'init_logit_bias'" in message
    assert "loss.<keyword>=value" in message


def test_a_required_keyword_and_a_loss_yaml_of_ones_own(tmp_path, monkeypatch):
    @probloss.register_loss("_cfg_required_loss")
    class _Loss(probloss.ContrastiveLoss):
        def __init__(self, margin: float, scale: float = 2.0):
            super().__init__()
            self.margin, self.scale = margin, scale

    try:
        with pytest.raises(ConfigError, match=r"missing \(\?\?\?\): loss.margin"):
            compose_config(["loss=_cfg_required_loss"])
        cfg = compose_config(["loss=_cfg_required_loss", "loss.margin=0.5"])
        assert loss_kwargs(cfg) == {"margin": 0.5, "scale": 2.0}
        # a config folder of one's own may hold loss/<name>.yaml: its values win over the generated defaults
        folder = tmp_path / "configs"
        shutil.copytree(config_dir(), folder)
        (folder / "loss" / "_cfg_required_loss.yaml").write_text("name: _cfg_required_loss\nmargin: 0.25\n")
        with warnings.catch_warnings():  # Hydra's note that the file is matched with the generated node
            warnings.simplefilter("ignore", UserWarning)
            cfg = compose_config(["loss=_cfg_required_loss"], directory=folder)
        assert loss_kwargs(cfg)["margin"] == 0.25
    finally:
        probloss.LOSSES.remove("_cfg_required_loss")
