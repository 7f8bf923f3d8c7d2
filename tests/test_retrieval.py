"""The benchmarks' metric engine (probloss/eval/retrieval.py) and uncertainty evaluation (probloss/eval/uncertainty.py)
against a plain-Python reference written from the definitions (loops, float64; Musgrave et al. 2020 with
pessimistic ties), hand-worked score matrices, a perfect scorer, the COCO 1K fold protocol, known answers of the
uncertainty curves, and agreement with the built-in evaluator (every loss's scores; the shapes test split's keys)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import probloss
from probloss.eval import dual_encoder as evaluate_module, metrics
from probloss.eval.retrieval import fold_summary, positive_pairs, rank_block, rank_retrieval, summarize
from probloss.eval.uncertainty import benchmark_uncertainty, plot_uncertainty_bins

# --- the reference ----------------------------------------------------------------------------------------------


def reference_query(scores: list[float], positive: list[bool]) -> tuple[int, float, float, int]:
    """(rank, R-Precision, mAP@R, R) of one query: sort by score, highest first, a non-positive before a positive
    of equal score (pessimistic ties); NaN = -inf."""
    s = [-math.inf if math.isnan(v) else v for v in scores]
    order = sorted(range(len(s)), key=lambda c: (-s[c], positive[c]))  # False (non-positive) sorts first
    hits = [positive[c] for c in order]
    r = sum(hits)
    if r == 0:
        return len(s) + 1, math.nan, math.nan, 0
    rank = hits.index(True) + 1
    rprecision = sum(hits[:r]) / r
    found, total = 0, 0.0
    for k, hit in enumerate(hits[:r], start=1):
        if hit:
            found += 1
            total += found / k
    return rank, rprecision, total / r, r


def reference_summary(matrix: list[list[float]], pairs: set[tuple[int, int]], ks=(1, 5, 10),
                      image_queries=None, caption_queries=None) -> dict[str, float]:
    n_img, n_txt = len(matrix), len(matrix[0])
    out = {}
    for d, queries, rows in (
            ("i2t", image_queries or range(n_img),
             lambda i: (matrix[i], [(i, c) in pairs for c in range(n_txt)])),
            ("t2i", caption_queries or range(n_txt),
             lambda c: ([matrix[i][c] for i in range(n_img)], [(i, c) in pairs for i in range(n_img)]))):
        results = [reference_query(*rows(q)) for q in queries]
        results = [r for r in results if r[3] > 0]
        for k in ks:
            out[f"{d}_r@{k}"] = sum(r[0] <= k for r in results) / len(results)
        out[f"{d}_rprecision"] = sum(r[1] for r in results) / len(results)
        out[f"{d}_map@r"] = sum(r[2] for r in results) / len(results)
        out[f"{d}_n_queries"] = float(len(results))
    return out


class MatrixLoss(nn.Module):
    """A "loss" that reads its scores off a fixed matrix ``m``: the "embedding" of item i is its index, (N, 1)."""

    needs_log_std = False

    def __init__(self, m: torch.Tensor):
        super().__init__()
        self.m = m

    def score(self, x, y, x_log_std=None, y_log_std=None):
        return self.m[x[:, 0].long()][:, y[:, 0].long()].to(x.dtype)


def by_matrix(m) -> tuple[MatrixLoss, torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(m, dtype=torch.float64)
    return (MatrixLoss(m), torch.arange(m.shape[0], dtype=torch.float64)[:, None],
            torch.arange(m.shape[1], dtype=torch.float64)[:, None])


def assert_close_summary(got: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


# --- ranking ----------------------------------------------------------------------------------------------------


def test_rank_block_equals_the_reference_and_plausible_ranking_with_ties_nan_and_any_number_of_positives():
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        q, c = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 30, (1,), generator=gen))
        scores = torch.randint(0, 4, (q, c), generator=gen).float()  # few values: many ties
        scores[torch.rand(q, c, generator=gen) < 0.1] = math.nan
        positive = torch.rand(q, c, generator=gen) < torch.rand(q, 1, generator=gen)  # 0, 1 .. all positives
        positive[0] = False  # always a query without positives
        got, sorted_ = rank_block(scores, positive), metrics.plausible_ranking(scores, positive)
        for row in range(q):
            rank, rprec, map_r, r = reference_query(scores[row].tolist(), positive[row].tolist())
            assert got["rank"][row] == rank == sorted_["rank"][row], (trial, row)
            assert got["n_positive"][row] == r
            for key, want in (("rprecision", rprec), ("map_at_r", map_r)):
                if math.isnan(want):
                    assert math.isnan(got[key][row]) and math.isnan(sorted_[key][row])
                else:
                    assert got[key][row].item() == pytest.approx(want, abs=1e-12)
                    assert got[key][row].item() == pytest.approx(sorted_[key][row].item(), abs=1e-15)
        assert torch.equal(got["rprecision"].nan_to_num(-1), sorted_["rprecision"].nan_to_num(-1))
        free = metrics.training_free(scores)  # the top-1 score and margin come from the same pass
        assert torch.equal(got["top1"], free["top1"]) and torch.equal(got["margin"], free["margin"])


def test_hand_worked_3x6_matrix_two_captions_per_image():
    # rows: images 0..2, columns: captions 0..5; captions 2i and 2i+1 belong to image i
    m = [[0.9, 0.1, 0.8, 0.2, 0.3, 0.4],   # order c0+ c2 c5 c4 c3 c1+: rank 1, top-2 [hit, miss]: RP 1/2, mAP 1/2
         [0.7, 0.2, 0.7, 0.6, 0.1, 0.0],   # tie at 0.7: c0 (non-positive) first, then c2+ c3+: rank 2, RP 1/2,
                                           # mAP (1/2)(1/2) = 1/4
         [0.0, 0.1, 0.2, 0.3, 0.5, 0.4]]   # c4+ c5+ first: rank 1, RP 1, mAP 1
    loss, x, y = by_matrix(m)
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2])
    for block in (1, 2, 256):
        out = summarize(rank_retrieval(loss, x, y, None, None, positive_pairs(caption_image), block=block))
        assert out["i2t_r@1"] == pytest.approx(2 / 3)
        assert out["i2t_r@5"] == 1.0
        assert out["i2t_rprecision"] == pytest.approx((0.5 + 0.5 + 1) / 3)
        assert out["i2t_map@r"] == pytest.approx((0.5 + 0.25 + 1) / 3)
        # caption queries, one positive each; columns: c0 [.9 .7 0] own 0: rank 1; c1 [.1 .2 .1] own 0: .2 above
        # and .1 tied: rank 3; c2 [.8 .7 .2] own 1: rank 2; c3 rank 1; c4 rank 1; c5 [.4 0 .4] own 2: tie, rank 2
        assert out["t2i_r@1"] == pytest.approx(3 / 6)
        assert out["t2i_r@5"] == 1.0
        assert out["t2i_rprecision"] == out["t2i_map@r"] == pytest.approx(3 / 6)  # R = 1: both equal R@1
        assert out["rsum"] == pytest.approx(100 * (2 / 3 + 1 + 1 + 0.5 + 1 + 1))
    # an extra positive (image 0, caption 2): image 0 ranks c0+ c2+ c5 c4 c3 c1+, R = 3: RP 2/3, mAP (1 + 1)/3;
    # caption 2's best positive is now image 0 (0.8): rank 1
    extra = summarize(rank_retrieval(loss, x, y, None, None, positive_pairs(caption_image, torch.tensor([[0, 2]]))))
    assert extra["i2t_rprecision"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert extra["i2t_map@r"] == pytest.approx((2 / 3 + 0.25 + 1) / 3)
    assert extra["t2i_r@1"] == pytest.approx(4 / 6)


def test_rank_retrieval_equals_the_reference_on_random_tied_scores_with_query_subsets_and_blocks():
    gen = torch.Generator().manual_seed(1)
    n_img, n_txt = 13, 31
    m = torch.randint(-2, 3, (n_img, n_txt), generator=gen).double()  # integer scores: ties everywhere
    loss, x, y = by_matrix(m)
    caption_image = torch.randint(0, n_img - 1, (n_txt,), generator=gen)  # the last image has no caption
    extra = torch.stack([torch.randint(0, n_img - 1, (20,), generator=gen),
                         torch.randint(0, n_txt, (20,), generator=gen)], 1)
    pos = positive_pairs(caption_image, extra)
    pairs = {tuple(p) for p in pos.tolist()}
    assert len(pairs) == len(pos) and (n_img - 1) not in {i for i, _ in pairs}  # an image query without positives
    image_queries, caption_queries = [0, 3, 12, 5], [30, 2, 7, 7, 11]
    want_all = reference_summary(m.tolist(), pairs)
    want_sub = reference_summary(m.tolist(), pairs, image_queries=image_queries, caption_queries=caption_queries)
    for block in (1, 4, 7, 1000):
        assert_close_summary(summarize(rank_retrieval(loss, x, y, None, None, pos, block=block)), want_all)
        sub = rank_retrieval(loss, x, y, None, None, pos, image_queries=torch.tensor(image_queries),
                             caption_queries=torch.tensor(caption_queries), block=block)
        assert sub["i2t"]["query"].tolist() == image_queries
        assert_close_summary(summarize(sub), want_sub)
    only_captions = rank_retrieval(loss, x, y, None, None, pos, image_queries=torch.arange(0))
    assert only_captions["i2t"]["rank"].shape == (0,) and only_captions["t2i"]["rank"].shape == (n_txt,)
    assert math.isnan(summarize(only_captions)["i2t_r@1"])
    unc = benchmark_uncertainty(only_captions, None, None)
    assert unc and all("/t2i_" in key for key in unc)  # no image queries: no i2t keys
    done = []
    rank_retrieval(loss, x, y, None, None, pos, block=5, progress=done.append)
    assert sum(done) == n_img + n_txt
    with pytest.raises(ValueError, match=r"within 13 images and 31 captions, got images 0\.\.13 and captions 0\.\.30"):
        rank_retrieval(loss, x, y, None, None, torch.cat([pos, torch.tensor([[13, 0]])]))


def test_a_perfect_scorer_scores_one_everywhere_with_extra_positives():
    gen = torch.Generator().manual_seed(2)
    caption_image = torch.arange(8).repeat_interleave(5)
    pos = positive_pairs(caption_image, torch.stack([torch.randint(0, 8, (15,), generator=gen),
                                                     torch.randint(0, 40, (15,), generator=gen)], 1))
    m = torch.zeros(8, 40)
    m[pos[:, 0], pos[:, 1]] = 1.0  # every positive above every non-positive (ties among positives)
    loss, x, y = by_matrix(m)
    out = summarize(rank_retrieval(loss, x, y, None, None, pos, block=3))
    assert all(out[f"{d}_{k}"] == 1.0 for d in ("i2t", "t2i") for k in ("r@1", "r@5", "r@10", "rprecision", "map@r"))
    assert out["rsum"] == 600.0


def test_float32_and_float64_embeddings_give_the_same_numbers_with_a_real_loss():
    gen = torch.Generator().manual_seed(3)
    loss = probloss.build_loss("gaussian_var")
    x64, y64 = (torch.randn(n, 8, generator=gen, dtype=torch.float64) for n in (40, 120))
    lx, ly = (0.3 * torch.randn(n, generator=gen, dtype=torch.float64) for n in (40, 120))
    pos = positive_pairs(torch.arange(40).repeat_interleave(3))
    a = summarize(rank_retrieval(loss, x64, y64, lx, ly, pos, block=16))
    b = summarize(rank_retrieval(loss, x64.float(), y64.float(), lx.float(), ly.float(), pos, block=16))
    assert a == pytest.approx(b, abs=1e-12)
    assert 0 < a["i2t_r@10"] < 1  # not a degenerate case


def test_fold_summary_is_the_mean_over_folds_of_consecutive_images_with_their_captions():
    gen = torch.Generator().manual_seed(4)
    n_img = 7  # 3 folds of 2 images; the 7th image is left out, as COCO 1K uses the first 5000
    caption_image = torch.arange(n_img).repeat_interleave(2)
    m = torch.randint(-2, 3, (n_img, 2 * n_img), generator=gen).double()
    loss, x, y = by_matrix(m)
    extra = torch.tensor([[0, 3], [0, 4]])  # (0, 3) lies in fold 0 (caption 3 is image 1's); (0, 4) crosses folds
    got = fold_summary(loss, x, y, None, None, caption_image, extra, n_folds=3, fold_size=2, block=3)
    folds = []
    for f in range(3):
        images, captions = [2 * f, 2 * f + 1], [4 * f + k for k in range(4)]
        pairs = {(i - 2 * f, c - 4 * f) for c in captions for i in images if caption_image[c] == i}
        pairs |= {(0, 3)} if f == 0 else set()
        sub = [[m[i][c].item() for c in captions] for i in images]
        folds.append(reference_summary(sub, pairs))
    for key in folds[0]:
        assert got[key] == pytest.approx(sum(s[key] for s in folds) / 3, abs=1e-12), key
    with pytest.raises(ValueError, match="3 folds of 3 images need 9 images, got 7"):
        fold_summary(loss, x, y, None, None, caption_image, n_folds=3, fold_size=3)


# --- uncertainty --------------------------------------------------------------------------------------------------


def _hit_or_miss(miss: torch.Tensor) -> tuple[MatrixLoss, torch.Tensor, torch.Tensor]:
    """n images x n captions (caption i = image i's): query i ranks its positive first unless ``miss[i]``, where
    the next item scores higher (both directions)."""
    n = miss.numel()
    m = torch.diag(torch.where(miss, 0.4, 1.0)).double()
    m[torch.arange(n), (torch.arange(n) + 1) % n] = 0.5
    return by_matrix(m)


def test_sigma_equal_to_the_miss_indicator_gives_a_falling_curve_and_the_oracle_aurc():
    miss = torch.rand(200, generator=torch.Generator().manual_seed(5)) < 0.35
    loss, x, y = _hit_or_miss(miss)
    pos = positive_pairs(torch.arange(200))
    per_query = rank_retrieval(loss, x, y, None, None, pos, block=64)
    assert torch.equal(per_query["i2t"]["rank"] > 1, miss) and torch.equal(per_query["t2i"]["rank"] > 1, miss)
    log_std = miss.double()  # sigma = e for a miss, 1 for a hit
    out = benchmark_uncertainty(per_query, log_std, log_std)
    for d in ("i2t", "t2i"):
        curve = [out[f"unc/{d}_bin_{b}_r@1"] for b in range(10)]
        assert all(a >= b for a, b in zip(curve, curve[1:])) and curve[0] == 1.0 and curve[-1] == 0.0
        assert out[f"unc/{d}_aurc"] == pytest.approx(out[f"unc/{d}_aurc_oracle"], abs=1e-12)
        assert out[f"unc/{d}_aurc_random"] == pytest.approx(miss.double().mean().item())
        assert out[f"unc/{d}_bin_r@1_spearman"] < -0.8
        assert out[f"unc/{d}_bin_0_map@r"] == 1.0 and out[f"unc/{d}_bin_9_map@r"] == 0.0  # R = 1: the hit
    # 10 bins x 2 curves + 2 spearmans + 3 aurcs, per direction, for sigma and the two training-free sources
    assert len(out) == 2 * 3 * 25
    no_sigma = benchmark_uncertainty(per_query, None, None)
    assert no_sigma and all(k.startswith("unc/free/") for k in no_sigma)
    assert set(no_sigma) == {k for k in out if k.startswith("unc/free/")}


def test_a_graded_sigma_gives_spearman_minus_one_and_random_sigma_the_random_aurc():
    # bin b (20 queries, sorted by sigma) holds 20 - 2b hits: R@1 falls strictly from 1.0 to 0.1
    miss = torch.cat([torch.arange(20) >= 20 - 2 * b for b in range(10)])
    loss, x, y = _hit_or_miss(miss)
    per_query = rank_retrieval(loss, x, y, None, None, positive_pairs(torch.arange(200)))
    graded = torch.arange(200).double() / 200  # increasing sigma: the bins are the blocks above
    out = benchmark_uncertainty(per_query, graded.log(), graded.log())
    assert [out[f"unc/i2t_bin_{b}_r@1"] for b in range(10)] == pytest.approx([1 - b / 10 for b in range(10)])
    assert out["unc/i2t_bin_r@1_spearman"] == -1.0 and out["unc/t2i_bin_map@r_spearman"] == -1.0
    # a sigma unrelated to the hits: AURC about 1 - R@1 (the random reference), far from the oracle
    miss = torch.rand(2000, generator=torch.Generator().manual_seed(6)) < 0.5
    loss, x, y = _hit_or_miss(miss)
    per_query = rank_retrieval(loss, x, y, None, None, positive_pairs(torch.arange(2000)), block=1024)
    noise = torch.randn(2000, generator=torch.Generator().manual_seed(7))
    out = benchmark_uncertainty(per_query, noise, noise)
    assert out["unc/i2t_aurc"] == pytest.approx(out["unc/i2t_aurc_random"], abs=0.03)
    assert out["unc/i2t_aurc"] > out["unc/i2t_aurc_oracle"] + 0.2
    assert abs(out["unc/i2t_bin_r@1_spearman"]) < 1


def test_the_benchmark_curves_and_the_built_in_evaluators_are_one_definition():
    gen = torch.Generator().manual_seed(8)
    n = 60
    scores = torch.randint(0, 6, (n, n), generator=gen).float()
    image_log_std, text_log_std = torch.randn(n, generator=gen), torch.randn(n, 3, generator=gen)
    positive = torch.eye(n, dtype=torch.bool)
    per_query = {"i2t": metrics.plausible_ranking(scores, positive), "t2i": metrics.plausible_ranking(scores.T, positive)}
    built_in = evaluate_module._uncertainty_vs_retrieval(scores, per_query, image_log_std, text_log_std, n_bins=10)
    loss, x, y = by_matrix(scores)
    ours = benchmark_uncertainty(rank_retrieval(loss, x, y, None, None, positive_pairs(torch.arange(n)), block=7),
                                 image_log_std, text_log_std)
    shared = [k for k in ours if "r@1" in k or "aurc" in k]
    assert len(shared) == 2 * 3 * 14
    assert {k: ours[k] for k in shared} == pytest.approx({k: built_in[k] for k in shared}, nan_ok=True)
    # R = 1: mAP@R and R-Precision are both the hit at rank 1, so these curves agree too
    assert ours["unc/t2i_bin_4_map@r"] == pytest.approx(built_in["unc/t2i_bin_4_rprecision"])


def test_plot_uncertainty_bins_writes_a_png_from_prefixed_keys(tmp_path):
    miss = torch.rand(100, generator=torch.Generator().manual_seed(9)) < 0.4
    loss, x, y = _hit_or_miss(miss)
    out = benchmark_uncertainty(rank_retrieval(loss, x, y, None, None, positive_pairs(torch.arange(100))),
                                miss.double(), miss.double())
    path = plot_uncertainty_bins({f"karpathy/{k}": v for k, v in out.items()}, tmp_path / "karpathy.png", "karpathy")
    assert path == tmp_path / "karpathy.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no unc/..._bin_<b>_<metric> keys in the results for 'wds'"):
        plot_uncertainty_bins({"wds/i2t_r@1": 0.5}, tmp_path / "wds.png", "wds")
    assert not (tmp_path / "wds.png").exists()


# --- agreement with the built-in evaluator ---------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_rank_retrieval_with_every_loss_ranks_as_the_built_in_score_matrix(loss_name):
    loss = probloss.build_loss(loss_name)
    gen = torch.Generator().manual_seed(10)
    x, y = torch.randn(20, 8, generator=gen), torch.randn(60, 8, generator=gen)
    lx, ly = (0.3 * torch.randn(n, generator=gen) if loss.needs_log_std else None for n in (20, 60))
    caption_image = torch.arange(20).repeat_interleave(3)
    pos = positive_pairs(caption_image, torch.tensor([[0, 5], [7, 59]]))
    dense = torch.zeros(20, 60, dtype=torch.bool)
    dense[pos[:, 0], pos[:, 1]] = True
    scores = evaluate_module.score_matrix(loss, x, y, lx, ly).float()
    ours = rank_retrieval(loss, x, y, lx, ly, pos, block=8)
    for d, s, p in (("i2t", scores, dense), ("t2i", scores.T, dense.T)):
        want = metrics.plausible_ranking(s, p)
        assert torch.equal(ours[d]["rank"], want["rank"]), loss_name
        assert torch.equal(ours[d]["rprecision"], want["rprecision"])
        assert torch.allclose(ours[d]["map_at_r"], want["map_at_r"], rtol=0, atol=1e-15)
        assert 1 < want["rank"].float().mean() < s.shape[1]  # neither perfect nor degenerate


def _shapes_eval_set(tokenizer, n: int):
    import numpy as np

    from probloss.data import shapes

    samples = [shapes.generate_sample(3, shapes.TEST_INDEX_OFFSET + i, 32) for i in range(n)]
    images = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
                          for img, _, _ in samples])
    captions = [caption for _, caption, _ in samples]

    class EvalSet:
        pass

    eval_set = EvalSet()
    eval_set.images, eval_set.tokens, eval_set.captions = images, tokenizer(captions), captions
    eval_set.json = [meta for _, _, meta in samples]
    return eval_set


def test_the_engine_on_the_built_in_scores_gives_the_built_in_evaluators_numbers_on_shapes():
    """The shapes test split's retrieval keys (exact strings, plausible matches) and uncertainty curves, from the
    built-in evaluator and from rank_retrieval / summarize / benchmark_uncertainty on the same scores."""
    from probloss.training.builders import make_tokenizer, make_trainee
    from probloss.training.config import compose_config
    from probloss.data import shapes
    from probloss.eval import evaluate
    from probloss.training.settings import RunSettings

    run = RunSettings.from_config(compose_config(["loss=gaussian_var", "model=tiny"]))
    tokenizer = make_tokenizer(run)
    torch.manual_seed(0)
    trainee = make_trainee(run, tokenizer)
    model, loss = trainee.model.eval(), trainee.loss
    eval_set = _shapes_eval_set(tokenizer, 48)
    built_in = evaluate(model, loss, eval_set, tokenizer)

    image_emb, image_log_std = evaluate_module.encode_images(model, eval_set.images)
    text_emb, text_log_std = evaluate_module.encode_texts(model, eval_set.tokens)
    scores = evaluate_module.score_matrix(loss, image_emb, text_emb, image_log_std, text_log_std).float()
    fixed, x, y = by_matrix(scores)  # the evaluator's own scores, so only the metric code is compared
    ids: dict[str, int] = {}
    exact = metrics.same_group(torch.tensor([ids.setdefault(c, len(ids)) for c in eval_set.captions]))
    plausible = exact | shapes.plausible_matrix(eval_set.captions, eval_set.json)
    assert exact.sum() > 48 and plausible.sum() > exact.sum()  # repeated captions, extra plausible positives
    n = torch.arange(48)
    exact_q = rank_retrieval(fixed, x, y, None, None, positive_pairs(n, exact.nonzero()), block=10)
    plausible_q = rank_retrieval(fixed, x, y, None, None, positive_pairs(n, plausible.nonzero()), block=10)
    ours, ours_plausible = summarize(exact_q), summarize(plausible_q, ks=(1, 5))
    for d in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert ours[f"{d}_r@{k}"] == built_in[f"val/{d}_r@{k}"]
        for k in (1, 5):
            assert ours_plausible[f"{d}_r@{k}"] == built_in[f"val/{d}_r@{k}_plausible"]
        assert ours_plausible[f"{d}_rprecision"] == built_in[f"val/{d}_rprecision"]
        assert ours_plausible[f"{d}_map@r"] == pytest.approx(built_in[f"val/{d}_map@r"], abs=1e-15)
    unc = benchmark_uncertainty(plausible_q, image_log_std, text_log_std)
    shared = [k for k in unc if "map@r" not in k]  # the built-in bins R-Precision where the benchmarks bin mAP@R
    assert len(shared) == 2 * 3 * 14 and set(shared) <= set(built_in)
    assert {k: unc[k] for k in shared} == pytest.approx({k: built_in[k] for k in shared}, nan_ok=True)
