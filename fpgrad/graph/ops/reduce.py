"""Sums, means and variances over dimensions."""

from __future__ import annotations

from typing import Any

from fpgrad.graph.ops._util import count, sum_dims
from fpgrad.graph.ops.registry import op


@op("aten.sum.dim_IntList")
def sum_dim(cx: Any, x: Any, dims: Any, keepdim: bool = False, dtype: Any = None) -> Any:
    return sum_dims(cx, x, dims, keepdim)


@op("aten.sum.default")
def sum_all(cx: Any, x: Any, dtype: Any = None) -> Any:
    return sum_dims(cx, x, None, False)


@op("aten.mean.dim")
def mean_dim(cx: Any, x: Any, dims: Any, keepdim: bool = False, dtype: Any = None) -> Any:
    return cx.ar.div(sum_dims(cx, x, dims, keepdim), cx.ar.const(float(count(x, dims))))


@op("aten.mean.default")
def mean_all(cx: Any, x: Any, dtype: Any = None) -> Any:
    return cx.ar.div(sum_dims(cx, x, None, False), cx.ar.const(float(count(x, None))))


@op("aten.var.correction")
def var(
    cx: Any, x: Any, dims: Any = None, correction: float | None = None, keepdim: bool = False
) -> Any:
    """sum((x - mean)^2) / (n - correction) (two passes: no E[x^2] - E[x]^2 cancellation).
    Its backward is torch's composite formula (mean, sub, mul by torch's float64
    2 / (n - correction)), captured as those ops."""
    ar = cx.ar
    n = count(x, dims)
    c = 1.0 if correction is None else float(correction)
    if n - c <= 0:
        from fpgrad.errors import InputError

        raise InputError(f"{cx.label()}: var of {n} elements with correction {c} divides by "
                         f"{n - c}; use a smaller correction")  # fmt: skip
    mean = ar.div(sum_dims(cx, x, dims, True), ar.const(float(n)))
    d = ar.sub(x, mean)
    return ar.div(sum_dims(cx, ar.mul(d, d), dims, keepdim), ar.const(float(n - c)))


def var_backward_divisor(cx: Any, scale: float) -> float | None:
    """``n - correction`` when the node (``mul.Scalar(g, scale)``) is var's backward scale:
    a user multiplies it by ``x - mean(x, dims)``, the graph has ``var.correction(x, dims,
    correction)`` and ``scale == 2 / (n - correction)`` in float64; else None."""
    for user in cx.node.users:
        if str(user.target) != "aten.mul.Tensor":
            continue
        for dev in user.args:
            if getattr(dev, "target", None) is None or str(dev.target) != "aten.sub.Tensor":
                continue
            x, mean = dev.args
            if str(getattr(mean, "target", "")) not in ("aten.mean.dim", "aten.mean.default"):
                continue
            if mean.args[0] is not x:
                continue
            dims = mean.args[1] if len(mean.args) > 1 else None
            for var in x.users:
                if str(var.target) != "aten.var.correction":
                    continue
                vdims = var.args[1] if len(var.args) > 1 else var.kwargs.get("dim")
                if sorted(vdims or []) != sorted(dims or []):
                    continue
                corr = var.kwargs.get("correction", var.args[2] if len(var.args) > 2 else None)
                n = count(cx.value(x), vdims) - (1.0 if corr is None else float(corr))
                if n > 0 and 2.0 / n == scale:
                    return float(n)
    return None
