"""albumentations pipelines declared in YAML: a list of {name: <albumentations class>, **params}.

Every pipeline ends at the configured square size; train pipelines that do not set the
size themselves (RandomResizedCrop, Resize, ...) get a Resize first.
"""

from __future__ import annotations

from typing import Any, Sequence

import albumentations as A
from albumentations.pytorch import ToTensorV2

from training.errors import ConfigError

# Transforms whose output size is decided by their own `size`/`height`/`width`.
SIZING_TRANSFORMS = {"RandomResizedCrop", "Resize", "RandomSizedCrop", "CenterCrop", "RandomCrop", "LongestMaxSize", "SmallestMaxSize", "PadIfNeeded", "CropNonEmptyMaskIfExists"}


def _transform_class(name: Any, where: str) -> type:
    cls = getattr(A, str(name), None)
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


def check_pipeline(specs: Sequence[dict[str, Any]], where: str) -> None:
    """Raise ConfigError naming `where[i]` if a transform is unknown or its params are invalid."""
    for i, spec in enumerate(specs):
        _instantiate(spec, f"{where}[{i}]", size=64)


def build_transform(
    specs: Sequence[dict[str, Any]],
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
) -> A.Compose:
    """The albumentations Compose for one split, ending in a normalised CHW float tensor."""
    steps = [_instantiate(spec, f"augment[{i}]", size) for i, spec in enumerate(specs)]
    names = {spec["name"] for spec in specs}
    if not train or not names & SIZING_TRANSFORMS:
        steps.insert(0, A.Resize(size, size))
    else:
        steps.append(A.Resize(size, size))  # no-op when a sizing transform already produced it
    steps += [A.Normalize(mean=mean, std=std), ToTensorV2()]
    return A.Compose(steps)
