"""Colour overlays of predicted masks, with a legend of the classes present, for people to look at."""

from __future__ import annotations

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
ALPHA = 0.5  # share of the class colour in an overlaid pixel


def overlay(rgb: np.ndarray, mask: np.ndarray, classes: list[str], colours: np.ndarray) -> np.ndarray:
    """The RGB image with every non-background pixel tinted by its class colour, a legend strip below."""
    out = rgb.copy()
    objects = mask > 0  # Background stays untinted: the photo shows through
    out[objects] = (rgb[objects] * (1 - ALPHA) + colours[mask[objects]] * ALPHA).round().astype(np.uint8)
    present = [int(c) for c in np.unique(mask) if c > 0]
    return np.vstack([out, legend(present, classes, colours, rgb.shape[1])])


def legend(class_ids: list[int], classes: list[str], colours: np.ndarray, width: int) -> np.ndarray:
    """A white strip `width` wide: a swatch and the name per class, wrapped onto as many lines as needed."""
    scale = float(np.clip(width / 800, 0.4, 1.5))
    thickness = max(1, round(scale * 1.5))
    line_h = round(24 * scale)
    swatch = round(14 * scale)
    pad = round(8 * scale)
    entries = [(colours[c], classes[c]) for c in class_ids] or [(None, "no objects found")]
    placed, x, line = [], pad, 0
    for colour, name in entries:
        text_w = cv2.getTextSize(name, FONT, scale, thickness)[0][0]
        entry_w = (swatch + pad if colour is not None else 0) + text_w + 2 * pad
        if x > pad and x + entry_w > width:
            x, line = pad, line + 1
        placed.append((x, line, colour, name))
        x += entry_w
    strip = np.full((line_h * (line + 1) + pad, width, 3), 255, np.uint8)
    for x, line, colour, name in placed:
        top = pad + line * line_h
        if colour is not None:
            cv2.rectangle(strip, (x, top), (x + swatch, top + swatch), tuple(int(v) for v in colour), -1)
            cv2.rectangle(strip, (x, top), (x + swatch, top + swatch), (0, 0, 0), 1)
            x += swatch + pad
        cv2.putText(strip, name, (x, top + swatch), FONT, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return strip
