"""GradCache (Gao et al. 2021, as open_clip and Inf-CL do it): the loss of a whole per-rank batch with the
encoder activation memory of one micro-batch.

1. Embed the k micro-batches without grad (remembering each one's RNG state, for identical dropout).
2. The loss on the concatenated embeddings (B_local, D); grads w.r.t. the embeddings and the loss parameters.
3. Re-embed each micro-batch with grad and back-propagate sum(emb * cached_grad); DDP syncs only on the last
   one, whose surrogate also carries the loss parameters' gradients (sum(p * grad_p)) so that DDP averages
   them with the rest.

The update equals the one of a k-times larger batch (tests/test_train.py checks it), hard negatives included:
each micro-batch encodes its own extra texts with its positives, and the loss sees the texts in one big batch's
order, [every positive, then every extra] (the loss contract, probloss/loss.py).

Only a step with ``trainer.accum_steps > 1`` comes here (probloss/training/loop.py train_step); a plain step
never does.
"""

from __future__ import annotations

import torch

from probloss import dist
from probloss.false_negatives import batch_groups
from probloss.models.dual import with_negatives


def grad_cache_backward(fabric, trainee, images: torch.Tensor, tokens: torch.Tensor, k: int,
                        negative_tokens: torch.Tensor | None = None, metas=None):
    """Back-propagate the loss of this rank's batch in ``k`` micro-batches.

    ``negative_tokens`` (B, n_neg, L): extra texts per sample (hard negatives), encoded with their sample's
    micro-batch. ``metas``: the samples' json (scene ids for ``loss.false_negatives``); group ids are computed
    for the whole rank batch in the loss's text order, so false negatives span micro-batches as in one batch.

    Returns:
        (global loss value, whether it is finite on every rank, the first micro-batch's detached Embeddings,
        positive texts only). Nothing is back-propagated when the loss is not finite.
    """
    n = images.shape[0]
    if n % k:
        raise ValueError(f"per-rank batch {n} is not divisible by trainer.accum_steps={k}")
    negatives = negative_tokens.chunk(k) if negative_tokens is not None else [None] * k
    chunks = [(image_chunk, with_negatives(token_chunk, negative_chunk))
              for image_chunk, token_chunk, negative_chunk in zip(images.chunk(k), tokens.chunk(k), negatives)]
    rng_states, cached = [], []
    with torch.no_grad():
        for image_chunk, token_chunk in chunks:
            rng_states.append(_rng_snapshot(image_chunk.device))
            cached.append(trainee(image_chunk, token_chunk))
    after = _rng_snapshot(images.device)
    fields = cached[0].present_fields()
    sizes = [c[0].shape[0] for c in chunks]
    text_sizes = [c[1].shape[0] for c in chunks]
    # Micro-batch texts are [positives_i, extras_i]; the loss wants [all positives, all extras] (one big batch).
    order = _loss_order(sizes, text_sizes, images.device) if negative_tokens is not None else None

    def to_loss_order(field, t):
        return t[order] if order is not None and field.startswith("text") else t

    leaves = [to_loss_order(f, torch.cat([getattr(e, f) for e in cached])).detach().requires_grad_(True)
              for f in fields]
    full = type(cached[0])(**dict(zip(fields, leaves)))
    # [all positives, all extras] of the whole rank batch: the loss's text order (to_loss_order above)
    groups = batch_groups(trainee.loss, with_negatives(tokens, negative_tokens), metas)
    loss = trainee.loss(*full.loss_args(), **groups)
    value, finite = dist.global_mean(fabric, loss)
    first = cached[0].detach(texts=sizes[0])
    if not finite:
        return value, False, first
    loss_params = [p for p in trainee.loss.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, leaves + loss_params, allow_unused=True)
    emb_grads, param_grads = grads[: len(leaves)], grads[len(leaves):]
    emb_grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, emb_grads)]
    per_chunk = []  # per field: k pieces, in micro-batch order
    for f, g in zip(fields, emb_grads):
        if f.startswith("text"):
            if order is not None:
                g = torch.empty_like(g).index_copy_(0, order, g)  # back from the loss's order
            per_chunk.append(g.split(text_sizes))
        else:
            per_chunk.append(g.split(sizes))
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


def _loss_order(sizes: list[int], text_sizes: list[int], device) -> torch.Tensor:
    """Row order taking concatenated micro-batch texts ([positives_i (sizes[i]), extras_i] per micro-batch) to
    [every micro-batch's positives, then every micro-batch's extras]."""
    starts = [sum(text_sizes[:i]) for i in range(len(sizes))]
    positives = [torch.arange(s, s + n) for s, n in zip(starts, sizes)]
    extras = [torch.arange(s + n, s + m) for s, n, m in zip(starts, sizes, text_sizes)]
    return torch.cat(positives + extras).to(device)


def _rng_snapshot(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(snapshot, device: torch.device) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)
