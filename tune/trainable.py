"""The Tune trial: the core trainer plus `tune.report(metrics, checkpoint)` after every epoch.

The trainer writes its checkpoint directory (last.pt for an exact resume, best.pt, plots)
in the trial's local working directory; every epoch that directory is reported as the
trial's checkpoint, which Tune copies to the experiment storage. A restarted trial (worker
died, node lost, `--resume`) gets it back with `get_checkpoint()` and continues from its
epoch. The data arrives through `tune.with_parameters` (object store): masks are never
re-decoded, only rebuilt once on a node that has no cache yet.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.tune import Checkpoint, get_checkpoint, get_context, report

from training.config import SearchSpace
from training.data.dataset import PreparedData
from training.engine.trainer import LAST, METRICS, EpochResult, train
from tune.endings import replay_ending
from tune.space import trial_params

# One line per trial start and epoch, kept in the trial's checkpoint directory: it travels with
# every reported checkpoint to the experiment storage (shared on a cluster) and comes back with
# the checkpoint when a trial restarts, so it tells a continued trial from a retrained one.
EVENTS = "events.log"


def _append_event(work: Path, line: str) -> None:
    with open(work / EVENTS, "a", encoding="utf-8") as f:
        f.write(f"{time.time():.3f} {line}\n")


def _device() -> str:
    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned to this trial (none: CPU).
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def train_trial(config: dict[str, Any], space: SearchSpace, data: PreparedData, ended: dict[str, dict] | None = None) -> None:
    """Function trainable: `config` holds the sampled {dotted path: value}.

    `ended`: on resume, the trials that had ended before the driver restarted (tune/endings.py).
    """
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
    resume = None
    checkpoint = get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(work))
        resume = work / LAST
    node_id = ray.get_runtime_context().get_node_id()
    start_epoch = json.loads((work / METRICS).read_text())["epochs_trained"] if resume is not None else 0
    _append_event(work, f"start trial={trial_id} pid={os.getpid()} node={node_id} host={socket.gethostname()} resume_epoch={start_epoch}")

    def report_epoch(result: EpochResult) -> None:
        metrics = result.metrics()
        metrics.update(node_id=node_id, resumed_from_epoch=start_epoch)
        _append_event(work, f"epoch {result.epoch} pid={os.getpid()} val_miou={result.val_miou:.4f}")
        report(metrics, checkpoint=Checkpoint.from_directory(str(work)))

    try:
        train(cfg, data, cfg.search.fold, work, callbacks=[report_epoch], resume=resume, device=_device(),
              log=lambda line: print(f"[{trial_id}] {line}", flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # every epoch's state is in the reported checkpoint
