"""A recipe's report from hand-written results (no training): paired comparisons, diverged seeds, clipping,
comparisons.json, and the --findings page."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from probloss.errors import ConfigError
from probloss.studies.findings import findings
from probloss.studies.recipe import baselines, primaries, render_recipe

REPO = Path(__file__).resolve().parents[1]
METRICS = ["test/zeroshot_top1", "test/i2t_r@1", "test/embed/modality_gap", "stability/loss_spikes",
           "test/unc/specificity_spearman"]
RECIPE = {"description": "A hand-made recipe with a known answer.", "seeds": [0, 1, 2], "overrides": [],
          "arms": {"base": ["loss=infonce"], "new": ["loss=gaussian_var"], "single": ["loss=sigmoid"]},
          "evaluations": {}, "metrics": METRICS, "baseline": "base", "x": None, "x_label": None,
          "primary": [{"arm": "new", "baseline": "base", "metric": "test/zeroshot_top1"}]}


def _run(arm, seed, zs, r1, gap, spikes, spearman=None):
    row = {"arm": arm, "seed": seed, "run_dir": f"runs/x/{arm}-seed{seed}", "status": "finished",
           "wall_time_s": 60.0, "test/zeroshot_top1": zs, "test/i2t_r@1": r1, "test/embed/modality_gap": gap,
           "stability/loss_spikes": spikes, "stability/diverged": 0.0}
    if spearman is not None:
        row["test/unc/specificity_spearman"] = spearman
    return row


RESULTS = [
    _run("base", 0, 0.50, 0.97, 0.5, 5), _run("base", 1, 0.52, 1.00, 0.5, 6), _run("base", 2, 0.51, 0.99, 0.5, 7),
    _run("new", 0, 0.60, 0.50, 0.80, 1, -0.3), _run("new", 1, 0.63, 0.52, 0.82, 3, -0.4),
    # seed 2 of "new" stopped on a non-finite loss: the stability tracker's numbers, no evaluation
    {"arm": "new", "seed": 2, "run_dir": "runs/x/new-seed2", "status": "stopped", "error": "non-finite loss",
     "stability/loss_spikes": 2, "stability/diverged": 1.0, "wall_time_s": 10.0},
    _run("single", 0, 0.40, 0.90, 0.6, 4),
]


@pytest.fixture
def folder(tmp_path):
    exp_dir = tmp_path / "handmade"
    exp_dir.mkdir()
    (exp_dir / "recipe.json").write_text(json.dumps(RECIPE))
    (exp_dir / "results.json").write_text(json.dumps(RESULTS))
    return exp_dir


def _row(rows, arm, metric):
    (row,) = [r for r in rows if r["arm"] == arm and r["metric"] == metric]
    return row


def test_comparisons_json_rows_and_values(folder):
    report = render_recipe(folder)
    rows = json.loads((folder / "comparisons.json").read_text())
    assert {tuple(sorted(r)) for r in rows} == {tuple(sorted(
        ["arm", "baseline", "metric", "mean_diff", "ci_low", "ci_high", "n", "n_dropped", "verdict", "p",
         "p_adjusted", "primary"]))}
    assert [(r["arm"], r["metric"]) for r in rows] == [(a, m) for a in ("new", "single") for m in METRICS]
    assert all(r["baseline"] == "base" for r in rows)
    text = report.read_text()
    assert (folder / "forest.png").is_file() and "![forest](forest.png)" in text  # the primary comparison's
    assert "![test_zeroshot_top1](test_zeroshot_top1.png)" in text

    zs = _row(rows, "new", "test/zeroshot_top1")  # diffs 0.10, 0.11; seed 2 diverged: left out, counted
    half = 12.706 * math.sqrt(0.00005) / math.sqrt(2)
    assert (zs["n"], zs["n_dropped"], zs["verdict"], zs["primary"]) == (2, 1, "better", True)
    assert zs["p_adjusted"] == zs["p"] == pytest.approx(_t_p([0.10, 0.11]))  # primary: not adjusted
    assert zs["mean_diff"] == pytest.approx(0.105)
    assert (zs["ci_low"], zs["ci_high"]) == pytest.approx((0.105 - half, 0.105 + half))
    r1 = _row(rows, "new", "test/i2t_r@1")  # diffs -0.47, -0.48
    assert r1["verdict"] == "worse" and r1["ci_low"] >= -1.0
    gap = _row(rows, "new", "test/embed/modality_gap")  # no better direction
    assert gap["verdict"] == "higher"
    spikes = _row(rows, "new", "stability/loss_spikes")  # lower is better; the stopped seed has this number
    assert (spikes["n"], spikes["n_dropped"], spikes["mean_diff"], spikes["verdict"]) == (3, 0, -4.0, "better")
    # the three other rows with a p: Holm over them (m = 3), by hand
    p_r1, p_gap, p_spikes = _t_p([-0.47, -0.48]), _t_p([0.30, 0.32]), _t_p([-4.0, -3.0, -5.0])
    assert p_r1 < p_spikes < p_gap
    assert [r1["p_adjusted"], spikes["p_adjusted"], gap["p_adjusted"]] == pytest.approx(
        [3 * p_r1, 2 * p_spikes, max(2 * p_spikes, p_gap)])
    assert not any(r["primary"] for r in rows if (r["arm"], r["metric"]) != ("new", "test/zeroshot_top1"))
    unc = _row(rows, "new", "test/unc/specificity_spearman")  # the baseline has no sigma: nothing pairs
    assert (unc["n"], unc["n_dropped"], unc["mean_diff"], unc["verdict"]) == (0, 3, None, "no data")
    assert unc["p"] is None and unc["p_adjusted"] is None
    single = _row(rows, "single", "test/zeroshot_top1")
    assert (single["n"], single["n_dropped"], single["ci_low"], single["verdict"]) == (1, 2, None, "one seed")
    assert single["p"] is None and single["p_adjusted"] is None
    assert single["mean_diff"] == pytest.approx(-0.10)

    text = report.read_text()
    new_line = next(line for line in text.splitlines() if line.startswith("| new | 3 (1 stopped) | "))
    assert "(1 of 3 seeds diverged)" in new_line  # the diverged seed is shown, not dropped
    base_r1 = (0.97 + 1.00 + 0.99) / 3
    assert "| base | 3 | 0.510 ± " in text and f"{base_r1:.3f} [" in text and ", 1.000] |" in text  # clipped at 1
    assert (f"| new * | base | test/zeroshot_top1 | +0.105 [{0.105 - half:+.3f}, {0.105 + half:+.3f}] | 2 (1 left out) "
            f"| {zs['p']:.3f} | {zs['p']:.3f} | better |") in text
    assert "| single | base | test/zeroshot_top1 | -0.100 | 1 (2 left out) | - | - | one seed |" in text  # 2 never run
    assert "| new | base | test/unc/specificity_spearman | - | 0 (3 left out) | - | - | no data |" in text
    assert ("4 comparison(s) with an interval: 1 primary (1 survive: interval excludes 0), 3 others (3 survive "
            "Holm") in text
    assert "A hand-made recipe with a known answer." in text and "6.2 min of training" in text
    assert (folder / "test_zeroshot_top1.png").is_file()


def _t_p(diffs):
    """scipy's two-sided one-sample t test of the paired differences (the reference for ``p``)."""
    stats = pytest.importorskip("scipy.stats")
    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def test_without_primaries_every_row_is_holm_adjusted(folder):
    """The same results with no primary declared: the zero-shot row (its interval excludes 0) joins the Holm
    family of four and no longer survives; the r@1 row (smallest p) still does."""
    (folder / "recipe.json").write_text(json.dumps({**RECIPE, "primary": []}))
    report = render_recipe(folder)
    rows = json.loads((folder / "comparisons.json").read_text())
    zs, r1, gap, spikes = (_row(rows, "new", m) for m in ("test/zeroshot_top1", "test/i2t_r@1",
                                                          "test/embed/modality_gap", "stability/loss_spikes"))
    assert zs["ci_low"] > 0 and not zs["primary"]
    ps = [_t_p([0.10, 0.11]), _t_p([-0.47, -0.48]), _t_p([0.30, 0.32]), _t_p([-4.0, -3.0, -5.0])]
    for row, p in zip((zs, r1, gap, spikes), ps):
        assert row["p"] == pytest.approx(p, rel=1e-6)
    assert r1["p_adjusted"] == pytest.approx(4 * ps[1]) and r1["verdict"] == "worse"  # 4 x 0.0067 < 0.05
    assert zs["p_adjusted"] >= 0.05 and zs["verdict"] == "inside noise"
    assert (gap["verdict"], spikes["verdict"]) == ("inside noise", "inside noise")
    assert "4 comparison(s) with an interval: 0 primary (0 survive: interval excludes 0), 4 others (1 survive Holm" in (
        report.read_text())
    # an old recipe folder without the key reads the same
    (folder / "recipe.json").write_text(json.dumps({k: v for k, v in RECIPE.items() if k != "primary"}))
    render_recipe(folder)
    assert json.loads((folder / "comparisons.json").read_text()) == rows


def test_primary_entries_are_checked_against_the_recipe():
    ok = {"arm": "new", "baseline": "base", "metric": "test/i2t_r@1"}
    assert primaries({**RECIPE, "primary": [ok]}) == {("new", "base", "test/i2t_r@1")}
    assert primaries({**RECIPE, "primary": None}) == set()
    with pytest.raises(ConfigError, match=r"compares 'base' with 'new', not a comparison of the recipe; \(arm, "
                                          r"baseline\) pairs: \[\('new', 'base'\), \('single', 'base'\)\] "
                                          r"\(recipe.primary=\[...\] declares others"):
        primaries({**RECIPE, "primary": [{**ok, "arm": "base", "baseline": "new"}]})
    with pytest.raises(ConfigError, match=r"names metric 'test/t2i_r@1', not a reported metric of the recipe; "
                                          r"metrics: \['test/zeroshot_top1'"):
        primaries({**RECIPE, "primary": [{**ok, "metric": "test/t2i_r@1"}]})
    with pytest.raises(ConfigError, match="exactly the keys arm, baseline and metric"):
        primaries({**RECIPE, "primary": [{"arm": "new", "metric": "test/i2t_r@1"}]})
    with pytest.raises(ConfigError, match="lists 9 comparisons; at most 8"):
        primaries({**RECIPE, "primary": [ok] * 9})


@pytest.mark.slow
def test_findings_page_from_results_files_alone(folder, tmp_path):
    (tmp_path / "not_a_recipe").mkdir()
    before = sorted(p.name for p in folder.iterdir())
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), "--findings", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    page = done.stdout
    assert page.startswith("# Findings") and "## handmade" in page and "### Arms" in page
    assert "A hand-made recipe with a known answer." in page
    assert "(1 of 3 seeds diverged)" in page and "| 2 (1 left out) | 0.030 | 0.030 | better |" in page
    assert "| handmade | 4 | 1 | 1 | 3 | 3 |" in page and "| total | 4 | 1 | 1 | 3 | 3 |" in page
    assert "| new | base | test/embed/modality_gap |" in page and "| higher |" in page
    assert sorted(p.name for p in folder.iterdir()) == before  # prints, writes nothing
    assert page == findings(tmp_path) + "\n"


def test_baseline_choices():
    assert baselines({"arms": {"a": [], "b": [], "c": []}}) == [("b", "a"), ("c", "a")]  # null: the first arm
    assert baselines({"arms": {"a": [], "b": [], "c": []}, "baseline": "b"}) == [("a", "b"), ("c", "b")]
    assert baselines({"arms": {"a": [], "b": [], "c": []}, "baseline": {"c": "b"}}) == [("c", "b")]
    assert baselines({"arms": {"a": [], "b": [], "c": []}, "baseline": {"c": ["a", "b"]}}) == [("c", "a"), ("c", "b")]
    with pytest.raises(ConfigError, match="not arms of the recipe"):
        baselines({"arms": {"a": [], "b": []}, "baseline": "z"})


def test_findings_page_includes_sweeps_from_their_journal(tmp_path):
    """A sweep is summarised from its journal storage alone (LR grid over seeds -> LR-robust widths), and the
    findings page writes nothing into its folder."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (tmp_path / "sweeps").mkdir()
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "sweeps" / "lrdemo.journal")))
    dists = {"trainer.lr": optuna.distributions.CategoricalDistribution([1e-3, 1e-2]),
             "seed": optuna.distributions.CategoricalDistribution([0, 1])}
    for loss, curve in (("infonce", {1e-3: 0.5, 1e-2: 0.2}), ("sigmoid", {1e-3: 0.45, 1e-2: 0.44})):
        study = optuna.create_study(study_name=f"lrdemo-{loss}", storage=storage, direction="maximize")
        for lr, value in curve.items():
            for seed in (0, 1):
                study.add_trial(optuna.trial.create_trial(
                    params={"trainer.lr": lr, "seed": seed}, distributions=dists, values=[value + 0.01 * seed],
                    state=optuna.trial.TrialState.COMPLETE, user_attrs={"test/zeroshot_top1": value}))
    page = findings(tmp_path)
    assert "1 sweep(s)" in page and "## lrdemo (sweep)" in page and "# lrdemo: loss comparison" not in page
    assert "| sigmoid | 2 |" in page and "| loss - infonce |" in page
    assert not (tmp_path / "lrdemo").exists()


def test_findings_page_reads_committed_folders(folder, tmp_path):
    """A committed results folder may hold only recipe.json + comparisons.json (its rows not kept): the page shows
    its comparison table as stored; a sweep's per-trial table (trials.json) is summarised like its journal; a
    recipe's learning rates and their sources are printed."""
    from test_learning_rates import grid_study

    from probloss.studies.readers import trial_table

    render_recipe(folder)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "recipe.json").write_text(json.dumps(
        {**RECIPE, "learning_rates_used": {"base": {"lr": 3e-4, "source": "a map (infonce)"},
                                           "new": {"lr": 1e-3, "source": "a map (gaussian_var)"}}}))
    (kept / "comparisons.json").write_text((folder / "comparisons.json").read_text())
    (tmp_path / "lr").mkdir()
    studies = {"infonce": (grid_study({(1e-4, 0): 0.2, (1e-4, 1): 0.3, (1e-3, 0): 0.5, (1e-3, 1): 0.4}), None)}
    (tmp_path / "lr" / "trials.json").write_text(json.dumps(trial_table(studies)))
    page = findings(tmp_path)
    assert "2 recipe folder(s), 1 sweep(s)" in page
    kept_section = page[page.index("## kept"):page.index("## lr (sweep)")]
    assert "(its runs' results.json was not kept: the paired comparisons only)" in kept_section
    assert "### Arms" not in kept_section and "| new * | base | test/zeroshot_top1 |" in kept_section
    assert "Learning rates: base 0.0003 (a map (infonce)); new 0.001 (a map (gaussian_var))." in kept_section
    assert "| handmade | 4 | 1 | 1 | 3 | 3 |" in page and "| kept | 4 | 1 | 1 | 3 | 3 |" in page
    assert "Source: `" + (tmp_path / "lr" / "trials.json").as_posix() + "` (per-trial table)." in page
    assert "| infonce | 4/0/1 |" in page  # complete / pruned / failed, as from the journal


def test_multiplicity_of_a_rendered_page_from_its_printed_intervals(folder, tmp_path):
    """p recovered from a page's printed mean, interval and n matches the p of comparisons.json (up to the page's
    3 decimals); primaries come from the page's marks; on a page without marks or p columns (as rendered before
    multiplicity existed) every row joins the Holm family."""
    from probloss.studies.findings import page_comparisons, page_multiplicity

    render_recipe(folder)
    page = findings(tmp_path)
    rows = json.loads((folder / "comparisons.json").read_text())
    parsed = page_comparisons(page)
    assert [(r["recipe"], r["arm"], r["metric"], r["n"], r["primary"]) for r in parsed] == [
        ("handmade", c["arm"], c["metric"], c["n"], c["primary"]) for c in rows if c["p"] is not None]
    for r in parsed:
        (c,) = [c for c in rows if (c["arm"], c["metric"]) == (r["arm"], r["metric"])]
        assert r["p"] == pytest.approx(c["p"], rel=0.05, abs=1e-4)
    summary = page_multiplicity(page)
    # 4 rows; printed 4 surviving; Holm over all 4: only r@1; 1 primary (marked) survives, 3 others survive
    assert "| handmade | 4 | 4 | 0.2 | 1 | 1 of 1 | 1 | 3 |" in summary
    assert "one family of 4): 1 survive" in summary
    old = "\n".join(line.replace("new * |", "new |").replace(" | 0.030 | 0.030 |", " |") for line in page.splitlines())
    old = "\n".join(re.sub(r" \| (<0\.001|\d\.\d{3}|-) \| (<0\.001|\d\.\d{3}|-) \| ([a-z ]+) \|$", r" | \3 |", line)
                    for line in old.splitlines())
    assert "| 0.030 |" not in old and "| new * |" not in old
    assert [r["p"] for r in page_comparisons(old)] == [r["p"] for r in parsed]
    assert "| handmade | 4 | 4 | 0.2 | 1 | 0 of 0 | 0 | 1 |" in page_multiplicity(old)  # no recipe file, no marks


def test_sigma_statistics_of_a_run_without_sigma_are_not_re_evaluated(tmp_path, monkeypatch):
    """A reported sigma statistic that a loss without log-stds never has (infonce) is not "missing": no
    evaluation of the checkpoint is attempted for it; a run with sigma that lacks it is re-evaluated."""
    import probloss.studies.recipe as recipe

    calls = []
    monkeypatch.setattr(recipe, "newest_checkpoint", lambda run_dir: tmp_path / "step-00000003.ckpt")
    monkeypatch.setattr(recipe, "cached_evaluation", lambda *a, **k: calls.append(a) or {})
    metrics = ["test/zeroshot_top1", "test/unc/specificity_level_coef", "test/unc/log_sigma_text_sd"]
    assert recipe.backfill_metrics(tmp_path, {"test/zeroshot_top1": 0.3, "steps": 3}, metrics) == []
    assert calls == []
    with_sigma = {"test/zeroshot_top1": 0.3, "steps": 3, "test/unc/sigma_text_mean": 1.0}
    assert recipe.backfill_metrics(tmp_path, with_sigma, metrics, log=lambda *a, **k: None) == []
    assert len(calls) == 1  # tried (and filled nothing: the stand-in evaluation reproduces no test number)
