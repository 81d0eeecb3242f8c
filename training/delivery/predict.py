"""Label masks for a folder of images with the delivered ensemble, one PNG per image at its own size.

The ensemble votes and post-processes in its frame (evaluation/ensemble.py); each mask is then
resized nearest-neighbour to its image's size. The k-fold's submission resizes that same
own-size mask to 256 x 256, so a mask written here, resized (nearest) to 256 x 256, is the
submission's row for that image.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from training.delivery.images import ImageFileDataset, ImageSource, collate_samples
from training.errors import SegtuneError
from training.evaluation.ensemble import Ensemble, load_kfold_ensemble
from training.evaluation.inference import resize_labels
from training.infra.fs import atomic_file
from training.infra.progress import progress

MASKS = "masks"
OVERLAYS = "overlays"
MLFLOW_URIS = ("models:/", "runs:/")  # a logged model in MLflow, not a path


def default_workers() -> int:
    """Loader processes: all cores but one for the models, at most 4 (decoding is cheap next to the ensemble)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def check_model(model: str) -> None:
    """One line for a model that is neither an MLflow model URI nor an existing path, before anything is loaded."""
    if not model.startswith(MLFLOW_URIS) and not Path(model).exists():
        raise SegtuneError(f"{model}: no such k-fold directory or kfold_result.yaml (or give models:/<name>/<version>)")


def load_ensemble(model: str, device: str | None = None, tracking_uri: str | None = None) -> Ensemble:
    """The ensemble of a k-fold directory, its kfold_result.yaml, or a logged MLflow model (models:/<name>/<version>, runs:/...)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SegtuneError("--device cuda: no CUDA device is visible")
    if model.startswith(MLFLOW_URIS):
        from training.delivery.mlflow_model import load_registered_ensemble

        return load_registered_ensemble(model, tracking_uri=tracking_uri, device=device)
    check_model(model)
    return load_kfold_ensemble(model, device)[0]


@dataclass
class PredictionReport:
    written: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relative path, error line)
    masks: Path | None = None
    overlays: Path | None = None


def error_line(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def predict_images(
    ensemble: Ensemble,
    source: ImageSource,
    out: str | Path,
    batch_size: int = 4,
    workers: int = 0,
    overlay: bool = False,
    report_error: Callable[[str], None] = error_line,
    log: Callable[[str], None] | None = None,
) -> PredictionReport:
    """<out>/masks/<relative path>.png per image (class ids, the image's own size), with `overlay` also <out>/overlays/.

    An image that cannot be read is reported (one line naming it) and skipped; the others are still written.
    """
    out = Path(out)
    report = PredictionReport(masks=out / MASKS, overlays=out / OVERLAYS if overlay else None)
    names = source.output_names()
    dataset = ImageFileDataset(source, ensemble.transform(), keep_original=overlay)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_samples)
    colours = None
    if overlay:
        from training.evaluation.plots import palette

        colours = palette(len(ensemble.classes))

    def results() -> Iterator[tuple[int, np.ndarray | None, tuple[int, int] | None, np.ndarray | None]]:
        """(index, frame mask, own size, original) per image in loader order; the mask None for an image that failed."""
        for batch in loader:
            for index, message in batch.failures:
                report.failed.append((source.relative[index], message))
                report_error(message)
                yield index, None, None, None
            if batch.indices:
                predicted = ensemble.predict([(batch.inputs, batch.indices)])
                for (index, frame_mask), size, original in zip(predicted, batch.sizes, batch.originals):
                    yield index, frame_mask, size, original

    for index, frame_mask, size, original in progress(results(), "predicting", total=len(source), log=log):
        if frame_mask is None:
            continue
        mask = resize_labels(frame_mask, size)
        write_png(report.masks / names[index], mask)
        if overlay:
            from training.delivery.overlay import overlay as overlay_image

            write_png(report.overlays / names[index], overlay_image(original, mask, ensemble.classes, colours), rgb=True)
        report.written += 1
    return report


def write_png(path: Path, image: np.ndarray, rgb: bool = False) -> None:
    """A PNG written atomically (a reader never sees half a file); `rgb` images are stored as colour, else as 8-bit values."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if rgb else np.asarray(image, np.uint8))
    if not ok:
        raise OSError(f"{path}: cannot encode PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as f:
        f.write(encoded.tobytes())
