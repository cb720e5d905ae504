"""``scatter_reduce`` with ``sum``, ``mean``, ``amax`` and ``amin`` (graph attention's scatter
softmax), on the placement of :mod:`fpgrad.graph.ops.index`'s scatters."""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.ops.index import _accumulate, _ranks, _scatter_places, _zeros
from fpgrad.graph.ops.registry import op


@op("aten.scatter_reduce.two", "aten.scatter_reduce_.two")
def scatter_reduce(cx: Any, x: Any, dim: int, index: np.ndarray, src: Any, reduce: str,
                   include_self: bool = True) -> Any:  # fmt: skip
    """torch's ``scatter_reduce`` (``sum``, ``mean``, ``amax``, ``amin``): each element of ``x``
    that ``index`` reaches becomes the reduction of its ``src`` values, in index order, and of
    its own value with ``include_self`` (else the reduction's identity, as torch's kernel
    fills it); the others keep ``x``'s. ``sum`` accumulates as ``scatter_add`` (torch's float16
    and bfloat16 kernels in float, rounded once), ``mean`` is that sum divided by the count
    (``include_self`` counts x's own), rounded once as torch's ``div_``; ``amax``/``amin``
    pick the largest (smallest) with the system's ``max`` (NaN propagates). ``prod`` is
    refused."""
    if reduce not in ("sum", "mean", "amax", "amin"):
        raise InputError(f"{cx.label()}: scatter_reduce with reduce={reduce!r} is not "
                         "supported (sum, mean, amax and amin are)")  # fmt: skip
    targets, vals = _scatter_places(cx, x, dim, index, src)
    t = np.asarray(targets).ravel()
    shape = shapes.shape(x)
    if t.size == 0:
        return x
    touched = np.unique(t)
    flat = shapes.reshape(x, (-1,))
    if reduce in ("sum", "mean"):
        base = flat if include_self else shapes.place(flat, _zeros(cx, (touched.size,)), (touched,))
        out = shapes.reshape(_accumulate(cx, base, t, vals, True), (-1,))
        if reduce == "mean":
            count = np.bincount(t, minlength=int(np.prod(shape or (1,)))).astype(np.float64)
            count = count[touched] + (1.0 if include_self else 0.0)
            mean = cx.ar.div(shapes.index(out, (touched,)), cx.ar.asarray(count))
            out = shapes.place(out, mean, (touched,))
        return shapes.reshape(out, shape)
    v = shapes.reshape(vals, (-1,))
    if reduce == "amin":
        v = cx.ar.mul(v, cx.ar.const(-1.0))
        flat = cx.ar.mul(flat, cx.ar.const(-1.0))
    rank = _ranks(t)
    row = np.searchsorted(touched, t)
    first = np.empty(touched.size, dtype=np.int64)
    first[row[rank == 0]] = np.nonzero(rank == 0)[0]
    lead = shapes.index(flat, (touched,)) if include_self else shapes.index(v, (first,))
    cols = [lead]
    for r in range(int(rank.max()) + 1):
        sel = np.nonzero(rank == r)[0]
        filler = shapes.index(v, (first,))  # a repeat of a value already taken: no change
        cols.append(shapes.place(filler, shapes.index(v, (sel,)), (row[sel],)))
    best = cx.ar.max(shapes.stack(cols, 1), axis=1)
    out = shapes.place(flat, best, (touched,))
    if reduce == "amin":
        out = cx.ar.mul(out, cx.ar.const(-1.0))
    return shapes.reshape(out, shape)
