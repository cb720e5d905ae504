"""Convolutions the 2-D path of :mod:`fpgrad.graph.ops.conv` does not take: 3-D convolution
and transposed convolution (1-D, 2-D, 3-D), forward and backward, in N spatial dimensions.

A convolution is ``A_w``: per group, ``W_g (O_g, C_g K) @ cols_g (C_g K, N O...)`` over the
windows of the zero-padded input (im2col, shape-only). Its adjoint ``A_w^T`` places each
window offset's contribution back (:func:`uncols`, sums by the system's add). A transposed
convolution with weight ``w (C_in, C_out/groups, k...)`` is ``y = A_w^T x`` for the
convolution ``A_w`` from ``C_out`` to ``C_in`` channels with the same stride, padding and
dilation whose input has the transposed output's size ``(in - 1) s - 2 p + d (k - 1) + op + 1``
(``op``: output padding, the extra cells no window of ``A_w`` reads past the last one). Hence
``dx = A_w g`` (a convolution of the gradient), ``dw = x cols(g)^T`` (the convolution's weight
gradient with input ``g`` and output gradient ``x``), ``db = sum g``. Every value is a sum
of products taken by the system's matmul and add: exact enclosures in the exact systems,
each operation rounded in the emulated ones.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.ops._util import sum_dims


def _tuple(v: Any, d: int) -> tuple[int, ...]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(int(v[i] if i < len(v) else v[-1]) for i in range(d))


class Geo:
    """Kernel, stride, padding, dilation over ``d`` spatial axes, and the output size of a
    convolution of input spatial size ``size``: ``(n + 2p - d (k - 1) - 1) // s + 1``."""

    def __init__(self, size: Any, k: Any, stride: Any, padding: Any, dilation: Any) -> None:
        d = len(size)
        self.size, self.k = tuple(int(v) for v in size), tuple(int(v) for v in k)
        self.st, self.pad = _tuple(stride, d), _tuple(padding, d)
        self.dil = _tuple(dilation, d)
        self.out = tuple((n + 2 * p - dl * (kk - 1) - 1) // s + 1 for n, p, dl, kk, s in
                         zip(self.size, self.pad, self.dil, self.k, self.st, strict=True))  # fmt: skip
        if any(o < 1 for o in self.out):
            raise InputError(f"convolution output size {self.out} is empty")

    @property
    def kk(self) -> int:
        return int(np.prod(self.k))

    def offsets(self) -> list[tuple[slice, ...]]:
        """Per window offset (row-major over the kernel): strided slices of the padded input."""
        return [
            tuple(
                slice(i * dl, i * dl + s * (o - 1) + 1, s)
                for i, dl, s, o in zip(ks, self.dil, self.st, self.out, strict=True)
            )  # fmt: skip
            for ks in itertools.product(*(range(k) for k in self.k))
        ]

    def padded_shape(self) -> tuple[int, ...]:
        return tuple(n + 2 * p for n, p in zip(self.size, self.pad, strict=True))

    def crop(self) -> tuple[slice, ...]:
        return tuple(slice(p, p + n) for p, n in zip(self.pad, self.size, strict=True))


def cols(cx: Any, x: Any, geo: Geo) -> Any:
    """(N, C, K, O...) windows of the zero-padded input."""
    s = shapes.shape(x)
    xp = x
    if any(geo.pad):
        zeros = cx.ar.asarray(np.zeros((*s[:2], *geo.padded_shape())))
        xp = shapes.place(zeros, x, (slice(None), slice(None), *geo.crop()))
    return shapes.stack([shapes.index(xp, (..., *idx)) for idx in geo.offsets()], 2)


def uncols(cx: Any, c: Any, n: int, ch: int, geo: Geo) -> Any:
    """The adjoint of :func:`cols`: each offset placed in zeros, summed in offset order, the
    padding cropped."""
    zeros = cx.ar.asarray(np.zeros((n, ch, *geo.padded_shape())))
    total = None
    for i, idx in enumerate(geo.offsets()):
        part = shapes.place(zeros, shapes.index(c, (slice(None), slice(None), i)), (..., *idx))
        total = part if total is None else cx.ar.add(total, part)
    return shapes.index(total, (slice(None), slice(None), *geo.crop()))


def _flat_cols(c: Any, g: int, cg: int) -> Any:
    """Group ``g``'s windows as (C_g K, N O...)."""
    s = shapes.shape(c)
    xg = shapes.index(c, (slice(None), slice(g * cg, (g + 1) * cg)))
    xg = shapes.permute(xg, (1, 2, 0, *range(3, len(s))))
    return shapes.reshape(xg, (cg * s[2], -1))


def _flat_w(w: Any, g: int, og: int) -> Any:
    """Group ``g``'s weight as (O_g, C_g K)."""
    return shapes.reshape(shapes.index(w, (slice(g * og, (g + 1) * og),)), (og, -1))


def _flat_out(y: Any, g: int, og: int) -> Any:
    """Group ``g``'s channels of (N, O, O...) as (O_g, N O...)."""
    s = shapes.shape(y)
    yg = shapes.index(y, (slice(None), slice(g * og, (g + 1) * og)))
    return shapes.reshape(shapes.permute(yg, (1, 0, *range(2, len(s)))), (og, -1))


def conv(cx: Any, x: Any, w: Any, geo: Geo, groups: int) -> Any:
    """``A_w x``: (N, O, O...) without bias."""
    ar = cx.ar
    n, c = shapes.shape(x)[:2]
    o = shapes.shape(w)[0]
    cg, og = c // groups, o // groups
    cl = cols(cx, x, geo)
    outs = [shapes.reshape(ar.matmul(_flat_w(w, g, og), _flat_cols(cl, g, cg)), (og, n, *geo.out))
            for g in range(groups)]  # fmt: skip
    return shapes.permute(shapes.cat(outs, 0), (1, 0, *range(2, 2 + len(geo.out))))


def conv_adjoint(cx: Any, y: Any, w: Any, geo: Geo, groups: int, c: int) -> Any:
    """``A_w^T y`` for ``y`` (N, O, O...): (N, C, size...)."""
    ar = cx.ar
    n, o = shapes.shape(y)[:2]
    cg, og = c // groups, o // groups
    parts = []
    for g in range(groups):
        d = ar.matmul(shapes.transpose(_flat_w(w, g, og), 0, 1), _flat_out(y, g, og))
        d = shapes.reshape(d, (cg, geo.kk, n, *geo.out))
        parts.append(shapes.permute(d, (2, 0, 1, *range(3, 3 + len(geo.out)))))
    return uncols(cx, shapes.cat(parts, 1), n, c, geo)


def conv_weight_grad(cx: Any, x: Any, gy: Any, geo: Geo, groups: int, w_shape: Any) -> Any:
    """The gradient of ``<gy, A_w x>`` in ``w``: per group ``G_g cols_g^T``."""
    c, o = shapes.shape(x)[1], shapes.shape(gy)[1]
    cg, og = c // groups, o // groups
    cl = cols(cx, x, geo)
    parts = [cx.ar.matmul(_flat_out(gy, g, og), shapes.transpose(_flat_cols(cl, g, cg), 0, 1))
             for g in range(groups)]  # fmt: skip
    return shapes.reshape(shapes.cat(parts, 0), w_shape)


def _transposed_geo(x_shape: Any, w_shape: Any, stride: Any, padding: Any, dilation: Any,
                    output_padding: Any) -> Geo:  # fmt: skip
    """The geometry of ``A_w`` whose input has the transposed convolution's output size."""
    d = len(x_shape) - 2
    st, pd, dl = _tuple(stride, d), _tuple(padding, d), _tuple(dilation, d)
    op_ = _tuple(output_padding, d)
    k = tuple(int(v) for v in w_shape[2:])
    size = tuple((n - 1) * s - 2 * p + q * (kk - 1) + e + 1 for n, s, p, q, kk, e in
                 zip(x_shape[2:], st, pd, dl, k, op_, strict=True))  # fmt: skip
    geo = Geo(size, k, st, pd, dl)
    if geo.out != tuple(x_shape[2:]):
        raise InputError(f"transposed convolution geometry {geo.out} != {tuple(x_shape[2:])}")
    return geo


def _bias(cx: Any, out: Any, b: Any) -> Any:
    if b is None:
        return out
    s = shapes.shape(out)
    return cx.ar.add(out, shapes.reshape(b, (1, s[1], *(1,) * (len(s) - 2))))


def convolution(cx: Any, x: Any, w: Any, b: Any, stride: Any, padding: Any, dilation: Any,
                transposed: bool, output_padding: Any, groups: int) -> Any:  # fmt: skip
    """aten.convolution for a transposed convolution (1-3 spatial axes) or a 3-D one."""
    xs, ws = shapes.shape(x), shapes.shape(w)
    if len(xs) not in (3, 4, 5) or len(ws) != len(xs):
        raise InputError(f"{cx.label()}: convolution of a {len(xs)}-D input is not supported")
    groups = int(groups)
    if not transposed:
        geo = Geo(xs[2:], ws[2:], stride, padding, dilation)
        return _bias(cx, conv(cx, x, w, geo, groups), b)
    geo = _transposed_geo(xs, ws, stride, padding, dilation, output_padding)
    c_out = ws[1] * groups
    return _bias(cx, conv_adjoint(cx, x, w, geo, groups, c_out), b)


def convolution_backward(cx: Any, g: Any, x: Any, w: Any, bias_sizes: Any, stride: Any,
                         padding: Any, dilation: Any, transposed: bool, output_padding: Any,
                         groups: int, mask: Any) -> tuple:  # fmt: skip
    """(dx, dw, db) of :func:`convolution`."""
    xs, ws = shapes.shape(x), shapes.shape(w)
    groups = int(groups)
    dx = dw = db = None
    if transposed:
        geo = _transposed_geo(xs, ws, stride, padding, dilation, output_padding)
        if mask[0]:
            dx = conv(cx, g, w, geo, groups)
        if mask[1]:
            dw = conv_weight_grad(cx, g, x, geo, groups, ws)
    else:
        geo = Geo(xs[2:], ws[2:], stride, padding, dilation)
        if mask[0]:
            dx = conv_adjoint(cx, g, w, geo, groups, xs[1])
        if mask[1]:
            dw = conv_weight_grad(cx, x, g, geo, groups, ws)
    if mask[2]:
        db = sum_dims(cx, g, [0, *range(2, len(xs))], False)
    return dx, dw, db
