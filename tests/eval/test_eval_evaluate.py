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

import pytest
import torch
from torch import nn

import probloss
from probloss.eval import evaluate, fill_template, image_sigma_vs_noise
from probloss.eval import metrics
from probloss.eval.evaluate import _images_fit

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
BASE_KEYS = RETRIEVAL | {"val/r@1_chance", "val/i2t_r@1_L3", "val/t2i_r@1_L3", "val/r@1_chance_L3",
                         "val/zeroshot_top1", "val/zeroshot_top5", "val/zeroshot_n_labelled",
                         "val/relation_probe_acc", "val/binding_probe_acc", "val/control_probe_acc",
                         "embed/effective_rank", "embed/uniformity", "embed/alignment", "embed/modality_gap",
                         "embed/participation_ratio", "embed/participation_ratio_frac"}
UNC_KEYS = {"unc/specificity_spearman", "unc/specificity_partial_spearman", "unc/specificity_matched_acc",
            "unc/specificity_matched_log_ratio", "unc/baseline_wordcount_specificity_spearman",
            "unc/baseline_wordcount_partial_spearman", "unc/baseline_wordcount_matched_acc",
            "unc/sigma_text_ratio_L0_L3", "unc/image_sigma_vs_objects", "unc/sigma_image_mean",
            "unc/sigma_text_mean", "unc/sigma_text_image_log_ratio", "unc/sigma_vs_images_fit_spearman",
            "unc/sigma_vs_images_fit_partial_spearman"} | {f"unc/sigma_text_rank_L{lv}" for lv in range(4)} | {
    f"unc/{d}_r1_sigma_decile_{b}" for d in ("i2t", "t2i") for b in range(10)} | {
    "unc/i2t_r1_sigma_spearman", "unc/t2i_r1_sigma_spearman"}
RAW_KEYS = {f"embed/raw/{name}{m}" for name in ("effective_rank", "participation_ratio", "participation_ratio_frac")
            for m in ("", "_image", "_text")} | {"embed/raw/norm_mean_image", "embed/raw/norm_mean_text",
                                                 "embed/raw/alignment_ratio"}
UNIT_INTERVAL = ("val/i2t", "val/t2i", "val/r@1", "val/zeroshot_top", "val/zeroshot_seen", "val/zeroshot_unseen",
                 "val/relation", "val/binding", "val/control", "unc/sigma_text_rank", "unc/specificity_matched_acc",
                 "unc/baseline_wordcount_matched_acc")


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_evaluate_keys_and_known_answers(loss_name):
    loss = probloss.build_loss(loss_name)
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=18)  # 6 one-object scenes, one per class: no duplicate captions
    model = FakeDualEncoder(log_std=loss.needs_log_std, log_std_offset=loss.init_log_std)
    model.train()
    out = evaluate(model, loss, eval_set, tok, batch_size=7, classnames=CLASSNAMES)
    assert model.training  # mode restored
    expected = BASE_KEYS | (UNC_KEYS if loss.needs_log_std else set()) | (
        RAW_KEYS if loss.scores_raw_embeddings else set())
    assert expected <= set(out), expected - set(out)
    assert not any(k.startswith("embed/raw/") for k in set(out) - expected)
    assert "unc/sigma_text_mean_L0" not in out  # replaced by the within-model ranks
    if not loss.needs_log_std:
        assert not any(k.startswith("unc/") for k in out)
    for key, value in out.items():
        assert isinstance(value, float), key
        if key.startswith(UNIT_INTERVAL) or "decile" in key:
            assert 0.0 <= value <= 1.0, key
    # Known answers of the fake model (no duplicate captions: strict = multi-positive = 1).
    for key in BASE_KEYS:
        if key.startswith(("val/i2t", "val/t2i", "val/zeroshot_top", "val/relation", "val/binding", "val/control")):
            assert out[key] == 1.0, key
    assert out["val/r@1_chance"] == pytest.approx(1 / 18)
    assert out["val/zeroshot_n_labelled"] == 6.0
    assert out["embed/alignment"] == pytest.approx(0.0, abs=1e-9)
    assert out["embed/modality_gap"] == pytest.approx(0.0, abs=1e-9)
    assert 1.0 <= out["embed/effective_rank"] <= D
    assert -4.0 <= out["embed/uniformity"] <= 0.0
    assert 1.0 <= out["embed/participation_ratio"] <= D
    assert 1 / D <= out["embed/participation_ratio_frac"] <= 1.0
    if loss.needs_log_std:
        assert out["unc/specificity_spearman"] < -0.5  # longer captions -> smaller sigma
        assert out["unc/sigma_text_rank_L0"] > out["unc/sigma_text_rank_L3"]
        assert out["unc/sigma_text_ratio_L0_L3"] > 1.0
        assert out["unc/image_sigma_vs_objects"] == pytest.approx(1.0)
        assert all(out[f"unc/i2t_r1_sigma_decile_{b}"] == 1.0 for b in range(10))


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
        assert all(out[f"unc/{d}_r1_sigma_decile_{b}"] == 1.0 for d in ("i2t", "t2i") for b in range(10))


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


def test_specificity_beyond_caption_length():
    loss = probloss.build_loss("gaussian_var")
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=18)
    # Sigma a function of length only: no effect once length is controlled, exactly the baseline.
    out = evaluate(FakeDualEncoder(True), loss, eval_set, tok)
    assert out["unc/specificity_matched_acc"] == 0.5 == out["unc/baseline_wordcount_matched_acc"]
    assert out["unc/specificity_matched_log_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert out["unc/specificity_partial_spearman"] == 0.0 == out["unc/baseline_wordcount_partial_spearman"]
    assert out["unc/specificity_spearman"] == pytest.approx(out["unc/baseline_wordcount_specificity_spearman"])
    # Sigma also shrinks with each shape word (the L2 form names shapes, the matched L1 form does not).
    out = evaluate(FakeDualEncoder(True, specific=True), loss, eval_set, tok)
    assert out["unc/specificity_matched_acc"] == 1.0
    # one-object pairs (6): one shape word, log ratio -0.5; multi-object pairs (12): two shape words, -1.0
    assert out["unc/specificity_matched_log_ratio"] == pytest.approx((6 * -0.5 + 12 * -1.0) / 18, abs=1e-5)
    assert out["unc/specificity_partial_spearman"] < -0.3
    assert out["unc/baseline_wordcount_matched_acc"] == 0.5
    assert out["unc/sigma_text_ratio_L0_L3"] > 1.0


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


def test_raw_geometry_only_for_losses_that_score_raw_embeddings():
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=12)
    model = FakeDualEncoder(False)
    out = evaluate(model, FakeLoss(raw=True), eval_set, tok)
    assert RAW_KEYS <= set(out)
    assert out["embed/raw/alignment_ratio"] == pytest.approx(0.0, abs=1e-9)  # the pairs coincide
    norms = model.table[eval_set.tokens[:, 0]].norm(dim=-1).mean().item()
    assert out["embed/raw/norm_mean_image"] == pytest.approx(norms) == out["embed/raw/norm_mean_text"]
    # Scale-invariant raw metrics are unchanged by scaling the embeddings, norms scale with them.
    with torch.no_grad():
        model.table.mul_(3.0)
    scaled = evaluate(model, FakeLoss(raw=True), eval_set, tok)
    assert scaled["embed/raw/effective_rank"] == pytest.approx(out["embed/raw/effective_rank"])
    assert scaled["embed/raw/participation_ratio"] == pytest.approx(out["embed/raw/participation_ratio"])
    assert scaled["embed/raw/norm_mean_text"] == pytest.approx(3 * out["embed/raw/norm_mean_text"])
    out = evaluate(model, FakeLoss(raw=False), eval_set, tok)
    assert not any(k.startswith("embed/raw/") for k in out) and "embed/effective_rank" in out


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
    assert all(moved[k] == test[k] or (math.isnan(moved[k]) and math.isnan(test[k])) for k in test)
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
