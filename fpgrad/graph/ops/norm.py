"""Layer norm, forward and backward; the variance is the mean of squared deviations
(two passes: no ``E[x^2] - E[x]^2`` cancellation)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.graph import shapes
from fpgrad.graph.ops._util import exact_count, sum_dims
from fpgrad.graph.ops.registry import op


def _axes(x: Any, normalized: Any) -> list[int]:
    nd = len(shapes.shape(x))
    return list(range(nd - len(normalized), nd))


@op("aten.native_layer_norm.default")
def layer_norm(cx: Any, x: Any, normalized: Any, w: Any, b: Any, eps: float) -> tuple:
    """(y, mean, rstd) with rstd = 1 / sqrt(var + eps), var the biased variance."""
    ar = cx.ar
    axes = _axes(x, normalized)
    n = exact_count(ar, _numel(x, axes))
    mean = ar.div(sum_dims(cx, x, axes, True), n)
    xc = ar.sub(x, mean)
    var = ar.div(sum_dims(cx, ar.mul(xc, xc), axes, True), n)
    rstd = ar.div(ar.const(1.0), ar.sqrt(ar.add(var, ar.const(float(eps)))))
    y = ar.mul(xc, rstd)
    if w is not None:
        y = ar.mul(y, w)
    if b is not None:
        y = ar.add(y, b)
    return y, mean, rstd


def _numel(x: Any, axes: list[int]) -> int:
    s = shapes.shape(x)
    out = 1
    for a in axes:
        out *= s[a]
    return out


@op("aten.native_layer_norm_backward.default")
def layer_norm_backward(
    cx: Any, g: Any, x: Any, normalized: Any, mean: Any, rstd: Any, w: Any, b: Any, mask: Any
) -> tuple:
    """dx = rstd (gw - mean(gw) - xhat mean(gw xhat)); dw = sum g xhat; db = sum g."""
    ar = cx.ar
    axes = _axes(x, normalized)
    lead = list(range(len(shapes.shape(x)) - len(axes)))
    n = exact_count(ar, _numel(x, axes))
    xhat = ar.mul(ar.sub(x, mean), rstd)
    gw = g if w is None else ar.mul(g, w)
    m1 = ar.div(sum_dims(cx, gw, axes, True), n)
    m2 = ar.div(sum_dims(cx, ar.mul(gw, xhat), axes, True), n)
    dx = ar.mul(rstd, ar.sub(ar.sub(gw, m1), ar.mul(xhat, m2))) if mask[0] else None
    dw = _over(cx, ar.mul(g, xhat), lead) if (w is not None and mask[1]) else None
    db = _over(cx, g, lead) if (b is not None and mask[2]) else None
    return dx, dw, db


def _over(cx: Any, x: Any, lead: list[int]) -> Any:
    """The sum over the ``lead`` axes; none (every axis normalised) is no sum at all, not
    :func:`sum_dims`'s empty-means-all."""
    return sum_dims(cx, x, lead, False) if lead else x


def _channel_axes(x: Any) -> tuple[list[int], tuple[int, ...]]:
    """Axes batch norm reduces over (all but 1) and the shape of per-channel values."""
    nd = len(shapes.shape(x))
    return [a for a in range(nd) if a != 1], (1, shapes.shape(x)[1], *(1,) * (nd - 2))


def _per_channel(v: Any, shape: tuple[int, ...]) -> Any:
    return shapes.reshape(v, shape)


@op("aten.native_batch_norm.default")
def batch_norm(
    cx: Any, x: Any, w: Any, b: Any, rmean: Any, rvar: Any, training: bool, momentum: float,
    eps: float,
) -> tuple:  # fmt: skip
    """(y, batch mean, 1/sqrt(biased var + eps)) in training; running statistics in eval.
    (Running-statistics updates change no gradient and are not computed.)"""
    ar = cx.ar
    axes, cs = _channel_axes(x)
    if training:
        n = exact_count(ar, _numel(x, axes))
        mean = ar.div(sum_dims(cx, x, axes, True), n)
        xc = ar.sub(x, mean)
        var = ar.div(sum_dims(cx, ar.mul(xc, xc), axes, True), n)
    else:
        mean, var = _per_channel(rmean, cs), _per_channel(rvar, cs)
        xc = ar.sub(x, mean)
    rstd = ar.div(ar.const(1.0), ar.sqrt(ar.add(var, ar.const(float(eps)))))
    y = ar.mul(xc, rstd)
    if w is not None:
        y = ar.mul(y, _per_channel(w, cs))
    if b is not None:
        y = ar.add(y, _per_channel(b, cs))
    c = shapes.shape(x)[1]
    return y, shapes.reshape(mean, (c,)), shapes.reshape(rstd, (c,))


@op("aten.native_batch_norm_backward.default")
def batch_norm_backward(
    cx: Any, g: Any, x: Any, w: Any, rmean: Any, rvar: Any, smean: Any, srstd: Any,
    training: bool, eps: float, mask: Any,
) -> tuple:  # fmt: skip
    """Training: dx = rstd (gw - mean(gw) - xhat mean(gw xhat)); eval: dx = g w rstd."""
    ar = cx.ar
    axes, cs = _channel_axes(x)
    if training:
        mean, rstd = _per_channel(smean, cs), _per_channel(srstd, cs)
    else:
        mean = _per_channel(rmean, cs)
        var = _per_channel(rvar, cs)
        rstd = ar.div(ar.const(1.0), ar.sqrt(ar.add(var, ar.const(float(eps)))))
    xhat = ar.mul(ar.sub(x, mean), rstd)
    gw = g if w is None else ar.mul(g, _per_channel(w, cs))
    if training:
        n = exact_count(ar, _numel(x, axes))
        m1 = ar.div(sum_dims(cx, gw, axes, True), n)
        m2 = ar.div(sum_dims(cx, ar.mul(gw, xhat), axes, True), n)
        dx = ar.mul(rstd, ar.sub(ar.sub(gw, m1), ar.mul(xhat, m2)))
    else:
        dx = ar.mul(gw, rstd)
    dw = sum_dims(cx, ar.mul(g, xhat), axes, False) if (w is not None and mask[1]) else None
    db = sum_dims(cx, g, axes, False) if mask[2] else None
    return (dx if mask[0] else None), dw, db


@op("aten.empty.memory_format")
def empty(cx: Any, size: Any, **kwargs: Any) -> Any:
    """An uninitialised tensor (batch norm's unused saved statistics): zeros here."""
    return cx.ar.asarray(np.zeros(tuple(int(s) for s in size)))


@op("aten.add_.Tensor")
def add_inplace(cx: Any, a: Any, b: Any, alpha: float = 1) -> Any:
    """In-place add (batch norm's step counter, a buffer no gradient reads): a new value."""
    if isinstance(a, np.ndarray) and a.dtype.kind in "iu":
        return a + b * alpha
    from fpgrad.graph.ops.pointwise import add

    return add(cx, a, b, alpha)
