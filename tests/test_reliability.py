"""Misuse and faults, as a careful and a hostile user would cause them, on real CamVid, Ray and MLflow.

Tiny searches (2 trials x 2 epochs on 16 images at 64 px) keep each case to seconds of training;
every process a test starts is stopped by that test.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, REPO, write_camvid_subset
from services import free_port
from test_search import read_leaderboard, search_cmd, search_env, short_tmp, stop_ray_processes, tail

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TINY_TRIALS = 2


def tiny_space(path: Path) -> Path:
    """deeplab.yaml whose --smoke block makes a 2-trial, 2-epoch search on 16 images."""
    space = yaml.safe_load((REPO / "search_spaces" / "deeplab.yaml").read_text())
    space["smoke"] = {
        "data": {"subset": 16},
        "trainer": {"epochs": 2},
        "search": {"num_samples": TINY_TRIALS, "max_concurrent": 2, "n_startup_trials": 1, "scheduler": {"max_t": 2, "grace_period": 1}},
    }
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return tiny_space(root / "tiny.yaml"), write_camvid_subset(root / "camvid24", n_train=24, n_test=2)


def tiny_cmd(tiny, experiment: str, uri: str, *extra: str) -> list[str]:
    space, data = tiny
    return search_cmd("--space", str(space), "--smoke", "--data", str(data), "--experiment", experiment, "--mlflow-uri", uri, *extra)


def state_of(results: Path, experiment: str) -> dict:
    path = results / experiment / "search_state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def search_runs(uri: str, experiment: str, role: str) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], f"tags.`segtune.role` = '{role}'", run_view_type=ViewType.ALL)


def wait_until(predicate, proc: subprocess.Popen, timeout: float, log: Path, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the search ended before {what}:\n{tail(log)}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n{tail(log)}")


def run_to_end(cmd: list[str], env: dict, log: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    with open(log, "w") as out:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)


# ---- one search per experiment --------------------------------------------------------------


def test_a_second_search_with_the_same_name_is_refused(tiny, tmp_path):
    """Two searches named alike, started a second apart: the second gets one line naming the first;
    a third, other experiment starting at the same moment on the same new sqlite store, runs."""
    results, ray_tmp, other_tmp = tmp_path / "results", short_tmp("rt"), short_tmp("rt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # a new store: both first runs migrate it at once
    first_log, other_log = tmp_path / "first.log", tmp_path / "other.log"
    with open(first_log, "w") as out, open(other_log, "w") as other_out:
        first = subprocess.Popen(tiny_cmd(tiny, "same", uri), cwd=REPO, env=search_env(results, ray_tmp), stdout=out, stderr=subprocess.STDOUT)
        other = subprocess.Popen(tiny_cmd(tiny, "other", uri), cwd=REPO, env=search_env(results, other_tmp), stdout=other_out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: (results / ".same.lock").exists(), first, 120, first_log, "its lock")
            time.sleep(1)
            second = subprocess.run(tiny_cmd(tiny, "same", uri), cwd=REPO, env=search_env(results, short_tmp("rt")), capture_output=True, text=True, timeout=300)
            first.wait(timeout=600)
            other.wait(timeout=600)
        finally:
            for proc in (first, other):
                if proc.poll() is None:
                    proc.kill()
            stop_ray_processes(ray_tmp)
            stop_ray_processes(other_tmp)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
    assert lines[0].startswith("error: ") and "in use by search" in lines[0] and f"pid {first.pid}" in lines[0]
    assert first.returncode == 0, tail(first_log)
    assert other.returncode == 0, tail(other_log)
    board = read_leaderboard(results / "same" / "leaderboard.csv")
    assert len(board) == TINY_TRIALS  # not merged with a second search's trials
    best = yaml.safe_load((results / "same" / "best_configs.yaml").read_text())
    assert len({json.dumps(c["params"], sort_keys=True) for c in best["configs"]}) == len(best["configs"])
    parents = search_runs(uri, "same", "search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(read_leaderboard(results / "other" / "leaderboard.csv")) == TINY_TRIALS


# ---- a failure in the first seconds leaves no dead end ----------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_search_stopped_during_start_up_blocks_nothing(tiny, tmp_path, sig):
    results, ray_tmp = tmp_path / "results", short_tmp("rt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = search_env(results, ray_tmp)
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(tiny_cmd(tiny, "early", uri), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            # Stopped the moment its MLflow parent run exists: Ray is up, Tune sets up or waits for the first
            # trial's worker (a Ctrl-C Tune catches itself), no trial is scheduled yet.
            wait_until(lambda: state_of(results, "early").get("mlflow", {}).get("parent_run_id"), proc, 120, log, "its parent run")
            assert state_of(results, "early")["status"] == "starting"
            proc.send_signal(sig)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            stop_ray_processes(ray_tmp)
    state = state_of(results, "early")
    assert not state.get("trials")
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "did not start (interrupted)" in log.read_text(), tail(log)
        assert state["status"] == "failed start" and state["failure"] == "interrupted"
        rerun = search_cmd("--resume", "--experiment", "early")  # --resume of a search that never started starts it
    else:
        rerun = tiny_cmd(tiny, "early", uri)  # a plain rerun
    second = run_to_end(rerun, env, tmp_path / "second.log")
    stop_ray_processes(ray_tmp)
    assert second.returncode == 0, tail(tmp_path / "second.log")
    assert "never scheduled a trial" in (tmp_path / "second.log").read_text()
    assert len(read_leaderboard(results / "early" / "leaderboard.csv")) == TINY_TRIALS
    parents = search_runs(uri, "early", "search")
    assert sorted(r.info.status for r in parents) == ["FAILED", "FINISHED"]
    failed = next(r for r in parents if r.info.status == "FAILED")  # the start that never scheduled a trial
    assert failed.data.tags["segtune.failure"] == ("interrupted" if sig == signal.SIGINT else "killed during start-up")


# ---- MLflow history is repaired, not dropped ----------------------------------------------------


def test_an_unreachable_store_is_reported_at_once_and_synced_later(tiny, tmp_path):
    results, ray_tmp = tmp_path / "results", short_tmp("rt")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"  # nothing listens there yet
    log = tmp_path / "search.log"
    started = time.time()
    proc = run_to_end(tiny_cmd(tiny, "offline", uri), search_env(results, ray_tmp), log)
    elapsed = time.time() - started
    stop_ray_processes(ray_tmp)
    out = log.read_text()
    assert proc.returncode == 0, tail(log)
    warning = next(i for i, line in enumerate(out.splitlines()) if f"tracking at {uri} is unreachable" in line)
    assert warning < 15, out.splitlines()[:20]  # said at start-up, before any training
    assert "waiting up to" not in out  # no grace period spent on a store that was never there
    assert "kept in" in out and (results / "offline" / "mlflow_outbox.jsonl").is_file()
    board = read_leaderboard(results / "offline" / "leaderboard.csv")
    assert len(board) == TINY_TRIALS and elapsed < 300

    # the store comes up where the search wanted it: --sync-mlflow sends everything
    with mlflow_server_on(port, tmp_path) as served:
        sync = subprocess.run(search_cmd("--sync-mlflow", "--experiment", "offline"), cwd=REPO, env=search_env(results, ray_tmp),
                              capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0, sync.stdout[-2000:] + sync.stderr[-2000:]
        check_every_trial_logged(served, "offline", board)


def mlflow_server_on(port: int, workdir: Path):
    from contextlib import contextmanager

    from services import start_mlflow_server, stop_process_group

    @contextmanager
    def serve():
        proc = start_mlflow_server(f"sqlite:///{workdir / 'served.db'}", workdir / "artifacts", port, workdir / "server.log")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_process_group(proc)

    return serve()


def check_every_trial_logged(uri: str, experiment: str, board: list[dict]) -> None:
    """Every trial has a FINISHED child run with one val_miou per epoch trained; no run is left RUNNING."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    children = {r.data.tags.get("segtune.trial_id"): r for r in runs if r.data.tags.get("segtune.role") == "trial"}
    assert sorted(children) == sorted(row["trial_id"] for row in board)
    for row in board:
        run = children[row["trial_id"]]
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_miou"))
        assert steps == list(range(1, int(row["epochs_trained"]) + 1)), (row["trial_id"], steps)


# ---- Ctrl-C keeps what was checkpointed ---------------------------------------------------------


def trial_epochs(trial_dir: Path) -> list[int]:
    """Every epoch the trainer ran for this trial, in order (events.log of its newest checkpoint)."""
    newest = max(trial_dir.glob("checkpoint_*"), key=lambda p: p.name)
    return [int(line.split()[2]) for line in (newest / "events.log").read_text().splitlines() if line.split()[1] == "epoch"]


def test_ctrl_c_keeps_checkpointed_epochs(tiny, tmp_path):
    """Ctrl-C the moment an epoch's checkpoint reaches storage: Tune stops before its controller
    records that result, but the leaderboard counts the epoch and the resume does not train it again."""
    results, ray_tmp = tmp_path / "results", short_tmp("rt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = search_env(results, ray_tmp)
    log = tmp_path / "first.log"
    tune_dir = results / "cc" / "tune"
    with open(log, "w") as out:
        proc = subprocess.Popen(tiny_cmd(tiny, "cc", uri), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: any(tune_dir.glob("trial_*/checkpoint_*/events.log")), proc, 300, log, "a checkpoint")
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            stop_ray_processes(ray_tmp)
    assert proc.returncode == 130, tail(log)
    board = {row["trial_id"]: row for row in read_leaderboard(results / "cc" / "leaderboard.csv")}
    checkpointed = {d.name.removeprefix("trial_"): trial_epochs(d) for d in tune_dir.glob("trial_*") if any(d.glob("checkpoint_*/events.log"))}
    assert checkpointed
    for trial_id, epochs in checkpointed.items():
        assert int(board[trial_id]["epochs_trained"]) == max(epochs), (trial_id, board[trial_id], epochs)

    second = run_to_end(search_cmd("--resume", "--experiment", "cc"), env, tmp_path / "second.log")
    stop_ray_processes(ray_tmp)
    assert second.returncode == 0, tail(tmp_path / "second.log")
    for trial_id, before in checkpointed.items():
        epochs = trial_epochs(tune_dir / f"trial_{trial_id}")
        assert epochs[: len(before)] == before and epochs == sorted(set(epochs)), (trial_id, epochs)  # none trained twice


# ---- one error line, nothing written --------------------------------------------------------------


def read_only(cmd: list[str], *dirs: Path) -> list[str]:
    """`cmd` with `dirs` read-only. Root ignores permission bits, so as root the command runs in a
    private mount namespace where the dirs are read-only bind mounts; otherwise chmod 555 does."""
    if os.geteuid() != 0:
        for d in dirs:
            d.chmod(0o555)
        return cmd
    mounts = " && ".join(f"mount --bind {shlex.quote(str(d))} {shlex.quote(str(d))} && "
                         f"mount -o remount,bind,ro {shlex.quote(str(d))} {shlex.quote(str(d))}" for d in dirs)
    return ["unshare", "--mount", "sh", "-c", f'{mounts} && exec "$@"', "sh", *cmd]


def test_a_read_only_sqlite_store_is_one_line(tiny, tmp_path):
    space, data = tiny
    store = tmp_path / "store"
    store.mkdir()
    results = tmp_path / "results"
    results.mkdir()
    started = time.time()
    cmd = search_cmd("--space", str(space), "--smoke", "--data", str(data), "--experiment", "ro", "--mlflow-uri", f"sqlite:///{store / 'mlflow.db'}")
    proc = subprocess.run(read_only(cmd, store), cwd=REPO, env=search_env(results, short_tmp("rt")), capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: mlflow: ") and str(store) in lines[0] and "not writable" in lines[0]
    assert time.time() - started < 60  # no minutes of MLflow connection retries
    assert sorted(p.name for p in results.iterdir()) == []  # nothing written: no experiment dir, no lock left


def test_a_read_only_results_dir_is_one_line_for_the_kfold(tmp_path):
    from training.config import load_space
    from training.data.dataset import prepare_data
    from training.handoff import BestConfigs

    data = write_camvid_subset(tmp_path / "camvid", n_train=12, n_test=2)
    space = load_space("deeplab", smoke=True, overrides={"data.root": str(data)})
    manifest = prepare_data(space.defaults, log=lambda _: None).manifest
    entry = {"rank": 1, "trial_id": "t1", "epochs_trained": 1, "params": {}, "config": space.defaults.to_dict()}
    experiment = tmp_path / "results" / "ro"
    experiment.mkdir(parents=True)
    BestConfigs(experiment="ro", space=space.source, smoke=True, data_root=str(data), fold_manifest=str(manifest.path), configs=[entry]).write(experiment / "best_configs.yaml")
    cmd = [PYTHON, "training/final_kfold.py", "--experiment", "ro", "--smoke"]
    proc = subprocess.run(read_only(cmd, experiment), cwd=REPO, env=dict(os.environ, SEGTUNE_RESULTS=str(tmp_path / "results")),
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and str(experiment / "kfold") in lines[0] and "not writable" in lines[0]
    assert sorted(p.name for p in experiment.iterdir()) == ["best_configs.yaml"]


def test_a_search_that_fails_validation_writes_nothing(capsys, monkeypatch, tmp_path):
    from training.cli import run_cli
    from tune import search

    space = yaml.safe_load((REPO / "search_spaces" / "deeplab.yaml").read_text())
    space["model"]["encoder"] = {"choice": ["resnet18", "resnet_nope"], "default": "resnet18"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(space))
    results = tmp_path / "results"
    monkeypatch.setenv("SEGTUNE_RESULTS", str(results))
    monkeypatch.setattr("sys.argv", ["tune/search.py", "--space", str(bad), "--smoke", "--experiment", "invalid"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(search.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "model.encoder" in err and "main config" in err
    assert not (results / "invalid").exists() and not list(results.glob(".*.lock"))


# ---- the k-fold: one per directory, never a search that is still running -------------------------


def hold_lock(directory: Path, stage: str) -> subprocess.Popen:
    code = ("import sys, time\nfrom pathlib import Path\nfrom training.infra.locks import StageLock\n"
            f"with StageLock(Path(sys.argv[1]), {stage!r}):\n    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([PYTHON, "-c", code, str(directory)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def kfold_error(results: Path, *args: str) -> str:
    proc = subprocess.run([PYTHON, "training/final_kfold.py", *args], cwd=REPO, env=dict(os.environ, SEGTUNE_RESULTS=str(results)),
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_kfold_refuses_a_running_search_and_a_second_kfold(tmp_path):
    results = tmp_path / "results"
    finished = results / "finished"
    finished.mkdir(parents=True)
    (finished / "search_state.json").write_text("{}")
    (finished / "best_configs.yaml").write_text("format: segtune.best_configs\n")
    running = results / "running"
    running.mkdir()
    (running / "search_state.json").write_text("{}")
    holder = hold_lock(running, "search")
    try:
        line = kfold_error(results)  # no --experiment: not silently the other, finished one
        assert "'running' is still running" in line and f"pid {holder.pid}" in line
        assert "is still running" in kfold_error(results, "--experiment", "running")
    finally:
        holder.terminate()
        holder.wait(timeout=30)
    kfold = hold_lock(finished / "kfold", "k-fold")
    try:
        line = kfold_error(results, "--experiment", "finished")
        assert "in use by k-fold" in line and f"pid {kfold.pid}" in line and str(finished / "kfold") in line
    finally:
        kfold.terminate()
        kfold.wait(timeout=30)
