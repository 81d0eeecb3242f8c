"""Pseudo-label rounds after the k-fold: label the test (and unlabelled) images with the ensemble, retrain every fold with them.

    python training/pseudo_label.py [--experiment NAME] [--rounds N] [--threshold P] [--unlabelled DIR]
        [--min-delta D] [--warm-start] [--data DIR] [--epochs N] [--smoke] [--resume]
        [--address ADDR] [--mlflow-uri URI] [--sync-mlflow]

Starts from results/<NAME>/kfold/kfold_result.yaml (default: the newest finished k-fold) and
writes results/<NAME>/pseudo/round<N>/ (labels, checkpoints, summary.json, submission.csv) and
pseudo/summary.json (every round's OOF mIoU; the best round's submission is the final one).
Pseudo-labelled images join the training side of every fold only: OOF mIoU is always measured
on the annotated validation folds, so rounds compare on the same real labels.
"""

from __future__ import annotations

import argparse

from training.cli import add_stage_options, run_cli
from training.stages.pseudo_label.plan import SMOKE_THRESHOLD, THRESHOLD, PseudoOptions
from training.stages.pseudo_label.stage import run_pseudo_label, sync_mlflow


def parse_args(argv=None) -> argparse.Namespace:
    defaults = PseudoOptions()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stage_options(
        p,
        experiment="the k-fold to start from: results/<NAME>/kfold (or its directory or kfold_result.yaml); default: the newest",
        data="dataset root; default: the k-fold's",
        smoke="the k-fold's --smoke sizes (64 px, small subset, CPU-sized resources)",
        resume="continue an earlier run: finished rounds and folds are kept, half-trained folds resume",
        mlflow="MLflow tracking URI (default MLFLOW_TRACKING_URI, else the k-fold's)",
    )
    p.add_argument("--rounds", type=int, default=defaults.rounds, help=f"at most this many rounds (default {defaults.rounds})")
    p.add_argument("--threshold", type=float, help=f"a pixel is labelled when the ensemble's top probability reaches this, else the loss "
                                                   f"ignores it (default {THRESHOLD}; {SMOKE_THRESHOLD} with --smoke)")
    p.add_argument("--unlabelled", help="a folder of extra images without annotations to pseudo-label too")
    p.add_argument("--epochs", type=int, help="epochs per fold; default: what the k-fold trained each config")
    p.add_argument("--min-delta", type=float, default=defaults.min_delta,
                   help=f"stop when a round raises OOF mIoU by less than this (default {defaults.min_delta})")
    p.add_argument("--warm-start", action="store_true", help="each fold starts from the previous round's checkpoint of the same fold")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = PseudoOptions(experiment=args.experiment, rounds=args.rounds, threshold=args.threshold, unlabelled=args.unlabelled,
                            data=args.data, epochs=args.epochs, min_delta=args.min_delta, warm_start=args.warm_start,
                            smoke=args.smoke, resume=args.resume, address=args.address, mlflow_uri=args.mlflow_uri)
    if args.sync_mlflow:
        return 0 if sync_mlflow(options) == 0 else 1
    run_pseudo_label(options)
    return 0


if __name__ == "__main__":
    run_cli(main)
