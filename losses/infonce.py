"""CLIP's symmetric InfoNCE (softmax) loss.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021.

With x_i, y_j the L2-normalised image and text embeddings and t = exp(logit_scale)::

    logits_ij = t * x_i . y_j                                   # (N, M), positives on the diagonal
    loss = ( CE_rows(logits, i) + CE_cols(logits[:, :N], i) ) / 2      # image->text and text->image

Hard negatives (NegCLIP, Yuksekgonul et al. 2023): ``text_emb`` may have M >= N rows, the N positives then
M - N extra texts. Image->text is a softmax over all M texts; text->image only for the N positive texts (an
extra text has no image to pick). With M == N this is CLIP's loss.

``logit_scale`` starts at log(1/0.07) and the logits use ``min(logit_scale, log(100))``, CLIP's cap. The cap
is functional, never an in-place clamp of the parameter, so ``score()`` and the forward have no side effects.
CLIP (and open_clip) instead clamp the parameter in place after every optimiser step; the two agree until the
parameter first passes the cap. Past it, this loss passes no gradient to ``logit_scale`` (the derivative of
``min`` is zero there), so the scale stays at exactly 100, whereas CLIP's clamped parameter still gets the
gradient at the cap and can come back down. We keep the true derivative rather than a surrogate gradient that
imitates CLIP's projected step: with it the distributed invariant holds exactly (a surrogate that depends on
the sign of each rank's gradient would not average over ranks to the single-process one) and gradcheck passes.

Shapes: ``image_emb`` (N, D), ``text_emb`` (M, D) on each rank (every rank the same N and M). Distributed:
embeddings (extra texts included) are all-gathered with autograd. ``local_loss=True`` scores this rank's rows
against every column in both directions, O(N x W M) memory; ``local_loss=False`` computes the whole
(W N, W M) matrix on every rank.

``impl``: ``dense`` materialises the logits; ``tiled`` computes the log-sum-exps block by block
(:func:`probloss.tiled.pair_lse`, O(B x D) memory, tiles recomputed in backward) over the gathered columns,
with the positive logit added by plain autograd; ``auto`` (default) is tiled when the number of gathered
columns exceeds ``block_size``. Both give the same values and gradients.

False negatives (``false_negatives``, probloss/false_negatives.py; group ids passed as ``text_groups`` /
``image_groups``): with P(i) = {i's positive} + every candidate whose caption (or scene) is identical to i's,

- ``keep`` (default): CLIP's loss above, ids ignored;
- ``mask``: ``CE_i = -l_ii + log sum_{j not in P(i) or j = i} exp l_ij``: the false negatives' logits are -inf in
  both directions (the tiled kernel leaves them out of its log-sum-exps);
- ``positive``: SupCon's L_out (Khosla et al. 2020; UniCL, Yang et al. 2022, uses it for image-text-label
  batches), ``CE_i = log sum_j exp l_ij - mean_{p in P(i)} l_ip``, both directions.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import probloss
from probloss import dist
from probloss.false_negatives import (
    dense_cross_entropy, false_negative_pairs, key_match, masked_ce, multi_positive_ce, take,
)
from probloss.loss import positive_columns, positive_texts
from probloss.tiled import DEFAULT_BLOCK, IMPLS, pair_lse, use_tiled


@probloss.register_loss("infonce")
class InfoNCE(probloss.ContrastiveLoss):
    """Args:
        init_logit_scale: initial log of the multiplicative scale t (CLIP: log(1/0.07)).
        max_logit_scale: cap of logit_scale in the logits (CLIP: log(100)); None disables it.
        learn_logit_scale: whether t is a learnable parameter.
        local_loss: distributed mode, see the module docstring.
        impl: "dense", "tiled" or "auto" (tiled above ``block_size`` gathered columns).
        false_negatives: "keep", "mask" or "positive" (module docstring).
        block_size: tile side for the tiled kernel (on a GPU: 4096 or more).
    """

    invariances = ("scale",)  # cosines of L2-normalised embeddings
    # What probloss.testing.check_distributed checks across real processes.
    distributed_variants = [
        {"local_loss": local_loss, "impl": impl, "block_size": 2}
        for local_loss in (True, False)
        for impl in ("dense", "tiled")
    ]

    def __init__(
        self,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float | None = math.log(100),
        learn_logit_scale: bool = True,
        local_loss: bool = True,
        impl: str = "auto",
        block_size: int = DEFAULT_BLOCK,
        false_negatives: str = "keep",
    ):
        super().__init__()
        self.set_false_negatives(false_negatives)
        self.check_choice("impl", impl, IMPLS)
        self.impl, self.block_size = impl, block_size
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learn_logit_scale)
        self.max_logit_scale = max_logit_scale
        self.local_loss = local_loss

    def logit_scale_in_use(self) -> torch.Tensor:
        """``min(logit_scale, max_logit_scale)``: CLIP's cap, without touching the parameter (module docstring)."""
        if self.max_logit_scale is None:
            return self.logit_scale
        return self.logit_scale.clamp(max=self.max_logit_scale)

    def compute_loss(self, image_emb, text_emb, image_log_std=None, text_log_std=None, keys=None):
        x, y = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
        n, m = x.shape[0], y.shape[0]  # m > n: extra texts, negatives only
        t = self.logit_scale_in_use().exp()
        # (W N, D) and (W M, D), rank-major; identity in one process
        all_x, all_y = dist.all_gather_cat(x), dist.all_gather_cat(y)
        if keys is not None:  # false negatives: group keys of every candidate, gathered like the embeddings
            keys = (*keys, dist.all_gather_cat(keys[0]), dist.all_gather_cat(keys[1]))
        if use_tiled(self.impl, all_y.shape[0], self.block_size):
            return self._tiled_loss(x, y, all_x, all_y, t, keys)
        if self.local_loss:
            # This rank's rows against every column, in both directions; positives at this rank's offset
            # (text column rank * M + i for image i, image column rank * N + i for text i).
            rows, rank = torch.arange(n, device=x.device), dist.get_rank()
            logits_i2t = t * x @ all_y.T  # (N, W M)
            logits_t2i = t * positive_texts(y, n) @ all_x.T  # (N, W N)
            if keys is None:
                loss_i2t = F.cross_entropy(logits_i2t, rows + rank * m)
                loss_t2i = F.cross_entropy(logits_t2i, rows + rank * n)
            else:
                image_keys, text_keys, all_image_keys, all_text_keys = keys
                loss_i2t = dense_cross_entropy(logits_i2t, rows + rank * m, key_match(image_keys, all_text_keys),
                                               self.false_negatives)
                loss_t2i = dense_cross_entropy(logits_t2i, rows + rank * n, key_match(text_keys[:n], all_image_keys),
                                               self.false_negatives)
        else:
            logits = t * all_x @ all_y.T  # (W N, W M), the same on every rank
            labels = torch.arange(logits.shape[0], device=x.device)
            if keys is not None:
                match = key_match(keys[2], keys[3])  # (W N, W M)
                columns = positive_columns(n, m, dist.get_world_size(), x.device)
                loss_i2t = dense_cross_entropy(logits, columns, match, self.false_negatives)
                loss_t2i = dense_cross_entropy(logits.T[columns], labels, match.T[columns], self.false_negatives)
            elif m == n:
                loss_i2t = F.cross_entropy(logits, labels)
                loss_t2i = F.cross_entropy(logits.T, labels)
            else:  # text->image for the positive texts only
                columns = positive_columns(n, m, dist.get_world_size(), x.device)
                loss_i2t = F.cross_entropy(logits, columns)
                loss_t2i = F.cross_entropy(logits.T[columns], labels)
        return (loss_i2t + loss_t2i) / 2

    def _tiled_loss(self, x, y, all_x, all_y, t, keys=None):
        """The same loss from tiled log-sum-exps: CE_i = lse_i - positive_i, no (B, B) matrix kept.

        False negatives: ``mask`` leaves every key-matching pair out of the kernel's log-sum-exps (the positive
        too) and adds the positive back; ``positive`` keeps the full log-sum-exps and subtracts the mean logit over
        each row's positives, the false-negative pairs found from the keys and scored one by one.
        """
        n, m = x.shape[0], y.shape[0]
        mask = keys is not None and self.false_negatives == "mask"
        if self.local_loss and dist.is_distributed():
            # (N, W M) and (N, W N): rows only. The positive of local row i is this rank's own pair (x_i, y_i).
            y = positive_texts(y, n)
            i2t_keys = t2i_keys = {}
            if keys is not None:
                image_keys, text_keys, all_image_keys, all_text_keys = keys
                text_keys = text_keys[:n]
                if mask:
                    i2t_keys = {"row_keys": image_keys, "col_keys": all_text_keys}
                    t2i_keys = {"row_keys": text_keys, "col_keys": all_image_keys}
            lse_i2t, _ = pair_lse(x, all_y, t, rows=True, cols=False, block=self.block_size, **i2t_keys)
            lse_t2i, _ = pair_lse(y, all_x, t, rows=True, cols=False, block=self.block_size, **t2i_keys)
            positive = t * (x * y).sum(-1)  # (N,)
            if keys is None:
                return ((lse_i2t - positive).mean() + (lse_t2i - positive).mean()) / 2
            if mask:
                return (masked_ce(lse_i2t, positive).mean() + masked_ce(lse_t2i, positive).mean()) / 2
            rows, rank = torch.arange(n, device=x.device), dist.get_rank()
            r, c = false_negative_pairs(image_keys, all_text_keys, rows + rank * m)
            ce_i2t = multi_positive_ce(lse_i2t, positive, r, t * (take(x, r) * take(all_y, c)).sum(-1))
            r, c = false_negative_pairs(text_keys, all_image_keys, rows + rank * n)
            ce_t2i = multi_positive_ce(lse_t2i, positive, r, t * (take(y, r) * take(all_x, c)).sum(-1))
            return (ce_i2t.mean() + ce_t2i.mean()) / 2
        # One (W N, W M) matrix: image->text is its row LSE, text->image its column LSE.
        both_keys = {"row_keys": keys[2], "col_keys": keys[3]} if mask else {}
        lse_i2t, lse_t2i = pair_lse(all_x, all_y, t, rows=True, cols=True, block=self.block_size, **both_keys)
        columns = positive_columns(n, m, dist.get_world_size(), x.device)
        all_texts = all_y
        if m > n:  # text->image for the positive texts only (the extras' column LSEs go unused)
            lse_t2i, all_y = lse_t2i[columns], all_y[columns]
        positive = t * (all_x * all_y).sum(-1)  # (W N,)
        if keys is None:
            return ((lse_i2t - positive).mean() + (lse_t2i - positive).mean()) / 2
        if mask:
            return (masked_ce(lse_i2t, positive).mean() + masked_ce(lse_t2i, positive).mean()) / 2
        all_image_keys, all_text_keys = keys[2], keys[3]
        r, c = false_negative_pairs(all_image_keys, all_text_keys, columns)
        ce_i2t = multi_positive_ce(lse_i2t, positive, r, t * (take(all_x, r) * take(all_texts, c)).sum(-1))
        r, c = false_negative_pairs(all_text_keys[columns], all_image_keys, torch.arange(len(columns), device=x.device))
        ce_t2i = multi_positive_ce(lse_t2i, positive, r, t * (take(all_y, r) * take(all_x, c)).sum(-1))
        return (ce_i2t.mean() + ce_t2i.mean()) / 2

    def compute_scores(self, image_emb, text_emb, image_log_std=None, text_log_std=None):
        return self.logit_scale_in_use().exp() * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
