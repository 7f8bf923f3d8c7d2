"""Memory-tiled kernels: pairwise loss terms computed block by block, recomputed in backward.

A dense ``(B, N)`` logit matrix, kept alive for backward by autograd, dominates a contrastive loss's memory.
These autograd functions save only their inputs and recompute each ``(block, N)`` slab in backward, so the
memory is O((B + N) x D + block x N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DEFAULT_BLOCK = 1024


class _SoftplusPairSum(torch.autograd.Function):
    """sum_ij softplus(t * x_i . y_j + b) with gradient sigmoid(logits), block by block over rows of x."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, block: int) -> Tensor:
        total = x.new_zeros(())
        for start in range(0, x.shape[0], block):
            logits = (x[start : start + block] @ y.T).mul_(scale).add_(bias)  # (block, N)
            total += F.softplus(logits).sum()
        ctx.save_for_backward(x, y, scale, bias)
        ctx.block = block
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, scale, bias = ctx.saved_tensors
        need_x, need_y, need_scale, need_bias, _ = ctx.needs_input_grad
        grad_x = torch.empty_like(x) if need_x else None
        grad_y = torch.zeros_like(y) if need_y else None
        grad_scale = scale.new_zeros(()) if need_scale else None
        grad_bias = bias.new_zeros(()) if need_bias else None
        for start in range(0, x.shape[0], ctx.block):
            x_block = x[start : start + ctx.block]
            similarity = x_block @ y.T  # (block, N)
            weight = torch.sigmoid(similarity * scale + bias) * grad  # d softplus(l) / dl = sigmoid(l)
            if need_scale:
                grad_scale += (weight * similarity).sum()
            if need_bias:
                grad_bias += weight.sum()
            if need_x:
                grad_x[start : start + ctx.block] = (weight @ y) * scale
            if need_y:
                grad_y += (weight.T @ x_block) * scale
        return grad_x, grad_y, grad_scale, grad_bias, None


def softplus_pair_sum(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, block: int | None = DEFAULT_BLOCK) -> Tensor:
    """``sum_ij softplus(scale * x_i . y_j + bias)`` for ``x (B, D)``, ``y (N, D)``, scalar ``scale``, ``bias``.

    This is SigLIP's loss summed over negative pairs (``-log sigmoid(-l) = softplus(l)``). With ``block=None``
    it is the plain dense expression; otherwise rows are processed ``block`` at a time and recomputed in
    backward, so no ``(B, N)`` matrix is kept.
    """
    if block is None:
        return F.softplus(scale * (x @ y.T) + bias).sum()
    return _SoftplusPairSum.apply(x, y, scale, bias, block)
