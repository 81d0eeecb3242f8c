"""What an encoder can do, asked of smp and timm themselves: dilation, input size, stages.

Config validation calls `arch_encoder_error` before anything trains, build_model adds
`timm_size_kwargs`, the optimizer groups parameters by `encoder_stages`. Models are built on
the meta device (shapes only: no memory, no weights), so a new timm or smp release answers
for itself instead of a hand list of encoder names going stale.
"""

from __future__ import annotations

import inspect
import json
import typing
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from training.modeling.registry import ArchInfo, is_timm

# What smp and timm raise when they refuse a combination. Anything else on the meta device is
# a limit of the meta device itself (e.g. Tensor.item() while building mit_b*): left to the real build.
REFUSALS = (ValueError, TypeError, AssertionError)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].strip() if lines else type(err).__name__


@lru_cache(maxsize=None)
def _timm_facts(model_name: str) -> tuple[type[nn.Module], tuple[int, ...]]:
    """timm's class for `model_name` and the strides of its feature maps, from one build on the meta device."""
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(model_name)
    except Exception:  # a few models cannot be built on the meta device
        model = timm.create_model(model_name)
    return type(model), tuple(info["reduction"] for info in getattr(model, "feature_info", None) or ())


def timm_size_kwargs(encoder: str, image_size: int | None) -> dict[str, Any]:
    """Input-size kwargs for a timm encoder whose model is made for one size (Swin, SwinV2, MaxViT, ...).

    Swin derives each stage's window and shift from `img_size` and refuses other sizes unless
    `dynamic_img_size` is on; with it the windows pad, so TTA scales and other multiples of 32 run.
    Empty for smp encoders and for timm models that take any size (ResNet, ConvNeXt, EfficientNet).
    """
    if not is_timm(encoder):
        return {}
    accepted = inspect.signature(_timm_facts(encoder[3:])[0]).parameters
    kwargs: dict[str, Any] = {}
    if "img_size" in accepted and image_size is not None:
        kwargs["img_size"] = image_size
    if "dynamic_img_size" in accepted:
        kwargs["dynamic_img_size"] = True
    return kwargs


@lru_cache(maxsize=None)
def dilation_refusal(encoder: str, output_stride: int) -> str | None:
    """Why `encoder` cannot run dilated at `output_stride` (8 or 16), or None when it can."""
    if is_timm(encoder):
        import timm

        try:
            with torch.device("meta"):
                timm.create_model(encoder[3:], features_only=True, output_stride=output_stride)
        except REFUSALS:  # TypeError: no output_stride argument (Swin); AssertionError: only 32 (DLA, VGG)
            return f"timm's {_timm_facts(encoder[3:])[0].__name__} has no output_stride (dilated) mode"
        except Exception:
            return None
        return None
    import segmentation_models_pytorch as smp

    try:
        with torch.device("meta"):
            smp.encoders.get_encoder(encoder, weights=None, output_stride=output_stride)
    except REFUSALS as err:  # smp's own reason, e.g. "DenseNet encoders do not support dilated mode ..."
        return f"smp: {_first_line(err).rstrip('!.')}"
    except Exception:
        return None
    return None


@lru_cache(maxsize=None)
def _smp_refusal(arch: str, encoder: str, params_json: str) -> str | None:
    """smp's reason for refusing `arch` over an smp (non-timm) encoder, from a build on the meta device.

    smp refuses some pairs by name before building anything (UnetPlusPlus and Linknet take no
    mit_b*), so only this build knows; smp encoders are small, the build is cheap.
    """
    import segmentation_models_pytorch as smp

    try:
        with torch.device("meta"):
            getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, **json.loads(params_json))
    except REFUSALS as err:
        return _first_line(err)
    except Exception:  # a limit of the meta device
        return None
    return None


def _output_stride_hint(info: ArchInfo) -> str:
    """`or set model.params.encoder_output_stride: 32` where the smp class allows 32 (PAN)."""
    import segmentation_models_pytorch as smp

    param = inspect.signature(getattr(smp, info.smp_class)).parameters.get("encoder_output_stride")
    allowed = typing.get_args(param.annotation) if param is not None else ()
    return ", or set model.params.encoder_output_stride: 32" if 32 in allowed else ""


def arch_encoder_error(info: ArchInfo, encoder: str, params: dict[str, Any]) -> str | None:
    """One line saying why smp cannot build `info` over `encoder` (with `params`, model.params), or None.

    Sizes need no check here: every smp encoder at depth 5 downsamples 32x, which data.image_size
    must already be a multiple of (Swin: 4 px patches, then 3 merges of 2; windows pad).
    """
    output_stride = params.get("encoder_output_stride", info.encoder_output_stride)
    if output_stride < 32:
        why = dilation_refusal(encoder, output_stride)
        if why:
            return (
                f"model.encoder: {encoder} cannot run dilated ({why}), which model.arch {info.name} needs "
                f"(encoder output stride {output_stride}); use this encoder with UPerNet, FPN, Unet or Segformer, "
                f"or a dilatable encoder (resnet*, tu-convnext_*, tu-efficientnet_*) with {info.name}{_output_stride_hint(info)}"
            )
    if not is_timm(encoder):
        why = _smp_refusal(info.smp_class, encoder, json.dumps(params, sort_keys=True))
        return f"model.arch: smp cannot build {info.name} over model.encoder {encoder}: {why}" if why else None
    reductions = _timm_facts(encoder[3:])[1]
    if reductions and not _pyramid(reductions):
        return (
            f"model.encoder: {encoder} is not hierarchical (feature strides {sorted(set(reductions))}; smp needs strides "
            f"doubling at each stage, e.g. 4, 8, 16, 32): plain ViTs cannot feed {info.name}; use tu-swin_*, tu-convnext_* or a CNN"
        )
    return None


def _pyramid(reductions: tuple[int, ...]) -> bool:
    """smp's TimmUniversalEncoder takes strides that double at each stage, from 1, 2 or 4."""
    return any(list(reductions) == [start * 2**i for i in range(len(reductions))] for start in (1, 2, 4))


def encoder_stages(encoder: nn.Module, image_size: int) -> list[list[nn.Parameter]]:
    """The encoder's trainable parameters by stage, shallowest first (empty stages left out).

    smp and timm encoders share no naming of their stages, but each returns one feature map per
    stage: a parameter belongs to the first stage whose feature map depends on it, as autograd
    says on a copy of the encoder on the meta device (no memory, the model itself untouched).
    Parameters no feature map depends on (an unused head, stages past encoder_depth) join the last stage.
    """
    from torch.func import functional_call

    named = dict(encoder.named_parameters())
    trainable = [name for name, p in named.items() if p.requires_grad]
    meta = {name: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad) for name, p in named.items()}
    meta |= {name: torch.empty_like(b, device="meta") for name, b in encoder.named_buffers()}
    channels = getattr(encoder, "_in_channels", 3)
    # two images: batch norm in training mode refuses one value per channel (a 1x1 map at 32 px)
    features = functional_call(encoder, meta, (torch.empty(2, channels, image_size, image_size, device="meta"),))
    stages: list[list[str]] = []
    seen: set[str] = set()
    for feature in features:
        if feature.grad_fn is None:  # the input itself, or smp's empty stand-in for a missing 1/2 scale
            continue
        grads = torch.autograd.grad(feature.sum(), [meta[n] for n in trainable], allow_unused=True, retain_graph=True)
        stage = [name for name, grad in zip(trainable, grads) if grad is not None and name not in seen]
        seen.update(stage)
        stages.append(stage)
    unused = [name for name in trainable if name not in seen]
    if stages:
        stages[-1] += unused
    else:  # no feature map depends on a parameter: one stage
        stages = [unused]
    return [[named[name] for name in stage] for stage in stages if stage]
