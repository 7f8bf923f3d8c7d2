"""Optuna sweeps end to end: tiny studies, a killed worker, divergence, and the report (parallel workers:
tests/test_studies_parallel.py)."""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from probloss.studies.report import write_report
from probloss.studies.sweep import run_sweep, storage_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_size=256", "data.val_size=64", "data.test_size=64", "trainer.batch_size=32",
        "trainer.warmup_steps=1", "trainer.log_every=1", "fabric.accelerator=cpu", "fabric.devices=1", "eval.projector_samples=0"]


def sweep_args(out_dir, cache_dir, *extra, steps=4):
    return ["sweep=lr", f"out_dir={out_dir}", f"data.cache_dir={cache_dir}", *TINY, f"trainer.max_steps={steps}",
            "trainer.eval_every=2", *extra]


def load(out_dir, name="lr-infonce", experiment="lr", url=None):
    storage = url or storage_for(None, out_dir, experiment)
    return optuna.load_study(study_name=name, storage=storage)


def fabric_cpu():
    from lightning_fabric import Fabric

    return Fabric(accelerator="cpu", devices=1)


def test_tiny_sweep_then_report(tmp_path, cache_dir):
    lines = []
    log = lambda *a, **k: lines.append(" ".join(map(str, a)))  # noqa: E731
    run_sweep(fabric_cpu(), sweep_args(tmp_path, cache_dir, "loss=infonce", "sweep.n_trials=3"), log=log)
    study = load(tmp_path)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 3
    assert sum("trial" in line and "objective" in line for line in lines) == 3  # a live line per trial
    assert "| infonce |" in lines[-1]  # the summary table
    for trial in finished:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert (run_dir / "summary.json").is_file() and list(run_dir.glob("events.out.tfevents.*"))
        assert 1e-4 <= trial.params["trainer.lr"] <= 3e-2

    # Re-running the same command continues the study: nothing left to do.
    run_sweep(fabric_cpu(), sweep_args(tmp_path, cache_dir, "loss=infonce", "sweep.n_trials=3"), log=log)
    assert len(load(tmp_path).trials) == 3

    report = write_report(tmp_path / "lr")
    text = report.read_text()
    complete, pruned, failed = map(int, re.search(r"\| infonce \| (\d+)/(\d+)/(\d+) \|", text).groups())
    assert complete + pruned == 3 and failed == 0
    assert "LR-robust width" in text and "![accuracy_vs_lr](accuracy_vs_lr.png)" in text
    for png in ("accuracy_vs_lr.png", "loss_curves.png", "effective_rank.png", "sigma_vs_specificity.png"):
        assert (tmp_path / "lr" / png).stat().st_size > 1000


def test_compare_losses_runs_each_loss_then_reruns_the_best_over_seeds(tmp_path, cache_dir):
    args = ["sweep=compare_losses", f"out_dir={tmp_path}", f"data.cache_dir={cache_dir}", *TINY,
            "trainer.max_steps=3", "trainer.eval_every=0", "sweep.losses=[infonce,sigmoid]", "sweep.n_trials=2",
            "sweep.rerun_seeds=[1,2]"]
    run_sweep(fabric_cpu(), args, log=lambda *a, **k: None)
    for loss in ("infonce", "sigmoid"):
        search = load(tmp_path, f"compare_losses-{loss}", experiment="compare_losses")
        assert len([t for t in search.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2
        best = load(tmp_path, f"compare_losses-{loss}-best", experiment="compare_losses")
        assert sorted(t.user_attrs["seed"] for t in best.trials) == [1, 2]
        assert all(t.user_attrs["trainer.lr"] == search.best_trial.params["trainer.lr"] for t in best.trials)
        # a parameter limited to some losses is searched only for them
        assert ("loss.init_logit_bias" in search.best_trial.params) == (loss == "sigmoid")
    text = write_report(tmp_path / "compare_losses").read_text()
    assert "| infonce |" in text and "| sigmoid |" in text


GRID = "sweep.space={trainer.lr: {type: categorical, choices: [1.0e-3, 2.0e-3]}, seed: {type: categorical, choices: [0, 1]}}"


def test_grid_sweep_runs_every_point_once_and_reports_the_mean_per_learning_rate(tmp_path, cache_dir):
    args = ["sweep=lr_grid", f"out_dir={tmp_path}", f"data.cache_dir={cache_dir}", *TINY, "trainer.max_steps=2",
            "trainer.eval_every=0", "sweep.losses=[infonce]", GRID]
    run_sweep(fabric_cpu(), args, log=lambda *a, **k: None)
    run_sweep(fabric_cpu(), args, log=lambda *a, **k: None)  # the grid is done: nothing more to run
    study = load(tmp_path, "lr_grid-infonce", experiment="lr_grid")
    assert len(study.trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted((t.params["trainer.lr"], t.params["seed"]) for t in study.trials) == [
        (1e-3, 0), (1e-3, 1), (2e-3, 0), (2e-3, 1)]
    text = write_report(tmp_path / "lr_grid").read_text()
    assert "Mean objective per learning rate" in text
    assert re.search(r"\| 0\.001 \| \d\.\d{3} \|", text) and re.search(r"\| 0\.002 \| \d\.\d{3} \|", text)


def test_racing_workers_enqueue_the_grid_twice_and_still_run_each_point_once(tmp_path):
    """Two workers enqueue the grid at the same moment (every point twice): claiming hands each point to one
    trial and drops the copies, so the four points of a 2 x 2 grid run once each, in the seeded order."""
    from probloss.studies.sweep import claim, enqueue_grid, grid_points

    cfg = {"seed": 0, "space": {"trainer.lr": {"type": "categorical", "choices": [1e-3, 3e-3]},
                                "seed": {"type": "categorical", "choices": [0, 1]}}}
    points = grid_points(cfg, "infonce")
    assert len(points) == 4 and points == grid_points(cfg, "infonce")  # seeded: the same order every time
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'grid.db'}")
    for _ in range(2):  # both workers see an empty study and enqueue every point
        study.enqueue_trial({}, user_attrs={})  # (an unrelated waiting trial without a unit is dropped too)
        for point in points:
            study.enqueue_trial(dict(point), user_attrs={"grid_point": json.dumps(point, sort_keys=True)},
                                skip_if_exists=False)
    ran = []
    while enqueue_grid(study, points):  # nothing new is enqueued: every point has a live (waiting) trial
        trial = claim(study, "grid_point")
        if trial is not None:
            ran.append(json.loads(trial.user_attrs["grid_point"]))  # suggested from its fixed params later
            study.tell(trial, 0.0)
    assert ran == points  # each point once, in the seeded order
    dropped = [t for t in study.trials if t.user_attrs.get("dropped")]
    assert len(dropped) == 6 and all(t.state == optuna.trial.TrialState.FAIL for t in dropped)


def test_racing_workers_resume_each_interrupted_trial_once_and_a_crashed_one_never(tmp_path):
    """Interrupted trials (preempted, or their worker died) are taken over by exactly one trial each, with their
    parameters, even when two workers enqueue them at the same moment; a taken-over trial that is interrupted in
    turn is resumed in its place; a crashed or dropped trial is never resumed."""
    from probloss.studies.sweep import claim, enqueue_resumes, interrupted_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'resume.db'}")
    FAIL = optuna.trial.TrialState.FAIL
    for n, attrs in enumerate([{"interrupted": "SIGTERM (step 3 saved in x)"}, {}, {"crashed": "ValueError: bad"},
                               {"dropped": "no unit left"}]):
        trial = study.ask({"trainer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
        for key, value in {"run_name": f"s-trial{n:04d}", **attrs}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, state=FAIL)  # 0: preempted, 1: its worker died, 2: crashed, 3: dropped by claim
    assert [t.number for t in interrupted_trials(study.trials)] == [0, 1]
    for _ in range(2):  # two workers, each enqueues both before either claims
        for old in interrupted_trials(study.trials):
            study.enqueue_trial(dict(old.params), user_attrs={"resumes": old.number}, skip_if_exists=False)
    taken = []
    while enqueue_resumes(study):  # nothing is enqueued again: each interrupted trial has a waiting copy
        trial = claim(study, "resumes")
        if trial is not None:
            taken.append(trial)
            trial.suggest_float("trainer.lr", 1e-4, 1e-1, log=True)  # as run_trial does: the enqueued value
            if len(taken) == 1:  # the first take-over is itself preempted: it is resumed, not trial 0 again
                trial.set_user_attr("run_name", "s-trial0000")
                study.tell(trial, state=FAIL)
            else:
                study.tell(trial, 0.0)
    resumed = [t.user_attrs["resumes"] for t in taken]
    assert resumed == [0, 1, taken[0].number]
    params = {t.number: t.params for t in study.trials}
    assert all(params[t.number] == params[t.user_attrs["resumes"]] for t in taken)
    assert interrupted_trials(study.trials) == []


def test_grid_sampler_needs_categorical_parameters():
    from probloss.errors import ConfigError
    from probloss.studies.sweep import load_sweep, trial_budget

    grid, _ = load_sweep(["sweep=lr_grid"])
    assert trial_budget(grid, "infonce") == 7 * 5
    with pytest.raises(ConfigError, match="categorical"):
        # sweep=lr searches trainer.lr on a float range: not a grid
        trial_budget(load_sweep(["sweep=lr", "sweep.sampler=grid", "sweep.n_trials=null"])[0], "infonce")
    with pytest.raises(ConfigError, match="n_trials is null"):
        trial_budget(load_sweep(["sweep=lr", "sweep.n_trials=null"])[0], "infonce")


def test_sweep_command_line_is_checked_like_training():
    from probloss.errors import ConfigError
    from probloss.studies.sweep import load_sweep

    sweep, train = load_sweep(["sweep=lr", "loss=sigmoid", "sweep.n_trials=2", "trainer.max_steps=5"])
    assert sweep["n_trials"] == 2 and train == ["loss=sigmoid", "trainer.max_steps=5"]
    with pytest.raises(ConfigError, match="unknown config key 'sweep.n_trial'. Did you mean 'n_trials'"):
        load_sweep(["sweep=lr", "sweep.n_trial=2"])
    with pytest.raises(ConfigError, match="unknown config key 'trainer.max_step'"):
        load_sweep(["sweep=lr", "trainer.max_step=2"])
    with pytest.raises(ConfigError, match="say which sweep to use: sweep=<name>, one of compare_losses, lr"):
        load_sweep([])


def test_huge_learning_rate_is_recorded_as_diverged(tmp_path, cache_dir):
    space = "sweep.space={trainer.lr: {type: categorical, choices: [1.0e30]}}"
    args = sweep_args(tmp_path, cache_dir, "loss=gaussian_var", "sweep.n_trials=1", space,
                      "trainer.grad_clip=null", "trainer.warmup_steps=0", "trainer.max_nonfinite=3")
    run_sweep(fabric_cpu(), args, log=lambda *a, **k: None)
    (trial,) = load(tmp_path, "lr-gaussian_var").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["stability/diverged"] is True or trial.user_attrs["stability/diverged"] == 1.0


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _worker(out_dir, cache_dir, n_trials, steps, *extra):
    args = sweep_args(out_dir, cache_dir, "loss=infonce", f"sweep.n_trials={n_trials}", "trainer.eval_every=0",
                      "sweep.workers=1", *extra, steps=steps)  # the command is the one worker (it is killed)
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / "sweep.py"), *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_running_trial(out_dir, process, timeout=120, url=None):
    journal = Path(out_dir) / "sweeps" / "lr.journal"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        if url or journal.is_file():
            try:
                study = load(out_dir, url=url)
            except KeyError:
                study = None
            if study and any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials):
                return
        time.sleep(0.2)
    raise AssertionError("no trial started")


def _assert_no_process_left(out_dir, timeout=15.0):
    """No process whose command line names ``out_dir`` (Linux /proc) is still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(out_dir).encode() in cmdline.read_bytes() and b"State:\tZ" not in (cmdline.parent / "status").read_bytes():
                    left.append(cmdline.parent.name)
            except OSError:  # exited while we looked
                pass
        if not left:
            return
        assert time.monotonic() < deadline, f"processes {left} outlived the killed worker"
        time.sleep(0.2)


@pytest.mark.parametrize("sampler", ["tpe", "grid"])
def test_killed_worker_loses_only_its_running_trial(tmp_path, cache_dir, sampler):
    grid = ["sweep.sampler=grid", "sweep.space={trainer.lr: {type: categorical, choices: [1.0e-3, 2.0e-3]}}"]
    extra = grid if sampler == "grid" else []
    process = _worker(tmp_path, cache_dir, 2, 400, *extra)
    _wait_for_running_trial(tmp_path, process)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _assert_no_process_left(tmp_path)  # its DataLoader worker dies with it (no orphan holding memory)
    rerun = _worker(tmp_path, cache_dir, 2, 400, *extra)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]
    assert "marked trials [0] failed" in output
    trials = load(tmp_path).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    if sampler == "grid":  # the killed grid point is run again, not skipped
        assert sorted(t.params["trainer.lr"] for t in complete) == [1e-3, 2e-3]
    # the killed trial is taken over, not replaced by new parameters: same parameters, same run folder (lr.yaml
    # saves no checkpoint before the end, so it starts again there from step 0)
    assert trials[0].user_attrs["interrupted"] == "its worker died"
    (taken,) = [t for t in complete if t.user_attrs.get("resumes") == 0]
    assert taken.params == trials[0].params and taken.user_attrs["run_name"] == trials[0].user_attrs["run_name"]
    assert taken.user_attrs["run_dir"].endswith("lr-infonce-trial0000") and taken.user_attrs["steps"] == 400


# --- dead workers on other hosts: heartbeats ------------------------------------------------------------------


def test_journal_heartbeat_fails_a_silent_trial_of_another_host(tmp_path):
    from probloss.studies.sweep import fail_dead_trials, heartbeat

    storage = storage_for(None, tmp_path, "lr")
    study = optuna.create_study(study_name="s", storage=storage)
    alive, silent, unknown = study.ask(), study.ask(), study.ask()
    for trial in (alive, silent, unknown):
        trial.set_user_attr("host", "another-host")  # no process id check possible from here
        trial.set_user_attr("pid", 1)
    with heartbeat(storage, alive, interval=0.1):
        silent.set_user_attr("heartbeat", time.time() - 10)  # its worker stopped beating 10 s ago
        time.sleep(0.3)
        assert fail_dead_trials(study, storage, grace_period=5) == [silent.number]
    assert time.time() - load(tmp_path, "s").trials[0].user_attrs["heartbeat"] < 1.0  # it kept beating
    states = [t.state for t in load(tmp_path, "s").trials]
    # a trial without any heartbeat (written before heartbeats existed) is left to the process id check
    assert states == [optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own: a temporary data directory, a loopback port, trust authentication.

    Needs Debian's postgresql package (initdb, pg_ctl; `.ci/run` installs it) and psycopg2 (the `sweep` extra);
    without them the test is skipped, unless PROBLOSS_REQUIRE_POSTGRES=1 (CI) makes that a failure."""
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    missing = "PostgreSQL server (apt-get install postgresql)" if initdb is None else None
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        missing = "psycopg2 (pip install -e '.[sweep]')"
    if missing:
        if os.environ.get("PROBLOSS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{missing} is required (PROBLOSS_REQUIRE_POSTGRES=1)")
        pytest.skip(f"needs {missing}")
    bindir = Path(initdb).resolve().parent
    home = Path(tempfile.mkdtemp(prefix="probloss-pg-"))
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the package's postgres user
        shutil.chown(home, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(home / "db"), "-U", "probloss", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(home / "db"), "-l", str(home / "server.log"), "-w",
                    "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql+psycopg2://probloss@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(home / "db"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_rdb_heartbeat_fails_a_killed_workers_trial_and_the_study_reaches_its_budget(tmp_path, cache_dir, database,
                                                                                     request):
    """SIGKILL a worker mid-trial on an RDB storage, start another: only the heartbeat can tell that the first
    worker died (RDB storages do no process id check); its trial ends FAIL after the grace period, and the new
    worker runs until 2 trials are complete, waiting for the stale trial rather than stopping at 1 + 1 running."""
    url = f"sqlite:///{tmp_path / 'study.db'}" if database == "sqlite" else request.getfixturevalue("postgres_url")
    beat = [f"sweep.storage={url}", "sweep.heartbeat_interval=1", "sweep.grace_period=4"]
    started = time.perf_counter()
    killed = _worker(tmp_path, cache_dir, 2, 400, *beat)
    _wait_for_running_trial(tmp_path, killed, url=url)
    time.sleep(1.5)  # at least one beat after the first
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    survivor = _worker(tmp_path, cache_dir, 2, 4, *beat)
    output, _ = survivor.communicate(timeout=600)
    assert survivor.returncode == 0, output[-3000:]
    assert "marked trials [0] failed: their worker died" in output
    trials = load(tmp_path, url=url).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 2
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    print(f"{database}: killed worker's trial failed by heartbeat, budget reached in "
          f"{time.perf_counter() - started:.1f} s")
