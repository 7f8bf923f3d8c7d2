"""Training-stability bookkeeping: loss spikes, gradient-norm spread, non-finite steps, divergence.

The trainer calls ``tracker.update(step, loss, grad_norm)`` once per optimizer step (also on skipped non-finite
steps), checkpoints ``tracker.state_dict()``, and writes ``tracker.summary()`` into summary.json.

Definitions (all counts over the whole run, resumed runs included):

- **non-finite step**: the loss or the gradient norm is NaN or +-Inf. Such steps feed neither the moving
  average nor the gradient-norm statistics.
- **loss spike**: a finite-loss step after ``warmup_steps`` whose loss exceeds ``spike_factor`` times the
  exponential moving average of the previous finite losses (``ema <- beta ema + (1 - beta) loss``, started at
  the first finite loss). Written as ``loss - ema > (spike_factor - 1) |ema|`` so that it also means
  something for losses that can be negative (the Gaussian log-std loss); for a positive average it is exactly
  ``loss > spike_factor * ema``.
- **grad_norm_ratio**: max / median of the finite gradient norms after ``warmup_steps`` (of all of them while
  the run is not past warmup): a heavy tail of gradient norms is the usual precursor of a blow-up.
- **diverged** (sticky, ``diverged_step`` records when): any of
  (a) ``nonfinite_patience`` consecutive non-finite steps;
  (b) ``diverge_patience`` consecutive finite steps after warmup with loss above the reference, i.e.
      ``loss - ref > (diverge_factor - 1) |ref|``, where ``ref`` is the first finite loss of the run;
  (c) the caller reports non-finite parameters (``update(..., params_finite=False)``; see :func:`params_finite`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Mapping

import torch


def _to_float(x: Any) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().item())
    return float(x) if x is not None else float("nan")


def params_finite(parameters: torch.nn.Module | Iterable[torch.Tensor]) -> bool:
    """True when every parameter of a module (or an iterable of tensors) is finite."""
    params = parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters
    return all(bool(torch.isfinite(p.detach()).all()) for p in params)


class StabilityTracker:
    """Counts loss spikes, non-finite steps and divergence; summarises the gradient-norm spread.

    Args:
        spike_factor: a spike is a loss above ``spike_factor`` x its moving average (2 in the issue).
        ema_beta: decay of the loss moving average (0.9: about a 10-step memory).
        warmup_steps: steps ``<= warmup_steps`` are never spikes, never count towards (b) below, and are left
            out of the grad-norm ratio once later steps exist (early training is legitimately erratic).
        diverge_factor: factor over the first loss that counts as diverged when sustained.
        diverge_patience: consecutive steps above it that make the run diverged.
        nonfinite_patience: consecutive non-finite steps that make the run diverged.
    """

    def __init__(self, spike_factor: float = 2.0, ema_beta: float = 0.9, warmup_steps: int = 10,
                 diverge_factor: float = 3.0, diverge_patience: int = 20, nonfinite_patience: int = 3):
        if spike_factor <= 1 or diverge_factor <= 1:
            raise ValueError("StabilityTracker: spike_factor and diverge_factor must be > 1")
        if not 0 <= ema_beta < 1:
            raise ValueError(f"StabilityTracker: ema_beta must be in [0, 1), got {ema_beta}")
        self.spike_factor, self.ema_beta, self.warmup_steps = float(spike_factor), float(ema_beta), int(warmup_steps)
        self.diverge_factor, self.diverge_patience = float(diverge_factor), int(diverge_patience)
        self.nonfinite_patience = int(nonfinite_patience)
        self.reset()

    def reset(self) -> None:
        self.steps = 0  # update() calls
        self.last_step = -1
        self.ema: float | None = None
        self.ref_loss: float | None = None
        self.loss_spikes = 0
        self.spike_steps: list[int] = []  # the first 100, for inspection
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        self.above_ref_in_a_row = 0
        self.diverged = False
        self.diverged_step = -1
        self.diverged_reason = ""
        self.grad_norms_warmup: list[float] = []
        self.grad_norms: list[float] = []  # after warmup

    # --- recording ------------------------------------------------------------------------------------------

    def update(self, step: int, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None = None,
               params_finite: bool | None = None) -> bool:
        """Record one optimizer step.

        Args:
            step: the global step (the trainer's, 1-based or 0-based: only compared with ``warmup_steps``).
            loss: the step's loss (float or 0-d tensor).
            grad_norm: the total gradient norm before clipping, or None when not measured.
            params_finite: pass False when the parameters hold NaN/Inf after the step (marks divergence).

        Returns:
            True when this step was a loss spike.
        """
        loss, gn = _to_float(loss), _to_float(grad_norm) if grad_norm is not None else None
        self.steps += 1
        self.last_step = int(step)
        past_warmup = step > self.warmup_steps
        if params_finite is False:
            self._diverge(step, "non-finite parameters")

        if not math.isfinite(loss) or (gn is not None and not math.isfinite(gn)):
            self.nonfinite_steps += 1
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

        if self.ref_loss is None:
            self.ref_loss = loss
        elif past_warmup and loss - self.ref_loss > (self.diverge_factor - 1) * abs(self.ref_loss):
            self.above_ref_in_a_row += 1
            if self.above_ref_in_a_row >= self.diverge_patience:
                self._diverge(step, f"loss above {self.diverge_factor:g}x the first loss for "
                                    f"{self.above_ref_in_a_row} steps")
        else:
            self.above_ref_in_a_row = 0
        return spike

    def _diverge(self, step: int, reason: str) -> None:
        if not self.diverged:
            self.diverged, self.diverged_step, self.diverged_reason = True, int(step), reason

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
        """The docs/design.md keys (``stability/loss_spikes``, ``grad_norm_ratio``, ``nonfinite_steps``,
        ``diverged``) plus ``stability/diverged_step`` (-1 if not), ``stability/max_grad_norm``,
        ``stability/median_grad_norm``."""
        norms = self.grad_norms or self.grad_norms_warmup
        return {
            "stability/loss_spikes": self.loss_spikes,
            "stability/grad_norm_ratio": self.grad_norm_ratio(),
            "stability/nonfinite_steps": self.nonfinite_steps,
            "stability/diverged": self.diverged,
            "stability/diverged_step": self.diverged_step,
            "stability/max_grad_norm": max(norms) if norms else float("nan"),
            "stability/median_grad_norm": statistics.median(norms) if norms else float("nan"),
        }

    # --- checkpointing --------------------------------------------------------------------------------------

    _STATE = ("steps", "last_step", "ema", "ref_loss", "loss_spikes", "spike_steps", "nonfinite_steps",
              "nonfinite_in_a_row", "above_ref_in_a_row", "diverged", "diverged_step", "diverged_reason",
              "grad_norms_warmup", "grad_norms")
    _CONFIG = ("spike_factor", "ema_beta", "warmup_steps", "diverge_factor", "diverge_patience", "nonfinite_patience")

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (loads under ``torch.load(weights_only=True)``)."""
        state = {k: getattr(self, k) for k in self._STATE}
        state["grad_norms_warmup"], state["grad_norms"] = list(self.grad_norms_warmup), list(self.grad_norms)
        state["spike_steps"] = list(self.spike_steps)
        state["config"] = {k: getattr(self, k) for k in self._CONFIG}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counts of a checkpoint; the thresholds stay those this tracker was built with."""
        missing = [k for k in self._STATE if k not in state]
        if missing:
            raise KeyError(f"StabilityTracker.load_state_dict: missing {missing}")
        for k in self._STATE:
            value = state[k]
            setattr(self, k, list(value) if isinstance(value, (list, tuple)) else value)
