"""Convolutions (im2col + the system's matmul) and 2-D pooling, forward and backward.

Windows are strided slices of the zero-padded input (shape-only, exact); backward ops
place each window offset's contribution back into a zero array and sum them with the
system's additions. Pooling supports padding 0 and ``ceil_mode=False``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.arith.ball import Ball
from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.ops import op
from fpgrad.graph.ops._util import sum_dims


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


def _check_conv(cx: Any, transposed: bool, x: Any) -> None:
    if transposed or len(shapes.shape(x)) not in (3, 4):
        raise InputError(f"{cx.label()}: only conv1d/conv2d (not transposed) are supported")


def _as2d(x: Any) -> tuple[Any, bool]:
    s = shapes.shape(x)
    return (shapes.reshape(x, (*s[:-1], 1, s[-1])), True) if len(s) == 3 else (x, False)


@op("aten.convolution.default")
def convolution(
    cx: Any, x: Any, w: Any, b: Any, stride: Any, padding: Any, dilation: Any,
    transposed: bool, output_padding: Any, groups: int,
) -> Any:  # fmt: skip
    """Per group: W_g (O_g, C_g kh kw) @ cols_g (C_g kh kw, N oh ow), plus the bias."""
    _check_conv(cx, transposed, x)
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
    _check_conv(cx, transposed, x)
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


def _pool_args(cx: Any, k: Any, stride: Any, padding: Any, ceil_mode: bool):  # noqa: ANN202
    k = _pair(k)
    st = _pair(stride) if stride else k
    if any(_pair(padding)) or ceil_mode:
        raise InputError(f"{cx.label()}: pooling with padding or ceil_mode is not supported yet")
    return k, st


@op("aten.max_pool2d_with_indices.default")
def max_pool2d(
    cx: Any, x: Any, k: Any, stride: Any = (), padding: Any = 0, dilation: Any = 1,
    ceil_mode: bool = False,
) -> tuple:  # fmt: skip
    """(max over each window, the offset of its first maximum: decided on exact values)."""
    ar = cx.ar
    k, st = _pool_args(cx, k, stride, padding, ceil_mode)
    cols, _, _ = _cols(cx, x, k, st, (0, 0), _pair(dilation))
    m = ar.max(cols, axis=2, keepdims=True)
    return shapes.reshape(m, shapes.shape(m)[:2] + shapes.shape(m)[3:]), _first_max(ar, cols, m)


def _first_max(ar: Any, cols: Any, m: Any) -> np.ndarray:
    """Offset of the first window element equal to the maximum ``m`` (torch's choice).

    Balls: the element ``max`` took (identical words); every other element must lie below
    it, else the choice is uncertain and counted (the exact reference then uses mpmath).
    Other systems: the first element with not (m > x), compared exactly.
    """
    if isinstance(cols, Ball):
        first = np.argmax(np.all(cols.mid == m.mid, axis=0), axis=2)
        chosen = np.arange(shapes.shape(cols)[2])[None, None, :, None, None] == first[:, :, None]
        d = ar.sub(m, cols)
        unsure = ~chosen & (d.rad > 0) & (np.abs(d.mid[0]) <= d.rad * 2)
        ar.uncertain_branches += int(unsure.sum())
        return first
    return np.argmax(~ar.positive(ar.sub(m, cols)), axis=2)


@op("aten.max_pool2d_with_indices_backward.default")
def max_pool2d_backward(
    cx: Any, g: Any, x: Any, k: Any, stride: Any, padding: Any, dilation: Any,
    ceil_mode: bool, indices: np.ndarray,
) -> Any:  # fmt: skip
    """Each window's gradient to its first maximum (offsets from the forward op above)."""
    ar = cx.ar
    k, st = _pool_args(cx, k, stride, padding, ceil_mode)
    zero = ar.asarray(np.zeros(shapes.shape(g)))
    kk = k[0] * k[1]
    cols = shapes.stack([ar.where(indices == i, g, zero) for i in range(kk)], 2)
    return _uncols(cx, cols, shapes.shape(x), k, st, (0, 0), _pair(dilation))


@op("aten.avg_pool2d.default")
def avg_pool2d(
    cx: Any, x: Any, k: Any, stride: Any = (), padding: Any = 0, ceil_mode: bool = False,
    count_include_pad: bool = True, divisor: Any = None,
) -> Any:  # fmt: skip
    ar = cx.ar
    k, st = _pool_args(cx, k, stride, padding, ceil_mode)
    cols, _, _ = _cols(cx, x, k, st, (0, 0), (1, 1))
    return ar.div(sum_dims(cx, cols, [2], False), ar.const(float(divisor or k[0] * k[1])))


@op("aten.avg_pool2d_backward.default")
def avg_pool2d_backward(
    cx: Any, g: Any, x: Any, k: Any, stride: Any, padding: Any, ceil_mode: bool,
    count_include_pad: bool, divisor: Any,
) -> Any:  # fmt: skip
    ar = cx.ar
    k, st = _pool_args(cx, k, stride, padding, ceil_mode)
    share = ar.div(g, ar.const(float(divisor or k[0] * k[1])))
    cols = shapes.stack([share] * (k[0] * k[1]), 2)
    return _uncols(cx, cols, shapes.shape(x), k, st, (0, 0), (1, 1))


def _adaptive_kernel(cx: Any, x: Any, size: Any) -> tuple[int, int]:
    h, w = shapes.shape(x)[-2:]
    oh, ow = _pair(size)
    if h % oh or w % ow:
        raise InputError(
            f"{cx.label()}: adaptive average pooling from {h}x{w} to {oh}x{ow} is supported "
            "only when the output size divides the input size"
        )
    return h // oh, w // ow


@op("aten._adaptive_avg_pool2d.default")
def adaptive_avg_pool2d(cx: Any, x: Any, size: Any) -> Any:
    """Average pooling with kernel = stride = input size / output size (divisible sizes)."""
    k = _adaptive_kernel(cx, x, size)
    return avg_pool2d(cx, x, k, k)


@op("aten._adaptive_avg_pool2d_backward.default")
def adaptive_avg_pool2d_backward(cx: Any, g: Any, x: Any) -> Any:
    k = _adaptive_kernel(cx, x, shapes.shape(g)[-2:])
    return avg_pool2d_backward(cx, g, x, k, k, 0, False, True, None)
