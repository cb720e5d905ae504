"""Convolutions (im2col + the system's matmul) and 2-D pooling, forward and backward.

Windows are strided slices of the zero-padded input (shape-only, exact); backward ops
place each window offset's contribution back into a zero array and sum them with the
system's additions. Pooling: any padding (at most half the kernel, as torch requires),
stride, dilation (max) and ``ceil_mode``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.arith.ball import Ball
from fpgrad.arith.base import ExactDerivatives
from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.ops._ties import increasing_root
from fpgrad.graph.ops._util import exact_count, sum_dims
from fpgrad.graph.ops.registry import op


def _pair(v: Any) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1]))


def _geometry(x_shape, k, stride, padding, dilation):  # noqa: ANN001, ANN202
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, stride, padding, dilation
    h, w = x_shape[-2] + 2 * ph, x_shape[-1] + 2 * pw
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    return h, w, oh, ow


def _offsets(k, stride, dilation, oh, ow):  # noqa: ANN001, ANN202
    """(ki, kj, index into the padded spatial axes) per window offset, ki-major."""
    (kh, kw), (sh, sw), (dh, dw) = k, stride, dilation
    for ki in range(kh):
        for kj in range(kw):
            yield (
                ki,
                kj,
                (
                    slice(ki * dh, ki * dh + sh * (oh - 1) + 1, sh),
                    slice(kj * dw, kj * dw + sw * (ow - 1) + 1, sw),
                ),
            )


def _padded(cx: Any, x: Any, padding: tuple[int, int]) -> Any:
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    s = shapes.shape(x)
    zeros = cx.ar.asarray(np.zeros((*s[:-2], s[-2] + 2 * ph, s[-1] + 2 * pw)))
    return shapes.place(zeros, x, (..., slice(ph, ph + s[-2]), slice(pw, pw + s[-1])))


def _cols(cx: Any, x: Any, k, stride, padding, dilation) -> tuple[Any, int, int]:  # noqa: ANN001
    """(N, C, kh*kw, oh, ow) windows of the padded input."""
    _, _, oh, ow = _geometry(shapes.shape(x), k, stride, padding, dilation)
    xp = _padded(cx, x, padding)
    parts = [shapes.index(xp, (..., *idx)) for _, _, idx in _offsets(k, stride, dilation, oh, ow)]
    return shapes.stack(parts, 2), oh, ow


def _uncols(cx: Any, cols: Any, x_shape, k, stride, padding, dilation) -> Any:  # noqa: ANN001
    """The adjoint of :func:`_cols`: every offset's values placed and summed, then cropped."""
    h, w, oh, ow = _geometry(x_shape, k, stride, padding, dilation)
    n, c = x_shape[0], x_shape[1]
    zeros = cx.ar.asarray(np.zeros((n, c, h, w)))
    total = None
    for i, (_, _, idx) in enumerate(_offsets(k, stride, dilation, oh, ow)):
        part = shapes.place(zeros, shapes.index(cols, (slice(None), slice(None), i)), (..., *idx))
        total = part if total is None else cx.ar.add(total, part)
    ph, pw = padding
    return shapes.index(total, (..., slice(ph, ph + x_shape[-2]), slice(pw, pw + x_shape[-1])))


def _other(transposed: bool, x: Any) -> bool:
    """A transposed or 3-D convolution: :mod:`fpgrad.graph.ops.conv_more` computes it."""
    return bool(transposed) or len(shapes.shape(x)) not in (3, 4)


def _as2d(x: Any) -> tuple[Any, bool]:
    s = shapes.shape(x)
    return (shapes.reshape(x, (*s[:-1], 1, s[-1])), True) if len(s) == 3 else (x, False)


@op("aten.convolution.default")
def convolution(
    cx: Any, x: Any, w: Any, b: Any, stride: Any, padding: Any, dilation: Any,
    transposed: bool, output_padding: Any, groups: int,
) -> Any:  # fmt: skip
    """Per group: W_g (O_g, C_g kh kw) @ cols_g (C_g kh kw, N oh ow), plus the bias."""
    if _other(transposed, x):
        from fpgrad.graph.ops import conv_more

        return conv_more.convolution(cx, x, w, b, stride, padding, dilation, transposed,
                                     output_padding, groups)  # fmt: skip
    ar = cx.ar
    (x, one_d), (w, _) = _as2d(x), _as2d(w)
    k = shapes.shape(w)[-2:]
    st, pd, dl = _geo_args(stride, padding, dilation, one_d)
    cols, oh, ow = _cols(cx, x, k, st, pd, dl)
    n, c = shapes.shape(x)[:2]
    o = shapes.shape(w)[0]
    cg, og, kk = c // groups, o // groups, k[0] * k[1]
    outs = []
    for g in range(groups):
        xg = shapes.index(cols, (slice(None), slice(g * cg, (g + 1) * cg)))
        xg = shapes.reshape(shapes.permute(xg, (1, 2, 0, 3, 4)), (cg * kk, n * oh * ow))
        wg = shapes.reshape(shapes.index(w, (slice(g * og, (g + 1) * og),)), (og, cg * kk))
        outs.append(shapes.reshape(ar.matmul(wg, xg), (og, n, oh, ow)))
    out = shapes.permute(shapes.cat(outs, 0), (1, 0, 2, 3))
    if b is not None:
        out = ar.add(out, shapes.reshape(b, (1, o, 1, 1)))
    return shapes.reshape(out, (n, o, ow)) if one_d else out


def _geo_args(stride, padding, dilation, one_d):  # noqa: ANN001, ANN202
    if one_d:
        return (1, int(stride[0])), (0, int(padding[0])), (1, int(dilation[0]))
    return _pair(stride), _pair(padding), _pair(dilation)


@op("aten.convolution_backward.default")
def convolution_backward(
    cx: Any, g: Any, x: Any, w: Any, bias_sizes: Any, stride: Any, padding: Any,
    dilation: Any, transposed: bool, output_padding: Any, groups: int, mask: Any,
) -> tuple:  # fmt: skip
    """(dx, dw, db): dW_g = G_g cols_g^T, dcols_g = W_g^T G_g (then placed back), db = sum G."""
    if _other(transposed, x):
        from fpgrad.graph.ops import conv_more

        return conv_more.convolution_backward(cx, g, x, w, bias_sizes, stride, padding, dilation,
                                              transposed, output_padding, groups, mask)  # fmt: skip
    ar = cx.ar
    x_shape3, w_shape3 = shapes.shape(x), shapes.shape(w)
    (x, one_d), (w, _), (g, _) = _as2d(x), _as2d(w), _as2d(g)
    w_shape = shapes.shape(w)
    k = w_shape[-2:]
    st, pd, dl = _geo_args(stride, padding, dilation, one_d)
    cols, oh, ow = _cols(cx, x, k, st, pd, dl)
    n, c = shapes.shape(x)[:2]
    o = w_shape[0]
    cg, og, kk = c // groups, o // groups, k[0] * k[1]
    dws, dcols = [], []
    for gi in range(groups):
        gg = shapes.index(g, (slice(None), slice(gi * og, (gi + 1) * og)))
        gg = shapes.reshape(shapes.permute(gg, (1, 0, 2, 3)), (og, n * oh * ow))
        xg = shapes.index(cols, (slice(None), slice(gi * cg, (gi + 1) * cg)))
        xg = shapes.reshape(shapes.permute(xg, (1, 2, 0, 3, 4)), (cg * kk, n * oh * ow))
        wg = shapes.reshape(shapes.index(w, (slice(gi * og, (gi + 1) * og),)), (og, cg * kk))
        if mask[1]:
            dws.append(ar.matmul(gg, shapes.transpose(xg, 0, 1)))
        if mask[0]:
            d = shapes.reshape(ar.matmul(shapes.transpose(wg, 0, 1), gg), (cg, kk, n, oh, ow))
            dcols.append(shapes.permute(d, (2, 0, 1, 3, 4)))
    dx = dw = db = None
    if mask[0]:
        dx = _uncols(cx, shapes.cat(dcols, 1), shapes.shape(x), k, st, pd, dl)
        dx = shapes.reshape(dx, x_shape3)
    if mask[1]:
        dw = shapes.reshape(shapes.cat(dws, 0), w_shape3)
    if mask[2]:
        db = sum_dims(cx, g, [0, 2, 3], False)  # (N, O, 1 or H, W): all but the channels
    return dx, dw, db


def _pool_size(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """torch's pooling output size: with ``ceil_mode`` the last window must start inside the
    input or the left padding."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


class _Pool:
    """A 2-D pooling geometry: kernel, stride, padding, dilation, output size, and the extra
    bottom/right cells ``ceil_mode`` windows reach beyond the padded input."""

    def __init__(self, cx: Any, x_shape: Any, k: Any, stride: Any, padding: Any, dilation: Any,
                 ceil: bool) -> None:  # fmt: skip
        self.k, self.st = _pair(k), (_pair(stride) if stride else _pair(k))
        self.pad, self.dil = _pair(padding), _pair(dilation)
        if any(2 * p > kk for p, kk in zip(self.pad, self.k, strict=True)):
            raise InputError(f"{cx.label()}: pooling padding must be at most half the kernel")
        self.size = tuple(int(v) for v in x_shape[-2:])
        self.out = tuple(_pool_size(n, k, s, p, d, ceil) for n, k, s, p, d in
                         zip(self.size, self.k, self.st, self.pad, self.dil, strict=True))  # fmt: skip
        self.extra = tuple(max(0, (o - 1) * s + d * (k - 1) + 1 - (n + 2 * p)) for o, s, d, k, n, p
                           in zip(self.out, self.st, self.dil, self.k, self.size, self.pad, strict=True))  # fmt: skip

    @property
    def plain(self) -> bool:
        return not any(self.pad) and not any(self.extra)

    def cols(self, cx: Any, x: Any) -> Any:
        """(N, C, kh*kw, oh, ow) windows of the input, zero-padded."""
        (ph, pw), (eh, ew) = self.pad, self.extra
        s = shapes.shape(x)
        xp = x
        if ph or pw or eh or ew:
            zeros = cx.ar.asarray(np.zeros((*s[:-2], s[-2] + 2 * ph + eh, s[-1] + 2 * pw + ew)))
            xp = shapes.place(zeros, x, (..., slice(ph, ph + s[-2]), slice(pw, pw + s[-1])))
        offsets = _offsets(self.k, self.st, self.dil, *self.out)
        return shapes.stack([shapes.index(xp, (..., *idx)) for _, _, idx in offsets], 2)

    def uncols(self, cx: Any, cols: Any, x_shape: Any) -> Any:
        """The adjoint of :meth:`cols`: each offset placed, summed, the padding cropped.
        The offsets are added last first: an input cell then takes its addends in the order
        of the windows that read it (row-major over the output), torch's CPU pooling
        backward order (``grad_input[i] += ...`` output after output, each add rounded)."""
        (ph, pw), (eh, ew) = self.pad, self.extra
        n, c, h, w = x_shape
        zeros = cx.ar.asarray(np.zeros((n, c, h + 2 * ph + eh, w + 2 * pw + ew)))
        total = None
        offsets = list(enumerate(_offsets(self.k, self.st, self.dil, *self.out)))
        for i, (_, _, idx) in reversed(offsets):
            part = shapes.place(zeros, shapes.index(cols, (slice(None), slice(None), i)),
                                (..., *idx))  # fmt: skip
            total = part if total is None else cx.ar.add(total, part)
        return shapes.index(total, (..., slice(ph, ph + h), slice(pw, pw + w)))

    def valid(self) -> np.ndarray:
        """(kh*kw, oh, ow): the window offsets that fall inside the input."""
        axes = []
        for o, s, p, d, k, n in zip(self.out, self.st, self.pad, self.dil, self.k, self.size,
                                    strict=True):  # fmt: skip
            pos = np.arange(o)[None, :] * s - p + np.arange(k)[:, None] * d  # (k, o)
            axes.append((pos >= 0) & (pos < n))
        vh, vw = axes
        return (vh[:, None, :, None] & vw[None, :, None, :]).reshape(-1, *self.out)

    def divisors(self, count_include_pad: bool, divisor: Any) -> np.ndarray:
        """torch's average-pooling divisor per window (oh, ow)."""
        if divisor:
            return np.full(self.out, float(divisor))
        sizes = []
        for o, s, p, k, n in zip(self.out, self.st, self.pad, self.k, self.size, strict=True):
            start = np.arange(o) * s - p
            end = np.minimum(start + k, n + p)
            pool = end - start
            inside = np.minimum(end, n) - np.maximum(start, 0)
            sizes.append(pool if count_include_pad else inside)
        return (sizes[0][:, None] * sizes[1][None, :]).astype(np.float64)


@op("aten.max_pool2d_with_indices.default")
def max_pool2d(
    cx: Any, x: Any, k: Any, stride: Any = (), padding: Any = 0, dilation: Any = 1,
    ceil_mode: bool = False,
) -> tuple:  # fmt: skip
    """(max over each window's elements inside the input, the offset of its first maximum:
    decided on exact values). Cells outside the input (padding, ``ceil_mode``) hold a copy
    of the window's first element inside it, never chosen: padding is never a value. In the
    exact systems, where ``x = f(z)`` for a strictly increasing ``f``, the first maximum is
    decided on ``z`` (:func:`_increasing_source`)."""
    ar = cx.ar
    geo = _Pool(cx, shapes.shape(x), k, stride, padding, dilation, ceil_mode)
    cols, valid = _windows(cx, geo, x)
    m = ar.max(cols, axis=2, keepdims=True)
    out = shapes.reshape(m, shapes.shape(m)[:2] + shapes.shape(m)[3:])
    z = _increasing_source(cx, shapes.shape(x))
    if z is not None:  # the same first maximum, decided on f's argument
        zcols, _ = _windows(cx, geo, z)
        return out, _first_max(ar, zcols, ar.max(zcols, axis=2, keepdims=True), valid)
    return out, _first_max(ar, cols, m, valid)


def _windows(cx: Any, geo: _Pool, x: Any) -> tuple[Any, np.ndarray | None]:
    """(the windows of ``x``, cells outside the input holding a copy of the window's first
    cell inside it; the mask of cells inside, None when all are)."""
    cols = geo.cols(cx, x)
    if geo.plain:
        return cols, None
    valid = geo.valid()
    first = np.argmax(valid, axis=0)  # (oh, ow): every window has an element inside
    ii, jj = np.ogrid[: geo.out[0], : geo.out[1]]
    head = shapes.unsqueeze(shapes.index(cols, (slice(None), slice(None), first, ii, jj)), 2)
    mask = np.broadcast_to(valid, shapes.shape(cols))
    return cx.ar.where(mask, cols, shapes.expand(head, shapes.shape(cols))), mask




def _increasing_source(cx: Any, shape: Any) -> Any:
    """In the exact systems, where the pooled input is ``f(z)`` for a chain of strictly
    increasing elementwise ``f`` (tanh, sigmoid, exp, leaky ReLU and ELU with positive
    coefficients): the value of ``z``. There ``f(z_i) < f(z_j)`` exactly when ``z_i < z_j``
    and ``f(z_i) = f(z_j)`` exactly when ``z_i = z_j``, so the first maximum is decided on
    ``z``, which the balls often hold exactly (a convolution of float64 values) where the
    balls of ``f(z)`` cannot tell equal values apart (ties of a constant image region).
    Elsewhere None: a rounding machine's ``f`` may round different ``z`` to one value."""
    if not isinstance(cx.ar, ExactDerivatives):
        return None
    found = increasing_root(cx.origin(0))
    if found is None:
        return None
    z = cx.value(found)
    return z if shapes.shape(z) == tuple(shape) and not isinstance(z, tuple) else None


def _first_max(ar: Any, cols: Any, m: Any, valid: np.ndarray | None = None) -> np.ndarray:
    """Offset of the first window element (inside the input: ``valid``) equal to the
    maximum ``m`` (torch's choice).

    Balls: the element ``max`` took (identical words); every other element must lie below
    it, else the choice is uncertain and counted (the exact reference then uses mpmath).
    Other systems: the first element with not (m > x), compared exactly.
    """
    inside = np.ones(shapes.shape(cols), dtype=bool) if valid is None else valid
    if isinstance(cols, Ball):
        first = np.argmax(np.all(cols.mid == m.mid, axis=0) & inside, axis=2)
        chosen = np.arange(shapes.shape(cols)[2])[None, None, :, None, None] == first[:, :, None]
        d = ar.sub(m, cols)
        unsure = ~chosen & inside & (d.rad > 0) & (np.abs(d.mid[0]) <= d.rad * 2)
        ar.uncertain_branches += int(unsure.sum())
        return first
    # the first maximum by midpoint, then proven: every earlier element certainly below it,
    # every later one not above it (a tie, exactly 0, keeps the first); what the balls cannot
    # decide is counted by positive() and escalates the precision
    kk = shapes.shape(cols)[2]
    mid = ar.to_float64(cols)
    first = np.argmax((mid == np.max(mid, axis=2, keepdims=True)) & inside, axis=2)
    offset = np.arange(kk)[None, None, :, None, None]
    chosen = offset == first[:, :, None]
    top = ar.sum(ar.mul(cols, ar.asarray(chosen.astype(np.float64))), axis=2, keepdims=True)
    d = ar.sub(top, cols)
    d = ar.where(chosen | ~inside, ar.mul(d, ar.const(0.0)), d)  # exactly 0: not compared
    pos = ar.positive(d)
    unsure = getattr(pos, "unsure", None)
    low = ~np.asarray(pos, dtype=bool) & inside & ~chosen  # decided d <= 0 (or undecided)
    if unsure is not None:
        low &= ~np.asarray(unsure, dtype=bool)
    if low.any():  # an element above ``top`` by less than float64 resolves: midpoints missed it
        neg = ar.where(low, ar.mul(d, ar.const(-1.0)), ar.mul(d, ar.const(0.0)))
        wrong = np.any(np.asarray(ar.positive(neg), dtype=bool), axis=2)
        if wrong.any():
            first = np.where(wrong, _scan_first_max(ar, cols, inside), first)
    if not isinstance(ar, ExactDerivatives):  # a machine's NaN: torch's pooling kernels take
        nan = np.isnan(mid) & inside  # ``val > best || isnan(val)``: the window's last NaN
        if nan.any():
            last = kk - 1 - np.argmax(nan[:, :, ::-1], axis=2)
            first = np.where(nan.any(axis=2), last, first)
    return first


def _scan_first_max(ar: Any, cols: Any, inside: np.ndarray) -> np.ndarray:
    """torch's first maximum by exact comparisons, offset after offset: a later element
    inside the input replaces the best only when certainly above it (undecided: counted by
    positive(), which escalates the precision)."""
    kk = shapes.shape(cols)[2]
    best = shapes.index(cols, (slice(None), slice(None), 0))
    have = inside[:, :, 0].copy()
    idx = np.zeros(shapes.shape(best), dtype=np.int64)
    for i in range(1, kk):
        xi = shapes.index(cols, (slice(None), slice(None), i))
        d = ar.sub(xi, best)
        gt = np.asarray(ar.positive(ar.where(have, d, ar.mul(d, ar.const(0.0)))), dtype=bool)
        take = inside[:, :, i] & (~have | gt)
        idx = np.where(take, i, idx)
        best = ar.where(take, xi, best)
        have |= inside[:, :, i]
    return idx


@op("aten.max_pool2d_with_indices_backward.default")
def max_pool2d_backward(
    cx: Any, g: Any, x: Any, k: Any, stride: Any, padding: Any, dilation: Any,
    ceil_mode: bool, indices: np.ndarray,
) -> Any:  # fmt: skip
    """Each window's gradient to its first maximum (offsets from the forward op above)."""
    ar = cx.ar
    geo = _Pool(cx, shapes.shape(x), k, stride, padding, dilation, ceil_mode)
    zero = ar.asarray(np.zeros(shapes.shape(g)))
    kk = geo.k[0] * geo.k[1]
    cols = shapes.stack([ar.where(indices == i, g, zero) for i in range(kk)], 2)
    return geo.uncols(cx, cols, shapes.shape(x))


@op("aten.avg_pool2d.default")
def avg_pool2d(
    cx: Any, x: Any, k: Any, stride: Any = (), padding: Any = 0, ceil_mode: bool = False,
    count_include_pad: bool = True, divisor: Any = None,
) -> Any:  # fmt: skip
    """Window sums (zero padding) over torch's divisor: the window's size within the padded
    input (``count_include_pad``), its elements inside the input, or ``divisor``."""
    ar = cx.ar
    geo = _Pool(cx, shapes.shape(x), k, stride, padding, 1, ceil_mode)
    total = sum_dims(cx, geo.cols(cx, x), [2], False)
    return ar.div(total, _divisor(cx, geo, total, count_include_pad, divisor))


def _divisor(cx: Any, geo: _Pool, like: Any, count_include_pad: bool, divisor: Any) -> Any:
    div = geo.divisors(count_include_pad, divisor)
    if np.all(div == div.flat[0]):
        return exact_count(cx.ar, div.flat[0])
    return exact_count(cx.ar, np.broadcast_to(div, shapes.shape(like)).copy())


@op("aten.avg_pool2d_backward.default")
def avg_pool2d_backward(
    cx: Any, g: Any, x: Any, k: Any, stride: Any, padding: Any, ceil_mode: bool,
    count_include_pad: bool, divisor: Any,
) -> Any:  # fmt: skip
    ar = cx.ar
    geo = _Pool(cx, shapes.shape(x), k, stride, padding, 1, ceil_mode)
    share = ar.div(g, _divisor(cx, geo, g, count_include_pad, divisor))
    cols = shapes.stack([share] * (geo.k[0] * geo.k[1]), 2)
    return geo.uncols(cx, cols, shapes.shape(x))


def _adaptive_rows(n: int, o: int) -> np.ndarray:
    """(o, n) 0/1 matrix: window i covers [floor(i n / o), ceil((i + 1) n / o))."""
    m = np.zeros((o, n))
    for i in range(o):
        m[i, (i * n) // o : -((-(i + 1) * n) // o)] = 1.0
    return m


def _adaptive(cx: Any, x_shape: Any, size: Any) -> tuple[np.ndarray, np.ndarray, Any]:
    """Window matrices (oh, H), (ow, W) and the window sizes (oh, ow) as a value."""
    h, w = x_shape[-2:]
    oh, ow = _pair(size)
    ah, aw = _adaptive_rows(h, oh), _adaptive_rows(w, ow)
    counts = ah.sum(1)[:, None] * aw.sum(1)[None, :]
    return ah, aw, counts


def _apply_rows(cx: Any, x: Any, left: np.ndarray, right: np.ndarray) -> Any:
    """left @ x @ right^T over the last two axes of (N, C, a, b), by the system's matmul
    (a rounding machine: over each window's cells only, :mod:`fpgrad.graph.ops.taps`)."""
    ar = cx.ar
    if not isinstance(ar, ExactDerivatives):
        from fpgrad.graph.ops import taps

        def rows(m: np.ndarray) -> list:
            return [[(int(i), float(m[j, i])) for i in np.nonzero(m[j])[0]] for j in range(len(m))]

        return taps.separable(cx, x, rows(left), rows(right), left.shape[1], right.shape[1])
    n, c, a, b = shapes.shape(x)
    y = ar.matmul(shapes.reshape(x, (n * c * a, b)), ar.asarray(right.T.copy()))
    y = shapes.reshape(shapes.transpose(shapes.reshape(y, (n * c, a, -1)), 1, 2), (-1, a))
    y = ar.matmul(y, ar.asarray(left.T.copy()))
    q = right.shape[0]
    return shapes.reshape(shapes.transpose(shapes.reshape(y, (n * c, q, -1)), 1, 2),
                          (n, c, left.shape[0], q))  # fmt: skip


@op("aten._adaptive_avg_pool2d.default")
def adaptive_avg_pool2d(cx: Any, x: Any, size: Any) -> Any:
    """Average pooling with kernel = stride = input size / output size when it divides;
    otherwise window sums through 0/1 window matrices over torch's window sizes."""
    h, w = shapes.shape(x)[-2:]
    oh, ow = _pair(size)
    if h % oh == 0 and w % ow == 0:
        k = (h // oh, w // ow)
        return avg_pool2d(cx, x, k, k)
    ah, aw, counts = _adaptive(cx, shapes.shape(x), size)
    total = _apply_rows(cx, x, ah, aw)
    return cx.ar.div(total, exact_count(cx.ar, np.broadcast_to(counts, shapes.shape(total)).copy()))


@op("aten._adaptive_avg_pool2d_backward.default")
def adaptive_avg_pool2d_backward(cx: Any, g: Any, x: Any) -> Any:
    h, w = shapes.shape(x)[-2:]
    oh, ow = shapes.shape(g)[-2:]
    if h % oh == 0 and w % ow == 0:
        k = (h // oh, w // ow)
        return avg_pool2d_backward(cx, g, x, k, k, 0, False, True, None)
    ah, aw, counts = _adaptive(cx, shapes.shape(x), (oh, ow))
    share = cx.ar.div(g, exact_count(cx.ar, np.broadcast_to(counts, shapes.shape(g)).copy()))
    return _apply_rows(cx, share, ah.T, aw.T)
