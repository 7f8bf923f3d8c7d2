"""The report's statistics: 95% intervals (clipped, non-finite values counted), paired verdicts, LR-robust width."""

import math

import pytest

from probloss.report import (T_975, diff_range, fmt_ci, lr_robust_width, mean_ci, metric_direction, metric_range,
                             row_value, verdict)

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
    from probloss.report import summarise

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
