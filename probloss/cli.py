"""The ``probloss`` command: one grammar for train, sweep, recipe, make-data, evaluate and report.

::

    probloss train loss=gaussian_var trainer.max_steps=500
    probloss sweep sweep=lr loss=sigmoid
    probloss recipe recipe=proposal
    probloss make-data out=data/shapes train_size=50000 val_size=2000
    probloss evaluate checkpoint=runs/default/gaussian_var/<run>/checkpoints/step-00000500.ckpt
    probloss report runs/proposal
    probloss <command> --help          # the command's groups, choices and defaults

Every command but ``report`` takes Hydra ``key=value`` overrides composed with ``configs/<config>.yaml``
(probloss.training.config): the same unknown-key and unknown-choice errors with suggestions, the same ``--help`` and the
same exit status: 0 on success, 2 for a bad config or bad data (one line, no traceback), 1 when training stops
on a non-finite loss or a write fails (disk full: one line naming the path and the OS error), 143 / 130 when
SIGTERM / SIGINT stopped it (one line: the step, the checkpoint saved there and the command that resumes it).
``scripts/<command>.py`` are thin wrappers of the same commands, for ``fabric run`` (``fabric run --devices=2
scripts/train.py loss=sigmoid``), which launches a script file.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import OmegaConf

from probloss import dist
from probloss.data.settings import MakeDataSettings
from probloss.data.shards import write_shapes_shards
from probloss.data.trust import trust_command_line
from probloss.errors import ConfigError, DataError, NonFiniteLossError, Preempted
from probloss.schema import build
from probloss.studies.findings import findings, page_multiplicity, publish
from probloss.studies.recipe import render_recipe
from probloss.studies.render import instrument_tables
from probloss.studies.report import write_report
from probloss.training.config import compose_config, describe

# command -> (module:function taking the argument list, primary config (None: own arguments), usage)
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "train": ("probloss.training.loop:main", "train", """Train a dual encoder with a contrastive loss.

    probloss train loss=gaussian_var                       # one process
    fabric run scripts/train.py loss=gaussian_var          # the same through Fabric's launcher
    OMP_NUM_THREADS=1 fabric run --devices=2 scripts/train.py loss=sigmoid trainer.max_steps=100"""),
    "sweep": ("probloss.studies.sweep:main", "sweep", """Optuna studies over training runs (probloss/studies/sweep.py).

    probloss sweep sweep=lr loss=sigmoid [sweep.n_trials=..] [training overrides]
    probloss sweep sweep=lr loss=sigmoid sweep.storage=postgresql://user@host/db   # workers on many machines
    probloss sweep sweep=lr loss=sigmoid sweep.workers=4               # four local workers (default: one per core)
    OMP_NUM_THREADS=1 fabric run --devices=2 --main-port=29501 scripts/sweep.py sweep=lr loss=infonce"""),
    "recipe": ("probloss.studies.recipe:run_recipe", "recipe", """Run a recipe: arms x seeds, paired comparisons.

The report (recipe.md, results.json, comparisons.json, plots) is written into the recipe's folder
(probloss/studies/recipe.py).

    probloss recipe recipe=proposal
    probloss recipe recipe=bias_init recipe.seeds=[0] trainer.max_steps=50   # a quick look
    probloss recipe recipe=proposal recipe.workers=2        # two local workers (default: one per core)
    probloss recipe recipe=proposal recipe.launcher=submitit recipe.workers=16 recipe.slurm.partition=cpu"""),
    "make-data": ("probloss.cli:make_data_command", "make_data", """Generate the built-in shapes data as webdataset shards.

The shards are written by probloss/data/shards.py.

    probloss make-data out=data/shapes train_size=50000 val_size=2000 [seed=0 image_size=32 ...]

Writes out/train/*.tar, out/val/*.tar, out/test/*.tar ({key}.png, {key}.txt, {key}.json), classes.json and
splits.json; prints the brace patterns for data.train_shards / data.val_shards / data.test_shards."""),
    "evaluate": ("probloss.training.evaluation:evaluate_command", "evaluate", """Evaluate a checkpoint, print its metrics.

It reads the run's val and test data, or the shards the overrides name.

    probloss evaluate checkpoint=runs/default/gaussian_var/<run>/checkpoints/step-00000500.ckpt
    probloss evaluate checkpoint=<ckpt> "data.val_shards='/data/val/{00000..00003}.tar'"

Writes <run>/eval-step-<step>.json next to the checkpoints folder. Every other key=value changes the config
saved in the checkpoint (e.g. data.val_shards, data.classnames or eval.max_samples), checked like training's.

    probloss evaluate checkpoint=<ckpt> benchmark=[karpathy,eccv_caption] benchmark.karpathy.annotations=...

benchmark=[...] scores the checkpoint on the field's benchmarks instead (karpathy, eccv_caption, cxc, wds,
folder; configs/benchmark/*.yaml, docs/benchmarks.md) and writes <ckpt>.benchmarks.json."""),
    "report": ("probloss.cli:report_command", None, """Write the report page and plots of a sweep or recipe.

No training: it reads a finished sweep's storage or a recipe's results files.

    probloss report runs/compare_losses [--storage postgresql://...]   # sweep -> report.md
    probloss report runs/batch_size            # recipe -> recipe.md + comparisons.json
    probloss report --findings runs            # every recipe under runs/ -> a Findings page on stdout
    probloss report runs/proposal --publish docs/results/proposal   # the files --findings docs/results reads
    probloss report --multiplicity docs/findings.md   # how many of a page's comparisons survive Holm
    probloss report --instruments runs/instruments    # every run's instruments beside their trivial cues

A folder with results.json is a recipe (probloss/studies/recipe.py); any other is a sweep, read from its Optuna
storage (probloss/studies/report.py). --findings reads only results.json + recipe.json of each recipe folder."""),
}


# Old command names -> new ones (0.2: `experiment` ran recipes, but "experiment" is also the key that groups run
# folders, out_dir/<experiment>/...).
RENAMED = {"experiment": "recipe"}


def main(argv: Sequence[str] | None = None) -> None:
    """``probloss <command> [arguments]`` (the console script; see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name in RENAMED:  # refused for one release, with the new spelling
        print(f"probloss: the command {name!r} is now {RENAMED[name]!r}: probloss {RENAMED[name]} "
              f"{shlex.join(rest) or '...'}", file=sys.stderr)
        sys.exit(2)
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"probloss: unknown command {name!r}.{hint} Commands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    target, config_name, usage = COMMANDS[name]
    module, function = target.split(":")
    command = getattr(importlib.import_module(module), function)
    if config_name is None:
        command(rest)
    else:
        run_command(command, config_name, usage, rest)


def _usage() -> str:
    lines = [__doc__.strip(), "", "commands:"]
    lines += [f"  {name:11s} {usage.splitlines()[0]}" for name, (_, _, usage) in COMMANDS.items()]
    return "\n".join(lines)


def run_command(command: Callable[[list[str]], Any], config_name: str, usage: str, argv: Sequence[str]) -> None:
    """Call ``command(argv)``: ``--help``, one-line errors and exit codes (see the module docstring)."""

    argv = list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage.strip() + "\n\n" + describe(config_name))
        sys.exit(0)
    trust_command_line(argv)  # the only source of shard URLs that run a command (probloss/data/trust.py)
    try:
        command(argv)
    except (ConfigError, FileNotFoundError) as err:  # bad config or missing data: one line, no traceback
        print(f"config error: {err}", file=sys.stderr)
        _exit(2)
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        _exit(2)
    except NonFiniteLossError as err:
        print(f"training stopped: {err}", file=sys.stderr)
        _exit(1)
    except Preempted as err:
        print(f"stopped by {err}; resume with: {resume_command(config_name, argv, err)}", file=sys.stderr, flush=True)
        _exit(err.exit_code)
    except OSError as err:  # a failed write (disk full, file-size limit, read-only folder): the path and the reason
        print(f"write error: {err}" if err.filename is None else
              f"write error: {err.filename}: [Errno {err.errno}] {err.strerror}", file=sys.stderr, flush=True)
        _exit(1)


def _exit(code: int) -> None:
    """Exit with ``code``; a rank of a multi-process run leaves without the interpreter's teardown
    (probloss.dist.leave: gloo can deadlock there)."""
    dist.leave(code)
    sys.exit(code)


def resume_command(config_name: str, argv: Sequence[str], stop) -> str:
    """The command that continues a stopped command: ``resume=<run folder>`` for a training run (it rebuilds the
    run from its config.yaml), the same command line for a recipe or sweep (they resume their runs)."""
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else None
    program = [os.path.basename(sys.executable), script] if script else \
        ["probloss", {"make_data": "make-data"}.get(config_name, config_name)]
    if config_name == "train" and stop.run_dir is not None and stop.checkpoint is not None:
        return shlex.join([*program, f"resume={stop.run_dir}"])
    return shlex.join([*program, *argv])


def make_data_command(argv: Sequence[str]) -> dict[str, str]:
    """``probloss make-data out=<dir> train_size=<n> val_size=<m> [test_size=<k> heldout_combos=8 ...]``
    (configs/make_data.yaml); prints the shard patterns as JSON."""
    settings = build(MakeDataSettings, OmegaConf.to_container(compose_config(argv, config_name="make_data")),
                     "make_data")
    patterns = write_shapes_shards(settings.out, **settings.shard_kwargs())
    print(json.dumps(patterns))
    return patterns


def report_command(argv: Sequence[str]) -> None:
    """``probloss report <folder> [--storage URL] [--findings]``."""
    parser = argparse.ArgumentParser(prog="probloss report", description=COMMANDS["report"][2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="<out_dir>/<recipe or sweep name>, or with --findings <out_dir>, or with "
                                       "--multiplicity a rendered page")
    parser.add_argument("--storage", default=None, help="a sweep's storage (default: <out_dir>/sweeps/<name>.journal)")
    parser.add_argument("--findings", action="store_true",
                        help="print a markdown Findings page of every recipe folder under the folder")
    parser.add_argument("--multiplicity", action="store_true",
                        help="the folder is a rendered page (findings.md, recipe.md): print how many of its "
                             "comparisons survive Holm's adjustment, p derived from each printed interval")
    parser.add_argument("--publish", metavar="DEST", default=None,
                        help="copy a finished recipe's (slimmed) results or a sweep's per-trial table into DEST "
                             "(e.g. docs/results/<name>), which --findings then reads")
    parser.add_argument("--instruments", action="store_true",
                        help="print the specificity and uncertainty instruments of every summary.json under the "
                             "folder beside what the trivial cues and training-free baselines score")
    args = parser.parse_args(list(argv))
    try:
        if args.instruments:
            summaries = {str(p.parent.relative_to(args.folder)): json.loads(p.read_text())
                         for p in sorted(Path(args.folder).rglob("summary.json"))}
            if not summaries:
                raise FileNotFoundError(f"no summary.json under {args.folder}")
            print(instrument_tables(summaries))
            return
        if args.multiplicity:
            if not Path(args.folder).is_file():
                raise FileNotFoundError(f"{args.folder} is not a file (a rendered findings page or recipe.md)")
            print(page_multiplicity(Path(args.folder).read_text()))
            return
        if args.findings:
            if not Path(args.folder).is_dir():
                raise FileNotFoundError(f"{args.folder} is not a folder")
            print(findings(args.folder))
            return
        if args.publish:
            path = publish(args.folder, args.publish)
        elif (Path(args.folder) / "results.json").is_file():
            path = render_recipe(args.folder)
        else:
            path = write_report(args.folder, storage=args.storage)
    except (FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")
