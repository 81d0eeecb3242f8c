"""training/predict.py and the ONNX export on a real ensemble: two 1-epoch DeepLabV3+ folds on CamVid at 64 px.

One module-scoped CLI run predicts a folder of real CamVid test images (in sub-folders, one
resized to its own size) next to four bad files (truncated JPEG and PNG, greyscale JPEG,
RGBA PNG), with --overlay and --export onnx; the tests read what it left.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from conftest import CAMVID, PYTHON, REPO, write_camvid_subset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

N_TRAIN, N_TEST = 12, 3
WEIGHTS = {0: 2.0, 1: 1.0}  # fold -> member weight
BAD = {  # file -> what its error line must say
    "bad/truncated.jpg": "corrupt image",
    "bad/truncated.png": "corrupt image (truncated PNG)",
    "bad/grey.jpg": "greyscale image",
    "rgba.png": "RGBA image",
}


@pytest.fixture(scope="module")
def kfold(tmp_path_factory) -> SimpleNamespace:
    """A k-fold directory as final_kfold.py leaves it: fold checkpoints and kfold_result.yaml (hflip TTA, a post-processed class)."""
    from training.config import load_space
    from training.data.dataset import prepare_data
    from training.engine.trainer import train
    from training.handoff import EnsembleMember, EnsembleSpec, KFoldResult, TTASpec

    tmp = tmp_path_factory.mktemp("delivery")
    root = write_camvid_subset(tmp / "camvid", N_TRAIN, N_TEST)
    cfg = load_space("deeplab", smoke=True, overrides={"data.root": str(root), "trainer.epochs": 1, "trainer.overlays": 0}).defaults
    data = prepare_data(cfg, log=lambda _: None)
    kfold_dir = tmp / "kfold"
    for fold in WEIGHTS:
        train(cfg, data, fold, kfold_dir / "1" / f"fold{fold}", log=lambda _: None)
    spec = EnsembleSpec(
        classes=data.index.classes,
        members=[EnsembleMember(checkpoint=f"1/fold{f}/best.pt", experiment="delivery", rank=1, fold=f, weight=w) for f, w in WEIGHTS.items()],
        tta=TTASpec(hflip=True), vote="soft", postprocess={"Pole": 0.002},
    )
    KFoldResult(experiment="delivery", sources=[], data_root=str(root), fold_manifest=None, n_folds=5, ensemble=spec,
                oof_miou=0.0, decisions="summary.json", submission="submission.csv").write(kfold_dir / "kfold_result.yaml")
    return SimpleNamespace(dir=kfold_dir, root=root, classes=data.index.classes, tmp=tmp)


@pytest.fixture(scope="module")
def inputs(kfold) -> SimpleNamespace:
    """The folder to predict: the subset's test images in sub-folders, one image at 200 x 150 as PNG, and the BAD files."""
    test = json.loads((kfold.root / "test.json").read_text())["images"]
    folder = kfold.tmp / "inputs"
    good = {}  # relative path -> the test.json file_name it is a copy of (None: not a test image of the subset)
    for k, record in enumerate(test):
        rel = f"street/{Path(record['file_name']).name}" if k else f"more/deeper/{Path(record['file_name']).name}"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(kfold.root / record["file_name"], folder / rel)
        good[rel] = record["file_name"]
    other = CAMVID / "images" / "test" / "Seq05VD_f04530.jpg"
    bgr = cv2.imread(str(other))
    cv2.imwrite(str(folder / "small.png"), cv2.resize(bgr, (200, 150), interpolation=cv2.INTER_AREA))
    good["small.png"] = None
    (folder / "bad").mkdir()
    jpeg, png = other.read_bytes(), (folder / "small.png").read_bytes()
    (folder / "bad/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "bad/truncated.png").write_bytes(png[: len(png) // 2])
    cv2.imwrite(str(folder / "bad/grey.jpg"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "rgba.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))
    (folder / "notes.txt").write_text("not an image")
    return SimpleNamespace(dir=folder, good=good)


def run_predict(*args) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "training/predict.py", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli(kfold, inputs) -> SimpleNamespace:
    out = kfold.tmp / "predictions"
    proc = run_predict("--model", kfold.dir, "--images", inputs.dir, "--out", out, "--overlay", "--batch-size", 2,
                       "--workers", 1, "--export", "onnx")
    return SimpleNamespace(proc=proc, out=out)


@pytest.fixture(scope="module")
def ensemble(kfold):
    from training.evaluation.ensemble import load_kfold_ensemble

    return load_kfold_ensemble(kfold.dir, device="cpu")[0]


def mask_of(cli, rel: str) -> np.ndarray:
    return cv2.imread(str(cli.out / "masks" / Path(rel).with_suffix(".png")), cv2.IMREAD_UNCHANGED)


def test_one_mask_per_readable_image_at_its_own_size(cli, inputs, kfold):
    from training.data.coco import read_image

    assert cli.proc.returncode == 1, cli.proc.stderr  # some images failed, the others were written
    written = sorted(p.relative_to(cli.out / "masks").as_posix() for p in (cli.out / "masks").rglob("*.png"))
    assert written == sorted(str(Path(rel).with_suffix(".png")) for rel in inputs.good)
    for rel in inputs.good:
        mask = mask_of(cli, rel)
        assert mask.dtype == np.uint8 and mask.shape == read_image(inputs.dir / rel).shape[:2], rel
        assert mask.max() < len(kfold.classes)
    assert mask_of(cli, "small.png").shape == (150, 200)
    assert f"wrote {len(inputs.good)} masks" in cli.proc.stdout and f"{len(BAD)} of {len(inputs.good) + len(BAD)} images failed" in cli.proc.stdout


def test_each_bad_image_is_one_error_line_naming_it(cli, inputs):
    lines = cli.proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == len(BAD), cli.proc.stderr
    for rel, reason in BAD.items():
        mine = [line for line in errors if f"{inputs.dir / rel}:" in line]
        assert len(mine) == 1 and reason in mine[0], (rel, errors)
    # nothing else: no traceback, no decoder chatter (libpng prints its own complaints); progress lines only
    assert all(line.startswith(("error:", "predicting:")) for line in lines), cli.proc.stderr


def test_masks_equal_predict_image(cli, inputs, ensemble):
    from training.data.coco import read_image

    for rel in inputs.good:
        expected = ensemble.predict_image(read_image(inputs.dir / rel))
        np.testing.assert_array_equal(mask_of(cli, rel), expected, err_msg=rel)


def test_masks_resized_to_256_are_the_submission_rows(cli, inputs, kfold, ensemble):
    """The submission's rows: the ensemble's frame mask -> the image's own size -> 256 x 256, all nearest."""
    from torch.utils.data import DataLoader

    from training.data.coco import load_coco
    from training.data.dataset import ImageDataset
    from training.evaluation.inference import resize_labels
    from training.evaluation.submission import SUBMISSION_SIZE

    index = load_coco(kfold.root, "test.json", check_images=False)
    loader = DataLoader(ImageDataset(index, index.image_ids, ensemble.transform()), batch_size=8)
    rows = {}
    for image_id, mask in ensemble.predict(loader):
        record = index.image(image_id)
        own = resize_labels(mask, (record.height, record.width))
        rows[record.file_name] = resize_labels(own, (SUBMISSION_SIZE, SUBMISSION_SIZE))
    compared = 0
    for rel, file_name in inputs.good.items():
        if file_name is not None:
            np.testing.assert_array_equal(resize_labels(mask_of(cli, rel), (SUBMISSION_SIZE, SUBMISSION_SIZE)), rows[file_name], err_msg=rel)
            compared += 1
    assert compared == N_TEST


def test_overlays_tint_the_predicted_objects_with_a_legend_below(cli, inputs):
    from training.data.coco import read_image

    for rel in inputs.good:
        rgb = read_image(inputs.dir / rel)
        mask = mask_of(cli, rel)
        overlay = cv2.imread(str(cli.out / "overlays" / Path(rel).with_suffix(".png")), cv2.IMREAD_COLOR_RGB)
        h, w = mask.shape
        assert overlay.shape[1] == w and overlay.shape[0] > h, rel  # the legend strip
        top = overlay[:h]
        np.testing.assert_array_equal(top[mask == 0], rgb[mask == 0])  # Background is not tinted
        if (mask > 0).any():
            assert (top[mask > 0] != rgb[mask > 0]).any(axis=1).mean() > 0.9


def test_missing_model_is_one_line(kfold, inputs, tmp_path):
    proc = run_predict("--model", kfold.tmp / "no-such-kfold", "--images", inputs.dir, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: {kfold.tmp / 'no-such-kfold'}: no such k-fold directory or kfold_result.yaml "
                                        "(or give models:/<name>/<version>)"]
    assert not (tmp_path / "out" / "masks").exists()


def test_folder_without_images_is_one_line(kfold, tmp_path):
    empty = tmp_path / "no-images"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    proc = run_predict("--model", kfold.dir, "--images", empty, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and re.match(rf"error: {re.escape(str(empty))}: no images found \(looked for \.png, \.jpg", lines[0]), lines


def test_image_source_lists_images_recursively(tmp_path):
    from training.delivery.images import ImageSource
    from training.errors import SegtuneError

    for rel in ("b/x.JPG", "a.png", "a.jpg", "b/c/y.webp", ".hidden/z.png", "b/._mac.jpg", "notes.txt", "out/masks/a.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    source = ImageSource.open(tmp_path, exclude=tmp_path / "out")
    assert source.relative == ["a.jpg", "a.png", "b/c/y.webp", "b/x.JPG"]
    assert source.output_names() == ["a.jpg.png", "a.png.png", "b/c/y.png", "b/x.png"]  # a.jpg and a.png keep their names apart
    assert ImageSource.open(tmp_path / "b" / "x.JPG").relative == ["x.JPG"]
    with pytest.raises(SegtuneError, match="notes.txt: not an image file"):
        ImageSource.open(tmp_path / "notes.txt")
    with pytest.raises(SegtuneError, match="missing: no such file or directory"):
        ImageSource.open(tmp_path / "missing")


# ---- ONNX ----------------------------------------------------------------------------------


def onnx_probabilities(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0]).softmax(1)


@pytest.fixture(scope="module")
def real_batch(inputs, ensemble) -> torch.Tensor:
    """The readable input images through the ensemble's loader transform: uint8 N x 3 x 64 x 64."""
    from training.data.coco import read_image

    return torch.stack([ensemble.transform()(image=read_image(inputs.dir / rel))["image"][0] for rel in inputs.good])


def test_onnx_members_match_torch_on_real_images(cli, ensemble, real_batch):
    from training.data.transforms import normalize_images
    from training.delivery.onnx_export import onnx_session, read_manifest

    manifest = read_manifest(cli.out / "onnx")
    assert manifest["classes"] == ensemble.classes and manifest["vote"] == "soft" and manifest["postprocess"] == {"Pole": 0.002}
    assert manifest["tta"] == {"hflip": True, "vflip": False, "scales": [1.0]}
    assert [(m["file"], m["weight"], m["fold"]) for m in manifest["members"]] == [("member0.onnx", 2.0, 0), ("member1.onnx", 1.0, 1)]
    for entry, member in zip(manifest["members"], ensemble.members):
        assert entry["input_size"] == [64, 64] and entry["mean"] == list(member.cfg.augment.mean)
        session = onnx_session(cli.out / "onnx" / entry["file"])
        x = normalize_images(real_batch, entry["mean"], entry["std"])
        # dynamic batch, height and width: the batch at 64 px and two images at 96 x 128
        for images in (x, torch.nn.functional.interpolate(x[:2], size=(96, 128), mode="bilinear", align_corners=False)):
            with torch.no_grad():
                expected = member.model(images).softmax(1)
            diff = (onnx_probabilities(session, images) - expected).abs().max().item()
            assert diff < 1e-4, f"{entry['file']} {tuple(images.shape)}: max |onnxruntime - torch| probability = {diff:.2e}"


def test_onnx_manifest_reproduces_the_ensemble(cli, ensemble, real_batch):
    """The manifest's recipe (identity + hflip views, weighted soft vote) on onnxruntime gives torch's ensemble probabilities."""
    from training.data.transforms import normalize_images
    from training.delivery.onnx_export import onnx_session, read_manifest
    from training.evaluation.inference import member_output

    manifest = read_manifest(cli.out / "onnx")
    total = 0
    for entry in manifest["members"]:
        session = onnx_session(cli.out / "onnx" / entry["file"])
        x = normalize_images(real_batch, entry["mean"], entry["std"])
        views = onnx_probabilities(session, x) + onnx_probabilities(session, x.flip(3)).flip(3)
        total = total + entry["weight"] * views / 2
    onnx_proba = total / sum(m["weight"] for m in manifest["members"])

    x = normalize_images(real_batch, ensemble.members[0].cfg.augment.mean, ensemble.members[0].cfg.augment.std)
    outputs = [member_output(m, x, ensemble.frame, ensemble.tta) for m in ensemble.members]
    _, torch_proba = ensemble.vote_outputs(outputs)
    diff = (onnx_proba - torch_proba).abs().max().item()
    assert diff < 1e-4, f"max |onnxruntime ensemble - torch ensemble| probability = {diff:.2e}"
