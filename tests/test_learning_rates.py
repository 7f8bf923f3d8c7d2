"""Each arm at its own learning rate: a sweep's per-trial table (trials.json) and the recipe's learning_rates."""

import json

import optuna
import pytest

from probloss.errors import ConfigError
from probloss.studies.recipe import arm_learning_rates, cell_overrides
from probloss.studies.readers import read_sweep, studies_from_table, trial_table
from probloss.studies.stats import summarise

LR = optuna.distributions.CategoricalDistribution([1e-4, 1e-3, 1e-2])
SEED = optuna.distributions.CategoricalDistribution([0, 1, 2])


def grid_study(scores):
    """A finished grid over learning rate x seed: scores {(lr, seed): val objective}."""
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("objective", "val/zeroshot_top1")
    for (lr, seed), value in scores.items():
        study.add_trial(optuna.trial.create_trial(
            params={"trainer.lr": lr, "seed": seed}, distributions={"trainer.lr": LR, "seed": SEED}, value=value,
            user_attrs={"val/zeroshot_top1": value, "test/zeroshot_top1": value - 0.01, "seed": seed,
                        "not kept": 1.0}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={"trainer.lr": 1e-2, "seed": 2},
                                              distributions={"trainer.lr": LR, "seed": SEED}))
    return study


@pytest.fixture
def sweep_table(tmp_path):
    """Two losses. infonce: the single best trial (0.9, at 1e-2) is not the best mean (1e-3: 0.5 on average).
    sigmoid: best at 1e-4."""
    infonce = grid_study({(1e-4, 0): 0.2, (1e-4, 1): 0.2, (1e-3, 0): 0.5, (1e-3, 1): 0.5, (1e-2, 0): 0.9,
                          (1e-2, 1): 0.0})
    sigmoid = grid_study({(1e-4, 0): 0.4, (1e-4, 1): 0.4, (1e-3, 0): 0.3, (1e-3, 1): 0.3})
    studies = {"infonce": (infonce, None), "sigmoid": (sigmoid, None)}
    path = tmp_path / "lr" / "trials.json"
    path.parent.mkdir()
    path.write_text(json.dumps(trial_table(studies)))
    return studies, path


def test_the_trial_table_keeps_what_the_report_reads(sweep_table):
    studies, path = sweep_table
    table = json.loads(path.read_text())
    assert "not kept" not in table["infonce"]["trials"][0]["user_attrs"]  # only the report's keys: small
    assert [t["state"] for t in table["infonce"]["trials"]][-1] == "FAIL"
    original, rebuilt = summarise(studies), summarise(read_sweep(path))
    assert summarise(read_sweep(path.parent)) == rebuilt  # the folder holding it reads the same
    for loss in original:
        for key in ("complete", "failed", "best", "median", "best_lr", "per_lr_mean", "lr_robust_width", "seeds"):
            assert rebuilt[loss][key] == original[loss][key], (loss, key)
        assert rebuilt[loss]["test/zeroshot_top1"].mean == pytest.approx(original[loss]["test/zeroshot_top1"].mean)
    assert original["infonce"]["best_lr"] == 1e-3 and original["sigmoid"]["best_lr"] == 1e-4
    assert studies_from_table(table)["sigmoid"][1] is None


def test_arms_take_their_loss_s_val_best_rate_unless_they_set_one(sweep_table):
    _, path = sweep_table
    exp = {"learning_rates": str(path), "overrides": ["trainer.max_steps=3"],
           "arms": {"a": ["loss=infonce"], "b": ["loss=sigmoid", "loss.false_negatives=mask"],
                    "c": ["loss=sigmoid", "trainer.lr=0.5"]}}
    used = arm_learning_rates(exp, [])
    assert {arm: u["lr"] for arm, u in used.items()} == {"a": 1e-3, "b": 1e-4, "c": 0.5}
    assert used["a"]["source"] == f"val-best of the sweep {path} (infonce)"
    assert used["c"]["source"] == "set by the arm"
    exp["learning_rates_used"] = used
    cell = cell_overrides(exp, "r", "b", exp["arms"]["b"], 0, [])
    assert "trainer.lr=0.0001" in cell and cell.index("trainer.lr=0.0001") < cell.index("loss=sigmoid")
    cell = cell_overrides(exp, "r", "c", exp["arms"]["c"], 0, [])
    assert [o for o in cell if o.startswith("trainer.lr=")] == ["trainer.lr=0.5"]  # the arm's own, nothing added
    # the command line wins over the table, and says so
    assert arm_learning_rates(exp, ["trainer.lr=0.2"])["a"] == {"lr": 0.2, "source": "set by the command line"}


def test_an_explicit_map_by_arm_then_loss_and_its_errors(sweep_table):
    _, path = sweep_table
    arms = {"a": ["loss=infonce"], "a masked": ["loss=infonce", "loss.false_negatives=mask"]}
    used = arm_learning_rates({"learning_rates": {"infonce": 3e-4, "a masked": 1e-3}, "arms": arms})
    assert {arm: u["lr"] for arm, u in used.items()} == {"a": 3e-4, "a masked": 1e-3}
    assert used["a masked"]["source"] == "the recipe's learning_rates map (a masked)"
    assert arm_learning_rates({"learning_rates": None, "arms": arms}) == {}
    with pytest.raises(ConfigError, match=r"no learning rate for arm 'x' \(loss 'pcmepp'\)"):
        arm_learning_rates({"learning_rates": str(path), "arms": {"x": ["loss=pcmepp"]}})
    with pytest.raises(ConfigError, match="not a finite learning rate"):
        arm_learning_rates({"learning_rates": {"infonce": -1}, "arms": arms})
    with pytest.raises(ConfigError, match="neither a sweep's trials.json"):
        arm_learning_rates({"learning_rates": str(path.parent / "missing.json"), "arms": arms})
