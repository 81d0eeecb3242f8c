"""Shared glue for entry scripts: bad input becomes one `error:` line and exit status 2."""

from __future__ import annotations

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
    try:
        code = main()
    except SegtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
