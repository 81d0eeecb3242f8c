"""The one object a k-fold run hands from step to step: its inputs, plan, services and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.stages.kfold.plan import Candidate, FoldJob, KFoldOptions, Log

if TYPE_CHECKING:
    from training.config import Config
    from training.data.coco import CocoIndex
    from training.data.dataset import PreparedData
    from training.evaluation.tta import TTA
    from training.handoff import BestConfigs
    from training.infra.lineage import Lineage
    from training.infra.ray import RaySession


@dataclass
class KFoldRun:
    options: KFoldOptions
    best: "BestConfigs"
    best_path: Path
    candidates: list[Candidate]
    data: "PreparedData"
    test_index: "CocoIndex"
    tta: "TTA"
    kfold_dir: Path
    log: Log
    stage_id: str = ""
    name: str = ""  # the k-fold's name: the search's experiment, or the ensemble's across searches
    sources: list = field(default_factory=list)  # (best_configs.yaml, BestConfigs) per search
    jobs: list[FoldJob] = field(default_factory=list)
    lineage: "Lineage | None" = None
    parent: str | None = None  # the MLflow run key of the k-fold's parent run
    ray: "RaySession | None" = None
    oof_images: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    _refs: dict[int, Any] = field(default_factory=dict)

    @property
    def cfg0(self) -> "Config":
        return self.candidates[0].cfg

    @property
    def n_folds(self) -> int:
        return self.data.manifest.n_splits

    @property
    def score_size(self) -> int:
        return self.cfg0.data.score_size or self.cfg0.data.image_size

    def connect(self) -> None:
        """Ray on first use, so a resumed run with nothing left to compute never starts it."""
        from training.infra.ray import connect

        if self.ray is None:
            self.ray = connect(self.options.address, log=self.log)

    def resources(self, cfgs: list["Config"]) -> dict[str, float]:
        """Task resources from the configs' `search.resources`, by the one policy of infra/ray.py."""
        from training.infra.ray import fit_resources

        self.connect()
        cpu, gpu = fit_resources(max(c.search.resources.cpu for c in cfgs), max(c.search.resources.gpu for c in cfgs), self.ray, self.log, "k-fold tasks")
        return {"num_cpus": cpu, "num_gpus": gpu}

    def put(self, obj: Any):
        from training.infra.ray import put_once

        self.connect()
        return put_once(self._refs, obj)
