"""Adaptive max pooling (2-D), 3-D max and average pooling, bilinear upsampling, pixel
(un)shuffle.

Max pooling over windows given per spatial axis as (K, O) positions with a validity mask:
the first maximum is decided on exact values as :func:`fpgrad.graph.ops.conv.max_pool2d`
decides it (:func:`~fpgrad.graph.ops.conv._first_max`); indices are torch's, flat into each
input plane; the backward adds each output's gradient at its index, in output order.

Bilinear upsampling is separable: ``out = A_h x A_w^T`` with 0/1/2 nonzero weights per row
of ``A``. The exact systems take the exact rational weights: torch's source coordinate
``s = scale (dst + 1/2) - 1/2`` (clamped at 0) or ``scale dst`` (``align_corners``) with the
rational scale ``in/out``, ``1/scale_factor`` (the float's exact value) or
``(in-1)/(out-1)``, index ``floor(s)`` and weights ``s - floor(s)`` and its complement, as
:class:`fractions.Fraction`; every other system takes torch's float64 coordinates.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np

from fpgrad.arith.base import ExactDerivatives
from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.ops import taps
from fpgrad.graph.ops._util import exact_count, sum_dims
from fpgrad.graph.ops.conv import _first_max, _increasing_source, _pool_size
from fpgrad.graph.ops.registry import op

# ---- max pooling over arbitrary per-axis windows ------------------------------------------


def _windows(cx: Any, x: Any, pos: list[np.ndarray], ok: list[np.ndarray]) -> tuple[Any, Any]:
    """(N, C, K, O...) windows of ``x`` (positions ``pos[a]`` (K_a, O_a) per spatial axis,
    row-major over the offsets) and the (K, O...) mask of cells inside the input; a cell
    outside holds a copy of its window's first cell inside, never chosen."""
    d = len(pos)
    parts, masks, flats = [], [], []
    sizes = shapes.shape(x)[2:]
    for ks in itertools.product(*(range(p.shape[0]) for p in pos)):
        idx = tuple(np.clip(p[k], 0, n - 1).reshape((-1,) + (1,) * (d - 1 - a))
                    for a, (p, k, n) in enumerate(zip(pos, ks, sizes, strict=True)))  # fmt: skip
        parts.append(shapes.index(x, (slice(None), slice(None), *idx)))
        m = np.ones((), dtype=bool)
        flat = np.zeros((), dtype=np.int64)
        for a, (p, v, k, n) in enumerate(zip(pos, ok, ks, sizes, strict=True)):
            shape = (-1,) + (1,) * (d - 1 - a)
            m = m & v[k].reshape(shape)
            flat = flat * n + np.clip(p[k], 0, n - 1).reshape(shape)
        masks.append(np.broadcast_to(m, tuple(p.shape[1] for p in pos)))
        flats.append(np.broadcast_to(flat, tuple(p.shape[1] for p in pos)))
    c = shapes.stack(parts, 2)
    valid, flat_idx = np.stack(masks), np.stack(flats)
    if valid.all():
        return c, (None, flat_idx)
    first = np.argmax(valid, axis=0)
    if not np.all(np.take_along_axis(valid, first[None], 0)):
        raise InputError("a pooling window holds no element of the input")
    grid = np.ogrid[tuple(slice(0, o) for o in first.shape)]
    head = shapes.unsqueeze(shapes.index(c, (slice(None), slice(None), first, *grid)), 2)
    mask = np.broadcast_to(valid, shapes.shape(c))
    return cx.ar.where(mask, c, shapes.expand(head, shapes.shape(c))), (mask, flat_idx)


def _max_pool(cx: Any, x: Any, pos: list[np.ndarray], ok: list[np.ndarray]) -> tuple:
    """(maxima, flat indices) of (N, C, spatial...) or unbatched (C, spatial...) ``x``."""
    ar = cx.ar
    xs = shapes.shape(x)
    unbatched = len(xs) == len(pos) + 1
    if unbatched:
        x = shapes.unsqueeze(x, 0)
    c, (mask, flat) = _windows(cx, x, pos, ok)
    m = ar.max(c, axis=2, keepdims=True)
    out = shapes.squeeze_dims(m, [2])
    z = _increasing_source(cx, xs)
    if z is not None:  # the same first maximum, decided on f's argument
        c, _ = _windows(cx, shapes.unsqueeze(z, 0) if unbatched else z, pos, ok)
        m = ar.max(c, axis=2, keepdims=True)
    s = shapes.shape(c)
    five = (*s[:3], -1, 1)  # _first_max reads (N, C, K, oh, ow)
    first = _first_max(
        ar,
        shapes.reshape(c, five),
        shapes.reshape(m, (*s[:2], 1, -1, 1)),
        None if mask is None else np.reshape(mask, five),
    )
    first = first.reshape(*s[:2], *s[3:])
    flat = np.broadcast_to(flat, s[2:])
    idx = np.take_along_axis(flat[None, None], first[:, :, None], 2)[:, :, 0]
    return (shapes.squeeze_dims(out, [0]), idx[0]) if unbatched else (out, idx)


def _scatter(cx: Any, g: Any, idx: np.ndarray, in_shape: Any, d: int) -> Any:
    """Zeros of ``in_shape`` with each gradient element added at its flat index within its
    plane (the last ``d`` axes), in output order (torch's CPU loop): rank r of a repeated
    index is added r-th."""
    ar = cx.ar
    n, c = int(np.prod(in_shape[:-d])), 1
    plane = int(np.prod(in_shape[-d:]))
    gf = shapes.reshape(g, (n * c, -1))
    idx = np.asarray(idx, dtype=np.int64).reshape(n * c, -1)
    rows = np.repeat(np.arange(n * c), idx.shape[1])
    target = rows * plane + idx.ravel()
    order = np.argsort(target, kind="stable")
    t_sorted = target[order]
    start = np.searchsorted(t_sorted, t_sorted, side="left")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - start
    zero = ar.asarray(np.zeros((n * c, plane)))
    total = None
    for r in range(int(rank.max()) + 1 if rank.size else 0):
        sel = np.zeros((n * c, plane), dtype=np.int64)
        hit = np.zeros((n * c, plane), dtype=bool)
        src = np.nonzero(rank == r)[0]
        sel.reshape(-1)[target[src]] = src % idx.shape[1]
        hit.reshape(-1)[target[src]] = True
        part = ar.where(hit, shapes.index(gf, (np.arange(n * c)[:, None], sel)), zero)
        total = part if total is None else ar.add(total, part)
    return shapes.reshape(zero if total is None else total, in_shape)


def _adaptive_axis(n: int, o: int) -> tuple[np.ndarray, np.ndarray]:
    """Window i covers [floor(i n / o), ceil((i + 1) n / o)): (K, o) positions and mask."""
    start = np.array([(i * n) // o for i in range(o)])
    end = np.array([-((-(i + 1) * n) // o) for i in range(o)])
    k = int((end - start).max())
    pos = start[None, :] + np.arange(k)[:, None]
    return pos, pos < end[None, :]


@op("aten.adaptive_max_pool2d.default")
def adaptive_max_pool2d(cx: Any, x: Any, size: Any) -> tuple:
    """(max over torch's adaptive windows, flat index of the first maximum in each plane)."""
    s = shapes.shape(x)
    axes = [_adaptive_axis(int(n), int(o)) for n, o in zip(s[-2:], size, strict=True)]
    return _max_pool(cx, x, [a[0] for a in axes], [a[1] for a in axes])


@op("aten.adaptive_max_pool2d_backward.default")
def adaptive_max_pool2d_backward(cx: Any, g: Any, x: Any, indices: np.ndarray) -> Any:
    return _scatter(cx, g, indices, shapes.shape(x), 2)


def _pool_axis(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> tuple:
    o = _pool_size(n, k, s, p, d, ceil)
    pos = np.arange(o)[None, :] * s - p + np.arange(k)[:, None] * d
    return pos, (pos >= 0) & (pos < n)


@op("aten.max_pool3d_with_indices.default")
def max_pool3d(cx: Any, x: Any, k: Any, stride: Any = (), padding: Any = 0, dilation: Any = 1,
               ceil_mode: bool = False) -> tuple:  # fmt: skip
    """(max over each window's cells inside the input, flat index of its first maximum)."""
    s = shapes.shape(x)
    kk = _three(k)
    st, pd, dl = (_three(stride) if stride else kk), _three(padding), _three(dilation)
    if any(2 * p > q for p, q in zip(pd, kk, strict=True)):
        raise InputError(f"{cx.label()}: pooling padding must be at most half the kernel")
    axes = [_pool_axis(int(n), *a, bool(ceil_mode)) for n, a in
            zip(s[-3:], zip(kk, st, pd, dl, strict=True), strict=True)]  # fmt: skip
    return _max_pool(cx, x, [a[0] for a in axes], [a[1] for a in axes])


def _three(v: Any) -> tuple[int, int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[min(1, len(v) - 1)]), int(v[-1]))


@op("aten.max_pool3d_with_indices_backward.default")
def max_pool3d_backward(cx: Any, g: Any, x: Any, k: Any, stride: Any, padding: Any,
                        dilation: Any, ceil_mode: bool, indices: np.ndarray) -> Any:  # fmt: skip
    return _scatter(cx, g, indices, shapes.shape(x), 3)


def _avg_geometry(cx: Any, s: Any, k: Any, stride: Any, padding: Any, ceil_mode: bool,
                  count_include_pad: bool, divisor: Any) -> tuple[list, list, np.ndarray]:  # fmt: skip
    """(positions, masks, divisor per output cell) of torch's 3-D average pooling: the
    window clipped at the padded input (``count_include_pad``), its cells inside the input,
    or ``divisor``."""
    kk = _three(k)
    st, pd = (_three(stride) if stride else kk), _three(padding)
    if any(2 * p > q for p, q in zip(pd, kk, strict=True)):
        raise InputError(f"{cx.label()}: pooling padding must be at most half the kernel")
    axes, sizes = [], []
    for n, (k1, s1, p1) in zip(s[-3:], zip(kk, st, pd, strict=True), strict=True):
        pos, ok = _pool_axis(int(n), k1, s1, p1, 1, bool(ceil_mode))
        start = pos[0]
        end = np.minimum(start + k1, int(n) + p1)
        inside = np.minimum(end, int(n)) - np.maximum(start, 0)
        axes.append((pos, ok))
        sizes.append(end - start if count_include_pad else inside)
    div = np.multiply.outer(np.multiply.outer(sizes[0], sizes[1]), sizes[2]).astype(np.float64)
    if divisor:
        div = np.full(div.shape, float(divisor))
    return [a[0] for a in axes], [a[1] for a in axes], div


def _divide(cx: Any, v: Any, div: np.ndarray) -> Any:
    if np.all(div == div.flat[0]):
        return cx.ar.div(v, exact_count(cx.ar, div.flat[0]))
    return cx.ar.div(v, exact_count(cx.ar, np.broadcast_to(div, shapes.shape(v)).copy()))


@op("aten.avg_pool3d.default")
def avg_pool3d(cx: Any, x: Any, k: Any, stride: Any = (), padding: Any = 0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor: Any = None) -> Any:  # fmt: skip
    """Window sums (cells outside the input are 0) over torch's divisor."""
    xs = shapes.shape(x)
    unbatched = len(xs) == 4
    x = shapes.unsqueeze(x, 0) if unbatched else x
    pos, ok, div = _avg_geometry(cx, xs, k, stride, padding, ceil_mode, count_include_pad, divisor)
    c, (mask, _) = _windows(cx, x, pos, ok)
    if mask is not None:
        c = cx.ar.where(mask, c, cx.ar.asarray(np.zeros(shapes.shape(c))))
    out = _divide(cx, sum_dims(cx, c, [2], False), div)
    return shapes.squeeze_dims(out, [0]) if unbatched else out


@op("aten.avg_pool3d_backward.default")
def avg_pool3d_backward(cx: Any, g: Any, x: Any, k: Any, stride: Any, padding: Any,
                        ceil_mode: bool, count_include_pad: bool, divisor: Any) -> Any:  # fmt: skip
    """Each output's ``grad / divisor`` added to its window's cells inside the input, output
    after output, cells in order (torch's CPU loop)."""
    xs = shapes.shape(x)
    unbatched = len(xs) == 4
    if unbatched:
        g, xs = shapes.unsqueeze(g, 0), (1, *xs)
    pos, ok, div = _avg_geometry(cx, xs, k, stride, padding, ceil_mode, count_include_pad, divisor)
    share = _divide(cx, g, div)  # (N, C, O...)
    _, (mask, flat) = _windows(cx, cx.ar.asarray(np.zeros((1, 1, *xs[2:]))), pos, ok)
    kk = flat.shape[0]
    gs = shapes.shape(share)
    cells = shapes.expand(shapes.unsqueeze(share, len(gs)), (*gs, kk))  # (N, C, O..., K)
    if mask is not None:
        inside = np.moveaxis(np.asarray(mask)[0, 0], 0, -1)  # (O..., K)
        cells = cx.ar.where(np.broadcast_to(inside, shapes.shape(cells)), cells,
                            cx.ar.asarray(np.zeros(shapes.shape(cells))))  # fmt: skip
    idx = np.broadcast_to(np.moveaxis(flat, 0, -1).reshape(1, -1), (gs[0] * gs[1], flat.size))
    out = _scatter(cx, shapes.reshape(cells, (gs[0], gs[1], -1)), idx, xs, 3)
    return shapes.squeeze_dims(out, [0]) if unbatched else out


# ---- bilinear upsampling --------------------------------------------------------------------


def _lin_rows(n: int, o: int, align: bool, scale: Any) -> list[list[tuple[int, Fraction]]]:
    """Per output index: [(i0, 1 - l), (i1, l)] with torch's CPU indices and exact weights
    (UpSample.h: ``compute_source_index_and_lambda``; equal sizes copy)."""
    if o == n:
        return [[(i, Fraction(1)), (i, Fraction(0))] for i in range(o)]
    if align:
        ratio = Fraction(n - 1, o - 1) if o > 1 else Fraction(0)
    else:
        ratio = 1 / Fraction(float(scale)) if scale is not None and scale > 0 else Fraction(n, o)
    rows = []
    for j in range(o):
        src = (
            ratio * j if align else max(ratio * (j + Fraction(1, 2)) - Fraction(1, 2), Fraction(0))
        )
        i0 = min(int(src), n - 1)  # src >= 0: int() is floor
        lam = min(max(src - i0, Fraction(0)), Fraction(1))
        rows.append([(i0, 1 - lam), (i0 + (1 if i0 < n - 1 else 0), lam)])
    return rows


def _lin_rows64(n: int, o: int, align: bool, scale: Any) -> list[list[tuple[int, float]]]:
    """The same in float64, as torch's float64 CPU kernel computes it (checked bit for bit
    against it by tests/test_ops_conv_more.py). An axis of equal sizes: torch's taps ``i``
    and ``i`` with weights 1 and 0 (``UpSample.h``; both axes equal too: an infinite input
    is NaN there, as in torch)."""
    if o == n:
        return [[(i, 1.0), (i, 0.0)] for i in range(o)]
    if align:
        ratio = (n - 1) / (o - 1) if o > 1 else 0.0
    else:
        ratio = 1.0 / float(scale) if scale is not None and scale > 0 else n / o
    rows = []
    for j in range(o):
        # torch's CPU build contracts scale * (dst + 0.5) - 0.5 into one fused multiply-add
        fused = float(Fraction(ratio) * Fraction(j + 0.5) - Fraction(1, 2))
        src = ratio * j if align else max(fused, 0.0)
        i0 = min(int(np.floor(np.float32(src))), n - 1)  # torch's floorf: src as a float
        lam = min(max(src - i0, 0.0), 1.0)
        rows.append([(i0, 1.0 - lam), (i0 + (1 if i0 < n - 1 else 0), lam)])
    return rows


def _split(v: int) -> tuple[float, float]:
    """An integer below 2^106 as hi + lo, two float64 values summing to it exactly."""
    hi = float(v)
    return hi, float(v - int(hi))


#: per output index of an axis, the (input index, weight) pairs: (n, o, align, scale) -> rows
Rows = Callable[[int, int, bool, "float | None"], list[list[tuple[int, Any]]]]


@functools.lru_cache(maxsize=64)
def _fractions(rows: Rows, n: int, o: int, align: bool, scale: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(o, n, 2) numerators and denominators of the exact weights ``rows`` gives (repeated
    indices summed), each as hi + lo float64 words (read-only: cached for the forward and
    backward ops)."""
    f = [[Fraction(0)] * n for _ in range(o)]
    for j, frow in enumerate(rows(n, o, align, scale)):
        for i, fw in frow:
            f[j][i] += fw
    num = np.array([[_split(v.numerator) for v in r] for r in f]).reshape(o, n, 2)
    den = np.array([[_split(v.denominator) for v in r] for r in f]).reshape(o, n, 2)
    num.flags.writeable = den.flags.writeable = False
    return num, den


def _matrix(cx: Any, rows: Rows, n: int, o: int, align: bool, scale: float | None) -> Any:
    """(o, n) interpolation matrix of the exact ``rows`` as a value of the exact system."""
    ar = cx.ar
    num, den = _fractions(rows, n, o, align, scale)
    if not num[..., 1].any() and not den[..., 1].any() and np.all(den[..., 0] == 1):
        return ar.asarray(num[..., 0].copy())  # integer weights (0 and 1)
    top = ar.add(ar.asarray(num[..., 0].copy()), ar.asarray(num[..., 1].copy()))
    bottom = ar.add(ar.asarray(den[..., 0].copy()), ar.asarray(den[..., 1].copy()))
    return ar.div(top, bottom)


def _both(cx: Any, x: Any, left: Any, right: Any) -> Any:
    """``left @ x @ right^T`` over the last two axes of (N, C, a, b): the width first."""
    ar = cx.ar
    n, c, a, b = shapes.shape(x)
    y = ar.matmul(shapes.reshape(x, (n * c * a, b)), shapes.transpose(right, 0, 1))
    q = shapes.shape(right)[0]
    y = shapes.reshape(shapes.transpose(shapes.reshape(y, (n * c, a, q)), 1, 2), (-1, a))
    y = ar.matmul(y, shapes.transpose(left, 0, 1))
    p = shapes.shape(left)[0]
    return shapes.transpose(shapes.reshape(y, (n, c, q, p)), 2, 3)


def separable(cx: Any, x: Any, size: Any, in_size: Any, align: Any, scales: Any, adjoint: bool,
              exact_rows: Rows, float_rows: Rows) -> Any:  # fmt: skip
    """A separable interpolation of (N, C, H, W) ``x`` to ``size`` (``adjoint``: its adjoint,
    the backward, of an (N, C, oh, ow) gradient to ``in_size``): ``A_h x A_w^T`` with the
    exact rows' rational matrices in the exact systems; a rounding machine reads each
    output's own taps with the float64 rows (:func:`fpgrad.graph.ops.taps.separable`)."""
    (oh, ow), (h, w) = (int(v) for v in size), (int(v) for v in in_size[-2:])
    align = bool(align)
    sh, sw = (None if v is None else float(v) for v in scales)
    if not isinstance(cx.ar, ExactDerivatives):
        rows_h, rows_w = float_rows(h, oh, align, sh), float_rows(w, ow, align, sw)
        return taps.separable(cx, x, rows_h, rows_w, h, w, adjoint)
    left = _matrix(cx, exact_rows, h, oh, align, sh)
    right = _matrix(cx, exact_rows, w, ow, align, sw)
    if adjoint:
        return _both(cx, x, shapes.transpose(left, 0, 1), shapes.transpose(right, 0, 1))
    return _both(cx, x, left, right)


@op("aten.upsample_bilinear2d.default")
def upsample_bilinear2d(cx: Any, x: Any, size: Any, align_corners: bool, scales_h: Any = None,
                        scales_w: Any = None) -> Any:  # fmt: skip
    """``A_h x A_w^T`` (module docstring: the weights per system)."""
    return separable(cx, x, size, shapes.shape(x), align_corners, (scales_h, scales_w), False,
                     _lin_rows, _lin_rows64)  # fmt: skip


@op("aten.upsample_bilinear2d_backward.default")
def upsample_bilinear2d_backward(cx: Any, g: Any, size: Any, in_size: Any, align_corners: bool,
                                 scales_h: Any = None, scales_w: Any = None) -> Any:  # fmt: skip
    """The adjoint ``A_h^T g A_w``."""
    return separable(cx, g, size, in_size, align_corners, (scales_h, scales_w), True,
                     _lin_rows, _lin_rows64)  # fmt: skip


# ---- pixel shuffle ------------------------------------------------------------------------


@op("aten.pixel_shuffle.default")
def pixel_shuffle(cx: Any, x: Any, r: int) -> Any:
    """(..., C r^2, H, W) -> (..., C, H r, W r) (shape-only)."""
    s = shapes.shape(x)
    b, (c, h, w), r = s[:-3], s[-3:], int(r)
    n = len(b)
    y = shapes.reshape(x, (*b, c // (r * r), r, r, h, w))
    y = shapes.permute(y, (*range(n), n, n + 3, n + 1, n + 4, n + 2))
    return shapes.reshape(y, (*b, c // (r * r), h * r, w * r))


@op("aten.pixel_unshuffle.default")
def pixel_unshuffle(cx: Any, x: Any, r: int) -> Any:
    """(..., C, H r, W r) -> (..., C r^2, H, W) (shape-only)."""
    s = shapes.shape(x)
    b, (c, h, w), r = s[:-3], s[-3:], int(r)
    n = len(b)
    y = shapes.reshape(x, (*b, c, h // r, r, w // r, r))
    y = shapes.permute(y, (*range(n), n, n + 2, n + 4, n + 1, n + 3))
    return shapes.reshape(y, (*b, c * r * r, h // r, w // r))
