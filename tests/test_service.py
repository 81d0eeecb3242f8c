"""The service as a team runs it: a smoke search logging to a real MLflow server that goes down
mid-search and comes back, the MLflow UI in headless Chromium, and bad data refused up front.

Every server and process a test starts is stopped by that test, by pid.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import PYTHON, REPO, write_camvid_subset
from services import CHROMIUM, CHROMIUM_ARGS, free_port, start_mlflow_server, stop_process_group
from test_search import read_leaderboard, search_env, short_tmp, stop_ray_processes, tail

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SCREENSHOT_DIR = REPO / "results" / "screenshots"


def child_runs(client, experiment_id: str, parent: str):
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the search ended while waiting for {what}:\n{tail(log) if log else ''}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{tail(log) if log else ''}")


@pytest.fixture(scope="module")
def served_search(tmp_path_factory):
    """A smoke search against `mlflow server`; the server is stopped mid-search and stays down past the
    search's end (beyond its grace period), then comes back and `--sync-mlflow` sends what was kept."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("service")
    data = write_camvid_subset(root / "camvid24", n_train=24)
    results, ray_tmp = root / "results", short_tmp("rt")
    backend = f"sqlite:///{root / 'mlflow.db'}"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_log = root / "mlflow-server.log"
    server = start_mlflow_server(backend, root / "mlartifacts", port, server_log)
    log = root / "search.log"
    cmd = [PYTHON, "tune/search.py", "--space", "deeplab", "--smoke", "--data", str(data), "--experiment", "svc", "--mlflow-uri", uri]
    env = search_env(results, ray_tmp, SEGTUNE_MLFLOW_GRACE_S="3")
    outage = {}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            client = MlflowClient(uri)
            state_file = results / "svc" / "search_state.json"

            def logged_epochs():
                if not state_file.is_file():
                    return None
                mlflow_state = json.loads(state_file.read_text())["mlflow"]
                if not mlflow_state.get("parent_run_id"):
                    return None
                runs = child_runs(client, mlflow_state["experiment_id"], mlflow_state["parent_run_id"])
                return runs if any("val_miou" in r.data.metrics for r in runs) else None

            wait_for(logged_epochs, 300, "the first epoch in MLflow", proc, log)
            outage["stopped_at"] = time.time()
            stop_process_group(server)  # the outage: the tracking server is gone mid-search, until after it ends
            proc.wait(timeout=600)
            endings = json.loads((results / "svc" / "trial_endings.json").read_text())
            outage["trials_finished_during"] = sum(e["ended"] > outage["stopped_at"] for e in endings.values())
        finally:
            if proc.poll() is None:
                proc.kill()
            stop_ray_processes(ray_tmp)
    outbox = results / "svc" / "mlflow_outbox.jsonl"
    outage["outbox_lines"] = len(outbox.read_text().splitlines()) if outbox.is_file() else 0
    server = start_mlflow_server(backend, root / "mlartifacts", port, server_log)
    sync = subprocess.run([PYTHON, "tune/search.py", "--sync-mlflow", "--experiment", "svc"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    try:
        yield SimpleNamespace(rc=proc.returncode, log=log, results=results / "svc", uri=uri, backend=backend, outage=outage, root=root, sync=sync)
    finally:
        stop_process_group(server)


def test_mlflow_outage_does_not_stop_training(served_search):
    out = served_search.log.read_text()
    assert served_search.rc == 0, tail(served_search.log)
    assert "WARNING mlflow: tracking at" in out and "training continues" in out  # the outage is reported
    assert served_search.outage["trials_finished_during"] >= 1
    rows = read_leaderboard(served_search.results / "leaderboard.csv")
    assert len(rows) == 6 and all(r["status"] in ("completed", "stopped by ASHA") for r in rows)
    # Beyond the grace period: what could not be sent is kept on disk, not dropped.
    assert "could not be sent" in out and "mlflow_outbox.jsonl" in out and served_search.outage["outbox_lines"] > 0


def test_mlflow_has_every_trial_after_the_server_came_back(served_search):
    from mlflow.tracking import MlflowClient

    assert served_search.sync.returncode == 0, served_search.sync.stdout[-2000:] + served_search.sync.stderr[-2000:]
    assert "mlflow: sent" in served_search.sync.stdout
    client = MlflowClient(served_search.uri)
    state = json.loads((served_search.results / "search_state.json").read_text())["mlflow"]
    runs = child_runs(client, state["experiment_id"], state["parent_run_id"])
    rows = {r["trial_id"]: r for r in read_leaderboard(served_search.results / "leaderboard.csv")}
    assert sorted(r.data.tags["segtune.trial_id"] for r in runs) == sorted(rows)
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    for run in runs:
        row = rows[run.data.tags["segtune.trial_id"]]
        assert run.info.status == "FINISHED", (row["trial_id"], run.info.status)  # never left RUNNING
        history = client.get_metric_history(run.info.run_id, "val_miou")
        assert len(history) == int(row["epochs_trained"])  # queued epochs were sent, none twice
        assert max(m.value for m in history) == pytest.approx(float(row["best_val_miou"]), abs=1e-6)


def _open(page, url: str) -> str:
    page.goto(url, wait_until="load")
    return url


def test_mlflow_ui_shows_child_runs_and_their_val_miou(served_search):
    """Open the experiment and the run comparison (parallel coordinates) in headless Chromium."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian's chromium is missing (.ci/run installs it)"
    client = MlflowClient(served_search.uri)
    state = json.loads((served_search.results / "search_state.json").read_text())["mlflow"]
    runs = child_runs(client, state["experiment_id"], state["parent_run_id"])
    run_ids = [r.info.run_id for r in runs]
    compare = (
        f"{served_search.uri}/#/compare-runs?runs={urllib.parse.quote(json.dumps(run_ids))}"
        f"&experiments={urllib.parse.quote(json.dumps([state['experiment_id']]))}"
    )
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            _open(page, f"{served_search.uri}/#/experiments/{state['experiment_id']}/runs")
            page.get_by_text("search-svc").first.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOT_DIR / "mlflow_experiment.png"))

            page.set_viewport_size({"width": 2400, "height": 1200})  # the run table renders visible columns only
            _open(page, compare)
            page.get_by_text("Parallel Coordinates Plot").first.wait_for(timeout=60_000)
            for run in runs:
                page.get_by_text(run.info.run_name, exact=True).first.wait_for(timeout=30_000)
            close = page.locator("button[aria-label='Close']")
            if close.count():
                close.first.click()  # the assistant side panel hides half of the page
            # The plot the users want: searched params against val mIoU (coloured by it).
            page.get_by_role("button", name="Clear All").click()
            params, metrics = page.get_by_role("combobox").nth(0), page.get_by_role("combobox").nth(1)
            for box, name in ((params, "model.encoder"), (params, "optimizer.lr"), (params, "loss.weights.dice"), (metrics, "val_miou")):
                box.click()
                box.fill(name)
                page.keyboard.press("Enter")
                page.keyboard.press("Escape")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(SCREENSHOT_DIR / "mlflow_compare.png"))
            compare_text = page.inner_text("body")
            # What the plot drew from the runs' data: plotly's val_miou axis (its title is the
            # metric picked above) and the range it spans, printed at the axis ends.
            axis = page.locator(".js-plotly-plot g.y-axis").filter(
                has=page.locator("text.axis-title", has_text=re.compile(r"^val_miou$"))
            )
            assert axis.count() == 1, f"no val_miou axis in the parallel-coordinates plot: {compare_text[:2000]}"
            plotted_range = (axis.locator("text.axis-extent-top-text").text_content(),
                             axis.locator("text.axis-extent-bottom-text").text_content())
            # Each child run's page lists its metrics with their full values.
            run_pages = {}
            for run in runs:
                _open(page, f"{served_search.uri}/#/experiments/{state['experiment_id']}/runs/{run.info.run_id}")
                page.get_by_text("val_miou", exact=True).first.wait_for(timeout=60_000)
                run_pages[run.info.run_id] = page.inner_text("body")
        finally:
            browser.close()
    assert "Parallel Coordinates Plot" in compare_text
    # The axis spans the child runs' val_miou (latest value of each, as MLflow plots it), in the
    # plot's 5-decimal format (the runs with the highest and lowest value must be on it).
    values = [run.data.metrics["val_miou"] for run in runs]
    assert plotted_range == (f"{max(values):.5f}", f"{min(values):.5f}"), (plotted_range, values)
    for run in runs:
        assert run.info.run_name in compare_text
        value = run.data.metrics["val_miou"]  # the latest epoch's val mIoU, as the UI shows it
        assert run.info.run_name in run_pages[run.info.run_id]
        assert repr(value) in run_pages[run.info.run_id], f"val_miou {value!r} not on the page of {run.info.run_name}"
    assert (SCREENSHOT_DIR / "mlflow_compare.png").stat().st_size > 10_000


# ---- bad data is refused before any trial or MLflow run starts --------------------------------
@pytest.mark.parametrize("breakage", ["corrupt_jpeg", "annotation_for_missing_image"])
def test_bad_data_fails_before_any_trial(camvid_copy, tmp_path, breakage):
    from mlflow.tracking import MlflowClient

    train = json.loads((camvid_copy / "train.json").read_text())
    if breakage == "corrupt_jpeg":
        victim = camvid_copy / train["images"][3]["file_name"]
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
        expect = [str(victim), "image id", "corrupt"]
    else:
        train["annotations"][0]["image_id"] = 987654
        (camvid_copy / "train.json").write_text(json.dumps(train))
        expect = ["train.json", f"annotation id {train['annotations'][0]['id']}", "987654"]
    results = tmp_path / "results"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.monotonic()
    proc = subprocess.run(
        [PYTHON, "tune/search.py", "--space", "deeplab", "--smoke", "--data", str(camvid_copy), "--experiment", "bad", "--mlflow-uri", uri],
        cwd=REPO, env=search_env(results, short_tmp("rt")), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(part in errors[0] for part in expect), proc.stderr
    assert not list(results.glob("bad/**/trial_*"))  # no trial started
    assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(uri).search_experiments(filter_string="name = 'bad'")
    assert time.monotonic() - started < 120  # refused up front, not after a Ray start and a trial
