"""Post-processing of label masks: per class, connected components smaller than a share of the image are removed.

A removed pixel takes the class the ensemble ranks next at that pixel (its probabilities with
the removed class excluded), not a fixed background: a speck of "Battery" on a plastic bottle
becomes "Plastic". The sizes are areas as a fraction of the image, so a size chosen on OOF
masks at the score size applies unchanged to the ensemble frame and to any image size.
Written by hand: neither albumentations nor smp post-process label masks; cv2 labels the
components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import cv2
import numpy as np

# Sizes tried per class on OOF (fraction of the image area; 0.001 of 256 x 256 is 66 pixels).
MIN_AREA_GRID = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)


def components(labels: np.ndarray, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(component id per pixel, area per component id) of `class_id` in one H x W mask; id 0 = not the class."""
    n, comp, stats, _ = cv2.connectedComponentsWithStats((labels == class_id).astype(np.uint8), connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    areas[0] = np.iinfo(np.int64).max  # the background component is never "small"
    return comp, areas


def small_pixels(labels: np.ndarray, class_id: int, min_area: float) -> np.ndarray:
    """Boolean H x W: pixels of `class_id` components smaller than min_area x the image area."""
    comp, areas = components(labels, class_id)
    return (areas < min_area * labels.size)[comp]


def next_best(proba: np.ndarray | None, class_id: int, where: np.ndarray) -> np.ndarray:
    """The most probable class other than `class_id` at the pixels `where` (C x H x W proba); 0 without proba."""
    if proba is None:
        return np.zeros(int(where.sum()), np.uint8)
    p = proba[:, where].astype(np.float32, copy=True)
    p[class_id] = -1.0
    return p.argmax(0).astype(np.uint8)


@dataclass(frozen=True)
class PostProcess:
    """Per class id, the smallest component kept (fraction of the image area); classes not named are untouched."""

    min_area: Mapping[int, float] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return any(v > 0 for v in self.min_area.values())

    def apply(self, labels: np.ndarray, proba: np.ndarray | None = None) -> np.ndarray:
        """One H x W uint8 mask post-processed (a new array); `proba` (C x H x W, any scale) picks the replacements."""
        out = np.array(labels, dtype=np.uint8, copy=True)
        for class_id, area in sorted(self.min_area.items()):
            if area <= 0:
                continue
            small = small_pixels(out, class_id, area)
            if small.any():
                out[small] = next_best(proba, class_id, small)
        return out

    def to_names(self, classes: list[str]) -> dict[str, float]:
        return {classes[c]: float(a) for c, a in sorted(self.min_area.items()) if a > 0}

    @classmethod
    def from_names(cls, min_area: Mapping[str, float], classes: list[str]) -> "PostProcess":
        unknown = [name for name in min_area if name not in classes]
        if unknown:
            raise ValueError(f"postprocess.min_area: unknown classes {unknown}; the model's classes are {classes}")
        return cls({classes.index(name): float(a) for name, a in min_area.items()})
