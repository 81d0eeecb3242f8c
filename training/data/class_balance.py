"""Class weights for the pixel losses from the pixel counts of the training masks.

Median-frequency balancing (Eigen & Fergus, 2015): a class's frequency is its pixel count over
the pixels of the images that contain it; its weight is the median frequency over the classes
present divided by its own. Pixels of loss.ignore_index are not counted. A class absent from
the training side gets weight 1 (it has no pixel there to weight).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from training.data.coco import MaskCache


def pixel_counts(cache: "MaskCache", image_ids: Sequence[int], n_classes: int, ignore_index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pixels of each class, pixels of the images containing each class) over `image_ids`' cached masks."""
    counts = np.zeros(n_classes, np.int64)
    present_in = np.zeros(n_classes, np.int64)
    for image_id in image_ids:
        per_class = np.bincount(cache.load(image_id).ravel(), minlength=256)
        if ignore_index is not None and 0 <= ignore_index < per_class.size:
            per_class[ignore_index] = 0
        per_class = per_class[:n_classes]
        counts += per_class
        present_in += np.where(per_class > 0, per_class.sum(), 0)
    return counts, present_in


def median_frequency_weights(counts: np.ndarray, present_in: np.ndarray) -> list[float]:
    """w_c = median_k(freq_k) / freq_c over the classes present; 1.0 for an absent class."""
    present = counts > 0
    if not present.any():
        return [1.0] * len(counts)
    freq = np.where(present, counts / np.maximum(present_in, 1), np.nan)
    median = np.nanmedian(freq)
    return [float(median / f) if ok else 1.0 for f, ok in zip(freq, present)]


def auto_class_weights(cache: "MaskCache", image_ids: Sequence[int], n_classes: int, ignore_index: int | None = None) -> list[float]:
    """loss.class_weights: auto for the training images `image_ids` (never pass validation ids)."""
    return median_frequency_weights(*pixel_counts(cache, image_ids, n_classes, ignore_index))
