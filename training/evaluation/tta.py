"""Test-time augmentation: which views of an image to predict, and each view's logits mapped back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.evaluation.metrics import resize_logits

DEFAULT_SCALES = (0.75, 1.0, 1.25)
TTA_TOKENS = ("none", "flip", "hflip", "vflip", "scale")


@dataclass(frozen=True)
class TTA:
    """Which views to average: flips (undone on the output) and input scales (resized back)."""

    hflip: bool = False
    vflip: bool = False
    scales: tuple[float, ...] = (1.0,)

    @classmethod
    def parse(cls, spec: str | None, scales: Sequence[float] = DEFAULT_SCALES) -> "TTA":
        """Comma-separated `flip` (= `hflip`), `vflip`, `scale` (the `scales`), or `none`.

        `flip` is horizontal only: a vertical flip is a natural view for top-down photos but not
        for street scenes, so it is asked for explicitly.
        """
        tokens = [t.strip() for t in (spec or "none").split(",") if t.strip()]
        unknown = [t for t in tokens if t not in TTA_TOKENS]
        if unknown:
            raise ValueError(f"unknown TTA {unknown}; choose from {list(TTA_TOKENS)} (comma-separated)")
        if "none" in tokens and len(tokens) > 1:
            raise ValueError("TTA 'none' cannot be combined with other views")
        scales = tuple(float(s) for s in scales)
        if any(s <= 0 for s in scales):
            raise ValueError(f"TTA scales must be > 0, got {list(scales)}")
        return cls(
            hflip="flip" in tokens or "hflip" in tokens,
            vflip="vflip" in tokens,
            scales=tuple(sorted(set(scales) | {1.0})) if "scale" in tokens else (1.0,),
        )

    @property
    def enabled(self) -> bool:
        return self.hflip or self.vflip or self.scales != (1.0,)

    @property
    def name(self) -> str:
        parts = [p for p, on in (("hflip", self.hflip), ("vflip", self.vflip)) if on]
        if self.scales != (1.0,):
            parts.append("scale(" + ",".join(f"{s:g}" for s in self.scales) + ")")
        return "+".join(parts) or "none"

    def views(self) -> list[tuple[float, tuple[int, ...]]]:
        """(scale, flipped dims) per view, the identity view first."""
        flips: list[tuple[int, ...]] = [()]
        if self.hflip:
            flips.append((3,))
        if self.vflip:
            flips.append((2,))
        ordered = sorted(self.scales, key=lambda s: s != 1.0)
        return [(s, dims) for s in ordered for dims in flips]


def scaled_side(side: int, scale: float, divisor: int) -> int:
    """side * scale rounded to a multiple of the architecture's divisor (at least one divisor)."""
    return max(divisor, int(round(side * scale / divisor)) * divisor)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def view_logits(
    model: nn.Module,
    images: torch.Tensor,
    out_size: tuple[int, int],
    scale: float = 1.0,
    dims: tuple[int, ...] = (),
    divisor: int = 32,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """fp32 logits (N x C x out_size) of one view, mapped back to the input frame (bilinear)."""
    x = images
    if scale != 1.0:
        size = (scaled_side(images.shape[-2], scale, divisor), scaled_side(images.shape[-1], scale, divisor))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if dims:
        x = x.flip(dims)
    with autocast(images.device, dtype):
        logits = model(x)
    logits = logits.float()
    if dims:
        logits = logits.flip(dims)
    return resize_logits(logits, out_size)
