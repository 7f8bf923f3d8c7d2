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
b = -10 here starts every logit near -24 and trains poorly (``probloss recipe recipe=sigmoid_var_init``; what it
measured: docs/notebook.md, "Numbers moved out of the code").

Hard negatives: ``text_emb`` may have M >= N rows, the N positives then M - N extra texts (with their own
log-stds); every (image, extra text) pair is one more negative pair (z = -1) and the sum is still divided by the
number of images N, as SigLIP normalises. With M == N nothing changes.

Shapes: image_emb (N, D), text_emb (M, D), log-stds (N,) and (M,), every rank the same N and M.
``normalize=True`` (default) L2-normalises the embeddings
first (d in [0, 4]). Distributed exactly like ``sigmoid``: positives and local negatives on each rank, the other
ranks' texts and text log-stds arrive over the ring (``dist_impl`` "ring", "shift") or by all-gather
("gather"). ``impl="tiled"`` computes the pair sums in (block x block) tiles and their gradients in the same
pass, so no (B x N) matrix is kept and no tile is computed twice.

False negatives (``false_negatives``, probloss/false_negatives.py; ids passed as ``text_groups`` /
``image_groups``): a pair (image i, text j), j not i's positive, whose caption (or scene) is identical to i's is
a false negative. ``keep`` (default): the loss above. ``mask``: its pair term leaves the sum (the division stays).
``positive``: it gets the positive label. The pairs are found from group keys that travel with the texts (around
the ring, or gathered) and their terms corrected one by one after the all-pairs sum, so the kernels are unchanged.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import probloss
from probloss import dist
from probloss.dist import DIST_IMPLS
from probloss.false_negatives import false_negative_pairs, sigmoid_correction, take, with_keys
from probloss.loss import positive_texts
from probloss.tiled import DEFAULT_BLOCK, IMPLS, SinglePassSum, tiles, use_tiled

# SigLIP's starting logits t * cos - 10 at t = 10 and sigma = 1 (see the module docstring).
SIGLIP_MATCHED_BIAS = -10.0 + 10.0 * (1.0 + 0.5 * math.log(2.0))


def pair_logits(x, y, image_log_std, text_log_std, scale, bias):
    """``(B, N)`` logits ``t * (-ln sqrt(v_ij) - d_ij / v_ij) + b`` (dense; the tiled kernel's reference)."""
    sq_dist = (x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1) - 2 * x @ y.T).clamp_min(0)  # cancellation dips < 0
    var = torch.exp(2 * image_log_std)[:, None] + torch.exp(2 * text_log_std)[None, :]
    return scale * (-0.5 * torch.log(var) - sq_dist * var.reciprocal()) + bias


def row_pair_logits(x, y, image_log_std, text_log_std, scale, bias):
    """``(P,)`` logits of matched rows ``(x_p, y_p)``, the same formula as :func:`pair_logits`."""
    sq_dist = (x - y).pow(2).sum(-1)
    var = torch.exp(2 * image_log_std) + torch.exp(2 * text_log_std)
    return scale * (-0.5 * torch.log(var) - sq_dist / var) + bias


class _VarSoftplusPairSum(SinglePassSum):
    """sum_ij softplus(pair_logits_ij), tile by tile, the gradients accumulated in the same pass.

    A pair term's gradient needs only its own logit, so the forward sweep computes every tile once and adds its
    gradients (for an incoming gradient of 1) to O((B + N) x D) accumulators; backward only scales them: three
    tile products in all, as the matrix-product floor. Per tile, with g = sigmoid(l), u = 1 / v, s = d u::

        dL/db = sum g,  dL/dt = sum g (l - b) / t,  dL/dd = -t g u,  dL/dv = t g u (s - 1/2)
        dL/dx_i = -2 t (x_i sum_j G_ij - sum_j G_ij y_j),  G = g u where d was not clamped (dd/dx_i = 2 (x_i - y_j))
        dL/d(ln sigma_i) = 2 sigma_i^2 sum_j dL/dv_ij

    ``with_grad=False`` (no grad mode) computes the value alone.
    """

    @staticmethod
    def forward(ctx, x, y, image_log_std, text_log_std, scale, bias, block, with_grad):
        need = [with_grad and n for n in ctx.needs_input_grad[:6]]
        with_grad = any(need)
        total = x.new_zeros(())
        x_sq, y_sq = x.pow(2).sum(-1), y.pow(2).sum(-1)
        image_var, text_var = torch.exp(2 * image_log_std), torch.exp(2 * text_log_std)
        if with_grad:  # unscaled accumulators: sum_j G_ij y_j, sum_j G_ij, sum_j g u (s - 1/2), ... (docstring)
            pull_x, pull_y = torch.zeros_like(x), torch.zeros_like(y)
            weight_x, weight_y = x.new_zeros(x.shape[0]), y.new_zeros(y.shape[0])
            var_x, var_y = x.new_zeros(x.shape[0]), y.new_zeros(y.shape[0])
            weighted_logits, weight_sum = x.new_zeros(()), x.new_zeros(())
        for i0, i1 in tiles(x.shape[0], block):
            x_block = x[i0:i1]
            for j0, j1 in tiles(y.shape[0], block):
                y_block = y[j0:j1]
                sq_dist = torch.addmm(y_sq[j0:j1], x_block, y_block.T, alpha=-2).add_(x_sq[i0:i1, None])
                clamped = sq_dist < 0 if with_grad and bool(sq_dist.amin() < 0) else None  # rare: x_i ~ y_j
                sq_dist.clamp_min_(0)  # cancellation can dip just below zero
                inv_var = image_var[i0:i1, None] + text_var[None, j0:j1]
                logits = torch.log(inv_var).mul_(-0.5)  # -ln sqrt(v)
                inv_var.reciprocal_()
                scaled_dist = sq_dist.mul_(inv_var)  # s = d / v
                logits.sub_(scaled_dist)  # the unscaled logit -ln sqrt(v) - d / v
                logits = torch.addcmul(bias, logits, scale)
                total += F.softplus(logits).sum()
                if not with_grad:
                    continue
                weight = torch.sigmoid(logits)  # g = d softplus(l) / dl
                weight_sum += weight.sum()
                weighted_logits += torch.dot(weight.reshape(-1), logits.reshape(-1))
                weight.mul_(inv_var)  # g u
                var_weight = scaled_dist.sub_(0.5).mul_(weight)  # g u (s - 1/2)
                var_x[i0:i1] += var_weight.sum(1)
                var_y[j0:j1] += var_weight.sum(0)
                if clamped is not None:
                    weight.masked_fill_(clamped, 0)  # no gradient through d where it was clamped
                weight_x[i0:i1] += weight.sum(1)
                weight_y[j0:j1] += weight.sum(0)
                pull_x[i0:i1].addmm_(weight, y_block)
                pull_y[j0:j1].addmm_(weight.T, x_block)
        grads = [None] * 6
        if with_grad:
            grads = [pull_x.sub_(x * weight_x[:, None]).mul_(2 * scale),  # -2t (x_i sum_j G_ij - sum_j G_ij y_j)
                     pull_y.sub_(y * weight_y[:, None]).mul_(2 * scale),
                     var_x.mul_(image_var).mul_(2 * scale), var_y.mul_(text_var).mul_(2 * scale),
                     (weighted_logits - bias * weight_sum) / scale, weight_sum.reshape(bias.shape)]
            grads = [g if n else None for g, n in zip(grads, need)]
        ctx.save_for_backward(*grads)
        return total


def var_softplus_pair_sum(x, y, image_log_std, text_log_std, scale, bias, block=None):
    """``sum_ij softplus(pair_logits_ij)``: dense autograd (``block=None``) or tiled in a single pass."""
    if block is None:
        return F.softplus(pair_logits(x, y, image_log_std, text_log_std, scale, bias)).sum()
    return _VarSoftplusPairSum.apply(x, y, image_log_std, text_log_std, scale, bias, block, torch.is_grad_enabled())


@probloss.register_loss("sigmoid_var")
class SigmoidVarLoss(probloss.ContrastiveLoss):
    """Args:
        init_logit_scale: initial t' (t = exp(t')), SigLIP's log(10).
        init_logit_bias: initial b; the default 10 * (1 + ln(2) / 2) - 10 = 3.4657... starts the logits at
            SigLIP's 10 cos - 10 for unit sigma (module docstring); SigLIP's own -10 trains poorly here.
        normalize: L2-normalise embeddings before the distances.
        dist_impl: "ring", "shift" or "gather", as for ``sigmoid``.
        impl: "dense", "tiled" or "auto" (tiled above ``block_size`` rows).
        false_negatives: "keep", "mask" or "positive" (module docstring).
        block_size: rows per block for the tiled kernel (on a GPU: 4096 or more).
    """

    invariances = ("scale",)  # unit vectors; normalize=False: distances, shift only (invariances_in_use)

    def invariances_in_use(self):
        """Unit vectors ignore a scale; raw distances ignore a shift but not a scale (v_ij = sigma^2 + sigma^2
        would have to grow by c^2, moving every logit by -t ln c, which a sigmoid with a bias does not ignore)."""
        return ("scale",) if self.normalize else ("shift",)

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
        false_negatives: str = "keep",
    ):
        super().__init__()
        self.set_false_negatives(false_negatives)
        self.check_choice("dist_impl", dist_impl, DIST_IMPLS)
        self.check_choice("impl", impl, IMPLS)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.normalize, self.dist_impl, self.impl, self.block_size = normalize, dist_impl, impl, block_size

    def embed(self, emb):
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def compute_loss(self, image_emb, text_emb, image_log_std, text_log_std, keys=None):
        x, y = self.embed(image_emb), self.embed(text_emb)
        t, b = self.logit_scale.exp(), self.logit_bias
        block = self.block_size if use_tiled(self.impl, x.shape[0], self.block_size) else None
        # Positives: -log_sigmoid(l_ii) = softplus(l_ii) - l_ii (the diagonal of the all-pairs sum, over all M
        # texts, turned around).
        n = x.shape[0]
        diag_logits = row_pair_logits(x, positive_texts(y, n), image_log_std, positive_texts(text_log_std, n), t, b)
        total = var_softplus_pair_sum(x, y, image_log_std, text_log_std, t, b, block) - diag_logits.sum()
        if keys is not None:  # false negatives among this rank's own texts (not i's own positive)
            r, c = false_negative_pairs(keys[0], keys[1], torch.arange(n, device=x.device))
            total = total - sigmoid_correction(
                row_pair_logits(take(x, r), take(y, c), take(image_log_std, r), take(text_log_std, c), t, b),
                self.false_negatives)
        # Texts travel with their log-std as one (M, D + 1) block, and their group keys beside it.
        texts = torch.cat([y, text_log_std[:, None]], dim=1)
        blocks = dist.other_rank_blocks(texts, self.dist_impl, what="sigmoid_var loss")  # negatives only
        key_blocks = None if keys is None else dist.other_rank_blocks(keys[1], self.dist_impl, what="sigmoid_var loss")
        for other, key_block in with_keys(blocks, key_blocks):
            total = total + var_softplus_pair_sum(x, other[:, :-1], image_log_std, other[:, -1], t, b, block)
            if key_block is not None:
                r, c = false_negative_pairs(keys[0], key_block)
                texts_c = take(other, c)  # (P, D + 1): embedding and log-std
                logits = row_pair_logits(take(x, r), texts_c[:, :-1], take(image_log_std, r), texts_c[:, -1], t, b)
                total = total - sigmoid_correction(logits, self.false_negatives)
        return total / x.shape[0]

    @property
    def scores_raw_embeddings(self) -> bool:
        return not self.normalize

    def compute_scores(self, image_emb, text_emb, image_log_std, text_log_std):
        x, y = self.embed(image_emb), self.embed(text_emb)
        return pair_logits(x, y, image_log_std, text_log_std, self.logit_scale.exp(), self.logit_bias)
