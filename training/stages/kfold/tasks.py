"""The k-fold's Ray tasks: train one (config, fold), score one fold out-of-fold, stream the test masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from training.errors import SegtuneError


def _quiet() -> None:
    from training.cli import quiet_library_warnings

    quiet_library_warnings()


@ray.remote(max_retries=2)  # a lost (spot) node reruns the task, which resumes from last.pt
def train_fold_task(cfg_dict: dict, data, fold: int, out_dir: str, rank: int, queue) -> dict[str, Any]:
    """Train (or finish training) one config on one fold; each epoch's metrics go to `queue` for live logging."""
    from training.config import config_from_dict
    from training.engine import checkpoint
    from training.engine.trainer import train

    _quiet()
    cfg = config_from_dict(cfg_dict)
    out = Path(out_dir)
    node = ray.get_runtime_context().get_node_id()
    state = checkpoint.status(out, cfg.trainer.epochs)
    if state == checkpoint.DONE:
        return {"status": "skipped", "node": node}
    data.ensure_cached()
    prefix = f"[config {rank} fold {fold}]"
    resume = out / checkpoint.LAST if state == checkpoint.PARTIAL else None
    result = train(cfg, data, fold, out, callbacks=[lambda r: queue.put((rank, fold, r.metrics()))], resume=resume,
                   log=lambda m: print(prefix, m, flush=True))
    return {"status": "resumed" if resume else "trained", "best_miou": result.best_miou, "best_epoch": result.best_epoch, "node": node}


def _loader(dataset, cfg):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, shuffle=False)


@ray.remote(max_retries=2)
def oof_fold_task(checkpoints: list[str], data, fold: int, tta, vote_method: str, masks_dir: str | None) -> dict[str, Any]:
    """Confusion matrices of every subset of configs on this fold's held-out images (score size)."""
    import torch

    from training.data.dataset import SegmentationDataset, fold_split
    from training.evaluation.inference import predict_batches
    from training.evaluation.members import MultiInputTransform, assign_inputs, load_members
    from training.evaluation.selection import SubsetScorer
    from training.evaluation.submission import save_mask_png

    _quiet()
    data.ensure_cached()
    members, device = load_members(checkpoints)
    for m in members:
        if m.fold != fold:
            raise SegtuneError(f"{checkpoints[m.rank]}: trained for fold {m.fold}, expected fold {fold}")
    cfg = members[0].cfg
    _, val_ids = fold_split(data, fold, cfg.data.subset)
    dataset = SegmentationDataset(data.index, data.cache, val_ids, MultiInputTransform(assign_inputs(members)),
                                  score_size=cfg.data.score_size or cfg.data.image_size)
    scorer = SubsetScorer(len(members), len(data.classes), cfg.loss.ignore_index)
    seen: list[int] = []
    for batch in predict_batches(members, _loader(dataset, cfg), tta=tta, device=device):
        labels = scorer.update([(out.proba, out.final) for out in batch.outputs], batch.targets)
        chosen = labels[f"{vote_method}_{'tta' if tta.enabled else 'plain'}"].to(torch.uint8).cpu().numpy()
        for image_id, mask in zip(batch.ids, chosen):
            seen.append(image_id)
            if masks_dir:
                save_mask_png(Path(masks_dir) / f"{image_id}.png", mask)
    return {"fold": fold, "image_ids": seen, "matrices": scorer.matrices}


@ray.remote(max_retries=0)
def predict_test_task(checkpoints: list[str], test_index, tta, vote_method: str, mask_side: int):
    """Stream (file_name, uint8 mask) per test image; the driver writes them (single writer).

    The ensemble votes at its members' input size; only the label mask is resized (nearest) to
    mask_side x mask_side (see evaluation/inference.py).
    """
    from training.data.dataset import ImageDataset
    from training.evaluation.inference import iter_predictions
    from training.evaluation.members import MultiInputTransform, assign_inputs, load_members

    _quiet()
    members, device = load_members(checkpoints)
    dataset = ImageDataset(test_index, test_index.image_ids, MultiInputTransform(assign_inputs(members)))
    for image_id, mask in iter_predictions(members, _loader(dataset, members[0].cfg), (mask_side, mask_side), tta, vote_method, device):
        yield test_index.image(image_id).file_name, mask
