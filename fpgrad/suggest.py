"""Did-you-mean hints for misspelled names (difflib's close matches)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or ``""`` when none is close.

    >>> did_you_mean("flaot16", ["float16", "bfloat16", "float32"])
    " (did you mean 'float16'?)"
    """
    close = difflib.get_close_matches(name.strip().lower(), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
