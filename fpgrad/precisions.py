"""Precision names to runnable number systems.

``float16``, ``bfloat16``, ``float32``, ``float64``: torch dtypes with real autograd.
``exact`` names the certified reference, which every comparison computes anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fpgrad.errors import InputError
from fpgrad.evaluate import Trace
from fpgrad.formats import NATIVE, Format, get_format
from fpgrad.network import Network

DEFAULT_PRECISIONS = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Precision:
    """A named way to evaluate a network: a format and the machine that computes in it."""

    name: str
    fmt: Format
    kind: str  #: "native" (torch kernels)
    runner: Callable[[Network, str], Trace]

    def run(self, net: Network) -> Trace:
        return self.runner(net, self.name)


def _native_runner(net: Network, name: str) -> Trace:
    from fpgrad.torch_native import torch_trace  # torch import deferred: CLI start-up stays fast

    return torch_trace(net, name)


def get_precision(name: str) -> Precision:
    key = name.strip().lower()
    if key in NATIVE:
        return Precision(key, get_format(key), "native", _native_runner)
    known = ", ".join((*NATIVE, "exact"))
    raise InputError(f"unknown precision {name!r}; known precisions: {known}")


def parse_precisions(spec: str | list[str] | tuple[str, ...] | None) -> list[Precision]:
    """Comma-separated names (or a list) to precisions, in order, without duplicates or 'exact'."""
    if spec is None:
        names: list[str] = list(DEFAULT_PRECISIONS)
    elif isinstance(spec, str):
        names = [s for s in spec.split(",")]
    else:
        names = list(spec)
    out: list[Precision] = []
    for name in names:
        if not name.strip():
            raise InputError("empty precision name in --precisions; separate names by commas")
        if name.strip().lower() == "exact":
            continue
        p = get_precision(name)
        if p.name not in [q.name for q in out]:
            out.append(p)
    if not out:
        raise InputError("no precision to compare; name at least one, e.g. --precisions float16")
    return out
