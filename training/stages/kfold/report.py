"""What a k-fold run reports: summary.json, the readable table, the MLflow ensemble run, the typed hand-off."""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import numpy as np

from training.engine import checkpoint
from training.evaluation.selection import MODES, SubsetScorer, subset_members
from training.evaluation.vote import VOTES
from training.handoff import KFOLD_RESULT, FoldModel, KFoldResult
from training.infra.fs import write_json
from training.stages.kfold.context import KFoldRun

SUMMARY = "summary.json"


def _nan_to_none(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if v is None or math.isnan(v) else v) for k, v in values.items()}


def _modes(scorer: SubsetScorer, mask: int) -> dict[str, float]:
    """The OOF mIoU of one subset under every (TTA mode, vote)."""
    return {f"{method}{'_tta' if mode == 'tta' else ''}": scorer.scores(mode, method, mask).miou for mode in MODES for method in VOTES}


def _fold_rows(run: KFoldRun, cand) -> list[dict[str, Any]]:
    rows = []
    for job in (j for j in run.jobs if j.cand is cand):
        metrics = checkpoint.read_metrics(job.out_dir)
        fold_oof = job.result.get("fold_oof", {})
        rows.append({
            "fold": job.fold,
            "val_miou": metrics["best_miou"],
            "best_epoch": metrics["best_epoch"],
            "epochs_trained": metrics["epochs_trained"],
            "oof_miou": fold_oof.get("plain"),
            "oof_miou_tta": fold_oof.get("tta"),
            "status": job.status,
            "checkpoint": str(job.out_dir / checkpoint.BEST),
            "mlflow_run_id": run.lineage.run_id(job.run_key) if run.lineage else None,
        })
    return rows


def build_summary(run: KFoldRun, scorer: SubsetScorer, selected: int, steps: list[dict], submission: dict) -> dict[str, Any]:
    """Everything summary.json reports: per (config, fold), per config, the ensembles, the submission."""
    configs = []
    for cand in run.candidates:
        folds = _fold_rows(run, cand)
        mask = 1 << cand.index  # a single config: soft and hard vote agree
        configs.append({
            "rank": cand.rank, "trial_id": cand.trial_id, "params": cand.params, "search_val_miou": cand.search_val_miou,
            "epochs": cand.epochs, "folds": folds, "mean_fold_val_miou": float(np.mean([f["val_miou"] for f in folds])),
            "oof_miou": scorer.scores("plain", "soft", mask).miou, "oof_miou_tta": scorer.scores("tta", "soft", mask).miou,
        })
    mode, vote, ranks = ("tta" if run.tta.enabled else "plain"), run.options.vote, [c.rank for c in run.candidates]
    chosen = scorer.scores(mode, vote, selected, run.data.classes)
    return {
        "experiment": run.best.experiment, "best_configs": str(run.best_path.resolve()), "kfold_dir": str(run.kfold_dir),
        "data_root": str(run.data.index.root), "fold_manifest": str(run.data.manifest.path), "n_folds": run.n_folds,
        "tta": run.tta.name, "vote": vote, "smoke": run.options.smoke, "configs": configs,
        "oof": {"images": run.oof_images, "score_size": run.score_size},
        "ensemble": {
            "candidates": ranks,
            "selection_metric": f"oof_miou_{vote}{'_tta' if run.tta.enabled else ''}",
            "selection_steps": [dict(s, subset=[ranks[i] for i in s["subset"]]) for s in steps],
            "selected_ranks": [ranks[i] for i in subset_members(selected)],
            "selected": _modes(scorer, selected),
            "all_candidates": _modes(scorer, 2 ** len(ranks) - 1),
            "oof_miou": chosen.miou,
            "per_class_iou": _nan_to_none(chosen.per_class_iou),
            "mean_fold_val_miou": float(np.mean([f["val_miou"] for c in configs for f in c["folds"]])),
        },
        "submission": submission,
        "timings": run.timings,
    }


def log_ensemble(run: KFoldRun, summary: dict, matrix: np.ndarray) -> str | None:
    """Per-config OOF on the parent; an ensemble run with scores, per-class IoU and the confusion matrix."""
    from training.evaluation.plots import CONFUSION, PER_CLASS_IOU, save_confusion, save_per_class_iou

    ens, lineage = summary["ensemble"], run.lineage
    tracker = lineage.tracker
    plots = run.kfold_dir / "plots"
    plots.mkdir(exist_ok=True)
    save_confusion(plots / CONFUSION, matrix, run.data.classes)
    save_per_class_iou(plots / PER_CLASS_IOU, {k: (np.nan if v is None else v) for k, v in ens["per_class_iou"].items()}, "ensemble OOF per-class IoU")
    # Other settings (a resumed run with another --tta) get an ensemble run of their own: MLflow
    # params are immutable, and each run then describes exactly one ensemble.
    digest = hashlib.sha256(json.dumps([ens, summary["submission"].get("key")], sort_keys=True, default=str).encode()).hexdigest()[:16]
    key = lineage.key("ensemble", digest)
    if tracker.ended(key):  # a resumed run that changed nothing logs nothing twice
        return lineage.run_id(key)
    lineage.run(key, "ensemble", "kfold_ensemble", {"segtune.ensemble_key": digest}, parent=run.parent)
    parent_metrics = {"ensemble_oof_miou": ens["oof_miou"]}
    for c in summary["configs"]:
        parent_metrics |= {f"oof_miou_rank{c['rank']}": c["oof_miou"], f"oof_miou_tta_rank{c['rank']}": c["oof_miou_tta"],
                           f"mean_fold_val_miou_rank{c['rank']}": c["mean_fold_val_miou"]}
    tracker.log_metrics(run.parent, parent_metrics)
    lineage.set_tags(run.parent, {"segtune.selected_ranks": ",".join(map(str, ens["selected_ranks"])), "segtune.tta": summary["tta"], "segtune.vote": summary["vote"]})
    metrics = {"oof_miou": ens["oof_miou"], "mean_fold_val_miou": ens["mean_fold_val_miou"]}
    metrics |= {f"oof_miou_{k}": v for k, v in ens["selected"].items()}
    metrics |= {f"oof_miou_all_{k}": v for k, v in ens["all_candidates"].items()}
    metrics |= {f"iou_{''.join(ch if ch.isalnum() else '_' for ch in n)}": v for n, v in ens["per_class_iou"].items() if v is not None}
    tracker.log_metrics(key, metrics)
    tracker.log_params(key, {"selected_ranks": ens["selected_ranks"], "candidates": ens["candidates"], "tta": summary["tta"], "vote": summary["vote"]})
    tracker.log_artifact(key, plots / CONFUSION)
    tracker.log_artifact(key, plots / PER_CLASS_IOU)
    tracker.log_text(key, json.dumps(summary, indent=1, default=str), "summary.json")
    lineage.set_tags(key, {"segtune.submission": summary["submission"]["path"]})
    tracker.end_run(key, "FINISHED")
    return key


def hand_off(run: KFoldRun, summary: dict) -> KFoldResult:
    """kfold_result.yaml: the selected configs' fold checkpoints and scores, for the stages after this one."""
    ens = summary["ensemble"]
    models = [FoldModel(rank=c["rank"], fold=f["fold"], checkpoint=f["checkpoint"], val_miou=f["val_miou"], epochs=f["epochs_trained"])
              for c in summary["configs"] if c["rank"] in ens["selected_ranks"] for f in c["folds"]]
    mlflow = summary.get("mlflow", {})
    result = KFoldResult(
        experiment=summary["experiment"], best_configs=summary["best_configs"], data_root=summary["data_root"],
        fold_manifest=summary["fold_manifest"], n_folds=summary["n_folds"], tta=summary["tta"], vote=summary["vote"],
        selected_ranks=ens["selected_ranks"], models=models, oof_miou=ens["oof_miou"], submission=summary["submission"]["path"],
        mlflow_tracking_uri=mlflow.get("tracking_uri"), mlflow_parent_run_id=mlflow.get("parent_run_id"),
    )
    result.write(run.kfold_dir / KFOLD_RESULT)
    return result


def finish(run: KFoldRun, scorer: SubsetScorer, selected: int, steps: list[dict], submission: dict) -> dict[str, Any]:
    """summary.json, the ensemble run, kfold_result.yaml and the printed table."""
    summary = build_summary(run, scorer, selected, steps, submission)
    mode = "tta" if run.tta.enabled else "plain"
    ensemble_key = log_ensemble(run, summary, scorer.matrix(mode, run.options.vote, selected))
    run.lineage.tracker.flush(10 if run.lineage.tracker.available else 0)  # the run ids, for the summary
    summary["mlflow"] = {"tracking_uri": run.lineage.tracker.uri, "experiment_id": run.lineage.tracker.experiments.get(run.best.experiment),
                         "parent_run_id": run.lineage.run_id(run.parent), "ensemble_run_id": run.lineage.run_id(ensemble_key) if ensemble_key else None}
    summary["wall_time_s"] = time.time() - run.started
    write_json(run.kfold_dir / SUMMARY, summary)
    hand_off(run, summary)
    run.log(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A readable table: per-fold val mIoU, per-config OOF, ensemble, submission, wall time."""
    n = summary["n_folds"]
    head = f"{'config':>6} {'trial':>12} " + " ".join(f"{'fold' + str(k):>7}" for k in range(n)) + f" {'mean':>7} {'OOF':>7} {'OOF+TTA':>8}"
    lines = [f"k-fold summary: {summary['experiment']} ({summary['oof']['images']} OOF images, TTA {summary['tta']})", head, "-" * len(head)]
    for c in summary["configs"]:
        folds = " ".join(f"{f['val_miou']:>7.4f}" for f in c["folds"])
        lines.append(f"{c['rank']:>6} {str(c['trial_id'])[-12:]:>12} {folds} {c['mean_fold_val_miou']:>7.4f} {c['oof_miou']:>7.4f} {c['oof_miou_tta']:>8.4f}")
    ens = summary["ensemble"]
    lines.append("-" * len(head))
    for label, scores in (("selected " + str(ens["selected_ranks"]), ens["selected"]), ("all " + str(ens["candidates"]), ens["all_candidates"])):
        lines.append(f"ensemble {label}: OOF soft {scores['soft']:.4f} hard {scores['hard']:.4f} | "
                     f"with TTA soft {scores['soft_tta']:.4f} hard {scores['hard_tta']:.4f}")
    lines.append(f"selected by {ens['selection_metric']}: {ens['oof_miou']:.4f} (mean single-fold val mIoU {ens['mean_fold_val_miou']:.4f})")
    sel, vote = ens["selected"], summary["vote"]
    if summary["tta"] != "none" and sel[f"{vote}_tta"] < sel[vote]:
        lines.append(f"note: TTA {summary['tta']} lowers the OOF mIoU ({sel[f'{vote}_tta']:.4f} < {sel[vote]:.4f}); consider --tta none")
    sub = summary["submission"]
    lines.append(f"submission: {sub['path']} ({sub['images']} images x {sub['models']} models, {sub['size']}x{sub['size']})")
    lines.append(f"wall time {summary['wall_time_s']:.0f}s (" + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in summary["timings"].items()) + ")")
    return "\n".join(lines)
