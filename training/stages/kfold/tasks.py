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
    state = checkpoint.status(out, cfg.trainer.epochs, finished_without_last=True)
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


def _fold_members(checkpoints: list[str], data, fold: int):
    from training.data.dataset import SegmentationDataset, fold_split
    from training.evaluation.members import MultiInputTransform, assign_inputs, load_members

    data.ensure_cached()
    members, device = load_members(checkpoints)
    for m in members:
        if m.fold != fold:
            raise SegtuneError(f"{checkpoints[m.rank]}: trained for fold {m.fold}, expected fold {fold}")
    cfg = members[0].cfg
    _, val_ids = fold_split(data, fold, cfg.data.subset)
    dataset = SegmentationDataset(data.index, data.cache, val_ids, MultiInputTransform(assign_inputs(members)),
                                  score_size=cfg.data.score_size or cfg.data.image_size)
    return members, device, _loader(dataset, cfg)


@ray.remote(max_retries=2)
def oof_fold_task(checkpoints: list[str], data, fold: int, tta) -> dict[str, Any]:
    """Confusion matrices of every (TTA candidate within `tta`, vote, subset of configs) on this fold's held-out images.

    Every view of `tta` is predicted once per model; each candidate averages its subset of them.
    """
    from training.evaluation.inference import candidate_proba, member_view_probs, predict_batches
    from training.evaluation.selection import SubsetScorer, tta_candidates

    _quiet()
    members, device, loader = _fold_members(checkpoints, data, fold)
    candidates = tta_candidates(tta)
    scorer = SubsetScorer(len(members), len(data.classes), members[0].cfg.loss.ignore_index, [c.name for c in candidates])
    seen: list[int] = []
    # predict_batches with no TTA hands over each member's prepared input; the views are computed here.
    for batch in predict_batches(members, loader, device=device, keep_inputs=True):
        size = tuple(batch.targets.shape[-2:])
        per_config = []
        for m, x in zip(members, batch.inputs):
            _, views = member_view_probs(m, x, size, tta)
            per_config.append([candidate_proba(views, c) for c in candidates])
        scorer.update(per_config, batch.targets)
        seen += batch.ids
    return {"fold": fold, "image_ids": seen, "matrices": scorer.matrices, "modes": scorer.modes}


@ray.remote(max_retries=2)
def oof_proba_task(checkpoints: list[str], data, fold: int, tta, path_stem: str) -> int:
    """Store every config's OOF probabilities under the chosen TTA (uint8, score size) for weights and post-processing."""
    import numpy as np

    from training.evaluation.inference import predict_batches
    from training.evaluation.selection import OOFFold, quantize

    _quiet()
    members, device, loader = _fold_members(checkpoints, data, fold)
    ids, probs, targets = [], [], []
    for batch in predict_batches(members, loader, tta=tta, device=device):
        ids += batch.ids
        probs.append(np.stack([quantize(out.final) for out in batch.outputs]))
        targets.append(batch.targets.to("cpu").numpy().astype(np.uint8))
    OOFFold.save(Path(path_stem), ids, np.concatenate(probs, axis=1), np.concatenate(targets))
    return len(ids)


@ray.remote(max_retries=0)
def predict_test_task(spec: dict, test_index, mask_side: int):
    """Stream (file_name, uint8 mask) per test image; the driver writes them (single writer).

    The ensemble (evaluation/ensemble.py) votes and post-processes in its frame; the mask is
    resized (nearest) to the image's own size, as predict.py writes it, then to mask_side x
    mask_side: a predict.py mask resized to the submission's size equals the CSV row.
    """
    from training.data.dataset import ImageDataset
    from training.evaluation.ensemble import Ensemble
    from training.evaluation.inference import resize_labels
    from training.handoff import EnsembleSpec

    _quiet()
    ensemble = Ensemble.load(EnsembleSpec.model_validate(spec))
    dataset = ImageDataset(test_index, test_index.image_ids, ensemble.transform())
    for image_id, mask in ensemble.predict(_loader(dataset, ensemble.members[0].cfg)):
        record = test_index.image(image_id)
        own = resize_labels(mask, (record.height, record.width))
        yield record.file_name, resize_labels(own, (mask_side, mask_side))
