"""Which precisions and policies a piece of work ran, and how: native torch on this CPU,
emulated in software, a CUDA op list emulated on the CPU, or exact.

``get_precision``, ``torch_trace`` and ``compare`` call :func:`record`; inside
:func:`recording` the names collect into a list, elsewhere :func:`record` does nothing.
:func:`runs_line` renders the list as the gallery reports' "Runs" line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: How a run computed; the keys are the ``how`` values :func:`record` accepts, in report order.
HOW: dict[str, str] = {
    "native": "native torch on this CPU",
    "policy": "precision policy, each op's format run natively by torch on this CPU",
    "cuda_policy": (
        "torch.autocast('cuda') op list, emulated here on the CPU (each op's format run by "
        "torch's CPU kernels; no GPU ran)"
    ),
    "emulated": "emulated in software (fpgrad's strict machine, every operation correctly rounded)",
    "exact": "exact reference (ball arithmetic, no floating-point hardware)",
}

_RUNS: ContextVar[dict[str, str] | None] = ContextVar("fpgrad_runs", default=None)


def record(name: str, how: str) -> None:
    """Note that ``name`` ran as ``how`` (a key of :data:`HOW`) if a recording is open."""
    if how not in HOW:
        raise ValueError(f"unknown run kind {how!r}; known: {', '.join(HOW)}")
    runs = _RUNS.get()
    if runs is not None:
        runs.setdefault(name, how)


def policy_how(autocast_device: str, emulated: bool) -> str:
    """The :data:`HOW` key of a precision policy run (``autocast_device``: Policy's field)."""
    if emulated:
        return "emulated"
    return "cuda_policy" if autocast_device == "cuda" else "policy"


@contextmanager
def recording() -> Iterator[dict[str, str]]:
    """Collect the runs recorded inside the block, name -> how, in first-use order; an
    enclosing recording receives them too."""
    runs: dict[str, str] = {}
    token = _RUNS.set(runs)
    try:
        yield runs
    finally:
        _RUNS.reset(token)
        outer = _RUNS.get()
        if outer is not None:
            for name, how in runs.items():
                outer.setdefault(name, how)


def runs_line(runs: dict[str, str]) -> str:
    """One Markdown paragraph: the runs grouped by how they computed (``HOW``'s order)."""
    if not runs:
        return "**Runs.** none recorded."
    groups = [
        f"{how_text}: {', '.join(n for n, h in runs.items() if h == how)}"
        for how, how_text in HOW.items()
        if how in runs.values()
    ]
    return "**Runs.** " + "; ".join(groups) + "."
