"""Progress bars for long loops (rich), silent when disabled or not on a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: Optional[int] = None, description: str = "", enabled: bool = True) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        yield from bar.track(items, total=total, description=description)


def log(message: str) -> None:
    """A progress line for humans, on stderr (stdout stays clean for --json)."""
    print(message, file=sys.stderr, flush=True)
