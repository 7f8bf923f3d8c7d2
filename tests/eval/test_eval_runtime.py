"""val/loss, computed once for training and checkpoint evaluation: the training loss over the val set in
global batches, checked against the loss computed by hand batch by batch."""

from types import SimpleNamespace

import pytest
import torch
from lightning_fabric import Fabric
from torch import nn

import probloss
from probloss.models.dual import Embeddings
from probloss.training.evaluation import val_loss


class IdentityDual(nn.Module):
    """Images and tokens are already the embeddings (B, D); the loss rides along as in builders.Trainee."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, images, tokens):
        return Embeddings(images, tokens.float())


@pytest.mark.parametrize("batch", [4, 10, 64])
def test_val_loss_is_the_mean_training_loss_over_full_global_batches(batch):
    torch.manual_seed(0)
    n, dim = 10, 8
    eval_set = SimpleNamespace(images=torch.randn(n, dim), tokens=torch.randn(n, dim), captions=["c"] * n)
    trainee = IdentityDual(probloss.build_loss("infonce"))
    trainee.train()
    fabric = Fabric(accelerator="cpu", devices=1)
    got = val_loss(fabric, trainee, eval_set, batch)
    size = min(batch, n)  # batches larger than the set shrink to it; the last partial batch is dropped
    expected = [trainee.loss(eval_set.images[s:s + size], eval_set.tokens[s:s + size]).item()
                for s in range(0, n - size + 1, size)]
    assert got == pytest.approx(sum(expected) / len(expected), rel=1e-6)
    assert trainee.training  # mode restored
