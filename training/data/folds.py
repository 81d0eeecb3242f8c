"""Deterministic stratified group k-fold manifest, made once per dataset and reused by every stage.

Stratification is by class *presence* (multi-label), grouping by image or by an image field.
Written by hand because sklearn's StratifiedGroupKFold takes a single label per sample; this
is iterative stratification (Sechidis et al.) applied to whole groups.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.data.coco import CocoIndex, default_cache_root
from training.errors import DataError
from training.infra.fs import write_json

if TYPE_CHECKING:
    from training.config import FoldsConfig

MANIFEST_VERSION = 1
METHOD = "iterative-stratified-group-kfold"


@dataclass
class FoldManifest:
    path: Path | None
    dataset_hash: str
    n_splits: int
    group_key: str | None
    group_size: int | None
    seed: int
    fold_of: dict[int, int]  # image id -> fold
    group_of: dict[int, str]
    class_names: list[str]
    class_counts: list[list[int]]  # [fold][class] images containing the class

    def train_ids(self, fold: int) -> list[int]:
        return sorted(i for i, f in self.fold_of.items() if f != fold)

    def val_ids(self, fold: int) -> list[int]:
        return sorted(i for i, f in self.fold_of.items() if f == fold)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "method": METHOD,
            "dataset_hash": self.dataset_hash,
            "n_splits": self.n_splits,
            "group_key": self.group_key,
            "group_size": self.group_size,
            "seed": self.seed,
            "class_names": self.class_names,
            "class_counts": self.class_counts,
            "images_per_fold": [sum(1 for f in self.fold_of.values() if f == k) for k in range(self.n_splits)],
            "folds": {str(i): f for i, f in sorted(self.fold_of.items())},
            "groups": {str(i): g for i, g in sorted(self.group_of.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path | None) -> "FoldManifest":
        return cls(
            path=path,
            dataset_hash=data["dataset_hash"],
            n_splits=data["n_splits"],
            group_key=data["group_key"],
            group_size=data.get("group_size"),
            seed=data["seed"],
            fold_of={int(k): v for k, v in data["folds"].items()},
            group_of={int(k): v for k, v in data["groups"].items()},
            class_names=data["class_names"],
            class_counts=data["class_counts"],
        )

    def check_matches(self, index: CocoIndex, cfg: "FoldsConfig | None" = None) -> None:
        """Refuse a manifest made for other data (or other fold settings)."""
        where = self.path or "fold manifest"
        if self.dataset_hash != index.content_hash:
            raise DataError(
                f"{where}: made for dataset {self.dataset_hash[:12]} but {index.ann_path} is {index.content_hash[:12]}; "
                "delete it or point to the manifest of this data"
            )
        if set(self.fold_of) != set(index.image_ids):
            raise DataError(f"{where}: its image ids differ from {index.ann_path}")
        if cfg is not None:
            want = (cfg.n_splits, cfg.group_key, cfg.group_size, cfg.seed)
            have = (self.n_splits, self.group_key, self.group_size, self.seed)
            if want != have:
                raise DataError(f"{where}: made with (n_splits, group_key, group_size, seed)={have}, config asks {want}")

    def format_table(self) -> str:
        """Per-fold image and class-presence counts, one row per fold."""
        short = [n[:10] for n in self.class_names]
        header = "fold  images " + " ".join(f"{n:>10}" for n in short)
        rows = [header]
        for k, counts in enumerate(self.class_counts):
            n = sum(1 for f in self.fold_of.values() if f == k)
            rows.append(f"{k:>4}  {n:>6} " + " ".join(f"{c:>10}" for c in counts))
        return "\n".join(rows)


def _groups(index: CocoIndex, group_key: str | None, group_size: int | None) -> dict[int, str]:
    if group_key is None:
        return {img.id: f"image:{img.id}" for img in index.images}
    by_value: dict[str, list] = {}
    for img in index.images:
        if group_key not in img.fields:
            raise DataError(f"{index.ann_path}: image id {img.id}: has no field {group_key!r} (folds.group_key)")
        by_value.setdefault(str(img.fields[group_key]), []).append(img)
    group_of: dict[int, str] = {}
    for value, imgs in by_value.items():
        imgs.sort(key=lambda r: r.file_name)  # consecutive frames are neighbours by name
        for pos, img in enumerate(imgs):
            group_of[img.id] = value if group_size is None else f"{value}#{pos // group_size}"
    return group_of


def make_folds(index: CocoIndex, n_splits: int, group_key: str | None, group_size: int | None, seed: int) -> FoldManifest:
    group_of = _groups(index, group_key, group_size)
    group_names = sorted(set(group_of.values()))
    if len(group_names) < n_splits:
        raise DataError(
            f"{index.ann_path}: folds.group_key={group_key!r} gives {len(group_names)} groups, fewer than "
            f"folds.n_splits={n_splits}; set folds.group_size to split groups into runs of consecutive images"
        )
    n_classes = len(index.classes)
    members: dict[str, list[int]] = {g: [] for g in group_names}
    for image_id, g in group_of.items():
        members[g].append(image_id)
    presence = np.zeros((len(group_names), n_classes), dtype=np.int64)  # images per class per group
    for gi, g in enumerate(group_names):
        for image_id in members[g]:
            for c in index.classes_present(image_id):
                presence[gi, c] += 1
    sizes = np.array([len(members[g]) for g in group_names])

    rng = np.random.default_rng(seed)
    need_class = presence.sum(0)[None, :].repeat(n_splits, 0) / n_splits
    need_size = np.full(n_splits, sizes.sum() / n_splits)
    unassigned = list(rng.permutation(len(group_names)))
    fold_of_group = np.full(len(group_names), -1)
    while unassigned:
        # The label with the fewest remaining examples is placed first (iterative stratification).
        remaining = presence[unassigned].sum(0)
        remaining = np.where(remaining > 0, remaining, np.iinfo(np.int64).max)
        label = int(np.argmin(remaining)) if remaining.min() < np.iinfo(np.int64).max else None
        candidates = [g for g in unassigned if label is None or presence[g, label] > 0]
        candidates.sort(key=lambda g: -sizes[g])  # large groups first while folds are still flexible
        g = candidates[0]
        if label is None:
            scores = need_size
        else:
            scores = need_class[:, label] + 1e-6 * need_size
        best = np.flatnonzero(np.isclose(scores, scores.max()))
        fold = int(best[np.argmax(need_size[best])]) if len(best) > 1 else int(best[0])
        fold_of_group[g] = fold
        need_class[fold] -= presence[g]
        need_size[fold] -= sizes[g]
        unassigned.remove(g)

    fold_of = {image_id: int(fold_of_group[group_names.index(g)]) for image_id, g in group_of.items()}
    empty = [k for k in range(n_splits) if k not in set(fold_of.values())]
    if empty:
        raise DataError(f"{index.ann_path}: folds {empty} got no images; use fewer folds.n_splits or a finer group")
    counts = np.zeros((n_splits, n_classes), dtype=np.int64)
    for image_id, fold in fold_of.items():
        for c in index.classes_present(image_id):
            counts[fold, c] += 1
    return FoldManifest(None, index.content_hash, n_splits, group_key, group_size, seed, fold_of, group_of, index.classes, counts.tolist())


def default_manifest_path(index: CocoIndex, cfg: "FoldsConfig", cache_root: str | Path | None = None) -> Path:
    root = Path(cache_root) if cache_root else default_cache_root()
    group = f"{cfg.group_key}x{cfg.group_size}" if cfg.group_size else str(cfg.group_key or "image")
    return root / "folds" / index.content_hash[:20] / f"folds_k{cfg.n_splits}_{group}_s{cfg.seed}.json"


def load_manifest(path: str | Path, index: CocoIndex | None = None) -> FoldManifest:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read fold manifest: {err}") from None
    manifest = FoldManifest.from_json(data, path)
    if index is not None:
        manifest.check_matches(index)
    return manifest


def load_or_create_folds(
    index: CocoIndex,
    cfg: "FoldsConfig",
    cache_root: str | Path | None = None,
    path: str | Path | None = None,
    log=print,
) -> FoldManifest:
    """The manifest at `path` (default: keyed by dataset hash in the cache), created once if missing."""
    path = Path(path) if path else default_manifest_path(index, cfg, cache_root)
    if path.is_file():
        manifest = load_manifest(path)
        manifest.check_matches(index, cfg)
        return manifest
    manifest = make_folds(index, cfg.n_splits, cfg.group_key, cfg.group_size, cfg.seed)
    manifest.path = path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, manifest.to_json())
    log(f"folds: wrote {path}\n{manifest.format_table()}")
    return manifest
