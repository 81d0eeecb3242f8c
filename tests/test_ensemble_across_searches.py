"""From two smoke searches of different architectures to a delivered ensemble, through the entry scripts.

deeplab (DeepLabV3+) and unet smoke searches on a CamVid subset; the k-fold of the first alone
(its search-fold checkpoint reused, not retrained), then one k-fold over both (every fold the
first k-fold trained reused); predict.py on the test images against the submission.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import PYTHON, REPO, write_camvid_subset
from services import free_port, stop_process_group, wait_http
from test_delivery_mlflow import b64, no_weights_env, post_json
from test_search import search_env, short_tmp, stop_ray_processes

N_TRAIN, N_TEST = 30, 4
SEARCHES = {"sa": "deeplab", "sb": "unet"}


def run_cli(args: list[str], env: dict, log: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        proc = subprocess.run([PYTHON, *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return proc


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("across")
    data = write_camvid_subset(tmp / "camvid", N_TRAIN, N_TEST)
    results, ray_tmp = tmp / "results", short_tmp("rx")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = search_env(results, ray_tmp, MLFLOW_TRACKING_URI=uri)
    log = tmp / "pipeline.log"
    try:
        for name, space in SEARCHES.items():
            run_cli(["tune/search.py", "--space", space, "--smoke", "--num-samples", "2", "--data", str(data), "--experiment", name], env, log)
        run_cli(["training/final_kfold.py", "--experiment", "sa", "--smoke"], env, log)
        single = json.loads((results / "sa" / "kfold" / "summary.json").read_text())
        run_cli(["training/final_kfold.py", "--experiment", "sa", "--experiment", "sb", "--name", "both", "--smoke"], env, log)
        both = json.loads((results / "both" / "kfold" / "summary.json").read_text())
        images = tmp / "test_images"
        images.mkdir()
        test = json.loads((data / "test.json").read_text())
        for im in test["images"]:
            (images / Path(im["file_name"]).name).symlink_to(data / im["file_name"])
        run_cli(["training/predict.py", "--model", str(results / "both" / "kfold"), "--images", str(images), "--out", str(tmp / "masks")], env, log)
    finally:
        stop_ray_processes(ray_tmp)
    return {"tmp": tmp, "results": results, "data": data, "single": single, "both": both, "test": test, "log": log, "uri": uri}


def test_the_search_fold_is_reused_not_retrained(pipeline):
    best = yaml.safe_load((pipeline["results"] / "sa" / "best_configs.yaml").read_text())
    top = min(best["configs"], key=lambda c: c["rank"])
    config = pipeline["single"]["configs"][0]
    reused = [f for f in config["folds"] if f["status"] == "reused"]
    if top["epochs_trained"] == config["epochs"]:  # a trial ASHA stopped early trained fewer epochs: retrained then
        assert [f["fold"] for f in reused] == [best["fold"]], config["folds"]
        assert Path(reused[0]["reused_from"]) == Path(top["checkpoint"]).parent
        metrics = json.loads((Path(reused[0]["checkpoint"]).parent / "metrics.json").read_text())
        assert metrics["best_miou"] == pytest.approx(top["best_val_miou"])
        assert "reusing the search's trial" in pipeline["log"].read_text()
    else:
        assert not reused and "is not reused: not trained for" in pipeline["log"].read_text()
    assert {f["status"] for f in config["folds"] if f not in reused} == {"trained"}


def test_the_ensemble_across_searches_reuses_every_trained_fold(pipeline):
    both = pipeline["both"]
    assert [c["experiment"] for c in both["configs"]] == ["sa", "sb"] and [c["key"] for c in both["configs"]] == ["sa-1", "sb-1"]
    sa = next(c for c in both["configs"] if c["experiment"] == "sa")
    assert {f["status"] for f in sa["folds"]} == {"reused"}  # all five from the first k-fold
    trial = Path(pipeline["single"]["configs"][0]["folds"][0]["reused_from"] or "-")  # the search fold, when reused there
    for f in sa["folds"]:
        assert Path(f["reused_from"]) in (pipeline["results"] / "sa" / "kfold" / "1" / f"fold{f['fold']}", trial)


def test_selection_across_searches_beats_each_search_alone(pipeline):
    both = pipeline["both"]
    ens, weights = both["ensemble"], both["decisions"]["weights"]
    per_search = ens["per_search"]
    assert set(per_search) == {"sa", "sb"}
    assert ens["oof_miou"] >= max(v["oof_miou"] for v in per_search.values())
    assert set(weights["candidates"]) == {"equal", "greedy", "search:sa", "search:sb"}
    assert weights["candidates"][weights["chosen"]] == max(weights["candidates"].values())
    cfgs = [yaml.safe_load((pipeline["results"] / e / "best_configs.yaml").read_text())["configs"][0]["config"]["model"]["arch"]
            for e in ("sa", "sb")]
    assert len(set(cfgs)) == 2, cfgs


def test_predict_masks_equal_the_submission(pipeline):
    from training.evaluation.submission import iter_submission

    rows = dict(iter_submission(pipeline["results"] / "both" / "kfold" / "submission.csv"))
    assert len(rows) == N_TEST
    for im in pipeline["test"]["images"]:
        mask = cv2.imread(str(pipeline["tmp"] / "masks" / "masks" / (Path(im["file_name"]).stem + ".png")), cv2.IMREAD_UNCHANGED)
        assert mask is not None and mask.shape == (im["height"], im["width"])
        np.testing.assert_array_equal(cv2.resize(mask, (256, 256), interpolation=cv2.INTER_NEAREST), rows[im["file_name"]])


def test_the_registered_model_serves_the_same_masks(pipeline):
    """The k-fold registered its ensemble; `mlflow models serve` on 127.0.0.1 answers a CamVid test image with predict.py's mask."""
    from training.delivery.mlflow_model import decode_mask

    model = pipeline["both"]["mlflow"]["model"]
    assert model and model["uri"].startswith("models:/both/")
    tmp, port = pipeline["tmp"], free_port()
    env = no_weights_env(tmp, MLFLOW_TRACKING_URI=pipeline["uri"], PATH=f"{Path(PYTHON).parent}:{os.environ['PATH']}")
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([PYTHON, "-m", "mlflow", "models", "serve", "-m", model["uri"], "--env-manager", "local",
                                 "--host", "127.0.0.1", "--port", str(port)], cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", timeout=180)
        except TimeoutError:
            pytest.fail(f"mlflow models serve did not answer /ping:\n{log.read_text()[-3000:]}")
        im = pipeline["test"]["images"][0]
        status, body = post_json(f"http://127.0.0.1:{port}/invocations",
                                 {"dataframe_split": {"columns": ["image"], "data": [[b64((pipeline["data"] / im["file_name"]).read_bytes())]]}})
        assert status == 200, body
        served = decode_mask(body["predictions"][0]["mask"])
        written = cv2.imread(str(tmp / "masks" / "masks" / (Path(im["file_name"]).stem + ".png")), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(served, written)
    finally:
        stop_process_group(proc)
