"""Layer norm, forward and backward; the variance is the mean of squared deviations
(two passes: no ``E[x^2] - E[x]^2`` cancellation)."""

from __future__ import annotations

from typing import Any

from fpgrad.graph import shapes
from fpgrad.graph.ops import op
from fpgrad.graph.ops._util import sum_dims


def _axes(x: Any, normalized: Any) -> list[int]:
    nd = len(shapes.shape(x))
    return list(range(nd - len(normalized), nd))


@op("aten.native_layer_norm.default")
def layer_norm(cx: Any, x: Any, normalized: Any, w: Any, b: Any, eps: float) -> tuple:
    """(y, mean, rstd) with rstd = 1 / sqrt(var + eps), var the biased variance."""
    ar = cx.ar
    axes = _axes(x, normalized)
    n = ar.const(float(_numel(x, axes)))
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
    n = ar.const(float(_numel(x, axes)))
    xhat = ar.mul(ar.sub(x, mean), rstd)
    gw = g if w is None else ar.mul(g, w)
    m1 = ar.div(sum_dims(cx, gw, axes, True), n)
    m2 = ar.div(sum_dims(cx, ar.mul(gw, xhat), axes, True), n)
    dx = ar.mul(rstd, ar.sub(ar.sub(gw, m1), ar.mul(xhat, m2))) if mask[0] else None
    dw = sum_dims(cx, ar.mul(g, xhat), lead, False) if (w is not None and mask[1]) else None
    db = sum_dims(cx, g, lead, False) if (b is not None and mask[2]) else None
    return dx, dw, db
