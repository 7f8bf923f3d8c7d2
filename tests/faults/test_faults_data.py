"""Fault injection for issue 29, parts 1, 2, 5, 6 and 7 (docs/faults.md): each test injects one fault with
real files and, where the fault is about a process, a real ``scripts/*.py`` subprocess, and checks the exit
status, the one-line message and what is (and is not) left on disk.

- 1: a checkpoint whose saved config runs a shell command (``pipe:``) is refused unless the command line gives it;
- 2: make_data never deletes files it did not write; its lock lives inside its folder;
- 5: run_name/experiment stay inside out_dir; one process per run folder; a bad command leaves nothing behind;
- 6: bad numbers, bad choices and malformed YAML are one-line config errors (exit 2) before any work;
- 7: bad labels, empty shard sets, bad brace patterns and mass skipping are data errors (exit 2) before training.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from probloss.errors import DataError
from probloss.training.config import compose_config
from probloss.errors import ConfigError
from faultkit import one_line_error, small_shards
from probloss.data import write_shapes_shards
from probloss.data.trust import ENV, check_shard_urls
from probloss.training.run_folder import run_folder_lock
from probloss.training.settings import RunSettings

REPO = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("LT_CLI_USED", None)
    env.pop(ENV, None)  # nothing trusted from the test process
    return env


def script(name: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=300, env=env or _env())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small shapes dataset written as real shards (train 200, val 60, test 60)."""
    return small_shards(tmp_path_factory.mktemp("fault_shards"))


def train_args(data: Path, out_dir: Path, *extra: str) -> list[str]:
    """A seconds-long run on the given shards (data=shapes: classes.json beside them gives zero-shot labels)."""
    return ["data=shapes", f"data.train_shards={data}/train/00000.tar", f"data.val_shards={data}/val/00000.tar",
            "trainer.max_steps=3", "trainer.batch_size=16", "trainer.eval_every=0", "eval.projector_samples=0",
            "data.batches_per_epoch=5", f"out_dir={out_dir}", "trainer.progress=false", "fabric.accelerator=cpu",
            "fabric.devices=1", *extra]


def rewrite_shard(src: Path, dst: Path, change) -> Path:
    """Copy a tar shard, passing each member's (name, bytes) through ``change`` (returns the new bytes)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin:
            data = change(info.name, tin.extractfile(info).read())
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


def with_label(data: Path, dst: Path, label) -> Path:
    """A copy of the dataset's val split (and classes.json) whose third sample has json ``label``."""
    seen = []

    def change(name, raw):
        if name.endswith(".json"):
            seen.append(name)
            if len(seen) == 3:
                meta = json.loads(raw)
                meta["label"] = label
                return json.dumps(meta).encode()
        return raw

    rewrite_shard(data / "val" / "00000.tar", dst / "val" / "00000.tar", change)
    shutil.copy(data / "classes.json", dst / "classes.json")
    return dst


# --- 1. a checkpoint is data ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_checkpoint_whose_config_pipes_a_shell_command_is_refused(shards, tmp_path, monkeypatch):
    from probloss.training.loop import main

    monkeypatch.delenv(ENV, raising=False)
    main(train_args(shards, tmp_path / "runs", "run_name=r"))
    (path,) = (tmp_path / "runs" / "default" / "infonce" / "r" / "checkpoints").glob("*.ckpt")
    marker = tmp_path / "PWNED"
    state = torch.load(path, weights_only=False)
    state["config"]["data"]["val_shards"] = f"pipe:touch {marker}; cat {shards}/val/00000.tar"
    evil = tmp_path / "evil" / "checkpoints" / path.name
    evil.parent.mkdir(parents=True)
    torch.save(state, evil)

    out = script("evaluate", f"checkpoint={evil}")
    assert out.returncode == 2 and not marker.exists()
    line = one_line_error(out, "config error: data.val_shards=")
    assert "would run a command" in line and "give it on the command line" in line

    # The recipes' cached evaluations call evaluate_checkpoint in-process: the same refusal.
    from probloss.training.evaluation import evaluate_checkpoint

    with pytest.raises(ConfigError, match="would run a command"):
        evaluate_checkpoint(evil)
    assert not marker.exists()

    # Given on this command line, the same kind of URL is the user's choice and runs.
    out = script("evaluate", f"checkpoint={evil}", f"data.val_shards='pipe:cat {shards}/val/00000.tar'")
    assert out.returncode == 0, out.stderr[-3000:]
    assert not marker.exists()


def test_every_command_running_url_needs_the_command_line(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    for url in ("pipe:cat x.tar", "https://host/{0..3}.tar", "s3://b/x.tar", "/d/a.tar::scp://h/x.tar",
                "{/d/a.tar,pipe:rm -rf x}"):
        with pytest.raises(ConfigError, match="would run a command"):
            check_shard_urls({"data.train_shards": url})
    check_shard_urls({"data.train_shards": "/d/{00000..00003}.tar", "data.val_shards": "file:/d/v.tar",
                      "data.test_shards": None})
    from probloss.data.trust import trust_command_line

    trust_command_line(["data.train_shards='pipe:cat x.tar'", "trainer.lr=1e-3"])
    check_shard_urls({"data.train_shards": "pipe:cat x.tar"})  # given on the command line: accepted
    with pytest.raises(ConfigError):
        check_shard_urls({"data.val_shards": "pipe:cat y.tar"})  # another one still is not


# --- 2. make_data never deletes what it did not write --------------------------------------------------------


@pytest.mark.slow
def test_make_data_refuses_a_folder_with_files_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "val").mkdir()
    (out / "train" / "00042.tar").write_bytes(b"my own shard")
    (out / "val" / "00007.tar").write_bytes(b"my own val shard")

    done = script("make_data", f"out={out}", "train_size=20", "val_size=10", "test_size=0", "num_workers=1")
    assert done.returncode == 2
    line = one_line_error(done, "config error:")
    assert "train/00042.tar" in line and "val/00007.tar" in line and "choose another out=" in line
    assert (out / "train" / "00042.tar").read_bytes() == b"my own shard"
    assert (out / "val" / "00007.tar").read_bytes() == b"my own val shard"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "train", "train/00042.tar", "val", "val/00007.tar"]  # nothing added, not even a lock
    assert not Path(f"{out}.lock").exists()


def test_make_data_replaces_only_its_own_files_and_keeps_its_lock_inside(tmp_path):
    from probloss.data.shards import LOCK, MANIFEST, recorded_files

    out = tmp_path / "data"
    write_shapes_shards(out, 40, 10, test_size=10, shard_size=20, num_workers=1, progress=False)
    assert (out / "train" / "00001.tar").is_file() and (out / LOCK).exists() and not Path(f"{out}.lock").exists()
    assert "train/00001.tar" in recorded_files(out) and "meta.json" in recorded_files(out)
    # Other parameters: the writer's own earlier files are replaced (two train shards become one) ...
    write_shapes_shards(out, 20, 10, test_size=0, shard_size=20, num_workers=1, progress=False)
    assert not (out / "train" / "00001.tar").exists()
    assert not list((out / "test").glob("*.tar"))
    assert json.loads((out / MANIFEST).read_text())["files"] == sorted(recorded_files(out))
    # ... but one file of someone else's in the folder stops the next rewrite, naming it.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        write_shapes_shards(out, 30, 10, test_size=0, shard_size=20, num_workers=1, progress=False)
    assert (out / "notes.txt").read_text() == "mine" and (out / "train" / "00000.tar").is_file()


# --- 5. the run folder is a sandbox -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_name_that_escapes_out_dir_is_refused_and_leaves_nothing(shards, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = script("train", *train_args(shards, work / "runs", "run_name=../../../escaped"))
    assert out.returncode == 2
    line = one_line_error(out, "config error: run_name='../../../escaped' must be one folder name")
    assert "e.g. run_name=" in line
    assert not any(tmp_path.rglob("escaped")) and not (work / "runs").exists()


@pytest.mark.parametrize("override", ["run_name=/tmp/abs", "run_name=", "run_name=..", "experiment=a/b",
                                      "experiment=/abs", "experiment=''"])
def test_run_name_and_experiment_are_single_folder_names(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.* must be one folder name"):
        RunSettings.from_config(compose_config([override]))


@pytest.mark.slow
def test_a_second_process_in_a_busy_run_folder_stops_and_harms_nothing(shards, tmp_path):
    run_dir = tmp_path / "runs" / "default" / "infonce" / "same"
    with run_folder_lock(run_dir):  # this process runs there (the lock is an OS file lock)
        (run_dir / "out.log").write_text("the first run's log\n")
        before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
        out = script("train", *train_args(shards, tmp_path / "runs", "run_name=same"))
        assert out.returncode == 2
        line = one_line_error(out, "config error: run folder")
        assert f"{run_dir} is in use by process {os.getpid()}" in line
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_a_bad_command_removes_the_run_folder_it_made(tmp_path):
    run_dir = tmp_path / "runs" / "default" / "infonce" / "20260101-000000"
    with pytest.raises(ConfigError):
        with run_folder_lock(run_dir):
            (run_dir / "out.log").write_text("stopped: ...")
            raise ConfigError("bad")
    assert not (tmp_path / "runs" / "default").exists()
    # once the run wrote its config (training began), the folder stays with its log
    with pytest.raises(DataError):
        with run_folder_lock(run_dir):
            (run_dir / "config.yaml").write_text("{}")
            raise DataError("mass skipping")
    assert (run_dir / "config.yaml").is_file()


# --- 6. one validation for every setting ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("trainer.batch_size=0", "trainer.batch_size must be a positive integer"),
    ("trainer.lr=inf", "trainer.lr must be a finite number > 0"),
])
def test_bad_numbers_are_one_line_errors_before_any_work(override, message, tmp_path):
    out = script("train", f"out_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}", override)
    assert out.returncode == 2
    assert message in one_line_error(out, "config error:")
    assert not any(tmp_path.iterdir())  # no run folder, no data generated


@pytest.mark.parametrize("override, message", [
    ("trainer.batch_size=-4", "trainer.batch_size must be a positive integer"),
    ("trainer.lr=-1", "trainer.lr must be a finite number > 0"),
    ("trainer.lr=nan", "trainer.lr must be a finite number > 0"),
    ("data.image_size=0", "data.image_size must be a positive integer"),
    ("trainer.max_steps=0", "trainer.max_steps must be a positive integer"),
    ("trainer.warmup_steps=-1", "trainer.warmup_steps must be a non-negative integer"),
    ("trainer.eval_every=-5", "trainer.eval_every must be a non-negative integer"),
    ("trainer.keep_last=0", "trainer.keep_last must be a positive integer"),
    ("trainer.min_lr_ratio=2", "trainer.min_lr_ratio must be a finite number in [0, 1]"),
    ("trainer.betas=[0.9,1.5]", "trainer.betas must be two numbers in [0, 1)"),
    ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite='ignore' is not one of skip|stop"),
    ("data.train_size=0", "data.train_size must be a positive integer"),
    ("data.max_skipped_fraction=1.5", "data.max_skipped_fraction must be a finite number in [0, 1]"),
    ("eval.noise_std=-0.1", "eval.noise_std must be a finite number >= 0"),
    ("loss.impl=fused", "loss 'infonce': impl='fused' is not one of"),
    ("loss.false_negatives=drop", "loss 'infonce': false_negatives='drop' is not one of"),
])
def test_every_setting_is_range_checked_in_one_place(override, message):
    with pytest.raises(ConfigError) as err:
        RunSettings.from_config(compose_config([override]))
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_malformed_yaml_names_its_file_and_line(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    (configs / "loss" / "sigmoid.yaml").write_text("name: sigmoid\ninit_logit_scale: [1, 2\nfoo: 1\n")
    out = script("train", "loss=sigmoid", f"out_dir={tmp_path / 'runs'}", env=_env(PROBLOSS_CONFIG_DIR=str(configs)))
    assert out.returncode == 2
    line = one_line_error(out, "config error: malformed YAML in ")
    assert f"{configs / 'loss' / 'sigmoid.yaml'}, line 3" in line
    (configs / "train.yaml").write_text((configs / "train.yaml").read_text() + "seed: [0\n")  # an unclosed list
    with pytest.raises(ConfigError, match=r"malformed YAML in .*train\.yaml, line \d+"):
        compose_config([], directory=configs)


def test_make_data_settings_are_checked(tmp_path):
    from probloss.cli import make_data_command as main

    with pytest.raises(ConfigError, match="shard_size must be a positive integer"):
        main([f"out={tmp_path / 'd'}", "train_size=10", "val_size=10", "shard_size=0"])
    assert not (tmp_path / "d").exists()


# --- 7. bad data early and bounded ------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_out_of_range_label_stops_the_run_before_training(shards, tmp_path):
    bad = with_label(shards, tmp_path / "bad", 99)
    out = script("train", *train_args(shards, tmp_path / "runs", f"data.val_shards={bad}/val/00000.tar"))
    assert out.returncode == 2
    line = one_line_error(out, "data error: data.val_shards: sample ")
    assert "has label 99, not a class index in [0, 40)" in line and f"{bad}/val/00000.tar" in line
    assert not (tmp_path / "runs").exists()  # before the run folder: no training happened


@pytest.mark.parametrize("label", [-1, 2.5, 40, True, "3"])
def test_negative_float_and_other_labels_name_the_sample(shards, tmp_path, label):
    from probloss.data.prepare import prepare_data

    bad = with_label(shards, tmp_path / "bad", label)
    run = RunSettings.from_config(compose_config([
        f"data.train_shards={shards}/train/00000.tar", f"data.val_shards={bad}/val/00000.tar"]))
    with pytest.raises(DataError, match=rf"sample '\d+' in {bad}/val/00000.tar has label {label!r}, not a class"):
        prepare_data(run.data, 16)


def test_empty_shard_sets_and_bad_brace_patterns_are_data_errors(shards, tmp_path):
    from probloss.data.loader import expand_shards
    from probloss.data.prepare import prepare_data

    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w"):
        pass
    run = RunSettings.from_config(compose_config([f"data.train_shards={empty}",
                                                  f"data.val_shards={shards}/val/00000.tar"]))
    with pytest.raises(DataError, match="data.train_shards=.* hold no sample"):
        prepare_data(run.data, 16)
    with pytest.raises(DataError, match="unbalanced braces"):
        expand_shards(f"{shards}/train/{{00000..00001.tar")


def _undecodable_captions(shards: Path, dst: Path, split: str) -> Path:
    """A copy of a split's shard in which every other caption is not UTF-8."""
    count = []

    def change(name, raw):
        if name.endswith(".txt"):
            count.append(name)
            return b"\xff\xfe\xfa" if len(count) % 2 == 0 else raw
        return raw

    return rewrite_shard(shards / split / "00000.tar", dst / split / "00000.tar", change)


@pytest.mark.slow
def test_mass_skipping_in_training_is_a_data_error_naming_the_shard(shards, tmp_path):
    bad = _undecodable_captions(shards, tmp_path / "bad", "train")
    out = script("train", *train_args(shards, tmp_path / "runs", f"data.train_shards={bad}",
                                      "trainer.max_steps=30"))
    assert out.returncode == 2
    line = one_line_error(out, "data error: training data (rank 0): ")
    assert "> data.max_skipped_fraction=0.01" in line and f"worst shards: {bad} (100)" in line
    assert f"sample '0000000001' of {bad}: UnicodeDecodeError" in out.stderr  # the skip warning names the key


def test_mass_skipping_in_the_val_split_is_a_data_error(shards, tmp_path):
    from probloss.training.builders import make_tokenizer
    from probloss.data.prepare import load_eval, prepare_data

    bad = _undecodable_captions(shards, tmp_path / "bad", "val")
    overrides = [f"data.train_shards={shards}/train/00000.tar", f"data.val_shards={bad}"]
    run = RunSettings.from_config(compose_config(overrides))
    spec = prepare_data(run.data, 16)
    with pytest.raises(DataError, match=rf"30 of 60 samples were skipped .* worst shards: {bad} \(30\)"):
        load_eval(spec, run.data, make_tokenizer(run), seed=0)
    run = RunSettings.from_config(compose_config([*overrides, "data.max_skipped_fraction=0.6"]))
    assert len(load_eval(spec, run.data, make_tokenizer(run), seed=0)) == 30  # within the bound: read
