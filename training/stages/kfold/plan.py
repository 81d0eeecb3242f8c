"""What the k-fold stage will run: the search's configs with this run's overrides, checked before any work.

Also what a resumed run must agree with: plan.json in the k-fold directory records the
configs and epochs of the first run (and its MLflow stage id); a different plan is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from training.config import SMOKE_PRESET, Config, config_from_dict, deep_merge
from training.errors import ConfigError, DataError
from training.handoff import BEST_CONFIGS, BestConfigs
from training.infra import locks
from training.infra.fs import read_json, results_root, write_json
from training.infra.lineage import new_stage_id

KFOLD_DIR = "kfold"
PLAN = "plan.json"
MAX_TOP_K = 5  # 2^k - 1 subset confusion matrices per (TTA candidate, vote), k over all searches
SMOKE_EPOCH_CAP = 4  # the smoke search's max_t: retrain as long as the search trained
SMOKE_TTA = "flip"
DEFAULT_TTA = "flip,scale"
# Config keys that must agree across the ensembled configs: they decide which images are
# scored, at which size, against which folds.
SHARED_KEYS = ("data.root", "data.train_json", "data.test_json", "data.classes", "data.subset", "data.score_size", "folds")
SEARCH_STATE = "search_state.json"  # a search's own state file: its presence marks an experiment directory

Log = Callable[[str], None]


AUTO = "auto"
WEIGHTS = ("equal", "greedy")
POSTPROCESS = ("none", "min_area")


@dataclass
class RetrainConfig:
    """One config a later stage retrains on every fold (one of the k-fold's selected ones)."""

    experiment: str  # the search it came from (BestConfigs.experiment)
    rank: int
    epochs: int
    init_from: str | None = None  # a directory with fold<k>/best.pt: each fold starts from those weights


@dataclass
class Retrain:
    """A later stage's own k-fold (a pseudo-label round): exactly these configs, changed so, written there, linked to that."""

    configs: list[RetrainConfig]
    out_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config keys set on every config (data.pseudo_labels, ...)
    role: str = "pseudo_round"
    run_name: str = "pseudo round"
    upstream_run_id: str | None = None  # the MLflow parent run this one follows (the k-fold's, the previous round's)
    parent_tags: dict[str, Any] = field(default_factory=dict)
    parent_metrics: dict[str, float] = field(default_factory=dict)

    def entry(self, experiment: str, rank: int) -> RetrainConfig | None:
        return next((c for c in self.configs if c.experiment == experiment and c.rank == rank), None)


@dataclass
class KFoldOptions:
    experiment: str | None = None  # one search (or the newest); `experiments` for several
    top_k: int = 1  # per search
    data: str | None = None
    epochs: int | None = None
    tta: str | None = None  # the views OOF may choose from; None: SMOKE_TTA with --smoke, else DEFAULT_TTA
    scales: tuple[float, ...] = (0.75, 1.0, 1.25)
    fixed_tta: bool = False  # use exactly the --tta views (OOF still scores the others and says if they beat it)
    vote: str = AUTO  # auto: chosen on OOF; soft/hard: forced
    weights: str = AUTO  # auto | equal | greedy
    postprocess: str = AUTO  # auto | none | min_area
    experiments: list[str] = field(default_factory=list)
    name: str | None = None  # the ensemble's name across several searches (default: their names joined by '+')
    smoke: bool = False
    resume: bool = False
    address: str | None = None
    mlflow_uri: str | None = None
    png: bool = False
    retrain: Retrain | None = None  # set by a later stage running the k-fold for itself


@dataclass
class Candidate:
    """One of the top-k configs (of one search) as the k-fold stage trains it."""

    index: int  # bit in subset masks
    rank: int
    trial_id: str
    epochs: int
    cfg: Config
    search_val_miou: float | None
    params: dict[str, Any]
    experiment: str = ""
    key: str = ""  # its directory and label: the rank, or "<experiment>-<rank>" across searches
    search_checkpoint: str | None = None  # the trial's best.pt, trained on the search fold
    search_fold: int | None = None


@dataclass
class FoldJob:
    cand: Candidate
    fold: int
    out_dir: Path
    run_key: str | None = None  # its MLflow child run
    state: str = "new"  # checkpoint.NEW | PARTIAL | DONE
    status: str = ""  # trained | resumed | skipped | logged
    result: dict[str, Any] = field(default_factory=dict)

    reused_from: str | None = None  # a run directory trained earlier for the same config, fold, data and epochs

    @property
    def key(self) -> tuple[str, int]:
        return self.cand.key, self.fold

    @property
    def name(self) -> str:
        return f"config {self.cand.key} fold {self.fold}"


def _explicit_best_configs(experiment: str, root: Path) -> Path:
    candidate = Path(experiment)
    for path in (candidate, candidate / BEST_CONFIGS, root / experiment / BEST_CONFIGS):
        if path.is_file() and path.suffix in (".yaml", ".yml"):
            return path
    if (root / experiment / SEARCH_STATE).is_file():
        holder = locks.read_holder(root / experiment)
        if holder and not locks.is_stale(holder):
            raise ConfigError(f"{root / experiment}: its search is still running ({locks.describe(holder)}); the k-fold starts from a finished search")
        raise ConfigError(f"{root / experiment / BEST_CONFIGS}: not found: the search did not finish; continue it with tune/search.py --resume --experiment {experiment}")
    raise ConfigError(f"{root / experiment / BEST_CONFIGS}: not found (run tune/search.py --experiment {experiment} first)")


def find_best_configs(experiment: str | None, log: Log, root: Path | None = None) -> Path:
    """best_configs.yaml of `experiment` (a name under the results root, a directory or the file).

    Without one: the newest finished search, said in a line; refused while a search is still
    running (that is the one a user who just started it means).
    """
    root = root or results_root()
    if experiment:
        return _explicit_best_configs(experiment, root)
    dirs = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    running = [(d, h) for d in dirs if (d / SEARCH_STATE).is_file() and (h := locks.read_holder(d)) and not locks.is_stale(h)]
    if running:
        d, holder = running[0]
        raise ConfigError(f"no --experiment given while the search {d.name!r} is still running ({locks.describe(holder)}); pass --experiment NAME")
    found = sorted((d / BEST_CONFIGS for d in dirs if (d / BEST_CONFIGS).is_file()), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"{root}: no experiment with a {BEST_CONFIGS} (run tune/search.py first, or pass --experiment)")
    log(f"k-fold: no --experiment given; using {found[-1].parent.name!r}, the newest finished search")
    return found[-1]


def _dotted(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def check_options(options: KFoldOptions, best: BestConfigs, path: Path, n_sources: int = 1) -> None:
    if options.retrain is not None:  # the configs are named, not the top k
        return
    if options.top_k < 1:
        raise ConfigError(f"--top-k: must be >= 1, got {options.top_k}")
    total = options.top_k * n_sources
    if total > MAX_TOP_K:
        raise ConfigError(
            f"--top-k: at most {MAX_TOP_K} configs over all searches, got {options.top_k} x {n_sources}: ensemble selection scores "
            f"all 2^k-1 subsets of the configs on every OOF batch ({2 ** total - 1} at k={total}, vs {2 ** MAX_TOP_K - 1} at "
            f"k={MAX_TOP_K}), and each config adds one training per fold"
        )
    for flag, value, allowed in (("--vote", options.vote, ("soft", "hard")), ("--weights", options.weights, WEIGHTS),
                                 ("--postprocess", options.postprocess, POSTPROCESS)):
        if value != AUTO and value not in allowed:
            raise ConfigError(f"{flag}: {value!r} is not one of {[AUTO, *allowed]}")
    if options.top_k > len(best.configs):
        raise ConfigError(f"--top-k {options.top_k}: {path} has only {len(best.configs)} config(s)")
    if options.epochs is not None and options.epochs < 1:
        raise ConfigError(f"--epochs: must be >= 1, got {options.epochs}")


def _stage_tree(cfg: Config, options: KFoldOptions, best: BestConfigs) -> dict[str, Any]:
    """A config as this run trains it: --smoke, --data (else the search's data root) applied."""
    tree = cfg.to_dict()
    if options.smoke:
        tree = deep_merge(tree, {k: SMOKE_PRESET[k] for k in ("data", "model", "trainer")})
        tree["data"]["subset"] = min(cfg.data.subset or SMOKE_PRESET["data"]["subset"], SMOKE_PRESET["data"]["subset"])
        tree["search"]["resources"] = dict(SMOKE_PRESET["search"]["resources"])
    if options.data:
        tree["data"]["root"] = str(Path(options.data).resolve())
    elif not tree["data"].get("root") and best.data_root:
        tree["data"]["root"] = best.data_root
    return tree


def build_candidates(best: BestConfigs, cfgs: list[Config], options: KFoldOptions, path: Path, first_index: int = 0,
                     n_sources: int = 1, previous: list[Candidate] = ()) -> list[Candidate]:
    """The top-k configs with the stage's overrides (--data, --smoke, --epochs) applied and validated.

    `previous`: the candidates of the searches before this one; all must share data and folds.
    """
    check_options(options, best, path, n_sources)
    ranked = sorted(range(len(best.configs)), key=lambda i: best.configs[i].rank)[: options.top_k]
    if options.retrain is not None:
        ranked = [i for i in sorted(range(len(best.configs)), key=lambda i: best.configs[i].rank)
                  if options.retrain.entry(best.experiment, best.configs[i].rank)]
    candidates = []
    for index, i in enumerate(ranked, start=first_index):
        entry = best.configs[i]
        tree = _stage_tree(cfgs[i], options, best)
        epochs = _epochs(entry, options, best.experiment)
        tree["trainer"]["epochs"] = epochs  # the schedule (cosine, poly, onecycle) spans exactly these epochs
        _retrain_overrides(tree, options.retrain, best.experiment, entry.rank)
        cfg = config_from_dict(tree, f"{path}: configs[{i}].config")
        key = str(entry.rank) if n_sources == 1 else f"{best.experiment}-{entry.rank}"
        candidates.append(Candidate(index, entry.rank, entry.trial_id, epochs, cfg, entry.best_val_miou, dict(entry.params),
                                    best.experiment, key, entry.checkpoint, best.fold))
    everyone = [*previous, *candidates]
    first = everyone[0].cfg.to_dict()
    for cand in everyone[1:]:
        other = cand.cfg.to_dict()
        for key in SHARED_KEYS:
            if _dotted(first, key) != _dotted(other, key):
                raise ConfigError(
                    f"{path}: configs[rank {cand.rank}].config.{key}: {_dotted(other, key)!r} differs from config "
                    f"{everyone[0].key}'s {_dotted(first, key)!r}; ensembled configs must share data and folds"
                )
    return candidates


def _epochs(entry, options: KFoldOptions, experiment: str) -> int:
    if options.epochs is not None:
        return options.epochs
    if options.retrain is not None:
        return options.retrain.entry(experiment, entry.rank).epochs
    return min(entry.epochs_trained, SMOKE_EPOCH_CAP) if options.smoke else entry.epochs_trained


def _retrain_overrides(tree: dict[str, Any], retrain: Retrain | None, experiment: str, rank: int) -> None:
    """A later stage's changes to one config: its overrides, and where each fold starts from."""
    from training.config import set_path

    if retrain is None:
        return
    for dotted, value in retrain.overrides.items():
        set_path(tree, dotted, value)
    init_from = retrain.entry(experiment, rank).init_from
    if init_from:
        tree["trainer"]["init_from"] = init_from


def check_plan(kfold_dir: Path, candidates: list[Candidate], resume: bool) -> str:
    """Refuse to overwrite a previous run without --resume, or to resume it with a different plan.

    Writes plan.json; returns the stage id (kept across resumes: it names the MLflow runs).
    """
    plan_path = kfold_dir / PLAN
    existing = read_json(plan_path, {}) or {}
    has_folds = any(kfold_dir.glob("*/fold*/best.pt")) or any(kfold_dir.glob("*/fold*/last.pt"))
    if (existing or has_folds) and not resume:
        raise ConfigError(f"{kfold_dir}: holds a previous k-fold run; pass --resume to continue it, or move it away to start over")
    ranks = dict(existing.get("ranks", {}))
    for cand in candidates:
        want = {"trial_id": cand.trial_id, "epochs": cand.epochs}
        have = ranks.get(cand.key)
        if have is not None and have != want:
            key = next(k for k in ("trial_id", "epochs") if have.get(k) != want[k])
            raise ConfigError(
                f"{plan_path}: ranks.{cand.key}.{key}: the run being resumed has {have.get(key)!r}, this one asks "
                f"{want[key]!r} (same --epochs/--smoke as before, or move {kfold_dir} away)"
            )
        ranks[cand.key] = want
    stage_id = existing.get("stage_id") or new_stage_id()
    kfold_dir.mkdir(parents=True, exist_ok=True)
    write_json(plan_path, {"ranks": ranks, "stage_id": stage_id})
    return stage_id


def check_same_folds(data, best: BestConfigs, path: Path) -> None:
    """Another search's fold manifest must assign every image to the same fold: OOF scores are then comparable."""
    from training.data.folds import load_manifest

    if not best.fold_manifest or not Path(best.fold_manifest).is_file():
        return  # same data and folds settings (checked on the configs) give the same folds
    if load_manifest(Path(best.fold_manifest)).fold_of != data.manifest.fold_of:
        raise ConfigError(f"{path}: fold_manifest {best.fold_manifest} splits the images differently from {data.manifest.path}; "
                          "searches ensembled together must share their folds")


# Config keys that do not change what a run trains: a checkpoint that differs only in these is the same run.
NOT_TRAINING = ("search", "data.num_workers", "data.cache_dir", "data.image_cache", "trainer.overlays")


def training_view(tree: dict[str, Any]) -> dict[str, Any]:
    import copy

    tree = copy.deepcopy(tree)
    for dotted in NOT_TRAINING:
        *parents, last = dotted.split(".")
        node = tree
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return tree


def reusable_run(src_dir: Path, cand: Candidate, fold: int) -> str | None:
    """Why `src_dir` cannot stand in for training (cand, fold), or None when it can: complete for the same epochs,
    the same config (data root, seed and schedule included) and fold."""
    from training.engine import checkpoint

    if checkpoint.status(src_dir, cand.epochs, finished_without_last=True) != checkpoint.DONE:
        return f"not trained for {cand.epochs} epochs"
    state = checkpoint.load(src_dir / checkpoint.BEST)
    if state.get("fold") != fold:
        return f"trained on fold {state.get('fold')}"
    if training_view(state["config"]) != training_view(cand.cfg.to_dict()):
        return "trained with another config"
    return None


def prepare_kfold_data(cfg: Config, best: BestConfigs, path: Path, log: Log):
    """PreparedData for the k-fold stage, with the search's own fold manifest (refusing other data)."""
    from training.data.dataset import prepare_data
    from training.data.folds import load_manifest

    data = prepare_data(cfg, log=log)
    if not best.fold_manifest:
        log(f"warning: {path} names no fold_manifest; using {data.manifest.path}")
        return data
    manifest_path = Path(best.fold_manifest)
    if not manifest_path.is_file():
        log(f"warning: fold manifest {manifest_path} from {path.name} is missing here; using {data.manifest.path} "
            "(same data and folds settings give the same folds)")
        return data
    manifest = load_manifest(manifest_path)
    manifest.check_matches(data.index, cfg.folds)  # DataError naming the manifest and the annotation file
    if manifest.fold_of != data.manifest.fold_of:
        raise DataError(f"{manifest_path}: its folds differ from {data.manifest.path} made for the same data; delete the stale one")
    data.manifest = manifest
    return data


def load_test_index(cfg: Config, classes: list[str], log: Log):
    from training.data.coco import load_coco
    from training.data.dataset import data_root

    index = load_coco(data_root(cfg), cfg.data.test_json, check_images=True, cache_root=cfg.data.cache_dir, log=log)
    if len(index.classes) > 1 and index.classes != classes:
        raise DataError(f"{index.ann_path}: categories {index.classes[1:]} differ from train's {classes[1:]}")
    if not index.images:
        raise DataError(f"{index.ann_path}: no images to predict")
    return index
