"""Faults injected into real runs (issue 29, r2's part): resume by name, preemption, blown-up weights, a full
disk, corrupt checkpoints, and the console a person reads. docs/faults.md is the table these tests check.

Every fault is real where it is about processes and files: training runs as a subprocess of
``scripts/train.py`` (through ``probloss.cli``, so exit codes and the one-line messages are the user's), signals
are sent with ``os.kill``, the disk fills through ``RLIMIT_FSIZE`` set in the child (the kernel then fails the
write with EFBIG, the same path as ENOSPC: no monkeypatching of the write), and corrupt checkpoints are real
files cut short or emptied. One uninterrupted run (module fixture) is the reference the others are compared
with and copied from.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faultkit import SLOW  # the training command with the mid-run hook (faultkit's docstring)
from probloss.errors import ConfigError, NonFiniteLossError
from probloss.training import checkpoint as ckpt
from probloss.training.loop import main
from probloss.training.run_folder import HEADLINE_KEYS

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "scripts" / "train.py")
STEPS = 12



def tiny(out_dir, cache_dir, *extra):
    """Overrides of a seconds-long run: 12 steps of batch 32, checkpoints every 4, no intermediate evaluation."""
    return [f"out_dir={out_dir}", f"data.cache_dir={cache_dir}", "data.train_size=300", "data.val_size=64",
            "data.test_size=64", "trainer.batch_size=32", f"trainer.max_steps={STEPS}", "trainer.warmup_steps=2",
            "trainer.eval_every=0", "trainer.ckpt_every=4", "trainer.log_every=1", "trainer.progress=false",
            "fabric.accelerator=cpu", "fabric.devices=1", "eval.projector_samples=0", *extra]


def env(**extra):
    out = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    out.pop("LT_CLI_USED", None)
    return out


def train(*args, script=TRAIN, preexec_fn=None, **extra_env):
    return subprocess.run([sys.executable, script, *args], env=env(**extra_env), capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec_fn)


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def one_line(stderr: str) -> str:
    """The error line: the only non-empty line of stderr that is not a warning or a progress message."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache_dir):
    """An uninterrupted sigmoid run (sigmoid: not the default loss, so a resume that fell back to the defaults
    would show), through the command line: (its run folder, its stdout)."""
    out = tmp_path_factory.mktemp("straight")
    done = train(*tiny(out, cache_dir, "loss=sigmoid", "run_name=straight"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "default" / "sigmoid" / "straight", done.stdout


def copy_run(run_dir: Path, out_dir: Path, name: str) -> Path:
    """A copy of a run folder under another out_dir (a moved run: its config.yaml still names the old one)."""
    target = out_dir / "default" / run_dir.parent.name / name
    shutil.copytree(run_dir, target)
    return target


# --- 4. preemption ------------------------------------------------------------------------------------------------


def _interrupt(tmp_path, cache_dir, signum):
    """Start a run, signal it mid-run, wait: (completed process, run folder)."""
    script, mark = tmp_path / "slow.py", tmp_path / "mark"
    script.write_text(SLOW)
    args = tiny(tmp_path, cache_dir, "loss=sigmoid", "run_name=stopped")
    proc = subprocess.Popen([sys.executable, str(script), *args], env=env(SLOW_AFTER_STEP="3", MARK=str(mark)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not mark.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
    os.kill(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), tmp_path / "default" / "sigmoid" / "stopped"


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_the_printed_command_resumes_bit_identically(tmp_path, cache_dir,
                                                                                             straight):
    stopped, run_dir = _interrupt(tmp_path, cache_dir, signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    line = one_line(stopped.stderr)
    found = re.fullmatch(r"stopped by SIGTERM at step (\d+): saved (\S+); resume with: (.+)", line)
    assert found, line
    step, saved, command = int(found[1]), Path(found[2]), shlex.split(found[3])
    assert 3 <= step < STEPS and saved == ckpt.checkpoint_path(run_dir, step) and saved.is_file()
    assert command[-1] == f"resume={run_dir}"
    assert not list(run_dir.rglob(".tmp-*")) and not (run_dir / "summary.json").exists()
    assert f"stopped: Preempted: SIGTERM at step {step}" in (run_dir / "out.log").read_text()

    resumed = subprocess.run([sys.executable, *command[1:]], env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout
    reference, _ = straight
    assert_same_weights(ckpt.newest_checkpoint(run_dir), ckpt.newest_checkpoint(reference))
    summaries = [json.loads((d / "summary.json").read_text()) for d in (run_dir, reference)]
    for key in ("steps", "train/loss", "val/loss", "test/zeroshot_top1"):
        assert summaries[0][key] == summaries[1][key], key


@pytest.mark.slow
def test_sigint_is_one_line_and_exit_130_with_a_checkpoint(tmp_path, cache_dir):
    stopped, run_dir = _interrupt(tmp_path, cache_dir, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    found = re.fullmatch(r"stopped by SIGINT at step (\d+): saved (\S+); resume with: .+ resume=(\S+)",
                         one_line(stopped.stderr))
    assert found and Path(found[2]).is_file() and Path(found[3]) == run_dir
    assert "KeyboardInterrupt" not in stopped.stderr


# --- 3. resume by name --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_by_name_rebuilds_the_saved_run_and_refuses_changes(tmp_path, cache_dir, straight):
    run_dir = copy_run(straight[0], tmp_path, "b")
    base = [f"out_dir={tmp_path}", f"data.cache_dir={cache_dir}", "trainer.progress=false"]

    refused = train(*base, "resume=auto", "run_name=b", "trainer.lr=0.01")  # the command line, exit 2
    assert refused.returncode == 2
    assert re.fullmatch(r"config error: resuming \S+/b would change the run \(trainer\.lr: 0\.002 -> 0\.01; .*",
                        one_line(refused.stderr))
    with pytest.raises(ConfigError, match=r"no run .*/default/infonce/b .*exists for loss sigmoid"):
        main([*base, "resume=auto", "run_name=b", "loss=infonce"])  # the README's case: another loss
    with pytest.raises(ConfigError, match=r"run_name=nope: no run .*/default/\*/nope \(runs there: b\)"):
        main([*base, "resume=auto", "run_name=nope"])
    with pytest.raises(ConfigError, match=r"data.train_size: 300 -> 500"):
        main([*base, "resume=auto", "run_name=b", "data.train_size=500"])

    # resume=auto without a name picks the run (no loss=sigmoid given: it comes from config.yaml), and an
    # explicit extension is announced in one line
    extended = train(*base, "resume=auto", f"trainer.max_steps={STEPS + 2}")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert f"resume=auto picked {run_dir} " in extended.stderr
    assert f"extending b: trainer.max_steps {STEPS} -> {STEPS + 2}" in extended.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["loss"] == "sigmoid" and summary["steps"] == STEPS + 2
    saved = (run_dir / "config.yaml").read_text()
    assert "name: sigmoid" in saved and "train_size: 300" in saved and f"max_steps: {STEPS + 2}" in saved


# --- 6 (half). weights that blow up -------------------------------------------------------------------------------


# After optimizer step BLOW_UP_AT_STEP, one weight becomes inf (a global optimizer post-step hook: the fault sits
# exactly where an update that overflows would put it; lr=inf, which did it before, is now refused up front).
BLOW_UP = """
import os, sys
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
at, done = int(os.environ["BLOW_UP_AT_STEP"]), [0]
def blow_up(optimizer, args, kwargs):
    if not isinstance(optimizer, torch.optim.AdamW):  # the training optimizer (not the reference's L-BFGS)
        return
    done[0] += 1
    if done[0] == at:
        with torch.no_grad():
            optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")
register_optimizer_step_post_hook(blow_up)
from probloss.cli import main
main(["train", *sys.argv[1:]])
"""


@pytest.mark.slow
def test_weights_made_non_finite_by_an_update_stop_the_run_as_diverged(tmp_path, cache_dir):
    """Before, a run whose update made the weights non-finite trained on to the end (every later loss NaN and
    skipped) and could end with ``diverged: False`` (lr=inf did, with every tensor non-finite)."""
    script = tmp_path / "blow_up.py"
    script.write_text(BLOW_UP)
    out = train(*tiny(tmp_path, cache_dir, "trainer.ckpt_every=1", "run_name=inf"), script=str(script),
                BLOW_UP_AT_STEP="5")
    run_dir = tmp_path / "default" / "infonce" / "inf"
    assert out.returncode == 1, out.stderr[-3000:]
    assert re.fullmatch(
        r"training stopped: non-finite parameters at step 5 \(loss=[0-9.]+, grad_norm=[0-9.]+\): the update made "
        r"the parameters non-finite - the run has diverged; the last good checkpoint is " +
        re.escape(str(ckpt.checkpoint_path(run_dir, 4))) + r"\. Try a lower trainer\.lr or trainer\.grad_clip\.",
        one_line(out.stderr))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] == 5
    assert summary["stability/diverged"] is True and summary["stability/nonfinite_steps"] == 1
    assert ckpt.newest_checkpoint(run_dir).name == "step-00000004.ckpt"  # no checkpoint of the ruined weights


@pytest.mark.slow
def test_finite_but_ruined_weights_are_not_the_last_good_checkpoint(tmp_path, cache_dir):
    """lr 1e12: the first real update leaves finite weights of ~5e11 whose every later loss is NaN; the run
    stops after trainer.max_nonfinite skipped steps and names no checkpoint of those weights as good."""
    with pytest.raises(NonFiniteLossError, match="no checkpoint from before it") as stop:
        main(tiny(tmp_path, cache_dir, "trainer.lr=1e12", "trainer.ckpt_every=1", "trainer.warmup_steps=0",
                  "trainer.max_nonfinite=5", "run_name=big"))
    assert "step-0000000" not in str(stop.value)
    summary = json.loads((tmp_path / "default" / "infonce" / "big" / "summary.json").read_text())
    assert summary["stability/diverged"] is True and summary["stability/nonfinite_steps"] == 5


def test_last_good_checkpoint_is_judged_by_the_weights(tmp_path):
    folder = tmp_path / ckpt.CKPT_DIR
    folder.mkdir()
    for step, value in ((2, 1.0), (4, 1.0), (6, float("nan")), (8, 1.0)):
        torch.save({"model": {"w": torch.full((3,), value)}}, ckpt.checkpoint_path(tmp_path, step))
    ckpt.checkpoint_path(tmp_path, 8).write_bytes(b"")  # corrupt newest
    assert ckpt.last_good_checkpoint(tmp_path).name == "step-00000004.ckpt"
    assert ckpt.last_good_checkpoint(tmp_path, before_step=4).name == "step-00000002.ckpt"


# --- 8. disk full and corrupt files -------------------------------------------------------------------------------


def _file_size_limit(limit: int):
    def apply():  # in the child, before exec; Python ignores SIGXFSZ, so the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_write_that_fails_is_one_line_naming_the_path_and_leaves_no_temp_file(tmp_path, cache_dir, straight):
    """A 1 MiB file-size limit: config.yaml, out.log and events fit, the first checkpoint (2.8 MB) does not."""
    assert ckpt.newest_checkpoint(straight[0]).stat().st_size > 1 << 20
    full = train(*tiny(tmp_path, cache_dir, "run_name=full"), preexec_fn=_file_size_limit(1 << 20))
    run_dir = tmp_path / "default" / "infonce" / "full"
    assert full.returncode == 1, full.stderr[-3000:]
    line = one_line(full.stderr)
    assert line == f"write error: cannot write {ckpt.checkpoint_path(run_dir, 4)}: [Errno 27] File too large"
    assert not list(run_dir.rglob(".tmp-*")) and not ckpt.list_checkpoints(run_dir)
    assert (run_dir / "out.log").read_text().rstrip().endswith(f"stopped: WriteError: {line[len('write error: '):]}")


@pytest.mark.slow
def test_an_out_log_that_cannot_be_written_ends_the_run_with_one_line(tmp_path, cache_dir):
    """out.log is /dev/full (every write fails with ENOSPC, a real device): the first line the run logs (the
    evaluation of step 2) fails; the run ends at the next step boundary, one line naming out.log and the error."""
    run_dir = tmp_path / "default" / "infonce" / "full"
    run_dir.mkdir(parents=True)
    (run_dir / "out.log").symlink_to("/dev/full")
    full = train(*tiny(tmp_path, cache_dir, "run_name=full", "trainer.eval_every=2"))
    assert full.returncode == 1, full.stderr[-3000:]
    assert one_line(full.stderr) == f"write error: cannot write {run_dir / 'out.log'}: [Errno 28] No space left on device"
    assert "[eval step 2]" in full.stdout  # the console kept the line the log lost
    assert "[eval step 4]" not in full.stdout and not ckpt.list_checkpoints(run_dir)  # stopped after step 2
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, cache_dir, straight, capsys):
    run_dir = copy_run(straight[0], tmp_path, "c")
    older, newest = ckpt.list_checkpoints(run_dir)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    summary = main([f"out_dir={tmp_path}", f"data.cache_dir={cache_dir}", "resume=auto", "run_name=c",
                    "trainer.progress=false"], table=False)
    printed = capsys.readouterr()
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipping corrupt checkpoint {newest} (")
    assert summary["steps"] == STEPS
    # table=False (recipes and sweeps): no end-of-run table, and the run's progress lines in its out.log only
    assert "| train/loss" not in printed.out and "resumed from" not in printed.out
    assert f"resumed from {older} at step 8" in (run_dir / "out.log").read_text()
    assert_same_weights(newest, ckpt.newest_checkpoint(straight[0]))  # retrained: the same step 12
    assert summary["val/loss"] == json.loads((straight[0] / "summary.json").read_text())["val/loss"]


@pytest.mark.slow
def test_evaluate_skips_an_empty_newest_checkpoint(tmp_path, straight, capsys):
    from probloss.training.evaluation import evaluate_checkpoint

    run_dir = copy_run(straight[0], tmp_path, "e")
    older, newest = ckpt.list_checkpoints(run_dir)
    newest.write_bytes(b"")
    metrics = evaluate_checkpoint(newest)
    err = capsys.readouterr().err
    assert f"warning: skipping corrupt checkpoint {newest} (zero length); using the previous one" in err
    assert metrics["steps"] == 8 and (run_dir / "eval-step-00000008.json").is_file()


# --- 9. the console -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_end_of_run_table_is_the_headline_and_names_summary_json(straight):
    run_dir, stdout = straight
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert 5 <= len(rows) <= len(HEADLINE_KEYS) < 20
    assert {row.split("|")[1].strip() for row in rows} <= set(HEADLINE_KEYS)
    n = len(json.loads((run_dir / "summary.json").read_text()))
    assert f"all {n} values: {run_dir / 'summary.json'}" in stdout and n > 100
    assert f"[eval step {STEPS}] val/loss" in stdout  # a plain run prints its eval lines (a study's runs do not)


def test_a_process_forked_during_a_run_keeps_default_signal_handling():
    """A child forked inside a run (the shapes generator's pool, data-loader workers) must die of SIGTERM as
    before: with the run's Python handler inherited, a pool worker blocked on a lock ignored Pool.terminate."""
    from probloss.training.loop import StopSignals

    with StopSignals():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # held until the child is inside its try
        pid = os.fork()
        if pid == 0:  # the child: take the signal; any Python-level handling ends in a clean exit 0
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
                signal.pause()
            finally:
                os._exit(0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
