"""The selected k-fold ensemble as an MLflow pyfunc model: logged under a run, registered, served.

    log_ensemble_model(kfold dir, uri, run_id, name)        -> the registered version
    mlflow models serve -m models:/<name>/<version> --env-manager local
    load_registered_ensemble("models:/<name>/<version>")    -> Ensemble (predict.py)

The model holds the fold checkpoints, their training configs and the EnsembleSpec (members,
weights, TTA, vote, post-processing) with paths relative to its artifact folder, plus a copy
of the `training` package (code_paths). Loading it needs neither this repository nor the
network nor a pretrained-weights file, and it predicts through `Ensemble.predict_image`:
a served mask is the one predict.py and the submission give.

Request (POST /invocations, JSON): a DataFrame with one binary column `image`, each value the
bytes of a PNG or JPEG file, base64-encoded (MLflow's JSON encoding of binary):
    {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}
or {"dataframe_records": [{"image": "<base64>"}, ...]}; not {"inputs": ...}, whose base64
MLflow does not decode.
Response: one record per image: its label mask (class ids, classes in the model's metadata
`segtune.classes`) at the image's own size, as a base64 8-bit grayscale PNG:
    {"predictions": [{"mask": "<base64 PNG>", "height": 360, "width": 480}, ...]}
A request with an image that does not decode is refused (HTTP 400) with one line
"image <i> of the request: ...".
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError

from training.config import read_yaml
from training.errors import DataError, SegtuneError
from training.evaluation.ensemble import Ensemble, resolve
from training.handoff import KFOLD_RESULT, EnsembleSpec, KFoldResult
from training.infra.fs import write_yaml

ARTIFACT = "ensemble"  # the pyfunc artifact's key, and its folder under the model's artifacts/
SPEC_FILE = "ensemble.yaml"
FORMAT = "segtune.mlflow_ensemble"
VERSION = 1
LOGGED_MODEL_NAME = "ensemble"
IMAGE_COLUMN = "image"
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff")  # PNG, JPEG
# The model's code (mlflow's "model from code"): MLflow runs it, after putting the bundled
# `training` package on sys.path, to get the PythonModel; nothing is unpickled.
MODEL_CODE = '''"""The segtune k-fold ensemble as an MLflow model (training/delivery/mlflow_model.py, bundled in code/)."""
import mlflow.models

from training.delivery.mlflow_model import EnsembleModel

mlflow.models.set_model(EnsembleModel())
'''
# What the model imports when it loads and predicts: the distributions providing these,
# pinned to the versions it was logged with, are its pip requirements.
RUNTIME_MODULES = (
    "mlflow", "torch", "torchvision", "segmentation_models_pytorch", "timm", "albumentations",
    "cv2", "numpy", "pandas", "pydantic", "yaml", "pycocotools", "simplejpeg", "filelock",
)


def is_base64_image(head: bytes) -> bool:
    """Whether the first bytes of a value are base64 text of a PNG or JPEG file."""
    try:
        return binascii.a2b_base64(head[:16], strict_mode=True).startswith(IMAGE_MAGIC)
    except binascii.Error:
        return False


def decode_image(data: Any, what: str) -> np.ndarray:
    """RGB uint8 H x W x 3 of PNG/JPEG bytes, decoded as training.data.coco.read_image decodes files."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"{what}: expected the bytes of a PNG or JPEG file, got {type(data).__name__}")
    buffer = np.frombuffer(data, np.uint8)
    rgb = cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB) if buffer.size else None
    if rgb is None:
        # {"inputs": ...} requests reach the model with their base64 text undecoded.
        hint = ' (base64 text: send {"dataframe_split": ...}, whose base64 MLflow decodes)' if is_base64_image(bytes(data[:64])) else ""
        raise DataError(f"{what}: cannot decode {buffer.size} bytes as an image (PNG or JPEG expected){hint}")
    return rgb


def encode_mask(mask: np.ndarray) -> str:
    """A uint8 label mask as base64 8-bit grayscale PNG (the response's `mask`)."""
    ok, png = cv2.imencode(".png", np.ascontiguousarray(mask, dtype=np.uint8))
    if not ok:
        raise SegtuneError(f"cannot encode a {mask.shape} label mask as PNG")
    return base64.b64encode(png.tobytes()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    """The uint8 label mask of a response's `mask` field."""
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2:
        raise SegtuneError("a response's mask is not a base64 8-bit grayscale PNG")
    return mask


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model: encoded images in, label masks out (format in the module docstring).

    model_config {"device": "cpu"} picks the device; by default the members' trainer.device.
    """

    def load_context(self, context) -> None:
        device = (context.model_config or {}).get("device")
        self.ensemble = load_bundle(Path(context.artifacts[ARTIFACT]), device)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        try:
            images = [decode_image(v, f"image {i} of the request") for i, v in enumerate(model_input[IMAGE_COLUMN])]
        except DataError as err:
            # An MlflowException is answered 400 with this message; anything else is a bare 400 "unexpected error".
            raise MlflowException.invalid_parameter_value(str(err)) from None
        masks = [self.ensemble.predict_image(image) for image in images]
        return pd.DataFrame({
            "mask": [encode_mask(m) for m in masks],
            "height": [m.shape[0] for m in masks],
            "width": [m.shape[1] for m in masks],
        })


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", "mask"), ColSpec("long", "height"), ColSpec("long", "width")]),
    )


def input_example() -> pd.DataFrame:
    """A 48 x 32 PNG: shows the request format, small enough to live in the model's files."""
    y, x = np.mgrid[0:32, 0:48]
    ok, png = cv2.imencode(".png", np.stack([x * 5, y * 7, (x + y) * 3], axis=-1).astype(np.uint8))
    return pd.DataFrame({IMAGE_COLUMN: [png.tobytes()]})


def pip_requirements() -> list[str]:
    """The RUNTIME_MODULES' distributions at their installed versions."""
    providers = metadata.packages_distributions()
    pins = set()
    for module in RUNTIME_MODULES:
        if module not in providers:
            raise SegtuneError(f"no installed distribution provides the module {module!r}; cannot pin the model's requirements")
        pins |= {f"{name}=={metadata.version(name)}" for name in providers[module]}
    return sorted(pins, key=str.lower)


def kfold_result_file(path: str | Path) -> Path:
    path = Path(path)
    file = path / KFOLD_RESULT if path.is_dir() else path
    if not file.is_file():
        raise SegtuneError(f"{file}: not found; a k-fold directory holds it once training/final_kfold.py has finished")
    return file


def write_bundle(result: KFoldResult, base: Path, dest: Path) -> EnsembleSpec:
    """Copy the members' checkpoints into `dest`; write the spec naming them relative to it, and their configs."""
    members = []
    for i, member in enumerate(result.ensemble.members):
        source = resolve(member.checkpoint, base)
        if not source.is_file():
            raise SegtuneError(f"{source}: checkpoint of ensemble member {i} not found (named in {base / KFOLD_RESULT})")
        name = f"members/{i:02d}-rank{member.rank}-fold{member.fold}.pt"
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest / name)
        members.append(member.model_copy(update={"checkpoint": name}))
    spec = result.ensemble.model_copy(update={"members": members})
    write_yaml(dest / SPEC_FILE, {"format": FORMAT, "version": VERSION, "experiment": result.experiment, "ensemble": spec.model_dump(mode="json")})
    # Loading it here refuses a broken ensemble before anything is logged, and gives the configs.
    ensemble = load_bundle(dest, "cpu")
    for member, loaded in zip(members, ensemble.members):
        write_yaml(dest / member.checkpoint.replace(".pt", ".config.yaml"), loaded.cfg.to_dict())
    return spec


def read_bundle(directory: Path) -> EnsembleSpec:
    file = directory / SPEC_FILE
    if not file.is_file():
        raise SegtuneError(f"{file}: not found; not a segtune ensemble model")
    raw = read_yaml(file)
    if (raw.get("format"), raw.get("version")) != (FORMAT, VERSION):
        raise SegtuneError(f"{file}: not a {FORMAT} version {VERSION} file (format {raw.get('format')!r}, version {raw.get('version')!r})")
    try:
        return EnsembleSpec.model_validate(raw.get("ensemble"))
    except ValidationError as err:
        first = err.errors()[0]
        raise SegtuneError(f"{file}: ensemble.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def load_bundle(directory: Path, device: str | torch.device | None = None) -> Ensemble:
    """The Ensemble of a model's artifact folder (ensemble.yaml and the checkpoints it names)."""
    return Ensemble.load(read_bundle(directory), base=directory, device=device)


def copy_package(dest: Path) -> Path:
    """A clean copy of the `training` package (no bytecode caches), for the model's code_paths."""
    import training

    target = dest / "training"
    shutil.copytree(Path(training.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def model_tags(result: KFoldResult, file: Path) -> dict[str, str]:
    """The OOF figures and the ensemble's make-up, as tags of the logged model and its registered version."""
    from training.infra.lineage import EXPERIMENT, UPSTREAM

    spec = result.ensemble
    tags = {
        EXPERIMENT: result.experiment,
        "segtune.oof_miou": f"{result.oof_miou:.6f}",
        "segtune.n_folds": str(result.n_folds),
        "segtune.members": str(len(spec.members)),
        "segtune.member_weights": json.dumps([m.weight for m in spec.members]),
        "segtune.tta": json.dumps(spec.tta.model_dump()),
        "segtune.vote": spec.vote,
        "segtune.postprocess": json.dumps(spec.postprocess),
        "segtune.classes": json.dumps(spec.classes),
        "segtune.kfold_result": str(file.resolve()),
    }
    val = [m.val_miou for m in spec.members]
    if all(v is not None for v in val):
        tags["segtune.mean_fold_val_miou"] = f"{float(np.mean(val)):.6f}"
    if result.mlflow_parent_run_id:
        tags[UPSTREAM] = result.mlflow_parent_run_id
    return tags


@contextmanager
def process_store(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to `uri` for a moment, then restored (env included).

    Some of MLflow ignores the client's store: resolving models:/<name>/<version> for a download,
    and a sqlite/file registry looking up a version's models:/<model id> source (a TODO in mlflow).
    """
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    saved = tracking._tracking_uri, registry._registry_uri
    saved_env = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        registry._registry_uri = saved[1]
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_store_exists(uri: str, what: str) -> None:
    """A sqlite store that is not there: one line, before MLflow creates an empty one and then finds nothing in it."""
    from training.infra.tracking import sqlite_path

    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise SegtuneError(f"{what}: the MLflow store {uri} does not exist")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def log_ensemble_model(
    result_path: str | Path, tracking_uri: str, run_id: str, registered_name: str | None, log: Callable[[str], None] = print
) -> str | None:
    """Log the k-fold's ensemble (a k-fold directory or its kfold_result.yaml) as a pyfunc model of run
    `run_id`, and register it as `registered_name` (None: log only). Returns the registered version.

    Uses the client, not mlflow.pyfunc.log_model: that one reads the process-wide tracking URI
    and would resume, then end, `run_id` (which the calling stage may still have running).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    file = kfold_result_file(result_path)
    result = KFoldResult.read(file)
    tags = model_tags(result, file)
    check_store_exists(tracking_uri, f"run {run_id}")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
    except MlflowException as err:
        raise SegtuneError(f"mlflow: {tracking_uri}: run {run_id}: {_first_line(err)}") from None
    try:
        logged, spec = _save_and_upload(client, experiment_id, run_id, result, file, tags)
        log(f"mlflow: the ensemble ({len(spec.members)} checkpoints) is logged as model {logged.model_id} of run {run_id}")
        if registered_name is None:
            return None
        version = _register(client, tracking_uri, registered_name, logged.model_id, run_id, result, tags, len(spec.members), spec.vote)
    except MlflowException as err:
        raise SegtuneError(f"mlflow: {tracking_uri}: logging the ensemble of {file}: {_first_line(err)}") from None
    log(f"mlflow: registered as models:/{registered_name}/{version.version}")
    return str(version.version)


def _save_and_upload(client, experiment_id: str, run_id: str, result: KFoldResult, file: Path, tags: dict):
    """The pyfunc model saved locally (bundle, code, signature, example) and uploaded as a logged model of `run_id`."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="segtune-mlflow-model-") as tmp:
        bundle = Path(tmp) / ARTIFACT
        spec = write_bundle(result, file.parent, bundle)
        code = copy_package(Path(tmp) / "code")
        model_code = Path(tmp) / "segtune_ensemble_model.py"
        model_code.write_text(MODEL_CODE, encoding="utf-8")
        logged = client.create_logged_model(experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id, tags=tags, model_type="segtune.ensemble")
        try:
            local = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                str(local),
                python_model=str(model_code),
                artifacts={ARTIFACT: str(bundle)},
                code_paths=[str(code)],
                signature=signature(),
                input_example=input_example(),
                pip_requirements=pip_requirements(),
                metadata={"segtune.classes": spec.classes, "segtune.experiment": result.experiment, "segtune.oof_miou": result.oof_miou},
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id, model_uuid=logged.model_id),
            )
            client.log_model_artifacts(logged.model_id, str(local))
        except BaseException:
            client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        client.finalize_logged_model(logged.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged, spec


def _register(client, tracking_uri: str, name: str, model_id: str, run_id: str, result: KFoldResult, tags: dict, members: int, vote: str):
    """A new version of registered model `name` (created on first use) for the logged model."""
    from mlflow.exceptions import MlflowException

    description = f"segtune k-fold ensemble of {result.experiment}: {members} fold models, {vote} vote, OOF mIoU {result.oof_miou:.4f}"
    try:
        client.create_registered_model(name, description=f"segtune k-fold ensembles of {result.experiment}")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    with process_store(tracking_uri):
        return client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, tags=tags, description=description, model_id=model_id)


def load_registered_ensemble(model_uri: str, tracking_uri: str | None = None, device: str | torch.device | None = None) -> Ensemble:
    """The Ensemble of a logged model: models:/<name>/<version>, runs:/<run id>/..., models:/<model id>."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from training.infra.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    check_store_exists(uri, model_uri)
    with tempfile.TemporaryDirectory(prefix="segtune-model-") as tmp:
        try:
            with process_store(uri):
                local = Path(download_artifacts(artifact_uri=model_uri, dst_path=tmp, tracking_uri=uri, registry_uri=uri))
        except MlflowException as err:
            raise SegtuneError(f"{model_uri}: cannot download from MLflow at {uri}: {_first_line(err)}") from None
        if not (local / "MLmodel").is_file():
            raise SegtuneError(f"{model_uri}: not an MLflow model (no MLmodel file)")
        artifacts = Model.load(str(local / "MLmodel")).flavors.get("python_function", {}).get("artifacts") or {}
        if ARTIFACT not in artifacts:
            raise SegtuneError(f"{model_uri}: not a segtune ensemble model (no {ARTIFACT!r} artifact)")
        # The checkpoints are read into memory: the download can go when this returns.
        return load_bundle(local / artifacts[ARTIFACT]["path"], device)
