"""Built-in losses against plain references written from the formulas (float64, forward and backward)."""

import math

import pytest
import torch
import torch.nn.functional as F

import probloss


def clip_reference(x, y, logit_scale):
    """CLIP's pseudocode: symmetric cross-entropy of t * normalised x @ normalised y^T."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = logit_scale.exp() * x @ y.T
    labels = torch.arange(len(x))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_reference(x, y, logit_scale, logit_bias):
    """SigLIP's pseudocode: -sum(log_sigmoid(labels * logits)) / n, labels = 2 I - 1."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = x @ y.T * logit_scale.exp() + logit_bias
    labels = 2 * torch.eye(len(x), dtype=x.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(x)


def proposal_reference(I_f, I_ln_std, T_f, T_ln_std):
    """The proposal's own PyTorch pseudocode (seeds/003), verbatim apart from formatting: (n, n, d) broadcast."""
    n = I_f.size(0)
    ce_loss = torch.nn.CrossEntropyLoss()
    I_f = I_f.unsqueeze(1)
    T_f = T_f.unsqueeze(0)
    distances = torch.sum((I_f - T_f) ** 2, dim=2)
    I_var = I_ln_std.exp() ** 2
    T_var = T_ln_std.exp() ** 2
    T_ln_std = T_ln_std.unsqueeze(0)
    T_var = T_var.unsqueeze(0)
    I_ln_std = I_ln_std.unsqueeze(0)
    I_var = I_var.unsqueeze(0)
    label = torch.arange(n, device=I_f.device)
    loss_t = ce_loss(-T_ln_std - distances / T_var, label)
    loss_i = ce_loss(-I_ln_std - distances.t() / I_var, label)
    return (loss_t + loss_i) / 2


def gaussian_reference(x, lx, y, ly, variant="proposal", normalize=False):
    """Explicit (n, n, d) differences; per-sample (B,) or per-dimension (B, D) log-std."""
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    diff2 = (x[:, None, :] - y[None, :, :]) ** 2  # (n_img, n_txt, d)
    half = 0.5 if variant == "likelihood" else 1.0

    def logits(candidate_log_std, transpose):
        d2 = diff2.transpose(0, 1) if transpose else diff2  # (queries, candidates, d)
        if candidate_log_std.dim() == 1:
            dist = d2.sum(-1) / (candidate_log_std.exp() ** 2)[None, :] * half
            penalty = candidate_log_std * (x.shape[1] if variant == "likelihood" else 1)
        else:
            dist = (d2 / (candidate_log_std.exp() ** 2)[None, :, :]).sum(-1) * half
            penalty = candidate_log_std.sum(-1) if variant == "likelihood" else candidate_log_std.mean(-1)
        return -penalty[None, :] - dist

    labels = torch.arange(len(x))
    return (F.cross_entropy(logits(ly, False), labels) + F.cross_entropy(logits(lx, True), labels)) / 2


def inputs(n=9, d=5, seed=0, diagonal=False):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen, dtype=torch.float64)
    shape = (n, d) if diagonal else (n,)
    lx, ly = 0.3 * torch.randn(*shape, generator=gen, dtype=torch.float64), 0.3 * torch.randn(*shape, generator=gen, dtype=torch.float64)
    return [t.requires_grad_(True) for t in (x, y, lx, ly)]


def assert_same(value, reference, tensors, rtol=1e-10):
    torch.testing.assert_close(value, reference, rtol=rtol, atol=0)
    grads = torch.autograd.grad(value, tensors)
    ref_grads = torch.autograd.grad(reference, tensors)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("local_loss", [True, False])
def test_infonce_matches_clip(local_loss):
    x, y, _, _ = inputs()
    loss = probloss.build_loss("infonce", local_loss=local_loss).double()
    assert_same(loss(x, y), clip_reference(x, y, loss.logit_scale), [x, y, loss.logit_scale])


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_sigmoid_matches_siglip(impl):
    x, y, _, _ = inputs()
    loss = probloss.build_loss("sigmoid", impl=impl, block_size=4, init_logit_bias=-2.0).double()
    reference = siglip_reference(x, y, loss.logit_scale, loss.logit_bias)
    assert_same(loss(x, y), reference, [x, y, loss.logit_scale, loss.logit_bias])


def test_gaussian_var_matches_the_proposal_pseudocode():
    x, y, lx, ly = inputs()
    loss = probloss.build_loss("gaussian_var").double()
    assert_same(loss(x, y, lx, ly), proposal_reference(x, lx, y, ly), [x, y, lx, ly])


@pytest.mark.parametrize("variant", ["proposal", "likelihood"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("diagonal", [False, True])
def test_gaussian_var_options_match_reference(variant, normalize, diagonal):
    x, y, lx, ly = inputs(diagonal=diagonal)
    loss = probloss.build_loss("gaussian_var", variant=variant, normalize=normalize).double()
    assert_same(loss(x, y, lx, ly), gaussian_reference(x, lx, y, ly, variant, normalize), [x, y, lx, ly])


def test_gaussian_var_diagonal_with_equal_dims_equals_per_sample():
    x, y, lx, ly = inputs()
    loss = probloss.build_loss("gaussian_var").double()
    expand = lambda t: t[:, None].expand(-1, x.shape[1])  # noqa: E731
    torch.testing.assert_close(loss(x, y, lx, ly), loss(x, y, expand(lx), expand(ly)), rtol=1e-12, atol=0)


def test_gaussian_var_is_stable_for_far_apart_embeddings():
    x, y, lx, ly = inputs()
    value = probloss.build_loss("gaussian_var").double()(100 * x, 100 * y, lx - 3, ly - 3)
    assert torch.isfinite(value)


@pytest.mark.parametrize("name", ["infonce", "sigmoid", "gaussian_var"])
def test_gradcheck(name):
    x, y, lx, ly = inputs(n=4, d=3)
    loss = probloss.build_loss(name, **({"impl": "tiled", "block_size": 3} if name == "sigmoid" else {})).double()
    params = [p for p in loss.parameters() if p.requires_grad]
    if loss.needs_log_std:
        assert torch.autograd.gradcheck(lambda *t: loss(*t), (x, y, lx, ly))
    else:
        assert torch.autograd.gradcheck(lambda a, b, *p: loss(a, b), (x, y, *params))


def test_infonce_value_at_init_on_random_pairs_is_near_log_batch():
    x, y, _, _ = inputs(n=64, d=256)
    value = probloss.build_loss("infonce", init_logit_scale=0.0).double()(x, y)
    assert abs(value.item() - math.log(64)) < 0.1


@pytest.mark.parametrize("diagonal", [False, True])
def test_gaussian_var_kl_regulariser_matches_the_closed_form(diagonal):
    x, y, lx, ly = inputs(diagonal=diagonal)
    plain = probloss.build_loss("gaussian_var").double()
    regularised = probloss.build_loss("gaussian_var", kl_weight=0.3).double()

    def kl(mu, log_std):  # KL(N(mu, diag sigma^2) || N(0, I)) from torch.distributions, per sample
        sigma = log_std.exp() if log_std.dim() == 2 else log_std.exp()[:, None].expand_as(mu)
        p = torch.distributions.Normal(mu, sigma)
        return torch.distributions.kl_divergence(p, torch.distributions.Normal(0.0, 1.0)).sum(-1)

    expected = plain(x, y, lx, ly) + 0.3 * (kl(x, lx).mean() + kl(y, ly).mean()) / 2
    assert_same(regularised(x, y, lx, ly), expected, [x, y, lx, ly])
