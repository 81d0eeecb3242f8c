"""One run per output directory (training/infra/locks.py), with real processes racing for it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO
from training.infra.locks import LockHeldError, StageLock, lock_path, read_holder

HOLD = """
import sys, time
from pathlib import Path
from training.infra.locks import StageLock
with StageLock(Path(sys.argv[1]), "search"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_in_subprocess(directory: Path, seconds: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, "-c", HOLD, str(directory), str(seconds)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_gets_one_line_naming_the_first(tmp_path):
    target = tmp_path / "exp"
    holder = hold_in_subprocess(target)
    try:
        with pytest.raises(LockHeldError) as err:
            StageLock(target, "search").acquire()
        line = str(err.value)
        assert "\n" not in line and str(target) in line and f"pid {holder.pid}" in line and socket.gethostname() in line
        assert "search started" in line
    finally:
        holder.send_signal(signal.SIGINT)  # Ctrl-C: the holder's `with` releases the lock
        holder.wait(timeout=30)
    assert not lock_path(target).exists()
    with StageLock(target, "search"):
        pass


def test_racing_processes_one_wins(tmp_path):
    """Eight processes try at once: exactly one holds the lock, the others get the error line."""
    race = """
import sys, time
from pathlib import Path
from training.infra.locks import StageLock, LockHeldError
while time.time() < float(sys.argv[2]):
    pass
try:
    with StageLock(Path(sys.argv[1]), "search"):
        print("won", flush=True)
        time.sleep(3)
except LockHeldError as err:
    print("lost", err, flush=True)
"""
    start = time.time() + 3
    procs = [subprocess.Popen([PYTHON, "-c", race, str(tmp_path / "exp"), str(start)], cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sum(o == "won" for o in outs) == 1, outs
    assert sum(o.startswith("lost") and "in use by search" in o for o in outs) == 7, outs


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    target = tmp_path / "exp"
    holder = hold_in_subprocess(target)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock_path(target).exists()  # kill -9 leaves it behind
    with StageLock(target, "search") as lock:
        assert read_holder(target)["token"] == lock.token


def test_lock_of_another_host_is_taken_over_only_without_heartbeat(tmp_path, monkeypatch):
    target = tmp_path / "exp"
    record = {"token": "other", "stage": "search", "host": "other-node", "boot_id": "x", "pid": 1, "pid_start": "1", "started": "2026-01-01T00:00:00"}
    lock_path(target).write_text(json.dumps(record))
    with pytest.raises(LockHeldError, match="other-node"):
        StageLock(target, "k-fold").acquire()
    monkeypatch.setenv("SEGTUNE_LOCK_STALE_S", "5")
    old = time.time() - 10
    os.utime(lock_path(target), (old, old))
    with StageLock(target, "k-fold"):
        assert read_holder(target)["host"] == socket.gethostname()


def test_heartbeat_keeps_a_long_run_fresh(tmp_path, monkeypatch):
    import training.infra.locks as locks

    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.2)
    target = tmp_path / "exp"
    with StageLock(target, "search"):
        first = lock_path(target).stat().st_mtime
        time.sleep(1.0)
        assert lock_path(target).stat().st_mtime > first


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    target = tmp_path / "exp"
    lock = StageLock(target, "search").acquire()
    lock_path(target).write_text(json.dumps({"token": "someone else"}))  # taken over meanwhile (our process looked dead)
    lock.release()
    assert json.loads(lock_path(target).read_text())["token"] == "someone else"
