"""Ensemble inference throughput: a 5-fold x 1-config ensemble, with and without TTA.

    python benchmarks/ensemble_inference.py [--size 256] [--encoder mobilenet_v2] [--images 16] [--repeats 3] [--json]

Runs the same code path as the submission (evaluation/ensemble.iter_predictions: every member's
TTA probabilities at its input size, soft vote, argmax, the label mask resized nearest to
256x256) on CUDA when available (AMP as the trainer uses it), else CPU. Weights are random: throughput does not depend on them. Pass
--checkpoints 'results/<exp>/kfold/1/fold*/best.pt' to time real trained members instead.
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import statistics
import sys
import time

import torch

from training.config import load_space
from training.engine.trainer import amp_dtype
from training.evaluation.ensemble import iter_predictions
from training.evaluation.members import Member, load_member
from training.evaluation.tta import TTA
from training.evaluation.submission import SUBMISSION_SIZE
from training.modeling.models import arch_spec, build_model

TTA_SETTINGS = ("none", "hflip", "flip,scale")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256, help="model input side (multiple of 32)")
    p.add_argument("--arch", default="DeepLabV3Plus")
    p.add_argument("--encoder", default="mobilenet_v2")
    p.add_argument("--folds", type=int, default=5, help="ensemble members (one config x this many folds)")
    p.add_argument("--images", type=int, default=16, help="images timed per setting")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per setting; the median is reported")
    p.add_argument("--tta", default=";".join(TTA_SETTINGS), help="';'-separated TTA settings to time")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--checkpoints", help="glob of best.pt files to use instead of random members")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p.parse_args(argv)


def members_for(args, device: torch.device) -> list[Member]:
    if args.checkpoints:
        paths = sorted(glob.glob(args.checkpoints))
        if not paths:
            sys.exit(f"error: --checkpoints {args.checkpoints!r} matches no file")
        return [load_member(p, 1, device) for p in paths]
    space = load_space("deeplab", overrides={"data.image_size": args.size, "model.arch": args.arch,
                                             "model.encoder": args.encoder, "model.encoder_weights": None})
    cfg = space.defaults
    out = []
    for fold in range(args.folds):
        torch.manual_seed(fold)
        model = build_model(cfg.model, 11).to(device).eval()
        out.append(Member(1, fold, model, cfg, 0, arch_spec(cfg.model.arch).divisor, amp_dtype("auto", device)))
    return out


def time_setting(members, images: torch.Tensor, batch: int, tta: TTA, device: torch.device, repeats: int) -> list[float]:
    """img/s of each of `repeats` passes over `images`, after one warm-up batch."""
    loader = [((images[i : i + batch],), list(range(i, min(i + batch, len(images))))) for i in range(0, len(images), batch)]
    list(iter_predictions(members, loader[:1], (SUBMISSION_SIZE, SUBMISSION_SIZE), tta, "soft", device))  # warm-up
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        n = sum(1 for _ in iter_predictions(members, loader, (SUBMISSION_SIZE, SUBMISSION_SIZE), tta, "soft", device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - start))
    return rates


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    members = members_for(args, device)
    size = members[0].cfg.data.image_size if args.checkpoints else args.size
    images = torch.randn(args.images, 3, size, size, device=device)
    results = []
    for spec in args.tta.split(";"):
        tta = TTA.parse(spec)
        rates = time_setting(members, images, args.batch, tta, device, max(1, args.repeats))
        ips = statistics.median(rates)
        results.append({"tta": tta.name, "views": len(tta.views()), "img_per_s": round(ips, 2),
                        "img_per_s_runs": [round(r, 2) for r in rates],
                        "forward_passes_per_s": round(ips * len(tta.views()) * len(members), 1)})
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "amp": str(members[0].dtype or "off"),
        "model": f"{members[0].cfg.model.arch}/{members[0].cfg.model.encoder}",
        "members": len(members),
        "input_size": size,
        "output_size": SUBMISSION_SIZE,
        "batch": args.batch,
        "images": args.images,
        "results": results,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['members']} x {report['model']} at {size}px -> {SUBMISSION_SIZE}px on {report['device']} (amp {report['amp']})")
    print(f"{'TTA':<32} {'views':>5} {'img/s':>9} {'fwd/s':>9}")
    for r in results:
        print(f"{r['tta']:<32} {r['views']:>5} {r['img_per_s']:>9.2f} {r['forward_passes_per_s']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
