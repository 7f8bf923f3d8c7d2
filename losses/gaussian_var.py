"""The Gaussian log-std contrastive loss proposed in openai/CLIP issue "Just a loss function for discussion"
(072jiajia, 2022; ../shared/seeds/003_8e0b96a9b72a12c3.txt).

Each tower also predicts a log standard deviation ln(sigma) per sample. With d_ij = ||x_i - y_j||^2 on the
raw (unnormalised) embeddings::

    logits_i2t[i, j] = -ln(sigma_T[j]) - d_ij / sigma_T[j]^2     # image i picks among texts j
    logits_t2i[j, i] = -ln(sigma_I[i]) - d_ij / sigma_I[i]^2     # text j picks among images i
    loss = ( CE(logits_i2t, diag) + CE(logits_t2i, diag) ) / 2

What the variance does: 1 / sigma_j^2 is a per-candidate inverse temperature (a candidate with small sigma
is a sharp target, one with large sigma a flat one), and -ln(sigma_j) is a penalty that stops every
candidate from inflating its sigma to flatten the softmax. The proposal's hypothesis is that specific
captions ("a shiba dog in the garden") should learn smaller sigma than vague ones ("a dog in the garden").

Options beyond the proposal (defaults reproduce it exactly):

- ``variant="likelihood"``: the isotropic Gaussian log-density, -D ln(sigma_j) - d_ij / (2 sigma_j^2).
- ``normalize=True``: L2-normalise the embeddings first (d_ij in [0, 4]).
- per-dimension log-std ``(B, D)`` (a diagonal Gaussian): d_ij = sum_k (x_ik - y_jk)^2 / sigma_jk^2 and the
  penalty is mean_k ln(sigma_jk) (proposal; equal to ln(sigma) when all dimensions agree) or
  sum_k ln(sigma_jk) (likelihood).

Distances are computed as ||x||^2 + ||y||^2 - 2 x.y (never a (B, B, D) tensor) and the cross-entropies with a
stable log-sum-exp. Distributed: embeddings and log-stds are all-gathered with autograd (a softmax needs every
candidate); each rank scores its own rows. Shapes: embeddings (B, D), log-stds (B,) or (B, D).
"""

import torch
import torch.nn.functional as F

import probloss
from probloss import dist

VARIANTS = ("proposal", "likelihood")


@probloss.register_loss("gaussian_var")
class GaussianVarLoss(probloss.ContrastiveLoss):
    """Args:
        variant: "proposal" (the issue's logits) or "likelihood" (the Gaussian log-density).
        normalize: L2-normalise embeddings before the distances (the proposal does not).
    """

    needs_log_std = True
    supports_diagonal_log_std = True
    # What probloss.testing.check_distributed checks across real processes.
    distributed_variants = [{"variant": "proposal"}, {"variant": "likelihood", "normalize": True}]

    def __init__(self, variant: str = "proposal", normalize: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"gaussian_var: unknown variant {variant!r}; choose one of {VARIANTS}")
        self.variant, self.normalize = variant, normalize

    def candidate_logits(self, queries, candidates, candidate_log_std):
        """``(N_query, N_cand)`` logits ``-c(ln sigma_j) - d(q_i, y_j) w_j`` with the candidates' variance.

        Returns ``(logits, distance_term, log_std_term)``, the last two for diagnostics.
        """
        half = 0.5 if self.variant == "likelihood" else 1.0
        inv_var = torch.exp(-2 * candidate_log_std) * half  # (N,) or (N, D)
        if candidate_log_std.dim() == 1:
            sq_dist = (queries.pow(2).sum(-1, keepdim=True) + candidates.pow(2).sum(-1) - 2 * queries @ candidates.T)
            distance_term = sq_dist.clamp_min(0) * inv_var  # clamp: cancellation can dip just below zero
            dims = queries.shape[1] if self.variant == "likelihood" else 1
            log_std_term = dims * candidate_log_std
        else:
            # sum_k (q_ik - y_jk)^2 w_jk = q^2 @ w^T - 2 q @ (y w)^T + sum_k y_jk^2 w_jk, all matrix products
            distance_term = (
                queries.pow(2) @ inv_var.T - 2 * queries @ (candidates * inv_var).T + (candidates.pow(2) * inv_var).sum(-1)
            ).clamp_min(0)
            log_std_term = candidate_log_std.sum(-1) if self.variant == "likelihood" else candidate_log_std.mean(-1)
        return -log_std_term - distance_term, distance_term, log_std_term

    def embed(self, emb):
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def compute_loss(self, image_emb, text_emb, image_log_std, text_log_std):
        x, y = self.embed(image_emb), self.embed(text_emb)
        # Every candidate of the softmax: (B_global, D) and (B_global,) or (B_global, D); identity in one process.
        all_x, all_y = dist.all_gather_cat(x), dist.all_gather_cat(y)
        all_image_log_std, all_text_log_std = dist.all_gather_cat(image_log_std), dist.all_gather_cat(text_log_std)
        labels = torch.arange(x.shape[0], device=x.device) + dist.get_rank() * x.shape[0]
        logits_i2t, _, _ = self.candidate_logits(x, all_y, all_text_log_std)  # (B_local, B_global)
        logits_t2i, _, _ = self.candidate_logits(y, all_x, all_image_log_std)  # (B_local, B_global)
        return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2

    def compute_scores(self, image_emb, text_emb, image_log_std, text_log_std):
        """The mean of the two directions' logits, ``(N_img, N_txt)``: each direction's own ranking plus the other's."""
        x, y = self.embed(image_emb), self.embed(text_emb)
        logits_i2t, _, _ = self.candidate_logits(x, y, text_log_std)
        logits_t2i, _, _ = self.candidate_logits(y, x, image_log_std)
        return (logits_i2t + logits_t2i.T) / 2

    @torch.no_grad()
    def diagnostics(self, image_emb, text_emb, image_log_std=None, text_log_std=None):
        """Adds the mean size of the distance term vs the log-std term of the image-to-text logits."""
        out = super().diagnostics(image_emb, text_emb, image_log_std, text_log_std)
        image_log_std, text_log_std = self.check_inputs(image_emb, text_emb, image_log_std, text_log_std, paired=False)
        _, distance_term, log_std_term = self.candidate_logits(self.embed(image_emb), self.embed(text_emb), text_log_std)
        out["distance_term"] = distance_term.float().mean().item()
        out["log_std_term"] = log_std_term.float().mean().item()
        out["sigma_image_mean"] = image_log_std.float().exp().mean().item()
        out["sigma_text_mean"] = text_log_std.float().exp().mean().item()
        return out
