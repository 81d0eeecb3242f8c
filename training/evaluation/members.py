"""The models of an ensemble and their inputs: one loader pass serves members of different sizes and normalisations."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from training.config import Config


@dataclass(frozen=True)
class InputSpec:
    """How a config preprocesses an image; models sharing one share the input tensor."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eval_augment: str

    @classmethod
    def of(cls, cfg: "Config") -> "InputSpec":
        aug = cfg.augment
        return cls(cfg.data.image_size, tuple(aug.mean), tuple(aug.std), json.dumps(aug.eval, sort_keys=True))

    def transform(self):
        """The eval pipeline: uint8 C x H x W tensors (see `model_inputs`)."""
        from training.data.transforms import build_transform

        return build_transform(json.loads(self.eval_augment), self.image_size, train=False)


class MultiInputTransform:
    """An albumentations-style callable giving one image tensor per InputSpec (as a tuple).

    Lets one DataLoader pass serve models trained at different image sizes or normalisations.
    """

    def __init__(self, specs: Sequence[InputSpec]):
        self.specs = list(specs)
        self.transforms = [s.transform() for s in self.specs]

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None, **_: Any) -> dict[str, Any]:
        return {"image": tuple(t(image=image)["image"] for t in self.transforms), "mask": mask}

    def set_random_seed(self, seed: int) -> None:  # eval transforms are deterministic
        pass


@dataclass
class Member:
    """One trained model of an ensemble: a config rank and a fold."""

    rank: int
    fold: int | None
    model: nn.Module
    cfg: "Config"
    input_index: int = 0
    divisor: int = 32
    dtype: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    classes: list[str] | None = None


def load_member(checkpoint: str | Path, rank: int, device: torch.device) -> Member:
    """A model from a trainer best.pt/last.pt (weights only; no pretrained download needed)."""
    from training.engine.checkpoint import load_model_and_classes
    from training.engine.trainer import amp_dtype
    from training.modeling.models import arch_spec

    model, cfg, fold, classes = load_model_and_classes(checkpoint, device)
    return Member(rank, fold, model, cfg, 0, arch_spec(cfg.model.arch).divisor, amp_dtype(cfg.trainer.amp, device), classes=classes)


def load_members(checkpoints: Sequence[str | Path]) -> tuple[list[Member], torch.device]:
    """Members for `checkpoints` (rank = position) on the device their configs ask for."""
    from training.engine.trainer import resolve_device

    first = load_member(checkpoints[0], 0, torch.device("cpu"))
    device = resolve_device(first.cfg.trainer.device)
    return [load_member(path, i, device) for i, path in enumerate(checkpoints)], device


def assign_inputs(members: Sequence[Member]) -> list[InputSpec]:
    """The distinct InputSpecs of `members`, setting each member's input_index."""
    specs: list[InputSpec] = []
    for m in members:
        spec = InputSpec.of(m.cfg)
        if spec not in specs:
            specs.append(spec)
        m.input_index = specs.index(spec)
    return specs


def model_inputs(members: Sequence[Member], inputs: Sequence[torch.Tensor], device) -> list[torch.Tensor]:
    """The loader's uint8 tensors (one per InputSpec) -> normalised float inputs on `device`, each once."""
    from training.data.transforms import normalize_images

    prepared: dict[int, torch.Tensor] = {}
    for m in members:
        if m.input_index not in prepared:  # members sharing an input share its mean/std (InputSpec)
            aug = m.cfg.augment
            x = normalize_images(inputs[m.input_index].to(device, non_blocking=True), aug.mean, aug.std)
            prepared[m.input_index] = x.contiguous(memory_format=m.memory_format)
    return [prepared.get(i, x) for i, x in enumerate(inputs)]


def ensemble_frame(members: Sequence[Member]) -> tuple[int, int]:
    """Where an ensemble votes: the largest member input size (data.image_size), square."""
    side = max(m.cfg.data.image_size for m in members)
    return side, side
