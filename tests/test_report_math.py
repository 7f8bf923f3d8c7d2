"""The report's statistics: 95% intervals and the LR-robust width."""

import math

import pytest

from probloss.report import lr_robust_width, mean_ci


def test_mean_ci_matches_student_t():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert mean_ci([5.0])[0] == 5.0 and math.isnan(mean_ci([5.0])[1])
    assert math.isnan(mean_ci([float("nan")])[0])


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
