"""The search's Tune callbacks, all in the driver: trial endings (resume), the start-up mark, MLflow child runs.

Tuner.restore() re-uses the callbacks pickled by the first session, so per-session things
(the MLflow tracker) are opened in `setup()` from search_state.json, never pickled.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from training.config import SearchSpace
from training.infra import compat
from training.infra import lineage as tags
from training.infra.lineage import Lineage
from training.infra.tracking import open_tracker
from tune import resume
from tune.cost import OVER_BUDGET, OVER_BUDGET_KEY
from tune.results import LEADERBOARD, collect_records, trial_record, trial_status, write_leaderboard
from tune.space import trial_params

ARTIFACTS = ("per_class_iou.png", "overlays.png", "metrics.json")


class TrialEndings(Callback):
    """Records {status, last result, checkpoint} of every trial the moment Tune ends it (see tune/resume.py).

    First in the callback list: a trial's end is on disk before the leaderboard shows it.
    """

    def __init__(self, results_dir: str | Path, budget: int):
        self.results_dir = Path(results_dir)
        self.budget = budget  # epochs a trial trains when nothing stops it (status: completed)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        resume.mark_running(self.results_dir / resume.STATE_FILE)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status = trial_status(trial, self.budget, ending=True)
        resume.record_ending(self.results_dir, trial.trial_id, resume.trial_ending(trial, status))
        if status == OVER_BUDGET:
            print((trial.last_result or {}).get(OVER_BUDGET_KEY) or f"trial {trial.trial_id}: over the trial cost budget; skipped", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        resume.record_ending(self.results_dir, trial.trial_id, resume.trial_ending(trial, trial_status(trial, self.budget)))


def config_yaml(space: SearchSpace, params: dict[str, Any]) -> str:
    return yaml.safe_dump(space.resolve(params).to_dict(), sort_keys=False)


class MlflowTrials(Callback):
    """A child run per trial: params, config.yaml, per-epoch metrics, status, plots, checkpoint path.

    Only enqueues (training/infra/tracking.py): an unreachable store never stalls the Tune
    controller. Also rewrites leaderboard.csv whenever a trial ends.
    """

    def __init__(self, results_dir: str | Path, space: SearchSpace):
        self.results_dir = Path(results_dir)
        self.space = space
        self.lineage: Lineage | None = None
        self.parent: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, lineage=None)  # a tracker and its thread belong to one driver session

    def setup(self, **info: Any) -> None:
        state = resume.SearchState.read(self.results_dir).data
        mlflow = state["mlflow"]
        tracker = open_tracker(mlflow["tracking_uri"], self.results_dir / mlflow["outbox"], log=lambda line: print(line, flush=True))
        self.lineage = Lineage(tracker, state["experiment"], state["stage_id"])
        self.parent = self.lineage.key("search")

    def trial_key(self, trial_id: str) -> str:
        return self.lineage.key("trial", trial_id)

    def _open(self, trial: Any) -> str:
        """The trial's child run (found again after a restart or resume, else created) and its params."""
        key = self.trial_key(trial.trial_id)
        run_tags = {tags.TRIAL_ID: trial.trial_id, tags.STATUS: "running", tags.FOLD: self.space.defaults.search.fold}
        if self.lineage.run(key, f"trial_{trial.trial_id}", "trial", run_tags, parent=self.parent):
            params = trial_params(self.space, trial.config)
            self.lineage.tracker.log_params(key, params)
            self.lineage.tracker.log_text(key, config_yaml(self.space, params), "config.yaml")
        return key

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.lineage.tracker.set_tags(self._open(trial), {tags.STATUS: "running", "segtune.failures": trial.num_failures})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        key = self._open(trial)
        skip = compat.tune_result_keys() | {"node_id", "resumed_from_epoch"}
        metrics = {k: v for k, v in result.items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.lineage.log_epoch(key, int(result.get("epoch", 0)), metrics)
        if result.get("node_id"):
            self.lineage.tracker.set_tags(key, {"segtune.node_id": result["node_id"]})

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.lineage.tracker.set_tags(self._open(trial), {tags.STATUS: "retrying from last checkpoint", "segtune.failures": trial.num_failures})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, trials, ending=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, trials)

    def _finish(self, trial: Any, trials: list, ending: bool = False) -> None:
        key, tracker = self._open(trial), self.lineage.tracker
        record = trial_record(trial, self.space, self.lineage.run_id(key), ending)
        run_tags = {tags.STATUS: record.status, "segtune.epochs_trained": record.epochs_trained, "segtune.failures": record.failures}
        if record.checkpoint:
            run_tags[tags.CHECKPOINT] = record.checkpoint
        if record.mem_kind:
            run_tags["segtune.mem_kind"] = record.mem_kind  # what the peak_mem_mb metric measures (tune/cost.py)
        self.lineage.set_tags(key, run_tags)
        # An ASHA stop is a normal outcome (FINISHED); the status tag tells it from a completed trial.
        status = "FAILED" if record.status.startswith("error") else "FINISHED"
        if not tracker.ended(key, status):  # a trial replaying its ending after a resume has logged it already
            summary = {"best_val_miou": record.best_val_miou, "best_epoch": record.best_epoch, "epochs_trained": record.epochs_trained}
            tracker.log_metrics(key, {k: v for k, v in summary.items() if v is not None and math.isfinite(v)})
            if record.checkpoint and "://" not in record.checkpoint:
                for name in ARTIFACTS:
                    tracker.log_artifact(key, Path(record.checkpoint).parent / name)
            tracker.end_run(key, status)
        everyone = collect_records(trials, self.space, lambda t: self.lineage.run_id(self.trial_key(t)), resume.read_endings(self.results_dir))
        write_leaderboard([record if r.trial_id == trial.trial_id else r for r in everyone], self.results_dir / LEADERBOARD)
