"""Files every stage writes: atomic replacements (JSON, YAML, text, torch) and the results root.

A reader (the next stage, a resumed run, a user's `watch`) never sees half a file: each
write goes to a temporary file in the same directory and is renamed over the target.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from training.errors import SegtuneError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, for every thread, for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


FILE_MODE = 0o666 & ~_umask()  # what open() would have given; mkstemp's files are 0600


def results_root() -> Path:
    """$SEGTUNE_RESULTS, default <repo>/results: one directory per experiment below it."""
    return Path(os.environ.get("SEGTUNE_RESULTS") or REPO_ROOT / "results")


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None) -> Iterator[IO]:
    """An open temporary file next to `path`, renamed onto it when the block ends without error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding, newline=newline) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=1, default=str))


def write_yaml(path: str | Path, obj: Any) -> Path:
    import yaml

    return write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def save_torch(obj: Any, path: str | Path) -> Path:
    import torch

    with atomic_file(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON in `path`, or `default` when the file does not exist; SegtuneError if unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as err:
        raise SegtuneError(f"{path}: unreadable ({err})") from None


def check_writable(directory: Path, hint: str = "") -> None:
    """One clear line if `directory` cannot be created or written; creates nothing that was not there."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"not writable ({existing} is not a directory)"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"not writable ({existing}: permission denied)"
    else:
        try:  # os.access trusts permission bits; a read-only mount or quota says no only on write
            fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            problem = f"not writable ({existing}: {err.strerror})"
    if problem:
        raise SegtuneError(f"{directory}: {problem}{'; ' + hint if hint else ''}")


def fingerprint(paths: list[Path], **settings: Any) -> str:
    """Identifies the inputs of a cached result: the files (path, mtime, size) plus the settings."""
    import hashlib

    stats = [[str(p), p.stat().st_mtime_ns, p.stat().st_size] for p in map(Path, paths)]
    return hashlib.sha256(json.dumps({"files": stats, **settings}, sort_keys=True, default=str).encode()).hexdigest()[:16]
