"""The variance-aware sigmoid loss against its formula, dense vs tiled, and its gradients."""

import pytest
import torch
import torch.nn.functional as F

import probloss
from probloss.losses.sigmoid_var import pair_logits, var_softplus_pair_sum


def reference(x, y, lx, ly, t, b, normalize=True):
    """-sum log_sigmoid(z * logits) / n with explicit (n, n, d) differences."""
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    var = lx.exp()[:, None] ** 2 + ly.exp()[None, :] ** 2
    logits = t * (-torch.log(var.sqrt()) - d / var) + b
    labels = 2 * torch.eye(len(x), dtype=x.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(x)


def inputs(n=7, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen, dtype=torch.float64),
               0.3 * torch.randn(n, generator=gen, dtype=torch.float64), 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)]
    return [t.requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_the_formula_forward_and_backward(impl, normalize):
    x, y, lx, ly = inputs()
    loss = probloss.build_loss("sigmoid_var", impl=impl, block_size=3, normalize=normalize, init_logit_bias=-1.0).double()
    value = loss(x, y, lx, ly)
    want = reference(x, y, lx, ly, loss.logit_scale.exp(), loss.logit_bias, normalize)
    torch.testing.assert_close(value, want, rtol=1e-10, atol=0)
    tensors = [x, y, lx, ly, loss.logit_scale, loss.logit_bias]
    for got, expected in zip(torch.autograd.grad(value, tensors), torch.autograd.grad(want, tensors)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-13)


def test_tiled_kernel_gradcheck_with_rectangular_blocks():
    x, y, lx, ly = inputs(n=5, d=3)
    t = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: var_softplus_pair_sum(*a, block=2), (x, y[:3], lx, ly[:3], t, b))


def test_larger_sigma_flattens_the_pair_score():
    x, y, lx, ly = inputs()
    loss = probloss.build_loss("sigmoid_var").double()
    sharp = loss.score(x, y, torch.full_like(lx, -1.0), torch.full_like(ly, -1.0))
    flat = loss.score(x, y, torch.full_like(lx, 1.0), torch.full_like(ly, 1.0))
    assert flat.std() < sharp.std()


def test_default_bias_starts_at_siglips_logits_for_unit_sigma():
    """With sigma = 1 and t = 10, the default b makes every first logit SigLIP's 10 * cos - 10."""
    loss = probloss.build_loss("sigmoid_var").double()
    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(5, 8, generator=gen, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(7, 8, generator=gen, dtype=torch.float64), dim=-1)
    logits = pair_logits(x, y, torch.zeros(5, dtype=torch.float64), torch.zeros(7, dtype=torch.float64),
                         loss.logit_scale.exp(), loss.logit_bias)
    torch.testing.assert_close(logits, 10.0 * x @ y.T - 10.0, rtol=0, atol=1e-6)  # bias stored in float32
