"""Compiled passes of the optimizer records and the structural checks: the update done and its
counts per parameter (:func:`update_counts`), the valid targets of a loss
(:func:`count_not_equal`). Split from :mod:`~fpgrad.watching.bitstats` (the per-output
statistics); the same rules: CPU contiguous tensors numpy can view, else None (the callers'
torch paths)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numba import njit

from fpgrad.arith.jit_words import JIT


def flat_view(t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> np.ndarray | None:
    """A flat numpy view (no copy) of a CPU contiguous strided tensor of one of ``dtypes``, or
    None (the callers' torch paths)."""
    if t.dtype not in dtypes or not t.is_cpu or t.layout != torch.strided or not t.is_contiguous():
        return None
    try:
        return t.detach().numpy().reshape(-1)
    except (RuntimeError, TypeError):
        return None


_PARAMS = (torch.float32, torch.float64)
_F64 = (torch.float64,)


@njit(**JIT)
def _update_counts(
    after: np.ndarray,
    before: np.ndarray,
    req: np.ndarray,
    d: np.ndarray,
    smap: np.ndarray,
    out: np.ndarray,
) -> None:
    """One pass over a parameter (flat): ``d = float64(after) - before`` (exact widening, one
    rounded subtraction, as torch's copy then sub), then into ``out`` the counts of ``d != 0``
    (moved), ``req != 0`` (asked) and both asked and not moved (swamped), the last also as 0/1
    bytes in ``smap`` when it has the parameter's size (``req`` empty: no request, two zeros)."""
    moved = asked = swamped = 0
    with_req = req.size == d.size
    with_map = smap.size == d.size
    for k in range(d.size):
        v = np.float64(after[k]) - before[k]
        d[k] = v
        m = v != 0.0
        moved += m
        if with_req:
            a = req[k] != 0.0
            s = a and not m
            asked += a
            swamped += s
            if with_map:
                smap[k] = s
    out[0], out[1], out[2] = moved, asked, swamped


@njit(**JIT)
def _update_counts_sub(
    after: np.ndarray,
    before: np.ndarray,
    req: np.ndarray,
    d: np.ndarray,
    smap: np.ndarray,
    out: np.ndarray,
) -> None:
    """:func:`_update_counts` of a parameter whose ``req`` still holds the float64 shadow's new
    weights: first ``req = req - before`` in place (one rounded float64 subtraction, as
    torch's ``_foreach_sub_``), in the same pass."""
    moved = asked = swamped = 0
    with_map = smap.size == d.size
    for k in range(d.size):
        w = before[k]
        v = np.float64(after[k]) - w
        d[k] = v
        r = req[k] - w
        req[k] = r
        m = v != 0.0
        a = r != 0.0
        s = a and not m
        moved += m
        asked += a
        swamped += s
        if with_map:
            smap[k] = s
    out[0], out[1], out[2] = moved, asked, swamped


def update_counts(
    after: list[torch.Tensor],
    before: list[torch.Tensor],
    req: list[torch.Tensor] | None,
    d: list[torch.Tensor],
    map_limit: int,
    subtract: bool = False,
) -> tuple[list[list[float]], list[list[int] | None]] | None:
    """:func:`_update_counts` of each parameter (its values ``after`` a step, ``before`` it in
    float64, the requested float64 updates or None, ``d`` the float64 buffers receiving the
    update done): the counts [moved], [asked], [swamped] per parameter, as floats, and the
    swamped maps of parameters up to ``map_limit`` elements (None when ``req`` is None). None,
    with nothing written, unless every tensor is a contiguous CPU tensor, the parameters float32
    or float64 and the others float64. ``subtract``: ``req`` holds the shadow's new weights,
    turned into the requested updates (``req - before``, in place) in the same pass
    (:func:`_update_counts_sub`)."""
    arrays = []
    for j, p in enumerate(after):
        rest = (before[j], d[j]) + ((req[j],) if req is not None else ())
        views = [flat_view(p, _PARAMS), *(flat_view(x, _F64) for x in rest)]
        if any(v is None for v in views):
            return None
        arrays.append(views)
    none = np.empty(0, np.float64)
    counts: list[list[float]] = [[], [], []]
    maps: list[list[int] | None] = []
    out = np.empty(3, np.int64)
    for a, b, dd, *r in arrays:
        smap = np.empty(a.size if r and a.size <= map_limit else 0, np.uint8)
        if subtract and r:
            _update_counts_sub(a, b, r[0], dd, smap, out)
        else:
            _update_counts(a, b, r[0] if r else none, dd, smap, out)
        for c, v in zip(counts, out.tolist(), strict=True):
            c.append(float(v))
        maps.append(smap.tolist() if r and a.size <= map_limit else None)
    return counts, maps


@njit(**JIT)
def _count_ne(a: np.ndarray, v: Any) -> int:
    """The number of elements of ``a`` other than ``v``."""
    c = 0
    for k in range(a.size):
        c += a[k] != v
    return c


def count_not_equal(t: torch.Tensor, v: int) -> int | None:
    """The number of elements of the integer tensor ``t`` other than ``v`` (one compiled pass),
    or None unless ``t`` is a contiguous CPU int64 or int32 tensor that numpy can view and ``v``
    fits its type."""
    top = 2**63 if t.dtype == torch.int64 else 2**31
    if not -top <= v < top:
        return None
    a = flat_view(t, (torch.int64, torch.int32))
    if a is None:
        return None
    return int(_count_ne(a, a.dtype.type(v)))
