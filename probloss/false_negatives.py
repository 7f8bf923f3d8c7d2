"""False negatives: identical captions (and identical scenes) in one global batch, as group ids.

A contrastive batch treats every pair (image i, text j != i) as a negative. When caption j is the same string as
image i's own caption (common in the shapes data: an L0 caption such as "a red object" has about 11 copies in a
batch of 128), or image j shows the same scene as image i, that "negative" is a true match: a false negative.
Every built-in loss takes ``loss.false_negatives``:

- ``keep`` (default): nothing changes (today's losses; group ids are ignored, no work is done);
- ``mask``: false-negative pairs leave every negative sum and normaliser (softmax: logit -inf in both
  directions; pairwise sigmoid/BCE: the pair's term is dropped);
- ``positive``: false-negative pairs count as positives (pairwise losses: positive label; softmax losses: the
  multi-positive cross-entropy of SupCon's L_out, Khosla et al. 2020, as UniCL uses it, Yang et al. 2022).

Groups come with the loss call, ``text_groups`` ``(M,)`` and optionally ``image_groups`` ``(N,)`` int64 on each
rank (same id = identical caption / scene). Image i's caption group is ``text_groups[i]``. Pair (image i, text j),
j != i, is a false negative when ``text_groups[j] == text_groups[i]`` or (``j < N``, image groups given and
``image_groups[j] == image_groups[i]``); an extra text (``j >= N``, a hard negative) is compared by its text
group only. In the distributed setting "j != i" means "not i's own positive"; ids are compared over the global
batch (they are gathered, or travel around the ring with the texts).

Internally a side is described by integer keys ``(R, K)``: K = 1, [caption group], or with image groups K = 2,
[caption group, scene group]; :func:`key_match` says "same caption or same scene". Scene ids are compared on
their low 63 bits (the sign bit is cleared), so a text without a scene (an extra text) can hold a negative id
unique in the global batch, ``-(1 + its global text row)``, that matches nothing. The keys of a pair's two
sides always match on the pair's own positive (same caption), which the losses treat apart.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from probloss import dist

Tensor = torch.Tensor

FALSE_NEGATIVES = ("keep", "mask", "positive")
_LOW_63_BITS = (1 << 63) - 1


def group_keys(text_groups: Tensor, image_groups: Tensor | None, n_images: int) -> tuple[Tensor, Tensor]:
    """``(image_keys (N, K), text_keys (M, K))`` for :func:`key_match` (module docstring), on this rank.

    Image i takes its own caption's group ``text_groups[i]`` and its scene; an extra text (row >= N) gets the
    scene id ``-(1 + rank * M + row)``, unique over the global batch (every rank has the same M) and never equal
    to a real scene id (those are >= 0 after clearing the sign bit).
    """
    text_groups = text_groups.long()
    if image_groups is None:
        return text_groups[:n_images, None], text_groups[:, None]
    scenes = image_groups.long().to(text_groups.device) & _LOW_63_BITS
    m = text_groups.shape[0]
    rows = torch.arange(n_images, m, device=text_groups.device)
    no_scene = -(1 + dist.get_rank() * m + rows)
    image_keys = torch.stack([text_groups[:n_images], scenes], dim=1)
    return image_keys, torch.stack([text_groups, torch.cat([scenes, no_scene])], dim=1)


def key_match(row_keys: Tensor, col_keys: Tensor) -> Tensor:
    """``(R, C)`` bool: same caption, or same scene. Symmetric in its arguments."""
    same = row_keys[:, None, 0] == col_keys[None, :, 0]
    if row_keys.shape[1] > 1:
        same |= row_keys[:, None, 1] == col_keys[None, :, 1]
    return same


def _equal_pairs(row_ids: Tensor, col_ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` of every pair with ``row_ids[r] == col_ids[c]``, by a sort join: O((R + C) log C + P)
    time and O(R + C + P) memory for P pairs (no (R, C) matrix)."""
    row_ids = row_ids.contiguous()
    sorted_ids, order = col_ids.sort()
    start = torch.searchsorted(sorted_ids, row_ids, side="left")
    counts = torch.searchsorted(sorted_ids, row_ids, side="right") - start
    rows = torch.repeat_interleave(torch.arange(row_ids.shape[0], device=row_ids.device), counts)
    first = torch.repeat_interleave(start - (counts.cumsum(0) - counts), counts)  # start_r - (pairs before r)
    return rows, order[first + torch.arange(rows.shape[0], device=row_ids.device)]


def false_negative_pairs(row_keys: Tensor, col_keys: Tensor,
                         positive_cols: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` int64 of every key-matching pair except each row's own positive column ``positive_cols``
    (``(R,)``, or None: no positive among these columns, e.g. another rank's texts). Each pair once, in no
    particular order; found by sort joins, so the cost grows with the number of pairs, not R x C."""
    rows, cols = _equal_pairs(row_keys[:, 0], col_keys[:, 0])
    if row_keys.shape[1] > 1:
        scene_rows, scene_cols = _equal_pairs(row_keys[:, 1], col_keys[:, 1])
        new = row_keys[scene_rows, 0] != col_keys[scene_cols, 0]  # same scene, not already same caption
        rows, cols = torch.cat([rows, scene_rows[new]]), torch.cat([cols, scene_cols[new]])
    if positive_cols is not None:
        keep = cols != positive_cols[rows]
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def multi_positive_mean(positive: Tensor, pair_rows: Tensor, pair_logits: Tensor) -> Tensor:
    """``(R,)`` mean over each row's positives P(i) = {own positive} + false negatives of its logits:
    ``(l_ii + sum_{p in FN(i)} l_ip) / (1 + |FN(i)|)``, the target of SupCon's L_out (module docstring)."""
    if pair_rows.numel() == 0:
        return positive
    total = positive.index_add(0, pair_rows, pair_logits.to(positive.dtype))
    count = torch.ones_like(positive).index_add(0, pair_rows, torch.ones_like(pair_logits, dtype=positive.dtype))
    return total / count


# --- group ids from a batch (the training step) -----------------------------------------------------------------

_HASH_SEED = 0x9E3779B97F4A7C15


def _hash_weights(length: int, device) -> Tensor:
    """``(L,)`` fixed odd 64-bit multipliers, one per token position, the same on every rank and run."""
    gen = torch.Generator().manual_seed(_HASH_SEED & 0x7FFFFFFF)
    high = torch.randint(0, 2**31, (length,), generator=gen, dtype=torch.int64)
    low = torch.randint(0, 2**31, (length,), generator=gen, dtype=torch.int64)
    return ((high << 33) ^ (low << 1) | 1).to(device)


def caption_groups(tokens: Tensor) -> Tensor:
    """``(B,)`` int64 id of each token row ``(B, L)``: equal rows (identical captions), equal ids.

    A random linear hash modulo 2^64 (int64 arithmetic wraps): ``sum_k tokens_k w_k`` with fixed odd random
    multipliers w_k, computed on the token tensor's device with no communication, so every rank gives the same
    caption the same id. Two different rows collide with probability about 2^-50 (token differences are below
    2^14), harmless: a collision only drops one negative pair.
    """
    return (tokens.long() * _hash_weights(tokens.shape[1], tokens.device)).sum(1)


def scene_groups(metas: Sequence[Mapping] | None) -> Tensor | None:
    """``(B,)`` int64 scene id from each sample's json ``seed`` and ``index`` (the shapes generator's sample
    identity), or None when any sample lacks them (other data does not know which scenes are identical)."""
    if not metas or not all(isinstance(m, Mapping) and "seed" in m and "index" in m for m in metas):
        return None
    ids = [zlib.crc32(f"{int(m['seed'])}/{int(m['index'])}".encode()) << 31 ^ int(m["index"]) for m in metas]
    return torch.tensor(ids, dtype=torch.int64)


# --- softmax losses ---------------------------------------------------------------------------------------------

def dense_cross_entropy(logits: Tensor, targets: Tensor, match: Tensor, mode: str) -> Tensor:
    """Mean cross-entropy of ``(R, C)`` logits with target columns ``targets`` ``(R,)`` and key matches ``match``
    ``(R, C)`` (:func:`key_match`; each row's target is a match by construction and is forced to one).

    ``mask``: matching columns other than the target get logit -inf (-log softmax over the rest);
    ``positive``: SupCon's L_out, ``logsumexp_c l_rc - mean_{p in P(r)} l_rp`` with P(r) the matches.
    """
    here = torch.arange(logits.shape[0], device=logits.device)
    if mode == "mask":
        others = match.clone()
        others[here, targets] = False
        return F.cross_entropy(logits.masked_fill(others, float("-inf")), targets)
    positives = match.clone()
    positives[here, targets] = True
    target = (logits * positives).sum(1) / positives.sum(1)
    return (logits.logsumexp(1) - target).mean()


def masked_ce(lse_without_matches: Tensor, positive: Tensor) -> Tensor:
    """``(R,)`` cross-entropy ``-log softmax`` of the positive over the candidates that do not match the row
    (a tiled log-sum-exp with matching pairs left out, the positive among them) plus the positive itself."""
    return torch.logaddexp(lse_without_matches, positive) - positive


def multi_positive_ce(lse: Tensor, positive: Tensor, pair_rows: Tensor, pair_logits: Tensor) -> Tensor:
    """``(R,)`` SupCon L_out from a full log-sum-exp: ``lse_r - mean_{p in P(r)} l_rp``
    (:func:`multi_positive_mean`)."""
    return lse - multi_positive_mean(positive, pair_rows, pair_logits)


# --- pairwise (sigmoid / BCE) losses ----------------------------------------------------------------------------

def sigmoid_correction(pair_logits: Tensor, mode: str) -> Tensor:
    """What to subtract from a pairwise sigmoid loss's ``sum_ij softplus(l_ij) - sum_i l_ii`` for its false-negative
    pairs' logits ``(P,)``: ``mask`` drops their negative terms softplus(l); ``positive`` turns them into positive
    terms, softplus(l) - l = -log sigmoid(l), so subtracts l. Zero (and no graph) when there are none."""
    if pair_logits.numel() == 0:
        return pair_logits.new_zeros(())
    return F.softplus(pair_logits).sum() if mode == "mask" else pair_logits.sum()


def with_keys(blocks, key_blocks):
    """Zip other-rank text blocks with their key blocks (``key_blocks`` None: keys absent, yields None)."""
    if key_blocks is None:
        for block in blocks:
            yield block, None
        return
    yield from zip(blocks, key_blocks)


def batch_groups(loss, texts: Tensor, metas: Sequence[Mapping] | None) -> dict[str, Tensor]:
    """The loss call's group keywords for a training batch: ``{}`` when the loss keeps false negatives (no work at
    all), else ``text_groups`` from the token rows ``texts`` ``(M, L)`` (positives then extras, as encoded) and
    ``image_groups`` from the samples' json where it identifies scenes (:func:`scene_groups`), else None."""
    if getattr(loss, "false_negatives", "keep") == "keep":
        return {}
    scenes = scene_groups(metas)
    return {"text_groups": caption_groups(texts),
            "image_groups": None if scenes is None else scenes.to(texts.device)}


def take(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` along dim 0 through ``index_select``, whose backward is an ``index_add`` (about twice as
    fast on CPU as advanced indexing's accumulating ``index_put``): the false-negative pairs' rows."""
    return values.index_select(0, index)
