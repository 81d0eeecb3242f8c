"""How each trial ended, written by the driver the moment Tune ends it, so `--resume` never trains a finished trial again.

Tune saves its experiment state (trial statuses) on a timer and copies it to storage in the
background. A driver killed between a trial's end and that copy comes back with a state in
which the trial still runs, and Tune would start it again from an older checkpoint. Tune has
no hook to save its state on demand, so this callback keeps its own record
(results/<experiment>/trial_endings.json, replaced atomically, written before anything else
a trial's end triggers). On resume the trainable gets that record: a trial that had already
ended reports the result and checkpoint it ended with and returns without training, and one
that had failed fails again with its recorded reason (unless --retry-errored). A trial that
started and ended between two of Tune's saves is unknown to the restored Tune: its record
here is what puts it on the leaderboard (tune/results.py: ending_record).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback, Checkpoint, report
from ray.tune.result import AUTO_RESULT_KEYS

from training.errors import SegtuneError
from tune.results import trial_status

ENDINGS = "trial_endings.json"
# Keys Tune adds to every result; a replayed result carries only what the trainable reported.
TUNE_KEYS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint"}


class TrialFailedBeforeResume(Exception):
    """A resumed trial had already failed; it fails again with its recorded reason."""


def _checkpoint_uri(checkpoint: Any) -> str | None:
    """Where the checkpoint lives, readable by `Checkpoint(uri)` on any node (None if unknown)."""
    if checkpoint is None:
        return None
    kind = getattr(checkpoint.filesystem, "type_name", "local")
    if kind == "local":
        return checkpoint.path
    if kind in ("s3", "gcs", "hdfs", "abfs"):
        return f"{kind}://{checkpoint.path}"
    return None  # a custom fsspec filesystem: the replay reports the metrics without the files


def read_endings(results_dir: Path) -> dict[str, dict[str, Any]]:
    """{trial id: ending} recorded by earlier sessions of this search ({} if none yet)."""
    path = results_dir / ENDINGS
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise SegtuneError(f"{path}: unreadable record of finished trials ({err})") from None


class TrialEndings(Callback):
    """Records {status, last result, checkpoint} of every trial as Tune ends it."""

    def __init__(self, results_dir: str | Path, budget: int):
        self.path = Path(results_dir) / ENDINGS
        self.budget = budget  # epochs a trial trains when nothing stops it (status: completed)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, ending=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial)

    def _record(self, trial: Any, ending: bool = False) -> None:
        endings = read_endings(self.path.parent)
        result = {k: v for k, v in (trial.last_result or {}).items() if k not in TUNE_KEYS and isinstance(v, (int, float, str, bool))}
        endings[trial.trial_id] = {
            "status": trial_status(trial, self.budget, ending),
            "result": result,
            "checkpoint": _checkpoint_uri(trial.checkpoint),
            "config": {k: v for k, v in trial.config.items() if isinstance(v, (int, float, str, bool)) or v is None},
            "failures": int(trial.num_failures),
            "ended": time.time(),
        }
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(endings, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)


def replay_ending(trial_id: str, ending: dict[str, Any], log=print) -> None:
    """Inside a resumed trial that had already ended: report how it ended instead of training."""
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
        report(ending["result"], checkpoint=checkpoint)
    finally:
        shutil.rmtree(work, ignore_errors=True)
