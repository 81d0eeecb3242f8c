"""Model registry: config -> smp model, with pretrained encoder weights resolved offline.

One entry per architecture; adding one is adding a line to ARCHITECTURES.
Weights never come from the network: `imagenet` is looked up in SEGTUNE_WEIGHTS_DIR and
the Hugging Face cache (where smp and timm keep downloaded weights), a path is loaded as a
state dict, and anything missing is an error that says how to provide the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from training.errors import ConfigError, WeightsNotFoundError

if TYPE_CHECKING:
    from training.config import ModelConfig

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class ArchSpec:
    name: str
    cls: type[nn.Module]
    divisor: int  # input sides must be multiples of this
    min_size: int = 32  # smallest input side the decoder accepts


ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name.lower(): spec
    for spec in (
        ArchSpec("DeepLabV3", smp.DeepLabV3, 8),
        ArchSpec("DeepLabV3Plus", smp.DeepLabV3Plus, 16),
        ArchSpec("Unet", smp.Unet, 32),
        ArchSpec("UnetPlusPlus", smp.UnetPlusPlus, 32),
        ArchSpec("FPN", smp.FPN, 32),
        ArchSpec("PAN", smp.PAN, 32, min_size=128),  # its pyramid attention pools the 1/16 map 3 more times
        ArchSpec("UPerNet", smp.UPerNet, 32),
        ArchSpec("Segformer", smp.Segformer, 32),
        ArchSpec("MAnet", smp.MAnet, 32),
        ArchSpec("Linknet", smp.Linknet, 32),
        ArchSpec("PSPNet", smp.PSPNet, 8),
    )
}


def weights_dir() -> Path:
    return Path(os.environ.get("SEGTUNE_WEIGHTS_DIR", Path.home() / ".cache" / "segtune" / "weights"))


def arch_spec(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name.lower()]
    except KeyError:
        known = [s.name for s in ARCHITECTURES.values()]
        raise ConfigError(f"model.arch: unknown architecture {name!r}; known: {known}") from None


def _is_timm(encoder: str) -> bool:
    return encoder.startswith("tu-")


def encoder_exists(encoder: str) -> bool:
    if _is_timm(encoder):
        import timm

        return bool(timm.list_models(encoder[3:].split(".")[0]))
    return encoder in smp.encoders.get_encoder_names()


def check_model_field(name: str, value: str | None) -> None:
    """Raise ValueError if model.<name> (arch, encoder, encoder_weights) is invalid."""
    if name == "arch" and value.lower() not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {value!r}; known: {[s.name for s in ARCHITECTURES.values()]}")
    if name == "encoder" and not encoder_exists(value):
        raise ValueError(f"unknown encoder {value!r} (smp names like 'resnet34', or 'tu-<timm model>')")
    if name == "encoder_weights" and value is not None and value != "imagenet" and Path(value).suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"encoder_weights must be null, 'imagenet' or a weights file ({'/'.join(WEIGHT_SUFFIXES)}), got {value!r}")


def check_model_config(cfg: "ModelConfig") -> None:
    """Raise ValueError for an unknown arch/encoder (pydantic turns it into a key-path error)."""
    for name in ("arch", "encoder", "encoder_weights"):
        check_model_field(name, getattr(cfg, name))


def _hub_cached(repo_id: str, filenames: tuple[str, ...], revision: str | None = None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def find_pretrained_file(encoder: str) -> Path:
    """The local file holding `imagenet` weights for `encoder`, or WeightsNotFoundError."""
    stem = encoder[3:] if _is_timm(encoder) else encoder
    for suffix in WEIGHT_SUFFIXES:
        candidate = weights_dir() / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    if _is_timm(encoder):
        import timm

        cfg = timm.models.get_pretrained_cfg(stem.split(".")[0] if "." not in stem else stem)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
        found = _hub_cached(hub_id, ("model.safetensors", "pytorch_model.bin")) if hub_id else None
        source = f"huggingface repo {hub_id}" if hub_id else "timm"
    else:
        settings = smp.encoders.encoders[encoder]["pretrained_settings"].get("imagenet")
        if settings is None:
            raise WeightsNotFoundError(f"model.encoder_weights: encoder {encoder!r} has no imagenet weights in smp; use null or a state dict path")
        found = _hub_cached(settings["repo_id"], ("model.safetensors",), settings.get("revision"))
        source = f"huggingface repo {settings['repo_id']}"
    if found is not None:
        return found
    raise WeightsNotFoundError(
        f"model.encoder_weights: imagenet weights for {encoder!r} are not available offline; put them at "
        f"{weights_dir() / (stem + '.safetensors')} (or .pth; SEGTUNE_WEIGHTS_DIR moves that folder), or download "
        f"{source} into the Hugging Face cache on a connected machine, or set encoder_weights to a state dict path, "
        f"or to null to train from scratch"
    )


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def build_model(cfg: "ModelConfig", num_classes: int) -> nn.Module:
    """The smp model for `cfg`, encoder weights loaded from local files only."""
    spec = arch_spec(cfg.arch)
    weights_file: Path | None = None
    if cfg.encoder_weights == "imagenet":
        weights_file = find_pretrained_file(cfg.encoder)
    elif cfg.encoder_weights is not None:
        weights_file = Path(cfg.encoder_weights)
        if not weights_file.is_file():
            raise WeightsNotFoundError(f"model.encoder_weights: file not found: {weights_file}")
    kwargs: dict[str, Any] = dict(cfg.params)
    if weights_file is not None and _is_timm(cfg.encoder):
        # timm reads the file itself and drops classifier keys the features model lacks.
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights_file))
        return spec.cls(encoder_name=cfg.encoder, encoder_weights=True, classes=num_classes, **kwargs)
    model = spec.cls(encoder_name=cfg.encoder, encoder_weights=None, classes=num_classes, **kwargs)
    if weights_file is not None:
        state = load_state_dict_file(weights_file)
        # smp encoders override load_state_dict (no strict=, returns None), so compare keys here;
        # keys the encoder lacks (the classifier head) are dropped.
        own = model.encoder.state_dict()
        missing = [k for k in own if k not in state]
        where = f"model.encoder_weights: {weights_file} does not fit encoder {cfg.encoder!r}"
        if missing:
            unexpected = [k for k in state if k not in own]
            raise WeightsNotFoundError(f"{where}: {len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected")
        try:
            model.encoder.load_state_dict({k: v for k, v in state.items() if k in own})
        except RuntimeError as err:  # shape mismatches
            raise WeightsNotFoundError(f"{where}: {str(err).strip().splitlines()[-1].strip()}") from None
    return model
