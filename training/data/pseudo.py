"""Pseudo-labelled images on the training side of a fold (a config's `data.pseudo_labels`).

The validation side is never touched: `make_datasets` builds it from the fold manifest of the
annotated images only, so OOF mIoU keeps measuring on real labels and stays comparable across
pseudo-label rounds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from training.data.coco import read_image
from training.errors import DataError

if TYPE_CHECKING:
    import albumentations as A

    from training.config import Config
    from training.data.dataset import SegmentationDataset
    from training.handoff import PseudoLabelSet


def load_pseudo_labels(cfg: "Config", classes: list[str]) -> tuple["PseudoLabelSet", Path]:
    """The config's pseudo-label set, checked against the data's classes and the loss's ignore label."""
    from training.handoff import PseudoLabelSet

    path = Path(cfg.data.pseudo_labels)
    labels = PseudoLabelSet.read(path)
    if labels.classes != list(classes):
        raise DataError(f"{path}: classes {labels.classes} differ from the data's {classes}")
    if labels.ignore_index != cfg.loss.ignore_index:
        raise DataError(f"{path}: unconfident pixels hold {labels.ignore_index}, but loss.ignore_index is {cfg.loss.ignore_index}")
    return labels, path


class PseudoLabelDataset(Dataset):
    """(uint8 image C x H x W, uint8 mask H x W, negative id) per pseudo-labelled image, through the training transform.

    Ids are negative so they can never be taken for an annotated image's id.
    """

    def __init__(self, labels: "PseudoLabelSet", base: Path, transform: "A.Compose"):
        self.images = labels.images
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        entry = self.images[i]
        image = read_image(Path(entry.image))
        mask_path = self.base / entry.mask
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
            raise DataError(f"{mask_path}: not a uint8 mask of {entry.image}'s size {image.shape[:2]}")
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"], -(i + 1)


class TrainingSet(ConcatDataset):
    """The annotated training images of a fold followed by the pseudo-labelled ones, sharing one transform."""

    def __init__(self, annotated: "SegmentationDataset", pseudo: PseudoLabelDataset):
        super().__init__([annotated, pseudo])
        self.annotated, self.pseudo = annotated, pseudo
        self.transform = annotated.transform  # one pipeline: seeding the annotated side seeds the pseudo side too

    def set_random_seed(self, seed: int) -> None:
        self.annotated.set_random_seed(seed)


def with_pseudo_labels(train_ds: "SegmentationDataset", cfg: "Config", classes: list[str]) -> TrainingSet:
    """`train_ds` plus the config's pseudo-labelled images; an image that is also annotated is refused."""
    labels, path = load_pseudo_labels(cfg, classes)
    annotated = {train_ds.index.image_path(i).resolve() for i in train_ds.index.image_ids}
    both = [e.image for e in labels.images if Path(e.image).resolve() in annotated]
    if both:
        raise DataError(f"{path}: {both[0]} is annotated in {train_ds.index.ann_path} and pseudo-labelled ({len(both)} such images)")
    return TrainingSet(train_ds, PseudoLabelDataset(labels, path.parent, train_ds.transform))
