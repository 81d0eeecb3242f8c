"""One config schema for single runs, Tune trials and k-fold.

A config file is a full training config in YAML. Any value may instead be a
*distribution* with a `default`, e.g. ``lr: {loguniform: [1.0e-5, 1.0e-3], default: 1.0e-4}``.
A single run uses the defaults; the search samples the distributions; k-fold
retrains sampled configs. Everything is validated before any work starts, and
errors name the file and the dotted key path in one line.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from training.errors import ConfigError
from training.modeling.registry import LOSS_TERMS, arch_info, check_model_field

REPO_ROOT = Path(__file__).resolve().parent.parent
SEARCH_SPACES_DIR = REPO_ROOT / "search_spaces"
DISTRIBUTION_KINDS = ("choice", "uniform", "loguniform", "quniform", "randint")
# Blocks that describe how to search or how to shrink, not what to train.
NON_SEARCHABLE_BLOCKS = ("search", "smoke")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    root: str | None = None  # None: the embedded sample dataset
    train_json: str = "train.json"
    val_json: str | None = None  # extra annotated images used only for validation
    test_json: str = "test.json"
    classes: list[str] | None = None  # expected category names (Background excluded)
    image_size: int = Field(256, ge=32)
    score_size: int | None = Field(256, ge=8)  # competition scores at 256x256; None: image_size
    subset: int | None = Field(None, ge=4)  # keep only the first N train images (smoke runs)
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(2, ge=0)
    cache_dir: str | None = None  # mask (and image) cache; default ~/.cache/segtune or SEGTUNE_CACHE
    image_cache: bool = True  # keep decoded training images as .npy in the cache (disk: H*W*3 bytes each)
    # A pseudo-label set (training/data/pseudo.py, written by training/pseudo_label.py): extra images on the
    # training side of every fold; their unconfident pixels hold loss.ignore_index. Validation never sees them.
    pseudo_labels: str | None = None

    @field_validator("image_size")
    @classmethod
    def _divisible(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (encoders downsample 32x), got {v}")
        return v


class FoldsConfig(_Strict):
    n_splits: int = Field(5, ge=2)
    group_key: str | None = None  # image field whose equal values stay in one fold
    group_size: int | None = Field(None, ge=1)  # split each group into runs of N consecutive images
    seed: int = 42


class AugmentConfig(_Strict):
    train: list[dict[str, Any]] = Field(
        default_factory=lambda: [
            {"name": "HorizontalFlip", "p": 0.5},
            {"name": "RandomRotate90", "p": 0.5},
        ]
    )
    eval: list[dict[str, Any]] = Field(default_factory=list)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @model_validator(mode="after")
    def _build(self) -> "AugmentConfig":
        from training.data.transforms import check_pipeline

        check_pipeline(self.train, "augment.train", train=True)
        check_pipeline(self.eval, "augment.eval")
        return self


class ModelConfig(_Strict):
    arch: str = "DeepLabV3Plus"
    encoder: str = "resnet18"
    # null: from scratch; "imagenet": from the local cache; a path: a state dict file
    encoder_weights: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)  # extra kwargs for the smp class

    @field_validator("arch", "encoder", "encoder_weights")
    @classmethod
    def _known(cls, value: str | None, info: ValidationInfo) -> str | None:
        check_model_field(info.field_name, value)  # a field validator, so errors name model.<field>
        return value


class OHEMConfig(_Strict):
    """Online hard example mining for the cross-entropy terms: per batch, only the hardest pixels count."""

    keep: float = Field(0.25, gt=0, le=1)  # share of the batch's non-ignored pixels kept (highest cross entropy)
    min_kept: int = Field(0, ge=0)  # keep at least this many pixels (all of them when fewer)


class LossConfig(_Strict):
    weights: dict[str, float] = Field(default_factory=lambda: {"ce": 1.0})
    ignore_index: int | None = None
    focal_gamma: float = Field(2.0, ge=0)
    smooth_factor: float = Field(0.1, ge=0, lt=1)  # soft_ce label smoothing
    # per-class weights of ce, soft_ce and focal (Background first); auto: median-frequency
    # balancing from the pixel counts of the fold's training side
    class_weights: Literal["auto"] | list[float] | None = None
    ohem: OHEMConfig | None = None  # null: every pixel counts in ce / soft_ce

    @field_validator("class_weights")
    @classmethod
    def _weights(cls, weights: Any) -> Any:
        if isinstance(weights, list):
            bad = [w for w in weights if w < 0 or not math.isfinite(w)]
            if bad:
                raise ValueError(f"class weights must be finite numbers >= 0, got {bad[0]}")
            if not any(w > 0 for w in weights):
                raise ValueError("at least one class weight must be > 0")
        return weights

    @field_validator("weights")
    @classmethod
    def _known(cls, weights: dict[str, float]) -> dict[str, float]:
        for name, weight in weights.items():
            if name not in LOSS_TERMS:
                raise ValueError(f"unknown loss term {name!r}; known: {sorted(LOSS_TERMS)}")
            if weight < 0 or not math.isfinite(weight):
                raise ValueError(f"weight of {name!r} must be a finite number >= 0, got {weight}")
        if sum(weights.values()) <= 0:
            raise ValueError("at least one loss term needs a weight > 0")
        return weights


class OptimizerConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    encoder_lr_mult: float = Field(1.0, gt=0)  # encoder lr = lr * this
    # layer-wise decay: the last encoder stage gets lr * encoder_lr_mult, each earlier stage this much less; 1: off
    layer_decay: float = Field(1.0, gt=0, le=1)


class SchedulerConfig(_Strict):
    name: Literal["cosine", "onecycle", "poly", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)  # cosine and poly: linear warmup
    power: float = Field(0.9, gt=0)  # poly
    min_lr_ratio: float = Field(0.01, ge=0, le=1)  # cosine floor as a fraction of lr
    pct_start: float = Field(0.3, gt=0, lt=1)  # onecycle


class EMAConfig(_Strict):
    """Exponential moving average of the weights: validation, best.pt and every later stage use the average."""

    decay: float = Field(0.999, gt=0, lt=1)  # per optimizer step
    warmup: int = Field(0, ge=0)  # epochs during which the average just follows the weights (early weights are poor)


class TrainerConfig(_Strict):
    epochs: int = Field(20, ge=1)
    amp: Literal["auto", "fp16", "bf16", "off"] = "auto"  # auto: fp16 on CUDA, off on CPU
    channels_last: bool = False  # off by default: slows grouped-conv encoders
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    overlays: int = Field(4, ge=0)  # prediction overlays saved with the best checkpoint
    ema: EMAConfig | None = None  # null: off
    # Start from trained weights instead of encoder_weights: a best.pt, or a directory holding fold<k>/best.pt
    # per fold (a k-fold config's directory: the pseudo-label rounds' warm start). Optimizer and schedule start fresh.
    init_from: str | None = None

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_switch(cls, value: Any) -> Any:
        """YAML 1.1 reads unquoted off/on/no/yes as booleans: take them as the switch they mean."""
        if isinstance(value, bool):
            return "auto" if value else "off"
        return value


class ASHAConfig(_Strict):
    name: Literal["asha", "fifo"] = "asha"
    max_t: int = Field(20, ge=1)
    grace_period: int = Field(2, ge=1)
    reduction_factor: float = Field(3.0, gt=1)


class ResourcesConfig(_Strict):
    cpu: float = Field(2.0, gt=0)
    gpu: float = Field(0.0, ge=0)  # fractional: several small trials share one GPU


class SearchConfig(_Strict):
    metric: str = "val_miou"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(20, ge=1)
    max_concurrent: int = Field(4, ge=1)
    algorithm: Literal["optuna", "random"] = "optuna"
    n_startup_trials: int = Field(5, ge=1)  # random trials before TPE takes over
    scheduler: ASHAConfig = Field(default_factory=ASHAConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    time_budget_s: float | None = Field(None, gt=0)
    # Seconds (training + validation) one trial may cost: a trial whose first epoch projects past it is stopped (tune/cost.py).
    max_trial_cost: float | None = Field(None, gt=0)
    seed: int = 0
    fold: int = Field(0, ge=0)
    max_failures: int = Field(2, ge=0)  # retries of a failed trial from its last checkpoint
    top_k: int = Field(3, ge=1)  # configs written to best_configs.yaml
    # how those are chosen (tune/diversity.py): individual = best val mIoU each; diverse = greedy
    # forward selection on the fold ensemble's mIoU; auto = whichever ensemble scores higher
    top_k_method: Literal["auto", "individual", "diverse"] = "auto"


class Config(_Strict):
    name: str = "experiment"
    data: DataConfig = Field(default_factory=DataConfig)
    folds: FoldsConfig = Field(default_factory=FoldsConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.search.fold >= self.folds.n_splits:
            raise ValueError(f"search.fold={self.search.fold} but folds.n_splits={self.folds.n_splits}")
        arch = arch_info(self.model.arch)
        if self.data.image_size < arch.min_size:
            raise ValueError(f"data.image_size={self.data.image_size} but model.arch={self.model.arch} needs at least {arch.min_size}")
        if self.data.batch_size < arch.min_batch:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} but model.arch={self.model.arch} needs at least {arch.min_batch} "
                "(batch norm after its global pooling cannot train on one image)"
            )
        from training.modeling.encoders import arch_encoder_error  # torch, timm, smp: only once names are known

        problem = arch_encoder_error(arch, self.model.encoder, self.model.params)
        if problem:
            raise ConfigError(problem)  # not ValueError: the line names its own keys
        if self.data.pseudo_labels and self.loss.ignore_index is None:
            raise ValueError("data.pseudo_labels needs loss.ignore_index: the label of the pixels the loss ignores (unconfident ones)")
        if self.data.classes is not None:
            from training.data.coco import BACKGROUND

            names = list(self.data.classes)
            check_against_classes(self, names if names[:1] == [BACKGROUND] else [BACKGROUND, *names])
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def check_against_classes(cfg: Config, classes: list[str]) -> None:
    """The checks that need the dataset's class names (`classes`: Background first), as one ConfigError line."""
    from training.data.copy_paste import check_classes

    check_classes(cfg.augment.train, "augment.train", classes)
    weights = cfg.loss.class_weights
    if isinstance(weights, list) and len(weights) != len(classes):
        raise ConfigError(f"loss.class_weights: {len(weights)} weights for {len(classes)} classes (Background first: {classes})")


# Applied over a config by --smoke, before the file's own `smoke:` block: small enough
# for 2 CPU cores in minutes. Pretrained weights are off because a fresh machine has none.
SMOKE_PRESET: dict[str, Any] = {
    "data": {"image_size": 64, "score_size": 64, "subset": 48, "batch_size": 8, "num_workers": 0},
    "model": {"encoder_weights": None},
    "trainer": {"epochs": 4, "amp": "off", "overlays": 2},
    "search": {
        "num_samples": 6,
        "max_concurrent": 2,
        "n_startup_trials": 3,
        "scheduler": {"name": "asha", "max_t": 4, "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1, "gpu": 0},
        "max_failures": 2,
        "top_k": 2,
    },
}


@dataclass(frozen=True)
class Distribution:
    """A searched value: its kind, arguments and the default a single run uses."""

    path: str
    kind: str
    args: tuple[Any, ...]
    default: Any

    def values_to_check(self) -> list[Any]:
        """Values that must each form a valid config (every choice; bounds otherwise)."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]


def is_distribution(node: Any) -> bool:
    return isinstance(node, dict) and any(k in node for k in DISTRIBUTION_KINDS)


def _parse_distribution(path: str, node: dict[str, Any], source: str) -> Distribution:
    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {path}: {msg}")

    kinds = [k for k in node if k in DISTRIBUTION_KINDS]
    extra = [k for k in node if k not in DISTRIBUTION_KINDS and k != "default"]
    if len(kinds) != 1 or extra:
        return_keys = ", ".join(map(str, node))
        raise fail(f"a distribution takes one of {list(DISTRIBUTION_KINDS)} plus 'default', got keys [{return_keys}]")
    kind = kinds[0]
    args = node[kind]
    if "default" not in node:
        raise fail(f"{kind} distribution needs a 'default' (the value a single run uses)")
    default = node["default"]
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise fail("choice takes a non-empty list")
        if default not in args:
            raise fail(f"default {default!r} is not one of the choices {args}")
        return Distribution(path, kind, tuple(args), default)
    want = 3 if kind == "quniform" else 2
    if not isinstance(args, list) or len(args) != want or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise fail(f"{kind} takes a list of {want} numbers, got {args!r}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise fail(f"{kind} lower bound {lo} must be below upper bound {hi}")
    if kind == "loguniform" and lo <= 0:
        raise fail(f"loguniform bounds must be > 0, got {lo}")
    if kind == "quniform" and args[2] <= 0:
        raise fail(f"quniform step must be > 0, got {args[2]}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise fail(f"randint takes integer bounds [low, high), got {args}")
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        raise fail(f"default must be a number, got {default!r}")
    upper_ok = default < hi if kind == "randint" else default <= hi
    if not (lo <= default and upper_ok):
        raise fail(f"default {default} is outside [{lo}, {hi}{')' if kind == 'randint' else ']'}")
    return Distribution(path, kind, tuple(args), default)


def _collect(node: Any, prefix: str, source: str, out: dict[str, Distribution]) -> Any:
    """Return `node` with distributions replaced by their defaults, recording them in `out`."""
    if is_distribution(node):
        dist = _parse_distribution(prefix, node, source)
        out[prefix] = dist
        return dist.default
    if isinstance(node, dict):
        result = {}
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if not prefix and key in NON_SEARCHABLE_BLOCKS:
                result[key] = value
            else:
                result[key] = _collect(value, path, source, out)
        return result
    if isinstance(node, list):  # e.g. augment.train.2.p: a parameter of one pipeline entry
        return [_collect(value, f"{prefix}.{i}", source, out) for i, value in enumerate(node)]
    return node


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `override` into a copy of `base`; a distribution or scalar replaces whole."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(value, dict) and isinstance(current, dict) and not is_distribution(value) and not is_distribution(current):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `tree[a][b][c] = value` for `dotted == "a.b.c"`, creating dicts on the way; a number indexes a list."""
    keys = dotted.split(".")
    for depth, key in enumerate(keys):
        if isinstance(tree, list):
            if not (key.isdigit() and int(key) < len(tree)):
                raise ConfigError(f"{'.'.join(keys[:depth])}: has no item {key!r} (a list of {len(tree)})")
            key = int(key)
        elif not isinstance(tree, dict):
            raise ConfigError(f"{'.'.join(keys[:depth])}: is a value, not a mapping with {key!r}")
        if depth == len(keys) - 1:
            tree[key] = value
        elif isinstance(tree, dict):
            tree = tree.setdefault(key, {})
        else:
            tree = tree[key]


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif isinstance(first.get("input"), bool) and first["type"] in ("literal_error", "string_type"):
        quoted = "'on'" if first["input"] else "'off'"
        msg = f"{msg} (got {first['input']!r}: YAML reads unquoted on/off/yes/no as booleans; quote the value, e.g. {quoted})"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    more = len(err.errors()) - 1
    suffix = f" (+{more} more)" if more else ""
    return f"{source}: {path}: {msg}{suffix}"


def validate_config(tree: dict[str, Any], source: str) -> Config:
    """Validate a plain config dict, raising ConfigError with a one-line key path."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    except ConfigError as err:  # raised inside a validator (augment pipelines): add the file
        raise ConfigError(f"{source}: {err}") from None


class SearchSpace:
    """A parsed config file: its defaults, its distributions and a way to resolve samples."""

    def __init__(self, raw: dict[str, Any], source: str, name: str):
        self.source = source
        self.name = name
        self.main: SearchSpace | None = None  # a --smoke space: the file without its smoke overrides
        self.distributions: dict[str, Distribution] = {}
        self.template = _collect(raw, "", source, self.distributions)
        self.template.setdefault("name", name)
        self.defaults = validate_config(self.template, source)
        for dist in self.distributions.values():
            for value in dist.values_to_check():
                tree = copy.deepcopy(self.template)
                set_path(tree, dist.path, value)
                validate_config(tree, f"{source}: {dist.path}={value!r}")

    def resolve(self, params: dict[str, Any]) -> Config:
        """The full config for sampled `params` ({dotted path: value}); unknown paths are errors."""
        tree = copy.deepcopy(self.template)
        for path, value in params.items():
            if path not in self.distributions:
                raise ConfigError(f"{self.source}: {path}: not a searched key of this space")
            set_path(tree, path, value)
        return validate_config(tree, self.source)


def resolve_space_path(name_or_path: str | Path) -> Path:
    """A bare name (`deeplab`, `deeplab.yaml`) resolves in search_spaces/; anything else is a path."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    stem = candidate.name if candidate.suffix in (".yaml", ".yml") else f"{candidate.name}.yaml"
    in_repo = SEARCH_SPACES_DIR / stem
    if len(candidate.parts) == 1 and in_repo.is_file():
        return in_repo
    known = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))
    raise ConfigError(f"{name_or_path}: no such config file (bare names resolve in search_spaces/: {known})")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(raw).__name__}")
    return raw


def _space_with_overrides(raw: dict[str, Any], path: Path, overrides: dict[str, Any] | None) -> SearchSpace:
    """The space of `raw` (left unchanged) with the caller's dotted-key overrides set."""
    tree = copy.deepcopy(raw)
    for dotted, value in (overrides or {}).items():
        set_path(tree, dotted, value)
    return SearchSpace(tree, str(path), name=tree.get("name") or path.stem)


def load_space(name_or_path: str | Path, smoke: bool = False, overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Read, merge (smoke preset, the file's `smoke:` block, CLI overrides) and validate a config file.

    `overrides` maps dotted keys to fixed values (e.g. {"data.root": "/data"}); it wins over everything.
    With `smoke`, the file is first validated without the smoke overrides (kept as `space.main`),
    so a smoke run cannot pass on a config the real run would refuse.
    """
    path = resolve_space_path(name_or_path)
    raw = read_yaml(path)
    smoke_block = raw.pop("smoke", None) or {}
    if not isinstance(smoke_block, dict):
        raise ConfigError(f"{path}: smoke: must be a mapping of config overrides")
    if not smoke:
        return _space_with_overrides(raw, path, overrides)
    try:
        main = _space_with_overrides(raw, path, overrides)
    except ConfigError as err:
        raise ConfigError(f"{err} (main config; checked before the --smoke overrides)") from None
    space = _space_with_overrides(deep_merge(deep_merge(raw, SMOKE_PRESET), smoke_block), path, overrides)
    space.main = main
    return space


def config_from_dict(tree: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a full (already resolved) config dict, e.g. one read back from best_configs.yaml."""
    return validate_config(tree, source)
