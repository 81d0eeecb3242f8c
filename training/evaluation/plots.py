"""Small PNG artifacts: prediction overlays, per-class IoU bars, a confusion matrix."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

OVERLAYS = "overlays.png"
PER_CLASS_IOU = "per_class_iou.png"
CONFUSION = "confusion_matrix.png"


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours, Background black."""
    cmap = plt.get_cmap("tab20", max(n, 2))
    colours = (np.array([cmap(i)[:3] for i in range(n)]) * 255).astype(np.uint8)
    colours[0] = 0
    return colours


def save_overlays(path: Path, samples, classes: list[str]) -> None:
    """One row per (uint8 C x H x W image, mask, prediction) sample: image | truth | prediction."""
    colours = palette(len(classes))
    fig, axes = plt.subplots(len(samples), 3, figsize=(7.5, 2.5 * len(samples)), squeeze=False)
    for row, (image, mask, pred) in zip(axes, samples):
        rgb = image.transpose(1, 2, 0)
        for ax, panel, title in zip(row, (rgb, colours[mask], colours[pred]), ("image", "truth", "prediction")):
            ax.imshow(panel)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_per_class_iou(path: Path, per_class_iou: dict[str, float], title: str = "per-class IoU") -> None:
    names = list(per_class_iou)
    values = [0.0 if np.isnan(v) else v for v in per_class_iou.values()]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names)), 3))
    ax.bar(range(len(names)), values, color=palette(len(names) + 1)[1:] / 255)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_confusion(path: Path, matrix: np.ndarray, classes: list[str]) -> None:
    """Row-normalised confusion matrix (rows = truth)."""
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.45 * len(classes) + 2, 0.45 * len(classes) + 1.5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_epoch_plots(out_dir: Path, samples, per_class_iou, classes) -> None:
    save_overlays(out_dir / OVERLAYS, samples, classes)
    save_per_class_iou(out_dir / PER_CLASS_IOU, per_class_iou)
