"""The Tune trial: the core trainer plus `tune.report(metrics, checkpoint)` after every epoch.

The trainer writes its checkpoint directory (last.pt for an exact resume, best.pt, plots)
in the trial's local working directory; every epoch that directory is reported as the
trial's checkpoint, which Tune copies to the experiment storage. A restarted trial (worker
died, node lost, `--resume`) gets it back with `get_checkpoint()` and continues from its
epoch. The data arrives through `tune.with_parameters` (object store): masks are never
re-decoded, only rebuilt once on a node that has no cache yet.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.tune import Checkpoint, get_checkpoint, get_context, report

from training.config import SearchSpace
from training.data.dataset import PreparedData
from training.engine import checkpoint as run_dir
from training.engine.trainer import EpochResult, train
from training.infra import compat
from tune.cost import OVER_BUDGET_KEY, OverBudget, over_budget_line
from tune.resume import replay_ending, saved_run
from tune.space import trial_budget, trial_params

# One line per trial start and epoch, kept in the trial's checkpoint directory: it travels with
# every reported checkpoint to the experiment storage (shared on a cluster) and comes back with
# the checkpoint when a trial restarts, so it tells a continued trial from a retrained one.
EVENTS = "events.log"


def _append_event(work: Path, line: str) -> None:
    with open(work / EVENTS, "a", encoding="utf-8") as f:
        f.write(f"{time.time():.3f} {line}\n")


_TRIAL_THREADS: list[threading.Thread] = []


def _join_trial_threads() -> None:
    """At the worker's exit, let stopped trials' threads finish unwinding first.

    Tune stops a function trial by raising SystemExit in its thread and does not wait for it
    (cleanup with timeout 0). If the actor's process then shuts Python down, that thread frees
    the trainer's tensors after finalization began, and torch's destructor aborts the process
    ("Fatal Python error: Aborted" with C++ stacks). atexit runs before finalization.
    """
    for thread in _TRIAL_THREADS:
        thread.join(timeout=30)


def _track_trial_thread() -> None:
    if not _TRIAL_THREADS:
        atexit.register(_join_trial_threads)
    _TRIAL_THREADS[:] = [t for t in _TRIAL_THREADS if t.is_alive()] + [threading.current_thread()]


def _device() -> str:
    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned to this trial (none: CPU).
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def restore(work: Path, trial_dir: str | None) -> Path | None:
    """Fill `work` with the checkpoint to continue from (Tune's, or a newer one it had not recorded); its last.pt."""
    checkpoint = get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(work))
    saved = saved_run(trial_dir)
    if saved and saved[1]["epochs_trained"] > run_dir.epochs_completed(work):
        shutil.rmtree(work)
        shutil.copytree(saved[0], work)
    return work / run_dir.LAST if (work / run_dir.LAST).is_file() else None


def train_trial(config: dict[str, Any], space: SearchSpace, data: PreparedData, ended: dict[str, dict] | None = None,
                tune_path: str | None = None) -> None:
    """Function trainable: `config` holds the sampled {dotted path: value}.

    `ended`: on resume, the trials that had ended before the driver restarted (tune/resume.py).
    `tune_path`: the experiment's storage directory (trial directories below it).
    """
    _track_trial_thread()
    compat.link_checkpoint_files_on_local_storage(run_dir.LAST)
    ctx = get_context()
    trial_id = ctx.get_trial_id()
    if ended and trial_id in ended:
        replay_ending(trial_id, ended[trial_id], log=lambda line: print(line, flush=True))
        return
    cpus = ctx.get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    cfg = space.resolve(trial_params(space, config))

    # Ray runs each trial in its own local working directory (the cwd); the trainer writes there.
    work = Path(tempfile.mkdtemp(prefix="trainer-", dir=os.getcwd()))
    resume = restore(work, f"{tune_path.rstrip('/')}/trial_{trial_id}" if tune_path else None)
    node_id = ray.get_runtime_context().get_node_id()
    start_epoch = run_dir.epochs_completed(work) if resume is not None else 0
    _append_event(work, f"start trial={trial_id} pid={os.getpid()} node={node_id} host={socket.gethostname()} resume_epoch={start_epoch}")

    def report_epoch(result: EpochResult) -> None:
        metrics = result.metrics()
        metrics.update(node_id=node_id, resumed_from_epoch=start_epoch, mem_kind=result.mem_kind)
        skip = over_budget_line(trial_id, cfg.search.max_trial_cost, result.epoch, result.epoch_seconds, trial_budget(cfg))
        if skip:
            metrics[OVER_BUDGET_KEY] = skip  # the driver prints it and records the status (tune/callbacks.py)
        _append_event(work, f"epoch {result.epoch} pid={os.getpid()} val_miou={result.val_miou:.4f}")
        report(metrics, checkpoint=Checkpoint.from_directory(str(work)))
        if skip:
            raise OverBudget(skip)

    try:
        # keep_val_proba: the diversity-aware top-k votes with them (tune/diversity.py)
        train(cfg, data, cfg.search.fold, work, callbacks=[report_epoch], resume=resume, device=_device(),
              log=lambda line: print(f"[{trial_id}] {line}", flush=True), keep_val_proba=True)
    except OverBudget:
        pass  # its one epoch is reported and checkpointed: the trial ends here
    finally:
        shutil.rmtree(work, ignore_errors=True)  # every epoch's state is in the reported checkpoint
