"""Named loss terms and their weighted mix, computed in fp32.

Each term is one LOSSES entry (named in registry.LOSS_TERMS) built from smp.losses, or torch
for the cross entropies. The mix runs outside autocast on fp32 logits: Dice's sums over a
512x512 batch overflow fp16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from training.modeling.registry import LOSS_TERMS

if TYPE_CHECKING:
    from training.config import LossConfig

MULTICLASS = smp_losses.MULTICLASS_MODE


def _torch_ignore_index(cfg: "LossConfig") -> int:
    return -100 if cfg.ignore_index is None else cfg.ignore_index


def _ce(cfg: "LossConfig") -> nn.Module:
    return nn.CrossEntropyLoss(ignore_index=_torch_ignore_index(cfg))


def _soft_ce(cfg: "LossConfig") -> nn.Module:
    # torch's label smoothing is smp's SoftCrossEntropyLoss formula ((1-eps)*nll + eps*mean over
    # classes of -log p), but its mean runs over the non-ignored pixels only; smp's divides by all.
    return nn.CrossEntropyLoss(label_smoothing=cfg.smooth_factor, ignore_index=_torch_ignore_index(cfg))


LOSSES: dict[str, Callable[["LossConfig"], nn.Module]] = {
    "ce": _ce,
    "soft_ce": _soft_ce,
    "dice": lambda cfg: smp_losses.DiceLoss(MULTICLASS, ignore_index=cfg.ignore_index),
    "focal": lambda cfg: smp_losses.FocalLoss(MULTICLASS, gamma=cfg.focal_gamma, ignore_index=cfg.ignore_index),
    "lovasz": lambda cfg: smp_losses.LovaszLoss(MULTICLASS, ignore_index=cfg.ignore_index),
    "jaccard": lambda cfg: smp_losses.JaccardLoss(MULTICLASS, ignore_index=cfg.ignore_index),
    "tversky": lambda cfg: smp_losses.TverskyLoss(MULTICLASS, ignore_index=cfg.ignore_index),
}
# The config accepts the registry's names: a term missing here would pass validation and fail mid-run.
if set(LOSSES) != set(LOSS_TERMS):
    raise RuntimeError(f"LOSSES {tuple(LOSSES)} and registry.LOSS_TERMS {LOSS_TERMS} must name the same terms")


class LossMix(nn.Module):
    """sum_i weight_i * term_i(logits, target); also returns each term's value for logging."""

    def __init__(self, cfg: "LossConfig"):
        super().__init__()
        active = {name: w for name, w in cfg.weights.items() if w > 0}
        self.weights = active
        self.terms = nn.ModuleDict({name: LOSSES[name](cfg) for name in active})

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            parts = {name: term(logits, target) for name, term in self.terms.items()}
            total = sum(self.weights[name] * value for name, value in parts.items())
        return total, parts
