"""Config files: parsing, validation messages (file + dotted key path, one line), resolution."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import PYTHON, REPO
from training.config import SEARCH_SPACES_DIR, SMOKE_PRESET, config_from_dict, load_space, resolve_space_path
from training.errors import ConfigError

SHIPPED = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def config_error(path: Path, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_space(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, """
        name: x
        model:
          arch: Unet
           encoder: resnet18
        """)
    message = config_error(path)
    assert "line 4" in message and "invalid YAML" in message


def test_top_level_must_be_a_mapping(tmp_path):
    assert "mapping" in config_error(write(tmp_path, "- just\n- a list\n"))


def test_unknown_key_names_dotted_path(tmp_path):
    path = write(tmp_path, """
        model:
          arch: Unet
          encodr: resnet18
        """)
    assert "model.encodr: unknown key" in config_error(path)
    assert "search.scheduler.grace: unknown key" in config_error(write(tmp_path, "search: {scheduler: {grace: 2}}\n", "b.yaml"))


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ("optimizer: {lr: -1}", "optimizer.lr", "greater than 0"),
        ("optimizer: {name: rmsprop}", "optimizer.name", "rmsprop"),
        ("model: {arch: Foo}", "model.arch", "unknown architecture 'Foo'"),
        ("model: {encoder: resnet1234}", "model.encoder", "unknown encoder 'resnet1234'"),
        ("model: {encoder: tu-not_a_timm_model}", "model.encoder", "not_a_timm_model"),
        ("model: {encoder_weights: weights.txt}", "model.encoder_weights", "weights.txt"),
        ("loss: {weights: {ce: 1.0, foo: 0.5}}", "loss.weights", "unknown loss term 'foo'"),
        ("loss: {weights: {ce: -1.0}}", "loss.weights", ">= 0"),
        ("loss: {weights: {ce: 0.0}}", "loss.weights", "weight > 0"),
        ("data: {image_size: 100}", "data.image_size", "multiple of 32"),
        ("trainer: {amp: fp8}", "trainer.amp", "fp8"),
        # YAML 1.1 booleans where a name is expected: the message says to quote them
        ("scheduler: {name: off}", "scheduler.name", "(got False: YAML reads unquoted on/off/yes/no as booleans; quote the value, e.g. 'off')"),
        ("model: {encoder_weights: yes}", "model.encoder_weights", "(got True: YAML reads unquoted on/off/yes/no as booleans; quote the value, e.g. 'on')"),
        ("folds: {n_splits: 3}\nsearch: {fold: 3}", "search.fold=3", "n_splits=3"),
        ("optimizer: {lr: {uniform: [0.1, 0.2], default: 0.5}}", "optimizer.lr", "default 0.5 is outside [0.1, 0.2]"),
        ("optimizer: {lr: {loguniform: [0, 0.2], default: 0.1}}", "optimizer.lr", "loguniform bounds must be > 0"),
        ("optimizer: {lr: {loguniform: [0.1, 0.01], default: 0.05}}", "optimizer.lr", "below upper bound"),
        ("optimizer: {lr: {loguniform: [1.0e-4, 1.0e-2]}}", "optimizer.lr", "needs a 'default'"),
        ("optimizer: {lr: {uniform: [0.1, 0.2], normal: [0, 1], default: 0.1}}", "optimizer.lr", "a distribution takes one of"),
        ("trainer: {epochs: {randint: [1, 5], default: 5}}", "trainer.epochs", "outside [1, 5)"),
        ("model: {encoder: {choice: [resnet18, resnet34], default: resnet50}}", "model.encoder", "not one of the choices"),
        # every choice must form a valid config, not only the default
        ("model: {encoder: {choice: [resnet18, nonexistent_enc], default: resnet18}}", "model.encoder", "unknown encoder 'nonexistent_enc'"),
        ("augment: {train: [{name: HorizontalFlipp, p: 0.5}]}", "augment.train[0]", "unknown albumentations transform 'HorizontalFlipp'"),
        ("augment: {train: [{name: HorizontalFlip, p: 2.0}]}", "augment.train[0]", "HorizontalFlip: invalid parameters"),
        ("augment: {eval: [{name: Resize, height: 64}]}", "augment.eval[0]", "Resize"),
        ("augment: {train: [{p: 0.5}]}", "augment.train[0]", "'name'"),
    ],
)
def test_bad_value_is_one_line_naming_the_key(tmp_path, text, key, fragment):
    message = config_error(write(tmp_path, text + "\n"))
    assert f": {key}" in message, message
    assert fragment in message, message


@pytest.mark.parametrize("text, amp", [("off", "off"), ("no", "off"), ("false", "off"), ("on", "auto"), ("yes", "auto"), ("'off'", "off"), ("bf16", "bf16")])
def test_amp_switch_written_as_a_yaml_boolean(tmp_path, text, amp):
    assert load_space(write(tmp_path, f"trainer: {{amp: {text}}}\n")).defaults.trainer.amp == amp


def test_amp_boolean_in_a_searched_choice(tmp_path):
    space = load_space(write(tmp_path, "trainer: {amp: {choice: [off, fp16], default: off}}\n"))
    assert space.defaults.trainer.amp == "off"
    assert space.resolve({"trainer.amp": "fp16"}).trainer.amp == "fp16"


def test_missing_file_lists_known_spaces():
    with pytest.raises(ConfigError) as info:
        load_space("no_such_space")
    assert "no_such_space" in str(info.value) and "deeplab" in str(info.value)


def test_bare_name_resolution(tmp_path, monkeypatch):
    expected = SEARCH_SPACES_DIR / "deeplab.yaml"
    monkeypatch.chdir(tmp_path)  # bare names do not depend on the working directory
    assert resolve_space_path("deeplab") == expected
    assert resolve_space_path("deeplab.yaml") == expected
    assert resolve_space_path(expected) == expected
    own = write(tmp_path, "name: mine\n", "deeplab.yaml")  # a file in the cwd wins as a path
    assert resolve_space_path("deeplab.yaml") == Path("deeplab.yaml")
    assert load_space(own).defaults.name == "mine"
    assert load_space("deeplab").defaults.name == "deeplab"
    with pytest.raises(ConfigError):
        resolve_space_path("sub/deeplab")  # a path with a folder is never looked up in search_spaces/


@pytest.mark.parametrize("smoke", [False, True])
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_spaces_load(name, smoke):
    space = load_space(name, smoke=smoke)
    cfg = space.defaults
    assert cfg.name == name
    assert space.distributions, "a search space searches something"
    for path, dist in space.distributions.items():
        assert dist.kind in ("choice", "uniform", "loguniform", "quniform", "randint")
        # the default of every distribution is what the single-run config holds
        node = cfg.to_dict()
        for key in path.split("."):
            node = node[key]
        assert node == dist.default, path
    if smoke:
        assert cfg.data.image_size == 64 and cfg.data.num_workers == 0
        assert cfg.model.encoder_weights is None
        assert cfg.trainer.epochs == SMOKE_PRESET["trainer"]["epochs"]
        assert cfg.search.scheduler.max_t <= 4
    else:
        assert cfg.data.image_size >= 256


MAIN_ONLY = "(main config; checked before the --smoke overrides)"


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        # each bad value is replaced by the smoke preset or the file's smoke block
        ("model: {encoder: resnet1234}\nsmoke: {model: {encoder: resnet18}}", "model.encoder", "unknown encoder 'resnet1234'"),
        ("model: {encoder: {choice: [resnet18, nonexistent_enc], default: resnet18}}\nsmoke: {model: {encoder: resnet18}}", "model.encoder", "nonexistent_enc"),
        ("search: {num_samples: 0}", "search.num_samples", "greater than or equal to 1"),
        ("data: {image_size: 100}", "data.image_size", "multiple of 32"),
        ("trainer: {epochs: 0}", "trainer.epochs", "greater than or equal to 1"),
    ],
)
def test_smoke_validates_the_main_config_first(tmp_path, text, key, fragment):
    path = write(tmp_path, text + "\n")
    message = config_error(path, smoke=True)
    assert f": {key}" in message and fragment in message, message
    assert message.endswith(MAIN_ONLY), message
    assert f": {key}" in config_error(path)  # the same error a real run gives


def test_smoke_block_errors_are_not_blamed_on_the_main_config(tmp_path):
    message = config_error(write(tmp_path, "smoke: {trainer: {epochs: 0}}\n"), smoke=True)
    assert ": trainer.epochs" in message and MAIN_ONLY not in message, message


def test_smoke_space_keeps_the_main_space(tmp_path):
    space = load_space("deeplab", smoke=True, overrides={"data.root": str(tmp_path)})
    assert space.defaults.data.image_size == SMOKE_PRESET["data"]["image_size"]
    main = space.main
    assert main.defaults.data.image_size == load_space("deeplab").defaults.data.image_size > 64
    assert main.defaults.data.root == str(tmp_path)  # the caller's overrides apply to both
    assert "tu-efficientnet_b3" in main.distributions["model.encoder"].args
    assert main.main is None and load_space("deeplab").main is None


def test_smoke_block_applies_over_the_preset():
    space = load_space("deeplab", smoke=True)
    assert space.distributions["model.encoder"].args == ("resnet18", "mobilenet_v2")
    assert space.defaults.model.encoder == "resnet18"
    assert space.defaults.optimizer.encoder_lr_mult == 1.0
    full = load_space("deeplab")
    assert "tu-efficientnet_b3" in full.distributions["model.encoder"].args
    assert full.defaults.model.encoder_weights == "imagenet"


def test_overrides_win(tmp_path):
    space = load_space("deeplab", smoke=True, overrides={"data.root": str(tmp_path), "trainer.epochs": 2})
    assert space.defaults.data.root == str(tmp_path)
    assert space.defaults.trainer.epochs == 2
    with pytest.raises(ConfigError, match="trainer.epochs"):
        load_space("deeplab", overrides={"trainer.epochs": 0})


def test_resolve_applies_sampled_params():
    space = load_space("deeplab")
    assert {"model.encoder", "optimizer.lr", "loss.weights.ce", "loss.weights.dice"} <= set(space.distributions)
    cfg = space.resolve({"model.encoder": "resnet50", "optimizer.lr": 3.3e-4, "loss.weights.dice": 0.25})
    assert cfg.model.encoder == "resnet50"
    assert cfg.optimizer.lr == 3.3e-4
    assert cfg.loss.weights == {"ce": 1.0, "dice": 0.25, "focal": 0.0, "lovasz": 0.0}
    # unsampled keys keep their defaults; the space itself is not modified
    assert cfg.optimizer.weight_decay == space.defaults.optimizer.weight_decay
    assert space.defaults.model.encoder == "resnet34"
    with pytest.raises(ConfigError, match="optimizer.momentum: not a searched key"):
        space.resolve({"optimizer.momentum": 0.5})
    with pytest.raises(ConfigError, match="optimizer.lr"):
        space.resolve({"optimizer.lr": -1.0})


def test_config_round_trips_through_a_dict():
    cfg = load_space("deeplab", smoke=True).defaults
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="<config>: model.arch"):
        config_from_dict(dict(cfg.to_dict(), model={"arch": "Nope"}))


def test_cli_bad_config_prints_one_error_line(tmp_path, capsys):
    # in-process (test_data.py runs the script as a subprocess): the same run_cli path, 5 s cheaper
    from training.cli import run_cli
    from training.train import main

    path = write(tmp_path, "optimizer: {lr: -1}\n", "bad.yaml")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: main(["--space", str(path), "--smoke", "--out", str(out)]))
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert str(path) in lines[0] and "optimizer.lr" in lines[0]
    assert not out.exists()


IMPORTED_BY_CONFIG = r"""
import json, sys
import training.config
imported = set(sys.modules)
training.config.load_space("deeplab")
print(json.dumps({"import": sorted(imported), "validate": sorted(sys.modules)}))
"""


def test_config_does_not_import_the_models():
    """config validates names against modeling/registry.py alone: no torch to import it, no models to validate."""
    proc = subprocess.run([PYTHON, "-c", IMPORTED_BY_CONFIG], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    heavy = ("torch", "segmentation_models_pytorch", "timm", "training.modeling.models", "training.modeling.losses")
    assert "training.modeling.registry" in modules["import"]
    assert not [m for m in modules["import"] if m.split(".")[0] in heavy or m in heavy]
    assert not [m for m in modules["validate"] if m.startswith(("training.modeling.models", "training.modeling.losses"))]
