"""The loss contract of docs/design.md as a base class.

A loss plugin subclasses :class:`ContrastiveLoss`, implements :meth:`compute_loss` and :meth:`compute_scores`,
and registers itself with ``@probloss.register_loss("name")``. The base class checks shapes and options, gives
clear errors, and provides :meth:`diagnostics` for logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from probloss import dist
from probloss.false_negatives import FALSE_NEGATIVES, group_keys

Tensor = torch.Tensor


class ContrastiveLoss(nn.Module):
    """Base class for image-text contrastive losses.

    Call as ``loss(image_emb, text_emb, image_log_std=None, text_log_std=None, *, text_groups=None,
    image_groups=None) -> scalar``:

    - ``image_emb`` ``(N, D)``, ``text_emb`` ``(M, D)`` with ``M >= N``: raw projections on this rank. Text
      rows ``0..N-1`` are the positives of image rows ``0..N-1``; text rows ``N..M-1`` (if any) are extra texts
      (hard negatives, NegCLIP style): negatives for every image, positives for none. ``M == N`` is the plain
      paired batch.
    - ``image_log_std`` ``(N,)`` / ``text_log_std`` ``(M,)``: one log standard deviation per sample, or
      ``(N, D)`` / ``(M, D)`` (diagonal), for losses with ``needs_log_std``; ignored by the others.
    - ``text_groups`` ``(M,)`` / ``image_groups`` ``(N,)``: integer ids, the same id for identical captions /
      scenes (false negatives, probloss/false_negatives.py). None: every sample distinct. With
      ``false_negatives="keep"`` (the default) they are ignored; otherwise the subclass's ``compute_loss`` gets
      ``keys=(image_keys, text_keys)`` (:func:`probloss.false_negatives.group_keys`).

    Under torch.distributed each rank passes its contiguous slice of the global batch (its positives first,
    then its extras; every rank the same N and M) and the mean over ranks of the returned values is the
    single-process loss on the whole batch with texts ordered [every rank's positives in rank order, then every
    rank's extras in rank order] (docs/design.md, the distributed invariant).

    A subclass declares what it is with class attributes (read directly, never guessed):

    - ``needs_log_std``: the towers must predict log-stds (the dual encoder grows log-std heads).
    - ``supports_diagonal_log_std``: log-stds may also be per dimension, ``(B, D)``.
    - ``init_log_std``: where the towers' log-std heads start unless ``model.init_log_std`` says otherwise
      (ln sigma; 0 = unit sigma; a paper's own initialisation, e.g. ProLIP's log sigma^2 = -10).
    - ``distributed_variants``: keyword dicts worth checking across real processes
      (:func:`probloss.testing.check_distributed`, the registry's distributed tests); ``({},)``: as built.
    - ``registered_name``: set by the registry, for messages.
    - ``invariances``: the transformations of the embeddings that leave the loss value unchanged and change
      :meth:`score` by at most one constant added to every score (so every ranking is unchanged), for the loss
      built with its default options: ``"shift"`` (the same vector added to every image AND text embedding) and
      ``"scale"`` (every embedding multiplied by one c > 0, log-stds moved by :meth:`log_std_under_scale`).
      Options may narrow it: evaluators read :meth:`invariances_in_use`. Declare only what is true (every
      registered loss's declaration is checked by tests/eval/test_eval_invariance.py); ``()`` by default.

    and with read-only properties:

    - ``scores_raw_embeddings``: True when the loss scores the raw (unnormalised) embeddings, so the geometry
      of the embedding space (distances, norms) is part of the model; evaluators then report geometry on raw
      embeddings. False (the default) for losses that L2-normalise first.
    - ``uses_partial_views``: True when the loss also wants a partial view of every positive caption (a less
      specific caption of the same scene, ``data.partial_captions``). Training then encodes them with the text
      tower in the same forward and adds :meth:`partial_view_loss` (a per-sample term: no communication; not
      part of ``val/loss``). False by default.
    """

    needs_log_std: ClassVar[bool] = False
    supports_diagonal_log_std: ClassVar[bool] = False
    init_log_std: ClassVar[float] = 0.0
    distributed_variants: ClassVar[Sequence[dict[str, Any]]] = ({},)
    registered_name: ClassVar[str | None] = None
    invariances: ClassVar[tuple[str, ...]] = ()
    # "keep" | "mask" | "positive" (probloss/false_negatives.py); a built-in loss sets it from its constructor's
    # ``false_negatives`` keyword. A plugin that leaves it at "keep" is never passed group keys.
    false_negatives: str = "keep"

    def set_false_negatives(self, false_negatives: str) -> None:
        """Validate and store the constructor's ``false_negatives`` option (probloss/false_negatives.py)."""
        self.check_choice("false_negatives", false_negatives, FALSE_NEGATIVES)
        self.false_negatives = false_negatives

    @property
    def scores_raw_embeddings(self) -> bool:
        """Whether :meth:`score` and the loss use the raw, unnormalised embeddings (class docstring)."""
        return False

    def invariances_in_use(self) -> tuple[str, ...]:
        """The :attr:`invariances` of this instance (its options included); the class's declaration by default."""
        return tuple(self.invariances)

    def log_std_under_scale(self, log_std: Tensor, c: float) -> Tensor:
        """How log-stds move when every embedding is multiplied by ``c > 0`` under the ``"scale"`` invariance.

        Unchanged by default (a loss that L2-normalises ignores the scale); a loss whose sigma is a length in the
        embedding space (gaussian_var) moves it by ``ln c``.
        """
        return log_std

    @property
    def uses_partial_views(self) -> bool:
        """Whether training should pass partial views to :meth:`partial_view_loss` (class docstring)."""
        return False

    def partial_view_loss(self, text_emb: Tensor, text_log_std: Tensor | None, partial_emb: Tensor,
                          partial_log_std: Tensor | None, mask: Tensor) -> Tensor:
        """The term between each positive caption ``(B, D)`` and its partial view ``(B, D)``, over the rows where
        ``mask`` ``(B,)`` is True (a caption without a less specific one, or replaced by caption noise, has none).
        Only called when :attr:`uses_partial_views`."""
        raise NotImplementedError(f"{self.loss_name} takes no partial views")

    @property
    def loss_name(self) -> str:
        """The registered name, or the class name of an unregistered loss, for messages."""
        return self.registered_name or type(self).__name__

    def check_choice(self, option: str, value: Any, choices: Sequence[Any]) -> None:
        """Raise ValueError unless ``value`` is one of ``choices``, naming the loss, the option and the choices.

        For constructors: ``self.check_choice("impl", impl, IMPLS)`` gives
        ``infonce: impl='fused' is not one of dense, tiled, auto``.
        """
        if value not in choices:
            raise ValueError(f"{self.loss_name}: {option}={value!r} is not one of {', '.join(map(str, choices))}")

    def forward(
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        image_log_std: Tensor | None = None,
        text_log_std: Tensor | None = None,
        *,
        text_groups: Tensor | None = None,
        image_groups: Tensor | None = None,
    ) -> Tensor:
        image_log_std, text_log_std = self.check_inputs(image_emb, text_emb, image_log_std, text_log_std, paired=True)
        self.check_groups(image_emb, text_emb, text_groups, image_groups)
        dist.check_same_shapes(
            {"image_emb": image_emb, "text_emb": text_emb, "image_log_std": image_log_std, "text_log_std": text_log_std,
             "text_groups": text_groups, "image_groups": image_groups},
            what=f"{self.loss_name} loss",
        )
        if self.false_negatives == "keep" or text_groups is None:  # today's loss, bit for bit
            return self.compute_loss(image_emb, text_emb, image_log_std, text_log_std)
        keys = group_keys(text_groups, image_groups, image_emb.shape[0])
        return self.compute_loss(image_emb, text_emb, image_log_std, text_log_std, keys=keys)

    def check_groups(self, image_emb: Tensor, text_emb: Tensor, text_groups: Tensor | None,
                     image_groups: Tensor | None) -> None:
        """Shapes and dtypes of the false-negative group ids: ``text_groups`` (M,), ``image_groups`` (N,), integers."""
        for label, groups, rows in (("text_groups", text_groups, text_emb.shape[0]),
                                    ("image_groups", image_groups, image_emb.shape[0])):
            if groups is None:
                continue
            if not isinstance(groups, Tensor) or groups.dtype.is_floating_point or groups.dtype == torch.bool \
                    or tuple(groups.shape) != (rows,):
                shape = tuple(groups.shape) if isinstance(groups, Tensor) else type(groups).__name__
                raise ValueError(f"{self.loss_name}: {label} must be a ({rows},) integer tensor (one id per row), "
                                 f"got {shape}")
        if image_groups is not None and text_groups is None:
            raise ValueError(f"{self.loss_name}: image_groups needs text_groups (image i's caption is text_groups[i])")

    @torch.no_grad()
    def score(
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        image_log_std: Tensor | None = None,
        text_log_std: Tensor | None = None,
    ) -> Tensor:
        """``(N_img, N_txt)`` match scores on this process's inputs, higher = better match (any N_img, N_txt).

        No communication and no side effects: parameters and buffers are left exactly as they were, so
        evaluation can never change a model.
        """
        image_log_std, text_log_std = self.check_inputs(image_emb, text_emb, image_log_std, text_log_std, paired=False)
        return self.compute_scores(image_emb, text_emb, image_log_std, text_log_std)

    # --- what a plugin implements -----------------------------------------------------------------------------

    def compute_loss(self, image_emb, text_emb, image_log_std, text_log_std) -> Tensor:
        raise NotImplementedError

    def compute_scores(self, image_emb, text_emb, image_log_std, text_log_std) -> Tensor:
        raise NotImplementedError

    def logit_scale_in_use(self) -> Tensor | None:
        """The log inverse temperature ``t' `` the logits are computed with (``t = exp(t')``), or None.

        By default the ``logit_scale`` parameter where the loss has one; a loss that caps it (InfoNCE) returns
        the capped value, so that its logits and :meth:`diagnostics` agree.
        """
        logit_scale = getattr(self, "logit_scale", None)  # a parameter of some losses only
        return logit_scale if isinstance(logit_scale, Tensor) else None

    # --- logging ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def diagnostics(
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        image_log_std: Tensor | None = None,
        text_log_std: Tensor | None = None,
    ) -> dict[str, float]:
        """Detached scalars for logging, computed on this rank's local batch.

        Mean positive (diagonal) and negative (off-diagonal, extra texts included) score; where the loss has a
        logit scale t', the value in use (:meth:`logit_scale_in_use`), the multiplier of the logits
        ``inverse_temperature = exp(t')`` (CLIP's "temperature" parameter is this multiplier) and
        ``temperature = exp(-t')``; ``logit_bias`` where the loss has one; for variance losses the mean and spread
        of log-std per modality.
        """
        scores = self.score(image_emb, text_emb, image_log_std, text_log_std).float()
        n, m = scores.shape
        out = {"logit_pos_mean": scores.diagonal().mean().item()}
        if n * m > min(n, m):  # some off-diagonal (negative) pair exists
            off_diagonal = ~torch.eye(n, m, dtype=torch.bool, device=scores.device)
            out["logit_neg_mean"] = scores[off_diagonal].mean().item()
        logit_scale = self.logit_scale_in_use()
        if logit_scale is not None:
            out["logit_scale"] = logit_scale.item()
            out["inverse_temperature"] = logit_scale.exp().item()
            out["temperature"] = (-logit_scale).exp().item()
        if isinstance(getattr(self, "logit_bias", None), Tensor):
            out["logit_bias"] = self.logit_bias.item()
        for modality, log_std in (("image", image_log_std), ("text", text_log_std)):
            if self.needs_log_std and log_std is not None:
                out[f"{modality}_log_std_mean"] = log_std.float().mean().item()
                out[f"{modality}_log_std_std"] = log_std.float().std().item() if log_std.numel() > 1 else 0.0
        return out

    # --- input checks -------------------------------------------------------------------------------------------

    def check_inputs(self, image_emb, text_emb, image_log_std, text_log_std, paired: bool):
        name = self.loss_name
        for label, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
            if not isinstance(emb, Tensor) or emb.dim() != 2:
                shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
                raise ValueError(f"{name}: {label} must be a (B, D) tensor, got {shape}")
            if not emb.is_floating_point():
                raise TypeError(f"{name}: {label} must be floating point, got {emb.dtype}")
        if image_emb.shape[1] != text_emb.shape[1]:
            raise ValueError(
                f"{name}: image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} have different "
                "embedding sizes D; both towers must project to the same joint dimension"
            )
        if paired and text_emb.shape[0] < image_emb.shape[0]:
            raise ValueError(
                f"{name}: image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} have different "
                "batch sizes with fewer texts than images; text row i must be the positive of image row i (extra "
                "texts, negatives only, may follow the N positives)"
            )
        if not self.needs_log_std:
            return None, None
        checked = []
        for label, log_std, emb in (("image_log_std", image_log_std, image_emb), ("text_log_std", text_log_std, text_emb)):
            if log_std is None:
                raise ValueError(
                    f"{name} needs {label} (a (B,) log standard deviation per sample) but got None: build the "
                    "dual encoder with log-std heads (it does so when loss.needs_log_std is True)"
                )
            n, d = emb.shape
            allowed = [(n,), (n, d)] if self.supports_diagonal_log_std else [(n,)]
            if tuple(log_std.shape) == (n, 1):
                log_std = log_std.squeeze(1)
            if tuple(log_std.shape) not in allowed:
                shapes = " or ".join(str(s) for s in allowed)
                raise ValueError(f"{name}: {label} must have shape {shapes} to match its embeddings, got {tuple(log_std.shape)}")
            checked.append(log_std)
        if checked[0].dim() != checked[1].dim():
            raise ValueError(
                f"{name}: image_log_std {tuple(checked[0].shape)} and text_log_std {tuple(checked[1].shape)} must both "
                "be per-sample (B,) or both per-dimension (B, D)"
            )
        return checked[0], checked[1]


def positive_texts(text: Tensor, n_images: int) -> Tensor:
    """The first ``n_images`` rows of ``text`` (the positives; the rest are extra negatives), or ``text`` itself
    when there are no extras, so a paired batch runs exactly the operations it always did."""
    return text if text.shape[0] == n_images else text[:n_images]


def positive_columns(n_images: int, n_texts: int, world: int, device=None) -> Tensor:
    """Rows of the positives in gathered texts: ``(world * n_images,)``, in gathered-image order.

    Each rank holds ``n_images`` images and ``n_texts`` texts (its positives first), so the all-gathered texts
    are rank-major ``[positives_0, extras_0, positives_1, ...]`` and image ``r * n_images + i`` has its positive
    at text row ``r * n_texts + i``.
    """
    rows = torch.arange(world * n_images, device=device)
    return rows // n_images * n_texts + rows % n_images


def sigma_sq_sum(log_std: Tensor, dims: int) -> Tensor:
    """``(B,)`` sum over the ``dims`` embedding dimensions of sigma^2 = exp(2 ln sigma): ``dims * sigma^2`` for
    per-sample ``(B,)`` log-stds (an isotropic Gaussian), ``sum_d sigma_d^2`` for per-dimension ``(B, D)`` ones."""
    return dims * torch.exp(2 * log_std) if log_std.dim() == 1 else torch.exp(2 * log_std).sum(-1)


def unit_gaussian_kl(mu: Tensor, log_std: Tensor) -> Tensor:
    """``(B,)`` KL(N(mu, diag sigma^2) || N(0, I)) per sample, summed over dimensions; log-stds ``(B,)`` or ``(B, D)``.

    Per-sample log-stds use the isotropic closed form 0.5 (D sigma^2 + |mu|^2 - D - 2 D ln sigma): no (B, D)
    expansion of sigma.
    """
    if log_std.dim() == 2:
        return 0.5 * (torch.exp(2 * log_std) + mu.pow(2) - 1 - 2 * log_std).sum(-1)
    dims = mu.shape[1]
    return 0.5 * (dims * (torch.exp(2 * log_std) - 1 - 2 * log_std) + mu.pow(2).sum(-1))
