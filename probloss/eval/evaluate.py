"""``evaluate(model, loss, eval_set, tokenizer)``: every evaluation metric of a dual encoder, as a flat dict.

All matching goes through ``loss.score`` (the loss owns its geometry and its use of sigma). ``{p}`` below is the
``prefix`` argument ("val" or "test"): ``{p}/...`` keys carry it; ``embed/...`` and ``unc/...`` keys are written as
shown for "val" and as ``test/embed/...``, ``test/unc/...`` for "test", so both evaluations merge into one summary.
N = number of eval pairs; "chance" = the value for random scores (or random sigma). A key whose inputs are missing
(no json, no ``level``, no labelled sample, ...) is left out.

Retrieval (image i with its own caption, ``eval_set.captions[i]``). Multi-positive (COCO style): a text whose caption
string equals the query image's caption is a hit, and an image whose own caption equals the query text is a hit;
rank = 1 + #{non-positives scoring >= the best positive} (ties among positives are free, identical captions embed
identically; ties with a non-positive count against), so a perfect model scores 1.0 with duplicated captions:

- ``{p}/i2t_r@{1,5,10}``, ``{p}/t2i_r@{1,5,10}``: multi-positive Recall@K; chance at K = 1: ``{p}/r@1_chance``.
- ``{p}/i2t_r@{1,5,10}_strict``, ``{p}/t2i_r@{1,5,10}_strict``: one positive (the pair itself), ties pessimistic;
  chance K/N; < 1 even for a perfect model when captions repeat.
- ``{p}/r@1_chance``: mean over queries of #{pairs with the query's caption} / N (1/N without duplicates).
- ``{p}/i2t_r@1_L{0..3}``, ``{p}/t2i_r@1_L{0..3}``: multi-positive R@1 over the queries whose own caption has
  level k (json ``level``); chance ``{p}/r@1_chance_L{k}`` (high for L0: "an object" repeats a lot).
- ``{p}/r@1_chance_L{0..3}``: ``{p}/r@1_chance`` over the level-k queries.

Zero-shot (json ``label`` not null; prompts ``classnames`` x ``templates``, scores averaged over templates; every
image ranked against all C classes; C = 40 on shapes):

- ``{p}/zeroshot_top1``, ``{p}/zeroshot_top5``: top-K accuracy; chance 1/C, 5/C.
- ``{p}/zeroshot_n_labelled``: the number of labelled images (float), the sample size of the two above.
- ``{p}/zeroshot_seen_top1``, ``{p}/zeroshot_unseen_top1`` (with ``heldout_classnames``): top-1 over images of
  classes not held out / held out of training (still against all C); chance 1/C.
- ``{p}/zeroshot_n_unseen`` (with ``heldout_classnames``): the number of labelled images of held-out classes.

Probes (image vs its true L3 caption and a hard negative from json ``negatives``; ties count half; chance 0.5):

- ``{p}/relation_probe_acc``: relation reversed (subject and object swapped; multi-object scenes).
- ``{p}/binding_probe_acc``: colours of objects 0 and 1 swapped (multi-object scenes).
- ``{p}/control_probe_acc``: one object's shape or colour replaced by one absent from the image; a bag-of-words
  model can pass it, so it shows the probe pipeline works and the attribute words are grounded at all.

Embedding space (the first 4096 pairs; no chance level, ranges given):

- ``embed/effective_rank``, ``embed/uniformity``, ``embed/participation_ratio``, ``embed/participation_ratio_frac``:
  mean of the two modalities, each also as ``..._image`` and ``..._text``; on L2-normalised embeddings. Effective
  rank in [1, D], uniformity in [-4t, 0] (lower = more uniform), participation ratio in [1, D], ``_frac`` = / D.
- ``embed/alignment`` (mean squared distance of the pairs, [0, 4]), ``embed/modality_gap`` (distance of the
  modality centroids, [0, 2]): on L2-normalised embeddings.
- ``embed/raw/effective_rank``, ``embed/raw/participation_ratio``, ``embed/raw/participation_ratio_frac`` (each
  also ``_image``, ``_text``), only when ``loss.scores_raw_embeddings``: the same on the raw embeddings the loss
  scores; scale-invariant (comparable across runs).
- ``embed/raw/norm_mean_image``, ``embed/raw/norm_mean_text``: mean L2 norm; scale-dependent (diagnostic).
- ``embed/raw/alignment_ratio``: mean ||x_i - y_i||^2 over pairs / mean ||x_i - y_j||^2 over all (i, j);
  scale-invariant; about 1 for unrelated embeddings, 0 for perfectly aligned pairs.

Uncertainty (``loss.needs_log_std`` and log-stds from the model); sigma = exp(log_std), for per-dimension log-stds
exp(mean_d log_std_d). Absolute sigma is not comparable across runs (gaussian_var's loss is unchanged when the
embeddings and sigma are scaled together): compare ranks, ratios and correlations. Captions below are the four
levels L0..L3 of every sample with json ``captions``; n_words = whitespace-separated words:

- ``unc/sigma_image_mean``, ``unc/sigma_text_mean``: mean sigma of the eval images / own captions (diagnostics).
- ``unc/sigma_text_image_log_ratio``: mean log sigma of the captions minus that of the images (PCME++ and ProLIP
  report captions as the more uncertain modality: > 0); comparable within one loss's runs, not across losses.
- ``unc/sigma_vs_images_fit_spearman``: Spearman of each eval caption's sigma with the number of eval images it
  fits exactly (the images whose four caption levels contain that string: "a red circle" fits every image it is
  a level of); > 0 when more general captions get larger sigma (PCME++'s and ProLIP's generality claim); chance 0.
- ``unc/sigma_vs_images_fit_partial_spearman``: the same controlling for n_words; chance 0.
- ``unc/specificity_spearman``: Spearman of caption level with text sigma; < 0 when specific captions get smaller
  sigma (the proposal's prediction); chance 0. Confounded with caption length: see the next keys.
- ``unc/specificity_partial_spearman``: partial Spearman of level with text sigma controlling for n_words; chance 0.
- ``unc/specificity_matched_acc``: over json ``matched_pair`` [less, more specific] (equal n_words), the fraction
  with sigma(more) < sigma(less), ties half; 0.5 = no effect beyond length.
- ``unc/specificity_matched_log_ratio``: mean log(sigma(more) / sigma(less)) over those pairs; < 0 = the effect.
- ``unc/baseline_wordcount_specificity_spearman``, ``unc/baseline_wordcount_partial_spearman``,
  ``unc/baseline_wordcount_matched_acc``: the same three for the length-only baseline sigma = -n_words (partial
  Spearman 0 and matched_acc 0.5 by construction): what caption length alone gives.
- ``unc/sigma_text_rank_L{0..3}``: mean percentile rank (0 = smallest sigma, 1 = largest) of the level-k captions'
  sigma among all captions'; chance 0.5 each.
- ``unc/sigma_text_ratio_L0_L3``: geometric-mean sigma of L0 captions / that of L3 captions (> 1 = the effect).
- ``unc/image_sigma_vs_objects``: Spearman of image sigma with the number of objects (json ``objects``); chance 0.
- ``unc/{i2t,t2i}_r1_sigma_decile_{0..n_sigma_bins-1}``: multi-positive R@1 per bin of the query's sigma,
  lowest sigma first; falls across bins when sigma flags failures.
- ``unc/{i2t,t2i}_r1_sigma_spearman``: Spearman of query sigma with the query's multi-positive R@1 hit; < 0 when
  high sigma flags failures; chance 0.

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
DEFAULT_TEMPLATES = ("a {}",)  # fallback only: runs pass their own templates
NEGATIVE_KINDS = ("relation", "binding")  # list order of json["negatives"] when it is a list
PROBE_KINDS = (*NEGATIVE_KINDS, "control")  # "control" only in the dict form
LEVELS = range(4)  # caption levels L0..L3


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


def _zeroshot(model, loss, tokenizer, image_emb, image_log_std, labels_json, classnames, templates, heldout,
              batch_size, device) -> dict[str, float]:
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
    ranks = metrics.positive_ranks(scores / len(templates), labels)
    out = {"zeroshot_top1": _mean(ranks <= 1), "zeroshot_top5": _mean(ranks <= 5),
           "zeroshot_n_labelled": float(len(idx))}
    if heldout is not None:
        heldout = set(heldout)
        unknown = sorted(heldout - set(classnames))
        if unknown:
            raise ValueError(f"zero-shot: held-out classes {unknown} are not among the classnames; pass names "
                             f"from the classnames list, e.g. {classnames[0]!r}")
        unseen = torch.tensor([c in heldout for c in classnames])[labels]  # (n_labelled,) bool
        for name, sel in (("seen", ~unseen), ("unseen", unseen)):
            if sel.any():
                out[f"zeroshot_{name}_top1"] = _mean(ranks[sel] <= 1)
        out["zeroshot_n_unseen"] = float(unseen.sum())
    return out


def _mean(x: Tensor) -> float:
    return x.double().mean().item()


def _negative(meta: dict, kind: str) -> str | None:
    negatives = meta.get("negatives")
    if isinstance(negatives, dict):
        return negatives.get(kind)
    if isinstance(negatives, (list, tuple)) and kind in NEGATIVE_KINDS:
        i = NEGATIVE_KINDS.index(kind)
        return negatives[i] if i < len(negatives) else None
    return None


def _probes(model, loss, tokenizer, image_emb, image_log_std, metas, batch_size, device) -> dict[str, float]:
    out = {}
    for kind in PROBE_KINDS:
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
        out[f"{kind}_probe_acc"] = metrics.pair_probe_accuracy(s_true, s_false)
    return out


def _retrieval(scores: Tensor, groups: Tensor, levels: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Strict and multi-positive recall, per-level R@1 and the chance levels (module docstring)."""
    n = scores.shape[0]
    positive = metrics.same_group(groups)  # symmetric: serves both directions
    chance = positive.sum(1).double() / n  # per query: R@1 of random scores
    out = {"r@1_chance": chance.mean().item()}
    for d, s in (("i2t", scores), ("t2i", scores.T)):
        multi, strict = metrics.multi_positive_ranks(s, positive), metrics.positive_ranks(s, torch.arange(n))
        for k in ks:
            out[f"{d}_r@{k}"], out[f"{d}_r@{k}_strict"] = _mean(multi <= k), _mean(strict <= k)
        for lv in LEVELS:
            if (levels == lv).any():
                out[f"{d}_r@1_L{lv}"] = _mean(multi[levels == lv] <= 1)
    for lv in LEVELS:
        if (levels == lv).any():
            out[f"r@1_chance_L{lv}"] = chance[levels == lv].mean().item()
    return out


_GEOMETRY = {
    "effective_rank": metrics.effective_rank,
    "participation_ratio": metrics.participation_ratio,
    "participation_ratio_frac": lambda e: metrics.participation_ratio(e, normalized=True),
    "uniformity": metrics.uniformity,  # L2-normalises itself: not repeated on raw embeddings
}


def _per_modality(x: Tensor, y: Tensor, names: Sequence[str], group: str) -> dict[str, float]:
    out = {}
    for name in names:
        vi, vt = _GEOMETRY[name](x), _GEOMETRY[name](y)
        out[f"{group}/{name}_image"], out[f"{group}/{name}_text"], out[f"{group}/{name}"] = vi, vt, (vi + vt) / 2
    return out


def _embedding_space(image_emb: Tensor, text_emb: Tensor, raw: bool, max_samples: int = 4096) -> dict[str, float]:
    # Subsample (the first max_samples, deterministic) to keep uniformity's O(N^2) pairs and the SVD bounded.
    xr, yr = image_emb[:max_samples].double().cpu(), text_emb[:max_samples].double().cpu()
    x, y = torch.nn.functional.normalize(xr, dim=-1), torch.nn.functional.normalize(yr, dim=-1)
    out = {"embed/alignment": metrics.alignment(x, y), "embed/modality_gap": metrics.modality_gap(x, y),
           **_per_modality(x, y, list(_GEOMETRY), "embed")}
    if raw:
        out.update(_per_modality(xr, yr, ["effective_rank", "participation_ratio", "participation_ratio_frac"],
                                 "embed/raw"))
        out["embed/raw/norm_mean_image"] = xr.norm(dim=-1).mean().item()
        out["embed/raw/norm_mean_text"] = yr.norm(dim=-1).mean().item()
        # mean_ij ||x_i - y_j||^2 = mean ||x||^2 + mean ||y||^2 - 2 mean(x) . mean(y), without the (N, N) matrix
        all_pairs = xr.pow(2).sum(-1).mean() + yr.pow(2).sum(-1).mean() - 2 * xr.mean(0) @ yr.mean(0)
        out["embed/raw/alignment_ratio"] = ((xr - yr).pow(2).sum(-1).mean() / all_pairs).item()
    return out


def _text_sigma(model, tokenizer, captions: Sequence[str], batch_size: int, device) -> Tensor:
    _, log_std = encode_captions(model, tokenizer, captions, batch_size=batch_size, device=device)
    return sigma_of(log_std).cpu().double()


def _n_words(captions: Sequence[str]) -> Tensor:
    return torch.tensor([len(c.split()) for c in captions], dtype=torch.float64)


def _specificity(model, tokenizer, metas, batch_size, device) -> dict[str, float]:
    """Text sigma vs caption level, with caption length controlled (module docstring)."""
    out = {}
    caps = [(level, c) for m in metas if len(m.get("captions") or []) >= 4 for level, c in enumerate(m["captions"][:4])]
    if caps:
        levels, captions = torch.tensor([lv for lv, _ in caps]), [c for _, c in caps]
        sigma, words = _text_sigma(model, tokenizer, captions, batch_size, device), _n_words(captions)
        out["unc/specificity_spearman"] = metrics.spearman(levels, sigma)
        out["unc/specificity_partial_spearman"] = metrics.partial_spearman(levels, sigma, words)
        out["unc/baseline_wordcount_specificity_spearman"] = metrics.spearman(levels, -words)
        out["unc/baseline_wordcount_partial_spearman"] = metrics.partial_spearman(levels, -words, words)
        pct = metrics.percentile_ranks(sigma)  # every level has one caption per sample: no empty selection
        out.update({f"unc/sigma_text_rank_L{lv}": pct[levels == lv].mean().item() for lv in LEVELS})
        log_sigma = sigma.log()  # ratio of geometric means = exp(difference of mean log sigma)
        out["unc/sigma_text_ratio_L0_L3"] = (log_sigma[levels == 0].mean() - log_sigma[levels == 3].mean()).exp().item()

    pairs = [m["matched_pair"] for m in metas if isinstance(m.get("matched_pair"), (list, tuple))
             and len(m["matched_pair"]) == 2]
    if pairs:
        n = len(pairs)
        both = [p[0] for p in pairs] + [p[1] for p in pairs]  # less specific first, then more specific
        sigma, words = _text_sigma(model, tokenizer, both, batch_size, device), _n_words(both)
        # pair_probe_accuracy(a, b) counts a > b (ties half): here sigma(less) > sigma(more).
        out["unc/specificity_matched_acc"] = metrics.pair_probe_accuracy(sigma[:n], sigma[n:])
        out["unc/specificity_matched_log_ratio"] = (sigma[n:].log() - sigma[:n].log()).mean().item()
        out["unc/baseline_wordcount_matched_acc"] = metrics.pair_probe_accuracy(-words[:n], -words[n:])
    return out


def _images_fit(metas, captions: Sequence[str]) -> Tensor | None:
    """``(N,)`` for each eval caption, how many eval images list it among their caption levels (json
    ``captions``); None without that metadata. Every caption fits at least its own image when its own caption is
    one of its levels."""
    levels = [set(m.get("captions") or []) for m in metas]
    if not any(levels):
        return None
    counts: dict[str, int] = {}
    for caption_set in levels:
        for caption in caption_set:
            counts[caption] = counts.get(caption, 0) + 1
    return torch.tensor([counts.get(c, 0) for c in captions], dtype=torch.float64)


def _uncertainty(model, tokenizer, metas, captions, scores, groups, image_log_std, text_log_std, batch_size,
                 device, n_bins: int = 10) -> dict[str, float]:
    img_sigma, txt_sigma = sigma_of(image_log_std).cpu(), sigma_of(text_log_std).cpu()
    out = {"unc/sigma_image_mean": img_sigma.mean().item(), "unc/sigma_text_mean": txt_sigma.mean().item(),
           "unc/sigma_text_image_log_ratio": (txt_sigma.double().log().mean() - img_sigma.double().log().mean()).item()}
    out.update(_specificity(model, tokenizer, metas, batch_size, device))
    fits = _images_fit(metas, captions)
    if fits is not None:
        sigma, words = txt_sigma.double(), _n_words(captions)
        out["unc/sigma_vs_images_fit_spearman"] = metrics.spearman(fits, sigma)
        out["unc/sigma_vs_images_fit_partial_spearman"] = metrics.partial_spearman(fits, sigma, words)

    n_obj = [(i, len(m["objects"])) for i, m in enumerate(metas) if m.get("objects") is not None]
    if n_obj:
        out["unc/image_sigma_vs_objects"] = metrics.spearman(torch.tensor([n for _, n in n_obj]),
                                                             img_sigma[[i for i, _ in n_obj]])

    positive = metrics.same_group(groups)
    for direction, s, sig in (("i2t", scores, img_sigma), ("t2i", scores.T, txt_sigma)):
        recalls = metrics.recall_by_sigma_decile(s, sig, n_bins=n_bins, groups=groups)
        out.update({f"unc/{direction}_r1_sigma_decile_{b}": r for b, r in enumerate(recalls)})
        hits = (metrics.multi_positive_ranks(s, positive) <= 1).double()
        out[f"unc/{direction}_r1_sigma_spearman"] = metrics.spearman(sig, hits)
    return out


def _with_prefix(out: dict[str, float], prefix: str) -> dict[str, float]:
    """``{prefix}/`` before every key; embed/ and unc/ keys keep their bare names under "val" (module docstring)."""
    return {k if prefix == "val" and k.startswith(("embed/", "unc/")) else f"{prefix}/{k}": v for k, v in out.items()}


# --- the entry point ------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, loss: nn.Module, eval_set: Any, tokenizer: Callable[[list[str]], Tensor], *,
             batch_size: int = 256, device=None, classnames: Sequence[str] | None = None,
             templates: Sequence[str] | None = None, n_sigma_bins: int = 10, prefix: str = "val",
             heldout_classnames: Sequence[str] | None = None) -> dict[str, float]:
    """Every evaluation metric (the module docstring lists the keys).

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
        templates: prompt templates with one "{}", scores averaged over them (the run's templates; None falls
            back to ``DEFAULT_TEMPLATES``).
        n_sigma_bins: bins of the R@1-by-sigma curves.
        prefix: "val" or "test" (module docstring: where it goes).
        heldout_classnames: classnames held out of training (adds the seen / unseen zero-shot split).

    Returns:
        ``{key: float}``.
    """
    if not prefix or "/" in prefix:
        raise ValueError(f"evaluate: prefix must be a plain name such as 'val' or 'test', got {prefix!r}")
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
        ids: dict[str, int] = {}
        groups = torch.tensor([ids.setdefault(c, len(ids)) for c in eval_set.captions])  # same id = same caption
        levels = torch.tensor([int(m["level"]) if m.get("level") is not None else -1 for m in metas])

        scores = score_matrix(loss, image_emb, text_emb, image_log_std, text_log_std, block=max(batch_size, 1024))
        scores = scores.float().cpu()  # (N, N)
        out = _retrieval(scores, groups, levels)
        if classnames is not None:
            out.update(_zeroshot(model, loss, tokenizer, image_emb, image_log_std, [m.get("label") for m in metas],
                                 list(classnames), templates, heldout_classnames, batch_size, device))
        out.update(_probes(model, loss, tokenizer, image_emb, image_log_std, metas, batch_size, device))
        out.update(_embedding_space(image_emb, text_emb, raw=loss.scores_raw_embeddings))
        if image_log_std is not None and text_log_std is not None:
            out.update(_uncertainty(model, tokenizer, metas, eval_set.captions, scores, groups, image_log_std,
                                    text_log_std, batch_size, device, n_bins=n_sigma_bins))
        return _with_prefix(out, prefix)
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
