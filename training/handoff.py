"""What one stage hands the next, as typed files: the search's best configs, the k-fold's result.

Each file names its format and version, so a stage refuses an old or foreign file with one
line instead of failing on a missing key halfway through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from training.config import Config, config_from_dict, read_yaml
from training.errors import ConfigError
from training.infra.fs import write_yaml

BEST_CONFIGS = "best_configs.yaml"
KFOLD_RESULT = "kfold_result.yaml"


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid")
    remedy: ClassVar[str] = ""

    @classmethod
    def read(cls, path: Path):
        raw = read_yaml(path)
        expected = cls.model_fields["format"].default
        if raw.get("format") != expected:
            found = f"format {raw['format']!r}" if "format" in raw else "no 'format' key"
            raise ConfigError(
                f"{path}: not a {expected} file ({found}): written by an older segtune or another tool; "
                f"{cls.remedy}"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"{path}: {where}: {first['msg']}") from None

    def write(self, path: Path) -> Path:
        return write_yaml(path, self.model_dump(mode="json"))


class RankedConfig(BaseModel):
    """One config the search hands on: its full training config and how it did on the search fold."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(ge=1)
    trial_id: str
    best_val_miou: float | None = None
    best_epoch: int | None = None
    epochs_trained: int = Field(ge=1)
    status: str = "completed"
    mlflow_run_id: str | None = None
    checkpoint: str | None = None  # the trial's best.pt
    params: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any]

    def to_config(self, source: str) -> Config:
        return config_from_dict(self.config, source)


class TopKEnsemble(BaseModel):
    """One way to pick the top-k: its trials (in hand-off order) and their soft-vote ensemble mIoU on the search fold."""

    model_config = ConfigDict(extra="forbid")

    trials: list[str]
    fold_miou: float
    steps: list[dict[str, Any]] = Field(default_factory=list)  # greedy selection: each step's added trial and mIoU


class TopKSelection(BaseModel):
    """How the configs of best_configs.yaml were chosen (tune/diversity.py)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["individual", "diverse"]  # what `configs` holds
    asked: Literal["auto", "individual", "diverse"] = "auto"  # search.top_k_method
    chosen_by: str  # why `method`, in words
    fold: int = 0
    candidates: list[str] = Field(default_factory=list)  # completed trials with stored validation probabilities
    individual: TopKEnsemble | None = None
    diverse: TopKEnsemble | None = None
    notes: list[str] = Field(default_factory=list)


class BestConfigs(_Document):
    """results/<experiment>/best_configs.yaml: written by tune/search.py, read by the k-fold and later stages."""

    format: Literal["segtune.best_configs"] = "segtune.best_configs"
    version: Literal[2] = 2
    experiment: str
    space: str
    smoke: bool = False
    data_root: str | None = None
    metric: str = "val_miou"
    fold: int = 0
    fold_manifest: str | None = None
    mlflow_tracking_uri: str | None = None
    mlflow_experiment_id: str | None = None
    search_parent_run_id: str | None = None
    configs: list[RankedConfig] = Field(min_length=1)
    selection: TopKSelection | None = None  # absent in files of searches before the diversity-aware top-k

    remedy: ClassVar[str] = "re-run tune/search.py to write a current one"

    @classmethod
    def load(cls, path: Path) -> tuple["BestConfigs", list[Config]]:
        """The document and every entry's validated Config (errors name the file and configs[i])."""
        doc = cls.read(path)
        ranks = [c.rank for c in doc.configs]
        if len(set(ranks)) != len(ranks):
            raise ConfigError(f"{path}: configs[*].rank: duplicate ranks {ranks}")
        return doc, [entry.to_config(f"{path}: configs[{i}].config") for i, entry in enumerate(doc.configs)]


class TTASpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hflip: bool = False
    vflip: bool = False
    scales: list[float] = Field(default_factory=lambda: [1.0])


class EnsembleMember(BaseModel):
    """One fold model of the ensemble; its weight is its config's (how often selection picked it)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str  # best.pt; relative paths are relative to the file that names them
    experiment: str
    rank: int
    fold: int
    weight: float = Field(default=1.0, gt=0)
    val_miou: float | None = None
    epochs: int | None = None


class EnsembleSpec(BaseModel):
    """Everything needed to run the selected ensemble: members, TTA views, vote, post-processing.

    The submission, predict.py, the MLflow model and the ONNX export all build from this one spec
    (evaluation/ensemble.py), so they predict the same masks.
    """

    model_config = ConfigDict(extra="forbid")

    classes: list[str] = Field(min_length=2)
    members: list[EnsembleMember] = Field(min_length=1)
    tta: TTASpec = Field(default_factory=TTASpec)
    vote: Literal["soft", "hard"] = "soft"
    postprocess: dict[str, float] = Field(default_factory=dict)  # class name -> smallest component kept, fraction of the image


class KFoldResult(_Document):
    """results/<name>/kfold/kfold_result.yaml: the selected ensemble, for the stages after the k-fold."""

    format: Literal["segtune.kfold_result"] = "segtune.kfold_result"
    version: Literal[2] = 2
    experiment: str  # the k-fold's name: the search's experiment, or the name of an ensemble across searches
    sources: list[str]  # the best_configs.yaml files whose configs were candidates
    data_root: str
    fold_manifest: str | None
    n_folds: int
    ensemble: EnsembleSpec
    oof_miou: float
    decisions: str  # summary.json: every candidate scored for each choice
    submission: str
    mlflow_tracking_uri: str | None = None
    mlflow_parent_run_id: str | None = None

    remedy: ClassVar[str] = "re-run training/final_kfold.py --resume to write a current one"


PSEUDO_LABELS = "pseudo_labels.yaml"


class PseudoImage(BaseModel):
    """One pseudo-labelled image: the photo, its label mask (PNG at the image's own size) and the photo's content hash."""

    model_config = ConfigDict(extra="forbid")

    image: str  # absolute path
    mask: str  # relative to the set's file
    sha256: str
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    source: Literal["test", "unlabelled"]


class PseudoLabelSet(_Document):
    """pseudo/round<N>/pseudo_labels.yaml: images the previous round's ensemble labelled, for the training side of every fold.

    Written by the pseudo-label stage, read through a config's `data.pseudo_labels` by the trainer.
    Unconfident pixels (top ensemble probability below `threshold`) hold `ignore_index`.
    """

    format: Literal["segtune.pseudo_labels"] = "segtune.pseudo_labels"
    version: Literal[1] = 1
    classes: list[str] = Field(min_length=2)
    ignore_index: int = Field(ge=0, le=255)
    threshold: float = Field(gt=0, le=1)
    ensemble: str  # the kfold_result.yaml whose ensemble labelled them
    images: list[PseudoImage] = Field(min_length=1)
    confident_share: float = Field(ge=0, le=1)  # pixels labelled / all pixels
    class_share: dict[str, float] = Field(default_factory=dict)  # per class: its confident pixels / all pixels

    remedy: ClassVar[str] = "re-run training/pseudo_label.py --resume to write a current one"

    @classmethod
    def read(cls, path: Path) -> "PseudoLabelSet":
        if not Path(path).is_file():
            raise ConfigError(f"{path}: data.pseudo_labels: no such file")
        return super().read(path)
