"""Hyperparameter search: `python tune/search.py --space deeplab [--smoke] [--data DIR] [--resume --experiment NAME]`.

Ray Tune runs the core trainer once per sampled config (Optuna TPE + ASHA early stopping),
logs every trial to MLflow (one parent run, a child run per trial) and writes
results/<experiment>/leaderboard.csv and best_configs.yaml (the k-fold stage's input).
Without --address (or RAY_ADDRESS) it starts a local Ray on 127.0.0.1.
"""

from __future__ import annotations

import argparse

from training.cli import add_stage_options, run_cli
from tune.runner import SearchOptions, run_search, sync_mlflow


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="deeplab", help="config with distributions: a name in search_spaces/ or a path")
    add_stage_options(
        p,
        experiment="experiment name: results/<name>/ and the MLflow experiment (default: <space>-<time>)",
        data="dataset root (train.json, test.json, images); default: the config's data.root, else the embedded sample",
        smoke="tiny CPU search (64 px, 48 images, 6 trials, ASHA max_t 4): minutes on 2 cores",
        resume="continue the search --experiment NAME after a crash or Ctrl-C",
        mlflow="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite mlflow.db in the repo)",
    )
    p.add_argument("--num-samples", type=int, help="override search.num_samples")
    p.add_argument("--max-trial-cost", type=float, metavar="SECONDS",
                   help="skip a trial whose first epoch projects its training past SECONDS (overrides search.max_trial_cost)")
    p.add_argument("--retry-errored", action="store_true", help="with --resume: also retry errored trials from their last checkpoint")
    p.add_argument("--top-k-method", choices=("auto", "individual", "diverse"),
                   help="how best_configs.yaml's top-k are chosen: best val mIoU each (individual), greedy selection on the fold "
                        "ensemble's mIoU (diverse), or whichever ensemble scores higher on the fold (auto; search.top_k_method, default auto)")
    args = p.parse_args(argv)
    if args.num_samples is not None and args.num_samples < 1:
        p.error("--num-samples must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sync_mlflow:
        return 0 if sync_mlflow(args.experiment, args.mlflow_uri) == 0 else 1
    outcome = run_search(
        SearchOptions(
            space=args.space,
            data=args.data,
            experiment=args.experiment,
            num_samples=args.num_samples,
            resume=args.resume,
            smoke=args.smoke,
            mlflow_uri=args.mlflow_uri,
            address=args.address,
            retry_errored=args.retry_errored,
            max_trial_cost=args.max_trial_cost,
            top_k_method=args.top_k_method,
        )
    )
    return 130 if outcome.interrupted else 0


if __name__ == "__main__":
    run_cli(main)
