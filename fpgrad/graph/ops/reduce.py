"""Sums, means and variances over dimensions."""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

import numpy as np
from torch import fx

from fpgrad.arith.base import ExactDerivatives
from fpgrad.graph.ops._util import count, exact_count, feeds_forward_outputs, sum_dims
from fpgrad.graph.ops.registry import op


@op("aten.sum.dim_IntList")
def sum_dim(cx: Any, x: Any, dims: Any, keepdim: bool = False, dtype: Any = None) -> Any:
    """Sum over ``dims``; a mask or integer array sums in int64, exactly (as torch)."""
    if isinstance(x, np.ndarray) and x.dtype.kind in "biu":
        axes = None if dims is None or len(dims) == 0 else tuple(int(d) for d in dims)
        return np.asarray(np.sum(x, axis=axes, keepdims=keepdim, dtype=np.int64))
    return sum_dims(cx, x, dims, keepdim)


@op("aten.sum.default")
def sum_all(cx: Any, x: Any, dtype: Any = None) -> Any:
    if isinstance(x, np.ndarray) and x.dtype.kind in "biu":
        return np.asarray(np.sum(x, dtype=np.int64))
    return sum_dims(cx, x, None, False)


@op("aten.mean.dim")
def mean_dim(cx: Any, x: Any, dims: Any, keepdim: bool = False, dtype: Any = None) -> Any:
    return cx.ar.div(sum_dims(cx, x, dims, keepdim), exact_count(cx.ar, count(x, dims)))


@op("aten.mean.default")
def mean_all(cx: Any, x: Any, dtype: Any = None) -> Any:
    return cx.ar.div(sum_dims(cx, x, None, False), exact_count(cx.ar, count(x, None)))


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
    mean = ar.div(sum_dims(cx, x, dims, True), exact_count(ar, n))
    d = ar.sub(x, mean)
    return ar.div(sum_dims(cx, ar.mul(d, d), dims, keepdim), dof(cx, n, c))


def dof(cx: Any, n: int, c: float) -> Any:
    """``n - c`` as a constant of the system: exact in the exact systems (a fractional
    correction makes torch's float64 ``n - c`` a rounding), torch's float64 value elsewhere."""
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        return ar.sub(ar.const(float(n)), ar.const(float(c)))
    return exact_count(ar, float(n - c))


_BACKWARD: WeakKeyDictionary[fx.Graph, set[fx.Node]] = WeakKeyDictionary()


def backward_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes computed from the loss (the graph's first output): the autograd backward.
    A forward node never reads the loss, so a user's own constant is never among them."""
    if graph not in _BACKWARD:
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        loss = out.args[0][0]
        seen: set[fx.Node] = set()
        stack = list(loss.users)
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(node.users)
        _BACKWARD[graph] = seen
    return _BACKWARD[graph]


def var_backward_divisor(cx: Any, scale: float) -> tuple[int, float] | None:
    """``(n, correction)`` when the node is var's backward scale: an ``aten.mul.Scalar(g,
    scale)`` of the backward (it reads the loss; torch's Python ``t * 0.5`` traces as
    ``mul.Tensor``), a user multiplies it by ``x - mean(x, dims)``, the graph has
    ``var.correction(x, dims, correction)`` (or ``std.correction``: std's backward scales by
    the same constant) and ``scale == 2 / (n - correction)`` as torch
    computes it in float64; else None.

    That ``x - mean`` must be the backward's own (it reaches no forward output): autograd
    emits a fresh ``sub(x, mean(x))`` only in var's (and std's) formula, so the ``mul.Scalar``
    it multiplies is var's. A forward ``x - mean(x)`` times a backward scale that merely
    equals the float (``torch.add(var(x), d * w, alpha=2/3)`` at n - correction = 3: add's
    backward ``mul.Scalar(g, fl(2/3))`` times d) is the model's own float, not 2/3."""
    if str(cx.node.target) != "aten.mul.Scalar":
        return None
    if cx.node not in backward_nodes(cx.node.graph):
        return None
    for user in cx.node.users:
        if str(user.target) != "aten.mul.Tensor":
            continue
        for dev in user.args:
            if getattr(dev, "target", None) is None or str(dev.target) != "aten.sub.Tensor":
                continue
            x, mean = dev.args
            if str(getattr(mean, "target", "")) not in ("aten.mean.dim", "aten.mean.default"):
                continue
            if mean.args[0] is not x or feeds_forward_outputs(cx, dev):
                continue
            dims = mean.args[1] if len(mean.args) > 1 else None
            for var in x.users:
                if str(var.target) not in ("aten.var.correction", "aten.std.correction"):
                    continue
                vdims = var.args[1] if len(var.args) > 1 else var.kwargs.get("dim")
                if sorted(vdims or []) != sorted(dims or []):
                    continue
                corr = var.kwargs.get("correction", var.args[2] if len(var.args) > 2 else None)
                n, c = count(cx.value(x), vdims), 1.0 if corr is None else float(corr)
                if n - c > 0 and 2.0 / (n - c) == scale:
                    return n, c
    return None
