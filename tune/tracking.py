"""MLflow for a search, written by the Tune driver only: one parent run, one child run per trial.

A `ray.tune.Callback` runs in the driver, so trials never talk to MLflow and a sqlite store
sees a single writer. Logging goes through `training.tracking.Tracker`, which warns, queues
and replays when the server is down: an MLflow outage never stops a trial.

Tuner.restore() re-uses the callback pickled by the first session, so the per-session
settings (tracking URI, parent run) are read from search_state.json in `setup()`, and a
resumed search finds its child runs again by their `segtune.trial_id` tag.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from training.config import SearchSpace
from training.tracking import Tracker
from tune.endings import read_endings
from tune.results import LEADERBOARD, collect_records, trial_record, write_leaderboard
from tune.space import trial_params

TRIAL_TAG = "segtune.trial_id"
STATUS_TAG = "segtune.status"
# Tune's own bookkeeping and our string extras: not metrics of the model.
NOT_METRICS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint", "node_id", "resumed_from_epoch"}
ARTIFACTS = ("per_class_iou.png", "overlays.png", "metrics.json")


def config_yaml(space: SearchSpace, params: dict[str, Any]) -> str:
    return yaml.safe_dump(space.resolve(params).to_dict(), sort_keys=False)


class MlflowSearchCallback(Callback):
    """Child run per trial: params, config.yaml, per-epoch metrics, status, plots, checkpoint path.

    Also rewrites results/<experiment>/leaderboard.csv whenever a trial ends, so the
    standings can be followed while the search runs.
    """

    def __init__(self, state_file: str | Path, space: SearchSpace):
        self.state_file = str(state_file)
        self.space = space
        self.run_ids: dict[str, str] = {}
        self.logged_epoch: dict[str, int] = {}
        # While MLflow is down a trial may start, report and even finish before its child run
        # exists; its epochs and its ending wait here and are logged once a run can be made.
        self.backlog: dict[str, list[tuple[int, dict[str, float]]]] = {}
        self.deferred_finish: dict[str, tuple[Any, bool]] = {}
        self.tracker: Tracker | None = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.results_dir = Path(self.state_file).parent

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["tracker"] = None  # a client and its queue belong to one driver session
        state["deferred_finish"] = {}  # live Trial objects; a restored session re-derives endings
        return state

    # ---- session ----------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        state = json.loads(Path(self.state_file).read_text())
        mlflow = state["mlflow"]
        self.tracker = Tracker(mlflow["tracking_uri"], log=lambda line: print(line, flush=True))
        self.experiment_id = mlflow["experiment_id"]
        self.parent_run_id = mlflow["parent_run_id"]

    def get_state(self) -> dict[str, Any]:
        return {"run_ids": dict(self.run_ids)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.run_ids.update(state.get("run_ids", {}))

    # ---- child runs ---------------------------------------------------------------------
    def run_id(self, trial_id: str) -> str | None:
        """The trial's child run: cached, found by tag (resume), or None."""
        if trial_id in self.run_ids:
            return self.run_ids[trial_id]
        if self.tracker is None or self.experiment_id is None:
            return None
        found = self.tracker.find_run(self.experiment_id, {TRIAL_TAG: trial_id, "mlflow.parentRunId": self.parent_run_id})
        if found:
            self.run_ids[trial_id] = found
        return found

    def _last_logged_epoch(self, run_id: str) -> int:
        """Epochs already in MLflow (a resumed trial re-runs epochs after its last checkpoint)."""
        try:
            history = self.tracker.client.get_metric_history(run_id, "epoch")
        except Exception:  # MLflow down: at worst a few epochs are logged twice
            return 0
        return int(max((m.step for m in history), default=0))

    def _ensure_run(self, trial: Any) -> str | None:
        if self.tracker is None or self.experiment_id is None:
            return None
        existing = self.run_id(trial.trial_id)
        if existing:
            if existing not in self.logged_epoch:
                self.logged_epoch[existing] = self._last_logged_epoch(existing)
            return existing
        params = trial_params(self.space, trial.config)
        cfg = self.space.defaults
        run = self.tracker.start_run(
            self.experiment_id,
            name=f"trial_{trial.trial_id}",
            tags={TRIAL_TAG: trial.trial_id, STATUS_TAG: "running", "segtune.fold": str(cfg.search.fold), "segtune.role": "trial"},
            parent_run_id=self.parent_run_id,
        )
        if run is None:  # MLflow is down; try again on the trial's next event
            return None
        self.run_ids[trial.trial_id] = run
        self.logged_epoch[run] = 0
        self.tracker.log_params(run, params)
        self.tracker.log_text(run, config_yaml(self.space, params), "config.yaml")
        for epoch, metrics in self.backlog.pop(trial.trial_id, []):
            self.tracker.log_metrics(run, metrics, step=epoch)
            self.logged_epoch[run] = max(self.logged_epoch[run], epoch)
        return run

    def _retry_deferred(self, trials: list) -> None:
        """Finish the trials that ended while MLflow was down, once it answers again."""
        for trial_id, (trial, ending) in list(self.deferred_finish.items()):
            if self._ensure_run(trial) is None:
                return
            del self.deferred_finish[trial_id]
            self._finish(trial, trials, ending)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._ensure_run(trial)
        self.tracker.set_tags(run, {STATUS_TAG: "running", "segtune.failures": trial.num_failures})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._retry_deferred(trials)
        run = self._ensure_run(trial)
        epoch = int(result.get("epoch", 0))
        metrics = {k: v for k, v in result.items() if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if run is None:
            self.backlog.setdefault(trial.trial_id, []).append((epoch, metrics))
            return
        if epoch <= self.logged_epoch.get(run, 0):
            return
        self.tracker.log_metrics(run, metrics, step=epoch)
        self.logged_epoch[run] = epoch
        if result.get("node_id"):
            self.tracker.set_tags(run, {"segtune.node_id": result["node_id"]})

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._ensure_run(trial)
        self.tracker.set_tags(run, {STATUS_TAG: "retrying from last checkpoint", "segtune.failures": trial.num_failures})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, trials, ending=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, trials)

    def _finish(self, trial: Any, trials: list, ending: bool = False) -> None:
        self.deferred_finish.pop(trial.trial_id, None)
        run = self._ensure_run(trial)
        if run is None:
            self.deferred_finish[trial.trial_id] = (trial, ending)
        record = trial_record(trial, self.space, run, ending)
        tags = {STATUS_TAG: record.status, "segtune.epochs_trained": record.epochs_trained, "segtune.failures": record.failures}
        if record.checkpoint:
            tags["segtune.best_checkpoint"] = record.checkpoint
        self.tracker.set_tags(run, tags)
        summary = {"best_val_miou": record.best_val_miou, "best_epoch": record.best_epoch, "epochs_trained": record.epochs_trained}
        self.tracker.log_metrics(run, {k: v for k, v in summary.items() if v is not None and math.isfinite(v)})
        if record.checkpoint and "://" not in record.checkpoint:
            for name in ARTIFACTS:
                self.tracker.log_artifact(run, Path(record.checkpoint).parent / name)
        # An ASHA stop is a normal outcome (FINISHED); the status tag tells it from a completed trial.
        self.tracker.end_run(run, "FAILED" if record.status.startswith("error") else "FINISHED")
        everyone = collect_records(trials, self.space, self.run_id, read_endings(self.results_dir))
        records = [record if r.trial_id == trial.trial_id else r for r in everyone]
        write_leaderboard(records, self.results_dir / LEADERBOARD)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.tracker is None:
            return
        # Training is over, but what an outage queued lives only in this process: give the
        # server a bounded grace period to come back before reporting the loss.
        deadline = time.monotonic() + float(os.environ.get("SEGTUNE_MLFLOW_GRACE_S", "90"))
        while (self.tracker.pending or self.deferred_finish) and time.monotonic() < deadline:
            if self.tracker.flush():
                self._retry_deferred(trials)
                if not (self.tracker.pending or self.deferred_finish):
                    break
            print(f"mlflow: waiting up to {deadline - time.monotonic():.0f}s for {self.tracker.uri} to replay {len(self.tracker.pending)} queued calls", flush=True)
            time.sleep(5)
        if self.tracker.pending or self.deferred_finish:
            print(f"WARNING mlflow: {len(self.tracker.pending)} logging calls could not be replayed; MLflow is still down", flush=True)
