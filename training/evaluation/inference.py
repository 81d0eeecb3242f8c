"""THE batched prediction loop: validation, out-of-fold scoring and test prediction all run it.

Everything is compared in probability space at one size: a member's logits for one TTA view
are un-flipped and resized (bilinear) to `out_size`; the views' softmax probabilities are
averaged. Callers pick the size:
- validation and OOF scoring: the masks' size (data.score_size), exactly as the trainer scores
  (argmax of the resized logits), so a single model's OOF numbers reproduce its val mIoU;
- test prediction (evaluation/ensemble.py): the ensemble frame, the largest member input size,
  so no model is upsampled before the vote; only the final label mask is resized,
  nearest-neighbour, to the requested output size (the submission's 256).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from training.evaluation.members import Member, model_inputs
from training.evaluation.tta import TTA, view_logits


@dataclass
class MemberOutput:
    """One member's prediction for a batch: identity-view logits and, with TTA, all views' mean probabilities."""

    logits: torch.Tensor  # fp32, N x C x out_size
    tta_proba: torch.Tensor | None = None  # None: no TTA views beyond the identity

    @property
    def proba(self) -> torch.Tensor:
        """Probabilities of the identity view."""
        return self.logits.softmax(1)

    @property
    def final(self) -> torch.Tensor:
        """What the member votes with: the TTA average when there is one."""
        return self.tta_proba if self.tta_proba is not None else self.proba


@dataclass
class Batch:
    ids: list[Any]
    targets: torch.Tensor | None  # N x H x W (long, on the device) for labelled loaders
    images: torch.Tensor  # the loader's uint8 images of the first input spec (for overlays)
    outputs: list[MemberOutput]
    inputs: list[torch.Tensor] | None = None  # each member's prepared input (keep_inputs=True)


def member_output(member: Member, images: torch.Tensor, out_size: tuple[int, int], tta: TTA) -> MemberOutput:
    views = tta.views()  # the identity view first
    logits = view_logits(member.model, images, out_size, *views[0], member.divisor, member.dtype)
    if len(views) == 1:
        return MemberOutput(logits)
    total = logits.softmax(1)
    for scale, dims in views[1:]:
        total += view_logits(member.model, images, out_size, scale, dims, member.divisor, member.dtype).softmax(1)
    return MemberOutput(logits, total / len(views))


def member_view_probs(member: Member, images: torch.Tensor, out_size: tuple[int, int], tta: TTA) -> tuple[torch.Tensor, dict]:
    """(identity-view logits, {(scale, flipped dims): probabilities} of every view of `tta`)."""
    views = tta.views()
    logits = view_logits(member.model, images, out_size, *views[0], member.divisor, member.dtype)
    probs = {views[0]: logits.softmax(1)}
    for scale, dims in views[1:]:
        probs[(scale, dims)] = view_logits(member.model, images, out_size, scale, dims, member.divisor, member.dtype).softmax(1)
    return logits, probs


def candidate_proba(view_probs: dict, candidate: TTA) -> torch.Tensor:
    """The mean probability over the views of `candidate` (a subset of the views computed)."""
    views = candidate.views()
    total = view_probs[views[0]].clone()
    for view in views[1:]:
        total += view_probs[view]
    return total / len(views)


@torch.no_grad()
def predict_batches(
    members: Sequence[Member],
    loader: Iterable,
    out_size: tuple[int, int] | None = None,
    tta: TTA = TTA(),
    device: torch.device | str = "cpu",
    keep_inputs: bool = False,
) -> Iterator[Batch]:
    """Every member's output per batch, one batch in memory at a time.

    `loader` yields (inputs, masks, ids) or (inputs, ids); inputs is one uint8 tensor or a tuple
    with one per InputSpec (MultiInputTransform). `out_size` None: the masks' size.
    keep_inputs: hand over each member's prepared input instead of predicting (the caller runs its own views).
    """
    for batch in loader:
        inputs, targets, ids = batch if len(batch) == 3 else (batch[0], None, batch[1])
        inputs = (inputs,) if torch.is_tensor(inputs) else tuple(inputs)
        prepared = model_inputs(members, inputs, device)
        if targets is not None:
            targets = targets.to(device, non_blocking=True).long()
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        if keep_inputs:
            yield Batch(ids, targets, inputs[0], [], [prepared[m.input_index] for m in members])
            continue
        size = out_size or tuple(targets.shape[-2:])
        outputs = [member_output(m, prepared[m.input_index], size, tta) for m in members]
        yield Batch(ids, targets, inputs[0], outputs)


def predict_proba(model: nn.Module, images: torch.Tensor, out_size, tta: TTA = TTA(), divisor: int = 32, dtype=None) -> torch.Tensor:
    """TTA-averaged softmax probabilities of one model for an already normalised batch."""
    with torch.no_grad():
        return member_output(Member(0, None, model, None, divisor=divisor, dtype=dtype), images, out_size, tta).final


def resize_labels(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A H x W label mask resized nearest-neighbour (cv2.INTER_NEAREST) to `size` (rows, cols)."""
    import cv2

    if mask.shape == tuple(size):
        return mask
    return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
