"""Shared glue for entry scripts: bad input and I/O errors become one `error:` line and exit status 2."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from typing import Callable

from training.errors import SegtuneError


def quiet_library_warnings() -> None:
    # pycocotools and albumentations warn on every call under NumPy 2; they drown the epoch log.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*pretrained.*", category=UserWarning)


def run_cli(main: Callable[[], int | None]) -> None:
    """Run `main`, turning SegtuneError into one line on stderr and exit code 2."""
    quiet_library_warnings()
    # SIGTERM (`kill`, `ray job stop`) unwinds like Ctrl-C: locks are released, MLflow calls kept in the outbox.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        code = main()
    except SegtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # I/O no check could foresee (a read-only or full disk, storage gone): one line naming the path
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def add_stage_options(p: argparse.ArgumentParser, *, experiment: str, data: str, smoke: str, resume: str, mlflow: str,
                      several_experiments: bool = False) -> None:
    """The options every stage's CLI shares (with that stage's help texts)."""
    p.add_argument("--experiment", action="append" if several_experiments else "store", help=experiment)
    p.add_argument("--data", help=data)
    p.add_argument("--smoke", action="store_true", help=smoke)
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--address", help="Ray cluster to join, e.g. auto or 10.0.0.1:6379 (default: RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    p.add_argument("--mlflow-uri", help=mlflow)
    p.add_argument("--sync-mlflow", action="store_true",
                   help="with --experiment: only send the MLflow logging earlier runs could not (MLflow was down), then exit")
