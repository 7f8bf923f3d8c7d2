"""The report's statistics: 95% intervals (clipped, non-finite values counted), paired verdicts, LR-robust width."""

import math
import random

import pytest

from probloss.studies.render import fmt_ci, fmt_width
from probloss.studies.stats import (
    T_975, adjusted_verdict, diff_range, draw_means, holm, incomplete_beta, lr_robust_width, lr_robustness, mean_ci,
    metric_direction, metric_range, paired_p, row_value, score_table, t_two_sided_p, verdict, width_verdict,
)

NAN = float("nan")


def test_mean_ci_matches_student_t():
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3 and ci.n_nonfinite == 0
    assert ci.half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert (ci.low, ci.high) == pytest.approx((2.0 - ci.half, 2.0 + ci.half)) and not ci.clipped
    one = mean_ci([5.0])
    assert one.mean == 5.0 and one.n == 1 and math.isnan(one.half) and math.isnan(one.low)
    assert math.isnan(mean_ci([NAN]).mean) and mean_ci([NAN]).n == 0


def test_t_table_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof, t in enumerate(T_975, start=1):
        assert t == pytest.approx(stats.t.ppf(0.975, dof), abs=6e-4)


def test_nonfinite_values_are_counted_not_dropped_silently():
    ci = mean_ci([0.2, NAN, 0.3, math.inf, None])  # None: the metric does not apply to that run
    assert ci.n == 2 and ci.n_nonfinite == 2 and ci.mean == pytest.approx(0.25)
    assert fmt_ci(ci).endswith("(2 of 4 seeds diverged)")
    assert fmt_ci(mean_ci([NAN, NAN])) == "- (2 of 2 seeds diverged)"
    assert fmt_ci(mean_ci([None, None])) == "-"
    # a run that stopped on a non-finite loss has no metrics: nan (counted), not None (not applicable)
    assert math.isnan(row_value({"status": "stopped", "error": "non-finite loss"}, "test/zeroshot_top1"))
    assert row_value({"status": "finished"}, "test/unc/specificity_spearman") is None
    assert math.isnan(row_value({"test/i2t_r@1": "nan"}, "test/i2t_r@1"))  # Optuna attrs keep nan as a string


def test_intervals_are_clipped_to_the_metric_range():
    ci = mean_ci([0.98, 1.0, 0.99, 1.0], metric_range("test/zeroshot_top1"))
    assert ci.high == 1.0 and ci.low == pytest.approx(ci.mean - ci.half) and ci.clipped
    assert fmt_ci(ci) == f"{ci.mean:.3f} [{ci.low:.3f}, 1.000]"
    low = mean_ci([1.0, 1.1, 3.0], metric_range("test/embed/effective_rank"))
    assert low.low == 1.0 and low.high == pytest.approx(low.mean + low.half)
    assert mean_ci([0.0, 1.0], metric_range("test/unc/specificity_spearman"))[2:4] == (-1.0, 1.0)
    assert mean_ci([0.0, 5.0], metric_range("stability/loss_spikes")).low == 0.0  # counts >= 0
    wide = mean_ci([-100.0, 100.0], metric_range("some/unknown_metric"))  # unknown: not clipped
    assert not wide.clipped and wide.low < -100
    assert diff_range("val/i2t_r@1") == (-1.0, 1.0) and diff_range("test/unc/specificity_spearman") == (-2.0, 2.0)
    diff = mean_ci([0.9, 1.0, -0.5], diff_range("test/relation_probe_acc"))
    assert (diff.low, diff.high) == (-1.0, 1.0)


def test_ranges_and_directions_by_key():
    for key in ("test/i2t_r@1", "val/t2i_r@5_strict", "test/i2t_r@1_L3", "test/zeroshot_unseen_top1",
                "image_noise_0.3/test/binding_probe_acc", "test/unc/specificity_matched_acc",
                "test/embed/participation_ratio_frac_image"):
        assert metric_range(key) == (0.0, 1.0), key
    assert metric_range("test/embed/uniformity") == (-8.0, 0.0)
    assert metric_range("test/loss") == (-math.inf, math.inf)
    for key in ("stability/loss_spikes", "stability/grad_norm_ratio", "embed/uniformity", "test/embed/uniformity",
                "test/unc/specificity_spearman", "test/unc/specificity_partial_spearman", "val/loss", "train/loss"):
        assert metric_direction(key) == -1, key
    for key in ("embed/modality_gap", "test/embed/alignment", "test/unc/sigma_text_rank_L0"):
        assert metric_direction(key) == 0, key
    for key in ("test/zeroshot_top1", "test/embed/effective_rank", "test/unc/specificity_matched_acc",
                "test/unc/sigma_text_ratio_L0_L3", "some/unknown_metric"):
        assert metric_direction(key) == 1, key


def test_paired_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    base, arm = [0.50, 0.55, 0.61, 0.58], [0.58, 0.60, 0.68, 0.63]
    diffs = [a - b for a, b in zip(arm, base)]
    ci = mean_ci(diffs, diff_range("test/zeroshot_top1"))
    low, high = stats.ttest_rel(arm, base).confidence_interval(0.95)
    assert ci.mean == pytest.approx(sum(diffs) / 4)
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-4)  # T_975 has 3 decimals
    assert 0 < ci.low and verdict("test/zeroshot_top1", ci) == "better"
    assert verdict("test/zeroshot_top1", mean_ci([-d for d in diffs])) == "worse"


@pytest.mark.parametrize("metric, diffs, word", [
    ("test/zeroshot_top1", [0.05, 0.06, 0.07], "better"),
    ("test/zeroshot_top1", [-0.05, -0.06, -0.07], "worse"),
    ("test/zeroshot_top1", [0.05, -0.01, 0.02], "inside noise"),
    ("test/zeroshot_top1", [0.30], "one seed"),
    ("test/zeroshot_top1", [0.30, NAN], "one seed"),  # the diverged pair does not count as a seed
    ("test/zeroshot_top1", [NAN, NAN], "no data"),
    ("stability/loss_spikes", [-2.0, -3.0, -2.5], "better"),  # lower is better
    ("test/embed/uniformity", [0.2, 0.3, 0.25], "worse"),
    ("test/unc/specificity_spearman", [-0.2, -0.3, -0.25], "better"),  # more negative: the stronger effect
    ("test/embed/modality_gap", [0.2, 0.3, 0.25], "higher"),  # no better direction
    ("test/embed/alignment", [-0.2, -0.3, -0.25], "lower"),
    ("test/embed/modality_gap", [0.2, -0.3, 0.25], "inside noise"),
])
def test_verdict_words(metric, diffs, word):
    assert verdict(metric, mean_ci(diffs, diff_range(metric))) == word


def test_incomplete_beta_and_t_tail_match_scipy():
    stats, special = pytest.importorskip("scipy.stats"), pytest.importorskip("scipy.special")
    rng = random.Random(0)
    for _ in range(500):
        a, b, x = rng.uniform(0.05, 60.0), rng.uniform(0.05, 60.0), rng.random()
        assert incomplete_beta(x, a, b) == pytest.approx(float(special.betainc(a, b, x)), rel=1e-7, abs=1e-12)
    for dof in (1, 2, 3, 4, 5, 7, 11, 29, 30, 31, 100, 1000):
        for t in (0.0, 0.01, 0.5, 1.0, 1.96, 2.0, 3.5, 10.0, 50.0, -2.5, -40.0):
            want = float(2 * stats.t.sf(abs(t), dof))
            assert t_two_sided_p(t, dof) == pytest.approx(want, rel=1e-7, abs=1e-14), (t, dof)
    assert t_two_sided_p(0.0, 3) == 1.0 and t_two_sided_p(math.inf, 3) == 0.0 and math.isnan(t_two_sided_p(NAN, 3))
    for dof in range(1, 31):  # the interval's quantile is where p crosses 0.05 (T_975 has 3 decimals)
        assert t_two_sided_p(T_975[dof - 1], dof) == pytest.approx(0.05, abs=1e-4)


def test_paired_p_matches_scipy_ttest():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1)
    for n in (2, 3, 5, 12, 40):
        for _ in range(20):
            base = [rng.gauss(0.3, 0.05) for _ in range(n)]
            arm = [b + rng.gauss(0.01, 0.03) for b in base]
            want = float(stats.ttest_rel(arm, base).pvalue)
            assert paired_p([a - b for a, b in zip(arm, base)]) == pytest.approx(want, rel=1e-7)
            assert paired_p([a - b for a, b in zip(arm, base)] + [NAN, None]) == pytest.approx(want, rel=1e-7)
    assert paired_p([0.3]) is None and paired_p([0.3, NAN]) is None and paired_p([]) is None
    assert paired_p([0.0, 0.0, 0.0]) == 1.0 and paired_p([2.0, 2.0]) == 0.0  # no spread: nothing moved / all alike


def _holm_reference(pvalues):
    """Holm's procedure as a rejection rule, written independently: step through the sorted p-values, reject
    while p_(i) <= alpha / (m - i + 1); the adjusted p of a test is the smallest alpha at which it is rejected
    (searched over the candidate levels (m - j + 1) p_(j))."""
    present = [p for p in pvalues if p is not None]
    m = len(present)

    def rejected(alpha):
        out = set()
        for i, p in enumerate(sorted(present)):
            if p > alpha / (m - i):
                break
            out.add(i)
        return out

    order = sorted(range(m), key=lambda i: present[i])
    rank = {idx: r for r, idx in enumerate(order)}
    levels = sorted({min(1.0, (m - i) * p) for i, p in enumerate(sorted(present))} | {1.0})
    # never rejected at any level <= 1: adjusted p 1 (the adjustment is capped there)
    adjusted = [min((level for level in levels if rank[k] in rejected(level * (1 + 1e-12))), default=1.0)
                for k in range(m)]
    it = iter(adjusted)
    return [None if p is None else next(it) for p in pvalues]


def test_holm_matches_an_independent_step_down_reference():
    rng = random.Random(2)
    for m in (1, 2, 3, 7, 20, 60):
        for _ in range(30):
            ps = [rng.random() ** rng.choice((1, 3, 8)) for _ in range(m)]
            ps = [None if rng.random() < 0.1 else p for p in ps]
            got, want = holm(ps), _holm_reference(ps)
            assert [g is None for g in got] == [w is None for w in want]
            assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], abs=1e-12)
            present = [(p, g) for p, g in zip(ps, got) if p is not None]
            assert all(p <= g <= 1.0 for p, g in present)  # never below p, never above 1
            for (p1, g1), (p2, g2) in zip(sorted(present), sorted(present)[1:]):
                assert g1 <= g2  # monotone in p


def test_holm_known_cases():
    assert holm([]) == [] and holm([None]) == [None]
    assert holm([0.03]) == [0.03]  # one comparison: nothing to adjust
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.01, None, 0.04, 0.03, 0.005]) == pytest.approx([0.03, None, 0.06, 0.06, 0.02])
    assert holm([0.2, 0.9]) == pytest.approx([0.4, 0.9])
    assert holm([0.04, 0.01, 0.045]) == pytest.approx([0.08, 0.03, 0.08])  # 0.045 x 1 < 0.04 x 2: the running max
    assert holm([0.4, 0.4, 0.4]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1


@pytest.mark.parametrize("metric, diffs, p_adjusted, word", [
    ("test/zeroshot_top1", [0.05, 0.06, 0.07], 0.01, "better"),
    ("test/zeroshot_top1", [0.05, 0.06, 0.07], 0.2, "inside noise"),  # its interval excludes 0, Holm does not
    ("test/zeroshot_top1", [-0.05, -0.06, -0.07], 0.049, "worse"),
    ("test/zeroshot_top1", [0.05, -0.01, 0.02], 0.01, "inside noise"),  # never more than the interval says
    ("test/embed/modality_gap", [0.2, 0.3, 0.25], 0.01, "higher"),
    ("test/embed/modality_gap", [0.2, 0.3, 0.25], 0.05, "inside noise"),  # < 0.05, strictly
    ("test/zeroshot_top1", [0.30], None, "one seed"),
    ("test/zeroshot_top1", [NAN, NAN], None, "no data"),
])
def test_verdict_of_a_comparison_that_is_not_primary(metric, diffs, p_adjusted, word):
    assert adjusted_verdict(metric, mean_ci(diffs, diff_range(metric)), p_adjusted) == word


def test_lr_robust_width_is_the_widest_contiguous_good_range():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert lr_robust_width(lrs, [0.5, 0.95, 1.0, 0.92, 0.1]) == pytest.approx(2.0)  # 1e-3 .. 1e-1
    assert lr_robust_width(lrs, [0.95, 0.1, 1.0, 0.1, 0.95]) == 0.0  # good trials, never two in a row
    assert lr_robust_width(lrs, [1.0, -math.inf, 1.0, 1.0, 1.0]) == pytest.approx(2.0)  # a diverged trial breaks it
    assert lr_robust_width([1e-3], [0.5]) == 0.0


def test_lr_robust_width_averages_seeds_at_one_learning_rate():
    lrs = [1e-3, 1e-3, 1e-2, 1e-2, 1e-1, 1e-1]
    # 1e-2's mean (0.95) is good, 1e-1's mean (0.5) is not: 1e-3 .. 1e-2 is one decade
    assert lr_robust_width(lrs, [1.0, 0.9, 0.9, 1.0, 0.9, 0.1]) == pytest.approx(1.0)
    # one diverged seed fails its learning rate
    assert lr_robust_width(lrs, [1.0, 0.9, 1.0, -math.inf, 1.0, 1.0]) == 0.0


def test_sweep_seed_table_counts_a_diverged_seed_and_clips():
    optuna = pytest.importorskip("optuna")
    from probloss.studies.stats import summarise

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    complete = optuna.trial.TrialState.COMPLETE
    search, rerun = optuna.create_study(direction="maximize"), optuna.create_study(direction="maximize")
    search.add_trial(optuna.trial.create_trial(params={"trainer.lr": 1e-3}, values=[0.9], state=complete,
                     distributions={"trainer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}))
    for attrs in ({"test/zeroshot_top1": 0.98}, {"test/zeroshot_top1": 1.0},
                  {"stability/diverged": 1.0, "error": "non-finite loss"},  # a diverged seed: no metrics
                  {"test/zeroshot_top1": "nan"}):  # Optuna attrs store nan as a string
        rerun.add_trial(optuna.trial.create_trial(values=[0.0], state=complete, user_attrs=attrs))
    row = summarise({"infonce": (search, rerun)})["infonce"]
    zs = row["test/zeroshot_top1"]
    assert (zs.n, zs.n_nonfinite, zs.high) == (2, 2, 1.0)
    assert "(2 of 4 seeds diverged)" in fmt_ci(zs) and ", 1.000]" in fmt_ci(zs)
    assert row["test/embed/alignment"].n == 0  # absent from the finished seeds: not applicable


LRS4 = [1e-4, 1e-3, 1e-2, 1e-1]  # one decade apart: widths are whole numbers


def grid(curve, noise=(-0.01, 0.0, 0.01)):
    """A score table {lr: {seed: score}}: seed k at every learning rate is curve + noise[k]."""
    return {lr: {seed: score + eps for seed, eps in enumerate(noise)} for lr, score in zip(LRS4, curve)}


TABLES = {  # the shared best is peaked's 0.85: thresholds 0.765 (90%) and 0.68 (80%)
    "flat": grid([0.70, 0.70, 0.70, 0.70]),     # own best 0.70: every lr within 90% of it, below 90% of 0.85
    "peaked": grid([0.30, 0.30, 0.85, 0.30]),
    "two_lrs": grid([0.30, 0.80, 0.85, 0.30]),
}


@pytest.mark.parametrize("fraction, expected", [
    (0.9, {"flat": (3.0, 0.0), "peaked": (0.0, 0.0), "two_lrs": (1.0, 1.0)}),  # (own best, shared best)
    (0.8, {"flat": (3.0, 3.0), "peaked": (0.0, 0.0), "two_lrs": (1.0, 1.0)}),
])
def test_lr_width_against_own_and_shared_best(fraction, expected):
    widths = lr_robustness(TABLES, "flat", fraction, resamples=50)
    for loss, (own, shared) in expected.items():
        assert (widths[loss]["own"].point, widths[loss]["shared"].point) == pytest.approx((own, shared)), loss
        assert widths[loss]["own"].n == 3
    # own best on all seeds is what lr_robust_width computes from the trials
    lrs, scores = zip(*[(lr, s) for lr, row in TABLES["two_lrs"].items() for s in row.values()])
    assert lr_robust_width(lrs, scores, fraction) == pytest.approx(expected["two_lrs"][0])


def test_width_interval_contains_the_estimate_and_collapses_without_seed_noise():
    noisy = {"a": grid([0.5, 0.9, 0.8, 0.4], noise=(-0.1, 0.0, 0.15)), "b": grid([0.9, 0.85, 0.7, 0.2], noise=(0.05, -0.2, 0.1))}
    for widths in lr_robustness(noisy, "a").values():
        for w in widths.values():
            assert w.low <= w.point <= w.high and w.low <= w.median <= w.high
    assert lr_robustness(noisy, "a")["a"]["own"].low < lr_robustness(noisy, "a")["a"]["own"].high  # seeds disagree
    same = {loss: grid([0.3, 0.8, 0.85, 0.3], noise=(0.0, 0.0, 0.0)) for loss in ("a", "b")}
    for widths in lr_robustness(same, "a").values():
        for w in widths.values():
            assert w.low == w.median == w.high == w.point


def test_width_bootstrap_is_reproducible():
    noisy = {"a": grid([0.5, 0.9, 0.8, 0.4], noise=(-0.1, 0.0, 0.15, 0.05)), "b": grid([0.9, 0.85, 0.7, 0.2])}
    assert lr_robustness(noisy, "a") == lr_robustness(noisy, "a")
    assert lr_robustness(noisy, "a", rng_seed=1) == lr_robustness(noisy, "a", rng_seed=1)


def test_paired_width_difference_verdicts():
    widths = lr_robustness(TABLES, "peaked")
    flat = widths["flat"]["diff_own"]  # flat - peaked: 3 decades in every resample
    assert (flat.point, flat.low, flat.high) == (3.0, 3.0, 3.0) and width_verdict(flat) == "better"
    assert width_verdict(widths["flat"]["diff_shared"]) == "inside noise"  # 0 - 0 at 90% of the shared best
    # loss a matches the baseline except that seed 2 collapses at the largest lr: width 1 or 2 by the seeds drawn
    base = {lr: {s: 0.8 for s in range(3)} for lr in (1e-3, 1e-2, 1e-1)}
    arm = {lr: {s: (0.0 if (s, lr) == (2, 1e-1) else 0.8) for s in range(3)} for lr in (1e-3, 1e-2, 1e-1)}
    diff = lr_robustness({"base": base, "a": arm}, "base")["a"]["diff_own"]
    assert diff.point == pytest.approx(-1.0) and diff.low == pytest.approx(-1.0) and diff.high == pytest.approx(0.0)
    assert width_verdict(diff) == "inside noise"
    one = lr_robustness({"base": {1e-3: {0: 0.8}}, "a": {1e-3: {0: 0.8}, 1e-2: {0: 0.8}}}, "base")["a"]
    assert width_verdict(one["diff_own"]) == "one seed" and fmt_width(one["own"]) == "1.00 (one seed)"


@pytest.mark.parametrize("bad", [-math.inf, NAN])
def test_a_diverged_seed_fails_its_learning_rate(bad):
    lrs = [lr for lr in LRS4 for _ in range(3)]
    seeds = [0, 1, 2] * 4
    scores = [0.7] * 12
    scores[7] = bad  # seed 1 at 1e-2
    table = score_table(lrs, seeds, scores)
    assert table[1e-2][1] == -math.inf and len(table[1e-2]) == 3  # kept, as a failure
    widths = lr_robustness({"flat": table}, "flat")["flat"]["own"]
    assert widths.point == pytest.approx(1.0)  # 1e-4 .. 1e-3; 1e-2 fails, 1e-1 alone spans 0
    assert widths.low == pytest.approx(1.0) and widths.high == pytest.approx(3.0)  # resamples without seed 1: 3
    assert lr_robust_width(lrs, scores) == pytest.approx(1.0)
    # a learning rate where none of the drawn seeds ran has no evidence: it fails too
    assert draw_means({1e-3: {0: 0.7}, 1e-2: {2: 0.7}}, [0, 0, 1]) == {1e-3: pytest.approx(0.7), 1e-2: -math.inf}


def test_sweep_report_widths_best_lr_on_val_and_test_at_it():
    optuna = pytest.importorskip("optuna")
    from probloss.studies.render import robustness_lines
    from probloss.studies.stats import summarise

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {"trainer.lr": optuna.distributions.CategoricalDistribution([1e-3, 1e-2, 1e-1]),
             "seed": optuna.distributions.CategoricalDistribution([0, 1, 2])}

    def study(curve, test=None):
        s = optuna.create_study(direction="maximize")
        for lr, val in curve.items():
            for seed in range(3):
                attrs = {} if test is None else {"test/zeroshot_top1": test[lr] + 0.01 * seed}
                s.add_trial(optuna.trial.create_trial(params={"trainer.lr": lr, "seed": seed}, distributions=dists,
                                                      values=[val + 0.01 * seed], state=optuna.trial.TrialState.COMPLETE,
                                                      user_attrs=attrs))
        return s

    rows = summarise({
        "sigmoid": (study({1e-3: 0.60, 1e-2: 0.62, 1e-1: 0.61}), None),  # old study: no test key
        "infonce": (study({1e-3: 0.2, 1e-2: 0.8, 1e-1: 0.3}, test={1e-3: 0.1, 1e-2: 0.7, 1e-1: 0.2}), None),
    })
    inf, sig = rows["infonce"], rows["sigmoid"]
    assert inf["best_lr"] == 1e-2 and inf["best_lr_test"].mean == pytest.approx(0.71) and inf["best_lr_test"].n == 3
    assert sig["best_lr"] == 1e-2 and sig["best_lr_test"].n == 0 and fmt_ci(sig["best_lr_test"]) == "-"
    assert sig["width_90"]["own"].point == pytest.approx(2.0) and sig["width_90"]["shared"].point == 0.0
    assert sig["width_80"]["shared"].point == 0.0 and inf["width_90"]["own"].point == 0.0
    assert sig["lr_robust_width"] == pytest.approx(2.0)  # the old column, unchanged
    assert sig["width_baseline"] == "infonce" and width_verdict(sig["width_90"]["diff_own"]) == "better"
    text = "\n".join(robustness_lines(rows))
    assert "| sigmoid | 3 | 2.00 [2.00, 2.00] | 0.00 [0.00, 0.00] |" in text
    assert "| loss - infonce |" in text and "| sigmoid | 2.00 [2.00, 2.00] | better | 0.00 [0.00, 0.00] | inside noise |" in text
    assert "| 0.01 | 0.810 ± " in text and text.count("| - |") == 1  # infonce's test at 1e-2; sigmoid: none recorded


# --- LR retention -------------------------------------------------------------------------------------------------

HALF_DECADES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]  # configs/sweep/lr_grid.yaml


def half_decade_grid(curve, seeds=5, noise=0.0):
    """{lr: {seed: score}} on the half-decade grid; seed k adds k * noise at every learning rate."""
    return {lr: {k: score + k * noise for k in range(seeds)} for lr, score in zip(HALF_DECADES, curve)}


def test_retention_on_grid_points_and_interpolated_between_them():
    from probloss.studies.stats import curve_at, lr_retention

    # best at 1e-3 (0.8): 3x = 3e-3 is a grid point (0.6), 10x = 1e-2 too (0.2)
    cells = lr_retention(half_decade_grid([0.1, 0.5, 0.8, 0.6, 0.2, 0.1, 0.0]), resamples=50)
    assert cells["x3"]["point"] == pytest.approx(0.75) and cells["x10"]["point"] == pytest.approx(0.25)
    assert cells["x3"]["best_lr"] == 1e-3 and cells["x3"]["lr"] == pytest.approx(3e-3)
    assert not cells["x3"]["interpolated"] and not cells["x3"]["few_seeds"] and cells["x3"]["n"] == 5
    # identical seeds: every resample gives the same value
    assert cells["x3"]["low"] == cells["x3"]["high"] == pytest.approx(0.75)
    # best at 3e-4 (1.0): 3x = 9e-4 lies between 3e-4 (1.0) and 1e-3 (0.5), w = log10(3) / log10(10/3)
    cells = lr_retention(half_decade_grid([0.2, 1.0, 0.5, 0.4, 0.1, 0.0, 0.0]), resamples=50)
    w = math.log10(3) / math.log10(10 / 3)
    assert cells["x3"]["point"] == pytest.approx((1 - w) * 1.0 + w * 0.5) and cells["x3"]["interpolated"]
    assert cells["x10"]["point"] == pytest.approx(0.4) and not cells["x10"]["interpolated"]  # 3e-3
    assert curve_at({1e-3: 0.2, 1e-2: 0.6}, 10 ** -2.5) == pytest.approx(0.4)  # halfway in log-lr
    assert curve_at({1e-3: 0.2, 1e-2: 0.6}, 2e-2) is None


def test_retention_beyond_the_grid_is_not_measured():
    from probloss.studies.render import fmt_retention
    from probloss.studies.stats import lr_retention

    cells = lr_retention(half_decade_grid([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9]), resamples=20)  # best at 1e-1
    assert math.isnan(cells["x3"]["point"]) and cells["x3"]["lr"] == pytest.approx(0.3)
    assert fmt_retention(cells["x3"]) == "- (beyond the grid)"


def test_retention_interval_diverged_seeds_and_few_seed_label():
    from probloss.studies.render import fmt_retention
    from probloss.studies.stats import lr_retention

    table = half_decade_grid([0.1, 0.5, 0.8, 0.6, 0.2, 0.1, 0.0])
    table[3e-3][4] = -math.inf  # seed 4 diverged at 3x: it scores 0 there (and 3e-3 cannot be the best)
    cells = lr_retention(table, resamples=400)
    assert cells["x3"]["point"] == pytest.approx((4 * 0.6 + 0.0) / 5 / 0.8)
    x3 = cells["x3"]
    assert x3["low"] < x3["point"] < x3["high"] == pytest.approx(0.75)  # resamples without seed 4 keep 0.75
    assert x3["low"] >= 0.0
    few = lr_retention({lr: {k: v for k, v in row.items() if k < 3} for lr, row in table.items()}, resamples=50)
    assert few["x3"]["few_seeds"] and "(3 seeds < 5)" in fmt_retention(few["x3"])
    assert fmt_retention(cells["x3"]).startswith("0.60 [") and "at 0.003" in fmt_retention(cells["x3"])


def test_retention_reselects_the_best_lr_in_each_resample():
    from probloss.studies.stats import retention_at

    # seed 0 peaks at 1e-3, seed 1 at 3e-3: each resample retains from its own best learning rate
    table = {1e-3: {0: 1.0, 1: 0.2}, 3e-3: {0: 0.5, 1: 1.0}, 1e-2: {0: 0.1, 1: 0.9}, 3e-2: {0: 0.0, 1: 0.0}}
    w = math.log10(3) / math.log10(10 / 3)  # 9e-3 between 3e-3 and 1e-2
    assert retention_at(table, [0, 0], 3) == pytest.approx(0.5)  # 3e-3 from 1e-3
    assert retention_at(table, [1, 1], 3) == pytest.approx((1 - w) * 1.0 + w * 0.9)  # 9e-3 from 3e-3
    # both seeds: means 0.6, 0.75, 0.5, 0: best 3e-3 (0.75), 9e-3 interpolated
    assert retention_at(table, [0, 1], 3) == pytest.approx(((1 - w) * 0.75 + w * 0.5) / 0.75)


def test_sweep_report_rows_and_table_carry_retention():
    optuna = pytest.importorskip("optuna")
    import json

    from probloss.studies.render import report_lines
    from probloss.studies.stats import summarise

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    lrs = [1e-3, 3e-3, 1e-2]
    dists = {"trainer.lr": optuna.distributions.CategoricalDistribution(lrs),
             "seed": optuna.distributions.CategoricalDistribution([0, 1, 2])}
    study = optuna.create_study(direction="maximize")
    for lr, val in zip(lrs, (0.8, 0.4, 0.2)):
        for seed in range(3):
            study.add_trial(optuna.trial.create_trial(params={"trainer.lr": lr, "seed": seed}, distributions=dists,
                                                      values=[val], state=optuna.trial.TrialState.COMPLETE))
    rows = summarise({"infonce": (study, None)})
    cells = rows["infonce"]["lr_retention"]
    assert cells["x3"]["point"] == pytest.approx(0.5) and cells["x10"]["point"] == pytest.approx(0.25)
    json.dumps(cells)  # plain values: the rows are JSON
    text = "\n".join(report_lines("lr_grid", rows))
    assert "LR retention" in text and "| infonce | 3 | 0.001 | 0.50 [0.50, 0.50] at 0.003 (3 seeds < 5) |" in text


def test_new_stability_keys_have_directions_and_ranges():
    for key in ("stability/max_loss_jump", "stability/collapsed", "stability/collapsed_loss"):
        assert metric_direction(key) == -1, key  # lower is better
    for key in ("stability/grad_norm_init", "stability/grad_norm_median", "stability/reference_loss",
                "stability/collapsed_step", "stability/max_loss_jump_step", "stability/zeroshot_p_above_chance"):
        assert metric_direction(key) == 0, key  # descriptive
    assert metric_range("stability/collapsed") == (0.0, 1.0) and metric_range("stability/max_loss_jump") == (0.0, math.inf)
    assert verdict("stability/max_loss_jump", mean_ci([-3.0, -2.0, -2.5])) == "better"


def test_one_number_format_for_study_tables_and_the_console():
    """probloss.files.fmt_number is the one number formatter: a study table's cell (3 decimals, "-" for a seed
    without a number) and a run's console summary (4 decimals, nan as nan, significant digits from 1e5)."""
    from probloss.files import fmt_number
    from probloss.training.run_folder import CONSOLE_NUMBER

    assert [fmt_number(v) for v in (0.12345, -2.0, NAN, math.inf, 3, True, None)] == [
        "0.123", "-2.000", "-", "-", "3", "True", "None"]
    assert [fmt_number(v, **CONSOLE_NUMBER) for v in (0.12345, 99999.5, 123456.7, NAN, -math.inf, 7, False)] == [
        "0.1235", "99999.5000", "1.235e+05", "nan", "-inf", "7", "False"]


def test_statistics_module_computes_only():
    """probloss/studies/stats.py takes numbers and gives numbers: it imports nothing that reads files, draws or
    renders (readers.py reads, render.py prints)."""
    import ast
    from pathlib import Path

    import probloss.studies.stats as stats

    tree = ast.parse(Path(stats.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "re", "statistics", "typing", "numpy", "optuna"}, imported
