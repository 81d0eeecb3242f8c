"""MLflow logging that never stops training: one writer, outages warned about and replayed.

Only the driver process (the Tune driver, the k-fold driver) writes, so a sqlite store sees
a single writer and never "database is locked". When the tracking server is unreachable,
calls are queued and retried later instead of raising; the outage is reported once.
"""

from __future__ import annotations

import collections
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from training.config import REPO_ROOT

# A dead server must cost seconds, not mlflow's default minutes of retries per call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

MAX_PARAM_LENGTH = 6000
RETRY_AFTER_S = 15.0


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store in the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


class Tracker:
    """A thin, outage-tolerant wrapper over MlflowClient."""

    def __init__(self, uri: str | None = None, log: Callable[[str], None] = print):
        from mlflow.tracking import MlflowClient

        self.uri = uri or default_tracking_uri()
        self.log = log
        self.client = MlflowClient(tracking_uri=self.uri)
        self.pending: collections.deque = collections.deque(maxlen=100_000)
        self.outages: list[str] = []
        self._down_since: float | None = None
        self._last_try = 0.0

    # ---- outage handling ---------------------------------------------------------
    @property
    def available(self) -> bool:
        return self._down_since is None

    def _call(self, fn: Callable, *args, queue: bool = True, **kwargs):
        """Run one client call; on failure warn once per outage and queue it for replay."""
        if self._down_since is not None:
            if time.monotonic() - self._last_try < RETRY_AFTER_S:
                if queue:
                    self.pending.append((fn, args, kwargs))
                return None
            if not self.flush():
                if queue:
                    self.pending.append((fn, args, kwargs))
                return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # network errors, 5xx, sqlite errors: all mean "not now"
            self._went_down(err)
            if queue:
                self.pending.append((fn, args, kwargs))
            return None

    def _went_down(self, err: Exception) -> None:
        self._last_try = time.monotonic()
        if self._down_since is None:
            self._down_since = time.monotonic()
            message = f"mlflow: tracking at {self.uri} failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); training continues, logging is queued"
            self.outages.append(message)
            self.log(f"WARNING {message}")

    def flush(self) -> bool:
        """Replay queued calls; True when the queue is empty and the server answers."""
        self._last_try = time.monotonic()
        while self.pending:
            fn, args, kwargs = self.pending[0]
            try:
                fn(*args, **kwargs)
            except Exception as err:
                self._down_since = self._down_since or time.monotonic()
                self._last_try = time.monotonic()
                del err
                return False
            self.pending.popleft()
        if self._down_since is not None:
            self.log(f"mlflow: tracking at {self.uri} is back after {time.monotonic() - self._down_since:.0f}s; queued logging replayed")
            self._down_since = None
        return True

    # ---- runs -------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str | None:
        def get_or_create() -> str:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                return exp.experiment_id
            location = None
            if self.uri.startswith("sqlite:"):
                location = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
            # The UI opens "custom model development" experiments on the training-runs view.
            return self.client.create_experiment(
                name, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"}
            )

        return self._call(get_or_create, queue=False)

    def find_run(self, experiment_id: str, tags: dict[str, str]) -> str | None:
        """The id of a run carrying all `tags` (used to avoid duplicate runs on resume)."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self._call(self.client.search_runs, [experiment_id], query, max_results=1, queue=False)
        return runs[0].info.run_id if runs else None

    def child_runs(self, experiment_id: str, parent_run_id: str) -> dict[str, str]:
        """{run id: segtune.trial_id tag} of the parent's (not deleted) child runs, newest first (MLflow's order)."""
        runs = self._call(self.client.search_runs, [experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=50_000, queue=False)
        return {run.info.run_id: run.data.tags.get("segtune.trial_id", "") for run in runs or []}

    def start_run(self, experiment_id: str, name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None) -> str | None:
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self._call(self.client.create_run, experiment_id, run_name=name, tags=tags, queue=False)
        return run.info.run_id if run else None

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if not run_id or not params:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._call(self.client.log_batch, run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int | None = None) -> None:
        if not run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)]
        for start in range(0, len(items), 500):
            self._call(self.client.log_batch, run_id, metrics=items[start : start + 500])

    def set_tags(self, run_id: str | None, tags: dict[str, Any]) -> None:
        if not run_id:
            return
        from mlflow.entities import RunTag

        self._call(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str | None, path: str | Path, artifact_path: str | None = None) -> None:
        if run_id and Path(path).exists():
            self._call(self.client.log_artifact, run_id, str(path), artifact_path)

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        if run_id:
            self._call(self.client.log_text, run_id, text, artifact_file)

    def end_run(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self._call(self.client.set_terminated, run_id, status)

    def delete_run(self, run_id: str | None) -> None:
        """Soft delete: the run leaves searches and the UI's list, and can be restored."""
        if run_id:
            self._call(self.client.delete_run, run_id)
