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

import math
from fractions import Fraction
from typing import Any

from fpgrad.graph import shapes
from fpgrad.graph.ops.registry import op
from fpgrad.graph.ops.resample import separable

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


def exact_rows(n: int, o: int, align: bool, scale: float | None) -> list[list[tuple[int, Any]]]:
    """The four taps of each output index with exact rational weights."""
    return _rows(n, o, align, scale, True)


def float_rows(n: int, o: int, align: bool, scale: float | None) -> list[list[tuple[int, Any]]]:
    """The same with weights computed in float64 (the rounding machines' taps)."""
    return _rows(n, o, align, scale, False)


@op("aten.upsample_bicubic2d.default")
def upsample_bicubic2d(cx: Any, x: Any, size: Any, align_corners: bool, scales_h: Any = None,
                       scales_w: Any = None) -> Any:  # fmt: skip
    """``A_h x A_w^T`` (module docstring: the weights per system)."""
    return separable(cx, x, size, shapes.shape(x), align_corners, (scales_h, scales_w), False,
                     exact_rows, float_rows)  # fmt: skip


@op("aten.upsample_bicubic2d_backward.default")
def upsample_bicubic2d_backward(cx: Any, g: Any, size: Any, in_size: Any, align_corners: bool,
                                scales_h: Any = None, scales_w: Any = None) -> Any:  # fmt: skip
    """The adjoint ``A_h^T g A_w``."""
    return separable(cx, g, size, in_size, align_corners, (scales_h, scales_w), True,
                     exact_rows, float_rows)  # fmt: skip
