"""evaluate() end to end with a tiny fake dual encoder whose answers are known.

The fake tokenizer gives each distinct string an id (tokens = [id, n_words]); the fake text tower looks the id up
in a fixed random table. Image i carries the id of its training caption in pixel (0, 0, 0) and its number of
objects in pixel (0, 1, 0), so image i embeds exactly like caption i: retrieval and the probes are perfect, and
the one-object scenes' captions are the zero-shot prompts, so zero-shot is perfect too. log-stds: text
-0.1 * n_words (longer = more specific = smaller sigma), image 0.1 * n_objects + mean |channel 1|.
"""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import probloss
from probloss.eval import evaluate, fill_template, image_sigma_vs_noise

CLASSNAMES = ["red circle", "blue square", "orange cross", "green triangle", "white diamond", "cyan circle"]
D = 16


class FakeTokenizer:
    def __init__(self):
        self.ids: dict[str, int] = {}

    def __call__(self, captions):
        rows = [[self.ids.setdefault(c, len(self.ids) + 1), len(c.split())] for c in captions]
        return torch.tensor(rows, dtype=torch.long)


class FakeDualEncoder(nn.Module):
    def __init__(self, log_std: bool):
        super().__init__()
        self.table = nn.Parameter(torch.randn(512, D, generator=torch.Generator().manual_seed(0)))
        self.log_std = log_std

    def encode_image(self, images):
        ids = images[:, 0, 0, 0].round().long()
        n_obj = images[:, 0, 1, 0]
        ls = 0.1 * n_obj + images[:, 1].abs().mean((1, 2)) if self.log_std else None
        return self.table[ids], ls

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]], (-0.1 * tokens[:, 1].float() if self.log_std else None)

    def forward(self, images, tokens):
        return (*self.encode_image(images), *self.encode_text(tokens))


@dataclass
class FakeEvalSet:
    images: torch.Tensor
    tokens: torch.Tensor
    captions: list
    json: list


def make_eval_set(tokenizer, n=18):
    metas = []
    for i in range(n):
        n_obj = 1 + i % 3
        if n_obj == 1:
            cls = (i // 3) % len(CLASSNAMES)
            name = CLASSNAMES[cls]
            colour = name.split()[0]
            caps = ["an object", fill_template("a {} object", colour), fill_template("a {}", name),
                    fill_template("a {}", name)]
            metas.append(dict(captions=caps, level=3, objects=[{}], relation=None,
                              negatives={"relation": None, "binding": None}, label=cls))
        else:
            more = " and a small green triangle" if n_obj == 3 else ""
            caps = [f"{'two' if n_obj == 2 else 'three'} objects", "a red object and a blue object",
                    "a red circle and a blue square", f"a small red circle left of a large blue square{more} {i}"]
            negs = [f"a large blue square left of a small red circle{more} {i}",
                    f"a small blue circle left of a large red square{more} {i}"]
            # both documented formats of json["negatives"]
            negatives = {"relation": negs[0], "binding": negs[1]} if i % 2 else negs
            metas.append(dict(captions=caps, level=3, objects=[{}] * n_obj, relation={"subject": 0, "object": 1},
                              negatives=negatives, label=None))
    captions = [m["captions"][3] for m in metas]
    tokens = tokenizer(captions)
    images = torch.zeros(n, 3, 4, 4)
    images[:, 0, 0, 0] = tokens[:, 0].float()
    images[:, 0, 1, 0] = torch.tensor([len(m["objects"]) for m in metas], dtype=torch.float)
    return FakeEvalSet(images, tokens, captions, metas)


BASE_KEYS = {f"val/{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {
    "val/zeroshot_top1", "val/zeroshot_top5", "val/relation_probe_acc", "val/binding_probe_acc",
    "embed/effective_rank", "embed/uniformity", "embed/alignment", "embed/modality_gap", "embed/participation_ratio",
    "embed/participation_ratio_frac"}
UNC_KEYS = {"unc/specificity_spearman", "unc/image_sigma_vs_objects", "unc/sigma_image_mean", "unc/sigma_text_mean"} | {
    f"unc/sigma_text_mean_L{lv}" for lv in range(4)} | {
    f"unc/{d}_r1_sigma_decile_{b}" for d in ("i2t", "t2i") for b in range(10)} | {
    "unc/i2t_r1_sigma_spearman", "unc/t2i_r1_sigma_spearman"}


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_evaluate_keys_and_known_answers(loss_name):
    loss = probloss.build_loss(loss_name)
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=18)  # 6 one-object scenes, one per class: no duplicate captions
    model = FakeDualEncoder(log_std=loss.needs_log_std)
    model.train()
    out = evaluate(model, loss, eval_set, tok, batch_size=7, classnames=CLASSNAMES)
    assert model.training  # mode restored
    expected = BASE_KEYS | (UNC_KEYS if loss.needs_log_std else set())
    assert expected <= set(out), expected - set(out)
    if not loss.needs_log_std:
        assert not any(k.startswith("unc/") for k in out)
    for key, value in out.items():
        assert isinstance(value, float), key
        if key.startswith(("val/i2t", "val/t2i", "val/zeroshot", "val/relation", "val/binding")) or "decile" in key:
            assert 0.0 <= value <= 1.0, key
    # Known answers of the fake model.
    for key in BASE_KEYS:
        if key.startswith(("val/i2t", "val/t2i", "val/zeroshot", "val/relation", "val/binding")):
            assert out[key] == 1.0, key
    assert out["embed/alignment"] == pytest.approx(0.0, abs=1e-9)
    assert out["embed/modality_gap"] == pytest.approx(0.0, abs=1e-9)
    assert 1.0 <= out["embed/effective_rank"] <= D
    assert -4.0 <= out["embed/uniformity"] <= 0.0
    assert 1.0 <= out["embed/participation_ratio"] <= D
    assert 1 / D <= out["embed/participation_ratio_frac"] <= 1.0
    if loss.needs_log_std:
        assert out["unc/specificity_spearman"] < -0.5  # longer captions -> smaller sigma
        assert out["unc/sigma_text_mean_L0"] > out["unc/sigma_text_mean_L3"]
        assert out["unc/image_sigma_vs_objects"] == pytest.approx(1.0)
        assert all(out[f"unc/i2t_r1_sigma_decile_{b}"] == 1.0 for b in range(10))


def test_evaluate_without_classnames_or_json():
    tok = FakeTokenizer()
    eval_set = make_eval_set(tok, n=6)
    out = evaluate(FakeDualEncoder(False), probloss.build_loss("infonce"), eval_set, tok)
    assert "val/zeroshot_top1" not in out and "val/relation_probe_acc" in out
    eval_set.json = None
    out = evaluate(FakeDualEncoder(False), probloss.build_loss("infonce"), eval_set, tok)
    assert out["val/i2t_r@1"] == 1.0 and "val/relation_probe_acc" not in out


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
