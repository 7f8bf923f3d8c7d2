"""PCME++: binary matching loss on the closed-form sampled distance, with pseudo-positives and a VIB term.

Chun, "Improved Probabilistic Image-Text Representations", ICLR 2024 (arXiv 2305.18171); released code
naver-ai/pcmepp, pcmepp/criterions/pcmepp.py (``ClosedFormSampledDistanceLoss``) and configs/pcmepp.yaml.

Each sample is a Gaussian N(mu, diag sigma^2), mu the L2-normalised embedding (the released config normalises
both modalities). The loss contract passes ln sigma (the paper's heads output log sigma^2 = 2 ln sigma):
per-sample log-stds ``(B,)`` make the Gaussian isotropic, S_i = sum_d sigma_i,d^2 = D sigma_i^2; per-dimension
``(B, D)`` log-stds make it diagonal, S_i = sum_d exp(2 ln sigma_i,d). With a = ``negative_scale`` and
b = ``shift`` (learnable), for image i and text j::

    CSD_ij = ||mu_i - mu_j||^2 + S_i + S_j                          # closed-form sampled distance (Sec. 2.2)
    logits_ij = -a * CSD_ij + b                                     # match probability sigmoid(logits_ij)
    L_match = 2 * mean_ij BCE(logits_ij, [i = j])                   # i2t and t2i in one term, as released
    L_pp = mean_ij BCE(logits_ij, y_ij) + mean_ij BCE(logits_ij, y'_ij)   # pseudo-positives (Sec. 2.3)
    L_vib = KL_image + KL_text                                      # KL(N(mu, sigma^2) || N(0, I)), mean per element
    loss = L_match + smoothness_alpha * L_pp + vib_beta * L_vib

The released loss cites the paper's Eq. (1) and (2) for CSD and the matching loss; the section numbers above are
the arXiv v5 paper's (2.2 probabilistic contrastive learning, 2.3 pseudo-positives, 2.4 mixed-sample
augmentation).

Pseudo-positives (Sec. 2.3): y_ij = 1 where j is i's positive or pair ij scores at least as high as it,
l_ij >= l_ii (image i's row), y'_ij = 1 where i is j's positive or l_ij >= l_jj (text j's column; an extra text
has no positive and so no pseudo-positive); the labels carry no gradient. Ties count up to rounding (a relative
tolerance sqrt(eps) of the dtype), so a duplicated caption -- common in the shapes data -- is a pseudo-positive
whether its logit came from a tile or from the diagonal. The means divide by the N x N pairs of the paired batch
(BCEWithLogits' mean, as released; over ranks N_global x N_global); extra texts (M > N, which the release does not
have) add their pairs to the sums without changing the divisor, as ``sigmoid`` treats them, so hard negatives add
to the loss rather than diluting it.

Unlike the proposal (losses/gaussian_var.py), where sigma divides the distance (a per-candidate temperature),
the variance here enters additively: an uncertain sample raises its distance to everything. Retrieval scores
are the match logits -a CSD + b, as PCME++ evaluates (its ``eval_by_csd``).

Defaults are the released config: a = 5, b = 5, smoothness_alpha 0.1, vib_beta 1e-4. The towers' log-std heads
start at log sigma^2 = -10 (``init_log_std = -5``, ProLIP's start), not at the released heads' log sigma^2 ~ 0:
with sigma = 1 every CSD starts near 2D, every logit near -a 2D + b (-635 at D = 64), so negatives get no gradient
while positives are pulled together; the released model survives that on a frozen pretrained backbone (its first
two epochs), a tower trained from scratch collapses (on the shapes data its effective rank and zero-shot fall
far below those of a start at log sigma^2 = -10: docs/notebook.md, "Numbers moved out of the code"). The
release's quirk of ignoring a KL above 1e4 is left out on purpose: no term is silently dropped. PCME++'s
mixed-sample augmentation (Sec. 2.4) changes the data, not the loss: not here.

Shapes: image_emb (N, D), text_emb (M, D) with M >= N (extras after the positives: negatives only), log-stds
(N,) and (M,) or (N, D) and (M, D). Distributed: positives and local pairs on each rank, the other ranks' texts
(with their variance term and their positive's logit, for the column pseudo-positives) arrive over the ring
(``dist_impl`` "ring", "shift") or by all-gather ("gather"). ``impl="tiled"`` sums the pairs and their gradients in
one pass over tiles, O(B x D) memory (probloss.tiled.softplus_pair_sum with the squared norms and variances as
two extra features).

False negatives (``false_negatives``, probloss/false_negatives.py; ids passed as ``text_groups`` /
``image_groups``): a pair (image i, text j), j not i's positive, whose caption (or scene) is identical to i's is
a false negative. ``keep`` (default): the loss above (a duplicated caption already tends to be a pseudo-positive,
through the tie tolerance). ``mask``: the pair leaves every term, matching and pseudo-positive (the divisor N x N
stays). ``positive``: the pair gets label 1 in all three BCEs: [i = j] and both pseudo-positive labels (the
thresholds stay each sample's own positive logit). The pairs are found from group keys that travel with the texts
and their terms corrected one by one after the all-pairs sum, so the kernels are unchanged. VIB is unaffected.
"""

import torch
import torch.nn.functional as F
from torch import nn

import probloss
from probloss import dist
from probloss.dist import DIST_IMPLS
from probloss.false_negatives import false_negative_pairs, take, with_keys
from probloss.loss import positive_texts, sigma_sq_sum, unit_gaussian_kl
from probloss.tiled import DEFAULT_BLOCK, IMPLS, offset_features, softplus_pair_sum, use_tiled


def tie_tolerance(logits: torch.Tensor) -> torch.Tensor:
    """How far below a positive's logit a pair still counts as scoring "at least as high" (rounding only)."""
    return torch.finfo(logits.dtype).eps ** 0.5 * (1 + logits.abs())


@probloss.register_loss("pcmepp")
class PCMEPPLoss(probloss.ContrastiveLoss):
    """Args:
        init_negative_scale: initial a (released: 5).
        init_shift: initial b (released: 5).
        smoothness_alpha: weight of the pseudo-positive loss (released: 0.1; 0: off).
        vib_beta: weight of the KL to N(0, I) (released: 1e-4; 0: off).
        normalize: L2-normalise the means (the released config does).
        dist_impl: "ring", "shift" or "gather", as for ``sigmoid``.
        impl: "dense", "tiled" or "auto" (tiled above ``block_size`` rows).
        false_negatives: "keep", "mask" or "positive" (module docstring).
        block_size: rows per block for the tiled kernel (on a GPU: 4096 or more).
    """

    invariances = ("scale",)  # unit means; normalize=False: see invariances_in_use

    def invariances_in_use(self):
        """Unit means ignore a scale (S does not depend on it); raw means: CSD ignores a shift, the VIB term's
        |mu|^2 does not."""
        return ("scale",) if self.normalize else (() if self.vib_beta else ("shift",))

    needs_log_std = True
    supports_diagonal_log_std = True
    init_log_std = -5.0  # log sigma^2 = -10 (module docstring: sigma = 1 collapses a tower trained from scratch)
    distributed_variants = [
        {"dist_impl": dist_impl, "impl": impl, "block_size": 2} for dist_impl in DIST_IMPLS for impl in ("dense", "tiled")
    ] + [{"smoothness_alpha": 0.0, "vib_beta": 0.1}]

    def __init__(
        self,
        init_negative_scale: float = 5.0,
        init_shift: float = 5.0,
        smoothness_alpha: float = 0.1,
        vib_beta: float = 1e-4,
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
        self.negative_scale = nn.Parameter(torch.tensor(float(init_negative_scale)))
        self.shift = nn.Parameter(torch.tensor(float(init_shift)))
        self.smoothness_alpha, self.vib_beta = smoothness_alpha, vib_beta
        self.normalize, self.dist_impl, self.impl, self.block_size = normalize, dist_impl, impl, block_size

    @property
    def scores_raw_embeddings(self) -> bool:
        return not self.normalize

    def embed(self, emb):
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def pair_features(self, x, y, image_log_std, text_log_std):
        """``(q, k)`` with ``q_i . k_j + b = -a CSD_ij + b``, expanding ||mu_i - mu_j||^2 as
        ||mu_i||^2 + ||mu_j||^2 - 2 mu_i . mu_j: q_i = [2 a mu_i, -a (||mu_i||^2 + S_i), 1], k_j = [mu_j, 1, ...]."""
        a, dims = self.negative_scale, x.shape[1]
        return offset_features(2 * a * x, y, -a * (x.pow(2).sum(-1) + sigma_sq_sum(image_log_std, dims)),
                               -a * (y.pow(2).sum(-1) + sigma_sq_sum(text_log_std, dims)))

    def compute_loss(self, image_emb, text_emb, image_log_std, text_log_std, keys=None):
        x, y = self.embed(image_emb), self.embed(text_emb)
        n, m, world = x.shape[0], y.shape[0], dist.get_world_size()
        one, b, alpha = x.new_ones(()), self.shift, self.smoothness_alpha
        q, k = self.pair_features(x, y, image_log_std, text_log_std)
        block = self.block_size if use_tiled(self.impl, n, self.block_size) else None
        positive_logits = (q * positive_texts(k, n)).sum(-1) + b  # (N,) l_ii
        # Sum over pairs of  2 BCE(l, [i = j]) + alpha (BCE(l, y) + BCE(l, y'))  with BCE(l, z) = softplus(l) - z l:
        #   (2 + 2 alpha) * [sum softplus(l) - alpha / (2 + 2 alpha) * sum (y + y') l] - 2 sum_i l_ii
        # where y + y' counts the thresholds a pair reaches (2 on the diagonal, up to rounding).
        thresholds = (positive_logits - tie_tolerance(positive_logits)).detach()
        row_threshold = thresholds if alpha else None
        # Column thresholds: text j's positive logit; extra texts have none (+inf never counts).
        col_threshold = torch.cat([thresholds, thresholds.new_full((m - n,), float("inf"))]) if alpha else None
        weight = alpha / (2 + 2 * alpha)
        pairs = softplus_pair_sum(q, k, one, b, block, row_threshold, col_threshold, weight)
        if keys is not None:  # false negatives among this rank's own texts (not i's own positive)
            r, c = false_negative_pairs(keys[0], keys[1], torch.arange(n, device=x.device))
            pairs = pairs - self._false_negative_terms(take(q, r), take(k, c), b, row_threshold, col_threshold, r, c,
                                                       weight)
        if world > 1:
            # The other ranks' texts travel with their column thresholds (data, no gradient) as one more feature,
            # and with their group keys beside them.
            texts = k if col_threshold is None else torch.cat([k, col_threshold[:, None]], dim=1)
            blocks = dist.other_rank_blocks(texts, self.dist_impl, what="pcmepp loss")
            key_blocks = None if keys is None else dist.other_rank_blocks(keys[1], self.dist_impl, what="pcmepp loss")
            for other, key_block in with_keys(blocks, key_blocks):
                other_k, other_threshold = (other, None) if col_threshold is None else (other[:, :-1], other[:, -1])
                pairs = pairs + softplus_pair_sum(q, other_k, one, b, block, row_threshold, other_threshold, weight)
                if key_block is not None:
                    r, c = false_negative_pairs(keys[0], key_block)
                    pairs = pairs - self._false_negative_terms(take(q, r), take(other_k, c), b, row_threshold,
                                                               other_threshold, r, c, weight)
        total = (2 + 2 * alpha) * pairs - 2 * positive_logits.sum()
        loss = total / (n * world * n)
        if self.vib_beta:
            dims = x.shape[1]
            vib = (unit_gaussian_kl(x, image_log_std).mean() + unit_gaussian_kl(y, text_log_std).mean()) / dims
            loss = loss + self.vib_beta * vib
        return loss

    def _false_negative_terms(self, q, k, b, row_threshold, col_threshold, rows, cols, weight):
        """What to subtract from ``pairs`` (the all-pairs ``sum softplus(l) - weight * sum (y + y') l``) for the
        false-negative pairs, features ``q``, ``k`` ``(P, E)`` matched row by row (module docstring).

        Their current term is softplus(l) - weight c l, c = y + y' the thresholds the pair reaches (no gradient).
        ``mask`` removes it; ``positive`` makes every label 1, term softplus(l) - l, so it subtracts
        (1 - weight c) l.
        """
        if rows.numel() == 0:
            return q.new_zeros(())
        logits = (q * k).sum(-1) + b
        counts = torch.zeros_like(logits)
        if weight:
            with torch.no_grad():
                counts = (logits >= row_threshold[rows]).to(logits.dtype)
                counts += (logits >= col_threshold[cols]).to(logits.dtype)
        if self.false_negatives == "mask":
            return (F.softplus(logits) - weight * counts * logits).sum()
        return ((1 - weight * counts) * logits).sum()

    def compute_scores(self, image_emb, text_emb, image_log_std, text_log_std):
        q, k = self.pair_features(self.embed(image_emb), self.embed(text_emb), image_log_std, text_log_std)
        return q @ k.T + self.shift

    @torch.no_grad()
    def diagnostics(self, image_emb, text_emb, image_log_std=None, text_log_std=None) -> dict[str, float]:
        out = super().diagnostics(image_emb, text_emb, image_log_std, text_log_std)
        return {**out, "negative_scale": self.negative_scale.item(), "shift": self.shift.item()}
