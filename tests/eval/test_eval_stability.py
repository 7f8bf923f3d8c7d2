"""StabilityTracker and the uninformative reference: planted spikes and jumps, NaNs, divergence and collapse
against the reference, gradient norms, relative clipping, checkpoint round-trip; the reference against its closed
forms and against what no pairing information can beat."""

import io
import itertools
import math

import pytest
import torch

import probloss
from probloss.eval import StabilityTracker, params_finite
from probloss.eval.stability import binomial_sf, loss_jump, single_process, uninformative_loss, zeroshot_p_above_chance

LN128 = math.log(128)

KEYS = {"stability/loss_spikes", "stability/grad_norm_ratio", "stability/nonfinite_steps", "stability/diverged"}


def test_planted_spike_and_nan():
    t = StabilityTracker(warmup_steps=5)
    spikes = []
    for step in range(1, 51):
        loss = 1.0
        if step == 3:
            loss = 10.0  # in warmup: not a spike
        if step == 30:
            loss = 2.5  # > 2x the moving average (about 1)
        if step == 40:
            loss = float("nan")
        spikes.append(t.update(step, torch.tensor(loss), grad_norm=5.0 if step == 20 else 1.0))
    s = t.summary()
    assert KEYS <= set(s)
    assert s["stability/loss_spikes"] == 1 and spikes.index(True) == 29
    assert s["stability/nonfinite_steps"] == 1
    assert s["stability/diverged"] is False and s["stability/diverged_step"] == -1
    assert s["stability/grad_norm_ratio"] == pytest.approx(5.0)


def test_nonfinite_grad_counts_and_consecutive_nans_diverge():
    t = StabilityTracker(nonfinite_patience=3)
    t.update(1, 1.0, float("inf"))
    assert t.summary()["stability/nonfinite_steps"] == 1 and not t.diverged
    for step in (2, 3, 4):
        t.update(step, float("nan"), None)
    s = t.summary()
    assert s["stability/nonfinite_steps"] == 4 and s["stability/diverged"] and s["stability/diverged_step"] == 3


def test_sustained_loss_above_the_reference_diverges():
    t = StabilityTracker(reference=LN128, warmup_steps=2, diverge_patience=5)  # threshold 1.1 ln 128 = 5.337
    for step in range(1, 3):
        t.update(step, 50.0, 1.0)  # warmup: never counts
    for step in range(3, 13):
        t.update(step, 5.3, 1.0)  # above the reference, inside the 10% margin
    assert not t.diverged
    for step in range(13, 17):
        t.update(step, 5.4, 1.0)
    t.update(17, 5.0, 1.0)  # breaks the series
    assert not t.diverged
    for step in range(18, 23):
        t.update(step, 5.4, 1.0)
    assert t.diverged and t.diverged_step == 22 and "reference" in t.diverged_reason
    t.update(23, 1.0, 1.0)
    assert t.summary()["stability/diverged"]  # sticky


def test_a_loss_of_16_falling_to_5_is_not_diverged_but_collapsed_at_the_reference():
    """The proposal's first loss is ~16 and a collapsed run sits at ln B: neither is judged against step 1."""
    t = StabilityTracker(reference=LN128, warmup_steps=10, diverge_patience=20)
    for step in range(1, 301):
        t.update(step, 5.0 + 11.0 * math.exp(-step / 5), 1.0)
    assert not t.diverged
    verdict = t.judge_collapse(300, val_loss=4.86, val_reference=LN128)
    assert verdict["collapsed"] and verdict["collapsed_loss"] and not verdict["collapsed_zeroshot"]
    s = t.summary()
    assert s["stability/collapsed"] and s["stability/collapsed_step"] == 300
    assert s["stability/reference_loss"] == pytest.approx(LN128)


def test_a_slow_start_above_the_reference_is_not_diverged_but_a_rise_above_the_start_is():
    """A low learning rate: the loss falls from 16 but stays above 1.1 ln 128 for the whole run (it never
    learned: that is for the collapse rule); a loss that climbs above where it started diverges."""
    slow = StabilityTracker(reference=LN128, warmup_steps=10, diverge_patience=20)
    for step in range(1, 301):
        slow.update(step, 6.0 + 10.0 * math.exp(-step / 100), 1.0)  # 16 -> 6.5, never below 5.337
    assert not slow.diverged and not slow.summary()["stability/diverged"]
    rising = StabilityTracker(reference=LN128, warmup_steps=10, diverge_patience=20)
    for step in range(1, 61):
        rising.update(step, 16.0 + step, 1.0)  # above its first loss from step 2 on
    assert rising.diverged and rising.diverged_step == 30  # the 20th post-warmup step above both
    resumed = StabilityTracker(reference=LN128, warmup_steps=10, diverge_patience=20)
    resumed.load_state_dict(slow.state_dict())
    assert resumed.first_loss == slow.first_loss and resumed.below_ref_seen is False


def test_without_a_reference_only_nonfinite_steps_diverge():
    t = StabilityTracker(warmup_steps=0, diverge_patience=2)
    for step in range(1, 50):
        t.update(step, 1e6, 1.0)
    assert not t.diverged and math.isnan(t.summary()["stability/reference_loss"])


def test_collapse_rule_and_its_step():
    t = StabilityTracker()
    healthy = t.judge_collapse(100, val_loss=2.0, val_reference=LN128, zeroshot_top1=0.3, n_labelled=200, classes=40)
    assert not healthy["collapsed"] and healthy["zeroshot_p_above_chance"] < 1e-20
    assert t.summary()["stability/collapsed_step"] == -1
    # val loss fine, zero-shot at chance (5 of 200 against 1/40): collapsed by zero-shot alone
    v = t.judge_collapse(200, val_loss=2.0, val_reference=LN128, zeroshot_top1=0.025, n_labelled=200, classes=40)
    assert v["collapsed"] and v["collapsed_zeroshot"] and not v["collapsed_loss"]
    assert v["zeroshot_p_above_chance"] == pytest.approx(binomial_sf(5, 200, 1 / 40))
    t.judge_collapse(300, val_loss=4.5, val_reference=LN128)  # 4.5 > 0.9 ln 128 = 4.367: not below by the margin
    assert t.summary()["stability/collapsed"] and t.summary()["stability/collapsed_step"] == 200
    t.judge_collapse(400, val_loss=4.3, val_reference=LN128, zeroshot_top1=0.1, n_labelled=200, classes=40)
    s = t.summary()
    assert not s["stability/collapsed"] and s["stability/collapsed_step"] == -1  # recovered by the end
    assert t.judge_collapse(500, float("nan"), LN128)["collapsed_loss"]  # a non-finite val loss is collapsed


def test_binomial_tail_known_answers():
    assert binomial_sf(8, 10, 0.5) == pytest.approx(56 / 1024, rel=1e-12)
    assert binomial_sf(0, 10, 0.3) == 1.0 and binomial_sf(11, 10, 0.3) == 0.0
    assert binomial_sf(1, 3, 0.1) == pytest.approx(1 - 0.9**3, rel=1e-12)
    # 13 of 200 at chance 1/40 (expected 5): p ~ 0.0015 (Poisson tail 0.0022: the binomial is a little thinner)
    assert zeroshot_p_above_chance(13 / 200, 200, 40) == pytest.approx(binomial_sf(13, 200, 1 / 40))
    assert 1e-3 < zeroshot_p_above_chance(13 / 200, 200, 40) < 3e-3


def test_loss_jump_known_value_and_affine_invariance():
    prev = [1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0, 1.1, 0.9, 1.0]  # median 1, MAD 0.1
    assert loss_jump(2.0, prev) == pytest.approx(1.0 / (1.4826 * 0.1))
    losses = prev + [2.0] + [1.0] * 5

    def run(a, c):
        t = StabilityTracker(warmup_steps=0)
        for step, x in enumerate(losses, 1):
            t.update(step, a * x + c, 1.0)
        return t.summary()

    base = run(1.0, 0.0)
    assert base["stability/max_loss_jump"] == pytest.approx(6.7449, rel=1e-4)
    assert base["stability/max_loss_jump_step"] == 11
    for a, c in ((3.0, -10.0), (0.01, 0.0), (1.0, -5.0)):  # scaled, shifted, negative losses: the same measure
        assert run(a, c)["stability/max_loss_jump"] == pytest.approx(base["stability/max_loss_jump"], rel=1e-6)


def test_loss_jump_varies_with_the_spike_and_ignores_warmup():
    def jump(height, warmup=0):
        t = StabilityTracker(warmup_steps=warmup)
        gen = torch.Generator().manual_seed(0)
        noise = (0.01 * torch.randn(100, generator=gen, dtype=torch.float64)).tolist()
        for step in range(1, 101):
            t.update(step, 3.0 + noise[step - 1] + (height if step == 70 else 0.0), 1.0)
        return t.summary()["stability/max_loss_jump"]

    quiet, small_, big = jump(0.0), jump(0.05), jump(0.5)
    assert 0 < quiet < 5 < small_ < big  # continuous: grows with the spike; noise alone stays small
    assert jump(0.5, warmup=80) == pytest.approx(quiet if quiet > 0 else 0.0, abs=5)  # spike inside warmup
    assert jump(0.5, warmup=80) < 5


def test_gradient_norms_at_init_and_median():
    t = StabilityTracker(warmup_steps=2)
    for step, gn in enumerate([892.0, 300.0, 10.0, 1.0, 2.0], 1):
        t.update(step, 1.0, gn)
    s = t.summary()
    assert s["stability/grad_norm_init"] == 892.0 and s["stability/grad_norm_median"] == 10.0
    assert s["stability/median_grad_norm"] == 2.0 and s["stability/max_grad_norm"] == 10.0


def test_relative_clip_threshold_is_the_median_of_the_first_norms():
    t = StabilityTracker(clip_ref_steps=3)
    assert t.clip_threshold(10.0, 1.0) == 10.0
    assert t.clip_threshold(30.0, 1.0) == 20.0
    assert t.clip_threshold(float("nan"), 1.0) == 20.0  # a non-finite norm is not a reference
    assert t.clip_threshold(20.0, 0.5) == 10.0
    assert t.clip_threshold(1e6, 2.0) == 40.0  # the window is full: later norms do not move it
    assert StabilityTracker().clip_threshold(float("inf"), 1.0) == math.inf


def test_nan_params_diverge():
    model = torch.nn.Linear(2, 2)
    assert params_finite(model)
    t = StabilityTracker()
    t.update(1, 1.0, 1.0, params_finite=params_finite(model))
    assert not t.diverged
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    t.update(2, 1.0, 1.0, params_finite=params_finite(model))
    assert t.diverged and "parameters" in t.diverged_reason


def test_negative_losses_do_not_count_as_spikes():
    t = StabilityTracker(warmup_steps=0)
    for step in range(1, 30):
        t.update(step, -5.0 + 0.01 * step, 1.0)  # slowly rising negative loss (Gaussian log-std)
    assert t.loss_spikes == 0
    t.update(30, 1.0, 1.0)  # jumps by more than |ema| (about 4.8): a spike
    assert t.loss_spikes == 1


def test_state_dict_round_trip_continues_counts():
    def losses(step):
        return float("nan") if step == 7 else (3.0 if step in (15, 33) else 1.0 + 0.01 * (step % 3))

    def tracker():
        return StabilityTracker(reference=2.0, warmup_steps=5, clip_ref_steps=30)

    full = tracker()
    for step in range(1, 41):
        full.update(step, losses(step), 1.0 + (step % 4))
        full.clip_threshold(1.0 + (step % 4), 1.0)
        if step in (20, 40):
            full.judge_collapse(step, 1.0, 2.0, 0.5, 100, 10)

    first = tracker()
    for step in range(1, 21):
        first.update(step, losses(step), 1.0 + (step % 4))
        first.clip_threshold(1.0 + (step % 4), 1.0)
    first.judge_collapse(20, 1.0, 2.0, 0.5, 100, 10)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = tracker()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(21, 41):
        resumed.update(step, losses(step), 1.0 + (step % 4))
        resumed.clip_threshold(1.0 + (step % 4), 1.0)
    resumed.judge_collapse(40, 1.0, 2.0, 0.5, 100, 10)
    assert resumed.summary() == full.summary() and resumed.clip_ref_norms == full.clip_ref_norms
    assert full.summary()["stability/loss_spikes"] == 2 and full.summary()["stability/nonfinite_steps"] == 1
    assert full.summary()["stability/max_loss_jump_step"] == 15  # the first of two equal jumps


def test_a_checkpoint_from_before_the_reference_rules_loads():
    old = {k: v for k, v in StabilityTracker(warmup_steps=5).state_dict().items() if k in StabilityTracker._STATE}
    old.update(ref_loss=16.2, loss_spikes=2)
    t = StabilityTracker(reference=LN128)
    t.load_state_dict(old)
    assert t.loss_spikes == 2 and t.reference == pytest.approx(LN128) and t.max_loss_jump == 0.0


def test_empty_summary():
    s = StabilityTracker().summary()
    assert s["stability/loss_spikes"] == 0 and math.isnan(s["stability/grad_norm_ratio"])
    assert s["stability/collapsed"] is False and s["stability/max_loss_jump"] == 0.0
    assert math.isnan(s["stability/grad_norm_init"])


# --- the uninformative reference --------------------------------------------------------------------------------


def siglip_reference(b: int) -> float:
    """SigLIP at one constant logit z, minimised (sigmoid(z) = 1/B): -ln(1/B) - (B - 1) ln(1 - 1/B)."""
    return math.log(b) + (b - 1) * math.log(b / (b - 1))


@pytest.mark.parametrize("b", [4, 128])
def test_reference_closed_forms(b):
    for scale in (0.0, math.log(1 / 0.07), 4.0):  # InfoNCE: ln B at any temperature
        assert uninformative_loss(probloss.build_loss("infonce", init_logit_scale=scale), b, 8) == pytest.approx(
            math.log(b), rel=1e-12)
    for bias in (-10.0, 0.0):  # SigLIP: the bias reaches sigmoid(z) = 1/B from its paper start and from 0
        assert uninformative_loss(probloss.build_loss("sigmoid", init_logit_bias=bias), b, 8) == pytest.approx(
            siglip_reference(b), rel=1e-8)
    # a fixed bias the minimisation cannot move: the loss at that constant logit (t + b with u = v)
    fixed = probloss.build_loss("sigmoid", init_logit_scale=0.0, init_logit_bias=-3.0, learn_logit_scale=False,
                                learn_logit_bias=False)
    z = 1.0 - 3.0
    want = -math.log(1 / (1 + math.exp(-z))) - (b - 1) * math.log(1 / (1 + math.exp(z)))
    assert uninformative_loss(fixed, b, 8) <= want + 1e-9  # u != v lowers cos below 1: z can only move down
    assert uninformative_loss(probloss.build_loss("gaussian_var"), b, 8) == pytest.approx(math.log(b), rel=1e-12)
    assert uninformative_loss(probloss.build_loss("gaussian_var", variant="likelihood"), b, 8) == pytest.approx(
        math.log(b), rel=1e-12)


def _constant_inputs(loss, b, d, gen):
    """Inputs whose every score is equal: one random row repeated, random log-stds, perturbed parameters."""
    u, v = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    args = [u.expand(b, d), v.expand(b, d)]
    if loss.needs_log_std:
        args += [torch.full((b,), float(x), dtype=torch.float64) for x in torch.randn(2, generator=gen)]
    with torch.no_grad():
        for p in loss.parameters():
            if p.requires_grad:
                p.add_(torch.randn((), generator=gen, dtype=torch.float64))
    return args


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_reference_is_the_minimum_over_constant_scores_and_leaves_the_loss_alone(loss_name):
    loss = probloss.build_loss(loss_name)
    before = {n: p.detach().clone() for n, p in loss.named_parameters()}
    ref = uninformative_loss(loss, 8, 6)
    for n, p in loss.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    assert math.isfinite(ref)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        probe = probloss.build_loss(loss_name).double()
        with torch.no_grad():
            value = float(probe(*_constant_inputs(probe, 8, 6, gen)))
        assert ref <= value + 1e-9 * max(1.0, abs(value))


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_reference_is_at_most_the_loss_of_random_embeddings_at_init(loss_name):
    """What an untrained, pairing-free model scores (random rows, log-stds at the loss's init) is not below the
    reference: for pcmepp this holds only thanks to the random baseline (its tied value, 0.71, is above 0.55)."""
    b, d = 128, 64
    loss = probloss.build_loss(loss_name).double()
    ref = uninformative_loss(loss, b, d)
    gen = torch.Generator().manual_seed(3)  # other draws than the reference's own
    values = []
    with torch.no_grad():
        for _ in range(8):
            rows = [torch.randn(b, d, generator=gen, dtype=torch.float64) for _ in range(2)]
            if loss.needs_log_std:
                rows += [torch.full((b,), loss.init_log_std, dtype=torch.float64)] * 2
            values.append(float(loss(*rows)))
    # pcmepp's reference is itself such a mean of 8 batches: equal up to that sampling noise (~0.01)
    assert ref <= sum(values) / len(values) + 0.02 * abs(ref)


# Convex in their score (logit) matrices and blind to how pairs are labelled: averaged over every re-pairing of
# any embeddings, such a loss is at least its value at the averaged, constant scores (Jensen), so at least the
# reference. pcmepp's pseudo-positive labels depend on the scores (not convex) and prolip's inclusion term is
# not a function of the scores: the bound is not a theorem for them.
CONVEX_IN_SCORES = ["infonce", "sigmoid", "gaussian_var", "sigmoid_var"]


@pytest.mark.parametrize("loss_name", CONVEX_IN_SCORES)
def test_no_pairing_information_does_not_beat_the_reference(loss_name):
    b, d = 4, 5
    loss = probloss.build_loss(loss_name).double()
    ref = uninformative_loss(loss, b, d)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = (torch.randn(b, d, generator=gen, dtype=torch.float64) for _ in range(2))
        sx, sy = (0.5 * torch.randn(b, generator=gen, dtype=torch.float64) for _ in range(2))
        values = []
        with torch.no_grad():
            for perm in itertools.permutations(range(b)):
                perm = list(perm)
                args = (x, y[perm], sx, sy[perm]) if loss.needs_log_std else (x, y[perm])
                values.append(float(loss(*args)))
        assert sum(values) / len(values) >= ref - 1e-9


def test_single_process_switches_communication_off_and_back():
    from probloss import dist

    saved = dist.is_distributed, dist.get_rank, dist.get_world_size
    with single_process():
        assert not dist.is_distributed() and dist.get_rank() == 0 and dist.get_world_size() == 1
    assert (dist.is_distributed, dist.get_rank, dist.get_world_size) == saved
