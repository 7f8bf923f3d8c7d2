"""Training-stability bookkeeping, judged against loss-independent references rather than the run's first step.

The trainer computes the loss's uninformative reference once (:func:`uninformative_loss`), builds the tracker
with it, calls ``tracker.update(step, loss, grad_norm)`` once per optimizer step (also on skipped non-finite
steps) and ``tracker.judge_collapse(...)`` after every evaluation, checkpoints ``tracker.state_dict()`` and
writes ``tracker.summary()`` into summary.json.

**Uninformative reference** (``stability/reference_loss``): the lowest value the loss takes when every score
is equal, i.e. for a model that cannot tell pairs apart: every image row is one vector u, every text row one
vector v, every log-std one value (or one vector, per-dimension heads), and the loss's learnable parameters
(``logit_scale``, ``logit_bias``, ...) free; minimised over all of these (L-BFGS, float64, from the loss's own
initial values), for the run's global batch B; then the lowest of that and the mean loss of one batch of random
embeddings (independent N(0, I) rows) over all B cyclic re-pairings of its texts, at the parameters and
log-stds found and at the loss's initial ones. Closed forms
it reproduces (tests): symmetric InfoNCE ln B (any temperature); SigLIP -ln(1/B) - (B - 1) ln(1 - 1/B) =
ln B + (B - 1) ln(B / (B - 1)) (the bias puts the one constant match probability at 1/B); the proposal's loss
ln B. Why it is a fair reference: a loss that is a convex function of its score (logit) matrices and does not
care how pairs are labelled is, averaged over every re-pairing of any embeddings, at least its value at the
averaged (constant) scores, so no model without pairing information does better on average (tested exactly on
small batches for infonce, sigmoid, gaussian_var, sigmoid_var). pcmepp is not convex in its scores: with every
score tied every pair is a pseudo-positive, 0.71 at B = 128, above what random embeddings give (0.53-0.55,
its loss at init); the random baseline is what makes its reference ~0.53, an estimate from one random batch
whose sampling noise (~0.01) is well inside the 10% margins below. For infonce, sigmoid and gaussian_var the
mean over cyclic re-pairings is provably not below the equal-score value (the averaged scores are constant per
row, or enter through a sum over all pairs), so their closed forms stay exact. A trained model is below the
reference; a collapsed one sits at it; a diverged one is above it.

Definitions (all counts over the whole run, resumed runs included):

- **non-finite step** (``stability/nonfinite_steps``: their count): the loss or the gradient norm is NaN or
  +-Inf, or the parameters hold NaN/Inf after the update (``params_finite=False``: the trainer checks after
  every update and stops the run there, naming the newest checkpoint whose weights are finite). Such steps feed neither the spike measures nor the gradient-norm statistics.
- **loss spike** (``stability/loss_spikes``, unchanged): a finite-loss step after ``warmup_steps`` whose loss
  exceeds ``spike_factor`` times the exponential moving average of the previous finite losses
  (``ema <- beta ema + (1 - beta) loss``), written ``loss - ema > (spike_factor - 1) |ema|``. A count that is
  almost always 0: kept for old studies, not for comparisons.
- **largest loss jump** (``stability/max_loss_jump``, ``stability/max_loss_jump_step``): the continuous spike
  measure. For each finite step after ``warmup_steps`` with at least ``spike_min_window`` (10) previous finite
  losses, z = (loss - median(prev)) / (1.4826 MAD(prev)) over the previous ``spike_window`` (50) finite losses
  (MAD: median absolute deviation, 1.4826 MAD estimates a standard deviation for Gaussian noise); the measure
  is the largest z of the run, floored at 0 (a run whose loss only falls has no upward jump; 0 also when no
  step qualifies). Why this form: it is unchanged by adding a constant to the loss or multiplying it by a
  positive one, so it means the same for losses that are negative (the Gaussian log-std loss), near zero or on
  different scales, which a ratio loss / median is not; and the median and MAD of the window are not moved by
  the spike itself. Mini-batch noise alone gives a few units (the maximum of ~2000 Gaussian draws is ~3.5; a
  trend inside the window adds to it); a spike gives tens. The MAD is floored at 1e-6 max(1, |median|), so a
  flat window gives a large finite value, not a division by zero.
- **gradient norms** (pre-clip, total over all parameters): ``stability/grad_norm_init`` the first step's,
  ``stability/grad_norm_median`` the median of all finite ones (warmup included), ``stability/median_grad_norm``
  and ``stability/max_grad_norm`` after warmup, and ``stability/grad_norm_ratio`` their max / median after
  warmup (all of them while the run is not past warmup).
- **diverged** (``stability/diverged``, sticky; ``stability/diverged_step`` when, -1 if not): any of
  (a) ``nonfinite_patience`` consecutive non-finite steps;
  (b) ``diverge_patience`` (20) consecutive finite steps after warmup with
      ``loss > reference + diverge_margin |reference|`` (``diverge_margin`` 0.1): the model does worse than
      one that knows nothing, for 20 steps in a row, after it had once done better (a loss at or below that
      threshold earlier in the run) or with the loss above the run's first loss (it rose from where it
      started). A slow start still falling towards the reference is not a divergence, and a run that never
      learns is "collapsed" (below), not "diverged". Not judged against the first loss (16.2 for gaussian_var
      at init, 5.07 for infonce: a first-loss rule never flags a run that collapses to ln B from 16).
      Without a reference (``reference=None``) only (a) and (c) apply;
  (c) the caller reports non-finite parameters (``update(..., params_finite=False)``; see :func:`params_finite`).
- **collapsed** (``stability/collapsed``; ``stability/collapsed_step``): judged after each evaluation by
  :meth:`StabilityTracker.judge_collapse`; an evaluation is collapsed when EITHER
  (1) ``val/loss >= val_reference - collapse_margin |val_reference|`` (``collapse_margin`` 0.1), the val loss is
      not below the uninformative reference (at the val batch size) by 10% of it; OR
  (2) zero-shot top-1 is not above chance: with k = round(top1 n) correct of the n labelled val images and C
      classes, the one-sided binomial p-value P(X >= k | n, 1/C) is above 0.05
      (``stability/zeroshot_p_above_chance``); skipped when the data has no zero-shot labels.
  ``stability/collapsed`` is the verdict of the LAST evaluation (the end of the run), with
  ``stability/collapsed_loss`` and ``stability/collapsed_zeroshot`` saying which part fired; ``collapsed_step`` is
  the first evaluation step of the final unbroken series of collapsed evaluations (-1 if the run ends healthy).

**Relative gradient clipping** (``trainer.grad_clip_mode=relative``): the threshold is ``grad_clip`` times the
median of the pre-clip norms of the run's first ``clip_ref_steps`` (20) finite steps (the median so far while
fewer exist, the current step included), so every loss is clipped relative to its own gradient scale (the
proposal's gradient at init is many times InfoNCE's, docs/notebook.md, and one absolute clip of 1.0 clips one
and not the other). :meth:`StabilityTracker.clip_threshold` returns it; the reference norms are checkpointed with
the tracker.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
from typing import Any, Iterable, Iterator, Mapping

import torch

from probloss import dist

SPIKE_WINDOW, SPIKE_MIN_WINDOW = 50, 10
MAD_TO_STD = 1.4826  # a Gaussian's standard deviation / its median absolute deviation
ZEROSHOT_ALPHA = 0.05


def _to_float(x: Any) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().item())
    return float(x) if x is not None else float("nan")


def params_finite(parameters: torch.nn.Module | Iterable[torch.Tensor]) -> bool:
    """True when every parameter of a module (or an iterable of tensors) is finite."""
    params = parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters
    return all(bool(torch.isfinite(p.detach()).all()) for p in params)


# --- the uninformative reference ------------------------------------------------------------------------------


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Inside: probloss.dist answers as in one process (no communication), even under a process group.

    The reference is a property of the loss and the global batch, not of the ranks: each rank computes the same
    single-process value on its own (the distributed invariant makes it the global one), with no collective
    that the other ranks would have to join.
    """
    saved = dist.is_distributed, dist.get_rank, dist.get_world_size
    dist.is_distributed, dist.get_rank, dist.get_world_size = (lambda: False), (lambda: 0), (lambda: 1)
    try:
        yield
    finally:
        dist.is_distributed, dist.get_rank, dist.get_world_size = saved


def uninformative_loss(loss: torch.nn.Module, batch_size: int, dim: int, log_std_per_dim: bool = False,
                       max_iter: int = 100) -> float:
    """The lowest value of ``loss`` over inputs whose every image-text score is equal (module docstring).

    Free variables (float64): u, v (D,) repeated as every image / text row; one image and one text log-std,
    () or (D,) with ``log_std_per_dim``, repeated over rows (losses with ``needs_log_std``); the loss's learnable
    parameters. Minimised by L-BFGS (strong Wolfe) from the loss's initial values; the lowest finite value seen,
    or, when lower, the mean over the B cyclic re-pairings of one random batch (rows N(0, I)) at the final
    parameters and log-stds, or at the loss's initial ones. Deterministic (fixed generator). The caller's loss is not touched (a deep copy is used).

    Args:
        loss: a registered loss module (any state: only its configuration and parameter values are read).
        batch_size: the global batch B (every row identical: B x B equal scores).
        dim: the embedding size D.
        log_std_per_dim: per-dimension log-stds (B, D) instead of (B,) (for losses that accept them).
        max_iter: L-BFGS iterations (100: prolip, the slowest to converge, within 2e-5 relative of 400).

    Returns:
        The reference value (a Python float).
    """
    b, d = int(batch_size), int(dim)
    with torch.enable_grad(), single_process():
        ref = copy.deepcopy(loss).cpu().double()
        gen = torch.Generator().manual_seed(0)
        u = torch.randn(d, generator=gen, dtype=torch.float64).div_(math.sqrt(d)).requires_grad_()
        v = u.detach().clone().requires_grad_()
        free = [u, v] + [p for p in ref.parameters() if p.requires_grad]
        stds = None
        if getattr(ref, "needs_log_std", False):
            shape = (d,) if log_std_per_dim and getattr(ref, "supports_diagonal_log_std", False) else ()
            init = float(getattr(ref, "init_log_std", 0.0))
            stds = [torch.full(shape, init, dtype=torch.float64, requires_grad=True) for _ in range(2)]
            free += stds
        best = [math.inf]

        def value() -> torch.Tensor:
            rows = (u.expand(b, d), v.expand(b, d))
            if stds is None:
                return ref(*rows)
            return ref(*rows, *(s.expand(b, *s.shape) for s in stds))

        optimizer = torch.optim.LBFGS(free, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            out = value()
            if torch.isfinite(out):
                best[0] = min(best[0], float(out.detach()))
                out.backward()
            return out

        closure()
        if math.isfinite(best[0]):
            optimizer.step(closure)
        # Pairing-free random embeddings, at the parameters found and at the loss's initial ones: the lower
        # baseline where equal scores are a special case (pcmepp counts tied pairs as pseudo-positives: 0.71
        # tied, ~0.53 random at B = 128).
        candidates = [best[0]]
        initial = copy.deepcopy(loss).cpu().double()
        with torch.no_grad():
            for module, log_stds in ((ref, stds), (initial, None if stds is None else [
                    torch.full_like(s, float(getattr(ref, "init_log_std", 0.0))) for s in stds])):
                # every cyclic re-pairing of one random batch: for a loss convex in its scores this mean is
                # provably >= the equal-score minimum (module docstring), so it only wins where ties are special
                x, y = (torch.randn(b, d, generator=gen, dtype=torch.float64) for _ in range(2))
                sx, sy = (None, None) if log_stds is None else (s.detach().expand(b, *s.shape) for s in log_stds)
                values = []
                for k in range(b):
                    args = (x, y.roll(k, 0)) if sx is None else (x, y.roll(k, 0), sx, sy.roll(k, 0))
                    values.append(float(module(*args)))
                candidates.append(math.fsum(values) / len(values))
        return min(v for v in candidates if math.isfinite(v))


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly in log space (n up to ~1e6)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
                 + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in log_terms))


def zeroshot_p_above_chance(top1: float, n: int, classes: int) -> float:
    """One-sided binomial p-value of ``top1`` accuracy on ``n`` labelled images against chance 1/``classes``."""
    return binomial_sf(int(round(top1 * n)), int(n), 1.0 / classes)


class StabilityTracker:
    """Loss spikes and jumps, non-finite steps, divergence and collapse against a reference, gradient norms.

    Args:
        reference: the loss's uninformative value at the training batch (:func:`uninformative_loss`); None:
            divergence by rule (b) of the module docstring is off.
        spike_factor: a spike is a loss above ``spike_factor`` x its moving average (2 in the issue).
        ema_beta: decay of the loss moving average (0.9: about a 10-step memory).
        warmup_steps: steps ``<= warmup_steps`` are never spikes or jumps, never count towards divergence (b),
            and are left out of the post-warmup grad-norm statistics once later steps exist.
        diverge_margin: a loss above ``reference + diverge_margin |reference|`` counts towards divergence.
        diverge_patience: consecutive steps above it that make the run diverged.
        nonfinite_patience: consecutive non-finite steps that make the run diverged.
        collapse_margin: an evaluation's val loss must be below ``val_reference - collapse_margin |val_reference|``.
        spike_window: previous finite losses the jump measure compares a step with.
        clip_ref_steps: finite steps whose median pre-clip norm is the relative-clipping scale.
    """

    def __init__(self, reference: float | None = None, spike_factor: float = 2.0, ema_beta: float = 0.9,
                 warmup_steps: int = 10, diverge_margin: float = 0.1, diverge_patience: int = 20,
                 nonfinite_patience: int = 3, collapse_margin: float = 0.1, spike_window: int = SPIKE_WINDOW,
                 clip_ref_steps: int = 20):
        if spike_factor <= 1 or diverge_margin < 0 or collapse_margin < 0:
            raise ValueError("StabilityTracker: spike_factor must be > 1, diverge_margin and collapse_margin >= 0")
        if not 0 <= ema_beta < 1:
            raise ValueError(f"StabilityTracker: ema_beta must be in [0, 1), got {ema_beta}")
        if spike_window < SPIKE_MIN_WINDOW:
            raise ValueError(f"StabilityTracker: spike_window must be >= {SPIKE_MIN_WINDOW}, got {spike_window}")
        self.reference = None if reference is None else float(reference)
        self.spike_factor, self.ema_beta, self.warmup_steps = float(spike_factor), float(ema_beta), int(warmup_steps)
        self.diverge_margin, self.diverge_patience = float(diverge_margin), int(diverge_patience)
        self.nonfinite_patience, self.collapse_margin = int(nonfinite_patience), float(collapse_margin)
        self.spike_window, self.clip_ref_steps = int(spike_window), int(clip_ref_steps)
        self.reset()

    def reset(self) -> None:
        self.steps = 0  # update() calls
        self.last_step = -1
        self.ema: float | None = None
        self.loss_spikes = 0
        self.spike_steps: list[int] = []  # the first 100, for inspection
        self.recent_losses: list[float] = []  # the last spike_window finite losses
        self.max_loss_jump = 0.0
        self.max_loss_jump_step = -1
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        self.above_ref_in_a_row = 0
        self.first_loss: float | None = None  # the first finite loss
        self.below_ref_seen = False  # a finite loss at or below diverge_threshold() has occurred
        self.diverged = False
        self.diverged_step = -1
        self.diverged_reason = ""
        self.grad_norm_init = float("nan")
        self.grad_norms_warmup: list[float] = []
        self.grad_norms: list[float] = []  # after warmup
        self.clip_ref_norms: list[float] = []
        self.collapse: dict[str, Any] = {}  # the last judge_collapse verdict
        self.collapsed_step = -1

    # --- recording ------------------------------------------------------------------------------------------

    def diverge_threshold(self) -> float:
        """The loss above which a post-warmup step counts towards divergence (inf without a reference)."""
        if self.reference is None or not math.isfinite(self.reference):
            return math.inf
        return self.reference + self.diverge_margin * abs(self.reference)

    def update(self, step: int, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None = None,
               params_finite: bool | None = None) -> bool:
        """Record one optimizer step.

        Args:
            step: the global step (the trainer's, 1-based or 0-based: only compared with ``warmup_steps``).
            loss: the step's loss (float or 0-d tensor).
            grad_norm: the total gradient norm before clipping, or None when not measured.
            params_finite: pass False when the parameters hold NaN/Inf after the step (marks divergence).

        Returns:
            True when this step was a loss spike (the EMA rule).
        """
        loss, gn = _to_float(loss), _to_float(grad_norm) if grad_norm is not None else None
        self.steps += 1
        self.last_step = int(step)
        past_warmup = step > self.warmup_steps
        if self.steps == 1 and gn is not None:
            self.grad_norm_init = gn
        if params_finite is False:
            self._diverge(step, "non-finite parameters")

        if params_finite is False or not math.isfinite(loss) or (gn is not None and not math.isfinite(gn)):
            self.nonfinite_steps += 1  # ruined weights make a non-finite step even after a finite loss
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.nonfinite_patience:
                self._diverge(step, f"{self.nonfinite_in_a_row} non-finite steps in a row")
            return False
        self.nonfinite_in_a_row = 0

        if gn is not None:
            (self.grad_norms if past_warmup else self.grad_norms_warmup).append(gn)

        spike = False
        if self.ema is not None and past_warmup and loss - self.ema > (self.spike_factor - 1) * abs(self.ema):
            spike = True
            self.loss_spikes += 1
            if len(self.spike_steps) < 100:
                self.spike_steps.append(int(step))
        self.ema = loss if self.ema is None else self.ema_beta * self.ema + (1 - self.ema_beta) * loss

        if past_warmup and len(self.recent_losses) >= SPIKE_MIN_WINDOW:
            z = loss_jump(loss, self.recent_losses)
            if z > self.max_loss_jump:
                self.max_loss_jump, self.max_loss_jump_step = z, int(step)
        self.recent_losses.append(loss)
        del self.recent_losses[:-self.spike_window]

        if self.first_loss is None:
            self.first_loss = loss
        # Above the reference counts once the run has learned something (it was below it) or when the loss has
        # risen above where it started: a slow start that is still falling towards the reference (a low learning
        # rate, gaussian_var's first loss of 16) is not a divergence; a run that never learns is "collapsed".
        rising = self.below_ref_seen or loss > self.first_loss
        if past_warmup and loss > self.diverge_threshold() and rising:
            self.above_ref_in_a_row += 1
            if self.above_ref_in_a_row >= self.diverge_patience:
                self._diverge(step, f"loss above the uninformative reference {self.reference:.4g} + "
                                    f"{self.diverge_margin:g} x |reference| for {self.above_ref_in_a_row} steps")
        else:
            self.above_ref_in_a_row = 0
        self.below_ref_seen = self.below_ref_seen or loss <= self.diverge_threshold()
        return spike

    def _diverge(self, step: int, reason: str) -> None:
        if not self.diverged:
            self.diverged, self.diverged_step, self.diverged_reason = True, int(step), reason

    def clip_threshold(self, grad_norm: float, factor: float) -> float:
        """Relative clipping: ``factor`` x the median pre-clip norm of the first ``clip_ref_steps`` finite steps
        (so far, this one included); records ``grad_norm`` while that window fills. inf when nothing is known."""
        if math.isfinite(grad_norm) and len(self.clip_ref_norms) < self.clip_ref_steps:
            self.clip_ref_norms.append(float(grad_norm))
        if not self.clip_ref_norms:
            return math.inf
        return factor * statistics.median(self.clip_ref_norms)

    def judge_collapse(self, step: int, val_loss: float | None, val_reference: float | None,
                       zeroshot_top1: float | None = None, n_labelled: int | None = None,
                       classes: int | None = None) -> dict[str, Any]:
        """Judge one evaluation (module docstring, "collapsed"); the last call's verdict is the run's.

        Each part is judged only when its inputs are known (finite val loss and reference; zero-shot accuracy,
        n >= 1 labelled images, C >= 2 classes); a non-finite val loss is collapsed.

        Returns:
            ``{"collapsed", "collapsed_loss", "collapsed_zeroshot", "zeroshot_p_above_chance"}``.
        """
        by_loss = by_zeroshot = False
        p_value = math.nan
        if val_loss is not None and val_reference is not None and math.isfinite(val_reference):
            by_loss = not (math.isfinite(val_loss)
                           and val_loss < val_reference - self.collapse_margin * abs(val_reference))
        if zeroshot_top1 is not None and n_labelled and classes and classes >= 2 and math.isfinite(zeroshot_top1):
            p_value = zeroshot_p_above_chance(zeroshot_top1, int(n_labelled), int(classes))
            by_zeroshot = p_value > ZEROSHOT_ALPHA
        collapsed = by_loss or by_zeroshot
        if collapsed and not self.collapse.get("collapsed"):
            self.collapsed_step = int(step)
        elif not collapsed:
            self.collapsed_step = -1
        self.collapse = {"collapsed": collapsed, "collapsed_loss": by_loss, "collapsed_zeroshot": by_zeroshot,
                         "zeroshot_p_above_chance": p_value}
        return dict(self.collapse)

    # --- reading --------------------------------------------------------------------------------------------

    def grad_norm_ratio(self) -> float:
        """max / median of the finite gradient norms after warmup (all of them if none is past warmup)."""
        norms = self.grad_norms or self.grad_norms_warmup
        if not norms:
            return float("nan")
        top, median = max(norms), statistics.median(norms)
        if median <= 0:
            return 1.0 if top <= 0 else math.inf
        return top / median

    def summary(self) -> dict[str, Any]:
        """Every ``stability/`` key of the module docstring."""
        norms = self.grad_norms or self.grad_norms_warmup
        every = self.grad_norms_warmup + self.grad_norms
        nan = float("nan")
        return {
            "stability/loss_spikes": self.loss_spikes,
            "stability/max_loss_jump": self.max_loss_jump,
            "stability/max_loss_jump_step": self.max_loss_jump_step,
            "stability/grad_norm_ratio": self.grad_norm_ratio(),
            "stability/nonfinite_steps": self.nonfinite_steps,
            "stability/diverged": self.diverged,
            "stability/diverged_step": self.diverged_step,
            "stability/collapsed": bool(self.collapse.get("collapsed", False)),
            "stability/collapsed_step": self.collapsed_step,
            "stability/collapsed_loss": bool(self.collapse.get("collapsed_loss", False)),
            "stability/collapsed_zeroshot": bool(self.collapse.get("collapsed_zeroshot", False)),
            "stability/zeroshot_p_above_chance": self.collapse.get("zeroshot_p_above_chance", nan),
            "stability/reference_loss": nan if self.reference is None else self.reference,
            "stability/grad_norm_init": self.grad_norm_init,
            "stability/grad_norm_median": statistics.median(every) if every else nan,
            "stability/max_grad_norm": max(norms) if norms else nan,
            "stability/median_grad_norm": statistics.median(norms) if norms else nan,
        }

    # --- checkpointing --------------------------------------------------------------------------------------

    _STATE = ("steps", "last_step", "ema", "loss_spikes", "spike_steps", "nonfinite_steps", "nonfinite_in_a_row",
              "above_ref_in_a_row", "diverged", "diverged_step", "diverged_reason", "grad_norms_warmup",
              "grad_norms")
    # Added with the reference-based rules: a checkpoint from before them resumes with these at their start
    # values (its jump measure and initial gradient norm then cover the resumed part only).
    _STATE_NEW = ("recent_losses", "max_loss_jump", "max_loss_jump_step", "grad_norm_init", "clip_ref_norms",
                  "collapse", "collapsed_step", "first_loss", "below_ref_seen")
    _CONFIG = ("reference", "spike_factor", "ema_beta", "warmup_steps", "diverge_margin", "diverge_patience",
               "nonfinite_patience", "collapse_margin", "spike_window", "clip_ref_steps")

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (loads under ``torch.load(weights_only=True)``)."""
        state = {k: getattr(self, k) for k in self._STATE + self._STATE_NEW}
        for k in ("grad_norms_warmup", "grad_norms", "spike_steps", "recent_losses", "clip_ref_norms"):
            state[k] = list(state[k])
        state["collapse"] = dict(self.collapse)
        state["config"] = {k: getattr(self, k) for k in self._CONFIG}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counts of a checkpoint; the thresholds (and the reference) stay this tracker's."""
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise KeyError(f"StabilityTracker.load_state_dict: missing {missing}")
        for k in self._STATE + self._STATE_NEW:
            if k in state:
                value = state[k]
                setattr(self, k, list(value) if isinstance(value, (list, tuple)) else
                        dict(value) if isinstance(value, Mapping) else value)


def loss_jump(loss: float, previous: list[float]) -> float:
    """(loss - median(previous)) / (1.4826 MAD(previous)), the MAD floored at 1e-6 max(1, |median|)."""
    median = statistics.median(previous)
    mad = statistics.median(abs(x - median) for x in previous)
    scale = max(MAD_TO_STD * mad, 1e-6 * max(1.0, abs(median)))
    return (loss - median) / scale
