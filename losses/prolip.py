"""ProLIP's probabilistic pairwise contrastive loss (PPCL): SigLIP's pairwise sigmoid on PCME++'s distance.

Chun, Kim, Park and Yun, "Probabilistic Language-Image Pre-Training", 2024 (arXiv 2410.18857); released code
naver-ai/prolip, src/prolip/loss.py (``ProLIPLoss``). It puts PCME++'s closed-form sampled distance
(losses/pcmepp.py) inside SigLIP's loss (losses/sigmoid.py). The terms below carry the names the release's
loss.py gives them (PPCL, inclusion loss, VIB); the release cites no equation numbers, and the paper's could not
be checked against a readable copy here, so none are given.

Each sample is a Gaussian N(mu, diag sigma^2), mu the L2-normalised embedding. The loss contract passes
ln sigma (the papers' networks output log sigma^2 = 2 ln sigma): per-sample log-stds ``(B,)`` make the Gaussian
isotropic, S_i = sum_d sigma_i,d^2 = D sigma_i^2; per-dimension ``(B, D)`` log-stds make it diagonal,
S_i = sum_d exp(2 ln sigma_i,d). With t = exp(logit_scale), b = logit_bias, z_ij = +1 on the diagonal and -1
elsewhere::

    logits_ij = t * (mu_i . mu_j - (S_i + S_j) / 2) + b      # = t * (1 - CSD_ij / 2) + b for unit means
    L_PPCL = -sum_ij log_sigmoid(z_ij * logits_ij) / N       # SigLIP's normalisation
    L_VIB = KL_image + KL_text                               # KL(N(mu, sigma^2) || N(0, I)), mean per element
    L_incl = mean_{i,d} softplus(-s * (I(img_i in txt_i) - I(txt_i in img_i)))   # positive pairs
    L_part = mean_{i in P,d} softplus(-s * (I(txt_i in part_i) - I(part_i in txt_i)))  # partial views
    loss = L_PPCL + vib_beta * L_VIB + inclusion_alpha * L_incl + partial_alpha * L_part

with CSD_ij = ||mu_i - mu_j||^2 + S_i + S_j. Unlike the proposal (losses/gaussian_var.py), where sigma divides
the distance (a per-candidate temperature), the variance here enters additively: an uncertain sample lowers
every logit it takes part in by t S / 2.

The inclusion test (ProLIP's inclusion loss, as released): per dimension, with v = log sigma^2 and
w = exp(eps - v) (eps = -10), I(1 in 2) = -2 v1 - v2 - ln(a) / 2 + beta^2 / (4 a) - c where a = w1 + w2 / 2,
beta = 2 mu1 w1 + mu2 w2, c = mu1^2 w1 + mu2^2 w2 / 2; s = 1000. "Image in text" says a caption is the more
general (wider) Gaussian of the pair. ProLIP's second inclusion term puts an input inside its masked view (the
release masks tokens and patches): here the partial view of caption i is a less specific caption of the same
scene (``data.partial_captions=true``: the caption one level below, e.g. "a blue cross" for "a small blue cross
above a large yellow circle"), P the rows that have one, and "caption in its partial view" says the less
specific caption is the wider Gaussian. It is off by default (``partial_alpha=0``) because it needs data the
batch carries only on request (probloss/loss.py, ``uses_partial_views``).

Defaults follow the released DataComp training script: vib_beta 1e-4, inclusion_alpha 1e-7; t' = log 10 and
b = -10 as SigLIP; towers start at log sigma^2 = -10 (``init_log_std = -5``, the release's ``init_unc_bias``), so
the variance term starts near zero. Differences from the release, on purpose: the KL is the textbook
KL(N(mu, sigma^2) || N(0, I)) (the release's "bug fix" evaluates it at sigma instead of sigma^2), and no term is
silently dropped when it grows large (the release ignores a KL above 1e4 or an inclusion loss above 1e5).

Shapes: image_emb (N, D), text_emb (M, D), log-stds (N,) and (M,) or (N, D) and (M, D); extra texts (M > N) are
negatives only, the sum still divided by N (as ``sigmoid``); VIB is over every sample, the inclusion loss over
the N positive pairs. Distributed like ``sigmoid``: the other ranks' texts (with their variance term) arrive over
the ring (``dist_impl`` "ring", "shift") or by all-gather ("gather") and add negatives only. ``impl="tiled"``
computes the pair sum and its gradients in one pass over tiles (O(B x D) memory: the variance terms ride along
as two extra features, probloss.tiled.offset_features).

False negatives (``false_negatives``, probloss/false_negatives.py; ids passed as ``text_groups`` /
``image_groups``): a pair (image i, text j), j not i's positive, whose caption (or scene) is identical to i's is
a false negative. ``keep`` (default): the loss above. ``mask``: its pair term leaves the sum (the division stays).
``positive``: it gets the positive label. The pairs are found from group keys that travel with the texts (around
the ring, or gathered) and their terms corrected one by one after the all-pairs sum, so the kernels are unchanged.
VIB and the inclusion losses are unaffected.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import probloss
from probloss import dist
from probloss.dist import DIST_IMPLS
from probloss.false_negatives import false_negative_pairs, sigmoid_correction, take, with_keys
from probloss.loss import positive_texts, sigma_sq_sum, unit_gaussian_kl
from probloss.tiled import DEFAULT_BLOCK, IMPLS, offset_features, softplus_pair_sum, use_tiled

# The released inclusion loss's constants (ProLIPLoss: inclusion_loss_eps, inclusion_loss_scale).
INCLUSION_EPS = -10.0
INCLUSION_SCALE = 1000.0


def inclusion_logit(mu1, log_var1, mu2, log_var2):
    """I(1 in 2) - I(2 in 1) per dimension (module docstring), from means ``(B, D)`` and log sigma^2 ``(B, 1)``
    (isotropic, broadcast) or ``(B, D)``.

    The two tests share terms, so their difference is computed directly: (v2 - v1) - ln(a12 / a21) / 2
    + beta12^2 / (4 a12) - beta21^2 / (4 a21) - (mu1^2 w1 - mu2^2 w2) / 2, with per-sample a's when isotropic
    (a third of the (B, D) temporaries of evaluating both tests).
    """
    w1, w2 = torch.exp(INCLUSION_EPS - log_var1), torch.exp(INCLUSION_EPS - log_var2)
    a12, a21 = w1 + 0.5 * w2, w2 + 0.5 * w1
    beta12, beta21 = 2 * mu1 * w1 + mu2 * w2, 2 * mu2 * w2 + mu1 * w1
    return ((log_var2 - log_var1) - 0.5 * torch.log(a12 / a21) + beta12.pow(2) / (4 * a12)
            - beta21.pow(2) / (4 * a21) - 0.5 * (mu1.pow(2) * w1 - mu2.pow(2) * w2))


def _inclusion_sum(inner_mu, inner_log_std, outer_mu, outer_log_std):
    def log_var(log_std):
        return 2 * (log_std if log_std.dim() == 2 else log_std[:, None])

    logit = inclusion_logit(inner_mu, log_var(inner_log_std), outer_mu, log_var(outer_log_std))
    return F.softplus(-INCLUSION_SCALE * logit).sum()


def inclusion_loss(inner_mu, inner_log_std, outer_mu, outer_log_std, block: int = DEFAULT_BLOCK):
    """Mean over samples and dimensions of softplus(-s (I(inner in outer) - I(outer in inner))).

    ``block`` rows at a time, each recomputed in backward (activation checkpointing): the elementwise test
    makes ~20 temporaries of its rows' size, which over the whole batch would outweigh the tiled pair sum.
    """
    total = inner_mu.new_zeros(())
    for start in range(0, inner_mu.shape[0], block):
        rows = slice(start, start + block)
        total = total + checkpoint(_inclusion_sum, inner_mu[rows], inner_log_std[rows], outer_mu[rows],
                                   outer_log_std[rows], use_reentrant=False)
    return total / inner_mu.numel()


@probloss.register_loss("prolip")
class ProLIPLoss(probloss.ContrastiveLoss):
    """Args:
        init_logit_scale: initial t' (t = exp(t')), SigLIP's log(10).
        init_logit_bias: initial b, SigLIP's -10.
        vib_beta: weight of the KL to N(0, I) (the release's training script: 1e-4; 0: off).
        inclusion_alpha: weight of the image-in-text inclusion loss (release: 1e-7; 0: off).
        partial_alpha: weight of the caption-in-its-partial-view inclusion loss (0: off; > 0 needs
            ``data.partial_captions=true``).
        normalize: L2-normalise the means (ProLIP does).
        dist_impl: "ring", "shift" or "gather", as for ``sigmoid``.
        impl: "dense", "tiled" or "auto" (tiled above ``block_size`` rows).
        false_negatives: "keep", "mask" or "positive" (module docstring; the PPCL term only).
        block_size: rows per block for the tiled kernel (on a GPU: 4096 or more).
    """

    invariances = ("scale",)  # unit means; normalize=False: dot products, none (invariances_in_use)

    def invariances_in_use(self):
        """Unit means ignore a scale; raw means enter through dot products, which neither a shift nor a scale
        leaves alone."""
        return ("scale",) if self.normalize else ()

    needs_log_std = True
    supports_diagonal_log_std = True
    init_log_std = -5.0  # log sigma^2 = -10, the release's init_unc_bias
    distributed_variants = [
        {"dist_impl": dist_impl, "impl": impl, "block_size": 2} for dist_impl in DIST_IMPLS for impl in ("dense", "tiled")
    ] + [{"vib_beta": 0.1, "inclusion_alpha": 0.1}]

    def __init__(
        self,
        init_logit_scale: float = math.log(10),
        init_logit_bias: float = -10.0,
        vib_beta: float = 1e-4,
        inclusion_alpha: float = 1e-7,
        partial_alpha: float = 0.0,
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
        self.vib_beta, self.inclusion_alpha, self.partial_alpha = vib_beta, inclusion_alpha, partial_alpha
        self.normalize, self.dist_impl, self.impl, self.block_size = normalize, dist_impl, impl, block_size

    @property
    def scores_raw_embeddings(self) -> bool:
        return not self.normalize

    def embed(self, emb):
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def pair_features(self, x, y, image_log_std, text_log_std):
        """``(q, k)`` with ``q_i . k_j + b`` = the logit of pair ij: t mu_i . mu_j - t S_i / 2 - t S_j / 2 + b."""
        t, dims = self.logit_scale.exp(), x.shape[1]
        return offset_features(t * x, y, -0.5 * t * sigma_sq_sum(image_log_std, dims),
                               -0.5 * t * sigma_sq_sum(text_log_std, dims))

    def compute_loss(self, image_emb, text_emb, image_log_std, text_log_std, keys=None):
        x, y = self.embed(image_emb), self.embed(text_emb)
        n, one, b = x.shape[0], x.new_ones(()), self.logit_bias
        q, k = self.pair_features(x, y, image_log_std, text_log_std)
        block = self.block_size if use_tiled(self.impl, n, self.block_size) else None
        # Positives: -log_sigmoid(l_ii) = softplus(l_ii) - l_ii, so the all-pairs softplus sum minus the diagonal
        # logits (as in ``sigmoid``).
        total = softplus_pair_sum(q, k, one, b, block) - ((q * positive_texts(k, n)).sum(-1) + b).sum()
        if keys is not None:  # false negatives among this rank's own texts (not i's own positive)
            r, c = false_negative_pairs(keys[0], keys[1], torch.arange(n, device=x.device))
            total = total - sigmoid_correction((take(q, r) * take(k, c)).sum(-1) + b, self.false_negatives)
        # Negatives only; the texts' group keys travel around the ring with them.
        blocks = dist.other_rank_blocks(k, self.dist_impl, what="prolip loss")
        key_blocks = None if keys is None else dist.other_rank_blocks(keys[1], self.dist_impl, what="prolip loss")
        for other, key_block in with_keys(blocks, key_blocks):
            total = total + softplus_pair_sum(q, other, one, b, block)
            if key_block is not None:
                r, c = false_negative_pairs(keys[0], key_block)
                total = total - sigmoid_correction((take(q, r) * take(other, c)).sum(-1) + b, self.false_negatives)
        loss = total / n
        if self.vib_beta:
            dims = x.shape[1]
            vib = (unit_gaussian_kl(x, image_log_std).mean() + unit_gaussian_kl(y, text_log_std).mean()) / dims
            loss = loss + self.vib_beta * vib
        if self.inclusion_alpha:
            loss = loss + self.inclusion_alpha * inclusion_loss(
                x, image_log_std, positive_texts(y, n), positive_texts(text_log_std, n), self.block_size)
        return loss

    @property
    def uses_partial_views(self) -> bool:
        return bool(self.partial_alpha)

    def partial_view_loss(self, text_emb, text_log_std, partial_emb, partial_log_std, mask):
        """``partial_alpha * L_part`` (module docstring): each caption inside its partial view, rows of ``mask``."""
        if not bool(mask.any()):
            return text_emb.new_zeros(())
        return self.partial_alpha * inclusion_loss(
            self.embed(text_emb[mask]), text_log_std[mask], self.embed(partial_emb[mask]), partial_log_std[mask],
            self.block_size)

    def compute_scores(self, image_emb, text_emb, image_log_std, text_log_std):
        q, k = self.pair_features(self.embed(image_emb), self.embed(text_emb), image_log_std, text_log_std)
        return q @ k.T + self.logit_bias
