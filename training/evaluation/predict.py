"""Prediction: test-time augmentation (TTA), fold/config ensembles, streaming over images.

Everything is averaged in probability space at one size: a model's logits for one TTA view
are un-flipped, resized (bilinear) to that size and softmaxed; the views' probabilities are
averaged. Two callers pick the size:
- OOF scoring (`SubsetScorer`) uses the score size, exactly as the trainer scores (argmax
  of the resized logits), so a single model's OOF numbers reproduce the folds' val mIoU;
- test prediction (`iter_predictions`) uses the ensemble frame, the largest member input
  size (data.image_size), so no model is upsampled before the vote; only the final label
  mask is resized, nearest-neighbour, to the requested output size (the submission's 256).

Ensembles vote across models (folds x configs):
- soft: argmax of the mean probability;
- hard: each model votes with the argmax of its (TTA-averaged) probabilities; the class
  with most votes wins; a tie goes to the tied class with the highest mean probability,
  and a tie of that too to the lowest class id (torch.max returns the first maximum).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.evaluation.metrics import ConfusionMatrix, SegScores, resize_logits

if TYPE_CHECKING:
    from training.config import Config

VOTES = ("soft", "hard")
DEFAULT_SCALES = (0.75, 1.0, 1.25)
TTA_TOKENS = ("none", "flip", "hflip", "vflip", "scale")


# ---- test-time augmentation ------------------------------------------------------------


@dataclass(frozen=True)
class TTA:
    """Which views to average: flips (undone on the output) and input scales (resized back)."""

    hflip: bool = False
    vflip: bool = False
    scales: tuple[float, ...] = (1.0,)

    @classmethod
    def parse(cls, spec: str | None, scales: Sequence[float] = DEFAULT_SCALES) -> "TTA":
        """Comma-separated `flip` (= `hflip`), `vflip`, `scale` (the `scales`), or `none`.

        `flip` is horizontal only: a vertical flip is a natural view for top-down photos but not
        for street scenes, so it is asked for explicitly.
        """
        tokens = [t.strip() for t in (spec or "none").split(",") if t.strip()]
        unknown = [t for t in tokens if t not in TTA_TOKENS]
        if unknown:
            raise ValueError(f"unknown TTA {unknown}; choose from {list(TTA_TOKENS)} (comma-separated)")
        if "none" in tokens and len(tokens) > 1:
            raise ValueError("TTA 'none' cannot be combined with other views")
        scales = tuple(float(s) for s in scales)
        if any(s <= 0 for s in scales):
            raise ValueError(f"TTA scales must be > 0, got {list(scales)}")
        return cls(
            hflip="flip" in tokens or "hflip" in tokens,
            vflip="vflip" in tokens,
            scales=tuple(sorted(set(scales) | {1.0})) if "scale" in tokens else (1.0,),
        )

    @property
    def enabled(self) -> bool:
        return self.hflip or self.vflip or self.scales != (1.0,)

    @property
    def name(self) -> str:
        parts = [p for p, on in (("hflip", self.hflip), ("vflip", self.vflip)) if on]
        if self.scales != (1.0,):
            parts.append("scale(" + ",".join(f"{s:g}" for s in self.scales) + ")")
        return "+".join(parts) or "none"

    def views(self) -> list[tuple[float, tuple[int, ...]]]:
        """(scale, flipped dims) per view, the identity view first."""
        flips: list[tuple[int, ...]] = [()]
        if self.hflip:
            flips.append((3,))
        if self.vflip:
            flips.append((2,))
        ordered = sorted(self.scales, key=lambda s: s != 1.0)
        return [(s, dims) for s in ordered for dims in flips]


def scaled_side(side: int, scale: float, divisor: int) -> int:
    """side * scale rounded to a multiple of the architecture's divisor (at least one divisor)."""
    return max(divisor, int(round(side * scale / divisor)) * divisor)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def view_proba(
    model: nn.Module,
    images: torch.Tensor,
    out_size: tuple[int, int],
    scale: float = 1.0,
    dims: tuple[int, ...] = (),
    divisor: int = 32,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Softmax probabilities (N x C x out_size) of one TTA view, mapped back to the input frame."""
    x = images
    if scale != 1.0:
        size = (scaled_side(images.shape[-2], scale, divisor), scaled_side(images.shape[-1], scale, divisor))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    if dims:
        x = x.flip(dims)
    with _autocast(images.device, dtype):
        logits = model(x)
    logits = logits.float()
    if dims:
        logits = logits.flip(dims)
    return resize_logits(logits, out_size).softmax(1)


@torch.no_grad()
def predict_proba_views(
    model: nn.Module,
    images: torch.Tensor,
    out_size: tuple[int, int],
    tta: TTA = TTA(),
    divisor: int = 32,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(identity-view probabilities, TTA-averaged probabilities); one forward pass per view."""
    views = tta.views()
    plain = view_proba(model, images, out_size, *views[0], divisor, dtype)  # views() puts the identity first
    total = plain.clone()
    for scale, dims in views[1:]:
        total += view_proba(model, images, out_size, scale, dims, divisor, dtype)
    return plain, total / len(views)


def predict_proba(model, images, out_size, tta: TTA = TTA(), divisor: int = 32, dtype=None) -> torch.Tensor:
    """TTA-averaged softmax probabilities, N x C x out_size."""
    return predict_proba_views(model, images, out_size, tta, divisor, dtype)[1]


# ---- voting ------------------------------------------------------------------------------


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
        """One model's vote: 1 at its argmax class, else 0 (N x C x H x W, int32)."""
        top = class_argmax(probs, keepdim=True)
        return torch.zeros(probs.shape, dtype=torch.int32, device=probs.device).scatter_(1, top, 1)

    def add(self, probs: torch.Tensor, ballot: torch.Tensor | None = None) -> None:
        """Add one model's probabilities (N x C x H x W); `ballot` if already computed."""
        self.prob_sum = probs.clone() if self.prob_sum is None else self.prob_sum.add_(probs)
        if self.hard:
            ballot = self.ballot(probs) if ballot is None else ballot
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


def vote(probs: Sequence[torch.Tensor] | torch.Tensor, method: str = "soft") -> torch.Tensor:
    """Labels (N x H x W) from several models' probabilities (M x N x C x H x W)."""
    acc = VoteAccumulator()
    for p in probs:
        acc.add(p)
    return acc.labels(method)


def soft_vote(probs) -> torch.Tensor:
    return vote(probs, "soft")


def hard_vote(probs) -> torch.Tensor:
    return vote(probs, "hard")


# ---- models and inputs ---------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """How a config preprocesses an image; models sharing one share the input tensor."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    eval_augment: str

    @classmethod
    def of(cls, cfg: "Config") -> "InputSpec":
        aug = cfg.augment
        return cls(cfg.data.image_size, tuple(aug.mean), tuple(aug.std), json.dumps(aug.eval, sort_keys=True))

    def transform(self):
        """The eval pipeline: uint8 C x H x W tensors (see `model_inputs`)."""
        from training.data.transforms import build_transform

        return build_transform(json.loads(self.eval_augment), self.image_size, train=False)


def model_inputs(members: Sequence["Member"], inputs: Sequence[torch.Tensor], device) -> list[torch.Tensor]:
    """The loader's uint8 tensors (one per InputSpec) -> normalised float inputs on `device`, each once."""
    from training.data.transforms import normalize_images

    prepared: dict[int, torch.Tensor] = {}
    for m in members:
        if m.input_index not in prepared:  # members sharing an input share its mean/std (InputSpec)
            aug = m.cfg.augment
            prepared[m.input_index] = normalize_images(inputs[m.input_index].to(device), aug.mean, aug.std)
    return [prepared.get(i, x) for i, x in enumerate(inputs)]


class MultiInputTransform:
    """An albumentations-style callable giving one image tensor per InputSpec (as a tuple).

    Lets one DataLoader pass serve models trained at different image sizes or normalisations.
    """

    def __init__(self, specs: Sequence[InputSpec]):
        self.specs = list(specs)
        self.transforms = [s.transform() for s in self.specs]

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None, **_: Any) -> dict[str, Any]:
        return {"image": tuple(t(image=image)["image"] for t in self.transforms), "mask": mask}

    def set_random_seed(self, seed: int) -> None:  # eval transforms are deterministic
        pass


@dataclass
class Member:
    """One trained model of an ensemble: a config rank and a fold."""

    rank: int
    fold: int | None
    model: nn.Module
    cfg: "Config"
    input_index: int = 0
    divisor: int = 32
    dtype: torch.dtype | None = None


def load_member(checkpoint: str | Path, rank: int, device: torch.device) -> Member:
    """A model from a trainer best.pt/last.pt (weights only; no pretrained download needed)."""
    from training.config import config_from_dict
    from training.engine.trainer import amp_dtype, load_checkpoint
    from training.modeling.models import arch_spec, build_model

    state = load_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"], f"{checkpoint}: config")
    # The checkpoint holds every weight; skip the encoder's pretrained init.
    model_cfg = cfg.model.model_copy(update={"encoder_weights": None})
    model = build_model(model_cfg, len(state["classes"]))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return Member(rank, state.get("fold"), model, cfg, 0, arch_spec(cfg.model.arch).divisor, amp_dtype(cfg.trainer.amp, device))


def assign_inputs(members: Sequence[Member]) -> list[InputSpec]:
    """The distinct InputSpecs of `members`, setting each member's input_index."""
    specs: list[InputSpec] = []
    for m in members:
        spec = InputSpec.of(m.cfg)
        if spec not in specs:
            specs.append(spec)
        m.input_index = specs.index(spec)
    return specs


def ensemble_proba(members: Sequence[Member], inputs: Sequence[torch.Tensor], out_size, tta: TTA, hard: bool = True) -> VoteAccumulator:
    """Accumulate every member's TTA probabilities for one batch."""
    acc = VoteAccumulator(hard)
    for m in members:
        acc.add(predict_proba(m.model, inputs[m.input_index], out_size, tta, m.divisor, m.dtype))
    return acc


# ---- streaming over images -------------------------------------------------------------------


def ensemble_frame(members: Sequence[Member]) -> tuple[int, int]:
    """Where an ensemble votes: the largest member input size (data.image_size), square."""
    side = max(m.cfg.data.image_size for m in members)
    return side, side


def resize_labels(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A H x W label mask resized nearest-neighbour (cv2.INTER_NEAREST) to `size` (rows, cols)."""
    import cv2

    if mask.shape == tuple(size):
        return mask
    return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


def iter_predictions(
    members: Sequence[Member],
    loader: Iterable,
    out_size: tuple[int, int],
    tta: TTA = TTA(),
    method: str = "soft",
    device: torch.device | str = "cpu",
) -> Iterator[tuple[Any, np.ndarray]]:
    """(image id, uint8 label mask at `out_size`) per image, one batch in memory at a time.

    Members predict and vote in the ensemble frame (`ensemble_frame`); the argmax mask is
    then resized nearest-neighbour to `out_size`. `loader` yields (inputs, ids) where inputs
    is a tuple with one uint8 tensor per InputSpec (ImageDataset with a MultiInputTransform,
    see `assign_inputs`).
    """
    frame = ensemble_frame(members)
    for inputs, ids in loader:
        inputs = model_inputs(members, inputs, device)
        labels = ensemble_proba(members, inputs, frame, tta, hard=method == "hard").labels(method)
        for image_id, mask in zip(ids, labels.to(torch.uint8).cpu().numpy()):
            yield (image_id.item() if torch.is_tensor(image_id) else image_id), resize_labels(mask, out_size)


# ---- out-of-fold scoring of every subset of configs ------------------------------------------

MODES = ("plain", "tta")  # identity view only / all TTA views


def subsets(n: int) -> list[int]:
    """Non-empty subsets of n configs as bit masks (bit i = the i-th config), 2^n - 1 of them."""
    return list(range(1, 2**n))


def subset_members(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


@dataclass
class SubsetScorer:
    """Confusion matrices of every (mode, vote, subset of configs) in one streaming pass.

    With k configs that is 2 x 2 x (2^k - 1) matrices of C x C counts; nothing per pixel is
    kept, so greedy ensemble selection afterwards needs no stored probabilities.
    """

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
