"""Worker processes of a study: N local processes, or a Slurm job array through submitit.

    probloss recipe recipe=proposal recipe.workers=2                  # two local workers
    probloss sweep sweep=lr sweep.workers=4 sweep.storage=postgresql://...
    probloss recipe recipe=proposal recipe.launcher=submitit recipe.workers=16 recipe.slurm.partition=gpu

Every worker runs the same command with ``<section>.workers=1`` and finds its work in the study's Optuna storage
(probloss/studies/sweep.py for sweeps, probloss/studies/recipe.py for recipes): the storage is the only thing workers share, so
workers started here, on another machine or by hand join the same study. A spawned worker knows its index from
the environment variable ``PROBLOSS_WORKER`` (0..N-1; sweeps seed their samplers with it).

Local workers run one process each with ``OMP_NUM_THREADS`` = ``trainer.num_threads`` (1 by default: two
single-threaded runs side by side on 2 cores keep most of one run's speed: docs/performance.md) and die with the
command that started them (Linux parent-death signal), so killing the command kills its workers. SIGTERM or Ctrl-C to
the command is passed on: each worker checkpoints its run at the next step boundary and exits, then the command
exits 143 / 130 with one line, and running it again resumes those runs. ``workers: null`` picks
one worker per usable core (``os.sched_getaffinity``) divided by the threads per run, at most one per unit of
work, and one worker on an accelerator (a cell there uses Fabric's own launcher across ``fabric.devices``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from probloss.errors import ConfigError, Preempted
from probloss.studies.settings import SlurmSettings
from probloss.training.config import override_key

WORKER_ENV = "PROBLOSS_WORKER"
COMMAND_LINE = "from probloss.cli import main; main()"  # a worker runs the command in a process of its own


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a Slurm or container limit counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_index() -> int | None:
    """This process's index among the workers its launcher started; None for a command started by hand."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value not in (None, "") else None


def choose_workers(requested: int | None, units: int, threads: int | None, accelerator: str) -> tuple[int, str]:
    """(number of workers, why): ``requested`` if given; else one per usable core / threads per run, at most
    ``units`` (units of work: cells, trials), and one on an accelerator."""
    if requested is not None:
        if int(requested) < 1:
            raise ConfigError(f"workers must be at least 1, got {requested}")
        return int(requested), "as asked"
    if accelerator not in ("cpu", "auto") or (accelerator == "auto" and _has_accelerator()):
        return 1, f"one worker: runs use the {accelerator} accelerator through Fabric"
    cores, per_run = usable_cores(), max(1, int(threads or 1))
    n = max(1, min(cores // per_run, units))
    return n, f"{cores} usable cores / {per_run} thread(s) per run, at most {units} units of work"


def _has_accelerator() -> bool:
    return torch.cuda.is_available()


def worker_argv(argv: Sequence[str], section: str) -> list[str]:
    """``argv`` of one worker: the launcher keys replaced by ``<section>.workers=1 <section>.launcher=local``."""
    own = (f"{section}.workers", f"{section}.launcher")
    kept = [a for a in argv if override_key(a) not in own]
    return [*kept, f"{section}.workers=1", f"{section}.launcher=local"]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_local(command: str, argv: Sequence[str], section: str, n: int, threads: int | None) -> None:
    """Run ``probloss <command> argv`` as ``n`` local worker processes and wait for all of them.

    Raises:
        RuntimeError: naming the workers that exited with an error (the others still finish their work).
    """
    threads = str(max(1, int(threads or 1)))
    procs = []
    for index in range(n):
        env = {**os.environ, WORKER_ENV: str(index), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "PYTHONUNBUFFERED": "1"}
        args = [sys.executable, "-c", COMMAND_LINE, command, *worker_argv(argv, section)]
        procs.append(subprocess.Popen(args, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None))
    stopped: list[int] = []

    def forward(signum, frame) -> None:
        # SIGTERM (a cluster's preemption) or Ctrl-C: each worker checkpoints its run at the next step boundary
        # and exits 143 / 130; waiting for them keeps that checkpoint (the parent's death would SIGKILL them).
        # A worker that got the same signal from the terminal ignores the second one.
        stopped.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        codes = [p.wait() for p in procs]
    except BaseException:  # anything else: the workers stop too (their units go back to the queue)
        for p in procs:
            p.terminate()
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopped:
        resumable = sum(c in (128 + signal.SIGTERM, 128 + signal.SIGINT) for c in codes)
        raise Preempted(stopped[0], None, None, None,
                        where=f"({len(procs)} workers; {resumable} stopped at a step boundary with a checkpoint, "
                              f"the others had no run in progress or had ended)")
    failed = [f"worker {i} (exit {c})" for i, c in enumerate(codes) if c != 0]
    if failed:
        raise RuntimeError(f"probloss {command}: {', '.join(failed)} failed; see its output above")


def _submitit_worker(command: str, argv: list[str], index: int, threads: int) -> None:
    """One array job: ``probloss <command>`` as worker ``index``, in its own process as a local worker is
    (module level, so submitit can pickle it by name)."""
    env = {**os.environ, WORKER_ENV: str(index), "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(threads))
    code = subprocess.call([sys.executable, "-c", COMMAND_LINE, command, *argv], env=env)
    if code != 0:  # the command's exit status becomes the job's outcome
        raise RuntimeError(f"probloss {command} exited with {code}")


def run_submitit(command: str, argv: Sequence[str], section: str, n: int, slurm: SlurmSettings,
                 default_folder: str | Path, threads: int | None, log=print) -> list:
    """Submit ``n`` workers of ``probloss <command> argv`` as one job array (Slurm, or submitit's ``local`` /
    ``debug`` executors with ``slurm.cluster``) and, with ``slurm.wait``, wait for them.

    Returns the submitit jobs.
    """
    try:
        import submitit
    except ImportError as err:
        raise ConfigError(f"{section}.launcher=submitit needs submitit: pip install 'probloss[cluster]'") from err
    folder = Path(os.path.expanduser(str(slurm.folder or default_folder)))
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=slurm.cluster)
    params: dict[str, Any] = {"timeout_min": int(slurm.time_min or 60), "name": f"probloss-{command}",
                              "cpus_per_task": int(slurm.cpus_per_task or max(1, int(threads or 1))),
                              "slurm_array_parallelism": int(slurm.array_parallelism or n)}
    if slurm.gpus_per_node:
        params["gpus_per_node"] = int(slurm.gpus_per_node)
    if slurm.mem_gb:
        params["mem_gb"] = float(slurm.mem_gb)
    if slurm.partition:
        params["slurm_partition"] = str(slurm.partition)
    executor.update_parameters(**params)
    args = worker_argv(argv, section)
    jobs = executor.map_array(_submitit_worker, [command] * n, [args] * n, list(range(n)),
                              [max(1, int(threads or 1))] * n)
    log(f"submitted {n} workers as job array {jobs[0].job_id.split('_')[0]} ({executor.cluster}); logs in {folder}",
        flush=True)
    if slurm.wait:
        errors = []
        for job in jobs:
            try:
                job.result()
            except Exception as err:  # every job is waited for; the failures are named together
                errors.append(f"job {job.job_id}: {err}")
        if errors:
            raise RuntimeError(f"probloss {command}: {len(errors)} worker job(s) failed: " + "; ".join(errors))
    return jobs
