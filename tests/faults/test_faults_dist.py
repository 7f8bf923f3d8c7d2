"""Faults of one rank in a two-rank run (issue 29, deliverables 5, 7 and 8 under DDP): an error raised on one rank
only, or a checkpoint write that fails on rank 0 (the only rank that writes), ends every rank with the one line
of a one-process run and its exit status, instead of leaving the other rank waiting at its next collective.

Real processes: ``scripts/train.py fabric.devices=2`` on CPU, Fabric's own launcher (rank 0 is the command, rank
1 its child; gloo). Every run is bounded by ``subprocess`` timeouts: a rank left waiting fails the test (the
gloo timeout would be 30 minutes). The mechanism (probloss/dist.py raise_together) costs no collective on a
step without a fault: the error flag rides in the all-reduce of the stop flag every step already makes.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from probloss.training import checkpoint as ckpt
from faultkit import one_line_error, small_shards
from probloss.training.run_folder import run_folder_lock

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def env():
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("LT_CLI_USED", "MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        out.pop(key, None)
    return out


def two_ranks(*args, preexec_fn=None, timeout: float = 90) -> subprocess.CompletedProcess:
    """``scripts/train.py`` on two CPU ranks, in a session of its own; if it has not ended after ``timeout``
    seconds (a rank waiting at a collective), both ranks are killed and the test fails."""
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), "fabric.accelerator=cpu",
                             "fabric.devices=2", "fabric.strategy=ddp", "trainer.progress=false", "trainer.eval_every=0",
                             "eval.projector_samples=0", "trainer.batch_size=16", *args], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=preexec_fn)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and its child rank 1: the session this test started
        stdout, stderr = proc.communicate()
        pytest.fail(f"a rank hung: no exit after {timeout} s; stderr: {stderr[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return small_shards(tmp_path_factory.mktemp("dist_shards"))


def data_args(shards: Path, out_dir: Path, train: str | None = None) -> list[str]:
    return ["data=shapes", f"data.train_shards={train or shards / 'train' / '00000.tar'}",
            f"data.val_shards={shards}/val/00000.tar", f"data.test_shards={shards}/test/00000.tar",
            "data.batches_per_epoch=3", f"out_dir={out_dir}"]


def test_a_lock_error_on_rank_0_ends_both_ranks_with_exit_2(shards, tmp_path):
    run_dir = tmp_path / "runs" / "default" / "infonce" / "busy"
    with run_folder_lock(run_dir):  # this process holds the run folder: rank 0 of the run cannot take it
        out = two_ranks(*data_args(shards, tmp_path / "runs"), "run_name=busy", "trainer.max_steps=3")
    assert out.returncode == 2, out.stderr[-3000:]
    line = one_line_error(out, "config error: run folder", once=True)
    assert f"{run_dir} is in use by process {os.getpid()}" in line


def test_a_data_error_on_rank_1_only_ends_both_ranks_with_its_line_and_exit_2(shards, tmp_path):
    """Two train shards, one per rank; rank 1's has every other caption undecodable: at the end of its first
    epoch data.max_skipped_fraction stops rank 1, and rank 0 (whose data is fine) stops with it."""
    folder = tmp_path / "train"
    folder.mkdir()
    good = shards / "train" / "00000.tar"
    count = []
    for name in ("00000.tar", "00001.tar"):
        with tarfile.open(good) as tin, tarfile.open(folder / name, "w") as tout:
            for info in tin:
                raw = tin.extractfile(info).read()
                if name == "00000.tar" and info.name.endswith(".txt"):  # the shard rank 1 reads in epoch 0
                    count.append(info.name)
                    raw = b"\xff\xfe\xfa" if len(count) % 2 == 0 else raw
                info.size = len(raw)
                tout.addfile(info, io.BytesIO(raw))
    out = two_ranks(*data_args(shards, tmp_path / "runs", f"'{folder}/{{00000..00001}}.tar'"), "trainer.max_steps=6")
    assert out.returncode == 2, out.stderr[-3000:]
    line = one_line_error(out, "data error: training data (rank 1): ", once=True)
    assert f"worst shards: {folder / '00000.tar'}" in line and "data.max_skipped_fraction" in line


def test_a_failed_checkpoint_write_on_rank_0_ends_both_ranks(shards, tmp_path, cache_dir):
    """A 1 MiB file-size limit (inherited by both ranks; only rank 0 writes): the first checkpoint cannot be
    written; rank 0 names it and the OS error, rank 1 does not wait for it at a barrier."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = two_ranks(*data_args(shards, tmp_path / "runs"), "run_name=full", "trainer.max_steps=4",
                    "trainer.ckpt_every=2", preexec_fn=limit)
    run_dir = tmp_path / "runs" / "default" / "infonce" / "full"
    assert out.returncode == 1, out.stderr[-3000:]
    assert one_line_error(out, "write error: ", once=True) == \
        f"write error: cannot write {ckpt.checkpoint_path(run_dir, 2)}: [Errno 27] File too large"
    assert not list(run_dir.rglob(".tmp-*")) and not ckpt.list_checkpoints(run_dir)
