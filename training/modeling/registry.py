"""The names a config may use: architectures, loss terms, encoders, weight files.

Plain data and name checks, no torch: training.config validates against this module
without importing the models. models.py builds its ARCHITECTURES from ARCH_TABLE and
losses.py keys its LOSSES by LOSS_TERMS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.errors import ConfigError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class ArchInfo:
    name: str
    smp_class: str  # attribute of segmentation_models_pytorch
    divisor: int  # input sides must be multiples of this
    min_size: int = 32  # smallest input side the decoder accepts
    # the smp class's default `encoder_output_stride`: below 32 the encoder must run dilated
    encoder_output_stride: int = 32
    # 2 where batch norm follows a global pooling (ASPP, PSP, pyramid attention): in training it
    # refuses one value per channel, i.e. a batch of one image
    min_batch: int = 1


ARCH_TABLE: tuple[ArchInfo, ...] = (
    ArchInfo("DeepLabV3", "DeepLabV3", 8, encoder_output_stride=8, min_batch=2),
    ArchInfo("DeepLabV3Plus", "DeepLabV3Plus", 16, encoder_output_stride=16, min_batch=2),
    ArchInfo("Unet", "Unet", 32),
    ArchInfo("UnetPlusPlus", "UnetPlusPlus", 32),
    ArchInfo("FPN", "FPN", 32),
    ArchInfo("PAN", "PAN", 32, min_size=128, encoder_output_stride=16, min_batch=2),  # its pyramid attention pools the 1/16 map 3 more times
    ArchInfo("UPerNet", "UPerNet", 32, min_batch=2),
    ArchInfo("Segformer", "Segformer", 32),
    ArchInfo("MAnet", "MAnet", 32),
    ArchInfo("Linknet", "Linknet", 32),
    ArchInfo("PSPNet", "PSPNet", 8),
)
ARCH_NAMES = {info.name.lower(): info for info in ARCH_TABLE}

LOSS_TERMS = ("ce", "soft_ce", "dice", "focal", "lovasz", "jaccard", "tversky")


def _unknown_arch(name: str) -> str:
    return f"unknown architecture {name!r}; known: {[info.name for info in ARCH_TABLE]}"


def arch_info(name: str) -> ArchInfo:
    """The table entry of architecture `name` (case-insensitive), or ConfigError naming model.arch."""
    try:
        return ARCH_NAMES[name.lower()]
    except KeyError:
        raise ConfigError(f"model.arch: {_unknown_arch(name)}") from None


def is_timm(encoder: str) -> bool:
    return encoder.startswith("tu-")


def encoder_exists(encoder: str) -> bool:
    if is_timm(encoder):
        import timm

        return bool(timm.list_models(encoder[3:].split(".")[0]))
    import segmentation_models_pytorch as smp

    return encoder in smp.encoders.get_encoder_names()


def check_model_field(name: str, value: str | None) -> None:
    """Raise ValueError if model.<name> (arch, encoder, encoder_weights) is invalid."""
    if name == "arch" and value.lower() not in ARCH_NAMES:
        raise ValueError(_unknown_arch(value))
    if name == "encoder" and not encoder_exists(value):
        raise ValueError(f"unknown encoder {value!r} (smp names like 'resnet34', or 'tu-<timm model>')")
    if name == "encoder_weights" and value is not None and value != "imagenet" and Path(value).suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"encoder_weights must be null, 'imagenet' or a weights file ({'/'.join(WEIGHT_SUFFIXES)}), got {value!r}")

