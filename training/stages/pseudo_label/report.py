"""What the pseudo-label stage reports: each round's record, summary.json (every round, the final one) and a table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from training.handoff import KFOLD_RESULT, KFoldResult, PseudoLabelSet
from training.infra.fs import read_json, write_json
from training.stages.pseudo_label.plan import Log, PseudoPlan

SUMMARY = "summary.json"
WEAKEST_SHOWN = 3  # classes whose OOF IoU per round the table shows


def _kfold_summary(kfold_result: Path) -> dict[str, Any]:
    return read_json(Path(KFoldResult.read(kfold_result).decisions), {}) or {}


def round_zero(plan: PseudoPlan) -> dict[str, Any]:
    """The k-fold the stage starts from, as round 0."""
    summary = _kfold_summary(plan.kfold_path)
    return {"round": 0, "oof_miou": plan.kfold.oof_miou, "delta": None, "kept": True, "kfold_result": str(plan.kfold_path.resolve()),
            "submission": plan.kfold.submission, "per_class_iou": summary.get("ensemble", {}).get("per_class_iou", {}),
            "mlflow_parent_run_id": plan.kfold.mlflow_parent_run_id, "labels": None, "labelled_by": None}


def round_record(plan: PseudoPlan, r: int, round_dir: Path, labels: PseudoLabelSet, best: dict[str, Any], previous: Path) -> dict[str, Any]:
    """A finished round: its OOF figures (the round's k-fold summary), its labels and its change against the best round before it."""
    summary = read_json(round_dir / "summary.json", {}) or {}
    ens = summary["ensemble"]
    sources = [im.source for im in labels.images]
    return {
        "round": r, "oof_miou": ens["oof_miou"], "delta": ens["oof_miou"] - best["oof_miou"], "compared_with_round": best["round"],
        "kfold_result": str((round_dir / KFOLD_RESULT).resolve()), "submission": summary["submission"]["path"],
        "per_class_iou": ens["per_class_iou"], "selected": ens["selected"], "weights": ens["weights"], "tta": summary["tta"],
        "vote": summary["vote"], "mlflow_parent_run_id": (summary.get("mlflow") or {}).get("parent_run_id"),
        "labelled_by": str(previous.resolve()),
        "labels": {"path": str((round_dir / "pseudo_labels.yaml").resolve()), "images": len(labels.images),
                   "test": sources.count("test"), "unlabelled": sources.count("unlabelled"), "threshold": labels.threshold,
                   "confident_share": labels.confident_share, "class_share": labels.class_share},
        "timings": summary.get("timings", {}),
    }


def write_summary(plan: PseudoPlan, rounds: list[dict[str, Any]], final: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    summary = {"experiment": plan.name, "kfold_result": str(plan.kfold_path.resolve()), "threshold": plan.options.threshold,
               "min_delta": plan.options.min_delta, "warm_start": plan.options.warm_start, "ignore_index": plan.ignore_index,
               "images": {"test": sum(i.source == "test" for i in plan.images), "unlabelled": sum(i.source == "unlabelled" for i in plan.images)},
               "rounds": rounds, "final": final, **extra}
    write_json(plan.out_dir / SUMMARY, summary)
    return summary


def finish(plan: PseudoPlan, rounds: list[dict[str, Any]], log: Log) -> dict[str, Any]:
    """The best round (highest OOF mIoU among the kept ones) names the final submission."""
    best = max((r for r in rounds if r["kept"]), key=lambda r: r["oof_miou"])
    final = {"round": best["round"], "oof_miou": best["oof_miou"], "submission": best["submission"], "kfold_result": best["kfold_result"]}
    summary = write_summary(plan, rounds, final, finished_at=time.time())
    log(format_summary(summary))
    return summary


def _weakest(rounds: list[dict[str, Any]]) -> list[str]:
    """The classes the k-fold (round 0) scored lowest out-of-fold: where a round has most to gain or lose."""
    ious = {c: v for c, v in (rounds[0].get("per_class_iou") or {}).items() if v is not None}
    return sorted(ious, key=ious.get)[:WEAKEST_SHOWN]


def format_summary(summary: dict[str, Any]) -> str:
    rounds = summary["rounds"]
    weakest = _weakest(rounds)
    head = f"{'round':>5} {'OOF mIoU':>9} {'delta':>8} {'labelled':>9} " + " ".join(f"{c[:12]:>12}" for c in weakest) + "  status"
    lines = [f"pseudo-label summary: {summary['experiment']} (threshold {summary['threshold']}, {summary['images']['test']} test + "
             f"{summary['images']['unlabelled']} unlabelled images; after 'labelled': OOF IoU of the classes the k-fold scored lowest)", head, "-" * len(head)]
    for r in rounds:
        delta = "-" if r["delta"] is None else f"{r['delta']:+.4f}"
        labelled = "-" if not r["labels"] else f"{100 * r['labels']['confident_share']:.1f}%"
        ious = " ".join(f"{_iou(r, c):>12}" for c in weakest)
        status = "k-fold" if r["round"] == 0 else ("kept" if r["kept"] else f"no gain (< {summary['min_delta']}): stopped")
        lines.append(f"{r['round']:>5} {r['oof_miou']:>9.4f} {delta:>8} {labelled:>9} {ious}  {status}")
    final = summary["final"]
    lines.append(f"final: round {final['round']} (OOF mIoU {final['oof_miou']:.4f}): {final['submission']}")
    return "\n".join(lines)


def _iou(record: dict[str, Any], cls: str) -> str:
    value = (record.get("per_class_iou") or {}).get(cls)
    return "-" if value is None else f"{value:.4f}"
