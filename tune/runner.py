"""The search stage: config file -> Tune (Optuna TPE + ASHA) over the core trainer -> results/<experiment>/.

Everything that can be wrong with the input (config, data, results directory) is checked
before anything is written or Ray starts. Outputs:

  results/<experiment>/leaderboard.csv       one row per trial, best first (rewritten as trials end)
  results/<experiment>/best_configs.yaml     the top search.top_k configs: the k-fold's typed input (training/handoff.py)
  results/<experiment>/search_state.json     settings, status and MLflow ids; what `--resume` needs (tune/resume.py)
  results/<experiment>/trial_endings.json    how each trial ended, as Tune ended it
  results/<experiment>/optuna_study.log      the Optuna study (journal storage), reloaded by `--resume`
  results/<experiment>/mlflow_outbox.jsonl   MLflow logging not yet sent (training/infra/tracking.py)
  results/<experiment>/tune/                 Tune's experiment dir (checkpoints) unless SEGTUNE_STORAGE

The results root is $SEGTUNE_RESULTS (default <repo>/results). On a cluster, set
SEGTUNE_STORAGE to shared storage: Tune's storage_path becomes $SEGTUNE_STORAGE/<experiment>.
One search runs per experiment at a time (training/infra/locks.py).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from training.config import SearchConfig, SearchSpace, load_space
from training.errors import ConfigError, SegtuneError
from training.infra import compat
from training.infra import lineage as tags
from training.infra.fs import check_writable, results_root
from training.infra.lineage import Lineage, new_stage_id
from training.infra.locks import StageLock
from training.infra.ray import RaySession, connect, error_line, fit_resources
from training.infra.tracking import check_store, close_tracker, default_tracking_uri, flatten, open_tracker
from tune import resume
from tune.resume import SearchState

TUNE_DIR = "tune"  # Tune's experiment directory name under results/<experiment>/ (local storage)
OUTBOX = "mlflow_outbox.jsonl"
Log = Callable[[str], None]


@dataclass
class SearchOptions:
    space: str
    data: str | None = None
    experiment: str | None = None
    num_samples: int | None = None
    resume: bool = False
    smoke: bool = False
    mlflow_uri: str | None = None
    address: str | None = None
    retry_errored: bool = False
    max_trial_cost: float | None = None  # seconds; overrides search.max_trial_cost
    top_k_method: str | None = None  # search.top_k_method: auto | individual | diverse (tune/diversity.py)
    overrides: dict[str, Any] = field(default_factory=dict)  # extra {dotted key: value}, e.g. data.subset
    num_cpus: int | None = None  # local Ray only (default: all cores)
    ray_temp_dir: str | None = None  # local Ray only
    verbose: int = 1


@dataclass
class SearchOutcome:
    experiment: str
    results_dir: Path
    tune_path: str
    records: list
    interrupted: bool
    leaderboard: Path
    best_configs: Path | None
    mlflow_tracking_uri: str
    mlflow_experiment_id: str | None
    parent_run_id: str | None
    seconds: float  # the whole call: checks, data, MLflow, Ray start, search, results
    ray_start_seconds: float
    fit_seconds: float  # Tune's loop only


@dataclass
class SearchSession:
    """One run of the search stage: what it searches, where it writes, the services it uses."""

    experiment: str
    results_dir: Path
    space: SearchSpace
    smoke: bool
    overrides: dict[str, Any]
    state: SearchState
    data: Any = None
    lineage: Lineage | None = None
    ray: RaySession | None = None
    ended: dict[str, dict] = field(default_factory=dict)  # trials that ended in an earlier session
    abandoned: SearchState | None = None  # an earlier start that never scheduled a trial (its parent run is closed FAILED)
    ray_seconds: float = 0.0
    fit_seconds: float = 0.0

    @property
    def tune_path(self) -> str:
        return self.state.data["tune_path"]

    @property
    def parent(self) -> str:
        return self.lineage.key("search")


def cli_overrides(opts: SearchOptions) -> dict[str, Any]:
    """{dotted key: value} the command line sets over the config file."""
    overrides = dict(opts.overrides)
    if opts.data:
        overrides["data.root"] = str(Path(opts.data).resolve())
    if opts.num_samples:
        overrides["search.num_samples"] = opts.num_samples
    if opts.max_trial_cost is not None:
        if not opts.max_trial_cost > 0:  # also NaN
            raise ConfigError(f"--max-trial-cost: {opts.max_trial_cost:g} is not a budget; give the seconds one trial may cost (> 0)")
        overrides["search.max_trial_cost"] = opts.max_trial_cost
    if opts.top_k_method:
        overrides["search.top_k_method"] = opts.top_k_method
    return overrides


def load_checked_space(name: str, smoke: bool, overrides: dict[str, Any]) -> SearchSpace:
    """The space, validated; with --smoke the main config's search settings are checked too."""
    from tune.checks import check_search

    space = load_space(name, smoke=smoke, overrides=overrides)
    if getattr(space, "main", None) is not None:
        check_search(space.main)
    check_search(space)
    return space


def run_search(opts: SearchOptions, log: Log = print) -> SearchOutcome:
    """Run (or resume) a search; returns what it wrote. Raises SegtuneError for bad input."""
    started = time.perf_counter()
    if opts.experiment and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", opts.experiment):
        raise SegtuneError(f"--experiment {opts.experiment!r}: use letters, digits, '.', '_' and '-' only")
    if opts.resume and not opts.experiment:
        raise SegtuneError(f"--resume needs --experiment NAME (a directory under {results_root()})")
    space = None if opts.resume else load_checked_space(opts.space, opts.smoke, cli_overrides(opts))
    experiment = opts.experiment or f"{space.defaults.name}{'-smoke' if opts.smoke else ''}-{datetime.now():%Y%m%d-%H%M%S}"
    check_writable(results_root(), "set SEGTUNE_RESULTS to a writable directory")
    results_dir = results_root() / experiment
    with StageLock(results_dir, "search"):
        session = open_session(opts, experiment, results_dir, space, log)
        try:
            start_ray(session, opts, log)  # before MLflow: the workers' imports overlap the parent run's set-up
            open_lineage(session, opts, log)
            run_tune(session, opts, log)
            session.ray.close()
            outcome = finish(session, log)
        except BaseException as err:
            if SearchState.read(results_dir).never_started:
                fail_start(session, err, log)
            raise
        finally:
            if session.lineage is not None:
                close_tracker(session.lineage.tracker)
            if session.ray is not None:
                session.ray.close()
    outcome.seconds = time.perf_counter() - started
    return outcome


def stored_settings(state: SearchState):
    """(space, smoke, overrides) a search was started with."""
    overrides = dict(state.data["overrides"])
    return load_checked_space(state.data["space"], state.data["smoke"], overrides), state.data["smoke"], overrides


def settings_for(opts: SearchOptions, state: SearchState | None, space: SearchSpace | None, results_dir: Path, log: Log):
    """(space, smoke, overrides) of this run, refusing to mix into another search or to resume what is not there."""
    if state is not None and state.never_started:
        # nothing to continue: --resume starts it over with the settings it was started with
        return stored_settings(state) if opts.resume else (space, opts.smoke, cli_overrides(opts))
    if not opts.resume:
        if state is not None:
            raise SegtuneError(f"{results_dir}: already holds a {state.status} search; pass --resume to continue it or choose another --experiment")
        return space, opts.smoke, cli_overrides(opts)
    if state is None:
        raise SegtuneError(f"{results_dir / resume.STATE_FILE}: no such search to resume (the experiment name is the directory under {results_dir.parent})")
    if opts.data or opts.num_samples or opts.overrides or opts.max_trial_cost is not None or opts.top_k_method or (opts.smoke and not state.data["smoke"]):
        log("note: a resumed search keeps the settings it started with; ignoring --data/--num-samples/--max-trial-cost/--smoke/--top-k-method")
    return stored_settings(state)


def open_session(opts: SearchOptions, experiment: str, results_dir: Path, space: SearchSpace | None, log: Log) -> SearchSession:
    """Settings decided and validated, data prepared, then (only then) the state file written as `starting`."""
    from training.data.dataset import prepare_data

    previous = SearchState.read(results_dir)
    space, smoke, overrides = settings_for(opts, previous, space, results_dir, log)
    continuing = opts.resume and previous is not None and not previous.never_started
    uri = opts.mlflow_uri or (previous.data["mlflow"]["tracking_uri"] if opts.resume and previous else default_tracking_uri())
    check_store(uri)
    data = prepare_data(space.defaults, log=log)  # validates the data and builds the mask cache, once
    abandoned = previous if previous is not None and previous.never_started else None
    if abandoned is not None:
        resume.clear_failed_start(abandoned, log)
    state = previous if continuing else new_state(uri, experiment, results_dir, space, smoke, overrides, data)
    if continuing:
        if "stage_id" not in state.data:
            raise SegtuneError(f"{state.path}: written by an older segtune (no stage_id), which this version cannot resume; "
                               "start a new search under another --experiment")
        resume.check_tune_state(state.data["tune_path"])
        state.data["resume"] = {"trials_before": len(resume.restored_trials(state.data["tune_path"]))}
    state.data["sessions"].append({"started": resume.now(), "resume": continuing, "pid": os.getpid()})
    results_dir.mkdir(parents=True, exist_ok=True)
    state.save(status=state.status if continuing else resume.STARTING)
    return SearchSession(experiment, results_dir, space, smoke, overrides, state, data, abandoned=abandoned)


# What a trial's worker imports before it takes work: the trainable, and matplotlib (imported at a
# trial's first best epoch otherwise, 0.4 s measured). Named, not imported here: the driver needs
# no matplotlib before the end, and importing it would delay Ray's start by those 0.4 s.
WORKER_PRELOAD = ("tune.trainable", "training.evaluation.plots")


def start_ray(session: SearchSession, opts: SearchOptions, log: Log) -> None:
    """Ray, once the settings and data are checked (a refusal never starts it): a local Ray's idle
    workers start importing the trainer (seconds of torch/smp imports) as Ray comes up, while the
    driver opens the MLflow parent run and sets Tune up, before Tune asks for them."""
    started = time.perf_counter()
    session.ray = connect(opts.address, opts.num_cpus, opts.ray_temp_dir, log, preload=WORKER_PRELOAD,
                          workers=local_trial_slots(session.space.defaults.search, opts.num_cpus or os.cpu_count() or 1))
    session.ray_seconds = time.perf_counter() - started


def local_trial_slots(search: SearchConfig, cpus: int) -> int:
    """How many trials a local Ray of `cpus` CPUs runs at once (fit_resources shrinks a trial to the machine)."""
    per_trial = min(search.resources.cpu, cpus)  # resources.cpu > 0 (config)
    return max(1, min(search.max_concurrent, search.num_samples, int(cpus // per_trial)))


def new_state(uri: str, experiment: str, results_dir: Path, space: SearchSpace, smoke: bool, overrides: dict, data) -> SearchState:
    if os.environ.get("SEGTUNE_STORAGE"):
        storage_path, tune_name = os.environ["SEGTUNE_STORAGE"], experiment
    else:
        storage_path, tune_name = str(results_dir), TUNE_DIR
    return SearchState(results_dir / resume.STATE_FILE, {
        "experiment": experiment, "space": space.source, "smoke": smoke, "overrides": overrides,
        "data_root": space.defaults.data.root, "storage_path": storage_path, "tune_name": tune_name,
        "tune_path": f"{storage_path.rstrip('/')}/{tune_name}",
        "fold_manifest": str(data.manifest.path) if data.manifest.path else None, "stage_id": new_stage_id(),
        "mlflow": {"tracking_uri": uri, "outbox": OUTBOX, "experiment_id": None, "parent_run_id": None},
        "resume": {"trials_before": 0}, "status": resume.STARTING, "sessions": [],
    })


def open_lineage(session: SearchSession, opts: SearchOptions, log: Log) -> None:
    """The MLflow parent run (created once, found again on resume) and the ids in the state file."""
    mlflow = session.state.data["mlflow"]
    if opts.mlflow_uri:  # a resumed search may log to another store than its first session
        mlflow["tracking_uri"] = opts.mlflow_uri
    tracker = open_tracker(mlflow["tracking_uri"], session.results_dir / OUTBOX, log)
    session.lineage = Lineage(tracker, session.experiment, session.state.data["stage_id"])
    if session.abandoned is not None:  # its parent run, if it got one, is closed with the reason
        old = Lineage(tracker, session.experiment, session.abandoned.data["stage_id"]).key("search")
        if tracker.knows(old) and not tracker.ended(old):
            tracker.set_tags(old, {"segtune.failure": session.abandoned.data.get("failure") or "killed during start-up"})
            tracker.end_run(old, "FAILED")
    run_tags = {"segtune.space": session.space.source, "segtune.smoke": session.smoke, tags.RESULTS_DIR: session.results_dir}
    if session.lineage.run(session.parent, f"search-{session.experiment}", "search", run_tags):
        cfg = session.space.defaults
        tracker.log_params(session.parent, {**flatten({"search": cfg.search.model_dump(mode="json")}), "space": session.space.source, "data.root": cfg.data.root})
        tracker.log_text(session.parent, Path(session.space.source).read_text(encoding="utf-8"), "space.yaml")
        session.lineage.log_environment(session.parent)
    if tracker.available:
        tracker.flush(10)  # the ids, for the state file (read by users and tests while the search runs)
    mlflow.update(experiment_id=tracker.experiments.get(session.experiment) or mlflow.get("experiment_id"),
                  parent_run_id=tracker.run_id(session.parent) or mlflow.get("parent_run_id"))
    session.state.save()


def fail_start(session: SearchSession, err: BaseException, log: Log) -> None:
    """A search that never scheduled a trial: its parent run closed FAILED with the reason; a plain rerun starts over."""
    reason = "interrupted" if isinstance(err, KeyboardInterrupt) else error_line(err)
    session.state.save(status=resume.FAILED_START, failure=reason)
    if session.lineage is not None:
        session.lineage.tracker.set_tags(session.parent, {"segtune.failure": reason[:4000]})
        session.lineage.tracker.end_run(session.parent, "FAILED")
    log(f"search {session.experiment} did not start ({reason}); nothing was trained: run the same command again to start over")


def tune_environment() -> None:
    compat.tune_actors_take_prestarted_workers()
    compat.tune_ignores_failures_of_a_replaced_actor()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output engine ignores CLIReporter
    # num_to_keep snapshots the experiment state at every checkpoint, on purpose (resume
    # loses at most the running epoch); Tune warns about that each time.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune saves its experiment state (trial statuses, which checkpoint is the latest) at
    # most every 10 s by default; a resume continues running trials from the checkpoint that
    # state names, so a driver killed up to 10 s after a save retrains those epochs. Every
    # 2 s narrows that; saving at every controller step (10 Hz) would cost ~7% of a core
    # and, at ~40 KB of state per trial, megabytes a second. Trials that had *ended* are
    # never retrained whatever the timing: see tune/resume.py.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")


def run_tune(session: SearchSession, opts: SearchOptions, log: Log) -> None:
    """Tune's loop (new, or restored from its saved state) on the session's Ray."""
    from ray import tune

    from tune.trainable import train_trial
    from tune.tuner import new_tuner, reload_study

    tune_environment()
    continuing = session.state.data["sessions"][-1]["resume"]
    if continuing:
        session.ended = resume.read_endings(session.results_dir)
        if opts.retry_errored:
            session.ended = {k: v for k, v in session.ended.items() if not v["status"].startswith("error")}
    res = session.space.defaults.search.resources
    resources = fit_resources(res.cpu, res.gpu, session.ray, log, "trials")
    trainable = tune.with_resources(tune.with_parameters(train_trial, space=session.space, data=session.data, ended=session.ended,
                                                          tune_path=session.tune_path),
                                    {"cpu": resources[0], "gpu": resources[1]})
    if continuing:
        trials = resume.restored_trials(session.tune_path)
        resume.restore_missing_checkpoints(trials, log)
        reload_study(session, trials, log)
        log(f"resuming {session.experiment} from {session.tune_path} ({session.state.data['resume']['trials_before']} trials so far; "
            f"errored trials {'retried' if opts.retry_errored else 'kept'})")
        tuner = tune.Tuner.restore(session.tune_path, trainable=trainable, resume_unfinished=True, resume_errored=opts.retry_errored, restart_errored=False)
    else:
        cfg = session.space.defaults
        budget = f", trials projected over {cfg.search.max_trial_cost:g} s skipped" if cfg.search.max_trial_cost else ""
        log(f"search {session.experiment}: {cfg.search.num_samples} trials, {cfg.search.algorithm} + {cfg.search.scheduler.name}{budget}, "
            f"results in {session.results_dir}")
        tuner = new_tuner(session, trainable)
    fit_started = time.perf_counter()
    tuner.fit()
    session.fit_seconds = time.perf_counter() - fit_started
    if SearchState.read(session.results_dir).never_started:
        # Tune takes Ctrl-C itself (it ends its loop and returns): stopped before a first trial was
        # scheduled, the search never started; run_search closes it as such, like a Ctrl-C before fit().
        raise KeyboardInterrupt


def finish(session: SearchSession, log: Log) -> SearchOutcome:
    """Leaderboard, best configs (finished searches only), parent run, importances; the state's final status."""
    from tune.report import write_results

    outcome = SearchOutcome(
        experiment=session.experiment, results_dir=session.results_dir, tune_path=session.tune_path, records=[], interrupted=False,
        leaderboard=session.results_dir / "leaderboard.csv", best_configs=None, mlflow_tracking_uri=session.lineage.tracker.uri,
        mlflow_experiment_id=None, parent_run_id=None, seconds=0.0, ray_start_seconds=session.ray_seconds, fit_seconds=session.fit_seconds,
    )
    write_results(session, outcome, log)
    return outcome


def sync_mlflow(experiment: str | None, mlflow_uri: str | None, log: Log = print) -> int:
    """`--sync-mlflow`: send what earlier sessions of the search left unsent; returns the calls still unsent."""
    from training.infra.tracking import sync_outbox

    if not experiment:
        raise SegtuneError("--sync-mlflow needs --experiment NAME")
    results_dir = results_root() / experiment
    state = SearchState.read(results_dir)
    if state is None:
        raise SegtuneError(f"{results_dir / resume.STATE_FILE}: no such search")
    with StageLock(results_dir, "search --sync-mlflow"):
        return sync_outbox(results_dir / OUTBOX, mlflow_uri or state.data["mlflow"]["tracking_uri"], log)
