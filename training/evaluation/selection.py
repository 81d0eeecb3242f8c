"""Choices scored out-of-fold: TTA views, vote, members and weights, post-processing.

Two kinds of evidence, each as cheap as its choice allows:
- `SubsetScorer`: confusion matrices of every (TTA candidate, vote, subset of configs), filled
  in one streaming pass over the OOF images; nothing per pixel is kept. It picks the TTA
  views, the vote and the equal-weight subset.
- `OOFProba`: the configs' OOF probabilities under the chosen TTA, stored uint8 at the score
  size per fold. Greedy forward selection with replacement (weights) and the post-processing
  search need the probabilities themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from training.evaluation.metrics import ConfusionMatrix, SegScores
from training.evaluation.postprocess import MIN_AREA_GRID, PostProcess, components, next_best
from training.evaluation.tta import TTA
from training.evaluation.vote import VOTES, VoteAccumulator


def tta_candidates(tta: TTA) -> list[TTA]:
    """The TTA choices within the views `tta` allows: each flip on/off x (no scale, each scale, all scales).

    The identity (no TTA) comes first, `tta` itself last.
    """
    flips = sorted({(h, v) for h in {False, tta.hflip} for v in {False, tta.vflip}})
    extra = [s for s in tta.scales if s != 1.0]
    scale_sets = [(1.0,)] + [tuple(sorted({1.0, s})) for s in extra] + ([tuple(tta.scales)] if len(extra) > 1 else [])
    out: list[TTA] = []
    for h, v in flips:
        for scales in scale_sets:
            t = TTA(h, v, scales)
            if t not in out:
                out.append(t)
    return out


def subsets(n: int) -> list[int]:
    """Non-empty subsets of n configs as bit masks (bit i = the i-th config), 2^n - 1 of them."""
    return list(range(1, 2**n))


def subset_members(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


@dataclass
class SubsetScorer:
    """Confusion matrices of every (TTA candidate, vote, subset of configs)."""

    n_configs: int
    num_classes: int
    ignore_index: int | None = None
    modes: Sequence[str] = ("none",)  # TTA candidate names
    matrices: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.modes = list(self.modes)
        n_sub = 2**self.n_configs - 1
        self.matrices = np.zeros((len(self.modes), len(VOTES), n_sub, self.num_classes, self.num_classes), np.int64)

    def update(self, per_config: Sequence[Sequence[torch.Tensor]], target: torch.Tensor) -> None:
        """Add one batch: per config, its probabilities under each mode (in `modes` order)."""
        for mi in range(len(self.modes)):
            ballots = [VoteAccumulator.ballot(pc[mi]) for pc in per_config]  # once per config, not per subset
            for s in subsets(self.n_configs):
                acc = VoteAccumulator()
                for i in subset_members(s):
                    acc.add(per_config[i][mi], ballots[i])
                for vi, method in enumerate(VOTES):
                    cm = ConfusionMatrix(self.num_classes, self.ignore_index)
                    cm.update(acc.labels(method), target)
                    self.matrices[mi, vi, s - 1] += cm.matrix.numpy()

    def merge(self, matrices: np.ndarray) -> None:
        self.matrices += matrices

    def matrix(self, mode: str, method: str, mask: int) -> np.ndarray:
        return self.matrices[self.modes.index(mode), VOTES.index(method), mask - 1]

    def scores(self, mode: str, method: str, mask: int, classes: list[str] | None = None) -> SegScores:
        return SegScores.from_matrix(self.matrix(mode, method, mask), classes)


def greedy_select(score_of: dict[int, float], n: int) -> tuple[int, list[dict[str, Any]]]:
    """Greedy forward selection: add the config that raises the score most; stop when none does.

    `score_of` maps every subset mask to its OOF mIoU. The first step picks the best single
    config, and a step is only taken when it improves the score, so the chosen subset scores
    at least as high as every single config. Returns (subset mask, the steps taken).
    """
    chosen, best, steps = 0, -np.inf, []
    while True:
        candidates = [(score_of[chosen | 1 << i], i) for i in range(n) if not chosen >> i & 1]
        if not candidates:
            break
        score, i = max(candidates, key=lambda c: (c[0], -c[1]))
        if score <= best:
            break
        chosen, best = chosen | 1 << i, score
        steps.append({"add": i, "subset": subset_members(chosen), "miou": float(score)})
    return chosen, steps


# ---- stored OOF probabilities -------------------------------------------------------------------


def quantize(proba: torch.Tensor) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 (1/255 steps): a quarter of float32, enough to vote and rank."""
    return (proba.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


@dataclass
class OOFFold:
    image_ids: list[int]
    proba: np.ndarray  # configs x N x C x H x W, uint8 (memory-mapped from disk)
    target: np.ndarray  # N x H x W, uint8

    @classmethod
    def save(cls, path_stem: Path, image_ids: Sequence[int], proba: np.ndarray, target: np.ndarray) -> None:
        from training.infra.fs import atomic_file

        for suffix, array in (("proba", proba), ("target", target), ("ids", np.asarray(image_ids, np.int64))):
            with atomic_file(Path(f"{path_stem}_{suffix}.npy"), "wb") as f:
                np.save(f, array)

    @classmethod
    def load(cls, path_stem: Path) -> "OOFFold":
        return cls(np.load(f"{path_stem}_ids.npy").tolist(), np.load(f"{path_stem}_proba.npy", mmap_mode="r"), np.load(f"{path_stem}_target.npy"))

    @classmethod
    def stack(cls, runs: Sequence["OOFFold"]) -> "OOFFold":
        """One fold of several runs' probabilities (each N x C x H x W, same images), without copying them."""
        return cls(runs[0].image_ids, StackedProba([r.proba for r in runs]), runs[0].target)


class StackedProba:
    """configs x N x C x H x W read as `[config, images]` from one array per config (memory-mapped files stay on disk)."""

    def __init__(self, arrays: Sequence[np.ndarray]):
        self.arrays = list(arrays)
        self.shape = (len(self.arrays), *self.arrays[0].shape)

    def __getitem__(self, key: tuple) -> np.ndarray:
        config, *rest = key
        return self.arrays[config][tuple(rest)]


def weighted_labels(fold: OOFFold, weights: Sequence[float], vote: str, chunk: int = 16) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(images slice, labels n x H x W, weighted probability sum n x C x H x W) in chunks of a fold."""
    n = fold.proba.shape[1]
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        acc = VoteAccumulator(hard=vote == "hard")
        for i, w in enumerate(weights):
            if w > 0:
                acc.add(torch.from_numpy(np.asarray(fold.proba[i, sl], dtype=np.float32)), weight=float(w))
        yield sl, acc.labels(vote), acc.prob_sum


def ensemble_matrix(folds: Sequence[OOFFold], weights: Sequence[float], vote: str, num_classes: int, ignore_index: int | None) -> np.ndarray:
    cm = ConfusionMatrix(num_classes, ignore_index)
    for fold in folds:
        for sl, labels, _ in weighted_labels(fold, weights, vote):
            cm.update(labels, torch.from_numpy(fold.target[sl]).long())
    return cm.matrix.numpy()


def greedy_weights(folds: Sequence[OOFFold], vote: str, num_classes: int, ignore_index: int | None,
                   max_steps: int | None = None, replacement: bool = True) -> tuple[list[int], float, list[dict[str, Any]]]:
    """Greedy forward selection with replacement (Caruana et al. 2004): weights = how often a config was picked.

    Each step adds the config that gives the highest OOF mIoU (repeats allowed); after
    max_steps the best-scoring prefix is kept (the earliest on ties), so the result scores at
    least as high as the best single config. Returns (counts per config, its mIoU, steps).
    `replacement=False`: each config at most once (at most n steps); steps[j] is then the
    (j+1)-member set, e.g. the search's diversity-aware top-k (tune/diversity.py).
    """
    n = folds[0].proba.shape[0]
    max_steps = max_steps or max(4, 2 * n)
    if not replacement:
        max_steps = min(max_steps, n)
    counts, steps, best = [0] * n, [], (-np.inf, [0] * n)
    for _ in range(max_steps):
        tried = []
        for i in range(n):
            if counts[i] and not replacement:
                continue
            trial = counts.copy()
            trial[i] += 1
            tried.append((SegScores.from_matrix(ensemble_matrix(folds, trial, vote, num_classes, ignore_index)).miou, i))
        score, i = max(tried, key=lambda c: (c[0], -c[1]))
        counts[i] += 1
        steps.append({"add": i, "weights": counts.copy(), "miou": float(score)})
        if score > best[0]:
            best = (score, counts.copy())
    return best[1], float(best[0]), steps


def search_postprocess(folds: Sequence[OOFFold], weights: Sequence[float], vote: str, num_classes: int, ignore_index: int | None,
                       grid: Sequence[float] = MIN_AREA_GRID, skip: Sequence[int] = (0,)) -> tuple[PostProcess, list[dict[str, Any]]]:
    """Per class (in id order), the smallest-component size that raises the OOF mIoU most, kept only where it does.

    Only the pixels a removal changes are re-counted: the confusion matrix is updated by the
    difference, so each (class, size) costs one connected-components pass per image.
    """
    labels, proba_of, targets = [], [], []
    for fold in folds:
        for sl, lab, _ in weighted_labels(fold, weights, vote):
            labels += list(lab.to(torch.uint8).numpy())
            proba_of += [(fold, sl.start + j) for j in range(lab.shape[0])]
            targets += list(fold.target[sl])
    matrix = sum((pair_counts(lab, tgt, num_classes, ignore_index) for lab, tgt in zip(labels, targets)), np.zeros((num_classes, num_classes), np.int64))
    current = SegScores.from_matrix(matrix).miou
    chosen: dict[int, float] = {}
    candidates: list[dict[str, Any]] = []

    for class_id in range(num_classes):
        if class_id in skip:
            continue
        comps = [components(lab, class_id) if (lab == class_id).any() else None for lab in labels]
        changes: dict[float, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        results = []
        for area in grid:
            delta = np.zeros_like(matrix)
            edits = []
            for idx, found in enumerate(comps):
                if found is None:
                    continue
                comp, areas = found
                small = (areas < area * labels[idx].size)[comp]
                if not small.any():
                    continue
                fold, j = proba_of[idx]
                new = next_best(_proba_sum(fold, j, weights), class_id, small)
                tgt = targets[idx][small]
                delta += pair_counts(new, tgt, num_classes, ignore_index) - pair_counts(labels[idx][small], tgt, num_classes, ignore_index)
                edits.append((idx, small, new))
            score = SegScores.from_matrix(matrix + delta).miou
            changes[area] = edits
            results.append((score, area, delta))
            candidates.append({"class_id": class_id, "min_area": area, "miou": float(score), "pixels_changed": int(sum(s.sum() for _, s, _ in edits))})
        if not results:
            continue
        score, area, delta = max(results, key=lambda r: (r[0], -r[1]))
        if score > current:
            chosen[class_id] = area
            matrix, current = matrix + delta, score
            for idx, small, new in changes[area]:
                labels[idx] = labels[idx].copy()
                labels[idx][small] = new
    return PostProcess(chosen), candidates


def pair_counts(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None) -> np.ndarray:
    """The confusion matrix of some pixels (any shape)."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(target.astype(np.int64)))
    return cm.matrix.numpy().astype(np.int64)


def _proba_sum(fold: OOFFold, j: int, weights: Sequence[float]) -> np.ndarray:
    """The weighted probability sum (C x H x W) of image j of a fold: what picks a removed pixel's new class."""
    total = None
    for i, w in enumerate(weights):
        if w > 0:
            p = np.asarray(fold.proba[i, j], dtype=np.float32) * float(w)
            total = p if total is None else total + p
    return total


def final_labels(folds: Sequence[OOFFold], weights: Sequence[float], vote: str, postprocess: PostProcess) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(image id, the ensemble's post-processed OOF mask, target) for every OOF image."""
    for fold in folds:
        for sl, lab, psum in weighted_labels(fold, weights, vote):
            for j, (mask, p) in enumerate(zip(lab.to(torch.uint8).numpy(), psum.numpy())):
                out = postprocess.apply(mask, p) if postprocess.enabled else mask
                yield fold.image_ids[sl.start + j], out, fold.target[sl.start + j]
