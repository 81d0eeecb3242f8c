"""The competition's submission CSV: `image_id,PredictionString`, written as rows arrive.

image_id is the test image's `file_name` from test.json; PredictionString is the predicted
mask at 256 x 256 as 65,536 class indices (0 = Background), row-major, space-separated.
Lines end in LF, not the csv module's default CRLF.

Two different 256 x 256 masks exist, on purpose:
- submission (predict.iter_predictions): every model predicts at its input size
  (data.image_size; a smaller member's logits are resized bilinearly to the largest
  member's size before the softmax), TTA views and models are averaged/voted there, the
  argmax label mask is taken there, and only that mask is resized to 256 x 256,
  nearest-neighbour (cv2.INTER_NEAREST), as the competition asks;
- OOF and trainer val mIoU (data.score_size, 256 by default): logits are resized
  bilinearly to the score size before the softmax/argmax and compared with the ground
  truth resized nearest-neighbour from full resolution. This smoother mask scores the
  models; it is not what the submission encodes.
This module only encodes and checks the CSV.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from training.errors import DataError
from training.infra.fs import atomic_file

SUBMISSION_SIZE = 256
HEADER = ("image_id", "PredictionString")
SUBMISSION = "submission.csv"
# Shared token objects: joining them builds one row without 65,536 fresh int->str objects.
_TOKENS = np.array([str(i) for i in range(256)], dtype=object)


def encode_mask(mask: np.ndarray) -> str:
    """65,536 space-separated class ids of a 256 x 256 mask, row-major."""
    if mask.shape != (SUBMISSION_SIZE, SUBMISSION_SIZE):
        raise ValueError(f"a submission mask is {SUBMISSION_SIZE}x{SUBMISSION_SIZE}, got {mask.shape}")
    mask = np.asarray(mask)
    if mask.size and (mask.min() < 0 or mask.max() >= len(_TOKENS)):
        raise ValueError(f"class ids must be in [0, {len(_TOKENS)}), got [{mask.min()}, {mask.max()}]")
    return " ".join(_TOKENS[mask.ravel()])


class SubmissionWriter:
    """Writes rows one at a time to a temp file, renamed into place only when complete.

    Memory stays flat whatever the number of images: each row is encoded, written and dropped.
    A crash leaves the previous submission.csv (if any) untouched.
    """

    def __init__(self, path: str | Path, num_classes: int | None = None):
        self.path = Path(path)
        self.num_classes = num_classes
        self.rows = 0
        self._file = None
        self._replace = None

    def __enter__(self) -> "SubmissionWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._replace = atomic_file(self.path, "w", newline="")
        self._file = self._replace.__enter__()
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(HEADER)
        return self

    def write(self, image_id: str, mask: np.ndarray) -> None:
        if self.num_classes is not None and mask.size and int(mask.max()) >= self.num_classes:
            raise ValueError(f"{image_id}: class id {int(mask.max())} >= num_classes {self.num_classes}")
        self._writer.writerow((image_id, encode_mask(mask)))
        self.rows += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._replace.__exit__(exc_type, exc, tb)


def write_submission(path: str | Path, rows: Iterable[tuple[str, np.ndarray]], num_classes: int | None = None) -> int:
    """Consume (image_id, 256x256 mask) pairs lazily into `path`; returns the number of rows."""
    with SubmissionWriter(path, num_classes) as writer:
        for image_id, mask in rows:
            writer.write(image_id, mask)
    return writer.rows


def iter_submission(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(image_id, 256x256 int mask) per row; checks the header and every row's length."""
    path = Path(path)
    csv.field_size_limit(1 << 24)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if tuple(header or ()) != HEADER:
            raise DataError(f"{path}: header is {header}, expected {list(HEADER)}")
        for line, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise DataError(f"{path}: line {line}: {len(row)} fields, expected 2")
            values = np.array(row[1].split(" "), dtype=np.int64)
            if values.size != SUBMISSION_SIZE**2:
                raise DataError(f"{path}: line {line} ({row[0]}): {values.size} values, expected {SUBMISSION_SIZE**2}")
            yield row[0], values.reshape(SUBMISSION_SIZE, SUBMISSION_SIZE)


def check_submission(path: str | Path, image_ids: Iterable[str], num_classes: int) -> int:
    """Raise DataError unless `path` has exactly one valid row per expected image id."""
    expected = list(image_ids)
    seen: list[str] = []
    for image_id, mask in iter_submission(path):
        if mask.min() < 0 or mask.max() >= num_classes:
            raise DataError(f"{path}: {image_id}: class ids outside [0, {num_classes})")
        seen.append(image_id)
    if sorted(seen) != sorted(expected):
        missing = sorted(set(expected) - set(seen))[:3]
        extra = sorted(set(seen) - set(expected))[:3]
        raise DataError(f"{path}: {len(seen)} rows for {len(expected)} test images (missing {missing}, unexpected {extra})")
    return len(seen)


def save_mask_png(path: str | Path, mask: np.ndarray) -> None:
    """A class-id mask as an 8-bit PNG (values are class ids, not colours)."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.asarray(mask, dtype=np.uint8)):
        raise OSError(f"{path}: cannot write PNG")
