"""The only module that talks to torch.distributed. Every function is an exact no-op in one process.

Gradient convention (what makes the distributed invariant of docs/design.md hold): every rank computes its own
loss L_r, and the experiment's loss is the mean over ranks. Communication ops are differentiable and
route each rank's gradient back to the rank that owns the tensor, summed over ranks. So the gradient a rank
sees on its own embeddings is sum_r dL_r/dx = W * d(mean_r L_r)/dx, and after DDP divides parameter
gradients by W the encoders get exactly the single-process gradient.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import warnings

import torch
import torch.distributed as dist

# Backends known to implement isend/irecv. XLA (TPU) does not: the ring falls back to an all-gather.
P2P_BACKENDS = {"gloo", "nccl", "mpi", "ucc"}
_warned_no_p2p = False


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def supports_p2p() -> bool:
    """Whether the default process group can do point-to-point sends (gloo, nccl, mpi, ucc can; xla cannot)."""
    if not is_distributed():
        return True
    backend = str(dist.get_backend()).lower()
    # "cpu:gloo,cuda:nccl" style backends name one backend per device type.
    names = {part.split(":")[-1] for part in backend.split(",")}
    return names <= P2P_BACKENDS


def warn_no_p2p_once(what: str) -> None:
    global _warned_no_p2p
    if not _warned_no_p2p:
        _warned_no_p2p = True
        warnings.warn(
            f"{what}: the process-group backend {dist.get_backend()!r} has no point-to-point send/recv; "
            "falling back to an all-gather (same result, O(B_global x D) memory per rank).",
            RuntimeWarning,
            stacklevel=3,
        )


_DTYPE_CODES = {dtype: code for code, dtype in enumerate(
    [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64, torch.bool]
)}
_MAX_DIMS = 4


def check_same_shapes(tensors: dict[str, torch.Tensor | None], what: str = "loss") -> None:
    """Raise on every rank if ranks hold tensors of different shapes or dtypes (instead of hanging).

    Collectives on differently shaped tensors hang or fail with an opaque message, so before any exchange all
    ranks swap a small description of their inputs and compare.
    """
    if not is_distributed():
        return
    rows = []
    for name, tensor in tensors.items():
        if tensor is None:
            rows.append([-1] * (_MAX_DIMS + 2))
            continue
        if tensor.dim() > _MAX_DIMS:
            raise ValueError(f"{name} has {tensor.dim()} dimensions; at most {_MAX_DIMS} are supported")
        shape = list(tensor.shape) + [-2] * (_MAX_DIMS - tensor.dim())
        rows.append([tensor.dim(), *shape, _DTYPE_CODES.get(tensor.dtype, 99)])
    device = next((t.device for t in tensors.values() if t is not None), torch.device("cpu"))
    mine = torch.tensor(rows, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    if all(torch.equal(mine, other) for other in everyone):
        return
    names = list(tensors)
    for k, name in enumerate(names):
        descriptions = [_describe(other[k].tolist()) for other in everyone]
        if len(set(descriptions)) > 1:
            per_rank = "; ".join(f"rank {r}: {d}" for r, d in enumerate(descriptions))
            raise ValueError(
                f"{what}: ranks hold different {name} ({per_rank}). Every rank must get the same local batch "
                "size, number of extra texts and embedding shape: make the global batch divisible by the world size and drop or "
                "resample the last uneven batch."
            )


def _describe(row: list[int]) -> str:
    if row[0] == -1:
        return "None"
    dtype = {code: dtype for dtype, code in _DTYPE_CODES.items()}.get(row[-1], "other dtype")
    return f"shape {tuple(row[1 : 1 + row[0]])} {dtype}"


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.size = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Each rank used every slice; the owner of a slice gets the sum of all ranks' gradients on it.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather: ``(B_local, ...)`` on each rank -> ``(W * B_local, ...)``, rank-major.

    Backward sums the gradient over ranks and returns each rank its own slice. Identity in one process.
    """
    if not is_distributed():
        return tensor
    return _AllGather.apply(tensor)


def _send_recv(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


class _NeighbourExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
        ctx.to_rank, ctx.from_rank = to_rank, from_rank
        received = torch.empty_like(tensor)
        _send_recv([(tensor, to_rank)], [(received, from_rank)])
        return received

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The gradient of what we received goes back to the rank it came from.
        grad_back = torch.empty_like(grad)
        _send_recv([(grad, ctx.from_rank)], [(grad_back, ctx.to_rank)])
        return grad_back, None, None


def neighbour_exchange(tensor: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
    """Differentiable send of ``tensor`` to ``to_rank`` while receiving one of the same shape from ``from_rank``.

    Backward sends the incoming gradient back to ``from_rank`` and receives ours from ``to_rank``.
    """
    return _NeighbourExchange.apply(tensor, to_rank, from_rank)


class _NeighbourExchangeBidir(torch.autograd.Function):
    @staticmethod
    def forward(ctx, to_left: torch.Tensor, to_right: torch.Tensor, left: int, right: int):
        ctx.left, ctx.right = left, right
        from_left, from_right = torch.empty_like(to_right), torch.empty_like(to_left)
        _send_recv([(to_left, left), (to_right, right)], [(from_left, left), (from_right, right)])
        return from_left, from_right

    @staticmethod
    def backward(ctx, grad_from_left: torch.Tensor, grad_from_right: torch.Tensor):
        grad_to_left, grad_to_right = torch.empty_like(grad_from_right), torch.empty_like(grad_from_left)
        _send_recv(
            [(grad_from_left, ctx.left), (grad_from_right, ctx.right)],
            [(grad_to_left, ctx.left), (grad_to_right, ctx.right)],
        )
        return grad_to_left, grad_to_right, None, None


def neighbour_exchange_bidir(
    to_left: torch.Tensor, to_right: torch.Tensor, left: int, right: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable two-way exchange: send ``to_left`` left and ``to_right`` right in one batch of P2P ops.

    Returns ``(from_left, from_right)``: what the left neighbour sent right and what the right one sent left.
    ``left`` and ``right`` must differ (world size >= 3).
    """
    if left == right:
        raise ValueError("neighbour_exchange_bidir needs distinct left and right ranks (world size >= 3)")
    return _NeighbourExchangeBidir.apply(to_left, to_right, left, right)


def ring_blocks(tensor: torch.Tensor, bidirectional: bool = True):
    """Yield every other rank's ``tensor`` once, passed around the ring (no all-gather).

    Yields ``(source_rank, block)``. Bidirectional: blocks travel left and right at once, so the W - 1 other
    blocks arrive in ceil((W - 1) / 2) rounds; one-directional ("shift"): W - 1 rounds. Each yielded block is
    differentiable: its gradient returns to its owner through the ring in backward.
    """
    world, rank = get_world_size(), get_rank()
    if world == 1:
        return
    left, right = (rank - 1) % world, (rank + 1) % world
    rounds, remainder = divmod(world - 1, 2) if bidirectional else (0, world - 1)
    to_right = to_left = tensor
    for k in range(1, rounds + 1):
        from_left, from_right = neighbour_exchange_bidir(to_left, to_right, left, right)
        yield (rank - k) % world, from_left
        yield (rank + k) % world, from_right
        to_right, to_left = from_left, from_right
    for k in range(rounds + 1, rounds + remainder + 1):
        to_right = neighbour_exchange(to_right, right, left)
        yield (rank - k) % world, to_right


DIST_IMPLS = ("ring", "shift", "gather")


def other_rank_blocks(tensor: torch.Tensor, dist_impl: str = "ring", what: str = "loss"):
    """Yield the other ranks' ``tensor`` (differentiable), for losses whose cross-rank terms are negatives only.

    ``ring``/``shift``: one block per other rank, passed around the ring (:func:`ring_blocks`), so only
    O(B_local x D) arrives at a time; ``gather``: all of them at once as one ``(B_global - B_local, ...)`` block.
    A backend without point-to-point falls back to ``gather`` with a one-time warning. Nothing in one process.
    """
    if not is_distributed():
        return
    if dist_impl != "gather" and not supports_p2p():
        warn_no_p2p_once(f"{what} dist_impl={dist_impl!r}")
        dist_impl = "gather"
    if dist_impl == "gather":
        everyone, rank, n = all_gather_cat(tensor), get_rank(), tensor.shape[0]
        yield torch.cat([everyone[: rank * n], everyone[(rank + 1) * n :]])
        return
    for _, block in ring_blocks(tensor, bidirectional=dist_impl == "ring"):
        yield block


# --- process groups and run-level collectives -----------------------------------------------------------------
# The training loop, sweeps, tests and benchmarks start, synchronise and end their process groups here, so this
# module stays the only one that talks to torch.distributed. Functions that take ``fabric`` use Fabric's own
# collectives (which also work under its XLA strategy, where torch.distributed is not the transport).


def init_process_group(backend: str, init_method: str, rank: int, world_size: int) -> None:
    """Join a process group (tests and benchmarks that spawn their own ranks; training leaves it to Fabric)."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)


def finish(ok: bool = True) -> None:
    """End a multi-process run cleanly: a barrier (on success) then ``destroy_process_group``.

    Without it about one gloo run in 16 aborted at exit. After a failure no barrier is attempted: the other
    ranks may never reach it.
    """
    if dist.is_available() and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def barrier(fabric=None) -> None:
    """Wait for every rank (a no-op in one process)."""
    if fabric is not None:
        fabric.barrier()
    elif is_distributed():
        dist.barrier()


def all_gather_list(out: list[torch.Tensor], tensor: torch.Tensor) -> None:
    """Every rank's ``tensor`` into ``out`` (no autograd; for benchmarks and tests that collect results)."""
    if is_distributed():
        dist.all_gather(out, tensor)
    else:
        out[0].copy_(tensor)


def broadcast_object(fabric, obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (returned as is in one process)."""
    return fabric.broadcast(obj, src=src) if fabric.world_size > 1 else obj


def all_reduce_sum(fabric, tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks (``tensor`` itself in one process)."""
    return fabric.all_reduce(tensor, reduce_op="sum") if fabric.world_size > 1 else tensor


def global_mean(fabric, loss: torch.Tensor) -> tuple[float, bool]:
    """(mean of a scalar over ranks, whether it is finite on every rank), in one all-reduce.

    When any rank's value is not finite, the value returned is this rank's own (nan where it was finite), so
    the message names what went wrong; every rank gets ``finite=False`` and skips the step together.
    """
    local = loss.detach().float()
    flags = torch.stack([torch.nan_to_num(local, nan=0.0, posinf=0.0, neginf=0.0), (~torch.isfinite(local)).float()])
    flags = all_reduce_sum(fabric, flags)
    if flags[1].item() == 0:
        return flags[0].item() / fabric.world_size, True
    return (local.item() if not torch.isfinite(local) else float("nan")), False


def sum_over_ranks(fabric, value: int) -> int:
    """The sum of an integer over ranks (e.g. corrupt samples skipped by each rank's loader)."""
    if fabric.world_size == 1:
        return int(value)
    return int(all_reduce_sum(fabric, torch.tensor(float(value), device=fabric.device)).item())


# --- ending every rank together ---------------------------------------------------------------------------------
#
# An error raised on one rank only (its data, rank 0's run-folder lock or writes) must not leave the other ranks
# waiting at their next collective (gloo's timeout is 30 minutes). The training loop already all-reduces a
# stop flag once per step; an error flag rides in the same tensor, and only when a flag is set do the ranks
# exchange the error itself (below). Rank 0 then raises the failing rank's error, which the command prints as its
# one line; every other rank ends quietly with the same exit status (:func:`leave`).


def leave(code: int) -> None:
    """In a multi-process run, end this process now with ``code`` after flushing its output; return otherwise.

    A process that stops a multi-process run on an error skips the interpreter's teardown: there gloo's
    process-group destructor joins its worker thread while holding the GIL, and the thread may still need the
    GIL to free the tensors of a finished collective, so now and then a rank hung at exit after the others had
    ended (two-rank runs stopped by a failed checkpoint write: 2 of 15 hung before this, 0 of 15 after; py-spy
    showed ``~ProcessGroupGloo`` in ``thread::join``)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def raise_together(fabric, error: BaseException | None, code: int, only_rank0: bool = False) -> None:
    """End every rank when any rank has ``error`` (None: this rank has none); return when no rank has one.

    Must be called on every rank at the same point. ``only_rank0``: only rank 0 can have failed (a write only
    it makes): one broadcast; otherwise one all-gather of objects. ``code``: the exit status of the ranks that
    did not fail (the command's own for the error: 2 for config and data errors, 1 for a failed write).
    """
    if fabric is None or fabric.world_size == 1:
        if error is not None:
            raise error
        return
    payload = None if error is None else (fabric.global_rank, _portable(error), int(code))
    if only_rank0:
        gathered = [fabric.broadcast(payload, src=0)]
    else:
        gathered = [None] * fabric.world_size
        dist.all_gather_object(gathered, payload)
    failed = [p for p in gathered if p is not None]
    if not failed:
        return
    rank, first, status = min(failed, key=lambda p: p[0])
    if fabric.is_global_zero:
        if error is not None and rank == fabric.global_rank:
            raise error
        raise first
    leave(status)  # this rank ends quietly with the command's status for that error


def _portable(error: BaseException) -> BaseException:
    """``error`` as another process can unpickle it (else a RuntimeError with its message)."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(str(error))
