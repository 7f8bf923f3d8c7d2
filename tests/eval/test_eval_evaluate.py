"""evaluate() end to end with a tiny fake dual encoder whose answers are known.

The fake tokenizer gives each distinct string an id (tokens = [id, n_words, n_shape_words]); the fake text tower
looks the id up in a fixed random table. Image i carries the id of its own caption in pixel (0, 0, 0) and its
number of objects in pixel (0, 1, 0), so image i embeds exactly like its caption: retrieval (multi-positive) and the
probes are perfect, and the one-object scenes' L2/L3 captions are the zero-shot prompts, so zero-shot is perfect
too. log-stds: text -0.1 * n_words (longer = smaller sigma; ``specific=True`` also -0.5 per shape word, a
specificity effect beyond length), image 0.1 * n_objects + mean |channel 1|. A tokenizer that ``ignore``s words
makes a model blind to them.
"""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import probloss
from probloss.eval import dual_encoder as evaluate_module, evaluate, fill_template, image_sigma_vs_noise, metrics
from probloss.eval.dual_encoder import _images_fit

CLASSNAMES = ["red circle", "blue square", "orange cross", "green triangle", "white diamond", "cyan circle"]
SHAPE_WORDS = {"circle", "square", "cross", "triangle", "diamond"}
COLOUR_WORDS = {"red", "blue", "orange", "green", "white", "cyan", "magenta"}
D = 16


class FakeTokenizer:
    def __init__(self, ignore=()):
        self.ids: dict[str, int] = {}
        self.ignore = set(ignore)

    def __call__(self, captions):
        rows = []
        for c in captions:
            key = " ".join(w for w in c.split() if w not in self.ignore)
            rows.append([self.ids.setdefault(key, len(self.ids) + 1), len(c.split()),
                         sum(w in SHAPE_WORDS for w in c.split())])
        return torch.tensor(rows, dtype=torch.long)


class FakeDualEncoder(nn.Module):
    """Embeddings from a table by caption id; log-stds (when asked for) around ``log_std_offset`` -- pass the
    loss's ``init_log_std``: where PCME++ and ProLIP start sigma is tiny, so their variance term (sigma^2 summed
    over dimensions, added to every distance) does not outrank the exact mean matches of this model."""

    def __init__(self, log_std: bool, specific: bool = False, log_std_offset: float = 0.0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(512, D, generator=torch.Generator().manual_seed(0)))
        self.log_std, self.specific, self.log_std_offset = log_std, specific, log_std_offset

    def encode_image(self, images):
        ids = images[:, 0, 0, 0].round().long()
        n_obj = images[:, 0, 1, 0]
        ls = 0.1 * n_obj + images[:, 1].abs().mean((1, 2)) + self.log_std_offset if self.log_std else None
        return self.table[ids], ls

    def encode_text(self, tokens):
        ls = -0.1 * tokens[:, 1].float() - (0.5 * tokens[:, 2].float() if self.specific else 0.0) + self.log_std_offset
        return self.table[tokens[:, 0]], (ls if self.log_std else None)

    def forward(self, images, tokens):
        return (*self.encode_image(images), *self.encode_text(tokens))


class FakeLoss(nn.Module):
    """Negative squared distance on raw (``raw=True``) or L2-normalised embeddings; no log-std."""

    needs_log_std = False

    def __init__(self, raw: bool):
        super().__init__()
        self.raw = raw

    @property
    def scores_raw_embeddings(self):
        return self.raw

    def score(self, x, y, x_log_std=None, y_log_std=None):
        if not self.raw:
            x, y = nn.functional.normalize(x, dim=-1), nn.functional.normalize(y, dim=-1)
        return -torch.cdist(x, y).pow(2)


@dataclass
class FakeEvalSet:
    images: torch.Tensor
    tokens: torch.Tensor
    captions: list
    json: list


def make_eval_set(tokenizer, n=18, level=lambda i: 3):
    """Scene i has 1 + i % 3 objects; its own caption is of level ``level(i)``."""
    metas = []
    for i in range(n):
        n_obj = 1 + i % 3
        if n_obj == 1:
            cls = (i // 3) % len(CLASSNAMES)
            name = CLASSNAMES[cls]
            colour, shape = name.split()
            caps = ["an object", fill_template("a {} object", colour), fill_template("a {}", name),
                    fill_template("a {}", name)]
            metas.append(dict(captions=caps, objects=[{}], relation=None, label=cls,
                              negatives={"relation": None, "binding": None,
                                         "control": fill_template("a {}", f"magenta {shape}")}))
        else:
            more = " and a small green triangle" if n_obj == 3 else ""
            caps = [f"{'two' if n_obj == 2 else 'three'} objects", "a red object and a blue object",
                    "a red circle and a blue square", f"a small red circle left of a large blue square{more} {i}"]
            negs = [f"a large blue square left of a small red circle{more} {i}",
                    f"a small blue circle left of a large red square{more} {i}"]
            # both documented formats of json["negatives"] (the list form has no control)
            negatives = ({"relation": negs[0], "binding": negs[1], "control": caps[3].replace("red", "magenta", 1)}
                         if i % 2 else negs)
            metas.append(dict(captions=caps, objects=[{}] * n_obj, relation={"subject": 0, "object": 1},
                              negatives=negatives, label=None))
        metas[-1].update(level=level(i), matched_pair=[caps[1], caps[2]])  # L1 colour form vs L2: equal lengths
    captions = [m["captions"][m["level"]] for m in metas]
    tokens = tokenizer(captions)
    images = torch.zeros(n, 3, 4, 4)
    images[:, 0, 0, 0] = tokens[:, 0].float()
    images[:, 0, 1, 0] = torch.tensor([len(m["objects"]) for m in metas], dtype=torch.float)
    return FakeEvalSet(images, tokens, captions, metas)


RETRIEVAL = {f"val/{d}_r@{k}{s}" for d in ("i2t", "t2i") for k in (1, 5, 10) for s in ("", "_strict")}
GEOMETRY = {f"{n}{m}" for n in ("effective_rank", "uniformity", "participation_ratio", "participation_ratio_frac")
            for m in ("", "_image", "_text")} | {"alignment", "modality_gap"}
BASE_KEYS = RETRIEVAL | {"val/r@1_chance", "val/i2t_r@1_L3", "val/t2i_r@1_L3", "val/r@1_chance_L3",
                         "val/zeroshot_top1", "val/zeroshot_top5", "val/zeroshot_n_labelled",
                         "val/relation_probe_acc", "val/binding_probe_acc", "val/control_probe_acc",
                         "val/relation_probe_n", "val/binding_probe_n", "val/control_probe_n"} | {
    f"embed/{k}" for k in GEOMETRY} | {f"embed/scored/{k}" for k in GEOMETRY | {"alignment_ratio"}}
CURVES = {f"{d}_{k}" for d in ("i2t", "t2i") for k in [
    *(f"bin_{b}_{m}" for b in range(10) for m in ("r@1", "rprecision")), "bin_r@1_spearman",
    "bin_rprecision_spearman", "aurc", "aurc_oracle", "aurc_random"]}
FREE_KEYS = {f"unc/free/{src}/{c}" for src in ("top1", "margin") for c in CURVES}
SIGMA_STATS = {"specificity_spearman", "specificity_partial_spearman", "specificity_matched_acc",
               "specificity_matched_log_ratio", "sigma_text_ratio_L0_L3", "sigma_vs_images_fit_spearman",
               "sigma_vs_images_fit_partial_spearman", "specificity_level_coef", "specificity_level_se",
               "specificity_level_t", "specificity_within_scene_acc", "specificity_within_scene_same_words_acc"} | {
    f"sigma_text_rank_L{lv}" for lv in range(4)}
CUE_KEYS = {f"unc/cue/{c}/{k}" for c in ("words", "objects", "token") for k in SIGMA_STATS}  # no training stats
UNC_KEYS = {f"unc/{k}" for k in SIGMA_STATS | CURVES} | {
    "unc/image_sigma_vs_objects", "unc/sigma_image_mean", "unc/sigma_text_mean", "unc/sigma_text_image_log_ratio",
    "unc/log_sigma_image_sd", "unc/log_sigma_text_sd",
    "unc/specificity_within_scene_n", "unc/specificity_within_scene_same_words_n"}
UNIT_INTERVAL = ("val/i2t", "val/t2i", "val/r@1", "val/zeroshot_top", "val/zeroshot_seen", "val/zeroshot_unseen",
                 "val/relation_probe_acc", "val/binding_probe_acc", "val/control_probe_acc", "unc/sigma_text_rank",
                 "unc/specificity_matched_acc", "unc/cue/words/specificity_matched_acc")


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_evaluate_keys_and_known_answers(loss_name):
    loss = probloss.build_loss(loss_name)
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=18)  # 6 one-object scenes, one per class: no duplicate captions
    model = FakeDualEncoder(log_std=loss.needs_log_std, log_std_offset=loss.init_log_std)
    model.train()
    out = evaluate(model, loss, eval_set, tok, batch_size=7, classnames=CLASSNAMES)
    assert model.training  # mode restored
    expected = BASE_KEYS | FREE_KEYS | CUE_KEYS | (UNC_KEYS if loss.needs_log_std else set())
    assert expected == set(out), (expected - set(out), set(out) - expected)
    assert "unc/sigma_text_mean_L0" not in out  # replaced by the within-model ranks
    if not loss.needs_log_std:
        assert not any(k.startswith("unc/") and not k.startswith(("unc/free/", "unc/cue/")) for k in out)
    for key, value in out.items():
        assert isinstance(value, float), key
        if key.startswith(UNIT_INTERVAL) or "_bin_" in key and "spearman" not in key or "aurc" in key:
            assert 0.0 <= value <= 1.0, key
    # Known answers of the fake model (no duplicate captions: strict = multi-positive = 1).
    for key in BASE_KEYS:
        if key.startswith(("val/i2t", "val/t2i", "val/zeroshot_top")) or key.endswith("_probe_acc"):
            assert out[key] == 1.0, key
    assert out["val/r@1_chance"] == pytest.approx(1 / 18)
    assert out["val/zeroshot_n_labelled"] == 6.0
    # (half the multi-object scenes have list-form negatives: no control)
    assert out["val/relation_probe_n"] == out["val/binding_probe_n"] == 12.0 == out["val/control_probe_n"]
    for view in ("embed", "embed/scored"):
        assert out[f"{view}/alignment"] == pytest.approx(0.0, abs=1e-9)
        assert out[f"{view}/modality_gap"] == pytest.approx(0.0, abs=1e-9)
    assert out["embed/scored/alignment_ratio"] == pytest.approx(0.0, abs=1e-9)
    for src in ("unc/free/top1/", "unc/free/margin/") + (("unc/",) if loss.needs_log_std else ()):
        for d in ("i2t", "t2i"):  # every query a hit (no plausible matrix: exact-string positives)
            assert all(out[f"{src}{d}_bin_{b}_r@1"] == 1.0 == out[f"{src}{d}_bin_{b}_rprecision"] for b in range(10))
            assert out[f"{src}{d}_aurc"] == out[f"{src}{d}_aurc_oracle"] == out[f"{src}{d}_aurc_random"] == 0.0
    assert 1.0 <= out["embed/effective_rank"] <= D
    assert -4.0 <= out["embed/uniformity"] <= 0.0
    assert 1.0 <= out["embed/participation_ratio"] <= D
    assert 1 / D <= out["embed/participation_ratio_frac"] <= 1.0
    if loss.needs_log_std:
        assert out["unc/specificity_spearman"] < -0.5  # longer captions -> smaller sigma
        assert out["unc/sigma_text_rank_L0"] > out["unc/sigma_text_rank_L3"]
        assert out["unc/sigma_text_ratio_L0_L3"] > 1.0
        assert out["unc/image_sigma_vs_objects"] == pytest.approx(1.0)



@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_oracle_with_duplicate_captions_has_multi_positive_recall_one(loss_name):
    loss = probloss.build_loss(loss_name)
    tok = FakeTokenizer()
    n = 24
    eval_set = make_eval_set(tok, n=n, level=lambda i: i % 4)  # L0..L2 captions repeat ("two objects", ...)
    assert len(set(eval_set.captions)) < n - 6
    out = evaluate(FakeDualEncoder(log_std=loss.needs_log_std, log_std_offset=loss.init_log_std), loss, eval_set, tok,
                   batch_size=5)
    for d in ("i2t", "t2i"):
        assert out[f"val/{d}_r@1"] == 1.0, d
        assert out[f"val/{d}_r@1_strict"] < 1.0, d  # ties with identical captions count against the strict number
        for lv in range(4):
            assert out[f"val/{d}_r@1_L{lv}"] == 1.0, (d, lv)
    assert out["val/r@1_chance"] > 1 / n
    assert out["val/r@1_chance_L0"] > out["val/r@1_chance_L3"] == pytest.approx(1 / n)
    if loss.needs_log_std:
        assert all(out[f"unc/{d}_bin_{b}_r@1"] == 1.0 for d in ("i2t", "t2i") for b in range(10))


def test_per_level_recall_counts_only_that_levels_queries():
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=16, level=lambda i: i % 4)
    l3 = [i for i, m in enumerate(eval_set.json) if m["level"] == 3]
    # Level-3 images embed as the next level-3 caption (a cycle): every level-3 query, image or text, finds a
    # wrong partner scoring like a perfect match.
    eval_set.images[l3, 0, 0, 0] = eval_set.images[l3[1:] + l3[:1], 0, 0, 0]
    out = evaluate(FakeDualEncoder(False), FakeLoss(raw=False), eval_set, tok)
    assert out["val/i2t_r@1_L3"] == 0.0 and out["val/t2i_r@1_L3"] == 0.0
    assert all(out[f"val/{d}_r@1_L{lv}"] == 1.0 for d in ("i2t", "t2i") for lv in range(3))
    assert out["val/i2t_r@1"] == pytest.approx(1 - len(l3) / 16)


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_control_probe_sees_the_replaced_attribute_or_is_at_chance(loss_name):
    loss = probloss.build_loss(loss_name)
    tok = FakeTokenizer()
    out = evaluate(FakeDualEncoder(loss.needs_log_std), loss, make_eval_set(tok, n=12), tok)
    assert out["val/control_probe_acc"] == 1.0
    blind = FakeTokenizer(ignore=COLOUR_WORDS | {"a", "an"})  # the text tower cannot read colours
    out = evaluate(FakeDualEncoder(loss.needs_log_std), loss, make_eval_set(blind, n=12), blind)
    assert out["val/control_probe_acc"] == 0.5  # every pair ties: half credit each


def _same(a, b, abs=1e-9):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=abs)


def test_specificity_beyond_caption_length_and_the_cues():
    loss = probloss.build_loss("gaussian_var")
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=18)
    # Sigma a function of length only (log sigma = -0.1 n_words): every rank statistic is exactly the word-count
    # cue's, and nothing is left once length is controlled.
    out = evaluate(FakeDualEncoder(True), loss, eval_set, tok)
    for stat in SIGMA_STATS - {"specificity_matched_log_ratio", "sigma_text_ratio_L0_L3"}:
        assert _same(out[f"unc/{stat}"], out[f"unc/cue/words/{stat}"], abs=1e-6), stat
    assert out["unc/specificity_matched_acc"] == 0.5 == out["unc/cue/words/specificity_matched_acc"]
    assert out["unc/specificity_matched_log_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert out["unc/specificity_partial_spearman"] == 0.0 == out["unc/cue/words/specificity_partial_spearman"]
    assert out["unc/specificity_within_scene_same_words_acc"] == 0.5  # equal lengths: ties
    assert out["unc/specificity_level_coef"] == pytest.approx(0.0, abs=1e-6)  # word count explains it all
    assert math.isnan(out["unc/specificity_level_t"]) and out["unc/specificity_level_se"] == 0.0
    # The object-count cue ties within every scene; the word-count cue wins every within-scene pair of unequal
    # length (strata with a word-count difference) and ties the rest.
    assert out["unc/cue/objects/specificity_within_scene_acc"] == 0.5
    assert out["unc/cue/objects/specificity_matched_acc"] == 0.5
    # Sigma also shrinks with each shape word (the L2 form names shapes, the matched L1 form does not).
    out = evaluate(FakeDualEncoder(True, specific=True), loss, eval_set, tok, placeholder_words=("object", "objects"))
    assert out["unc/specificity_matched_acc"] == 1.0
    # one-object pairs (6): one shape word, log ratio -0.5; multi-object pairs (12): two shape words, -1.0
    assert out["unc/specificity_matched_log_ratio"] == pytest.approx((6 * -0.5 + 12 * -1.0) / 18, abs=1e-5)
    assert out["unc/specificity_partial_spearman"] < -0.3
    assert out["unc/specificity_within_scene_same_words_acc"] == 1.0
    # Here "object" marks exactly the captions without shape words, so the placeholder count absorbs the effect;
    # without that covariate it shows as a level effect.
    assert abs(out["unc/specificity_level_t"]) < 1
    bare = evaluate(FakeDualEncoder(True, specific=True), loss, eval_set, tok, placeholder_words=())
    assert bare["unc/specificity_level_coef"] < 0 and bare["unc/specificity_level_t"] < -2
    assert out["unc/cue/words/specificity_matched_acc"] == 0.5
    assert out["unc/sigma_text_ratio_L0_L3"] > 1.0
    # The training frequency of the exact string, when known: frequent (general) captions as the larger sigma.
    stats = {m["captions"][lv]: (10 ** (3 - lv), lv) for m in eval_set.json for lv in range(4)}
    out = evaluate(FakeDualEncoder(True), loss, eval_set, tok, train_caption_stats=stats)
    assert out["unc/cue/frequency/specificity_matched_acc"] == 1.0
    assert out["unc/cue/frequency/specificity_spearman"] < -0.9  # (one-object L2 = L3 strings tie)
    assert out["unc/cue/frequency/specificity_within_scene_acc"] == 1.0
    assert "unc/cue/frequency/specificity_spearman" not in evaluate(FakeDualEncoder(True), loss, eval_set, tok)


def test_matched_pair_as_a_list_of_pairs():
    loss = probloss.build_loss("gaussian_var")
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=12)
    one = evaluate(FakeDualEncoder(True, specific=True), loss, eval_set, tok)
    for m in eval_set.json:
        m["matched_pair"] = [m["matched_pair"], [m["captions"][0], m["captions"][2]]]  # a second, longer pair
    two = evaluate(FakeDualEncoder(True, specific=True), loss, eval_set, tok)
    assert one["unc/specificity_matched_acc"] == 1.0 == two["unc/specificity_matched_acc"]
    assert two["unc/specificity_matched_log_ratio"] < one["unc/specificity_matched_log_ratio"]  # + length effect


def test_level_token_is_the_best_single_token_signed_towards_less_specific():
    # "object" (L0, L1) and "circle" (L2, L3) predict level equally well (|r| = 0.894): alphabetical tie-break.
    stats = {"an object": (10, 0), "a red object": (10, 1), "a red circle": (10, 2), "a small red circle": (10, 3)}
    assert evaluate_module.level_token(stats) == ("circle", -1)  # present = more specific: log-sigma -1
    # Against a brute-force weighted correlation over every token.
    stats = {"object": (30, 0), "red object": (10, 1), "red circle": (4, 2), "blue circle": (6, 2),
             "small blue circle top": (2, 3), "red": (5, 1)}
    w = np.array([c for c, _ in stats.values()], dtype=float)
    lv = np.array([v for _, v in stats.values()], dtype=float)

    def corr(token):  # weighted Pearson correlation of the token's indicator with level
        ind = np.array([token in c.split() for c in stats], dtype=float)
        cov = np.cov(ind, lv, aweights=w)
        return cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]) if cov[0, 0] > 0 else 0.0

    best = max(sorted({t for c in stats for t in c.split()}), key=lambda t: round(abs(corr(t)), 9))
    assert evaluate_module.level_token(stats) == (best, 1 if corr(best) < 0 else -1)
    assert evaluate_module.level_token({"a": (3, 1)}) is None


def test_level_regression_matches_numpy_lstsq():
    gen = torch.Generator().manual_seed(0)
    n = 200
    level = torch.randint(0, 4, (n,), generator=gen).double()
    words = 2 + level + torch.randint(0, 3, (n,), generator=gen).double()
    objects = torch.randint(1, 4, (n,), generator=gen).double()
    y = -0.7 * level + 0.3 * words + 0.2 * objects + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    out = evaluate_module.level_regression(y, level, [words, objects, 2 * words])  # 2 * words: collinear, dropped
    x = np.stack([np.ones(n), level.numpy(), words.numpy(), objects.numpy()], 1)
    z = ((y - y.mean()) / y.std(unbiased=False)).numpy()
    coef, rss, *_ = np.linalg.lstsq(x, z, rcond=None)
    se = np.sqrt(rss[0] / (n - 4) * np.linalg.inv(x.T @ x)[1, 1])
    assert out["specificity_level_coef"] == pytest.approx(coef[1], rel=1e-10)
    assert out["specificity_level_se"] == pytest.approx(se, rel=1e-10)
    assert out["specificity_level_t"] == pytest.approx(coef[1] / se, rel=1e-10)
    # Known answer: y exactly linear in level alone -> coefficient 1 / sd(level) in sd units, se 0
    exact = evaluate_module.level_regression(3 * level, level, [objects])
    assert exact["specificity_level_coef"] == pytest.approx(1 / level.std(unbiased=False).item())
    assert exact["specificity_level_se"] == 0.0 and math.isnan(exact["specificity_level_t"])
    assert math.isnan(evaluate_module.level_regression(y, torch.ones(n), [words])["specificity_level_coef"])


def test_zeroshot_seen_and_unseen_classes():
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=18)
    heldout = CLASSNAMES[:2]
    unseen = [i for i, m in enumerate(eval_set.json) if m["label"] in (0, 1)]
    assert len(unseen) == 2
    eval_set.images[unseen, 0, 0, 0] = float(tok.ids["an orange cross"])  # held-out images look like class 2
    out = evaluate(FakeDualEncoder(False), FakeLoss(raw=False), eval_set, tok, classnames=CLASSNAMES,
                   templates=("a {}", "{}"), heldout_classnames=heldout)
    assert out["val/zeroshot_seen_top1"] == 1.0 and out["val/zeroshot_unseen_top1"] == 0.0
    assert out["val/zeroshot_top1"] == pytest.approx(4 / 6)
    assert out["val/zeroshot_n_labelled"] == 6.0 and out["val/zeroshot_n_unseen"] == 2.0
    without = evaluate(FakeDualEncoder(False), FakeLoss(raw=False), eval_set, tok, classnames=CLASSNAMES)
    assert "val/zeroshot_seen_top1" not in without and "val/zeroshot_n_unseen" not in without
    with pytest.raises(ValueError, match="purple circle"):
        evaluate(FakeDualEncoder(False), FakeLoss(raw=False), eval_set, tok, classnames=CLASSNAMES,
                 heldout_classnames=["purple circle"])


def test_geometry_views_known_answers():
    """embed/scored/* on the loss's own representation (centred and RMS-scaled as its invariances allow);
    embed/* on the common view (that, jointly centred, then on the unit sphere)."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=gen) + 2.0, torch.randn(40, 6, generator=gen) - 1.0
    for loss, view in ((probloss.build_loss("gaussian_var"), "centred_rms"), (probloss.build_loss("infonce"), "unit"),
                       (probloss.build_loss("gaussian_var", freeze_log_std=True), "centred"),
                       (FakeLoss(raw=True), "raw")):
        out = evaluate_module._embedding_space(loss, x, y)
        sx, sy = x.double(), y.double()
        if view == "unit":
            sx, sy = nn.functional.normalize(sx, dim=-1), nn.functional.normalize(sy, dim=-1)
        if view.startswith("centred"):
            mean = torch.cat([sx, sy]).mean(0)
            sx, sy = sx - mean, sy - mean
        if view == "centred_rms":
            rms = torch.cat([sx, sy]).pow(2).sum(-1).mean().sqrt()
            sx, sy = sx / rms, sy / rms
        assert out["embed/scored/modality_gap"] == pytest.approx((sx.mean(0) - sy.mean(0)).norm().item()), view
        assert out["embed/scored/alignment"] == pytest.approx((sx - sy).pow(2).sum(-1).mean().item()), view
        pairs = torch.cdist(sx, sy).pow(2)
        assert out["embed/scored/alignment_ratio"] == pytest.approx((pairs.diagonal().mean() / pairs.mean()).item())
        assert out["embed/scored/effective_rank_image"] == pytest.approx(metrics.effective_rank(sx)), view
        sq = torch.pdist(sx).pow(2)
        assert out["embed/scored/uniformity_image"] == pytest.approx(
            (torch.logsumexp(-2 * sq, 0) - math.log(sq.numel())).item()), view
        mean = torch.cat([sx, sy]).mean(0)
        cx, cy = nn.functional.normalize(sx - mean, dim=-1), nn.functional.normalize(sy - mean, dim=-1)
        assert out["embed/modality_gap"] == pytest.approx((cx.mean(0) - cy.mean(0)).norm().item()), view
        assert out["embed/alignment"] == pytest.approx((cx - cy).pow(2).sum(-1).mean().item()), view
        assert out["embed/effective_rank_text"] == pytest.approx(metrics.effective_rank(cy)), view
        assert out["embed/uniformity_text"] == pytest.approx(metrics.uniformity(cy)), view


def test_prefix_test_moves_every_key_and_keeps_values():
    loss = probloss.build_loss("gaussian_var")
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=12, level=lambda i: i % 4)
    val = evaluate(FakeDualEncoder(True), loss, eval_set, tok, classnames=CLASSNAMES)
    test = evaluate(FakeDualEncoder(True), loss, eval_set, tok, classnames=CLASSNAMES, prefix="test")
    assert any(k.startswith("embed/") for k in val) and any(k.startswith("unc/") for k in val)
    assert all(k.startswith(("val/", "embed/", "unc/")) for k in val)
    moved = {("test/" + k[len("val/"):] if k.startswith("val/") else "test/" + k): v for k, v in val.items()}
    assert set(moved) == set(test) and not set(test) & set(val)
    # (LAPACK least squares is not bitwise reproducible across calls: 1e-12 relative)
    assert not [(k, moved[k], test[k]) for k in test if not _same(moved[k], test[k], abs=1e-12)]
    with pytest.raises(ValueError, match="prefix"):
        evaluate(FakeDualEncoder(True), loss, eval_set, tok, prefix="val/")


def test_evaluate_without_classnames_or_json():
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=6)
    out = evaluate(FakeDualEncoder(False), probloss.build_loss("infonce"), eval_set, tok)
    assert "val/zeroshot_top1" not in out and "val/relation_probe_acc" in out and "val/i2t_r@1_L3" in out
    for m in eval_set.json[:3]:
        del m["level"]  # foreign shards: levels of some samples unknown
    out = evaluate(FakeDualEncoder(False), probloss.build_loss("infonce"), eval_set, tok)
    assert out["val/r@1_chance_L3"] == pytest.approx(1 / 6)  # only the three samples that have a level
    eval_set.json = None
    out = evaluate(FakeDualEncoder(False), probloss.build_loss("infonce"), eval_set, tok)
    assert out["val/i2t_r@1"] == 1.0 and "val/relation_probe_acc" not in out
    assert not any("_L" in k for k in out)


def test_fill_template_article():
    assert fill_template("a {}", "orange cross") == "an orange cross"
    assert fill_template("a photo of a {}.", "red circle") == "a photo of a red circle."
    assert fill_template("{}", "orange cross") == "orange cross"


def test_image_sigma_vs_noise():
    tok = FakeTokenizer()
    clean = make_eval_set(tok, n=6).images
    noisy = clean.clone()
    noisy[:, 1] += torch.randn(noisy[:, 1].shape, generator=torch.Generator().manual_seed(0))
    out = image_sigma_vs_noise(FakeDualEncoder(True), clean, noisy, batch_size=4)
    assert out["unc/image_sigma_noise_ratio"] > 1.0 and out["unc/image_sigma_noise_frac_up"] == 1.0
    with pytest.raises(ValueError, match="log-std"):
        image_sigma_vs_noise(FakeDualEncoder(False), clean, noisy)


def test_images_fit_counts_the_images_whose_levels_contain_the_caption():
    metas = [{"captions": ["a red circle", "a big red circle"]}, {"captions": ["a red circle", "a red circle left"]},
             {"captions": ["a blue square"]}, {}]
    fits = _images_fit(metas, ["a red circle", "a big red circle", "a blue square", "a green star"])
    assert fits.tolist() == [2.0, 1.0, 1.0, 0.0]
    assert _images_fit([{}, {"captions": []}], ["x", "y"]) is None


def test_sigma_against_how_many_images_a_caption_fits():
    """The fake model's text sigma is exp(-0.1 n_words): the Spearman with the fit count is exactly that of
    -n_words, and controlling for length leaves nothing."""
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=24, level=lambda i: i % 4)
    out = evaluate(FakeDualEncoder(True), probloss.build_loss("gaussian_var"), eval_set, tok)
    fits = _images_fit(eval_set.json, eval_set.captions)
    words = torch.tensor([len(c.split()) for c in eval_set.captions], dtype=torch.float64)
    assert fits.min() >= 1 and fits.max() > 1  # every caption fits its own image; some fit several
    assert out["unc/sigma_vs_images_fit_spearman"] == pytest.approx(metrics.spearman(fits, -words))
    assert out["unc/sigma_vs_images_fit_partial_spearman"] == pytest.approx(0.0, abs=1e-9)


class IndexEncoder(nn.Module):
    """Image i embeds as ``image_table[i]``, caption j as ``text_table[j]`` (pixel (0, 0, 0) and token 0 carry
    the index); no log-std."""

    def __init__(self, image_table, text_table):
        super().__init__()
        self.image_table, self.text_table = image_table, text_table

    def encode_image(self, images):
        return self.image_table[images[:, 0, 0, 0].round().long()], None

    def encode_text(self, tokens):
        return self.text_table[tokens[:, 0]], None


class DotLoss(nn.Module):
    needs_log_std = False

    def score(self, x, y, x_log_std=None, y_log_std=None):
        return x @ y.T


PLAUSIBLE_KEYS = {f"val/{d}_{k}" for d in ("i2t", "t2i") for k in ("r@1_plausible", "r@5_plausible", "rprecision",
                                                                    "map@r")}


def _index_eval_set(n, captions=None):
    images = torch.zeros(n, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(n).float()
    captions = captions or [f"caption {j}" for j in range(n)]
    return FakeEvalSet(images, torch.arange(n)[:, None], captions, None)


def test_plausible_oracle_scores_one_and_exact_strings_do_not():
    """A scorer that ranks every true caption above every false one: 1.0 on every plausible-match key, while the
    exact-string R@1 (secondary) stays below 1 because other true captions outrank the image's own."""
    n = 30
    gen = torch.Generator().manual_seed(2)
    plausible = torch.rand(n, n, generator=gen) < 0.25
    plausible |= torch.eye(n, dtype=torch.bool)
    # image i = one-hot e_i, caption j = column j of the plausible matrix (+ a tiny tie-breaker within the trues)
    text = plausible.float().T + 0.01 * torch.rand(n, n, generator=gen) * plausible.float().T
    model = IndexEncoder(torch.eye(n), text)
    out = evaluate(model, DotLoss(), _index_eval_set(n), FakeTokenizer(), plausible=plausible)
    assert PLAUSIBLE_KEYS <= set(out)
    assert all(out[k] == 1.0 for k in PLAUSIBLE_KEYS), {k: out[k] for k in PLAUSIBLE_KEYS}
    assert out["val/i2t_r@1"] < 1.0  # exact strings: every caption distinct, the own one not always first
    # The same scorer against random positives: well below 1 on R-Precision and mAP@R.
    other = torch.rand(n, n, generator=gen) < 0.25
    out = evaluate(model, DotLoss(), _index_eval_set(n), FakeTokenizer(), plausible=other)
    assert out["val/i2t_rprecision"] < 0.6 and out["val/i2t_map@r"] < 0.6
    with pytest.raises(ValueError, match="plausible"):
        evaluate(model, DotLoss(), _index_eval_set(n), FakeTokenizer(), plausible=plausible[:5])


def test_plausible_matrix_comes_from_the_data_module_when_scenes_are_known(monkeypatch):
    from probloss.data import shapes

    n, calls = 6, []

    def fake_plausible_matrix(captions, metas):
        calls.append((list(captions), len(metas)))
        return torch.ones(len(metas), len(captions), dtype=torch.bool)  # every caption true of every image

    monkeypatch.setattr(shapes, "plausible_matrix", fake_plausible_matrix, raising=False)
    eval_set = _index_eval_set(n)
    model = IndexEncoder(torch.randn(n, 4, generator=torch.Generator().manual_seed(0)), torch.randn(n, 4))
    out = evaluate(model, DotLoss(), eval_set, FakeTokenizer())
    assert not calls and "val/i2t_rprecision" not in out  # no json: no scenes
    eval_set.json = [{"objects": [{"shape": "circle", "colour": "red"}]} for _ in range(n)]
    out = evaluate(model, DotLoss(), eval_set, FakeTokenizer())
    assert calls == [(eval_set.captions, n)]
    assert out["val/i2t_rprecision"] == 1.0 == out["val/t2i_map@r"]  # everything is a positive
    eval_set.json[0] = {"objects": [{}]}  # a scene without its attributes: no plausible matrix
    assert "val/i2t_rprecision" not in evaluate(model, DotLoss(), eval_set, FakeTokenizer())


def test_uncertainty_curves_flag_failures_and_read_against_oracle_and_random():
    """Queries 0..9 hit, 10..19 miss; a sigma that ranks the misses last is the oracle; its reverse is worst."""
    n = 20
    scores = torch.eye(n)
    scores[10:] = torch.eye(n)[10:].flip(1)  # the last ten queries rank a wrong caption first
    q = {d: metrics.plausible_ranking(s, torch.eye(n, dtype=torch.bool)) for d, s in (("i2t", scores),
                                                                                       ("t2i", scores.T))}
    good = torch.arange(n, dtype=torch.float).log1p()  # log-std rising with the index: misses most uncertain
    out = evaluate_module._uncertainty_vs_retrieval(scores, q, good, good, n_bins=10)
    assert [out[f"unc/i2t_bin_{b}_r@1"] for b in range(10)] == [1.0] * 5 + [0.0] * 5
    assert out["unc/i2t_bin_r@1_spearman"] < -0.8
    assert out["unc/i2t_aurc"] == pytest.approx(out["unc/i2t_aurc_oracle"])
    assert out["unc/i2t_aurc_random"] == 0.5
    out = evaluate_module._uncertainty_vs_retrieval(scores, q, -good, -good, n_bins=10)
    assert out["unc/i2t_aurc"] > out["unc/i2t_aurc_random"] > out["unc/i2t_aurc_oracle"]
    assert "unc/free/top1/i2t_aurc" in out and "unc/free/margin/t2i_bin_9_rprecision" in out
    # every query's top-1 score is 1 and its margin 1: no information, every bin at the overall mean
    assert [out[f"unc/free/top1/i2t_bin_{b}_r@1"] for b in range(10)] == [0.5] * 10
    assert out["unc/free/margin/i2t_aurc"] == pytest.approx(0.5)


def test_probes_keep_only_pairs_balanced_for_familiarity():
    loss = probloss.build_loss("infonce")
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=12)
    base = evaluate(FakeDualEncoder(False), loss, eval_set, tok)
    assert base["val/relation_probe_n"] == 8.0
    for i, m in enumerate(eval_set.json):
        # scenes 1, 2 (multi-object): the negatives mention a held-out combination, the true caption does not
        m["heldout_mentions"] = {"caption": False, "relation": i in (1, 2), "binding": i in (1, 2), "control": False}
    out = evaluate(FakeDualEncoder(False), loss, eval_set, tok)
    assert out["val/relation_probe_n"] == 6.0 == out["val/binding_probe_n"]
    assert out["val/control_probe_n"] == base["val/control_probe_n"]
    eval_set.json[5]["heldout_mentions"]["caption"] = True  # scene 5 (dict negatives): only its caption held out
    out = evaluate(FakeDualEncoder(False), loss, eval_set, tok)
    assert out["val/control_probe_n"] == base["val/control_probe_n"] - 1
    assert out["val/relation_probe_n"] == 5.0 == out["val/binding_probe_n"]
    eval_set.json[5]["heldout_mentions"].update(relation=True, binding=True, control=True)  # both held out: kept
    out = evaluate(FakeDualEncoder(False), loss, eval_set, tok)
    assert out["val/control_probe_n"] == base["val/control_probe_n"] and out["val/relation_probe_n"] == 6.0


def test_within_scene_strata_weigh_equally():
    """Two one-object scenes and one two-object scene; log-sigma chosen per caption: the accuracy is the mean of
    the per-stratum accuracies (object count, word-count difference), not the mean over pairs."""
    metas = [{"captions": ["an object", "a red object", "a red circle", "a small red circle at the top left"],
              "objects": [{}]},
             {"captions": ["an object", "a blue object", "a blue square", "a large blue square at the middle"],
              "objects": [{}]},
             {"captions": ["two objects", "a red object and a blue object", "a red circle and a blue square",
                           "a small red circle left of a large blue square"], "objects": [{}, {}]}]
    data = evaluate_module._SpecificityData(metas, [m["captions"][3] for m in metas], None, ("object", "objects"))
    log_sigma = torch.tensor([4.0, 3, 2, 1,  # scene 0: every pair right
                              1.0, 2, 3, 4,  # scene 1: every pair wrong
                              4.0, 3, 3, 1], dtype=torch.float64)  # scene 2: L1 = L2 tie, the rest right
    out = evaluate_module._within_scene(log_sigma, data)
    words = [[len(c.split()) for c in m["captions"]] for m in metas]
    strata: dict = {}
    for s, m in enumerate(metas):
        for a in range(4):
            for b in range(a + 1, 4):
                la, lb = log_sigma[4 * s + a].item(), log_sigma[4 * s + b].item()
                key = (len(m["objects"]), words[s][b] - words[s][a])
                strata.setdefault(key, []).append(1.0 if lb < la else 0.5 if lb == la else 0.0)
    per_stratum = [sum(v) / len(v) for v in strata.values()]
    per_pair = sum(sum(v) for v in strata.values()) / 18
    assert abs(per_pair - sum(per_stratum) / len(per_stratum)) > 0.01  # the weighting matters here
    assert out["specificity_within_scene_n"] == 18.0
    assert out["specificity_within_scene_acc"] == pytest.approx(sum(per_stratum) / len(per_stratum))
    same = [sum(v) / len(v) for k, v in strata.items() if k[1] == 0]
    assert out["specificity_within_scene_same_words_acc"] == pytest.approx(sum(same) / len(same))
    assert out["specificity_within_scene_same_words_acc"] == pytest.approx((0.5 + 0.5) / 2)  # (1, 0) and (2, 0)
