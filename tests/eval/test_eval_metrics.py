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


def _brute_force_plausible(scores, positive):
    """One query at a time, plain Python: the pessimistic order puts, among equal scores, non-positives first."""
    rank, rp, ap = [], [], []
    for s, p in zip(scores.tolist(), positive.tolist()):
        order = sorted(range(len(s)), key=lambda c: (-s[c], p[c]))
        hits = [p[c] for c in order]
        r = sum(p)
        if r == 0:
            rank.append(len(s) + 1), rp.append(math.nan), ap.append(math.nan)
            continue
        rank.append(hits.index(True) + 1)
        rp.append(sum(hits[:r]) / r)
        ap.append(sum(sum(hits[:k + 1]) / (k + 1) for k in range(r) if hits[k]) / r)
    return rank, rp, ap


def test_plausible_ranking_against_brute_force_with_ties():
    g = torch.Generator().manual_seed(3)
    for q, c in ((7, 9), (12, 5), (30, 30)):
        scores = torch.randint(0, 4, (q, c), generator=g).float()  # few values: many ties
        positive = torch.rand(q, c, generator=g) < 0.3
        positive[0] = False  # a query without positives
        out = M.plausible_ranking(scores, positive, block=4)
        rank, rp, ap = _brute_force_plausible(scores, positive)
        assert out["rank"].tolist() == rank
        assert out["rank"].tolist() == M.multi_positive_ranks(scores, positive).tolist()
        np.testing.assert_allclose(out["rprecision"].numpy(), rp, equal_nan=True)
        np.testing.assert_allclose(out["map_at_r"].numpy(), ap, equal_nan=True)
        assert out["n_positive"].tolist() == positive.sum(1).tolist()
        continuous = torch.randn(q, c, generator=g, dtype=torch.float64)
        out = M.plausible_ranking(continuous, positive)
        rank, rp, ap = _brute_force_plausible(continuous, positive)
        np.testing.assert_allclose(out["map_at_r"].numpy(), ap, equal_nan=True)


def test_plausible_ranking_oracle_and_known_answers():
    g = torch.Generator().manual_seed(5)
    positive = torch.rand(20, 30, generator=g) < 0.2
    positive[:, 0] = True
    oracle = positive.float() + 0.1 * torch.rand(20, 30, generator=g)  # every positive above every non-positive
    out = M.plausible_ranking(oracle, positive)
    assert (out["rank"] == 1).all() and (out["rprecision"] == 1).all() and (out["map_at_r"] == 1).all()
    # one query, positives at ranks 1 and 3 of 4 (R = 2): R-Precision 1/2, mAP@R = (1/1) / 2 (rank 3 is past R)
    out = M.plausible_ranking(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), torch.tensor([[True, False, True, False]]))
    assert out["rprecision"].item() == 0.5 and out["map_at_r"].item() == 0.5 and out["rank"].item() == 1
    # a collapsed scorer (every score equal) ranks every positive last
    out = M.plausible_ranking(torch.zeros(1, 4), torch.tensor([[True, False, True, False]]))
    assert out["rank"].item() == 3 and out["rprecision"].item() == 0.0 and out["map_at_r"].item() == 0.0


def test_binned_means_and_ties():
    n = 20
    hits = torch.cat([torch.ones(10), torch.zeros(10)])
    sigma = torch.arange(n, dtype=torch.float)  # the failing queries have the largest sigma
    assert M.binned_means(hits, sigma, 10) == [1.0] * 5 + [0.0] * 5
    assert M.binned_means(hits, -sigma, 4) == [0.0, 0.0, 1.0, 1.0]
    assert all(math.isnan(v) for v in M.binned_means(torch.ones(3), torch.arange(3), 5)[3:])
    # a constant uncertainty says nothing: every bin gets the overall mean, whatever the input order
    assert M.binned_means(hits, torch.zeros(n), 4) == [0.5] * 4
    # tie groups are averaged: {0, 1} share a value, so each counts (1 + 0) / 2
    assert M.binned_means(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 2.0]), 4) == [
        0.5, 0.5, 1.0, 1.0]
    assert M.tie_averaged(torch.tensor([1.0, 0.0, 4.0]), torch.tensor([2, 2, 1])).tolist() == [0.5, 0.5, 4.0]


def test_risk_coverage_known_answers():
    hits = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # most certain first: hits at coverage 1/4 and 2/4, then misses: risks 0, 0, 1/3, 1/2
    np.testing.assert_allclose(M.risk_coverage(hits, torch.tensor([0.0, 1, 2, 3])).numpy(), [0, 0, 1 / 3, 1 / 2])
    # reversed: the misses kept first
    np.testing.assert_allclose(M.risk_coverage(hits, torch.tensor([3.0, 2, 1, 0])).numpy(), [1, 1, 2 / 3, 1 / 2])
    # all tied: the expectation over orders is the overall risk at every coverage (the random AURC)
    np.testing.assert_allclose(M.risk_coverage(hits, torch.zeros(4)).numpy(), [0.5] * 4)
    # brute force: the mean over every order of a tie group equals the tie-averaged curve
    import itertools
    h, u = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0])
    curves = []
    for perm in itertools.permutations([1, 2, 3]):
        order = [0, *perm, 4]
        curves.append([1 - sum(h[order[:k]].tolist()) / k for k in range(1, 6)])
    np.testing.assert_allclose(M.risk_coverage(h, u).numpy(), np.mean(curves, 0))


def test_ols_against_numpy_and_a_known_answer():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.ones(50, 1, dtype=torch.float64), torch.randn(50, 3, generator=g, dtype=torch.float64)], 1)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64) + torch.randn(50, generator=g, dtype=torch.float64)
    coef, se = M.ols(y, x)
    ref, rss, *_ = np.linalg.lstsq(x.numpy(), y.numpy(), rcond=None)
    ref_se = np.sqrt(rss[0] / (50 - 4) * np.diag(np.linalg.inv(x.numpy().T @ x.numpy())))
    np.testing.assert_allclose(coef.numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(se.numpy(), ref_se, rtol=1e-10)
    # y = 2 + 3 t exactly: coefficients (2, 3), standard errors 0
    t = torch.arange(6, dtype=torch.float64)
    coef, se = M.ols(2 + 3 * t, torch.stack([torch.ones(6, dtype=torch.float64), t], 1))
    np.testing.assert_allclose(coef.numpy(), [2.0, 3.0], atol=1e-12)
    np.testing.assert_allclose(se.numpy(), [0.0, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match="rank"):
        M.ols(y, torch.cat([x, x[:, 1:2]], 1))


def test_pair_probe_accuracy():
    t = torch.tensor([1.0, 2.0, 3.0, 0.0])
    f = torch.tensor([0.0, 3.0, 3.0, float("nan")])
    assert M.pair_probe_accuracy(t, f) == pytest.approx((1 + 0 + 0.5 + 0) / 4)


def test_effective_rank_of_non_finite_embeddings_is_nan():
    emb = torch.randn(8, 4)
    emb[2, 1] = float("nan")
    assert math.isnan(M.effective_rank(emb))


# Multi-positive retrieval: image i's positives are texts j with groups[j] == groups[i].
MULTI_SCORES = torch.tensor([[0.1, 0.9, 0.5, 0.2],
                             [0.3, 0.2, 0.3, 0.8],
                             [0.9, 0.9, 0.1, 0.0],
                             [float("nan"), 0.0, 0.0, 0.5]])
MULTI_GROUPS = torch.tensor([7, 7, 1, 2])  # captions 0 and 1 are the same string


def test_multi_positive_ranks_known_values():
    positive = M.same_group(MULTI_GROUPS)
    # i2t, by hand: row 0 best positive 0.9, no non-positive >= it -> 1; row 1 best positive 0.3, text 2 ties
    # (pessimistic) and text 3 beats it -> 3; row 2: texts 0, 1 beat 0.1 -> 3; row 3 (NaN = -inf) -> 1.
    assert M.multi_positive_ranks(MULTI_SCORES, positive).tolist() == [1, 3, 3, 1]
    assert M.positive_ranks(MULTI_SCORES, torch.arange(4)).tolist() == [4, 4, 3, 1]  # strict, for contrast
    # t2i: column 0 best positive 0.3 < image 2's 0.9 -> 2; column 1: 0.9 ties image 2 -> 2; column 2 -> 3;
    # column 3: 0.5 < 0.8 -> 2.
    assert M.multi_positive_ranks(MULTI_SCORES.T, positive).tolist() == [2, 2, 3, 2]
    r = M.retrieval_recall(MULTI_SCORES, ks=(1, 2, 3), groups=MULTI_GROUPS)
    assert (r["i2t_r@1"], r["i2t_r@2"], r["i2t_r@3"]) == (0.5, 0.5, 1.0)
    assert (r["t2i_r@1"], r["t2i_r@2"], r["t2i_r@3"]) == (0.0, 0.75, 1.0)
    # Ties with non-positives stay pessimistic: a collapsed model misses unless every candidate is a positive.
    assert M.retrieval_recall(torch.ones(4, 4), ks=(1,), groups=MULTI_GROUPS)["i2t_r@1"] == 0.0
    assert M.retrieval_recall(torch.ones(3, 3), ks=(1,), groups=torch.zeros(3))["i2t_r@1"] == 1.0


def test_multi_positive_ranks_with_one_positive_equal_strict_ranks():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (30, 30), generator=g).float()  # many ties
    diag = torch.arange(30)
    assert torch.equal(M.multi_positive_ranks(scores, M.same_group(diag)), M.positive_ranks(scores, diag))
    assert M.retrieval_recall(scores, groups=diag) == M.retrieval_recall(scores)


def test_oracle_with_duplicate_captions_scores_one_only_multi_positive():
    g = torch.Generator().manual_seed(4)
    groups = torch.randint(0, 5, (40,), generator=g)  # 40 pairs, 5 distinct captions
    emb = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)[groups]
    scores = emb @ emb.T  # image i embeds like its caption
    multi, strict = M.retrieval_recall(scores, ks=(1,), groups=groups), M.retrieval_recall(scores, ks=(1,))
    assert multi == {"i2t_r@1": 1.0, "t2i_r@1": 1.0}
    assert strict["i2t_r@1"] < 1.0 and strict["t2i_r@1"] < 1.0
    same = M.same_group(groups)
    assert (M.plausible_ranking(scores, same)["rank"] == 1).all()  # identical captions: ties among positives


def test_percentile_ranks():
    assert M.percentile_ranks(torch.tensor([3.0, 1, 2, 2])).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert M.percentile_ranks(torch.tensor([5.0])).tolist() == [0.5]


def test_partial_spearman_known_value():
    # Spearman by hand (no ties, 1 - 6 sum d^2 / (n (n^2 - 1))): r_xy = 0.8, r_xz = 0.8, r_yz = 0.4.
    x, y, z = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 3, 2, 4]), torch.tensor([1, 2, 4, 3])
    expected = (0.8 - 0.8 * 0.4) / math.sqrt((1 - 0.8 ** 2) * (1 - 0.4 ** 2))  # 0.8729
    assert M.partial_spearman(x, y, z) == pytest.approx(expected)
    # y a monotone function of z: nothing left beyond z -> 0; a constant input -> NaN.
    assert M.partial_spearman(x, -z, z) == 0.0
    assert math.isnan(M.partial_spearman(x, y, torch.ones(4)))


def test_partial_spearman_matches_residual_correlation_of_ranks():
    # Independent route: regress the scipy ranks of x and y on those of z, correlate the residuals.
    rng = np.random.default_rng(1)
    for _ in range(5):
        z = rng.integers(0, 6, 300)
        x = z + rng.integers(0, 4, 300)  # ties in every variable
        y = -z + rng.normal(size=300).round(1) + 0.3 * x
        rx, ry, rz = (stats.rankdata(v) for v in (x, y, z))
        design = np.stack([np.ones_like(rz), rz], 1)
        res_x = rx - design @ np.linalg.lstsq(design, rx, rcond=None)[0]
        res_y = ry - design @ np.linalg.lstsq(design, ry, rcond=None)[0]
        expected = stats.pearsonr(res_x, res_y).statistic
        got = M.partial_spearman(torch.tensor(x), torch.tensor(y), torch.tensor(z))
        assert got == pytest.approx(expected, abs=1e-10)
