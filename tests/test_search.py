"""The Ray Tune search (tune/search.py) on real CamVid subsets, a real local Ray and MLflow sqlite.

One module-scoped smoke search (32 images, 64 px, 6 trials, ASHA max_t 4, 2 concurrent) runs
the real command in a subprocess; while it runs, one trial's worker is killed with SIGKILL.
Most assertions read what that search left behind. One more search has its driver killed and
then resumed (the two-node cluster is tests/test_multinode.py). Every process a test starts is
stopped by that test, by pid.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import PYTHON, REPO, write_camvid_subset


SMOKE_TRIALS = 6  # SMOKE_PRESET: 6 trials, max_t 4 = trainer.epochs, 3 start-up trials, 2 at once
SMOKE_EPOCHS = 4
SMOKE_STARTUP = 3
RESUME_TRIALS = 4  # killed after 2 finished, 2 more after the resume
FINISHED = ("completed", "stopped by ASHA")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ---- helpers -------------------------------------------------------------------------------
def short_tmp(prefix: str) -> Path:
    # Ray puts unix sockets under its temp dir; pytest's tmp paths can exceed the 107-byte limit.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def search_env(results: Path, ray_tmp: Path, **extra: str) -> dict[str, str]:
    # PYTHONFAULTHANDLER: a process killed by a signal leaves its Python stacks in the log
    env = dict(os.environ, SEGTUNE_RESULTS=str(results), RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def stop_ray_processes(ray_tmp: Path) -> None:
    """Stop leftovers of a local Ray whose driver was killed: found by the RAY_TMPDIR we gave it."""
    marker = f"RAY_TMPDIR={ray_tmp}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 15
    for pid in pids:
        while time.time() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.2)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def search_cmd(*args: str) -> list[str]:
    return [PYTHON, "tune/search.py", *args]


def read_leaderboard(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def events(trial_dir: Path) -> list[tuple[float, str, dict[str, str]]]:
    """(time, kind, fields) per line of the trainable's events.log in the trial's latest checkpoint."""
    out = []
    try:
        latest = max(trial_dir.glob("checkpoint_*"), key=lambda p: p.name)
        lines = (latest / "events.log").read_text().splitlines()
    except (ValueError, OSError):  # no checkpoint yet, or Tune is replacing it right now
        return out
    for line in lines:
        stamp, kind, *rest = line.split(" ")
        fields = dict(part.split("=", 1) for part in rest if "=" in part)
        if kind == "epoch":
            fields["epoch"] = rest[0]
        out.append((float(stamp), kind, fields))
    return out


def stored_study(results_dir: Path):
    """The search's Optuna study, read from its storage file (results/<experiment>/optuna_study.log)."""
    from tune.space import load_study

    return load_study(results_dir, results_dir.name)


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


# ---- the module's smoke search (+ one worker killed mid-trial) ----------------------------------
def kill_a_running_worker(tune_dir: Path, proc: subprocess.Popen) -> dict | None:
    """SIGKILL the worker of the first trial that logged epoch 3 but not 4.

    Epoch 3 is no ASHA rung (rungs at 1 and 2), so that trial is running epoch 4 when killed;
    Tune must restart it from its last checkpoint."""
    while proc.poll() is None:
        for trial_dir in sorted(tune_dir.glob("trial_*")):
            ev = events(trial_dir)
            epochs = [int(f["epoch"]) for _, kind, f in ev if kind == "epoch"]
            if epochs and epochs[-1] == SMOKE_EPOCHS - 1:
                pid = int([f for _, kind, f in ev if kind == "start"][-1]["pid"])
                os.kill(pid, signal.SIGKILL)
                return {"trial_id": trial_dir.name.removeprefix("trial_"), "pid": pid, "last_epoch": epochs[-1], "time": time.time()}
        time.sleep(0.1)
    return None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    data = write_camvid_subset(root / "camvid32", n_train=32)
    results, ray_tmp = root / "results", short_tmp("rt")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    log = root / "search.log"
    cmd = search_cmd("--space", "deeplab", "--smoke", "--data", str(data), "--experiment", "smoke", "--mlflow-uri", uri)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=search_env(results, ray_tmp), stdout=out, stderr=subprocess.STDOUT)
        try:
            killed = kill_a_running_worker(results / "smoke" / "tune", proc)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
            stop_ray_processes(ray_tmp)
    exp = results / "smoke"
    yield SimpleNamespace(
        rc=proc.returncode,
        seconds=time.perf_counter() - started,
        log=log,
        data=data,
        dir=exp,
        tune_dir=exp / "tune",
        uri=uri,
        killed=killed,
        leaderboard=read_leaderboard(exp / "leaderboard.csv"),
        best=yaml.safe_load((exp / "best_configs.yaml").read_text()) if (exp / "best_configs.yaml").is_file() else None,
    )


def test_smoke_search_writes_leaderboard_and_best_configs(smoke):
    from training.config import config_from_dict

    assert smoke.rc == 0, tail(smoke.log)
    # Tune stops trials without waiting for their threads; a worker exiting meanwhile used to abort
    assert "Fatal Python error" not in smoke.log.read_text()
    board = smoke.leaderboard
    assert len(board) == SMOKE_TRIALS
    assert all(row["status"] in FINISHED for row in board), [row["status"] for row in board]
    mious = [float(row["best_val_miou"]) for row in board]
    assert mious == sorted(mious, reverse=True) and mious[0] > 0
    for row in board:
        assert {"model.encoder", "optimizer.lr", "loss.weights.ce"} <= set(row)
        assert row["mlflow_run_id"] and row["node_id"]
        assert 1 <= int(row["epochs_trained"]) <= SMOKE_EPOCHS

    best = smoke.best
    assert best["experiment"] == "smoke" and best["smoke"] is True and best["metric"] == "val_miou" and best["fold"] == 0
    assert best["data_root"] == str(smoke.data.resolve())
    assert best["space"].endswith("search_spaces/deeplab.yaml")
    assert best["mlflow_tracking_uri"] == smoke.uri and best["search_parent_run_id"] and best["mlflow_experiment_id"]
    assert Path(best["fold_manifest"]).is_file()
    assert [c["rank"] for c in best["configs"]] == [1, 2]  # search.top_k = 2 in the smoke preset
    # completed trials first (tune/diversity.py: by the chosen top-k method), then by rank
    selection = best["selection"]
    completed = [row["trial_id"] for row in board if row["status"] == "completed"]
    chosen = selection[selection["method"]]["trials"]
    assert set(chosen) <= set(completed) and (selection["method"] == "diverse" or chosen == completed[:2])
    assert [c["trial_id"] for c in best["configs"]] == (chosen + [row["trial_id"] for row in board if row["trial_id"] not in completed])[:2]
    for entry in best["configs"]:
        cfg = config_from_dict(entry["config"])  # the k-fold stage must be able to read it back
        assert cfg.data.image_size == 64 and cfg.trainer.epochs == SMOKE_EPOCHS
        for path, value in entry["params"].items():
            node = entry["config"]
            for key in path.split("."):
                node = node[key]
            assert node == value, path
        assert 1 <= entry["best_epoch"] <= entry["epochs_trained"] <= SMOKE_EPOCHS
        assert Path(entry["checkpoint"]).is_file() and entry["checkpoint"].endswith("best.pt")
        # the resume state of finished trials is dropped, the best model kept
        assert not (Path(entry["checkpoint"]).parent / "last.pt").exists()
    state = json.loads((smoke.dir / "search_state.json").read_text())
    assert state["status"] == "finished" and len(state["trials"]) == SMOKE_TRIALS


def test_completed_trials_keep_validation_probabilities_for_the_top_k_selection(smoke):
    """tune/diversity.py on the search's own trials: files, both fold ensembles recomputed, the parent run."""
    import numpy as np
    import torch

    from training.evaluation.metrics import ConfusionMatrix

    assert smoke.rc == 0, tail(smoke.log)
    classes = smoke.best["configs"][0]["config"]["data"]["classes"] or []
    kept = {}
    for row in smoke.leaderboard:
        files = sorted((smoke.tune_dir / f"trial_{row['trial_id']}").glob("checkpoint_*/val_*.npy"))
        if row["status"] != "completed":  # ASHA-stopped: dropped at the end of the search
            assert not files, row
            continue
        latest = Path(row["checkpoint"]).parent
        assert [f.name for f in files] == ["val_ids.npy", "val_proba.npy", "val_target.npy"] and {f.parent for f in files} == {latest}
        proba, ids, target = (np.load(latest / f"val_{name}.npy") for name in ("proba", "ids", "target"))
        assert proba.dtype == target.dtype == np.uint8 and proba.shape[0] == len(ids) == target.shape[0] >= 4
        assert proba.shape[2:] == target.shape[1:] == (64, 64) and (not classes or proba.shape[1] == len(classes))
        kept[row["trial_id"]] = (proba, target)
    selection = smoke.best["selection"]
    assert selection["candidates"] == list(kept) and selection["asked"] == "auto" and selection["fold"] == 0

    def fold_miou(trials):
        total = sum(kept[t][0].astype(np.float64) for t in trials)
        cm = ConfusionMatrix(total.shape[1])
        cm.update(torch.from_numpy(total.argmax(1)), torch.from_numpy(kept[trials[0]][1].astype(np.int64)))
        return cm.scores().miou

    scores = {name: selection[name]["fold_miou"] for name in ("individual", "diverse")}
    for name, value in scores.items():
        assert value == pytest.approx(fold_miou(selection[name]["trials"]), abs=1e-9), name
    assert selection["individual"]["trials"] == list(kept)[:2]
    if len(kept) > 2:  # auto hands off the higher ensemble; with <= top_k candidates there is nothing to choose
        assert selection["method"] == ("diverse" if scores["diverse"] > scores["individual"] else "individual")
    else:
        assert selection["method"] == "individual" and selection["chosen_by"].startswith(f"only {len(kept)} candidate(s)")
    log = smoke.log.read_text()
    assert f"  individual  {scores['individual']:.4f}  " in log and f"  diverse     {scores['diverse']:.4f}  " in log

    client = mlflow_client(smoke.uri)
    parent_id = smoke.best["search_parent_run_id"]
    metrics = client.get_run(parent_id).data.metrics
    assert metrics["topk_individual_fold_miou"] == pytest.approx(scores["individual"]) and metrics["topk_diverse_fold_miou"] == pytest.approx(scores["diverse"])
    logged = json.loads(Path(client.download_artifacts(parent_id, "topk_selection.json")).read_text())
    assert logged == selection


def test_asha_stops_trials_before_max_t(smoke):
    assert smoke.rc == 0, tail(smoke.log)
    stopped = [row for row in smoke.leaderboard if row["status"] == "stopped by ASHA"]
    assert stopped, [(row["status"], row["epochs_trained"]) for row in smoke.leaderboard]
    assert all(int(row["epochs_trained"]) < SMOKE_EPOCHS for row in stopped)
    assert any(row["status"] == "completed" and int(row["epochs_trained"]) == SMOKE_EPOCHS for row in smoke.leaderboard)
    # the trainer never ran past the epoch ASHA stopped it at
    for row in stopped:
        epochs = [int(f["epoch"]) for _, kind, f in events(smoke.tune_dir / f"trial_{row['trial_id']}") if kind == "epoch"]
        assert max(epochs) == int(row["epochs_trained"])


def test_mlflow_parent_and_child_runs_agree_with_leaderboard(smoke):
    assert smoke.rc == 0, tail(smoke.log)
    client = mlflow_client(smoke.uri)
    exp = client.get_experiment_by_name("smoke")
    assert exp is not None and exp.experiment_id == smoke.best["mlflow_experiment_id"]
    parent_id = smoke.best["search_parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert {"leaderboard.csv", "best_config.yaml", "best_configs.yaml", "param_importances.json", "param_importances.png"} <= {
        a.path for a in client.list_artifacts(parent_id)}
    importances = json.loads(Path(client.download_artifacts(parent_id, "param_importances.json")).read_text())
    assert set(importances["columns"]) == {"param", "importance"} and len(importances["data"]) == len(smoke.best["configs"][0]["params"])
    assert "parameter importances (optuna fANOVA" in smoke.log.read_text()
    assert parent.data.tags["segtune.version.torch"] and parent.data.tags["segtune.version.ray"]
    assert [a.path for a in client.list_artifacts(parent_id, "environment")] == ["environment/packages.txt"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert parent.data.metrics["best_val_miou"] == pytest.approx(float(smoke.leaderboard[0]["best_val_miou"]), rel=1e-5)

    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children) == SMOKE_TRIALS  # one per trial, none duplicated by the killed trial's restart
    for run in [parent, *children]:  # MLflow's own reproducibility tags, on every run
        assert run.data.tags["mlflow.source.git.commit"] == commit and run.data.tags["mlflow.user"]
        assert run.data.tags["mlflow.source.name"].endswith("tune/search.py")
    by_trial = {run.data.tags["segtune.trial_id"]: run for run in children}
    for row in smoke.leaderboard:
        run = by_trial[row["trial_id"]]
        assert run.info.run_id == row["mlflow_run_id"]
        assert run.data.tags["segtune.status"] == row["status"]
        assert run.data.tags["segtune.fold"] == "0"
        assert run.data.tags["segtune.checkpoint"] == run.data.tags["segtune.best_checkpoint"] == row["checkpoint"]
        assert set(run.data.params) == {k for k in row if "." in k and k != "mlflow_run_id"}
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(float(row["optimizer.lr"]), rel=1e-4)
        history = client.get_metric_history(run.info.run_id, "val_miou")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, int(row["epochs_trained"]) + 1)), (row["trial_id"], steps)
        assert max(m.value for m in history) == pytest.approx(float(row["best_val_miou"]), rel=1e-5)
        assert run.data.metrics["best_val_miou"] == pytest.approx(float(row["best_val_miou"]), rel=1e-5)
        for name in ("train_loss", "val_loss", "lr", "epoch_seconds", "img_per_s", "iou_Background"):
            assert len(client.get_metric_history(run.info.run_id, name)) == int(row["epochs_trained"]), name
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "per_class_iou.png", "overlays.png"} <= artifacts


COST_COLUMNS = ("train_seconds", "s_per_epoch", "peak_mem_mb", "mem_kind", "infer_ms_per_image")


def test_trial_costs_reach_leaderboard_mlflow_and_the_pareto_plot(smoke):
    assert smoke.rc == 0, tail(smoke.log)
    client = mlflow_client(smoke.uri)
    runs = {run.data.tags["segtune.trial_id"]: run for run in client.search_runs(
        [smoke.best["mlflow_experiment_id"]], f"tags.`mlflow.parentRunId` = '{smoke.best['search_parent_run_id']}'")}
    for row in smoke.leaderboard:
        assert set(COST_COLUMNS) <= set(row) and row["mem_kind"] == "cpu_rss"
        train_s, per_epoch, peak, infer_ms = (float(row[c]) for c in ("train_seconds", "s_per_epoch", "peak_mem_mb", "infer_ms_per_image"))
        assert per_epoch * int(row["epochs_trained"]) == pytest.approx(train_s, rel=1e-4)
        assert 100 < peak < 64_000 and 0 < infer_ms < 1000 * per_epoch  # a torch process's RSS; a forward is part of an epoch
        # measured, not guessed: within the trial's wall time (model build and checkpoints excluded), most of it
        run = runs[row["trial_id"]]
        ev = events(smoke.tune_dir / f"trial_{row['trial_id']}")
        if row["failures"] == "0":
            wall = max(t for t, kind, _ in ev if kind == "epoch") - min(t for t, kind, _ in ev if kind == "start")
            assert 0.2 * wall < train_s <= wall, (train_s, wall)  # the rest: start-up, checkpoints, plots, waiting on Tune
            seconds = sum(m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds"))
            assert seconds == pytest.approx(train_s, rel=1e-4)
        for name in ("train_seconds", "s_per_epoch", "peak_mem_mb", "infer_ms_per_image"):  # per epoch, on the child run
            assert len(client.get_metric_history(run.info.run_id, name)) == int(row["epochs_trained"]), name
        assert run.data.metrics["train_seconds"] == pytest.approx(train_s, rel=1e-4) and run.data.tags["segtune.mem_kind"] == "cpu_rss"

    parent_id = smoke.best["search_parent_run_id"]
    assert {"pareto.png", "pareto.json"} <= {a.path for a in client.list_artifacts(parent_id)}
    assert client.get_run(parent_id).data.metrics["trials_over_budget"] == 0
    pareto = json.loads(Path(client.download_artifacts(parent_id, "pareto.json")).read_text())
    assert pareto == json.loads((smoke.dir / "pareto.json").read_text())
    assert (smoke.dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = {row["trial_id"]: (float(row["s_per_epoch"]), float(row["best_val_miou"])) for row in smoke.leaderboard}
    front = pareto["front"]
    assert front and [points[t][0] for t in front] == sorted(points[t][0] for t in front)
    for trial_id, (cost, miou) in points.items():  # the front holds exactly the trials no other trial beats on both
        beaten = any(c <= cost and m >= miou and (c, m) != (cost, miou) for c, m in points.values())
        assert (trial_id in front) == (not beaten), (trial_id, points, front)
    log = smoke.log.read_text()
    assert "pareto front (best val mIoU vs s/epoch): " + front[0] in log and "s/ep" in log and "ms/img" in log


def test_pareto_front_of_records():
    from tune.results import TrialRecord

    def record(trial_id, miou, per_epoch, status="completed"):
        return TrialRecord(trial_id, status, miou, 1, 1, {}, None, s_per_epoch=per_epoch)

    from tune.cost import pareto_front

    records = [record("slow_best", 0.70, 9.0), record("fast", 0.60, 1.0), record("mid", 0.65, 3.0), record("dominated", 0.62, 4.0),
               record("tie_slower", 0.60, 2.0), record("asha", 0.66, 3.5, "stopped by ASHA"), record("cheap_over", 0.90, 0.5, "over budget"),
               record("failed", 0.95, 0.1, "error: RuntimeError: boom"), record("unmeasured", 0.99, None)]
    assert [r.trial_id for r in pareto_front(records)] == ["fast", "mid", "asha", "slow_best"]
    assert pareto_front([]) == []


def test_killed_worker_restarts_from_its_checkpoint(smoke):
    assert smoke.killed, "no trial reached epoch 3 while the search ran"
    assert smoke.rc == 0, tail(smoke.log)
    trial_id = smoke.killed["trial_id"]
    ev = events(smoke.tune_dir / f"trial_{trial_id}")
    starts = [(t, f) for t, kind, f in ev if kind == "start"]
    assert len(starts) == 2, ev
    restart_time, restart = starts[1]
    assert int(restart["pid"]) != smoke.killed["pid"]
    resumed_from = int(restart["resume_epoch"])
    assert 1 <= resumed_from <= smoke.killed["last_epoch"]  # the last persisted checkpoint
    later = [int(f["epoch"]) for t, kind, f in ev if kind == "epoch" and t > restart_time]
    assert later == list(range(resumed_from + 1, SMOKE_EPOCHS + 1))  # continued, not from epoch 1
    row = next(r for r in smoke.leaderboard if r["trial_id"] == trial_id)
    assert row["status"] == "completed" and row["failures"] == "1"


def test_optuna_study_holds_every_trial_with_bounded_startup(smoke):
    import optuna

    from tune.space import random_draws

    assert smoke.rc == 0, tail(smoke.log)
    study = stored_study(smoke.dir)
    assert len(study.trials) == SMOKE_TRIALS
    # the space's defaults are the first trial evaluated
    from training.config import load_space
    from tune.space import default_point

    space = load_space("deeplab", smoke=True, overrides={"data.root": str(smoke.data)})
    assert study.trials[0].params == default_point(space)
    # with 2 trials at once TPE alone would draw 4 at random (it counts finished trials only)
    assert len(random_draws(study, SMOKE_STARTUP)) <= SMOKE_STARTUP
    # every trial, ASHA-stopped ones included, was told to Optuna with its last val mIoU
    by_params = {json.dumps(t.params, sort_keys=True): t for t in study.trials}
    for row in smoke.leaderboard:
        trial_dir = smoke.tune_dir / f"trial_{row['trial_id']}"
        told = by_params[json.dumps(json.loads((trial_dir / "params.json").read_text()), sort_keys=True)]
        last = json.loads((trial_dir / "result.json").read_text().splitlines()[-1])
        assert told.state == optuna.trial.TrialState.COMPLETE
        assert told.value == pytest.approx(last["val_miou"]) and last["epoch"] == int(row["epochs_trained"])


# ---- searcher unit checks (real Optuna, no cluster) --------------------------------------------
def _drive_searcher(search_alg, n_trials: int, concurrency: int) -> None:
    """Tune's calls to a searcher: keep `concurrency` trials out, finish the oldest first."""
    from ray import tune

    space = {"x": tune.uniform(0.0, 1.0), "y": tune.choice(["a", "b"])}
    search_alg.set_search_properties("val_miou", "max", space)
    live, asked = [], 0
    while asked < n_trials or live:
        while asked < n_trials and len(live) < concurrency:
            trial_id = f"t{asked}"
            if search_alg.suggest(trial_id) is None:
                break
            live.append(trial_id)
            asked += 1
        done = live.pop(0)
        search_alg.on_trial_complete(done, result={"val_miou": 0.5, "training_iteration": 1})


def _gate(tmp_path: Path, name: str, max_concurrent: int = 4, n_startup: int = 3):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from tune.space import StartupGate, study_storage

    sampler = optuna.samplers.TPESampler(n_startup_trials=n_startup, seed=1, constant_liar=True)
    searcher = OptunaSearch(sampler=sampler, study_name=name, storage=study_storage(tmp_path))
    return StartupGate(searcher, max_concurrent, n_startup, str(tmp_path), name)


def test_startup_gate_bounds_random_draws(tmp_path):
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from tune.space import load_study, random_draws, study_storage

    _drive_searcher(_gate(tmp_path, "gated"), 12, 4)
    gated = load_study(tmp_path, "gated")
    assert len(gated.trials) == 12
    assert len(random_draws(gated, 3)) == 3

    sampler = optuna.samplers.TPESampler(n_startup_trials=3, seed=1, constant_liar=True)
    plain = ConcurrencyLimiter(OptunaSearch(sampler=sampler, study_name="plain", storage=study_storage(tmp_path)), 4)
    _drive_searcher(plain, 12, 4)
    assert len(random_draws(load_study(tmp_path, "plain"), 3)) > 3  # what the gate prevents


def test_a_new_searcher_continues_the_stored_study(tmp_path):
    """The study lives in its storage file: a searcher built afresh (as if Tune had lost its
    pickled state) picks up every earlier trial instead of restarting TPE at random."""
    from tune.space import load_study, random_draws

    _drive_searcher(_gate(tmp_path, "study"), 6, 2)
    before = load_study(tmp_path, "study")
    best_before = before.best_value
    _drive_searcher(_gate(tmp_path, "study"), 4, 2)
    after = load_study(tmp_path, "study")
    assert len(after.trials) == 10 and after.trials[0].params == before.trials[0].params
    assert after.best_value >= best_before
    assert len(random_draws(after, 3)) == 3  # the second searcher drew nothing more at random


# ---- input errors: one line, before Ray starts -------------------------------------------------
def run_cli(capsys, monkeypatch, tmp_path, *args: str, results: Path | None = None) -> tuple[int, str]:
    from training.cli import run_cli as run
    from tune import search

    monkeypatch.setenv("SEGTUNE_RESULTS", str(results or tmp_path / "results"))
    monkeypatch.setattr("sys.argv", ["tune/search.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        run(search.main)
    return exit_info.value.code, capsys.readouterr().err


def test_invalid_space_is_one_line_naming_the_key(capsys, monkeypatch, tmp_path):
    space = yaml.safe_load((REPO / "search_spaces" / "deeplab.yaml").read_text())
    space["search"]["scheduler"]["max_t"] = 50  # > trainer.epochs (30)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(space))
    code, err = run_cli(capsys, monkeypatch, tmp_path, "--space", str(path))
    assert code == 2 and err.count("\n") == 1 and "search.scheduler.max_t" in err and "trainer.epochs=30" in err
    space["search"]["scheduler"]["max_t"] = 30
    space["optimizer"]["lr"] = {"loguniform": [0.0, 1.0e-3], "default": 1.0e-4}
    path.write_text(yaml.safe_dump(space))
    code, err = run_cli(capsys, monkeypatch, tmp_path, "--space", str(path))
    assert code == 2 and err.count("\n") == 1 and "optimizer.lr" in err


def test_unwritable_results_dir_is_one_line(capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = run_cli(capsys, monkeypatch, tmp_path, "--space", "deeplab", "--smoke", results=blocker / "results")
    assert code == 2 and err.count("\n") == 1 and "not writable" in err and "SEGTUNE_RESULTS" in err


def test_resume_of_unknown_experiment_is_one_line(capsys, monkeypatch, tmp_path):
    code, err = run_cli(capsys, monkeypatch, tmp_path, "--resume", "--experiment", "nope")
    assert code == 2 and err.count("\n") == 1 and "no such search to resume" in err


def test_max_trial_cost_must_be_a_positive_budget(capsys, monkeypatch, tmp_path):
    code, err = run_cli(capsys, monkeypatch, tmp_path, "--space", "deeplab", "--smoke", "--max-trial-cost", "0")
    assert code == 2 and err.count("\n") == 1 and "--max-trial-cost: 0 is not a budget" in err
    space = yaml.safe_load((REPO / "search_spaces" / "deeplab.yaml").read_text())
    space["search"]["max_trial_cost"] = -5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(space))
    code, err = run_cli(capsys, monkeypatch, tmp_path, "--space", str(path))
    assert code == 2 and err.count("\n") == 1 and "search.max_trial_cost" in err and "greater than 0" in err


def test_trials_over_the_cost_budget_are_skipped(tmp_path):
    """A budget below any trial's cost: every trial stops after its first epoch with a line, none is a best config."""
    import optuna

    from training.config import load_space
    from tune import resume
    from tune.results import best_configs, collect_records, ending_record

    data = write_camvid_subset(tmp_path / "camvid16", n_train=16)
    results, ray_tmp = tmp_path / "results", short_tmp("rt")
    log = tmp_path / "budget.log"
    cmd = search_cmd("--space", "deeplab", "--smoke", "--num-samples", "2", "--max-trial-cost", "1", "--data", str(data),
                     "--experiment", "budget", "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with open(log, "w") as out:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=search_env(results, ray_tmp), stdout=out, stderr=subprocess.STDOUT, timeout=400)
        finally:
            stop_ray_processes(ray_tmp)
    assert proc.returncode == 0, tail(log)
    exp = results / "budget"
    board = read_leaderboard(exp / "leaderboard.csv")
    assert len(board) == 2 and all(row["status"] == "over budget" and row["epochs_trained"] == "1" for row in board), board
    text = log.read_text()
    import re

    for row in board:  # said once per trial, by the driver; the trial never trained a second epoch
        lines = re.findall(rf"^trial {row['trial_id']}: projected ([\d.]+) s \(([\d.]+) s/epoch x 4\) exceeds --max-trial-cost 1 s; skipped$", text, re.M)
        assert len(lines) == 1 and float(lines[0][0]) > 1, text[-3000:]
        assert [f["epoch"] for _, kind, f in events(exp / "tune" / f"trial_{row['trial_id']}") if kind == "epoch"] == ["1"]
    assert not (exp / "best_configs.yaml").exists()
    assert json.loads((exp / "pareto.json").read_text())["front"] == []
    assert [t.state for t in stored_study(exp).trials] == [optuna.trial.TrialState.PRUNED] * 2  # told, not failed
    # what a resume reads back (Tune's saved trials, the recorded endings) keeps the status and the exclusion
    space = load_space("deeplab", smoke=True, overrides={"data.root": str(data), "search.max_trial_cost": 1})
    records = collect_records(resume.restored_trials(str(exp / "tune")), space)
    endings = resume.read_endings(exp)
    assert {r.status for r in records} == {e["status"] for e in endings.values()} == {"over budget"}
    assert best_configs(records, space) is None
    assert not any(ending_record(k, e, space).usable for k, e in endings.items())


# ---- driver killed mid-search, then --resume ---------------------------------------------------
def test_resume_after_the_driver_is_killed(tmp_path):
    from tune.space import random_draws

    data = write_camvid_subset(tmp_path / "camvid24", n_train=24)
    results, ray_tmp = tmp_path / "results", short_tmp("rt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = results / "resume"
    env = search_env(results, ray_tmp)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with open(first_log, "w") as out:
        first = subprocess.Popen(search_cmd("--space", "deeplab", "--smoke", "--num-samples", str(RESUME_TRIALS), "--data", str(data), "--experiment", "resume", "--mlflow-uri", uri),
                                 cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 400
            while time.time() < deadline and first.poll() is None:
                if sum(row["status"] in FINISHED for row in read_leaderboard(exp / "leaderboard.csv")) >= 2:
                    # Killed at once: Tune's own state (saved every 2 s, copied in the background)
                    # most likely still shows the last of them running; tune/resume.py must
                    # keep the resume from training it again.
                    break
                time.sleep(0.2)
            assert first.poll() is None, "the search ended before it could be killed:\n" + tail(first_log)
            first.send_signal(signal.SIGKILL)  # a crash: no chance to save anything
            first.wait(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
            stop_ray_processes(ray_tmp)
    killed_at = time.time()
    before = read_leaderboard(exp / "leaderboard.csv")
    finished_before = {row["trial_id"]: row for row in before if row["status"] in FINISHED}
    assert len(finished_before) >= 2
    starts_before = {d.name: sum(kind == "start" for _, kind, _ in events(d)) for d in (exp / "tune").glob("trial_*")}
    # Trials that started and ended between two of Tune's state saves: the resumed Tune never
    # sees them, tune/resume.py keeps them on the leaderboard (usually none).
    from ray.tune import ExperimentAnalysis

    unknown_to_tune = set(finished_before) - {t.trial_id for t in ExperimentAnalysis(str(exp / "tune")).trials}
    # The Optuna study as its storage file holds it after the kill: the resume must reload exactly this.
    study_before = stored_study(exp)
    best_before = max(t.value for t in study_before.trials if t.value is not None)
    params_before = [t.params for t in study_before.trials]

    with open(second_log, "w") as out:
        second = subprocess.run(search_cmd("--resume", "--experiment", "resume"), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    stop_ray_processes(ray_tmp)
    assert second.returncode == 0, (second.returncode, tail(second_log))

    after = read_leaderboard(exp / "leaderboard.csv")
    assert len(after) == RESUME_TRIALS + len(unknown_to_tune) and all(row["status"] in FINISHED for row in after), [row["status"] for row in after]
    for trial_id, row in finished_before.items():  # finished trials were not trained again
        trial_dir = exp / "tune" / f"trial_{trial_id}"
        assert sum(kind == "start" for _, kind, _ in events(trial_dir)) == starts_before[trial_dir.name]
        assert not [f for t, kind, f in events(trial_dir) if t > killed_at]
        now = next(r for r in after if r["trial_id"] == trial_id)
        assert (now["status"], now["best_val_miou"], now["mlflow_run_id"]) == (row["status"], row["best_val_miou"], row["mlflow_run_id"])

    # the Optuna study came back from its storage file (same trial count and best value as before
    # the resume), the pre-crash trials are the study's first trials, and the start-up bound held
    # across the restart (a fresh study would have drawn at random again)
    import optuna

    reloaded = [line for line in tail(second_log, 2000).splitlines() if line.startswith("optuna: study 'resume' reloaded from")]
    assert reloaded and f": {len(params_before)} trials, best val_miou {best_before:.6f}" in reloaded[0], reloaded
    study = stored_study(exp)
    assert [t.params for t in study.trials[: len(params_before)]] == params_before
    kept = [t for t in study.trials if t.state != optuna.trial.TrialState.FAIL]  # FAIL: asked just before the kill, unknown to Tune
    assert len(kept) == len(after)
    params_of = {json.dumps(t.params, sort_keys=True) for t in study.trials}
    for row in after:
        if row["trial_id"] not in unknown_to_tune:
            params = json.loads((exp / "tune" / f"trial_{row['trial_id']}" / "params.json").read_text())
            assert json.dumps(params, sort_keys=True) in params_of
    # the trials the resumed search runs: an ask lost with the killed driver (FAIL) is replaced, as the gate's bound allows
    kept_numbers = {t.number for t in kept}
    assert len([n for n in random_draws(study, SMOKE_STARTUP) if n in kept_numbers]) <= SMOKE_STARTUP

    state = json.loads((exp / "search_state.json").read_text())
    assert [s["resume"] for s in state["sessions"]] == [False, True] and state["status"] == "finished"
    assert state["resume"]["trials_before"] >= len(finished_before)

    client = mlflow_client(uri)
    parent = state["mlflow"]["parent_run_id"]
    children = client.search_runs([state["mlflow"]["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(run.data.tags["segtune.trial_id"] for run in children) == sorted(row["trial_id"] for row in after)
    # a trial started just before the kill, unknown to the restored Tune: its run is deleted, marked
    lost = {d.name.removeprefix("trial_") for d in (exp / "tune").glob("trial_*")} - {row["trial_id"] for row in after}
    from mlflow.entities import ViewType

    everything = client.search_runs([state["mlflow"]["experiment_id"]], f"tags.`mlflow.parentRunId` = '{parent}'", run_view_type=ViewType.ALL)
    for run in everything:
        if run.data.tags["segtune.trial_id"] in lost:
            assert run.info.lifecycle_stage == "deleted" and run.data.tags["segtune.status"].startswith("lost"), run.data.tags
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]
        assert len(steps) == len(set(steps)), run.data.tags["segtune.trial_id"]

    # A state file torn by a kill during Tune's (non-atomic) copy: one line naming it, instead
    # of Tune's silent restart of the whole search; nothing the search wrote is touched.
    newest = sorted((exp / "tune").glob("experiment_state-*.json"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    written = {p: p.stat().st_mtime_ns for p in exp.rglob("*") if p.is_file()}
    third = subprocess.run(search_cmd("--resume", "--experiment", "resume"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    stop_ray_processes(ray_tmp)
    lines = third.stderr.strip().splitlines()
    assert third.returncode == 2 and len(lines) == 1 and newest.name in lines[0] and "unreadable" in lines[0], third.stderr[-2000:]
    assert "previous session" in lines[0]  # the first session's state is still there to fall back to
    assert {p: p.stat().st_mtime_ns for p in exp.rglob("*") if p.is_file()} == written


# ---- helpers for the two-node Ray cluster of tests/test_multinode.py ---------------------
def wait_for_nodes(address: str, count: int, env: dict, timeout: float = 90) -> None:
    probe = f"import ray, sys; ray.init(address='{address}', log_to_driver=False); sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if subprocess.run([PYTHON, "-c", probe], env=env, capture_output=True, timeout=60).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"the Ray cluster at {address} did not reach {count} nodes")


def test_local_trial_slots_count_the_trials_a_machine_runs_at_once():
    from training.config import SearchConfig
    from tune.runner import local_trial_slots

    assert local_trial_slots(SearchConfig(max_concurrent=2, num_samples=6, resources={"cpu": 1}), 2) == 2  # --smoke on 2 cores
    assert local_trial_slots(SearchConfig(max_concurrent=1, num_samples=4, resources={"cpu": 2}), 2) == 1
    assert local_trial_slots(SearchConfig(max_concurrent=8, num_samples=40, resources={"cpu": 4}), 2) == 1  # shrunk to the machine
    assert local_trial_slots(SearchConfig(max_concurrent=8, num_samples=3, resources={"cpu": 0.5}), 16) == 3


def test_the_worker_preload_names_importable_modules_and_the_trainable():
    """Every Ray worker imports WORKER_PRELOAD at start: a stale name would fail every worker, and
    without the trainable's module the first trial would pay its imports again."""
    import importlib.util

    from tune.runner import WORKER_PRELOAD
    from tune.trainable import train_trial

    assert train_trial.__module__ in WORKER_PRELOAD
    assert all(importlib.util.find_spec(name) is not None for name in WORKER_PRELOAD), WORKER_PRELOAD
