"""Prepared data (validated index + mask cache + fold manifest) and the torch datasets over it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from training.config import check_against_classes
from training.data.coco import CocoIndex, ImageCache, MaskCache, load_coco, read_image
from training.data.copy_paste import CopyPaste, build_pasters
from training.data.folds import FoldManifest, load_or_create_folds
from training.data.transforms import build_transform
from training.errors import DataError

if TYPE_CHECKING:
    import albumentations as A

    from training.config import Config


@dataclass
class PreparedData:
    """Everything a trainer needs about the data; cheap to send to Ray workers (no pixels)."""

    index: CocoIndex
    cache: MaskCache
    manifest: FoldManifest
    val_index: CocoIndex | None = None
    val_cache: MaskCache | None = None

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    def ensure_cached(self) -> None:
        """Build the mask caches on this node if they are missing (e.g. a fresh Ray worker)."""
        self.cache.build()
        if self.val_cache is not None:
            self.val_cache.build()


def data_root(cfg: "Config") -> Path:
    if cfg.data.root:
        return Path(cfg.data.root)
    from training.data.sample import ensure_sample_dataset

    return ensure_sample_dataset()


def prepare_data(cfg: "Config", check_images: bool = True, log=print) -> PreparedData:
    """Validate the annotation files and images, rasterise masks once, load or make the folds.

    Every data problem surfaces here, before any training starts.
    """
    root = data_root(cfg)
    if not root.is_dir():
        raise DataError(f"data.root: {root}: no such directory")
    cache_dir = cfg.data.cache_dir
    index = load_coco(root, cfg.data.train_json, cfg.data.classes, check_images=check_images, cache_root=cache_dir, log=log)
    if not index.anns_by_image:
        raise DataError(f"{index.ann_path}: no annotations to train on")
    check_against_classes(cfg, index.classes)
    cache = MaskCache(index, cache_dir).build(log=log)
    manifest = load_or_create_folds(index, cfg.folds, cache_dir, log=log)
    val_index = val_cache = None
    if cfg.data.val_json:
        val_index = load_coco(root, cfg.data.val_json, index.classes, check_images=check_images, cache_root=cache_dir, log=log)
        val_cache = MaskCache(val_index, cache_dir).build(log=log)
    return PreparedData(index, cache, manifest, val_index, val_cache)


def evenly_spaced(ids: Sequence[int], n: int | None) -> list[int]:
    """At most `n` ids spread over the whole list, so a subset still spans every group."""
    ids = sorted(ids)
    if n is None or n >= len(ids):
        return ids
    picks = np.linspace(0, len(ids) - 1, n).round().astype(int)
    return [ids[i] for i in picks]


def fold_split(data: PreparedData, fold: int | None, subset: int | None) -> tuple[list[int], list[int]]:
    """(train ids, val ids) of `fold`; `fold=None` trains on all of train_json and validates on val_json."""
    keep = set(evenly_spaced(data.index.image_ids, subset))
    if fold is None:
        if data.val_index is None:
            raise DataError("fold=None (holdout) needs data.val_json")
        return sorted(keep), data.val_index.image_ids
    if not 0 <= fold < data.manifest.n_splits:
        raise DataError(f"fold {fold} is out of range: the manifest has {data.manifest.n_splits} folds")
    train = [i for i in data.manifest.train_ids(fold) if i in keep]
    val = [i for i in data.manifest.val_ids(fold) if i in keep]
    return train, val


class SegmentationDataset(Dataset):
    """(uint8 image tensor C x H x W, uint8 mask tensor H x W, image id) for the given images.

    Both stay uint8 through the DataLoader (a quarter / an eighth of the bytes of float32 and
    int64); the trainer converts them on its device.

    With `score_size`, the returned mask is the cached full-resolution mask resized (nearest)
    to score_size x score_size, so metrics are computed at the competition's resolution.
    `pasters` (CopyPaste entries of augment.train) paste objects in before `transform`.
    """

    def __init__(
        self,
        index: CocoIndex,
        cache: MaskCache,
        image_ids: Sequence[int],
        transform: "A.Compose",
        score_size: int | None = None,
        images: ImageCache | None = None,
        pasters: Sequence[CopyPaste] = (),
    ):
        self.index = index
        self.cache = cache
        self.image_ids = list(image_ids)
        self.transform = transform
        self.score_size = score_size
        self.images = images  # None: decode every time
        self.pasters = list(pasters)

    @property
    def annotated(self) -> "SegmentationDataset":
        """The annotated images of this side (a training side with pseudo labels has more)."""
        return self

    def set_random_seed(self, seed: int) -> None:
        """Seed every random step of a sample: the albumentations pipeline and the pasters."""
        self.transform.set_random_seed(seed)
        for k, paster in enumerate(self.pasters):
            paster.set_random_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int):
        image_id = self.image_ids[i]
        image = self.images.load(image_id) if self.images else read_image(self.index.image_path(image_id))
        mask = self.cache.load(image_id)
        for paster in self.pasters:
            image, mask = paster(image, mask, image_id)
        out = self.transform(image=image, mask=mask)
        if self.score_size is not None:
            target = cv2.resize(mask, (self.score_size, self.score_size), interpolation=cv2.INTER_NEAREST)
            target = torch.from_numpy(target)
        else:
            target = out["mask"]
        return out["image"], target, image_id


class ImageDataset(Dataset):
    """Images only (test set prediction): (uint8 image tensor, image id)."""

    def __init__(self, index: CocoIndex, image_ids: Sequence[int], transform: "A.Compose"):
        self.index = index
        self.image_ids = list(image_ids)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int):
        image_id = self.image_ids[i]
        return self.transform(image=read_image(self.index.image_path(image_id)))["image"], image_id


def make_datasets(cfg: "Config", data: PreparedData, fold: int | None) -> tuple[Dataset, SegmentationDataset]:
    """(training side, validation side) of `fold`: pseudo-labelled images (data.pseudo_labels) join the training side only."""
    check_against_classes(cfg, data.classes)  # a trial's config is first seen here
    train_ids, val_ids = fold_split(data, fold, cfg.data.subset)
    if not train_ids or not val_ids:
        raise DataError(f"fold {fold}: {len(train_ids)} train and {len(val_ids)} val images; need both (raise data.subset?)")
    aug = cfg.augment
    size = cfg.data.image_size
    train_tf = build_transform(aug.train, size, train=True)
    eval_tf = build_transform(aug.eval, size, train=False)
    val_index, val_cache = (data.val_index, data.val_cache) if fold is None else (data.index, data.cache)

    def images(index: CocoIndex) -> ImageCache | None:
        return ImageCache(index, cfg.data.cache_dir) if cfg.data.image_cache else None

    train_images = images(data.index)
    # objects to paste come from train_ids only: never from the validation side
    pasters = build_pasters(aug.train, data.index, data.cache, train_ids, train_images)
    train_ds = SegmentationDataset(data.index, data.cache, train_ids, train_tf, images=train_images, pasters=pasters)
    if cfg.data.pseudo_labels:
        from training.data.pseudo import with_pseudo_labels

        train_ds = with_pseudo_labels(train_ds, cfg, data.classes)
    val_ds = SegmentationDataset(val_index, val_cache, val_ids, eval_tf, score_size=cfg.data.score_size or size, images=images(val_index))
    return train_ds, val_ds


def seed_worker_transform(worker_id: int) -> None:
    """DataLoader worker_init_fn: albumentations and the pasters keep their own RNGs, seed them from torch's per-worker seed."""
    info = torch.utils.data.get_worker_info()
    seed = torch.initial_seed() % 2**32
    if hasattr(info.dataset, "set_random_seed"):  # a training side, with or without pseudo labels
        info.dataset.set_random_seed(seed)
    else:
        info.dataset.transform.set_random_seed(seed)
