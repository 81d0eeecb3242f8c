"""Named loss terms and their weighted mix, computed in fp32.

Each term is one LOSSES entry (named in registry.LOSS_TERMS) built from smp.losses, or torch
for the cross entropies. The mix runs outside autocast on fp32 logits: Dice's sums over a
512x512 batch overflow fp16.

Class weights (loss.class_weights) weight the pixel losses: ce and soft_ce (torch's `weight`,
a weighted mean over the pixels) and focal (smp's `class_weights`, a weighted mean of its
per-class terms). The region losses (dice, jaccard, tversky, lovasz) are left unweighted: each
already averages one score per class, so a class counts the same whatever its pixel count, and
inverse-frequency weights would count rarity twice (smp's Lovasz takes no weights either).
OHEM (loss.ohem) applies to ce and soft_ce.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from segmentation_models_pytorch import losses as smp_losses
from torch import nn
from torch.nn import functional as F

from training.errors import SegtuneError
from training.modeling.registry import LOSS_TERMS

if TYPE_CHECKING:
    from training.config import LossConfig, OHEMConfig

MULTICLASS = smp_losses.MULTICLASS_MODE


def _torch_ignore_index(cfg: "LossConfig") -> int:
    return -100 if cfg.ignore_index is None else cfg.ignore_index


class CrossEntropy(nn.Module):
    """torch's cross entropy (optionally class-weighted and label-smoothed), over all pixels or, with
    OHEM, over the hardest share of the batch's non-ignored pixels.

    torch's label smoothing is smp's SoftCrossEntropyLoss formula ((1-eps)*nll + eps*mean over
    classes of -log p), but its mean runs over the non-ignored pixels only; smp's divides by all.
    OHEM is written here because neither torch nor smp has it; with keep=1 it equals the plain term.
    """

    def __init__(self, ignore_index: int, weight: torch.Tensor | None, label_smoothing: float = 0.0, ohem: "OHEMConfig | None" = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.ohem = ohem
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(logits.device)
        kwargs = dict(weight=weight, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)
        if self.ohem is None:
            return F.cross_entropy(logits, target, **kwargs)
        pixel_loss = F.cross_entropy(logits, target, reduction="none", **kwargs).flatten()
        flat_target = target.flatten()
        valid = (flat_target != self.ignore_index).nonzero().squeeze(1)  # ignored pixels are never candidates
        with torch.no_grad():  # hardness: the plain cross entropy, whatever the class weights and smoothing
            plain = pixel_loss.detach() if weight is None and not self.label_smoothing else \
                F.cross_entropy(logits.detach(), target, ignore_index=self.ignore_index, reduction="none").flatten()
            kept = min(valid.numel(), max(self.ohem.min_kept, math.ceil(self.ohem.keep * valid.numel())))
            chosen = valid[plain[valid].topk(kept, sorted=False).indices]
        # the mean torch takes: weighted by the chosen pixels' class weights
        total = weight[flat_target[chosen]].sum() if weight is not None else torch.tensor(float(kept), device=logits.device)
        return pixel_loss[chosen].sum() / total


def _ce(cfg: "LossConfig", weight: torch.Tensor | None) -> nn.Module:
    return CrossEntropy(_torch_ignore_index(cfg), weight, ohem=cfg.ohem)


def _soft_ce(cfg: "LossConfig", weight: torch.Tensor | None) -> nn.Module:
    return CrossEntropy(_torch_ignore_index(cfg), weight, label_smoothing=cfg.smooth_factor, ohem=cfg.ohem)


def _focal(cfg: "LossConfig", weight: torch.Tensor | None) -> nn.Module:
    class_weights = None if weight is None else weight.tolist()
    return smp_losses.FocalLoss(MULTICLASS, gamma=cfg.focal_gamma, ignore_index=cfg.ignore_index, class_weights=class_weights)


LOSSES: dict[str, Callable[["LossConfig", "torch.Tensor | None"], nn.Module]] = {
    "ce": _ce,
    "soft_ce": _soft_ce,
    "dice": lambda cfg, weight: smp_losses.DiceLoss(MULTICLASS, ignore_index=cfg.ignore_index),
    "focal": _focal,
    "lovasz": lambda cfg, weight: smp_losses.LovaszLoss(MULTICLASS, ignore_index=cfg.ignore_index),
    "jaccard": lambda cfg, weight: smp_losses.JaccardLoss(MULTICLASS, ignore_index=cfg.ignore_index),
    "tversky": lambda cfg, weight: smp_losses.TverskyLoss(MULTICLASS, ignore_index=cfg.ignore_index),
}
# The config accepts the registry's names: a term missing here would pass validation and fail mid-run.
if set(LOSSES) != set(LOSS_TERMS):
    raise RuntimeError(f"LOSSES {tuple(LOSSES)} and registry.LOSS_TERMS {LOSS_TERMS} must name the same terms")


class LossMix(nn.Module):
    """sum_i weight_i * term_i(logits, target); also returns each term's value for logging.

    `class_weights`: the per-class weights (Background first) when loss.class_weights is auto
    (the trainer computes them); a list in the config is used as it is.
    """

    def __init__(self, cfg: "LossConfig", class_weights: Sequence[float] | None = None):
        super().__init__()
        if class_weights is None and cfg.class_weights == "auto":
            raise SegtuneError("loss.class_weights: auto needs the weights computed from the training masks (Trainer does this)")
        if class_weights is None and isinstance(cfg.class_weights, list):
            class_weights = cfg.class_weights
        weight = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        active = {name: w for name, w in cfg.weights.items() if w > 0}
        self.weights = active
        self.terms = nn.ModuleDict({name: LOSSES[name](cfg, weight) for name in active})
        self.ignore_index = cfg.ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.ignore_index is not None and bool((target == self.ignore_index).all()):
            # Nothing to learn from (e.g. a crop of unconfident pseudo-label pixels only): the cross entropies
            # would divide by zero pixels. A zero loss that still reaches every logit keeps the step a no-op.
            zero = logits.float().sum() * 0.0
            return zero, {name: zero.detach() for name in self.terms}
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            parts = {name: term(logits, target) for name, term in self.terms.items()}
            total = sum(self.weights[name] * value for name, value in parts.items())
        return total, parts
