"""Model registry: config -> smp model, with pretrained encoder weights resolved offline.

The architectures are registry.ARCH_TABLE (plain data the config validates against);
adding one is adding a line there. Weights never come from the network: `imagenet` is
looked up in SEGTUNE_WEIGHTS_DIR and the Hugging Face cache (where smp and timm keep
downloaded weights), a path is loaded as a state dict, and anything missing is an error
that says how to provide the file.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from training.errors import WeightsNotFoundError
from training.modeling.encoders import timm_size_kwargs
from training.modeling.registry import ARCH_TABLE, WEIGHT_SUFFIXES, arch_info, check_model_field, is_timm

if TYPE_CHECKING:
    from training.config import ModelConfig


@dataclass(frozen=True)
class ArchSpec:
    name: str
    cls: type[nn.Module]
    divisor: int  # input sides must be multiples of this
    min_size: int = 32  # smallest input side the decoder accepts


ARCHITECTURES: dict[str, ArchSpec] = {
    info.name.lower(): ArchSpec(info.name, getattr(smp, info.smp_class), info.divisor, info.min_size) for info in ARCH_TABLE
}


def weights_dir() -> Path:
    return Path(os.environ.get("SEGTUNE_WEIGHTS_DIR", Path.home() / ".cache" / "segtune" / "weights"))


def arch_spec(name: str) -> ArchSpec:
    """The spec of architecture `name` (case-insensitive), or ConfigError naming model.arch."""
    return ARCHITECTURES[arch_info(name).name.lower()]


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
    stem = encoder[3:] if is_timm(encoder) else encoder
    for suffix in WEIGHT_SUFFIXES:
        candidate = weights_dir() / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    if is_timm(encoder):
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


def _key_summary(missing: list[str], unexpected: list[str]) -> str:
    parts = [f"{len(keys)} {kind} keys (e.g. {keys[:3]})" for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    return ", ".join(parts)


def _load_error_summary(err: RuntimeError) -> str:
    """torch's multi-line load_state_dict error as one line: key counts, the first shape mismatch."""
    lines = [line.strip() for line in str(err).strip().splitlines()[1:]]
    keys = {kind: re.findall(r'"([^"]+)"', next((l for l in lines if l.startswith(kind)), "")) for kind in ("Missing", "Unexpected")}
    mismatch = next((l.rstrip(".") for l in lines if l.startswith("size mismatch")), None)
    parts = [_key_summary(keys["Missing"], keys["Unexpected"])] if keys["Missing"] or keys["Unexpected"] else []
    parts += [mismatch] if mismatch else []
    return ", ".join(parts) or str(err).strip().splitlines()[-1].strip()


class _TimmLoadKeys(logging.Filter):
    """Collects the keys timm logs as missing/unexpected after a non-strict load (it raises only when strict)."""

    PATTERN = re.compile(r"(Missing|Unexpected) keys \((.*)\) (?:discovered|found) while loading pretrained weights")

    def __init__(self, shown_from: int):
        super().__init__()
        self.shown_from = shown_from
        self.keys: dict[str, list[str]] = {"missing": [], "unexpected": []}

    def filter(self, record: logging.LogRecord) -> bool:
        found = self.PATTERN.match(record.getMessage())
        if found:  # reported by build_model instead, as an error where the keys do not fit
            self.keys[found[1].lower()] += found[2].split(", ")
            return False
        return record.levelno >= self.shown_from  # INFO is enabled only to see the missing keys


@contextmanager
def _timm_load_keys():
    logger = logging.getLogger("timm.models._builder")
    collector = _TimmLoadKeys(shown_from=logger.getEffectiveLevel())
    level = logger.level
    logger.addFilter(collector)
    logger.setLevel(min(collector.shown_from, logging.INFO))
    try:
        yield collector.keys
    finally:
        logger.removeFilter(collector)
        logger.setLevel(level)


def _headless_keys(model_name: str) -> set[str]:
    """State dict keys of timm's classification model without its classifier."""
    import timm

    try:
        with torch.device("meta"):
            return set(timm.create_model(model_name, num_classes=0).state_dict())
    except Exception:  # a few models cannot be built on the meta device
        return set(timm.create_model(model_name, num_classes=0).state_dict())


def _build_timm_pretrained(spec: ArchSpec, encoder: str, weights_file: Path, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """A `tu-` model whose encoder loads `weights_file` through timm (its checkpoint filter included), strictly.

    timm loads a features_only model non-strictly when the head differs, so a partial or foreign
    file would leave the encoder partly random: the classifier keys are dropped here and the model
    built headless (num_classes=0), which keeps timm strict. Feature models that timm always loads
    non-strictly (efficientnet, mobilenetv3: no head layers) are checked through the keys timm reports.
    """
    import timm

    try:
        state = timm.models.load_state_dict(str(weights_file))
    except Exception as err:  # unreadable, or not a state dict
        raise WeightsNotFoundError(f"model.encoder_weights: cannot read {weights_file}: {err}") from None
    model_name = encoder[3:]
    classifiers = getattr(timm.models.get_pretrained_cfg(model_name), "classifier", None) or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    head_keys = {f"{name}.{param}" for name in classifiers for param in ("weight", "bias")}
    state = {k: v for k, v in state.items() if k not in head_keys}
    # source=None: a registry entry sourced from the hub would otherwise ignore the state dict
    kwargs["pretrained_cfg_overlay"] = dict(state_dict=state, num_classes=0, source=None)
    where = f"model.encoder_weights: {weights_file} does not fit encoder {encoder!r}"
    try:
        with _timm_load_keys() as reported:
            model = spec.cls(encoder_name=encoder, encoder_weights=True, classes=num_classes, **kwargs)
    except RuntimeError as err:  # strict key mismatches; shape mismatches even when non-strict
        raise WeightsNotFoundError(f"{where}: {_load_error_summary(err)}") from None
    missing, unexpected = reported["missing"], reported["unexpected"]
    if unexpected:  # the head layers a features model drops (conv_head, ...) are expected
        headless = _headless_keys(model_name)
        unexpected = [k for k in unexpected if k not in headless]
    if missing or unexpected:
        raise WeightsNotFoundError(f"{where}: {_key_summary(missing, unexpected)}")
    return model


def build_model(cfg: "ModelConfig", num_classes: int, image_size: int | None = None) -> nn.Module:
    """The smp model for `cfg`, encoder weights loaded from local files only.

    `image_size` (data.image_size) is what a fixed-size timm encoder (Swin) is made for; it
    also takes other multiples of 32. A checkpoint must be rebuilt with the size it trained at.
    """
    spec = arch_spec(cfg.arch)
    weights_file: Path | None = None
    if cfg.encoder_weights == "imagenet":
        weights_file = find_pretrained_file(cfg.encoder)
    elif cfg.encoder_weights is not None:
        weights_file = Path(cfg.encoder_weights)
        if not weights_file.is_file():
            raise WeightsNotFoundError(f"model.encoder_weights: file not found: {weights_file}")
    kwargs: dict[str, Any] = timm_size_kwargs(cfg.encoder, image_size) | cfg.params
    if weights_file is not None and is_timm(cfg.encoder):
        return _build_timm_pretrained(spec, cfg.encoder, weights_file, num_classes, kwargs)
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
