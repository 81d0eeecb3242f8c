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
from training.evaluation.tta import TTA
from training.handoff import BestConfigs
from training.infra import lineage as tags
from training.infra.fs import check_writable, fingerprint, results_root, write_json
from training.infra.lineage import Lineage
from training.infra.locks import StageLock, describe, is_stale, read_holder
from training.infra.progress import progress
from training.infra.ray import error_line
from training.infra.tracking import check_store, close_tracker, flatten, open_tracker
from training.stages.kfold import report
from training.stages.kfold.context import KFoldRun
from training.stages.kfold.oof import Decisions, decide
from training.stages.kfold.plan import (DEFAULT_TTA, KFOLD_DIR, SMOKE_TTA, FoldJob, KFoldOptions, Log, build_candidates, check_plan,
                                        check_same_folds, find_best_configs, load_test_index, prepare_kfold_data, reusable_run)
from training.stages.kfold.tasks import predict_test_task, train_fold_task

OUTBOX = "mlflow_outbox.jsonl"
SUBMISSION_META = "submission.json"


def plan_run(options: KFoldOptions, sources: list[Path], kfold_dir: Path, name: str, log: Log) -> KFoldRun:
    """Every input checked (configs of every search, options, data, test set) before anything is written."""
    loaded = []
    for best_path in sources:
        holder = read_holder(best_path.parent)
        if holder and not is_stale(holder):
            raise ConfigError(f"{best_path.parent}: its search is running again ({describe(holder)}); start the k-fold when it has finished")
        loaded.append((best_path, *BestConfigs.load(best_path)))
    candidates = []
    for best_path, best, cfgs in loaded:
        candidates += build_candidates(best, cfgs, options, best_path, len(candidates), len(loaded), candidates)
    try:
        tta = TTA.parse(options.tta or (SMOKE_TTA if options.smoke else DEFAULT_TTA), options.scales)
    except ValueError as err:
        raise ConfigError(f"--tta: {err}") from None
    best_path, best, _ = loaded[0]
    data = prepare_kfold_data(candidates[0].cfg, best, best_path, log)
    for other_path, other, _ in loaded[1:]:
        check_same_folds(data, other, other_path)
    test_index = load_test_index(candidates[0].cfg, data.classes, log)
    run = KFoldRun(options, best, best_path, candidates, data, test_index, tta, kfold_dir, log)
    run.name, run.sources = name, [(p, b) for p, b, _ in loaded]
    run.jobs = [FoldJob(c, k, kfold_dir / c.key / f"fold{k}") for c in candidates for k in range(run.n_folds)]
    return run


def output_of(options: KFoldOptions, log: Log) -> tuple[list[Path], str, Path]:
    """(best_configs.yaml of each search, the k-fold's name, its directory).

    One search: results/<experiment>/kfold. Several: results/<name>/kfold, name defaulting to
    the experiments joined by '+'.
    """
    names = options.experiments or [options.experiment]
    sources = [find_best_configs(e, log) for e in names]
    if len(set(sources)) != len(sources):
        raise ConfigError(f"--experiment: the same search is named twice ({[str(p.parent.name) for p in sources]})")
    if options.retrain is not None:
        return sources, options.name or sources[0].parent.name, options.retrain.out_dir
    if len(sources) == 1:
        return sources, sources[0].parent.name if options.name is None else options.name, sources[0].parent / KFOLD_DIR
    name = options.name or "+".join(p.parent.name for p in sources)
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"--name: {name!r} must be a plain directory name")
    return sources, name, results_root() / name / KFOLD_DIR


def run_kfold(options: KFoldOptions, log: Log = print) -> dict[str, Any]:
    """The whole stage; returns the summary (also written to kfold/summary.json)."""
    sources, name, kfold_dir = output_of(options, log)
    check_writable(kfold_dir, "the k-fold writes its checkpoints and submission there (SEGTUNE_RESULTS moves the results root)")
    with StageLock(kfold_dir, "k-fold"):
        run = plan_run(options, sources, kfold_dir, name, log)
        check_store(tracking_uri(options.mlflow_uri, run.best))  # a read-only sqlite file: one line, before plan.json
        run.stage_id = check_plan(run.kfold_dir, run.candidates, options.resume)
        log(f"k-fold: {name}: configs {[c.key for c in run.candidates]} x {run.n_folds} folds, "
            f"epochs {[c.epochs for c in run.candidates]}, TTA within {run.tta.name}, vote {options.vote} -> {run.kfold_dir}")
        open_lineage(run)
        ok = False
        try:
            timed(run, "train_s", train_all, run)
            decisions = timed(run, "oof_s", decide, run)
            submission = timed(run, "submission_s", predict_submission, run, decisions)
            summary = report.finish(run, decisions, submission)
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
    run.lineage = Lineage(tracker, run.name, run.stage_id)
    run.parent = run.lineage.key("kfold")
    upstream = ",".join(b.search_parent_run_id for _, b in run.sources if b.search_parent_run_id)
    name, role, extra_tags = "kfold", "kfold", {}
    retrain = run.options.retrain
    if retrain is not None:  # a later stage's round: its own parent, following the run it builds on
        name, role, upstream, extra_tags = retrain.run_name, retrain.role, retrain.upstream_run_id or "", retrain.parent_tags
    if run.lineage.run(run.parent, name, role, {tags.RESULTS_DIR: run.kfold_dir, tags.UPSTREAM: upstream, **extra_tags}):
        run.lineage.log_environment(run.parent)
    if retrain is not None and retrain.parent_metrics:
        run.lineage.tracker.log_metrics(run.parent, retrain.parent_metrics)


def sync_mlflow(options: KFoldOptions, log: Log = print) -> int:
    """Send what an earlier k-fold run left in its outbox; returns the calls still unsent."""
    from training.infra.tracking import sync_outbox

    sources, _, kfold_dir = output_of(options, log)
    best, _ = BestConfigs.load(sources[0])
    with StageLock(kfold_dir, "k-fold --sync-mlflow"):
        return sync_outbox(kfold_dir / OUTBOX, tracking_uri(options.mlflow_uri, best), log)


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
        job.state = checkpoint.status(job.out_dir, job.cand.epochs, finished_without_last=True)
        # A later stage's configs differ from every earlier run's (pseudo labels, warm start): nothing to look for.
        if job.state != checkpoint.DONE and run.options.retrain is None:
            reuse_earlier_run(run, job)
        job.run_key = lineage.key("fold", job.cand.key, job.fold)
        run_tags = {tags.TRIAL_ID: job.cand.trial_id, tags.CONFIG_RANK: job.cand.rank, tags.FOLD: job.fold, "segtune.search": job.cand.experiment}
        if job.reused_from:
            run_tags["segtune.reused_from"] = job.reused_from
        if lineage.run(job.run_key, f"config{job.cand.key}-fold{job.fold}", "kfold_fold", run_tags, parent=run.parent):
            lineage.tracker.log_params(job.run_key, flatten(job.cand.cfg.to_dict()) | {"kfold.fold": job.fold})
    if lineage.tracker.available:
        lineage.tracker.flush(30)  # learn which runs an earlier session already finished


def earlier_runs(run: KFoldRun, job: FoldJob) -> list[tuple[str, Path]]:
    """Run directories that may already hold (config, fold) trained: the search's trial on its fold, the search's own k-fold."""
    cand, found = job.cand, []
    if cand.search_checkpoint and job.fold == cand.search_fold:
        found.append(("the search's trial", Path(cand.search_checkpoint).parent))
    own = results_root() / cand.experiment / KFOLD_DIR / str(cand.rank) / f"fold{job.fold}"
    if own.resolve() != job.out_dir.resolve():
        found.append((f"the k-fold of {cand.experiment}", own))
    return found


def reuse_earlier_run(run: KFoldRun, job: FoldJob) -> None:
    """Never pay twice: a run already trained for the same config, fold, data and epochs becomes this job's run directory.

    Files are hard-linked (copied across file systems); the trainer replaces files atomically,
    so nothing written later in either directory changes the other.
    """
    import shutil

    for origin, src in earlier_runs(run, job):
        if not (src / checkpoint.BEST).is_file():
            continue
        why_not = reusable_run(src, job.cand, job.fold)
        if why_not:
            run.log(f"k-fold: {job.name}: {origin} at {src} is not reused: {why_not}")
            continue
        job.out_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(p for p in src.iterdir() if p.is_file()):
            tmp = job.out_dir / f".{f.name}.reuse"
            tmp.unlink(missing_ok=True)
            try:
                os.link(f, tmp)
            except OSError:
                shutil.copy2(f, tmp)
            os.replace(tmp, job.out_dir / f.name)
        job.state, job.reused_from = checkpoint.DONE, str(src)
        run.log(f"k-fold: {job.name}: reusing {origin} ({src}): same config, fold, data and {job.cand.epochs} epochs")
        return


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
        else:  # reused, or trained but the driver stopped before MLflow heard of it
            finish_child(run, job)
            job.status = "reused" if job.reused_from else "logged"
    if not todo:
        run.log(f"k-fold: all {len(run.jobs)} (config, fold) pairs already trained")
        return
    run.log(f"k-fold: training {len(todo)} (config, fold) pairs ({len(run.jobs) - len(todo)} already done)")
    from ray.util.queue import Queue

    run.connect()  # before the queue: Ray's first API call would otherwise start a local instance
    # Ray's actor-backed queue: tasks on any node push EpochResult.metrics() for live logging.
    queue = Queue(actor_options={"num_cpus": 0})
    data_ref = run.put(run.data)
    pending = {train_fold_task.options(**run.resources([j.cand.cfg])).remote(j.cand.cfg.to_dict(), data_ref, j.fold, str(j.out_dir), j.cand.key, queue): j
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


# ---- submission ---------------------------------------------------------------------------------


def ensemble_spec(run: KFoldRun, decisions: Decisions, relative: bool = False):
    """The selected ensemble as the EnsembleSpec every consumer builds from (paths relative to the k-fold directory on request)."""
    from training.evaluation.ensemble import tta_spec
    from training.handoff import EnsembleMember, EnsembleSpec

    members = []
    for job in run.jobs:
        weight = decisions.weights[job.cand.index]
        if weight <= 0:
            continue
        path = job.out_dir / checkpoint.BEST
        metrics = checkpoint.read_metrics(job.out_dir) or {}
        members.append(EnsembleMember(checkpoint=str(path.relative_to(run.kfold_dir) if relative else path.resolve()),
                                      experiment=job.cand.experiment, rank=job.cand.rank, fold=job.fold, weight=weight,
                                      val_miou=metrics.get("best_miou"), epochs=metrics.get("epochs_trained")))
    return EnsembleSpec(classes=list(run.data.classes), members=members, tta=tta_spec(decisions.tta), vote=decisions.vote,
                        postprocess=decisions.postprocess.to_names(run.data.classes))


def predict_submission(run: KFoldRun, decisions: Decisions) -> dict[str, Any]:
    """submission.csv of the selected ensemble, streamed from one Ray task (redone only when its inputs change)."""
    from training.data.coco import file_sha256
    from training.evaluation.submission import SUBMISSION, SUBMISSION_SIZE

    spec = ensemble_spec(run, decisions)
    checkpoints = [m.checkpoint for m in spec.members]
    path, meta_path = run.kfold_dir / SUBMISSION, run.kfold_dir / SUBMISSION_META
    # `mask`: how the 256 px mask is made; a submission.csv made another way is redone.
    key = fingerprint(checkpoints, spec=spec.model_dump(mode="json"), png=run.options.png, test=file_sha256(run.test_index.ann_path),
                      mask="ensemble frame, post-processed, nearest to the image's size, nearest to 256")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            run.log(f"k-fold: {path} is up to date ({meta['images']} images)")
            return meta
    run.log(f"k-fold: predicting {len(run.test_index.images)} test images with {len(checkpoints)} models, TTA {decisions.tta.name}, "
            f"{decisions.vote} vote, post-processing {spec.postprocess or 'none'}")
    cfgs = [run.candidates[i].cfg for i in decisions.members]
    rows = write_submission(run, spec, cfgs, path, SUBMISSION_SIZE)
    meta = {"key": key, "path": str(path), "images": rows, "models": len(checkpoints), "size": SUBMISSION_SIZE,
            "tta": decisions.tta.name, "vote": decisions.vote, "png_dir": str(run.kfold_dir / "test_masks") if run.options.png else None}
    write_json(meta_path, meta)
    run.log(f"k-fold: wrote {path} ({rows} rows)")
    return meta


def write_submission(run: KFoldRun, spec, cfgs: list, path: Path, size: int) -> int:
    from training.evaluation.submission import SubmissionWriter, save_mask_png
    from training.infra.compat import generator_backpressure

    # Backpressure: the task stays at most 16 masks ahead of the writer, so memory stays flat.
    gen = predict_test_task.options(**run.resources(cfgs), **generator_backpressure(16)).remote(spec.model_dump(mode="json"), run.test_index, size)
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
