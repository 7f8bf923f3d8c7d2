"""Tiled kernels (probloss/tiled.py) and the built-in losses' ``impl="tiled"`` against dense references.

Everything runs in float64 with relative error <= 1e-8 (forward and backward), on sizes that do not divide the
block, B = 1, M != N (the distributed shapes: local rows against gathered columns; and losses given extra
texts, hard negatives) and diagonal log-stds. The
loss tests cover every registered loss with an ``impl`` keyword, in each option set of its
``distributed_variants`` and each log-std layout it takes; a loss without one is skipped as having no tiled path.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch

import probloss
from probloss.false_negatives import key_match
from probloss.testing import log_std_shapes
from probloss.tiled import dist_pair_lse, offset_features, pair_lse, softplus_pair_sum, sq_dist_features

F64 = torch.float64
RTOL = 1e-8


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, absolute where the reference is (numerically) zero (B = 1 losses are 0)."""
    diff = (got - want).norm().item()
    scale = want.norm().item()
    return diff / scale if scale > 1e-12 else diff


def assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float = RTOL) -> None:
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (k, a.shape, b.shape)
        err = rel_err(a, b)
        assert err <= rtol, f"output {k}: relative error {err:.2e} > {rtol:.0e}"


def seeded(*shape, seed=0, scale=1.0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, dtype=dtype)).requires_grad_()


def value_and_grads(fn, inputs):
    value = fn(*inputs)
    if not isinstance(value, tuple):
        value = (value,)
    # Random weights per output make every entry of every output matter in backward.
    gen = torch.Generator().manual_seed(123)
    weights = [torch.randn(v.shape, generator=gen, dtype=v.dtype) for v in value]
    total = sum((v * w).sum() for v, w in zip(value, weights))
    wanted = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(total, wanted, allow_unused=True)  # e.g. row parameters when only rows are asked
    return [v.detach() for v in value] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wanted)]


# --- kernels against dense references ------------------------------------------------------------------------

SHAPES = [(7, 5, 3), (5, 9, 4), (1, 1, 3), (1, 6, 4), (6, 1, 4), (8, 8, 8), (10, 7, 1), (4, 6, 100)]


@pytest.mark.parametrize("m,n,block", SHAPES)
@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("scaled", [False, True])
def test_pair_lse_matches_dense(m, n, block, rows, cols, scaled):
    q, k = seeded(m, 5, seed=1, scale=2.0), seeded(n, 5, seed=2)
    scale = torch.tensor(3.5, dtype=F64, requires_grad=True)
    inputs = [q, k, scale] if scaled else [q, k]

    def tiled(q, k, scale=None):
        return tuple(v for v in pair_lse(q, k, scale, rows=rows, cols=cols, block=block) if v is not None)

    def dense(q, k, scale=None):
        logits = q @ k.T if scale is None else scale * q @ k.T
        return tuple(v for v, want in ((logits.logsumexp(1), rows), (logits.logsumexp(0), cols)) if want)

    assert_all_close(value_and_grads(tiled, inputs), value_and_grads(dense, inputs))


def _dense_dist_lse(q, k, col_pen, col_w, row_pen, row_w, rows, cols):
    d = (q @ k.T).clamp_min(0)
    out = []
    if rows:
        w = col_w if col_w is not None else torch.ones_like(d[0])
        p = col_pen if col_pen is not None else torch.zeros_like(d[0])
        out.append((-p - w * d).logsumexp(1))
    if cols:
        w = row_w if row_w is not None else torch.ones_like(d[:, 0])
        p = row_pen if row_pen is not None else torch.zeros_like(d[:, 0])
        out.append((-p[:, None] - w[:, None] * d).logsumexp(0))
    return tuple(out)


def sq_dist_lse(x, y, *args, form="features", **kwargs):
    """dist_pair_lse on ||x_i - y_j||^2 as augmented features, or as ``-2 x.y + |x|^2 + |y|^2`` per tile."""
    if form == "features":
        return dist_pair_lse(*sq_dist_features(x, y), *args, **kwargs)
    sq_x, sq_y = x.pow(2).sum(-1), y.pow(2).sum(-1)
    return dist_pair_lse(x, y, *args, **kwargs, scale=-2.0, row_add=sq_x, col_add=sq_y)


def dist_lse_inputs(m, n):
    """Seeded ``[x (m, 4), y (n, 4), col_pen (n,), col_w (n,), row_pen (m,), row_w (m,)]`` (weights as logs)."""
    return [seeded(m, 4, seed=3), seeded(n, 4, seed=4), seeded(n, seed=5), seeded(n, seed=7, scale=0.3),
            seeded(m, seed=6), seeded(m, seed=8, scale=0.3)]


@pytest.mark.parametrize("m,n,block", SHAPES)
@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("form", ["features", "raw"])
def test_dist_pair_lse_matches_dense(m, n, block, rows, cols, form):
    inputs = dist_lse_inputs(m, n)

    def tiled(x, y, col_pen, col_w, row_pen, row_w):
        out = sq_dist_lse(
            x, y, col_pen, col_w.exp(), row_pen, row_w.exp(), rows=rows, cols=cols, block=block, form=form
        )
        return tuple(v for v in out if v is not None)

    def dense(x, y, col_pen, col_w, row_pen, row_w):
        q, k = sq_dist_features(x, y)
        return _dense_dist_lse(q, k, col_pen, col_w.exp(), row_pen, row_w.exp(), rows, cols)

    assert_all_close(value_and_grads(tiled, inputs), value_and_grads(dense, inputs))


def _keys(m, n, scenes):
    """Group keys (probloss/false_negatives.py) for m rows and n columns: captions repeat every 3 rows / 4 columns;
    with scenes, a second id (every 2 rows / 5 columns; the last 2 columns have none: unique negative ids)."""
    r, c = torch.arange(m), torch.arange(n)
    if not scenes:
        return (r % 3)[:, None], (c % 4)[:, None]
    return torch.stack([r % 3, r % 2], 1), torch.stack([c % 4, torch.where(c < n - 2, c % 5, -1 - c)], 1)


MASKED_SHAPES = [(7, 5, 3), (5, 9, 4), (8, 8, 8), (4, 6, 100), (9, 7, 2)]


@pytest.mark.parametrize("m,n,block", MASKED_SHAPES)
@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("scenes", [False, True])
def test_pair_lse_with_keys_matches_dense_masked(m, n, block, rows, cols, scenes):
    """Key-matching pairs leave both log-sum-exps (false negatives): dense reference with logits -inf there."""
    q, k = seeded(m, 5, seed=1, scale=2.0), seeded(n, 5, seed=2)
    scale = torch.tensor(3.5, dtype=F64, requires_grad=True)
    row_keys, col_keys = _keys(m, n, scenes)
    match = key_match(row_keys, col_keys)
    assert match.any() and not match.all(1).any() and not match.all(0).any()

    def tiled(q, k, scale):
        out = pair_lse(q, k, scale, rows=rows, cols=cols, block=block, row_keys=row_keys, col_keys=col_keys)
        return tuple(v for v in out if v is not None)

    def dense(q, k, scale):
        logits = (scale * q @ k.T).masked_fill(match, float("-inf"))
        return tuple(v for v, want in ((logits.logsumexp(1), rows), (logits.logsumexp(0), cols)) if want)

    assert_all_close(value_and_grads(tiled, [q, k, scale]), value_and_grads(dense, [q, k, scale]))


@pytest.mark.parametrize("m,n,block", MASKED_SHAPES)
@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("form", ["features", "raw"])
def test_dist_pair_lse_with_keys_matches_dense_masked(m, n, block, rows, cols, form):
    inputs = dist_lse_inputs(m, n)
    row_keys, col_keys = _keys(m, n, scenes=True)
    match = key_match(row_keys, col_keys)

    def tiled(x, y, col_pen, col_w, row_pen, row_w):
        out = sq_dist_lse(x, y, col_pen, col_w.exp(), row_pen, row_w.exp(), rows=rows, cols=cols, block=block,
                          form=form, row_keys=row_keys, col_keys=col_keys)
        return tuple(v for v in out if v is not None)

    def dense(x, y, col_pen, col_w, row_pen, row_w):
        d = (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)
        out = []
        if rows:
            out.append((-col_pen - col_w.exp() * d).masked_fill(match, float("-inf")).logsumexp(1))
        if cols:
            out.append((-row_pen[:, None] - row_w.exp()[:, None] * d).masked_fill(match, float("-inf")).logsumexp(0))
        return tuple(out)

    assert_all_close(value_and_grads(tiled, inputs), value_and_grads(dense, inputs))


def test_a_fully_masked_row_is_finite_and_passes_no_gradient():
    """Every pair of row 0 matches: its log-sum-exp is ~ the dtype's minimum (the losses add the positive back with
    logaddexp, which then ignores it) and no tile of it gets a gradient (no inf or nan from exp(l - lse))."""
    q, k = seeded(3, 4, seed=1), seeded(5, 4, seed=2)
    row_keys, col_keys = torch.tensor([[7], [1], [2]]), torch.tensor([[7], [7], [7], [7], [7]])
    lse, _ = pair_lse(q, k, rows=True, cols=False, block=2, row_keys=row_keys, col_keys=col_keys)
    assert lse[0] < -1e300 and torch.isfinite(lse).all()
    torch.logaddexp(lse, torch.zeros(3, dtype=F64)).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and q.grad[0].abs().max() == 0


@pytest.mark.parametrize("m,n,block", [(7, 5, 3), (1, 4, 2)])
def test_dist_pair_lse_diagonal_features_and_default_weights(m, n, block):
    """Diagonal (per-dimension) weights through the augmented features; ``None`` weight/penalty mean 1 and 0."""
    x, y, log_w = seeded(m, 3, seed=9), seeded(n, 3, seed=10), seeded(n, 3, seed=11, scale=0.3)
    pen = seeded(n, seed=12)

    def tiled(x, y, log_w, pen):
        return dist_pair_lse(*sq_dist_features(x, y, log_w.exp()), pen, None, block=block)[0]

    def dense(x, y, log_w, pen):
        d = ((x[:, None, :] - y[None, :, :]) ** 2 * log_w.exp()[None]).sum(-1)  # plain (m, n, D) reference
        return (-pen - d).logsumexp(1)

    assert_all_close(value_and_grads(tiled, [x, y, log_w, pen]), value_and_grads(dense, [x, y, log_w, pen]))
    # No penalty at all
    no_pen = dist_pair_lse(*sq_dist_features(x, y, log_w.exp()), None, None, block=block)[0]
    torch.testing.assert_close(no_pen, dense(x, y, log_w, torch.zeros_like(pen)), rtol=RTOL, atol=0)


@pytest.mark.parametrize("form", ["features", "raw"])
def test_dist_pair_lse_clamp_matches_dense_on_identical_pairs(form):
    """x_i == y_i makes ||x_i - y_i||^2 = 0 up to cancellation (the clamp's territory): same value and gradient."""
    x = seeded(6, 5, seed=13, scale=3.0)
    y = torch.cat([x[:4].detach(), seeded(2, 5, seed=14)]).requires_grad_()
    pen, w = seeded(6, seed=15), seeded(6, seed=16, scale=0.3)

    def tiled(x, y, pen, w):
        return sq_dist_lse(x, y, pen, w.exp(), pen, w.exp(), rows=True, cols=True, block=4, form=form)

    def dense(x, y, pen, w):
        return _dense_dist_lse(*sq_dist_features(x, y), pen, w.exp(), pen, w.exp(), True, True)

    assert_all_close(value_and_grads(tiled, [x, y, pen, w]), value_and_grads(dense, [x, y, pen, w]))


@pytest.mark.parametrize("m,n,block", [(7, 5, 3), (1, 1, 2), (3, 8, 8)])
def test_softplus_pair_sum_matches_dense(m, n, block):
    x, y = seeded(m, 4, seed=17), seeded(n, 4, seed=18)
    scale, bias = torch.tensor(2.0, dtype=F64, requires_grad=True), torch.tensor(-1.5, dtype=F64, requires_grad=True)
    inputs = [x, y, scale, bias]
    got = value_and_grads(lambda *t: softplus_pair_sum(*t, block=block), inputs)
    want = value_and_grads(lambda *t: softplus_pair_sum(*t, block=None), inputs)
    assert_all_close(got, want)


@pytest.mark.parametrize("m,n,block", [(7, 5, 3), (1, 1, 2), (3, 8, 8)])
@pytest.mark.parametrize("rows,cols", [(True, True), (True, False), (False, True)])
def test_softplus_pair_sum_with_thresholds_matches_dense(m, n, block, rows, cols):
    """PCME++'s pseudo-positive counts: thresholds at the median logit, so about half the pairs count; +inf
    columns never count; thresholds get no gradient."""
    x, y = seeded(m, 4, seed=35), seeded(n, 4, seed=36)
    scale, bias = torch.tensor(1.5, dtype=F64, requires_grad=True), torch.tensor(-0.5, dtype=F64, requires_grad=True)
    with torch.no_grad():
        median = (scale * x @ y.T + bias).median()
    row_threshold = (median + 0.1 * seeded(m, seed=37)).detach() if rows else None
    col_threshold = (median + 0.1 * seeded(n, seed=38)).detach() if cols else None
    if cols and n > 1:
        col_threshold[-1] = float("inf")
    inputs = [x, y, scale, bias]

    def kernel(block):
        return lambda *t: softplus_pair_sum(*t, block=block, row_threshold=row_threshold,
                                            col_threshold=col_threshold, threshold_weight=0.3)

    assert_all_close(value_and_grads(kernel(block), inputs), value_and_grads(kernel(None), inputs))
    plain = softplus_pair_sum(*inputs, block=block)
    if m * n > 1:
        assert not torch.isclose(kernel(block)(*inputs), plain)  # some pairs counted
    assert torch.autograd.gradcheck(kernel(block), (x, y, scale, bias))


def test_offset_features_add_row_and_column_terms():
    x, y, r, c = seeded(4, 3, seed=39), seeded(5, 3, seed=40), seeded(4, seed=41), seeded(5, seed=42)
    q, k = offset_features(x, y, r, c)
    torch.testing.assert_close(q @ k.T, x @ y.T + r[:, None] + c[None, :], rtol=1e-12, atol=1e-12)


def test_gradcheck_kernels():
    x, y = seeded(4, 3, seed=19), seeded(5, 3, seed=20)
    assert torch.autograd.gradcheck(lambda q, k: pair_lse(q, k, block=2), (x, y))
    assert torch.autograd.gradcheck(lambda q, k: pair_lse(q, k, cols=False, block=3)[0], (x, y))
    scale = torch.tensor(1.7, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, t: pair_lse(q, k, t, block=2), (x, y, scale))
    pen_n, w_n, pen_m, w_m = seeded(5, seed=21), seeded(5, seed=22).abs(), seeded(4, seed=23), seeded(4, seed=24).abs()

    def dist_fn(x, y, pen_n, w_n, pen_m, w_m):
        return dist_pair_lse(*sq_dist_features(x, y), pen_n, w_n, pen_m, w_m, rows=True, cols=True, block=2)

    assert torch.autograd.gradcheck(dist_fn, (x, y, pen_n, w_n, pen_m, w_m))
    add_m, add_n = seeded(4, seed=33).abs(), seeded(5, seed=34).abs()

    def dist_add_fn(x, y, pen_n, w_n, pen_m, w_m, add_m, add_n):
        return dist_pair_lse(x, y, pen_n, w_n, pen_m, w_m, rows=True, cols=True, block=3, scale=-0.5,
                             row_add=add_m, col_add=add_n)

    assert torch.autograd.gradcheck(dist_add_fn, (x, y, pen_n, w_n, pen_m, w_m, add_m, add_n))
    log_w = seeded(5, 3, seed=25, scale=0.3)
    assert torch.autograd.gradcheck(
        lambda x, y, log_w, pen: dist_pair_lse(*sq_dist_features(x, y, log_w.exp()), pen, None, block=3)[0],
        (x, y, log_w, pen_n),
    )
    scale, bias = torch.tensor(1.5, dtype=F64, requires_grad=True), torch.tensor(-0.5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: softplus_pair_sum(*t, block=2), (x, y, scale, bias))


def test_kernels_respect_needs_input_grad():
    x, y = seeded(5, 3, seed=26), seeded(4, 3, seed=27).detach()
    row, _ = pair_lse(x, y, cols=False, block=2)
    (grad_x,) = torch.autograd.grad(row.sum(), [x])
    torch.testing.assert_close(grad_x, torch.autograd.grad((x @ y.T).logsumexp(1).sum(), [x])[0], rtol=RTOL, atol=0)
    scale = torch.tensor(2.0, dtype=F64, requires_grad=True)  # only the scale needs a gradient
    (grad_scale,) = torch.autograd.grad(pair_lse(x.detach(), y, scale, block=2)[1].sum(), [scale])
    want = torch.autograd.grad((scale * x.detach() @ y.T).logsumexp(0).sum(), [scale])[0]
    torch.testing.assert_close(grad_scale, want, rtol=RTOL, atol=0)
    pen = seeded(4, seed=28)  # only the penalty needs a gradient
    q, k = sq_dist_features(x.detach(), y)
    (grad_pen,) = torch.autograd.grad(dist_pair_lse(q, k, pen, None, block=3)[0].sum(), [pen])
    want = torch.autograd.grad(_dense_dist_lse(q, k, pen, None, None, None, True, False)[0].sum(), [pen])[0]
    torch.testing.assert_close(grad_pen, want, rtol=RTOL, atol=0)

    # the single-pass pair sum: only y needs a gradient; and in no grad mode only the value is computed
    scale, bias = torch.tensor(1.5, dtype=F64), torch.tensor(-0.5, dtype=F64)
    y_grad = y.clone().requires_grad_()
    (grad_y,) = torch.autograd.grad(3.0 * softplus_pair_sum(x.detach(), y_grad, scale, bias, block=2), [y_grad])
    want = torch.autograd.grad(3.0 * softplus_pair_sum(x.detach(), y_grad, scale, bias, block=None), [y_grad])[0]
    torch.testing.assert_close(grad_y, want, rtol=RTOL, atol=0)
    with torch.no_grad():
        value = softplus_pair_sum(x, y_grad, scale, bias, block=2)
    assert not value.requires_grad
    torch.testing.assert_close(value, softplus_pair_sum(x, y_grad, scale, bias, block=None).detach(), rtol=RTOL, atol=0)


def test_kernels_are_stable_for_large_logits():
    """Logits in the hundreds (t = 100 on unit vectors, far-apart Gaussians) stay finite in float32."""
    x = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(70, 8), dim=-1)
    row, col = pair_lse(100 * x, y, block=16)
    torch.testing.assert_close(row, (100 * x @ y.T).logsumexp(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(col, (100 * x @ y.T).logsumexp(0), rtol=1e-5, atol=1e-4)
    row, col = dist_pair_lse(*sq_dist_features(30 * x, 30 * y), None, None, None, None, rows=True, cols=True, block=16)
    assert torch.isfinite(row).all() and torch.isfinite(col).all()


# --- losses: impl="tiled" against impl="dense" -----------------------------------------------------------------


def takes_impl(name: str) -> bool:
    """Whether a loss declares a choice of implementation: an ``impl`` keyword (dense, tiled, auto)."""
    return "impl" in inspect.signature(probloss.LOSSES.get(name)).parameters


def _no_tiled_path(name: str):
    return pytest.param(name, {}, None, marks=pytest.mark.skip(reason=f"{name} has no impl keyword: no tiled path"))


def loss_cases(first_variant_only: bool = False) -> list:
    """``(name, kwargs, log_std)`` for every registered loss: each option set of its ``distributed_variants``
    (without impl and block_size, which the tests set) times each log-std layout it takes."""
    cases = []
    for name in probloss.list_losses():
        if not takes_impl(name):
            cases.append(_no_tiled_path(name))
            continue
        cls = probloss.LOSSES.get(name)
        options = []
        for variant in cls.distributed_variants:
            option = {k: v for k, v in variant.items() if k not in ("impl", "block_size")}
            if option not in options:
                options.append(option)
        for option in options[:1] if first_variant_only else options:
            for log_std in log_std_shapes(cls):
                label = "-".join([name, *(f"{k}={v}" for k, v in option.items()), str(log_std)])
                cases.append(pytest.param(name, option, log_std, id=label))
    return cases


@pytest.mark.parametrize("name", probloss.list_losses())
def test_tiled_saves_no_pair_matrix(name, loss_inputs):
    """Only inputs and O(B) statistics are kept for backward: no saved tensor has B x B entries."""
    if not takes_impl(name):
        pytest.skip(f"{name} has no impl keyword: no tiled path")
    b = 64
    loss = probloss.build_loss(name, impl="tiled", block_size=16).double()
    inputs = loss_inputs(b, 4, "sample" if loss.needs_log_std else None, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss(*inputs)
    value.backward()
    assert saved and max(saved) < b * b // 4, max(saved)


def loss_value_and_grads(name, kwargs, inputs):
    loss = probloss.build_loss(name, **kwargs).double()
    with torch.no_grad():  # move the parameters off their init so their gradients are generic
        for p in loss.parameters():
            p.add_(0.1)
    params = [p for p in loss.parameters() if p.requires_grad]
    value = loss(*inputs)
    return [value.detach()] + list(torch.autograd.grad(value, [t for t in inputs if t is not None] + params))


@pytest.mark.parametrize("name,kwargs,log_std", loss_cases())
@pytest.mark.parametrize("b,block", [(7, 3), (1, 4), (6, 16), (9, 1)])
def test_tiled_loss_matches_dense(name, kwargs, log_std, b, block, loss_inputs):
    inputs = loss_inputs(b, 5, log_std, requires_grad=True)
    got = loss_value_and_grads(name, {**kwargs, "impl": "tiled", "block_size": block}, inputs)
    want = loss_value_and_grads(name, {**kwargs, "impl": "dense"}, inputs)
    assert_all_close(got, want)


@pytest.mark.parametrize("name,kwargs,log_std", loss_cases())
@pytest.mark.parametrize("b,extra,block", [(7, 1, 3), (1, 3, 2), (5, 2, 16), (4, 2, 1)])
def test_tiled_loss_matches_dense_with_extra_texts(name, kwargs, log_std, b, extra, block, loss_inputs):
    """Hard negatives: ``b`` images against ``b (1 + extra)`` texts."""
    inputs = loss_inputs(b, 5, log_std, requires_grad=True, extra_texts=extra)
    got = loss_value_and_grads(name, {**kwargs, "impl": "tiled", "block_size": block}, inputs)
    want = loss_value_and_grads(name, {**kwargs, "impl": "dense"}, inputs)
    assert_all_close(got, want)


@pytest.mark.parametrize("name,kwargs,log_std", loss_cases(first_variant_only=True))
def test_tiled_loss_float32(name, kwargs, log_std, loss_inputs):
    inputs = loss_inputs(33, 16, log_std, dtype=torch.float32, requires_grad=True)
    tensors = [t for t in inputs if t is not None]

    def run(impl):
        loss = probloss.build_loss(name, **kwargs, impl=impl, block_size=8)
        value = loss(*inputs)
        return [value.detach()] + list(torch.autograd.grad(value, tensors))

    for got, want in zip(run("tiled"), run("dense")):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,kwargs,log_std", loss_cases())
@pytest.mark.parametrize("extra", [0, 2])
def test_tiled_loss_on_cuda(name, kwargs, log_std, extra, loss_inputs):
    cpu = loss_inputs(37, 8, log_std, requires_grad=True, extra_texts=extra)
    cuda = [t.detach().cuda().requires_grad_() if t is not None else None for t in cpu]
    got = [t.cpu() for t in loss_value_and_grads(name, {**kwargs, "impl": "tiled", "block_size": 16}, cuda)]
    want = loss_value_and_grads(name, {**kwargs, "impl": "dense"}, cpu)
    assert_all_close(got, want, rtol=1e-7)


def _custom_functions(value: torch.Tensor) -> set[str]:
    """Names of the custom autograd Functions in ``value``'s graph: the tiled kernels are such Functions, the
    dense paths use built-in operations only."""
    names, seen, stack = set(), set(), [value.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if isinstance(fn, torch.autograd.function.BackwardCFunction):
            names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("name", probloss.list_losses())
def test_impl_option(name, loss_inputs):
    if not takes_impl(name):
        pytest.skip(f"{name} has no impl keyword: no tiled path")
    with pytest.raises(ValueError, match=f"^{name}: impl='fused' is not one of dense, tiled, auto$"):
        probloss.build_loss(name, impl="fused")
    # auto = tiled above block_size: same values either way, so check which path ran by what autograd keeps.
    inputs = loss_inputs(6, 3, "sample" if probloss.LOSSES.get(name).needs_log_std else None, requires_grad=True)
    for block, tiled in ((4, True), (6, False)):
        value = probloss.build_loss(name, impl="auto", block_size=block).double()(*inputs)
        assert bool(_custom_functions(value)) == tiled, (block, _custom_functions(value))


def _bench_losses_module():
    """scripts/bench_losses.py loaded as a module."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_losses.py"
    spec = importlib.util.spec_from_file_location("bench_losses", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_bench_losses_script_smoke(tmp_path):
    """scripts/bench_losses.py runs end to end on a tiny case (fresh subprocess per case, JSON written)."""
    bench = _bench_losses_module()
    out = tmp_path / "bench.json"
    bench.main(["--sizes", "24", "--dim", "8", "--repeats", "1", "--block-size", "8", "--impls", "tiled",
                "--losses", "floor", "gaussian_var", "--threads", "1", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [r["loss"] for r in results] == ["floor", "gaussian_var"]
    assert all("error" not in r and r["median_s"] > 0 for r in results), results


def test_bench_losses_script_runs_false_negative_options(tmp_path):
    """--false-negatives: each loss once per option (floor once), no case failing."""
    bench = _bench_losses_module()
    out = tmp_path / "bench.json"
    bench.main(["--sizes", "24", "--dim", "8", "--repeats", "1", "--block-size", "8", "--impls", "tiled",
                "--losses", "floor", "infonce", "sigmoid", "--threads", "1", "--false-negatives", "keep", "mask",
                "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [(r["loss"], r["false_negatives"]) for r in results] == [
        ("floor", "keep"), ("infonce", "keep"), ("infonce", "mask"), ("sigmoid", "keep"), ("sigmoid", "mask")]
    assert all("error" not in r and r["median_s"] > 0 for r in results), results
