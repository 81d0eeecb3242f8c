"""Five-fold retraining of the search's best configs, OOF ensemble selection and submission.

    python training/final_kfold.py [--experiment NAME [--experiment NAME2 ...] [--name ENSEMBLE]] [--top-k K]
        [--data DIR] [--epochs N] [--tta flip,scale [--fixed-tta]] [--scales 0.75,1.0,1.25]
        [--vote auto|soft|hard] [--weights auto|equal|greedy] [--postprocess auto|none|min_area]
        [--png] [--smoke] [--resume] [--address ADDR] [--mlflow-uri URI] [--sync-mlflow]

Reads results/<experiment>/best_configs.yaml (default: the newest), writes
results/<experiment>/kfold/ (checkpoints per config and fold, summary.json, submission.csv,
kfold_result.yaml); with several experiments, results/<name>/kfold/. TTA views, vote, members
and weights and post-processing are chosen by out-of-fold mIoU; flags constrain the choice.
"""

from __future__ import annotations

import argparse

from training.cli import add_stage_options, run_cli
from training.errors import ConfigError
from training.evaluation.tta import DEFAULT_SCALES, TTA_TOKENS
from training.evaluation.vote import VOTES
from training.stages.kfold.plan import AUTO, DEFAULT_TTA, MAX_TOP_K, POSTPROCESS, SMOKE_TTA, WEIGHTS, KFoldOptions
from training.stages.kfold.stage import run_kfold, sync_mlflow


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_stage_options(
        p,
        experiment="results/<NAME> (or a path to its best_configs.yaml); default: the newest finished search. "
                   "Repeat it to ensemble several searches",
        data="dataset root; default: best_configs' data_root, else the embedded sample",
        smoke="64 px, small subset, at most 4 epochs (the smoke search's max_t), CPU-sized resources",
        resume="continue an earlier run: finished folds are skipped, half-trained ones resume",
        mlflow="MLflow tracking URI (default MLFLOW_TRACKING_URI, else the search's)",
        several_experiments=True,
    )
    p.add_argument("--name", help="with several --experiment: the ensemble's name, results/<name>/kfold (default: the names joined by '+')")
    p.add_argument("--top-k", type=int, default=1, help=f"how many of each search's best configs to retrain and ensemble (<= {MAX_TOP_K} in all; default 1)")
    p.add_argument("--epochs", type=int, help="epochs per fold; default: the epochs each config reached in the search")
    p.add_argument("--tta", help=f"the test-time augmentation views OOF may choose from, comma-separated from {list(TTA_TOKENS)}; "
                                 f"default {DEFAULT_TTA!r} ({SMOKE_TTA!r} with --smoke)")
    p.add_argument("--fixed-tta", action="store_true", help="use exactly the --tta views (OOF still scores the others and says if one is better)")
    p.add_argument("--scales", type=_scales, default=DEFAULT_SCALES, help="scales of the 'scale' TTA (default 0.75,1.0,1.25)")
    p.add_argument("--vote", choices=(AUTO, *VOTES), default=AUTO, help="soft: mean probability; hard: majority of labels; auto: chosen on OOF (default)")
    p.add_argument("--weights", choices=(AUTO, *WEIGHTS), default=AUTO,
                   help="equal: the best subset of configs, equal weights; greedy: forward selection with replacement; auto: chosen on OOF (default)")
    p.add_argument("--postprocess", choices=(AUTO, *POSTPROCESS), default=AUTO,
                   help="min_area: remove per class components smaller than a size searched on OOF; auto (default): only where OOF improves")
    p.add_argument("--png", action="store_true", help="also write test masks as PNGs under kfold/test_masks/")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"--epochs: must be >= 1, got {args.epochs}")
    experiments = args.experiment or []
    options = KFoldOptions(
        experiment=experiments[0] if len(experiments) == 1 else None,
        experiments=experiments if len(experiments) > 1 else [],
        name=args.name,
        fixed_tta=args.fixed_tta,
        weights=args.weights,
        postprocess=args.postprocess,
        top_k=args.top_k,
        data=args.data,
        epochs=args.epochs,
        tta=args.tta,
        scales=args.scales,
        vote=args.vote,
        smoke=args.smoke,
        resume=args.resume,
        address=args.address,
        mlflow_uri=args.mlflow_uri,
        png=args.png,
    )
    if args.sync_mlflow:
        return 0 if sync_mlflow(options) == 0 else 1
    run_kfold(options)
    return 0


if __name__ == "__main__":
    run_cli(main)
