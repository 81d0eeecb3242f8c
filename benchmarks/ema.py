"""EMA of the weights on vs off: the val mIoU curve of the same run (config, fold, seed, batches) with and without trainer.ema.

Both runs train the deeplab space's defaults on the same fold with the same seed, so they see
the same batches in the same order; the only difference is that validation (and best.pt) use
the exponential moving average of the weights in the EMA run.

    python benchmarks/ema.py [--data DIR] [--epochs 12] [--image-size 96] [--subset 160] [--decay 0.99] [--warmup 1] [--json]

Default scale: CamVid (../shared/datasets/camvid or SEGTUNE_CAMVID), resnet18 from scratch, CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("SEGTUNE_CAMVID", str(REPO.parent / "shared" / "datasets" / "camvid")))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--subset", type=int, default=160, help="annotated images used (spread over the whole set)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--decay", type=float, default=0.99, help="EMA decay per optimizer step")
    p.add_argument("--warmup", type=int, default=1, help="epochs the average just follows the weights")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def run(args, ema: bool, work: Path) -> dict:
    from training.config import load_space
    from training.data.dataset import prepare_data
    from training.engine.trainer import train

    overrides = {"data.root": str(Path(args.data).resolve()), "data.image_size": args.image_size, "data.score_size": args.image_size,
                 "data.subset": args.subset, "data.batch_size": args.batch, "data.num_workers": 0, "model.encoder": "resnet18",
                 "model.encoder_weights": None, "trainer.epochs": args.epochs, "trainer.amp": "off", "trainer.overlays": 0,
                 "trainer.ema": {"decay": args.decay, "warmup": args.warmup} if ema else None}
    cfg = load_space("deeplab", overrides=overrides).defaults
    data = prepare_data(cfg, log=lambda _: None)
    started = time.perf_counter()
    result = train(cfg, data, args.fold, work / ("ema" if ema else "plain"), log=lambda _: None)
    return {"val_miou": [round(h["val_miou"], 4) for h in result.history], "best_miou": round(result.best_miou, 4),
            "best_epoch": result.best_epoch, "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ema-bench-"))
    os.environ.setdefault("SEGTUNE_RESULTS", str(work / "results"))
    plain, ema = run(args, False, work), run(args, True, work)
    figures = {"epochs": args.epochs, "image_size": args.image_size, "subset": args.subset, "fold": args.fold, "decay": args.decay,
               "warmup": args.warmup, "plain": plain, "ema": ema, "best_gain": round(ema["best_miou"] - plain["best_miou"], 4),
               "last_gain": round(ema["val_miou"][-1] - plain["val_miou"][-1], 4)}
    if args.json:
        print(json.dumps(figures))
        return figures
    print(f"resnet18 DeepLabV3+, {args.subset} CamVid images at {args.image_size} px, fold {args.fold}, {args.epochs} epochs; "
          f"EMA decay {args.decay}, warmup {args.warmup}")
    print(f"{'epoch':>5} {'plain':>7} {'EMA':>7}")
    for epoch, (a, b) in enumerate(zip(plain["val_miou"], ema["val_miou"]), start=1):
        print(f"{epoch:>5} {a:>7.4f} {b:>7.4f}")
    print(f"best  {plain['best_miou']:>7.4f} {ema['best_miou']:>7.4f}  (epochs {plain['best_epoch']} / {ema['best_epoch']}); "
          f"EMA - plain: best {figures['best_gain']:+.4f}, last epoch {figures['last_gain']:+.4f}")
    return figures


if __name__ == "__main__":
    main()
