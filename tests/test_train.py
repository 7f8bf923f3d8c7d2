"""The training loop end to end on tiny CPU runs: outputs, resume after SIGKILL, 2 ranks, NaN handling, GradCache.

Every run here is a few steps of the tiny model on a few hundred generated shapes samples (cached once per
session), so the whole file takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import copy
import json
import inspect
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import probloss
from probloss.errors import ConfigError, NonFiniteLossError
from probloss.training import checkpoint as ckpt
from probloss.training.builders import Trainee, check_batch_sizes, make_tokenizer, make_trainee
from probloss.training.config import compose_config
from probloss.training.loop import main, run_training, train_step
from probloss.training.settings import RunSettings

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {  # summary keys that apply to every loss (docs/design.md)
    "train/loss", "val/loss", "val/i2t_r@1", "val/t2i_r@1", "embed/effective_rank", "embed/uniformity",
    "embed/alignment", "embed/modality_gap", "stability/loss_spikes", "stability/grad_norm_ratio",
    "stability/nonfinite_steps", "stability/diverged", "stability/collapsed", "stability/collapsed_step",
    "stability/max_loss_jump", "stability/reference_loss", "stability/grad_norm_init", "stability/grad_norm_median",
    "steps", "samples_per_s", "data/skipped",
    "test/i2t_r@1", "test/t2i_r@1", "test/i2t_r@1_strict", "test/zeroshot_top1", "test/zeroshot_seen_top1",
    "test/zeroshot_unseen_top1", "test/control_probe_acc", "test/embed/effective_rank", "eval_test_s",
    "test/i2t_r@1_plausible", "test/t2i_r@1_plausible", "test/i2t_map@r", "test/t2i_rprecision",
    "test/unc/free/top1/t2i_aurc", "test/embed/scored/effective_rank",
}
TB_TAGS = {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/logit_pos_mean", "val/loss",
           "val/i2t_r@1"}


def small(out_dir, cache_dir, *extra):
    """Overrides for a seconds-long run: 6 steps of batch 32, eval and checkpoints every 3 steps."""
    return [
        f"out_dir={out_dir}", f"data.cache_dir={cache_dir}", "data.train_size=512", "data.val_size=64",
        "data.test_size=64", "trainer.batch_size=32", "trainer.max_steps=6", "trainer.warmup_steps=2", "trainer.eval_every=3",
        "trainer.ckpt_every=3", "trainer.log_every=1", "trainer.progress=false", "fabric.accelerator=cpu",
        "fabric.devices=1", "eval.projector_samples=16", *extra,
    ]


def read_scalars(run_dir, tag="train/loss") -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def only_run(out_dir, loss) -> Path:
    runs = list((Path(out_dir) / "default" / loss).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


# --- a few steps of every registered loss -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("loss", probloss.list_losses())
def test_run_writes_tensorboard_summary_checkpoints(loss, tmp_path, cache_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = main(small(tmp_path, cache_dir, f"loss={loss}"))
    run_dir = only_run(tmp_path, loss)
    assert Path(summary["run_dir"]) == run_dir

    saved = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(saved), SUMMARY_KEYS - set(saved)
    assert saved["steps"] == 6 and saved["stability/nonfinite_steps"] == 0 and saved["data/skipped"] == 0
    assert math.isfinite(saved["train/loss"]) and math.isfinite(saved["val/loss"])
    if probloss.build_loss(loss).needs_log_std:
        assert "unc/specificity_spearman" in saved

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert TB_TAGS <= tags, TB_TAGS - tags
    assert sorted(e.step for e in acc.Scalars("train/loss")) == list(range(1, 7))
    assert [e.step for e in acc.Scalars("val/loss")] == [3, 6]
    assert acc.PluginTagToContent("hparams"), "no hparams summary (HParams tab)"
    assert (run_dir / "projector_config.pbtxt").is_file()
    header = next(run_dir.glob("*/val_text/metadata.tsv")).read_text().splitlines()[0]
    assert header.split("\t") == ["caption", "level", "n_objects", "sigma"]

    assert (run_dir / "config.yaml").is_file()
    saved_ckpts = ckpt.list_checkpoints(run_dir)
    assert [p.name for p in saved_ckpts] == ["step-00000003.ckpt", "step-00000006.ckpt"]
    raw = torch.load(saved_ckpts[-1], map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scheduler", "position", "rng", "stability", "config"} <= set(raw)
    assert raw["position"]["step"] == 6 and raw["config"]["loss"]["name"] == loss
    loss_params = {f"loss.{n}" for n, _ in probloss.build_loss(loss).named_parameters()}
    assert loss_params <= set(raw["model"])  # the loss's own parameters are checkpointed with the model

    log = (run_dir / "out.log").read_text()  # the console output, with a line per evaluation
    assert "[eval step 3] val/loss " in log and "| test/i2t_r@1_plausible " in log and f"run folder: {run_dir}" in log
    assert "| train/loss " in log and f"values: {run_dir / 'summary.json'}" in log  # the end-of-run table: headline
    assert "\n| val/i2t_r@1 " not in log  # ... only (the rest is in summary.json)


@pytest.mark.slow
def test_evaluate_checkpoint(tmp_path, cache_dir):
    from probloss.training.evaluation import evaluate_checkpoint

    main(small(tmp_path, cache_dir, "loss=infonce", "trainer.max_steps=3", "trainer.eval_every=0"))
    path = ckpt.newest_checkpoint(only_run(tmp_path, "infonce"))
    metrics = evaluate_checkpoint(path)
    assert "val/i2t_r@1" in metrics and metrics["steps"] == 3
    assert (path.parent.parent / "eval-step-00000003.json").is_file()
    # and the script, as a user runs it
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), f"checkpoint={path}"],
                         capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert "val/i2t_r@1" in out.stdout
    # overrides of the saved config are checked like any command line: a typo is an error, not ignored
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), f"checkpoint={path}",
                          "data.val_shard=/nowhere"], capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 2 and "unknown config key 'data.val_shard'" in out.stderr
    assert "Did you mean 'val_shards'" in out.stderr and "Traceback" not in out.stderr


# --- resume -----------------------------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
import probloss.training.loop as T
kill_at, original, done = int(os.environ.get("KILL_AT_STEP", 0)), T.train_step, [0]
def train_step(*args, **kwargs):  # SIGKILL ourselves right after the optimizer step `kill_at`
    out = original(*args, **kwargs)
    done[0] += 1
    if done[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
T.train_step = train_step
T.main(sys.argv[1:])
"""


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("LT_CLI_USED", None)
    return env


@pytest.mark.slow
def test_two_runs_started_at_once_on_a_fresh_cache_share_its_data(tmp_path):
    """Two training processes on an empty cache at the same moment: one writes the shapes shards while the
    other waits for the lock, then both train on the same bytes (same seed: the same numbers) in run folders of
    their own."""
    args = small(tmp_path / "runs", tmp_path / "fresh_cache", "loss=infonce", "trainer.max_steps=3",
                 "trainer.eval_every=0", "trainer.ckpt_every=0", "eval.projector_samples=0")
    runs = [subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"), *args], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    folders = sorted((tmp_path / "runs" / "default" / "infonce").iterdir())
    assert len(folders) == 2
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in folders]
    for key in ("train/loss", "val/loss", "test/zeroshot_top1", "data/skipped"):
        assert summaries[0][key] == summaries[1][key], key
    (cache,) = (tmp_path / "fresh_cache").glob("shapes-*/")
    assert (cache / "meta.json").is_file() and len(list(cache.glob("*/*.tar"))) >= 3


@pytest.mark.slow
def test_a_truncated_shard_is_counted_in_the_summary_and_tensorboard(tmp_path):
    from probloss.data import write_shapes_shards

    patterns = write_shapes_shards(tmp_path / "data", 128, 32, test_size=32, seed=0, shard_size=32, progress=False)
    shard = tmp_path / "data" / "train" / "00002.tar"
    shard.write_bytes(shard.read_bytes()[:30_000])  # an interrupted download
    summary = main(small(tmp_path, tmp_path / "unused", "loss=infonce", "trainer.max_steps=3", "trainer.batch_size=16",
                         "trainer.eval_every=0", "eval.projector_samples=0", f"data.train_shards='{patterns['train']}'",
                         f"data.val_shards={patterns['val']}", f"data.test_shards={patterns['test']}"))
    assert summary["data/truncated_shards"] == 1
    assert read_scalars(summary["run_dir"], "data/truncated_shards") == {3: 1.0}


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_curve(tmp_path, cache_dir):
    """Kill -9 after step 7 (last checkpoint: step 4), resume=auto: steps 5..10 repeat the straight run exactly.

    All three runs are subprocesses with the same thread count (reduction order decides the last bits).
    """
    args = small(tmp_path, cache_dir, "loss=sigmoid", "trainer.max_steps=10", "trainer.ckpt_every=4",
                 "trainer.eval_every=0", "eval.projector_samples=0", "data.batches_per_epoch=3")  # epochs roll over
    script = tmp_path / "killer.py"
    script.write_text(KILLER)

    def run(*extra, kill_at=0):
        return subprocess.run([sys.executable, str(script), *args, *extra], env=_env(KILL_AT_STEP=str(kill_at)),
                              capture_output=True, text=True, timeout=300)

    straight = run("run_name=straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run("run_name=killed", kill_at=7)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dir = tmp_path / "default" / "sigmoid" / "killed"
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-00000004.ckpt"]
    assert not (run_dir / "summary.json").exists()
    resumed = run("run_name=killed", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    curve_straight, curve_resumed = read_scalars(tmp_path / "default" / "sigmoid" / "straight"), read_scalars(run_dir)
    assert sorted(curve_resumed) == list(range(1, 11))
    assert curve_resumed == curve_straight  # bit-identical on CPU
    summaries = [json.loads((d / "summary.json").read_text()) for d in (run_dir, run_dir.parent / "straight")]
    assert summaries[0]["val/loss"] == summaries[1]["val/loss"] and summaries[0]["steps"] == 10


@pytest.mark.slow
def test_resume_refuses_a_different_model_shape(tmp_path, cache_dir):
    args = small(tmp_path, cache_dir, "trainer.max_steps=3", "trainer.eval_every=0", "run_name=r")
    main(args)
    with pytest.raises(ConfigError, match="model.embed_dim: 64 -> 32"):
        main([*args, "resume=auto", "model.embed_dim=32", "trainer.max_steps=4"])
    with pytest.raises(ConfigError, match="resume=auto"):  # same run_name without resume: no silent overwrite
        main(args)


@pytest.mark.slow
def test_a_run_uses_its_own_cpu_matmul_and_one_from_before_the_key_resumes_on_blas(tmp_path, cache_dir, monkeypatch):
    import probloss.training.launch as launch_module
    from probloss.models.linear import onednn_available

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    used, real = [], launch_module.cpu_matmul
    monkeypatch.setattr(launch_module, "cpu_matmul", lambda backend: used.append(backend) or real(backend))
    args = small(tmp_path, cache_dir, "trainer.max_steps=3", "trainer.eval_every=0", "eval.projector_samples=0",
                 "run_name=r")
    main([*args, "trainer.cpu_matmul=onednn"])
    main([*args, "trainer.cpu_matmul=onednn", "trainer.max_steps=4", "resume=auto"])
    assert used == ["onednn", "onednn"]
    run_dir = only_run(tmp_path, "infonce")
    newest = ckpt.list_checkpoints(run_dir)[-1]
    saved = ckpt.read_checkpoint(newest)
    del saved["config"]["trainer"]["cpu_matmul"]  # as written before the key existed
    torch.save(saved, newest)
    main([*args, "trainer.max_steps=5", "resume=auto"])  # the default (auto) asks for oneDNN; the run was on BLAS
    assert used[-1] == "blas"


# --- two ranks ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_fabric_run(tmp_path, cache_dir):
    fabric = Path(sys.executable).parent / "fabric"
    # accum_steps=2: GradCache under DDP (gradient sync only on the last micro-batch).
    args = [a for a in small(tmp_path, cache_dir, "loss=sigmoid", "trainer.accum_steps=2") if not a.startswith("fabric.")]
    out = subprocess.run(
        [str(fabric), "run", "--accelerator=cpu", "--devices=2", f"--main-port={_free_port()}",
         str(REPO / "scripts" / "train.py"), *args],
        env=_env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((only_run(tmp_path, "sigmoid") / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6 and math.isfinite(summary["val/loss"])
    assert "train/loss" in out.stdout  # the end-of-run table


@pytest.mark.slow
def test_sharding_strategies_are_a_clear_error(tmp_path):
    from probloss.training.launch import check_strategy

    for ok in ("auto", "ddp", "ddp_spawn", "single_device", "xla"):
        check_strategy(ok)
    for bad in ("fsdp", "deepspeed_stage_3", "xla_fsdp", "dp"):
        with pytest.raises(ConfigError, match="data-parallel replicas only"):
            check_strategy(bad)
    fabric = Path(sys.executable).parent / "fabric"
    out = subprocess.run([str(fabric), "run", "--accelerator=cpu", "--devices=1", "--strategy=fsdp",
                          str(REPO / "scripts" / "train.py"), f"out_dir={tmp_path}"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    # (fabric run's launcher turns the script's exit status 2 into its own failure status)
    assert out.returncode != 0 and "config error: strategy 'fsdp' is not supported" in out.stderr, out.stderr[-2000:]


def test_console_output_goes_to_out_log_without_the_progress_bar(tmp_path):
    from tqdm import tqdm

    from probloss.training.console import say, tee_output

    with tee_output(tmp_path / "out.log"):
        bar = tqdm(total=3, file=sys.stderr, mininterval=0)
        bar.update(1)
        say("[eval step 1] val/loss 1.0")
        say("warning: something", error=True)
        print("plain print")
        warnings.warn("a library warning")
        bar.close()
    log = (tmp_path / "out.log").read_text()
    assert log.startswith("[eval step 1] val/loss 1.0\nwarning: something\nplain print\n")
    assert "UserWarning: a library warning" in log and "\r" not in log
    with pytest.raises(ValueError):
        with tee_output(tmp_path / "out.log"):
            raise ValueError("bad value")
    assert (tmp_path / "out.log").read_text().endswith("stopped: ValueError: bad value\n")


@pytest.mark.slow
def test_prolip_with_partial_views_trains_and_the_config_pairs_loss_and_data(tmp_path, cache_dir):
    summary = main(small(tmp_path, cache_dir, "loss=prolip", "loss.partial_alpha=0.01", "data.partial_captions=true",
                         "trainer.max_steps=3", "trainer.eval_every=0", "eval.projector_samples=0"))
    assert summary["steps"] == 3 and math.isfinite(summary["train/loss"])
    for wrong, message in ((["loss=prolip", "loss.partial_alpha=0.01"], "set data.partial_captions=true"),
                           (["loss=infonce", "data.partial_captions=true"], "takes no partial views"),
                           (["loss=prolip", "loss.partial_alpha=0.01", "data.partial_captions=true",
                             "trainer.accum_steps=2"], "not supported with GradCache")):
        with pytest.raises(ConfigError, match=message):
            main(small(tmp_path / "bad", cache_dir, *wrong, "trainer.max_steps=1"))


def test_train_step_adds_the_partial_view_term():
    """The step encodes the partial views after the other texts and adds loss.partial_view_loss to the loss."""
    from lightning_fabric import Fabric

    torch.manual_seed(0)
    run = RunSettings.from_config(compose_config(["loss=prolip", "loss.partial_alpha=0.5", "model=tiny"]))
    trainee = make_trainee(run, make_tokenizer(run))
    fabric = Fabric(accelerator="cpu", devices=1)
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 20, (4, 16))
    partial = torch.randint(1, 20, (4, 16))
    mask = torch.tensor([True, True, False, True])
    with torch.no_grad():
        emb = trainee(images, torch.cat([tokens, partial]))
        want = trainee.loss(emb.image_emb, emb.text_emb[:4], emb.image_log_std, emb.text_log_std[:4]) + \
            trainee.loss.partial_view_loss(emb.text_emb[:4], emb.text_log_std[:4], emb.text_emb[4:],
                                           emb.text_log_std[4:], mask)
    optimizer = torch.optim.SGD(trainee.parameters(), lr=0.0)
    out = train_step(fabric, trainee, optimizer, {"image": images, "tokens": tokens, "partial_tokens": partial,
                                                  "partial_mask": mask}, grad_clip=None)
    assert out.loss == pytest.approx(float(want), rel=1e-6) and out.embeddings.text_emb.shape[0] == 4


def test_stability_keys_of_a_real_run_against_the_reference(tmp_path, cache_dir):
    """40 steps of the proposal with relative clipping: the reference is ln B (its closed form), the first
    gradient norm is recorded, a healthy short run is neither diverged nor without a jump measure."""
    result = run_training(small(tmp_path, cache_dir, "loss=gaussian_var", "trainer.max_steps=40",
                                "trainer.warmup_steps=5", "trainer.eval_every=20", "trainer.ckpt_every=0",
                                "eval.projector_samples=0", "trainer.grad_clip_mode=relative"), table=False)
    summary = result.summary  # the one entry hands back the run folder it trained in
    assert result.run_dir == Path(summary["run_dir"]) and (result.run_dir / "summary.json").is_file()
    assert summary["stability/reference_loss"] == pytest.approx(math.log(32), rel=1e-9)
    assert summary["stability/diverged"] is False and summary["stability/diverged_step"] == -1
    assert isinstance(summary["stability/collapsed"], bool)
    assert summary["stability/collapsed_step"] in ((20, 40) if summary["stability/collapsed"] else (-1,))
    assert summary["stability/collapsed_loss"] == (summary["val/loss"] >= 0.9 * math.log(32))
    assert 0 <= summary["stability/zeroshot_p_above_chance"] <= 1
    assert summary["stability/grad_norm_init"] > summary["stability/grad_norm_median"] > 0  # large at init
    assert math.isfinite(summary["stability/max_loss_jump"]) and summary["stability/max_loss_jump"] >= 0
    assert 5 < summary["stability/max_loss_jump_step"] <= 40 or summary["stability/max_loss_jump_step"] == -1


def test_relative_clipping_scales_the_update_to_the_threshold():
    """train_step with ``relative_clip``: the update equals the unclipped one times threshold / norm (SGD)."""
    from lightning_fabric import Fabric

    from probloss.models import build_dual_encoder

    torch.manual_seed(0)
    loss = probloss.build_loss("gaussian_var")
    model = build_dual_encoder(dict(compose_config([])["model"]), vocab_size=40, max_len=8, image_size=32,
                               log_std=True)
    batch = {"image": torch.randn(8, 3, 32, 32), "tokens": torch.randint(1, 40, (8, 8))}
    start = {n: p.detach().clone().double() for n, p in Trainee(model, loss).named_parameters()}
    deltas, norms, asked = [], [], []
    for clip in (None, lambda norm, factor: asked.append((norm, factor)) or 0.25 * norm):
        fabric = Fabric(accelerator="cpu", devices=1, precision="64-true")
        trainee = Trainee(copy.deepcopy(model), copy.deepcopy(loss))
        optimizer = torch.optim.SGD(trainee.parameters(), lr=1e-3)
        trainee, optimizer = fabric.setup(trainee, optimizer)
        out = train_step(fabric, trainee, optimizer, batch, grad_clip=2.0 if clip else None, relative_clip=clip)
        norms.append(out.grad_norm)
        deltas.append({n: p.detach() - start[n] for n, p in trainee.module.named_parameters()})
    assert norms[0] == pytest.approx(norms[1], rel=1e-12)  # the pre-clip norm is reported either way
    assert asked == [(pytest.approx(norms[0], rel=1e-12), 2.0)]
    coef = 0.25 * norms[0] / (norms[0] + 1e-6)
    for name, full in deltas[0].items():
        torch.testing.assert_close(deltas[1][name], coef * full, rtol=1e-9, atol=1e-15, msg=name)


def test_batch_must_split_over_ranks():
    assert check_batch_sizes(128, 2, 4) == 32
    with pytest.raises(ConfigError, match="divisible by the world size 3"):
        check_batch_sizes(128, 1, 3)
    with pytest.raises(ConfigError, match="accum_steps=3"):
        check_batch_sizes(128, 3, 2)


# --- non-finite losses --------------------------------------------------------------------------------------------


@pytest.fixture
def nan_loss():
    """A test-only loss: InfoNCE that returns NaN on its 5th call (= training step 5, no eval in between). Calls
    are counted per instance: the run's uninformative reference (eval/stability.py) calls a copy of the loss."""
    from probloss.losses.infonce import InfoNCE

    class NanAtStep5(InfoNCE):
        calls = 0

        def compute_loss(self, *args, **kwargs):
            self.calls += 1
            value = super().compute_loss(*args, **kwargs)
            return value * float("nan") if self.calls == 5 else value

    probloss.register_loss("_nan_at_step5")(NanAtStep5)
    yield "_nan_at_step5"
    probloss.LOSSES.remove("_nan_at_step5")


@pytest.mark.slow
def test_nonfinite_skip_counts_and_continues(nan_loss, tmp_path, cache_dir):
    summary = main(small(tmp_path, cache_dir, f"loss={nan_loss}", "trainer.on_nonfinite=skip",
                         "trainer.eval_every=0", "trainer.ckpt_every=2"))
    assert summary["stability/nonfinite_steps"] == 1 and summary["steps"] == 6
    assert math.isfinite(summary["train/loss"]) and math.isfinite(summary["val/loss"])
    raw = torch.load(ckpt.newest_checkpoint(summary["run_dir"]), weights_only=True)
    assert all(torch.isfinite(v).all() for v in raw["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_nonfinite_stop_exits_with_a_message_and_keeps_the_last_good_checkpoint(nan_loss, tmp_path, cache_dir):
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 5.*step-00000004.ckpt"):
        main(small(tmp_path, cache_dir, f"loss={nan_loss}", "trainer.on_nonfinite=stop", "trainer.eval_every=0",
                   "trainer.ckpt_every=2"))
    run_dir = only_run(tmp_path, nan_loss)
    partial = json.loads((run_dir / "summary.json").read_text())
    assert partial["status"] == "stopped" and partial["stability/nonfinite_steps"] == 1
    last = ckpt.newest_checkpoint(run_dir)
    assert last.name == "step-00000004.ckpt"
    raw = torch.load(last, weights_only=True)
    assert all(torch.isfinite(v).all() for v in raw["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_nonfinite_stop_exit_status_from_the_script(tmp_path, cache_dir):
    """scripts/train.py: a clear message and exit status 1 (an lr of 1e30 makes the loss NaN at once)."""
    args = small(tmp_path, cache_dir, "trainer.on_nonfinite=stop", "trainer.lr=1e30", "trainer.warmup_steps=0",
                 "trainer.grad_clip=null", "trainer.eval_every=0")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "training stopped: non-finite" in out.stderr


@pytest.mark.slow
def test_unknown_key_fails_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), f"out_dir={tmp_path}",
                          "trainer.max_step=3"], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "trainer.max_step" in out.stderr and "max_steps" in out.stderr
    assert not any(tmp_path.iterdir())


# --- GradCache ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_grad_cache_equals_one_big_batch(loss_name):
    """k accumulated micro-batches (GradCache) give the same update as one k-times larger batch (float64)."""
    from lightning_fabric import Fabric

    from probloss.models import build_dual_encoder

    torch.manual_seed(0)
    cfg = dict(compose_config([])["model"])
    loss = probloss.build_loss(loss_name)
    model = build_dual_encoder(cfg, vocab_size=40, max_len=8, image_size=32, log_std=loss.needs_log_std)
    batch = {"image": torch.randn(16, 3, 32, 32), "tokens": torch.randint(1, 40, (16, 8))}
    results = []
    for k in (1, 4):
        fabric = Fabric(accelerator="cpu", devices=1, precision="64-true")
        trainee = Trainee(copy.deepcopy(model), copy.deepcopy(loss))
        optimizer = torch.optim.SGD(trainee.parameters(), lr=0.5)
        trainee, optimizer = fabric.setup(trainee, optimizer)
        out = train_step(fabric, trainee, optimizer, batch, grad_clip=None, accum_steps=k)
        assert out.finite
        results.append((out, {n: p.detach().clone() for n, p in trainee.named_parameters()}))
    (one, big), (acc, small_) = results
    assert acc.loss == pytest.approx(one.loss, rel=1e-12)
    assert acc.grad_norm == pytest.approx(one.grad_norm, rel=1e-9)
    for name in big:
        torch.testing.assert_close(small_[name], big[name], rtol=1e-10, atol=1e-12, msg=name)


def _step_with_negatives(loss_name, batch, accum_steps, **loss_kwargs):
    """One float64 train_step of the default model from a fixed init; (StepOutput, parameters after the step)."""
    from lightning_fabric import Fabric

    from probloss.models import build_dual_encoder

    torch.manual_seed(0)
    loss = probloss.build_loss(loss_name, **loss_kwargs)
    # where training starts the log-std heads (make_trainee): ProLIP at sigma = 1 would score every pair so low
    # that hard negatives change nothing
    model_cfg = {**compose_config([])["model"], "init_log_std": loss.init_log_std}
    model = build_dual_encoder(model_cfg, vocab_size=40, max_len=8, image_size=32, log_std=loss.needs_log_std)
    fabric = Fabric(accelerator="cpu", devices=1, precision="64-true")
    trainee = Trainee(model, loss)
    optimizer = torch.optim.SGD(trainee.parameters(), lr=0.5)
    trainee, optimizer = fabric.setup(trainee, optimizer)
    out = train_step(fabric, trainee, optimizer, batch, grad_clip=None, accum_steps=accum_steps)
    return out, {n: p.detach().clone() for n, p in trainee.named_parameters()}


def _negatives_batch(n=8, k=2):
    gen = torch.Generator().manual_seed(3)
    return {"image": torch.randn(n, 3, 32, 32, generator=gen), "tokens": torch.randint(1, 40, (n, 8), generator=gen),
            "negative_tokens": torch.randint(1, 40, (n, k, 8), generator=gen)}


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_train_step_with_negative_tokens(loss_name):
    """Hard negatives (batch["negative_tokens"], (B, k, L)) reach the loss as extra texts: a finite loss, not the
    loss without them; the diagnostics' embeddings are the positives only."""
    batch = _negatives_batch()
    plain = {key: value for key, value in batch.items() if key != "negative_tokens"}
    with_negatives, _ = _step_with_negatives(loss_name, batch, 1)
    without, _ = _step_with_negatives(loss_name, plain, 1)
    assert with_negatives.finite and math.isfinite(with_negatives.loss)
    assert with_negatives.loss != pytest.approx(without.loss, rel=1e-6)
    assert with_negatives.embeddings.text_emb.shape[0] == 8


@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_grad_cache_with_negative_tokens_equals_one_big_batch(loss_name):
    """Each micro-batch encodes its own samples' extra texts; the update equals one big batch's (float64)."""
    batch = _negatives_batch()
    (one, big), (acc, small_) = (_step_with_negatives(loss_name, batch, k) for k in (1, 2))
    assert acc.finite and acc.loss == pytest.approx(one.loss, rel=1e-12)
    assert acc.grad_norm == pytest.approx(one.grad_norm, rel=1e-9)
    for name in big:
        torch.testing.assert_close(small_[name], big[name], rtol=1e-10, atol=1e-12, msg=name)


def _false_negatives_batch(n=8):
    """Duplicate captions across the two halves (GradCache micro-batches at k = 2), an extra text repeating its own
    sample's caption, and two repeated scenes (json seed/index, as the shapes data writes)."""
    batch = _negatives_batch(n, k=1)
    batch["tokens"][4], batch["tokens"][5] = batch["tokens"][0], batch["tokens"][1]
    batch["negative_tokens"][2, 0] = batch["tokens"][2]
    batch["json"] = [{"seed": 0, "index": i % 6} for i in range(n)]
    return batch


@pytest.mark.parametrize("mode", ["mask", "positive"])
@pytest.mark.parametrize("loss_name", probloss.list_losses())
def test_grad_cache_with_false_negatives_equals_one_big_batch(loss_name, mode):
    """loss.false_negatives: group ids of the whole rank batch reach the loss in its text order, so GradCache
    (duplicates in different micro-batches) gives one big batch's update (float64)."""
    if "false_negatives" not in inspect.signature(probloss.LOSSES.get(loss_name)).parameters:
        pytest.skip(f"{loss_name} has no false_negatives option")
    batch = _false_negatives_batch()
    (one, big), (acc, small_) = (_step_with_negatives(loss_name, batch, k, false_negatives=mode) for k in (1, 2))
    kept, _ = _step_with_negatives(loss_name, batch, 1)
    assert one.loss != pytest.approx(kept.loss, rel=1e-9)  # the duplicates matter
    assert acc.finite and acc.loss == pytest.approx(one.loss, rel=1e-12)
    assert acc.grad_norm == pytest.approx(one.grad_norm, rel=1e-9)
    for name in big:
        torch.testing.assert_close(small_[name], big[name], rtol=1e-10, atol=1e-12, msg=name)


def test_train_step_passes_caption_and_scene_groups_to_the_loss():
    """The step's loss equals the loss called by hand with ids hashed from the token rows (positives, then
    extras) and the json's scenes; without duplicates ``mask`` equals ``keep``."""
    from probloss.false_negatives import caption_groups, scene_groups
    from probloss.models.dual import with_negatives

    batch = _false_negatives_batch()
    out, _ = _step_with_negatives("infonce", batch, 1, false_negatives="mask")
    torch.manual_seed(0)
    loss = probloss.build_loss("infonce", false_negatives="mask")
    model_cfg = {**compose_config([])["model"], "init_log_std": loss.init_log_std}
    from probloss.models import build_dual_encoder
    model = build_dual_encoder(model_cfg, vocab_size=40, max_len=8, image_size=32, log_std=False).double()
    texts = with_negatives(batch["tokens"], batch["negative_tokens"])
    emb = model(batch["image"].double(), texts)
    want = loss.double()(*emb.loss_args(), text_groups=caption_groups(texts), image_groups=scene_groups(batch["json"]))
    without_scenes = loss(*emb.loss_args(), text_groups=caption_groups(texts))
    assert out.loss == pytest.approx(want.item(), rel=1e-6)  # the step reports the loss in float32
    assert abs(without_scenes.item() - want.item()) > 1e-4 and abs(loss(*emb.loss_args()).item() - want.item()) > 1e-4
    distinct = _negatives_batch()
    masked, _ = _step_with_negatives("infonce", distinct, 1, false_negatives="mask")
    kept, _ = _step_with_negatives("infonce", distinct, 1)
    assert masked.loss == pytest.approx(kept.loss, rel=1e-12)


def test_a_plain_step_runs_no_grad_cache_code_and_an_accumulating_one_does():
    """GradCache only where the step accumulates: with accum_steps=1 no function of grad_cache.py is called."""
    batch = _negatives_batch()
    for k, expected in ((1, False), (2, True)):
        called = set()

        def profile(frame, event, arg):
            if event == "call":
                called.add(Path(frame.f_code.co_filename).name)

        sys.setprofile(profile)
        try:
            out, _ = _step_with_negatives("infonce", batch, k)
        finally:
            sys.setprofile(None)
        assert out.finite and ("grad_cache.py" in called) is expected, (k, sorted(called))


def test_host_tuning_is_one_context_that_restores_the_process():
    """Threads, determinism and the CPU products for the block, the caller's settings after it; a run resumed
    from a checkpoint whose config predates trainer.cpu_matmul runs on BLAS."""
    from types import SimpleNamespace

    from probloss.models.linear import onednn_available
    from probloss.training.launch import host_tuning

    fabric = SimpleNamespace(device=torch.device("cpu"), world_size=1)
    trainer = RunSettings.from_config(compose_config(["trainer.num_threads=2", "trainer.deterministic=true",
                                                      "trainer.cpu_matmul=auto"])).trainer
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.set_num_threads(1)
    try:
        with host_tuning(fabric, trainer) as backend:
            assert torch.get_num_threads() == 2 and torch.are_deterministic_algorithms_enabled()
            assert torch.utils.deterministic.fill_uninitialized_memory is False
            assert backend == ("onednn" if onednn_available() else "blas")
        assert torch.get_num_threads() == 1
        assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory) \
            == before[1:]
        with host_tuning(fabric, trainer, resumed={"trainer": {"lr": 1e-3}}) as backend:
            assert backend == "blas"
        with host_tuning(fabric, trainer, resumed={"trainer": {"cpu_matmul": "auto"}}) as backend:
            assert backend == ("onednn" if onednn_available() else "blas")
    finally:
        torch.set_num_threads(before[0])


def test_negative_tokens_of_the_wrong_shape_are_a_clear_error():
    batch = _negatives_batch()
    batch["negative_tokens"] = batch["negative_tokens"][:, :, :5]
    with pytest.raises(ValueError, match=r"negative_tokens must be \(B, k, L\) = \(8, k, 8\)"):
        _step_with_negatives("infonce", batch, 1)


@pytest.mark.slow
def test_missing_shards_are_a_one_line_error_with_exit_status_2(tmp_path):
    pattern = str(tmp_path / "nowhere-{000..003}.tar")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "data=webdataset",
                          f"data.train_shards='{pattern}'", f"data.val_shards='{pattern}'", f"out_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "nowhere-{000..003}.tar" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_unreadable_test_split_is_a_warning_and_the_run_keeps_its_summary(tmp_path, capsys):
    cache = tmp_path / "cache"  # its own cache: the shared one must stay intact
    main(small(tmp_path, cache, "trainer.max_steps=2", "trainer.eval_every=0", "run_name=a"))
    (shard,) = cache.glob("shapes-*/test/*.tar")
    shard.write_bytes(shard.read_bytes()[:3000])  # truncated: not one sample left
    summary = main(small(tmp_path, cache, "trainer.max_steps=2", "trainer.eval_every=0", "run_name=b"))
    assert summary["status"] == "finished" and "val/i2t_r@1" in summary and "test/i2t_r@1" not in summary
    assert "no readable sample" in summary["test/error"] and "write them again" in summary["test/error"]
    assert "warning: test split skipped" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_step_reports_every_phase_of_a_run(tmp_path, cache_dir):
    """scripts/profile_step.py: a real run under torch.profiler, its wall time split into the loop's marked
    phases (every one of them seen in a run that evaluates, checkpoints and logs) plus the rest."""
    out = tmp_path / "profile.json"
    overrides = [o for o in small(tmp_path / "runs", cache_dir) if not o.startswith("trainer.max_steps")]
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "profile_step.py"), "--steps", "6", "--out", str(out),
                           *overrides], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    phases = result["phases_s"]
    assert set(phases) == {"data", "forward", "loss", "backward", "optimizer", "logging", "evaluation", "checkpoint",
                           "other"}
    assert all(phases[p] > 0 for p in ("data", "forward", "loss", "backward", "optimizer", "logging", "evaluation",
                                       "checkpoint"))  # every phase of this run happened and was seen
    assert sum(phases.values()) == pytest.approx(result["wall_s"], rel=0.05)
    assert result["steps"] == 6 and result["top_ops"] and "| forward |" in done.stdout


@pytest.mark.slow
def test_profile_step_rejects_an_unknown_key_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "profile_step.py"), "--out", str(tmp_path / "p.json"),
                           "trainer.max_step=5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "unknown config key 'trainer.max_step'" in done.stderr and "max_steps" in done.stderr
    assert not (tmp_path / "p.json").exists()
