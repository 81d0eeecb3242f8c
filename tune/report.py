"""The end of a search session: leaderboard, the typed hand-off, the parent run, parameter importances, final status."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import yaml

from training.handoff import BEST_CONFIGS
from training.infra import lineage as tags
from tune import diversity, resume
from tune.cost import log_costs
from tune.results import (IMPORTANCES_PLOT, TrialRecord, best_configs, collect_records, importance_table, param_importances, prune_resume_state,
                          save_importance_plot, summary_table, write_leaderboard)

if TYPE_CHECKING:
    from tune.runner import SearchOutcome, SearchSession

Log = Callable[[str], None]


def trial_run_keys(session: "SearchSession") -> dict[str, str]:
    """{run key: trial id} of every trial child run this search has made (in any session)."""
    prefix = session.lineage.key("trial", "")
    return {key: key[len(prefix):] for key in session.lineage.tracker.runs if key.startswith(prefix)}


def search_study(session: "SearchSession", records: list[TrialRecord]) -> Any:
    """The study importances are computed on: the stored Optuna study, or one built from the records (random search)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from tune.space import load_study, param_space

    if session.space.defaults.search.algorithm == "optuna":
        return load_study(session.results_dir, session.experiment)
    distributions = OptunaSearch.convert_search_space(param_space(session.space))
    study = optuna.create_study(direction="maximize" if session.space.defaults.search.mode == "max" else "minimize")
    for r in records:
        if r.metric_value is not None:
            params = {k: v for k, v in r.params.items() if k in distributions and not isinstance(v, (list, dict))}
            if len(params) == len(distributions):
                study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=r.metric_value))
    return study


def log_importances(session: "SearchSession", records: list[TrialRecord], log: Log) -> dict[str, float]:
    study = search_study(session, records)
    importances = param_importances(study)
    log("\n" + importance_table(importances))
    if importances:
        tracker = session.lineage.tracker
        tracker.log_table(session.parent, {"param": list(importances), "importance": list(importances.values())}, "param_importances.json")
        plot = save_importance_plot(study, session.results_dir / IMPORTANCES_PLOT)
        if plot is not None:
            tracker.log_artifact(session.parent, plot)
    return importances


def log_parent(session: "SearchSession", records: list[TrialRecord], best_path) -> None:
    tracker, parent = session.lineage.tracker, session.parent
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
    tracker.log_metrics(parent, metrics)
    tracker.log_artifact(parent, session.results_dir / "leaderboard.csv")
    if best_path is not None:
        top = next(r for r in records if r.usable)
        tracker.log_text(parent, yaml.safe_dump(session.space.resolve(top.params).to_dict(), sort_keys=False), "best_config.yaml")
        tracker.log_artifact(parent, best_path)
        tracker.set_tags(parent, {"segtune.best_trial_id": top.trial_id})


def write_results(session: "SearchSession", outcome: "SearchOutcome", log: Log) -> None:
    """Leaderboard, best_configs.yaml (finished searches only), the parent run, a summary; the state's status."""
    cfg, tracker, state = session.space.defaults, session.lineage.tracker, session.state
    trials = resume.restored_trials(session.tune_path)
    endings = resume.read_endings(session.results_dir)
    resume.retire_lost_runs(tracker, trial_run_keys(session), {t.trial_id for t in trials} | set(endings), log)
    if tracker.available:
        tracker.flush(30)  # the child run ids, for the leaderboard
    records = collect_records(trials, session.space, lambda trial_id: session.lineage.run_id(session.lineage.key("trial", trial_id)), endings)
    budget_hit = cfg.search.time_budget_s is not None and outcome.fit_seconds >= cfg.search.time_budget_s
    interrupted = any(r.status == "unfinished" for r in records) or (len(records) < cfg.search.num_samples and not budget_hit)
    write_leaderboard(records, outcome.leaderboard)
    mlflow = state.data["mlflow"]
    mlflow.update(experiment_id=tracker.experiments.get(session.experiment) or mlflow.get("experiment_id"),
                  parent_run_id=tracker.run_id(session.parent) or mlflow.get("parent_run_id"))
    selection = None
    if not interrupted:
        selection = diversity.select_top_k(records, session.space, log)
        document = best_configs(records, session.space, selection, experiment=session.experiment, space=session.space.source, smoke=session.smoke,
                                data_root=cfg.data.root, fold_manifest=state.data["fold_manifest"], mlflow_tracking_uri=tracker.uri,
                                mlflow_experiment_id=mlflow["experiment_id"], search_parent_run_id=mlflow["parent_run_id"])
        outcome.best_configs = document.write(session.results_dir / BEST_CONFIGS) if document else None
        freed = prune_resume_state(records)
        if freed:
            log(f"removed last.pt (resume state) of finished trials: {freed / 1e9:.2f} GB freed; best.pt kept")
    log_parent(session, records, outcome.best_configs)
    log_costs(session, records, log)
    status = resume.INTERRUPTED if interrupted else resume.FINISHED
    state.end_session(status, trials={r.trial_id: {"status": r.status, "best_val_miou": r.best_val_miou, "epochs_trained": r.epochs_trained} for r in records})
    log("\n" + summary_table(records))
    if selection:
        log("\n" + selection.table())
        diversity.log_selection(tracker, session.parent, selection)
    if not interrupted:
        log_importances(session, records, log)
        tracker.set_tags(session.parent, {tags.STATUS: "finished"})
        tracker.end_run(session.parent)
    outcome.records, outcome.interrupted = records, interrupted
    outcome.mlflow_experiment_id, outcome.parent_run_id = mlflow["experiment_id"], mlflow["parent_run_id"]
    log(f"\nleaderboard: {outcome.leaderboard}")
    if outcome.best_configs:
        log(f"best configs (k-fold input): {outcome.best_configs}")
    log(f"mlflow: {tracker.uri} experiment {session.experiment!r} (id {outcome.mlflow_experiment_id}), parent run {outcome.parent_run_id}")
    if interrupted:
        log(f"search interrupted; continue it with: python tune/search.py --resume --experiment {session.experiment}")
