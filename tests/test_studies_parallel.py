"""Studies at scale: a recipe's grid shared by workers (each run once, failover, report once, results identical
to one worker), sweep workers that never repeat a trial, study names, concurrent schema creation, submitit.

Every multi-worker test runs real processes on a real storage (a journal file; PostgreSQL where the server is
installed, required in CI by PROBLOSS_REQUIRE_POSTGRES=1, see tests/test_sweep.py's ``postgres_url``).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from test_sweep import postgres_url  # noqa: F401  (the fixture: a PostgreSQL server of its own)

from probloss.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_size=256", "data.val_size=64", "data.test_size=64", "trainer.batch_size=32",
        "trainer.warmup_steps=1", "fabric.accelerator=cpu", "fabric.devices=1", "eval.projector_samples=0"]
ARMS = "recipe.arms={infonce: ['loss=infonce'], sigmoid: ['loss=sigmoid']}"
SUMMARY_KEYS = ("test/zeroshot_top1", "test/i2t_r@1", "test/t2i_r@1", "train/loss", "steps", "val/zeroshot_top1")


def recipe_args(out_dir, cache_dir, *extra, steps=3):
    return ["recipe=proposal", "recipe.seeds=[0,1]", ARMS, "recipe.baseline=null", "recipe.metrics=[test/zeroshot_top1]",
            "recipe.primary=[]", "recipe.constants={}", "recipe.learning_rates=null",
            f"out_dir={out_dir}", f"data.cache_dir={cache_dir}", *TINY, f"trainer.max_steps={steps}", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(script, args):
    """The command as a process whose output goes to a file (a pipe nobody reads could fill and block it)."""
    log = tempfile.NamedTemporaryFile("w+", prefix="probloss-worker-", suffix=".log", delete=False)
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / script), *args], env=_env(), stdout=log,
                               stderr=subprocess.STDOUT, text=True)
    process.log = Path(log.name)
    return process


def wait_for(process, text, timeout=120):
    """Until ``text`` is in the process's output (Optuna logs "... study ..." when a worker opens the queue)."""
    deadline = time.monotonic() + timeout
    while text not in process.log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.log.read_text()[-4000:]
        time.sleep(0.1)


def finish(process, timeout=600):
    process.wait(timeout=timeout)
    output = process.log.read_text()
    assert process.returncode == 0, output[-4000:]
    return output


def queue(out_dir, url=None):
    from probloss.studies.sweep import storage_for

    storage = storage_for(url or str(Path(out_dir) / "proposal" / "queue.journal"), out_dir, "proposal")
    (name,) = [n for n in optuna.get_all_study_names(storage) if n.startswith("recipe-proposal-")]
    return optuna.load_study(study_name=name, storage=storage)


def rows(out_dir):
    """results.json as {(arm, seed): the summary numbers that a deterministic run must reproduce}."""
    results = json.loads((Path(out_dir) / "proposal" / "results.json").read_text())
    return {(r["arm"], r["seed"]): {k: r[k] for k in SUMMARY_KEYS if k in r} for r in results}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory, cache_dir):
    """The grid run by one worker in one process: the reference every parallel run must reproduce bit for bit."""
    from probloss.studies.recipe import run_recipe

    out = tmp_path_factory.mktemp("sequential")
    run_recipe(recipe_args(out, cache_dir, "recipe.workers=1"), log=lambda *a, **k: None)
    return rows(out)


@pytest.mark.slow
@pytest.mark.parametrize("database", ["journal", "postgresql"])
def test_two_recipe_commands_share_the_grid_and_train_each_run_once(tmp_path, cache_dir, sequential, database,
                                                                    request):
    """The same recipe command started twice at once (one of them with two local workers: three workers) trains
    every cell once, writes no run folder twice, writes the report once, and reproduces the sequential run."""
    url = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    extra = [f"recipe.storage={url}"] if url else []
    first = start("run_recipe.py", recipe_args(tmp_path, cache_dir, "recipe.workers=2", *extra))
    # The second command starts once the first one's workers have opened the queue: a command's own imports take
    # longer than these tiny runs, so started together the in-process worker could train all four alone.
    wait_for(first, "study")
    second = start("run_recipe.py", recipe_args(tmp_path, cache_dir, "recipe.workers=1", *extra))
    output = finish(first) + finish(second)
    assert output.count("[proposal] training ") == 4, output  # 2 arms x 2 seeds, each once
    assert output.count("[proposal] wrote ") == 1, output  # the report, by whichever worker finished last
    assert "2 workers via local" in output
    for run_dir in (tmp_path / "proposal").glob("*/*-seed*"):
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1, run_dir  # no run trained twice
    trials = queue(tmp_path, url).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["unit"] for t in complete if not t.user_attrs["unit"].startswith("report:")) == sorted(
        json.dumps([arm, seed]) for arm in ("infonce", "sigmoid") for seed in (0, 1))
    assert len({t.user_attrs["pid"] for t in complete}) >= 2  # the work was shared
    assert rows(tmp_path) == sequential  # identical to one worker, bit for bit

    again = finish(start("run_recipe.py", recipe_args(tmp_path, cache_dir, "recipe.workers=1", *extra)))
    assert "training" not in again and "wrote" not in again and "report was written" in again


def _wait_for_checkpoint(run_dirs, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.log.read_text()
        for run_dir in run_dirs:
            if list(run_dir.glob("checkpoints/step-*.ckpt")):
                return run_dir
        time.sleep(0.1)
    raise AssertionError("no checkpoint written")


@pytest.mark.slow
def test_a_killed_workers_run_is_taken_over_and_resumed_from_its_checkpoint(tmp_path, cache_dir):
    """SIGKILL one of two workers mid-run: the other fails its cell (process id check), queues it again and
    resumes it from its newest checkpoint; the grid completes and the report is written."""
    args = recipe_args(tmp_path, cache_dir, "recipe.workers=1", "recipe.seeds=[0]", "trainer.ckpt_every=5",
                       steps=60)
    victim = start("run_recipe.py", args)
    run_dirs = [tmp_path / "proposal" / loss / f"{loss}-seed0" for loss in ("infonce", "sigmoid")]
    killed_dir = _wait_for_checkpoint(run_dirs, victim)
    survivor = start("run_recipe.py", args)
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    output = finish(survivor)
    assert "failed: their worker died" in output, output
    assert f"training {killed_dir.parent.name} seed 0 (resuming from step-" in output, output
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["steps"] == 60
    assert output.count("[proposal] wrote ") == 1 and len(rows(tmp_path)) == 2
    states = [t.state for t in queue(tmp_path).trials]
    assert states.count(optuna.trial.TrialState.FAIL) >= 1 and optuna.trial.TrialState.RUNNING not in states


@pytest.mark.slow
def test_submitit_local_executor_runs_the_workers_as_a_job_array(tmp_path, cache_dir, sequential):
    pytest.importorskip("submitit")
    args = recipe_args(tmp_path, cache_dir, "recipe.launcher=submitit", "recipe.workers=2",
                       "recipe.slurm.cluster=local", "recipe.slurm.time_min=10")
    output = finish(start("run_recipe.py", args))
    assert "submitted 2 workers as job array" in output, output
    logs = "".join(p.read_text() for p in (tmp_path / "proposal" / "submitit").rglob("*_log.out"))
    assert logs.count("[proposal] training ") == 4 and logs.count("[proposal] wrote ") == 1, logs
    assert rows(tmp_path) == sequential


# --- sweeps ---------------------------------------------------------------------------------------------------


def sweep_args(out_dir, cache_dir, *extra):
    return ["sweep=lr", "loss=infonce", f"out_dir={out_dir}", f"data.cache_dir={cache_dir}", *TINY,
            "trainer.max_steps=3", "trainer.eval_every=0", *extra]


@pytest.mark.slow
def test_parallel_sweep_workers_never_repeat_a_parameter_set(tmp_path, cache_dir):
    """Two local workers of one command plus one started by hand, all on one journal: every trial's parameters
    differ (with one sampler seed for every worker, two workers started together ran 3 distinct of 6)."""
    spawned = start("sweep.py", sweep_args(tmp_path, cache_dir, "sweep.n_trials=4", "sweep.workers=2"))
    wait_for(spawned, "study")  # its workers are up (see the recipe test above: start-up outlasts a tiny trial)
    by_hand = start("sweep.py", sweep_args(tmp_path, cache_dir, "sweep.n_trials=4", "sweep.workers=1"))
    output = finish(spawned) + finish(by_hand)
    assert "sweep: 2 workers via local" in output
    study = optuna.load_study(study_name="lr-infonce", storage=_journal(tmp_path / "sweeps" / "lr.journal"))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 4 <= len(complete) <= 6  # workers may each start one of the last trials at the same moment
    params = [t.params["trainer.lr"] for t in complete]
    assert len(set(params)) == len(params), params  # duplicates: 0
    workers = {t.user_attrs.get("worker") for t in complete}  # the spawned ones record their index
    assert workers <= {0, 1, None} and workers & {0, 1} and len({t.user_attrs["pid"] for t in complete}) >= 2
    assert len({t.user_attrs["sampler_seed"] for t in complete}) == len(complete)


def _journal(path):
    from probloss.studies.sweep import storage_for

    return storage_for(str(path), path.parent, "x")


def test_trial_seeds_differ_per_trial_and_are_reproducible():
    from probloss.studies.sweep import trial_seed

    seeds = [trial_seed(0, n) for n in range(100)]
    assert len(set(seeds)) == 100 and seeds == [trial_seed(0, n) for n in range(100)]
    assert trial_seed(1, 0) != trial_seed(0, 0)


def test_two_sweeps_get_their_own_studies_and_a_reused_name_with_another_space_is_an_error(tmp_path):
    from probloss.studies.sweep import default_study_name, load_sweep, open_study, storage_for

    assert default_study_name("lr", "lr", "infonce") == "lr-infonce"  # the default experiment: unchanged
    assert default_study_name("shared", "lr", "infonce") != default_study_name("shared", "stability", "infonce")
    storage = storage_for(None, tmp_path, "shared")
    lr, _ = load_sweep(["sweep=lr"])
    stability, _ = load_sweep(["sweep=stability"])
    open_study(lr, storage, "shared-infonce", "infonce")
    open_study(lr, storage, "shared-infonce", "infonce")  # the same search: loads it
    with pytest.raises(ConfigError, match="created with another search"):
        open_study(stability, storage, "shared-infonce", "infonce")


CREATE = """
import os, sys, time
from pathlib import Path
from probloss.studies.sweep import load_sweep, open_study, storage_for
barrier, url = Path(sys.argv[1]), sys.argv[2]
cfg, _ = load_sweep(["sweep=lr"])
(barrier / str(os.getpid())).touch()
while len(list(barrier.iterdir())) < 4:  # every process creates the schema at the same moment
    time.sleep(0.001)
study = open_study(cfg, storage_for(url, ".", "x"), "lr-infonce", "infonce")
study.ask()
"""


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_workers_creating_a_fresh_database_at_once_all_start(tmp_path, database, request):
    """Four processes open one study on a fresh RDB at the same instant: each retries its collision and starts."""
    if database == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        import psycopg2

        server = request.getfixturevalue("postgres_url")
        connection = psycopg2.connect(server.replace("postgresql+psycopg2", "postgresql"))
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE fresh_schema")
        connection.close()
        url = server.rsplit("/", 1)[0] + "/fresh_schema"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CREATE, str(barrier), url], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)[-4000:]
    study = optuna.load_study(study_name="lr-infonce", storage=url)
    assert len(study.trials) == 4
    print(f"{database}: collisions retried: {sum(o.count('collided') for o in outputs)}")


def test_default_workers_follow_the_usable_cores_and_the_work():
    from probloss.studies.workers import choose_workers, usable_cores, worker_argv

    cores = usable_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert choose_workers(None, 84, 1, "cpu")[0] == min(cores, 84)
    assert choose_workers(None, 84, 2, "cpu")[0] == max(1, cores // 2)  # trainer.num_threads=2: half as many
    assert choose_workers(None, 1, 1, "cpu")[0] == 1  # never more workers than units of work
    assert choose_workers(None, 84, 1, "cuda")[0] == 1  # a run on an accelerator uses Fabric's launcher
    assert choose_workers(3, 84, 1, "cpu") == (3, "as asked")
    with pytest.raises(ConfigError, match="at least 1"):
        choose_workers(0, 84, 1, "cpu")
    assert worker_argv(["recipe=x", "recipe.workers=4", "recipe.launcher=submitit", "seed=1"], "recipe") == [
        "recipe=x", "seed=1", "recipe.workers=1", "recipe.launcher=local"]
