"""Choices scored out-of-fold: every subset of configs under every (TTA mode, vote), and greedy selection.

With k configs that is 2 x 2 x (2^k - 1) confusion matrices of C x C counts, filled in one
streaming pass; nothing per pixel is kept, so selection afterwards needs no stored probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from training.evaluation.metrics import ConfusionMatrix, SegScores
from training.evaluation.vote import VOTES, VoteAccumulator

MODES = ("plain", "tta")  # identity view only / all TTA views


def subsets(n: int) -> list[int]:
    """Non-empty subsets of n configs as bit masks (bit i = the i-th config), 2^n - 1 of them."""
    return list(range(1, 2**n))


def subset_members(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


@dataclass
class SubsetScorer:
    """Confusion matrices of every (mode, vote, subset of configs)."""

    n_configs: int
    num_classes: int
    ignore_index: int | None = None
    matrices: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n_sub = 2**self.n_configs - 1
        self.matrices = np.zeros((len(MODES), len(VOTES), n_sub, self.num_classes, self.num_classes), np.int64)

    def update(self, per_config: Sequence[tuple[torch.Tensor, torch.Tensor]], target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Add one batch: per config (plain probs, TTA probs). Returns the all-config labels per mode/vote."""
        last = {}
        for mi, mode in enumerate(MODES):
            ballots = [VoteAccumulator.ballot(pc[mi]) for pc in per_config]  # once per config, not per subset
            for s in subsets(self.n_configs):
                acc = VoteAccumulator()
                for i in subset_members(s):
                    acc.add(per_config[i][mi], ballots[i])
                for vi, method in enumerate(VOTES):
                    labels = acc.labels(method)
                    cm = ConfusionMatrix(self.num_classes, self.ignore_index)
                    cm.update(labels, target)
                    self.matrices[mi, vi, s - 1] += cm.matrix.numpy()
                    if s == 2**self.n_configs - 1:
                        last[f"{method}_{mode}"] = labels
        return last

    def merge(self, matrices: np.ndarray) -> None:
        self.matrices += matrices

    def matrix(self, mode: str, method: str, mask: int) -> np.ndarray:
        return self.matrices[MODES.index(mode), VOTES.index(method), mask - 1]

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
