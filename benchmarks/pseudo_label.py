"""Pseudo-label rounds on CamVid: OOF mIoU of round 0 (the k-fold) vs rounds 1 and 2, with and without rare-class help.

CamVid's 233 test images (no annotations) are the unlabelled images. Two variants of one
DeepLabV3+ config of search_spaces/deeplab.yaml, each written as a one-config
best_configs.yaml by hand (no search), then the k-fold stage (round 0) and the pseudo-label
stage (rounds 1..--rounds, --min-delta 0):

- baseline: the config as resolved with this benchmark's CPU-scale overrides;
- rare: the same + `CopyPaste` of the --rare rarest classes (by pixel count in the annotated
  masks, computed here) as the first augment.train entry + `loss.class_weights: auto`.

Reported per variant and round: OOF mIoU (always on the same annotated validation folds),
the share of test pixels confidently pseudo-labelled, the OOF IoU of the rarest classes and
the round's wall time. Nothing is asserted; a round that does not raise OOF mIoU ends the
stage (its stopping rule), and the figures say so.

    python benchmarks/pseudo_label.py [--image-size 64] [--epochs 3] [--subset N] [--rounds 2] [--threshold 0.7]
        [--encoder resnet18] [--test-images N] [--data DIR] [--json]

--data defaults to SEGTUNE_CAMVID, else ../shared/datasets/camvid next to the repository.
Everything is written under a temp dir (SEGTUNE_RESULTS, the MLflow sqlite store, Ray's temp dir), removed at the end
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("baseline", "rare")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("SEGTUNE_CAMVID", str(REPO.parent / "shared" / "datasets" / "camvid")))
    p.add_argument("--image-size", type=int, default=64, help="training and scoring size (px, multiple of 32)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per fold, every round")
    p.add_argument("--subset", type=int, default=0, help="annotated images used, evenly spaced over the sequences (0: all 468)")
    p.add_argument("--test-images", type=int, default=0, help="test images pseudo-labelled (0: all 233)")
    p.add_argument("--rounds", type=int, default=2, help="pseudo-label rounds after the k-fold")
    p.add_argument("--threshold", type=float, default=0.7, help="a test pixel is labelled when the ensemble's top probability reaches this")
    p.add_argument("--encoder", default="resnet18", help="from scratch: no pretrained weights offline")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--rare", type=int, default=3, help="how many of the rarest classes CopyPaste pastes (and the table shows)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (checkpoints, MLflow store: gigabytes at full scale)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def write_data_root(source: Path, dest: Path, annotated: int, test_images: int) -> Path:
    """A data root of `annotated` CamVid training images spread evenly over the sequences (0: all 468) and the first
    `test_images` test images (0: all 233); images symlinked. Only these masks get rasterised into the cache."""
    from training.data.dataset import evenly_spaced

    dest.mkdir(parents=True, exist_ok=True)
    train = json.loads((source / "train.json").read_text())
    keep = set(evenly_spaced([im["id"] for im in train["images"]], annotated or None))
    train["images"] = [im for im in train["images"] if im["id"] in keep]
    train["annotations"] = [a for a in train["annotations"] if a["image_id"] in keep]
    (dest / "train.json").write_text(json.dumps(train))
    test = json.loads((source / "test.json").read_text())
    if test_images:
        test["images"] = sorted(test["images"], key=lambda im: im["id"])[:test_images]
    (dest / "test.json").write_text(json.dumps(test))
    (dest / "images").symlink_to((source / "images").resolve(), target_is_directory=True)
    return dest


def base_overrides(args, root: Path) -> dict:
    """deeplab.yaml at CPU scale: small images, from scratch, a learning rate for that, one core per fold."""
    return {
        "data.root": str(root), "data.image_size": args.image_size, "data.score_size": args.image_size,
        "data.batch_size": args.batch, "data.num_workers": 0,
        # consecutive frames are near-duplicates: runs of 12 frames of a sequence stay in one fold
        "folds.n_splits": args.folds, "folds.group_key": "sequence", "folds.group_size": 12,
        "augment.train": [{"name": "RandomResizedCrop", "scale": [0.5, 1.0], "p": 1.0}, {"name": "HorizontalFlip", "p": 0.5}],
        "model.encoder": args.encoder, "model.encoder_weights": None,
        "optimizer.lr": args.lr, "optimizer.encoder_lr_mult": 1.0, "scheduler.warmup_epochs": 0,
        "trainer.epochs": args.epochs, "trainer.amp": "off",
        "search.resources": {"cpu": 1, "gpu": 0},
    }


def rarest_classes(cfg, n: int, log) -> tuple[list[str], dict[str, float]]:
    """The `n` classes (Background aside) with the fewest pixels in the annotated masks used, and every class's pixel share."""
    from training.data.class_balance import pixel_counts
    from training.data.dataset import prepare_data

    data = prepare_data(cfg, log=log)
    counts, _ = pixel_counts(data.cache, data.index.image_ids, len(data.classes))
    shares = {c: float(k) / float(counts.sum()) for c, k in zip(data.classes, counts)}
    ranked = sorted((c for c in data.classes if c != "Background"), key=shares.get)
    return ranked[:n], shares


def variant_overrides(variant: str, rare: list[str], base: dict) -> dict:
    if variant == "baseline":
        return base
    paste = {"name": "CopyPaste", "classes": rare, "p": 0.5, "max_objects": 3}
    return base | {"augment.train": [paste, *base["augment.train"]], "loss.class_weights": "auto"}


def write_best_configs(results: Path, experiment: str, overrides: dict, uri: str, epochs: int) -> Path:
    """What tune/search.py would write for one config (its search never ran): rank 1, trained `epochs`."""
    from training.config import load_space
    from training.data.dataset import prepare_data
    from training.handoff import BestConfigs

    space = load_space("deeplab", overrides=overrides)
    cfg = space.resolve({})
    entry = {"rank": 1, "trial_id": f"{experiment}_1", "best_val_miou": None, "best_epoch": epochs, "epochs_trained": epochs,
             "checkpoint": None, "params": {}, "config": cfg.to_dict()}
    manifest = prepare_data(cfg, log=lambda _: None).manifest
    doc = BestConfigs(experiment=experiment, space=space.source, data_root=cfg.data.root, mlflow_tracking_uri=uri,
                      metric="val_miou", fold=0, fold_manifest=str(manifest.path), configs=[entry])
    path = results / experiment / "best_configs.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    return doc.write(path)


def run_variant(experiment: str, args, uri: str, log) -> dict:
    """Round 0 (the k-fold stage) and the pseudo-label rounds of one variant: the stage's summary plus wall times.

    When the stage fails (no test pixel reaches --threshold), the summary holds round 0 and the error line."""
    from training.errors import SegtuneError
    from training.stages.kfold import KFoldOptions, run_kfold
    from training.stages.pseudo_label.plan import PseudoOptions
    from training.stages.pseudo_label.stage import run_pseudo_label

    start = time.time()
    kfold = run_kfold(KFoldOptions(experiment=experiment, mlflow_uri=uri), log=log)
    kfold_s = time.time() - start
    try:
        summary = run_pseudo_label(PseudoOptions(experiment=experiment, rounds=args.rounds, threshold=args.threshold, min_delta=0.0,
                                                 mlflow_uri=uri), log=log)
    except SegtuneError as err:
        log(f"pseudo-label stage of {experiment} failed: {err}")
        ens = kfold["ensemble"]
        zero = {"round": 0, "oof_miou": ens["oof_miou"], "delta": None, "kept": True, "labels": None, "per_class_iou": ens["per_class_iou"]}
        summary = {"rounds": [zero], "final": {"round": 0}, "error": str(err)}
    summary["wall_s"] = {"kfold": round(kfold_s, 1), "pseudo": round(time.time() - start - kfold_s, 1)}
    return summary


def _round4(value):
    return None if value is None else round(value, 4)


def round_rows(summary: dict, rare: list[str]) -> list[dict]:
    rows = []
    for r in summary["rounds"]:
        labels, ious = r.get("labels") or {}, r.get("per_class_iou") or {}
        rows.append({
            "round": r["round"], "oof_miou": round(r["oof_miou"], 4), "delta": _round4(r["delta"]),
            "kept": r["kept"], "confident_share": _round4(labels.get("confident_share")), "pseudo_images": labels.get("images"),
            "rare_iou": {c: _round4(ious.get(c)) for c in rare},
            "rare_pseudo_share": {c: round(labels["class_share"].get(c, 0.0), 6) for c in rare} if labels else None,
            "per_class_iou": {c: _round4(v) for c, v in ious.items()},
            "wall_s": round(sum((r.get("timings") or {}).values()), 1) if r["round"] else None,  # the round's k-fold, labelling aside
        })
    return rows


@contextmanager
def stdout_to_stderr(active: bool):
    """With --json, everything the stages and Ray print goes to stderr (at the descriptor: Ray's workers too)."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def measure(args, work: Path, log) -> dict:
    from training.config import load_space
    from training.infra.ray import connect

    root = write_data_root(Path(args.data), work / "camvid", args.subset, args.test_images)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    base = base_overrides(args, root)
    rare, shares = rarest_classes(load_space("deeplab", overrides=base).resolve({}), args.rare, log)
    log("rarest classes by pixel share: " + ", ".join(f"{c} {100 * shares[c]:.2f}%" for c in rare))
    session = connect(num_cpus=os.cpu_count(), temp_dir=str(work / "ray"), log=log)  # one local Ray for every stage
    variants = {}
    try:
        for variant in args.variants.split(","):
            experiment = f"pseudo-bench-{variant}"
            write_best_configs(work / "results", experiment, variant_overrides(variant, rare, base), uri, args.epochs)
            summary = run_variant(experiment, args, uri, log)
            rows = round_rows(summary, rare)
            stopped = len(summary["rounds"]) - 1 < args.rounds
            variants[variant] = {"rounds": rows, "final_round": summary["final"]["round"], "stopped_early": stopped,
                                 "error": summary.get("error"), "wall_s": summary["wall_s"]}
    finally:
        session.close()
    annotated, tests = (len(json.loads((root / f).read_text())["images"]) for f in ("train.json", "test.json"))
    return {"annotated": annotated, "test_images": tests, "rare_classes": rare, "pixel_share": {c: round(v, 6) for c, v in shares.items()}, "variants": variants}


def print_figures(figures: dict) -> None:
    s = figures["settings"]
    rare = figures["rare_classes"]
    print(f"\nCamVid: {s['annotated']} annotated images ({s['folds']} grouped folds), {s['test_images']} test images pseudo-labelled; "
          f"DeepLabV3+ {s['encoder']} from scratch, {s['image_size']} px, {s['epochs']} epochs per fold, lr {s['lr']:g}, "
          f"threshold {s['threshold']}, min-delta 0")
    print("rarest classes (pixel share of the annotated masks): " + ", ".join(f"{c} {100 * figures['pixel_share'][c]:.2f}%" for c in rare))
    head = f"{'variant':>9} {'round':>5} {'OOF mIoU':>9} {'delta':>8} {'labelled':>9} " + " ".join(f"{c[:11]:>11}" for c in rare) + "  wall s"
    print(head + "\n" + "-" * len(head))
    for name, v in figures["variants"].items():
        for r in v["rounds"]:
            delta = "-" if r["delta"] is None else f"{r['delta']:+.4f}"
            labelled = "-" if r["confident_share"] is None else f"{100 * r['confident_share']:.1f}%"
            wall = v["wall_s"]["kfold"] if r["round"] == 0 else r["wall_s"]
            print(f"{name:>9} {r['round']:>5} {r['oof_miou']:>9.4f} {delta:>8} {labelled:>9} "
                  + " ".join(f"{_iou(r['rare_iou'][c]):>11}" for c in rare) + f"  {wall:.0f}")
        note = v["error"] or ("stopped early (a round did not raise OOF mIoU)" if v["stopped_early"] else "all rounds ran")
        print(f"{'':>9} final round {v['final_round']}; {note}")
    print("wall s: round 0 the whole k-fold stage; rounds 1.. their k-fold's train + OOF + submission (labelling aside)")
    print(f"wall time {figures['wall_s']:.0f} s; load average {figures['load_avg_before']} before, {figures['load_avg_after']} after "
          f"({figures['cpu_count']} cores)")


def _iou(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pseudo-bench-", dir="/tmp"))  # short: Ray's unix sockets live under it
    os.environ["SEGTUNE_RESULTS"] = str(work / "results")
    log = (lambda *_: None) if args.json else print
    load_before, start = os.getloadavg()[0], time.time()
    try:
        with stdout_to_stderr(args.json):
            measured = measure(args, work, log)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    figures = {
        "settings": {"annotated": measured.pop("annotated"), "test_images": measured.pop("test_images"), "folds": args.folds,
                     "encoder": args.encoder, "image_size": args.image_size, "epochs": args.epochs, "lr": args.lr,
                     "batch": args.batch, "threshold": args.threshold, "rounds": args.rounds, "min_delta": 0.0},
        **measured,
        "wall_s": round(time.time() - start, 1), "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count(), "work_dir": str(work) if args.keep else None,
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print_figures(figures)
    return figures


if __name__ == "__main__":
    main()
