"""MLflow lineage of every stage: one tag vocabulary, runs addressed by key, reproducibility tags.

A stage instance (one search, one k-fold directory) has a `stage_id` kept in its own state
file; its runs are keyed `<stage_id>/<role...>`, so a resumed stage finds its runs again and
a fresh one (a moved-away k-fold directory) makes new ones. Each parent run is tagged with
the run of the stage it builds on (`segtune.upstream_run_id`: the k-fold's parent names the
search's parent). Every run carries the source, user and git commit tags MLflow's own context
providers set; parents also hold the installed package versions.
"""

from __future__ import annotations

import uuid
from functools import cached_property
from importlib import metadata
from typing import Any

from training.infra.fs import REPO_ROOT
from training.infra.tracking import Tracker

# The tag vocabulary (keys of MLflow run tags written by any stage).
ROLE = "segtune.role"  # search | trial | kfold | kfold_fold | kfold_ensemble
STAGE_ID = "segtune.stage_id"
EXPERIMENT = "segtune.experiment"
RESULTS_DIR = "segtune.results_dir"
UPSTREAM = "segtune.upstream_run_id"
TRIAL_ID = "segtune.trial_id"
STATUS = "segtune.status"
FOLD = "segtune.fold"
CONFIG_RANK = "segtune.config_rank"
CHECKPOINT = "segtune.checkpoint"
ERROR = "segtune.error"
GIT_COMMIT = "mlflow.source.git.commit"
# Names earlier versions wrote (the k-fold and the search each had their own). Still written
# beside the vocabulary above, so saved MLflow searches and scripts keep working; read the
# segtune.* names.
LEGACY_TAGS = {
    ROLE: ("segtune.stage",),
    TRIAL_ID: ("trial_id",),
    CONFIG_RANK: ("config_rank",),
    FOLD: ("fold",),
    CHECKPOINT: ("checkpoint", "segtune.best_checkpoint"),
    UPSTREAM: ("search_parent_run_id",),
    ERROR: ("error",),
    "segtune.checkpoint_bytes": ("checkpoint_bytes",),
    "segtune.out_dir": ("out_dir",),
    "segtune.selected_ranks": ("selected_ranks",),
    "segtune.tta": ("tta",),
    "segtune.vote": ("vote",),
    "segtune.ensemble_key": ("ensemble_key",),
    "segtune.submission": ("submission",),
}
# Packages whose versions decide a result; also tagged on every parent run, not only listed.
KEY_PACKAGES = ("torch", "torchvision", "segmentation-models-pytorch", "timm", "albumentations", "ray", "optuna", "mlflow")


def new_stage_id() -> str:
    return uuid.uuid4().hex[:12]


def with_legacy_names(tags: dict[str, Any]) -> dict[str, Any]:
    return {**tags, **{old: tags[new] for new, olds in LEGACY_TAGS.items() if new in tags for old in olds}}


class Lineage:
    """The runs of one stage instance in one MLflow experiment."""

    def __init__(self, tracker: Tracker, experiment: str, stage_id: str):
        self.tracker = tracker
        self.experiment = experiment
        self.stage_id = stage_id

    def key(self, *parts: Any) -> str:
        return "/".join([self.stage_id, *map(str, parts)])

    @cached_property
    def context_tags(self) -> dict[str, str]:
        """mlflow.user, mlflow.source.* and the git commit of this checkout, resolved once in the driver."""
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.git_utils import get_git_commit

        tags = {k: str(v) for k, v in resolve_tags().items()}
        if GIT_COMMIT not in tags:  # the entry point may live outside the repo (pytest, a notebook)
            commit = get_git_commit(str(REPO_ROOT))
            if commit:
                tags[GIT_COMMIT] = commit
        return tags

    def run(self, key: str, name: str, role: str, tags: dict[str, Any] | None = None, parent: str | None = None) -> bool:
        """Find or create the run `key` (in the background); True when this session had not known it."""
        base = {ROLE: role, STAGE_ID: self.stage_id, EXPERIMENT: self.experiment, **self.context_tags}
        return self.tracker.create_run(key, self.experiment, name, with_legacy_names({**base, **(tags or {})}), parent_key=parent)

    def set_tags(self, key: str, tags: dict[str, Any]) -> None:
        self.tracker.set_tags(key, with_legacy_names(tags))

    def run_id(self, key: str) -> str | None:
        return self.tracker.run_id(key)

    def log_epoch(self, key: str, epoch: int, metrics: dict[str, Any]) -> None:
        """One epoch's metrics at step `epoch`, skipped when the run already has that epoch."""
        self.tracker.log_metrics(key, metrics, step=epoch, dedupe=True)

    def log_environment(self, key: str) -> None:
        """Installed package versions on a parent run: key ones as tags, all as environment/packages.txt."""
        installed = sorted({(d.metadata["Name"] or "").lower().replace("_", "-"): d.version for d in metadata.distributions() if d.metadata["Name"]}.items())
        versions = dict(installed)
        self.tracker.set_tags(key, {f"segtune.version.{name}": versions[name] for name in KEY_PACKAGES if name in versions})
        self.tracker.log_text(key, "".join(f"{name}=={version}\n" for name, version in installed), "environment/packages.txt")
