"""Recipes: arms x seeds of training runs, extra evaluations, resumption, and the report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from probloss.config import ConfigError
from probloss.recipe import load_recipe, run_recipe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_size=256", "data.val_size=64", "data.test_size=64", "trainer.batch_size=32",
        "trainer.warmup_steps=1", "trainer.max_steps=3", "fabric.accelerator=cpu", "fabric.devices=1"]


def test_every_recipe_file_loads():
    from probloss.config import compose_config, group_options

    assert {"batch_size", "bias_init", "neg_masking", "robustness", "proposal", "relations"} <= set(
        group_options("recipe"))
    for name in group_options("recipe"):
        _, recipe, _ = load_recipe([f"recipe={name}"])
        for arm_overrides in recipe["arms"].values():  # every arm composes: no typo in a key waits for its turn
            compose_config([*recipe["overrides"], *arm_overrides])


def test_recipe_runs_arms_and_seeds_then_resumes(tmp_path):
    args = ["recipe=robustness", "recipe.seeds=[0,1]", f"out_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}",
            *TINY, "recipe.arms={infonce: ['loss=infonce'], sigmoid_30: ['loss=sigmoid', 'data.caption_noise=0.3']}"]
    lines = []
    report = run_recipe(args, log=lambda *a, **k: lines.append(a[0]))
    assert sum("training" in line for line in lines) == 4
    results = json.loads((tmp_path / "robustness" / "results.json").read_text())
    assert {(r["arm"], r["seed"]) for r in results} == {(a, s) for a in ("infonce", "sigmoid_30") for s in (0, 1)}
    assert all("image_noise_0.3/test/i2t_r@1" in r for r in results)  # the extra noisy evaluation
    text = report.read_text()
    assert "| infonce | " in text and "| sigmoid_30 | " in text and "±" in text
    assert (tmp_path / "robustness" / "test_zeroshot_top1.png").stat().st_size > 1000

    lines.clear()
    run_recipe(args, log=lambda *a, **k: lines.append(a[0]))
    assert not any("training" in line for line in lines)  # finished runs are not trained again

    # scripts/report.py renders the same page again from the folder alone (with the overridden arms)
    report.unlink()
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "report.py"), str(tmp_path / "robustness")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert report.read_text() == text


def test_unknown_recipe_and_keys_are_errors():
    with pytest.raises(ConfigError, match="unknown recipe choice 'nope'"):
        load_recipe(["recipe=nope"])
    with pytest.raises(ConfigError, match="unknown config key 'recipe.seed_list'. Did you mean 'seeds'"):
        load_recipe(["recipe=bias_init", "recipe.seed_list=[1]"])
    with pytest.raises(ConfigError, match="say which recipe to use"):
        load_recipe([])
