"""mIoU from one confusion matrix accumulated over a whole split (never a mean of batch IoUs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


class ConfusionMatrix:
    """Accumulates a num_classes x num_classes matrix (rows = truth, cols = prediction)."""

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.reshape(-1), target.reshape(-1)
        keep = (target >= 0) & (target < self.num_classes)
        if self.ignore_index is not None:
            keep &= target != self.ignore_index
        idx = target[keep].long() * self.num_classes + pred[keep].long()
        counts = torch.bincount(idx, minlength=self.num_classes**2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes).cpu()

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    def scores(self, class_names: list[str] | None = None) -> "SegScores":
        return SegScores.from_matrix(self.matrix.numpy(), class_names)


@dataclass
class SegScores:
    miou: float
    pixel_acc: float
    per_class_iou: dict[str, float]  # NaN for classes absent from both truth and prediction

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, class_names: list[str] | None = None) -> "SegScores":
        matrix = matrix.astype(np.float64)
        tp = np.diag(matrix)
        union = matrix.sum(0) + matrix.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
        names = class_names or [str(i) for i in range(len(tp))]
        total = matrix.sum()
        return cls(
            miou=float(np.nanmean(iou)) if np.any(union > 0) else 0.0,
            pixel_acc=float(tp.sum() / total) if total else 0.0,
            per_class_iou={n: float(v) for n, v in zip(names, iou)},
        )


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of N x C x H x W logits/probabilities to the scoring size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def metric_key(name: object) -> str:
    """A class, config or mode name as an MLflow metric key part: anything but letters and digits becomes '_'."""
    return "".join(ch if ch.isalnum() else "_" for ch in str(name))
