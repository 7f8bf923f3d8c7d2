"""StabilityTracker: planted spikes, NaNs, divergence, checkpoint round-trip."""

import io
import math

import pytest
import torch

from probloss.eval import StabilityTracker, params_finite

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


def test_sustained_high_loss_diverges():
    t = StabilityTracker(warmup_steps=2, diverge_factor=3.0, diverge_patience=5)
    t.update(1, 2.0, 1.0)  # the reference loss
    for step in range(2, 12):
        t.update(step, 2.0 + 0.1 * step, 1.0)  # drifts up but stays < 6
    assert not t.diverged
    for step in range(12, 17):
        t.update(step, 7.0, 1.0)
    assert t.diverged and t.diverged_step == 16
    t.update(17, 1.0, 1.0)
    assert t.summary()["stability/diverged"]  # sticky


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
        return float("nan") if step == 7 else (3.0 if step in (15, 33) else 1.0)

    full = StabilityTracker(warmup_steps=5)
    for step in range(1, 41):
        full.update(step, losses(step), 1.0 + (step % 4))

    first = StabilityTracker(warmup_steps=5)
    for step in range(1, 21):
        first.update(step, losses(step), 1.0 + (step % 4))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = StabilityTracker(warmup_steps=5)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(21, 41):
        resumed.update(step, losses(step), 1.0 + (step % 4))
    assert resumed.summary() == full.summary()
    assert full.summary()["stability/loss_spikes"] == 2 and full.summary()["stability/nonfinite_steps"] == 1


def test_empty_summary():
    s = StabilityTracker().summary()
    assert s["stability/loss_spikes"] == 0 and math.isnan(s["stability/grad_norm_ratio"])
