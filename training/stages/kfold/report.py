"""What a k-fold run reports: summary.json, the readable table, the MLflow ensemble run, the typed hand-off."""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

import numpy as np

from training.engine import checkpoint
from training.evaluation.metrics import metric_key
from training.handoff import KFOLD_RESULT, KFoldResult
from training.infra.fs import write_json
from training.stages.kfold.context import KFoldRun
from training.stages.kfold.oof import Decisions

SUMMARY = "summary.json"
REGISTERED = "mlflow_models.json"  # "<tracking uri> <ensemble run id>" -> the model version registered from it


def _nan_to_none(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if v is None or math.isnan(v) else v) for k, v in values.items()}


def _fold_rows(run: KFoldRun, cand, tta_name: str) -> list[dict[str, Any]]:
    rows = []
    for job in (j for j in run.jobs if j.cand is cand):
        metrics = checkpoint.read_metrics(job.out_dir)
        fold_oof = job.result.get("fold_oof", {})
        rows.append({
            "fold": job.fold,
            "val_miou": metrics["best_miou"],
            "best_epoch": metrics["best_epoch"],
            "epochs_trained": metrics["epochs_trained"],
            "oof_miou": fold_oof.get("none"),
            "oof_miou_tta": fold_oof.get(tta_name),
            "status": job.status,
            "reused_from": job.reused_from,
            "checkpoint": str(job.out_dir / checkpoint.BEST),
            "mlflow_run_id": run.lineage.run_id(job.run_key) if run.lineage else None,
        })
    return rows


def build_summary(run: KFoldRun, decisions: Decisions, submission: dict) -> dict[str, Any]:
    """Everything summary.json reports: per (config, fold), per config, every decision and its candidates, the submission."""
    scorer, mode = decisions.scorer, decisions.tta.name
    configs = []
    for cand in run.candidates:
        folds = _fold_rows(run, cand, mode)
        mask = 1 << cand.index  # a single config: soft and hard vote agree
        configs.append({
            "key": cand.key, "experiment": cand.experiment, "rank": cand.rank, "trial_id": cand.trial_id, "params": cand.params,
            "search_val_miou": cand.search_val_miou, "epochs": cand.epochs, "folds": folds,
            "mean_fold_val_miou": float(np.mean([f["val_miou"] for f in folds])),
            "oof_miou": scorer.scores("none", "soft", mask).miou, "oof_miou_tta": scorer.scores(mode, "soft", mask).miou,
            "weight": decisions.weights[cand.index],
        })
    keys = [c.key for c in run.candidates]
    return {
        "experiment": run.name, "sources": [str(p.resolve()) for p, _ in run.sources], "best_configs": str(run.best_path.resolve()),
        "kfold_dir": str(run.kfold_dir), "data_root": str(run.data.index.root), "fold_manifest": str(run.data.manifest.path),
        "n_folds": run.n_folds, "tta": mode, "tta_allowed": run.tta.name, "vote": decisions.vote, "smoke": run.options.smoke,
        "configs": configs,
        "oof": {"images": run.oof_images, "score_size": run.score_size},
        "decisions": decisions.record,
        "ensemble": {
            "candidates": keys,
            "selected": [keys[i] for i in decisions.members],
            "selected_ranks": [run.candidates[i].rank for i in decisions.members],
            "weights": {keys[i]: decisions.weights[i] for i in decisions.members},
            "postprocess": decisions.postprocess.to_names(run.data.classes),
            "oof_miou": decisions.scores.miou,
            "per_class_iou": _nan_to_none(decisions.scores.per_class_iou),
            "mean_fold_val_miou": float(np.mean([f["val_miou"] for c in configs for f in c["folds"]])),
            "per_search": decisions.record["weights"]["per_search"],
            "notes": decisions.notes,
        },
        "submission": submission,
        "timings": run.timings,
    }


def log_ensemble(run: KFoldRun, summary: dict, matrix: np.ndarray) -> str | None:
    """Per-config OOF on the parent; an ensemble run with scores, per-class IoU and the confusion matrix. Returns its run key."""
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
        return key
    lineage.run(key, "ensemble", "kfold_ensemble", {"segtune.ensemble_key": digest}, parent=run.parent)
    parent_metrics = {"ensemble_oof_miou": ens["oof_miou"]}
    for c in summary["configs"]:
        parent_metrics |= {f"oof_miou_{metric_key(c['key'])}": c["oof_miou"], f"oof_miou_tta_{metric_key(c['key'])}": c["oof_miou_tta"],
                           f"mean_fold_val_miou_{metric_key(c['key'])}": c["mean_fold_val_miou"]}
    tracker.log_metrics(run.parent, parent_metrics)
    lineage.set_tags(run.parent, {"segtune.selected_ranks": ",".join(ens["selected"]), "segtune.tta": summary["tta"], "segtune.vote": summary["vote"]})
    decisions = summary["decisions"]
    metrics = {"oof_miou": ens["oof_miou"], "mean_fold_val_miou": ens["mean_fold_val_miou"],
               "oof_miou_before_postprocess": decisions["postprocess"]["oof_miou_before"]}
    metrics |= {f"oof_miou_tta_{metric_key(m)}": v for m, v in decisions["tta"]["candidates"].items()}
    metrics |= {f"oof_miou_vote_{v}": s for v, s in decisions["vote"]["candidates"].items()}
    metrics |= {f"oof_miou_weights_{w}": s for w, s in decisions["weights"]["candidates"].items()}
    metrics |= {f"oof_miou_search_{metric_key(e)}": v["oof_miou"] for e, v in ens["per_search"].items()}
    metrics |= {f"iou_{metric_key(n)}": v for n, v in ens["per_class_iou"].items() if v is not None}
    tracker.log_metrics(key, metrics)
    tracker.log_params(key, {"selected": ens["selected"], "weights": ens["weights"], "candidates": ens["candidates"], "tta": summary["tta"],
                             "vote": summary["vote"], "postprocess": ens["postprocess"] or "none"})
    tracker.log_text(key, json.dumps(decisions, indent=1, default=str), "decisions.json")
    tracker.log_artifact(key, plots / CONFUSION)
    tracker.log_artifact(key, plots / PER_CLASS_IOU)
    tracker.log_text(key, json.dumps(summary, indent=1, default=str), "summary.json")
    lineage.set_tags(key, {"segtune.submission": summary["submission"]["path"]})
    tracker.end_run(key, "FINISHED")
    return key


def hand_off(run: KFoldRun, summary: dict, decisions: Decisions) -> KFoldResult:
    """kfold_result.yaml: the selected ensemble (checkpoints relative to the k-fold directory) and its OOF score."""
    from training.stages.kfold.stage import ensemble_spec

    mlflow = summary.get("mlflow", {})
    result = KFoldResult(
        experiment=summary["experiment"], sources=summary["sources"], data_root=summary["data_root"],
        fold_manifest=summary["fold_manifest"], n_folds=summary["n_folds"], ensemble=ensemble_spec(run, decisions, relative=True),
        oof_miou=summary["ensemble"]["oof_miou"], decisions=str(run.kfold_dir / SUMMARY), submission=summary["submission"]["path"],
        mlflow_tracking_uri=mlflow.get("tracking_uri"), mlflow_parent_run_id=mlflow.get("parent_run_id"),
    )
    result.write(run.kfold_dir / KFOLD_RESULT)
    return result


def finish(run: KFoldRun, decisions: Decisions, submission: dict) -> dict[str, Any]:
    """summary.json, the ensemble run, kfold_result.yaml, the registered MLflow model and the printed table."""
    summary = build_summary(run, decisions, submission)
    ensemble_key = log_ensemble(run, summary, decisions.matrix)
    run.lineage.tracker.flush(10 if run.lineage.tracker.available else 0)  # the run ids, for the summary
    ensemble_run_id = run.lineage.run_id(ensemble_key) if ensemble_key else None
    summary["mlflow"] = {"tracking_uri": run.lineage.tracker.uri, "experiment_id": run.lineage.tracker.experiments.get(run.name),
                         "parent_run_id": run.lineage.run_id(run.parent), "ensemble_run_id": ensemble_run_id}
    summary["wall_time_s"] = time.time() - run.started
    write_json(run.kfold_dir / SUMMARY, summary)
    hand_off(run, summary, decisions)
    summary["mlflow"]["model"] = register_model(run, summary, ensemble_run_id)
    write_json(run.kfold_dir / SUMMARY, summary)
    run.log(format_summary(summary))
    return summary


def register_model(run: KFoldRun, summary: dict, run_id: str | None) -> dict[str, Any] | None:
    """The selected ensemble as a registered MLflow pyfunc model (name = the k-fold's name); None if MLflow is unreachable."""
    if run.options.retrain is not None:
        return None  # a later stage's round: that stage decides which round, if any, is delivered
    if run_id is None or not run.lineage.tracker.available:
        run.log("k-fold: MLflow is unreachable: the ensemble is not registered as a model (kfold_result.yaml serves predict.py)")
        return None
    from training.delivery.mlflow_model import log_ensemble_model
    from training.infra.fs import read_json

    registered = read_json(run.kfold_dir / REGISTERED, {}) or {}
    key = f"{run.lineage.tracker.uri} {run_id}"
    if key in registered:
        return registered[key]  # the same ensemble (its MLflow run is keyed by its content): registered once
    try:
        version = log_ensemble_model(run.kfold_dir / KFOLD_RESULT, run.lineage.tracker.uri, run_id, run.name, log=run.log)
    except Exception as err:  # the stage's results are on disk; a failed registration must not lose them
        run.log(f"k-fold: registering the ensemble in MLflow failed ({type(err).__name__}: {err}); kfold_result.yaml still serves predict.py")
        return None
    model = {"name": run.name, "version": version, "uri": f"models:/{run.name}/{version}"} if version else None
    write_json(run.kfold_dir / REGISTERED, registered | {key: model})
    return model


def format_summary(summary: dict[str, Any]) -> str:
    """A readable table: per-fold val mIoU, per-config OOF, every decision with its runner-up, submission, wall time."""
    n = summary["n_folds"]
    head = f"{'config':>10} {'trial':>12} " + " ".join(f"{'fold' + str(k):>7}" for k in range(n)) + f" {'mean':>7} {'OOF':>7} {'OOF+TTA':>8} {'weight':>6}"
    lines = [f"k-fold summary: {summary['experiment']} ({summary['oof']['images']} OOF images, TTA chosen {summary['tta']})", head, "-" * len(head)]
    for c in summary["configs"]:
        folds = " ".join(f"{f['val_miou']:>7.4f}" + ("*" if f.get("reused_from") else "") for f in c["folds"])
        lines.append(f"{c['key']:>10} {str(c['trial_id'])[-12:]:>12} {folds} {c['mean_fold_val_miou']:>7.4f} {c['oof_miou']:>7.4f} "
                     f"{c['oof_miou_tta']:>8.4f} {c['weight']:>6}")
    if any(f.get("reused_from") for c in summary["configs"] for f in c["folds"]):
        lines.append("* reused: trained earlier for the same config, fold, data and epochs")
    lines.append("-" * len(head))
    d, ens = summary["decisions"], summary["ensemble"]
    tta = d["tta"]
    runner = f"; runner-up {tta['runner_up']['choice']} {tta['runner_up']['oof_miou']:.4f}" if tta["runner_up"] else ""
    lines.append(f"TTA (OOF mIoU, best subset and vote): {tta['chosen']} {tta['oof_miou']:.4f}{runner} "
                 f"[" + ", ".join(f"{m} {v:.4f}" for m, v in sorted(tta["candidates"].items(), key=lambda kv: -kv[1])) + "]")
    lines.append("vote: " + d["vote"]["chosen"] + " [" + ", ".join(f"{v} {s:.4f}" for v, s in d["vote"]["candidates"].items()) + "]"
                 + (" (forced)" if d["vote"]["forced"] else ""))
    w = d["weights"]
    lines.append(f"members and weights: {w['chosen']} [" + ", ".join(f"{name} {score:.4f} {w[name]}" for name, score in
                                                                  sorted(w["candidates"].items(), key=lambda kv: -kv[1])) + "]")
    pp = d["postprocess"]
    lines.append(f"post-processing: {pp['chosen'] or 'none'} (OOF {pp['oof_miou_before']:.4f} -> {pp['oof_miou_after']:.4f}, "
                 f"{len(pp['candidates'])} candidates scored)")
    if len(ens["per_search"]) > 1:
        lines.append("each search alone: " + ", ".join(f"{e} {v['oof_miou']:.4f}" for e, v in ens["per_search"].items()))
    lines.append(f"ensemble {ens['weights']}: OOF mIoU {ens['oof_miou']:.4f} (mean single-fold val mIoU {ens['mean_fold_val_miou']:.4f})")
    for note in ens["notes"]:
        lines.append(f"note: {note}")
    sub = summary["submission"]
    lines.append(f"submission: {sub['path']} ({sub['images']} images x {sub['models']} models, {sub['size']}x{sub['size']})")
    model = summary.get("mlflow", {}).get("model")
    if model:
        lines.append(f"MLflow model: {model['uri']}")
    lines.append(f"wall time {summary['wall_time_s']:.0f}s (" + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in summary["timings"].items()) + ")")
    return "\n".join(lines)
