"""``evaluate(model, loss, eval_set, tokenizer)``: every validation metric of a dual encoder, as a flat dict.

All matching goes through ``loss.score`` (the loss owns its geometry and its use of sigma). Keys:

- ``val/i2t_r@{1,5,10}``, ``val/t2i_r@{1,5,10}``: retrieval on the (image, training caption) pairs.
- ``val/zeroshot_top1``, ``val/zeroshot_top5``: one-object / labelled samples (json ``label`` not null) against
  prompts built from ``classnames`` and ``templates``; skipped when ``classnames`` is None or nothing is labelled.
- ``val/relation_probe_acc``, ``val/binding_probe_acc``: the true L3 caption vs its hard negative (json
  ``negatives``: a dict ``{"relation": ..., "binding": ...}`` as probloss.data.shapes writes it, or a list
  ``[relation_reversed, attribute_swapped]`` in that order), on the samples that have one (multi-object scenes).
- ``embed/effective_rank``, ``embed/uniformity``, ``embed/participation_ratio`` (and ``_frac`` = / D): the mean
  over the two modalities, each also under ``..._image`` and ``..._text``; ``embed/alignment`` and
  ``embed/modality_gap`` between them. All on L2-normalised embeddings.
- with log-std (``loss.needs_log_std`` and the model returns log-stds), where sigma = exp(log_std), and for
  per-dimension log-stds the geometric mean over dimensions, exp(mean_d log_std_d):
  ``unc/specificity_spearman`` (Spearman of caption level 0..3 with text sigma over all four captions of every
  sample; the proposal predicts < 0), ``unc/sigma_text_mean_L{0..3}``, ``unc/image_sigma_vs_objects``
  (Spearman of image sigma with the number of objects), ``unc/sigma_image_mean``, ``unc/sigma_text_mean``,
  ``unc/{i2t,t2i}_r1_sigma_decile_{0..9}`` (R@1 per decile of the query's sigma, lowest first) and
  ``unc/{i2t,t2i}_r1_sigma_spearman`` (Spearman of query sigma with the query's R@1 hit: < 0 when high sigma
  flags failures).

``val/loss`` is not computed here: probloss/eval/runtime.py computes it once, in the training batches of every
rank, so it is comparable with ``train/loss`` for any world size.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
from torch import nn

from probloss.eval import metrics

Tensor = torch.Tensor
DEFAULT_TEMPLATES = ("a {}",)
NEGATIVE_KINDS = ("relation", "binding")  # list order of json["negatives"] when it is a list


# --- batched encoding -----------------------------------------------------------------------------------------


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _encode(fn: Callable, inputs: Tensor, batch_size: int, device) -> tuple[Tensor, Tensor | None]:
    embs, log_stds = [], []
    for start in range(0, inputs.shape[0], batch_size):
        emb, log_std = fn(inputs[start: start + batch_size].to(device))
        embs.append(emb.float())
        if log_std is not None:
            log_stds.append(log_std.float())
    emb = torch.cat(embs) if embs else torch.empty(0)
    return emb, (torch.cat(log_stds) if log_stds else None)


@torch.no_grad()
def encode_images(model: nn.Module, images: Tensor, *, batch_size: int = 256, device=None) -> tuple[Tensor, Tensor | None]:
    """``model.encode_image`` in batches: images (N, 3, H, W) -> (emb (N, D) float32, log_std (N,)/(N, D) or None)."""
    return _encode(model.encode_image, images, batch_size, _device_of(model, device))


@torch.no_grad()
def encode_texts(model: nn.Module, tokens: Tensor, *, batch_size: int = 256, device=None) -> tuple[Tensor, Tensor | None]:
    """``model.encode_text`` in batches: tokens (N, L) -> (emb (N, D) float32, log_std or None)."""
    return _encode(model.encode_text, tokens, batch_size, _device_of(model, device))


@torch.no_grad()
def encode_captions(model: nn.Module, tokenizer: Callable[[list[str]], Tensor], captions: Sequence[str], *,
                    batch_size: int = 256, device=None) -> tuple[Tensor, Tensor | None]:
    """Tokenize and encode a list of strings (tokenized batch by batch)."""
    device = _device_of(model, device)
    embs, log_stds = [], []
    for start in range(0, len(captions), batch_size):
        emb, log_std = model.encode_text(tokenizer(list(captions[start: start + batch_size])).to(device))
        embs.append(emb.float())
        if log_std is not None:
            log_stds.append(log_std.float())
    return torch.cat(embs), (torch.cat(log_stds) if log_stds else None)


def sigma_of(log_std: Tensor) -> Tensor:
    """Per-sample sigma (N,) from log-std (N,), (N, 1) or (N, D): exp of the mean log-std (geometric mean)."""
    return log_std.float().reshape(log_std.shape[0], -1).mean(1).exp()


def _rows(x: Tensor | None, idx) -> Tensor | None:
    return None if x is None else x[idx]


@torch.no_grad()
def score_matrix(loss: nn.Module, image_emb: Tensor, text_emb: Tensor, image_log_std: Tensor | None = None,
                 text_log_std: Tensor | None = None, *, block: int = 1024) -> Tensor:
    """``loss.score`` in row blocks of images (bounds the memory of losses with (B, B) intermediates)."""
    out = [loss.score(image_emb[s: s + block], text_emb, _rows(image_log_std, slice(s, s + block)), text_log_std)
           for s in range(0, image_emb.shape[0], block)]
    return torch.cat(out)


@torch.no_grad()
def paired_scores(loss: nn.Module, image_emb: Tensor, text_emb: Tensor, image_log_std: Tensor | None = None,
                  text_log_std: Tensor | None = None, *, block: int = 256) -> Tensor:
    """``(N,)`` score of image i with text i: the diagonals of ``loss.score`` on blocks."""
    out = []
    for s in range(0, image_emb.shape[0], block):
        sl = slice(s, s + block)
        out.append(loss.score(image_emb[sl], text_emb[sl], _rows(image_log_std, sl), _rows(text_log_std, sl)).diagonal())
    return torch.cat(out) if out else torch.empty(0)


# --- pieces of evaluate ---------------------------------------------------------------------------------------


def fill_template(template: str, classname: str) -> str:
    """``template.format(classname)``, with "a {}" turned into "an {}" before a vowel ("an orange circle")."""
    if classname[:1].lower() in "aeiou":
        template = re.sub(r"\ba \{\}", "an {}", template)
    return template.format(classname)


def _zeroshot(model, loss, tokenizer, image_emb, image_log_std, labels_json, classnames, templates, batch_size,
              device) -> dict[str, float]:
    idx = [i for i, label in enumerate(labels_json) if label is not None]
    if not idx or not classnames:
        return {}
    labels = torch.tensor([int(labels_json[i]) for i in idx])
    if labels.max() >= len(classnames) or labels.min() < 0:
        raise ValueError(f"zero-shot: label {labels.max().item()} out of range for {len(classnames)} classnames")
    templates = list(templates or DEFAULT_TEMPLATES)
    # Score ensembling over templates (CLIP averages normalised text embeddings; a loss with its own geometry
    # and sigma cannot be averaged that way, so the scores are averaged instead). (n_labelled, C)
    scores = 0
    for template in templates:
        cls_emb, cls_log_std = encode_captions(model, tokenizer, [fill_template(template, c) for c in classnames],
                                               batch_size=batch_size, device=device)
        scores = scores + score_matrix(loss, image_emb[idx], cls_emb, _rows(image_log_std, idx), cls_log_std)
    acc = metrics.zeroshot_accuracy(scores / len(templates), labels, ks=(1, 5))
    return {"val/zeroshot_top1": acc["top1"], "val/zeroshot_top5": acc["top5"]}


def _negative(meta: dict, kind: str) -> str | None:
    negatives = meta.get("negatives")
    if isinstance(negatives, dict):
        return negatives.get(kind)
    if isinstance(negatives, (list, tuple)):
        i = NEGATIVE_KINDS.index(kind)
        return negatives[i] if i < len(negatives) else None
    return None


def _probes(model, loss, tokenizer, image_emb, image_log_std, metas, batch_size, device) -> dict[str, float]:
    out = {}
    for kind in NEGATIVE_KINDS:
        idx = [i for i, m in enumerate(metas) if _negative(m, kind) and len(m.get("captions") or []) >= 4]
        if not idx:
            continue
        true_caps = [metas[i]["captions"][3] for i in idx]  # L3: the caption the negatives were built from
        false_caps = [_negative(metas[i], kind) for i in idx]
        t_emb, t_ls = encode_captions(model, tokenizer, true_caps, batch_size=batch_size, device=device)
        f_emb, f_ls = encode_captions(model, tokenizer, false_caps, batch_size=batch_size, device=device)
        img, img_ls = image_emb[idx], _rows(image_log_std, idx)
        s_true = paired_scores(loss, img, t_emb, img_ls, t_ls, block=batch_size)
        s_false = paired_scores(loss, img, f_emb, img_ls, f_ls, block=batch_size)
        out[f"val/{kind}_probe_acc"] = metrics.pair_probe_accuracy(s_true, s_false)
    return out


def _embedding_space(image_emb: Tensor, text_emb: Tensor, max_samples: int = 4096) -> dict[str, float]:
    # Subsample (the first max_samples, deterministic) to keep uniformity's O(N^2) pairs and the SVD bounded.
    x = torch.nn.functional.normalize(image_emb[:max_samples].double().cpu(), dim=-1)
    y = torch.nn.functional.normalize(text_emb[:max_samples].double().cpu(), dim=-1)
    out = {"embed/alignment": metrics.alignment(x, y), "embed/modality_gap": metrics.modality_gap(x, y)}
    per = {
        "effective_rank": metrics.effective_rank,
        "uniformity": metrics.uniformity,
        "participation_ratio": metrics.participation_ratio,
        "participation_ratio_frac": lambda e: metrics.participation_ratio(e, normalized=True),
    }
    for name, fn in per.items():
        vi, vt = fn(x), fn(y)
        out[f"embed/{name}_image"], out[f"embed/{name}_text"] = vi, vt
        out[f"embed/{name}"] = (vi + vt) / 2
    return out


def _uncertainty(model, tokenizer, metas, scores, image_log_std, text_log_std, batch_size, device,
                 n_bins: int = 10) -> dict[str, float]:
    img_sigma, txt_sigma = sigma_of(image_log_std).cpu(), sigma_of(text_log_std).cpu()
    out = {"unc/sigma_image_mean": img_sigma.mean().item(), "unc/sigma_text_mean": txt_sigma.mean().item()}

    # Specificity: every level's caption of every sample that has all four.
    caps = [(level, c) for m in metas if len(m.get("captions") or []) >= 4 for level, c in enumerate(m["captions"][:4])]
    if caps:
        levels = torch.tensor([lv for lv, _ in caps], dtype=torch.float64)
        _, ls = encode_captions(model, tokenizer, [c for _, c in caps], batch_size=batch_size, device=device)
        sigma = sigma_of(ls).cpu().double()
        out["unc/specificity_spearman"] = metrics.spearman(levels, sigma)
        for lv in range(4):
            out[f"unc/sigma_text_mean_L{lv}"] = sigma[levels == lv].mean().item()

    n_obj = [(i, len(m["objects"])) for i, m in enumerate(metas) if m.get("objects") is not None]
    if n_obj:
        out["unc/image_sigma_vs_objects"] = metrics.spearman(torch.tensor([n for _, n in n_obj]),
                                                             img_sigma[[i for i, _ in n_obj]])

    diag = torch.arange(scores.shape[0])
    for direction, s, sig in (("i2t", scores, img_sigma), ("t2i", scores.T, txt_sigma)):
        recalls = metrics.recall_by_sigma_decile(s, sig, n_bins=n_bins)
        out.update({f"unc/{direction}_r1_sigma_decile_{b}": r for b, r in enumerate(recalls)})
        hits = (metrics.positive_ranks(s, diag) <= 1).double()
        out[f"unc/{direction}_r1_sigma_spearman"] = metrics.spearman(sig, hits)
    return out


# --- the entry point ------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loss: nn.Module, eval_set: Any, tokenizer: Callable[[list[str]], Tensor], *,
             batch_size: int = 256, device=None, classnames: Sequence[str] | None = None,
             templates: Sequence[str] | None = None, n_sigma_bins: int = 10) -> dict[str, float]:
    """Every validation metric (the module docstring lists the keys).

    Args:
        model: a DualEncoder (``encode_image``, ``encode_text`` -> (emb, log_std or None)); put in eval mode
            for the call and restored after. It should already be on ``device``.
        loss: the run's ContrastiveLoss; its ``score`` ranks every match.
        eval_set: has ``images`` (N, 3, H, W), ``tokens`` (N, L), ``captions`` and ``json`` (list of dicts,
            optional: without it only retrieval, embedding-space and sigma means are computed).
        tokenizer: list[str] -> LongTensor (B, L), for class prompts, probe captions and caption levels.
        batch_size: encoding batch size.
        device: where the inputs go (default: the model's device).
        classnames: zero-shot class names indexed by json ``label`` (None: no zero-shot).
        templates: prompt templates with one "{}" (default ``("a {}",)``).
        n_sigma_bins: bins of the R@1-by-sigma curves.

    Returns:
        ``{key: float}``.
    """
    device = _device_of(model, device)
    was_training = model.training
    model.eval()
    try:
        image_emb, image_log_std = encode_images(model, eval_set.images, batch_size=batch_size, device=device)
        text_emb, text_log_std = encode_texts(model, eval_set.tokens, batch_size=batch_size, device=device)
        if not loss.needs_log_std:
            image_log_std = text_log_std = None  # scores and loss ignore them; no unc/ keys
        # Shards without {key}.json give None (or no json list at all): treat as empty metadata.
        metas = [m if isinstance(m, dict) else {} for m in (getattr(eval_set, "json", None) or [None] * len(image_emb))]

        scores = score_matrix(loss, image_emb, text_emb, image_log_std, text_log_std, block=max(batch_size, 1024))
        scores = scores.float().cpu()  # (N, N)
        out: dict[str, float] = {f"val/{k}": v for k, v in metrics.retrieval_recall(scores).items()}

        if classnames is not None:
            out.update(_zeroshot(model, loss, tokenizer, image_emb, image_log_std, [m.get("label") for m in metas],
                                 list(classnames), templates, batch_size, device))
        out.update(_probes(model, loss, tokenizer, image_emb, image_log_std, metas, batch_size, device))
        out.update(_embedding_space(image_emb, text_emb))
        if image_log_std is not None and text_log_std is not None:
            out.update(_uncertainty(model, tokenizer, metas, scores, image_log_std, text_log_std, batch_size,
                                    device, n_bins=n_sigma_bins))
        return out
    finally:
        model.train(was_training)


@torch.no_grad()
def image_sigma_vs_noise(model: nn.Module, clean_images: Tensor, noisy_images: Tensor, *, batch_size: int = 256,
                         device=None) -> dict[str, float]:
    """Mean predicted image sigma on clean vs noised copies of the same images (robustness of the uncertainty).

    A sensible log-std head predicts more uncertainty on noisier images: ``unc/image_sigma_noise_ratio > 1``.

    Returns:
        ``{"unc/image_sigma_clean", "unc/image_sigma_noisy", "unc/image_sigma_noise_ratio",
        "unc/image_sigma_noise_frac_up"}`` (the last: fraction of images whose sigma grew).

    Raises:
        ValueError: the model predicts no image log-std.
    """
    was_training = model.training
    model.eval()
    try:
        _, clean = encode_images(model, clean_images, batch_size=batch_size, device=device)
        _, noisy = encode_images(model, noisy_images, batch_size=batch_size, device=device)
    finally:
        model.train(was_training)
    if clean is None or noisy is None:
        raise ValueError("image_sigma_vs_noise: the model predicts no image log-std (build it with log_std=True)")
    sc, sn = sigma_of(clean).cpu(), sigma_of(noisy).cpu()
    return {"unc/image_sigma_clean": sc.mean().item(), "unc/image_sigma_noisy": sn.mean().item(),
            "unc/image_sigma_noise_ratio": (sn.mean() / sc.mean()).item(),
            "unc/image_sigma_noise_frac_up": (sn > sc).double().mean().item() if sc.numel() == sn.numel()
            else float("nan")}
