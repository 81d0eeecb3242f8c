"""Images to predict: one file or a folder searched recursively, each read strictly, a bad one reported alone.

Greyscale and RGBA images are refused, not converted: the models saw RGB photos only, so a
grey image would be scored on an input they never saw (and silently worse), and what a
transparent pixel should become (black, white, the scene behind) is the caller's choice.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import simplejpeg
import torch
from torch.utils.data import Dataset

from training.data.coco import decoded_size
from training.errors import DataError, SegtuneError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageSource:
    """Image files under `root`, as sorted relative POSIX paths."""

    root: Path
    relative: list[str]

    @classmethod
    def open(cls, path: str | Path, exclude: str | Path | None = None) -> "ImageSource":
        """The image `path`, or every image below the folder `path` (hidden files and `exclude` skipped)."""
        path = Path(path)
        if path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise SegtuneError(f"{path}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            return cls(path.parent, [path.name])
        if not path.is_dir():
            raise SegtuneError(f"{path}: no such file or directory")
        files = sorted(_walk(path, Path(exclude) if exclude else None))
        if not files:
            raise SegtuneError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in it and its subfolders)")
        return cls(path, files)

    def __len__(self) -> int:
        return len(self.relative)

    def path(self, i: int) -> Path:
        return self.root / self.relative[i]

    def output_names(self, suffix: str = ".png") -> list[str]:
        """Relative output path per image: its own with `suffix`; with the full name kept where two would clash (a.jpg, a.png)."""
        plain = [str(PurePosixPath(r).with_suffix(suffix)) for r in self.relative]
        counts = Counter(plain)
        return [p if counts[p] == 1 else r + suffix for r, p in zip(self.relative, plain)]


def _walk(root: Path, exclude: Path | None) -> list[str]:
    skip = os.path.realpath(exclude) if exclude else None
    seen: set[str] = set()
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or real == skip:  # a symlink loop, or the output folder inside the input folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return found


def read_rgb(path: Path) -> np.ndarray:
    """An RGB uint8 H x W x 3 image decoded as training decodes it (cv2, EXIF orientation applied).

    DataError naming the file if it is truncated or damaged (the strict check training's data
    validation uses), greyscale, has an alpha channel or more than 8 bits per channel.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    buffer = np.frombuffer(data, np.uint8)
    try:
        if data[:2] == b"\xff\xd8":
            decoded_size(data, str(path))  # libjpeg in strict mode: cv2 would fill a truncated JPEG with grey
            problem = not_rgb(1 if simplejpeg.decode_jpeg_header(data)[2] == "Gray" else 3, 8)
        else:
            damage = png_damage(data) if data[:8] == PNG_SIGNATURE else None
            if damage:
                raise DataError(f"{path}: corrupt image ({damage})")
            raw = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
            if raw is None:
                raise DataError(f"{path}: corrupt image (cannot decode)")
            problem = not_rgb(1 if raw.ndim == 2 else raw.shape[2], raw.dtype.itemsize * 8)
        if problem:
            raise DataError(f"{path}: {problem}")
        rgb = cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB)
    except (cv2.error, ValueError) as err:  # e.g. past cv2's pixel limit, or a JPEG header simplejpeg cannot parse
        raise DataError(f"{path}: corrupt image ({' '.join(str(err).split())[:200]})") from None
    if rgb is None:
        raise DataError(f"{path}: corrupt image (cannot decode)")
    return rgb


def png_damage(data: bytes) -> str | None:
    """Why a PNG's chunk structure is broken (truncated, a CRC mismatch), or None.

    Checked before libpng sees the file: libpng refuses such a file too, but also prints its
    own complaint on stderr, a second line for one bad image.
    """
    view = memoryview(data)
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            break
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            return f"CRC mismatch in its {bytes(view[pos + 4 : pos + 8]).decode('latin-1')} chunk"
        if view[pos + 4 : pos + 8] == b"IEND":
            return None
        pos = end
    return "truncated PNG"


def not_rgb(channels: int, bits: int) -> str | None:
    """Why an image of `channels` x `bits` is refused, or None for 8-bit RGB."""
    if channels == 1:
        return "greyscale image (1 channel); the models take RGB: convert it to RGB to predict it"
    if channels == 2:
        return "greyscale image with alpha (2 channels); the models take RGB: convert it to RGB to predict it"
    if channels == 4:
        return "RGBA image (4 channels); the models take RGB: flatten the alpha channel onto a background to predict it"
    if channels != 3:
        return f"{channels} channels; the models take RGB (3 channels)"
    if bits != 8:
        return f"{bits}-bit image; the models take 8 bits per channel: convert it to 8-bit RGB"
    return None


@dataclass
class ImageSample:
    """One image of the source: its model inputs and own size, or why it could not be read."""

    index: int
    inputs: Any = None  # what the transform gives: a tensor or a tuple of tensors (one per input spec)
    size: tuple[int, int] | None = None
    original: np.ndarray | None = None  # the RGB image, for overlays
    error: str | None = None


class ImageFileDataset(Dataset):
    """ImageSample per file of an ImageSource; a file that cannot be read is a sample with an error, not an exception."""

    def __init__(self, source: ImageSource, transform: Callable[..., dict], keep_original: bool = False):
        self.source = source
        self.transform = transform
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> ImageSample:
        try:
            rgb = read_rgb(self.source.path(i))
        except DataError as err:
            return ImageSample(i, error=str(err))
        return ImageSample(i, self.transform(image=rgb)["image"], rgb.shape[:2], rgb if self.keep_original else None)


@dataclass
class ImageBatch:
    """The readable images of a batch, stacked, and the ones that failed."""

    inputs: Any  # a tensor or a tuple of tensors (N x C x H x W uint8); None when no image of the batch was readable
    indices: list[int]
    sizes: list[tuple[int, int]]
    originals: list[np.ndarray | None]
    failures: list[tuple[int, str]]


def collate_samples(samples: Sequence[ImageSample]) -> ImageBatch:
    """DataLoader collate_fn for ImageFileDataset."""
    good = [s for s in samples if s.error is None]
    inputs = None
    if good:
        first = good[0].inputs
        if torch.is_tensor(first):
            inputs = torch.stack([s.inputs for s in good])
        else:
            inputs = tuple(torch.stack(parts) for parts in zip(*(s.inputs for s in good)))
    return ImageBatch(inputs, [s.index for s in good], [s.size for s in good], [s.original for s in good],
                      [(s.index, s.error) for s in samples if s.error is not None])
