"""A small progress bar for long work (sweeps, batches, CLI stages), without a dependency.

On a TTY it redraws one line (``label [#####.....] 5/10 name``); elsewhere it prints nothing unless
``always=True``, so logs and ``--json`` output stay clean.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], label: str = "", *, total: int | None = None, stream: TextIO | None = None,
             enabled: bool | None = None, width: int = 24) -> Iterator[T]:
    """Yield ``items`` while drawing a progress bar on ``stream`` (default stderr) when it is a TTY."""
    stream = stream or sys.stderr
    if enabled is None:
        enabled = stream.isatty()
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    for i, item in enumerate(items):
        if enabled:
            done = int(width * i / total) if total else 0
            bar = f"[{'#' * done}{'.' * (width - done)}] {i}/{total}" if total else f"{i}"
            stream.write(f"\r{label} {bar} {str(item)[:40]:<40}")
            stream.flush()
        yield item
    if enabled:
        stream.write(f"\r{label} done{' ' * (width + 50)}\n")
        stream.flush()
