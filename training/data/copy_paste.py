"""Copy-paste of rare classes: objects cut along their COCO polygons, pasted into training samples.

An `augment.train` entry like any albumentations one:

    {name: CopyPaste, classes: [Battery, Clothing], p: 0.5, max_objects: 3, scale: [0.5, 1.5]}

With probability `p` a sample gets 1..max_objects objects of `classes` (a class drawn uniformly,
then one of its objects), each scaled by a factor drawn from `scale` (shrunk further if it would
not fit), flipped left-right half the time and pasted at a random place; the pasted pixels take
the object's class in the mask. It runs before the albumentations pipeline (wherever the entry
stands in the list), so the rest of the pipeline flips and crops image and pasted mask together.

Objects come only from the images the run trains on (the fold's training side): the bank is
built from those ids and never sees a validation image. An object is the part of its polygon
that its image's mask gives its class (smaller objects painted over it are left out), and an
image never receives its own objects. Written here because albumentations transforms see one
image at a time, and this needs the fold's other images and their polygons.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training.data.coco import annotation_rle, read_image
from training.errors import ConfigError

if TYPE_CHECKING:
    from training.data.coco import CocoIndex, ImageCache, MaskCache

NAME = "CopyPaste"
BANK_MEMO_SIZE = 4  # banks kept per process: a k-fold task or a trial builds one per fold


class CopyPasteSpec(BaseModel):
    """The YAML entry's parameters (validated when the config is)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["CopyPaste"]
    classes: list[str] = Field(min_length=1)  # category names of the dataset
    p: float = Field(0.5, ge=0, le=1)  # chance that a sample gets pasted objects
    max_objects: int = Field(3, ge=1)  # objects per pasted sample: 1..max_objects
    scale: tuple[float, float] = (0.5, 1.5)  # size factor range, relative to the object's own size
    min_pixels: int = Field(16, ge=1)  # smaller (visible) objects are not worth pasting

    @model_validator(mode="after")
    def _scale_range(self) -> "CopyPasteSpec":
        low, high = self.scale
        if not 0 < low <= high:
            raise ValueError(f"scale must be [low, high] with 0 < low <= high, got {list(self.scale)}")
        return self


def is_copy_paste(spec: Any) -> bool:
    return isinstance(spec, dict) and spec.get("name") == NAME


def parse_spec(spec: dict[str, Any], where: str) -> CopyPasteSpec:
    """The entry as a CopyPasteSpec, or one ConfigError line naming `where` and the field."""
    try:
        return CopyPasteSpec.model_validate(spec)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        got = f" (got {first['input']!r})" if first["type"] not in ("missing", "extra_forbidden") else ""
        raise ConfigError(f"{where}{'.' + field if field else ''}: {NAME}: {message}{got}") from None


def check_classes(specs: Sequence[dict[str, Any]], where: str, classes: Sequence[str]) -> None:
    """Every CopyPaste entry names categories of the dataset (`classes`: Background first)."""
    known = list(classes[1:])
    for i, spec in enumerate(specs):
        if not is_copy_paste(spec):
            continue
        unknown = [name for name in spec.get("classes", []) if name not in known]
        if unknown:
            raise ConfigError(f"{where}[{i}].classes: unknown class {unknown[0]!r}; known: {known}")


@dataclass(frozen=True)
class BankObject:
    source_id: int  # the training image it was cut from
    label: int  # class id
    box: tuple[int, int, int, int]  # y0, x0, y1, x1 in the source image
    mask: np.ndarray  # bool, box-sized: the object's visible pixels


@dataclass
class ObjectBank:
    """The pasteable objects of some training images, by class id."""

    by_label: dict[int, list[BankObject]]

    @property
    def source_ids(self) -> set[int]:
        return {obj.source_id for objects in self.by_label.values() for obj in objects}

    def __len__(self) -> int:
        return sum(len(objects) for objects in self.by_label.values())


_BANKS: "OrderedDict[tuple, ObjectBank]" = OrderedDict()


def object_bank(index: "CocoIndex", cache: "MaskCache", image_ids: Sequence[int], labels: Sequence[int], min_pixels: int) -> ObjectBank:
    """The objects of `labels` in `image_ids`, built once per process for the same images and classes."""
    ids = sorted(set(image_ids))
    digest = hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()
    key = (index.content_hash, str(cache.dir), digest, tuple(sorted(labels)), min_pixels)
    if key in _BANKS:
        _BANKS.move_to_end(key)
        return _BANKS[key]
    bank = _build_bank(index, cache, ids, set(labels), min_pixels)
    _BANKS[key] = bank
    while len(_BANKS) > BANK_MEMO_SIZE:
        _BANKS.popitem(last=False)
    return bank


def _build_bank(index: "CocoIndex", cache: "MaskCache", ids: list[int], labels: set[int], min_pixels: int) -> ObjectBank:
    by_label: dict[int, list[BankObject]] = {label: [] for label in labels}
    for image_id in ids:
        anns = [a for a in index.anns_by_image.get(image_id, []) if index.label_of_category[a["category_id"]] in labels]
        if not anns:
            continue
        img = index.image(image_id)
        class_mask = cache.load(image_id)
        for ann in anns:
            label = index.label_of_category[ann["category_id"]]
            visible = (mask_utils.decode(annotation_rle(ann, img.height, img.width)) > 0) & (class_mask == label)
            if visible.sum() < min_pixels:
                continue
            rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            by_label[label].append(BankObject(image_id, label, (int(y0), int(x0), int(y1), int(x1)), visible[y0:y1, x0:x1].copy()))
    return ObjectBank(by_label)


@dataclass(frozen=True)
class Placement:
    """One pasted object: where it went in the target and where it came from."""

    source_id: int
    label: int
    top: int
    left: int
    mask: np.ndarray  # bool, the pasted pixels within the placed box
    flipped: bool
    scale: float


class CopyPaste:
    """Pastes bank objects into (image, mask) pairs; one per CopyPaste entry of a training dataset."""

    def __init__(self, spec: CopyPasteSpec, bank: ObjectBank, index: "CocoIndex", images: "ImageCache | None" = None):
        self.spec = spec
        self.bank = bank
        self.index = index
        self.images = images  # None: decode source images every time
        self.rng = np.random.default_rng()
        # per class, the source image of each object: excluding the target's own objects stays cheap for big banks
        self.sources = {label: np.array([o.source_id for o in objects], np.int64) for label, objects in bank.by_label.items()}

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: np.ndarray, mask: np.ndarray, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask, _ = self.paste(image, mask, image_id)
        return image, mask

    def paste(self, image: np.ndarray, mask: np.ndarray, image_id: int) -> tuple[np.ndarray, np.ndarray, list[Placement]]:
        """(image, mask, placements); the inputs are left unchanged."""
        if self.rng.random() >= self.spec.p:
            return image, mask, []
        allowed = {label: np.flatnonzero(ids != image_id) for label, ids in self.sources.items()}
        labels = sorted(label for label, picks in allowed.items() if picks.size)
        if not labels:
            return image, mask, []
        image, mask = image.copy(), mask.copy()
        placements = []
        for _ in range(int(self.rng.integers(1, self.spec.max_objects + 1))):
            label = labels[int(self.rng.integers(len(labels)))]
            obj = self.bank.by_label[label][int(self.rng.choice(allowed[label]))]
            placements.append(self._place(obj, image, mask))
        return image, mask, placements

    def _source_image(self, image_id: int) -> np.ndarray:
        return self.images.load(image_id) if self.images else read_image(self.index.image_path(image_id))

    def _place(self, obj: BankObject, image: np.ndarray, mask: np.ndarray) -> Placement:
        """Paste `obj` into `image` and `mask` (in place) at a random spot, scaled and maybe flipped."""
        y0, x0, y1, x1 = obj.box
        pixels, visible = self._source_image(obj.source_id)[y0:y1, x0:x1], obj.mask
        height, width = visible.shape
        scale = float(self.rng.uniform(*self.spec.scale))
        scale = min(scale, image.shape[0] / height, image.shape[1] / width)  # the object must fit
        size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 order: width, height
        if size != (width, height):
            pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR)
            visible = cv2.resize(visible.view(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
        flipped = bool(self.rng.random() < 0.5)
        if flipped:
            pixels, visible = pixels[:, ::-1], visible[:, ::-1]
        top = int(self.rng.integers(image.shape[0] - size[1] + 1))
        left = int(self.rng.integers(image.shape[1] - size[0] + 1))
        box = (slice(top, top + size[1]), slice(left, left + size[0]))
        image[box][visible] = pixels[visible]
        mask[box][visible] = obj.label
        return Placement(obj.source_id, obj.label, top, left, visible, flipped, scale)


def build_pasters(
    specs: Sequence[dict[str, Any]],
    index: "CocoIndex",
    cache: "MaskCache",
    train_ids: Sequence[int],
    images: "ImageCache | None" = None,
) -> list[CopyPaste]:
    """A CopyPaste per CopyPaste entry of `augment.train`, its bank cut from `train_ids` only."""
    check_classes(specs, "augment.train", index.classes)
    pasters = []
    for i, raw in enumerate(specs):
        if is_copy_paste(raw):
            spec = parse_spec(raw, f"augment.train[{i}]")
            labels = [index.classes.index(name) for name in spec.classes]
            pasters.append(CopyPaste(spec, object_bank(index, cache, train_ids, labels, spec.min_pixels), index, images))
    return pasters
