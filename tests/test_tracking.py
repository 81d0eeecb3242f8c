"""The MLflow writer (training/infra/tracking.py) against a real `mlflow server` that goes away and comes back."""

from __future__ import annotations

import json

import pytest

from services import free_port, start_mlflow_server, stop_process_group
from training.infra.tracking import Tracker, sync_outbox


@pytest.fixture
def server(tmp_path):
    """Start/stop an MLflow server on one fixed port and sqlite file, as often as a test likes."""
    port = free_port()
    procs = []

    def start():
        procs.append(start_mlflow_server(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "artifacts", port, tmp_path / "server.log"))

    def stop():
        stop_process_group(procs[-1])

    yield f"http://127.0.0.1:{port}", start, stop
    for proc in procs:
        stop_process_group(proc)


def epochs_of(uri: str, experiment: str, key: str) -> tuple[str, list[int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    [run] = client.search_runs([exp.experiment_id], f"tags.`segtune.run_key` = '{key}'")
    return run.info.status, sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch"))


def test_outbox_keeps_what_an_outage_held_back_across_processes(server, tmp_path):
    uri, start, stop = server
    outbox = tmp_path / "mlflow_outbox.jsonl"
    log: list[str] = []
    start()
    first = Tracker(uri, outbox, log.append)
    assert first.connect()
    first.create_run("s/trial/a", "exp", "trial_a", {"segtune.role": "trial"})
    for epoch in (1, 2):
        first.log_metrics("s/trial/a", {"epoch": epoch, "val_miou": epoch / 10}, step=epoch, dedupe=True)
    assert first.close() == 0
    assert [json.loads(line)["run"] for line in outbox.read_text().splitlines()] == ["s/trial/a"]  # compacted: the run map only
    assert epochs_of(uri, "exp", "s/trial/a") == ("RUNNING", [1, 2])

    stop()  # the outage outlasts this "driver": a new one logs while nothing answers
    second = Tracker(uri, outbox, log.append)
    assert not second.connect()
    assert any("is unreachable" in line for line in log)
    for epoch in (2, 3):  # epoch 2 again, as a resumed trial re-reports it
        second.log_metrics("s/trial/a", {"epoch": epoch, "val_miou": epoch / 10}, step=epoch, dedupe=True)
    second.end_run("s/trial/a", "FINISHED")
    second.create_run("s/trial/b", "exp", "trial_b", {"segtune.role": "trial"})
    second.end_run("s/trial/b", "FINISHED")
    assert second.close(grace_s=30) == 5  # down from the start: no wait, everything kept on disk
    assert any("kept in" in line for line in log)

    start()
    assert sync_outbox(outbox, uri, log.append) == 0
    assert epochs_of(uri, "exp", "s/trial/a") == ("FINISHED", [1, 2, 3])  # epoch 2 not twice
    assert epochs_of(uri, "exp", "s/trial/b") == ("FINISHED", [])
    assert sync_outbox(outbox, uri, log.append) == 0  # nothing left: a second sync sends nothing twice
    assert epochs_of(uri, "exp", "s/trial/a") == ("FINISHED", [1, 2, 3])


def test_a_server_back_within_the_run_gets_the_queue(server, tmp_path):
    uri, start, stop = server
    start()
    tracker = Tracker(uri, tmp_path / "outbox.jsonl", lambda line: None)
    assert tracker.connect()
    tracker.create_run("k", "exp", "run", {})
    assert tracker.flush(30)
    stop()
    tracker.log_metrics("k", {"epoch": 1}, step=1, dedupe=True)  # enqueued at once: the caller never waits
    tracker.end_run("k", "FINISHED")
    start()
    assert tracker.close(grace_s=60) == 0
    assert epochs_of(uri, "exp", "k") == ("FINISHED", [1])


def test_a_read_only_or_broken_sqlite_store_is_one_line(tmp_path):
    from training.errors import SegtuneError

    db = tmp_path / "broken.db"
    db.write_text("not a database")
    with pytest.raises(SegtuneError) as err:
        Tracker(f"sqlite:///{db}", None).connect()
    assert "\n" not in str(err.value) and str(db) in str(err.value)
