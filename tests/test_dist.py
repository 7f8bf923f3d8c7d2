"""The distributed invariant of docs/design.md with real gloo processes (W = 2 and 3), for every registered loss."""

import inspect
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import probloss
from probloss import dist
from probloss.testing import DistributedCheckError, check_distributed, free_port, log_std_shapes, loss_class

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", probloss.list_losses())
def test_every_loss_satisfies_the_distributed_invariant(name):
    results = check_distributed(name, world_sizes=(2, 3), rtol=1e-8)
    assert {r.world_size for r in results} == {2, 3}
    assert all(r.worst <= 1e-8 for r in results)


@pytest.mark.parametrize("name", probloss.list_losses())
def test_every_loss_satisfies_the_distributed_invariant_with_extra_texts(name):
    """Hard negatives: each rank passes N images and N (1 + 2) texts (its positives, then its extras); the single
    process gets [all positives, all extras] (probloss.testing), in every distributed variant."""
    results = check_distributed(name, world_sizes=(2, 3), rtol=1e-8, extra_texts=2)
    assert {r.world_size for r in results} == {2, 3} and all(r.extra_texts == 2 for r in results)
    assert all(r.worst <= 1e-8 for r in results)


@pytest.mark.parametrize("name", probloss.list_losses())
def test_every_loss_satisfies_the_distributed_invariant_with_false_negatives(name):
    """``false_negatives`` mask and positive in every distributed variant, with duplicate captions and scenes on
    every rank and across ranks (probloss.testing.make_groups) and one extra text per image, half of them repeating
    their image's caption: the group ids travel with the texts (ring) or are gathered."""
    if "false_negatives" not in inspect.signature(loss_class(name)).parameters:
        pytest.skip(f"{name} has no false_negatives option")
    variants = [{**variant, "false_negatives": mode} for variant in loss_class(name).distributed_variants
                for mode in ("mask", "positive")]
    results = check_distributed(name, world_sizes=(2, 3), rtol=1e-8, extra_texts=1, groups=True, variants=variants)
    assert {r.world_size for r in results} == {2, 3} and len(results) == 2 * len(variants) * len(
        log_std_shapes(loss_class(name)))
    assert all(r.worst <= 1e-8 for r in results)


class GlobalNormaliser(probloss.ContrastiveLoss):
    """A planted bug: per-rank sigmoid-style sum divided by the GLOBAL batch, so the rank mean is W times too small.

    Registered only inside its test (the registry is restored after every test, tests/conftest.py), so no other
    test is parametrised over it.
    """

    def compute_loss(self, x, y, lx, ly):
        all_y = dist.all_gather_cat(y)
        return torch.nn.functional.softplus(x @ all_y.T).sum() / (x.shape[0] * dist.get_world_size())

    def compute_scores(self, x, y, lx, ly):
        return x @ y.T


def test_the_check_catches_a_wrong_normalisation():
    probloss.register_loss("test_global_normaliser")(GlobalNormaliser)
    with pytest.raises(DistributedCheckError, match=r"W=2 .*\(a\) loss"):
        check_distributed("test_global_normaliser", world_sizes=(2,))


def _run(fn, world, *args):
    init = f"tcp://127.0.0.1:{free_port()}"
    mp.start_processes(fn, args=(world, init, *args), nprocs=world, start_method="spawn", join=True)


def _mismatched_worker(rank, world, init, out, loss_name, images, texts):
    """Each rank calls the loss with its own (images[rank], texts[rank]) rows and writes the error it gets."""
    dist.init_process_group("gloo", init, rank, world)
    loss = probloss.build_loss(loss_name)
    try:
        loss(torch.randn(images[rank], 8), torch.randn(texts[rank], 8))
        message = "no error"
    except ValueError as err:
        message = str(err)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    dist.finish()


@pytest.mark.parametrize("loss_name, images, texts, expected", [
    ("sigmoid", (4, 3), (4, 3), ("rank 0: shape (4, 8)", "rank 1: shape (3, 8)")),  # different batch sizes
    ("infonce", (3, 3), (6, 3), ("different text_emb", "rank 0: shape (6, 8)")),  # extra texts on rank 0 only
])
def test_ranks_with_different_shapes_get_a_clear_error_not_a_hang(tmp_path, loss_name, images, texts, expected):
    _run(_mismatched_worker, 2, str(tmp_path), loss_name, images, texts)
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert all(part in message for part in expected), message


def _no_p2p_worker(rank, world, init, out):
    dist.init_process_group("gloo", init, rank, world)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(world * 4, 6, generator=gen), torch.randn(world * 4, 6, generator=gen)
    part = slice(rank * 4, rank * 4 + 4)
    ring = probloss.build_loss("sigmoid", dist_impl="ring")(x[part], y[part])
    dist.supports_p2p = lambda: False  # as on XLA: the backend has no isend/irecv
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = [probloss.build_loss("sigmoid", dist_impl="ring")(x[part], y[part]) for _ in range(2)]
    torch.save({"ring": ring.detach(), "fallback": [f.detach() for f in fallback],
                "warnings": [str(w.message) for w in caught]}, os.path.join(out, f"rank{rank}.pt"))
    dist.finish()


def test_ring_falls_back_to_gather_without_point_to_point(tmp_path):
    _run(_no_p2p_worker, 3, str(tmp_path))
    for rank in range(3):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["fallback"][0], result["ring"])
        assert len([w for w in result["warnings"] if "no point-to-point" in w]) == 1  # warned once only


class TinyDualEncoder(torch.nn.Module):
    """Two linear towers (and log-std heads when the loss needs them) and the loss in one module, so DDP averages
    the loss's parameters' gradients too."""

    def __init__(self, loss_name):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = torch.nn.Linear(6, 5), torch.nn.Linear(4, 5)
        self.loss = probloss.build_loss(loss_name)
        self.image_log_std = self.text_log_std = None
        if self.loss.needs_log_std:
            self.image_log_std, self.text_log_std = torch.nn.Linear(6, 1), torch.nn.Linear(4, 1)
        self.double()

    def forward(self, images, texts):
        log_stds = [None, None]
        if self.loss.needs_log_std:
            log_stds = [self.image_log_std(images).squeeze(-1), self.text_log_std(texts).squeeze(-1)]
        return self.loss(self.image(images), self.text(texts), *log_stds)


def _global_batch(steps=3, batch=8):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 6, generator=gen, dtype=torch.float64),
             torch.randn(batch, 4, generator=gen, dtype=torch.float64)) for _ in range(steps)]


def _train(fabric, model, batches, rank, world):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    per_rank = batches[0][0].shape[0] // world
    for images, texts in batches:
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        value = model(images[rows], texts[rows])
        optimizer.zero_grad()
        fabric.backward(value)
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _fabric_worker(fabric, out, loss_name, steps):
    state = _train(fabric, TinyDualEncoder(loss_name), _global_batch(steps), fabric.global_rank, fabric.world_size)
    torch.save(state, os.path.join(out, f"rank{fabric.global_rank}.pt"))
    dist.finish()


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_fabric_ddp_steps_equal_single_process_steps(tmp_path, loss_name):
    from lightning_fabric import Fabric

    steps = 3
    single = _train(Fabric(accelerator="cpu", devices=1), TinyDualEncoder(loss_name), _global_batch(steps), 0, 1)
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    fabric.launch(_fabric_worker, str(tmp_path), loss_name, steps)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, want in single.items():
        for rank in ranks:
            torch.testing.assert_close(rank[key], want, rtol=0, atol=1e-6, msg=key)
    for key in ("loss.logit_scale", "loss.logit_bias"):
        if key in single:  # learnable loss parameters stay identical across ranks
            assert torch.equal(ranks[0][key], ranks[1][key])
