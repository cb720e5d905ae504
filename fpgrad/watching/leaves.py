"""The leaves of an op's arguments or outputs (tensors, scalars, ...) in pytree order, without
``torch.utils._pytree``'s per-node type registry lookups: lists, tuples (named ones too) and
dicts are containers, anything else is a leaf. The same leaves, in the same order, as
``tree_flatten`` for the argument and output structures aten ops take and return."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def leaves(x: Any) -> list[Any]:
    """The leaves of ``x`` in depth-first order (dict values in insertion order)."""
    out: list[Any] = []
    _walk(x, out)
    return out


def _walk(x: Any, out: list[Any]) -> None:
    if isinstance(x, (list, tuple)):
        for v in x:
            _walk(v, out)
    elif isinstance(x, dict):
        for v in x.values():
            _walk(v, out)
    else:
        out.append(x)


def map_leaves(fn: Callable[[Any], Any], x: Any) -> Any:
    """``x`` with every leaf replaced by ``fn(leaf)``: lists stay lists, tuples tuples (named
    tuples keep their type), dicts dicts; the structures aten ops take."""
    if isinstance(x, list):
        return [map_leaves(fn, v) for v in x]
    if isinstance(x, tuple):
        vals = [map_leaves(fn, v) for v in x]
        return type(x)(*vals) if hasattr(x, "_fields") else tuple(vals)
    if isinstance(x, dict):
        return {k: map_leaves(fn, v) for k, v in x.items()}
    return fn(x)
