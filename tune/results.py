"""What a search leaves behind: per-trial records, leaderboard.csv, best_configs.yaml, parameter importances, a summary.

Records are built from Tune's Trial objects (live ones in the callback, restored ones from
the experiment directory after the search), so the leaderboard, the MLflow tags and the
k-fold contract all classify trials the same way.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from training.config import SearchSpace
from training.engine.checkpoint import BEST, LAST
from training.handoff import BestConfigs, RankedConfig
from training.infra.fs import atomic_file
from training.infra.ray import error_line
from tune.cost import COST_COLUMNS, COST_HEADER, OVER_BUDGET, OVER_BUDGET_KEY, cost_cells, cost_fields
from tune.space import trial_budget, trial_params

LEADERBOARD = "leaderboard.csv"
IMPORTANCES_PLOT = "param_importances.png"
COMPLETED = "completed"
STOPPED_BY_ASHA = "stopped by ASHA"


@dataclass
class TrialRecord:
    trial_id: str
    status: str
    best_val_miou: float | None
    best_epoch: int | None
    epochs_trained: int
    params: dict[str, Any]
    checkpoint: str | None  # the trial's best.pt (latest reported checkpoint directory)
    mlflow_run_id: str | None = None
    node_id: str | None = None
    failures: int = 0
    metric_value: float | None = None  # best value of search.metric, for ranking
    # what the trial cost (tune/cost.py: COST_COLUMNS)
    train_seconds: float | None = None
    s_per_epoch: float | None = None
    peak_mem_mb: float | None = None
    mem_kind: str | None = None
    infer_ms_per_image: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in (COMPLETED, STOPPED_BY_ASHA, OVER_BUDGET) or self.status.startswith(("error", "stopped"))

    @property
    def usable(self) -> bool:
        """A config k-fold may retrain: it trained without error, within the cost budget, and has a score."""
        return self.best_val_miou is not None and not self.status.startswith("error") and self.status != OVER_BUDGET


def error_reason(trial: Any) -> str:
    """`Type: message` of what made a trial fail, one line."""
    err = None
    for getter in ("get_pickled_error", "get_error"):
        try:
            err = getattr(trial, getter)()
        except Exception:  # a missing or unreadable error file: try the other one
            err = None
        if err is not None:
            break
    return "unknown error" if err is None else error_line(err)


def trial_status(trial: Any, budget: int, ending: bool = False) -> str:
    """completed | stopped by ASHA | stopped (time budget) | over budget | error: <reason> | unfinished.

    `ending`: called from Tune's on_trial_complete, before the trial is marked TERMINATED.
    """
    if trial.status == "ERROR":
        return f"error: {error_reason(trial)}"
    from tune.resume import REPLAYED_STATUS

    last = trial.last_result or {}
    if last.get(REPLAYED_STATUS):  # a trial that had ended before the resume and replayed its result
        return last[REPLAYED_STATUS]
    if last.get(OVER_BUDGET_KEY):  # stopped itself after its first epoch (tune/cost.py)
        return OVER_BUDGET
    if int(last.get("epoch", 0) or 0) >= budget:
        return COMPLETED
    if trial.status == "TERMINATED" or ending:
        # The scheduler's STOP marks the result `done`; Tune's time budget stops without it.
        return STOPPED_BY_ASHA if last.get("done") else "stopped (time budget)"
    return "unfinished"


def _best_checkpoint(trial: Any) -> str | None:
    checkpoint = getattr(trial, "checkpoint", None)
    if checkpoint is None:
        return None
    path = f"{checkpoint.path.rstrip('/')}/{BEST}"
    if "://" not in path and not os.path.isfile(path):
        return None
    return path


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def trial_record(trial: Any, space: SearchSpace, run_id: str | None = None, ending: bool = False) -> TrialRecord:
    from tune.resume import saved_run

    cfg = space.defaults
    last = trial.last_result or {}
    metric, mode = cfg.search.metric, cfg.search.mode
    analysis = (getattr(trial, "metric_analysis", None) or {}).get(metric, {})
    status = trial_status(trial, trial_budget(cfg), ending)
    epochs, best_miou, best_epoch, best_path = int(last.get("epoch", 0) or 0), _number(last.get("best_miou")), last.get("best_epoch"), _best_checkpoint(trial)
    saved = saved_run(getattr(trial, "path", None)) if status == "unfinished" else None
    if saved and saved[1]["epochs_trained"] > epochs:  # checkpointed, but stopped before Tune recorded the result
        epochs, best_miou, best_epoch, best_path = saved[1]["epochs_trained"], _number(saved[1]["best_miou"]), saved[1]["best_epoch"], str(saved[0] / BEST)
    return TrialRecord(
        trial_id=trial.trial_id,
        status=status,
        best_val_miou=best_miou,
        best_epoch=int(best_epoch) if best_epoch else None,
        epochs_trained=epochs,
        params=trial_params(space, trial.config),
        checkpoint=best_path,
        mlflow_run_id=run_id,
        node_id=last.get("node_id"),
        failures=int(getattr(trial, "num_failures", 0) or 0),
        metric_value=best_miou if metric in ("val_miou", "best_miou") else _number(analysis.get(mode)),
        **cost_fields(last),
    )


def ending_record(trial_id: str, ending: dict[str, Any], space: SearchSpace, run_id: str | None = None) -> TrialRecord:
    """The record of a trial known only from its recorded ending (tune/resume.py): it started and ended after the
    last experiment state Tune saved before its driver was killed, so Tune never sees it again."""
    result = ending.get("result") or {}
    best_epoch = result.get("best_epoch")
    checkpoint = f"{ending['checkpoint'].rstrip('/')}/{BEST}" if ending.get("checkpoint") else None
    if checkpoint and "://" not in checkpoint and not os.path.isfile(checkpoint):
        checkpoint = None
    best_miou = _number(result.get("best_miou"))
    metric = space.defaults.search.metric
    return TrialRecord(
        trial_id=trial_id,
        status=ending["status"],
        best_val_miou=best_miou,
        best_epoch=int(best_epoch) if best_epoch else None,
        epochs_trained=int(result.get("epoch", 0) or 0),
        params=trial_params(space, ending.get("config") or {}),
        checkpoint=checkpoint,
        mlflow_run_id=run_id,
        node_id=result.get("node_id"),
        failures=int(ending.get("failures", 0)),
        metric_value=best_miou if metric in ("val_miou", "best_miou") else _number(result.get(metric)),
        **cost_fields(result),
    )


def collect_records(
    trials: Iterable[Any],
    space: SearchSpace,
    run_id_of: Callable[[str], str | None] = lambda _: None,
    endings: dict[str, dict[str, Any]] | None = None,
) -> list[TrialRecord]:
    """Records ranked best first by search.metric (trials without a score last).

    `endings` (tune/resume.py) adds the ended trials that Tune's restored state lacks.
    """
    sign = -1.0 if space.defaults.search.mode == "max" else 1.0
    records = [trial_record(t, space, run_id_of(t.trial_id)) for t in trials]
    known = {r.trial_id for r in records}
    records += [ending_record(k, e, space, run_id_of(k)) for k, e in (endings or {}).items() if k not in known]
    return sorted(records, key=lambda r: (r.metric_value is None, sign * (r.metric_value or 0.0), r.trial_id))


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return value


def write_leaderboard(records: list[TrialRecord], path: Path) -> Path:
    """One row per trial, best first; searched params as columns named by their dotted path."""
    params = sorted({k for r in records for k in r.params})
    columns = ["rank", "trial_id", "status", "best_val_miou", "best_epoch", "epochs_trained", *COST_COLUMNS, *params, "mlflow_run_id", "checkpoint", "node_id", "failures"]
    with atomic_file(path, newline="") as f:  # readers (k-fold, a user's `watch`) never see half a file
        writer = csv.writer(f)
        writer.writerow(columns)
        for rank, r in enumerate(records, 1):
            row = {"rank": rank, **r.__dict__, **r.params}
            writer.writerow([_cell(row.get(c)) for c in columns])
    return path


def best_configs(records: list[TrialRecord], search_space: SearchSpace, selection: Any = None, **header: Any) -> BestConfigs | None:
    """THE hand-off training/final_kfold.py reads: the top search.top_k usable configs, best first (None: none usable).

    `selection` (tune/diversity.Selection): its chosen configs instead, in its order, and how they were chosen.
    """
    space = search_space
    top = selection.chosen if selection else [r for r in records if r.usable][: space.defaults.search.top_k]
    if selection:
        header["selection"] = selection.doc
    if not top:
        return None
    configs = [
        RankedConfig(rank=rank, trial_id=r.trial_id, best_val_miou=r.best_val_miou, best_epoch=r.best_epoch, epochs_trained=max(1, r.epochs_trained),
                     status=r.status, mlflow_run_id=r.mlflow_run_id, checkpoint=r.checkpoint, params=r.params, config=space.resolve(r.params).to_dict())
        for rank, r in enumerate(top, 1)
    ]
    return BestConfigs(metric=space.defaults.search.metric, fold=space.defaults.search.fold, configs=configs, **header)


def prune_resume_state(records: list[TrialRecord]) -> int:
    """Drop last.pt (optimizer state for resuming) of finished trials; best.pt stays for k-fold. Returns bytes freed."""
    freed = 0
    for r in records:
        if r.finished and r.checkpoint and "://" not in r.checkpoint:
            for last in Path(r.checkpoint).parent.parent.glob(f"checkpoint_*/{LAST}"):  # every kept checkpoint
                freed += last.stat().st_size
                last.unlink()
    return freed


def param_importances(study: Any) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA) of a study; {} when it cannot tell (too few trials, no variation)."""
    import optuna

    try:
        return dict(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError):
        return {}


def importance_table(importances: dict[str, float]) -> str:
    if not importances:
        return "parameter importances: not enough finished trials with different values to tell"
    width = max(len(k) for k in importances)
    return "parameter importances (optuna fANOVA, of val mIoU):\n" + "\n".join(f"  {k.ljust(width)}  {v:.3f}" for k, v in importances.items())


def save_importance_plot(study: Any, path: Path) -> Path | None:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization.matplotlib import plot_param_importances

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # the matplotlib backend is "experimental" since optuna 2.2
            ax = plot_param_importances(study)
    except (ValueError, RuntimeError):
        return None
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=90)
    plt.close(ax.figure)
    return path


def summary_table(records: list[TrialRecord], top: int = 10) -> str:
    """The top trials as a fixed-width text table."""
    params = sorted({k for r in records for k in r.params})
    header = ["rank", "trial", "status", "mIoU", "ep", *COST_HEADER, *params]
    rows = []
    for rank, r in enumerate(records[:top], 1):
        miou = f"{r.best_val_miou:.4f}" if r.best_val_miou is not None else "-"
        values = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r.params.get(p, "") for p in params)]
        rows.append([str(rank), r.trial_id, r.status[:40], miou, str(r.epochs_trained), *cost_cells(r), *values])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
