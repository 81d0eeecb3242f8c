"""Training-sample throughput of one process (= per core): our loader vs re-rasterising each time.

Every path runs deeplab.yaml's train augmentation (augment.train, then ToTensor: samples stay
uint8, the trainer normalises batches on its device) at --size. They differ in where the
image and the mask come from:
  cached:   what training uses by default: the mask .npy written once by MaskCache, the
            decoded image from ImageCache (data.image_cache: true);
  decoding: cached masks, the JPEG decoded every time (data.image_cache: false);
  naive:    the JPEG decoded and pycocotools annToMask for every annotation, largest painted
            first, on every call.
Target on CamVid at 512 px: >= 150 img/s per core and >= 5x the naive path.

    python benchmarks/loader.py --data ../shared/datasets/camvid --size 512 [--samples 200] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset root (train.json + images)")
    p.add_argument("--size", type=int, default=512, help="data.image_size")
    p.add_argument("--space", default="deeplab", help="config whose augment.train is measured")
    p.add_argument("--samples", type=int, default=200, help="samples per timed pass")
    p.add_argument("--repeats", type=int, default=5, help="timed passes; the median is reported")
    p.add_argument("--naive-samples", type=int, help="samples per naive pass (default: --samples / 4)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return p.parse_args(argv)


def single_core() -> None:
    """One process, one thread: what one DataLoader worker gets."""
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def naive_dataset(cached_ds, ann_path: Path):
    """The same dataset, but every __getitem__ rasterises its mask from the COCO polygons."""
    import numpy as np
    from pycocotools.coco import COCO

    from training.data.coco import read_image
    from training.data.dataset import SegmentationDataset

    with open(os.devnull, "w") as devnull:  # COCO() prints progress to stdout
        stdout, sys.stdout = sys.stdout, devnull
        try:
            coco = COCO(str(ann_path))
        finally:
            sys.stdout = stdout
    label = {cid: i + 1 for i, cid in enumerate(sorted(coco.getCatIds()))}

    class Naive(SegmentationDataset):
        def __getitem__(self, i: int):
            image_id = self.image_ids[i]
            image = read_image(self.index.image_path(image_id))
            out = self.transform(image=image, mask=self.mask(image_id))
            return out["image"], out["mask"], image_id

        @staticmethod
        def mask(image_id: int) -> np.ndarray:
            info = coco.imgs[image_id]
            mask = np.zeros((info["height"], info["width"]), np.uint8)
            for ann in sorted(coco.imgToAnns[image_id], key=lambda a: -a["area"]):
                mask[coco.annToMask(ann) > 0] = label[ann["category_id"]]
            return mask

    return Naive(cached_ds.index, cached_ds.cache, cached_ds.image_ids, cached_ds.transform)


def mask_ms(get_mask, image_ids, repeats: int) -> float:
    """Median CPU milliseconds to produce one mask."""
    runs = []
    for _ in range(repeats):
        start = time.process_time()
        for image_id in image_ids:
            get_mask(image_id)
        runs.append(1000 * (time.process_time() - start) / len(image_ids))
    return statistics.median(runs)


def throughput(ds, n: int, repeats: int) -> tuple[float, list[float], list[float]]:
    """Median samples per CPU-second over `repeats` passes of `n` samples, after a warm-up pass.

    The process runs one thread, so its CPU time is the time of one core; unlike wall time it
    does not count the moments other processes on a shared machine held the core.
    Returns (median per CPU-second, per-pass CPU rates, per-pass wall rates).
    """
    n = min(n, len(ds))
    for i in range(n):  # warm-up: page cache, lazy imports
        ds[i]
    cpu_rates, wall_rates = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            ds[i]
        cpu_rates.append(n / (time.process_time() - cpu))
        wall_rates.append(n / (time.perf_counter() - wall))
    return statistics.median(cpu_rates), cpu_rates, wall_rates


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    single_core()
    from training.config import load_space
    from training.data.dataset import SegmentationDataset, make_datasets, prepare_data

    cfg = load_space(args.space, overrides={
        "data.root": str(Path(args.data).resolve()), "data.image_size": args.size, "model.encoder_weights": None,
    }).defaults
    data = prepare_data(cfg, log=lambda _: None)
    train_ds, _ = make_datasets(cfg, data, fold=0)
    train_ds.transform.set_random_seed(0)
    image, mask, _ = train_ds[0]
    assert image.shape == (3, args.size, args.size) and mask.shape == (args.size, args.size)

    fast, fast_cpu, fast_wall = throughput(train_ds, args.samples, args.repeats)
    decoding_ds = SegmentationDataset(train_ds.index, train_ds.cache, train_ds.image_ids, train_ds.transform)  # data.image_cache: false
    decoding, _, _ = throughput(decoding_ds, args.samples, args.repeats)
    naive_ds = naive_dataset(train_ds, data.index.ann_path)
    naive, naive_cpu, naive_wall = throughput(naive_ds, args.naive_samples or max(8, args.samples // 4), args.repeats)
    mask_ids = train_ds.image_ids[: min(50, len(train_ds))]
    cached_mask_ms = mask_ms(train_ds.cache.load, mask_ids, args.repeats)
    naive_mask_ms = mask_ms(naive_ds.mask, mask_ids, args.repeats)
    result = {
        "img_per_s_per_core": round(fast, 1),
        "naive_img_per_s_per_core": round(naive, 1),
        "speedup": round(fast / naive, 2),
        "img_per_s_per_core_decoding": round(decoding, 1),
        "speedup_decoding": round(decoding / naive, 2),
        "mask_ms_cached": round(cached_mask_ms, 3),
        "mask_ms_naive": round(naive_mask_ms, 2),
        "wall_img_per_s": round(statistics.median(fast_wall), 1),
        "naive_wall_img_per_s": round(statistics.median(naive_wall), 1),
        "size": args.size,
        "samples": min(args.samples, len(train_ds)),
        "repeats": args.repeats,
        "augment": [t["name"] for t in cfg.augment.train],
        "runs_img_per_s": [round(r, 1) for r in fast_cpu],
        "naive_runs_img_per_s": [round(r, 1) for r in naive_cpu],
        "load_avg": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "data": str(Path(args.data).resolve()),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"train samples at {args.size}px, one process, one thread; {result['samples']} samples x {args.repeats} passes, "
              f"median samples per CPU-second (load average {result['load_avg']} on {result['cpu_count']} cores)")
        print(f"  cached masks + images         : {fast:7.1f} img/s per core (wall {result['wall_img_per_s']})  passes {result['runs_img_per_s']}")
        print(f"  cached masks, decoding JPEGs  : {decoding:7.1f} img/s per core ({decoding / naive:.2f}x naive)")
        print(f"  naive (pycocotools each call) : {naive:7.1f} img/s per core (wall {result['naive_wall_img_per_s']})  passes {result['naive_runs_img_per_s']}")
        print(f"  speedup                       : {fast / naive:7.2f}x")
        print(f"  mask alone: {cached_mask_ms:.3f} ms from the cache vs {naive_mask_ms:.2f} ms rasterising "
              f"({naive_mask_ms / cached_mask_ms:.0f}x); the rest of a sample is mostly augmentation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
