"""Tests for the embedded synthetic sample dataset (training/data/sample.py)."""
from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from training.data.sample import (FLOOR_COLOR, GENERATOR_VERSION, SAMPLE_CLASSES, SAMPLE_COLORS,
                                  ensure_sample_dataset, generate_sample_dataset)

NAMES = ("General trash", "Paper", "Paper pack", "Metal", "Glass",
         "Plastic", "Styrofoam", "Plastic bag", "Battery", "Clothing")
# pycocotools' Cython RLE objects trip a NumPy 2 deprecation on every decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PALETTE = np.array(list(SAMPLE_COLORS) + [FLOOR_COLOR], np.float64)  # index 10 = floor


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_sample_dataset(tmp_path_factory.mktemp("sample"))


def _load(root: Path, split: str) -> dict:
    return json.loads((root / f"{split}.json").read_text())


def _image(root: Path, file_name: str) -> np.ndarray:
    img = cv2.imread(str(root / file_name), cv2.IMREAD_COLOR)
    assert img is not None, file_name
    return img[..., ::-1].astype(np.float64)


def test_deterministic(root: Path, tmp_path: Path) -> None:
    other = generate_sample_dataset(tmp_path / "again")
    for name in ("train.json", "test.json", "images/train/0000.jpg", "images/test/0023.jpg"):
        assert (root / name).read_bytes() == (other / name).read_bytes(), name
    different = generate_sample_dataset(tmp_path / "seed1", n_train=8, n_test=4, seed=1)
    assert _load(different, "train")["annotations"] != _load(root, "train")["annotations"][:4]


def test_layout_and_categories(root: Path) -> None:
    assert SAMPLE_CLASSES == NAMES
    train, test = _load(root, "train"), _load(root, "test")
    for data in (train, test):
        assert [(c["id"], c["name"]) for c in data["categories"]] == list(enumerate(NAMES, 1))
    assert len(train["images"]) == 96 and len(test["images"]) == 24
    assert (root / "README.md").read_text().strip()
    assert (root / ".complete").read_text() == GENERATOR_VERSION
    for im in train["images"]:
        assert im["file_name"].startswith("images/train/") and im["width"] == im["height"] == 128
        assert im["group"] == f"g{im['id'] // 4}"
    assert Counter(im["group"] for im in train["images"]) == {f"g{k}": 4 for k in range(24)}
    # Groups never straddle splits.
    assert not {im["group"] for im in train["images"]} & {im["group"] for im in test["images"]}


def test_every_category_in_train(root: Path) -> None:
    counts = Counter(a["category_id"] for a in _load(root, "train")["annotations"])
    assert set(counts) == set(range(1, 11))
    assert min(counts.values()) >= 8
    assert counts[9] == min(counts.values())  # Battery is the rare class
    per_image = Counter(a["image_id"] for a in _load(root, "train")["annotations"])
    assert len(per_image) == 96 and set(per_image.values()) <= {1, 2, 3, 4}


def test_annotations_match_pixels(root: Path) -> None:
    train = _load(root, "train")
    coco = COCO(str(root / "train.json"))  # the standard loader accepts the file
    by_image: dict[int, list[dict]] = {}
    for a in train["annotations"]:
        assert a["iscrowd"] == 0 and len(a["segmentation"]) == 1 and len(a["segmentation"][0]) >= 6
        by_image.setdefault(a["image_id"], []).append(a)
    ious, checked = [], 0
    for im in train["images"]:
        img = _image(root, im["file_name"])
        nearest = np.argmin(((img[:, :, None, :] - PALETTE) ** 2).sum(-1), -1)
        # Semantic-mask convention: larger annotations painted first, smaller on top.
        anns = sorted(by_image[im["id"]], key=lambda a: -a["area"])
        owner = np.full(img.shape[:2], -1)
        for j, a in enumerate(anns):
            rle = mask_utils.frPyObjects(a["segmentation"], im["height"], im["width"])
            m = mask_utils.decode(rle).max(-1).astype(bool)
            assert m.sum() > 0
            assert np.array_equal(m, coco.annToMask(coco.anns[a["id"]]).astype(bool))
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(m)
            assert x - 1 <= xs.min() and xs.max() <= x + w + 1 and y - 1 <= ys.min() and ys.max() <= y + h + 1
            assert abs(m.sum() - a["area"]) <= 0.15 * a["area"] + 20
            owner[m] = j
        for j, a in enumerate(anns):
            visible = owner == j
            pred = nearest == a["category_id"] - 1
            ious.append((visible & pred).sum() / (visible | pred).sum())
            core = cv2.erode(visible.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            if core.sum() >= 10:
                mean = img[core].mean(0)
                assert np.argmin(((PALETTE - mean) ** 2).sum(-1)) == a["category_id"] - 1, (im, a["id"])
                checked += 1
        floor = cv2.erode((owner == -1).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert (nearest[floor] == 10).mean() > 0.98
    assert checked >= 0.95 * len(train["annotations"])
    # Pixel-exact agreement: a 1 px shift or reversed paint order drops these well below the bounds.
    assert np.median(ious) > 0.97 and np.percentile(ious, 5) > 0.9 and min(ious) > 0.6


def test_test_split(root: Path) -> None:
    test = _load(root, "test")
    assert test["annotations"] == []
    assert [im["id"] for im in test["images"]] == list(range(24))
    for im in test["images"]:
        assert im["file_name"].startswith("images/test/")
        assert _image(root, im["file_name"]).shape == (128, 128, 3)


def test_ensure_is_idempotent_and_atomic(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "sample_data"
    first = ensure_sample_dataset(target)
    mtime = (first / "train.json").stat().st_mtime_ns
    assert first == target.resolve()
    assert ensure_sample_dataset(target) == first
    assert (first / "train.json").stat().st_mtime_ns == mtime
    assert os.listdir(target.parent) == ["sample_data"]  # no temp dirs left behind
    # An older generator version gets regenerated.
    (target / ".complete").write_text("0")
    assert ensure_sample_dataset(target) == first
    assert (first / ".complete").read_text() == GENERATOR_VERSION
    assert os.listdir(target.parent) == ["sample_data"]


def _ensure_and_read(root: str) -> int:
    path = ensure_sample_dataset(root)
    return len(json.loads((path / "train.json").read_text())["images"])


def test_ensure_concurrent_callers(tmp_path: Path) -> None:
    target = str(tmp_path / "shared")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert pool.map(_ensure_and_read, [target] * 4) == [96] * 4
    assert os.listdir(tmp_path) == ["shared"]


def test_ensure_env_override_and_refuses_foreign_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGTUNE_SAMPLE_DIR", str(tmp_path / "env_root"))
    assert ensure_sample_dataset() == (tmp_path / "env_root").resolve()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_sample_dataset(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
