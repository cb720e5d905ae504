"""The leaves of an op's arguments or outputs (tensors, scalars, ...) in pytree order, without
``torch.utils._pytree``'s per-node type registry lookups: lists, tuples (named ones too) and
dicts are containers, anything else is a leaf. The same leaves, in the same order, as
``tree_flatten`` for the argument and output structures aten ops take and return."""

from __future__ import annotations

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
