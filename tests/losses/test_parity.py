"""Built-in losses against plain references written from the formulas (float64, forward and backward).

The registry-parametrised tests cover every registered loss, each implementation it declares (an ``impl``
keyword: dense and tiled) and each log-std layout it takes; a loss without a reference here is skipped, naming
what is missing. References take ``y`` with M >= N rows (the positives, then extra texts: the loss contract).
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import probloss
from probloss.testing import log_std_shapes


def clip_reference(x, y, logit_scale):
    """CLIP's pseudocode: symmetric cross-entropy of t * normalised x @ normalised y^T (n, m); NegCLIP's
    text->image term for the n positive texts only."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = logit_scale.exp() * x @ y.T
    n = len(x)
    labels = torch.arange(n)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :n].T, labels)) / 2


def siglip_reference(x, y, logit_scale, logit_bias):
    """SigLIP's pseudocode: -sum(log_sigmoid(labels * logits)) / n, labels = 2 I - 1 (n, m): extras negative."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = x @ y.T * logit_scale.exp() + logit_bias
    labels = 2 * torch.eye(len(x), len(y), dtype=x.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(x)


def proposal_reference(I_f, I_ln_std, T_f, T_ln_std):
    """The proposal's own PyTorch pseudocode (docs/design.md, Sources), verbatim apart from formatting: (n, n, d) broadcast."""
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

    n = len(x)
    labels = torch.arange(n)
    # image->text over all m texts; text->image for the n positive texts only
    return (F.cross_entropy(logits(ly, False), labels) + F.cross_entropy(logits(lx, True)[:n], labels)) / 2


def sigmoid_var_reference(x, y, lx, ly, t, b, normalize=True):
    """The variance-aware sigmoid: -sum log_sigmoid(z * logits) / n with explicit (n, n, d) differences."""
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    d = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    var = lx.exp()[:, None] ** 2 + ly.exp()[None, :] ** 2
    logits = t * (-torch.log(var.sqrt()) - d / var) + b
    labels = 2 * torch.eye(len(x), len(y), dtype=x.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(x)


def per_dim_var(log_std, mu):
    """sigma^2 per dimension (mu's shape) from (B,) or (B, D) log-stds."""
    return torch.exp(2 * (log_std if log_std.dim() == 2 else log_std[:, None])).expand_as(mu)


def unit_kl_per_element(mu, log_std):
    """KL(N(mu, sigma^2) || N(0, 1)) per element from torch.distributions, averaged over samples and dimensions."""
    p = torch.distributions.Normal(mu, per_dim_var(log_std, mu).sqrt())
    return torch.distributions.kl_divergence(p, torch.distributions.Normal(0.0, 1.0)).mean()


def csd(mu_x, var_x, mu_y, var_y):
    """PCME++'s closed-form sampled distance with explicit (n, m, d) broadcasts: ||mu_i - mu_j||^2 +
    sum_d (sigma_i,d^2 + sigma_j,d^2)."""
    return ((mu_x[:, None, :] - mu_y[None, :, :]) ** 2).sum(-1) + (var_x[:, None, :] + var_y[None, :, :]).sum(-1)


def pcmepp_reference(x, y, lx, ly, a, b, alpha, beta, normalize=True):
    """PCME++ as its paper and released criterion (pcmepp/criterions/pcmepp.py) compute it: 2 x BCEWithLogits
    with labels eye(n, m), plus alpha x the pseudo-positive BCEs in both directions (labels recomputed where a
    pair's logit >= its row's positive logit; texts without a positive keep theirs), plus beta x the KL of each
    modality. The BCEs are summed over all n x m pairs and divided by n x n (BCEWithLogits' mean when m = n;
    extra texts add to the sum, the loss docstring)."""
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = -a * csd(x, per_dim_var(lx, x), y, per_dim_var(ly, y)) + b
    n, m = logits.shape
    matched = torch.eye(n, m, dtype=x.dtype)
    def bce(logits, labels):
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / (n * n)

    loss = 2 * bce(logits, matched)
    if alpha:
        with torch.no_grad():
            positive = logits.diagonal()  # (n,): image i's and text i's positive logit
            i2t = torch.where(logits >= positive[:, None], 1.0, matched)
            t2i = matched.T.clone()  # (m, n): rows are texts; extra texts (rows >= n) have no positive
            t2i[:n] = torch.where(logits.T[:n] >= positive[:, None], 1.0, matched.T[:n])
        loss = loss + alpha * (bce(logits, i2t) + bce(logits.T, t2i))
    if beta:
        loss = loss + beta * (unit_kl_per_element(x, lx) + unit_kl_per_element(y, ly))
    return loss


def inclusion_reference(mu1, lv1, mu2, lv2, eps=-10.0):
    """ProLIP's released inclusion test of Gaussian 1 in Gaussian 2, per dimension (lv = log sigma^2)."""
    inv1, inv2 = torch.exp(-lv1 + eps), torch.exp(-lv2 + eps)
    a = inv1 + 0.5 * inv2
    b = 2 * mu1 * inv1 + mu2 * inv2
    c = mu1 ** 2 * inv1 + 0.5 * mu2 ** 2 * inv2
    return -2 * lv1 - lv2 - 0.5 * torch.log(a) + b ** 2 / 4 / a - c


def prolip_reference(x, y, lx, ly, t, b, beta, alpha, normalize=True):
    """ProLIP: SigLIP's -sum log_sigmoid(z * logits) / n on t (mu_i . mu_j - sum_d (sigma_i,d^2 + sigma_j,d^2) / 2) + b,
    plus beta x KL per element of each modality, plus alpha x mean -log_sigmoid(1000 (I(img in txt) - I(txt in img)))
    over the n positive pairs."""
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    var_x, var_y = per_dim_var(lx, x), per_dim_var(ly, y)
    logits = t * (x @ y.T - 0.5 * (var_x[:, None, :] + var_y[None, :, :]).sum(-1)) + b
    labels = 2 * torch.eye(len(x), len(y), dtype=x.dtype) - 1
    loss = -F.logsigmoid(labels * logits).sum() / len(x)
    if beta:
        loss = loss + beta * (unit_kl_per_element(x, lx) + unit_kl_per_element(y, ly))
    if alpha:
        n = len(x)
        lv_x, lv_y = var_x.log(), var_y[:n].log()
        logit = inclusion_reference(x, lv_x, y[:n], lv_y) - inclusion_reference(y[:n], lv_y, x, lv_x)
        loss = loss + alpha * -F.logsigmoid(1000 * logit).mean()
    return loss


# Each built-in loss as built with its defaults, computed by its reference from the loss's own parameters.
REFERENCES = {
    "infonce": lambda loss, x, y, lx, ly: clip_reference(x, y, loss.logit_scale),
    "sigmoid": lambda loss, x, y, lx, ly: siglip_reference(x, y, loss.logit_scale, loss.logit_bias),
    "gaussian_var": lambda loss, x, y, lx, ly: gaussian_reference(x, lx, y, ly, loss.variant, loss.normalize),
    "sigmoid_var": lambda loss, x, y, lx, ly: sigmoid_var_reference(
        x, y, lx, ly, loss.logit_scale.exp(), loss.logit_bias, loss.normalize
    ),
    "pcmepp": lambda loss, x, y, lx, ly: pcmepp_reference(
        x, y, lx, ly, loss.negative_scale, loss.shift, loss.smoothness_alpha, loss.vib_beta, loss.normalize
    ),
    "prolip": lambda loss, x, y, lx, ly: prolip_reference(
        x, y, lx, ly, loss.logit_scale.exp(), loss.logit_bias, loss.vib_beta, loss.inclusion_alpha, loss.normalize
    ),
}


def impls(name):
    """The implementations a loss declares: dense and tiled if its constructor takes ``impl``, else its only one."""
    return ["dense", "tiled"] if "impl" in inspect.signature(probloss.LOSSES.get(name)).parameters else [None]


# (name, impl, log-std layout) for every registered loss.
CASES = [
    (name, impl, log_std)
    for name in probloss.list_losses()
    for impl in impls(name)
    for log_std in log_std_shapes(probloss.LOSSES.get(name))
]


def build(name, impl, block_size):
    """The loss in float64, its parameters moved off their init (generic values, every term matters)."""
    loss = probloss.build_loss(name, **({"impl": impl, "block_size": block_size} if impl else {})).double()
    with torch.no_grad():
        for param in loss.parameters():
            param.mul_(0.5)
    return loss


@pytest.fixture
def inputs(loss_inputs):
    """Independent pairs with per-sample log-stds (``diagonal=True``: per-dimension), all requiring grad."""

    def make(n=9, d=5, seed=0, diagonal=False):
        return loss_inputs(n, d, "diagonal" if diagonal else "sample", pairs="independent", seed=seed,
                           requires_grad=True)

    return make


def assert_same(value, reference, tensors, rtol=1e-10):
    torch.testing.assert_close(value, reference, rtol=rtol, atol=0)
    grads = torch.autograd.grad(value, tensors)
    ref_grads = torch.autograd.grad(reference, tensors)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("name,impl,log_std", CASES)
def test_matches_its_reference(name, impl, log_std, loss_inputs):
    if name not in REFERENCES:
        pytest.skip(f"no reference formula for {name} in REFERENCES")
    x, y, lx, ly = loss_inputs(9, 5, log_std, pairs="independent", requires_grad=True)
    loss = build(name, impl, block_size=4)  # 9 rows: three tiles, the last one partial
    params = [p for p in loss.parameters() if p.requires_grad]
    tensors = [t for t in (x, y, lx, ly) if t is not None] + params
    assert_same(loss(x, y, lx, ly), REFERENCES[name](loss, x, y, lx, ly), tensors)


@pytest.mark.parametrize("name,impl,log_std", CASES)
def test_matches_its_reference_with_extra_texts(name, impl, log_std, loss_inputs):
    """Hard negatives: 7 images, 7 positive texts then 14 extra texts (M = 21 > N)."""
    if name not in REFERENCES:
        pytest.skip(f"no reference formula for {name} in REFERENCES")
    x, y, lx, ly = loss_inputs(7, 5, log_std, pairs="independent", requires_grad=True, extra_texts=2)
    assert y.shape[0] == 21 and (ly is None or ly.shape[0] == 21)
    loss = build(name, impl, block_size=4)  # partial tiles in both directions
    params = [p for p in loss.parameters() if p.requires_grad]
    tensors = [t for t in (x, y, lx, ly) if t is not None] + params
    assert_same(loss(x, y, lx, ly), REFERENCES[name](loss, x, y, lx, ly), tensors)


@pytest.mark.parametrize("name", probloss.list_losses())
def test_extra_texts_are_negatives(name, loss_inputs):
    """Extra texts right next to their images (hard negatives) make the loss of a well-separated batch larger:
    every loss counts them as negatives, never as positives."""
    cls = probloss.LOSSES.get(name)
    log_std = "sample" if cls.needs_log_std else None
    x, y, lx, ly = loss_inputs(6, 8, log_std, pairs="separated", extra_texts=1)
    if log_std:  # around where the loss's towers start (ProLIP: sigma^2 ~ e^-10; at sigma ~ 1 no pair matches)
        lx, ly = lx + cls.init_log_std, ly + cls.init_log_std
    loss = probloss.build_loss(name).double()
    plain = loss(x, y[:6], lx, None if ly is None else ly[:6])
    hard_y = torch.cat([y[:6], x + 0.01 * y[6:]])
    assert loss(x, hard_y, lx, ly) > plain


@pytest.mark.parametrize("name,impl,log_std", CASES)
def test_gradcheck(name, impl, log_std, loss_inputs):
    inputs = [t for t in loss_inputs(4, 3, log_std, pairs="independent", requires_grad=True) if t is not None]
    loss = build(name, impl, block_size=3)  # 4 rows: two tiles
    params = [p for p in loss.parameters() if p.requires_grad]
    n = len(inputs)
    assert torch.autograd.gradcheck(lambda *t: loss(*t[:n]), (*inputs, *params))


@pytest.mark.parametrize("name,impl,log_std", CASES)
def test_gradcheck_with_extra_texts(name, impl, log_std, loss_inputs):
    inputs = [t for t in loss_inputs(3, 3, log_std, pairs="independent", requires_grad=True, extra_texts=1)
              if t is not None]
    loss = build(name, impl, block_size=2)
    params = [p for p in loss.parameters() if p.requires_grad]
    n = len(inputs)
    assert torch.autograd.gradcheck(lambda *t: loss(*t[:n]), (*inputs, *params))


@pytest.mark.parametrize("extra_texts", [0, 2])
@pytest.mark.parametrize("local_loss", [True, False])
def test_infonce_matches_clip(local_loss, extra_texts, loss_inputs):
    x, y, _, _ = loss_inputs(9, 5, pairs="independent", requires_grad=True, extra_texts=extra_texts)
    loss = probloss.build_loss("infonce", local_loss=local_loss).double()
    assert_same(loss(x, y), clip_reference(x, y, loss.logit_scale), [x, y, loss.logit_scale])


def test_gaussian_var_matches_the_proposal_pseudocode(inputs):
    x, y, lx, ly = inputs()
    loss = probloss.build_loss("gaussian_var").double()
    assert_same(loss(x, y, lx, ly), proposal_reference(x, lx, y, ly), [x, y, lx, ly])


@pytest.mark.parametrize("extra_texts", [0, 1])
@pytest.mark.parametrize("variant", ["proposal", "likelihood"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("diagonal", [False, True])
def test_gaussian_var_options_match_reference(variant, normalize, diagonal, extra_texts, loss_inputs):
    x, y, lx, ly = loss_inputs(9, 5, "diagonal" if diagonal else "sample", pairs="independent", requires_grad=True,
                               extra_texts=extra_texts)
    loss = probloss.build_loss("gaussian_var", variant=variant, normalize=normalize).double()
    assert_same(loss(x, y, lx, ly), gaussian_reference(x, lx, y, ly, variant, normalize), [x, y, lx, ly])


@pytest.mark.parametrize("extra_texts", [0, 2])
@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("normalize", [True, False])
def test_sigmoid_var_options_match_reference(impl, normalize, extra_texts, loss_inputs):
    x, y, lx, ly = loss_inputs(7, 4, "sample", pairs="independent", requires_grad=True, extra_texts=extra_texts)
    loss = probloss.build_loss("sigmoid_var", impl=impl, block_size=3, normalize=normalize, init_logit_bias=-1.0)
    loss = loss.double()
    reference = sigmoid_var_reference(x, y, lx, ly, loss.logit_scale.exp(), loss.logit_bias, normalize)
    assert_same(loss(x, y, lx, ly), reference, [x, y, lx, ly, loss.logit_scale, loss.logit_bias], rtol=1e-9)


def test_gaussian_var_diagonal_with_equal_dims_equals_per_sample(inputs):
    x, y, lx, ly = inputs()
    loss = probloss.build_loss("gaussian_var").double()
    expand = lambda t: t[:, None].expand(-1, x.shape[1])  # noqa: E731
    torch.testing.assert_close(loss(x, y, lx, ly), loss(x, y, expand(lx), expand(ly)), rtol=1e-12, atol=0)


def test_gaussian_var_is_stable_for_far_apart_embeddings(inputs):
    x, y, lx, ly = inputs()
    value = probloss.build_loss("gaussian_var").double()(100 * x, 100 * y, lx - 3, ly - 3)
    assert torch.isfinite(value)


def test_infonce_value_at_init_on_random_pairs_is_near_log_batch(inputs):
    x, y, _, _ = inputs(n=64, d=256)
    value = probloss.build_loss("infonce", init_logit_scale=0.0).double()(x, y)
    assert abs(value.item() - math.log(64)) < 0.1


@pytest.mark.parametrize("diagonal", [False, True])
def test_gaussian_var_kl_regulariser_matches_the_closed_form(diagonal, inputs):
    x, y, lx, ly = inputs(diagonal=diagonal)
    plain = probloss.build_loss("gaussian_var").double()
    regularised = probloss.build_loss("gaussian_var", kl_weight=0.3).double()

    def kl(mu, log_std):  # KL(N(mu, diag sigma^2) || N(0, I)) from torch.distributions, per sample
        sigma = log_std.exp() if log_std.dim() == 2 else log_std.exp()[:, None].expand_as(mu)
        p = torch.distributions.Normal(mu, sigma)
        return torch.distributions.kl_divergence(p, torch.distributions.Normal(0.0, 1.0)).sum(-1)

    expected = plain(x, y, lx, ly) + 0.3 * (kl(x, lx).mean() + kl(y, ly).mean()) / 2
    assert_same(regularised(x, y, lx, ly), expected, [x, y, lx, ly])
