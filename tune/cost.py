"""What each trial cost, in the ranking: cost columns, the mIoU-vs-cost Pareto front, the per-trial budget.

The trainer measures the costs (training/engine/costs.py) and reports them with every epoch:
`train_seconds` (wall seconds of the epochs so far, training + validation, summed across
restarts), `s_per_epoch` (train_seconds / epochs), `peak_mem_mb` with `mem_kind` (`cuda`: peak
tensor memory; `cpu_rss`: peak resident set of the trial's process) and `infer_ms_per_image`
(the model's forward time per image in the last validation pass, at data.batch_size).

Budget: with `search.max_trial_cost` (or `--max-trial-cost`) seconds, a trial whose first epoch
projects past it (that epoch's seconds x the epochs it would train) is stopped right after that
epoch with status `over budget`; it never enters best_configs.yaml and Optuna is told it was pruned.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from tune.results import TrialRecord
    from tune.runner import SearchSession

OVER_BUDGET = "over budget"  # a trial's status
OVER_BUDGET_KEY = "over_budget"  # in the result that stopped it: the line saying so
COST_COLUMNS = ("train_seconds", "s_per_epoch", "peak_mem_mb", "mem_kind", "infer_ms_per_image")
COST_HEADER = ("train_s", "s/ep", "mem_MB", "ms/img")
PARETO_PLOT, PARETO_JSON = "pareto.png", "pareto.json"


class OverBudget(Exception):
    """Raised by a trial's epoch callback to stop it after reporting that it would exceed the budget."""


def over_budget_line(trial_id: str, budget_s: float | None, epoch: int, epoch_seconds: float, planned_epochs: int) -> str | None:
    """After a trial's first epoch: the line skipping it when its projected cost exceeds `budget_s`, else None.

    Decided once, on epoch 1 (a restarted trial was already let through). A trial planned for one
    epoch has cost all it will by then, so it is never skipped.
    """
    if budget_s is None or epoch != 1 or planned_epochs <= 1:
        return None
    projected = epoch_seconds * planned_epochs
    if projected <= budget_s:
        return None
    return (f"trial {trial_id}: projected {projected:.1f} s ({epoch_seconds:.1f} s/epoch x {planned_epochs}) "
            f"exceeds --max-trial-cost {budget_s:g} s; skipped")


def searcher_result(result: dict | None) -> dict | None:
    """The final result a searcher is told: an over-budget trial without its metric, which Optuna records as pruned."""
    if not result or not result.get(OVER_BUDGET_KEY):
        return result
    from tune.checks import SEARCHABLE_METRICS

    return {k: v for k, v in result.items() if k not in SEARCHABLE_METRICS}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def cost_fields(result: dict[str, Any]) -> dict[str, Any]:
    """TrialRecord's cost fields from a trial's last result."""
    fields = {k: _number(result.get(k)) for k in COST_COLUMNS if k != "mem_kind"}
    return dict(fields, mem_kind=result.get("mem_kind") or None)


def cost_cells(record: "TrialRecord") -> list[str]:
    """The summary table's cost cells (COST_HEADER)."""
    values = (record.train_seconds, record.s_per_epoch, record.peak_mem_mb, record.infer_ms_per_image)
    return ["-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.3g}" for v in values]


# ---- the Pareto front ------------------------------------------------------------------------------
def pareto_front(records: list["TrialRecord"]) -> list["TrialRecord"]:
    """The usable trials no other usable trial beats on both best val mIoU (higher) and s/epoch (lower), cheapest first.

    The cost axis is seconds per epoch, not train seconds: ASHA stops trials after different numbers of
    epochs, so a trial's total says as much about the scheduler as about the config.
    """
    points = sorted((r for r in records if r.usable and r.s_per_epoch is not None), key=lambda r: (r.s_per_epoch, -r.best_val_miou))
    front: list[TrialRecord] = []
    for r in points:  # a 2-D sweep: each cheaper point that scores higher than every cheaper one
        if not front or r.best_val_miou > front[-1].best_val_miou:
            front.append(r)
    return front


def pareto_table(records: list["TrialRecord"], front: list["TrialRecord"]) -> dict[str, Any]:
    on_front = {r.trial_id for r in front}
    rows = [{"trial_id": r.trial_id, "status": r.status, "best_val_miou": r.best_val_miou, **{c: getattr(r, c) for c in COST_COLUMNS},
             "on_front": r.trial_id in on_front} for r in records]
    return {"x": "s_per_epoch", "y": "best_val_miou", "front": [r.trial_id for r in front], "trials": rows}


def save_pareto_plot(records: list["TrialRecord"], front: list["TrialRecord"], path: Path, title: str) -> Path | None:
    """best val mIoU vs s/epoch of every trial with both, the front drawn and labelled; None when no trial has both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in records if r.best_val_miou is not None and r.s_per_epoch is not None and not r.status.startswith("error")]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups = (("completed", "o", "tab:blue", "full"), ("stopped", "o", "tab:blue", "none"), (OVER_BUDGET, "x", "grey", "full"))
    for status, marker, colour, fill in groups:  # "stopped": by ASHA or by the search's time budget
        group = [r for r in shown if r.status.startswith(status)]
        if group:
            ax.plot([r.s_per_epoch for r in group], [r.best_val_miou for r in group], marker, color=colour, fillstyle=fill, linestyle="none",
                    label=f"{status} ({len(group)})")
    if front:
        ax.step([r.s_per_epoch for r in front], [r.best_val_miou for r in front], "-", where="post", color="tab:red", alpha=0.6)
        ax.plot([r.s_per_epoch for r in front], [r.best_val_miou for r in front], "o", color="tab:red", label=f"Pareto front ({len(front)})")
        for r in front:
            ax.annotate(r.trial_id, (r.s_per_epoch, r.best_val_miou), textcoords="offset points", xytext=(4, 4), fontsize=7)
    costs = [r.s_per_epoch for r in shown]
    if min(costs) > 0 and max(costs) / min(costs) > 5:
        ax.set_xscale("log")
    ax.set_xlabel("seconds per epoch (training + validation)")
    ax.set_ylabel("best val mIoU")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def log_costs(session: "SearchSession", records: list["TrialRecord"], log: Callable[[str], None]) -> list["TrialRecord"]:
    """pareto.json + pareto.png next to the leaderboard and on the parent run, the over-budget count, a line; the front."""
    from training.infra.fs import write_json

    tracker, parent, results_dir = session.lineage.tracker, session.parent, session.results_dir
    front = pareto_front(records)
    tracker.log_artifact(parent, write_json(results_dir / PARETO_JSON, pareto_table(records, front)))
    plot = save_pareto_plot(records, front, results_dir / PARETO_PLOT, f"{session.experiment}: best val mIoU vs cost, Pareto front in red")
    if plot is not None:
        tracker.log_artifact(parent, plot)
    tracker.log_metrics(parent, {"trials_over_budget": sum(r.status == OVER_BUDGET for r in records)})
    points = ", ".join(f"{r.trial_id} {r.best_val_miou:.4f} @ {r.s_per_epoch:.3g} s/epoch" for r in front)
    log(f"\npareto front (best val mIoU vs s/epoch): {points or 'no usable trial with a measured cost'}")
    return front
