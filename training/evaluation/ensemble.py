"""The delivered ensemble: what the k-fold selected on OOF, run one way by the submission, predict.py and the MLflow model.

An `Ensemble` is built from an `EnsembleSpec` (training/handoff.py): fold checkpoints with
their weights, TTA views, vote and post-processing. It predicts through THE batched loop
(evaluation/inference.predict_batches) in the ensemble frame (the largest member input
size); post-processing runs there; callers resize the label mask (nearest) to what they
need: each image's own size (predict.py, the served model), the submission's 256 x 256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from training.errors import SegtuneError
from training.evaluation.inference import MemberOutput, predict_batches, resize_labels
from training.evaluation.members import Member, MultiInputTransform, assign_inputs, ensemble_frame, load_member
from training.evaluation.postprocess import PostProcess
from training.evaluation.tta import TTA
from training.evaluation.vote import VoteAccumulator
from training.handoff import EnsembleSpec, TTASpec


def tta_of(spec: TTASpec) -> TTA:
    return TTA(spec.hflip, spec.vflip, tuple(sorted(set(spec.scales) | {1.0})))


def tta_spec(tta: TTA) -> TTASpec:
    return TTASpec(hflip=tta.hflip, vflip=tta.vflip, scales=list(tta.scales))


def resolve(path: str, base: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base is None else base / p


@dataclass
class Ensemble:
    members: list[Member]
    weights: list[float]
    tta: TTA
    vote: str
    postprocess: PostProcess
    classes: list[str]
    device: torch.device

    @classmethod
    def load(cls, spec: EnsembleSpec, base: Path | None = None, device: str | torch.device | None = None) -> "Ensemble":
        """Members from their checkpoints (weights only: no pretrained-weights file, no network)."""
        from training.engine.trainer import resolve_device

        paths = [resolve(m.checkpoint, base) for m in spec.members]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SegtuneError(f"{missing[0]}: checkpoint of the ensemble not found ({len(missing)} of {len(paths)} missing)")
        first = load_member(paths[0], 0, torch.device("cpu"))
        target = torch.device(device) if device is not None else resolve_device(first.cfg.trainer.device)
        members = [first if target.type == "cpu" and i == 0 else load_member(p, i, target) for i, p in enumerate(paths)]
        for m, path in zip(members, paths):
            if m.classes != list(spec.classes):
                raise SegtuneError(f"{path}: trained for classes {m.classes}, the ensemble has {spec.classes}")
        try:
            postprocess = PostProcess.from_names(spec.postprocess, spec.classes)
        except ValueError as err:
            raise SegtuneError(str(err)) from None
        return cls(members, [m.weight for m in spec.members], tta_of(spec.tta), spec.vote, postprocess, list(spec.classes), target)

    def __post_init__(self) -> None:
        self.inputs = assign_inputs(self.members)

    @property
    def frame(self) -> tuple[int, int]:
        return ensemble_frame(self.members)

    def transform(self) -> MultiInputTransform:
        """The loader transform: one uint8 tensor per distinct input spec of the members."""
        return MultiInputTransform(self.inputs)

    def vote_outputs(self, outputs: Sequence[MemberOutput]) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels N x H x W, weighted mean probabilities N x C x H x W) of one batch's member outputs."""
        acc = VoteAccumulator(hard=self.vote == "hard")
        for out, weight in zip(outputs, self.weights):
            acc.add(out.final, weight=weight)
        return acc.labels(self.vote), acc.prob_sum / float(sum(self.weights))

    def finish(self, labels: torch.Tensor, proba: torch.Tensor) -> list[np.ndarray]:
        """Post-processed uint8 masks (one per image of the batch)."""
        masks = labels.to(torch.uint8).cpu().numpy()
        if not self.postprocess.enabled:
            return list(masks)
        proba_np = proba.cpu().numpy()
        return [self.postprocess.apply(m, p) for m, p in zip(masks, proba_np)]

    @torch.no_grad()
    def predict(self, loader: Iterable) -> Iterator[tuple[Any, np.ndarray]]:
        """(image id, post-processed uint8 mask in the ensemble frame) per image of `loader` (inputs, ids)."""
        for batch in predict_batches(self.members, loader, self.frame, self.tta, self.device):
            labels, proba = self.vote_outputs(batch.outputs)
            yield from zip(batch.ids, self.finish(labels, proba))

    @torch.no_grad()
    def predict_confident(self, loader: Iterable, threshold: float, ignore_index: int) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        """(image id, mask, confident) per image, in the ensemble frame: the post-processed mask with `ignore_index`
        wherever the top mean probability is below `threshold`, and that boolean confidence map (pseudo labels)."""
        for batch in predict_batches(self.members, loader, self.frame, self.tta, self.device):
            labels, proba = self.vote_outputs(batch.outputs)
            confident = (proba.max(1).values >= threshold).cpu().numpy()
            for image_id, mask, keep in zip(batch.ids, self.finish(labels, proba), confident):
                yield image_id, np.where(keep, mask, ignore_index).astype(np.uint8), keep

    @torch.no_grad()
    def predict_image(self, image: np.ndarray) -> np.ndarray:
        """The uint8 label mask of one RGB uint8 H x W x 3 image, at that image's own size."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise SegtuneError(f"an image must be uint8 H x W x 3 (RGB), got {image.dtype} {tuple(image.shape)}")
        inputs = tuple(t.unsqueeze(0) for t in self.transform()(image=image)["image"])
        (_, mask), = self.predict([(inputs, [0])])
        return resize_labels(mask, image.shape[:2])


def iter_predictions(members: Sequence[Member], loader: Iterable, out_size: tuple[int, int], tta: TTA = TTA(), method: str = "soft",
                     device: torch.device | str = "cpu") -> Iterator[tuple[Any, np.ndarray]]:
    """(image id, uint8 label mask at `out_size`) per image of an equal-weight ensemble without post-processing."""
    ensemble = Ensemble(list(members), [1.0] * len(members), tta, method, PostProcess(), [], torch.device(device))
    for image_id, mask in ensemble.predict(loader):
        yield image_id, resize_labels(mask, out_size)


def load_kfold_ensemble(path: str | Path, device: str | torch.device | None = None):
    """(Ensemble, KFoldResult) of a k-fold directory (or its kfold_result.yaml)."""
    from training.handoff import KFOLD_RESULT, KFoldResult

    path = Path(path)
    file = path / KFOLD_RESULT if path.is_dir() else path
    if not file.is_file():
        raise SegtuneError(f"{file}: not found; a k-fold directory holds it once training/final_kfold.py has finished")
    result = KFoldResult.read(file)
    return Ensemble.load(result.ensemble, base=file.parent, device=device), result
