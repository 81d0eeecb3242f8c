"""COCO polygon/RLE annotations -> per-image class masks, validated up front and cached once.

Class ids: Background = 0 (pixels no annotation covers), categories in id order = 1..N.
Overlaps are painted largest area first so small objects stay on top.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any, Callable, Iterable

import cv2
import numpy as np
import simplejpeg
from filelock import FileLock
from pycocotools import mask as mask_utils

from training.errors import DataError
from training.infra.fs import atomic_file, write_json
from training.infra.progress import progress

BACKGROUND = "Background"
# Bump when rasterisation changes so old caches are not reused.
RASTER_VERSION = 1
# Bump when check_image_file changes so images checked the old way are checked again.
CHECK_VERSION = 1


def default_cache_root() -> Path:
    return Path(os.environ.get("SEGTUNE_CACHE", Path.home() / ".cache" / "segtune"))


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    width: int
    height: int
    fields: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class CocoIndex:
    """One annotation file: its classes, images and annotations, already validated."""

    root: Path
    ann_path: Path
    content_hash: str
    classes: list[str]  # index = class id; classes[0] == "Background"
    images: list[ImageRecord]
    anns_by_image: dict[int, list[dict[str, Any]]]
    label_of_category: dict[int, int]

    @property
    def image_ids(self) -> list[int]:
        return [img.id for img in self.images]

    def image(self, image_id: int) -> ImageRecord:
        return self._by_id[image_id]

    def __post_init__(self) -> None:
        self._by_id = {img.id: img for img in self.images}

    def image_path(self, image_id: int) -> Path:
        return self.root / self._by_id[image_id].file_name

    def classes_present(self, image_id: int) -> set[int]:
        return {self.label_of_category[a["category_id"]] for a in self.anns_by_image.get(image_id, [])}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normalise_expected(expected: Iterable[str] | None) -> list[str] | None:
    if expected is None:
        return None
    names = list(expected)
    if names and names[0] == BACKGROUND:
        names = names[1:]
    return names


def load_coco(
    root: str | Path,
    ann_file: str = "train.json",
    expected_classes: Iterable[str] | None = None,
    check_images: bool = True,
    cache_root: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> CocoIndex:
    """Parse and validate a COCO file; every problem is a DataError naming the file and id.

    Images checked before (same annotation file, size and mtime) are not decoded again.
    """
    root = Path(root)
    ann_path = root / ann_file
    src = str(ann_path)
    if not ann_path.is_file():
        raise DataError(f"{src}: annotation file not found")
    raw = ann_path.read_bytes()
    content_hash = hashlib.sha256(raw).hexdigest()
    try:
        coco = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{src}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(coco, dict):
        raise DataError(f"{src}: top level must be a COCO object with images/categories/annotations")
    for key in ("images", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{src}: missing or invalid '{key}' list")
    names, label_of_category = _parse_categories(coco["categories"], expected_classes, src)
    images = sorted((_parse_image(img, root, src) for img in _unique_ids(coco["images"], src)), key=lambda r: r.id)
    anns_by_image = _parse_annotations(coco.get("annotations") or [], {r.id: r for r in images}, label_of_category, src)
    if check_images:
        _check_image_files(root, images, content_hash, cache_root, src, ann_path.name, log)
    return CocoIndex(root, ann_path, content_hash, [BACKGROUND, *names], images, anns_by_image, label_of_category)


def _parse_categories(categories: list, expected_classes: Iterable[str] | None, src: str) -> tuple[list[str], dict[int, int]]:
    """(names in id order, {category id: class id}); Background is class 0."""
    categories = sorted(categories, key=lambda c: c.get("id", 0) if isinstance(c, dict) else 0)
    names = []
    for cat in categories:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            raise DataError(f"{src}: category {cat!r} needs an integer 'id' and a 'name'")
        names.append(cat["name"])
    if len(set(c["id"] for c in categories)) != len(categories):
        raise DataError(f"{src}: duplicate category ids")
    expected = _normalise_expected(expected_classes)
    if expected is not None and names != expected:
        raise DataError(f"{src}: categories {names} differ from the configured data.classes {expected}")
    return names, {cat["id"]: i + 1 for i, cat in enumerate(categories)}


def _unique_ids(entries: list, src: str) -> list[dict[str, Any]]:
    seen: set[int] = set()
    for img in entries:
        if not isinstance(img, dict):
            raise DataError(f"{src}: image entry {img!r} is not an object")
        image_id = img.get("id")
        if not isinstance(image_id, int):
            raise DataError(f"{src}: image {img.get('file_name', '?')!r} has no integer 'id'")
        if image_id in seen:
            raise DataError(f"{src}: image id {image_id}: duplicate id")
        seen.add(image_id)
    return entries


def _parse_image(img: dict[str, Any], root: Path, src: str) -> ImageRecord:
    image_id = img["id"]
    for key in ("file_name", "width", "height"):
        if key not in img:
            raise DataError(f"{src}: image id {image_id}: missing '{key}'")
    if not isinstance(img["file_name"], str) or not img["file_name"]:
        raise DataError(f"{src}: image id {image_id}: 'file_name' must be a non-empty path, got {img['file_name']!r}")
    if escapes_root(img["file_name"]):
        raise DataError(f"{src}: image id {image_id}: file_name {img['file_name']!r} lies outside the data root {root}")
    for key in ("width", "height"):
        if isinstance(img[key], bool) or not isinstance(img[key], (int, float)) or img[key] < 1 or img[key] != int(img[key]):
            raise DataError(f"{src}: image id {image_id}: '{key}' must be a positive integer, got {img[key]!r}")
    extra = {k: v for k, v in img.items() if k not in ("id", "file_name", "width", "height")}
    return ImageRecord(image_id, img["file_name"], int(img["width"]), int(img["height"]), extra)


def _parse_annotations(annotations: Any, by_id: dict[int, ImageRecord], label_of_category: dict[int, int], src: str) -> dict[int, list[dict[str, Any]]]:
    if not isinstance(annotations, list):
        raise DataError(f"{src}: 'annotations' must be a list")
    anns_by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in annotations:
        if not isinstance(ann, dict):
            raise DataError(f"{src}: annotation {str(ann)[:80]!r} is not an object")
        ann_id = ann.get("id", "?")
        if ann.get("image_id") not in by_id:
            raise DataError(f"{src}: annotation id {ann_id}: image_id {ann.get('image_id')!r} is not in images")
        if ann.get("category_id") not in label_of_category:
            raise DataError(f"{src}: annotation id {ann_id}: category_id {ann.get('category_id')!r} is not in categories")
        img = by_id[ann["image_id"]]
        _check_segmentation(ann.get("segmentation"), img, f"{src}: annotation id {ann_id} (image id {img.id})")
        anns_by_image.setdefault(img.id, []).append(ann)
    return anns_by_image


def _check_image_files(root: Path, images: list[ImageRecord], content_hash: str, cache_root, src: str, name: str, log) -> None:
    checked = CheckedImages(root, content_hash, cache_root)
    unchecked = [img for img in images if not checked.holds(img.file_name, image_stat(root, img, src))]
    try:
        for img in progress(unchecked, f"checking images {name}", log=log):
            checked.add(img.file_name, check_image_file(root, img, src))
    finally:  # what passed is kept even when a later image fails
        checked.save()


def escapes_root(file_name: str) -> bool:
    """An absolute path, or one whose `..` parts lead above the data root.

    Lexical on purpose: a symlinked images/ folder inside the root is a normal layout.
    """
    return os.path.isabs(file_name) or os.path.normpath(file_name).split(os.sep)[0] == ".."


def _check_segmentation(seg: Any, img: ImageRecord, where: str) -> None:
    if isinstance(seg, list):
        if not seg:
            raise DataError(f"{where}: empty segmentation")
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                n = len(poly) if isinstance(poly, list) else type(poly).__name__
                raise DataError(f"{where}: polygon {k} has {n} coordinates (needs an even number >= 6)")
            if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in poly):
                raise DataError(f"{where}: polygon {k} has non-numeric or non-finite coordinates")
            xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
            area = 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
            if area <= 0:
                raise DataError(f"{where}: polygon {k} has zero area")
            if xs.max() <= 0 or ys.max() <= 0 or xs.min() >= img.width or ys.min() >= img.height:
                raise DataError(
                    f"{where}: polygon {k} lies outside the {img.width}x{img.height} image "
                    f"(x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g})"
                )
    elif isinstance(seg, dict):
        size = seg.get("size")
        if "counts" not in seg or not isinstance(size, list) or len(size) != 2:
            raise DataError(f"{where}: RLE needs 'counts' and 'size' [height, width]")
        if list(size) != [img.height, img.width]:
            raise DataError(f"{where}: RLE size {size} differs from the image's [{img.height}, {img.width}]")
    else:
        raise DataError(f"{where}: segmentation must be polygons (list) or RLE (dict), got {type(seg).__name__}")


def image_stat(root: Path, img: ImageRecord, src: str) -> os.stat_result:
    path = root / img.file_name
    try:
        stat = path.stat()
    except (OSError, ValueError):
        stat = None
    if stat is None or not S_ISREG(stat.st_mode):
        raise DataError(f"{src}: image id {img.id} ({path}): file not found")
    return stat


def check_image_file(root: Path, img: ImageRecord, src: str) -> os.stat_result:
    """The image decodes completely and has the size the json says; returns the stat of the bytes checked."""
    path = root / img.file_name
    where = f"{src}: image id {img.id} ({path})"
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(f"{where}: file not found") from None
    except OSError as err:
        raise DataError(f"{where}: cannot read ({err.strerror})") from None
    height, width = decoded_size(data, where)
    if (height, width) != (img.height, img.width):
        raise DataError(f"{where}: image is {width}x{height} but the json says {img.width}x{img.height}")
    return stat


def decoded_size(data: bytes, where: str) -> tuple[int, int]:
    """(height, width) of the whole decoded image as the loader sees it; DataError if any of it is corrupt."""
    if data[:2] == b"\xff\xd8":
        # cv2 and PIL fill a truncated JPEG with grey and only warn; strict makes libjpeg's warnings errors.
        try:
            height, width = simplejpeg.decode_jpeg(data, strict=True).shape[:2]
        except ValueError as err:
            raise DataError(f"{where}: corrupt image ({' '.join(str(err).split())})") from None
        if b"Exif\x00\x00" not in data:
            return height, width
        # cv2 (the loader) turns the image by its EXIF orientation, which may swap width and height.
    # libpng refuses truncated or CRC-damaged PNGs, so cv2 returns None for them.
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise DataError(f"{where}: corrupt image (cannot decode)")
    return decoded.shape[:2]


class CheckedImages:
    """Images of one annotation file and root that passed check_image_file: file_name -> [st_size, st_mtime_ns].

    A full decode costs ~1 ms an image, so an image whose size and mtime are unchanged is not
    decoded again. The record only saves time: unreadable, it is empty; unwritable, it is not saved.
    """

    def __init__(self, root: Path, content_hash: str, cache_root: str | Path | None = None):
        cache_root = Path(cache_root) if cache_root else default_cache_root()
        # the root is part of the key: the same json next to other image files says nothing about them
        root_key = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:12]
        self.path = cache_root / "checked" / f"{content_hash[:20]}-{root_key}-v{CHECK_VERSION}.json"
        self.recorded = self._read()
        self.added: dict[str, list[int]] = {}

    def holds(self, file_name: str, stat: os.stat_result) -> bool:
        return self.recorded.get(file_name) == [stat.st_size, stat.st_mtime_ns]

    def add(self, file_name: str, stat: os.stat_result) -> None:
        self.added[file_name] = [stat.st_size, stat.st_mtime_ns]

    def save(self) -> None:
        if not self.added:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # merged with what other processes saved meanwhile; atomic, so readers never see half a file
            write_json(self.path, {**self._read(), **self.added})
        except OSError:
            pass

    def _read(self) -> dict[str, list[int]]:
        try:
            recorded = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(recorded, dict):
            return {}
        return {name: fingerprint for name, fingerprint in recorded.items()
                if isinstance(fingerprint, list) and len(fingerprint) == 2 and all(type(v) is int for v in fingerprint)}


def annotation_rle(ann: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(seg, height, width)
    return seg


def rasterize(index: CocoIndex, image_id: int) -> np.ndarray:
    """The class mask (uint8, H x W) of one image: largest annotations painted first."""
    img = index.image(image_id)
    mask = np.zeros((img.height, img.width), dtype=np.uint8)
    anns = index.anns_by_image.get(image_id, [])
    if not anns:
        return mask
    rles = [annotation_rle(a, img.height, img.width) for a in anns]
    areas = mask_utils.area(rles)
    for k in np.argsort(-areas, kind="stable"):
        mask[mask_utils.decode(rles[k]) > 0] = index.label_of_category[anns[k]["category_id"]]
    return mask


class MaskCache:
    """Masks rasterised once per annotation-file content, stored as .npy files.

    The key is the annotation file's sha256 plus the rasteriser version, so an edited
    file gets a fresh cache and an unchanged one is never rasterised again.
    """

    def __init__(self, index: CocoIndex, cache_root: str | Path | None = None):
        self.index = index
        root = Path(cache_root) if cache_root else default_cache_root()
        self.dir = root / "masks" / f"{index.content_hash[:20]}-v{RASTER_VERSION}"
        self._marker = self.dir / ".complete"

    def path(self, image_id: int) -> Path:
        return self.dir / f"{image_id}.npy"

    @property
    def complete(self) -> bool:
        return self._marker.is_file()

    def build(self, log: Callable[[str], None] | None = None) -> "MaskCache":
        """Rasterise every image not cached yet; safe when several processes call it at once."""
        if self.complete:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.dir) + ".lock"):
            if self.complete:
                return self
            missing = [image_id for image_id in self.index.image_ids if not self.path(image_id).is_file()]
            for image_id in progress(missing, f"rasterising masks {self.index.ann_path.name}", log=log):
                with atomic_file(self.path(image_id), "wb") as f:
                    np.save(f, rasterize(self.index, image_id))
            self._marker.write_text(json.dumps({"images": len(self.index.images), "classes": self.index.classes}))
        return self

    def load(self, image_id: int) -> np.ndarray:
        img = self.index.image(image_id)
        return read_uint8_npy(self.path(image_id), (img.height, img.width))


def read_uint8_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 array that np.save wrote, of known shape: np.load without its header parsing.

    np.load parses the header with ast.literal_eval, ~0.06 ms a file: as long as reading a
    mask. The header is checked by a byte comparison instead. ValueError if it does not match.
    """
    with open(path, "rb") as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)  # bytearray: the array stays writable
        f.readinto(buf)
    n = int(np.prod(shape))
    header = bytes(buf[: len(buf) - n])
    if not header.startswith(b"\x93NUMPY") or b"'descr': '|u1', 'fortran_order': False, 'shape': " + repr(tuple(shape)).encode() not in header:
        raise ValueError(f"{path}: not a cached uint8 array of shape {tuple(shape)}")
    return np.frombuffer(buf, np.uint8, count=n, offset=len(buf) - n).reshape(shape)


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 image."""
    rgb = cv2.imread(str(path), cv2.IMREAD_COLOR_RGB)
    if rgb is None:
        raise DataError(f"{path}: cannot read image")
    return rgb


class ImageCache:
    """Decoded RGB images as .npy files, written the first time each image is read.

    Reading a cached 480x360 image takes ~0.1 ms against ~0.9 ms to decode its JPEG, which is a
    quarter of a training sample's loader time. Entries are named after the source file's size
    and mtime, so a replaced image is decoded again. The cache only speeds things up: if it
    cannot be written (disk full, read-only), images are decoded as before.
    """

    def __init__(self, index: CocoIndex, cache_root: str | Path | None = None):
        self.index = index
        root = Path(cache_root) if cache_root else default_cache_root()
        self.dir = root / "images" / index.content_hash[:20]

    def entry(self, image_id: int) -> Path:
        stat = os.stat(self.index.image_path(image_id))
        return self.dir / f"{image_id}-{stat.st_size}-{stat.st_mtime_ns}.npy"

    def load(self, image_id: int) -> np.ndarray:
        entry = self.entry(image_id)
        img = self.index.image(image_id)
        try:
            return read_uint8_npy(entry, (img.height, img.width, 3))
        except (OSError, ValueError):  # not cached yet, unreadable or not what we expect: decode again
            pass
        image = read_image(self.index.image_path(image_id))
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with atomic_file(entry, "wb") as f:  # atomic: concurrent loader workers write the same bytes
                np.save(f, image)
        except OSError:
            pass
        return image
