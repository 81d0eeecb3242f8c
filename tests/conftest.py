"""Shared fixtures: CamVid subsets in the competition layout (real photos, real polygons)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CAMVID = Path(os.environ.get("SEGTUNE_CAMVID", REPO.parent / "shared" / "datasets" / "camvid"))
PYTHON = sys.executable


def write_camvid_subset(dest: Path, n_train: int, n_test: int = 0, stride_seed: int = 0) -> Path:
    """A CamVid subset: `n_train` images spread over all sequences, `n_test` test images.

    Images are symlinked, the json files rewritten, so the subset is a dataset root of its own.
    """
    if not (CAMVID / "train.json").is_file():
        pytest.fail(f"CamVid test data not found at {CAMVID} (set SEGTUNE_CAMVID)")
    dest.mkdir(parents=True, exist_ok=True)
    train = json.loads((CAMVID / "train.json").read_text())
    images = sorted(train["images"], key=lambda im: im["id"])
    step = max(1, len(images) // n_train)
    keep = images[stride_seed % step :: step][:n_train]
    keep_ids = {im["id"] for im in keep}
    subset = dict(train, images=keep, annotations=[a for a in train["annotations"] if a["image_id"] in keep_ids])
    (dest / "train.json").write_text(json.dumps(subset))
    test = json.loads((CAMVID / "test.json").read_text())
    test["images"] = sorted(test["images"], key=lambda im: im["id"])[:n_test]
    (dest / "test.json").write_text(json.dumps(test))
    if not (dest / "images").exists():
        (dest / "images").symlink_to(CAMVID / "images", target_is_directory=True)
    return dest


@pytest.fixture(autouse=True, scope="session")
def isolated_caches(tmp_path_factory):
    """Mask cache and fold manifests of the test session live in a temp dir, not ~/.cache."""
    cache = tmp_path_factory.mktemp("segtune-cache")
    old = os.environ.get("SEGTUNE_CACHE")
    os.environ["SEGTUNE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("SEGTUNE_CACHE", None)
    else:
        os.environ["SEGTUNE_CACHE"] = old


@pytest.fixture(scope="session")
def camvid_small(tmp_path_factory) -> Path:
    """40 annotated CamVid images (all three sequences) and 6 test images."""
    return write_camvid_subset(tmp_path_factory.mktemp("camvid40"), n_train=40, n_test=6)


@pytest.fixture
def camvid_copy(tmp_path) -> Path:
    """A writable 12-image CamVid subset with its own copies of the images, for corrupting."""
    import shutil

    root = write_camvid_subset(tmp_path / "camvid12", n_train=12, n_test=2)
    (root / "images").unlink()
    data = json.loads((root / "train.json").read_text()) | {}
    test = json.loads((root / "test.json").read_text())
    for im in data["images"] + test["images"]:
        target = root / im["file_name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CAMVID / im["file_name"], target)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (pytestmark usefixtures): with 2 threads on 2 cores, any other busy process
    (a loader worker, a parallel job) stalls OpenMP's barriers and a step takes ~3x longer; one thread does not."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def camvid16(tmp_path_factory) -> Path:
    """16 images: 5 folds leave ~13 train / 3 val at fold 0; enough for cheap loop checks."""
    return write_camvid_subset(tmp_path_factory.mktemp("camvid16"), n_train=16)
