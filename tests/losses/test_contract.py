"""The loss contract of DESIGN.md, checked for EVERY registered loss (a new plugin is tested when registered)."""

import pytest
import torch

import probloss

ALL_LOSSES = probloss.list_losses()


def make_batch(loss, batch=6, dim=8, seed=0, dtype=torch.float64, separated=False):
    gen = torch.Generator().manual_seed(seed)
    if separated:  # well-separated pairs: image i and text i share a large distinct direction
        x = 3 * torch.eye(batch, dim, dtype=dtype) + 0.05 * torch.randn(batch, dim, generator=gen, dtype=dtype)
        y = 3 * torch.eye(batch, dim, dtype=dtype) + 0.05 * torch.randn(batch, dim, generator=gen, dtype=dtype)
    else:
        x = torch.randn(batch, dim, generator=gen, dtype=dtype)
        y = torch.randn(batch, dim, generator=gen, dtype=dtype)
    if not loss.needs_log_std:
        return x, y, None, None
    return x, y, 0.2 * torch.randn(batch, generator=gen, dtype=dtype), 0.2 * torch.randn(batch, generator=gen, dtype=dtype)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_finite_scalar_and_gradients_reach_everything(name):
    loss = probloss.build_loss(name).double()
    inputs = [t.requires_grad_(True) if t is not None else None for t in make_batch(loss)]
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
def test_permuting_the_batch_leaves_the_loss_unchanged(name):
    loss = probloss.build_loss(name).double()
    inputs = make_batch(loss, batch=7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    permuted = [t[perm] if t is not None else None for t in inputs]
    torch.testing.assert_close(loss(*inputs), loss(*permuted), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_score_shape_and_positive_ranked_first(name):
    loss = probloss.build_loss(name).double()
    x, y, lx, ly = make_batch(loss, batch=6, separated=True)
    scores = loss.score(x, y[:5], lx, None if ly is None else ly[:5])
    assert scores.shape == (6, 5)
    scores = loss.score(x, y, lx, ly)
    assert torch.equal(scores.argmax(1), torch.arange(6))
    assert torch.equal(scores.argmax(0), torch.arange(6))
    assert loss(x, y, lx, ly) < loss(x, y.flip(0), lx, None if ly is None else ly.flip(0))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_diagnostics_are_floats(name):
    loss = probloss.build_loss(name)
    stats = loss.diagnostics(*make_batch(loss, dtype=torch.float32))
    assert {"logit_pos_mean", "logit_neg_mean"} <= set(stats)
    assert all(isinstance(v, float) for v in stats.values())
    if loss.needs_log_std:
        assert {"image_log_std_mean", "image_log_std_std", "text_log_std_mean", "text_log_std_std"} <= set(stats)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_bad_shapes_name_the_tensor(name):
    loss = probloss.build_loss(name)
    x, y, lx, ly = make_batch(loss, dtype=torch.float32)
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


def test_infonce_clamps_logit_scale_like_clip():
    loss = probloss.build_loss("infonce")
    assert loss.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    loss(torch.randn(4, 3), torch.randn(4, 3))
    assert loss.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item())


def test_sigmoid_init_matches_the_paper():
    loss = probloss.build_loss("sigmoid")
    assert loss.logit_scale.exp().item() == pytest.approx(10.0)
    assert loss.logit_bias.item() == -10.0


def test_unknown_options_are_errors():
    with pytest.raises(ValueError, match="dist_impl"):
        probloss.build_loss("sigmoid", dist_impl="allreduce")
    with pytest.raises(ValueError, match="variant"):
        probloss.build_loss("gaussian_var", variant="laplace")
    with pytest.raises(TypeError):
        probloss.build_loss("infonce", temperature=0.1)
