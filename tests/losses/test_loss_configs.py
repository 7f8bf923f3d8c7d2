"""configs/loss/<name>.yaml against its loss's constructor: the constructor's defaults are the one source.

A loss yaml lists every keyword of the constructor with exactly its default (floats spelled with enough digits to
read back the same double), so a run's saved config.yaml records every option, and a default changed in one
place only fails here.
"""

import inspect
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import probloss

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "loss"
NAMES = sorted({path.stem for path in CONFIGS.glob("*.yaml")} | set(probloss.list_losses()))
LOADERS = {
    "yaml.safe_load": lambda path: yaml.safe_load(path.read_text()),
    "OmegaConf.load": lambda path: OmegaConf.to_container(OmegaConf.load(path)),  # what Hydra reads
}


def constructor_defaults(name):
    """``{keyword: default}`` of the registered loss's constructor (``inspect.Parameter.empty``: required)."""
    params = inspect.signature(probloss.LOSSES.get(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name", NAMES)
def test_loss_yaml_lists_exactly_the_constructor_defaults(name, loader):
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        pytest.skip(f"{name} has no {path.name}: its config is its constructor's defaults (probloss.training.config)")
    assert name in probloss.list_losses(), f"{path.name} configures {name!r}, which is not a registered loss"
    section = LOADERS[loader](path)
    assert section.pop("name") == name
    defaults = constructor_defaults(name)
    unknown = sorted(set(section) - set(defaults))
    assert not unknown, f"{path.name}: {unknown} are not keywords of {name}'s constructor {sorted(defaults)}"
    missing = sorted(set(defaults) - set(section))
    assert not missing, f"{path.name} leaves out {missing}: list them with the constructor's defaults"
    for key, value in section.items():
        default = defaults[key]
        # type too: 1 == 1.0 == True in Python, but a yaml 1 for a float default is a different spelling
        assert type(value) is type(default) and value == default, (
            f"{path.name}: {key}: {value!r} differs from {name}'s constructor default {default!r}; "
            "change both or neither (write the default's repr in the yaml)"
        )
