"""Measure what the loss controls: every registered loss's declared invariances, applied to the embeddings, leave
its loss value and EVERY key ``evaluate()`` reports unchanged (docs/design.md, Measurements).

Parametrised over ``probloss.list_losses()`` (a new loss is tested the moment it is registered) and over a few
options that change a loss's invariances (``invariances_in_use``). The dual encoder is the fake one of
test_eval_evaluate.py, wrapped so that both towers' outputs go through the transformation: a shift adds one
random vector to every image and text embedding; a scale multiplies every embedding by c and moves log-stds by
the loss's ``log_std_under_scale``. A transformation the loss does not declare must change something (the test
can fail).
"""

import math

import pytest
import torch
from torch import nn

import probloss
from probloss.eval import evaluate
from test_eval_evaluate import CLASSNAMES, D, FakeDualEncoder, FakeTokenizer, make_eval_set

# Absolute sigma is not identified under a scale (gaussian_var: sigma scales with the embeddings): the two means
# are diagnostics, documented as scale-dependent. Every other key must stay.
SCALE_DEPENDENT = {"unc/sigma_image_mean", "unc/sigma_text_mean"}
OPTIONS = [(name, {}) for name in probloss.list_losses()] + [
    ("gaussian_var", {"freeze_log_std": True}), ("gaussian_var", {"shared_log_std": True}),
    ("gaussian_var", {"normalize": True}),
    ("gaussian_var", {"kl_weight": 0.1}), ("gaussian_var", {"variant": "likelihood", "inverse_temperature": 0.3}),
    ("sigmoid_var", {"normalize": False}), ("pcmepp", {"normalize": False, "vib_beta": 0.0}),
]


class Imperfect(FakeDualEncoder):
    """The fake model with each image a little off its caption (a fixed offset per caption id): no exact-zero
    distances, whose coincidental ties between unrelated queries would hang on float32 rounding. Identical
    captions still embed identically (real ties stay exact under any transformation)."""

    def encode_image(self, images):
        emb, log_std = super().encode_image(images)
        ids = images[:, 0, 0, 0].round().long()
        offset = torch.randn(512, D, generator=torch.Generator().manual_seed(1), dtype=emb.dtype)[ids]
        return emb + 0.3 * offset, log_std


class Transformed(nn.Module):
    """``model``'s embeddings times ``scale`` plus ``shift``; log-stds as ``loss.log_std_under_scale`` moves them."""

    def __init__(self, model, loss, shift=None, scale=1.0):
        super().__init__()
        self.model, self.loss, self.shift, self.scale = model, loss, shift, scale

    def _apply(self, emb, log_std):
        emb = emb.double() * self.scale + (0 if self.shift is None else self.shift)
        if log_std is not None and self.scale != 1.0:
            log_std = self.loss.log_std_under_scale(log_std.double(), self.scale)
        return emb, log_std

    def encode_image(self, images):
        return self._apply(*self.model.encode_image(images))

    def encode_text(self, tokens):
        return self._apply(*self.model.encode_text(tokens))


def _plausible(eval_set):
    """Hand-made plausible matches: caption j fits image i when it is one of image i's four caption levels."""
    levels = [set(m["captions"]) for m in eval_set.json]
    return torch.tensor([[c in lv for c in eval_set.captions] for lv in levels])


def _evaluate(model, loss, eval_set, tok):
    stats = {c: (1 + i % 5, lv) for i, m in enumerate(eval_set.json) for lv, c in enumerate(m["captions"])}
    return evaluate(model, loss, eval_set, tok, batch_size=7, classnames=CLASSNAMES, plausible=_plausible(eval_set),
                    train_caption_stats=stats)


def _loss_value(loss, model, eval_set):
    with torch.no_grad():
        x, lx = model.encode_image(eval_set.images)
        y, ly = model.encode_text(eval_set.tokens)
        lx, ly = (None, None) if not loss.needs_log_std else (lx, ly)
        return loss(x.double(), y.double(), lx if lx is None else lx.double(), ly if ly is None else ly.double()).item()


def _differences(base, other, skip=()):
    bad = []
    assert set(base) == set(other)
    for key, value in base.items():
        if key in skip:
            continue
        same = (math.isnan(value) and math.isnan(other[key])) or other[key] == pytest.approx(value, rel=1e-4, abs=1e-5)
        if not same:
            bad.append((key, value, other[key]))
    return bad


@pytest.mark.parametrize(("name", "options"), OPTIONS, ids=[f"{n}-{o}" if o else n for n, o in OPTIONS])
def test_declared_invariances_leave_loss_and_every_reported_key_unchanged(name, options):
    loss = probloss.build_loss(name, **options).double()
    invariances = loss.invariances_in_use()
    assert set(invariances) <= {"shift", "scale"}
    assert set(type(loss).invariances) <= {"shift", "scale"}
    if not options:
        assert invariances == tuple(type(loss).invariances)  # the class declares the default instance's
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=24, level=lambda i: i % 4)  # every level, duplicated captions
    model = Imperfect(log_std=loss.needs_log_std, specific=True, log_std_offset=loss.init_log_std).double()
    base_out, base_loss = _evaluate(model, loss, eval_set, tok), _loss_value(loss, model, eval_set)
    assert any(k.startswith("embed/scored/") for k in base_out) and "val/i2t_rprecision" in base_out
    shift = 3.0 * torch.randn(D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for kind, transformed in (("shift", Transformed(model, loss, shift=shift)),
                              ("scale", Transformed(model, loss, scale=2.5))):
        out, value = _evaluate(transformed, loss, eval_set, tok), _loss_value(loss, transformed, eval_set)
        skip = SCALE_DEPENDENT if kind == "scale" else ()
        if kind in invariances:
            assert value == pytest.approx(base_loss, rel=1e-6, abs=1e-8), kind
            assert not _differences(base_out, out, skip), (kind, _differences(base_out, out, skip))
        else:  # not declared: the transformation must show (the loss or the loss's own geometry moves)
            assert value != pytest.approx(base_loss, rel=1e-6, abs=1e-8) or _differences(base_out, out, skip), kind


def test_every_registered_loss_declares_its_invariances():
    for name in probloss.list_losses():
        cls = type(probloss.build_loss(name))
        assert "invariances" in vars(cls), f"{name}: declare invariances (probloss/loss.py)"
