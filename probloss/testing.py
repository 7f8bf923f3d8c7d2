"""Check a loss plugin against the distributed invariant of docs/design.md with real processes.

    import probloss.testing
    probloss.testing.check_distributed("my_loss", world_sizes=(2, 3))

For each world size W, W processes (gloo on CPU) each take a contiguous slice of a seeded float64 batch, call
the loss and ``.backward()``; the results are compared with one process on the whole batch:

(a) the mean over ranks of the returned values equals the single-process value;
(b) the mean over ranks of each learnable loss parameter's gradient equals the single-process gradient;
(c) each rank's gradient on its own embedding (and log-std) slice equals W times the single-process gradient.

``extra_texts=k`` checks the same with hard negatives: each rank also passes k extra texts per image after its
positives (``M = N (1 + k)`` text rows), and the single process gets texts ordered [every rank's positives in
rank order, then every rank's extras in rank order] (the contract of :class:`probloss.ContrastiveLoss`).

``groups=True`` passes false-negative group ids with deliberate duplicates (:func:`make_groups`: identical
captions on every rank and across ranks, repeated scenes, extras repeating their image's caption) to every call,
each rank its slice and the single process all of them: with ``false_negatives`` in the variants, it checks
that ids travel with the texts and every pair is judged over the global batch.

A loss class lists the keyword variants worth checking (distributed modes, implementations) in its class
attribute ``distributed_variants`` (:class:`probloss.ContrastiveLoss`; by default it is checked as built).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp

import probloss
from probloss import dist


@dataclass
class CaseResult:
    """One (world size, variant, log-std shape) case; ``errors`` maps each checked quantity to its relative error."""

    world_size: int
    variant: dict
    log_std: str | None
    errors: dict[str, float] = field(default_factory=dict)
    extra_texts: int = 0

    @property
    def worst(self) -> float:
        return max(self.errors.values(), default=0.0)


class DistributedCheckError(AssertionError):
    pass


def make_inputs(batch: int, dim: int, seed: int, log_std: str | None, dtype=torch.float64, extra_texts: int = 0):
    """Seeded inputs for the whole global batch: ``(x, y, image_log_std, text_log_std)``.

    Texts are their images plus noise, so positives are closer than negatives. ``log_std``: None (no log-stds),
    "sample" (``(B,)``) or "diagonal" (``(B, D)``), as :func:`log_std_shapes` lists them. ``extra_texts=k``
    appends ``B k`` hard-negative texts (and their log-stds) after the B positives, image by image (rows
    ``B + i k .. B + (i + 1) k - 1`` near image i, farther than its positive); the first draws do not change.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=gen, dtype=dtype)
    y = x + 0.5 * torch.randn(batch, dim, generator=gen, dtype=dtype)  # positives closer than negatives
    shape = None if log_std is None else (batch,) if log_std == "sample" else (batch, dim)
    lx = ly = None
    if shape is not None:
        lx = 0.3 * torch.randn(*shape, generator=gen, dtype=dtype)
        ly = 0.3 * torch.randn(*shape, generator=gen, dtype=dtype)
    if extra_texts:
        near = x.repeat_interleave(extra_texts, 0)
        y = torch.cat([y, near + torch.randn(near.shape, generator=gen, dtype=dtype)])
        if shape is not None:
            ly = torch.cat([ly, 0.3 * torch.randn(batch * extra_texts, *shape[1:], generator=gen, dtype=dtype)])
    return x, y, lx, ly


def make_groups(batch: int, extra_texts: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_groups (B (1 + k),), image_groups (B,))`` int64 with deliberate duplicates for :func:`make_inputs`'
    batch (false negatives, probloss/false_negatives.py).

    Captions repeat with period 3 (sample i has caption group i mod 3), so identical captions sit on every rank and
    across rank boundaries; scenes repeat with period 4 (sample i and i + 4 show one scene); every other extra text
    repeats its image's caption (extra ``i k + e`` has group i mod 3 for even e, a group of its own otherwise).
    """
    rows = torch.arange(batch)
    text_groups = rows % 3
    image_groups = 100 + rows % 4
    if extra_texts:
        extra = torch.arange(batch * extra_texts)
        own = extra // extra_texts % 3
        text_groups = torch.cat([text_groups, torch.where(extra % 2 == 0, own, 1000 + extra)])
    return text_groups.long(), image_groups.long()


def rank_rows(rank: int, world: int, batch: int, extra_texts: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image rows, text rows)`` of rank ``rank``'s slice of :func:`make_inputs`' global batch.

    Images: the rank's contiguous ``N = batch / world`` rows. Texts: the same rows (its positives), then its
    ``N k`` extras, which sit after all ``batch`` positives in rank order.
    """
    n = batch // world
    images = torch.arange(rank * n, (rank + 1) * n)
    extras = batch + torch.arange(rank * n * extra_texts, (rank + 1) * n * extra_texts)
    return images, torch.cat([images, extras])


def loss_and_grads(loss_module, x, y, lx, ly, groups=None):
    """Value and gradients of one call: embeddings, log-stds and every learnable parameter of the loss.

    ``groups``: ``(text_groups, image_groups)`` passed as keywords (false negatives), or None.
    """
    inputs = [t.clone().requires_grad_(True) if t is not None else None for t in (x, y, lx, ly)]
    kwargs = {} if groups is None else {"text_groups": groups[0], "image_groups": groups[1]}
    value = loss_module(*inputs, **kwargs)
    value.backward()
    grads = {name: t.grad.clone() for name, t in zip(("image_emb", "text_emb", "image_log_std", "text_log_std"), inputs)
             if t is not None}
    params = {name: p.grad.clone() for name, p in loss_module.named_parameters() if p.grad is not None}
    loss_module.zero_grad(set_to_none=True)
    return value.detach(), grads, params


def log_std_shapes(loss_cls: type[probloss.ContrastiveLoss]) -> list[str | None]:
    """The log-std layouts a loss class takes, named as :func:`make_inputs` takes them.

    ``[None]`` for a loss without log-stds, else ``["sample"]``, plus ``"diagonal"`` where the class declares
    ``supports_diagonal_log_std``.
    """
    if not loss_cls.needs_log_std:
        return [None]
    return ["sample", "diagonal"] if loss_cls.supports_diagonal_log_std else ["sample"]


def loss_class(name: str) -> type[probloss.ContrastiveLoss]:
    """The registered class of loss ``name``; an error if the registry holds something else (a factory)."""
    cls = probloss.LOSSES.get(name)
    if not (isinstance(cls, type) and issubclass(cls, probloss.ContrastiveLoss)):
        raise TypeError(f"loss {name!r} is registered as {cls!r}, not a probloss.ContrastiveLoss subclass")
    return cls


def _cases(cls: type[probloss.ContrastiveLoss], variants: list[dict] | None):
    variants = variants if variants is not None else cls.distributed_variants
    return [(variant, shape) for variant in variants for shape in log_std_shapes(cls)]


def _worker(rank, world, init_file, out_dir, cls, cases, loss_kwargs, batch, dim, seed, extra_texts, groups):
    # ``cls`` arrives pickled by reference, which imports its module here: a loss registered in a test or a
    # script (not at import of a plugin package) is checked as well, without its registration.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"file://{init_file}", rank, world)
    ok = False
    try:
        results = []
        image_rows, text_rows = rank_rows(rank, world, batch, extra_texts)
        for variant, shape in cases:
            torch.manual_seed(seed)
            loss_module = cls(**{**loss_kwargs, **variant}).double()
            x, y, lx, ly = make_inputs(batch, dim, seed, shape, extra_texts=extra_texts)
            part = [None if t is None else t[rows]
                    for t, rows in zip((x, y, lx, ly), (image_rows, text_rows, image_rows, text_rows))]
            ids = None
            if groups:
                text_groups, image_groups = make_groups(batch, extra_texts)
                ids = (text_groups[text_rows], image_groups[image_rows])
            results.append(loss_and_grads(loss_module, *part, groups=ids))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        ok = True
    finally:
        dist.finish(ok)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, or the absolute error where ``want`` is zero."""
    error, scale = (got - want).norm().item(), want.norm().item()
    return error / scale if scale > 0 else error


def check_distributed(
    name: str,
    world_sizes: tuple[int, ...] = (2, 3),
    *,
    variants: list[dict] | None = None,
    loss_kwargs: dict | None = None,
    batch_per_rank: int = 5,
    dim: int = 7,
    rtol: float = 1e-8,
    seed: int = 0,
    timeout: float = 180.0,
    extra_texts: int = 0,
    groups: bool = False,
) -> list[CaseResult]:
    """Run the conformance check of docs/design.md's distributed invariant for a registered loss.

    Args:
        name: registered loss name.
        world_sizes: numbers of gloo processes to try (odd ones exercise a ring's remainder step).
        variants: kwargs dicts to check; default: the loss class's ``distributed_variants``.
        loss_kwargs: kwargs applied to every variant.
        batch_per_rank, dim: sizes of each rank's float64 inputs.
        rtol: largest relative error accepted for each value and gradient.
        timeout: seconds before the processes are killed and the check fails (a hang is a failure).
        extra_texts: hard negatives per image (module docstring): each rank passes ``N (1 + extra_texts)`` texts.
        groups: pass ``text_groups`` / ``image_groups`` with duplicates (:func:`make_groups`) on every call, each
            rank its slice: checks a loss's false-negative options (``false_negatives`` in the variants).

    Returns:
        One :class:`CaseResult` per case. Raises :class:`DistributedCheckError` naming every failing case.
    """
    loss_kwargs = loss_kwargs or {}
    cls = loss_class(name)
    cases = _cases(cls, variants)
    results, failures = [], []
    for world in world_sizes:
        batch = batch_per_rank * world
        with tempfile.TemporaryDirectory() as out_dir:
            init_file = os.path.join(out_dir, "init")
            args = (world, init_file, out_dir, cls, cases, loss_kwargs, batch, dim, seed, extra_texts, groups)
            _spawn(world, args, timeout)
            per_rank = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]
        rows = [rank_rows(r, world, batch, extra_texts) for r in range(world)]
        for k, (variant, shape) in enumerate(cases):
            torch.manual_seed(seed)
            reference = cls(**{**loss_kwargs, **variant}).double()
            inputs = make_inputs(batch, dim, seed, shape, extra_texts=extra_texts)
            ids = make_groups(batch, extra_texts) if groups else None
            want_value, want_grads, want_params = loss_and_grads(reference, *inputs, groups=ids)
            got = [per_rank[r][k] for r in range(world)]
            case = CaseResult(world, variant, shape, extra_texts=extra_texts)
            case.errors["(a) loss"] = _relative_error(torch.stack([g[0] for g in got]).mean(), want_value)
            for param, want in want_params.items():
                mean_grad = torch.stack([g[2].get(param, torch.zeros_like(want)) for g in got]).mean(0)
                case.errors[f"(b) grad {param}"] = _relative_error(mean_grad, want)
            for tensor, want in want_grads.items():
                mine = torch.empty_like(want)  # each rank's gradient on its own rows, put where they are
                for r in range(world):
                    mine[rows[r][0 if tensor.startswith("image") else 1]] = got[r][1][tensor]
                case.errors[f"(c) grad {tensor}"] = _relative_error(mine, world * want)
            results.append(case)
            if case.worst > rtol:
                bad = {k: f"{v:.2e}" for k, v in case.errors.items() if v > rtol}
                extra = f" extra_texts={extra_texts}" if extra_texts else ""
                failures.append(f"W={world} variant={variant} log_std={shape}{extra}: {bad}")
    if failures:
        raise DistributedCheckError(
            f"loss {name!r} breaks the distributed invariant (relative error > {rtol:g}):\n  " + "\n  ".join(failures)
        )
    return results


def _spawn(world: int, args: tuple, timeout: float) -> None:
    context = mp.start_processes(_worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise DistributedCheckError(f"{world} ranks did not finish within {timeout:.0f} s (a hang?)")


def free_port() -> int:
    """A free TCP port on localhost, for tests that launch `fabric run` or torchrun."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
