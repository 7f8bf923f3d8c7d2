"""The planted-noise keys (issue 33): stratified AUROC against a plain pairwise reference, its interval under the
null, known answers (an indicator sigma gives 1.0, a cue constant within strata 0.5) and evaluate()'s keys."""

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from probloss.data import shapes
from probloss.eval import evaluate, metrics
from probloss.eval.dual_encoder import mentions

ATTRIBUTE = "magenta"


def _pairwise_auroc(score, positive):
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie (float64 reference)."""
    pos = [float(s) for s, p in zip(score, positive) if p]
    neg = [float(s) for s, p in zip(score, positive) if not p]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auroc_and_stratified_auroc_match_the_pairwise_reference():
    gen = torch.Generator().manual_seed(0)
    score = torch.randint(0, 6, (300,), generator=gen).double()  # many ties
    positive = torch.rand(300, generator=gen) < 0.3
    strata = torch.randint(0, 4, (300,), generator=gen)
    assert metrics.auroc(score, positive) == pytest.approx(_pairwise_auroc(score, positive), abs=1e-12)
    parts = [(int((positive & (strata == s)).sum()), _pairwise_auroc(score[strata == s], positive[strata == s]))
             for s in range(4)]
    expected = sum(n * a for n, a in parts) / sum(n for n, _ in parts)
    out = metrics.stratified_auroc(score, positive, strata)
    assert out["auroc"] == pytest.approx(expected, abs=1e-12)
    assert out["n_positive"] == int(positive.sum()) and out["n_negative"] == int((~positive).sum())
    # a stratum with one class only does not count; none usable: NaN
    strata[positive] = 9
    assert math.isnan(metrics.stratified_auroc(score, positive, strata)["auroc"])
    assert math.isnan(metrics.auroc(score, torch.zeros(300, dtype=torch.bool)))


def test_hanley_mcneil_se_known_values():
    # A = 0.5, n1 = n0 = n: Q1 = 1/3, Q2 = 1/3, SE^2 = (1/4 + 2 (n - 1) / 12) / n^2
    n = 50
    assert metrics.hanley_mcneil_se(0.5, n, n) == pytest.approx(math.sqrt((0.25 + 2 * (n - 1) / 12) / n ** 2))
    assert metrics.hanley_mcneil_se(1.0, 10, 20) == 0.0


def test_a_pure_noise_sigma_sits_at_one_half_within_its_interval():
    """p = 0 / a sigma that knows nothing: the interval auroc +- 1.96 se covers 0.5 in about 95% of draws (the
    standard error is calibrated), and the mean over draws is 0.5."""
    gen = torch.Generator().manual_seed(1)
    covered, values = 0, []
    for _ in range(300):
        positive = torch.rand(400, generator=gen) < 0.25
        strata = torch.randint(0, 5, (400,), generator=gen)
        r = metrics.stratified_auroc(torch.randn(400, generator=gen), positive, strata)
        covered += abs(r["auroc"] - 0.5) <= 1.96 * r["se"]
        values.append(r["auroc"])
    assert 0.90 <= covered / 300 <= 0.99, covered
    assert abs(sum(values) / len(values) - 0.5) < 0.01


@dataclass
class EvalSet:
    images: torch.Tensor
    tokens: torch.Tensor
    captions: list
    json: list
    train_caption_stats: dict | None = None


class PlantedModel(nn.Module):
    """Image i embeds as e_i (one-hot), caption j as e_j + noise; image log-std = ``image_sigma[i]``, text log-std
    = ``text_sigma[j]`` (pixel (0, 0, 0) and token 0 carry the index)."""

    def __init__(self, n, image_sigma, text_sigma, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.image = torch.eye(n)
        self.text = torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen)
        self.image_sigma, self.text_sigma = image_sigma, text_sigma

    def encode_image(self, images):
        i = images[:, 0, 0, 0].round().long()
        return self.image[i], self.image_sigma[i]

    def encode_text(self, tokens):
        j = tokens[:, 0]
        return self.text[j], self.text_sigma[j]


class DotLoss(nn.Module):
    needs_log_std = True

    def score(self, x, y, x_log_std=None, y_log_std=None):
        return x @ y.T


def _test_split(n=400, seed=5):
    metas = [shapes.generate_sample(seed, shapes.TEST_INDEX_OFFSET + i, 32)[2] for i in range(n)]
    captions = [m["captions"][m["level"]] for m in metas]
    images = torch.zeros(n, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(n).float()
    return EvalSet(images, torch.arange(n)[:, None], captions, metas)


def _tokenizer(captions):  # only for the probe / level captions: ids past the eval set's rows
    return torch.zeros(len(captions), 1, dtype=torch.long)


def test_indicator_sigma_scores_one_and_cues_constant_within_strata_score_one_half():
    data = _test_split()
    n = len(data.captions)
    mention = torch.tensor([mentions(c, ATTRIBUTE) for c in data.captions])
    holds = torch.tensor([any(ATTRIBUTE in (o["colour"], o["shape"]) for o in m["objects"]) for m in data.json])
    assert mention.sum() > 10 and holds.sum() > mention.sum()  # L0/L1 captions of such scenes need not say it
    model = PlantedModel(n, holds.float(), mention.float())
    out = evaluate(model, DotLoss(), data, _tokenizer, prefix="test", planted_attribute=ATTRIBUTE)
    assert out["test/unc/planted_auroc"] == 1.0 and out["test/unc/planted_auroc_se"] == 0.0
    assert out["test/unc/planted_auroc_image"] == 1.0
    assert out["test/unc/planted_n_image"] == int(holds.sum())
    assert out["test/unc/cue/words/planted_auroc"] == 0.5  # word count is one of the strata: exactly chance
    for key in ("objects", "token"):
        assert abs(out[f"test/unc/cue/{key}/planted_auroc"] - 0.5) <= 3 * out[f"test/unc/cue/{key}/planted_auroc_se"]
    expected = {f"test/unc/free/{s}/planted_auroc{m}{se}" for s in ("top1", "margin") for m in ("", "_image")
                for se in ("", "_se")}
    expected |= {f"test/{d}_r@1{k}_{t}" for d in ("t2i", "i2t") for k in ("", "_plausible")
                 for t in ("planted", "unplanted")}
    assert expected <= set(out)
    # the retrieval split agrees with the overall R@1: a weighted mean of the two parts
    for d in ("t2i", "i2t"):
        part = mention if d == "t2i" else holds
        whole = (int(part.sum()) * out[f"test/{d}_r@1_plausible_planted"]
                 + int((~part).sum()) * out[f"test/{d}_r@1_plausible_unplanted"]) / n
        assert whole == pytest.approx(out[f"test/{d}_r@1_plausible"], abs=1e-9)
    # the reversed indicator: 0.0; without planted_attribute: no planted key at all
    out = evaluate(PlantedModel(n, -holds.float(), -mention.float()), DotLoss(), data, _tokenizer,
                   planted_attribute=ATTRIBUTE)
    assert out["unc/planted_auroc"] == 0.0 and out["unc/planted_auroc_image"] == 0.0
    out = evaluate(model, DotLoss(), data, _tokenizer)
    assert not [k for k in out if "planted" in k]


def test_a_noise_sigma_in_evaluate_sits_at_one_half_within_its_interval():
    data = _test_split(seed=6)
    n = len(data.captions)
    gen = torch.Generator().manual_seed(3)
    model = PlantedModel(n, torch.randn(n, generator=gen), torch.randn(n, generator=gen))
    out = evaluate(model, DotLoss(), data, _tokenizer, planted_attribute=ATTRIBUTE)
    for key in ("unc/planted_auroc", "unc/planted_auroc_image"):
        assert abs(out[key] - 0.5) <= 1.96 * out[f"{key}_se"], (key, out[key], out[f"{key}_se"])
