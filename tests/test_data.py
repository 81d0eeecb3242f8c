"""COCO -> mask rasterisation, the mask cache, and data validation before training."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath
from pycocotools import mask as mask_utils

from conftest import CAMVID, PYTHON, REPO, write_camvid_subset
from training.config import load_space
from training.data.coco import MaskCache, load_coco, rasterize, read_image
from training.data.dataset import prepare_data
from training.errors import DataError

# pycocotools' Cython RLE objects trip a NumPy 2 deprecation on every decode; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def polygon_area(poly: list[float]) -> float:
    xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))


def reference_mask(index, image_id: int) -> np.ndarray:
    """Independent rasteriser: point-in-polygon on pixel centres, largest annotation painted first.

    CamVid's polygon vertices sit on pixel centres, so the boundary rule decides a few % of
    pixels. COCO's convention (pycocotools, which the json's `area` fields come from) counts a
    boundary pixel when the point just above-left of its centre is inside; we sample there.
    """
    img = index.image(image_id)
    mask = np.zeros((img.height, img.width), np.uint8)
    anns = sorted(index.anns_by_image.get(image_id, []), key=lambda a: -sum(map(polygon_area, a["segmentation"])))
    for ann in anns:
        covered = np.zeros_like(mask, dtype=bool)
        for poly in ann["segmentation"]:
            vertices = np.asarray(poly, float).reshape(-1, 2)
            x0, y0 = np.clip(np.floor(vertices.min(0)).astype(int), 0, None)
            x1, y1 = np.minimum(np.ceil(vertices.max(0)).astype(int), [img.width - 1, img.height - 1])
            ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
            centres = np.stack([xs.ravel() + 0.5 - 1e-3, ys.ravel() + 0.5 - 1e-3], 1)
            covered[y0 : y1 + 1, x0 : x1 + 1] |= PolygonPath(vertices).contains_points(centres).reshape(ys.shape)
        mask[covered] = index.label_of_category[ann["category_id"]]
    return mask


@pytest.fixture(scope="module")
def camvid12(tmp_path_factory) -> Path:
    """A 12-image CamVid subset with its own image files (made once per module)."""
    root = write_camvid_subset(tmp_path_factory.mktemp("camvid12"), n_train=12)
    (root / "images").unlink()
    for im in json.loads((root / "train.json").read_text())["images"]:
        (root / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CAMVID / im["file_name"], root / im["file_name"])
    return root


@pytest.fixture
def camvid_copy(camvid12, tmp_path) -> Path:
    """A fresh writable copy of camvid12, for corrupting (shadows conftest's slower fixture)."""
    return Path(shutil.copytree(camvid12, tmp_path / "camvid12"))


def smoke_config(root: Path, **overrides):
    return load_space("deeplab", smoke=True, overrides={"data.root": str(root), **overrides}).defaults


# ---- rasterisation ---------------------------------------------------------------------


def test_masks_match_independent_rasterisation(camvid_small, tmp_path):
    index = load_coco(camvid_small, check_images=False)
    cache = MaskCache(index, tmp_path).build()
    n_classes = len(index.classes)
    ids = index.image_ids[::7]  # 6 images across all three sequences
    assert len({index.image(i).fields["sequence"] for i in ids}) == 3
    for image_id in ids:
        ours = cache.load(image_id)
        assert ours.dtype == np.uint8 and ours.shape == (360, 480)
        assert np.array_equal(ours, rasterize(index, image_id))
        ref = reference_mask(index, image_id)
        agreement = (ours == ref).mean()
        assert agreement >= 0.98, (image_id, agreement)
        ours_counts = np.bincount(ours.ravel(), minlength=n_classes)
        ref_counts = np.bincount(ref.ravel(), minlength=n_classes)
        # each class within 1% of the image's pixels, and within 10% of itself when it is large
        assert np.all(np.abs(ours_counts - ref_counts) <= 0.01 * ours.size), (image_id, ours_counts, ref_counts)
        big = ref_counts > 5000
        assert np.all(np.abs(ours_counts - ref_counts)[big] <= 0.1 * ref_counts[big]), (image_id, ours_counts, ref_counts)
        assert set(np.unique(ours).tolist()) - {0} <= index.classes_present(image_id)


def write_coco(root: Path, annotations: list[dict], size=(40, 48), categories=("Big", "Small"), name="train.json") -> Path:
    """A one-image COCO dataset with a real (grey) JPEG."""
    height, width = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "images" / "a.jpg"), np.full((height, width, 3), 128, np.uint8))
    coco = {
        "images": [{"id": 7, "file_name": "images/a.jpg", "width": width, "height": height}],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)],
        "annotations": annotations,
    }
    (root / name).write_text(json.dumps(coco))
    return root


def rect(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


@pytest.mark.parametrize("small_first", [False, True])
def test_small_object_painted_over_large_regardless_of_order(tmp_path, small_first):
    big = {"id": 1, "image_id": 7, "category_id": 1, "segmentation": [rect(2, 2, 40, 30)]}
    small = {"id": 2, "image_id": 7, "category_id": 2, "segmentation": [rect(10, 10, 20, 20)]}
    anns = [small, big] if small_first else [big, small]
    index = load_coco(write_coco(tmp_path, anns))
    mask = rasterize(index, 7)
    assert index.classes == ["Background", "Big", "Small"]
    assert (mask[12:18, 12:18] == 2).all()  # small on top
    assert (mask[5:8, 25:35] == 1).all()
    assert mask[0, 0] == 0 and mask[35, 45] == 0
    assert 90 <= (mask == 2).sum() <= 110  # 10 x 10


def test_rle_annotations(tmp_path):
    height, width = 40, 48
    square = np.zeros((height, width), np.uint8)
    square[5:15, 6:20] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    compressed["counts"] = compressed["counts"].decode("ascii")
    strip = np.zeros((height, width), np.uint8)
    strip[20:30, :] = 1
    # Uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros.
    flat = strip.ravel(order="F")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))  # 2: force a final edge
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    anns = [
        {"id": 1, "image_id": 7, "category_id": 1, "segmentation": compressed, "iscrowd": 1},
        {"id": 2, "image_id": 7, "category_id": 2, "segmentation": {"counts": counts, "size": [height, width]}, "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 1, "segmentation": [rect(30.0, 32.0, 40.0, 38.0)]},
    ]
    index = load_coco(write_coco(tmp_path, anns))
    mask = rasterize(index, 7)
    assert np.array_equal(mask == 2, strip.astype(bool))
    assert np.array_equal(mask[:20] == 1, square[:20].astype(bool))
    assert (mask[33:37, 31:39] == 1).all()
    # an RLE whose size disagrees with the image is refused
    anns[0] = dict(anns[0], segmentation=dict(compressed, size=[height + 1, width]))
    write_coco(tmp_path, anns)
    with pytest.raises(DataError, match=r"annotation id 1 \(image id 7\): RLE size"):
        load_coco(tmp_path)


# ---- the cache -------------------------------------------------------------------------


def test_cache_built_once_and_keyed_by_annotation_content(camvid_copy, tmp_path):
    cache_root = tmp_path / "cache"
    index = load_coco(camvid_copy, check_images=False)
    first = MaskCache(index, cache_root).build()
    files = sorted(first.dir.glob("*.npy"))
    assert len(files) == len(index.images) and first.complete
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    again = MaskCache(load_coco(camvid_copy, check_images=False), cache_root).build()
    assert again.dir == first.dir
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    assert not list(first.dir.glob("*.tmp"))
    # An interrupted build (no completion marker) only fills in what is missing.
    (first.dir / ".complete").unlink()
    files[0].unlink()
    MaskCache(index, cache_root).build()
    assert files[0].is_file()
    assert {f: f.stat().st_mtime_ns for f in files[1:]} == {f: mtimes[f] for f in files[1:]}

    # Editing train.json (drop one image's largest annotation) gives a new cache dir and a new mask.
    coco = json.loads((camvid_copy / "train.json").read_text())
    image_id = coco["images"][0]["id"]
    largest = max((a for a in coco["annotations"] if a["image_id"] == image_id), key=lambda a: a["area"])
    coco["annotations"].remove(largest)
    (camvid_copy / "train.json").write_text(json.dumps(coco))
    edited = MaskCache(load_coco(camvid_copy, check_images=False), cache_root).build()
    assert edited.dir != first.dir
    assert (edited.load(image_id) != first.load(image_id)).sum() >= 0.5 * largest["area"]
    assert np.array_equal(edited.load(coco["images"][1]["id"]), first.load(coco["images"][1]["id"]))


# ---- validation: every problem surfaces in prepare_data, naming the file and the id -----------


def edit_json(root: Path, change) -> dict:
    path = root / "train.json"
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))
    return coco


def data_error(root: Path, **overrides) -> str:
    with pytest.raises(DataError) as info:
        prepare_data(smoke_config(root, **overrides), log=lambda _: None)
    message = str(info.value)
    assert "\n" not in message
    assert str(root / "train.json") in message, message  # names the file
    # raised by the validation in prepare_data, before any model or loader exists
    assert any(entry.name == "prepare_data" for entry in info.traceback)
    assert not any(entry.name in ("train", "fit", "__init__") for entry in info.traceback)
    return message


def first_ann(coco: dict) -> dict:
    return coco["annotations"][0]


def test_valid_copy_prepares(camvid_copy):
    data = prepare_data(smoke_config(camvid_copy), log=lambda _: None)
    assert len(data.index.images) == 12 and data.cache.complete


def test_missing_image_file(camvid_copy):
    coco = json.loads((camvid_copy / "train.json").read_text())
    img = coco["images"][3]
    (camvid_copy / img["file_name"]).unlink()
    message = data_error(camvid_copy)
    assert str(camvid_copy / "train.json") in message
    assert f"image id {img['id']}" in message and img["file_name"] in message and "not found" in message


def test_truncated_jpeg(camvid_copy):
    coco = json.loads((camvid_copy / "train.json").read_text())
    img = coco["images"][5]
    path = camvid_copy / img["file_name"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = data_error(camvid_copy)
    assert str(camvid_copy / "train.json") in message
    assert f"image id {img['id']}" in message and "corrupt" in message


def test_garbage_image(camvid_copy):
    coco = json.loads((camvid_copy / "train.json").read_text())
    img = coco["images"][2]
    (camvid_copy / img["file_name"]).write_bytes(b"not an image at all")
    message = data_error(camvid_copy)
    assert f"image id {img['id']}" in message and "corrupt" in message


def test_image_size_differs_from_json(camvid_copy):
    coco = edit_json(camvid_copy, lambda c: c["images"][1].update(width=500))
    message = data_error(camvid_copy)
    assert f"image id {coco['images'][1]['id']}" in message and "500x360" in message


def test_truncated_jpeg_with_end_marker_restored(camvid_copy):
    """A third of a JPEG plus its end marker: cv2 decodes it with the rest grey, the check must not."""
    coco = json.loads((camvid_copy / "train.json").read_text())
    img = coco["images"][5]
    path = camvid_copy / img["file_name"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] + b"\xff\xd9")
    assert read_image(path).shape == (360, 480, 3)  # what training would have used
    message = data_error(camvid_copy)
    assert f"image id {img['id']}" in message and img["file_name"] in message and "corrupt" in message, message


def png_chunk_starts(data: bytes) -> list[int]:
    starts, pos = [], 8  # after the PNG signature
    while pos < len(data):
        starts.append(pos)
        pos += 12 + struct.unpack(">I", data[pos : pos + 4])[0]  # length, type, data, crc
    return starts


@pytest.mark.parametrize("cut", ["mid-chunk", "chunk-boundary"])
def test_truncated_png_with_end_chunk_restored(camvid_copy, cut):
    coco = json.loads((camvid_copy / "train.json").read_text())
    img = coco["images"][5]
    png_name = img["file_name"].replace(".jpg", ".png")
    path = camvid_copy / png_name
    cv2.imwrite(str(path), cv2.imread(str(camvid_copy / img["file_name"])))
    edit_json(camvid_copy, lambda c: c["images"][5].update(file_name=png_name))
    load_coco(camvid_copy)  # the whole PNG passes
    data = path.read_bytes()
    third = len(data) // 3
    end = third if cut == "mid-chunk" else next(s for s in png_chunk_starts(data) if s >= third)
    path.write_bytes(data[:end] + data[-12:])  # data[-12:]: the IEND chunk
    message = data_error(camvid_copy)
    assert f"image id {img['id']}" in message and png_name in message and "corrupt" in message, message


def test_exif_rotated_jpeg_is_checked_at_the_size_the_loader_sees(camvid_copy):
    from PIL import Image

    def keep_only_image_2(coco):  # its annotations would lie outside the turned image
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != coco["images"][2]["id"]]
        coco["images"][2].update(width=360, height=480)

    coco = edit_json(camvid_copy, keep_only_image_2)
    img = coco["images"][2]
    path = camvid_copy / img["file_name"]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to display
    Image.open(CAMVID / img["file_name"]).save(path, "JPEG", exif=exif, quality=95)
    assert read_image(path).shape == (480, 360, 3)
    load_coco(camvid_copy)
    edit_json(camvid_copy, lambda c: c["images"][2].update(width=480, height=360))
    message = data_error(camvid_copy)
    assert f"image id {img['id']}" in message and "image is 360x480 but the json says 480x360" in message, message


# ---- images checked once ----------------------------------------------------------------


def damage_in_place(path: Path) -> None:
    """Zero the last two thirds of a file, keeping its size and mtime: only a decode can tell."""
    stat = path.stat()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] + bytes(len(data) - len(data) // 3))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_checked_images_are_recorded_and_not_decoded_again(camvid_copy, tmp_path):
    cache = tmp_path / "cache"
    index = load_coco(camvid_copy, cache_root=cache)
    [record] = (cache / "checked").glob("*")
    assert record.name.startswith(index.content_hash[:20]) and record.suffix == ".json"
    stats = {img.file_name: index.image_path(img.id).stat() for img in index.images}
    assert json.loads(record.read_text()) == {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}

    first, second = index.images[3], index.images[7]
    damage_in_place(index.image_path(first.id))
    load_coco(camvid_copy, cache_root=cache)  # size and mtime unchanged: not decoded again
    # Any change of size or mtime is decoded again.
    os.utime(index.image_path(first.id))
    with pytest.raises(DataError, match=rf"image id {first.id} .*corrupt"):
        load_coco(camvid_copy, cache_root=cache)
    shutil.copyfile(CAMVID / first.file_name, index.image_path(first.id))
    data = (CAMVID / second.file_name).read_bytes()
    index.image_path(second.id).write_bytes(data[: len(data) // 3] + b"\xff\xd9")
    with pytest.raises(DataError, match=rf"image id {second.id} .*corrupt"):
        load_coco(camvid_copy, cache_root=cache)
    assert not list((cache / "checked").glob("*.tmp"))


def test_check_record_is_per_root_and_keeps_what_passed_before_a_failure(camvid_copy, tmp_path):
    cache = tmp_path / "cache"
    index = load_coco(camvid_copy, cache_root=cache)
    # The same json over other files (a copy with the same sizes and mtimes) is checked on its own.
    other = Path(shutil.copytree(camvid_copy, tmp_path / "other"))
    last = index.images[-1]
    damage_in_place(other / last.file_name)
    with pytest.raises(DataError, match=rf"image id {last.id} .*corrupt"):
        load_coco(other, cache_root=cache)
    records = {p: json.loads(p.read_text()) for p in (cache / "checked").glob("*.json")}
    assert len(records) == 2  # the images before the failing one are kept for the next run
    assert sorted(len(r) for r in records.values()) == [len(index.images) - 1, len(index.images)]


def test_unwritable_check_record_still_checks(camvid_copy, tmp_path):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache directory should be")
    img = load_coco(camvid_copy, cache_root=not_a_dir).images[2]
    damage_in_place(camvid_copy / img.file_name)
    with pytest.raises(DataError, match=rf"image id {img.id} .*corrupt"):
        load_coco(camvid_copy, cache_root=not_a_dir)


def test_progress_lines_only_for_uncached_work(camvid_copy, tmp_path, capsys):
    lines: list[str] = []  # capsys: stderr is no terminal, so progress writes plain lines to `log`
    index = load_coco(camvid_copy, cache_root=tmp_path, log=lines.append)
    MaskCache(index, tmp_path).build(log=lines.append)
    assert any(line.startswith("checking images train.json: 12/12 img") for line in lines), lines
    assert any(line.startswith("rasterising masks train.json: 12/12 img") for line in lines), lines
    lines.clear()
    index = load_coco(camvid_copy, cache_root=tmp_path, log=lines.append)
    MaskCache(index, tmp_path).build(log=lines.append)
    assert lines == []


# ---- image paths stay inside the data root ------------------------------------------------


@pytest.mark.parametrize("check_images", [True, False], ids=["checked", "unchecked"])
def test_file_name_outside_the_root_is_refused(camvid_copy, tmp_path, check_images):
    coco = json.loads((camvid_copy / "train.json").read_text())
    img = coco["images"][3]
    outside = tmp_path / "outside.jpg"  # camvid_copy is tmp_path / "camvid12"
    shutil.copy(CAMVID / img["file_name"], outside)  # a valid image of the right size: only its place is wrong
    for file_name in ("../outside.jpg", "images/train/../../../outside.jpg", str(outside)):
        edit_json(camvid_copy, lambda c: c["images"][3].update(file_name=file_name))
        with pytest.raises(DataError) as info:
            load_coco(camvid_copy, check_images=check_images)
        message = str(info.value)
        assert "\n" not in message
        for part in (str(camvid_copy / "train.json"), f"image id {img['id']}", repr(file_name), f"data root {camvid_copy}"):
            assert part in message, (part, message)
    assert "outside the data root" in data_error(camvid_copy)


def test_symlinked_images_folder_and_inner_dots_stay_allowed(tmp_path):
    root = write_camvid_subset(tmp_path / "linked", n_train=6)
    assert (root / "images").is_symlink()
    coco = edit_json(root, lambda c: c["images"][0].update(file_name="images/./train/../train/" + Path(c["images"][0]["file_name"]).name))
    index = load_coco(root)
    assert len(index.images) == 6 and index.image_path(coco["images"][0]["id"]).is_file()


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda a: a.update(image_id=99999), "image_id 99999 is not in images"),
        (lambda a: a.update(category_id=77), "category_id 77 is not in categories"),
        (lambda a: a.update(segmentation=[]), "empty segmentation"),
        (lambda a: a.update(segmentation=[a["segmentation"][0][:-1]]), "polygon 0 has"),
        (lambda a: a.update(segmentation=[[10, 10, 20, 20, 30, 30]]), "polygon 0 has zero area"),
        (lambda a: a.update(segmentation=[[10, 10, 20, 10]]), "polygon 0 has 4 coordinates"),
        (lambda a: a.update(segmentation="oops"), "must be polygons"),
        (lambda a: a.update(segmentation=[[600, 400, 700, 400, 700, 500]]), "polygon 0 lies outside the 480x360 image"),
    ],
    ids=["unknown-image", "unknown-category", "empty", "odd-length", "zero-area", "too-short", "wrong-type", "outside"],
)
def test_bad_annotation(camvid_copy, change, fragment):
    coco = edit_json(camvid_copy, lambda c: change(c["annotations"][4]))
    ann_id = coco["annotations"][4]["id"]
    message = data_error(camvid_copy)
    assert str(camvid_copy / "train.json") in message
    assert f"annotation id {ann_id}" in message, message
    assert fragment in message, message


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda c: c["annotations"].insert(3, ["not", "an", "object"]), "is not an object"),
        (lambda c: c["images"][2].update(width="480px"), "'width' must be a positive integer, got '480px'"),
        (lambda c: c["images"][2].update(height=0), "'height' must be a positive integer, got 0"),
        (lambda c: c["images"][2].update(file_name=None), "'file_name' must be a non-empty path"),
    ],
    ids=["annotation-not-object", "width-not-number", "height-zero", "no-file-name"],
)
def test_malformed_entries_are_one_line(camvid_copy, change, fragment):
    edit_json(camvid_copy, change)
    assert fragment in data_error(camvid_copy)


def test_classes_differ_from_config(camvid_copy):
    message = data_error(camvid_copy, **{"data.classes": ["Sky", "Building", "Road"]})
    assert str(camvid_copy / "train.json") in message and "data.classes" in message and "Bicyclist" in message
    # the right list (with or without Background) passes
    names = [c["name"] for c in json.loads((camvid_copy / "train.json").read_text())["categories"]]
    prepare_data(smoke_config(camvid_copy, **{"data.classes": names}), log=lambda _: None)


def test_invalid_json(camvid_copy):
    (camvid_copy / "train.json").write_text('{"images": [')
    message = data_error(camvid_copy)
    assert str(camvid_copy / "train.json") in message and "invalid JSON" in message


def test_cli_broken_data_exits_2_without_checkpoint(camvid_copy, tmp_path):
    coco = edit_json(camvid_copy, lambda c: c["annotations"][0].update(category_id=77))
    out = tmp_path / "run"
    proc = subprocess.run(
        [PYTHON, "training/train.py", "--data", str(camvid_copy), "--smoke", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert f"annotation id {coco['annotations'][0]['id']}" in lines[0] and "train.json" in lines[0]
    assert not out.exists()  # failed before the trainer made the output dir


@pytest.mark.parametrize("factor", [0, 1, 2, 3])
def test_rotate90_matches_albumentations(camvid_small, factor):
    """The cv2 RandomRotate90 that YAML's `RandomRotate90` builds gives albumentations' output."""
    import albumentations as A

    from training.data.coco import load_coco, read_image
    from training.data.transforms import RandomRotate90, _transform_class

    assert _transform_class("RandomRotate90", "augment[0]") is RandomRotate90
    index = load_coco(camvid_small, "train.json")
    image = read_image(index.image_path(index.image_ids[0]))
    mask = np.arange(image.shape[0] * image.shape[1], dtype=np.uint32).reshape(image.shape[:2]).astype(np.uint8)
    ours, theirs = RandomRotate90(p=1), A.RandomRotate90(p=1)
    for image_in in (image, image[:, :, 0]):  # RGB and single channel
        assert np.array_equal(ours.apply(image_in, factor), theirs.apply(image_in, factor))
    assert np.array_equal(ours.apply_to_mask(mask, factor=factor), theirs.apply_to_mask(mask, factor=factor))
    assert ours.apply(image, factor).flags.c_contiguous


def test_image_cache_serves_decoded_images_and_notices_replaced_files(camvid_copy, tmp_path):
    from training.data.coco import ImageCache, load_coco, read_image

    index = load_coco(camvid_copy, "train.json")
    cache = ImageCache(index, tmp_path / "cache")
    first, second = index.image_ids[:2]
    decoded = read_image(index.image_path(first))
    assert np.array_equal(cache.load(first), decoded)  # decoded and written
    entry = cache.entry(first)
    assert entry.is_file() and np.array_equal(np.load(entry), decoded)
    assert np.array_equal(cache.load(first), decoded)  # served from the entry
    # Replace the image file with another image: a new entry, the new pixels.
    shutil.copyfile(index.image_path(second), index.image_path(first))
    replaced = read_image(index.image_path(first))
    assert not np.array_equal(replaced, decoded)
    assert cache.entry(first) != entry and np.array_equal(cache.load(first), replaced)
    # A torn entry is decoded again, not trusted.
    cache.entry(first).write_bytes(entry.read_bytes()[:100])
    assert np.array_equal(cache.load(first), replaced)


def test_image_cache_that_cannot_be_written_still_decodes(camvid_copy, tmp_path):
    from training.data.coco import ImageCache, load_coco, read_image

    index = load_coco(camvid_copy, "train.json")
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache directory should be")
    image_id = index.image_ids[0]
    assert np.array_equal(ImageCache(index, not_a_dir).load(image_id), read_image(index.image_path(image_id)))
