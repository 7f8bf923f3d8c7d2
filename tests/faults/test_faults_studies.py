"""Faults injected into studies (issue 29, deliverables 4 and 9): a sweep worker or a recipe worker stopped by
SIGTERM mid-trial leaves its trial or run to resume, and the same command resumes it from its checkpoint and ends
bit-identically where an uninterrupted study ends; a study's console shows one line per trial or run.

Real processes, real signals: the worker is ``probloss sweep`` / ``probloss recipe`` through probloss.cli (the
user's exit codes and lines), with the fault suite's ``SLOW`` hook (tests/faults/faultkit.py): after
optimizer step 3 it marks a file and holds every later step for a moment, so the SIGTERM sent once the trial's
first checkpoint exists lands mid-run (nothing is timed: the step it stopped at is read from its line).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from faultkit import SLOW, SLOW_HOOK
from probloss.studies.sweep import storage_for
from probloss.training import checkpoint as ckpt
from probloss.training.run_folder import HEADLINE_KEYS

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
FAIL, COMPLETE = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE


TINY = ["data.train_size=256", "data.val_size=64", "data.test_size=64", "trainer.batch_size=32",
        f"trainer.max_steps={STEPS}", "trainer.warmup_steps=1", "trainer.eval_every=4", "trainer.ckpt_every=2",
        "trainer.log_every=1", "trainer.progress=false", "fabric.accelerator=cpu", "fabric.devices=1",
        "eval.projector_samples=0", "eval.noise_std=0"]
# headline keys that are functions of the weights and the data (samples_per_s is a timing)
COMPARED = [k for k in HEADLINE_KEYS if k != "samples_per_s"]


def sweep_args(out_dir, cache_dir):
    return ["sweep=lr", "loss=infonce", "sweep.n_trials=1", "sweep.workers=1", "sweep.pruner=none",
            f"out_dir={out_dir}", f"data.cache_dir={cache_dir}", *TINY]


def recipe_args(out_dir, cache_dir):
    return ["recipe=bias_init", "recipe.seeds=[0]", "recipe.arms={a: ['loss.init_logit_bias=-10']}", "recipe.baseline=a",
            "recipe.primary=[]", "recipe.metrics=[test/zeroshot_top1]", "recipe.vary_data=false", "recipe.workers=1",
            f"out_dir={out_dir}", f"data.cache_dir={cache_dir}", *TINY]


def env(**extra):
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    out.pop("LT_CLI_USED", None)
    return out


def run(command: str, args, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from probloss.cli import main; main()", command, *args],
                          env=env(**extra_env), capture_output=True, text=True, timeout=300)


def stop_mid_run(tmp_path, command: str, args, run_dir: Path) -> subprocess.CompletedProcess:
    """Start ``probloss <command> args`` with the SLOW hook; once step 3 is done and ``run_dir`` holds a
    checkpoint, send SIGTERM; wait for it to exit."""
    script, mark = tmp_path / "slow.py", tmp_path / "mark"
    script.write_text(SLOW)
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(SLOW_AFTER_STEP="3", MARK=str(mark), COMMAND=command))
    while not (mark.exists() and ckpt.list_checkpoints(run_dir)):
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(proc.communicate()[1][-3000:])
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def preempt(tmp_path, command: str, args, run_dir: Path, line: str) -> tuple[int, Path, list[str]]:
    """:func:`stop_mid_run`, then the checks every preempted study shares: exit 143, a last line matching ``line``
    (groups: the step, the checkpoint, the command that resumes it), a checkpoint of that step in ``run_dir``,
    and the same command. Returns (step, checkpoint, command)."""
    stopped = stop_mid_run(tmp_path, command, args, run_dir)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    found = re.fullmatch(line, last_line(stopped.stderr))
    assert found, last_line(stopped.stderr)
    step, saved, again = int(found[1]), Path(found[2]), shlex.split(found[3])
    assert 3 <= step < STEPS and saved == ckpt.checkpoint_path(run_dir, step) and saved.is_file()
    assert again[2:] == args  # the same study command resumes it
    return step, saved, again


def resume(command: list[str], name: str) -> subprocess.CompletedProcess:
    """Run the printed resume command (its script through the SLOW hook's entry, as ``probloss <name>``)."""
    resumed = subprocess.run([sys.executable, *command[1:]], env=env(COMMAND=name), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed


def last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.strip()][-1]


def trials(out_dir) -> list:
    """The trials of the sweep's study, from its journal under ``out_dir``."""
    return optuna.load_study(study_name="lr-infonce", storage=storage_for(None, out_dir, "lr")).trials


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_same_headline(a: Path, b: Path) -> None:
    sa, sb = summary(a), summary(b)
    assert sa["steps"] == sb["steps"] == STEPS
    shown = [k for k in COMPARED if k in sa]
    assert len(shown) >= 8, shown  # the headline keys of a finished run are there to compare
    assert {k: sa[k] for k in shown} == {k: sb.get(k) for k in shown}


def uninterrupted(out: Path, command: str, args, run_path: str) -> tuple[Path, str]:
    """Run ``probloss <command> args`` to the end: (the run folder ``out / run_path``, its stdout)."""
    done = run(command, args)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / run_path, done.stdout


@pytest.fixture(scope="module")
def straight_sweep(tmp_path_factory, cache_dir):
    """An uninterrupted one-trial sweep: (its trial's run folder, its stdout)."""
    out = tmp_path_factory.mktemp("sweep")
    return uninterrupted(out, "sweep", sweep_args(out, cache_dir), "lr/infonce/lr-infonce-trial0000")


@pytest.fixture(scope="module")
def straight_recipe(tmp_path_factory, cache_dir):
    """An uninterrupted one-run recipe: (its run folder, its stdout)."""
    out = tmp_path_factory.mktemp("recipe")
    return uninterrupted(out, "recipe", recipe_args(out, cache_dir), "bias_init/sigmoid/a-seed0")


@pytest.mark.slow
def test_a_preempted_sweep_trial_is_resumed_by_the_same_command_bit_identically(tmp_path, cache_dir,
                                                                                 straight_sweep):
    args = sweep_args(tmp_path, cache_dir)
    run_dir = tmp_path / "lr" / "infonce" / "lr-infonce-trial0000"
    step, saved, command = preempt(tmp_path, "sweep", args, run_dir,
                                   r"stopped by SIGTERM at step (\d+) of trial 0 of study lr-infonce: saved (\S+); the "
                                   r"sweep resumes the trial from it; resume with: (.+)")
    (trial,) = trials(tmp_path)
    assert trial.state == FAIL and trial.user_attrs["interrupted"].startswith(f"SIGTERM (step {step} saved")
    assert trial.user_attrs["run_name"] == run_dir.name

    resumed = resume(command, "sweep")
    first, second = trials(tmp_path)  # no second trial with new parameters: the budget of 1 is the resumed trial
    assert (first.state, second.state) == (FAIL, COMPLETE)
    assert second.user_attrs["resumes"] == 0 and second.params == first.params
    assert second.user_attrs["run_dir"] == str(run_dir) and second.user_attrs["steps"] == STEPS
    assert f"resumed from {saved} at step {step}" in (run_dir / "out.log").read_text()
    assert "(resumed trial 0)" in resumed.stdout
    reference, _ = straight_sweep
    assert_same_headline(run_dir, reference)
    assert second.values == trials(reference.parents[2])[0].values


@pytest.mark.slow
def test_a_preempted_recipe_run_is_resumed_by_the_same_command_bit_identically(tmp_path, cache_dir,
                                                                               straight_recipe):
    args = recipe_args(tmp_path, cache_dir)
    run_dir = tmp_path / "bias_init" / "sigmoid" / "a-seed0"
    step, saved, command = preempt(tmp_path, "recipe", args, run_dir,
                                   r"stopped by SIGTERM at step (\d+): saved (\S+); resume with: (.+)")
    assert not (run_dir / "summary.json").exists()

    resumed = resume(command, "recipe")
    assert f"training a seed 0 (resuming from {saved.name})" in resumed.stdout
    assert f"resumed from {saved} at step {step}" in (run_dir / "out.log").read_text()
    reference, _ = straight_recipe
    assert_same_headline(run_dir, reference)
    (row,) = json.loads((tmp_path / "bias_init" / "results.json").read_text())
    (ref_row,) = json.loads((reference.parents[1] / "results.json").read_text())
    assert row["test/zeroshot_top1"] == ref_row["test/zeroshot_top1"]


@pytest.mark.slow
def test_a_study_prints_one_line_per_trial_or_run_and_keeps_eval_lines_in_out_log(straight_sweep, straight_recipe):
    for run_dir, stdout in (straight_sweep, straight_recipe):
        assert "[eval step" not in stdout, stdout
        log = (run_dir / "out.log").read_text()
        assert "[eval step 4]" in log and f"[eval step {STEPS}]" in log  # intermediate and final: in out.log
    sweep_lines = [line for line in straight_sweep[1].splitlines() if line.strip()]
    trial_lines = [line for line in sweep_lines if line.startswith("[lr-infonce] trial")]
    assert len(trial_lines) == 1 and "COMPLETE" in trial_lines[0]
    # besides it: the summary table (header, rule, one row per loss), the shapes data written into the cache when
    # the session's cache was new, and nothing per step or evaluation
    rest = [line for line in sweep_lines if line not in trial_lines and not line.startswith("|")]
    assert [line for line in rest if not re.match(r"wrote \d+ samples in", line)] == [], sweep_lines
    recipe_lines = [line for line in straight_recipe[1].splitlines() if line.strip()]
    assert [line for line in recipe_lines if "a seed 0" in line] == ["[bias_init] training a seed 0"], recipe_lines
    assert len(recipe_lines) <= 3, recipe_lines  # the run's line, the report written (and nothing per evaluation)


@pytest.mark.slow
def test_sigterm_to_a_recipe_with_two_workers_reaches_them_and_their_runs_resume(tmp_path, cache_dir,
                                                                               straight_recipe):
    """SIGTERM to the command (a cluster preempting the job's main process) is passed on to its local workers:
    each saves a checkpoint at its next step boundary (periodic checkpoints are off, so a checkpoint can only be
    the signal's), the command exits 143 with one line, and running it again resumes both runs."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_HOOK)  # in every worker
    mark = tmp_path / "mark"
    args = [*recipe_args(tmp_path, cache_dir), "recipe.seeds=[0,1]", "recipe.workers=2", "trainer.ckpt_every=0"]
    proc = subprocess.Popen([sys.executable, "-c", "from probloss.cli import main; main()", "recipe", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(SLOW_AFTER_STEP="3", MARK=str(mark), PYTHONPATH=f"{hook}{os.pathsep}{REPO}"))
    while not mark.exists():
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(proc.communicate()[1][-3000:])
    os.kill(proc.pid, signal.SIGTERM)  # the command only, not its process group
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert re.fullmatch(r"stopped by SIGTERM \(2 workers; \d stopped at a step boundary with a checkpoint, .*\); "
                        r"resume with: .+", last_line(stderr)), last_line(stderr)
    runs = [tmp_path / "bias_init" / "sigmoid" / f"a-seed{seed}" for seed in (0, 1)]
    saved = {run_dir: ckpt.list_checkpoints(run_dir) for run_dir in runs if run_dir.is_dir()}
    assert any(saved.values()), saved  # at least the worker past step 3 checkpointed at the signal

    resumed = run("recipe", args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run_dir, checkpoints in saved.items():
        if checkpoints:
            assert "resumed from" in (run_dir / "out.log").read_text()
    reference, _ = straight_recipe
    assert_same_headline(runs[0], reference)
