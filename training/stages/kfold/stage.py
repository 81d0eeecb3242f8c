"""The k-fold stage as a short script: plan -> train every (config, fold) -> score OOF -> select -> submit -> report.

Every (config, fold) pair is one Ray task with the config's `search.resources`; the
PreparedData goes through the object store once. Only this driver writes MLflow: tasks push
each epoch's metrics into a Ray queue and the driver logs them live to the pair's child run.
Out-of-fold scoring runs one Ray task per fold; the submission is one streaming Ray task
whose masks the driver writes row by row, so the CSV needs no storage shared with workers
(checkpoints do: on a multi-node cluster put SEGTUNE_RESULTS on shared storage).

Output, under `results/<experiment>/kfold/`:
    <rank>/fold<k>/        trainer run directory per (config, fold): last.pt, best.pt, metrics.json
    oof/fold<k>.npz        confusion matrices of every (TTA mode, vote, subset of configs)
    oof_masks/<id>.png     out-of-fold masks of the ensemble of all candidate configs
    submission.csv         competition CSV (+ test_masks/ with --png)
    summary.json           every score, the selection, timings
    kfold_result.yaml      the typed hand-off to later stages (training/handoff.py)
    plan.json              what was asked (resume refuses to mix different plans)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import ray

from training.engine import checkpoint
from training.errors import ConfigError, SegtuneError
from training.evaluation.selection import SubsetScorer, greedy_select, subset_members
from training.evaluation.tta import TTA
from training.evaluation.vote import VOTES
from training.handoff import BestConfigs
from training.infra import lineage as tags
from training.infra.fs import check_writable, fingerprint, write_json
from training.infra.lineage import Lineage
from training.infra.locks import StageLock, describe, is_stale, read_holder
from training.infra.progress import progress
from training.infra.ray import error_line
from training.infra.tracking import check_store, close_tracker, flatten, open_tracker
from training.stages.kfold import report
from training.stages.kfold.context import KFoldRun
from training.stages.kfold.plan import (DEFAULT_TTA, KFOLD_DIR, SMOKE_TTA, FoldJob, KFoldOptions, Log, build_candidates, check_plan,
                                        find_best_configs, load_test_index, prepare_kfold_data)
from training.stages.kfold.tasks import oof_fold_task, predict_test_task, train_fold_task

OUTBOX = "mlflow_outbox.jsonl"
SUBMISSION_META = "submission.json"


def plan_run(options: KFoldOptions, best_path: Path, log: Log) -> KFoldRun:
    """Every input checked (configs, options, data, test set) before anything is written."""
    holder = read_holder(best_path.parent)
    if holder and not is_stale(holder):
        raise ConfigError(f"{best_path.parent}: its search is running again ({describe(holder)}); start the k-fold when it has finished")
    best, cfgs = BestConfigs.load(best_path)
    candidates = build_candidates(best, cfgs, options, best_path)
    if options.vote not in VOTES:
        raise ConfigError(f"--vote: {options.vote!r} is not one of {list(VOTES)}")
    try:
        tta = TTA.parse(options.tta or (SMOKE_TTA if options.smoke else DEFAULT_TTA), options.scales)
    except ValueError as err:
        raise ConfigError(f"--tta: {err}") from None
    data = prepare_kfold_data(candidates[0].cfg, best, best_path, log)
    test_index = load_test_index(candidates[0].cfg, data.classes, log)
    kfold_dir = best_path.parent / KFOLD_DIR
    run = KFoldRun(options, best, best_path, candidates, data, test_index, tta, kfold_dir, log)
    run.jobs = [FoldJob(c, k, kfold_dir / str(c.rank) / f"fold{k}") for c in candidates for k in range(run.n_folds)]
    return run


def run_kfold(options: KFoldOptions, log: Log = print) -> dict[str, Any]:
    """The whole stage; returns the summary (also written to kfold/summary.json)."""
    best_path = find_best_configs(options.experiment, log)
    kfold_dir = best_path.parent / KFOLD_DIR
    check_writable(kfold_dir, "the k-fold writes its checkpoints and submission there (SEGTUNE_RESULTS moves the results root)")
    with StageLock(kfold_dir, "k-fold"):
        run = plan_run(options, best_path, log)
        check_store(tracking_uri(options.mlflow_uri, run.best))  # a read-only sqlite file: one line, before plan.json
        run.stage_id = check_plan(run.kfold_dir, run.candidates, options.resume)
        log(f"k-fold: experiment {run.best.experiment}, configs {[c.rank for c in run.candidates]} x {run.n_folds} folds, "
            f"epochs {[c.epochs for c in run.candidates]}, TTA {run.tta.name}, vote {options.vote} -> {run.kfold_dir}")
        open_lineage(run)
        ok = False
        try:
            timed(run, "train_s", train_all, run)
            scorer = timed(run, "oof_s", score_oof, run)
            selected, steps = select_ensemble(run, scorer)
            submission = timed(run, "submission_s", predict_submission, run, selected)
            summary = report.finish(run, scorer, selected, steps, submission)
            ok = True
            return summary
        finally:
            close(run, ok)


def timed(run: KFoldRun, name: str, step, *args):
    started = time.time()
    result = step(*args)
    run.timings[name] = time.time() - started
    return result


def tracking_uri(mlflow_uri: str | None, best: BestConfigs) -> str:
    from training.infra.tracking import default_tracking_uri

    return mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or best.mlflow_tracking_uri or default_tracking_uri()


def open_lineage(run: KFoldRun) -> None:
    tracker = open_tracker(tracking_uri(run.options.mlflow_uri, run.best), run.kfold_dir / OUTBOX, run.log)
    run.lineage = Lineage(tracker, run.best.experiment, run.stage_id)
    run.parent = run.lineage.key("kfold")
    if run.lineage.run(run.parent, "kfold", "kfold", {tags.RESULTS_DIR: run.kfold_dir, tags.UPSTREAM: run.best.search_parent_run_id or ""}):
        run.lineage.log_environment(run.parent)


def sync_mlflow(experiment: str | None, mlflow_uri: str | None, log: Log = print) -> int:
    """Send what an earlier k-fold run of `experiment` left in its outbox; returns the calls still unsent."""
    from training.infra.tracking import sync_outbox

    best_path = find_best_configs(experiment, log)
    best, _ = BestConfigs.load(best_path)
    kfold_dir = best_path.parent / KFOLD_DIR
    with StageLock(kfold_dir, "k-fold --sync-mlflow"):
        return sync_outbox(kfold_dir / OUTBOX, tracking_uri(mlflow_uri, best), log)


def close(run: KFoldRun, ok: bool) -> None:
    if run.lineage is not None:
        run.lineage.tracker.end_run(run.parent, "FINISHED" if ok else "FAILED")
        close_tracker(run.lineage.tracker)
    if run.ray is not None:
        run.ray.close()


# ---- training ---------------------------------------------------------------------------------


def open_children(run: KFoldRun) -> None:
    """Each job's state on disk and its MLflow child run (found again on resume, else created)."""
    lineage = run.lineage
    for job in run.jobs:
        job.state = checkpoint.status(job.out_dir, job.cand.epochs)
        job.run_key = lineage.key("fold", job.cand.rank, job.fold)
        run_tags = {tags.TRIAL_ID: job.cand.trial_id, tags.CONFIG_RANK: job.cand.rank, tags.FOLD: job.fold}
        if lineage.run(job.run_key, f"config{job.cand.rank}-fold{job.fold}", "kfold_fold", run_tags, parent=run.parent):
            lineage.tracker.log_params(job.run_key, flatten(job.cand.cfg.to_dict()) | {"kfold.fold": job.fold})
    if lineage.tracker.available:
        lineage.tracker.flush(30)  # learn which runs an earlier session already finished


def finish_child(run: KFoldRun, job: FoldJob) -> None:
    """Backfill epochs the live stream missed, record the checkpoint, mark FINISHED."""
    tracker, key = run.lineage.tracker, job.run_key
    metrics = checkpoint.read_metrics(job.out_dir)
    for row in metrics.get("history", []):
        flat = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        flat.update({f"loss_{k}": v for k, v in (row.get("loss_terms") or {}).items()})
        run.lineage.log_epoch(key, int(row["epoch"]), flat)
    best = job.out_dir / checkpoint.BEST
    tracker.log_artifact(key, best)
    run.lineage.set_tags(key, {tags.CHECKPOINT: best.resolve(), "segtune.checkpoint_bytes": best.stat().st_size, "segtune.out_dir": job.out_dir.resolve()})
    tracker.log_metrics(key, {"fold_best_miou": metrics["best_miou"], "fold_best_epoch": metrics["best_epoch"]})
    tracker.log_artifact(key, job.out_dir / checkpoint.METRICS)
    tracker.log_artifact(key, job.out_dir / "per_class_iou.png")
    tracker.end_run(key, "FINISHED")


def train_all(run: KFoldRun) -> None:
    """Run every unfinished (config, fold) as a Ray task, logging epochs live to MLflow."""
    open_children(run)
    todo = []
    for job in run.jobs:
        if job.state != checkpoint.DONE:
            todo.append(job)
        elif run.lineage.tracker.ended(job.run_key):
            job.status = "skipped"
        else:  # trained, but the driver stopped before MLflow heard of it
            finish_child(run, job)
            job.status = "logged"
    if not todo:
        run.log(f"k-fold: all {len(run.jobs)} (config, fold) pairs already trained")
        return
    run.log(f"k-fold: training {len(todo)} (config, fold) pairs ({len(run.jobs) - len(todo)} already done)")
    from ray.util.queue import Queue

    run.connect()  # before the queue: Ray's first API call would otherwise start a local instance
    # Ray's actor-backed queue: tasks on any node push EpochResult.metrics() for live logging.
    queue = Queue(actor_options={"num_cpus": 0})
    data_ref = run.put(run.data)
    pending = {train_fold_task.options(**run.resources([j.cand.cfg])).remote(j.cand.cfg.to_dict(), data_ref, j.fold, str(j.out_dir), j.cand.rank, queue): j
               for j in todo}
    try:
        failures = wait_for_folds(run, pending, queue)
    finally:
        queue.shutdown()
    if failures:
        raise SegtuneError(f"{len(failures)} of {len(todo)} fold trainings failed ({'; '.join(failures[:3])}); finished folds are kept, "
                           "fix the cause and re-run with --resume")


def drain(run: KFoldRun, queue, by_key: dict) -> None:
    from ray.util.queue import Empty

    while True:
        try:
            items = queue.get_nowait_batch(max(1, queue.qsize()))
        except Empty:
            return
        for rank, fold, metrics in items:
            job = by_key[(rank, fold)]
            run.lineage.log_epoch(job.run_key, int(metrics["epoch"]), metrics)
            run.log(f"  config {rank} fold {fold}: epoch {int(metrics['epoch'])}/{job.cand.epochs} val_mIoU {metrics['val_miou']:.4f}")


def wait_for_folds(run: KFoldRun, pending: dict, queue) -> list[str]:
    """Collect the fold tasks as they end (failures as one line each), logging epochs meanwhile."""
    by_key = {j.key: j for j in run.jobs}
    failures: list[str] = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
        drain(run, queue, by_key)
        for ref in ready:
            job = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # the task's own error, already printed with its traceback
                failures.append(f"{job.name}: {error_line(err)}")
                run.lineage.set_tags(job.run_key, {tags.ERROR: failures[-1][:4000]})
                run.lineage.tracker.end_run(job.run_key, "FAILED")
                run.log(f"  {failures[-1]}")
                continue
            job.status = result["status"]
            drain(run, queue, by_key)
            metrics = checkpoint.read_metrics(job.out_dir)
            if metrics is None:
                failures.append(f"{job.name}: trained on node {result['node']} but {job.out_dir} is not visible to this driver; "
                                "set SEGTUNE_RESULTS to storage every node shares (e.g. /mnt/shared/results)")
                continue
            finish_child(run, job)
            run.log(f"  {job.name}: {job.status} on node {result['node']}, best val mIoU {metrics['best_miou']:.4f} at epoch {metrics['best_epoch']}")
    return failures


# ---- out-of-fold scoring and selection ---------------------------------------------------------


def score_oof(run: KFoldRun) -> SubsetScorer:
    """Every subset's OOF confusion matrices (cached per fold by the checkpoints and settings)."""
    from training.data.dataset import fold_split

    oof_dir = run.kfold_dir / "oof"
    oof_dir.mkdir(parents=True, exist_ok=True)
    pending, results = {}, {}
    for k in range(run.n_folds):
        ckpts = [run.kfold_dir / str(c.rank) / f"fold{k}" / checkpoint.BEST for c in run.candidates]
        key = fingerprint(ckpts, tta=run.tta.name, vote=run.options.vote, ranks=[c.rank for c in run.candidates])
        cached = oof_dir / f"fold{k}.npz"
        results[k] = read_oof(cached, key)
        if results[k] is None:
            ref = oof_fold_task.options(**run.resources([c.cfg for c in run.candidates])).remote(
                [str(p) for p in ckpts], run.put(run.data), k, run.tta, run.options.vote, str(run.kfold_dir / "oof_masks"))
            pending[ref] = (k, key, cached)
    if pending:
        run.log(f"k-fold: scoring out-of-fold predictions of {len(pending)} fold(s), TTA {run.tta.name}")
    collect_oof(run, pending, results)
    scorer = SubsetScorer(len(run.candidates), len(run.data.classes), run.cfg0.loss.ignore_index)
    oof_ids: list[int] = []
    for k in range(run.n_folds):
        scorer.merge(results[k]["matrices"])
        oof_ids += list(results[k]["image_ids"])
        one = SubsetScorer(len(run.candidates), len(run.data.classes))
        one.merge(results[k]["matrices"])
        for job in (j for j in run.jobs if j.fold == k):
            job.result["fold_oof"] = {m: one.scores(m, "soft", 1 << job.cand.index).miou for m in ("plain", "tta")}
    expected = sorted(i for k in range(run.n_folds) for i in fold_split(run.data, k, run.cfg0.data.subset)[1])
    if sorted(oof_ids) != expected or len(set(oof_ids)) != len(oof_ids):
        raise SegtuneError(f"out-of-fold predictions cover {len(set(oof_ids))} images ({len(oof_ids)} predictions) of {len(expected)}")
    run.oof_images = len(oof_ids)
    return scorer


def read_oof(path, key: str) -> dict | None:
    import numpy as np

    if not path.is_file():
        return None
    with np.load(path) as npz:
        return {"image_ids": npz["image_ids"].tolist(), "matrices": npz["matrices"]} if str(npz["key"]) == key else None


def collect_oof(run: KFoldRun, pending: dict, results: dict) -> None:
    import numpy as np

    errors = []
    for ref in progress(list(pending), "scoring out-of-fold folds", unit="fold", log=run.log):
        k, key, cached = pending[ref]
        try:
            out = ray.get(ref)
        except Exception as err:
            errors.append(f"fold {k}: {error_line(err)}")
            continue
        np.savez(cached, key=np.array(key), image_ids=np.array(out["image_ids"], dtype=np.int64), matrices=out["matrices"])
        results[k] = out
    if errors:
        raise SegtuneError(f"out-of-fold scoring failed: {'; '.join(errors[:3])}")


def select_ensemble(run: KFoldRun, scorer: SubsetScorer) -> tuple[int, list[dict]]:
    """The subset of configs greedy forward selection picks by OOF mIoU (under the chosen TTA and vote)."""
    mode = "tta" if run.tta.enabled else "plain"
    full = 2 ** len(run.candidates) - 1
    return greedy_select({s: scorer.scores(mode, run.options.vote, s).miou for s in range(1, full + 1)}, len(run.candidates))


# ---- submission ---------------------------------------------------------------------------------


def predict_submission(run: KFoldRun, selected: int) -> dict[str, Any]:
    """submission.csv of the selected configs x all folds, streamed from one Ray task (redone only when its inputs change)."""
    from training.data.coco import file_sha256
    from training.evaluation.submission import SUBMISSION, SUBMISSION_SIZE

    chosen = [run.candidates[i] for i in subset_members(selected)]
    checkpoints = [str(j.out_dir / checkpoint.BEST) for j in run.jobs if j.cand in chosen]
    path, meta_path = run.kfold_dir / SUBMISSION, run.kfold_dir / SUBMISSION_META
    # `mask`: how the 256 px mask is made; a submission.csv from the former bilinear-logits path is redone.
    key = fingerprint(checkpoints, tta=run.tta.name, vote=run.options.vote,
                      png=run.options.png, test=file_sha256(run.test_index.ann_path), mask="vote at input size, labels resized nearest")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            run.log(f"k-fold: {path} is up to date ({meta['images']} images)")
            return meta
    run.log(f"k-fold: predicting {len(run.test_index.images)} test images with {len(checkpoints)} models, TTA {run.tta.name}, {run.options.vote} vote")
    rows = write_submission(run, checkpoints, [c.cfg for c in chosen], path, SUBMISSION_SIZE)
    meta = {"key": key, "path": str(path), "images": rows, "models": len(checkpoints), "size": SUBMISSION_SIZE,
            "tta": run.tta.name, "vote": run.options.vote, "png_dir": str(run.kfold_dir / "test_masks") if run.options.png else None}
    write_json(meta_path, meta)
    run.log(f"k-fold: wrote {path} ({rows} rows)")
    return meta


def write_submission(run: KFoldRun, checkpoints: list[str], cfgs: list, path: Path, size: int) -> int:
    from training.evaluation.submission import SubmissionWriter, save_mask_png
    from training.infra.compat import generator_backpressure

    # Backpressure: the task stays at most 16 masks ahead of the writer, so memory stays flat.
    gen = predict_test_task.options(**run.resources(cfgs), **generator_backpressure(16)).remote(
        checkpoints, run.test_index, run.tta, run.options.vote, size)
    png_dir = run.kfold_dir / "test_masks"
    try:
        with SubmissionWriter(path, len(run.data.classes)) as writer:
            for ref in progress(gen, "writing the submission", total=len(run.test_index.images), log=run.log):
                file_name, mask = ray.get(ref)
                writer.write(file_name, mask)
                if run.options.png:
                    rel = [part for part in Path(file_name).with_suffix(".png").parts if part not in ("/", "..")]
                    save_mask_png(png_dir.joinpath(*rel), mask)
    except ray.exceptions.RayTaskError as err:
        raise SegtuneError(f"test prediction failed: {error_line(err)}") from None
    return writer.rows
