"""Memory-tiled kernels: pairwise loss terms computed block by block, in O((B + N) x D + block^2) memory.

A dense ``(B, N)`` logit matrix, kept alive for backward by autograd, dominates a contrastive loss's memory
(several B x B matrices for a softmax loss: logits, softmax, its gradient). The autograd functions here walk
over ``(block, block)`` tiles of the pair matrix and keep only O(B + N) statistics. This is the Inf-CL idea
(Cheng et al., "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive Loss", 2024),
extended to the sigmoid loss and the Gaussian log-std loss, and written for any device (no custom kernels).

Two kinds, by what a tile's gradient needs:

- Pairwise sums (:class:`SinglePassSum`: :func:`softplus_pair_sum`, sigmoid_var's kernel): a pair term's
  gradient needs only its own logit, so one sweep sums the loss and accumulates the gradients for an incoming
  gradient of 1 (saved, O((B + N) x D)); backward only scales them. Three tile products in all (the logits,
  the gradient of the rows, of the columns): the count of the matrix-product floor ``(X @ Y.T).sum()``.
- Softmax log-sum-exps (:func:`pair_lse`, :func:`dist_pair_lse`): a tile's softmax weights need the row and
  column log-sum-exps of the whole matrix, known only after a full sweep, so backward recomputes every tile:
  four products (forward 1, backward 3), the two-pass limit of a softmax loss.

Kernels:

- :func:`pair_lse`: row-wise and column-wise log-sum-exp of ``t Q K^T`` in one pass (InfoNCE).
- :func:`dist_pair_lse`: row/column log-sum-exp of distance logits ``-pen_j - w_j * max(R_ij, 0)`` (row
  direction, candidates are columns) and ``-pen_i - w_i * max(R_ij, 0)`` (column direction, candidates are
  rows) with ``R_ij = s Q_i . K_j + a_i + b_j`` a squared distance (gaussian_var: ``s = -2``, ``a = |x|^2``,
  ``b = |y|^2``; diagonal log-stds through augmented features, see :func:`sq_dist_features`).
- :func:`softplus_pair_sum`: ``sum_ij softplus(t * x_i . y_j + b)`` (SigLIP's negatives; with per-row and
  per-column offsets through augmented features, ProLIP and PCME++), optionally minus thresholded pair counts
  times the logits (PCME++'s pseudo-positives).

The cross-entropy's target logit (the positive pair) is not part of these kernels: the losses add it with
plain autograd as an O(B x D) row-wise dot product.

All functions work in any floating dtype on any device, honour ``ctx.needs_input_grad``, and accept any
number of rows and columns (``M != N``, ``M = 1``, sizes that do not divide the block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from probloss.false_negatives import key_match

Tensor = torch.Tensor

# Tile side: 512 x 512 tiles keep the per-tile temporaries at ~1 MiB each in float32 with no measurable loss of
# matrix-product speed on CPU; on a GPU pass block_size=4096 or more (fewer, larger kernels).
DEFAULT_BLOCK = 512
# Exponents are clamped at EXP_FLOOR before exp: exp of very negative numbers yields subnormals, which cost
# ~10x more on x86 CPUs. A term clamped up to exp(-80) ~ 2e-35 (relative to the largest term, which is 1)
# changes a log-sum-exp over N terms by at most N * 2e-35 relative: far below float64 rounding.
EXP_FLOOR = -80.0
IMPLS = ("dense", "tiled", "auto")


def use_tiled(impl: str, size: int, block_size: int) -> bool:
    """The choice every built-in loss makes: ``tiled``, ``dense``, or ``auto`` = tiled when ``size > block_size``."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; choose one of {IMPLS}")
    return impl == "tiled" or (impl == "auto" and size > block_size)


def tiles(n: int, block: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each block of ``n`` rows."""
    return [(start, min(start + block, n)) for start in range(0, n, block)]


def _online_lse_update(logits: Tensor, dim: int, run_max: Tensor, run_sum: Tensor, inplace: bool) -> None:
    """Fold one tile into running (max, sum of exp(l - max)) statistics along ``dim`` (views, updated in place).

    ``inplace`` lets the tile itself be overwritten (saves an allocation when the caller is done with it).
    """
    new_max = torch.maximum(run_max, logits.amax(dim))
    shifted = logits.sub_(new_max.unsqueeze(dim)) if inplace else logits - new_max.unsqueeze(dim)
    # exp(old_max - new_max) rescales the old sum; exp(-inf) = 0 on the first tile.
    run_sum.mul_(torch.exp(run_max - new_max)).add_(shifted.clamp_min_(EXP_FLOOR).exp_().sum(dim))
    run_max.copy_(new_max)


def _softmax_shift(lse: Tensor, grad: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(shift, factor)`` with ``grad * exp(l - lse) = exp(l - shift) * factor``, computed once per backward.

    With positive incoming gradients (any mean or sum loss) the factor is folded into the exponent,
    ``exp(l - lse + log g)``, which saves a pass over every tile; otherwise ``factor = grad``.
    """
    if bool((grad > 0).all()):
        return lse - grad.log(), None
    return lse, grad


def _softmax_weight(logits: Tensor, shift: Tensor, factor: Tensor | None, dim: int, inplace: bool) -> Tensor:
    """``factor * exp(logits - shift)`` broadcast along ``dim``: the tile's softmax times the incoming gradient."""
    shift = shift.unsqueeze(dim)
    out = logits.sub_(shift) if inplace else logits - shift
    out.clamp_min_(EXP_FLOOR).exp_()
    return out if factor is None else out.mul_(factor.unsqueeze(dim))


class _PairLSE(torch.autograd.Function):
    """Row and column log-sum-exp of a pair matrix, tile by tile, in plain (``Q K^T``) or distance mode.

    Every tile is ``R = t Q K^T + row_add_i + col_add_j`` (``scale`` t: a scalar tensor or ``None`` = 1,
    applied to one row block at a time so no scaled copy of Q exists; ``row_add`` ``(M,)``, ``col_add`` ``(N,)``
    or ``None``). Plain mode: logits ``R`` in both directions. Distance mode, with ``R`` a squared distance
    and ``d = max(R, 0)``: row logits ``A_ij = -col_pen_j - col_w_j d_ij`` (LSE over j) and column logits
    ``C_ij = -row_pen_i - row_w_i d_ij`` (LSE over i); a ``None`` weight means 1, a ``None`` penalty 0.
    """

    @staticmethod
    def forward(
        ctx, q, k, scale, row_add, col_add, row_pen, row_w, col_pen, col_w, distance, want_rows, want_cols, block,
        row_keys=None, col_keys=None,
    ):
        m, n = q.shape[0], k.shape[0]
        masked = row_keys is not None
        if want_rows:
            row_max, row_sum = q.new_full((m,), float("-inf")), q.new_zeros(m)
        if want_cols:
            col_max, col_sum = q.new_full((n,), float("-inf")), q.new_zeros(n)
        for i0, i1 in tiles(m, block):
            q_block = q[i0:i1] if scale is None else q[i0:i1] * scale  # (bm, D)
            for j0, j1 in tiles(n, block):
                raw = _raw_tile(q_block, k[j0:j1], row_add, col_add, i0, i1, j0, j1)  # (bm, bn)
                match = key_match(row_keys[i0:i1], col_keys[j0:j1]) if masked else None
                if distance:
                    raw.clamp_min_(0)  # cancellation in |q|^2 + |k|^2 - 2 q.k can dip just below zero
                    row_logits = _direction_logits(raw, col_pen, col_w, j0, j1, dim=0) if want_rows else None
                    col_logits = _direction_logits(raw, row_pen, row_w, i0, i1, dim=1) if want_cols else None
                    if masked:
                        for logits in (row_logits, col_logits):
                            if logits is not None:
                                logits.masked_fill_(match, _masked_logit(logits))
                    if want_rows:
                        _online_lse_update(row_logits, 1, row_max[i0:i1], row_sum[i0:i1], inplace=True)
                    if want_cols:
                        _online_lse_update(col_logits, 0, col_max[j0:j1], col_sum[j0:j1], inplace=True)
                else:
                    if masked:
                        raw.masked_fill_(match, _masked_logit(raw))
                    if want_rows:
                        _online_lse_update(raw, 1, row_max[i0:i1], row_sum[i0:i1], inplace=not want_cols)
                    if want_cols:
                        _online_lse_update(raw, 0, col_max[j0:j1], col_sum[j0:j1], inplace=True)
        row_lse = row_max + row_sum.log() if want_rows else q.new_empty(0)
        col_lse = col_max + col_sum.log() if want_cols else q.new_empty(0)
        if not want_rows:
            ctx.mark_non_differentiable(row_lse)
        if not want_cols:
            ctx.mark_non_differentiable(col_lse)
        ctx.save_for_backward(q, k, scale, row_add, col_add, row_pen, row_w, col_pen, col_w, row_lse, col_lse,
                              row_keys, col_keys)
        ctx.distance, ctx.want_rows, ctx.want_cols, ctx.block = distance, want_rows, want_cols, block
        ctx.set_materialize_grads(False)
        return row_lse, col_lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row, grad_col):
        q, k, scale, row_add, col_add, row_pen, row_w, col_pen, col_w, row_lse, col_lse, row_keys, col_keys = \
            ctx.saved_tensors
        masked = row_keys is not None
        need_q, need_k, need_scale, need_row_add, need_col_add = ctx.needs_input_grad[:5]
        need_row_pen, need_row_w, need_col_pen, need_col_w = ctx.needs_input_grad[5:9]
        rows = ctx.want_rows and grad_row is not None
        cols = ctx.want_cols and grad_col is not None
        # With a scale, grad_q first accumulates dL/d(tQ); dL/dt = <Q, dL/d(tQ)> and dL/dQ = t dL/d(tQ) at the end.
        grad_q = torch.zeros_like(q) if need_q or need_scale else None
        grad_k = torch.zeros_like(k) if need_k else None
        grad_row_pen = torch.zeros_like(row_pen) if need_row_pen else None
        grad_row_w = torch.zeros_like(row_w) if need_row_w else None
        grad_col_pen = torch.zeros_like(col_pen) if need_col_pen else None
        grad_col_w = torch.zeros_like(col_w) if need_col_w else None
        grad_scale = torch.zeros_like(scale) if need_scale else None
        grad_row_add = torch.zeros_like(row_add) if need_row_add else None
        grad_col_add = torch.zeros_like(col_add) if need_col_add else None
        grads = [grad_q, grad_k, grad_scale, grad_row_add, grad_col_add]
        grads += [grad_row_pen, grad_row_w, grad_col_pen, grad_col_w]
        if not (rows or cols):
            return (*grads, None, None, None, None, None, None)
        block = ctx.block
        if rows:
            row_shift, row_factor = _softmax_shift(row_lse, grad_row)
        if cols:
            col_shift, col_factor = _softmax_shift(col_lse, grad_col)
        for i0, i1 in tiles(q.shape[0], block):
            q_block = q[i0:i1] if scale is None else q[i0:i1] * scale
            for j0, j1 in tiles(k.shape[0], block):
                raw = _raw_tile(q_block, k[j0:j1], row_add, col_add, i0, i1, j0, j1)  # (bm, bn), recomputed
                # Masked pairs take no part: their softmax weight is exactly 0 (set after the weight is formed,
                # which also clears the inf/nan of a row whose every pair is masked).
                match = key_match(row_keys[i0:i1], col_keys[j0:j1]) if masked else None
                sign = 1.0
                if not ctx.distance:
                    # dL/draw = g_i softmax_row + g_j softmax_col
                    grad_raw = None
                    if rows:
                        row_factor_block = _part(row_factor, i0, i1)
                        grad_raw = _softmax_weight(raw, row_shift[i0:i1], row_factor_block, 1, inplace=not cols)
                    if cols:
                        weight = _softmax_weight(raw, col_shift[j0:j1], _part(col_factor, j0, j1), 0, inplace=True)
                        grad_raw = weight if grad_raw is None else grad_raw.add_(weight)
                    if masked:
                        grad_raw.masked_fill_(match, 0)
                else:
                    # clamp_min(0) passes no gradient where raw < 0 (torch: where raw >= 0); rare, so only
                    # build the mask when the tile has such entries.
                    negative = raw < 0 if bool(raw.amin() < 0) else None
                    dist = raw.clamp_min_(0)
                    grad_raw = None  # accumulates dL/dd, then sign and mask
                    if rows:
                        logits = _direction_logits(dist, col_pen, col_w, j0, j1, dim=0)
                        weight = _softmax_weight(logits, row_shift[i0:i1], _part(row_factor, i0, i1), 1, True)  # dL/dA
                        if masked:
                            weight.masked_fill_(match, 0)
                        if need_col_pen:
                            grad_col_pen[j0:j1] -= weight.sum(0)
                        if need_col_w:
                            grad_col_w[j0:j1] -= (weight * dist).sum(0)
                        grad_raw = weight.mul_(col_w[j0:j1]) if col_w is not None else weight  # dA/dd = -w_j
                    if cols:
                        logits = _direction_logits(dist, row_pen, row_w, i0, i1, dim=1)
                        weight = _softmax_weight(logits, col_shift[j0:j1], _part(col_factor, j0, j1), 0, True)  # dL/dC
                        if masked:
                            weight.masked_fill_(match, 0)
                        if need_row_pen:
                            grad_row_pen[i0:i1] -= weight.sum(1)
                        if need_row_w:
                            grad_row_w[i0:i1] -= (weight * dist).sum(1)
                        if row_w is not None:
                            weight.mul_(row_w[i0:i1, None])
                        grad_raw = weight if grad_raw is None else grad_raw.add_(weight)
                    sign = -1.0  # dL/draw = -(w_j dL/dA + w_i dL/dC), the sign applied in the products below
                    if negative is not None:
                        grad_raw.masked_fill_(negative, 0)
                if need_row_add:
                    grad_row_add[i0:i1].add_(grad_raw.sum(1), alpha=sign)
                if need_col_add:
                    grad_col_add[j0:j1].add_(grad_raw.sum(0), alpha=sign)
                if grad_q is not None:
                    grad_q[i0:i1].addmm_(grad_raw, k[j0:j1], alpha=sign)
                if need_k:
                    grad_k[j0:j1].addmm_(grad_raw.T, q_block, alpha=sign)
        if scale is not None and grad_q is not None:
            if need_scale:
                grad_scale = torch.dot(q.reshape(-1), grad_q.reshape(-1)).reshape(scale.shape)
            grad_q = grad_q.mul_(scale) if need_q else None
        grads = [grad_q, grad_k, grad_scale, grad_row_add, grad_col_add]
        grads += [grad_row_pen, grad_row_w, grad_col_pen, grad_col_w]
        return (*grads, None, None, None, None, None, None)


def _masked_logit(logits: Tensor) -> float:
    """The logit of a masked pair (false negatives): the dtype's most negative finite number, so a row whose every
    pair is masked keeps a finite running maximum (no inf - inf); its exp is clamped at EXP_FLOOR like any term far
    below the maximum, and such a row's log-sum-exp is ~ that minimum (the loss adds the positive back)."""
    return torch.finfo(logits.dtype).min


def _raw_tile(q_block, k_block, row_add, col_add, i0, i1, j0, j1) -> Tensor:
    """``q_block k_block^T + row_add_i + col_add_j``: ``(bm, bn)``, the column term fused into the product."""
    raw = q_block @ k_block.T if col_add is None else torch.addmm(col_add[j0:j1], q_block, k_block.T)
    return raw if row_add is None else raw.add_(row_add[i0:i1, None])


def _part(t: Tensor | None, start: int, stop: int) -> Tensor | None:
    return None if t is None else t[start:stop]


def _direction_logits(dist: Tensor, pen: Tensor | None, w: Tensor | None, start: int, stop: int, dim: int) -> Tensor:
    """``-pen - w * dist`` with per-candidate ``pen``, ``w`` sliced to ``[start:stop]`` and broadcast along ``dim``.

    ``dim=0``: candidates are columns (``pen``/``w`` indexed by j); ``dim=1``: candidates are rows (by i).
    Always returns a new tensor (``dist`` is still needed).
    """
    if pen is None:
        return dist * (-w[start:stop]).unsqueeze(dim) if w is not None else -dist
    neg_pen = (-pen[start:stop]).unsqueeze(dim)
    if w is None:
        return neg_pen - dist
    return torch.addcmul(neg_pen, dist, w[start:stop].unsqueeze(dim), value=-1)  # one pass over the tile


def _check_keys(q: Tensor, k: Tensor, row_keys: Tensor | None, col_keys: Tensor | None) -> None:
    if (row_keys is None) != (col_keys is None):
        raise ValueError("row_keys and col_keys go together (both or neither)")
    if row_keys is not None and (row_keys.shape[0] != q.shape[0] or col_keys.shape[0] != k.shape[0]
                                 or row_keys.shape[1:] != col_keys.shape[1:]):
        raise ValueError(f"keys {tuple(row_keys.shape)} and {tuple(col_keys.shape)} do not match the rows "
                         f"{q.shape[0]} and columns {k.shape[0]}")


def _check_pair(q: Tensor, k: Tensor, block: int) -> None:
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"expected (M, D) and (N, D) inputs, got {tuple(q.shape)} and {tuple(k.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")


def pair_lse(
    q: Tensor,
    k: Tensor,
    scale: Tensor | None = None,
    rows: bool = True,
    cols: bool = True,
    block: int = DEFAULT_BLOCK,
    *,
    row_keys: Tensor | None = None,
    col_keys: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Row-wise and column-wise log-sum-exp of ``t Q K^T`` without materialising it.

    Args:
        q: ``(M, D)`` queries.
        k: ``(N, D)`` keys.
        scale: scalar tensor t (InfoNCE's ``exp(logit_scale)``), or ``None`` for 1. Passing it here rather
            than ``t * q`` saves an ``(M, D)`` copy and its gradient.
        rows: compute ``logsumexp_j t (Q K^T)_ij``, shape ``(M,)``.
        cols: compute ``logsumexp_i t (Q K^T)_ij``, shape ``(N,)``.
        block: tile side; memory O(block^2) beyond inputs and gradients.
        row_keys, col_keys: ``(M, K)``, ``(N, K)`` group keys (probloss/false_negatives.py): pairs whose keys
            match are left out of both log-sum-exps (their gradient is exactly 0). ``None``: every pair counts.

    Returns:
        ``(row_lse, col_lse)``, ``None`` for a direction not asked for.
    """
    _check_pair(q, k, block)
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"scale must be a scalar tensor, got shape {tuple(scale.shape)}")
    _check_keys(q, k, row_keys, col_keys)
    row, col = _PairLSE.apply(q, k, scale, None, None, None, None, None, None, False, rows, cols, block, row_keys,
                              col_keys)
    return (row if rows else None), (col if cols else None)


def dist_pair_lse(
    q: Tensor,
    k: Tensor,
    col_pen: Tensor | None,
    col_w: Tensor | None,
    row_pen: Tensor | None = None,
    row_w: Tensor | None = None,
    rows: bool = True,
    cols: bool = False,
    block: int = DEFAULT_BLOCK,
    *,
    scale: float | Tensor | None = None,
    row_add: Tensor | None = None,
    col_add: Tensor | None = None,
    row_keys: Tensor | None = None,
    col_keys: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Log-sum-exp of Gaussian-style distance logits, tile by tile.

    With the squared distance ``R_ij = scale * q_i . k_j + row_add_i + col_add_j`` and ``d_ij = max(R_ij, 0)``
    (either ``Q K^T`` alone is a squared distance, see :func:`sq_dist_features`, or, for plain squared
    distances, ``scale=-2, row_add=|x|^2, col_add=|y|^2`` with the raw embeddings: no augmented copies):

    - rows (query i picks among candidates j): ``logsumexp_j (-col_pen_j - col_w_j d_ij)``, shape ``(M,)``;
    - cols (query j picks among candidates i): ``logsumexp_i (-row_pen_i - row_w_i d_ij)``, shape ``(N,)``.

    The clamp matches the dense losses' ``clamp_min(0)`` including its gradient (zero where ``R_ij < 0``; on
    CUDA checking a tile for such entries costs one host sync per tile).

    Args:
        q, k: ``(M, E)``, ``(N, E)`` embeddings or augmented features.
        col_pen, col_w: ``(N,)`` per-column penalty and weight (needed for ``rows``); ``None`` = 0 and 1.
        row_pen, row_w: ``(M,)`` per-row penalty and weight (needed for ``cols``); ``None`` = 0 and 1.
        rows, cols: which directions to compute.
        block: tile side.
        scale: scalar multiplying ``Q K^T`` (a float or scalar tensor; ``None`` = 1).
        row_add, col_add: ``(M,)``, ``(N,)`` terms added to the rows / columns of ``R`` (``None`` = 0).
        row_keys, col_keys: group keys leaving matching pairs out of both directions, as in :func:`pair_lse`.
    """
    _check_pair(q, k, block)
    for name, value, size in (("col_pen", col_pen, k.shape[0]), ("col_w", col_w, k.shape[0]),
                              ("row_pen", row_pen, q.shape[0]), ("row_w", row_w, q.shape[0]),
                              ("row_add", row_add, q.shape[0]), ("col_add", col_add, k.shape[0])):
        if value is not None and tuple(value.shape) != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(value.shape)}")
    if scale is not None and not isinstance(scale, Tensor):
        scale = q.new_tensor(float(scale))
    _check_keys(q, k, row_keys, col_keys)
    row, col = _PairLSE.apply(q, k, scale, row_add, col_add, row_pen, row_w, col_pen, col_w, True, rows, cols, block,
                              row_keys, col_keys)
    return (row if rows else None), (col if cols else None)


def sq_dist_features(x: Tensor, y: Tensor, y_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Augmented features ``(Q, K)`` with ``Q K^T`` the (weighted) squared distance, for :func:`dist_pair_lse`.

    - ``y_weight=None``: ``Q = [x, |x|^2, 1]``, ``K = [-2y, 1, |y|^2]`` so ``(Q K^T)_ij = |x_i|^2 + |y_j|^2 -
      2 x_i . y_j = ||x_i - y_j||^2`` (``D + 2`` features).
    - ``y_weight`` ``(N, D)`` (diagonal Gaussian, per-candidate per-dimension weights w):
      ``Q = [x^2, x, 1]``, ``K = [w, -2 y w, sum_k y_k^2 w_k]`` so ``(Q K^T)_ij = sum_k w_jk (x_ik - y_jk)^2``
      (``2D + 1`` features: about twice the matrix-product cost).
    """
    ones_x, ones_y = x.new_ones(x.shape[0], 1), y.new_ones(y.shape[0], 1)
    if y_weight is None:
        q = torch.cat([x, x.pow(2).sum(-1, keepdim=True), ones_x], dim=1)
        k = torch.cat([-2 * y, ones_y, y.pow(2).sum(-1, keepdim=True)], dim=1)
    else:
        q = torch.cat([x.pow(2), x, ones_x], dim=1)
        k = torch.cat([y_weight, -2 * y * y_weight, (y.pow(2) * y_weight).sum(-1, keepdim=True)], dim=1)
    return q, k


def offset_features(x: Tensor, y: Tensor, row_offset: Tensor, col_offset: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, k)`` with ``q_i . k_j = x_i . y_j + row_offset_i + col_offset_j``: ``q = [x, r, 1]``, ``k = [y, 1, c]``.

    Pairwise logits with per-sample additive terms (ProLIP's and PCME++'s variances, PCME++'s squared norms) then
    go through the plain pair kernels at two extra features, and autograd carries the gradients of the
    offsets; no (B x N) offset matrix is formed.
    """
    ones_x, ones_y = x.new_ones(x.shape[0], 1), y.new_ones(y.shape[0], 1)
    return torch.cat([x, row_offset[:, None], ones_x], dim=1), torch.cat([y, ones_y, col_offset[:, None]], dim=1)


class SinglePassSum(torch.autograd.Function):
    """Base of the single-pass kernels (module docstring): ``forward`` returns a scalar sum and saves, with
    ``save_for_backward``, the gradients of its leading inputs for an incoming gradient of 1 (``None`` where one
    is not needed); ``backward`` only scales them. Later inputs (options) get no gradient."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        grads = [None if g is None else g * grad for g in ctx.saved_tensors]
        return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))


class _SoftplusPairSum(SinglePassSum):
    """sum_ij softplus(l_ij) - w * sum_ij c_ij l_ij, l = t * x_i . y_j + b, in one pass over the tiles.

    A pair term's gradient needs nothing but its own logit (d/dl = sigmoid(l) - w c), so the forward sweep also
    accumulates the gradients for an incoming gradient of 1 -- three tile products, the count of the
    matrix-product floor -- and saves them (O((B + N) x D)); backward only scales them. (A softmax's gradient
    needs the row and column sums first: pair_lse takes two passes.) ``with_grad=False`` (no grad mode, e.g.
    evaluation) skips the two gradient products.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, block: int, row_threshold: Tensor | None,
                col_threshold: Tensor | None, threshold_weight: float, with_grad: bool) -> Tensor:
        need_x, need_y, need_scale, need_bias = (with_grad and n for n in ctx.needs_input_grad[:4])
        with_grad = need_x or need_y or need_scale or need_bias
        total = x.new_zeros(())
        grad_x = torch.zeros_like(x) if need_x else None
        grad_y = torch.zeros_like(y) if need_y else None
        weighted_logits, weight_sum = x.new_zeros(()), x.new_zeros(())  # sum_ij g_ij l_ij and sum_ij g_ij
        for i0, i1 in tiles(x.shape[0], block):
            x_block = x[i0:i1] * scale  # (bm, D): the scale costs a row block, not a pass over every tile
            for j0, j1 in tiles(y.shape[0], block):
                logits = torch.addmm(bias, x_block, y[j0:j1].T)  # (bm, bn) = t x_i . y_j + b
                total += F.softplus(logits).sum()
                counts = None
                if threshold_weight:
                    counts = _threshold_counts(logits, row_threshold, col_threshold, i0, i1, j0, j1)
                    total -= threshold_weight * torch.dot(counts.reshape(-1), logits.reshape(-1))
                if not with_grad:
                    continue
                weight = torch.sigmoid(logits)  # g_ij = d softplus(l) / dl
                if counts is not None:  # the counts are constants: d (c l) / dl = c
                    weight.sub_(counts, alpha=threshold_weight)
                if need_scale or need_bias:
                    weight_sum += weight.sum()
                if need_scale:
                    weighted_logits += torch.dot(weight.reshape(-1), logits.reshape(-1))
                if need_x:
                    grad_x[i0:i1].addmm_(weight, y[j0:j1])  # dl/dx_i = t y_j, t applied once at the end
                if need_y:
                    grad_y[j0:j1].addmm_(weight.T, x_block)  # dl/dy_j = t x_i (x_block holds the t)
        if need_x:
            grad_x.mul_(scale)
        # dl/dt = x_i . y_j = (l - b) / t, summed without keeping the unscaled products
        grad_scale = (weighted_logits - bias * weight_sum) / scale if need_scale else None
        grad_bias = weight_sum.reshape(bias.shape) if need_bias else None
        ctx.save_for_backward(grad_x, grad_y, grad_scale, grad_bias)
        return total


def _threshold_counts(logits: Tensor, row_threshold: Tensor | None, col_threshold: Tensor | None,
                      i0: int, i1: int, j0: int, j1: int) -> Tensor:
    """``[l_ij >= row_threshold_i] + [l_ij >= col_threshold_j]`` on one tile, in the logits' dtype."""
    counts = torch.zeros_like(logits)
    if row_threshold is not None:
        counts += logits >= row_threshold[i0:i1, None]
    if col_threshold is not None:
        counts += logits >= col_threshold[None, j0:j1]
    return counts


def softplus_pair_sum(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, block: int | None = DEFAULT_BLOCK,
                      row_threshold: Tensor | None = None, col_threshold: Tensor | None = None,
                      threshold_weight: float = 0.0) -> Tensor:
    """``sum_ij softplus(l_ij) - threshold_weight * sum_ij c_ij l_ij`` with ``l_ij = scale * x_i . y_j + bias``.

    ``x (B, D)``, ``y (N, D)``, scalar ``scale`` and ``bias``. The first sum is SigLIP's loss over negative pairs
    (``-log sigmoid(-l) = softplus(l)``). The second is optional: ``c_ij = [l_ij >= row_threshold_i] +
    [l_ij >= col_threshold_j]`` counts the directions in which pair ij scores at least as high as a per-row
    ``(B,)`` / per-column ``(N,)`` threshold (PCME++'s pseudo-positives: the positive's logit); the counts are
    constants for the gradient (``d/dl = sigmoid(l) - threshold_weight * c``), thresholds get no gradient, and
    ``+inf`` never counts. With ``block=None`` it is the plain dense expression; otherwise ``(block, block)``
    tiles are processed one at a time and the gradients accumulated in the same pass (single pass: the
    floor's three products), so no ``(B, N)`` matrix is kept.
    """
    if threshold_weight:
        row_threshold = None if row_threshold is None else row_threshold.detach()
        col_threshold = None if col_threshold is None else col_threshold.detach()
    if block is None:
        logits = scale * (x @ y.T) + bias
        total = F.softplus(logits).sum()
        if threshold_weight:
            with torch.no_grad():
                counts = _threshold_counts(logits, row_threshold, col_threshold, 0, x.shape[0], 0, y.shape[0])
            total = total - threshold_weight * (counts * logits).sum()
        return total
    return _SoftplusPairSum.apply(x, y, scale, bias, block, row_threshold, col_threshold, threshold_weight,
                                  torch.is_grad_enabled())
