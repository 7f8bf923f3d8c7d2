"""The loss registry: listing, building, errors, and plugin discovery (module and entry point)."""

import sys
import textwrap

import pytest
import torch

import probloss
from probloss.registry import Registry, RegistryError


def test_builtin_losses_are_listed_sorted():
    names = probloss.list_losses()
    assert {"infonce", "sigmoid", "gaussian_var"} <= set(names)
    assert names == sorted(names)
    assert probloss.list_losses("sig*") == ["sigmoid", "sigmoid_var"]
    assert probloss.list_losses("*_var") == ["gaussian_var", "sigmoid_var"]
    assert probloss.list_losses("nothing*") == []


def test_build_passes_kwargs():
    loss = probloss.build_loss("sigmoid", init_logit_bias=-3.0)
    assert loss.logit_bias.item() == -3.0
    assert loss.registered_name == "sigmoid"
    assert isinstance(loss, probloss.ContrastiveLoss)


def test_unknown_name_lists_choices_and_closest_match():
    with pytest.raises(KeyError) as err:
        probloss.build_loss("sigmiod")
    message = str(err.value)
    assert "unknown loss 'sigmiod'" in message
    assert "Did you mean 'sigmoid'" in message
    for name in ("gaussian_var", "infonce", "sigmoid"):
        assert name in message


def test_duplicate_name_is_an_error():
    with pytest.raises(RegistryError, match="duplicate loss name 'infonce'"):
        @probloss.register_loss("infonce")
        class Again(probloss.ContrastiveLoss):
            pass


def test_registry_default_name_and_filter():
    registry = Registry("thing")

    @registry.register()
    class FooBar:
        pass

    registry.add("baz", dict)
    assert registry.list() == ["baz", "foobar"]
    assert registry.list("f*") == ["foobar"]
    assert registry.build("baz", a=1) == {"a": 1}
    assert "foobar" in registry


PLUGIN_SOURCE = textwrap.dedent(
    '''
    import torch
    import probloss

    class {cls}(probloss.ContrastiveLoss):
        """Mean squared distance of the pairs (a test plugin)."""
        def compute_loss(self, x, y, lx, ly):
            return (x - y).pow(2).sum(-1).mean()
        def compute_scores(self, x, y, lx, ly):
            return -torch.cdist(x, y)
    '''
)


def test_plugin_registered_from_a_temporary_module(tmp_path, monkeypatch):
    (tmp_path / "my_tmp_loss.py").write_text(
        PLUGIN_SOURCE.format(cls="Mse") + "\nprobloss.register_loss('tmp_mse')(Mse)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        __import__("my_tmp_loss")
        loss = probloss.build_loss("tmp_mse")
        assert loss(torch.ones(2, 3), torch.zeros(2, 3)).item() == pytest.approx(3.0)
        assert "tmp_mse" in probloss.list_losses()
    finally:  # the registration itself is undone by tests/conftest.py
        sys.modules.pop("my_tmp_loss", None)


def test_plugin_from_an_entry_point_is_loaded_lazily(tmp_path, monkeypatch):
    (tmp_path / "ep_loss_pkg.py").write_text(PLUGIN_SOURCE.format(cls="EpLoss"))
    dist_info = tmp_path / "ep_loss_pkg-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-loss-pkg\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[probloss.losses]\nep_mse = ep_loss_pkg:EpLoss\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        probloss.LOSSES.rediscover()
        assert "ep_mse" in probloss.list_losses()
        assert "ep_loss_pkg" not in sys.modules  # listed, not imported yet
        loss = probloss.build_loss("ep_mse")
        assert type(loss).__name__ == "EpLoss"
        assert loss.score(torch.zeros(2, 3), torch.zeros(4, 3)).shape == (2, 4)
    finally:
        sys.modules.pop("ep_loss_pkg", None)


def test_entry_point_clashing_with_a_builtin_is_an_error(tmp_path, monkeypatch):
    dist_info = tmp_path / "clash-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: clash\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[probloss.losses]\ninfonce = clash_pkg:Other\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(RegistryError, match="duplicate loss name 'infonce'"):
            probloss.LOSSES.rediscover()
    finally:
        monkeypatch.undo()
        probloss.LOSSES.rediscover()
    assert "infonce" in probloss.list_losses()


def builtin_losses() -> list[str]:
    """The names registered by the modules of losses/ (imported as probloss.losses)."""
    return [n for n in probloss.list_losses() if probloss.LOSSES.get(n).__module__.startswith("probloss.losses.")]


def test_every_test_module_was_collected_with_exactly_the_builtin_losses(losses_at_collection):
    """A test module that registers a loss at import would add it to every registry-parametrised test collected
    after it (as test_dist.py once did): register inside the test instead (tests/conftest.py restores the
    registry after every test)."""
    builtins = builtin_losses()
    assert {"gaussian_var", "infonce", "sigmoid", "sigmoid_var"} <= set(builtins)
    assert any(module.endswith("test_registry.py") for module in losses_at_collection)  # the hook saw this file
    differing = {module: sorted(set(names) ^ set(builtins)) for module, names in losses_at_collection.items()
                 if names != builtins}
    assert not differing, f"the registered losses were not exactly the built-ins when collecting: {differing}"


def test_the_registry_is_restored_after_each_test_part_one():
    probloss.register_loss("_leaky_test_loss")(type("Leaky", (probloss.ContrastiveLoss,), {}))
    probloss.LOSSES.remove("infonce")
    assert "_leaky_test_loss" in probloss.list_losses() and "infonce" not in probloss.list_losses()


def test_the_registry_is_restored_after_each_test_part_two():
    """Runs after part one (pytest keeps file order): its registration is gone and its removal undone."""
    assert "_leaky_test_loss" not in probloss.list_losses()
    assert probloss.list_losses() == builtin_losses()
    assert probloss.build_loss("infonce").registered_name == "infonce"


def test_snapshot_and_restore():
    registry = Registry("thing")
    registry.add("a", dict)
    state = registry.snapshot()
    registry.add("b", list)
    registry.remove("a")
    registry.restore(state)
    assert registry.list() == ["a"]
    registry.add("b", list)  # "b" is free again
    assert registry.list() == ["a", "b"]
