"""The ``sweep:`` and ``recipe:`` sections, typed: every key, its default and what it means, in one place.

A sweep file (configs/sweep/<name>.yaml) and a recipe file (configs/recipe/<name>.yaml) start from these
defaults (their ``_base`` entry: configs/<group>/_base.yaml composes the node this module registers as
``<group>/_settings``) and set only what their study asks for; ``sweep.<key>=...`` and ``recipe.<key>=...`` on the
command line override any of them. The composed section becomes a frozen :class:`SweepSettings` or
:class:`RecipeSettings`, checked when it is built (one-line :class:`probloss.errors.ConfigError`, exit 2), and
the studies read its attributes (``settings.sampler``), never a default of their own.

A settings object also reads as the mapping it was built from (``settings["arms"]``): the report code takes
either one or a recipe.json read back from a finished recipe folder. :meth:`Section.of` builds one from a partial
mapping (a test's, or a recipe.json written before a key existed): the missing keys take the defaults here.

::

    sweep = SweepSettings.of({"space": {"trainer.lr": {"type": "float", "low": 1e-4, "high": 1e-1}}})
    sweep.sampler, sweep.n_trials, sweep.slurm.time_min      # "tpe", None, 240
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping

from hydra.core.config_store import ConfigStore

from probloss.checks import fail, unknown
from probloss.errors import ConfigError
from probloss.schema import defaults, setting

LAUNCHERS = ("local", "submitit")
SAMPLERS = ("tpe", "random", "nsga2", "grid")
PRUNERS = ("median", "hyperband", "none")
PARAM_TYPES = ("float", "int", "categorical")
DIRECTIONS = ("maximize", "minimize")


class Section(Mapping):
    """A frozen settings section that also reads as a mapping of its fields (``section["seeds"]``,
    ``section.get("baseline")``, ``{**section}``). Subclasses are frozen dataclasses; ``section`` is their config
    section (for messages)."""

    section: ClassVar[str] = ""

    def __getitem__(self, key: str) -> Any:
        if key not in self._fields():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields())

    def __len__(self) -> int:
        return len(self._fields())

    @classmethod
    def _fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, values: Mapping[str, Any] | "Section") -> "Section":
        """``values`` as settings: itself if it is one, else built from the mapping with the defaults of this class
        for missing keys; an unknown key is a ConfigError that lists the keys there are."""
        if isinstance(values, cls):
            return values
        values = dict(values)
        names = cls._fields()
        for key in values:
            if key not in names:
                raise ConfigError(unknown("config key", f"{cls.section}.{key}", list(names), cls.section,
                                          candidate=key))
        if "slurm" in values and not isinstance(values["slurm"], SlurmSettings):  # the one nested section
            values["slurm"] = SlurmSettings.of(values["slurm"] or {})
        return cls(**values)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every settable key with its default, as plain data: the Hydra node the config files start from."""
        return defaults(cls)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (nested sections too), for JSON."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SlurmSettings(Section):
    """``<section>.slurm.*``: the job array of ``<section>.launcher=submitit`` (pip install "probloss[cluster]")."""

    section: ClassVar[str] = "slurm"

    # null: Slurm (submitit picks it) | local | debug: submitit's local executors (tests)
    cluster: str | None = None
    # Slurm partition (null: the cluster's default)
    partition: str | None = None
    # each job's time limit (minutes)
    time_min: int = 240
    # GPUs per job (a run uses them through Fabric: set fabric.devices to match)
    gpus_per_node: int = 0
    # null: trainer.num_threads
    cpus_per_task: int | None = None
    # memory per job (null: the partition's default)
    mem_gb: float | None = None
    # jobs of the array running at once (null: all)
    array_parallelism: int | None = None
    # submitit's logs and pickles (null: <out_dir>/submitit for sweeps, <out_dir>/<recipe>/submitit for recipes)
    folder: str | None = None
    # wait for the jobs to finish (false: submit and return)
    wait: bool = True



@dataclass(frozen=True)
class SweepSettings(Section):
    """``sweep.*``: an Optuna study over training runs (probloss/studies/sweep.py), and where its workers run and
    how dead ones are found (probloss/studies/workers.py)."""

    section: ClassVar[str] = "sweep"

    # --- the search ---
    # trials to finish, complete or pruned (a dead worker's failed trial does not count; re-running the command
    # continues the study); null: the whole grid (sampler: grid only)
    n_trials: int | None = None
    # tpe | random | nsga2 | grid (every parameter categorical; each point once, in a seeded order)
    sampler: str = "tpe"
    # sampler seed: trial k samples with a seed made from it and k (parallel workers differ); a grid's order
    seed: int = 0
    # metric from summary.json: maximize | minimize (several: multi-objective, no pruning)
    objectives: list = field(default_factory=lambda: [{"metric": "val/zeroshot_top1", "direction": "maximize"}])
    # median | hyperband | none: reports the first objective at every evaluation
    pruner: str = "none"
    # evaluations before a trial may be pruned (median pruner)
    pruner_warmup_evals: int = 1
    # null: the loss= of the command (or train.yaml's default); a list: one study per loss in one storage
    losses: list | None = None
    # re-run the best configuration with these seeds after the search
    rerun_seeds: list = field(default_factory=list)
    # config key -> distribution {type: float|int|categorical, low, high, log, choices}; `losses: [...]` limits a
    # parameter to those losses
    space: dict = field(default_factory=dict)
    # training overrides for every trial
    overrides: list = field(default_factory=list)
    # loss name -> training overrides for that loss's trials only (e.g. where its log-std heads start:
    # {pcmepp: [model.init_log_std=-3.5]})
    loss_overrides: dict = field(default_factory=dict)

    # --- where the study lives and who runs it ---
    # null: <experiment>-<loss> (<experiment>-<sweep>-<loss> when experiment= names another experiment); a study
    # opened with another search space is an error
    study_name: str | None = None
    # null: journal file <out_dir>/sweeps/<experiment>.journal: workers on ONE machine (or on a shared file system
    # that supports locks) | postgresql://user@host/db: workers on MANY machines | sqlite:///path.db: one machine,
    # few workers (SQLite locks the whole file; concurrent writers time out) | a .journal path
    storage: str | None = None
    # worker processes started by this command: null = one per usable core divided by trainer.num_threads, at
    # most n_trials (one on a GPU); 1 = this process. More workers may join from other shells or machines by
    # running the same command
    workers: int | None = None
    # local: `workers` processes here | submitit: a Slurm job array of `workers` jobs
    launcher: str = "local"
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    # seconds between a running trial's heartbeats (Optuna's on RDB storages, a trial attribute on journal files)
    heartbeat_interval: int = 30
    # seconds without a heartbeat after which any live worker marks a RUNNING trial FAIL (its worker died); keep
    # it several heartbeats long. A worker on the same host as a journal file's dead worker fails its trial at
    # once (process id check)
    grace_period: int = 120

    def __post_init__(self) -> None:
        for key, spec in (self.space or {}).items():
            if not isinstance(spec, Mapping) or spec.get("type") not in PARAM_TYPES:
                got = spec.get("type") if isinstance(spec, Mapping) else spec
                fail(f"sweep space {key}: type must be one of {PARAM_TYPES}, got {got!r}")
        if not self.objectives:
            fail("give at least one sweep objective ({metric: ..., direction: maximize|minimize})")
        if len(self.objectives) > 1 and self.pruner != "none":
            fail("multi-objective studies cannot prune (Optuna); set sweep.pruner=none")
        if self.sampler not in SAMPLERS:
            fail(f"unknown sweep.sampler {self.sampler!r}; choose tpe, random, nsga2 or grid")
        if self.pruner not in PRUNERS:
            fail(f"unknown sweep.pruner {self.pruner!r}; choose median, hyperband or none")
        check_launcher(self.launcher, "sweep")


@dataclass(frozen=True)
class RecipeSettings(Section):
    """``recipe.*``: a grid of training runs, arms x seeds, and how the grid runs (probloss/studies/recipe.py: each
    arm x seed is a unit of work in an Optuna study; any number of workers -- this command's, the same command
    started again here or on other machines -- share it, every run is trained once, and the last worker writes
    the report once the grid is complete)."""

    section: ClassVar[str] = "recipe"

    # --- the grid ---
    # what the recipe asks, one paragraph (the report's first lines)
    description: str = ""
    # every arm runs once per seed (same seed: same data order and initial weights)
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    # training overrides shared by every run
    overrides: list = field(default_factory=list)
    # arm name -> list of training overrides (e.g. {sigmoid: [loss=sigmoid]})
    arms: dict = field(default_factory=dict)
    # extra evaluations of each final checkpoint: name -> overrides (e.g. eval.image_noise=0.2)
    evaluations: dict = field(default_factory=dict)
    # summary.json keys the report tabulates and plots (report test)
    metrics: list = field(default_factory=lambda: ["test/zeroshot_top1"])
    # numeric arms (e.g. batch sizes): the x axis label
    x_label: str | None = None
    # numeric arms: arm -> [line name, x value]
    x: dict | None = None
    # the arm others are compared with, seed by seed (null: the first arm); or a mapping arm -> its baseline arm
    # or list of arms (only those arms are compared)
    baseline: Any = None
    # metric -> a fixed value (e.g. chance: {test/unc/planted_auroc: 0.5}): every arm is also compared with it seed
    # by seed (arm - value, the same paired t: a one-sample test); the row's baseline reads "constant 0.5", and a
    # primary entry names it so
    constants: dict | None = field(default_factory=dict)
    # metric -> its chance level (e.g. {test/zeroshot_top1: 0.025}): a dashed line in its plot (a metric in
    # constants gets one too)
    chance: dict | None = field(default_factory=dict)
    # the recipe's few primary comparisons, declared before it runs: at most 8 {arm, baseline, metric} (a compared
    # pair and a reported metric). They keep the interval's verdict; every other comparison is Holm-adjusted over
    # the recipe's others (comparisons.json: p, p_adjusted, primary)
    primary: list | None = field(default_factory=list)
    # each arm's trainer.lr: null = what the arm's overrides (or the training config) say | a mapping {arm or loss
    # name: lr} | a finished learning-rate sweep: its per-trial table (docs/results/lr_select/trials.json, or the
    # sweep folder) or Optuna journal, each arm taking its loss's val-best rate there. trainer.lr in an arm, the
    # shared overrides or the command line wins. recipe.json records each arm's rate and its source
    # (learning_rates_used); recipe.md prints them
    learning_rates: Any = None
    # each run generates its data from its seed (data.gen_seed=<seed>: samples, val/test sets, held-out
    # combinations), so intervals include data sampling; arms stay paired (seed s: the same draw in every arm).
    # Not applied where the recipe, an arm or the command line sets data.gen_seed, or for data without a
    # generator (webdataset). Each draw is generated once into data.cache_dir (its time: docs/performance.md);
    # a finished run of another draw is refused, not reused. false: the data config's one draw for all seeds
    vary_data: bool = True

    # --- how the grid runs ---
    # worker processes started by this command: null = one per usable core divided by trainer.num_threads, at
    # most one per run (one on a GPU); 1 = this process
    workers: int | None = None
    # local: `workers` processes here | submitit: a Slurm job array of `workers` jobs
    launcher: str = "local"
    # the queue: null = journal file <out_dir>/<recipe>/queue.journal (one machine, or a shared file system with
    # locks) | postgresql://user@host/db (workers on many machines)
    storage: str | None = None
    # true: no training; write results.json, comparisons.json, recipe.md from the runs that are complete
    report_only: bool = False
    # seconds between a running cell's heartbeats
    heartbeat_interval: int = 30
    # seconds without a heartbeat after which a live worker takes the cell over (resumed from its newest
    # checkpoint, if any); a dead process on this host: at once
    grace_period: int = 120
    slurm: SlurmSettings = field(default_factory=SlurmSettings)

    # filled by load_recipe, not a config key: {arm: {"lr", "source"}} (recipe.json records it)
    learning_rates_used: dict = setting(factory=dict, node=False)

    def __post_init__(self) -> None:
        check_launcher(self.launcher, "recipe")


def check_launcher(launcher: Any, section: str) -> None:
    if launcher not in LAUNCHERS:
        raise ConfigError(f"unknown {section}.launcher {launcher!r}; choose {' or '.join(LAUNCHERS)}")


def register() -> None:
    """Register the defaults as the Hydra config nodes ``sweep/_settings`` and ``recipe/_settings`` (what
    configs/sweep/_base.yaml and configs/recipe/_base.yaml start from). Plain data, not typed structured configs:
    a recipe's ``arms`` or a sweep's ``space`` given whole on the command line replaces the file's, and the
    composed config is checked key by key like the training config's (probloss/training/config.py)."""
    store = ConfigStore.instance()
    store.store(group="sweep", name="_settings", node=SweepSettings.defaults())
    store.store(group="recipe", name="_settings", node=RecipeSettings.defaults())


register()
