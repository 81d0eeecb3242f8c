"""MLflow logging that never stalls training and never loses history.

Only a stage's driver writes (the Tune driver, the k-fold driver), so a sqlite store sees one
writer. Every write is an operation queued in memory *and* appended to an outbox file in the
stage's results directory; one background thread per driver sends them in order and marks
each one done in the file. So:
- the Tune controller (and the k-fold's result loop) only enqueues: an unreachable server
  never stalls trial scheduling;
- an outage is reported once; its operations wait and are sent when the server is back;
- what is still unsent when the driver exits (or is killed) stays in the outbox and is sent
  by the next run of the stage, or by `--sync-mlflow`.

Runs are named by a *key* chosen by the stage (e.g. `<stage id>/trial/<trial id>`), kept as
the tag `segtune.run_key`: creating a run first looks for one with that key, so a replayed
or resumed creation never makes a duplicate, and epochs already in a found run are skipped.
"""

from __future__ import annotations

import collections
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from training.errors import SegtuneError
from training.infra.fs import REPO_ROOT

# A dead server must cost seconds, not mlflow's default minutes of retries per call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

RUN_KEY_TAG = "segtune.run_key"
DEDUPE_METRIC = "epoch"  # logged with every epoch's metrics: its steps are the epochs a run already has
MAX_PARAM_LENGTH = 6000
RETRY_AFTER_S = 5.0
# MLflow error codes that will not go away by retrying: the operation is dropped with a warning.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "BAD_REQUEST"}
Log = Callable[[str], None]


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


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check_store(uri: str) -> None:
    """One line for a store that can never work (a sqlite file on a read-only or missing path).

    MLflow would otherwise retry its database connection for minutes and end in a long traceback.
    """
    db = sqlite_path(uri)
    if db is None:
        return
    from training.infra.fs import check_writable

    hint = "pass --mlflow-uri (or MLFLOW_TRACKING_URI) with a writable store"
    if db.exists() and not os.access(db, os.W_OK):
        raise SegtuneError(f"mlflow: {uri}: {db} is read-only; {hint}")
    try:
        check_writable(db.parent, hint)
    except SegtuneError as err:
        raise SegtuneError(f"mlflow: {uri}: {err}") from None


class PermanentError(Exception):
    """An operation that can never succeed (its run was never created, its file is gone)."""


def _is_permanent(err: Exception) -> bool:
    return getattr(err, "error_code", None) in PERMANENT_ERRORS or isinstance(err, (PermanentError, FileNotFoundError))


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


class Outbox:
    """The operations not yet sent, on disk (JSON lines): `{"seq", "op", ...}` then `{"ack": seq}`."""

    def __init__(self, path: Path | None):
        self.path = path
        self.seq = 0
        self._file = None

    def load(self, uri: str) -> tuple[list[dict], dict[str, str], dict[str, str]]:
        """(unsent operations in order, {run key: run id}, {run key: status}) of runs in the store `uri`."""
        ops: dict[int, dict] = {}
        runs: dict[str, str] = {}
        statuses: dict[str, str] = {}
        if self.path is None or not self.path.is_file():
            return [], runs, statuses
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line torn by a kill mid-write: everything before it stands
                continue
            if "run" in entry:
                if entry.get("uri") == uri:  # ids of another store mean nothing here
                    runs[entry["run"]] = entry["id"]
                    statuses[entry["run"]] = entry.get("status", "")
            elif "ack" in entry:
                self.seq = max(self.seq, entry["ack"])
                op = ops.pop(entry["ack"], None)
                if op is not None and entry.get("run_id"):
                    runs[op["key"]] = entry["run_id"]
                if op is not None and op["op"] == "end_run":
                    statuses[op["key"]] = op["status"]
            else:
                self.seq = max(self.seq, entry["seq"])
                ops[entry["seq"]] = entry
        return [ops[s] for s in sorted(ops)], runs, statuses

    def _append(self, entry: dict) -> None:
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(entry, default=str) + "\n")
        self._file.flush()

    def add(self, op: dict) -> dict:
        self.seq += 1
        op = dict(op, seq=self.seq)
        self._append(op)
        return op

    def ack(self, op: dict, run_id: str | None = None) -> None:
        self._append({"ack": op["seq"], **({"run_id": run_id} if run_id else {})})

    def compact(self, runs: dict[str, str], statuses: dict[str, str], uri: str) -> None:
        """Nothing is pending: keep only the run keys (a later session finds its runs without a query)."""
        if self.path is None:
            return
        from training.infra.fs import write_text

        if self._file is not None:
            self._file.close()
            self._file = None
        write_text(self.path, "".join(json.dumps({"run": k, "id": v, "uri": uri, "status": statuses.get(k, "")}) + "\n" for k, v in runs.items()))
        self.seq = 0


def _client(uri: str):
    """MlflowClient for `uri`; a new sqlite store is created (migrated) by one process at a time.

    MLflow creates the store's tables as the client is made; two processes doing that for the
    same new file collide ("table ... already exists"), so they take turns on a file lock.
    """
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    check_store(uri)
    from filelock import FileLock

    try:
        with FileLock(str(db) + ".lock"):
            return MlflowClient(tracking_uri=uri)
    except Exception as err:  # sqlite errors are the file's, not an outage: say so in one line
        raise SegtuneError(f"mlflow: {uri}: {_first_line(err)}") from None


class Tracker:
    """An outage-tolerant MLflow writer for one stage: enqueue now, sent in order by a background thread."""

    def __init__(self, uri: str | None = None, outbox: Path | None = None, log: Log = print):
        self.uri = uri or default_tracking_uri()
        self.log = log
        self.client = _client(self.uri)
        self.outbox = Outbox(outbox)
        pending, self.runs, self.statuses = self.outbox.load(self.uri)
        self.queue: collections.deque[dict] = collections.deque(pending)
        self.logged_steps: dict[str, set[int]] = {}
        self.experiments: dict[str, str] = {}
        self.down_since: float | None = None
        self.down_at_start = False
        self._cond = threading.Condition()
        self._closing = False
        self._stopped = False  # close() gave up: what is left stays in the outbox for another Tracker
        self._thread: threading.Thread | None = None
        if pending:
            log(f"mlflow: {len(pending)} calls left unsent by an earlier run are replayed from {outbox}")

    # ---- connection -----------------------------------------------------------------------
    def connect(self) -> bool:
        """Ask the store once, at start-up: a broken sqlite file is one error line, an unreachable server a warning at once.

        (A read-only sqlite path was already refused when the client was made.)
        """
        db = sqlite_path(self.uri)
        try:
            self.client.search_experiments(max_results=1)
        except Exception as err:  # network errors, 5xx: the store is down, not wrong
            if db is not None:
                raise SegtuneError(f"mlflow: {self.uri}: {_first_line(err)}") from None
            self.down_since, self.down_at_start = time.monotonic(), True
            where = f" (kept in {self.outbox.path})" if self.outbox.path else ""
            self.log(f"WARNING mlflow: tracking at {self.uri} is unreachable ({_first_line(err)}); training continues, "
                     f"logging is queued{where} and sent when it answers")
        if self.queue:
            self._start()
        return self.down_since is None

    def run_id(self, key: str) -> str | None:
        """The MLflow id of the run with this key, once it has been created (None before, or while down)."""
        return self.runs.get(key)

    def knows(self, key: str) -> bool:
        """The run `key` exists, or its creation is queued."""
        with self._cond:
            return key in self.runs or any(op["key"] == key and op["op"] == "create_run" for op in self.queue)

    def ended(self, key: str, status: str | None = None) -> bool:
        """True when the run with this key is known to be terminated (with `status`, if given)."""
        have = self.statuses.get(key)
        return have in ("FINISHED", "FAILED", "KILLED") and (status is None or have == status)

    @property
    def available(self) -> bool:
        return self.down_since is None

    @property
    def pending(self) -> int:
        """Calls not sent yet (the one being sent included)."""
        with self._cond:
            return len(self.queue)

    # ---- writes (enqueue only) -------------------------------------------------------------
    def enqueue(self, op: str, key: str, **fields: Any) -> None:
        with self._cond:
            self.queue.append(self.outbox.add({"op": op, "key": key, "time": int(time.time() * 1000), **fields}))
            self._cond.notify()
        self._start()

    def create_run(self, key: str, experiment: str, name: str, tags: dict[str, Any], parent_key: str | None = None) -> bool:
        """Find or create the run `key` (in the background); True when it was not known before this call."""
        if self.knows(key):
            return False
        self.enqueue("create_run", key, experiment=experiment, name=name, tags={k: str(v) for k, v in tags.items()}, parent=parent_key)
        return True

    def log_params(self, key: str, params: dict[str, Any]) -> None:
        if params:
            self.enqueue("log_params", key, params={k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()})

    def log_metrics(self, key: str, metrics: dict[str, Any], step: int | None = None, dedupe: bool = False) -> None:
        """`dedupe`: skip if this step is already in the run (a resumed run re-reports epochs)."""
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if clean:
            self.enqueue("log_metrics", key, metrics=clean, step=step or 0, dedupe=dedupe)

    def set_tags(self, key: str, tags: dict[str, Any]) -> None:
        self.enqueue("set_tags", key, tags={k: str(v)[:5000] for k, v in tags.items()})

    def log_artifact(self, key: str, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self.enqueue("log_artifact", key, path=str(path), artifact_path=artifact_path)

    def log_text(self, key: str, text: str, artifact_file: str) -> None:
        self.enqueue("log_text", key, text=text, file=artifact_file)

    def log_table(self, key: str, table: dict[str, list], artifact_file: str) -> None:
        self.enqueue("log_table", key, table=table, file=artifact_file)

    def end_run(self, key: str, status: str = "FINISHED") -> None:
        self.enqueue("end_run", key, status=status)

    def delete_run(self, key: str) -> None:
        self.enqueue("delete_run", key)

    # ---- waiting ---------------------------------------------------------------------------
    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the queue to drain; True when everything was sent."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.queue and time.monotonic() < deadline:
                self._cond.notify_all()
                self._cond.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            return not self.queue

    def close(self, grace_s: float | None = None) -> int:
        """Send what is queued; returns how many calls stay unsent (kept in the outbox).

        While the store answers this waits as long as sending takes. If it went down during the
        run it gets `grace_s` (SEGTUNE_MLFLOW_GRACE_S, default 30) to come back; if it was down
        from the start there is no wait: the outbox keeps everything for the next run.
        """
        grace = float(os.environ.get("SEGTUNE_MLFLOW_GRACE_S", "30")) if grace_s is None else grace_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = None
        while self.pending and self._thread is not None and self._thread.is_alive():
            if self.down_since is not None:
                if deadline is None:
                    limit = min(grace, 2.0) if self.down_at_start else grace
                    deadline = time.monotonic() + limit
                    if limit > 2.0:
                        self.log(f"mlflow: waiting up to {limit:.0f}s for {self.uri} to take {self.pending} queued calls")
                if time.monotonic() >= deadline:
                    break
            self.flush(0.5)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)  # a call in flight ends (sent or not) before the outbox is final
        left = self.pending
        if not left:
            self.outbox.compact(self.runs, self.statuses, self.uri)
            return 0
        self.log(f"WARNING mlflow: {left} logging calls could not be sent to {self.uri}; they are kept in {self.outbox.path} "
                 "and sent by the next run of this stage or its --sync-mlflow")
        return left

    # ---- the writer thread -----------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self.queue and not self._closing:
                    self._cond.wait()
                if not self.queue or self._stopped:
                    return
                op = self.queue[0]  # stays queued (and pending) until it is sent
            ok = self._send(op)
            with self._cond:
                if ok:
                    self.queue.popleft()
                self._cond.notify_all()
                if not ok and not self._stopped:
                    self._cond.wait(timeout=1.0 if self._closing else RETRY_AFTER_S)

    def _send(self, op: dict) -> bool:
        """Run one operation; False when the store is down (it is retried), True when done or dropped."""
        try:
            run_id = self._execute(op)
        except Exception as err:
            if _is_permanent(err):
                self.log(f"WARNING mlflow: {op['op']} for {op['key']} dropped: {_first_line(err)}")
                self.outbox.ack(op)
                return True
            if self.down_since is None:
                self.down_since = time.monotonic()
                self.log(f"WARNING mlflow: tracking at {self.uri} failed ({_first_line(err)}); training continues, logging is queued")
            return False
        self.outbox.ack(op, run_id)
        if self.down_since is not None:
            self.log(f"mlflow: tracking at {self.uri} is back after {time.monotonic() - self.down_since:.0f}s; queued logging is being sent")
            self.down_since = None
            self.down_at_start = False
        return True

    def _experiment_id(self, name: str) -> str:
        if name not in self.experiments:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None and exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            if exp is None:
                db = sqlite_path(self.uri)
                location = (db.parent / "mlartifacts").resolve().as_uri() if db else None
                # The UI opens "custom model development" experiments on the training-runs view.
                exp_id = self.client.create_experiment(name, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"})
            else:
                exp_id = exp.experiment_id
            self.experiments[name] = exp_id
        return self.experiments[name]

    def _find_or_create(self, op: dict) -> str:
        exp_id = self._experiment_id(op["experiment"])
        found = self.client.search_runs([exp_id], f"tags.`{RUN_KEY_TAG}` = '{op['key']}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.statuses[op["key"]] = found[0].info.status
            self.logged_steps[op["key"]] = {int(m.step) for m in self.client.get_metric_history(run_id, DEDUPE_METRIC)}
            return run_id
        tags = dict(op["tags"], **{RUN_KEY_TAG: op["key"]})
        if op.get("parent"):
            if op["parent"] not in self.runs:
                raise PermanentError(f"its parent run {op['parent']} was never created")
            tags["mlflow.parentRunId"] = self.runs[op["parent"]]
        self.logged_steps[op["key"]] = set()
        self.statuses[op["key"]] = "RUNNING"
        return self.client.create_run(exp_id, start_time=op["time"], tags=tags, run_name=op["name"]).info.run_id

    def _execute(self, op: dict) -> str | None:
        from mlflow.entities import Metric, Param, RunTag

        kind, key = op["op"], op["key"]
        if kind == "create_run":
            if key not in self.runs:
                self.runs[key] = self._find_or_create(op)
            return self.runs[key]
        run_id = self.runs.get(key)
        if run_id is None:
            raise PermanentError("its run was never created")
        if kind == "log_metrics":
            if key not in self.logged_steps:  # a run known from the outbox: what an earlier session logged
                self.logged_steps[key] = {int(m.step) for m in self.client.get_metric_history(run_id, DEDUPE_METRIC)}
            steps = self.logged_steps[key]
            if op.get("dedupe") and op["step"] in steps:
                return None
            items = [Metric(k, v, op["time"], op["step"]) for k, v in op["metrics"].items()]
            for start in range(0, len(items), 500):
                self.client.log_batch(run_id, metrics=items[start : start + 500])
            if op.get("dedupe"):
                steps.add(op["step"])
        elif kind == "log_params":
            items = [Param(k, v) for k, v in op["params"].items()]
            for start in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[start : start + 100])
        elif kind == "set_tags":
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "log_artifact":
            if not Path(op["path"]).exists():
                raise PermanentError(f"{op['path']} no longer exists")
            self.client.log_artifact(run_id, op["path"], op.get("artifact_path"))
        elif kind == "log_text":
            self.client.log_text(run_id, op["text"], op["file"])
        elif kind == "log_table":
            self.client.log_table(run_id, op["table"], op["file"])
        elif kind == "end_run":
            self.client.set_terminated(run_id, op["status"], end_time=op["time"])
            self.statuses[key] = op["status"]
        elif kind == "delete_run":
            self.client.delete_run(run_id)
        return None


_open: dict[tuple[str, str], Tracker] = {}


def open_tracker(uri: str, outbox: Path | None, log: Log = print) -> Tracker:
    """The one Tracker of this process for (store, outbox): the stage and its Tune callbacks share it."""
    key = (uri, str(outbox))
    if key not in _open:
        tracker = Tracker(uri, outbox, log)
        tracker.connect()
        _open[key] = tracker
    return _open[key]


def close_tracker(tracker: Tracker, grace_s: float | None = None) -> int:
    _open.pop((tracker.uri, str(tracker.outbox.path)), None)
    return tracker.close(grace_s)


def sync_outbox(outbox: Path, uri: str, log: Log = print) -> int:
    """`--sync-mlflow`: send what a stage's outbox still holds; returns the calls left unsent."""
    if not outbox.is_file():
        log(f"mlflow: {outbox}: nothing to send")
        return 0
    tracker = Tracker(uri, outbox, log)
    pending = tracker.pending
    if not tracker.connect():
        log(f"mlflow: {uri} is still unreachable; {pending} calls stay in {outbox}")
        return pending
    left = tracker.close(grace_s=0)
    log(f"mlflow: sent {pending - left} of {pending} calls from {outbox} to {uri}")
    return left
