"""PCME++ and ProLIP beyond the registry-wide parity tests: every optional term at a weight that matters, the
closed-form sampled distance against sampling, pseudo-positive ties, layouts, and where the towers start."""

import pytest
import torch
import torch.nn.functional as F

import probloss
from probloss.training.builders import make_tokenizer, make_trainee
from probloss.training.config import compose_config
from probloss.training.settings import RunSettings
from test_parity import assert_same, inclusion_reference, pcmepp_reference, per_dim_var, prolip_reference

F64 = torch.float64


@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("log_std", ["sample", "diagonal"])
@pytest.mark.parametrize("extra_texts", [0, 2])
def test_pcmepp_every_term_matches_the_reference(impl, log_std, extra_texts, loss_inputs):
    x, y, lx, ly = loss_inputs(7, 4, log_std, pairs="close", requires_grad=True, extra_texts=extra_texts)
    loss = probloss.build_loss("pcmepp", impl=impl, block_size=3, smoothness_alpha=0.7, vib_beta=0.3,
                               init_negative_scale=1.5, init_shift=-0.5).double()
    params = [loss.negative_scale, loss.shift]
    # "close" pairs: many negatives score above their row's positive, so the pseudo-positive labels are mixed
    reference = pcmepp_reference(x, y, lx, ly, *params, 0.7, 0.3)
    assert_same(loss(x, y, lx, ly), reference, [x, y, lx, ly, *params], rtol=1e-9)


@pytest.mark.parametrize("impl", ["dense", "tiled"])
@pytest.mark.parametrize("log_std", ["sample", "diagonal"])
@pytest.mark.parametrize("normalize", [True, False])
def test_prolip_every_term_matches_the_reference(impl, log_std, normalize, loss_inputs):
    x, y, lx, ly = loss_inputs(7, 4, log_std, pairs="independent", requires_grad=True, extra_texts=1)
    loss = probloss.build_loss("prolip", impl=impl, block_size=3, vib_beta=0.3, inclusion_alpha=0.2,
                               normalize=normalize, init_logit_bias=-1.0).double()
    params = [loss.logit_scale, loss.logit_bias]
    reference = prolip_reference(x, y, lx, ly, loss.logit_scale.exp(), loss.logit_bias, 0.3, 0.2, normalize)
    assert_same(loss(x, y, lx, ly), reference, [x, y, lx, ly, *params], rtol=1e-9)


def test_some_pseudo_positives_are_present_in_the_parity_inputs(loss_inputs):
    """The pseudo-positive term is exercised: on the "close" inputs above, the term changes the loss."""
    x, y, lx, ly = loss_inputs(7, 4, "sample", pairs="close")
    with_pp = probloss.build_loss("pcmepp", smoothness_alpha=0.7, vib_beta=0.0).double()(x, y, lx, ly)
    scores = probloss.build_loss("pcmepp").double().score(x, y, lx, ly)
    assert (scores > scores.diagonal()[:, None]).any()
    # without pseudo-positives every pair is a negative in the extra term: 2 softplus(l) summed differs
    plain = probloss.build_loss("pcmepp", smoothness_alpha=0.0, vib_beta=0.0).double()(x, y, lx, ly)
    assert not torch.isclose(with_pp, plain * 1.7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_a_duplicated_caption_is_a_pseudo_positive_in_every_kernel(dtype, impl, loss_inputs):
    """Text 1 is an exact copy of text 0 (as duplicated captions are in the shapes data): it scores exactly as
    high as image 0's positive, so it is a pseudo-positive -- also when its logit comes from another tile and
    rounds differently from the positive's (block 1: every pair its own tile)."""
    x, y, lx, ly = loss_inputs(6, 8, "sample", pairs="close")
    y[1], ly[1] = y[0], ly[0]
    loss = probloss.build_loss("pcmepp", impl=impl, block_size=1, smoothness_alpha=0.5, vib_beta=0.0)
    want = pcmepp_reference(x, y, lx, ly, loss.negative_scale.double(), loss.shift.double(), 0.5, 0.0)
    got = loss.to(dtype)(*(t.to(dtype) for t in (x, y, lx, ly)))
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("name", ["pcmepp", "prolip"])
def test_isotropic_log_std_equals_the_same_value_in_every_dimension(name, loss_inputs):
    x, y, lx, ly = loss_inputs(6, 5, "sample", pairs="independent", extra_texts=1)
    loss = probloss.build_loss(name, vib_beta=0.2).double()
    expand = lambda t: t[:, None].expand(-1, x.shape[1])  # noqa: E731
    torch.testing.assert_close(loss(x, y, lx, ly), loss(x, y, expand(lx), expand(ly)), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss.score(x, y, lx, ly), loss.score(x, y, expand(lx), expand(ly)), rtol=1e-12, atol=0)


def test_csd_is_the_mean_squared_distance_of_samples():
    """A known answer: CSD(i, j) = E ||z_i - z_j||^2 for independent z_i ~ N(mu_i, sigma_i^2 I), z_j likewise."""
    gen = torch.Generator().manual_seed(0)
    mu = F.normalize(torch.randn(3, 16, generator=gen, dtype=F64), dim=-1)
    log_std = torch.tensor([-1.0, -0.5, 0.2], dtype=F64)
    loss = probloss.build_loss("pcmepp").double()
    csd = (loss.shift - loss.score(mu, mu, log_std, log_std)) / loss.negative_scale
    samples = mu[None] + log_std.exp()[None, :, None] * torch.randn(200_000, 3, 16, generator=gen, dtype=F64)
    shuffled = samples[torch.randperm(len(samples), generator=gen)]  # independent draws for the pair's second
    sampled = ((samples[:, :, None, :] - shuffled[:, None, :, :]) ** 2).sum(-1).mean(0)
    torch.testing.assert_close(csd.detach(), sampled, rtol=0.01, atol=0)


def test_prolip_logit_is_minus_half_t_csd_plus_a_constant_for_unit_means(loss_inputs):
    x, y, lx, ly = loss_inputs(5, 6, "diagonal", pairs="independent")
    pcmepp, prolip = probloss.build_loss("pcmepp").double(), probloss.build_loss("prolip").double()
    csd = (pcmepp.shift - pcmepp.score(x, y, lx, ly)) / pcmepp.negative_scale
    t, b = prolip.logit_scale.exp(), prolip.logit_bias
    torch.testing.assert_close(prolip.score(x, y, lx, ly), t * (1 - csd / 2) + b, rtol=1e-12, atol=1e-12)


def test_inclusion_loss_prefers_the_text_wider_than_its_image(loss_inputs):
    """ProLIP's inclusion term says the caption is the more general Gaussian of a pair: with the same means, it
    costs less when the texts' sigma is larger than the images' than the other way round."""
    x, y, lx, ly = loss_inputs(6, 5, "sample", pairs="close")
    loss = probloss.build_loss("prolip", vib_beta=0.0, inclusion_alpha=1.0).double()
    narrow, wide = torch.full_like(lx, -3.0), torch.full_like(lx, -1.0)
    assert loss(x, y, narrow, wide) < loss(x, y, wide, narrow)


@pytest.mark.parametrize("log_std", ["sample", "diagonal"])
def test_prolip_partial_view_term_matches_the_reference_over_the_masked_rows(log_std, loss_inputs):
    """ProLIP's second inclusion term: each caption inside its partial view, mean over the rows that have one."""
    _, y, _, ly = loss_inputs(7, 5, log_std, pairs="close", requires_grad=True)
    _, p, _, lp = loss_inputs(7, 5, log_std, pairs="independent", seed=1, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False, True, True])
    loss = probloss.build_loss("prolip", partial_alpha=0.3, block_size=2).double()
    assert loss.uses_partial_views and not probloss.build_loss("prolip").uses_partial_views
    got = loss.partial_view_loss(y, ly, p, lp, mask)
    yn, pn = F.normalize(y[mask], dim=-1), F.normalize(p[mask], dim=-1)
    lv_y, lv_p = per_dim_var(ly[mask], yn).log(), per_dim_var(lp[mask], pn).log()
    logit = inclusion_reference(yn, lv_y, pn, lv_p) - inclusion_reference(pn, lv_p, yn, lv_y)
    assert_same(got, 0.3 * -F.logsigmoid(1000 * logit).mean(), [y, ly, p, lp])
    # the caption costs less inside a wider partial view than inside a narrower one
    narrow, wide = torch.full_like(ly, -3.0), torch.full_like(ly, -1.0)
    assert loss.partial_view_loss(y, narrow, y, wide, mask) < loss.partial_view_loss(y, wide, y, narrow, mask)
    assert loss.partial_view_loss(y, ly, p, lp, torch.zeros(7, dtype=torch.bool)) == 0
    with pytest.raises(NotImplementedError, match="sigmoid takes no partial views"):
        probloss.build_loss("sigmoid").partial_view_loss(y, None, p, None, mask)


@pytest.mark.parametrize("loss_name, override, expected", [
    ("prolip", None, -5.0),         # ProLIP's log sigma^2 = -10
    ("pcmepp", None, -5.0),         # not the released sigma ~ 1 (the loss docstring)
    ("gaussian_var", None, 0.0),
    ("prolip", "model.init_log_std=0.5", 0.5),  # the model config wins when set
])
def test_towers_start_where_the_loss_says_unless_the_model_config_says(loss_name, override, expected):
    cfg = compose_config([f"loss={loss_name}"] + ([override] if override else []))
    run = RunSettings.from_config(cfg)
    trainee = make_trainee(run, make_tokenizer(run))
    for head in (trainee.model.image_log_std, trainee.model.text_log_std):
        assert head.net[-1].bias.item() == expected


def test_pcmepp_diagnostics_log_its_scale_and_shift(loss_inputs):
    stats = probloss.build_loss("pcmepp").diagnostics(*loss_inputs(4, 5, "sample", dtype=torch.float32))
    assert stats["negative_scale"] == 5.0 and stats["shift"] == 5.0
