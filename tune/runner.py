"""The search: config file -> Tune (Optuna TPE + ASHA) over the core trainer -> results/<experiment>/.

Everything that can be wrong with the input (config, data, results directory) is checked
before Ray starts. Outputs:

  results/<experiment>/leaderboard.csv     one row per trial, best first (rewritten as trials end)
  results/<experiment>/best_configs.yaml   the top search.top_k configs: the k-fold stage's input
  results/<experiment>/search_state.json   what `--resume` needs (paths, MLflow ids, sessions)
  results/<experiment>/trial_endings.json  how each trial ended, as Tune ended it (tune/endings.py)
  results/<experiment>/tune/               Tune's experiment dir (checkpoints) unless SEGTUNE_STORAGE

The results root is $SEGTUNE_RESULTS (default <repo>/results). On a cluster, set
SEGTUNE_STORAGE to shared storage: Tune's storage_path becomes $SEGTUNE_STORAGE/<experiment>.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from training.config import REPO_ROOT, SearchSpace, load_space
from training.errors import ConfigError, SegtuneError
from training.tracking import Tracker, default_tracking_uri, flatten

STATE_FILE = "search_state.json"
TUNE_DIR = "tune"  # Tune's experiment directory name under results/<experiment>/ (local storage)


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


def results_root() -> Path:
    return Path(os.environ.get("SEGTUNE_RESULTS") or REPO_ROOT / "results")


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def _check_writable(directory: Path) -> None:
    """One clear line instead of a traceback from deep inside Ray, before anything starts."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SegtuneError(f"results directory {directory}: not writable ({err.strerror}); set SEGTUNE_RESULTS to a writable directory") from None


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SegtuneError(f"{path}: no such search to resume (the experiment name is the directory under {path.parent.parent})") from None
    except (OSError, ValueError) as err:
        raise SegtuneError(f"{path}: unreadable search state ({err})") from None


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, path)


def cli_overrides(opts: SearchOptions) -> dict[str, Any]:
    """{dotted key: value} the command line sets over the config file."""
    overrides = dict(opts.overrides)
    if opts.data:
        overrides["data.root"] = str(Path(opts.data).resolve())
    if opts.num_samples:
        overrides["search.num_samples"] = opts.num_samples
    return overrides


def _local_ray_env() -> None:
    # Ray maps 127.0.0.1 to the machine's outward address (services.resolve_ip_for_localhost)
    # unless its "single-machine" mode is on; this variable, read when ray is imported, keeps
    # a local search on loopback. Worker processes inherit it.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        constants.ENABLE_RAY_CLUSTER = False  # ray was imported before (in-process use)


def start_ray(address: str | None, num_cpus: int | None = None, temp_dir: str | None = None, log: Callable = print) -> bool:
    """Join `address` / RAY_ADDRESS, or start a local Ray on 127.0.0.1. True when we started it."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        _local_ray_env()
    import ray

    if ray.is_initialized():
        return False
    if address:
        log(f"joining the Ray cluster at {address}")
        ray.init(address=address, log_to_driver=True)
        return False
    kwargs: dict[str, Any] = {"num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False, "log_to_driver": True}
    if temp_dir:
        kwargs["_temp_dir"] = temp_dir
    ray.init(**kwargs)
    return True


def _trial_resources(space: SearchSpace, local: bool, log: Callable) -> dict[str, float]:
    """Per-trial resources. On a local Ray they are checked against this machine (a trial that
    can never be placed hangs Tune; no GPU means CPU trials). A joined cluster may autoscale:
    its nodes right after `ray up` are only the head, so the request stands as written."""
    import ray

    res = space.defaults.search.resources
    cluster = ray.cluster_resources()
    nodes_cpu = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    missing_gpu = bool(res.gpu) and not cluster.get("GPU")
    too_few_cpus = bool(nodes_cpu) and res.cpu > max(nodes_cpu)
    if not local:
        if missing_gpu or too_few_cpus:
            log(f"note: no Ray node has {res.cpu:g} CPU + {res.gpu:g} GPU free yet; trials wait for the autoscaler to add workers")
        return {"cpu": res.cpu, "gpu": res.gpu}
    if missing_gpu:
        log(f"WARNING search.resources.gpu={res.gpu} but this machine has no GPU Ray can use: trials run on CPU")
    if too_few_cpus:
        raise ConfigError(f"{space.source}: search.resources.cpu: {res.cpu} CPUs per trial but this machine gives Ray {max(nodes_cpu):g}")
    return {"cpu": res.cpu, "gpu": 0.0 if missing_gpu else res.gpu}


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _progress_reporter(space: SearchSpace):
    from ray.tune import CLIReporter

    search = space.defaults.search
    return CLIReporter(
        metric_columns={"epoch": "epoch", "val_miou": "val mIoU", "val_loss": "val loss", "best_miou": "best"},
        parameter_columns={k: k.split(".")[-1] for k in space.distributions},
        metric=search.metric,
        mode=search.mode,
        sort_by_metric=True,
        max_report_frequency=15,
        max_column_length=14,
    )


def _new_tuner(space: SearchSpace, trainable: Any, storage_path: str, name: str, state_file: Path):
    from ray import tune

    from tune.endings import TrialEndings
    from tune.space import build_scheduler, build_search_alg, param_space, trial_budget
    from tune.tracking import MlflowSearchCallback

    search = space.defaults.search
    return tune.Tuner(
        trainable,
        param_space=param_space(space),
        tune_config=tune.TuneConfig(
            search_alg=build_search_alg(search, state_file),
            scheduler=build_scheduler(search),
            num_samples=search.num_samples,
            time_budget_s=search.time_budget_s,
            # Re-use a finished trial's worker for the next trial: saves a process start and the
            # torch import (seconds per trial); the trainer is rebuilt from scratch each time.
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            # TrialEndings first: a trial's end is on disk before the leaderboard shows it.
            callbacks=[TrialEndings(state_file.parent, trial_budget(space.defaults)), MlflowSearchCallback(state_file, space)],
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
            # The latest checkpoint holds last.pt (resume) and best.pt (the best epoch so far).
            # Two are kept: a driver killed between deleting the older one and saving the
            # experiment state must still find the checkpoint that state names.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            progress_reporter=_progress_reporter(space),
            verbose=1,
        ),
    )


def _restored_trials(tune_path: str) -> list:
    """Tune's Trial objects as last saved in the experiment directory (statuses, results, checkpoints)."""
    import logging

    from ray.tune import ExperimentAnalysis

    # It also loads each trial's result files and warns for trials that never reported.
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis_log.level
    analysis_log.setLevel(logging.ERROR)
    try:
        return list(ExperimentAnalysis(tune_path).trials)
    except Exception:  # no experiment state yet (stopped before Tune's first save)
        return []
    finally:
        analysis_log.setLevel(level)


def _check_tune_state(tune_path: str) -> None:
    """Refuse to resume from a torn experiment state instead of letting Tune start over.

    Tune copies its state file to storage without an atomic rename; a driver killed during
    that copy leaves a truncated file, and Tune.restore then logs an error and silently runs
    the whole search again from scratch.
    """
    if "://" in tune_path:
        return
    states = sorted(Path(tune_path).glob("experiment_state-*.json"))  # Tune restores the newest name
    if not states:
        return
    try:
        json.loads(states[-1].read_text())
    except (OSError, ValueError) as err:
        older = f"; remove it to resume from the previous session's state {states[-2].name}" if len(states) > 1 else ""
        raise SegtuneError(f"{states[-1]}: Tune's experiment state is unreadable ({err}), the driver was probably killed while saving it{older}") from None


def _prune_resume_state(records: list) -> int:
    """Drop last.pt (optimizer state for resuming) of finished trials; best.pt stays for k-fold."""
    freed = 0
    for r in records:
        if r.finished and r.checkpoint and "://" not in r.checkpoint:
            for last in Path(r.checkpoint).parent.parent.glob("checkpoint_*/last.pt"):  # every kept checkpoint
                freed += last.stat().st_size
                last.unlink()
    return freed


def _log_parent(tracker: Tracker, run_id: str | None, records: list, results_dir: Path, best_document: dict | None) -> None:
    if not run_id:
        return
    statuses = [r.status for r in records]
    metrics = {
        "trials": len(records),
        "trials_completed": statuses.count("completed"),
        "trials_stopped_by_asha": statuses.count("stopped by ASHA"),
        "trials_errored": sum(s.startswith("error") for s in statuses),
    }
    scored = [r.best_val_miou for r in records if r.usable]
    if scored:
        metrics["best_val_miou"] = max(scored)
    tracker.log_metrics(run_id, metrics)
    tracker.log_artifact(run_id, results_dir / "leaderboard.csv")
    if best_document and best_document["configs"]:
        import yaml

        tracker.log_text(run_id, yaml.safe_dump(best_document["configs"][0]["config"], sort_keys=False), "best_config.yaml")
        tracker.log_artifact(run_id, results_dir / "best_configs.yaml")
        tracker.set_tags(run_id, {"segtune.best_trial_id": best_document["configs"][0]["trial_id"]})


def _load(opts: SearchOptions, log: Callable) -> tuple[SearchSpace, dict[str, Any] | None, dict[str, Any], bool]:
    """(space, stored state or None, overrides, smoke): a resume re-uses what the search started with."""
    if not opts.resume:
        overrides = cli_overrides(opts)
        return load_space(opts.space, smoke=opts.smoke, overrides=overrides), None, overrides, opts.smoke
    if not opts.experiment:
        raise SegtuneError(f"--resume needs --experiment NAME (a directory under {results_root()})")
    state = _read_state(results_root() / opts.experiment / STATE_FILE)
    if opts.data or opts.num_samples or opts.overrides or (opts.smoke and not state["smoke"]):
        log("note: a resumed search keeps the settings it started with; ignoring --data/--num-samples/--smoke")
    overrides, smoke = dict(state["overrides"]), state["smoke"]
    return load_space(state["space"], smoke=smoke, overrides=overrides), state, overrides, smoke


def _open_parent_run(tracker: Tracker, experiment: str, space: SearchSpace, smoke: bool, results_dir: Path, state: dict | None, log: Callable):
    """(MLflow experiment id, parent run id): created on the first session, re-used on resume."""
    experiment_id = tracker.experiment_id(experiment)
    parent_run_id = (state or {}).get("mlflow", {}).get("parent_run_id")
    if not experiment_id:
        log(f"WARNING mlflow: {tracker.uri} unreachable at start; this search is not tracked in MLflow")
        return None, parent_run_id
    if not parent_run_id:
        cfg = space.defaults
        parent_run_id = tracker.start_run(
            experiment_id,
            name=f"search-{experiment}",
            tags={"segtune.role": "search", "segtune.space": space.source, "segtune.smoke": str(smoke), "segtune.results_dir": str(results_dir)},
        )
        tracker.log_params(parent_run_id, {**flatten({"search": cfg.search.model_dump(mode="json")}), "space": space.source, "data.root": cfg.data.root})
        tracker.log_text(parent_run_id, Path(space.source).read_text(encoding="utf-8"), "space.yaml")
    return experiment_id, parent_run_id


def _tune_location(state: dict | None, experiment: str, results_dir: Path) -> tuple[str, str]:
    """(storage_path, experiment dir name) for Tune: $SEGTUNE_STORAGE/<experiment> or results/<experiment>/tune."""
    if state is not None:
        return state["storage_path"], state["tune_name"]
    if os.environ.get("SEGTUNE_STORAGE"):
        return os.environ["SEGTUNE_STORAGE"], experiment
    return str(results_dir), TUNE_DIR


def run_search(opts: SearchOptions, log: Callable[[str], None] = print) -> SearchOutcome:
    """Run (or resume) a search; returns what it wrote. Raises SegtuneError for bad input."""
    from tune.space import check_search

    started = time.perf_counter()
    if opts.experiment and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", opts.experiment):
        raise SegtuneError(f"--experiment {opts.experiment!r}: use letters, digits, '.', '_' and '-' only")
    space, state, overrides, smoke = _load(opts, log)
    check_search(space)
    cfg = space.defaults
    experiment = opts.experiment or f"{cfg.name}{'-smoke' if smoke else ''}-{datetime.now():%Y%m%d-%H%M%S}"
    results_dir = results_root() / experiment
    state_path = results_dir / STATE_FILE
    if not opts.resume and state_path.exists():
        raise SegtuneError(f"{results_dir}: already holds a search; pass --resume to continue it or choose another --experiment")
    _check_writable(results_dir)

    from training.data.dataset import prepare_data

    data = prepare_data(cfg, log=log)  # validates the data and builds the mask cache, once
    tracking_uri = opts.mlflow_uri or (state["mlflow"]["tracking_uri"] if state else None) or default_tracking_uri()
    tracker = Tracker(tracking_uri, log=log)
    experiment_id, parent_run_id = _open_parent_run(tracker, experiment, space, smoke, results_dir, state, log)
    storage_path, tune_name = _tune_location(state, experiment, results_dir)
    tune_path = f"{storage_path.rstrip('/')}/{tune_name}"
    ended: dict[str, dict] = {}  # trials that ended in an earlier session (tune/endings.py)
    if opts.resume:
        from tune.endings import read_endings

        _check_tune_state(tune_path)
        ended = read_endings(results_dir)
        if opts.retry_errored:
            ended = {k: v for k, v in ended.items() if not v["status"].startswith("error")}
    trials_before = len(_restored_trials(tune_path)) if opts.resume else 0
    new_state = {
        "experiment": experiment,
        "space": space.source,
        "smoke": smoke,
        "overrides": overrides,
        "data_root": cfg.data.root,
        "storage_path": storage_path,
        "tune_name": tune_name,
        "tune_path": tune_path,
        "fold_manifest": str(data.manifest.path) if data.manifest.path else None,
        "mlflow": {"tracking_uri": tracking_uri, "experiment_id": experiment_id, "parent_run_id": parent_run_id},
        "resume": {"trials_before": trials_before},  # read by StartupGate.check_resume
        "status": "running",
        "sessions": [*(state or {}).get("sessions", []), {"started": _now(), "resume": opts.resume, "pid": os.getpid()}],
    }
    _write_state(state_path, new_state)

    ray_started = time.perf_counter()
    we_started_ray = start_ray(opts.address, opts.num_cpus, opts.ray_temp_dir, log)
    ray_seconds = time.perf_counter() - ray_started
    try:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output engine ignores CLIReporter
        # num_to_keep snapshots the experiment state at every checkpoint, on purpose (resume
        # loses at most the running epoch); Tune warns about that each time.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        # Tune saves its experiment state (trial statuses, which checkpoint is the latest) at
        # most every 10 s by default; a resume continues running trials from the checkpoint that
        # state names, so a driver killed up to 10 s after a save retrains those epochs. Every
        # 2 s narrows that; saving at every controller step (10 Hz) would cost ~7% of a core
        # and, at ~40 KB of state per trial, megabytes a second. Trials that had *ended* are
        # never retrained whatever the timing: see tune/endings.py.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
        from ray import tune

        from tune.trainable import train_trial

        trainable = tune.with_resources(tune.with_parameters(train_trial, space=space, data=data, ended=ended), _trial_resources(space, we_started_ray, log))
        if opts.resume:
            log(f"resuming {experiment} from {tune_path} ({trials_before} trials so far; errored trials {'retried' if opts.retry_errored else 'kept'})")
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=opts.retry_errored, restart_errored=False)
        else:
            log(f"search {experiment}: {cfg.search.num_samples} trials, {cfg.search.algorithm} + {cfg.search.scheduler.name}, results in {results_dir}")
            tuner = _new_tuner(space, trainable, storage_path, tune_name, state_path)
        fit_started = time.perf_counter()
        tuner.fit()
        fit_seconds = time.perf_counter() - fit_started
    finally:
        if we_started_ray:
            import ray

            ray.shutdown()

    outcome = SearchOutcome(
        experiment=experiment,
        results_dir=results_dir,
        tune_path=tune_path,
        records=[],
        interrupted=False,
        leaderboard=results_dir / "leaderboard.csv",
        best_configs=None,
        mlflow_tracking_uri=tracking_uri,
        mlflow_experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        seconds=0.0,
        ray_start_seconds=ray_seconds,
        fit_seconds=fit_seconds,
    )
    _write_results(outcome, space, tracker, new_state, smoke, log)
    _write_state(state_path, new_state)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _retire_lost_runs(tracker: Tracker, children: dict[str, str], trial_ids: set[str], log: Callable) -> None:
    """Delete the child runs ({run id: trial id}) of trials the search no longer has.

    A trial that started less than one Tune state save before its driver was killed is
    unknown to the restored search: the searcher draws a new trial in its place, and the
    old one's partial epochs are gone. Its MLflow run is marked and soft-deleted (restorable
    from the UI's deleted runs), so MLflow's children and the leaderboard list the same trials.
    """
    from tune.tracking import STATUS_TAG

    lost = {run_id: trial_id for run_id, trial_id in children.items() if trial_id not in trial_ids}
    for run_id in lost:
        tracker.set_tags(run_id, {STATUS_TAG: "lost: started just before the driver was killed, unknown to the resumed search"})
        tracker.end_run(run_id, "KILLED")
        tracker.delete_run(run_id)
    if lost:
        log(f"mlflow: deleted {len(lost)} child run(s) of trials lost with the killed driver ({', '.join(sorted(lost.values()))}); Tune ran new trials instead")


def _write_results(outcome: SearchOutcome, space: SearchSpace, tracker: Tracker, state: dict[str, Any], smoke: bool, log: Callable) -> None:
    """Leaderboard, best configs (finished searches only), the parent run, a summary; updates `state`."""
    from tune.endings import read_endings
    from tune.results import BEST_CONFIGS, best_configs_document, collect_records, summary_table, write_leaderboard, write_yaml

    cfg = space.defaults
    trials = _restored_trials(outcome.tune_path)
    endings = read_endings(outcome.results_dir)
    trial_ids = {t.trial_id for t in trials} | set(endings)
    run_ids: dict[str, str] = {}
    if outcome.mlflow_experiment_id:
        # One query for every child run, not one per trial: a search may have hundreds.
        children = tracker.child_runs(outcome.mlflow_experiment_id, outcome.parent_run_id)
        for run_id, trial_id in children.items():  # newest first: the run find_run would return
            if trial_id in trial_ids:
                run_ids.setdefault(trial_id, run_id)
        _retire_lost_runs(tracker, children, trial_ids, log)
    records = collect_records(trials, space, run_ids.get, endings)
    budget_hit = cfg.search.time_budget_s is not None and outcome.fit_seconds >= cfg.search.time_budget_s
    interrupted = any(r.status == "unfinished" for r in records) or (len(records) < cfg.search.num_samples and not budget_hit)
    write_leaderboard(records, outcome.leaderboard)
    best_document = None
    if not interrupted:
        header = {
            "experiment": outcome.experiment,
            "space": space.source,
            "smoke": smoke,
            "data_root": cfg.data.root,
            "mlflow_tracking_uri": outcome.mlflow_tracking_uri,
            "mlflow_experiment_id": outcome.mlflow_experiment_id,
            "search_parent_run_id": outcome.parent_run_id,
            "fold_manifest": state["fold_manifest"],
        }
        best_document = best_configs_document(records, space, header)
        outcome.best_configs = write_yaml(best_document, outcome.results_dir / BEST_CONFIGS)
        freed = _prune_resume_state(records)
        if freed:
            log(f"removed last.pt (resume state) of finished trials: {freed / 1e9:.2f} GB freed; best.pt kept")
    _log_parent(tracker, outcome.parent_run_id, records, outcome.results_dir, best_document)
    if not interrupted:
        tracker.end_run(outcome.parent_run_id)
    if tracker.pending:
        tracker.flush()
    outcome.records, outcome.interrupted = records, interrupted

    state["status"] = "interrupted" if interrupted else "finished"
    state["trials"] = {r.trial_id: {"status": r.status, "best_val_miou": r.best_val_miou, "epochs_trained": r.epochs_trained} for r in records}
    state["sessions"][-1].update(ended=_now(), outcome=state["status"])

    log("\n" + summary_table(records))
    log(f"\nleaderboard: {outcome.leaderboard}")
    if outcome.best_configs:
        log(f"best configs (k-fold input): {outcome.best_configs}")
    log(f"mlflow: {outcome.mlflow_tracking_uri} experiment {outcome.experiment!r} (id {outcome.mlflow_experiment_id}), parent run {outcome.parent_run_id}")
    if interrupted:
        log(f"search interrupted; continue it with: python tune/search.py --resume --experiment {outcome.experiment}")
