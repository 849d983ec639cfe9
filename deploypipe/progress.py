"""Progress for long loops: a bar (rich) on a terminal; in a log (stderr not a terminal: a batch job,
``| tee``) a plain line at most every ``LINE_SECONDS`` with the count, elapsed time and ETA, so a long
step is never silent; loops that finish sooner print nothing."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: Optional[int] = None, description: str = "", enabled: bool = True,
             unit: Optional[str] = None, weight: Optional[Callable[[T], int]] = None) -> Iterator[T]:
    """Yield ``items`` under a progress bar (count, elapsed, ETA). With ``unit`` the bar also shows the
    rate ("12.3 images/s"); with ``weight`` an item counts as ``weight(item)`` units (e.g. a group of
    images), and ``total`` is in those units."""
    if not enabled:
        yield from items
        return
    if not sys.stderr.isatty():
        yield from _lines(items, total, description, weight)
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.2f} {unit}/s" if task.speed else f"? {unit}/s")

    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    if unit:
        columns.insert(3, Rate())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task, weight(item) if weight else 1)


LINE_SECONDS = 30.0


def _lines(items: Iterable[T], total: Optional[int], description: str,
           weight: Optional[Callable[[T], int]]) -> Iterator[T]:
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += weight(item) if weight else 1
        now = time.monotonic()
        if now - last >= LINE_SECONDS:
            last = now
            elapsed = now - start
            eta = f", about {elapsed * (total - done) / done:.0f} s left" if total and done else ""
            log(f"{description}: {done}/{total if total else '?'} after {elapsed:.0f} s{eta}")


def log(message: str) -> None:
    """A progress line for humans, on stderr (stdout stays clean for --json); under torchrun only
    rank 0 speaks."""
    from .distributed import launched_ranks

    if launched_ranks()[0] == 0:
        print(message, file=sys.stderr, flush=True)
