"""The ensemble as ONNX: one model file per member plus ensemble.json, everything a runtime needs to reproduce it.

Each member is exported by torch's dynamo exporter (torch.export; needs onnxscript) in fp32,
with dynamic batch, height and width: input `image`, the normalised float N x 3 x H x W
image; output `logits`, N x C x H x W (H and W multiples of the member's `divisor`). The
manifest lists per member its file, weight, input size, mean/std and eval pipeline, and for
the ensemble the classes, the frame it votes in, TTA views, vote and post-processing, with
the steps spelled out in `recipe` (the same steps evaluation/ensemble.py runs).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from training.errors import SegtuneError
from training.evaluation.ensemble import Ensemble
from training.evaluation.members import Member
from training.infra.fs import write_json

ONNX_DIR = "onnx"
MANIFEST = "ensemble.json"
INPUT, OUTPUT = "image", "logits"
MAX_EXPORT_DIFF = 1e-4  # largest probability difference to torch accepted when checking an exported member

RECIPE = [
    "Read the image as RGB uint8 (H x W x 3); refuse greyscale and RGBA.",
    "Per distinct member input (input_size, mean, std, eval_augment): resize the image bilinearly (cv2.INTER_LINEAR) "
    "to input_size, apply eval_augment (albumentations specs, usually none), then x = (pixel / 255 - mean) / std, float32 N x 3 x H x W.",
    "Per member and TTA view (scales x [none, hflip if tta.hflip, vflip if tta.vflip], identity first): resize x bilinearly "
    "(align_corners=False) to each side * scale rounded to a multiple of divisor (at least divisor), flip it (hflip: width axis, "
    "vflip: height axis), run the member, flip the logits back, resize them bilinearly (align_corners=False) to frame, softmax over classes.",
    "A member's probabilities are the mean over its views.",
    "vote soft: the weighted mean of the members' probabilities (weights), argmax (lowest class id on ties). vote hard: each member "
    "votes its argmax with its weight; most votes wins; a tie goes to the highest weighted mean probability, then the lowest class id.",
    "postprocess (class name -> fraction of the frame area), classes in class-id order: 8-connected components of that class smaller "
    "than fraction x frame area take, pixel by pixel, the most probable other class under the weighted mean probabilities.",
    "Resize the frame's label mask nearest-neighbour (cv2.INTER_NEAREST) to the image's own size.",
]


def export_onnx(ensemble: Ensemble, out_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Write member<i>.onnx per member and ensemble.json into `out_dir`; returns the manifest's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (member, weight) in enumerate(zip(ensemble.members, ensemble.weights)):
        name = f"member{i}.onnx"
        log(f"exporting member {i + 1}/{len(ensemble.members)} ({member.cfg.model.arch}/{member.cfg.model.encoder}, fold {member.fold}) to {out_dir / name}")
        diff = export_member(member, out_dir / name)
        cfg = member.cfg
        entries.append({
            "file": name,
            "weight": weight,
            "fold": member.fold,
            "arch": cfg.model.arch,
            "encoder": cfg.model.encoder,
            "input_size": [cfg.data.image_size, cfg.data.image_size],
            "divisor": member.divisor,
            "mean": list(cfg.augment.mean),
            "std": list(cfg.augment.std),
            "eval_augment": list(cfg.augment.eval),
            "max_abs_probability_diff_vs_torch": diff,
        })
    manifest = {
        "format": "segtune.onnx_ensemble",
        "version": 1,
        "classes": list(ensemble.classes),
        "frame": list(ensemble.frame),
        "input": {"name": INPUT, "layout": "NCHW", "dtype": "float32", "channels": "RGB, normalised with the member's mean/std"},
        "output": {"name": OUTPUT, "layout": "NCHW", "dtype": "float32", "values": "logits, one channel per class"},
        "members": entries,
        "tta": {"hflip": ensemble.tta.hflip, "vflip": ensemble.tta.vflip, "scales": list(ensemble.tta.scales)},
        "vote": ensemble.vote,
        "postprocess": ensemble.postprocess.to_names(ensemble.classes),
        "recipe": RECIPE,
        "exported_with": {"torch": torch.__version__},
    }
    return write_json(out_dir / MANIFEST, manifest)


def export_member(member: Member, path: Path) -> float:
    """`member`'s model as fp32 ONNX at `path` (written atomically); returns its max probability difference to torch."""
    model = copy.deepcopy(member.model).float().cpu().eval()
    side = member.cfg.data.image_size
    example = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    # The exporter prints its progress on stdout whatever `verbose` says; our log line stands for it.
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT], verbose=False,
            dynamic_shapes=({0: "batch", 2: "height", 3: "width"},),
        )
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        program.save(tmp, external_data=False)
        diff = max_probability_diff(tmp, model, example)
        if diff > MAX_EXPORT_DIFF:
            raise SegtuneError(f"{path}: the exported model's probabilities differ from torch's by {diff:.2e} (> {MAX_EXPORT_DIFF:g})")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def onnx_session(path: str | Path):
    """An onnxruntime CPU session for a member file."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def max_probability_diff(path: Path, model: torch.nn.Module, images: torch.Tensor) -> float:
    """Largest |softmax(onnxruntime logits) - softmax(torch logits)| on `images`."""
    with torch.no_grad():
        expected = model(images).softmax(1).numpy()
    got = torch.from_numpy(onnx_session(path).run([OUTPUT], {INPUT: images.numpy()})[0]).softmax(1).numpy()
    return float(np.abs(got - expected).max())


def read_manifest(onnx_dir: str | Path) -> dict:
    """The ensemble.json of an export folder."""
    path = Path(onnx_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SegtuneError(f"{path}: not found; write it with training/predict.py --export onnx") from None
