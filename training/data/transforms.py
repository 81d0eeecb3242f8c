"""albumentations pipelines declared in YAML: a list of {name: <albumentations class>, **params}.

Every pipeline ends at the configured square size; train pipelines that do not set the
size themselves (RandomResizedCrop, Resize, ...) get a Resize first.

Pipelines yield uint8 C x H x W tensors; `normalize_images` turns a batch into the model's
float input on the training device. Normalising a 512 px sample on a loader core costs about
as much as decoding its JPEG, and a uint8 batch is a quarter of the bytes to copy to the GPU.
"""

from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from training.data.copy_paste import is_copy_paste, parse_spec
from training.errors import ConfigError

# Transforms whose output size is decided by their own `size`/`height`/`width`.
SIZING_TRANSFORMS = {"RandomResizedCrop", "Resize", "RandomSizedCrop", "CenterCrop", "RandomCrop", "LongestMaxSize", "SmallestMaxSize", "PadIfNeeded", "CropNonEmptyMaskIfExists"}


class RandomRotate90(A.RandomRotate90):
    """albumentations' RandomRotate90 with the same output, rotated by cv2.

    np.rot90 (albumentations' way) returns a strided view, and the copy the next transform
    makes of it costs about 1 ms per 512 px RGB image; cv2.rotate writes it in about 0.1 ms.
    """

    _CV2_CODES = {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}

    def apply(self, img: np.ndarray, factor: int, **params: Any) -> np.ndarray:
        return img if factor == 0 else cv2.rotate(img, self._CV2_CODES[factor])


# YAML names served by a faster class of ours with identical output (tests/test_data.py checks).
FASTER_EQUIVALENTS: dict[str, type] = {"RandomRotate90": RandomRotate90}


def _transform_class(name: Any, where: str) -> type:
    cls = FASTER_EQUIVALENTS.get(str(name)) or getattr(A, str(name), None)
    if not isinstance(cls, type) or not issubclass(cls, A.BasicTransform):
        raise ConfigError(f"{where}: unknown albumentations transform {name!r}")
    return cls


def _instantiate(spec: dict[str, Any], where: str, size: int | None) -> A.BasicTransform:
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where}: each transform is a mapping with a 'name', got {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    cls = _transform_class(spec["name"], where)
    if size is not None and spec["name"] == "RandomResizedCrop" and "size" not in params:
        params["size"] = (size, size)
    try:
        return cls(**params)
    except Exception as err:  # albumentations validates with pydantic; its message names the field
        first = str(err).strip().splitlines()
        raise ConfigError(f"{where}: {spec['name']}: invalid parameters {params}: {' '.join(first[:3])}") from None


def check_pipeline(specs: Sequence[dict[str, Any]], where: str, train: bool = False) -> None:
    """Raise ConfigError naming `where[i]` if a transform is unknown or its params are invalid.

    A train pipeline may hold CopyPaste entries (training/data/copy_paste.py); their class names
    are checked against the dataset's once it is known.
    """
    for i, spec in enumerate(specs):
        if is_copy_paste(spec):
            if not train:
                raise ConfigError(f"{where}[{i}]: CopyPaste is a training augmentation; put it in augment.train")
            parse_spec(spec, f"{where}[{i}]")
        else:
            _instantiate(spec, f"{where}[{i}]", size=64)


def build_transform(specs: Sequence[dict[str, Any]], size: int, train: bool) -> A.Compose:
    """The albumentations Compose for one split, ending in a uint8 C x H x W tensor.

    CopyPaste entries are left out: the dataset applies them before this pipeline.
    """
    specs = [spec for spec in specs if not is_copy_paste(spec)]
    steps = [_instantiate(spec, f"augment[{i}]", size) for i, spec in enumerate(specs)]
    names = {spec["name"] for spec in specs}
    if not train or not names & SIZING_TRANSFORMS:
        steps.insert(0, A.Resize(size, size))
    else:
        steps.append(A.Resize(size, size))  # no-op when a sizing transform already produced it
    steps.append(ToTensorV2())
    return A.Compose(steps)


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N x C x H x W batch (0..255) -> float32 (x / 255 - mean) / std, on the batch's device.

    The same arithmetic as albumentations' Normalize(max_pixel_value=255), done once per batch.
    """
    scale = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255.0
    shift = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) * 255.0
    return (images.float() - shift) / scale
