"""Encoders x architectures: every shipped space's encoders build offline, refused pairs are one
line before anything trains, layer-wise learning rates per encoder stage, and a smoke search on
search_spaces/upernet.yaml (Swin and ConvNeXt under UPerNet) on CamVid."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import yaml

from conftest import REPO, write_camvid_subset
from test_search import read_leaderboard, search_cmd, search_env, short_tmp, stop_ray_processes, tail
from training.config import SEARCH_SPACES_DIR, load_space
from training.engine.trainer import build_optimizer, build_scheduler
from training.errors import ConfigError
from training.modeling.models import build_model

NUM_CLASSES = 5
SIZE = 64  # the smoke preset's size: the smallest every shipped space's architecture takes

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_torch_thread")]


def space_encoders() -> list[tuple[str, str]]:
    """(space, encoder) for every encoder a shipped space names, in its main config or its smoke block."""
    pairs = []
    for path in sorted(SEARCH_SPACES_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        for model in (raw.get("model", {}), raw.get("smoke", {}).get("model", {})):
            encoder = model.get("encoder")
            names = encoder.get("choice", []) if isinstance(encoder, dict) else [encoder] if encoder else []
            pairs += [(path.stem, name) for name in names if (path.stem, name) not in pairs]
    return pairs


SOCKET_EVENTS: list[str] = []
_listening = False


def _audit(event: str, args) -> None:
    if _listening and event.startswith("socket."):
        SOCKET_EVENTS.append(event)


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only inside `no_network()`


@contextmanager
def no_network():
    """Fails the test if anything inside opens a socket (not even a DNS lookup)."""
    global _listening
    SOCKET_EVENTS.clear()
    _listening = True
    try:
        yield
    finally:
        _listening = False
    assert not SOCKET_EVENTS, sorted(set(SOCKET_EVENTS))


# ---- every encoder of every shipped space builds, offline -----------------------------------


@pytest.mark.parametrize("space, encoder", space_encoders())
def test_shipped_encoders_build_offline(space, encoder):
    cfg = load_space(space, overrides={"model.encoder": encoder, "model.encoder_weights": None, "data.image_size": SIZE}).defaults
    with no_network():
        model = build_model(cfg.model, NUM_CLASSES, cfg.data.image_size).eval()
        with torch.no_grad():
            logits = model(torch.randn(2, 3, SIZE, SIZE))
    assert logits.shape == (2, NUM_CLASSES, SIZE, SIZE)
    assert torch.isfinite(logits).all()


def test_every_shipped_space_is_covered():
    spaces = {space for space, _ in space_encoders()}
    assert {"deeplab", "unet", "segformer", "upernet"} <= spaces
    upernet = [encoder for space, encoder in space_encoders() if space == "upernet"]
    assert any("swin" in e for e in upernet) and any("convnext" in e for e in upernet)


def test_swin_takes_other_multiples_of_32():
    """Made for data.image_size, Swin still runs TTA scales and other sizes (its windows pad)."""
    cfg = load_space("upernet", smoke=True, overrides={"model.encoder": "tu-swin_tiny_patch4_window7_224"}).defaults
    model = build_model(cfg.model, NUM_CLASSES, cfg.data.image_size).eval()
    with torch.no_grad():
        for side in (32, 96, 160):
            assert model(torch.randn(1, 3, side, side)).shape == (1, NUM_CLASSES, side, side)


def test_swin_checkpoint_rebuilds_at_its_training_size(tmp_path):
    """Swin's windows (and their bias tables) follow data.image_size: a checkpoint is rebuilt with the size it trained at."""
    from training.engine.checkpoint import load_model_and_classes

    cfg = load_space("upernet", smoke=True, overrides={"model.encoder": "tu-swin_tiny_patch4_window7_224"}).defaults
    model = build_model(cfg.model, 3, cfg.data.image_size).eval()
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "classes": ["Background", "a", "b"], "epoch": 1}, tmp_path / "best.pt")
    loaded, loaded_cfg, _, _ = load_model_and_classes(tmp_path / "best.pt")
    assert loaded_cfg.data.image_size == 64
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("encoder", ["tu-swin_tiny_patch4_window7_224", "tu-convnext_atto"])
def test_imagenet_weights_from_the_weights_dir(encoder, tmp_path, monkeypatch):
    """`imagenet` for a tu- encoder loads <SEGTUNE_WEIGHTS_DIR>/<timm name>.safetensors, every encoder tensor from it."""
    from safetensors.torch import save_file
    from test_models import seeded_encoder_state

    monkeypatch.setenv("SEGTUNE_WEIGHTS_DIR", str(tmp_path))
    state = seeded_encoder_state(encoder, seed=11)
    save_file(state, tmp_path / f"{encoder.removeprefix('tu-')}.safetensors")
    cfg = load_space("upernet", overrides={"model.encoder": encoder, "data.image_size": 224}).defaults
    assert cfg.model.encoder_weights == "imagenet"
    with no_network():
        own = build_model(cfg.model, NUM_CLASSES, cfg.data.image_size).encoder.state_dict()
    # timm's feature wrapper flattens the first level of names: layers.0 -> model.layers_0
    loaded = [key for key, value in state.items()
              for name in {f"model.{key}", "model." + key.replace(".", "_", 1)} if name in own and torch.equal(own[name], value)]
    assert len(loaded) == len(own), f"{len(loaded)} of {len(own)} encoder tensors came from the file"


# ---- refused pairs: one line, before anything trains -----------------------------------------


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"model.arch": "DeepLabV3Plus", "model.encoder": "tu-swin_base_patch4_window7_224"},
         "model.encoder: tu-swin_base_patch4_window7_224 cannot run dilated (timm's SwinTransformer has no output_stride "
         "(dilated) mode), which model.arch DeepLabV3Plus needs (encoder output stride 16); use this encoder with UPerNet"),
        ({"model.arch": "DeepLabV3", "model.encoder": "tu-dla34"}, "timm's DLA has no output_stride (dilated) mode), which model.arch DeepLabV3 needs (encoder output stride 8)"),
        ({"model.arch": "DeepLabV3Plus", "model.encoder": "densenet121"}, "(smp: DenseNet encoders do not support dilated mode"),
        ({"model.arch": "PAN", "model.encoder": "tu-swin_tiny_patch4_window7_224", "data.image_size": 128}, "or set model.params.encoder_output_stride: 32"),
        ({"model.arch": "Linknet", "model.encoder": "mit_b0"}, "model.arch: smp cannot build Linknet over model.encoder mit_b0: Encoder `mit_b0` is not supported for Linknet"),
        ({"model.arch": "UPerNet", "model.encoder": "tu-vit_tiny_patch16_224"}, "model.encoder: tu-vit_tiny_patch16_224 is not hierarchical (feature strides [16]; smp needs strides doubling"),
        ({"model.arch": "UPerNet", "data.batch_size": 1}, "data.batch_size=1 but model.arch=UPerNet needs at least 2"),
    ],
)
def test_refused_pairs_are_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_space("upernet", smoke=True, overrides=overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message and message.startswith(str(SEARCH_SPACES_DIR / "upernet.yaml"))


def test_allowed_pairs_pass():
    for overrides in (
        {"model.arch": "DeepLabV3Plus", "model.encoder": "tu-convnext_atto"},  # ConvNeXt dilates
        {"model.arch": "PAN", "model.encoder": "tu-swin_tiny_patch4_window7_224", "data.image_size": 128, "model.params": {"encoder_output_stride": 32}},
        {"model.arch": "Unet", "model.encoder": "tu-swin_tiny_patch4_window7_224", "model.params": {}},
        {"model.arch": "DeepLabV3Plus", "model.encoder": "mit_b0", "model.params": {}},
    ):
        assert load_space("upernet", smoke=True, overrides=overrides).defaults.model.encoder == overrides["model.encoder"]


def test_each_searched_value_is_checked(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text(
        "model: {arch: DeepLabV3Plus, encoder: {choice: [tu-convnext_atto, tu-swin_tiny_patch4_window7_224], default: tu-convnext_atto}}\n"
    )
    with pytest.raises(ConfigError, match=r"mixed.yaml: model.encoder='tu-swin_tiny_patch4_window7_224': model.encoder: "
                                          r"tu-swin_tiny_patch4_window7_224 cannot run dilated"):
        load_space(path)


def test_search_cli_refuses_before_ray_starts(tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text((SEARCH_SPACES_DIR / "upernet.yaml").read_text().replace("arch: UPerNet", "arch: DeepLabV3Plus"))
    results, ray_tmp = tmp_path / "results", short_tmp("rt")
    proc = subprocess.run(search_cmd("--space", str(space), "--smoke", "--experiment", "bad"), cwd=REPO,
                          env=search_env(results, ray_tmp), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {space}: model.encoder: tu-swin_base_patch4_window12_384 cannot run dilated"), proc.stderr
    assert "which model.arch DeepLabV3Plus needs" in lines[0]
    assert not list(ray_tmp.iterdir()) and not (results / "bad").exists()  # no Ray session, nothing written


# ---- layer-wise learning rates ------------------------------------------------------------------


def stage_groups(encoder: str, decay: float, lr: float = 1e-3, mult: float = 0.5):
    cfg = load_space("upernet", smoke=True, overrides={
        "model.encoder": encoder, "optimizer.layer_decay": decay, "optimizer.lr": lr, "optimizer.encoder_lr_mult": mult,
    }).defaults
    model = build_model(cfg.model, NUM_CLASSES, cfg.data.image_size)
    return cfg, model, build_optimizer(cfg, model)


# per encoder: the parameter-name prefix of each stage (after "encoder."), shallowest first
STAGE_PREFIXES = {
    "tu-convnext_atto": [("model.stem_", "model.stages_0."), ("model.stages_1.",), ("model.stages_2.",), ("model.stages_3.",)],
    "tu-swin_tiny_patch4_window7_224": [("model.patch_embed.", "model.layers_0."), ("model.layers_1.",), ("model.layers_2.",), ("model.layers_3.",)],
    "resnet18": [("conv1.", "bn1."), ("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)],
}


@pytest.mark.parametrize("encoder", list(STAGE_PREFIXES))
def test_layer_decay_groups_encoder_stages(encoder):
    cfg, model, opt = stage_groups(encoder, decay=0.8)
    prefixes = STAGE_PREFIXES[encoder]
    names = {id(p): name for name, p in model.named_parameters()}
    groups = opt.param_groups
    assert [g["name"] for g in groups] == [f"encoder.stage{i}" for i in range(len(prefixes))] + ["decoder"]
    deepest = len(prefixes) - 1
    for i, (group, stage) in enumerate(zip(groups, prefixes)):
        assert group["lr"] == pytest.approx(1e-3 * 0.5 * 0.8 ** (deepest - i))  # the deepest stage at lr * encoder_lr_mult
        assert group["params"] and all(names[id(p)].removeprefix("encoder.").startswith(stage) for p in group["params"]), i
    assert groups[-1]["lr"] == pytest.approx(1e-3)
    assert all(not names[id(p)].startswith("encoder.") for p in groups[-1]["params"])
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(names)  # every parameter exactly once


def test_layer_decay_survives_the_schedule_and_is_off_at_1():
    cfg, _, opt = stage_groups("tu-convnext_atto", decay=0.5)
    sched = build_scheduler(cfg, opt, steps_per_epoch=5)
    for _ in range(7):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[-1] < 1e-3 and [lr / lrs[-1] for lr in lrs] == pytest.approx([0.0625, 0.125, 0.25, 0.5, 1.0])
    _, model, opt = stage_groups("tu-convnext_atto", decay=1.0)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("encoder", 5e-4), ("decoder", 1e-3)]
    assert len(opt.param_groups[0]["params"]) == len(list(model.encoder.parameters()))


# ---- the UPerNet smoke search on CamVid ----------------------------------------------------------


@pytest.mark.smoke_search
def test_upernet_smoke_search_on_camvid(tmp_path):
    """`tune/search.py --space upernet --smoke` on 2 trials (the defaults: ConvNeXt; Optuna's first sample, seeded: Swin).

    The smoke block's full 6 trials add a minute of Swin on 2 cores and test nothing more."""
    data = write_camvid_subset(tmp_path / "camvid32", n_train=32)
    results, ray_tmp = tmp_path / "results", short_tmp("rt")
    log = tmp_path / "search.log"
    cmd = search_cmd("--space", "upernet", "--smoke", "--num-samples", "2", "--data", str(data), "--experiment", "upernet",
                     "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        with open(log, "w") as out:
            rc = subprocess.run(cmd, cwd=REPO, env=search_env(results, ray_tmp), stdout=out, stderr=subprocess.STDOUT, timeout=300).returncode
    finally:
        stop_ray_processes(ray_tmp)
    assert rc == 0, tail(log)
    board = read_leaderboard(results / "upernet" / "leaderboard.csv")
    assert len(board) == 2 and all(row["status"] in ("completed", "stopped by ASHA") for row in board), board
    encoders = {row["model.encoder"] for row in board}
    assert encoders == {"tu-convnext_atto", "tu-swin_tiny_patch4_window7_224"}, encoders
    assert all(float(row["best_val_miou"]) > 0 for row in board)
    best = yaml.safe_load((results / "upernet" / "best_configs.yaml").read_text())
    assert best["configs"][0]["config"]["model"]["arch"] == "UPerNet" and best["configs"][0]["config"]["optimizer"]["layer_decay"] < 1
