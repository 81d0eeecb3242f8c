"""Everything `--resume` needs, in one place: the search's state file, start-up status, trial endings, Tune's saved state.

results/<experiment>/search_state.json records the settings a search started with, its MLflow
stage id and its status:
- `starting`: written once the inputs are valid, before MLflow, Ray and Tune start. Until a
  trial is scheduled (`running`) a failed or killed start blocks nothing: a plain rerun (or
  `--resume`) starts over, after closing the old MLflow parent as FAILED with the reason.
- `running` -> `interrupted` | `finished`: a later run needs `--resume`, which continues it.

results/<experiment>/trial_endings.json records how each trial ended, written the moment Tune
ends it. Tune saves its own state on a timer and copies it to storage in the background; a
driver killed between a trial's end and that copy comes back with a state in which the trial
still runs. On resume such a trial replays its recorded ending instead of training again
(one that had failed fails again, unless --retry-errored), and a trial that started and
ended between two of Tune's saves is put on the leaderboard from its record.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from training.errors import SegtuneError
from training.infra import compat
from training.infra.fs import read_json, write_json

STATE_FILE = "search_state.json"
ENDINGS = "trial_endings.json"
STARTING, RUNNING, INTERRUPTED, FINISHED, FAILED_START = "starting", "running", "interrupted", "finished", "failed start"
Log = Callable[[str], None]


def now() -> str:
    return datetime.now().isoformat(timespec="seconds")


# ---- the state file ------------------------------------------------------------------------------


@dataclass
class SearchState:
    path: Path
    data: dict[str, Any]

    @classmethod
    def read(cls, results_dir: Path) -> "SearchState | None":
        data = read_json(results_dir / STATE_FILE)
        return None if data is None else cls(results_dir / STATE_FILE, data)

    @property
    def status(self) -> str:
        return self.data.get("status", RUNNING)

    @property
    def never_started(self) -> bool:
        """Killed or failed before its first trial was scheduled: nothing in it is worth keeping."""
        return self.status in (STARTING, FAILED_START)

    def save(self, **changes: Any) -> None:
        self.data.update(changes)
        write_json(self.path, self.data)

    def end_session(self, status: str, **changes: Any) -> None:
        self.data["sessions"][-1].update(ended=now(), outcome=status)
        self.save(status=status, **changes)


def mark_running(state_file: Path) -> None:
    """The first trial was scheduled: from now on a rerun needs --resume."""
    state = SearchState.read(state_file.parent)
    if state is not None and state.status != RUNNING:
        state.save(status=RUNNING)


def clear_failed_start(state: SearchState, log: Log) -> None:
    """Remove what a search that never scheduled a trial left, except the MLflow outbox (its calls still go out)."""
    results_dir = state.path.parent
    reason = state.data.get("failure") or "killed during start-up"
    log(f"note: the search started {state.data['sessions'][-1].get('started', '?')} in {results_dir} never scheduled a trial "
        f"({reason}); starting it over")
    tune_path = state.data.get("tune_path")
    if tune_path and "://" not in tune_path and Path(tune_path).exists() and not Path(tune_path).resolve().is_relative_to(results_dir.resolve()):
        shutil.rmtree(tune_path, ignore_errors=True)
    for entry in results_dir.iterdir():
        if entry.name.startswith("mlflow_outbox"):
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


# ---- trial endings --------------------------------------------------------------------------------


def read_endings(results_dir: Path) -> dict[str, dict[str, Any]]:
    """{trial id: ending} recorded by earlier sessions of this search ({} if none yet)."""
    return read_json(results_dir / ENDINGS, {}) or {}


def checkpoint_uri(checkpoint: Any) -> str | None:
    """Where a Tune checkpoint lives, readable by `Checkpoint(uri)` on any node (None if unknown)."""
    if checkpoint is None:
        return None
    kind = getattr(checkpoint.filesystem, "type_name", "local")
    if kind == "local":
        return checkpoint.path
    if kind in ("s3", "gcs", "hdfs", "abfs"):
        return f"{kind}://{checkpoint.path}"
    return None  # a custom fsspec filesystem: the replay reports the metrics without the files


class TrialFailedBeforeResume(Exception):
    """A resumed trial had already failed; it fails again with its recorded reason."""


REPLAYED_STATUS = "segtune_replayed_status"


def replay_ending(trial_id: str, ending: dict[str, Any], log: Log = print) -> None:
    """Inside a resumed trial that had already ended: report how it ended instead of training."""
    from ray.tune import Checkpoint, report

    status = ending["status"]
    if status.startswith("error"):
        raise TrialFailedBeforeResume(f"{status} (before the search was resumed; --retry-errored retries it)")
    log(f"[{trial_id}] ended before the driver restarted ({status}, epoch {ending['result'].get('epoch')}): reporting that result, not training")
    # The checkpoint is copied through a local directory: Tune persists a reported checkpoint
    # into the trial's next checkpoint_* directory, which may be the very one it came from.
    work = tempfile.mkdtemp(prefix="ended-", dir=os.getcwd())
    try:
        checkpoint = None
        if ending.get("checkpoint"):
            try:
                Checkpoint(ending["checkpoint"]).to_directory(work)
                checkpoint = Checkpoint.from_directory(work)
            except Exception as err:  # pyarrow raises OSError or its own errors for a missing path
                log(f"[{trial_id}] WARNING its final checkpoint {ending['checkpoint']} could not be read ({err}); reporting the result alone")
        # The marker keeps the recorded status: a replayed ASHA stop carries no `done` flag of its own.
        report(dict(ending["result"], **{REPLAYED_STATUS: status}), checkpoint=checkpoint)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def trial_ending(trial: Any, status: str) -> dict[str, Any]:
    """What trial_endings.json keeps of a trial Tune just ended."""
    keys = compat.tune_result_keys()
    result = {k: v for k, v in (trial.last_result or {}).items() if k not in keys and isinstance(v, (int, float, str, bool))}
    return {
        "status": status,
        "result": result,
        "checkpoint": checkpoint_uri(trial.checkpoint),
        "config": {k: v for k, v in trial.config.items() if isinstance(v, (int, float, str, bool)) or v is None},
        "failures": int(trial.num_failures),
        "ended": time.time(),
    }


def record_ending(results_dir: Path, trial_id: str, record: dict[str, Any]) -> None:
    endings = read_endings(results_dir)
    endings[trial_id] = record
    write_json(results_dir / ENDINGS, endings)


def saved_run(trial_dir: str | None) -> tuple[Path, dict[str, Any]] | None:
    """The trial's furthest complete checkpoint in storage and its metrics.json, or None.

    Stopped by Ctrl-C, Tune saves its state without the results its controller had not yet
    processed, although their checkpoints already reached storage: such an epoch is in no
    saved state. The trial is reported and resumed from here, not from an older checkpoint.
    """
    from training.engine import checkpoint

    if not trial_dir or "://" in trial_dir:
        return None
    found = None
    for candidate in Path(trial_dir).glob("checkpoint_*"):
        metrics = checkpoint.read_metrics(candidate)
        if not metrics or (found and metrics["epochs_trained"] <= found[1]["epochs_trained"]):
            continue
        if checkpoint.status(candidate, metrics["epochs_trained"]) == checkpoint.DONE:  # completely copied
            found = (candidate, metrics)
    return found


# ---- Tune's own saved state -------------------------------------------------------------------------


def restore_missing_checkpoints(trials: list, log: Log) -> None:
    """Put the trial's newest saved checkpoint where Tune's saved state looks for a deleted one.

    Tune keeps two checkpoints per trial and saves its state every 2 s; two epochs shorter than
    that between a save and a kill -9 leave a state naming a checkpoint already deleted, and Tune
    then fails that trial ("Could not recover from checkpoint as it does not exist").
    """
    for trial in trials:
        named = getattr(trial, "checkpoint", None)
        if named is None or getattr(named.filesystem, "type_name", "local") != "local" or Path(named.path).exists():
            continue
        saved = saved_run(str(Path(named.path).parent))
        if saved is not None:
            shutil.copytree(saved[0], named.path)
            log(f"trial {trial.trial_id}: its saved state names {Path(named.path).name}, already deleted; resuming it from {saved[0].name} (epoch {saved[1]['epochs_trained']})")


def check_tune_state(tune_path: str) -> None:
    """Refuse to resume from a torn or missing experiment state instead of letting Tune start over.

    Tune copies its state file to storage without an atomic rename; a driver killed during
    that copy leaves a truncated file, and Tune.restore then logs an error and silently runs
    the whole search again from scratch.
    """
    if "://" in tune_path:
        return
    if not (Path(tune_path) / "tuner.pkl").is_file():
        raise SegtuneError(f"{tune_path}: Tune's saved search (tuner.pkl) is missing, so there is nothing to resume; "
                           "start a new search under another --experiment")
    states = compat.tune_state_files(tune_path)
    if not states:
        return
    try:
        read_json(states[-1])
    except SegtuneError as err:
        older = f"; remove it to resume from the previous session's state {states[-2].name}" if len(states) > 1 else ""
        raise SegtuneError(f"{states[-1]}: Tune's experiment state is unreadable ({str(err).split(': ', 1)[-1]}), "
                           f"the driver was probably killed while saving it{older}") from None


def restored_trials(tune_path: str) -> list:
    """Tune's Trial objects as last saved in the experiment directory (statuses, results, checkpoints)."""
    import logging

    from ray.tune import ExperimentAnalysis

    # It also loads each trial's result files and warns for trials that never reported.
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis_log.level
    analysis_log.setLevel(logging.ERROR)
    try:
        return list(ExperimentAnalysis(tune_path).trials)
    except Exception:  # no experiment state yet (stopped before Tune's first save)
        return []
    finally:
        analysis_log.setLevel(level)


def reconcile_study(study: Any, trials: list, log: Log) -> None:
    """Fail the Optuna trials the restored Tune no longer knows (asked just before the driver was killed).

    They would stay RUNNING in the stored study forever, and TPE's constant liar would keep
    treating them as pending points.
    """
    import json

    import optuna

    def fingerprint(params: dict) -> str:
        return json.dumps(params, sort_keys=True, default=str)

    known = {fingerprint(t.config) for t in trials}
    orphans = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if fingerprint(t.params) not in known]
    for t in orphans:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if orphans:
        log(f"optuna: {len(orphans)} trial(s) asked just before the driver was killed are unknown to the restored search; marked failed")


def retire_lost_runs(tracker: Any, trial_keys: dict[str, str], trial_ids: set[str], log: Log) -> None:
    """Delete the child runs ({run key: trial id}) of trials the search no longer has.

    A trial that started less than one Tune state save before its driver was killed is
    unknown to the restored search: the searcher draws a new trial in its place, and the
    old one's partial epochs are gone. Its MLflow run is marked and soft-deleted (restorable
    from the UI's deleted runs), so MLflow's children and the leaderboard list the same trials.
    """
    from training.infra.lineage import STATUS

    lost = {key: trial_id for key, trial_id in trial_keys.items() if trial_id not in trial_ids}
    for key in lost:
        tracker.set_tags(key, {STATUS: "lost: started just before the driver was killed, unknown to the resumed search"})
        tracker.end_run(key, "KILLED")
        tracker.delete_run(key)
    if lost:
        log(f"mlflow: deleted {len(lost)} child run(s) of trials lost with the killed driver ({', '.join(sorted(lost.values()))}); Tune ran new trials instead")
