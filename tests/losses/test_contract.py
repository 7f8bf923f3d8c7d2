"""The loss contract of docs/design.md, checked for EVERY registered loss (a new plugin is tested when registered)."""

import inspect
import math

import pytest
import torch

import probloss
from probloss.testing import log_std_shapes

ALL_LOSSES = probloss.list_losses()


def log_std_of(loss):
    """The per-sample log-std layout for a loss that takes log-stds, else None."""
    return "sample" if loss.needs_log_std else None


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_finite_scalar_and_gradients_reach_everything(name, loss_inputs):
    loss = probloss.build_loss(name).double()
    inputs = loss_inputs(6, 8, log_std_of(loss), pairs="independent", requires_grad=True)
    value = loss(*inputs)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    for t in inputs:
        if t is not None:
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    for param_name, param in loss.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_permuting_the_batch_leaves_the_loss_unchanged(name, loss_inputs):
    loss = probloss.build_loss(name).double()
    inputs = loss_inputs(7, 8, log_std_of(loss))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    permuted = [t[perm] if t is not None else None for t in inputs]
    torch.testing.assert_close(loss(*inputs), loss(*permuted), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_score_shape_and_positive_ranked_first(name, loss_inputs):
    loss = probloss.build_loss(name).double()
    x, y, lx, ly = loss_inputs(6, 8, log_std_of(loss), pairs="separated")
    if lx is not None:  # equal log-stds: a variance-aware score may rightly rank a certain negative above an
        # uncertain positive (PCME++'s distance adds sigma^2 summed over dimensions), which is not this check
        lx, ly = torch.full_like(lx, loss.init_log_std), torch.full_like(ly, loss.init_log_std)
    scores = loss.score(x, y[:5], lx, None if ly is None else ly[:5])
    assert scores.shape == (6, 5)
    scores = loss.score(x, y, lx, ly)
    assert torch.equal(scores.argmax(1), torch.arange(6))
    assert torch.equal(scores.argmax(0), torch.arange(6))
    assert loss(x, y, lx, ly) < loss(x, y.flip(0), lx, None if ly is None else ly.flip(0))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_diagnostics_are_floats(name, loss_inputs):
    loss = probloss.build_loss(name)
    stats = loss.diagnostics(*loss_inputs(6, 8, log_std_of(loss), dtype=torch.float32))
    assert {"logit_pos_mean", "logit_neg_mean"} <= set(stats)
    assert all(isinstance(v, float) for v in stats.values())
    if loss.needs_log_std:
        assert {"image_log_std_mean", "image_log_std_std", "text_log_std_mean", "text_log_std_std"} <= set(stats)
    if loss.logit_scale_in_use() is not None:  # the logits' multiplier, named for what it is
        scale = loss.logit_scale_in_use().exp().item()
        assert stats["inverse_temperature"] == pytest.approx(scale, rel=1e-6)
        assert stats["temperature"] == pytest.approx(1 / scale, rel=1e-6)
    else:
        assert not {"logit_scale", "inverse_temperature", "temperature"} & set(stats)


@pytest.mark.parametrize(
    "name,log_std", [(name, shape) for name in ALL_LOSSES for shape in log_std_shapes(probloss.LOSSES.get(name))]
)
def test_score_and_diagnostics_change_no_parameter_or_buffer(name, log_std, loss_inputs):
    loss = probloss.build_loss(name).double()
    with torch.no_grad():  # far from the init, past any cap a loss might enforce by editing its parameters
        for param in loss.parameters():
            param.add_(10.0)
    before = {key: value.clone() for key, value in loss.state_dict().items()}
    inputs = loss_inputs(6, 8, log_std)
    loss.score(*inputs)
    loss.diagnostics(*inputs)
    after = loss.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{name}: score() or diagnostics() changed {key}"


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_bad_shapes_name_the_tensor(name, loss_inputs):
    loss = probloss.build_loss(name)
    x, y, lx, ly = loss_inputs(6, 8, log_std_of(loss), dtype=torch.float32)
    with pytest.raises(ValueError, match="different batch sizes"):
        loss(x, y[:-1], lx, ly)
    with pytest.raises(ValueError, match="embedding sizes"):
        loss(x, y[:, :-1], lx, ly)
    with pytest.raises(ValueError, match=r"image_emb must be a \(B, D\) tensor"):
        loss(x[0], y, lx, ly)
    if loss.needs_log_std:
        with pytest.raises(ValueError, match="needs text_log_std"):
            loss(x, y, lx, None)
        with pytest.raises(ValueError, match=r"image_log_std must have shape"):
            loss(x, y, lx[:-1], ly)


def test_infonce_caps_logit_scale_like_clip_without_touching_the_parameter(loss_inputs):
    loss = probloss.build_loss("infonce").double()
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    capped = probloss.build_loss("infonce", init_logit_scale=math.log(100)).double()
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    x, y, _, _ = loss_inputs(4, 3)
    value = loss(x, y)
    torch.testing.assert_close(value, capped(x, y), rtol=1e-12, atol=0)  # the logits use t = 100, not e^10
    torch.testing.assert_close(loss.score(x, y), capped.score(x, y), rtol=1e-12, atol=0)
    value.backward()
    assert loss.logit_scale.item() == 10.0  # not clamped in place
    assert loss.logit_scale.grad.item() == 0.0  # above the cap the scale gets no gradient (module docstring)
    uncapped = probloss.build_loss("infonce", max_logit_scale=None, init_logit_scale=10.0).double()
    assert uncapped.score(x, y).abs().max() > 1000  # None disables the cap


def test_sigmoid_init_matches_the_paper():
    loss = probloss.build_loss("sigmoid")
    assert loss.logit_scale.exp().item() == pytest.approx(10.0)
    assert loss.logit_bias.item() == -10.0


def test_unknown_options_are_errors():
    with pytest.raises(ValueError, match="^sigmoid: dist_impl='allreduce' is not one of ring, shift, gather$"):
        probloss.build_loss("sigmoid", dist_impl="allreduce")
    with pytest.raises(ValueError, match="^gaussian_var: variant='laplace' is not one of proposal, likelihood$"):
        probloss.build_loss("gaussian_var", variant="laplace")
    with pytest.raises(TypeError):
        probloss.build_loss("infonce", temperature=0.1)


def _choice_options(name):
    """The constructor keywords of a loss whose default is a string: each is a choice among named options."""
    params = inspect.signature(probloss.LOSSES.get(name)).parameters.values()
    return [p.name for p in params if isinstance(p.default, str)]


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_every_choice_option_gives_the_uniform_error(name):
    options = _choice_options(name)
    if not options:
        pytest.skip(f"{name} has no string-valued (choice) option")
    for option in options:
        with pytest.raises(ValueError, match=rf"^{name}: {option}='no-such-choice' is not one of \w+(, \w+)+$"):
            probloss.build_loss(name, **{option: "no-such-choice"})


# --- extra texts (hard negatives): text_emb (M, D) with M >= N ---------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_extra_texts_finite_gradients_and_only_their_set_matters(name, loss_inputs):
    loss = probloss.build_loss(name).double()
    x, y, lx, ly = loss_inputs(5, 8, log_std_of(loss), pairs="independent", requires_grad=True, extra_texts=2)
    value = loss(x, y, lx, ly)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(y.grad).all() and y.grad[5:].abs().sum() > 0  # the extras get gradient too
    # Extras are a set: permuting them (with their log-stds) leaves the loss unchanged.
    perm = torch.cat([torch.arange(5), 5 + torch.randperm(10, generator=torch.Generator().manual_seed(2))])
    permuted = loss(x.detach(), y.detach()[perm], lx, None if ly is None else ly.detach()[perm])
    torch.testing.assert_close(permuted, value.detach(), rtol=1e-12, atol=1e-12)
    stats = loss.diagnostics(x.detach(), y.detach(), lx, ly)  # extras count as negatives there
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_extra_texts_need_matching_log_stds(name, loss_inputs):
    loss = probloss.build_loss(name)
    if not loss.needs_log_std:
        pytest.skip(f"{name} takes no log-stds")
    x, y, lx, ly = loss_inputs(5, 8, "sample", dtype=torch.float32, extra_texts=1)
    with pytest.raises(ValueError, match=r"text_log_std must have shape \(10,\)"):
        loss(x, y, lx, ly[:5])


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_scores_raw_embeddings_is_a_read_only_bool(name):
    loss = probloss.build_loss(name)
    assert isinstance(loss.scores_raw_embeddings, bool)
    with pytest.raises(AttributeError):
        loss.scores_raw_embeddings = True


def test_scores_raw_embeddings_follows_normalize():
    assert not probloss.ContrastiveLoss().scores_raw_embeddings  # the default
    for name in ("infonce", "sigmoid"):
        assert not probloss.build_loss(name).scores_raw_embeddings
    for name in ("gaussian_var", "sigmoid_var"):
        assert probloss.build_loss(name, normalize=False).scores_raw_embeddings
        assert not probloss.build_loss(name, normalize=True).scores_raw_embeddings
