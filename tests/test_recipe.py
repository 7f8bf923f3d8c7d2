"""Recipes: arms x seeds of training runs, extra evaluations, resumption, and the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from probloss.errors import ConfigError
from probloss.studies.recipe import load_recipe, run_recipe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_size=256", "data.val_size=64", "data.test_size=64", "trainer.batch_size=32",
        "trainer.warmup_steps=1", "trainer.max_steps=3", "fabric.accelerator=cpu", "fabric.devices=1",
        "recipe.workers=1"]  # this process is the one worker (its log lines are the test's)


def test_every_recipe_file_loads():
    from probloss.training.config import compose_config, group_options

    assert {"batch_size", "bias_init", "neg_masking", "robustness", "proposal", "relations"} <= set(
        group_options("recipe"))
    for name in group_options("recipe"):
        user = USER_SUPPLIED.get(name, [])
        _, recipe, _ = load_recipe([f"recipe={name}", *user])
        for arm_overrides in recipe["arms"].values():  # every arm composes: no typo in a key waits for its turn
            compose_config([*recipe["overrides"], *arm_overrides, *user])
    with pytest.raises(ConfigError, match="missing.*data.train_shards"):  # its group choices apply first
        load_recipe(["recipe=lit"])


# What a recipe on the user's own data leaves for its command line (its file's Run line): stand-ins here.
USER_SUPPLIED = {"lit": ["data.train_shards=/data/train.tar", "data.val_shards=/data/val.tar",
                         "model.image_pretrained=null", "model.image_tower=timm:test_vit",
                         "model.text_tower=transformer"]}


def test_recipe_runs_arms_and_seeds_then_resumes(tmp_path):
    args = ["recipe=robustness", "recipe.seeds=[0,1]", f"out_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
            *TINY, "recipe.arms={infonce: ['loss=infonce'], sigmoid_30: ['loss=sigmoid', 'data.caption_noise=0.3']}",
            "recipe.baseline=null",  # the file's baseline mapping and primaries name arms this test replaces
            "recipe.primary=[{arm: sigmoid_30, baseline: infonce, metric: test/i2t_r@1}]"]
    lines = []
    report = run_recipe(args, log=lambda *a, **k: lines.append(a[0]))
    assert sum("training" in line for line in lines) == 4
    results = json.loads((tmp_path / "robustness" / "results.json").read_text())
    assert {(r["arm"], r["seed"]) for r in results} == {(a, s) for a in ("infonce", "sigmoid_30") for s in (0, 1)}
    assert all("image_noise_0.3/test/i2t_r@1" in r for r in results)  # the extra noisy evaluation
    assert all(r["wall_time_s"] > 0 for r in results)
    # each seed its own data draw, the same in both arms (recipe.vary_data, the default)
    assert all(r["gen_seed"] == r["seed"] for r in results)
    for r in results:
        saved = (Path(r["run_dir"]) / "config.yaml").read_text()
        assert f"gen_seed: {r['seed']}" in saved
    draws = [p for p in (tmp_path / "cache").glob("shapes-*") if p.is_dir()]
    assert len(draws) == 2  # two draws generated, shared by the arms
    held_out = sorted(tuple(json.loads((d / "splits.json").read_text())["heldout_combos"]) for d in draws)
    assert held_out[0] != held_out[1]  # the held-out combinations follow the draw too
    timing = json.loads((tmp_path / "robustness" / "recipe.json").read_text())["timing"]
    assert timing["runs_timed"] == 4 and timing["runs_wall_time_s"] == pytest.approx(sum(r["wall_time_s"] for r in results))
    # the paired comparison: sigmoid_30 against the first arm, per metric (and per metric of the noisy evaluation)
    comparisons_path = tmp_path / "robustness" / "comparisons.json"
    comparisons = json.loads(comparisons_path.read_text())
    metrics = ["test/zeroshot_top1", "test/i2t_r@1", "test/t2i_r@1"]
    assert [(c["arm"], c["baseline"], c["metric"]) for c in comparisons] == [
        ("sigmoid_30", "infonce", m) for m in metrics + [f"image_noise_0.3/{m}" for m in metrics]]
    for c in comparisons:
        assert set(c) == {"arm", "baseline", "metric", "mean_diff", "ci_low", "ci_high", "n", "n_dropped", "verdict",
                          "p", "p_adjusted", "primary"}
        assert c["n"] + c["n_dropped"] == 2 and c["verdict"] in ("better", "worse", "inside noise", "one seed")
        assert c["primary"] == (c["metric"] == "test/i2t_r@1")  # the command line's primary
        if c["primary"]:
            assert c["p_adjusted"] == c["p"]
        if c["n"] == 2:
            assert -1.0 <= c["ci_low"] <= c["mean_diff"] <= c["ci_high"] <= 1.0
    text = report.read_text()
    assert "| infonce | 2 | " in text and "| sigmoid_30 | 2 | " in text and "±" in text
    assert "| sigmoid_30 | infonce | test/zeroshot_top1 | " in text  # the paired comparison table
    assert (tmp_path / "robustness" / "test_zeroshot_top1.png").stat().st_size > 1000

    lines.clear()
    run_recipe(args, log=lambda *a, **k: lines.append(a[0]))
    assert not any("training" in line for line in lines)  # finished runs are not trained again

    # scripts/report.py renders the same page and comparisons again from the folder alone (with the overridden arms)
    report.unlink()
    comparisons_path.unlink()
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), str(tmp_path / "robustness")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert report.read_text() == text
    assert json.loads(comparisons_path.read_text()) == comparisons

    # the same folder asked for one data draw: seed 1's finished runs were trained on another; refused, not reused
    with pytest.raises(ConfigError, match=r"infonce-seed0 was trained with data.gen_seed=0, this recipe asks for 7"):
        run_recipe([*args, "data.gen_seed=7"], log=lambda *a, **k: None)
    with pytest.raises(ConfigError, match=r"infonce-seed1 was trained with data.gen_seed=1, this recipe asks for 0"):
        run_recipe([*args, "recipe.vary_data=false"], log=lambda *a, **k: None)


def test_the_data_draw_follows_the_seed_unless_set():
    from probloss.studies.recipe import data_draw

    assert data_draw({}, ["loss=infonce"], 3) == ["data.gen_seed=3"]  # vary_data defaults to true
    assert data_draw({"vary_data": True}, [], 3) == ["data.gen_seed=3"]
    assert data_draw({"vary_data": False}, [], 3) == []
    assert data_draw({"vary_data": True}, ["loss=infonce", "data.gen_seed=5"], 3) == []  # set by the recipe/arm
    assert data_draw({"vary_data": True}, ["+data.gen_seed=5"], 3) == []
    assert data_draw({"vary_data": True}, ["data=webdataset"], 3) == []  # no generator, no gen_seed key
    assert data_draw({"vary_data": True}, ["data=webdataset", "data=shapes"], 3) == ["data.gen_seed=3"]  # the last


def test_a_diverged_run_is_a_result_counted_in_the_report(tmp_path):
    boom = "['loss=gaussian_var', 'trainer.lr=1e30', 'trainer.grad_clip=null', 'trainer.on_nonfinite=stop']"
    args = ["recipe=proposal", "recipe.seeds=[0]", f"out_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
            *TINY, "trainer.warmup_steps=0", f"recipe.arms={{ok: ['loss=gaussian_var'], boom: {boom}}}",
            "recipe.metrics=[test/zeroshot_top1]", "recipe.baseline=ok", "recipe.primary=[]", "recipe.constants={}", "recipe.learning_rates=null"]
    lines = []
    report = run_recipe(args, log=lambda *a, **k: lines.append(a[0]))  # does not raise
    assert any("boom seed 0 diverged" in line for line in lines)
    results = json.loads((tmp_path / "proposal" / "results.json").read_text())
    assert [(r["arm"], r["status"]) for r in results] == [("ok", "finished"), ("boom", "stopped")]
    text = report.read_text()
    assert "| boom | 1 (1 stopped) | - (1 of 1 seeds diverged) |" in text
    (row,) = json.loads((tmp_path / "proposal" / "comparisons.json").read_text())
    assert (row["arm"], row["n"], row["n_dropped"], row["verdict"], row["p"]) == ("boom", 0, 1, "no data", None)


def test_unknown_recipe_and_keys_are_errors():
    with pytest.raises(ConfigError, match="unknown recipe choice 'nope'"):
        load_recipe(["recipe=nope"])
    with pytest.raises(ConfigError, match="unknown config key 'recipe.seed_list'. Did you mean 'seeds'"):
        load_recipe(["recipe=bias_init", "recipe.seed_list=[1]"])
    with pytest.raises(ConfigError, match=r"baseline names \['b=5'\], not arms"):
        load_recipe(["recipe=bias_init", "recipe.baseline='b=5'"])
    with pytest.raises(ConfigError, match=r"primary compares 'b=-10' with 'b=0', not a comparison of the recipe"):
        load_recipe(["recipe=bias_init", "recipe.primary=[{arm: 'b=-10', baseline: 'b=0', metric: test/i2t_r@1}]"])
    with pytest.raises(ConfigError, match=r"primary names metric 'test/loss', not a reported metric"):
        load_recipe(["recipe=bias_init", "recipe.primary=[{arm: 'b=0', baseline: 'b=-10', metric: test/loss}]"])
    with pytest.raises(ConfigError, match="say which recipe to use"):
        load_recipe([])


def test_a_metric_added_after_training_is_filled_from_the_final_checkpoint(tmp_path):
    args = ["recipe=proposal", "recipe.seeds=[0]", f"out_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
            *TINY, "recipe.arms={gaussian_var: ['loss=gaussian_var']}", "recipe.baseline=null", "recipe.primary=[]",
            "recipe.constants={}", "recipe.learning_rates=null",
            "recipe.metrics=[test/zeroshot_top1,test/unc/sigma_vs_images_fit_spearman]"]
    run_recipe(args, log=lambda *a, **k: None)
    summary_path = next(tmp_path.glob("proposal/gaussian_var/*/summary.json"))
    trained = json.loads(summary_path.read_text())
    fit = "test/unc/sigma_vs_images_fit_spearman"
    assert -1 <= trained[fit] <= 1
    # as if the run predated the key: its row gets the key back from one evaluation of the final checkpoint
    summary_path.write_text(json.dumps({k: v for k, v in trained.items() if k != fit}))
    lines = []
    run_recipe([*args, "recipe.report_only=true"], log=lambda *a, **k: lines.append(a[0]))
    row, = json.loads((tmp_path / "proposal" / "results.json").read_text())
    assert row[fit] == pytest.approx(trained[fit], abs=1e-9) and row["backfilled"] == [fit]
    assert sum(line.startswith("re-evaluating") for line in lines) == 1
    assert not any("training" in line for line in lines)
    # an evaluation that does not reproduce the summary's test numbers fills nothing, and says so
    summary_path.write_text(json.dumps({**{k: v for k, v in trained.items() if k != fit},
                                        "test/zeroshot_top1": trained["test/zeroshot_top1"] + 0.1}))
    lines.clear()
    run_recipe([*args, "recipe.report_only=true"], log=lambda *a, **k: lines.append(a[0]))
    row, = json.loads((tmp_path / "proposal" / "results.json").read_text())
    assert fit not in row and "backfilled" not in row
    assert any("does not reproduce" in line for line in lines)
    assert not any(line.startswith("re-evaluating") for line in lines)
