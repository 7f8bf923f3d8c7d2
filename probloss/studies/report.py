"""The sweep report: an experiment's Optuna studies and run folders -> report.md with its tables, PNG plots and the
per-trial table trials.json.

    python scripts/report.py runs/compare_losses       # reads runs/sweeps/compare_losses.journal + run folders

Per loss: trials (complete, pruned, failed), best and median accuracy over trials, fraction diverged, the
LR-robust width, and, over the seed re-runs of the best configuration (the ``<study>-best`` study), every
embedding-space and uncertainty metric as mean and 95% interval (Student t), clipped to the metric's range, with
the seeds whose value is missing or non-finite (diverged) counted in the cell, never silently dropped. For a
grid over seeds, the LR-robust width against the loss's own best and against the best of all losses, each with a
bootstrap interval over seeds, the paired width difference against a baseline with its verdict, and the test
zero-shot accuracy at the learning rate chosen on val, and the fraction of the best val score kept at 3x and 10x
the best learning rate with the same bootstrap. Plots: accuracy vs learning rate, the best trials' loss curves,
effective rank over training, and text sigma vs caption specificity level.

Where each part lives: the studies are read by probloss/studies/readers.py, every number is computed by
probloss/studies/stats.py (``summarise``), the page and plots are drawn by probloss/studies/render.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from probloss.studies.readers import TRIAL_TABLE, sweep_studies, trial_table
from probloss.studies.render import report_lines, sweep_plots
from probloss.studies.stats import summarise


def write_report(experiment_dir: str | Path, storage=None) -> Path:
    """Write ``<experiment_dir>/report.md``, its PNGs and the per-trial table ``trials.json``; returns the report's
    path."""
    experiment_dir = Path(experiment_dir)
    studies = sweep_studies(experiment_dir, storage)
    rows = summarise(studies)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    (experiment_dir / TRIAL_TABLE).write_text(json.dumps(trial_table(studies), indent=1) + "\n")
    plots = sweep_plots(rows, experiment_dir)
    lines = report_lines(experiment_dir.name, rows) + [""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = experiment_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
