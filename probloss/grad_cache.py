"""GradCache (Gao et al. 2021, as open_clip and Inf-CL do it): the loss of a whole per-rank batch with the
encoder activation memory of one micro-batch.

1. Embed the k micro-batches without grad (remembering each one's RNG state, for identical dropout).
2. The loss on the concatenated embeddings (B_local, D); grads w.r.t. the embeddings and the loss parameters.
3. Re-embed each micro-batch with grad and back-propagate sum(emb * cached_grad); DDP syncs only on the last
   one, whose surrogate also carries the loss parameters' gradients (sum(p * grad_p)) so that DDP averages
   them with the rest.

The update equals the one of a k-times larger batch (tests/test_train.py checks it).
"""

from __future__ import annotations

import torch

from probloss import dist

FIELDS = ("image_emb", "text_emb", "image_log_std", "text_log_std")


def present_fields(emb) -> list[str]:
    return [f for f in FIELDS if getattr(emb, f, None) is not None]


def detach(emb):
    """A copy of an ``Embeddings`` with every tensor detached."""
    return type(emb)(**{f: getattr(emb, f).detach() for f in present_fields(emb)})


def grad_cache_backward(fabric, trainee, images: torch.Tensor, tokens: torch.Tensor, k: int):
    """Back-propagate the loss of this rank's batch in ``k`` micro-batches.

    Returns:
        (global loss value, whether it is finite on every rank, the first micro-batch's detached Embeddings).
        Nothing is back-propagated when the loss is not finite.
    """
    n = images.shape[0]
    if n % k:
        raise ValueError(f"per-rank batch {n} is not divisible by trainer.accum_steps={k}")
    chunks = list(zip(images.chunk(k), tokens.chunk(k)))
    rng_states, cached = [], []
    with torch.no_grad():
        for image_chunk, token_chunk in chunks:
            rng_states.append(_rng_snapshot(image_chunk.device))
            cached.append(trainee(image_chunk, token_chunk))
    after = _rng_snapshot(images.device)
    fields = present_fields(cached[0])
    leaves = [torch.cat([getattr(e, f) for e in cached]).detach().requires_grad_(True) for f in fields]
    full = type(cached[0])(**dict(zip(fields, leaves)))
    loss = trainee.loss(*full.loss_args())
    value, finite = dist.global_mean(fabric, loss)
    first = detach(cached[0])
    if not finite:
        return value, False, first
    loss_params = [p for p in trainee.loss.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, leaves + loss_params, allow_unused=True)
    emb_grads, param_grads = grads[: len(leaves)], grads[len(leaves):]
    emb_grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, emb_grads)]
    sizes = [c[0].shape[0] for c in chunks]
    per_chunk = [g.split(sizes) for g in emb_grads]  # per field: k pieces
    for i, (image_chunk, token_chunk) in enumerate(chunks):
        _rng_restore(rng_states[i], image_chunk.device)
        last = i == k - 1
        with fabric.no_backward_sync(trainee, enabled=not last):
            emb = trainee(image_chunk, token_chunk)
            surrogate = sum((getattr(emb, f) * per_chunk[j][i]).sum() for j, f in enumerate(fields))
            if last:
                # Gives each loss parameter its cached gradient inside DDP's synchronised backward.
                surrogate = surrogate + sum((p * g).sum() for p, g in zip(loss_params, param_grads) if g is not None)
            fabric.backward(surrogate)
    _rng_restore(after, images.device)
    return value, True, first


def _rng_snapshot(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(snapshot, device: torch.device) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)
