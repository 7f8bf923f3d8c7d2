"""Shared fixtures: loss inputs, the shapes-data cache, and registries that no test can leak into another.

- ``loss_inputs``: the one generator of seeded loss inputs (a factory, see :func:`make_loss_inputs`).
- ``cache_dir``: one shapes-data cache per session (generating the data is the slow part of a training test).
- every test runs against a snapshot of ``probloss.LOSSES`` and ``probloss.ENCODERS`` taken before it and
  restored after it, so a loss or encoder a test registers is gone when it ends;
- ``losses_at_collection``: the registered losses right after each test module was collected, so a module that
  registers a loss at import (and so changes every registry-parametrised test collected after it) is caught.
"""

from __future__ import annotations

import pytest
import torch

import probloss
from probloss.testing import make_inputs

_LOSSES_AT_COLLECTION = pytest.StashKey[dict[str, list[str]]]()
PAIRS = ("close", "independent", "separated")


def make_loss_inputs(
    batch: int = 6,
    dim: int = 5,
    log_std: str | None = None,
    *,
    pairs: str = "close",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    requires_grad: bool = False,
    extra_texts: int = 0,
) -> list[torch.Tensor | None]:
    """Seeded ``[image_emb, text_emb, image_log_std, text_log_std]`` for a loss, log-stds None when not asked for.

    Args:
        batch, dim: B and D.
        log_std: None, "sample" ``(B,)`` or "diagonal" ``(B, D)``, as :func:`probloss.testing.log_std_shapes`
            lists them for a loss class.
        pairs: how text i relates to image i: "close" (image plus noise, so positives are closer than
            negatives: probloss.testing.make_inputs, the distributed check's inputs), "independent" (unrelated:
            a loss at chance), or "separated" (pair i lies along its own axis, far from every other pair; needs
            ``dim >= batch``: any sensible score ranks the positive first).
        requires_grad: make every returned tensor a leaf that requires grad.
        extra_texts: k hard-negative texts per image appended after the B positive texts (and text log-stds):
            ``text_emb`` then has ``B (1 + k)`` rows (the loss contract). "close": near their image;
            "independent": unrelated; "separated": near the origin, off every pair's axis.
    """
    if pairs == "close":
        tensors = list(make_inputs(batch, dim, seed, log_std, dtype, extra_texts=extra_texts))
    elif pairs in ("independent", "separated"):
        gen = torch.Generator().manual_seed(seed)
        x, y = (torch.randn(batch, dim, generator=gen, dtype=dtype) for _ in range(2))
        if pairs == "separated":
            if dim < batch:
                raise ValueError(f"separated pairs need dim >= batch, got dim {dim} < batch {batch}")
            axes = 3 * torch.eye(batch, dim, dtype=dtype)
            x, y = axes + 0.05 * x, axes + 0.05 * y
        tensors = [x, y, None, None]
        shape = None if log_std is None else {"sample": (batch,), "diagonal": (batch, dim)}[log_std]
        if shape is not None:
            tensors[2:] = [0.3 * torch.randn(shape, generator=gen, dtype=dtype) for _ in range(2)]
        if extra_texts:  # drawn last: the inputs without extras are unchanged
            extras = torch.randn(batch * extra_texts, dim, generator=gen, dtype=dtype)
            tensors[1] = torch.cat([y, 0.05 * extras if pairs == "separated" else extras])
            if shape is not None:
                extra_log_std = 0.3 * torch.randn(batch * extra_texts, *shape[1:], generator=gen, dtype=dtype)
                tensors[3] = torch.cat([tensors[3], extra_log_std])
    else:
        raise ValueError(f"pairs={pairs!r} is not one of {', '.join(PAIRS)}")
    if requires_grad:
        tensors = [t.requires_grad_() if t is not None else None for t in tensors]
    return tensors


@pytest.fixture
def loss_inputs():
    """The factory :func:`make_loss_inputs`: ``x, y, lx, ly = loss_inputs(6, 5, "sample", requires_grad=True)``."""
    return make_loss_inputs


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A directory for the generated shapes data, shared by every training test of the session."""
    return tmp_path_factory.mktemp("shapes_cache")


@pytest.fixture(autouse=True)
def _restore_registries():
    """Whatever a test registers in (or removes from) the loss and encoder registries is undone after it."""
    states = [(registry, registry.snapshot()) for registry in (probloss.LOSSES, probloss.ENCODERS)]
    yield
    for registry, state in states:
        registry.restore(state)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if isinstance(collector, pytest.Module):  # its module has been imported and its parametrisations made
        seen = collector.config.stash.setdefault(_LOSSES_AT_COLLECTION, {})
        seen[collector.nodeid] = probloss.list_losses()
    return report


@pytest.fixture(scope="session")
def losses_at_collection(request) -> dict[str, list[str]]:
    """``{module node id: probloss.list_losses() right after the module was collected}`` for this session."""
    return request.config.stash.get(_LOSSES_AT_COLLECTION, {})
