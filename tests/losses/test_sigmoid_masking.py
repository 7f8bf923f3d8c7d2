"""SigLIP's negative-masking ablation options of the sigmoid loss."""

import pytest
import torch
import torch.nn.functional as F

import probloss


@pytest.fixture
def batch(loss_inputs):
    """``batch(n)``: n independent (image, text) pairs of dimension 6."""
    return lambda n=8: loss_inputs(n, 6, pairs="independent")[:2]


def logits_of(loss, x, y):
    return loss.logit_scale.exp() * F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T + loss.logit_bias


@pytest.mark.parametrize("mask", ["random", "hard", "easy"])
def test_keeping_every_negative_equals_the_plain_loss(mask, batch):
    x, y = batch()
    plain = probloss.build_loss("sigmoid").double()(x, y)
    masked = probloss.build_loss("sigmoid", neg_mask=mask, neg_keep_ratio=1.0).double()(x, y)
    torch.testing.assert_close(masked, plain, rtol=1e-12, atol=0)


def test_keeping_no_negative_leaves_the_positives(batch):
    x, y = batch()
    loss = probloss.build_loss("sigmoid", neg_mask="hard", neg_keep_ratio=0.0).double()
    expected = F.softplus(-logits_of(loss, x, y).diagonal()).sum() / len(x)
    torch.testing.assert_close(loss(x, y), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mask,pick", [("hard", "largest"), ("easy", "smallest")])
def test_hard_and_easy_keep_the_highest_and_lowest_loss_negatives(mask, pick, batch):
    x, y = batch(n=6)
    loss = probloss.build_loss("sigmoid", neg_mask=mask, neg_keep_ratio=0.4).double()  # k = round(0.4 * 5) = 2
    logits = logits_of(loss, x, y)
    expected = F.softplus(-logits.diagonal()).sum()
    for i in range(6):
        negatives = torch.cat([logits[i, :i], logits[i, i + 1 :]])
        expected = expected + F.softplus(negatives.topk(2, largest=pick == "largest").values).sum()
    torch.testing.assert_close(loss(x, y), expected / 6, rtol=1e-12, atol=0)


def test_random_mask_is_reproducible_and_changes_every_call(batch):
    x, y = batch()
    first = probloss.build_loss("sigmoid", neg_mask="random", neg_keep_ratio=0.5, mask_seed=3).double()
    second = probloss.build_loss("sigmoid", neg_mask="random", neg_keep_ratio=0.5, mask_seed=3).double()
    values = [first(x, y) for _ in range(3)]
    assert torch.equal(values[0], second(x, y))
    assert not torch.equal(values[0], values[1])
    assert first.state_dict()["mask_calls"].item() == 3  # saved with checkpoints, so a resumed run continues


def test_bad_masking_options():
    with pytest.raises(ValueError, match="^sigmoid: neg_mask='semi-hard' is not one of none, random, hard, easy$"):
        probloss.build_loss("sigmoid", neg_mask="semi-hard")
    with pytest.raises(ValueError, match=r"^sigmoid: neg_keep_ratio=1\.5 is not in \[0, 1\]$"):
        probloss.build_loss("sigmoid", neg_mask="hard", neg_keep_ratio=1.5)


@pytest.mark.parametrize("mask", ["random", "hard", "easy"])
def test_masks_with_extra_texts(mask, loss_inputs):
    """Extra texts are negatives a mask may keep or drop: keeping all equals the plain loss; hard keeps the
    highest-loss ones among in-batch and extra negatives alike."""
    x, y = loss_inputs(5, 6, pairs="independent", extra_texts=2)[:2]
    plain = probloss.build_loss("sigmoid").double()(x, y)
    masked = probloss.build_loss("sigmoid", neg_mask=mask, neg_keep_ratio=1.0).double()(x, y)
    torch.testing.assert_close(masked, plain, rtol=1e-12, atol=0)
    if mask == "hard":
        loss = probloss.build_loss("sigmoid", neg_mask="hard", neg_keep_ratio=0.5).double()  # k = round(0.5 * 14) = 7
        logits = logits_of(loss, x, y)  # (5, 15)
        expected = F.softplus(-logits.diagonal()).sum()
        for i in range(5):
            negatives = torch.cat([logits[i, :i], logits[i, i + 1 :]])
            expected = expected + F.softplus(negatives.topk(7).values).sum()
        torch.testing.assert_close(loss(x, y), expected / 5, rtol=1e-12, atol=0)
