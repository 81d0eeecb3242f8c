"""Model registry and offline encoder weights (files, SEGTUNE_WEIGHTS_DIR, never the network)."""

from __future__ import annotations

import inspect
import json
import subprocess

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import save_file

from conftest import PYTHON, REPO
from training.config import ModelConfig, load_space
from training.engine.checkpoint import load as load_checkpoint
from training.errors import ConfigError, WeightsNotFoundError
from training.modeling.losses import LOSSES
from training.modeling.models import ARCHITECTURES, arch_spec, build_model
from training.modeling.registry import ARCH_TABLE, LOSS_TERMS, arch_info

NUM_CLASSES = 5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def logits(model: torch.nn.Module, size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size))


@pytest.mark.parametrize("arch", [spec.name for spec in ARCHITECTURES.values()])
def test_every_architecture_builds(arch):
    spec = arch_spec(arch)
    size = max(64, spec.min_size)
    model = build_model(ModelConfig(arch=arch, encoder="resnet18"), NUM_CLASSES)
    assert isinstance(model, spec.cls)
    assert logits(model, size).shape == (2, NUM_CLASSES, size, size)
    # registry min_batch: 2 exactly where smp's model cannot train on a batch of one image
    one_image = torch.randn(1, 3, size, size)
    if arch_info(arch).min_batch == 2:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            model.train()(one_image)
    else:
        assert model.train()(one_image).shape == (1, NUM_CLASSES, size, size)


def test_small_inputs_refused_for_pan():
    # PAN's pyramid attention cannot run at 64 px: refused when the config is read, not mid-training
    with pytest.raises(ConfigError, match="model.arch=PAN needs at least 128"):
        load_space("deeplab", smoke=True, overrides={"model.arch": "PAN"})
    assert load_space("deeplab", overrides={"model.arch": "PAN"}).defaults.model.arch == "PAN"


def test_models_and_losses_are_the_registry_names():
    """The config validates against the registry: every name it accepts must build."""
    assert [(s.name, s.cls, s.divisor, s.min_size) for s in ARCHITECTURES.values()] == [
        (info.name, getattr(smp, info.smp_class), info.divisor, info.min_size) for info in ARCH_TABLE
    ]
    # the encoder output stride each architecture asks for is smp's own default (below 32: dilated)
    for info in ARCH_TABLE:
        param = inspect.signature(getattr(smp, info.smp_class)).parameters.get("encoder_output_stride")
        assert info.encoder_output_stride == (param.default if param is not None else 32), info.name
    assert set(LOSSES) == set(LOSS_TERMS)


def test_arch_names_are_case_insensitive():
    assert arch_spec("deeplabv3plus").cls is smp.DeepLabV3Plus
    with pytest.raises(ConfigError, match="model.arch: unknown architecture 'Nope'"):
        arch_spec("Nope")


@pytest.mark.parametrize("arch, encoder", [("Segformer", "mit_b0"), ("Unet", "tu-resnet18"), ("DeepLabV3Plus", "tu-mobilenetv3_small_050")])
def test_other_encoders(arch, encoder):
    model = build_model(ModelConfig(arch=arch, encoder=encoder), NUM_CLASSES)
    assert logits(model, 64).shape == (2, NUM_CLASSES, 64, 64)


# ---- pretrained weights --------------------------------------------------------------------

NO_WEIGHTS_SCRIPT = r"""
import json, sys, time
network = []
sys.addaudithook(lambda event, args: network.append(event) if event.startswith("socket.") else None)
from training.config import ModelConfig
from training.errors import WeightsNotFoundError
from training.modeling.models import build_model
out = {}
for encoder in sys.argv[1:]:
    start = time.perf_counter()
    try:
        build_model(ModelConfig(arch="Unet", encoder=encoder, encoder_weights="imagenet"), 3)
        out[encoder] = [None, 0.0]
    except WeightsNotFoundError as err:
        out[encoder] = [str(err), time.perf_counter() - start]
print(json.dumps({"results": out, "network": sorted(set(network))}))
"""


def test_imagenet_without_local_weights_explains_how_to_provide_them(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "SEGTUNE_WEIGHTS_DIR": str(weights)}
    proc = subprocess.run(
        [PYTHON, "-c", NO_WEIGHTS_SCRIPT, "resnet18", "tu-resnet18", "mit_b0", "tu-convnext_atto", "tu-swin_tiny_patch4_window7_224"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["network"] == [], report["network"]  # not even a DNS lookup
    for encoder, (message, seconds) in report["results"].items():
        stem = encoder.removeprefix("tu-")
        assert message is not None, f"{encoder}: built without weights"
        assert message.startswith("model.encoder_weights: imagenet weights for")
        assert str(weights / f"{stem}.safetensors") in message and "SEGTUNE_WEIGHTS_DIR" in message
        assert "Hugging Face cache" in message and "null" in message
        assert seconds < 5, (encoder, seconds)


def seeded_encoder_state(encoder: str, seed: int) -> dict[str, torch.Tensor]:
    """A classifier-model state dict with known (seeded, non-default) values, head included."""
    torch.manual_seed(seed)
    if encoder.startswith("tu-"):
        state = timm.create_model(encoder[3:], pretrained=False).state_dict()
    else:
        state = smp.encoders.get_encoder(encoder, weights=None).state_dict()
        state |= {"fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}  # a classifier head, dropped
    return {k: (v + torch.rand_like(v.float()).to(v.dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def assert_encoder_equals(model: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    own = model.encoder.state_dict()
    compared = 0
    for key, value in state.items():
        if prefix + key in own:
            assert torch.equal(own[prefix + key], value), key
            compared += 1
    assert compared == len(own), f"{compared} of {len(own)} encoder tensors came from the file"


def save_both(state: dict[str, torch.Tensor], stem) -> tuple:
    torch.save(state, f"{stem}.pth")
    save_file(state, f"{stem}.safetensors")
    return f"{stem}.pth", f"{stem}.safetensors"


@pytest.mark.parametrize("encoder, prefix", [("resnet18", ""), ("tu-resnet18", "model.")])
def test_encoder_weights_from_a_file(tmp_path, encoder, prefix):
    state = seeded_encoder_state(encoder, seed=3)
    for path in save_both(state, tmp_path / "enc"):
        model = build_model(ModelConfig(arch="DeepLabV3Plus", encoder=encoder, encoder_weights=path), NUM_CLASSES)
        assert_encoder_equals(model, state, prefix)
    # a plain model built without weights differs: the comparison above is not vacuous
    fresh = build_model(ModelConfig(arch="DeepLabV3Plus", encoder=encoder), NUM_CLASSES)
    assert not torch.equal(fresh.encoder.state_dict()[prefix + "conv1.weight"], state["conv1.weight"])


def test_checkpoint_wrapped_state_dict(tmp_path):
    state = seeded_encoder_state("resnet18", seed=4)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    model = build_model(ModelConfig(arch="Unet", encoder="resnet18", encoder_weights=str(tmp_path / "wrapped.pth")), 3)
    assert_encoder_equals(model, state)


def test_imagenet_from_weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGTUNE_WEIGHTS_DIR", str(tmp_path))
    state = seeded_encoder_state("resnet18", seed=5)
    save_file(state, tmp_path / "resnet18.safetensors")
    model = build_model(ModelConfig(arch="Unet", encoder="resnet18", encoder_weights="imagenet"), 3)
    assert_encoder_equals(model, state)
    # timm's resnet18 uses torchvision's key names, so tu-resnet18 finds the same file
    model = build_model(ModelConfig(arch="Unet", encoder="tu-resnet18", encoder_weights="imagenet"), 3)
    assert_encoder_equals(model, state, "model.")


def test_weights_that_do_not_fit(tmp_path):
    state = seeded_encoder_state("resnet18", seed=6)
    torch.save(state, tmp_path / "r18.pth")
    with pytest.raises(WeightsNotFoundError, match=r"does not fit encoder 'resnet34': \d+ missing keys"):
        build_model(ModelConfig(arch="Unet", encoder="resnet34", encoder_weights=str(tmp_path / "r18.pth")), 3)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsNotFoundError, match="size mismatch for conv1.weight"):
        build_model(ModelConfig(arch="Unet", encoder="resnet18", encoder_weights=str(tmp_path / "bad.pth")), 3)
    with pytest.raises(WeightsNotFoundError, match="file not found"):
        build_model(ModelConfig(arch="Unet", encoder="resnet18", encoder_weights=str(tmp_path / "none.pth")), 3)


@pytest.mark.parametrize("encoder", ["tu-resnet18", "tu-mobilenetv3_small_050"])  # timm loads the second non-strictly itself
def test_timm_weights_that_do_not_fit(tmp_path, encoder):
    state = seeded_encoder_state(encoder, seed=7)
    build = lambda path: build_model(ModelConfig(arch="Unet", encoder=encoder, encoder_weights=str(path)), 3)
    keys = list(state)
    torch.save({k: state[k] for k in keys[: len(keys) // 2]}, tmp_path / "partial.pth")
    with pytest.raises(WeightsNotFoundError, match=rf"partial.pth does not fit encoder '{encoder}': \d+ missing keys") as info:
        build(tmp_path / "partial.pth")
    assert "\n" not in str(info.value)
    # a deeper variant of the model: every key fits, but the file holds more than the encoder
    torch.save(state | {"blocks.9.0.conv.weight": torch.zeros(8, 8, 1, 1), "layer5.0.conv1.weight": torch.zeros(8, 8, 1, 1)}, tmp_path / "deeper.pth")
    with pytest.raises(WeightsNotFoundError, match=r"deeper.pth does not fit encoder .*: 2 unexpected keys"):
        build(tmp_path / "deeper.pth")
    # the file as it is still loads completely: the checks above do not refuse good files
    save_file(state, tmp_path / "full.safetensors")
    assert_encoder_equals(build(tmp_path / "full.safetensors"), state, "model.")


def test_timm_weights_of_another_model(tmp_path):
    build = lambda encoder, path: build_model(ModelConfig(arch="Unet", encoder=encoder, encoder_weights=str(path)), 3)
    torch.save(seeded_encoder_state("tu-resnet34", seed=8), tmp_path / "r34.pth")
    # resnet18's keys are a subset of resnet34's: only the extra blocks tell them apart
    with pytest.raises(WeightsNotFoundError, match=r"r34.pth does not fit encoder 'tu-resnet18': \d+ unexpected keys \(e.g. \['layer1.2."):
        build("tu-resnet18", tmp_path / "r34.pth")
    torch.save(seeded_encoder_state("tu-resnet18", seed=8), tmp_path / "r18.pth")
    with pytest.raises(WeightsNotFoundError, match=r"r18.pth does not fit encoder 'tu-resnet34': \d+ missing keys"):
        build("tu-resnet34", tmp_path / "r18.pth")
    with pytest.raises(WeightsNotFoundError, match=r"r18.pth does not fit encoder 'tu-mobilenetv3_small_050': size mismatch for"):
        build("tu-mobilenetv3_small_050", tmp_path / "r18.pth")


class NotATensor:
    pass


def test_checkpoints_load_weights_only(tmp_path):
    model = build_model(ModelConfig(arch="Unet", encoder="resnet18"), 3)
    cfg = load_space("unet", smoke=True).defaults
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "classes": ["Background", "a", "b"], "epoch": 2}, tmp_path / "ok.pt")
    state = load_checkpoint(tmp_path / "ok.pt")
    assert state["config"] == cfg.to_dict() and state["epoch"] == 2
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    torch.save({"model": model.state_dict(), "extra": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        load_checkpoint(tmp_path / "evil.pt")

