"""The training loop, as Lightning's Fabric examples read: ``run_training -> train -> train_step -> evaluate``.

::

    python scripts/train.py loss=gaussian_var                    # one process
    fabric run --devices=2 scripts/train.py loss=sigmoid          # DDP (gloo on CPU, nccl on GPU)

:func:`run_training` is the one entry into training: the command (``probloss train``, :func:`main`), a recipe's
run and a sweep's trial all call it, and it hands back a :class:`TrainingResult` (the run folder and the summary).

What a step does (``trainer.batch_size`` is the global batch; each of W ranks gets a contiguous slice of
``batch_size / W`` samples)::

    images, tokens (B/W, ...) -> dual encoder -> Embeddings (B/W, D) -> loss (all ranks' negatives) -> backward
    -> DDP averages gradients (the loss's own logit_scale/logit_bias included: they live in the same module)
    -> clip -> AdamW -> warmup+cosine schedule

With ``trainer.accum_steps = k > 1`` the forward and backward are GradCache's (probloss/training/grad_cache.py):
the same update as one k-times larger batch, with the activation memory of one micro-batch. A plain step
(``k = 1``) stays in this file.

Reproducibility: one ``seed``. Parameters are initialised from it; every step re-seeds torch from
(seed, step, rank), and the data stream is rebuilt from (seed, epoch, rank, world size) and skipped to the
saved position; so a run killed with SIGKILL and resumed continues with the same loss curve.

Preemption (SIGTERM, a cluster's) and Ctrl-C (SIGINT): the signal is noted and the loop stops at the next step
boundary, after saving a checkpoint of that step; :class:`Preempted` carries the step, the checkpoint and the
run folder, and ``probloss train`` prints one line with the resume command and exits 128 + the signal (143 /
130). Resuming it ends bit-identically where an uninterrupted run ends. A signal outside the loop (setup, the
final evaluation) stops at once; the resume point is then the newest checkpoint.

Non-finite parameters after an update (a learning rate that blows the weights up while the loss still looks
finite) stop the run at that step as diverged, naming the newest checkpoint whose weights are finite.

What is not the loop lives in rooms named for their job: probloss/training/launch.py (Fabric and host tuning:
threads, allocator, determinism, CPU products), probloss/training/builders.py
(model, loss, optimizer), probloss/data/prepare.py (shards, cache, batches), probloss/training/run_folder.py (run
folder, resume, summary), probloss/training/evaluation.py (evaluation, val/loss), probloss/training/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from probloss import dist
from probloss.data.prepare import load_eval, prepare_data, train_batches
from probloss.errors import ConfigError, DataError, NonFiniteLossError, Preempted, WriteError
from probloss.false_negatives import batch_groups
from probloss.models.dual import with_negatives
from probloss.training import checkpoint as ckpt
from probloss.training.builders import (
    check_batch_sizes, check_partial_views, make_optimizer, make_scheduler, make_stability_tracker, make_tokenizer,
    make_trainee, uninformative_reference,
)
from probloss.training.config import compose_config, save_config, to_dict
from probloss.training.console import log_error, note, quiet_runs, say, tee_output
from probloss.training.evaluation import evaluate_at_step, log_projector
from probloss.training.grad_cache import grad_cache_backward
from probloss.training.launch import host_tuning, launch, make_fabric
from probloss.training.run_folder import (
    check_resume_config, log_hparams, make_logger, print_summary, resolve_run_dir, resume_config, run_folder_lock,
    write_summary,
)
from probloss.training.settings import RunSettings, TrainerSettings


class _Interrupted(BaseException):
    """A stop signal outside the training loop (raised by the handler, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """SIGTERM and SIGINT while a run trains (a context manager; main thread only, else it does nothing).

    Inside the loop (``armed``) a signal is only noted (``signum``) and the loop stops at the next step
    boundary; elsewhere it raises at once. A second signal while the first is handled is ignored, so the
    checkpoint being written completes (SIGKILL still ends the process).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if not self.armed:
            raise _Interrupted(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self in _ACTIVE:
            _ACTIVE.remove(self)


_ACTIVE: list[StopSignals] = []


def _default_signals_in_child() -> None:
    """A process forked while a run trains (the shapes generator's pool, data-loader workers) gets the
    handlers it would have had: a Python handler runs only when the child's main thread gets back to the
    interpreter, and a child blocked on a lock copied mid-use at fork would then ignore Pool.terminate's
    SIGTERM forever."""
    if _ACTIVE:
        _ACTIVE.clear()
        for s in StopSignals.SIGNALS:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(s, signal.SIG_DFL if s == signal.SIGTERM else signal.default_int_handler)


os.register_at_fork(after_in_child=_default_signals_in_child)


@dataclass(frozen=True)
class TrainingResult:
    """What a finished run hands back, on every rank."""

    run_dir: Path  # the run folder (the same on every rank)
    summary: dict[str, Any]  # what summary.json holds, on rank 0; {} on other ranks


def run_training(config: Sequence[str] | Mapping, fabric=None, on_eval: Callable[[int, dict], None] | None = None,
                 table: bool = True) -> TrainingResult:
    """Train one run: the one entry into training, for the command, recipes and sweeps.

    Args:
        config: ``key=value`` overrides, composed with configs/train.yaml (with ``resume`` set: the resumed run's
            own config, probloss.training.run_folder.resume_config), or a config composed already.
        fabric: a launched Fabric whose processes train (a sweep's worker, trial after trial); None: one is made
            from ``fabric.*`` and launched for this run, and its process group ended after it.
        on_eval: ``on_eval(step, metrics)`` after each intermediate evaluation, on every rank (:func:`train`).
        table: print the end-of-run table and the ``[eval step N]`` lines (recipes and sweeps print one line per
            run instead).

    Raises :class:`Preempted` on SIGTERM/SIGINT, NonFiniteLossError when the run diverges (its summary.json then
    says so), ConfigError/DataError before any work on a bad setting.
    """
    cfg = config
    if not isinstance(config, Mapping):
        overrides = list(config)
        cfg = compose_config(overrides)
        if cfg.resume is not None:  # the run as it was begun (its config.yaml), not defaults + this command line
            cfg, lines = resume_config(cfg, overrides)
            if table and os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
                for line in lines:
                    print(line, file=sys.stderr, flush=True)
    run = RunSettings.from_config(cfg)  # once per run: train() is handed it
    if fabric is not None:
        return train(fabric, cfg, on_eval, table, run)
    return launch(make_fabric(run.fabric, run.trainer.deterministic), train, cfg, on_eval, table, run)


def main(overrides: Sequence[str] | None = None, table: bool = True) -> dict[str, Any]:
    """``probloss train [key=value ...]`` (``overrides``; default: the command line): :func:`run_training`.

    Returns:
        The summary dict on rank 0 (``{}`` on other ranks).
    """
    result = run_training(list(sys.argv[1:] if overrides is None else overrides), table=table)
    return result.summary if result is not None else {}


class Position:
    """Where the run is: optimizer steps done and the data stream position (epoch, batches consumed).

    A plain class, not a dataclass: Fabric copies dataclasses found in the state dict, and the loop must keep
    the very object that ``fabric.load`` restores.
    """

    def __init__(self) -> None:
        self.step = 0  # optimizer steps done (skipped non-finite steps included)
        self.epoch = 0  # data epoch being read
        self.batch = 0  # batches of that epoch consumed
        self.skipped = 0  # corrupt samples skipped by this rank's data loaders since this process started
        self.skipped_before = 0  # all ranks' skipped samples before this (re)start (from the checkpoint)
        self.nonfinite_in_a_row = 0
        # planted noise (data.noise_attribute): this rank's samples read, attribute scenes, captions replaced
        self.planted_samples = self.planted_scenes = self.planted_replaced = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


def train(fabric, cfg: Mapping, on_eval: Callable[[int, dict], None] | None = None,
          table: bool = True, run: RunSettings | None = None) -> TrainingResult:
    """Train, evaluate and checkpoint one run (see the module docstring); called on every rank, through
    :func:`run_training`.

    ``on_eval(step, metrics)`` is called on every rank after each intermediate evaluation (metrics on rank 0,
    ``{}`` elsewhere); sweeps use it to report to Optuna and to prune by raising. ``table``: print the
    end-of-run table and the ``[eval step N]`` lines; ``False`` (a sweep's trial, a recipe's run: the caller
    prints one line per run) prints neither: the eval lines go to out.log only (probloss/training/console.py).
    ``run``: the settings of ``cfg`` where the caller built them already (:func:`run_training`); else built here.
    Raises :class:`Preempted` on SIGTERM/SIGINT.
    """
    run = RunSettings.from_config(cfg) if run is None else run
    # stack: the run's out.log and host tuning, once known; quiet_runs: a sweep's trial or a recipe's run keeps its
    # eval lines in out.log (one console line per run)
    with contextlib.ExitStack() as stack, StopSignals() as signals, quiet_runs(not table):
        try:
            return _train(fabric, cfg, run, on_eval, stack, signals, table)
        except _Interrupted as stop:  # before the run folder was known: nothing was saved
            raise Preempted(stop.signum, None, None, None) from None


def _train(fabric, cfg: Mapping, run: RunSettings, on_eval, stack: contextlib.ExitStack, signals: StopSignals,
           table: bool = True) -> TrainingResult:
    t_start = time.perf_counter()
    t = run.trainer
    per_rank = check_batch_sizes(t.batch_size, t.accum_steps, fabric.world_size)
    fabric.seed_everything(run.seed, verbose=False)

    spec = prepare_data(run.data, t.batch_size, fabric)  # bad data fails here, before the run folder exists
    run_dir, resume_from = dist.broadcast_object(fabric, resolve_run_dir(run) if fabric.is_global_zero else None)
    run_dir = Path(run_dir)
    failure = None
    if fabric.is_global_zero:
        try:
            stack.enter_context(run_folder_lock(run_dir))  # one process per run folder; a bad command leaves none
            stack.enter_context(tee_output(run_dir / "out.log"))
        except (ConfigError, OSError) as err:  # e.g. the folder is in use: every rank stops, not only rank 0
            failure = err
    dist.raise_together(fabric, failure, _exit_code(failure), only_rank0=True)
    try:
        summary = _run(fabric, cfg, run, spec, per_rank, on_eval, stack, run_dir, resume_from, signals, table, t_start)
        return TrainingResult(run_dir, summary)
    except _Interrupted as stop:  # outside the loop: the newest readable checkpoint is the resume point
        newest = ckpt.readable_checkpoint(run_dir, warn=lambda _: None) if ckpt.list_checkpoints(run_dir) else None
        step = int(newest.stem.split("-")[1]) if newest is not None else None
        raise Preempted(stop.signum, step, newest, run_dir) from None


def _run(fabric, cfg: Mapping, run: RunSettings, spec, per_rank: int, on_eval, stack: contextlib.ExitStack,
         run_dir: Path, resume_from: str | None, signals: StopSignals, table: bool, t_start: float) -> dict[str, Any]:
    t = run.trainer
    tokenizer = make_tokenizer(run)
    saved = check_resume_config(resume_from, cfg, announce=fabric.is_global_zero) if resume_from is not None else None
    # From here torch computes: threads, allocator, determinism and CPU products as this run asks (or as the
    # checkpoint it resumes was trained), until the run ends
    stack.enter_context(host_tuning(fabric, t, resumed=saved))

    trainee = make_trainee(run, tokenizer, from_checkpoint=resume_from is not None)
    check_partial_views(trainee.loss, run.data, t.accum_steps)
    # The loss's uninformative references (eval/stability.py), at the training batch and at val/loss's batch
    # (eval/runtime.py val_loss), computed on the loss as built, before Fabric moves it.
    tracker = make_stability_tracker(t, uninformative_reference(trainee, run, t.batch_size))
    trainee, optimizer = fabric.setup(trainee, make_optimizer(trainee, t))
    scheduler = make_scheduler(optimizer, t)
    state = {"model": trainee, "optimizer": optimizer, "scheduler": scheduler, "position": Position(),
             "stability": tracker, "rng": ckpt.rng_state(), "config": to_dict(cfg), "train_losses": []}
    if resume_from is not None:
        rest = fabric.load(resume_from, state, weights_only=True)  # may hand back new non-module objects
        ckpt.set_rng_state(state["rng"])
        if fabric.is_global_zero:
            extra = f" (extra keys: {list(rest)})" if rest else ""
            note(f"resumed from {resume_from} at step {state['position'].step}{extra}")
    pos: Position = state["position"]

    logger, failure = None, None
    if fabric.is_global_zero:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir)
            logger = make_logger(run_dir, purge_step=pos.step + 1 if resume_from is not None else None)
        except OSError as err:
            failure = err
    dist.raise_together(fabric, failure, 1, only_rank0=True)
    eval_set = load_eval(spec, run.data, tokenizer, seed=run.seed, max_samples=run.eval.max_samples,
                         image_noise=float(run.eval.image_noise or 0.0))
    val_batch = min(t.batch_size, len(eval_set.captions) - len(eval_set.captions) % fabric.world_size)
    val_reference = (tracker.reference if val_batch == t.batch_size else
                     uninformative_reference(trainee.module, run, val_batch) if val_batch > 1 else None)

    def run_evaluation(final: bool = False) -> dict[str, Any]:
        metrics = evaluate_at_step(fabric, run, trainee, eval_set, spec, tokenizer, logger, pos.step, final=final)
        if fabric.is_global_zero:  # collapse is judged on val (rank 0 holds the metrics)
            n = metrics.get("val/zeroshot_n_labelled")
            tracker.judge_collapse(pos.step, metrics.get("val/loss"), val_reference, metrics.get("val/zeroshot_top1"),
                                   int(n) if n else None, len(spec.classnames) if spec.classnames else None)
        return metrics

    batches = train_batches(spec, run.data, tokenizer, per_rank, fabric.global_rank, fabric.world_size, run.seed,
                            pos)
    timer = Timer()
    losses: list[float] = state["train_losses"]  # the last few, for train/loss in the summary (survives resume)
    bar = _progress(fabric, t, pos.step)
    try:
        signals.armed = True  # from here a signal stops the loop at the next step boundary, with a checkpoint
        saved = None  # the checkpoint of the step just done, if one was written
        while pos.step < t.max_steps:
            timer.start()  # throughput includes reading the data
            before, failure = pos.state_dict(), None
            with phase("data"):
                try:
                    batch = next(batches)
                except DataError as err:  # e.g. data.max_skipped_fraction: may hit one rank only
                    failure = err
            if failure is None and (broken := log_error()) is not None:  # out.log cannot be written (disk full)
                failure = WriteError(*broken)
            # Every rank stops at the same step boundary, all of them when one has an error: one all-reduce of
            # both flags (a signal reaches ranks at different times; an error may be one rank's), none in one process
            stop, failed = signals.signum is not None, failure is not None
            if fabric.world_size > 1:
                flags = dist.all_reduce_sum(fabric, torch.tensor([float(stop), float(failed)], device=fabric.device))
                stop, failed = bool(flags[0] > 0), bool(flags[1] > 0)
            if failed:  # the failing rank's error on rank 0 (the one line), the others end quietly
                dist.raise_together(fabric, failure, _exit_code(failure))
            if stop:  # at the boundary after step pos.step: the batch just read is read again on resume
                pos.load_state_dict(before)
                with phase("checkpoint"):
                    saved = saved or _save(fabric, run_dir, pos, state, t.keep_last)
                raise Preempted(signals.signum or signal.SIGTERM, pos.step, saved, run_dir)
            torch.manual_seed(step_seed(run.seed, pos.step, fabric.global_rank))  # dropout etc.: a function of the step
            out = train_step(fabric, trainee, optimizer, batch, t.grad_clip, t.accum_steps,
                             relative_clip=tracker.clip_threshold if t.grad_clip_mode == "relative" else None)
            scheduler.step()
            timer.stop(t.batch_size)
            pos.step += 1
            tracker.update(pos.step, out.loss, out.grad_norm, params_finite=out.nonfinite_what != "parameters")
            if out.finite:
                pos.nonfinite_in_a_row = 0
                losses.append(out.loss)
                del losses[:-50]
            else:
                _handle_nonfinite(fabric, t, pos, out, run_dir, tracker, run.loss_name)

            if logger is not None and (pos.step % t.log_every == 0 or pos.step == 1):
                with phase("logging"):
                    logger.log_metrics(_train_scalars(trainee, optimizer, out, timer, pos, tracker), step=pos.step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out.loss:.4f}", samples_s=f"{timer.samples_per_s:.0f}", refresh=False)
            last = pos.step == t.max_steps
            if t.eval_every and pos.step % t.eval_every == 0 and not last:
                with phase("evaluation"):
                    metrics = run_evaluation()
                if on_eval is not None:
                    on_eval(pos.step, {**metrics, **tracker.summary()})
            saved = None
            if (t.ckpt_every and pos.step % t.ckpt_every == 0) or last:
                with phase("checkpoint"):
                    saved = _save(fabric, run_dir, pos, state, t.keep_last)
        signals.armed = False  # the final evaluation: a signal stops at once (the last checkpoint is saved)
        if signals.signum is not None:
            raise _Interrupted(signals.signum)
        with phase("evaluation"):
            val_metrics = run_evaluation(final=True)
        if logger is not None and run.eval.projector_samples:
            log_projector(trainee.module.model, eval_set, logger, pos.step, run.eval.projector_samples)
    except BaseException:
        if logger is not None:  # a stopped, diverged or pruned run keeps readable event files
            logger.finalize("failed")
        raise
    finally:
        if bar is not None:
            bar.close()

    eval_skipped = int(eval_set.skipped) if fabric.is_global_zero else 0
    skipped = dist.sum_over_ranks(fabric, pos.skipped + eval_skipped) + pos.skipped_before
    summary: dict[str, Any] = {"train/loss": sum(losses[-20:]) / len(losses[-20:]) if losses else float("nan")}
    summary.update(val_metrics)
    summary.update(tracker.summary())
    summary.update({"steps": pos.step, "samples_per_s": timer.samples_per_s, "data/skipped": skipped,
                    "data/truncated_shards": len(spec.truncated),
                    "status": "finished", "loss": run.loss_name, "world_size": fabric.world_size,
                    "run_dir": str(run_dir), "wall_time_s": time.perf_counter() - t_start})
    summary.update(planted_counts(fabric, run, pos))
    failure = None
    if fabric.is_global_zero:
        try:
            logger.log_metrics({"data/skipped": skipped, "data/truncated_shards": len(spec.truncated)}, step=pos.step)
            write_summary(run_dir, summary)
            log_hparams(logger, cfg, summary)
            logger.finalize("success")
            if table:
                title = f"{run.loss_name} / {run.model.label} / {fabric.world_size} rank(s)"
                print_summary(summary, run_dir, title, run.out_dir)
            if (broken := log_error()) is not None:
                raise WriteError(*broken)
        except OSError as err:  # summary.json, the events, out.log: the path and the reason (probloss/cli.py)
            failure = err
    dist.raise_together(fabric, failure, 1, only_rank0=True)  # the other ranks end with rank 0's outcome
    return summary if fabric.is_global_zero else {}


def _exit_code(error: BaseException | None) -> int:
    """The command's exit status for ``error`` (probloss/cli.py): 2 for a bad config or bad data, else 1."""
    return 2 if isinstance(error, (ConfigError, DataError, FileNotFoundError)) else 1


def planted_counts(fabric, run: RunSettings, pos: Position) -> dict[str, float]:
    """Planted noise as trained (with ``data.noise_attribute``; every rank calls it): ``data/planted_replaced_frac``
    (captions replaced / samples whose scene holds the attribute: ``data.noise_rate`` up to binomial noise) and
    ``data/planted_scene_frac`` (those scenes / samples read), over all ranks. A resumed run counts from the
    checkpoint's (rank 0's) counts on, so the fractions stay estimates of the same rates."""
    if run.data.noise_attribute is None:
        return {}
    samples, scenes, replaced = (dist.sum_over_ranks(fabric, getattr(pos, k)) for k in
                                 ("planted_samples", "planted_scenes", "planted_replaced"))
    return {"data/planted_replaced_frac": replaced / scenes if scenes else float("nan"),
            "data/planted_scene_frac": scenes / samples if samples else float("nan")}


@dataclass
class StepOutput:
    loss: float  # the global loss (mean over ranks); nan/inf if non-finite
    grad_norm: float  # total norm before clipping; nan if the step was skipped before backward
    finite: bool  # whether the update was applied
    embeddings: Any = None  # the first micro-batch's Embeddings (detached, positive texts only), for diagnostics
    nonfinite_what: str = ""


def train_step(fabric, trainee, optimizer, batch: Mapping[str, Any], grad_clip: float | None,
               accum_steps: int = 1, relative_clip: Callable[[float, float], float] | None = None) -> StepOutput:
    """One optimizer step on this rank's slice of the global batch: forward, loss and backward here, or GradCache's
    (probloss/training/grad_cache.py) when ``accum_steps > 1``; then clipping and the optimizer.

    Clipping: at ``grad_clip`` (0 or None: none); with ``relative_clip`` (``trainer.grad_clip_mode=relative``:
    the tracker's ``clip_threshold(norm, grad_clip)``) at the threshold it returns for this step's pre-clip norm.
    The norm is identical on every rank (after DDP's all-reduce), so every rank clips alike.

    A non-finite loss on any rank skips the step on every rank before backward (so DDP stays in step); a
    non-finite gradient norm (identical on all ranks after DDP's all-reduce) skips it after backward.

    ``batch["negative_tokens"]`` (B_rank, k, L), when present: k extra texts per sample (hard negatives), encoded
    by the text tower and passed to the loss after the positives, text embeddings [B_rank positives,
    B_rank k extras] (the loss contract, probloss/loss.py). The returned embeddings hold the positives only.

    ``batch["partial_tokens"]`` (B_rank, L) and ``batch["partial_mask"]`` (B_rank,), when present: each caption's
    partial view, encoded after the other texts and passed to ``loss.partial_view_loss`` (added to the loss).
    """
    images, tokens = fabric.to_device(batch["image"]), fabric.to_device(batch["tokens"])
    negatives = batch.get("negative_tokens")
    negatives = None if negatives is None else fabric.to_device(negatives)
    partial = batch.get("partial_tokens")
    if accum_steps <= 1:
        texts = with_negatives(tokens, negatives)
        groups = batch_groups(trainee.loss, texts, batch.get("json"))  # false negatives: {} unless asked for
        if partial is not None:  # encoded in the same forward (one DDP forward per step), split off after it
            texts = torch.cat([texts, fabric.to_device(partial)])
        with phase("forward"):
            emb = trainee(images, texts)
        with phase("loss"):
            if partial is not None:
                emb, views = _split_partial_views(emb, partial.shape[0])
            loss = trainee.loss(*emb.loss_args(), **groups)
            if partial is not None:
                n = images.shape[0]
                loss = loss + trainee.loss.partial_view_loss(
                    emb.text_emb[:n], None if emb.text_log_std is None else emb.text_log_std[:n], *views,
                    fabric.to_device(batch["partial_mask"]))
            value, finite = dist.global_mean(fabric, loss)
        emb = emb.detach(texts=images.shape[0])  # positives: diagnostics comparable with and without extras
        if finite:
            with phase("backward"):
                fabric.backward(loss)
    else:
        value, finite, emb = grad_cache_backward(fabric, trainee, images, tokens, accum_steps, negatives,
                                                 metas=batch.get("json"))
    if not finite:
        return StepOutput(value, float("nan"), False, emb, "loss")
    with phase("optimizer"):
        max_norm = grad_clip or float("inf")  # inf: no clipping, but the norm is still measured
        if relative_clip is not None:
            max_norm = float("inf")  # measured first: the threshold depends on it
        grad_norm = float(fabric.clip_gradients(trainee, optimizer, max_norm=max_norm, error_if_nonfinite=False))
        if not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            return StepOutput(value, grad_norm, False, emb, "gradient")
        if relative_clip is not None and grad_clip:
            _clip_to(trainee, grad_norm, relative_clip(grad_norm, float(grad_clip)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not _all_finite(trainee.parameters()):  # the update itself blew the weights up (e.g. lr 1e12, inf)
            return StepOutput(value, grad_norm, False, emb, "parameters")
    return StepOutput(value, grad_norm, True, emb)


def _all_finite(tensors) -> bool:
    """Whether every tensor is finite, with one host synchronisation (not one per tensor)."""
    flags = [torch.isfinite(p.detach()).all() for p in tensors]
    return bool(torch.stack(flags).all()) if flags else True


def _clip_to(trainee, grad_norm: float, max_norm: float) -> None:
    """Scale every gradient by max_norm / (grad_norm + 1e-6) when that is < 1 (torch's clip_grad_norm_ rule)."""
    coef = max_norm / (grad_norm + 1e-6)
    if coef < 1:
        for param in trainee.parameters():
            if param.grad is not None:
                param.grad.mul_(coef)


def _split_partial_views(emb, b: int):
    """(the Embeddings without their last ``b`` text rows, (those rows' embeddings, log-stds or None))."""
    log_std = emb.text_log_std
    rest = type(emb)(emb.image_emb, emb.text_emb[:-b], emb.image_log_std, None if log_std is None else log_std[:-b])
    return rest, (emb.text_emb[-b:], None if log_std is None else log_std[-b:])


def phase(name: str):
    """A named range of the training loop (``probloss/<name>``) that torch.profiler reports as one row
    (scripts/profile_step.py); without a profiler it costs about a microsecond."""
    return torch.profiler.record_function(f"probloss/{name}")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one step on one rank (dropout, noise): independent of how the run got there."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def _handle_nonfinite(fabric, t: TrainerSettings, pos: Position, out: StepOutput, run_dir: Path, tracker,
                      loss_name: str) -> None:
    """A NaN/Inf step was skipped (no update): count it, or stop with a clear message (and what is known so
    far in summary.json; no checkpoint of the bad step is written)."""
    pos.nonfinite_in_a_row += 1
    what = f"non-finite {out.nonfinite_what} at step {pos.step} (loss={out.loss}, grad_norm={out.grad_norm})"
    ruined = out.nonfinite_what == "parameters"  # applied already: no later step can recover from NaN weights
    if not ruined and t.on_nonfinite != "stop" and pos.nonfinite_in_a_row < t.max_nonfinite:
        if fabric.is_global_zero:
            say(f"warning: {what}; skipped the update (trainer.on_nonfinite=skip)", error=True)
        return
    # Good checkpoints hold finite weights saved before this streak of non-finite steps (those saved during it
    # hold the weights that kept failing). After max_nonfinite skipped steps in a row the weights themselves fail
    # on every batch, so the ones saved just before the streak, which produced its first NaN, are not good
    # either (lr 1e12: finite weights of ~5e11 after step 1, NaN ever after). Only read when stopping.
    streak_start = pos.step - pos.nonfinite_in_a_row + 1
    weights_failed = not ruined and t.on_nonfinite != "stop" and pos.nonfinite_in_a_row >= t.max_nonfinite
    last_good = ckpt.last_good_checkpoint(run_dir, before_step=streak_start - 1 if weights_failed else streak_start)
    where = (f"the last good checkpoint is {last_good}" if last_good else
             "no checkpoint from before it (with finite weights) exists")
    if ruined:
        error = (f"{what}: the update made the parameters non-finite - the run has diverged; {where}. "
                 "Try a lower trainer.lr or trainer.grad_clip.")
    elif t.on_nonfinite == "stop":
        error = (f"{what}; stopping (trainer.on_nonfinite=stop). Parameters were not updated with it and {where}. "
                 "Try a lower trainer.lr, trainer.grad_clip, or trainer.on_nonfinite=skip.")
    else:
        error = (f"{what}: {pos.nonfinite_in_a_row} non-finite steps in a row (trainer.max_nonfinite) - the run "
                 f"has diverged; {where}. Try a lower trainer.lr.")
    if fabric.is_global_zero:
        write_summary(run_dir, {**tracker.summary(), "steps": pos.step, "status": "stopped", "error": error,
                                "loss": loss_name})
    raise NonFiniteLossError(error)


def _save(fabric, run_dir: Path, pos: Position, state: dict, keep_last: int) -> Path:
    state["rng"] = ckpt.rng_state()
    # Rank 0 writes the checkpoint, so it carries the skipped-sample count of all ranks.
    local = pos.skipped, pos.skipped_before
    pos.skipped, pos.skipped_before = 0, dist.sum_over_ranks(fabric, pos.skipped) + pos.skipped_before
    try:
        return ckpt.save_checkpoint(fabric, run_dir, pos.step, state, keep_last=keep_last)
    finally:
        pos.skipped, pos.skipped_before = local


class Timer:
    """Training throughput, excluding evaluation and checkpointing."""

    def __init__(self) -> None:
        self.samples, self.seconds, self._start = 0, 0.0, None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, samples: int) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.samples += samples
            self._start = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def _train_scalars(trainee, optimizer, out: StepOutput, timer: Timer, pos: Position, tracker) -> dict[str, float]:
    scalars = {"train/loss": out.loss, "train/lr": optimizer.param_groups[0]["lr"], "train/grad_norm": out.grad_norm,
               "train/samples_per_s": timer.samples_per_s, "train/epoch": pos.epoch,
               "train/nonfinite_steps": tracker.summary().get("stability/nonfinite_steps", 0)}
    if out.embeddings is not None:
        try:  # the loss's own diagnostics on this rank's (first micro-) batch; they must never stop a run
            values = trainee.loss.diagnostics(*out.embeddings.loss_args())
        except Exception as err:
            say(f"warning: loss.diagnostics failed: {err}", error=True)
            values = {}
        scalars.update({f"train/{k}": float(v) for k, v in values.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return scalars


def _progress(fabric, t: TrainerSettings, start: int):
    if not (fabric.is_global_zero and t.progress):
        return None

    return tqdm(total=t.max_steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
