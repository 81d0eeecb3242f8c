"""The pseudo-label stage as a short script: per round, label -> retrain every fold (the k-fold stage) -> compare OOF -> go on or stop.

Output, under results/<name>/pseudo/ (<name>: the k-fold's):
    plan.json                     the options (a resumed run must agree with them)
    round<N>/labels/*.png         the round's pseudo labels: the previous round's ensemble, confident pixels only
    round<N>/pseudo_labels.yaml   their list (training/handoff.PseudoLabelSet), a config's data.pseudo_labels
    round<N>/...                  the round's k-fold: <config>/fold<k>/, summary.json, submission.csv, kfold_result.yaml
    summary.json                  every round's OOF mIoU and labels; the best round and its submission (the final one)
Round 0 is the k-fold itself. The validation folds never change, so every round's OOF mIoU is measured on the same real labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.errors import SegtuneError
from training.evaluation.metrics import metric_key
from training.handoff import KFOLD_RESULT, PSEUDO_LABELS, KFoldResult, PseudoImage, PseudoLabelSet
from training.infra.fs import check_writable, read_json, write_json
from training.infra.lineage import new_stage_id
from training.infra.locks import StageLock
from training.stages.kfold import OUTBOX, KFoldOptions, Retrain, RetrainConfig, run_kfold
from training.stages.pseudo_label import report
from training.stages.pseudo_label.plan import PLAN, Log, PseudoOptions, PseudoPlan, build_plan, check_plan_file, find_kfold_result

LABEL_CHUNK = 256  # images per labelling task: a cluster labels several chunks at once


def run_pseudo_label(options: PseudoOptions, log: Log = print) -> dict[str, Any]:
    """The whole stage; returns the summary (also written to pseudo/summary.json)."""
    from training.infra.ray import connect

    plan = build_plan(options, log)
    check_writable(plan.out_dir, "the pseudo-label stage writes its rounds there (SEGTUNE_RESULTS moves the results root)")
    with StageLock(plan.out_dir, "pseudo-label"):
        plan_doc = check_plan_file(plan.out_dir, options, plan.kfold_path, new_stage_id())
        plan.stage_id = plan_doc["stage_id"]
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(plan.out_dir / PLAN, plan_doc)
        log(f"pseudo-label: {plan.name}: up to {options.rounds} rounds from {plan.kfold_path} (OOF mIoU {plan.kfold.oof_miou:.4f}), "
            f"{len(plan.images)} images to label, threshold {options.threshold}, configs {sorted(plan.epochs)} -> {plan.out_dir}")
        plan.ray = connect(options.address, log=log)  # one Ray for every round (each round's k-fold joins it)
        try:
            rounds = run_rounds(plan, log)
        finally:
            plan.ray.close()
        return report.finish(plan, rounds, log)


def run_rounds(plan: PseudoPlan, log: Log) -> list[dict[str, Any]]:
    """Round 0 (the k-fold), then rounds until one does not raise OOF mIoU by --min-delta."""
    rounds = [report.round_zero(plan)]
    best, previous = rounds[0], plan.kfold_path
    for r in range(1, plan.options.rounds + 1):
        record = run_round(plan, r, previous, best, log)
        record["kept"] = record["oof_miou"] >= best["oof_miou"] + plan.options.min_delta
        rounds.append(record)
        report.write_summary(plan, rounds)
        if not record["kept"]:
            log(f"pseudo-label: round {r}: OOF mIoU {record['oof_miou']:.4f} vs {best['oof_miou']:.4f} (round {best['round']}): "
                f"less than --min-delta {plan.options.min_delta} better; stopping")
            break
        best, previous = record, Path(record["kfold_result"])
    return rounds


def run_round(plan: PseudoPlan, r: int, previous: Path, best: dict[str, Any], log: Log) -> dict[str, Any]:
    round_dir = plan.out_dir / f"round{r}"
    labels_path = label_round(plan, r, previous, log)
    labels = PseudoLabelSet.read(labels_path)
    if (round_dir / KFOLD_RESULT).is_file():
        log(f"pseudo-label: round {r}: already trained and scored ({round_dir})")
    else:
        run_kfold(kfold_options(plan, r, previous, labels_path, labels, best), log=log)
    return report.round_record(plan, r, round_dir, labels, best, previous)


def kfold_options(plan: PseudoPlan, r: int, previous: Path, labels_path: Path, labels: PseudoLabelSet, best: dict) -> KFoldOptions:
    """The round's k-fold: the k-fold's selected configs, pseudo labels on every fold's training side, linked in MLflow."""
    round_dir, opts = plan.out_dir / f"round{r}", plan.options
    dirs = config_dirs(previous) if opts.warm_start else {}
    configs = [RetrainConfig(exp, rank, epochs, str(dirs[(exp, rank)]) if dirs else None) for (exp, rank), epochs in sorted(plan.epochs.items())]
    metrics = {"pseudo_round": r, "oof_miou_before": best["oof_miou"], "pseudo_images": len(labels.images),
               "pseudo_confident_share": labels.confident_share} | {f"pseudo_share_{metric_key(c)}": v for c, v in labels.class_share.items()}
    retrain = Retrain(configs, round_dir, overrides={"data.pseudo_labels": str(labels_path.resolve()), "loss.ignore_index": labels.ignore_index},
                      run_name=f"pseudo round {r}", upstream_run_id=plan.kfold.mlflow_parent_run_id, parent_metrics=metrics,
                      parent_tags={"segtune.pseudo_round": r, "segtune.pseudo_labels": labels_path.resolve(), "segtune.labelled_by": previous.resolve()})
    sources = [str(s) for s in plan.sources]
    return KFoldOptions(experiment=sources[0] if len(sources) == 1 else None, experiments=sources if len(sources) > 1 else [],
                        name=plan.name, data=plan.data_root, smoke=opts.smoke, resume=(round_dir / "plan.json").is_file(),
                        address=opts.address, mlflow_uri=opts.mlflow_uri, retrain=retrain)


def config_dirs(kfold_result: Path) -> dict[tuple[str, int], Path]:
    """(experiment, rank) -> the directory holding that config's fold<k>/ runs in a k-fold (or round) directory."""
    summary = read_json(Path(KFoldResult.read(kfold_result).decisions), {}) or {}
    return {(c["experiment"], c["rank"]): kfold_result.parent / str(c["key"]) for c in summary.get("configs", [])}


def label_round(plan: PseudoPlan, r: int, previous: Path, log: Log) -> Path:
    """The round's pseudo_labels.yaml: every image labelled by the previous round's ensemble (kept when already made so)."""
    path = plan.out_dir / f"round{r}" / PSEUDO_LABELS
    if path.is_file():
        done = PseudoLabelSet.read(path)
        if done.ensemble == str(previous.resolve()) and done.threshold == plan.options.threshold:
            log(f"pseudo-label: round {r}: labels already made ({path})")
            return path
    ensemble = KFoldResult.read(previous).ensemble
    log(f"pseudo-label: round {r}: labelling {len(plan.images)} images with {previous.parent.name}'s ensemble "
        f"({len(ensemble.members)} models, {ensemble.vote} vote), pixels below {plan.options.threshold} ignored")
    counts, pixels, images = label_images(plan, previous, path.parent / "labels", log)
    classes = list(ensemble.classes)
    if not images:
        raise SegtuneError(f"pseudo-label: round {r}: no pixel of the {len(plan.images)} images reaches --threshold {plan.options.threshold} "
                           f"under {previous.parent.name}'s ensemble; lower --threshold")
    log(f"pseudo-label: round {r}: {len(images)} of {len(plan.images)} images have confident pixels ({100 * sum(counts) / pixels:.1f}% of all pixels)")
    PseudoLabelSet(classes=classes, ignore_index=plan.ignore_index, threshold=plan.options.threshold, ensemble=str(previous.resolve()),
                   images=images, confident_share=sum(counts) / pixels,
                   class_share={c: n / pixels for c, n in zip(classes, counts)}).write(path)
    return path


def label_images(plan: PseudoPlan, previous: Path, mask_dir: Path, log: Log) -> tuple[list[int], int, list[PseudoImage]]:
    """Label every image in chunks, one Ray task each; (confident pixels per class, all pixels, the images)."""
    import ray

    from training.infra.ray import error_line, fit_resources
    from training.stages.pseudo_label.tasks import label_images_task

    cpu, gpu = fit_resources(*plan.resources, plan.ray, log, "labelling tasks")
    spec = KFoldResult.read(previous).ensemble.model_dump(mode="json")
    chunks = [plan.images[i:i + LABEL_CHUNK] for i in range(0, len(plan.images), LABEL_CHUNK)]
    refs = [label_images_task.options(num_cpus=cpu, num_gpus=gpu).remote(spec, str(previous.parent), [str(im.path) for im in chunk],
                                                                         plan.options.threshold, plan.ignore_index, str(mask_dir / f"chunk{k}"))
            for k, chunk in enumerate(chunks)]
    try:
        outputs = ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        raise SegtuneError(f"pseudo-labelling failed: {error_line(err)}") from None
    counts, pixels, images = None, 0, []
    for k, (chunk, out) in enumerate(zip(chunks, outputs)):
        counts = out["counts"] if counts is None else [a + b for a, b in zip(counts, out["counts"])]
        pixels += out["pixels"]
        for i, image in enumerate(chunk):
            if i not in out["masks"]:
                continue  # no confident pixel
            name, height, width = out["masks"][i]
            images.append(PseudoImage(image=str(image.path.resolve()), mask=f"labels/chunk{k}/{name}", sha256=image.sha256,
                                      height=height, width=width, source=image.source))
    return counts, pixels, images


def sync_mlflow(options: PseudoOptions, log: Log = print) -> int:
    """Send what earlier rounds left in their outboxes; returns the calls still unsent."""
    from training.infra.tracking import default_tracking_uri, sync_outbox

    kfold_path = find_kfold_result(options.experiment, log)
    uri = options.mlflow_uri or KFoldResult.read(kfold_path).mlflow_tracking_uri or default_tracking_uri()
    out_dir = kfold_path.parent.parent / "pseudo"
    with StageLock(out_dir, "pseudo-label --sync-mlflow"):
        return sum(sync_outbox(outbox, uri, log) for outbox in sorted(out_dir.glob(f"round*/{OUTBOX}")))
