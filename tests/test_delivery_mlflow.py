"""The k-fold ensemble as an MLflow model, all real: two members trained on CamVid, logged and
registered in a sqlite store, served by `mlflow models serve` over HTTP, loaded back by URI and
in a Python that cannot import the installed segtune package.

Every process a test starts is stopped by that test, by its pid.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from conftest import CAMVID, PYTHON, REPO, write_camvid_subset
from services import free_port, mlflow_server, stop_process_group, wait_http

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXPERIMENT = "mlflow-model-test"
REGISTERED = "segtune-camvid"
MEMBERS = [({"model.encoder": "mobilenet_v2"}, 0, 2.0), ({"model.encoder": "resnet18"}, 1, 1.0)]  # (params, fold, weight)
OOF_MIOU = 0.4321
JPEG = CAMVID / "images" / "test" / "0001TP_008550.jpg"  # not among the training images
OTHER = CAMVID / "images" / "test" / "0001TP_008580.jpg"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return png.tobytes()


def post_json(url: str, payload: dict, timeout: float = 120) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def no_weights_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This environment with empty weight caches and hub access off: the model must need neither."""
    empty = tmp / "no-weights"
    empty.mkdir(exist_ok=True)
    env = dict(os.environ, TORCH_HOME=str(empty), HF_HOME=str(empty), HF_HUB_OFFLINE="1", **extra)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="module")
def kfold(tmp_path_factory):
    """A k-fold directory as the stage leaves it: two 1-epoch 64 px members (rank 1 fold 0, rank 2
    fold 1, weights 2 and 1) with flip TTA, soft vote, post-processing, and its kfold_result.yaml."""
    from training.config import load_space
    from training.data.dataset import prepare_data
    from training.engine.trainer import train
    from training.handoff import KFOLD_RESULT, EnsembleMember, EnsembleSpec, KFoldResult, TTASpec

    tmp = tmp_path_factory.mktemp("mlflow-model")
    root = write_camvid_subset(tmp / "camvid", n_train=12)
    space = load_space("deeplab", smoke=True, overrides={"data.root": str(root), "trainer.epochs": 1})
    kfold_dir = tmp / "results" / EXPERIMENT / "kfold"
    members = []
    t = time.perf_counter()
    for rank, (params, fold, weight) in enumerate(MEMBERS, start=1):
        cfg = space.resolve(params)
        data = prepare_data(cfg, log=lambda _: None)
        trained = train(cfg, data, fold, kfold_dir / str(rank) / f"fold{fold}", log=lambda _: None)
        members.append(EnsembleMember(
            checkpoint=f"{rank}/fold{fold}/best.pt", experiment=EXPERIMENT, rank=rank, fold=fold,
            weight=weight, val_miou=trained.best_miou, epochs=1,
        ))
    spec = EnsembleSpec(classes=data.classes, members=members, tta=TTASpec(hflip=True), vote="soft", postprocess={"Pole": 0.002})
    KFoldResult(
        experiment=EXPERIMENT, sources=[], data_root=str(root), fold_manifest=None, n_folds=5, ensemble=spec,
        oof_miou=OOF_MIOU, decisions="summary.json", submission="submission.csv",
    ).write(kfold_dir / KFOLD_RESULT)
    print(f"\n[timing] 2 members trained in {time.perf_counter() - t:.1f}s")
    return SimpleNamespace(dir=kfold_dir, tmp=tmp, classes=data.classes)


@pytest.fixture(scope="module")
def reference(kfold):
    """The k-fold's own Ensemble: what every delivered form must reproduce."""
    from training.evaluation.ensemble import load_kfold_ensemble

    ensemble, _ = load_kfold_ensemble(kfold.dir, device="cpu")
    return ensemble


@pytest.fixture(scope="module")
def registered(kfold):
    """The ensemble logged under a k-fold run of a sqlite store, registered as REGISTERED."""
    from mlflow.tracking import MlflowClient

    from training.delivery.mlflow_model import log_ensemble_model

    uri = f"sqlite:///{kfold.tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(kfold.tmp / "mlartifacts").as_uri())
    run_id = client.create_run(exp_id, run_name="kfold", tags={"segtune.role": "kfold"}).info.run_id
    logs: list[str] = []
    t = time.perf_counter()
    version = log_ensemble_model(kfold.dir, uri, run_id, REGISTERED, log=logs.append)
    print(f"\n[timing] logged and registered in {time.perf_counter() - t:.1f}s")
    return SimpleNamespace(uri=uri, client=client, run_id=run_id, version=version, logs=logs, model_uri=f"models:/{REGISTERED}/{version}")


@pytest.fixture(scope="module")
def served(kfold, registered):
    """`mlflow models serve` of the registered version on 127.0.0.1, stopped by its pid afterwards."""
    port = free_port()
    log = kfold.tmp / "serve.log"
    cmd = [PYTHON, "-m", "mlflow", "models", "serve", "-m", registered.model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]
    # The scoring server is started as `uvicorn`: this venv's bin must come first on PATH.
    env = no_weights_env(kfold.tmp, MLFLOW_TRACKING_URI=registered.uri, PATH=f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}")
    t = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=kfold.tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                wait_http(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except TimeoutError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow models serve did not answer /ping (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
        print(f"\n[timing] mlflow models serve up in {time.perf_counter() - t:.1f}s")
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/invocations", log=log)
    finally:
        stop_process_group(proc)


def test_registered_version_carries_the_ensemble_and_its_oof_figures(kfold, registered):
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    assert registered.version == "1"
    assert any(f"models:/{REGISTERED}/1" in line for line in registered.logs)
    version = registered.client.get_model_version(REGISTERED, "1")
    assert version.run_id == registered.run_id
    assert version.tags["segtune.oof_miou"] == f"{OOF_MIOU:.6f}"
    assert version.tags["segtune.experiment"] == EXPERIMENT
    assert json.loads(version.tags["segtune.member_weights"]) == [2.0, 1.0]
    assert json.loads(version.tags["segtune.tta"])["hflip"] is True and version.tags["segtune.vote"] == "soft"
    assert float(version.tags["segtune.mean_fold_val_miou"]) > 0
    # The run lists the model among its outputs.
    outputs = registered.client.get_run(registered.run_id).outputs.model_outputs
    assert len(outputs) == 1 and version.source == f"models:/{outputs[0].model_id}"

    from training.delivery.mlflow_model import process_store

    with process_store(registered.uri):  # download_artifacts resolves models:/ in the process-wide registry
        local = Path(download_artifacts(artifact_uri=registered.model_uri, dst_path=str(kfold.tmp / "inspect")))
    model = Model.load(str(local / "MLmodel"))
    assert model.signature.inputs.input_names() == ["image"] and model.signature.inputs.input_types()[0].name == "binary"
    assert model.saved_input_example_info is not None and (local / "serving_input_example.json").is_file()
    assert model.metadata["segtune.classes"] == kfold.classes
    bundle = local / "artifacts" / "ensemble"
    spec = (bundle / "ensemble.yaml").read_text()
    # Checkpoint paths are relative to the artifact folder, never the k-fold directory's.
    assert str(kfold.dir) not in spec and "checkpoint: members/00-rank1-fold0.pt" in spec
    assert sorted(p.name for p in (bundle / "members").iterdir()) == [
        "00-rank1-fold0.config.yaml", "00-rank1-fold0.pt", "01-rank2-fold1.config.yaml", "01-rank2-fold1.pt"]
    assert (local / "code" / "training" / "evaluation" / "ensemble.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    requirements = (local / "requirements.txt").read_text().splitlines()
    for dist in ("torch", "segmentation_models_pytorch", "timm", "albumentations", "opencv-python-headless", "mlflow"):
        assert any(r.lower().replace("-", "_").startswith(dist.replace("-", "_") + "==") for r in requirements), (dist, requirements)


def test_served_model_answers_the_ensembles_masks(served, reference):
    from training.data.coco import read_image
    from training.delivery.mlflow_model import decode_mask

    jpeg = read_image(JPEG)
    small = cv2.resize(read_image(OTHER), (200, 150), interpolation=cv2.INTER_AREA)  # another size, sent as PNG
    payload = {"dataframe_split": {"columns": ["image"], "data": [[b64(JPEG.read_bytes())], [b64(png_bytes(small))]]}}
    t = time.perf_counter()
    status, body = post_json(served.url, payload)
    print(f"\n[timing] 2 images served in {time.perf_counter() - t:.1f}s")
    assert status == 200, body
    got = body["predictions"]
    assert [(p["height"], p["width"]) for p in got] == [(360, 480), (150, 200)]
    for prediction, image in zip(got, [jpeg, small]):
        mask = decode_mask(prediction["mask"])
        expected = reference.predict_image(image)
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert int(mask.max()) < len(reference.classes)
        np.testing.assert_array_equal(mask, expected)

    # The same as records; {"inputs": ...} (whose base64 MLflow leaves undecoded) is refused in one line.
    status, body = post_json(served.url, {"dataframe_records": [{"image": b64(JPEG.read_bytes())}]})
    assert status == 200, body
    np.testing.assert_array_equal(decode_mask(body["predictions"][0]["mask"]), reference.predict_image(jpeg))
    status, body = post_json(served.url, {"inputs": {"image": [b64(JPEG.read_bytes())]}})
    assert status == 400 and body["message"].splitlines()[-1].endswith('(base64 text: send {"dataframe_split": ...}, whose base64 MLflow decodes)'), body


def test_served_model_refuses_a_bad_image_with_one_line(served):
    payload = {"dataframe_split": {"columns": ["image"], "data": [[b64(JPEG.read_bytes())], [b64(b"not an image")]]}}
    status, body = post_json(served.url, payload)
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"].splitlines()[-1].endswith("image 1 of the request: cannot decode 12 bytes as an image (PNG or JPEG expected)"), body["message"]
    assert "Traceback" not in body["message"]


def test_load_registered_ensemble_predicts_the_same_mask(registered, reference):
    from training.data.coco import read_image
    from training.delivery.mlflow_model import load_registered_ensemble

    image = read_image(JPEG)
    expected = reference.predict_image(image)
    for uri in (registered.model_uri, f"runs:/{registered.run_id}/ensemble"):
        ensemble = load_registered_ensemble(uri, registered.uri, device="cpu")
        assert ensemble.classes == reference.classes and ensemble.weights == [2.0, 1.0]
        np.testing.assert_array_equal(ensemble.predict_image(image), expected)


def test_a_missing_model_is_one_clear_line(registered, kfold):
    import mlflow

    from training.delivery.mlflow_model import load_registered_ensemble
    from training.errors import SegtuneError

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")

    with pytest.raises(SegtuneError) as err:
        load_registered_ensemble("models:/nope/1", registered.uri)
    message = str(err.value)
    assert "\n" not in message and message.startswith("models:/nope/1: ") and "nope" in message[len("models:/nope/1: "):]
    with pytest.raises(SegtuneError, match="does not exist"):
        load_registered_ensemble(registered.model_uri, f"sqlite:///{kfold.tmp / 'no-such.db'}")
    assert not (kfold.tmp / "no-such.db").exists()
    # The process-wide URIs it set for MLflow's download are back as they were.
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI")) == before


def test_model_loads_where_segtune_is_not_installed(kfold, registered, reference):
    """A Python without the editable install or the repository on its path: `training` comes from the model."""
    from training.data.coco import read_image
    from training.delivery.mlflow_model import decode_mask

    script = f"""
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if p not in ("", {str(REPO)!r})]
try:
    import training
    raise SystemExit("training is importable without the model: " + training.__file__)
except ImportError:
    pass
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model({registered.model_uri!r}, dst_path={str(kfold.tmp / 'isolated')!r}, model_config={{"device": "cpu"}})
out = model.predict(pd.DataFrame({{"image": [open({str(JPEG)!r}, "rb").read()]}}))
print(json.dumps({{"training": sys.modules["training"].__file__, "mask": out["mask"][0], "height": int(out["height"][0])}}))
"""
    env = no_weights_env(kfold.tmp, MLFLOW_TRACKING_URI=registered.uri)
    (kfold.tmp / "isolated").mkdir()
    done = subprocess.run([PYTHON, "-c", script], cwd=kfold.tmp, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["training"]).is_relative_to(kfold.tmp / "isolated" / "code"), result["training"]
    assert result["height"] == 360
    np.testing.assert_array_equal(decode_mask(result["mask"]), reference.predict_image(read_image(JPEG)))


def test_log_refuses_an_unknown_run(kfold, registered):
    from training.delivery.mlflow_model import log_ensemble_model
    from training.errors import SegtuneError

    with pytest.raises(SegtuneError) as err:
        log_ensemble_model(kfold.dir, registered.uri, "0" * 32, REGISTERED, log=lambda _: None)
    assert "\n" not in str(err.value) and "0" * 32 in str(err.value)
    with pytest.raises(SegtuneError, match="does not exist"):
        log_ensemble_model(kfold.dir, f"sqlite:///{kfold.tmp / 'no-such.db'}", registered.run_id, REGISTERED, log=lambda _: None)
    assert not (kfold.tmp / "no-such.db").exists()


def test_log_and_load_through_an_mlflow_server(kfold, reference):
    """As on the cluster: `mlflow server --serve-artifacts`, the model's files sent through it."""
    from mlflow.tracking import MlflowClient

    from training.data.coco import read_image
    from training.delivery.mlflow_model import load_registered_ensemble, log_ensemble_model

    work = kfold.tmp / "server"
    work.mkdir()
    with mlflow_server(f"sqlite:///{work / 'mlflow.db'}", work) as (uri, _):
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment(EXPERIMENT)).info.run_id
        versions = [log_ensemble_model(kfold.dir, uri, run_id, REGISTERED, log=lambda _: None) for _ in range(2)]
        assert versions == ["1", "2"]
        assert client.get_model_version(REGISTERED, "2").tags["segtune.oof_miou"] == f"{OOF_MIOU:.6f}"
        ensemble = load_registered_ensemble(f"models:/{REGISTERED}/2", uri, device="cpu")
    assert len(list((work / "mlartifacts").rglob("00-rank1-fold0.pt"))) == 2  # stored by the server
    image = read_image(JPEG)
    np.testing.assert_array_equal(ensemble.predict_image(image), reference.predict_image(image))
