"""One running stage per output directory: an exclusive lock file, safe across the nodes of a cluster.

The lock is `.<dir name>.lock` beside the directory, created atomically with its content
(a hard link of a complete file, which fails if the lock exists: atomic on local disks and
NFS alike) before anything is written into the directory. It records the holder's host,
boot, pid and the pid's start time, and a heartbeat thread touches it while the stage runs.
A lock is stale, and taken over, when its holder is gone: on the same host (and boot) at
once, when that pid no longer runs that process; on another host, after STALE_AFTER_S
without a heartbeat.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from training.errors import SegtuneError

HEARTBEAT_S = 10.0


def stale_after_s() -> float:
    return float(os.environ.get("SEGTUNE_LOCK_STALE_S", "60"))


class LockHeldError(SegtuneError):
    """Another run of a stage holds the output directory."""


def lock_path(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.lock"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of `pid` (clock ticks since boot), which tells a reused pid from its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def read_holder(directory: Path) -> dict[str, Any] | None:
    """What the lock of `directory` says about its holder, or None when there is no lock."""
    path = lock_path(directory)
    try:
        holder = json.loads(path.read_text())
        holder["heartbeat"] = path.stat().st_mtime
        return holder
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # being written right now: treat as held, fresh
        return {"token": None, "heartbeat": time.time()}


def is_stale(holder: dict[str, Any]) -> bool:
    if holder.get("token") is None:
        return False
    same_machine = holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id()
    if same_machine:
        pid = int(holder.get("pid", -1))
        return not _pid_alive(pid) or (holder.get("pid_start") is not None and _process_start(pid) != holder["pid_start"])
    return time.time() - float(holder.get("heartbeat", 0)) > stale_after_s()


def describe(holder: dict[str, Any]) -> str:
    return f"{holder.get('stage', 'a stage')} started {holder.get('started', '?')} on host {holder.get('host', '?')} (pid {holder.get('pid', '?')})"


class StageLock:
    """`with StageLock(results/<experiment>, "search"):` — the second holder gets one error line."""

    def __init__(self, directory: Path, stage: str):
        self.directory = Path(directory)
        self.stage = stage
        self.path = lock_path(self.directory)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "stage": self.stage,
            "host": socket.gethostname(),
            "boot_id": _boot_id(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "started": datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }

    def _create(self) -> bool:
        """Create the lock with its record in one step: link() of a complete file fails if the lock exists."""
        tmp = self.path.with_name(f"{self.path.name}.{self.token}")
        tmp.write_text(json.dumps(self._record()))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _break_stale(self, holder: dict[str, Any]) -> None:
        """Move a stale lock aside; if what was moved is not the lock judged stale (a racer's fresh one), put it back."""
        aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text()).get("token")
        except (OSError, ValueError):
            moved = None
        if moved != holder.get("token"):
            try:
                os.link(aside, self.path)  # fails if yet another one exists: that one stands
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def acquire(self) -> "StageLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._thread = threading.Thread(target=self._heartbeat, name="stage-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            holder = read_holder(self.directory)
            if holder is None:
                continue
            if not is_stale(holder):
                raise LockHeldError(
                    f"{self.directory}: in use by {describe(holder)}; wait for it to end or stop it "
                    f"(lock {self.path}; a lock whose holder is gone is taken over: on the same host at once, "
                    f"from another host after {stale_after_s():.0f}s without its heartbeat)"
                )
            self._break_stale(holder)
        raise LockHeldError(f"{self.path}: could not take the lock (other runs keep taking it)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed or storage gone; release() will say nothing either
                return

    def release(self) -> None:
        self._stop.set()
        holder = read_holder(self.directory)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "StageLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
