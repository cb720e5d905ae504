"""Separable resampling by taps: along one axis, each output reads a few input cells with
weights (bilinear 2, bicubic 4, adaptive pooling its window), as torch's CPU kernels read
them.

A dense matrix ``A x`` (the exact systems' form) multiplies every input cell, also those a
row's output never reads, by 0: one ``inf`` (an fp8 overflow) or NaN in an input row then
makes the whole output row NaN, where torch's kernels keep it to the outputs that read that
cell. The rounding machines therefore take each output's taps only: ``out_j = sum_t w_jt
x_(i_jt)`` as the system's matmul over the taps in increasing input index, a cell read twice
(the border's repeated taps) once with the float64 sum of its weights, as the dense matrix
held it (the documented weights: finite values are what they were); a zero-weight tap of a
cell torch reads is kept (its ``0 * inf`` is torch's NaN). The adjoint: ``in_i = sum over the
outputs j reading i, j ascending, of w_ji g_j``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.graph import shapes


def _dot(cx: Any, a: Any, w: list[float]) -> Any:
    """(M, T) values times T weights (the format's roundings of them) by the system's matmul:
    (M,)."""
    ar = cx.ar
    b = ar.asarray(np.array(w, dtype=np.float64).reshape(-1, 1))
    return shapes.reshape(ar.matmul(a, b), (-1,))


def along_last(cx: Any, x: Any, rows: list[list[tuple[int, float]]], n: int,
               adjoint: bool = False) -> Any:  # fmt: skip
    """``rows[j]``: output j's (input index, weight) taps over an axis of ``n`` cells. Forward:
    (..., n) -> (..., len(rows)); adjoint: (..., len(rows)) -> (..., n)."""
    merged = []
    for row in rows:
        ws: dict[int, float] = {}
        for i, w in row:
            ws[int(i)] = ws.get(int(i), 0.0) + float(w)
        merged.append(sorted(ws.items()))
    rows = merged
    s = shapes.shape(x)
    flat = shapes.reshape(x, (-1, s[-1]))
    m = shapes.shape(flat)[0]
    if adjoint:
        reads: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        for j, row in enumerate(rows):
            for i, w in row:
                reads[i].append((j, w))
        rows = reads
    outs = []
    for taps in rows:
        if not taps:
            outs.append(cx.ar.asarray(np.zeros(m)))
            continue
        cols = np.array([i for i, _ in taps], dtype=np.int64)
        outs.append(_dot(cx, shapes.index(flat, (slice(None), cols)), [w for _, w in taps]))
    return shapes.reshape(shapes.stack(outs, 1), (*s[:-1], len(rows)))


def separable(cx: Any, x: Any, rows_h: list, rows_w: list, h: int, w: int,
              adjoint: bool = False) -> Any:  # fmt: skip
    """The width pass, then the height pass, over the last two axes (torch's order; the
    adjoint the same way round, as ``A_h^T g A_w``)."""
    y = along_last(cx, x, rows_w, w, adjoint)
    y = shapes.transpose(y, -1, -2)
    y = along_last(cx, y, rows_h, h, adjoint)
    return shapes.transpose(y, -1, -2)


def select_sum(cx: Any, member: np.ndarray, x: Any) -> Any:
    """``member @ x`` for a 0/1 (or weight) matrix ``member`` (R, T) and values (T, D): row r
    the sum of the rows t of ``x`` with ``member[r, t] != 0``, t ascending. The exact systems
    take the matmul; a rounding machine sums the selected rows only (an embedding's inf
    gradient stays in its own row: ``0 * inf`` had made every row NaN)."""
    from fpgrad.arith.base import ExactDerivatives

    if isinstance(cx.ar, ExactDerivatives):
        return cx.ar.matmul(cx.ar.asarray(member), x)
    rows = [[(int(t), float(member[r, t])) for t in np.nonzero(member[r])[0]]
            for r in range(member.shape[0])]  # fmt: skip
    y = along_last(cx, shapes.transpose(x, 0, 1), rows, member.shape[1])
    return shapes.transpose(y, 0, 1)
