"""Reductions and normalisations: group norm, vector norms, std, logsumexp, GLU, and the
in-place scalar add and the exact ``== c`` test their traced forms read.

Group norm reuses layer norm's two-pass form (:mod:`fpgrad.graph.ops.norm`); ``std`` is the
square root of :func:`fpgrad.graph.ops.reduce.var`; RMSNorm is traced by torch as ``pow``,
``mean``, ``add_`` (in place, on a fresh temporary) and ``rsqrt``, all slots.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

import numpy as np
from torch import fx

from fpgrad.arith.base import ExactDerivatives
from fpgrad.graph import shapes
from fpgrad.graph.names import origin as _through
from fpgrad.graph.ops._util import exact_count, sum_dims
from fpgrad.graph.ops.registry import OPS, op


def _refuse(cx: Any, what: str) -> NoReturn:
    from fpgrad.errors import InputError

    raise InputError(f"{cx.label()}: {what}")


# ---- group norm ----------------------------------------------------------------------------
def _groups(x: Any, n: int, c: int, hw: int, g: int) -> tuple[Any, Any]:
    """``x`` of shape (N, C, *) as (N, G, C/G * HxW) and as (N, C, HxW)."""
    return shapes.reshape(x, (n, g, (c // g) * hw)), shapes.reshape(x, (n, c, hw))


def _channel(v: Any, c: int) -> Any:
    """A per-channel vector (C,) as (1, C, 1)."""
    return shapes.reshape(v, (1, c, 1))


@op("aten.native_group_norm.default")
def group_norm(
    cx: Any, x: Any, w: Any, b: Any, n: int, c: int, hw: int, g: int, eps: float
) -> tuple:
    """(y, mean, rstd), mean and rstd of shape (N, G): per sample and group of C/G channels,
    rstd = 1 / sqrt(var + eps), var the biased variance (two passes, as layer norm);
    y = (x - mean) rstd w + b per channel."""
    ar = cx.ar
    n, c, hw, g = int(n), int(c), int(hw), int(g)
    xg, _ = _groups(x, n, c, hw, g)
    cnt = exact_count(ar, (c // g) * hw)
    mean = ar.div(sum_dims(cx, xg, [2], True), cnt)
    xc = ar.sub(xg, mean)
    var = ar.div(sum_dims(cx, ar.mul(xc, xc), [2], True), cnt)
    rstd = ar.div(ar.const(1.0), ar.sqrt(ar.add(var, ar.const(float(eps)))))
    y = shapes.reshape(ar.mul(xc, rstd), (n, c, hw))
    if w is not None:
        y = ar.mul(y, _channel(w, c))
    if b is not None:
        y = ar.add(y, _channel(b, c))
    return (
        shapes.reshape(y, shapes.shape(x)),
        shapes.reshape(mean, (n, g)),
        shapes.reshape(rstd, (n, g)),
    )


@op("aten.native_group_norm_backward.default")
def group_norm_backward(
    cx: Any, gy: Any, x: Any, mean: Any, rstd: Any, w: Any, n: int, c: int, hw: int, g: int,
    mask: Any,
) -> tuple:  # fmt: skip
    """Per group: dx = rstd (gw - mean(gw) - xhat mean(gw xhat)), gw = g w (per channel);
    dw = sum over samples and space of g xhat; db = sum of g."""
    ar = cx.ar
    n, c, hw, g = int(n), int(c), int(hw), int(g)
    xg, _ = _groups(x, n, c, hw, g)
    mean3, rstd3 = shapes.reshape(mean, (n, g, 1)), shapes.reshape(rstd, (n, g, 1))
    xhat = ar.mul(ar.sub(xg, mean3), rstd3)  # (N, G, D)
    _, g3 = _groups(gy, n, c, hw, g)  # (N, C, HxW)
    gw3 = g3 if w is None else ar.mul(g3, _channel(w, c))
    gw = shapes.reshape(gw3, (n, g, (c // g) * hw))
    cnt = exact_count(ar, (c // g) * hw)
    dx = dw = db = None
    if mask[0]:
        m1 = ar.div(sum_dims(cx, gw, [2], True), cnt)
        m2 = ar.div(sum_dims(cx, ar.mul(gw, xhat), [2], True), cnt)
        dx = ar.mul(rstd3, ar.sub(ar.sub(gw, m1), ar.mul(xhat, m2)))
        dx = shapes.reshape(dx, shapes.shape(x))
    if w is not None and mask[1]:
        xh3 = shapes.reshape(xhat, (n, c, hw))
        dw = sum_dims(cx, ar.mul(g3, xh3), [0, 2], False)
    if mask[2]:
        db = sum_dims(cx, g3, [0, 2], False)
    return dx, dw, db


# ---- vector norms, std ---------------------------------------------------------------------
def _max_dims(cx: Any, x: Any, dims: Any, keepdim: bool) -> Any:
    """The maximum over ``dims`` (None or empty: all), one slot call per axis."""
    nd = len(shapes.shape(x))
    if nd == 0:
        return x
    axes = range(nd) if dims is None or len(dims) == 0 else dims
    axes = sorted({int(d) % nd for d in axes}, reverse=True)
    out = x
    for a in axes:
        out = cx.ar.max(out, axis=a, keepdims=True)
    if not keepdim:
        out = shapes.reshape(out, [s for i, s in enumerate(shapes.shape(out)) if i not in axes])
    return out


@op("aten.linalg_vector_norm.default")
def vector_norm(
    cx: Any, x: Any, ord: float = 2, dim: Any = None, keepdim: bool = False, dtype: Any = None
) -> Any:
    """ord 2: sqrt(sum x^2) (no cancellation; exactly 0 for a row of exact zeros); ord 1:
    sum |x|; ord inf: max |x| (exact). Other orders are refused."""
    ar = cx.ar
    p = float(ord)
    if p == 2:
        return ar.sqrt(sum_dims(cx, ar.mul(x, x), dim, keepdim))
    if p == 1:
        return sum_dims(cx, ar.abs(x), dim, keepdim)
    if p == math.inf:
        return _max_dims(cx, ar.abs(x), dim, keepdim)
    _refuse(cx, f"vector norm of order {ord} is not supported (orders 1, 2 and inf are)")


@op("aten.std.correction")
def std(
    cx: Any, x: Any, dims: Any = None, correction: float | None = None, keepdim: bool = False
) -> Any:
    """sqrt(var) (:func:`~fpgrad.graph.ops.reduce.var`, two passes). Its backward divides by
    ``2 std`` and masks ``std == 0`` (:func:`eq_scalar`); the ``2 / (n - correction)`` there is
    read as that rational by the exact systems, as var's."""
    from fpgrad.graph.ops.reduce import var

    return cx.ar.sqrt(var(cx, x, dims, correction, keepdim))


@op("aten.var_mean.correction")
def var_mean(
    cx: Any, x: Any, dims: Any = None, correction: float | None = None, keepdim: bool = False
) -> tuple[Any, Any]:
    """(var, mean) as :func:`~fpgrad.graph.ops.reduce.var` and ``mean.dim`` compute them."""
    from fpgrad.graph.ops.reduce import mean_dim, var

    return var(cx, x, dims, correction, keepdim), mean_dim(cx, x, dims, keepdim)


@op("aten.std_mean.correction")
def std_mean(
    cx: Any, x: Any, dims: Any = None, correction: float | None = None, keepdim: bool = False
) -> tuple[Any, Any]:
    from fpgrad.graph.ops.reduce import mean_dim

    return std(cx, x, dims, correction, keepdim), mean_dim(cx, x, dims, keepdim)


def eq_scalar(cx: Any, x: Any, c: float) -> np.ndarray:
    """The boolean mask ``x == c`` (the masked division's test; the ``aten.eq.Scalar`` node
    itself is :mod:`fpgrad.graph.ops.select`'s, which decides the same way). Exact systems: neither ``x - c > 0`` nor ``c - x > 0``,
    both by the system's exact sign test, so a ball exactly at c is equal, one that excludes c
    is not, and one that contains c without being it is undecided (the fast balls count it and
    give way to Arb; Arb's undecided masks never reach a ``where`` of their own, so the run's
    claims are withdrawn: undetermined, never guessed). Other systems: the value, as the
    machine holds it, against c rounded into the system (torch compares in the tensor's
    dtype); NaN equals nothing."""
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        d = x if float(c) == 0 else ar.sub(x, ar.const(float(c)))
        above = np.asarray(ar.positive(d), dtype=bool)
        below = np.asarray(ar.positive(ar.mul(d, ar.const(-1.0))), dtype=bool)
        return ~(above | below)
    ref = np.asarray(ar.const(float(c)), dtype=np.float64)
    return np.asarray(np.asarray(x, dtype=np.float64) == ref)


def _masks_its_zeros(cx: Any) -> bool:
    """Does every reader of this division overwrite its elements where the divisor is 0?
    True when each is a ``masked_fill`` of it by ``eq(s, 0)`` with the divisor ``s`` or
    ``s * c`` (``mul.Scalar``, c finite and non-zero): torch's masked norm and std backward."""
    src, users = cx.origin(1), list(cx.node.users)
    if src is None or not users:
        return False
    for u in users:
        fill = str(u.target) in ("aten.masked_fill.Scalar", "aten.masked_fill_.Scalar")
        m = u.args[1] if fill and u.args[0] is cx.node else None
        if not (isinstance(m, fx.Node) and str(m.target) == "aten.eq.Scalar" and m.args[1] == 0):
            return False
        s = _through(m.args[0])
        scaled = str(src.target) == "aten.mul.Scalar" and _through(src.args[0]) is s
        if not (src is s or (scaled and math.isfinite(src.args[1]) and src.args[1] != 0)):
            return False
    return True


def masked_division(cx: Any, a: Any, b: Any) -> Any | None:
    """``a / b`` in the exact systems where ``b`` is exactly 0 at elements every reader
    overwrites (:func:`_masks_its_zeros`): those elements are 0 instead of a division by 0
    (which the fast balls count as a range error, sending the run to Arb); no other element
    changes. None where this does not apply (the caller divides). ``b == 0`` is decided as
    :func:`eq_scalar` decides it (undecided: escalation, as the ``eq`` node's own)."""
    ar = cx.ar
    if not isinstance(ar, ExactDerivatives) or isinstance(b, (int, float)):
        return None
    if not _masks_its_zeros(cx):
        return None
    zero = eq_scalar(cx, b, 0.0)
    if not zero.any():
        return None
    q = ar.div(a, ar.where(zero, ar.asarray(np.ones(zero.shape)), b))
    shape = shapes.shape(q)
    return ar.where(np.broadcast_to(zero, shape), ar.asarray(np.zeros(shape)), q)


@op("aten.add_.Scalar")
def add_scalar_inplace(cx: Any, a: Any, b: float, alpha: float = 1) -> Any:
    """In-place ``a + alpha b`` (RMSNorm's ``+ eps`` on a fresh mean), as a new value
    (capture refuses in-place ops whose input is read later or through a view)."""
    if isinstance(a, np.ndarray) and a.dtype.kind in "iu":  # an integer buffer (a counter)
        return a + b * alpha
    return OPS["aten.add.Scalar"](cx, a, b, alpha)  # pointwise.add (which imports this module)


# ---- logsumexp, GLU ------------------------------------------------------------------------
@op("aten.logsumexp.default")
def logsumexp(cx: Any, x: Any, dims: Any, keepdim: bool = False) -> Any:
    """m + log(sum exp(x - m)) with m the row maximum: torch's reference form (an infinite
    maximum shifted by 0) in the emulated systems; in the exact ones m is the float64 nearest
    the maximum's midpoint, an exact point (the identity holds for any real m; this one keeps
    every exponent <= about 0 and the sum >= about 1: no overflow, no cancellation in log)."""
    ar = cx.ar
    if not isinstance(dims, (list, tuple)):
        dims = [dims]
    shape = shapes.shape(x)
    if shape and any(shape[int(d) % len(shape)] == 0 for d in (dims or range(len(shape)))):
        _refuse(cx, "logsumexp over an empty dimension (torch: -inf, which the exact reference "
                "cannot hold)")
    top = _max_dims(cx, x, dims, True)
    if isinstance(ar, ExactDerivatives):
        m = ar.asarray(np.asarray(ar.to_float64(top), dtype=np.float64))
    else:
        t = np.asarray(top, dtype=np.float64)
        m = ar.asarray(np.where(np.isinf(t), 0.0, t))
    s = sum_dims(cx, ar.exp(ar.sub(x, m)), dims, keepdim)
    if not keepdim:
        m = shapes.reshape(m, shapes.shape(s))
    return ar.add(ar.log(s), m)


def _halves(x: Any, dim: int) -> tuple[Any, Any, int]:
    nd = len(shapes.shape(x))
    d = int(dim) % nd
    half = shapes.shape(x)[d] // 2
    lo = tuple(slice(None) if i != d else slice(0, half) for i in range(nd))
    hi = tuple(slice(None) if i != d else slice(half, None) for i in range(nd))
    return shapes.index(x, lo), shapes.index(x, hi), d


@op("aten.glu.default")
def glu(cx: Any, x: Any, dim: int = -1) -> Any:
    """a sigmoid(b), a and b the halves of ``x`` along ``dim``."""
    a, b, _ = _halves(x, dim)
    return cx.ar.mul(a, cx.ar.sigmoid(b))


@op("aten.glu_backward.default")
def glu_backward(cx: Any, g: Any, x: Any, dim: int) -> Any:
    """cat(g s, (1 - s) s a g) along ``dim``, s = sigmoid(b) (torch's order); the exact
    systems take s(b) s(-b) for (1 - s) s (the slot ``sigmoid_deriv``: no cancellation)."""
    ar = cx.ar
    a, b, d = _halves(x, dim)
    s = ar.sigmoid(b)
    second = ar.mul(ar.mul(ar.sigmoid_deriv(b, s), a), g)
    return shapes.cat([ar.mul(s, g), second], d)


@op("aten.isnan.default")
def isnan(cx: Any, x: Any) -> np.ndarray:
    """The mask of NaN elements (the order-inf norm's backward reads it): all False in the exact
    systems, which hold no NaN (a NaN there is a range error, never a value); the values as
    the machine holds them elsewhere."""
    if isinstance(cx.ar, ExactDerivatives):
        return np.zeros(shapes.shape(x), dtype=bool)
    arr = np.asarray(x)
    return np.isnan(arr) if arr.dtype.kind == "f" else np.zeros(arr.shape, dtype=bool)


# ---- weight normalisation (torch.nn.utils.parametrizations.weight_norm) --------------------
def _except_dim(cx: Any, v: Any, g: Any, dim: int) -> Any:
    """The 2-norm of ``v`` over every axis but ``dim`` (all axes for -1), shaped as ``g``:
    sqrt of the system's sum of squares."""
    nd = len(shapes.shape(v))
    axes = list(range(nd)) if dim == -1 else [a for a in range(nd) if a != dim % nd]
    ss = sum_dims(cx, cx.ar.mul(v, v), axes, True)
    return shapes.reshape(cx.ar.sqrt(ss), shapes.shape(g))


@op("aten._weight_norm_interface.default")
def weight_norm(cx: Any, v: Any, g: Any, dim: int = 0) -> tuple[Any, Any]:
    """(w, norms): ``w = v * (g / ||v||)``, the norm over every axis but ``dim``."""
    norms = _except_dim(cx, v, g, dim)
    return cx.ar.mul(v, cx.ar.div(g, norms)), norms


@op("aten._weight_norm_interface_backward.default")
def weight_norm_backward(cx: Any, grad_w: Any, v: Any, g: Any, norms: Any, dim: int = 0) -> tuple:
    """torch's ``WeightNormKernel.cpp``: ``grad_g = sum(grad_w v) / norm`` and
    ``grad_v = (g / norm) (grad_w - v grad_g / norm)`` (sums over every axis but ``dim``)."""
    ar = cx.ar
    nd = len(shapes.shape(v))
    axes = list(range(nd)) if dim == -1 else [a for a in range(nd) if a != dim % nd]
    keep = shapes.shape(sum_dims(cx, v, axes, True))
    n = shapes.reshape(norms, keep)
    grad_g = ar.div(sum_dims(cx, ar.mul(grad_w, v), axes, True), n)
    grad_v = ar.mul(ar.div(shapes.reshape(g, keep), n), ar.sub(grad_w, ar.mul(v, ar.div(grad_g, n))))
    return grad_v, shapes.reshape(grad_g, shapes.shape(g))
