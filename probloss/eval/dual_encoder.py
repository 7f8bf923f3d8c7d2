"""``evaluate(model, loss, eval_set, tokenizer)``: every evaluation metric of a dual encoder, as a flat dict.

All matching goes through ``loss.score`` (the loss owns its geometry and its use of sigma). ``{p}`` below is the
``prefix`` argument ("val" or "test"): ``{p}/...`` keys carry it; ``embed/...`` and ``unc/...`` keys are written as
shown for "val" and as ``test/embed/...``, ``test/unc/...`` for "test", so both evaluations merge into one summary.
N = number of eval pairs; "chance" = the value for random scores (or random sigma). A key whose inputs are missing
(no json, no ``level``, no labelled sample, ...) is left out.

Retrieval by exact strings (secondary since issue 27: see plausible-match retrieval below; image i with its own
caption, ``eval_set.captions[i]``). Multi-positive (COCO style): a text whose caption string equals the query
image's caption is a hit, and an image whose own caption equals the query text is a hit;
rank = 1 + #{non-positives scoring >= the best positive} (ties among positives are free, identical captions embed
identically; ties with a non-positive count against), so a perfect model scores 1.0 with duplicated captions:

- ``{p}/i2t_r@{1,5,10}``, ``{p}/t2i_r@{1,5,10}``: multi-positive Recall@K; chance at K = 1: ``{p}/r@1_chance``.
- ``{p}/i2t_r@{1,5,10}_strict``, ``{p}/t2i_r@{1,5,10}_strict``: one positive (the pair itself), ties pessimistic;
  chance K/N; < 1 even for a perfect model when captions repeat.
- ``{p}/r@1_chance``: mean over queries of #{pairs with the query's caption} / N (1/N without duplicates).
- ``{p}/i2t_r@1_L{0..3}``, ``{p}/t2i_r@1_L{0..3}``: multi-positive R@1 over the queries whose own caption has
  level k (json ``level``); chance ``{p}/r@1_chance_L{k}`` (high for L0: "an object" repeats a lot).
- ``{p}/r@1_chance_L{0..3}``: ``{p}/r@1_chance`` over the level-k queries.

Plausible-match retrieval (PCME, Chun et al. 2021; ECCV Caption, Chun et al. 2022): a caption is a positive of an
image when its facts hold for the image's scene (``plausible``: ``probloss.data.shapes.plausible_matrix``, about 490
true captions per test image among 5000), exact-string positives included; a caption query's positives are the
images it holds for. Only with a plausible matrix (shapes metadata, or the ``plausible`` argument). Ranks with
pessimistic ties (every non-positive tied with a positive ranks first); R = the query's number of positives;
a scorer that ranks every true caption above every false one scores 1.0 on each. These are the primary retrieval
numbers (an exact-string R@1 depends on which specificity the model prefers among many true captions):

- ``{p}/i2t_r@{1,5}_plausible``, ``{p}/t2i_r@{1,5}_plausible``: a positive in the top K; chance about K R / N.
- ``{p}/i2t_rprecision``, ``{p}/t2i_rprecision``: precision in the top R; chance R / N.
- ``{p}/i2t_map@r``, ``{p}/t2i_map@r``: mAP@R (Musgrave et al. 2020), mean over the top R of precision@k at each
  hit, divided by R; chance about (R/N) (R/N + ln(R)/R) (0.011 for R = 490, N = 5000: measured 0.011).

Zero-shot (json ``label`` not null; prompts ``classnames`` x ``templates``, scores averaged over templates; every
image ranked against all C classes; C = 40 on shapes):

- ``{p}/zeroshot_top1``, ``{p}/zeroshot_top5``: top-K accuracy; chance 1/C, 5/C.
- ``{p}/zeroshot_n_labelled``: the number of labelled images (float), the sample size of the two above.
- ``{p}/zeroshot_seen_top1``, ``{p}/zeroshot_unseen_top1`` (with ``heldout_classnames``): top-1 over images of
  classes not held out / held out of training (still against all C); chance 1/C.
- ``{p}/zeroshot_n_unseen`` (with ``heldout_classnames``): the number of labelled images of held-out classes.

Probes (image vs its true L3 caption and a hard negative from json ``negatives``; ties count half; chance 0.5).
With json ``heldout_mentions`` (whether the L3 caption and each negative mention a held-out colour x shape
combination) only pairs balanced for familiarity count (both captions seen in training, or both held out), so a
probe cannot be passed by preferring the familiar caption; without it every pair counts:

- ``{p}/relation_probe_acc``: relation reversed (subject and object swapped; multi-object scenes).
- ``{p}/binding_probe_acc``: colours of objects 0 and 1 swapped (multi-object scenes).
- ``{p}/control_probe_acc``: one object's shape or colour replaced by one absent from the image; a bag-of-words
  model can pass it, so it shows the probe pipeline works and the attribute words are grounded at all.
- ``{p}/{relation,binding,control}_probe_n``: the number of pairs each accuracy is over.

Embedding space (the first 4096 pairs). Two views; x, y = image and text vectors:

- the scored view, ``embed/scored/...``: the representation the loss scores (``loss.embed`` where the loss has
  one, else the L2-normalised vectors of a cosine loss), jointly centred (the mean of both modalities together
  removed) when the loss is shift-invariant and divided by the joint RMS norm when it is scale-invariant
  (``loss.invariances_in_use()``), so a transformation that leaves the loss unchanged leaves these unchanged.
  Keys: ``effective_rank``, ``participation_ratio``, ``participation_ratio_frac``, ``uniformity`` (Wang & Isola
  on the vectors as they are, not re-normalised: <= 0, lower = more uniform), each with ``_image`` / ``_text`` and
  their mean; ``alignment`` (mean ||x_i - y_i||^2), ``modality_gap`` (||mean x - mean y||), ``alignment_ratio``
  (mean ||x_i - y_i||^2 / mean over all (i, j) of ||x_i - y_j||^2; about 1 for unrelated pairs, 0 for aligned).
  Values are in the loss's own units (comparable within one loss, e.g. learned vs frozen sigma, not across
  losses).
- the common view, ``embed/...`` (same key names without ``scored/``): the scored view, centred on the joint mean,
  then each vector L2-normalised; invariant for every loss, the view for cross-loss tables. Effective rank in
  [1, D], uniformity in [-4t, 0] (t = 2), participation ratio in [1, D] (``_frac`` = / D), alignment in [0, 4],
  modality gap in [0, 2]. A deliberate break: before issue 27 these were on uncentred L2-normalised raw
  embeddings, which a distance loss does not control (a shift of both modalities changed them at equal loss).
  ``embed/raw/*`` is gone: ``embed/scored/*`` measures the same representation the right way.

Specificity of the text sigma, with trivial-cue baselines. Captions are the four levels L0..L3 of every sample with
json ``captions``; n_words = whitespace-separated words; a statistic "of a log-sigma" is computed for the
model's text log-sigma (``unc/<stat>``, with log-stds) and for every trivial cue c used as if it were the
log-sigma (``unc/cue/<c>/<stat>``, every loss: they do not depend on the model), c in

- ``words``: -n_words (shorter = more uncertain);
- ``frequency``: log(1 + count of the exact string in training) (frequent = general); only with
  ``train_caption_stats``;
- ``objects``: -(object count of the caption's scene) (json ``objects``);
- ``token``: sign x [the token is in the caption], the single token whose indicator correlates most with level
  over the training captions weighted by their counts (:func:`level_token`; sign +1 when it marks less specific
  captions). Without ``train_caption_stats`` the token is chosen on the eval captions' levels instead.

Rank statistics use average ranks and pair accuracies count ties half, so a discrete cue is scored fairly. <stat>:

- ``specificity_spearman``: Spearman of caption level with log-sigma; < 0 when specific captions get smaller
  sigma (the proposal's prediction); chance 0. Confounded with caption length: see the next keys.
- ``specificity_partial_spearman``: partial Spearman of level with log-sigma controlling for n_words; chance 0.
- ``specificity_level_coef``, ``specificity_level_se``, ``specificity_level_t``: OLS of the log-sigma,
  standardised within the run (so the coefficient is in units of the run's log-sigma standard deviation and
  comparable across runs), on level with an intercept, n_words, object count, log(1 + training frequency) (with
  ``train_caption_stats``) and the count of placeholder words ("object", ...: ``placeholder_words``); the level
  coefficient, its classical standard error and t (:func:`level_regression`). < 0 = the effect beyond those cues.
- ``specificity_within_scene_acc``: pairs of different captions of one scene at different levels, in strata of
  (object count, word-count difference); per stratum the fraction with sigma(more specific) < sigma(less
  specific), ties half; the mean over strata (equal weight); 0.5 = no effect. ``..._same_words_acc``: the same
  over the strata of equal word count. Object count is constant within a scene, so that cue scores 0.5.
- ``specificity_matched_acc``: over json ``matched_pair`` (one pair [less, more specific] or a list of such
  pairs), the fraction with sigma(more) < sigma(less), ties half; 0.5 = no effect.
- ``specificity_matched_log_ratio``: mean log(sigma(more) / sigma(less)) over those pairs; < 0 = the effect.
- ``sigma_text_rank_L{0..3}``: mean percentile rank (0 = smallest sigma, 1 = largest) of the level-k captions'
  log-sigma among all captions'; chance 0.5 each.
- ``sigma_text_ratio_L0_L3``: exp(mean log-sigma of L0 captions - that of L3 captions) (> 1 = the effect).
- ``sigma_vs_images_fit_spearman``: Spearman of each eval caption's log-sigma with the number of eval images it
  fits exactly (the images whose four caption levels contain that string); > 0 when more general captions get
  larger sigma (PCME++'s and ProLIP's generality claim); chance 0. ``..._partial_spearman``: controlling n_words.

and, once (not per cue): ``unc/specificity_within_scene_n``, ``unc/specificity_within_scene_same_words_n`` (pairs).
Renamed: ``unc/baseline_wordcount_{specificity_spearman,partial_spearman,matched_acc}`` are now
``unc/cue/words/{specificity_spearman,specificity_partial_spearman,specificity_matched_acc}``.

Other sigma keys (with log-stds); sigma = exp(log_std), for per-dimension log-stds exp(mean_d log_std_d). Absolute
sigma is not comparable across runs (gaussian_var's loss is unchanged when the embeddings and sigma are scaled
together): compare ranks, ratios and correlations.

- ``unc/sigma_image_mean``, ``unc/sigma_text_mean``: mean sigma of the eval images / own captions (diagnostics;
  the only keys that change under a loss's declared scale invariance).
- ``unc/sigma_text_image_log_ratio``: mean log sigma of the captions minus that of the images (PCME++ and ProLIP
  report captions as the more uncertain modality: > 0); comparable within one loss's runs, not across losses.
- ``unc/log_sigma_image_sd``, ``unc/log_sigma_text_sd``: standard deviation of log sigma over the eval images /
  captions: whether the heads tell samples apart at all (the heads start with every sample at one value, so a
  trained spread near 0 says sigma did not move); unchanged by the declared shift and scale.
- ``unc/image_sigma_vs_objects``: Spearman of image sigma with the number of objects (json ``objects``); chance 0.

Uncertainty against retrieval (PCME++, arXiv 2305.18171; ProLIP, arXiv 2410.18857). For d = i2t (image queries,
image sigma) and t2i (caption queries, text sigma); a query's hit = plausible R@1 and its R-Precision (exact-string
positives where no plausible matrix is known); the uncertainty u of a query is its sigma (``unc/{d}_...``, with
log-stds) or a training-free baseline that exists for every loss: ``unc/free/top1/{d}_...`` (u = minus the
query's best score) and ``unc/free/margin/{d}_...`` (u = minus the best score's margin over the second best).
Queries of equal u are averaged (the expectation over their order). Keys (after the prefix):

- ``{d}_bin_{0..n_sigma_bins-1}_r@1``, ``{d}_bin_{b}_rprecision``: the mean over equal-count bins of the queries
  sorted by u, most certain first; falls across bins when u flags failures.
- ``{d}_bin_r@1_spearman``, ``{d}_bin_rprecision_spearman``: Spearman of bin index with the bin's value; < 0 when
  u flags failures, chance 0.
- ``{d}_aurc``: area under the risk-coverage curve (risk = 1 - hit rate of the kept queries, dropping the most
  uncertain first; Geifman et al. 2019), lower is better; read against ``{d}_aurc_oracle`` (queries ordered by
  their own hits: the best any u can do) and ``{d}_aurc_random`` (= 1 - hit rate: any u in expectation under a
  random order).

Renamed: ``unc/{i2t,t2i}_r1_sigma_decile_{b}`` -> ``unc/{i2t,t2i}_bin_{b}_r@1`` (plausible positives now) and
``unc/{i2t,t2i}_r1_sigma_spearman`` (sigma vs hit) -> ``unc/{i2t,t2i}_bin_r@1_spearman`` (bin index vs bin R@1).

Planted noise, the positive control of the variance heads (issue 33; only with ``planted_attribute``, the run's
``data.noise_attribute``, e.g. "magenta": training gave the scenes holding it a wrong caption with probability
``data.noise_rate``; val and test stay clean). A caption "mentions" the attribute when it has the word; a scene
"holds" it when an object has that colour or shape (json ``objects``). AUROCs are stratified: within each stratum
the AUROC of the uncertainty for the attribute's items against the others (average ranks, ties half), then the
mean over strata weighted by their attribute items (:func:`probloss.eval.metrics.stratified_auroc`: the chance
that an attribute item's uncertainty exceeds a random other item's OF ITS OWN STRATUM); strata without both
kinds are left out. Text strata: (caption level, word count); image strata: object count. Each AUROC has a
``_se`` twin: the Hanley-McNeil standard error combined over strata (independent strata; calibrated under the
null, tests/eval/test_eval_planted.py). Chance 0.5; > 0.5 = more uncertainty where the noise was planted:

- ``unc/planted_auroc``: text sigma, eval captions that mention the attribute vs the others (with log-stds);
  ``unc/planted_n``: the attribute captions counted.
- ``unc/planted_auroc_image``: image sigma, scenes that hold it vs the others; ``unc/planted_n_image``.
- ``unc/free/{top1,margin}/planted_auroc`` and ``..._image``: the training-free uncertainties of the caption / image
  queries (minus the best score, minus its margin over the runner-up); every loss. For a loss whose score uses
  sigma (gaussian_var, pcmepp, prolip, ...) these read the sigma too, through the score.
- ``unc/cue/{words,frequency,objects,token}/planted_auroc`` (+ ``_se``): the trivial cues of the specificity keys
  as the text uncertainty: the check that nothing trivial marks the attribute's captions (words: exactly 0.5, a
  stratum variable; frequency: the CLEAN training counts of train_caption_stats -- planting lowers an attribute
  caption's trained count by about a factor 1 - p (1 - the attribute's scene share), which pushes a
  frequency-tracking sigma below 0.5, against the effect).
- ``{p}/t2i_r@1_planted`` / ``_unplanted`` (caption queries that mention it / the others) and ``{p}/i2t_r@1_planted``
  / ``_unplanted`` (images that hold it / the others): multi-positive exact-string R@1; ``..._r@1_plausible_planted``
  / ``_unplanted``: plausible-match R@1 (over the queries with a positive, as ``{d}_r@1_plausible``). The two groups
  differ in caption levels (an L0 caption is true of many images), so read the cost of the noise across arms
  (p = 0.5 against p = 0, paired), not planted against unplanted within a run.

``val/loss`` is not computed here: probloss/training/evaluation.py computes it once, in the training batches of every
rank, so it is comparable with ``train/loss`` for any world size.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from probloss.data import shapes
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


def _familiar_alike(meta: dict, kind: str) -> bool:
    """Whether a probe pair is balanced for familiarity: json ``heldout_mentions`` says whether the L3 caption and
    each negative mention a held-out (colour, shape) combination; a pair counts only when both captions agree
    (both seen in training or both held out), so a probe measures binding or relations, not familiarity. Data
    without the key: every pair counts."""
    mentions = meta.get("heldout_mentions")
    if not isinstance(mentions, dict):
        return True
    return bool(mentions.get("caption")) == bool(mentions.get(kind))


def _probes(model, loss, tokenizer, image_emb, image_log_std, metas, batch_size, device) -> dict[str, float]:
    out = {}
    for kind in PROBE_KINDS:
        idx = [i for i, m in enumerate(metas)
               if _negative(m, kind) and len(m.get("captions") or []) >= 4 and _familiar_alike(m, kind)]
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
        out[f"{kind}_probe_n"] = float(len(idx))
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


def _plausible_positives(captions: Sequence[str], metas: Sequence[dict]) -> Tensor | None:
    """``(N_img, N_txt)`` bool from ``probloss.data.shapes.plausible_matrix`` (every fact of caption j holds for
    scene i) when every sample's json describes its scene (``objects``, each with a ``shape`` and a ``colour``);
    None otherwise (foreign data)."""
    if not metas or not all(isinstance(m.get("objects"), list) and m["objects"] and
                            all(isinstance(o, dict) and "shape" in o and "colour" in o for o in m["objects"])
                            for m in metas):
        return None
    return torch.as_tensor(shapes.plausible_matrix(captions, metas), dtype=torch.bool)


def _plausible_retrieval(scores: Tensor, positive: Tensor) -> tuple[dict[str, float], dict[str, dict[str, Tensor]]]:
    """Plausible-match R@1, R@5, R-Precision and mAP@R per direction (module docstring); also the per-query
    ranking of each direction, for the uncertainty curves."""
    out, per_query = {}, {}
    for d, s, pos in (("i2t", scores, positive), ("t2i", scores.T, positive.T)):
        q = metrics.plausible_ranking(s, pos)
        has = q["n_positive"] > 0
        for k in (1, 5):
            out[f"{d}_r@{k}_plausible"] = _mean(q["rank"][has] <= k)
        out[f"{d}_rprecision"] = _mean(q["rprecision"][has])
        out[f"{d}_map@r"] = _mean(q["map_at_r"][has])
        per_query[d] = q
    return out, per_query



def oracle_retrieval(captions: Sequence[str], metas: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Known answers of the retrieval keys on a real eval split: three scorers that rank every true caption of an
    image above every false one (facts from ``plausible_matrix``), differing only in which true captions they put
    first: none (ties), the most specific (highest json ``level`` of the candidate's own caption) or the most
    general. Each must score 1.0 on every plausible key; the exact-string keys show how much a preference alone
    moves them (why they are secondary).

    Returns:
        ``{scorer: {key: value}}`` with the plausible keys and ``{i2t,t2i}_r@1`` (exact strings).
    """
    positive = _plausible_positives(captions, metas)
    if positive is None:
        raise ValueError("oracle_retrieval: every sample's json needs its scene (objects with shape and colour)")
    ids: dict[str, int] = {}
    groups = torch.tensor([ids.setdefault(c, len(ids)) for c in captions])
    levels = torch.tensor([int(m.get("level", -1)) for m in metas])
    out = {}
    for name, preference in (("ties", 0.0), ("prefers specific", 1.0), ("prefers general", -1.0)):
        scores = 10.0 * positive.float() + preference * levels.float()[None, :]  # levels in 0..3 < 10
        exact = _retrieval(scores, groups, levels, ks=(1,))
        out[name] = {**_plausible_retrieval(scores, positive)[0], "i2t_r@1": exact["i2t_r@1"],
                     "t2i_r@1": exact["t2i_r@1"]}
    return out

# --- embedding space --------------------------------------------------------------------------------------------


def _scored(loss: nn.Module, emb: Tensor) -> Tensor:
    """The representation ``loss`` scores: its ``embed`` where it has one, else the raw vectors for a loss that
    scores them and the L2-normalised ones for a cosine loss."""
    embed = getattr(loss, "embed", None)
    if callable(embed):
        return embed(emb)
    return emb if getattr(loss, "scores_raw_embeddings", False) else F.normalize(emb, dim=-1)


def invariances_of(loss: nn.Module) -> tuple[str, ...]:
    """The loss instance's declared invariances (``invariances_in_use()``; a loss outside the contract: none)."""
    in_use = getattr(loss, "invariances_in_use", None)
    return tuple(in_use()) if callable(in_use) else tuple(getattr(loss, "invariances", ()))


def _per_modality(x: Tensor, y: Tensor, fns: dict[str, Callable[[Tensor], float]], group: str) -> dict[str, float]:
    out = {}
    for name, fn in fns.items():
        vi, vt = fn(x), fn(y)
        out[f"{group}/{name}_image"], out[f"{group}/{name}_text"], out[f"{group}/{name}"] = vi, vt, (vi + vt) / 2
    return out


def _embedding_space(loss: nn.Module, image_emb: Tensor, text_emb: Tensor, max_samples: int = 4096) -> dict[str, float]:
    """``embed/*`` (the common view) and ``embed/scored/*`` (the loss's own view); module docstring."""
    # Subsample (the first max_samples, deterministic) to keep uniformity's O(N^2) pairs and the SVD bounded.
    x, y = (_scored(loss, e[:max_samples].double().cpu()) for e in (image_emb, text_emb))
    invariances = invariances_of(loss)
    joint_mean = torch.cat([x, y]).mean(0)  # a shift of both modalities moves it by the same vector
    if "shift" in invariances:
        x, y = x - joint_mean, y - joint_mean
    if "scale" in invariances:
        rms = torch.cat([x, y]).pow(2).sum(-1).mean().sqrt()
        if rms > 0:
            x, y = x / rms, y / rms
    shared = {"effective_rank": metrics.effective_rank, "participation_ratio": metrics.participation_ratio,
              "participation_ratio_frac": lambda e: metrics.participation_ratio(e, normalized=True)}
    # mean_ij ||x_i - y_j||^2 = mean ||x||^2 + mean ||y||^2 - 2 mean(x) . mean(y), without the (N, N) matrix
    all_pairs = x.pow(2).sum(-1).mean() + y.pow(2).sum(-1).mean() - 2 * x.mean(0) @ y.mean(0)
    out = {"embed/scored/alignment": metrics.alignment(x, y, normalize=False),
           "embed/scored/modality_gap": metrics.modality_gap(x, y, normalize=False),
           "embed/scored/alignment_ratio": ((x - y).pow(2).sum(-1).mean() / all_pairs).item() if all_pairs > 0
           else math.nan,
           **_per_modality(x, y, {**shared, "uniformity": lambda e: metrics.uniformity(e, normalize=False)},
                           "embed/scored")}
    # The common view: centred on the joint mean, then each vector on the unit sphere (invariant for every loss).
    centre = torch.cat([x, y]).mean(0)
    cx, cy = F.normalize(x - centre, dim=-1), F.normalize(y - centre, dim=-1)
    out.update({"embed/alignment": metrics.alignment(cx, cy), "embed/modality_gap": metrics.modality_gap(cx, cy),
                **_per_modality(cx, cy, {**shared, "uniformity": metrics.uniformity}, "embed")})
    return out


# --- specificity of the text sigma, and what trivial cues score on it ---------------------------------------------


def _n_words(captions: Sequence[str]) -> Tensor:
    return torch.tensor([len(c.split()) for c in captions], dtype=torch.float64)


def default_placeholder_words() -> tuple[str, ...]:
    """``probloss.data.shapes.PLACEHOLDER_WORDS`` (words standing for an unnamed attribute)."""
    return tuple(shapes.PLACEHOLDER_WORDS)


def level_token(caption_stats: dict[str, tuple[int, int]]) -> tuple[str, int] | None:
    """The single token whose presence best predicts caption level: ``(token, sign)``.

    Over the captions of ``caption_stats`` {caption: (count, level)} weighted by count (the training
    distribution), the token whose indicator has the largest absolute Pearson correlation with level (ties: the
    alphabetically first). ``sign`` = +1 when the token marks a LESS specific caption (negative correlation), -1
    otherwise, so ``sign * indicator`` is a log-sigma cue that predicts a less specific caption. None when no
    token varies.
    """
    total = weighted_level = weighted_level_sq = 0.0
    token_weight: dict[str, float] = {}
    token_level: dict[str, float] = {}
    for caption, (count, level) in caption_stats.items():
        w, lv = float(count), float(level)
        total, weighted_level, weighted_level_sq = total + w, weighted_level + w * lv, weighted_level_sq + w * lv * lv
        for token in set(caption.split()):
            token_weight[token] = token_weight.get(token, 0.0) + w
            token_level[token] = token_level.get(token, 0.0) + w * lv
    if total <= 0:
        return None
    mean_level = weighted_level / total
    var_level = weighted_level_sq / total - mean_level ** 2
    best = None
    for token in sorted(token_weight):
        p = token_weight[token] / total
        if var_level <= 0 or not 0 < p < 1:
            continue
        corr = (token_level[token] / total - p * mean_level) / math.sqrt(p * (1 - p) * var_level)
        if best is None or abs(corr) > abs(best[1]) + 1e-12:
            best = (token, corr)
    return None if best is None else (best[0], 1 if best[1] < 0 else -1)


def _matched_pairs(meta: dict) -> list[tuple[str, str]]:
    """json ``matched_pair``: one pair [less, more specific] or a list of such pairs."""
    mp = meta.get("matched_pair")
    if not isinstance(mp, (list, tuple)) or not mp:
        return []
    pairs = [mp] if all(isinstance(c, str) for c in mp) else list(mp)
    return [(p[0], p[1]) for p in pairs if isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(c, str) for c in p)]


class _SpecificityData:
    """The captions every text-sigma statistic reads, each with its scene (sample index):

    - levels: the four captions L0..L3 of every sample with json ``captions`` (``level_caps``, ``level_scene``,
      ``level``);
    - pairs: every json matched pair (``pair_less``, ``pair_more``, ``pair_scene``);
    - own: the eval captions (``own_caps``; scene i for caption i) with the number of eval images each fits.
    """

    def __init__(self, metas: Sequence[dict], captions: Sequence[str], train_caption_stats, placeholder_words):
        rows = [(i, lv, c) for i, m in enumerate(metas) if len(m.get("captions") or []) >= 4
                for lv, c in enumerate(m["captions"][:4])]
        self.level_caps = [c for _, _, c in rows]
        self.level_scene = torch.tensor([i for i, _, _ in rows], dtype=torch.long)
        self.level = torch.tensor([lv for _, lv, _ in rows], dtype=torch.long)
        pairs = [(i, less, more) for i, m in enumerate(metas) for less, more in _matched_pairs(m)]
        self.pair_less, self.pair_more = [p[1] for p in pairs], [p[2] for p in pairs]
        self.pair_scene = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        self.own_caps = list(captions)
        self.fits = _images_fit(metas, captions)
        objects = [len(m["objects"]) if isinstance(m.get("objects"), list) else None for m in metas]
        self.objects = torch.tensor(objects, dtype=torch.float64) if objects and None not in objects else None
        self.stats = train_caption_stats
        self.placeholders = set(placeholder_words)
        # the token cue: from the training captions, else (said in the module docstring) the eval captions
        source = train_caption_stats if train_caption_stats is not None else {
            c: (1, int(lv)) for c, lv in zip(self.level_caps, self.level.tolist())}
        self.token = level_token(source) if source else None

    def strings(self) -> list[str]:
        """Every caption a statistic reads (the eval captions only where the fit counts use them)."""
        return self.level_caps + self.pair_less + self.pair_more + (self.own_caps if self.fits is not None else [])

    def cues(self) -> dict[str, Callable[[Sequence[str], Tensor], Tensor]]:
        """log-sigma surrogates of the trivial cues: ``(captions, scenes) -> (n,)`` float64 (module docstring)."""
        cues: dict[str, Callable[[Sequence[str], Tensor], Tensor]] = {"words": lambda caps, _: -_n_words(caps)}
        if self.stats is not None:
            cues["frequency"] = lambda caps, _: self.log_frequency(caps)
        if self.objects is not None:
            cues["objects"] = lambda _, scenes: -self.objects[scenes]
        if self.token is not None:
            token, sign = self.token
            cues["token"] = lambda caps, _: sign * torch.tensor([float(token in c.split()) for c in caps],
                                                                dtype=torch.float64)
        return cues

    def log_frequency(self, caps: Sequence[str]) -> Tensor:
        return torch.tensor([math.log1p(self.stats.get(c, (0, 0))[0]) for c in caps], dtype=torch.float64)

    def covariates(self) -> list[Tensor]:
        """The regression's controls over the level captions, in order: word count, object count, log(1 + training
        frequency), placeholder-token count (those that are known)."""
        caps = self.level_caps
        out = [_n_words(caps)]
        if self.objects is not None:
            out.append(self.objects[self.level_scene])
        if self.stats is not None:
            out.append(self.log_frequency(caps))
        out.append(torch.tensor([sum(w in self.placeholders for w in c.split()) for c in caps], dtype=torch.float64))
        return out


def level_regression(log_sigma: Tensor, level: Tensor, covariates: Sequence[Tensor]) -> dict[str, float]:
    """OLS of the standardised log-sigma on level and the covariates (with an intercept): the level coefficient
    in units of the run's log-sigma standard deviation (comparable across runs), its standard error and t.

    A covariate linearly dependent on the intercept, level and the covariates before it is dropped (it adds
    nothing); when level itself is (constant level), or log-sigma is constant, every value is NaN. When the
    covariates explain log-sigma exactly (a cue regressed on itself; residual RMS below 1e-6 standard deviations,
    float32 rounding), se = 0 and t is NaN.
    """
    y = _as64(log_sigma)
    n = y.numel()
    mean = metrics.exact_sum(y) / n if n else math.nan
    sd = math.sqrt(metrics.exact_sum((y - mean).pow(2)) / n) if n else math.nan  # exact sums: same bits everywhere
    nan = {"specificity_level_coef": math.nan, "specificity_level_se": math.nan, "specificity_level_t": math.nan}
    if y.numel() < 3 or not torch.isfinite(y).all() or sd <= 0:
        return nan
    columns = [torch.ones_like(y), _as64(level)]
    if int(torch.linalg.matrix_rank(torch.stack(columns, 1))) < 2:
        return nan
    for cov in covariates:
        trial = torch.stack([*columns, _as64(cov)], 1)
        if int(torch.linalg.matrix_rank(trial)) == trial.shape[1]:
            columns.append(_as64(cov))
    x = torch.stack(columns, 1)
    if x.shape[0] <= x.shape[1]:
        return nan
    z = (y - mean) / sd  # unit variance
    coef, se = metrics.ols(z, x)
    # Residuals at float32 rounding (sigma comes from float32 towers): the covariates explain log-sigma exactly.
    fitted = sum(x[:, k] * coef[k] for k in range(x.shape[1]))
    exact = math.sqrt(metrics.exact_sum((z - fitted).pow(2)) / n) < 1e-6
    return {"specificity_level_coef": coef[1].item(), "specificity_level_se": 0.0 if exact else se[1].item(),
            "specificity_level_t": math.nan if exact else (coef[1] / se[1]).item()}


def _as64(x: Tensor) -> Tensor:
    return torch.as_tensor(x).detach().to(torch.float64).cpu()


def _within_scene(log_sigma: Tensor, data: _SpecificityData) -> dict[str, float]:
    """Pairs of different captions of one scene at different levels, stratified by (object count, word-count
    difference): per stratum the fraction with sigma(more specific) < sigma(less specific), ties half; the mean
    over strata (equal weight), and the same over the strata of equal word count."""
    scene, level, words = data.level_scene, data.level, _n_words(data.level_caps)
    less, more = [], []
    for a in range(len(data.level_caps)):  # rows of one scene are consecutive, L0..L3
        for b in range(a + 1, min(a + 4, len(data.level_caps))):
            if scene[a] == scene[b] and level[a] < level[b] and data.level_caps[a] != data.level_caps[b]:
                less.append(a)
                more.append(b)
    if not less:
        return {}
    less_t, more_t = torch.tensor(less), torch.tensor(more)
    score = ((log_sigma[more_t] < log_sigma[less_t]).double() + 0.5 * (log_sigma[more_t] == log_sigma[less_t]).double())
    objects = data.objects[scene[less_t]] if data.objects is not None else torch.zeros(len(less), dtype=torch.float64)
    diff = words[more_t] - words[less_t]
    strata, inverse = torch.unique(torch.stack([objects, diff], 1), dim=0, return_inverse=True)
    acc = torch.zeros(len(strata), dtype=torch.float64).index_add_(0, inverse, score) / torch.bincount(inverse)
    out = {"specificity_within_scene_acc": acc.mean().item(), "specificity_within_scene_n": float(len(less))}
    same = strata[:, 1] == 0
    if same.any():
        out["specificity_within_scene_same_words_acc"] = acc[same].mean().item()
        out["specificity_within_scene_same_words_n"] = float(same[inverse].sum())
    return out


def _text_sigma_stats(log_sigma_of: Callable[[Sequence[str], Tensor], Tensor],
                      data: _SpecificityData) -> dict[str, float]:
    """Every statistic of a text log-sigma (module docstring), for ``log_sigma_of(captions, scenes)``: the model's
    or a cue's. Rank statistics use average ranks and pair accuracies count ties half (cues are discrete)."""
    out = {}
    if data.level_caps:
        levels, ls = data.level, log_sigma_of(data.level_caps, data.level_scene)
        words = _n_words(data.level_caps)
        out["specificity_spearman"] = metrics.spearman(levels, ls)
        out["specificity_partial_spearman"] = metrics.partial_spearman(levels, ls, words)
        pct = metrics.percentile_ranks(ls)  # every level has one caption per sample: no empty selection
        out.update({f"sigma_text_rank_L{lv}": pct[levels == lv].mean().item() for lv in LEVELS})
        out["sigma_text_ratio_L0_L3"] = (ls[levels == 0].mean() - ls[levels == 3].mean()).exp().item()
        out.update(level_regression(ls, levels, data.covariates()))
        out.update(_within_scene(ls, data))
    if data.pair_less:
        less, more = log_sigma_of(data.pair_less, data.pair_scene), log_sigma_of(data.pair_more, data.pair_scene)
        # pair_probe_accuracy(a, b) counts a > b (ties half): here sigma(less) > sigma(more).
        out["specificity_matched_acc"] = metrics.pair_probe_accuracy(less, more)
        out["specificity_matched_log_ratio"] = (more - less).mean().item()
    if data.fits is not None:
        ls = log_sigma_of(data.own_caps, torch.arange(len(data.own_caps)))
        out["sigma_vs_images_fit_spearman"] = metrics.spearman(data.fits, ls)
        out["sigma_vs_images_fit_partial_spearman"] = metrics.partial_spearman(data.fits, ls, _n_words(data.own_caps))
    return out


def _specificity(model, tokenizer, data: _SpecificityData, with_sigma: bool, batch_size, device) -> dict[str, float]:
    """``unc/<stat>`` for the model's text sigma (``with_sigma``) and ``unc/cue/<c>/<stat>`` for every cue."""
    out = {}
    if with_sigma:
        unique = list(dict.fromkeys(data.strings()))
        if unique:
            _, log_std = encode_captions(model, tokenizer, unique, batch_size=batch_size, device=device)
            table = dict(zip(unique, sigma_of(log_std).double().log().cpu()))
            model_stats = _text_sigma_stats(lambda caps, _: torch.stack([table[c] for c in caps]) if caps
                                            else torch.empty(0, dtype=torch.float64), data)
            out.update({f"unc/{k}": v for k, v in model_stats.items()})
    no_sigma = ("_n",)  # sample sizes do not depend on the sigma: given once, for the model
    for name, cue in data.cues().items():
        out.update({f"unc/cue/{name}/{k}": v for k, v in _text_sigma_stats(cue, data).items()
                    if not k.endswith(no_sigma)})
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


# --- uncertainty against retrieval ----------------------------------------------------------------------------


def _curves(hits: Tensor, rprecision: Tensor, uncertainty: Tensor, n_bins: int) -> dict[str, float]:
    """Per-bin R@1 and R-Precision by uncertainty, their Spearman with the bin index, and AURC (module docstring;
    :func:`probloss.eval.metrics.uncertainty_curves`, shared with the benchmarks)."""
    return metrics.uncertainty_curves(hits, {"r@1": hits, "rprecision": rprecision}, uncertainty, n_bins)


def _training_free(s: Tensor) -> dict[str, Tensor]:
    """The training-free uncertainties ``top1`` and ``margin`` of the rows of ``s`` (:func:`metrics.training_free`)."""
    return metrics.training_free(s)


def _uncertainty_vs_retrieval(scores: Tensor, per_query: dict[str, dict[str, Tensor]], image_log_std, text_log_std,
                              n_bins: int) -> dict[str, float]:
    """``unc/{d}_...`` with the query's sigma (when the model has log-stds) and ``unc/free/{top1,margin}/{d}_...``
    with the training-free confidences, for d = i2t (image queries) and t2i (caption queries)."""
    out = {}
    for d, s, log_std in (("i2t", scores, image_log_std), ("t2i", scores.T, text_log_std)):
        q = per_query[d]
        has = q["n_positive"] > 0
        hits, rprec = (q["rank"][has] <= 1).double(), q["rprecision"][has]
        sources = {f"unc/free/{name}/": u for name, u in _training_free(s[has]).items()}
        if log_std is not None:
            sources["unc/"] = sigma_of(log_std).cpu().double()[has]
        for src, u in sources.items():
            curves = _curves(hits, rprec, u.nan_to_num(nan=math.inf), n_bins)
            out.update({f"{src}{d}_{k}": v for k, v in curves.items()})
    return out


def _uncertainty(image_log_std, text_log_std, metas) -> dict[str, float]:
    img_sigma, txt_sigma = sigma_of(image_log_std).cpu(), sigma_of(text_log_std).cpu()
    out = {"unc/sigma_image_mean": img_sigma.mean().item(), "unc/sigma_text_mean": txt_sigma.mean().item(),
           "unc/sigma_text_image_log_ratio": (txt_sigma.double().log().mean() - img_sigma.double().log().mean()).item(),
           "unc/log_sigma_image_sd": img_sigma.double().log().std().item(),
           "unc/log_sigma_text_sd": txt_sigma.double().log().std().item()}
    n_obj = [(i, len(m["objects"])) for i, m in enumerate(metas) if m.get("objects") is not None]
    if n_obj:
        out["unc/image_sigma_vs_objects"] = metrics.spearman(torch.tensor([n for _, n in n_obj]),
                                                             img_sigma[[i for i, _ in n_obj]])
    return out


# --- planted noise: the positive control of the variance heads (issue 33) ------------------------------------------


def mentions(caption: str, attribute: str) -> bool:
    """Whether a caption names ``attribute`` (a colour or shape word) as a whole word."""
    return attribute in caption.split()


def _planted(attribute: str, captions: Sequence[str], metas: Sequence[dict], scores: Tensor,
             per_query: dict[str, dict[str, Tensor]] | None, groups: Tensor, image_log_std, text_log_std,
             cues: dict[str, Callable[[Sequence[str], Tensor], Tensor]]) -> dict[str, float]:
    """The planted-noise keys (module docstring, "Planted noise"): AUROCs of the text / image uncertainty for the
    captions that mention ``attribute`` / the scenes that hold it, stratified, and R@1 of those queries against
    the others. ``per_query``: the plausible-match ranking per direction (None: no plausible matrix);
    ``groups``: (N,) caption-string ids (exact-string positives)."""
    n = len(captions)
    mention = torch.tensor([mentions(c, attribute) for c in captions], dtype=torch.bool)
    level = torch.tensor([int(m["level"]) if m.get("level") is not None else -1 for m in metas], dtype=torch.long)
    n_words = _n_words(captions).long()
    text_strata = level * 1000 + n_words  # (level, word count)
    with_objects = all(isinstance(m.get("objects"), list) for m in metas) and n > 0
    holds = torch.tensor([with_objects and any(attribute in (o.get("colour"), o.get("shape")) for o in m["objects"])
                          for m in metas], dtype=torch.bool)
    image_strata = torch.tensor([len(m["objects"]) if with_objects else 0 for m in metas], dtype=torch.long)

    out: dict[str, float] = {}

    def put(key: str, u: Tensor, target: Tensor, strata: Tensor, with_n: bool = False) -> None:
        r = metrics.stratified_auroc(u.double().cpu().nan_to_num(nan=math.inf), target, strata)  # NaN: least sure
        out[key], out[f"{key}_se"] = r["auroc"], r["se"]
        if with_n:
            out[key.replace("_auroc", "_n")] = r["n_positive"]

    if text_log_std is not None:
        put("unc/planted_auroc", sigma_of(text_log_std), mention, text_strata, with_n=True)
    if image_log_std is not None and with_objects:
        put("unc/planted_auroc_image", sigma_of(image_log_std), holds, image_strata, with_n=True)
    for s, target, strata, suffix in ((scores.T, mention, text_strata, ""), (scores, holds, image_strata, "_image")):
        if suffix and not with_objects:
            continue
        for name, u in _training_free(s).items():
            put(f"unc/free/{name}/planted_auroc{suffix}", u, target, strata)
    scenes = torch.arange(n)
    for name, cue in cues.items():  # trivial cues as the text "sigma": about 0.5 when no cue marks the attribute
        put(f"unc/cue/{name}/planted_auroc", cue(list(captions), scenes), mention, text_strata)

    # the retrieval cost of the noise: R@1 of the attribute's queries against the others
    exact = metrics.same_group(groups)  # symmetric: serves both directions
    for d, s, target in (("t2i", scores.T, mention), ("i2t", scores, holds)):
        if d == "i2t" and not with_objects:
            continue
        every = torch.ones_like(target)
        hits = {"": (metrics.multi_positive_ranks(s, exact) <= 1, every)}
        if per_query is not None:  # over the queries with a positive, as {d}_r@1_plausible
            q = per_query[d]
            hits["_plausible"] = (q["rank"] <= 1, q["n_positive"] > 0)
        for kind, (hit, counted) in hits.items():
            for tag, rows in (("planted", target & counted), ("unplanted", ~target & counted)):
                if rows.any():
                    out[f"{d}_r@1{kind}_{tag}"] = _mean(hit[rows])
    return out


def _with_prefix(out: dict[str, float], prefix: str) -> dict[str, float]:
    """``{prefix}/`` before every key; embed/ and unc/ keys keep their bare names under "val" (module docstring)."""
    return {k if prefix == "val" and k.startswith(("embed/", "unc/")) else f"{prefix}/{k}": v for k, v in out.items()}


# --- the entry point ------------------------------------------------------------------------------------------


_FROM_EVAL_SET = object()  # evaluate()'s default for train_caption_stats


@torch.no_grad()
def evaluate(model: nn.Module, loss: nn.Module, eval_set: Any, tokenizer: Callable[[list[str]], Tensor], *,
             batch_size: int = 256, device=None, classnames: Sequence[str] | None = None,
             templates: Sequence[str] | None = None, n_sigma_bins: int = 10, prefix: str = "val",
             heldout_classnames: Sequence[str] | None = None, plausible: Tensor | None = None,
             train_caption_stats: Any = _FROM_EVAL_SET,
             placeholder_words: Sequence[str] | None = None,
             planted_attribute: str | None = None) -> dict[str, float]:
    """Every evaluation metric (the module docstring lists the keys).

    Args:
        model: a DualEncoder (``encode_image``, ``encode_text`` -> (emb, log_std or None)); put in eval mode
            for the call and restored after. It should already be on ``device``.
        loss: the run's ContrastiveLoss; its ``score`` ranks every match, its ``embed`` and
            ``invariances_in_use()`` say which geometry it controls.
        eval_set: has ``images`` (N, 3, H, W), ``tokens`` (N, L), ``captions`` and ``json`` (list of dicts,
            optional: without it only retrieval, embedding-space and sigma means are computed).
        tokenizer: list[str] -> LongTensor (B, L), for class prompts, probe captions and caption levels.
        batch_size: encoding batch size.
        device: where the inputs go (default: the model's device).
        classnames: zero-shot class names indexed by json ``label`` (None: no zero-shot).
        templates: prompt templates with one "{}", scores averaged over them (the run's templates; None falls
            back to ``DEFAULT_TEMPLATES``).
        n_sigma_bins: bins of the retrieval-by-uncertainty curves.
        prefix: "val" or "test" (module docstring: where it goes).
        heldout_classnames: classnames held out of training (adds the seen / unseen zero-shot split).
        plausible: ``(N, N)`` bool, image i x caption j: caption j's facts hold for image i; default
            ``probloss.data.shapes.plausible_matrix(captions, json)`` when every json has ``objects``, else no
            plausible-match keys. Exact-string positives always count too.
        train_caption_stats: {caption: (count in training, level)} of the training split; default
            ``eval_set.train_caption_stats`` (None where unknown).
        placeholder_words: words standing for an unnamed attribute (the regression's placeholder count);
            default :func:`default_placeholder_words`.
        planted_attribute: the colour or shape of the run's planted noise (``data.noise_attribute``): adds the
            planted-noise keys; None: none.

    Returns:
        ``{key: float}``.
    """
    if not prefix or "/" in prefix:
        raise ValueError(f"evaluate: prefix must be a plain name such as 'val' or 'test', got {prefix!r}")
    if train_caption_stats is _FROM_EVAL_SET:
        train_caption_stats = getattr(eval_set, "train_caption_stats", None)
    device = _device_of(model, device)
    was_training = model.training
    model.eval()
    try:
        image_emb, image_log_std = encode_images(model, eval_set.images, batch_size=batch_size, device=device)
        text_emb, text_log_std = encode_texts(model, eval_set.tokens, batch_size=batch_size, device=device)
        if not loss.needs_log_std:
            image_log_std = text_log_std = None  # scores and loss ignore them; no unc/ keys of the model's sigma
        # Shards without {key}.json give None (or no json list at all): treat as empty metadata.
        metas = [m if isinstance(m, dict) else {} for m in (getattr(eval_set, "json", None) or [None] * len(image_emb))]
        ids: dict[str, int] = {}
        groups = torch.tensor([ids.setdefault(c, len(ids)) for c in eval_set.captions])  # same id = same caption
        levels = torch.tensor([int(m["level"]) if m.get("level") is not None else -1 for m in metas])

        scores = score_matrix(loss, image_emb, text_emb, image_log_std, text_log_std, block=max(batch_size, 1024))
        scores = scores.float().cpu()  # (N, N)
        out = _retrieval(scores, groups, levels)
        if plausible is None:
            plausible = _plausible_positives(eval_set.captions, metas)
        positive = metrics.same_group(groups)
        if plausible is not None:
            if tuple(plausible.shape) != tuple(scores.shape):
                raise ValueError(f"evaluate: plausible {tuple(plausible.shape)} must be (N_img, N_txt) = "
                                 f"{tuple(scores.shape)}")
            positive = positive | torch.as_tensor(plausible, dtype=torch.bool).cpu()
            plausible_out, per_query = _plausible_retrieval(scores, positive)
            out.update(plausible_out)
        else:  # the uncertainty curves fall back on the exact-string positives (module docstring)
            per_query = {d: metrics.plausible_ranking(s, p) for d, s, p in (("i2t", scores, positive),
                                                                             ("t2i", scores.T, positive.T))}
        if classnames is not None:
            out.update(_zeroshot(model, loss, tokenizer, image_emb, image_log_std, [m.get("label") for m in metas],
                                 list(classnames), templates, heldout_classnames, batch_size, device))
        out.update(_probes(model, loss, tokenizer, image_emb, image_log_std, metas, batch_size, device))
        out.update(_embedding_space(loss, image_emb, text_emb))
        with_sigma = image_log_std is not None and text_log_std is not None
        if with_sigma:
            out.update(_uncertainty(image_log_std, text_log_std, metas))
        data = _SpecificityData(metas, eval_set.captions, train_caption_stats,
                                default_placeholder_words() if placeholder_words is None else placeholder_words)
        out.update(_specificity(model, tokenizer, data, with_sigma, batch_size, device))
        out.update(_uncertainty_vs_retrieval(scores, per_query, image_log_std, text_log_std, n_sigma_bins))
        if planted_attribute is not None:
            out.update(_planted(planted_attribute, eval_set.captions, metas, scores,
                                per_query if plausible is not None else None, groups, image_log_std, text_log_std,
                                data.cues()))
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
