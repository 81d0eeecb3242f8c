"""The k-fold stage: retrain the search's best configs on every fold, ensemble, submit.

Input: `results/<experiment>/best_configs.yaml` written by tune/search.py. Output, under
`results/<experiment>/kfold/`:

    <rank>/fold<k>/        trainer out_dir per (config, fold): last.pt, best.pt, metrics.json
    oof/fold<k>.npz        confusion matrices of every (TTA mode, vote, subset of configs)
    oof_masks/<id>.png     out-of-fold masks of the ensemble of all candidate configs
    submission.csv         competition CSV (+ test_masks/ with --png)
    summary.json           every score, the selection, timings
    plan.json              what was asked (resume refuses to mix different plans)

Every (config, fold) pair is one Ray task with the config's `search.resources`; the
PreparedData goes through the object store once. Only this driver writes MLflow: tasks push
each epoch's metrics into a Ray queue and the driver logs them live to the pair's child run.
Out-of-fold scoring runs one Ray task per fold; the submission is one streaming Ray task
whose masks the driver writes row by row, so the CSV needs no storage shared with workers
(checkpoints do: on a multi-node cluster put SEGTUNE_RESULTS on shared storage).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import ray

from training.config import REPO_ROOT, SMOKE_PRESET, Config, config_from_dict, deep_merge, read_yaml
from training.errors import ConfigError, DataError, SegtuneError

BEST_CONFIGS = "best_configs.yaml"
KFOLD_DIR = "kfold"
SUMMARY = "summary.json"
PLAN = "plan.json"
SUBMISSION_META = "submission.json"
MAX_TOP_K = 5  # 2^k - 1 subset confusion matrices per (mode, vote)
SMOKE_EPOCH_CAP = 4  # the smoke search's max_t: retrain as long as the search trained
SMOKE_TTA = "flip"
DEFAULT_TTA = "flip,scale"
# Config keys that must agree across the ensembled configs: they decide which images are
# scored, at which size, against which folds.
SHARED_KEYS = ("data.root", "data.train_json", "data.test_json", "data.classes", "data.subset", "data.score_size", "folds")

Log = Callable[[str], None]


def results_root() -> Path:
    return Path(os.environ.get("SEGTUNE_RESULTS") or REPO_ROOT / "results")


# ---- best_configs.yaml -------------------------------------------------------------------


@dataclass
class RankedConfig:
    rank: int
    trial_id: str
    best_val_miou: float | None
    epochs_trained: int
    params: dict[str, Any]
    config: Config
    raw: dict[str, Any]  # the config as a plain dict (for overrides)


@dataclass
class BestConfigs:
    path: Path
    experiment: str
    data_root: str | None
    tracking_uri: str | None
    experiment_id: str | None
    search_parent_run_id: str | None
    fold_manifest: str | None
    smoke: bool
    configs: list[RankedConfig]

    @property
    def dir(self) -> Path:
        return self.path.parent


def find_best_configs(experiment: str | None = None, root: Path | None = None) -> Path:
    """best_configs.yaml of `experiment` (a name under the results root, a directory or the file);
    by default the most recently written one under the results root."""
    root = root or results_root()
    if experiment:
        candidate = Path(experiment)
        for path in (candidate, candidate / BEST_CONFIGS, root / experiment / BEST_CONFIGS):
            if path.is_file() and path.suffix in (".yaml", ".yml"):
                return path
        raise ConfigError(f"{root / experiment / BEST_CONFIGS}: not found (run tune/search.py --experiment {experiment} first)")
    found = sorted(root.glob(f"*/{BEST_CONFIGS}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise ConfigError(f"{root}: no experiment with a {BEST_CONFIGS} (run tune/search.py first, or pass --experiment)")
    return found[-1]


def load_best_configs(path: Path) -> BestConfigs:
    """Parse and validate best_configs.yaml; every problem names the file and key."""
    raw = read_yaml(path)

    def need(tree: dict, key: str, where: str, kind=None):
        if key not in tree or tree[key] is None and kind is not None:
            raise ConfigError(f"{path}: {where}{key}: missing")
        value = tree[key]
        if kind is not None and not isinstance(value, kind):
            raise ConfigError(f"{path}: {where}{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    entries = need(raw, "configs", "", list)
    if not entries:
        raise ConfigError(f"{path}: configs: empty (the search finished no trial?)")
    configs = []
    for i, entry in enumerate(entries):
        where = f"configs[{i}]."
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: configs[{i}]: expected a mapping, got {entry!r}")
        tree = need(entry, "config", where, dict)
        cfg = config_from_dict(tree, f"{path}: configs[{i}].config")
        epochs = need(entry, "epochs_trained", where, int)
        if epochs < 1:
            raise ConfigError(f"{path}: {where}epochs_trained: must be >= 1, got {epochs}")
        rank = entry.get("rank", i + 1)
        if not isinstance(rank, int):
            raise ConfigError(f"{path}: {where}rank: expected int, got {rank!r}")
        score = entry.get("best_val_miou")
        configs.append(RankedConfig(rank, str(entry.get("trial_id") or f"rank{rank}"), score, epochs, dict(entry.get("params") or {}), cfg, tree))
    ranks = [c.rank for c in configs]
    if len(set(ranks)) != len(ranks):
        raise ConfigError(f"{path}: configs[*].rank: duplicate ranks {ranks}")
    return BestConfigs(
        path=path.resolve(),
        experiment=str(raw.get("experiment") or path.parent.name),
        data_root=raw.get("data_root"),
        tracking_uri=raw.get("mlflow_tracking_uri"),
        experiment_id=None if raw.get("mlflow_experiment_id") is None else str(raw["mlflow_experiment_id"]),
        search_parent_run_id=raw.get("search_parent_run_id"),
        fold_manifest=raw.get("fold_manifest"),
        smoke=bool(raw.get("smoke", False)),
        configs=configs,
    )


# ---- options and plan --------------------------------------------------------------------


@dataclass
class KFoldOptions:
    experiment: str | None = None
    top_k: int = 1
    data: str | None = None
    epochs: int | None = None
    tta: str | None = None  # None: SMOKE_TTA with --smoke, else DEFAULT_TTA
    scales: tuple[float, ...] = (0.75, 1.0, 1.25)
    vote: str = "soft"
    smoke: bool = False
    resume: bool = False
    address: str | None = None
    mlflow_uri: str | None = None
    png: bool = False


@dataclass
class Candidate:
    """One of the top-k configs as the k-fold stage trains it."""

    index: int  # bit in subset masks
    rank: int
    trial_id: str
    epochs: int
    cfg: Config
    search_val_miou: float | None
    params: dict[str, Any]


@dataclass
class FoldJob:
    cand: Candidate
    fold: int
    out_dir: Path
    run_id: str | None = None
    state: str = "new"  # new | partial | done
    status: str = ""  # trained | resumed | skipped | logged
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return self.cand.rank, self.fold

    @property
    def name(self) -> str:
        return f"config {self.cand.rank} fold {self.fold}"


def _dotted(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def build_candidates(best: BestConfigs, options: KFoldOptions) -> list[Candidate]:
    """The top-k configs with the stage's overrides (--data, --smoke, epochs) applied and validated."""
    if options.top_k < 1:
        raise ConfigError(f"--top-k: must be >= 1, got {options.top_k}")
    if options.top_k > MAX_TOP_K:
        raise ConfigError(
            f"--top-k: at most {MAX_TOP_K}, got {options.top_k}: ensemble selection scores all 2^k-1 subsets of the configs "
            f"on every OOF batch ({2 ** options.top_k - 1} at k={options.top_k}, vs {2 ** MAX_TOP_K - 1} at k={MAX_TOP_K}), "
            "and each config adds one training per fold"
        )
    if options.top_k > len(best.configs):
        raise ConfigError(f"--top-k {options.top_k}: {best.path} has only {len(best.configs)} config(s)")
    if options.epochs is not None and options.epochs < 1:
        raise ConfigError(f"--epochs: must be >= 1, got {options.epochs}")
    candidates = []
    for i, entry in enumerate(sorted(best.configs, key=lambda c: c.rank)[: options.top_k]):
        tree = entry.config.to_dict()
        if options.smoke:
            preset = {k: SMOKE_PRESET[k] for k in ("data", "model", "trainer")}
            tree = deep_merge(tree, preset)
            tree["data"]["subset"] = min(entry.config.data.subset or SMOKE_PRESET["data"]["subset"], SMOKE_PRESET["data"]["subset"])
            tree["search"]["resources"] = dict(SMOKE_PRESET["search"]["resources"])
        if options.data:
            tree["data"]["root"] = str(Path(options.data).resolve())
        elif not tree["data"].get("root") and best.data_root:
            tree["data"]["root"] = best.data_root
        if options.epochs is not None:
            epochs = options.epochs
        else:
            epochs = min(entry.epochs_trained, SMOKE_EPOCH_CAP) if options.smoke else entry.epochs_trained
        # The schedule (cosine, poly, onecycle) spans exactly the epochs trained here.
        tree["trainer"]["epochs"] = epochs
        cfg = config_from_dict(tree, f"{best.path}: configs[{best.configs.index(entry)}].config")
        candidates.append(Candidate(i, entry.rank, entry.trial_id, epochs, cfg, entry.best_val_miou, entry.params))
    first = candidates[0].cfg.to_dict()
    for cand in candidates[1:]:
        other = cand.cfg.to_dict()
        for key in SHARED_KEYS:
            if _dotted(first, key) != _dotted(other, key):
                raise ConfigError(
                    f"{best.path}: configs[rank {cand.rank}].config.{key}: {_dotted(other, key)!r} differs from rank "
                    f"{candidates[0].rank}'s {_dotted(first, key)!r}; ensembled configs must share data and folds"
                )
    return candidates


def check_plan(kfold_dir: Path, candidates: Sequence[Candidate], resume: bool) -> None:
    """Refuse to overwrite a previous run without --resume, or to resume it with a different plan."""
    plan_path = kfold_dir / PLAN
    existing = {}
    if plan_path.is_file():
        try:
            existing = json.loads(plan_path.read_text())
        except json.JSONDecodeError:
            existing = {}
    has_folds = any(kfold_dir.glob("*/fold*/last.pt"))
    if (existing or has_folds) and not resume:
        raise ConfigError(f"{kfold_dir}: holds a previous k-fold run; pass --resume to continue it, or move it away to start over")
    ranks = dict(existing.get("ranks", {}))
    for cand in candidates:
        want = {"trial_id": cand.trial_id, "epochs": cand.epochs}
        have = ranks.get(str(cand.rank))
        if have is not None and have != want:
            for key in ("trial_id", "epochs"):
                if have.get(key) != want[key]:
                    raise ConfigError(
                        f"{plan_path}: ranks.{cand.rank}.{key}: the run being resumed has {have.get(key)!r}, this one asks "
                        f"{want[key]!r} (same --epochs/--smoke as before, or move {kfold_dir} away)"
                    )
        ranks[str(cand.rank)] = want
    kfold_dir.mkdir(parents=True, exist_ok=True)
    _write_json(plan_path, {"ranks": ranks})


def fold_state(out_dir: Path, epochs: int) -> str:
    """`done` (metrics.json complete, best.pt, last.pt at the target epoch), `partial` or `new`."""
    from training.engine.trainer import BEST, LAST, METRICS

    import torch

    last = out_dir / LAST
    if not last.is_file():
        return "new"
    try:
        metrics = json.loads((out_dir / METRICS).read_text())
        if metrics.get("epochs_trained", 0) < epochs or len(metrics.get("history", [])) < epochs or not (out_dir / BEST).is_file():
            return "partial"
        # mmap: reads the epoch without loading the weights.
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        return "done" if state.get("epoch", 0) >= epochs else "partial"
    except (OSError, ValueError, RuntimeError, KeyError):
        return "partial"


def prepare_kfold_data(cfg: Config, best: BestConfigs, log: Log):
    """PreparedData for the k-fold stage, with the search's own fold manifest (refusing other data)."""
    from training.data.dataset import prepare_data
    from training.data.folds import load_manifest

    data = prepare_data(cfg, log=log)
    if not best.fold_manifest:
        log(f"warning: {best.path} names no fold_manifest; using {data.manifest.path}")
        return data
    path = Path(best.fold_manifest)
    if not path.is_file():
        log(f"warning: fold manifest {path} from {best.path.name} is missing here; using {data.manifest.path} "
            "(same data and folds settings give the same folds)")
        return data
    manifest = load_manifest(path)
    manifest.check_matches(data.index, cfg.folds)  # DataError naming the manifest and the annotation file
    if manifest.fold_of != data.manifest.fold_of:
        raise DataError(f"{path}: its folds differ from {data.manifest.path} made for the same data; delete the stale one")
    data.manifest = manifest
    return data


def load_test_index(cfg: Config, classes: list[str]):
    from training.data.coco import load_coco
    from training.data.dataset import data_root

    index = load_coco(data_root(cfg), cfg.data.test_json, check_images=True)
    if len(index.classes) > 1 and index.classes != classes:
        raise DataError(f"{index.ann_path}: categories {index.classes[1:]} differ from train's {classes[1:]}")
    if not index.images:
        raise DataError(f"{index.ann_path}: no images to predict")
    return index


# ---- MLflow lineage (driver only) ----------------------------------------------------------


class KFoldTracking:
    """The kfold parent run, a child per (config, fold), an ensemble run; found again on resume.

    Each child run holds its fold's best.pt as an artifact (the lineage asks for it; a real
    one is 100-250 MB, times 5 folds x k configs, copied by this driver into the artifact
    store) and also its path on the results storage as a tag, with its size.
    Small files (metrics.json, per-class IoU plot, confusion matrix, summary) are artifacts.
    """

    def __init__(self, uri: str, best: BestConfigs, kfold_dir: Path, resume: bool, log: Log):
        from training.tracking import Tracker

        self.tracker = Tracker(uri, log=log)
        self.log = log
        self.experiment_id = self._experiment(best)
        self.parent_tags = {
            "segtune.stage": "kfold",
            "segtune.experiment": best.experiment,
            "segtune.kfold_dir": str(kfold_dir),
            "search_parent_run_id": str(best.search_parent_run_id or ""),
        }
        self.parent = None
        if self.experiment_id and resume:
            self.parent = self.tracker.find_run(self.experiment_id, self.parent_tags)
        if self.parent is None and self.experiment_id:
            self.parent = self.tracker.start_run(self.experiment_id, "kfold", self.parent_tags)
        self.logged: dict[str, set[int]] = {}

    def _experiment(self, best: BestConfigs) -> str | None:
        client = self.tracker.client
        if best.experiment_id:
            try:
                exp = client.get_experiment(best.experiment_id)
                if exp is not None and exp.lifecycle_stage == "active":
                    return exp.experiment_id
            except Exception:  # another tracking store (--mlflow-uri): fall back to the name
                pass
        return self.tracker.experiment_id(best.experiment)

    def _status(self, run_id: str) -> str | None:
        try:
            return self.tracker.client.get_run(run_id).info.status
        except Exception:
            return None

    def _epochs_logged(self, run_id: str) -> set[int]:
        try:
            return {m.step for m in self.tracker.client.get_metric_history(run_id, "val_miou")}
        except Exception:
            return set()

    def child(self, job: FoldJob) -> tuple[str | None, bool]:
        """(run id, finished?) of the job's child run, created if it does not exist yet."""
        if not self.parent:
            return None, False
        tags = {"segtune.kfold_parent": self.parent, "config_rank": str(job.cand.rank), "fold": str(job.fold)}
        run_id = self.tracker.find_run(self.experiment_id, tags)
        finished = False
        if run_id:
            finished = self._status(run_id) == "FINISHED"
            self.logged[run_id] = self._epochs_logged(run_id)
        else:
            from training.tracking import flatten

            run_id = self.tracker.start_run(
                self.experiment_id,
                f"config{job.cand.rank}-fold{job.fold}",
                tags | {"trial_id": job.cand.trial_id, "segtune.stage": "kfold_fold"},
                parent_run_id=self.parent,
            )
            self.tracker.log_params(run_id, flatten(job.cand.cfg.to_dict()) | {"kfold.fold": job.fold})
            self.logged[run_id] = set()
        return run_id, finished

    def log_epoch(self, run_id: str | None, metrics: dict[str, float]) -> None:
        epoch = int(metrics["epoch"])
        if not run_id or epoch in self.logged.setdefault(run_id, set()):
            return
        self.tracker.log_metrics(run_id, metrics, step=epoch)
        self.logged[run_id].add(epoch)

    def finish_child(self, job: FoldJob) -> None:
        """Backfill epochs the live stream missed, record the checkpoint, mark FINISHED."""
        from training.engine.trainer import BEST, METRICS

        if not job.run_id:
            return
        metrics = json.loads((job.out_dir / METRICS).read_text())
        for row in metrics.get("history", []):
            flat = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            flat.update({f"loss_{k}": v for k, v in (row.get("loss_terms") or {}).items()})
            self.log_epoch(job.run_id, flat)
        best = job.out_dir / BEST
        self.tracker.log_artifact(job.run_id, best)
        self.tracker.set_tags(job.run_id, {
            "checkpoint": str(best.resolve()),
            "checkpoint_bytes": best.stat().st_size if best.is_file() else 0,
            "out_dir": str(job.out_dir.resolve()),
        })
        self.tracker.log_metrics(job.run_id, {"fold_best_miou": metrics["best_miou"], "fold_best_epoch": metrics["best_epoch"]})
        self.tracker.log_artifact(job.run_id, job.out_dir / METRICS)
        self.tracker.log_artifact(job.run_id, job.out_dir / "per_class_iou.png")
        self.tracker.end_run(job.run_id, "FINISHED")

    def fail_child(self, job: FoldJob, message: str) -> None:
        self.tracker.set_tags(job.run_id, {"error": message[:4000]})
        self.tracker.end_run(job.run_id, "FAILED")

    def ensemble(self, key: str) -> tuple[str | None, bool]:
        """(run id, already complete?) of the ensemble run for this key (checkpoints + settings).

        Other settings (e.g. a resumed run with another --tta) get an ensemble run of their own:
        MLflow params are immutable, and each run then describes exactly one ensemble.
        """
        if not self.parent:
            return None, False
        tags = {"segtune.kfold_parent": self.parent, "segtune.stage": "kfold_ensemble", "ensemble_key": key}
        run_id = self.tracker.find_run(self.experiment_id, tags)
        if run_id:
            return run_id, self._status(run_id) == "FINISHED"
        return self.tracker.start_run(self.experiment_id, "ensemble", tags, parent_run_id=self.parent), False


# ---- Ray tasks ------------------------------------------------------------------------------


def connect_ray(address: str | None, log: Log, num_cpus: int | None = None) -> bool:
    """Join the cluster the search used (--address / RAY_ADDRESS) or start a local Ray on
    127.0.0.1 (`num_cpus`: local only, default all cores). Returns True when this call
    started Ray (and should shut it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log(f"ray: joined {address}")
    else:
        from tune.runner import _local_ray_env

        _local_ray_env()  # else Ray rewrites 127.0.0.1 to the machine's outward address
        ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        node_ip = ray.util.get_node_ip_address()
        if node_ip != "127.0.0.1":
            ray.shutdown()
            raise SegtuneError(f"ray: the local instance bound to {node_ip}, not 127.0.0.1 (is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 set?)")
        log(f"ray: local instance on 127.0.0.1 ({ray.cluster_resources().get('CPU', 0):g} CPUs)")
    return True


class RayConnection:
    """Connects on first use, so a resumed run with nothing left to compute never starts Ray."""

    def __init__(self, address: str | None, log: Log):
        self.address, self.log, self.started = address, log, False
        self._refs: dict[int, Any] = {}

    def ensure(self) -> None:
        if not ray.is_initialized():
            self.started = connect_ray(self.address, self.log)

    def resources(self, cfgs: Sequence[Config]) -> dict[str, float]:
        """Task resources from the configs' `search.resources`.

        On a local Ray this process started (a laptop), a request that can never fit, such as
        a GPU fraction on a machine without GPUs, is shrunk to fit so folds run on CPU; a
        joined cluster keeps the request, since its autoscaler may still add GPU nodes.
        """
        want = _resources(cfgs)
        self.ensure()
        if not self.started:
            return want
        total = ray.cluster_resources()
        fitted = {"num_cpus": min(want["num_cpus"], total.get("CPU", 1)), "num_gpus": want["num_gpus"] if total.get("GPU", 0) >= want["num_gpus"] else 0}
        if fitted != want and not getattr(self, "_warned", False):
            self._warned = True
            self.log(f"ray: this machine cannot give tasks {want}; running with {fitted}")
        return fitted

    def put(self, obj: Any):
        """The object store reference of `obj`, put once however many tasks take it."""
        self.ensure()
        if id(obj) not in self._refs:
            self._refs[id(obj)] = (obj, ray.put(obj))
        return self._refs[id(obj)][1]

    def close(self) -> None:
        if self.started:
            ray.shutdown()
            self.started = False


def _resources(cfgs: Sequence[Config]) -> dict[str, float]:
    return {
        "num_cpus": max(c.search.resources.cpu for c in cfgs),
        "num_gpus": max(c.search.resources.gpu for c in cfgs),
    }


@ray.remote(max_retries=2)  # a lost (spot) node reruns the task, which resumes from last.pt
def train_fold_task(cfg_dict: dict, data, fold: int, out_dir: str, rank: int, queue) -> dict[str, Any]:
    from training.cli import quiet_library_warnings
    from training.engine.trainer import LAST, train

    quiet_library_warnings()
    cfg = config_from_dict(cfg_dict)
    out = Path(out_dir)
    node = ray.get_runtime_context().get_node_id()
    state = fold_state(out, cfg.trainer.epochs)
    if state == "done":
        return {"status": "skipped", "node": node}
    data.ensure_cached()

    def push(result) -> None:
        queue.put((rank, fold, result.metrics()))

    prefix = f"[config {rank} fold {fold}]"
    resume = out / LAST if state == "partial" else None
    result = train(cfg, data, fold, out, callbacks=[push], resume=resume, log=lambda m: print(prefix, m, flush=True))
    return {"status": "resumed" if resume else "trained", "best_miou": result.best_miou, "best_epoch": result.best_epoch, "node": node}


def _eval_loader_kwargs(cfg: Config) -> dict[str, Any]:
    return {"batch_size": cfg.data.batch_size, "num_workers": cfg.data.num_workers, "shuffle": False}


@ray.remote(max_retries=2)
def oof_fold_task(
    checkpoints: list[str],
    data,
    fold: int,
    subset: int | None,
    score_size: int,
    ignore_index: int | None,
    tta_spec: dict,
    vote_method: str,
    masks_dir: str | None,
) -> dict[str, Any]:
    """Confusion matrices of every subset of configs on this fold's held-out images."""
    import torch
    from torch.utils.data import DataLoader

    from training.cli import quiet_library_warnings
    from training.data.dataset import SegmentationDataset, fold_split
    from training.engine.trainer import resolve_device
    from training.evaluation.predict import TTA, MultiInputTransform, SubsetScorer, assign_inputs, load_member, model_inputs, predict_proba_views
    from training.evaluation.submission import save_mask_png

    quiet_library_warnings()
    data.ensure_cached()
    tta = TTA(**tta_spec)
    first = load_member(checkpoints[0], 0, torch.device("cpu"))
    device = resolve_device(first.cfg.trainer.device)
    members = [load_member(path, i, device) for i, path in enumerate(checkpoints)]
    for m in members:
        if m.fold != fold:
            raise SegtuneError(f"{checkpoints[m.rank]}: trained for fold {m.fold}, expected fold {fold}")
    specs = assign_inputs(members)
    _, val_ids = fold_split(data, fold, subset)
    ds = SegmentationDataset(data.index, data.cache, val_ids, MultiInputTransform(specs), score_size=score_size)
    loader = DataLoader(ds, **_eval_loader_kwargs(members[0].cfg))
    scorer = SubsetScorer(len(members), len(data.classes), ignore_index)
    seen: list[int] = []
    out_size = (score_size, score_size)
    for inputs, masks, ids in loader:
        inputs = model_inputs(members, inputs, device)
        per_config = [predict_proba_views(m.model, inputs[m.input_index], out_size, tta, m.divisor, m.dtype) for m in members]
        labels = scorer.update(per_config, masks.to(device).long())
        chosen = labels[f"{vote_method}_{'tta' if tta.enabled else 'plain'}"].to(torch.uint8).cpu().numpy()
        for image_id, mask in zip(ids.tolist(), chosen):
            seen.append(image_id)
            if masks_dir:
                save_mask_png(Path(masks_dir) / f"{image_id}.png", mask)
    return {"fold": fold, "image_ids": seen, "matrices": scorer.matrices}


@ray.remote(max_retries=0)
def predict_test_task(checkpoints: list[str], test_index, tta_spec: dict, vote_method: str, mask_side: int):
    """Stream (file_name, uint8 mask) per test image; the driver writes them (single writer).

    The ensemble votes at its members' input size; only the label mask is resized
    (nearest) to mask_side x mask_side (see predict.iter_predictions).
    """
    import torch
    from torch.utils.data import DataLoader

    from training.cli import quiet_library_warnings
    from training.data.dataset import ImageDataset
    from training.engine.trainer import resolve_device
    from training.evaluation.predict import TTA, MultiInputTransform, assign_inputs, iter_predictions, load_member

    quiet_library_warnings()
    first = load_member(checkpoints[0], 0, torch.device("cpu"))
    device = resolve_device(first.cfg.trainer.device)
    members = [load_member(path, i, device) for i, path in enumerate(checkpoints)]
    specs = assign_inputs(members)
    ds = ImageDataset(test_index, test_index.image_ids, MultiInputTransform(specs))
    loader = DataLoader(ds, **_eval_loader_kwargs(members[0].cfg))
    for image_id, mask in iter_predictions(members, loader, (mask_side, mask_side), TTA(**tta_spec), vote_method, device):
        yield test_index.image(image_id).file_name, mask


# ---- the stage ------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _nan_to_none(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if v is None or math.isnan(v) else v) for k, v in values.items()}


def _fingerprint(paths: Sequence[Path], **extra: Any) -> str:
    """Identifies inputs of a cached result: the checkpoint files (mtime, size) plus settings."""
    stats = [[str(p), p.stat().st_mtime_ns, p.stat().st_size] for p in paths]
    return hashlib.sha256(json.dumps({"files": stats, **extra}, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _task_error(err: Exception) -> str:
    cause = getattr(err, "cause", None) or err
    first = (str(cause).strip().splitlines() or [""])[-1 if isinstance(cause, SegtuneError) else 0]
    return first if isinstance(cause, SegtuneError) else f"{type(cause).__name__}: {first}"


def run_kfold(options: KFoldOptions, log: Log = print) -> dict[str, Any]:
    """The whole stage; returns the summary (also written to kfold/summary.json)."""
    from training.engine.trainer import BEST
    from training.evaluation.predict import TTA, VOTES, SubsetScorer, greedy_select, subset_members

    started = time.time()
    timings: dict[str, float] = {}

    # -- validate every input before any work
    best = load_best_configs(find_best_configs(options.experiment))
    candidates = build_candidates(best, options)
    if options.vote not in VOTES:
        raise ConfigError(f"--vote: {options.vote!r} is not one of {list(VOTES)}")
    try:
        tta = TTA.parse(options.tta or (SMOKE_TTA if options.smoke else DEFAULT_TTA), options.scales)
    except ValueError as err:
        raise ConfigError(f"--tta: {err}") from None
    cfg0 = candidates[0].cfg
    data = prepare_kfold_data(cfg0, best, log)
    test_index = load_test_index(cfg0, data.classes)
    kfold_dir = best.dir / KFOLD_DIR
    check_plan(kfold_dir, candidates, options.resume)
    n_folds = data.manifest.n_splits
    log(
        f"k-fold: experiment {best.experiment}, configs {[c.rank for c in candidates]} x {n_folds} folds, "
        f"epochs {[c.epochs for c in candidates]}, TTA {tta.name}, vote {options.vote} -> {kfold_dir}"
    )

    uri = options.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or best.tracking_uri
    tracking = KFoldTracking(uri, best, kfold_dir, options.resume, log)
    connection = RayConnection(options.address, log)
    ok = False
    try:
        jobs = [FoldJob(c, k, kfold_dir / str(c.rank) / f"fold{k}") for c in candidates for k in range(n_folds)]
        t = time.time()
        _train_all(jobs, data, tracking, connection, log)
        timings["train_s"] = time.time() - t

        # -- out-of-fold scores of every subset of configs
        t = time.time()
        scorer = SubsetScorer(len(candidates), len(data.classes), cfg0.loss.ignore_index)
        oof_ids = _score_oof(jobs, candidates, data, tta, options.vote, kfold_dir, scorer, connection, log)
        timings["oof_s"] = time.time() - t
        chosen_mode = "tta" if tta.enabled else "plain"
        full = 2 ** len(candidates) - 1
        score_of = {s: scorer.scores(chosen_mode, options.vote, s).miou for s in range(1, full + 1)}
        selected, steps = greedy_select(score_of, len(candidates))
        selected_cands = [candidates[i] for i in subset_members(selected)]

        # -- test prediction: selected configs x all folds
        t = time.time()
        checkpoints = [str(j.out_dir / BEST) for j in jobs if j.cand in selected_cands]
        submission = _predict_submission(checkpoints, [c.cfg for c in selected_cands], test_index, tta, options, kfold_dir, data.classes, connection, log)
        timings["submission_s"] = time.time() - t

        summary = _summary(best, kfold_dir, data, tta, options, jobs, candidates, scorer, selected, steps, oof_ids, submission, timings)
        summary["wall_time_s"] = time.time() - started
        ensemble_run = _log_ensemble(tracking, summary, scorer.matrix(chosen_mode, options.vote, selected), data.classes, kfold_dir)
        summary["mlflow"] = {"tracking_uri": tracking.tracker.uri, "experiment_id": tracking.experiment_id,
                             "parent_run_id": tracking.parent, "ensemble_run_id": ensemble_run}
        summary["wall_time_s"] = time.time() - started
        _write_json(kfold_dir / SUMMARY, summary)
        ok = True
        log(format_summary(summary))
        return summary
    finally:
        tracking.tracker.end_run(tracking.parent, "FINISHED" if ok else "FAILED")
        tracking.tracker.flush()
        connection.close()


def _summary(best, kfold_dir, data, tta, options, jobs, candidates, scorer, selected: int, steps, oof_ids, submission, timings) -> dict[str, Any]:
    """Everything summary.json reports: per (config, fold), per config, the ensembles, the submission."""
    from training.engine.trainer import BEST, METRICS
    from training.evaluation.predict import MODES, VOTES, subset_members

    def modes(mask: int) -> dict[str, float]:
        return {
            f"{method}{'_tta' if mode == 'tta' else ''}": scorer.scores(mode, method, mask).miou
            for mode in MODES for method in VOTES
        }

    configs = []
    for cand in candidates:
        folds = []
        for job in (j for j in jobs if j.cand is cand):
            metrics = json.loads((job.out_dir / METRICS).read_text())
            fold_oof = job.result.get("fold_oof", {})
            folds.append({
                "fold": job.fold,
                "val_miou": metrics["best_miou"],
                "best_epoch": metrics["best_epoch"],
                "epochs_trained": metrics["epochs_trained"],
                "oof_miou": fold_oof.get("plain"),
                "oof_miou_tta": fold_oof.get("tta"),
                "status": job.status,
                "checkpoint": str(job.out_dir / BEST),
                "mlflow_run_id": job.run_id,
            })
        mask = 1 << cand.index  # a single config: soft and hard vote agree
        configs.append({
            "rank": cand.rank,
            "trial_id": cand.trial_id,
            "params": cand.params,
            "search_val_miou": cand.search_val_miou,
            "epochs": cand.epochs,
            "folds": folds,
            "mean_fold_val_miou": float(np.mean([f["val_miou"] for f in folds])),
            "oof_miou": scorer.scores("plain", "soft", mask).miou,
            "oof_miou_tta": scorer.scores("tta", "soft", mask).miou,
        })
    chosen_mode = "tta" if tta.enabled else "plain"
    sel_scores = scorer.scores(chosen_mode, options.vote, selected, data.classes)
    return {
        "experiment": best.experiment,
        "best_configs": str(best.path),
        "kfold_dir": str(kfold_dir),
        "data_root": str(data.index.root),
        "fold_manifest": str(data.manifest.path),
        "n_folds": data.manifest.n_splits,
        "tta": tta.name,
        "vote": options.vote,
        "smoke": options.smoke,
        "configs": configs,
        "oof": {"images": len(oof_ids), "score_size": candidates[0].cfg.data.score_size or candidates[0].cfg.data.image_size},
        "ensemble": {
            "candidates": [c.rank for c in candidates],
            "selection_metric": f"oof_miou_{options.vote}{'_tta' if tta.enabled else ''}",
            "selection_steps": [dict(s, subset=[candidates[i].rank for i in s["subset"]]) for s in steps],
            "selected_ranks": [candidates[i].rank for i in subset_members(selected)],
            "selected": modes(selected),
            "all_candidates": modes(2 ** len(candidates) - 1),
            "oof_miou": sel_scores.miou,
            "per_class_iou": _nan_to_none(sel_scores.per_class_iou),
            "mean_fold_val_miou": float(np.mean([f["val_miou"] for c in configs for f in c["folds"]])),
        },
        "submission": submission,
        "timings": timings,
    }


def _train_all(jobs: list[FoldJob], data, tracking: KFoldTracking, connection: RayConnection, log: Log) -> None:
    """Run every unfinished (config, fold) as a Ray task, logging epochs live to MLflow."""
    from ray.util.queue import Empty, Queue

    from training.engine.trainer import METRICS

    todo = []
    for job in jobs:
        job.state = fold_state(job.out_dir, job.cand.epochs)
        job.run_id, finished = tracking.child(job)
        if job.state == "done":
            if finished:
                job.status = "skipped"
            else:  # trained, but the driver stopped before MLflow heard of it
                tracking.finish_child(job)
                job.status = "logged"
            continue
        todo.append(job)
    skipped = len(jobs) - len(todo)
    if not todo:
        log(f"k-fold: all {len(jobs)} (config, fold) pairs already trained")
        return
    log(f"k-fold: training {len(todo)} (config, fold) pairs ({skipped} already done)")
    connection.ensure()
    # Ray's actor-backed queue: tasks on any node push EpochResult.metrics() for live logging.
    queue = Queue(actor_options={"num_cpus": 0})
    data_ref = connection.put(data)
    pending = {}
    for job in todo:
        cfg = job.cand.cfg
        ref = train_fold_task.options(**connection.resources([cfg])).remote(
            cfg.to_dict(), data_ref, job.fold, str(job.out_dir), job.cand.rank, queue
        )
        pending[ref] = job
    by_key = {j.key: j for j in jobs}
    failures: list[str] = []

    def drain() -> None:
        while True:
            try:
                items = queue.get_nowait_batch(max(1, queue.qsize()))
            except Empty:
                return
            for rank, fold, metrics in items:
                job = by_key[(rank, fold)]
                tracking.log_epoch(job.run_id, metrics)
                log(f"  config {rank} fold {fold}: epoch {int(metrics['epoch'])}/{job.cand.epochs} val_mIoU {metrics['val_miou']:.4f}")

    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
            drain()
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as err:  # the task's own error, already printed with its traceback
                    message = f"{job.name}: {_task_error(err)}"
                    failures.append(message)
                    tracking.fail_child(job, message)
                    log(f"  {message}")
                    continue
                job.status = result["status"]
                drain()
                if not (job.out_dir / METRICS).is_file():
                    failures.append(
                        f"{job.name}: trained on node {result['node']} but {job.out_dir} is not visible to this driver; "
                        "set SEGTUNE_RESULTS to storage every node shares (e.g. /mnt/shared/results)"
                    )
                    continue
                tracking.finish_child(job)
                metrics = json.loads((job.out_dir / METRICS).read_text())
                log(f"  {job.name}: {job.status} on node {result['node']}, best val mIoU {metrics['best_miou']:.4f} at epoch {metrics['best_epoch']}")
    finally:
        ray.kill(queue.actor)
    if failures:
        raise SegtuneError(
            f"{len(failures)} of {len(todo)} fold trainings failed ({'; '.join(failures[:3])}); finished folds are kept, "
            "fix the cause and re-run with --resume"
        )


def _score_oof(jobs, candidates, data, tta, vote_method: str, kfold_dir: Path, scorer, connection: RayConnection, log: Log) -> list[int]:
    """Fill `scorer` with every subset's OOF confusion matrices (cached per fold); returns the image ids."""
    from training.engine.trainer import BEST
    from training.evaluation.predict import SubsetScorer

    cfg0 = candidates[0].cfg
    oof_dir = kfold_dir / "oof"
    oof_dir.mkdir(parents=True, exist_ok=True)
    masks_dir = kfold_dir / "oof_masks"
    n_folds = data.manifest.n_splits
    tta_spec = {"hflip": tta.hflip, "vflip": tta.vflip, "scales": tta.scales}
    pending, results = {}, {}
    for k in range(n_folds):
        ckpts = [kfold_dir / str(c.rank) / f"fold{k}" / BEST for c in candidates]
        key = _fingerprint(ckpts, tta=tta.name, vote=vote_method, ranks=[c.rank for c in candidates])
        cached = oof_dir / f"fold{k}.npz"
        if cached.is_file():
            with np.load(cached) as npz:
                if str(npz["key"]) == key:
                    results[k] = {"image_ids": npz["image_ids"].tolist(), "matrices": npz["matrices"]}
                    continue
        ref = oof_fold_task.options(**connection.resources([c.cfg for c in candidates])).remote(
            [str(p) for p in ckpts], connection.put(data), k, cfg0.data.subset, cfg0.data.score_size or cfg0.data.image_size,
            cfg0.loss.ignore_index, tta_spec, vote_method, str(masks_dir),
        )
        pending[ref] = (k, key, cached)
    if pending:
        log(f"k-fold: scoring out-of-fold predictions of {len(pending)} fold(s), TTA {tta.name}")
    errors = []
    for ref, (k, key, cached) in pending.items():
        try:
            out = ray.get(ref)
        except Exception as err:
            errors.append(f"fold {k}: {_task_error(err)}")
            continue
        np.savez(cached, key=np.array(key), image_ids=np.array(out["image_ids"], dtype=np.int64), matrices=out["matrices"])
        results[k] = out
    if errors:
        raise SegtuneError(f"out-of-fold scoring failed: {'; '.join(errors[:3])}")
    oof_ids: list[int] = []
    for k in range(n_folds):
        scorer.merge(results[k]["matrices"])
        oof_ids += list(results[k]["image_ids"])
        one = SubsetScorer(len(candidates), len(data.classes))
        one.merge(results[k]["matrices"])
        for job in (j for j in jobs if j.fold == k):
            mask = 1 << job.cand.index
            job.result["fold_oof"] = {m: one.scores(m, "soft", mask).miou for m in ("plain", "tta")}
    from training.data.dataset import fold_split

    expected = sorted(i for k in range(n_folds) for i in fold_split(data, k, cfg0.data.subset)[1])
    if sorted(oof_ids) != expected or len(set(oof_ids)) != len(oof_ids):
        raise SegtuneError(f"out-of-fold predictions cover {len(set(oof_ids))} images ({len(oof_ids)} predictions) of {len(expected)}")
    return oof_ids


def _predict_submission(checkpoints, cfgs, test_index, tta, options: KFoldOptions, kfold_dir: Path, classes, connection: RayConnection, log: Log) -> dict[str, Any]:
    from training.data.coco import file_sha256
    from training.evaluation.submission import SUBMISSION, SUBMISSION_SIZE, SubmissionWriter, save_mask_png

    path = kfold_dir / SUBMISSION
    meta_path = kfold_dir / SUBMISSION_META
    # `mask`: how the 256 px mask is made; a submission.csv from the former bilinear-logits path is redone.
    key = _fingerprint([Path(p) for p in checkpoints], tta=tta.name, vote=options.vote, png=options.png,
                       test=file_sha256(test_index.ann_path), mask="vote at input size, labels resized nearest")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            log(f"k-fold: {path} is up to date ({meta['images']} images)")
            return meta
    log(f"k-fold: predicting {len(test_index.images)} test images with {len(checkpoints)} models, TTA {tta.name}, {options.vote} vote")
    tta_spec = {"hflip": tta.hflip, "vflip": tta.vflip, "scales": tta.scales}
    connection.ensure()
    # Backpressure: the task stays at most 16 masks ahead of the writer, so memory stays flat.
    gen = predict_test_task.options(**connection.resources(cfgs), _generator_backpressure_num_objects=16).remote(
        checkpoints, test_index, tta_spec, options.vote, SUBMISSION_SIZE
    )
    png_dir = kfold_dir / "test_masks"
    try:
        with SubmissionWriter(path, len(classes)) as writer:
            for ref in gen:
                file_name, mask = ray.get(ref)
                writer.write(file_name, mask)
                if options.png:
                    rel = [part for part in Path(file_name).with_suffix(".png").parts if part not in ("/", "..")]
                    save_mask_png(png_dir.joinpath(*rel), mask)
    except ray.exceptions.RayTaskError as err:
        raise SegtuneError(f"test prediction failed: {_task_error(err)}") from None
    meta = {"key": key, "path": str(path), "images": writer.rows, "models": len(checkpoints), "size": SUBMISSION_SIZE,
            "tta": tta.name, "vote": options.vote, "png_dir": str(png_dir) if options.png else None}
    _write_json(meta_path, meta)
    log(f"k-fold: wrote {path} ({writer.rows} rows)")
    return meta


def _log_ensemble(tracking: KFoldTracking, summary: dict, matrix: np.ndarray, classes: list[str], kfold_dir: Path) -> str | None:
    """Per-config OOF on the parent; the ensemble run with scores, per-class IoU and the confusion matrix."""
    from training.evaluation.plots import CONFUSION, PER_CLASS_IOU, save_confusion, save_per_class_iou

    ens = summary["ensemble"]
    tracker = tracking.tracker
    plots = kfold_dir / "plots"
    plots.mkdir(exist_ok=True)
    save_confusion(plots / CONFUSION, matrix, classes)
    save_per_class_iou(plots / PER_CLASS_IOU, {k: (np.nan if v is None else v) for k, v in ens["per_class_iou"].items()}, "ensemble OOF per-class IoU")
    key = hashlib.sha256(json.dumps([ens, summary["submission"].get("key")], sort_keys=True, default=str).encode()).hexdigest()[:16]
    run_id, done = tracking.ensemble(key)
    if done or not run_id:  # a resumed run that changed nothing logs nothing twice
        return run_id
    parent_metrics = {"ensemble_oof_miou": ens["oof_miou"]}
    for c in summary["configs"]:
        parent_metrics[f"oof_miou_rank{c['rank']}"] = c["oof_miou"]
        parent_metrics[f"oof_miou_tta_rank{c['rank']}"] = c["oof_miou_tta"]
        parent_metrics[f"mean_fold_val_miou_rank{c['rank']}"] = c["mean_fold_val_miou"]
    tracker.log_metrics(tracking.parent, parent_metrics)
    tracker.set_tags(tracking.parent, {"selected_ranks": ",".join(map(str, ens["selected_ranks"])), "tta": summary["tta"], "vote": summary["vote"]})
    metrics = {"oof_miou": ens["oof_miou"], "mean_fold_val_miou": ens["mean_fold_val_miou"]}
    metrics |= {f"oof_miou_{k}": v for k, v in ens["selected"].items()}
    metrics |= {f"oof_miou_all_{k}": v for k, v in ens["all_candidates"].items()}
    metrics |= {f"iou_{''.join(ch if ch.isalnum() else '_' for ch in n)}": v for n, v in ens["per_class_iou"].items() if v is not None}
    tracker.log_metrics(run_id, metrics)
    tracker.log_params(run_id, {"selected_ranks": ens["selected_ranks"], "candidates": ens["candidates"], "tta": summary["tta"], "vote": summary["vote"]})
    tracker.log_artifact(run_id, plots / CONFUSION)
    tracker.log_artifact(run_id, plots / PER_CLASS_IOU)
    tracker.log_text(run_id, json.dumps(summary, indent=1, default=str), "summary.json")
    tracker.set_tags(run_id, {"submission": summary["submission"]["path"]})
    tracker.end_run(run_id, "FINISHED")
    return run_id


def format_summary(summary: dict[str, Any]) -> str:
    """A readable table: per-fold val mIoU, per-config OOF, ensemble, submission, wall time."""
    n = summary["n_folds"]
    head = f"{'config':>6} {'trial':>12} " + " ".join(f"{'fold' + str(k):>7}" for k in range(n)) + f" {'mean':>7} {'OOF':>7} {'OOF+TTA':>8}"
    lines = [f"k-fold summary: {summary['experiment']} ({summary['oof']['images']} OOF images, TTA {summary['tta']})", head, "-" * len(head)]
    for c in summary["configs"]:
        folds = " ".join(f"{f['val_miou']:>7.4f}" for f in c["folds"])
        lines.append(f"{c['rank']:>6} {str(c['trial_id'])[-12:]:>12} {folds} {c['mean_fold_val_miou']:>7.4f} {c['oof_miou']:>7.4f} {c['oof_miou_tta']:>8.4f}")
    ens = summary["ensemble"]
    lines.append("-" * len(head))
    for label, scores in (("selected " + str(ens["selected_ranks"]), ens["selected"]), ("all " + str(ens["candidates"]), ens["all_candidates"])):
        lines.append(
            f"ensemble {label}: OOF soft {scores['soft']:.4f} hard {scores['hard']:.4f} | "
            f"with TTA soft {scores['soft_tta']:.4f} hard {scores['hard_tta']:.4f}"
        )
    lines.append(f"selected by {ens['selection_metric']}: {ens['oof_miou']:.4f} (mean single-fold val mIoU {ens['mean_fold_val_miou']:.4f})")
    sel = ens["selected"]
    vote = summary["vote"]
    if summary["tta"] != "none" and sel[f"{vote}_tta"] < sel[vote]:
        lines.append(f"note: TTA {summary['tta']} lowers the OOF mIoU ({sel[f'{vote}_tta']:.4f} < {sel[vote]:.4f}); consider --tta none")
    sub = summary["submission"]
    lines.append(f"submission: {sub['path']} ({sub['images']} images x {sub['models']} models, {sub['size']}x{sub['size']})")
    lines.append(f"wall time {summary['wall_time_s']:.0f}s (" + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in summary["timings"].items()) + ")")
    return "\n".join(lines)
