"""A variance-aware sigmoid loss: the proposal's distance and log-std inside SigLIP's pairwise sigmoid.

Combines the Gaussian log-std loss (openai/CLIP issue "Just a loss function for discussion", 072jiajia 2022;
losses/gaussian_var.py) with SigLIP (Zhai et al., ICCV 2023; losses/sigmoid.py). A pair is scored by the
proposal's logit with the variance of the DIFFERENCE of the two Gaussians, v_ij = sigma_I,i^2 + sigma_T,j^2,
so the score is symmetric in image and text, as a pairwise sigmoid needs::

    d_ij = ||x_i - y_j||^2
    logits_ij = t * ( -ln sqrt(v_ij) - d_ij / v_ij ) + b
    loss = -sum_ij log_sigmoid(z_ij * logits_ij) / N          # z = +1 on the diagonal, -1 elsewhere

With equal sigmas this is SigLIP on squared distances; a large v_ij flattens the pair's score towards
t * (-ln sqrt(v)) + b, i.e. an uncertain sample is neither a confident match nor a confident non-match, and
-ln sqrt(v) is the penalty that stops every sigma from growing.

Initialisation: t = 10 as SigLIP, and b chosen so the first logits equal SigLIP's t * cos - 10. For unit
vectors d_ij = 2 - 2 cos_ij, so with sigma = 1 (v = 2, the towers' default ``init_log_std=0``)
logits_ij = t * cos_ij - t * (1 + ln(2) / 2) + b, hence b = -10 + 10 * (1 + ln(2) / 2) = 3.47. SigLIP's own
b = -10 here starts every logit near -24 and trains poorly (configs/experiment/sigmoid_var_init.yaml:
zero-shot 0.16 vs 0.26, effective rank 3.4 vs 9.8 at 600 steps).

Hard negatives: ``text_emb`` may have M >= N rows, the N positives then M - N extra texts (with their own
log-stds); every (image, extra text) pair is one more negative pair (z = -1) and the sum is still divided by the
number of images N, as SigLIP normalises. With M == N nothing changes.

Shapes: image_emb (N, D), text_emb (M, D), log-stds (N,) and (M,), every rank the same N and M.
``normalize=True`` (default) L2-normalises the embeddings
first (d in [0, 4]). Distributed exactly like ``sigmoid``: positives and local negatives on each rank, the other
ranks' texts and text log-stds arrive over the ring (``dist_impl`` "ring", "shift") or by all-gather
("gather"). ``impl="tiled"`` computes the pair sums in (block x block) tiles and recomputes them in backward,
so no (B x N) matrix is kept.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import probloss
from probloss import dist
from probloss.dist import DIST_IMPLS
from probloss.loss import positive_texts
from probloss.tiled import DEFAULT_BLOCK, IMPLS, use_tiled

# SigLIP's starting logits t * cos - 10 at t = 10 and sigma = 1 (see the module docstring).
SIGLIP_MATCHED_BIAS = -10.0 + 10.0 * (1.0 + 0.5 * math.log(2.0))


def pair_terms(x, y, image_log_std, text_log_std):
    """Per-pair pieces, each ``(B, N)``: the unscaled logit ``-ln sqrt(v) - d / v``, ``d``, ``1 / v``, and where
    ``d`` was not clamped (its gradient is zero there)."""
    sq_dist_raw = x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1) - 2 * x @ y.T
    sq_dist = sq_dist_raw.clamp_min(0)  # cancellation can dip just below zero
    var = torch.exp(2 * image_log_std)[:, None] + torch.exp(2 * text_log_std)[None, :]
    inv_var = var.reciprocal()
    return -0.5 * torch.log(var) - sq_dist * inv_var, sq_dist, inv_var, sq_dist_raw > 0


def pair_logits(x, y, image_log_std, text_log_std, scale, bias):
    """``(B, N)`` logits ``t * (-ln sqrt(v_ij) - d_ij / v_ij) + b``."""
    return scale * pair_terms(x, y, image_log_std, text_log_std)[0] + bias


def _tiles(n_rows: int, n_cols: int, block: int):
    for row in range(0, n_rows, block):
        for col in range(0, n_cols, block):
            yield slice(row, row + block), slice(col, col + block)


class _VarSoftplusPairSum(torch.autograd.Function):
    """sum_ij softplus(pair_logits_ij), tile by tile (block x block), recomputed in backward."""

    @staticmethod
    def forward(ctx, x, y, image_log_std, text_log_std, scale, bias, block):
        total = x.new_zeros(())
        for rows, cols in _tiles(x.shape[0], y.shape[0], block):
            total += F.softplus(pair_logits(x[rows], y[cols], image_log_std[rows], text_log_std[cols], scale, bias)).sum()
        ctx.save_for_backward(x, y, image_log_std, text_log_std, scale, bias)
        ctx.block = block
        return total

    @staticmethod
    def backward(ctx, grad):
        x, y, image_log_std, text_log_std, scale, bias = ctx.saved_tensors
        grad_x, grad_y = torch.zeros_like(x), torch.zeros_like(y)
        grad_lx, grad_ly = torch.zeros_like(image_log_std), torch.zeros_like(text_log_std)
        grad_scale, grad_bias = scale.new_zeros(()), bias.new_zeros(())
        for rows, cols in _tiles(x.shape[0], y.shape[0], ctx.block):
            x_tile, y_tile, lx_tile, ly_tile = x[rows], y[cols], image_log_std[rows], text_log_std[cols]
            inner, sq_dist, inv_var, unclamped = pair_terms(x_tile, y_tile, lx_tile, ly_tile)
            weight = torch.sigmoid(scale * inner + bias) * grad  # d softplus(l) / dl
            grad_bias += weight.sum()
            grad_scale += (weight * inner).sum()
            weight_inv_var = weight * inv_var
            # through d: dl/dd = -t / v, and dd/dx_i = 2 (x_i - y_j) where d was not clamped
            weight_dist = (-scale * weight_inv_var) * unclamped
            grad_x[rows] += 2 * (x_tile * weight_dist.sum(1, keepdim=True) - weight_dist @ y_tile)
            grad_y[cols] += 2 * (y_tile * weight_dist.sum(0)[:, None] - weight_dist.T @ x_tile)
            # through v: dl/dv = t (d / v - 1 / 2) / v, and dv/d(ln sigma) = 2 sigma^2
            weight_var = scale * weight_inv_var * (sq_dist * inv_var - 0.5)
            grad_lx[rows] += weight_var.sum(1) * 2 * torch.exp(2 * lx_tile)
            grad_ly[cols] += weight_var.sum(0) * 2 * torch.exp(2 * ly_tile)
        return grad_x, grad_y, grad_lx, grad_ly, grad_scale, grad_bias, None


def var_softplus_pair_sum(x, y, image_log_std, text_log_std, scale, bias, block=None):
    """``sum_ij softplus(pair_logits_ij)``: dense autograd (``block=None``) or tiled with recomputation."""
    if block is None:
        return F.softplus(pair_logits(x, y, image_log_std, text_log_std, scale, bias)).sum()
    return _VarSoftplusPairSum.apply(x, y, image_log_std, text_log_std, scale, bias, block)


@probloss.register_loss("sigmoid_var")
class SigmoidVarLoss(probloss.ContrastiveLoss):
    """Args:
        init_logit_scale: initial t' (t = exp(t')), SigLIP's log(10).
        init_logit_bias: initial b; the default 10 * (1 + ln(2) / 2) - 10 = 3.4657... starts the logits at
            SigLIP's 10 cos - 10 for unit sigma (module docstring); SigLIP's own -10 trains poorly here.
        normalize: L2-normalise embeddings before the distances.
        dist_impl: "ring", "shift" or "gather", as for ``sigmoid``.
        impl: "dense", "tiled" or "auto" (tiled above ``block_size`` rows).
        block_size: rows per block for the tiled kernel.
    """

    needs_log_std = True
    distributed_variants = [
        {"dist_impl": dist_impl, "impl": impl, "block_size": 2} for dist_impl in DIST_IMPLS for impl in ("dense", "tiled")
    ]

    def __init__(
        self,
        init_logit_scale: float = math.log(10),
        init_logit_bias: float = SIGLIP_MATCHED_BIAS,
        normalize: bool = True,
        dist_impl: str = "ring",
        impl: str = "auto",
        block_size: int = DEFAULT_BLOCK,
    ):
        super().__init__()
        self.check_choice("dist_impl", dist_impl, DIST_IMPLS)
        self.check_choice("impl", impl, IMPLS)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.normalize, self.dist_impl, self.impl, self.block_size = normalize, dist_impl, impl, block_size

    def embed(self, emb):
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def compute_loss(self, image_emb, text_emb, image_log_std, text_log_std):
        x, y = self.embed(image_emb), self.embed(text_emb)
        t, b = self.logit_scale.exp(), self.logit_bias
        block = self.block_size if use_tiled(self.impl, x.shape[0], self.block_size) else None
        # Positives: -log_sigmoid(l_ii) = softplus(l_ii) - l_ii (the diagonal of the all-pairs sum, over all M
        # texts, turned around).
        n = x.shape[0]
        diag_dist = (x - positive_texts(y, n)).pow(2).sum(-1)
        diag_var = torch.exp(2 * image_log_std) + torch.exp(2 * positive_texts(text_log_std, n))
        diag_logits = t * (-0.5 * torch.log(diag_var) - diag_dist / diag_var) + b
        total = var_softplus_pair_sum(x, y, image_log_std, text_log_std, t, b, block) - diag_logits.sum()
        # Texts travel with their log-std as one (M, D + 1) block.
        texts = torch.cat([y, text_log_std[:, None]], dim=1)
        for other in dist.other_rank_blocks(texts, self.dist_impl, what="sigmoid_var loss"):  # negatives only
            total = total + var_softplus_pair_sum(x, other[:, :-1], image_log_std, other[:, -1], t, b, block)
        return total / x.shape[0]

    @property
    def scores_raw_embeddings(self) -> bool:
        return not self.normalize

    def compute_scores(self, image_emb, text_emb, image_log_std, text_log_std):
        x, y = self.embed(image_emb), self.embed(text_emb)
        return pair_logits(x, y, image_log_std, text_log_std, self.logit_scale.exp(), self.logit_bias)
