"""The search settings checked before anything starts: plain config checks, no Ray or Optuna imports.

Kept apart from tune/space.py (which builds Tune's objects and imports Ray Tune and Optuna,
~0.9 s): the driver validates a space before it starts Ray, and what it imports before
then delays the trial workers' start (tune/runner.start_ray).
"""

from __future__ import annotations

from training.config import SearchSpace
from training.errors import ConfigError

# Trial results the trainer reports (EpochResult.metrics()) that a search may optimise.
SEARCHABLE_METRICS = {"val_miou": "max", "best_miou": "max", "pixel_acc": "max", "val_loss": "min", "train_loss": "min"}


def check_search(space: SearchSpace) -> None:
    """Reject search settings Tune would accept but that waste or break the search (one line)."""
    cfg = space.defaults
    search = cfg.search
    where = space.source
    if not space.distributions:
        raise ConfigError(f"{where}: nothing to search: give at least one key a distribution (choice, uniform, loguniform, quniform, randint)")
    if search.metric not in SEARCHABLE_METRICS:
        raise ConfigError(f"{where}: search.metric: {search.metric!r} is not reported by the trainer; one of {sorted(SEARCHABLE_METRICS)}")
    if search.mode != SEARCHABLE_METRICS[search.metric]:
        raise ConfigError(f"{where}: search.mode: {search.metric} should be {SEARCHABLE_METRICS[search.metric]}imised, got mode {search.mode!r}")
    sched = search.scheduler
    if sched.name == "asha":
        # max_t > epochs: ASHA's top rungs are never reached and its promotion budget is wrong.
        # max_t < epochs is allowed: trials are cut at max_t (a shorter search budget), and
        # k-fold later trains the epochs a config reached (best_configs.yaml: epochs_trained).
        if sched.max_t > cfg.trainer.epochs:
            raise ConfigError(
                f"{where}: search.scheduler.max_t: {sched.max_t} exceeds trainer.epochs={cfg.trainer.epochs}; "
                "trials end at trainer.epochs, so set max_t <= trainer.epochs (usually equal)"
            )
        if sched.grace_period > sched.max_t:
            raise ConfigError(f"{where}: search.scheduler.grace_period: {sched.grace_period} exceeds max_t={sched.max_t}")
    if search.resources.gpu > 1 and search.resources.gpu != int(search.resources.gpu):
        raise ConfigError(f"{where}: search.resources.gpu: fractions are for sharing one GPU; use a value <= 1 or a whole number, got {search.resources.gpu}")
