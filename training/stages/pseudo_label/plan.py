"""What the pseudo-label stage will run, checked before anything is written: the k-fold it starts from, the images to
label (none of them annotated, by content), the configs each round retrains, and what a resumed run must agree with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from training.errors import ConfigError, DataError
from training.handoff import KFOLD_RESULT, BestConfigs, KFoldResult
from training.infra import locks
from training.infra.fs import read_json, results_root

PSEUDO_DIR = "pseudo"
PLAN = "plan.json"
THRESHOLD, SMOKE_THRESHOLD = 0.9, 0.5  # smoke models (4 epochs at 64 px) rarely reach 0.9 anywhere
IGNORE = 255  # the label of unconfident pixels, unless every config already names its own loss.ignore_index

Log = Callable[[str], None]


@dataclass
class PseudoOptions:
    experiment: str | None = None  # the k-fold it starts from: results/<experiment>/kfold (default: the newest)
    rounds: int = 2
    threshold: float | None = None  # a pixel is labelled when the ensemble's top mean probability reaches this (None: 0.9, 0.5 with smoke)
    unlabelled: str | None = None  # a folder of extra images without annotations
    data: str | None = None
    epochs: int | None = None  # per fold; default: the epochs the k-fold trained each config
    min_delta: float = 0.001  # a round must raise OOF mIoU by this much to be kept (and to go on)
    warm_start: bool = False  # each fold starts from the previous round's checkpoint of that fold
    smoke: bool = False
    resume: bool = False
    address: str | None = None
    mlflow_uri: str | None = None


@dataclass
class ImageToLabel:
    path: Path
    sha256: str
    source: str  # "test" | "unlabelled"


@dataclass
class PseudoPlan:
    options: PseudoOptions
    kfold_path: Path  # kfold_result.yaml of round 0
    kfold: KFoldResult
    sources: list[Path]  # best_configs.yaml per search
    name: str
    out_dir: Path  # results/<name>/pseudo
    images: list[ImageToLabel]
    ignore_index: int
    data_root: str
    epochs: dict[tuple[str, int], int] = field(default_factory=dict)  # (experiment, rank) -> epochs per fold
    resources: tuple[float, float] = (1.0, 0.0)  # (cpu, gpu) a labelling task asks: the configs' search.resources
    stage_id: str = ""
    ray: Any = None  # the RaySession every round uses


def check_options(options: PseudoOptions) -> None:
    if options.threshold is None:
        options.threshold = SMOKE_THRESHOLD if options.smoke else THRESHOLD
    if options.rounds < 1:
        raise ConfigError(f"--rounds: must be >= 1, got {options.rounds}")
    if not 0 < options.threshold <= 1:
        raise ConfigError(f"--threshold: a probability in (0, 1], got {options.threshold}")
    if options.epochs is not None and options.epochs < 1:
        raise ConfigError(f"--epochs: must be >= 1, got {options.epochs}")
    if options.min_delta < 0:
        raise ConfigError(f"--min-delta: must be >= 0, got {options.min_delta}")


def find_kfold_result(experiment: str | None, log: Log, root: Path | None = None) -> Path:
    """kfold_result.yaml of `experiment` (a name under the results root, a k-fold directory or the file); default: the newest."""
    root = root or results_root()
    if experiment:
        given = Path(experiment)
        for path in (given, given / KFOLD_RESULT, given / "kfold" / KFOLD_RESULT, root / experiment / "kfold" / KFOLD_RESULT):
            if path.is_file() and path.name == KFOLD_RESULT:
                return path
        raise ConfigError(f"{root / experiment / 'kfold' / KFOLD_RESULT}: not found (run training/final_kfold.py --experiment {experiment} first)")
    found = sorted(root.glob(f"*/kfold/{KFOLD_RESULT}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise ConfigError(f"{root}: no finished k-fold (kfold/{KFOLD_RESULT}); run training/final_kfold.py first, or pass --experiment")
    log(f"pseudo-label: no --experiment given; using {found[-1].parent.parent.name!r}, the newest finished k-fold")
    return found[-1]


def retrained_epochs(kfold: KFoldResult, path: Path, epochs: int | None) -> dict[tuple[str, int], int]:
    """The selected configs, each with the epochs its folds trained in the k-fold (or --epochs)."""
    chosen: dict[tuple[str, int], int] = {}
    for m in kfold.ensemble.members:
        if epochs is None and m.epochs is None:
            raise ConfigError(f"{path}: ensemble.members: config {m.rank} of {m.experiment} does not say its epochs; pass --epochs")
        chosen.setdefault((m.experiment, m.rank), epochs or m.epochs)
    return chosen


def ignore_label(sources: list[Path], chosen: dict[tuple[str, int], int]) -> int:
    """The label unconfident pixels get: the configs' own loss.ignore_index when they all name the same one, else 255."""
    values = set()
    for path in sources:
        best, cfgs = BestConfigs.load(path)
        for entry, cfg in zip(best.configs, cfgs):
            if (best.experiment, entry.rank) in chosen:
                values.add(cfg.loss.ignore_index)
    if len(values - {None}) > 1:
        raise ConfigError(f"the selected configs ignore different labels ({sorted(values - {None})}); pseudo labels need one")
    explicit = values - {None}
    return explicit.pop() if explicit and None not in values else IGNORE


def check_plan_file(out_dir: Path, options: PseudoOptions, kfold_path: Path, stage_id: str) -> dict[str, Any]:
    """Refuse to overwrite an earlier run without --resume, or to resume it with other settings; the plan to write."""
    plan = {"kfold_result": str(kfold_path.resolve()), "threshold": options.threshold, "unlabelled": options.unlabelled,
            "epochs": options.epochs, "min_delta": options.min_delta, "warm_start": options.warm_start, "smoke": options.smoke,
            "data": options.data}
    existing = read_json(out_dir / PLAN, None)
    if existing is None:
        if any(out_dir.glob("round*")) and not options.resume:
            raise ConfigError(f"{out_dir}: holds an earlier pseudo-label run; pass --resume to continue it, or move it away to start over")
        return plan | {"stage_id": stage_id}
    if not options.resume:
        raise ConfigError(f"{out_dir}: holds an earlier pseudo-label run; pass --resume to continue it, or move it away to start over")
    for key, value in plan.items():
        if existing.get(key) != value:
            raise ConfigError(f"{out_dir / PLAN}: {key}: the run being resumed has {existing.get(key)!r}, this one asks {value!r} "
                              f"(same options as before, or move {out_dir} away)")
    return existing


def check_kfold_idle(kfold_path: Path) -> None:
    holder = locks.read_holder(kfold_path.parent)
    if holder and not locks.is_stale(holder):
        raise ConfigError(f"{kfold_path.parent}: its k-fold is running ({locks.describe(holder)}); start the pseudo-label stage when it has finished")


def duplicate_check(labelled: dict[str, Path], candidates: list[ImageToLabel], log: Log) -> list[ImageToLabel]:
    """Refuse an image that is annotated too (same bytes); an image listed twice is labelled once."""
    seen: dict[str, Path] = {}
    kept = []
    for image in candidates:
        if image.sha256 in labelled:
            what = "the test set" if image.source == "test" else "--unlabelled"
            raise DataError(f"{image.path}: in {what} but annotated as {labelled[image.sha256]} (same content, sha256 {image.sha256[:12]}); "
                            "an image cannot be both labelled and pseudo-labelled")
        if image.sha256 in seen:
            log(f"pseudo-label: {image.path} has the same content as {seen[image.sha256]}; labelled once")
            continue
        seen[image.sha256] = image.path
        kept.append(image)
    return kept


def selected_config(sources: list[Path], chosen: dict[tuple[str, int], int], root: str):
    """A selected config with the data root the rounds use (the k-fold's, or --data): the data settings all of them share."""
    from training.config import config_from_dict

    for path in sources:
        best, cfgs = BestConfigs.load(path)
        for entry, cfg in zip(best.configs, cfgs):
            if (best.experiment, entry.rank) in chosen:
                tree = cfg.to_dict()
                tree["data"]["root"] = root
                return config_from_dict(tree, f"{path}: configs[rank {entry.rank}].config")
    raise ConfigError(f"{sources[0]}: none of the k-fold's selected configs is in its sources")


def images_to_label(cfg, unlabelled: str | None, log: Log) -> list[ImageToLabel]:
    """The test images and the --unlabelled folder's, none of them annotated (by content: train_json and val_json)."""
    from training.data.coco import file_sha256, load_coco
    from training.data.dataset import data_root
    from training.delivery.images import ImageSource

    root = data_root(cfg)
    labelled: dict[str, Path] = {}
    for ann in (cfg.data.train_json, cfg.data.val_json):
        if ann:
            index = load_coco(root, ann, check_images=False, cache_root=cfg.data.cache_dir, log=log)
            labelled |= {file_sha256(index.image_path(i)): index.image_path(i) for i in index.image_ids}
    test = load_coco(root, cfg.data.test_json, check_images=True, cache_root=cfg.data.cache_dir, log=log)
    found = [ImageToLabel(test.image_path(i), file_sha256(test.image_path(i)), "test") for i in test.image_ids]
    if unlabelled:
        source = ImageSource.open(unlabelled)
        found += [ImageToLabel(source.path(i), file_sha256(source.path(i)), "unlabelled") for i in range(len(source))]
    if not found:
        raise DataError(f"{test.ann_path}: no test images, and no --unlabelled folder: nothing to pseudo-label")
    return duplicate_check(labelled, found, log)


def build_plan(options: PseudoOptions, log: Log) -> PseudoPlan:
    """Every input checked (options, the k-fold's hand-off, its sources, the images) before anything is written."""
    check_options(options)
    kfold_path = find_kfold_result(options.experiment, log)
    check_kfold_idle(kfold_path)
    kfold = KFoldResult.read(kfold_path)
    sources = [Path(s) for s in kfold.sources]
    missing = [s for s in sources if not s.is_file()]
    if missing:
        raise ConfigError(f"{kfold_path}: sources: {missing[0]} not found (the search's best_configs.yaml the k-fold retrained)")
    chosen = retrained_epochs(kfold, kfold_path, options.epochs)
    cfg = selected_config(sources, chosen, str(Path(options.data).resolve()) if options.data else kfold.data_root)
    images = images_to_label(cfg, options.unlabelled, log)
    out_dir = kfold_path.parent.parent / PSEUDO_DIR
    resources = (1.0, 0.0) if options.smoke else (cfg.search.resources.cpu, cfg.search.resources.gpu)
    return PseudoPlan(options, kfold_path, kfold, sources, kfold.experiment, out_dir, images, ignore_label(sources, chosen),
                      cfg.data.root, chosen, resources)
