"""The Gaussian log-std contrastive loss proposed in openai/CLIP issue "Just a loss function for discussion"
(072jiajia, 2022; see docs/design.md, Sources).

Each tower also predicts a log standard deviation ln(sigma) per sample. With d_ij = ||x_i - y_j||^2 on the
raw (unnormalised) embeddings::

    logits_i2t[i, j] = -ln(sigma_T[j]) - d_ij / sigma_T[j]^2     # image i picks among texts j:  (N, M)
    logits_t2i[j, i] = -ln(sigma_I[i]) - d_ij / sigma_I[i]^2     # text j picks among images i:  (N, N)
    loss = ( CE(logits_i2t, diag) + CE(logits_t2i, diag) ) / 2

Hard negatives (NegCLIP style): ``text_emb`` may have M >= N rows, the N positives then M - N extra texts.
Image->text is a softmax over all M texts, each with its own sigma_T; text->image only for the N positive
texts (an extra text has no image to pick). With M == N this is the proposal's loss.

What the variance does: 1 / sigma_j^2 is a per-candidate inverse temperature (a candidate with small sigma
is a sharp target, one with large sigma a flat one), and -ln(sigma_j) is a penalty that stops every
candidate from inflating its sigma to flatten the softmax. The proposal's hypothesis is that specific
captions ("a shiba dog in the garden") should learn smaller sigma than vague ones ("a dog in the garden").

Options beyond the proposal (defaults reproduce it exactly):

- ``variant="likelihood"``: the isotropic Gaussian log-density, -D ln(sigma_j) - d_ij / (2 sigma_j^2).
- ``normalize=True``: L2-normalise the embeddings first (d_ij in [0, 4]).
- ``kl_weight > 0``: adds ``kl_weight`` times the mean KL divergence of each sample's Gaussian N(x, sigma^2 I)
  from the unit Gaussian N(0, I), 0.5 sum_k (sigma_k^2 + x_k^2 - 1 - 2 ln sigma_k), over both modalities (the
  mean over all M texts, extras included: they are Gaussians of the text tower too): the regulariser PCME++
  (Chun 2024) and ProLIP use against variance collapse.
- per-dimension log-std ``(B, D)`` (a diagonal Gaussian): d_ij = sum_k (x_ik - y_jk)^2 / sigma_jk^2 and the
  penalty is mean_k ln(sigma_jk) (proposal; equal to ln(sigma) when all dimensions agree) or
  sum_k ln(sigma_jk) (likelihood).
- ``freeze_log_std=True`` (the control that isolates sigma): every log-std the towers pass is replaced by 0
  (sigma = 1) in the loss, the KL term, ``score()`` and the diagnostics, so the loss is a Euclidean InfoNCE on
  squared distances, logits_ij = -d_ij (likelihood: -d_ij / 2). The log-std inputs are multiplied by 0, not
  dropped: the towers keep their heads (``needs_log_std`` stays True) and the heads get an exactly zero gradient,
  so DDP without ``find_unused_parameters`` still sees every parameter used. Their outputs mean nothing in
  this mode (nor do the ``unc/`` metrics computed from them).
- ``shared_log_std=True`` (the frozen-sigma control with a learnable global temperature): the towers' log-stds
  are replaced, as with ``freeze_log_std``, by one learnable scalar ln(s) shared by every sample (starting at 0,
  where the heads start), so the logits are -ln s - d_ij / s^2: the -ln s term is the same for every candidate
  and cancels in the softmax, and 1 / s^2 is a learned inverse temperature, as InfoNCE's. Against
  ``gaussian_var`` it isolates what a per-sample sigma adds beyond a global scale; the heads' outputs (and the
  ``unc/`` metrics of the model's sigma) mean nothing here either.
- ``inverse_temperature=t`` (a fixed float, not learned; default 1.0: the logits untouched, the same code path):
  every logit, both the distance term and the log-std penalty, is multiplied by t:
  ``logits_ij = t * (-ln(sigma_j) - d_ij / sigma_j^2)``, in both directions, dense and tiled. Logged as
  ``inverse_temperature`` (and ``logit_scale`` = ln t) by :meth:`diagnostics`. It matches the initial logit
  spread to InfoNCE's (below). With sigma frozen it is a plain temperature; with learned sigma the towers can
  absorb part of it: up to a constant, t (-ln sigma - d / sigma^2) = -t ln sigma' - d / sigma'^2 with
  sigma' = sigma / sqrt(t), i.e. the proposal with its penalty weighted by t and every sigma' starting at
  1 / sqrt(t). So it pins the initial logit spread, initial loss and gradient size (what grad clipping and
  weight decay act on), not a temperature for ever.

Matching InfoNCE at initialisation. At init the heads give log-std ~ 0 (sigma ~ 1), so the logits are ~ -d_ij,
whose per-row spread grows with the raw embeddings' scale, whereas InfoNCE's are t_clip = 1/0.07 times cosines:
the proposal starts with far larger logits, initial loss and gradients than InfoNCE. The matched t is the ratio
of the two losses' initial spreads (the std over candidates of each image's image->text logits, averaged over
the rows of the first training batch, mean over seeds), the value of the arm "gaussian_var matched scale" in
configs/recipe/proposal.yaml. It is specific to the model, data and init_log_std it was measured on:
re-measure for another (the same statistic, the same batches). The measurement, with what it gave on the
default config: docs/notebook.md, "Numbers moved out of the code".

Distances are computed as ||x||^2 + ||y||^2 - 2 x.y (never a (B, B, D) tensor) and the cross-entropies with a
stable log-sum-exp. Distributed: embeddings and log-stds are all-gathered with autograd (a softmax needs every
candidate, extra texts included); each rank scores its own rows. Shapes: image_emb (N, D), text_emb (M, D),
log-stds (N,) / (M,) or (N, D) / (M, D); every rank the same N and M.

``impl``: ``dense`` materialises the logits; ``tiled`` computes the log-sum-exps block by block
(:func:`probloss.tiled.dist_pair_lse`, O(B x D) memory, tiles recomputed in backward) over the gathered
candidates, with the positive logit added by plain autograd; ``auto`` (default) is tiled when the number of
gathered candidates exceeds ``block_size``. Per-sample log-std in one process computes both directions from
one pass over ``||x_i - y_j||^2``; the diagonal (B, D) case uses ``2D + 1`` augmented features per direction
(about twice the matrix-product cost). Both impls apply the same ``clamp_min(0)`` to squared distances.

False negatives (``false_negatives``, probloss/false_negatives.py; ids passed as ``text_groups`` /
``image_groups``), per direction, with P(q) = {q's positive} + the candidates whose caption (or scene) is
identical to q's: ``keep`` (default) the loss above; ``mask``: the other members of P(q) get logit -inf (left out
of the softmax); ``positive``: SupCon's L_out (Khosla et al. 2020; UniCL, Yang et al. 2022),
``CE_q = log sum_j exp l_qj - mean_{p in P(q)} l_qp``. The KL term is unaffected.
"""

import math

import torch
import torch.nn.functional as F

import probloss
from probloss import dist
from probloss.false_negatives import (
    dense_cross_entropy, false_negative_pairs, key_match, masked_ce, multi_positive_ce, take,
)
from probloss.loss import positive_texts, unit_gaussian_kl
from probloss.tiled import DEFAULT_BLOCK, IMPLS, dist_pair_lse, sq_dist_features, use_tiled

VARIANTS = ("proposal", "likelihood")


@probloss.register_loss("gaussian_var")
class GaussianVarLoss(probloss.ContrastiveLoss):
    """Args:
        variant: "proposal" (the issue's logits) or "likelihood" (the Gaussian log-density).
        normalize: L2-normalise embeddings before the distances (the proposal does not).
        kl_weight: weight of the KL regulariser toward N(0, I) (0: off, the proposal).
        freeze_log_std: use log-std 0 (sigma = 1) for every sample whatever the towers predict (module docstring).
        shared_log_std: use one learnable log-std (init 0) for every sample: a learned global temperature.
        inverse_temperature: fixed multiplier t of every logit (1.0: none; module docstring).
        impl: "dense", "tiled" or "auto" (tiled above ``block_size`` gathered candidates).
        false_negatives: "keep", "mask" or "positive" (module docstring).
        block_size: tile side for the tiled kernel (on a GPU: 4096 or more).
    """

    invariances = ("shift", "scale")  # distances only; sigma scales with them (invariances_in_use: options)

    def invariances_in_use(self):
        """A common shift cancels in every distance; embeddings times c with log_std + ln c keep every
        d / sigma^2 and add one constant (-t ln c, likelihood -t D ln c) to every logit, which a softmax ignores.
        A frozen (or shared, learned: its parameter is not an input the scale can move) sigma cannot follow a scale; ``normalize`` scores unit vectors (scale with log-stds unmoved, no
        shift); the KL to N(0, I) of raw embeddings pins both the origin and the unit."""
        if self.normalize:
            return ("scale",)
        if self.kl_weight:
            return ()
        return ("shift",) if self.freeze_log_std or self.shared_log_std else ("shift", "scale")

    def log_std_under_scale(self, log_std, c):
        return log_std if self.normalize else log_std + math.log(c)

    needs_log_std = True
    supports_diagonal_log_std = True
    # What probloss.testing.check_distributed checks across real processes.
    distributed_variants = [
        {"variant": "proposal"},
        {"variant": "likelihood", "normalize": True},
        {"variant": "proposal", "impl": "tiled", "block_size": 2},
        {"variant": "likelihood", "normalize": True, "impl": "tiled", "block_size": 2},
        {"variant": "proposal", "kl_weight": 0.1},
        {"variant": "proposal", "freeze_log_std": True},
        {"variant": "proposal", "freeze_log_std": True, "impl": "tiled", "block_size": 2},
        {"variant": "proposal", "inverse_temperature": 0.3, "impl": "tiled", "block_size": 2},
        {"variant": "proposal", "shared_log_std": True},
        {"variant": "proposal", "shared_log_std": True, "impl": "tiled", "block_size": 2},
    ]

    def __init__(
        self, variant: str = "proposal", normalize: bool = False, kl_weight: float = 0.0,
        freeze_log_std: bool = False, inverse_temperature: float = 1.0, impl: str = "auto",
        block_size: int = DEFAULT_BLOCK, false_negatives: str = "keep", shared_log_std: bool = False,
    ):
        super().__init__()
        self.set_false_negatives(false_negatives)
        self.check_choice("variant", variant, VARIANTS)
        self.check_choice("impl", impl, IMPLS)
        if not (math.isfinite(inverse_temperature) and inverse_temperature > 0):
            raise ValueError(f"{self.loss_name}: inverse_temperature={inverse_temperature!r} must be a finite number "
                             "> 0 (1.0: logits unscaled)")
        self.variant, self.normalize, self.kl_weight = variant, normalize, kl_weight
        self.freeze_log_std, self.inverse_temperature = freeze_log_std, float(inverse_temperature)
        self.impl, self.block_size = impl, block_size
        if freeze_log_std and shared_log_std:
            raise ValueError(f"{self.loss_name}: freeze_log_std and shared_log_std are two different controls; set "
                             "one of them")
        self.shared_log_std = shared_log_std
        # The shared control's learned ln(s); a parameter only then, so other checkpoints keep their keys.
        self.global_log_std = torch.nn.Parameter(torch.zeros(())) if shared_log_std else None

    def log_stds_in_use(self, image_log_std, text_log_std):
        """The log-stds the loss uses: the given ones, or with ``freeze_log_std`` zeros of the same shapes that
        keep the inputs in the graph with a zero gradient (module docstring), or with ``shared_log_std`` the one
        learned ln(s) in those shapes."""
        if self.shared_log_std:
            return image_log_std * 0 + self.global_log_std, text_log_std * 0 + self.global_log_std
        if not self.freeze_log_std:
            return image_log_std, text_log_std
        return image_log_std * 0, text_log_std * 0

    def logit_scale_in_use(self):
        """ln(inverse_temperature) for the diagnostics when the logits are scaled, else None (nothing to log)."""
        if self.inverse_temperature == 1.0:
            return None
        return torch.tensor(math.log(self.inverse_temperature), dtype=torch.float64)

    def candidate_logits(self, queries, candidates, candidate_log_std):
        """``(N_query, N_cand)`` logits ``-c(ln sigma_j) - d(q_i, y_j) w_j`` with the candidates' variance.

        Returns ``(logits, distance_term, log_std_term)``, the last two for diagnostics.
        """
        log_std_term, inv_var = self._penalty_and_weight(candidate_log_std, queries.shape[1])
        if candidate_log_std.dim() == 1:
            sq_dist = (queries.pow(2).sum(-1, keepdim=True) + candidates.pow(2).sum(-1) - 2 * queries @ candidates.T)
            distance_term = sq_dist.clamp_min(0) * inv_var  # clamp: cancellation can dip just below zero
        else:
            # sum_k (q_ik - y_jk)^2 w_jk = q^2 @ w^T - 2 q @ (y w)^T + sum_k y_jk^2 w_jk, all matrix products
            distance_term = (
                queries.pow(2) @ inv_var.T - 2 * queries @ (candidates * inv_var).T + (candidates.pow(2) * inv_var).sum(-1)
            ).clamp_min(0)
        return -log_std_term - distance_term, distance_term, log_std_term

    def embed(self, emb):
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def compute_loss(self, image_emb, text_emb, image_log_std, text_log_std, keys=None):
        image_log_std, text_log_std = self.log_stds_in_use(image_log_std, text_log_std)
        contrastive = self.contrastive_loss(image_emb, text_emb, image_log_std, text_log_std, keys)
        if not self.kl_weight:
            return contrastive
        return contrastive + self.kl_weight * self.kl_to_unit_gaussian(image_emb, text_emb, image_log_std, text_log_std)

    def kl_to_unit_gaussian(self, image_emb, text_emb, image_log_std, text_log_std):
        """Mean over this rank's samples and both modalities of KL(N(x, sigma^2 I) || N(0, I))."""
        image_kl = unit_gaussian_kl(self.embed(image_emb), image_log_std).mean()
        return (image_kl + unit_gaussian_kl(self.embed(text_emb), text_log_std).mean()) / 2

    def contrastive_loss(self, image_emb, text_emb, image_log_std, text_log_std, keys=None):
        x, y = self.embed(image_emb), self.embed(text_emb)
        n, m = x.shape[0], y.shape[0]  # m > n: extra texts, negatives only
        # Every candidate of the softmax: (W N, D), (W M, D) and their log-stds, rank-major; identity in one process.
        all_x, all_y = dist.all_gather_cat(x), dist.all_gather_cat(y)
        all_image_log_std, all_text_log_std = dist.all_gather_cat(image_log_std), dist.all_gather_cat(text_log_std)
        if keys is not None:  # false negatives: (image, positive-text, all-image, all-text) group keys
            keys = (keys[0], keys[1][:n], dist.all_gather_cat(keys[0]), dist.all_gather_cat(keys[1]))
        if use_tiled(self.impl, all_y.shape[0], self.block_size):
            return self._tiled_loss(x, y, all_x, all_y, all_image_log_std, all_text_log_std, keys)
        # Positives at this rank's offset: text column rank * M + i for image i, image column rank * N + i for text i.
        rows, rank = torch.arange(n, device=x.device), dist.get_rank()
        logits_i2t, _, _ = self.candidate_logits(x, all_y, all_text_log_std)  # (N, W M)
        logits_t2i, _, _ = self.candidate_logits(positive_texts(y, n), all_x, all_image_log_std)  # (N, W N)
        if keys is not None:
            image_keys, text_keys, all_image_keys, all_text_keys = keys
            return (dense_cross_entropy(logits_i2t, rows + rank * m, key_match(image_keys, all_text_keys),
                                        self.false_negatives)
                    + dense_cross_entropy(logits_t2i, rows + rank * n, key_match(text_keys, all_image_keys),
                                          self.false_negatives)) / 2
        return (F.cross_entropy(logits_i2t, rows + rank * m) + F.cross_entropy(logits_t2i, rows + rank * n)) / 2

    def _penalty_and_weight(self, log_std, dims):
        """Per-candidate ``(log_std_term, inv_var)`` exactly as :meth:`candidate_logits` forms them: ``(N,)`` and
        ``(N,)``, or ``(N,)`` and ``(N, D)`` for diagonal log-stds; both times ``inverse_temperature``."""
        half = 0.5 if self.variant == "likelihood" else 1.0
        inv_var = torch.exp(-2 * log_std) * half
        if log_std.dim() == 1:
            penalty = (dims if self.variant == "likelihood" else 1) * log_std
        else:
            penalty = log_std.sum(-1) if self.variant == "likelihood" else log_std.mean(-1)
        if self.inverse_temperature != 1.0:  # logits t * (-penalty - d * inv_var)
            penalty, inv_var = penalty * self.inverse_temperature, inv_var * self.inverse_temperature
        return penalty, inv_var

    def _positive_logits(self, queries, candidates, penalty, inv_var):
        """Target logits ``-c_i - clamp0(d(q_i, y_i)) w_i`` of matching rows, ``(B,)``, as the dense code forms them."""
        if inv_var.dim() == 1:
            sq_dist = queries.pow(2).sum(-1) + candidates.pow(2).sum(-1) - 2 * (queries * candidates).sum(-1)
            distance_term = sq_dist.clamp_min(0) * inv_var
        else:
            distance_term = (
                (queries.pow(2) * inv_var).sum(-1) - 2 * (queries * candidates * inv_var).sum(-1)
                + (candidates.pow(2) * inv_var).sum(-1)
            ).clamp_min(0)
        return -penalty - distance_term

    def _tiled_loss(self, x, y, all_x, all_y, all_image_log_std, all_text_log_std, keys=None):
        """The same loss from tiled log-sum-exps: CE_i = lse_i - positive_i, no (B, B) matrix kept.

        False negatives as in ``infonce``: ``mask`` leaves key-matching pairs out of the kernel's log-sum-exps and
        adds the positive back; ``positive`` subtracts the mean logit over each query's positives.
        """
        block = self.block_size
        mask = keys is not None and self.false_negatives == "mask"
        i2t_keys = t2i_keys = {}
        if mask:
            i2t_keys = {"row_keys": keys[0], "col_keys": keys[3]}
            t2i_keys = {"row_keys": keys[1], "col_keys": keys[2]}
        pen_img, w_img = self._penalty_and_weight(all_image_log_std, x.shape[1])  # candidates of text->image
        pen_txt, w_txt = self._penalty_and_weight(all_text_log_std, x.shape[1])  # candidates of image->text
        rank, n, m = dist.get_rank(), x.shape[0], y.shape[0]
        own_images = slice(rank * n, (rank + 1) * n)  # this rank's images among the candidates
        own_texts = slice(rank * m, rank * m + n)  # this rank's positive texts among the candidates
        y_pos = positive_texts(y, n)  # the text->image queries
        if all_text_log_std.dim() == 1:
            # ||x_i - y_j||^2 = -2 x_i.y_j + |x_i|^2 + |y_j|^2, formed tile by tile from the raw embeddings.
            sq_x, sq_all_x, sq_all_y = (t.pow(2).sum(-1) for t in (x, all_x, all_y))
            if not dist.is_distributed():
                # One (N, M) matrix: i2t is its row LSE (text candidates), t2i its column LSE (image candidates),
                # of which the positive texts' (the first N) are used.
                lse_i2t, lse_t2i = dist_pair_lse(
                    x, y, pen_txt, w_txt, pen_img, w_img, rows=True, cols=True, block=block,
                    scale=-2.0, row_add=sq_x, col_add=sq_all_y, **i2t_keys,
                )
                lse_t2i = positive_texts(lse_t2i, n)
            else:
                # (N, W M) and (N, W N); rows are this rank's queries.
                lse_i2t, _ = dist_pair_lse(
                    x, all_y, pen_txt, w_txt, block=block, scale=-2.0, row_add=sq_x, col_add=sq_all_y, **i2t_keys
                )
                lse_t2i, _ = dist_pair_lse(
                    y_pos, all_x, pen_img, w_img, block=block, scale=-2.0, row_add=y_pos.pow(2).sum(-1),
                    col_add=sq_all_x, **t2i_keys,
                )
        else:
            # Diagonal: the weights sit inside the distance, so each direction has its own features (w folded in).
            lse_i2t, _ = dist_pair_lse(*sq_dist_features(x, all_y, w_txt), pen_txt, None, block=block, **i2t_keys)
            lse_t2i, _ = dist_pair_lse(*sq_dist_features(y_pos, all_x, w_img), pen_img, None, block=block, **t2i_keys)
        pos_i2t = self._positive_logits(x, y_pos, pen_txt[own_texts], w_txt[own_texts])
        pos_t2i = self._positive_logits(y_pos, x, pen_img[own_images], w_img[own_images])
        if keys is None:
            return ((lse_i2t - pos_i2t).mean() + (lse_t2i - pos_t2i).mean()) / 2
        if mask:
            return (masked_ce(lse_i2t, pos_i2t).mean() + masked_ce(lse_t2i, pos_t2i).mean()) / 2
        image_keys, text_keys, all_image_keys, all_text_keys = keys
        rows = torch.arange(n, device=x.device)
        r, c = false_negative_pairs(image_keys, all_text_keys, rows + rank * m)
        pair_logits = self._positive_logits(take(x, r), take(all_y, c), take(pen_txt, c), take(w_txt, c))
        ce_i2t = multi_positive_ce(lse_i2t, pos_i2t, r, pair_logits)
        r, c = false_negative_pairs(text_keys, all_image_keys, rows + rank * n)
        pair_logits = self._positive_logits(take(y_pos, r), take(all_x, c), take(pen_img, c), take(w_img, c))
        ce_t2i = multi_positive_ce(lse_t2i, pos_t2i, r, pair_logits)
        return (ce_i2t.mean() + ce_t2i.mean()) / 2

    @property
    def scores_raw_embeddings(self) -> bool:
        return not self.normalize

    def compute_scores(self, image_emb, text_emb, image_log_std, text_log_std):
        """The mean of the two directions' logits, ``(N_img, N_txt)``: each direction's own ranking plus the other's."""
        image_log_std, text_log_std = self.log_stds_in_use(image_log_std, text_log_std)
        x, y = self.embed(image_emb), self.embed(text_emb)
        logits_i2t, _, _ = self.candidate_logits(x, y, text_log_std)
        logits_t2i, _, _ = self.candidate_logits(y, x, image_log_std)
        return (logits_i2t + logits_t2i.T) / 2

    @torch.no_grad()
    def diagnostics(self, image_emb, text_emb, image_log_std=None, text_log_std=None):
        """Adds the mean size of the distance term vs the log-std term of the image-to-text logits (both times
        ``inverse_temperature``); log-std and sigma statistics are those in use (0 and 1 with ``freeze_log_std``)."""
        image_log_std, text_log_std = self.check_inputs(image_emb, text_emb, image_log_std, text_log_std, paired=False)
        image_log_std, text_log_std = self.log_stds_in_use(image_log_std, text_log_std)
        out = super().diagnostics(image_emb, text_emb, image_log_std, text_log_std)
        _, distance_term, log_std_term = self.candidate_logits(self.embed(image_emb), self.embed(text_emb), text_log_std)
        out["distance_term"] = distance_term.float().mean().item()
        out["log_std_term"] = log_std_term.float().mean().item()
        out["sigma_image_mean"] = image_log_std.float().exp().mean().item()
        out["sigma_text_mean"] = text_log_std.float().exp().mean().item()
        return out
