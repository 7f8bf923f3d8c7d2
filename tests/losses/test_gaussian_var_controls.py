"""gaussian_var's control options against hand references (float64, forward and backward):

- ``freeze_log_std``: log-std 0 (sigma = 1) whatever the towers pass, a Euclidean InfoNCE on squared distances;
- ``inverse_temperature``: a fixed multiplier of every logit; at its default 1.0 the loss is the plain proposal;
- ``shared_log_std``: one learned log-std for every sample, a Euclidean InfoNCE with a learned temperature.

The distributed invariant of both options runs in tests/test_dist.py (GaussianVarLoss.distributed_variants).
"""

import pytest
import torch
import torch.nn.functional as F

import probloss

IMPLS = ["dense", "tiled"]
LAYOUTS = ["sample", "diagonal"]


def reference(x, y, lx, ly, t=1.0, variant="proposal", kl_weight=0.0):
    """t * (-c(ln sigma_j) - sum_k (x_ik - y_jk)^2 / sigma_jk^2 * half) with explicit (n, m, d) differences;
    symmetric CE, text->image for the n positive texts only; plus the KL of N(x, sigma^2) from N(0, I)."""
    n, d = x.shape
    diff2 = (x[:, None, :] - y[None, :, :]) ** 2  # (n, m, d)
    half = 0.5 if variant == "likelihood" else 1.0

    def logits(d2, log_std):  # d2 (queries, candidates, d), log_std (candidates,) or (candidates, d)
        log_std = log_std if log_std.dim() == 2 else log_std[:, None].expand(-1, d)
        penalty = log_std.sum(-1) if variant == "likelihood" else log_std.mean(-1)
        return t * (-penalty[None, :] - half * (d2 / torch.exp(2 * log_std)[None]).sum(-1))

    labels = torch.arange(n)
    i2t = F.cross_entropy(logits(diff2, ly), labels)
    t2i = F.cross_entropy(logits(diff2.transpose(0, 1)[:n], lx), labels)  # the n positive texts only
    loss = (i2t + t2i) / 2
    if kl_weight:
        kl = [(0.5 * (torch.exp(2 * s if s.dim() == 2 else 2 * s[:, None]) + e**2 - 1
                      - (2 * s if s.dim() == 2 else 2 * s[:, None]))).sum(-1).mean() for e, s in ((x, lx), (y, ly))]
        loss = loss + kl_weight * (kl[0] + kl[1]) / 2
    return loss


def build(impl, **options):
    return probloss.build_loss("gaussian_var", impl=impl, block_size=4, **options).double()


def grads(value, tensors):
    return torch.autograd.grad(value, tensors, allow_unused=True)


def assert_same(value, expected, tensors):
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    for got, want in zip(grads(value, tensors), grads(expected, tensors)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("extra_texts", [0, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant,kl_weight", [("proposal", 0.0), ("likelihood", 0.0), ("proposal", 0.3)])
def test_frozen_log_std_is_the_loss_with_unit_sigma(variant, kl_weight, impl, layout, extra_texts, loss_inputs):
    x, y, lx, ly = loss_inputs(9, 5, layout, pairs="independent", requires_grad=True, extra_texts=extra_texts)
    loss = build(impl, variant=variant, kl_weight=kl_weight, freeze_log_std=True)
    expected = reference(x, y, torch.zeros_like(lx), torch.zeros_like(ly), variant=variant, kl_weight=kl_weight)
    assert_same(loss(x, y, lx, ly), expected, [x, y])
    # sigma = 1: the proposal's logits are -d_ij, a Euclidean InfoNCE (spelled out once, without the helper)
    if variant == "proposal" and not kl_weight:
        logits = -torch.cdist(x, y) ** 2
        labels = torch.arange(9)
        plain = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :9].T, labels)) / 2
        torch.testing.assert_close(loss(x, y, lx, ly), plain, rtol=1e-10, atol=0)


@pytest.mark.parametrize("extra_texts", [0, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_log_std_ignores_the_given_log_stds(impl, layout, extra_texts, loss_inputs):
    x, y, lx, ly = loss_inputs(9, 5, layout, pairs="independent", requires_grad=True, extra_texts=extra_texts)
    other_lx, other_ly = (torch.randn_like(t).mul(2).requires_grad_() for t in (lx, ly))
    loss = build(impl, freeze_log_std=True, kl_weight=0.1)
    value, other = loss(x, y, lx, ly), loss(x, y, other_lx, other_ly)
    assert torch.equal(value, other)
    got, other_got = grads(value, [x, y, lx, ly]), grads(other, [x, y, other_lx, other_ly])
    for a, b in zip(got[:2], other_got[:2]):
        assert torch.equal(a, b)
    # The log-std inputs stay in the graph (DDP sees the heads used) with an exactly zero gradient.
    for g, t in zip(got[2:] + other_got[2:], (lx, ly, other_lx, other_ly)):
        assert g is not None and torch.equal(g, torch.zeros_like(t))
    with torch.no_grad():
        scores, other_scores = loss.score(x, y, lx, ly), loss.score(x, y, other_lx, other_ly)
    assert torch.equal(scores, other_scores)
    torch.testing.assert_close(scores, -torch.cdist(x, y).detach() ** 2, rtol=1e-10, atol=1e-12)
    stats = loss.diagnostics(x.detach(), y.detach(), lx.detach(), ly.detach())
    assert stats["sigma_image_mean"] == stats["sigma_text_mean"] == 1.0 and stats["log_std_term"] == 0.0


@pytest.mark.parametrize("extra_texts", [0, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_shared_log_std_is_one_learned_sigma(impl, layout, extra_texts, loss_inputs):
    x, y, lx, ly = loss_inputs(9, 5, layout, pairs="independent", requires_grad=True, extra_texts=extra_texts)
    loss = build(impl, shared_log_std=True)
    with torch.no_grad():
        loss.global_log_std.fill_(0.4)
    shared = loss.global_log_std
    expected = reference(x, y, 0.4 + 0 * lx, 0.4 + 0 * ly)
    value = loss(x, y, lx, ly)
    assert_same(value, expected, [x, y])
    # Its gradient is the reference's with respect to a log-std shared by every sample; the heads get zeros.
    s = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    want = grads(reference(x, y, s + 0 * lx, s + 0 * ly), [s])[0]
    got = grads(loss(x, y, lx, ly), [shared, lx, ly])
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-14)
    assert torch.equal(got[1], torch.zeros_like(lx)) and torch.equal(got[2], torch.zeros_like(ly))
    # -ln s is the same for every candidate: the loss is a Euclidean InfoNCE at inverse temperature 1 / s^2.
    if layout == "sample" and not extra_texts:
        logits = -torch.cdist(x, y) ** 2 * torch.exp(torch.tensor(-0.8, dtype=torch.float64))
        labels = torch.arange(9)
        plain = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :9].T, labels)) / 2
        torch.testing.assert_close(value, plain, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="one of them"):
        build(impl, shared_log_std=True, freeze_log_std=True)


@pytest.mark.parametrize("extra_texts", [0, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["proposal", "likelihood"])
def test_inverse_temperature_scales_every_logit(variant, impl, layout, extra_texts, loss_inputs):
    x, y, lx, ly = loss_inputs(9, 5, layout, pairs="independent", requires_grad=True, extra_texts=extra_texts)
    loss = build(impl, variant=variant, inverse_temperature=0.3)
    assert_same(loss(x, y, lx, ly), reference(x, y, lx, ly, t=0.3, variant=variant), [x, y, lx, ly])
    frozen = build(impl, variant=variant, inverse_temperature=0.3, freeze_log_std=True)
    zeros = torch.zeros_like(lx), torch.zeros_like(ly)
    assert_same(frozen(x, y, lx, ly), reference(x, y, *zeros, t=0.3, variant=variant), [x, y])
    with torch.no_grad():
        unscaled = build(impl, variant=variant)
        torch.testing.assert_close(loss.score(x, y, lx, ly), 0.3 * unscaled.score(x, y, lx, ly), rtol=1e-12, atol=0)
    stats = loss.diagnostics(x.detach(), y.detach(), lx.detach(), ly.detach())
    assert stats["inverse_temperature"] == pytest.approx(0.3, rel=1e-12)


@pytest.mark.parametrize("extra_texts", [0, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_defaults_are_the_plain_proposal_bit_for_bit(impl, layout, extra_texts, loss_inputs):
    """inverse_temperature=1.0 and freeze_log_std=False run exactly the operations of the plain loss."""
    x, y, lx, ly = loss_inputs(9, 5, layout, pairs="independent", requires_grad=True, extra_texts=extra_texts)
    default = build(impl)
    assert default.inverse_temperature == 1.0 and default.freeze_log_std is False
    explicit = build(impl, inverse_temperature=1.0, freeze_log_std=False)
    value, other = default(x, y, lx, ly), explicit(x, y, lx, ly)
    assert torch.equal(value, other)
    for a, b in zip(grads(value, [x, y, lx, ly]), grads(other, [x, y, lx, ly])):
        assert torch.equal(a, b)
    assert_same(default(x, y, lx, ly), reference(x, y, lx, ly), [x, y, lx, ly])
    stats = default.diagnostics(x.detach(), y.detach(), lx.detach(), ly.detach())
    assert not {"logit_scale", "inverse_temperature", "temperature"} & set(stats)  # nothing new is logged


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_inverse_temperature_must_be_a_positive_number(bad):
    with pytest.raises(ValueError, match="inverse_temperature"):
        probloss.build_loss("gaussian_var", inverse_temperature=bad)
