"""Bicubic upsampling (``F.interpolate(mode='bicubic')``, ``aten.upsample_bicubic2d`` and its
backward), separable as bilinear's (:mod:`fpgrad.graph.ops.resample`): ``A_h x A_w^T`` with
an (out, in) matrix per axis, and the adjoint ``A_h^T g A_w`` backward.

Per output index ``j`` (torch's CPU kernel, ``UpSampleBicubic2d``): the source coordinate
``s = ratio j`` (``align_corners``) or ``ratio (j + 1/2) - 1/2`` (not clamped at 0, unlike
bilinear), ``ratio`` = ``(in - 1) / (out - 1)``, ``1 / scale_factor`` where one is given, else
``in / out``; ``i = floor(s)``, ``t = s - i``; the four taps ``i - 1 .. i + 2`` clamped into
``[0, in - 1]`` (repeated taps summed) with Keys' cubic convolution weights, ``A = -3/4``:
``c2(t + 1), c1(t), c1(1 - t), c2(2 - t)``, ``c1(x) = ((A + 2) x - (A + 3)) x^2 + 1``,
``c2(x) = ((A x - 5A) x + 8A) x - 4A``. Equal sizes copy. The exact systems take ``s``, ``t``
and the weights as exact rationals (of the float64 scale factor where one is given); the
machines take them computed in float64 in that order (not necessarily the rounding of torch's
kernel, whose columns are the native ones).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any

import numpy as np

from fpgrad.arith.base import ExactDerivatives
from fpgrad.graph import shapes
from fpgrad.graph.ops import taps
from fpgrad.graph.ops.registry import op
from fpgrad.graph.ops.resample import _both, _split

_A = Fraction(-3, 4)


def _c1(x: Any, a: Any) -> Any:
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _c2(x: Any, a: Any) -> Any:
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def _rows(n: int, o: int, align: bool, scale: float | None, exact: bool) -> list[list[tuple[int, Any]]]:
    """Per output index, the four (tap, weight) pairs: Fractions (exact) or float64."""
    if o == n:
        return [[(j, Fraction(1) if exact else 1.0)] for j in range(o)]
    given = scale is not None and scale > 0 and not align
    if exact:
        ratio: Any = Fraction(n - 1, o - 1) if align and o > 1 else Fraction(0)
        if not align:
            ratio = 1 / Fraction(scale) if given else Fraction(n, o)  # type: ignore[arg-type]
        a: Any = _A
        half: Any = Fraction(1, 2)
    else:
        ratio = (n - 1) / (o - 1) if align and o > 1 else 0.0
        if not align:
            ratio = 1.0 / scale if given else n / o  # type: ignore[operator]
        a, half = -0.75, 0.5
    rows = []
    for j in range(o):
        src = ratio * j if align else ratio * (j + half) - half
        i = math.floor(src)
        t = src - i
        ws = [_c2(t + 1, a), _c1(t, a), _c1(1 - t, a), _c2(2 - t, a)]
        rows.append([(min(max(i - 1 + k, 0), n - 1), w) for k, w in enumerate(ws)])
    return rows


@functools.lru_cache(maxsize=64)
def _fractions(n: int, o: int, align: bool, scale: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(o, n, 2) numerators and denominators of the exact weights as hi + lo float64 words."""
    f = [[Fraction(0)] * n for _ in range(o)]
    for j, row in enumerate(_rows(n, o, align, scale, True)):
        for i, w in row:
            f[j][i] += w
    num = np.array([[_split(v.numerator) for v in r] for r in f]).reshape(o, n, 2)
    den = np.array([[_split(v.denominator) for v in r] for r in f]).reshape(o, n, 2)
    num.flags.writeable = den.flags.writeable = False
    return num, den


def _scale(scale: Any) -> float | None:
    return None if scale is None else float(scale)


def _matrix(cx: Any, n: int, o: int, align: bool, scale: Any) -> Any:
    """(o, n) interpolation matrix as a value of the system (repeated taps summed)."""
    ar = cx.ar
    if not isinstance(ar, ExactDerivatives):
        m = np.zeros((o, n))
        for j, row in enumerate(_rows(n, o, align, _scale(scale), False)):
            for i, w in row:
                m[j, i] += w
        return ar.asarray(m)
    num, den = _fractions(n, o, bool(align), _scale(scale))
    top = ar.add(ar.asarray(num[..., 0].copy()), ar.asarray(num[..., 1].copy()))
    bottom = ar.add(ar.asarray(den[..., 0].copy()), ar.asarray(den[..., 1].copy()))
    return ar.div(top, bottom)


def _taps(cx: Any, x: Any, size: Any, in_size: Any, align: bool, scales: Any,
          adjoint: bool) -> Any:  # fmt: skip
    """A rounding machine's bicubic map by each output's four taps (torch's kernel reads no
    other cell: an infinite input stays local; :mod:`fpgrad.graph.ops.taps`)."""
    (oh, ow), (h, w) = size, in_size
    rows_h = _rows(h, oh, align, _scale(scales[0]), False)
    rows_w = _rows(w, ow, align, _scale(scales[1]), False)
    return taps.separable(cx, x, rows_h, rows_w, h, w, adjoint)


@op("aten.upsample_bicubic2d.default")
def upsample_bicubic2d(cx: Any, x: Any, size: Any, align_corners: bool, scales_h: Any = None,
                       scales_w: Any = None) -> Any:  # fmt: skip
    """``A_h x A_w^T`` (module docstring: the weights per system)."""
    h, w = shapes.shape(x)[-2:]
    oh, ow = (int(v) for v in size)
    if not isinstance(cx.ar, ExactDerivatives):
        return _taps(cx, x, (oh, ow), (h, w), bool(align_corners), (scales_h, scales_w), False)
    left = _matrix(cx, h, oh, bool(align_corners), scales_h)
    right = _matrix(cx, w, ow, bool(align_corners), scales_w)
    return _both(cx, x, left, right)


@op("aten.upsample_bicubic2d_backward.default")
def upsample_bicubic2d_backward(cx: Any, g: Any, size: Any, in_size: Any, align_corners: bool,
                                scales_h: Any = None, scales_w: Any = None) -> Any:  # fmt: skip
    """The adjoint ``A_h^T g A_w``."""
    (oh, ow), (h, w) = (int(v) for v in size), (int(v) for v in in_size[-2:])
    if not isinstance(cx.ar, ExactDerivatives):
        return _taps(cx, g, (oh, ow), (h, w), bool(align_corners), (scales_h, scales_w), True)
    left = _matrix(cx, h, oh, bool(align_corners), scales_h)
    right = _matrix(cx, w, ow, bool(align_corners), scales_w)
    return _both(cx, g, shapes.transpose(left, 0, 1), shapes.transpose(right, 0, 1))
