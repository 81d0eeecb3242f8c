"""The pseudo-label stage's Ray task: label images with an ensemble, confident pixels only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray
from torch.utils.data import DataLoader, Dataset


class ImageFiles(Dataset):
    """(model inputs, position) per image file; each image's own size is kept in `sizes` (read in this process: num_workers=0)."""

    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform
        self.sizes: dict[int, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from training.data.coco import read_image

        image = read_image(Path(self.paths[i]))
        self.sizes[i] = image.shape[:2]
        return self.transform(image=image)["image"], i


@ray.remote(max_retries=2)
def label_images_task(spec: dict, base: str, paths: list[str], threshold: float, ignore_index: int, mask_dir: str) -> dict[str, Any]:
    """One PNG label mask per image with a confident pixel (`<position>.png`, the image's own size; unconfident pixels hold
    `ignore_index`), the pixel count of each class among the confident pixels, and the pixels of all images."""
    from training.cli import quiet_library_warnings
    from training.evaluation.ensemble import Ensemble
    from training.evaluation.inference import resize_labels
    from training.evaluation.submission import save_mask_png
    from training.handoff import EnsembleSpec

    quiet_library_warnings()
    ensemble = Ensemble.load(EnsembleSpec.model_validate(spec), base=Path(base))
    files = ImageFiles(paths, ensemble.transform())
    loader = DataLoader(files, batch_size=ensemble.members[0].cfg.data.batch_size, num_workers=0, shuffle=False)
    n_classes = len(ensemble.classes)
    counts = np.zeros(n_classes, dtype=np.int64)
    total, masks = 0, {}
    for i, mask, _ in ensemble.predict_confident(loader, threshold, ignore_index):
        own = resize_labels(mask, files.sizes[i])
        name = f"{int(i):06d}.png"
        labelled = own[own != ignore_index]
        total += own.size
        if not labelled.size:  # nothing confident: the image would only cost training steps (and a batch of such is a NaN loss)
            continue
        counts += np.bincount(labelled, minlength=n_classes)[:n_classes]
        save_mask_png(Path(mask_dir) / name, own)
        masks[int(i)] = (name, *own.shape)
    return {"counts": counts.tolist(), "pixels": total, "masks": masks}
