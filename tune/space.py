"""A config file's distributions and `search:` block -> Ray Tune search space, searcher, scheduler.

Tune trial configs are flat: {dotted config path: sampled value}, exactly what
`SearchSpace.resolve` takes, so a trial's params, its MLflow params and the
leaderboard columns all use the same keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from training.config import Config, Distribution, SearchConfig, SearchSpace
from training.errors import ConfigError
from tune.cost import searcher_result

SCALAR_TYPES = (str, int, float, bool, type(None))
# Tune's progress counter is not the epoch after a restore; schedulers use the trainer's epoch.
TIME_ATTR = "epoch"


def _encode_choice(value: Any) -> Any:
    # Optuna's categorical takes scalars only; lists/dicts (e.g. an augment pipeline) go as JSON.
    return value if isinstance(value, SCALAR_TYPES) else "json:" + json.dumps(value, sort_keys=True)


def _decode_choice(value: Any) -> Any:
    return json.loads(value[5:]) if isinstance(value, str) and value.startswith("json:") else value


def _domain(dist: Distribution):
    a = dist.args
    if dist.kind == "choice":
        return tune.choice([_encode_choice(v) for v in a])
    if dist.kind == "uniform":
        return tune.uniform(a[0], a[1])
    if dist.kind == "loguniform":
        return tune.loguniform(a[0], a[1])
    if dist.kind == "quniform":
        return tune.quniform(a[0], a[1], a[2])
    if dist.kind == "randint":
        return tune.randint(a[0], a[1])  # both [low, high)
    raise ConfigError(f"{dist.path}: unsupported distribution {dist.kind!r}")


def param_space(space: SearchSpace) -> dict[str, Any]:
    """{dotted path: Tune domain} for every distribution of the config file."""
    return {path: _domain(dist) for path, dist in space.distributions.items()}


def trial_params(space: SearchSpace, trial_config: dict[str, Any]) -> dict[str, Any]:
    """The searched values of a Tune trial config, as `SearchSpace.resolve` takes them."""
    return {k: _decode_choice(v) for k, v in trial_config.items() if k in space.distributions}


def trial_budget(cfg: Config) -> int:
    """Epochs a trial trains when nothing stops it early."""
    sched = cfg.search.scheduler
    return min(sched.max_t, cfg.trainer.epochs) if sched.name == "asha" else cfg.trainer.epochs


def build_scheduler(search: SearchConfig) -> TrialScheduler:
    sched = search.scheduler
    if sched.name == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=TIME_ATTR,
        metric=search.metric,
        mode=search.mode,
        max_t=sched.max_t,
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
    )


STUDY_FILE = "optuna_study.log"  # Optuna's journal file next to the search's results (shared storage on a cluster)


def study_storage(results_dir: Path):
    """Optuna's journal storage in `results_dir`: a plain append-only file, safe on NFS (unlike sqlite)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(results_dir / STUDY_FILE)))


def load_study(results_dir: Path, study_name: str) -> optuna.Study:
    """The search's Optuna study as stored (every trial TPE was told, or is running)."""
    return optuna.load_study(study_name=study_name, storage=study_storage(results_dir))


def default_point(space: SearchSpace) -> dict[str, Any]:
    """The space's defaults as a Tune trial config: the first trial every search evaluates."""
    return {path: _encode_choice(dist.default) for path, dist in space.distributions.items()}


def build_search_alg(space: SearchSpace, results_dir: Path, study_name: str) -> SearchAlgorithm:
    """Optuna TPE (its study stored in results_dir) behind a StartupGate, or Tune's random search; both seeded."""
    search = space.defaults.search
    first = [default_point(space)]
    if search.algorithm == "random":
        return BasicVariantGenerator(max_concurrent=search.max_concurrent, random_state=search.seed, points_to_evaluate=first)
    sampler = optuna.samplers.TPESampler(
        n_startup_trials=search.n_startup_trials,
        seed=search.seed,
        multivariate=True,
        constant_liar=True,  # running trials count as "bad" so concurrent asks spread out
    )
    searcher = OptunaSearch(metric=search.metric, mode=search.mode, sampler=sampler, points_to_evaluate=first,
                            study_name=study_name, storage=study_storage(results_dir))
    return StartupGate(searcher, search.max_concurrent, search.n_startup_trials, str(results_dir), study_name)


FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def random_draws(study: optuna.Study, n_startup_trials: int) -> list[int]:
    """Numbers of the trials TPE sampled at random: fewer than n_startup_trials trials had
    finished (COMPLETE or PRUNED, what TPESampler counts) when they started."""
    finished_at = sorted(t.datetime_complete for t in study.trials if t.state in FINISHED_STATES and t.datetime_complete)
    drawn = []
    for t in study.trials:
        done_before = sum(1 for c in finished_at if c <= t.datetime_start)
        if done_before < n_startup_trials:
            drawn.append(t.number)
    return drawn


class StartupGate(ConcurrencyLimiter):
    """ConcurrencyLimiter that also bounds Optuna's random start-up trials.

    TPESampler samples at random until n_startup_trials trials have *finished*; with k trials
    running at once, n_startup_trials + k - 1 draws would be random. The gate holds back new
    trials while the next draw would be random and n_startup_trials random trials are already
    out. A failed random trial is replaced (Optuna does not count failed trials either), so
    random draws <= n_startup_trials + failed start-up trials. Written here because neither
    Tune nor Optuna offers this bound. It reads the study from its storage, not from the
    searcher's internals.
    """

    def __init__(self, searcher: Searcher, max_concurrent: int, n_startup_trials: int, results_dir: str, study_name: str):
        super().__init__(searcher, max_concurrent)
        self.n_startup_trials = n_startup_trials
        self.random_trials: list[str] = []
        self.failed_random: list[str] = []
        self.results_dir = results_dir
        self.study_name = study_name
        self._study: optuna.Study | None = None

    def get_state(self) -> dict:
        self._study = None  # a storage handle is no state: it is opened again from the file
        return super().get_state()

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = load_study(Path(self.results_dir), self.study_name)
        return self._study

    def _finished(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=FINISHED_STATES))

    def suggest(self, trial_id: str) -> dict | None:
        if len(self.live_trials) >= self.max_concurrent:
            return None
        random_draw = self._finished() < self.n_startup_trials
        if random_draw and len(self.random_trials) - len(self.failed_random) >= self.n_startup_trials:
            return None  # wait: the start-up trials out there will tell TPE enough
        suggestion = super().suggest(trial_id)
        if random_draw and suggestion not in (None, Searcher.FINISHED):
            self.random_trials.append(trial_id)
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # a trial that ended before a resume replays its result: the stored study holds it already

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if error and trial_id in self.random_trials and trial_id not in self.failed_random:
            self.failed_random.append(trial_id)
        super().on_trial_complete(trial_id, result=searcher_result(result), error=error)
