"""Tune's objects for a search: the Tuner (searcher, scheduler, callbacks, checkpoints), its reporter, the reloaded study."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from training.config import SearchSpace

if TYPE_CHECKING:
    from tune.runner import SearchSession


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def progress_reporter(space: SearchSpace):
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


def new_tuner(session: "SearchSession", trainable: Any):
    from ray import tune

    from tune.callbacks import MlflowTrials, TrialEndings
    from tune.space import build_scheduler, build_search_alg, param_space, trial_budget

    space, search = session.space, session.space.defaults.search
    return tune.Tuner(
        trainable,
        param_space=param_space(space),
        tune_config=tune.TuneConfig(
            search_alg=build_search_alg(space, session.results_dir, session.experiment),
            scheduler=build_scheduler(search),
            num_samples=search.num_samples,
            time_budget_s=search.time_budget_s,
            # Re-use a finished trial's worker for the next trial: saves a process start and the
            # torch import (seconds per trial); the trainer is rebuilt from scratch each time.
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=session.state.data["tune_name"],
            storage_path=session.state.data["storage_path"],
            # TrialEndings first: a trial's end is on disk before the leaderboard shows it.
            callbacks=[TrialEndings(session.results_dir, trial_budget(space.defaults)), MlflowTrials(session.results_dir, space)],
            failure_config=tune.FailureConfig(max_failures=search.max_failures),
            # The latest checkpoint holds last.pt (resume) and best.pt (the best epoch so far).
            # Two are kept: a driver killed between deleting the older one and saving the
            # experiment state must still find the checkpoint that state names.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            progress_reporter=progress_reporter(space),
            verbose=1,
        ),
    )


def reload_study(session: "SearchSession", trials: list, log: Callable[[str], None]) -> None:
    """Before a resume: the Optuna study from its storage file, said in a line; orphaned asks failed."""
    from tune import resume
    from tune.space import STUDY_FILE, load_study

    if session.space.defaults.search.algorithm != "optuna":
        return
    study = load_study(session.results_dir, session.experiment)
    values = [t.value for t in study.trials if t.value is not None]
    best = (max if session.space.defaults.search.mode == "max" else min)(values) if values else None
    log(f"optuna: study {session.experiment!r} reloaded from {session.results_dir / STUDY_FILE}: {len(study.trials)} trials, "
        f"best {session.space.defaults.search.metric} {best if best is None else f'{best:.6f}'}")
    resume.reconcile_study(study, trials, log)
