"""A recipe's comparison of every arm with a fixed value (``constants``, e.g. an AUROC against chance 0.5): the
one-sample t against scipy, clipping, primary entries that name it, bad entries; and recipe=planted_noise."""

import json

import pytest

from probloss.errors import ConfigError
from probloss.studies.recipe import compare, constants, load_recipe, primaries, render_recipe

AUROC = "test/unc/planted_auroc"
RECIPE = {"description": "arms against chance", "seeds": [0, 1, 2], "overrides": [],
          "arms": {"clean": ["data.noise_rate=0.0"], "noisy": ["data.noise_rate=0.5"]}, "evaluations": {},
          "metrics": [AUROC, "test/zeroshot_top1"], "baseline": {"noisy": "clean"}, "x": None, "x_label": None,
          "constants": {AUROC: 0.5},
          "primary": [{"arm": "noisy", "baseline": "constant 0.5", "metric": AUROC}]}
VALUES = {"clean": [0.49, 0.52, 0.50], "noisy": [0.80, 0.90, 0.86]}
RESULTS = [{"arm": arm, "seed": seed, "status": "finished", AUROC: v, "test/zeroshot_top1": 0.3}
           for arm, values in VALUES.items() for seed, v in enumerate(values)]


def _row(rows, arm, baseline, metric=AUROC):
    (row,) = [r for r in rows if (r["arm"], r["baseline"], r["metric"]) == (arm, baseline, metric)]
    return row


def test_every_arm_against_the_constant_is_a_one_sample_t():
    stats = pytest.importorskip("scipy.stats")
    rows = compare(RESULTS, RECIPE, RECIPE["metrics"])
    assert len(rows) == 2 + 2  # noisy vs clean on both metrics; both arms vs 0.5 on the AUROC only
    for arm, values in VALUES.items():
        row = _row(rows, arm, "constant 0.5")
        diffs = [v - 0.5 for v in values]
        assert row["mean_diff"] == pytest.approx(sum(diffs) / 3) and row["n"] == 3
        assert row["p"] == pytest.approx(float(stats.ttest_1samp(values, 0.5).pvalue), rel=1e-6)
        half = stats.t.ppf(0.975, 2) * stats.tstd(values) / 3 ** 0.5
        assert row["ci_low"] == pytest.approx(max(sum(diffs) / 3 - half, -0.5), abs=1e-4)  # the t table: 3 decimals
        assert row["ci_high"] == pytest.approx(min(sum(diffs) / 3 + half, 0.5), abs=1e-4)  # clipped: an AUROC is <= 1
    noisy, clean = _row(rows, "noisy", "constant 0.5"), _row(rows, "clean", "constant 0.5")
    assert noisy["primary"] and noisy["p_adjusted"] == noisy["p"] and noisy["verdict"] == "better"
    assert not clean["primary"] and clean["verdict"] == "inside noise"
    # the paired arm comparison is unchanged by the constants
    plain = compare(RESULTS, {**RECIPE, "constants": {}, "primary": []}, RECIPE["metrics"])
    assert _row(plain, "noisy", "clean")["mean_diff"] == _row(rows, "noisy", "clean")["mean_diff"]


def test_a_seed_without_the_metric_is_left_out_and_a_missing_one_does_not_apply():
    results = [dict(r) for r in RESULTS]
    results[3][AUROC] = float("nan")  # noisy seed 0 diverged
    del results[0][AUROC]  # clean seed 0: the metric does not apply
    rows = compare(results, RECIPE, RECIPE["metrics"])
    assert (_row(rows, "noisy", "constant 0.5")["n"], _row(rows, "noisy", "constant 0.5")["n_dropped"]) == (2, 1)
    assert (_row(rows, "clean", "constant 0.5")["n"], _row(rows, "clean", "constant 0.5")["n_dropped"]) == (2, 0)


def test_constants_and_their_primaries_are_checked():
    assert primaries(RECIPE) == {("noisy", "constant 0.5", AUROC)}
    assert constants({**RECIPE, "constants": None}) == []
    with pytest.raises(ConfigError, match="not a comparison of the recipe"):  # no constant for this metric
        primaries({**RECIPE, "primary": [{"arm": "noisy", "baseline": "constant 0.5", "metric": "test/zeroshot_top1"}]})
    with pytest.raises(ConfigError, match="test/unc/planted_auroc_image: 0.5 must be a reported metric"):
        constants({**RECIPE, "constants": {"test/unc/planted_auroc_image": 0.5}})
    with pytest.raises(ConfigError, match="must be a reported metric"):
        constants({**RECIPE, "constants": {AUROC: "half"}})


def test_report_renders_the_constant_rows(tmp_path):
    (tmp_path / "recipe.json").write_text(json.dumps(RECIPE))
    (tmp_path / "results.json").write_text(json.dumps(RESULTS))
    text = render_recipe(tmp_path).read_text()
    assert f"| noisy * | constant 0.5 | {AUROC} | +0.353 [" in text


def test_planted_noise_recipe_declares_its_comparisons():
    _, recipe, _ = load_recipe(["recipe=planted_noise"])
    losses = ("gaussian_var", "sigmoid_var", "pcmepp", "prolip")
    assert set(recipe["arms"]) == {f"{loss} p={p}" for loss in losses for p in ("0", "0.5")}
    assert primaries(recipe) == {(f"{loss} p=0.5", base, AUROC) for loss in losses
                                 for base in ("constant 0.5", f"{loss} p=0")}
    assert {(a, m) for a, _, m, _ in constants(recipe)} == {
        (arm, m) for arm in recipe["arms"] for m in (AUROC, "test/unc/planted_auroc_image")}
    assert "data.noise_attribute=magenta" in recipe["overrides"]
