"""Progress bars on long phases: tqdm on stderr, shown only once a phase has run for 2 s."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
DELAY_S = 2.0  #: a phase shorter than this shows nothing


def phase(
    items: Iterable[T], desc: str, enabled: bool | None = None, unit: str = "it"
) -> Iterator[T]:
    """``items``, advancing a bar ``desc`` after each; ``enabled`` None: when stderr is a
    terminal. The bar appears after :data:`DELAY_S` seconds and is erased when done."""
    if not (sys.stderr.isatty() if enabled is None else enabled):
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, unit=unit, delay=DELAY_S, file=sys.stderr, leave=False)
