"""Metrics on hand-made tensors with known answers."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from probloss.eval import metrics as M


def test_perfect_alignment_gives_recall_one():
    emb = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    r = M.retrieval_recall(emb @ emb.T)
    assert set(r) == {f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in r.values())


def test_known_permutation_recall():
    # Image i matches text perm[i] best; the positive (text i) is ranked by a fixed plan.
    n = 10
    scores = torch.zeros(n, n)
    # For image i, text i gets score -i (rank i+1 among the others at 0.5 ... built explicitly below).
    for i in range(n):
        others = [j for j in range(n) if j != i]
        # i decoys above the positive -> positive rank i + 1
        for r, j in enumerate(others):
            scores[i, j] = 1.0 if r < i else -1.0
    r = M.retrieval_recall(scores, ks=(1, 5, 10))
    assert r["i2t_r@1"] == pytest.approx(0.1)
    assert r["i2t_r@5"] == pytest.approx(0.5)
    assert r["i2t_r@10"] == pytest.approx(1.0)


def test_swapped_pairs_and_pessimistic_ties():
    eye = torch.eye(4)
    perm = eye[[1, 0, 2, 3]]  # images 0 and 1 swapped: each picks the other's text
    r = M.retrieval_recall(perm, ks=(1, 2, 4))
    # Image 0's positive scores 0 and ties with texts 2 and 3: pessimistic rank 4, not 2.
    assert (r["i2t_r@1"], r["i2t_r@2"], r["i2t_r@4"]) == (0.5, 0.5, 1.0)
    assert r["t2i_r@1"] == pytest.approx(0.5)
    # A collapsed model (all scores equal) and NaN scores never count as hits below N.
    assert M.retrieval_recall(torch.ones(5, 5), ks=(1, 4))["i2t_r@4"] == 0.0
    assert M.retrieval_recall(torch.full((5, 5), float("nan")), ks=(1,))["t2i_r@1"] == 0.0


def test_zeroshot_accuracy():
    scores = torch.tensor([[3.0, 1, 0, 0, 0, 0], [0, 1, 3, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    acc = M.zeroshot_accuracy(scores, torch.tensor([0, 1, 2]))
    assert acc["top1"] == pytest.approx(1 / 3)  # row 2 is a full tie: pessimistic rank 6
    assert acc["top5"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        M.zeroshot_accuracy(scores, torch.tensor([0, 1, 6]))


def test_effective_rank():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 16, generator=g)
    assert M.effective_rank(torch.randn(50, 1, generator=g) * v) == pytest.approx(1.0)
    assert M.effective_rank(v.repeat(30, 1)) == pytest.approx(1.0)  # identical rows: rank 1 (not centred)
    d = 32
    er = M.effective_rank(torch.randn(5000, d, generator=g))
    assert 0.9 * d < er <= d
    assert M.effective_rank(torch.eye(8)) == pytest.approx(8.0)
    assert M.effective_rank(torch.zeros(4, 4)) == 0.0


def test_uniformity_and_alignment_known_values():
    pair = torch.tensor([[1.0, 0.0], [-3.0, 0.0]])  # antipodal after normalisation: ||x-y||^2 = 4
    assert M.uniformity(pair) == pytest.approx(-8.0)
    assert M.uniformity(pair, t=1.0) == pytest.approx(-4.0)
    assert M.uniformity(torch.ones(5, 3)) == pytest.approx(0.0)
    # Three orthonormal vectors: every squared distance 2 -> log exp(-4) = -4.
    assert M.uniformity(torch.eye(3) * 7) == pytest.approx(-4.0)
    x = torch.randn(10, 4)
    assert M.alignment(x, 2 * x) == pytest.approx(0.0, abs=1e-12)
    assert M.alignment(x, -x) == pytest.approx(4.0)
    assert M.alignment(torch.eye(2), torch.eye(2)[[1, 0]], alpha=1) == pytest.approx(math.sqrt(2))


def test_modality_gap_of_shifted_clouds():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 3, generator=g) * 0.05 + torch.tensor([1.0, 0, 0])
    y = torch.randn(4000, 3, generator=g) * 0.05 + torch.tensor([0, 1.0, 0])
    assert M.modality_gap(x, y) == pytest.approx(math.sqrt(2), rel=0.02)
    assert M.modality_gap(x, x) == 0.0


def test_participation_ratio():
    g = torch.Generator().manual_seed(2)
    one_dim = torch.zeros(100, 8)
    one_dim[:, 3] = torch.randn(100, generator=g)
    assert M.participation_ratio(one_dim) == pytest.approx(1.0)
    iso = torch.randn(20000, 8, generator=g)
    assert M.participation_ratio(iso) == pytest.approx(8.0, rel=0.02)
    assert M.participation_ratio(iso, normalized=True) == pytest.approx(1.0, rel=0.02)
    # Variances (1, 1, 0, 0) -> (2)^2 / 2 = 2.
    two = torch.tensor([[1.0, 1, 5, 5], [-1, -1, 5, 5]])
    assert M.participation_ratio(two) == pytest.approx(2.0)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 5, 200), rng.normal(size=200).round(1)
        assert M.spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-10)
        ranks = M.average_ranks(torch.tensor(a)).numpy()
        np.testing.assert_allclose(ranks, stats.rankdata(a))


def test_spearman_known_values():
    assert M.spearman(torch.tensor([1, 2, 3, 4]), torch.tensor([10, 20, 30, 40.0])) == pytest.approx(1.0)
    assert M.spearman(torch.tensor([1, 2, 3, 4]), torch.tensor([4, 3, 2, 1])) == pytest.approx(-1.0)
    # ranks a = (1, 2, 3), b = (1.5, 1.5, 3) -> r = 0.8660254
    assert M.spearman(torch.tensor([1, 2, 3]), torch.tensor([5, 5, 9])) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(M.spearman(torch.ones(5), torch.arange(5)))


def test_recall_by_sigma_decile():
    n = 20
    scores = torch.eye(n)
    scores[10:] = torch.eye(n)[10:].flip(1)  # queries 10..19 miss (positive scores 0, another text 1)
    sigma = torch.arange(n, dtype=torch.float)  # the failing queries have the largest sigma
    r = M.recall_by_sigma_decile(scores, sigma, n_bins=10)
    assert r == [1.0] * 5 + [0.0] * 5
    r = M.recall_by_sigma_decile(scores, -sigma, n_bins=4)
    assert r == [0.0, 0.0, 1.0, 1.0]
    assert all(math.isnan(v) for v in M.recall_by_sigma_decile(torch.eye(3), torch.arange(3), n_bins=5)[3:])


def test_pair_probe_accuracy():
    t = torch.tensor([1.0, 2.0, 3.0, 0.0])
    f = torch.tensor([0.0, 3.0, 3.0, float("nan")])
    assert M.pair_probe_accuracy(t, f) == pytest.approx((1 + 0 + 0.5 + 0) / 4)


def test_effective_rank_of_non_finite_embeddings_is_nan():
    emb = torch.randn(8, 4)
    emb[2, 1] = float("nan")
    assert math.isnan(M.effective_rank(emb))
