"""``Linear``: ``nn.Linear`` whose float32 CPU matrix products may run on oneDNN instead of the BLAS.

Why: torch's CPU wheels send float32 ``mm``/``addmm`` to Intel MKL, and MKL takes its AVX2 code path on
non-Intel CPUs, so on an AVX-512 AMD CPU oneDNN (also inside torch, the library behind its CPU convolutions)
runs the same products faster, and the tiny default model spends much of its step in them. How much, on which
CPU: docs/performance.md; ``scripts/bench_linear.py`` measures it on the machine it runs on.

Backends (:func:`cpu_matmul`, the config key ``trainer.cpu_matmul``):

- ``blas``: ``torch.nn.functional.linear``, i.e. MKL (bit-identical to plain ``nn.Linear``).
- ``onednn``: forward ``x W^T + b`` and both backward products through ``torch.ops.mkldnn._linear_pointwise``
  (the op torch.compile's CPU backend emits for linear layers); the results differ from MKL's by float32
  rounding (a different summation order), deterministic for a given thread count.
- ``auto`` (the default config): ``onednn`` where torch has it, ``blas`` otherwise.

A run saved before the key existed has no value there and keeps ``blas`` (how it was trained), so its resume
and its evaluation reproduce it. Outside :func:`cpu_matmul` (tests, notebooks) the default is ``auto``.

Only float32 CPU tensors outside autocast take the oneDNN path; everything else (GPU, float64, bfloat16)
calls ``F.linear`` whatever the backend. Parameters and state-dict keys are those of ``nn.Linear``.

Shapes: x (..., in), weight (out, in), bias (out,) or None -> (..., out).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor
BACKENDS = ("auto", "onednn", "blas")


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_use_onednn = onednn_available()


@contextlib.contextmanager
def cpu_matmul(backend: str) -> Iterator[str]:
    """Use ``backend`` for every ``Linear`` in this process inside the block (the previous one after it); yields
    the backend in effect, "onednn" or "blas".

    Raises:
        ValueError: an unknown backend, or ``onednn`` where this torch build lacks it.
    """
    global _use_onednn
    if backend not in BACKENDS:
        raise ValueError(f"cpu_matmul must be one of {'|'.join(BACKENDS)}, got {backend!r}")
    if backend == "onednn" and not onednn_available():
        raise ValueError("cpu_matmul=onednn: this torch build has no oneDNN linear op; use auto or blas")
    previous, _use_onednn = _use_onednn, backend == "onednn" or (backend == "auto" and onednn_available())
    try:
        yield "onednn" if _use_onednn else "blas"
    finally:
        _use_onednn = previous


def _dense(t: Tensor) -> Tensor:
    """``t`` if it is row-major or the transpose of a row-major 2-D matrix, else a contiguous copy: oneDNN takes
    both without a copy, but other strides (a column slice such as ``x[:, 0]`` of a sequence, then transposed)
    run far slower than copying first (docs/performance.md)."""
    if t.is_contiguous() or (t.dim() == 2 and t.stride() == (1, t.shape[0])):
        return t
    return t.contiguous()


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(weight), bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_2d = grad.reshape(-1, grad.shape[-1])  # (rows, out)
        grad_x = _onednn(grad, weight.t(), None) if need_x else None  # grad @ W: (..., in)
        grad_w = None
        if need_w:  # grad^T @ x, a sum over rows; oneDNN copies a transposed first operand, so copy the smaller
            x_2d = x.reshape(-1, x.shape[-1])  # (rows, in)
            if x_2d.shape[1] < grad_2d.shape[1]:
                grad_w = _onednn(x_2d.t().contiguous(), grad_2d.t(), None).t().contiguous()  # (x^T grad)^T
            else:
                grad_w = _onednn(grad_2d.t().contiguous(), x_2d.t(), None)
        grad_b = grad_2d.sum(0) if need_b else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` on the chosen CPU backend (see the module docstring)."""
    if (_use_onednn and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and x.dim() >= 2):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, init and state dict) that calls :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
