"""Voting across models (folds x configs) from their class probabilities.

- soft: argmax of the mean probability;
- hard: each model votes with the argmax of its (TTA-averaged) probabilities; the class with
  most votes wins (a weighted model's vote counts its weight); a tie goes to the tied class with the highest mean probability, and a tie
  of that too to the lowest class id (torch.max returns the first maximum).
"""

from __future__ import annotations

from typing import Sequence

import torch

VOTES = ("soft", "hard")


def class_argmax(t: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Index of the largest class score (dim 1), the lowest index on ties.

    torch.max(dim) is the same reduction as argmax but several times faster on CPU for the
    strided class dimension of N x C x H x W tensors.
    """
    return t.max(1, keepdim=keepdim).indices


class VoteAccumulator:
    """Running sums for soft and hard voting, so an ensemble never holds all models' outputs."""

    def __init__(self, hard: bool = True) -> None:
        self.hard = hard  # count votes (only hard voting needs them)
        self.prob_sum: torch.Tensor | None = None
        self.votes: torch.Tensor | None = None
        self.n = 0

    @staticmethod
    def ballot(probs: torch.Tensor) -> torch.Tensor:
        """One model's vote: 1 at its argmax class, else 0 (N x C x H x W, float32 so votes can be weighted)."""
        top = class_argmax(probs, keepdim=True)
        return torch.zeros(probs.shape, dtype=torch.float32, device=probs.device).scatter_(1, top, 1.0)

    def add(self, probs: torch.Tensor, ballot: torch.Tensor | None = None, weight: float = 1.0) -> None:
        """Add one model's probabilities (N x C x H x W) with `weight`; `ballot` if already computed."""
        weighted = probs if weight == 1.0 else probs * weight
        self.prob_sum = weighted.clone() if self.prob_sum is None else self.prob_sum.add_(weighted)
        if self.hard:
            ballot = self.ballot(probs) if ballot is None else ballot
            if weight != 1.0:
                ballot = ballot * weight
            self.votes = ballot.clone() if self.votes is None else self.votes.add_(ballot)
        self.n += 1

    def labels(self, method: str) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no model has voted")
        if method == "soft":
            return class_argmax(self.prob_sum)
        if method == "hard":
            if not self.hard:
                raise ValueError("this accumulator was made for soft voting only")
            top = self.votes == self.votes.amax(1, keepdim=True)
            # Among the classes with most votes, the highest mean probability; then the lowest id.
            return class_argmax(torch.where(top, self.prob_sum, torch.full_like(self.prob_sum, -1.0)))
        raise ValueError(f"unknown vote {method!r}; choose from {list(VOTES)}")


def vote(probs: Sequence[torch.Tensor] | torch.Tensor, method: str = "soft", weights: Sequence[float] | None = None) -> torch.Tensor:
    """Labels (N x H x W) from several models' probabilities (M x N x C x H x W), optionally weighted."""
    acc = VoteAccumulator()
    for i, p in enumerate(probs):
        acc.add(p, weight=1.0 if weights is None else float(weights[i]))
    return acc.labels(method)


def soft_vote(probs) -> torch.Tensor:
    return vote(probs, "soft")


def hard_vote(probs) -> torch.Tensor:
    return vote(probs, "hard")
