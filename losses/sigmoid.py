"""SigLIP's pairwise sigmoid loss, chunked across devices.

Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023.

With x_i, y_j the L2-normalised embeddings, t = exp(logit_scale), b = logit_bias, z_ij = +1 on the diagonal
and -1 elsewhere::

    logits_ij = t * x_i . y_j + b                                    # i < N images, j < M texts
    loss = -sum_ij log_sigmoid(z_ij * logits_ij) / N
         = ( sum_ij softplus(logits_ij) - sum_i logits_ii ) / N      # the form computed here

Init t' = log 10, b = -10 (the paper's, against the 1:B imbalance of positives to negatives).

Hard negatives: ``text_emb`` may have M >= N rows, the N positives then M - N extra texts; every (image,
extra text) pair is one more negative pair in the sum (z = -1), and the sum is still divided by the number of
images N, SigLIP's normalisation (so extras add to the loss rather than diluting it). With M == N: SigLIP.

Shapes: ``image_emb`` (N, D), ``text_emb`` (M, D) on each rank, every rank the same N and M. Distributed (the
paper's "chunked" loss): each rank computes its positives and local negatives (its extras included), then the
other ranks' texts (extras included) arrive and add negatives only; each rank divides by its N so the mean over
ranks is the global loss. ``dist_impl``:

- ``ring`` (default): text blocks travel left and right at once, W-1 blocks in ceil((W-1)/2) rounds;
- ``shift``: one direction, W-1 rounds;
- ``gather``: all-gather the texts (for backends without point-to-point, e.g. XLA; O(B_global x D)).

In ``ring`` and ``shift`` no (B_local x B_global) matrix exists at any time. ``impl="tiled"`` also keeps no
(B_local x B_local) block for backward: each block's gradients are accumulated in the same pass as its loss
(probloss.tiled.softplus_pair_sum), and a received block's gradient travels back to its owner in the ring's
backward; ``dense`` uses plain autograd per block.

Negative masking (the paper's ablation, "should we prune negative pairs?"): ``neg_mask`` in {``random``,
``hard`` (keep the highest-loss negatives), ``easy`` (keep the lowest-loss ones)} keeps
k = round(neg_keep_ratio * (M_global - 1)) negatives (extra texts included; M_global = W M texts) in every
image's row; masked pairs contribute nothing. The choice needs a row's negatives all at once, so masking scores
each rank's rows against the gathered texts (dense, O(N x W M)) whatever ``dist_impl`` says. The random mask
is drawn for the whole global batch (indexed by single-process text order) from ``mask_seed`` and a call
counter kept in the state dict, so every rank and a resumed run draw the same masks. ("Hard with matched
pairs" lengthens training by 1 / neg_keep_ratio: a trainer setting.)

False negatives (``false_negatives``, probloss/false_negatives.py; ids passed as ``text_groups`` /
``image_groups``): a pair (image i, text j), j not i's positive, whose caption (or scene) is identical to i's is
a false negative. ``keep`` (default): the loss above. ``mask``: its term softplus(l_ij) leaves the sum (the
division by N stays). ``positive``: it gets label z = +1, term -log sigmoid(l_ij). The pairs are found from group
keys that travel with the texts (around the ring, or gathered) and their terms corrected one by one after the
all-pairs sum, so the kernels are unchanged. With ``neg_mask`` false negatives are never among the k kept
negatives (``mask``; a row with fewer true negatives keeps them all) or join the positives (``positive``).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import probloss
from probloss import dist
from probloss.dist import DIST_IMPLS
from probloss.false_negatives import false_negative_pairs, key_match, sigmoid_correction, take, with_keys
from probloss.loss import positive_texts
from probloss.tiled import DEFAULT_BLOCK, IMPLS, softplus_pair_sum, use_tiled

NEG_MASKS = ("none", "random", "hard", "easy")


def _single_process_columns(n: int, m: int, world: int) -> torch.Tensor:
    """For each gathered text column (rank-major, ``m`` per rank, positives first), its column in the
    single-process order [every rank's ``n`` positives, then every rank's ``m - n`` extras]."""
    rank, j = torch.arange(world * m) // m, torch.arange(world * m) % m
    return torch.where(j < n, rank * n + j, world * n + rank * (m - n) + (j - n))


@probloss.register_loss("sigmoid")
class SigmoidLoss(probloss.ContrastiveLoss):
    """Args:
        init_logit_scale: initial t' (t = exp(t')); the paper uses log(10).
        init_logit_bias: initial b; the paper uses -10.
        learn_logit_scale, learn_logit_bias: whether t' and b are learnable parameters.
        dist_impl: "ring", "shift" or "gather" (see the module docstring).
        impl: "dense", "tiled" or "auto" (tiled above ``block_size`` rows).
        block_size: rows per block for the tiled kernel (on a GPU: 4096 or more).
        neg_mask: "none", "random", "hard" or "easy" negative masking (see the module docstring).
        neg_keep_ratio: fraction of each row's negatives kept when masking.
        false_negatives: "keep", "mask" or "positive" (module docstring).
        mask_seed: seed of the random mask.
    """

    invariances = ("scale",)  # cosines of L2-normalised embeddings
    # What probloss.testing.check_distributed checks across real processes (block 2: several blocks per rank).
    distributed_variants = [
        {"dist_impl": dist_impl, "impl": impl, "block_size": 2} for dist_impl in DIST_IMPLS for impl in ("dense", "tiled")
    ] + [{"neg_mask": mask, "neg_keep_ratio": 0.5} for mask in ("random", "hard", "easy")]

    def __init__(
        self,
        init_logit_scale: float = math.log(10),
        init_logit_bias: float = -10.0,
        learn_logit_scale: bool = True,
        learn_logit_bias: bool = True,
        dist_impl: str = "ring",
        impl: str = "auto",
        block_size: int = DEFAULT_BLOCK,
        neg_mask: str = "none",
        neg_keep_ratio: float = 1.0,
        mask_seed: int = 0,
        false_negatives: str = "keep",
    ):
        super().__init__()
        self.set_false_negatives(false_negatives)
        self.check_choice("neg_mask", neg_mask, NEG_MASKS)
        self.check_choice("dist_impl", dist_impl, DIST_IMPLS)
        self.check_choice("impl", impl, IMPLS)
        if not 0.0 <= neg_keep_ratio <= 1.0:
            raise ValueError(f"{self.loss_name}: neg_keep_ratio={neg_keep_ratio!r} is not in [0, 1]")
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learn_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)), requires_grad=learn_logit_bias)
        self.dist_impl, self.impl, self.block_size = dist_impl, impl, block_size
        self.neg_mask, self.neg_keep_ratio, self.mask_seed = neg_mask, neg_keep_ratio, mask_seed
        self.register_buffer("mask_calls", torch.zeros((), dtype=torch.long))  # advances the random mask

    def compute_loss(self, image_emb, text_emb, image_log_std=None, text_log_std=None, keys=None):
        x = nn.functional.normalize(image_emb, dim=-1)
        y = nn.functional.normalize(text_emb, dim=-1)
        t, b = self.logit_scale.exp(), self.logit_bias
        if self.neg_mask != "none":
            return self.masked_loss(x, y, t, b, keys)
        n = x.shape[0]
        block = self.block_size if use_tiled(self.impl, n, self.block_size) else None
        # Positives: -log_sigmoid(l_ii) = softplus(l_ii) - l_ii, so subtracting the diagonal logits from the
        # all-pairs softplus sum (over all M texts, extras included) turns the diagonal into positives.
        total = softplus_pair_sum(x, y, t, b, block) - (t * (x * positive_texts(y, n)).sum(-1) + b).sum()
        if keys is not None:  # false negatives among this rank's own texts (not i's own positive)
            r, c = false_negative_pairs(keys[0], keys[1], torch.arange(n, device=x.device))
            total = total - sigmoid_correction(t * (take(x, r) * take(y, c)).sum(-1) + b, self.false_negatives)
        # Negatives only; the texts' group keys travel around the ring with them.
        blocks = dist.other_rank_blocks(y, self.dist_impl, what="sigmoid loss")
        key_blocks = None if keys is None else dist.other_rank_blocks(keys[1], self.dist_impl, what="sigmoid loss")
        for y_block, key_block in with_keys(blocks, key_blocks):
            total = total + softplus_pair_sum(x, y_block, t, b, block)
            if key_block is not None:
                r, c = false_negative_pairs(keys[0], key_block)
                pair_logits = t * (take(x, r) * take(y_block, c)).sum(-1) + b
                total = total - sigmoid_correction(pair_logits, self.false_negatives)
        return total / n

    def masked_loss(self, x, y, t, b, keys=None):
        """Positives plus the kept negatives of each row, over the gathered texts: (N, W M) logits."""
        rank, world, n, m = dist.get_rank(), dist.get_world_size(), x.shape[0], y.shape[0]
        all_y = dist.all_gather_cat(y)
        logits = t * x @ all_y.T + b  # (N, W M), positives at column rank * m + i
        columns = torch.arange(n, device=x.device) + rank * m
        positive = torch.zeros_like(logits, dtype=torch.bool)
        positive[torch.arange(n, device=x.device), columns] = True
        false_negative = None
        if keys is not None:  # identical captions / scenes: never chosen as negatives; positives if so asked
            false_negative = key_match(keys[0], dist.all_gather_cat(keys[1])) & ~positive
            if self.false_negatives == "positive":
                positive = positive | false_negative
        keep = round(self.neg_keep_ratio * (logits.shape[1] - 1))
        with torch.no_grad():
            if self.neg_mask == "random":
                generator = torch.Generator().manual_seed(self.mask_seed * 1_000_003 + int(self.mask_calls))
                priority = torch.rand(world * n, world * m, generator=generator, dtype=torch.float64)
                priority = priority[rank * n : (rank + 1) * n]  # this rank's rows of the global draw
                if m > n:
                    # The draw's columns are single-process texts [all positives, all extras]; the gathered
                    # columns are rank-major [positives_0, extras_0, positives_1, ...]: reorder to match.
                    priority = priority[:, _single_process_columns(n, m, world)]
                priority = priority.to(logits.device)
            else:  # the pair loss softplus(l) grows with l: hard = highest logits, easy = lowest
                priority = logits.detach().double() if self.neg_mask == "hard" else -logits.detach().double()
            priority = priority.masked_fill(positive, -float("inf"))
            if false_negative is not None:
                priority = priority.masked_fill(false_negative, -float("inf"))
            kept = torch.zeros_like(positive)
            kept.scatter_(1, priority.topk(keep, dim=1).indices, True)
            if false_negative is not None:
                kept &= ~false_negative  # a row with fewer than k true negatives keeps them all
            self.mask_calls += 1
        pair_loss = torch.where(positive, F.softplus(-logits), F.softplus(logits))
        return pair_loss.masked_fill(~(kept | positive), 0.0).sum() / n

    def compute_scores(self, image_emb, text_emb, image_log_std=None, text_log_std=None):
        x = nn.functional.normalize(image_emb, dim=-1)
        y = nn.functional.normalize(text_emb, dim=-1)
        return self.logit_scale.exp() * x @ y.T + self.logit_bias
