"""Progress of long work outside Tune's table: a tqdm bar on a terminal, plain lines otherwise.

tqdm draws with carriage returns, which a log file or `ray job logs` shows as one endless
line; when stderr is not a terminal the same progress is printed as a few plain lines.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

PLAIN_EVERY_S = 30.0  # at most one plain line this often, besides every 25 %


def progress(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    unit: str = "img",
    log: Callable[[str], None] | None = None,
) -> Iterator[T]:
    """Yield `items`, showing how far along they are; nothing for fewer than two items."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if total is not None and total < 2:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    yield from _plain(items, desc, total, unit, log or (lambda line: print(line, file=sys.stderr, flush=True)))


def _plain(items: Iterable[T], desc: str, total: int | None, unit: str, log: Callable[[str], None]) -> Iterator[T]:
    started = last = time.monotonic()
    next_quarter = 1
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        quarter = total is not None and done * 4 >= next_quarter * total
        if quarter or now - last >= PLAIN_EVERY_S:
            if quarter:
                while done * 4 >= next_quarter * total:
                    next_quarter += 1
            of = f"/{total}" if total is not None else ""
            log(f"{desc}: {done}{of} {unit} ({done / max(now - started, 1e-9):.1f} {unit}/s)")
            last = now
