"""Single run: `python training/train.py --space deeplab --fold 0 [--data DIR] [--out DIR] [--smoke]`.

Trains the config's defaults on one fold, printing val mIoU per epoch; writes
OUT/metrics.json (best_miou, best_epoch, per_class_iou) and OUT/last.pt, OUT/best.pt.
`--fold holdout` trains on all of train.json and validates on data.val_json (default val.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from training.cli import run_cli
from training.config import REPO_ROOT, load_space
from training.data.dataset import prepare_data
from training.engine.trainer import LAST, METRICS, train
from training.errors import ConfigError

HOLDOUT = "holdout"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="deeplab", help="config: a name in search_spaces/ or a path")
    p.add_argument("--fold", default="0", help=f"fold of the 5-fold manifest, or '{HOLDOUT}': validate on data.val_json")
    p.add_argument("--data", help="dataset root (train.json, test.json, images); default: embedded sample")
    p.add_argument("--out", help="output directory (default: results/train/<name>-fold<k>-<time>)")
    p.add_argument("--epochs", type=int, help="override trainer.epochs")
    p.add_argument("--smoke", action="store_true", help="tiny, low-resolution CPU run (minutes on 2 cores)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {}
    if args.data:
        overrides["data.root"] = str(Path(args.data).resolve())
    if args.epochs:
        overrides["trainer.epochs"] = args.epochs
    if args.fold == HOLDOUT:
        fold, name = None, HOLDOUT
    elif args.fold.isdigit():
        fold, name = int(args.fold), f"fold{args.fold}"
    else:
        raise ConfigError(f"--fold {args.fold!r}: a fold number or '{HOLDOUT}'")
    space = load_space(args.space, smoke=args.smoke, overrides=overrides)
    cfg = space.defaults
    if fold is None and not cfg.data.val_json:
        space = load_space(args.space, smoke=args.smoke, overrides={**overrides, "data.val_json": "val.json"})
        cfg = space.defaults
    out = Path(args.out) if args.out else REPO_ROOT / "results" / "train" / f"{cfg.name}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    data = prepare_data(cfg)
    resume = out / LAST if args.resume and (out / LAST).is_file() else None
    result = train(cfg, data, fold, out, resume=resume)
    print(f"best val mIoU {result.best_miou:.4f} at epoch {result.best_epoch}; wrote {out / METRICS}")
    return 0


if __name__ == "__main__":
    run_cli(main)
