"""Softmax, log-softmax, NLL and MSE, forward and backward.

The log-softmax backward fed by an NLL backward (cross-entropy) is computed as
``c * w[t] * (p * sum(t) - t)`` through the system's ``xent_grad`` slot, from the logits: the
exact systems write ``p_k - 1`` as ``-sum_{j != k} p_j``, so a saturated softmax never
cancels to 0; the log-softmax itself as ``(z - z_k) - log1p(sum_{j != k} e^(z_j - z_k))``.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from fpgrad.arith.base import ExactDerivatives
from fpgrad.graph import shapes
from fpgrad.graph.ops._util import exact_count, sum_dims
from fpgrad.graph.ops.pointwise import NegInfMasked, masked_softmax
from fpgrad.graph.ops.registry import op

REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


#: id(an exact log-softmax's output) -> (exp(z - z_k), 1 + sum_{j != k} exp(z_j - z_k)) from
#: its forward, while that output lives; kept for systems with ``reuse_softmax`` (Arb balls,
#: whose exponentials cost most): the cross-entropy backward divides them instead of
#: computing exp(z - max z) and its sum again (the same softmax: it is shift-invariant)
_SOFTMAX_PARTS: dict[int, tuple[Any, Any]] = {}


def _remember(out: Any, parts: tuple[Any, Any]) -> None:
    key = id(out)
    _SOFTMAX_PARTS[key] = parts
    weakref.finalize(out, _SOFTMAX_PARTS.pop, key, None)


def _shifted_exp(cx: Any, z: Any, dim: int) -> tuple[Any, Any]:
    """(exp(z - max z), its sum over ``dim``, kept)."""
    ar = cx.ar
    e = ar.exp(ar.sub(z, ar.max(z, axis=dim, keepdims=True)))
    return e, ar.sum(e, axis=dim, keepdims=True)


@op("aten._softmax.default")
def softmax(cx: Any, z: Any, dim: int, half_to_float: bool = False) -> Any:
    if isinstance(z, NegInfMasked):
        return masked_softmax(cx, z, dim % len(z.mask.shape))
    e, total = _shifted_exp(cx, z, dim)
    return cx.ar.div(e, total)


@op("aten._softmax_backward_data.default")
def softmax_backward(cx: Any, grad: Any, out: Any, dim: int, dtype: Any = None) -> Any:
    """p * (g - sum(g * p))."""
    ar = cx.ar
    dot = ar.sum(ar.mul(grad, out), axis=dim, keepdims=True)
    return ar.mul(out, ar.sub(grad, dot))


@op("aten._log_softmax.default")
def log_softmax(cx: Any, z: Any, dim: int, half_to_float: bool = False) -> Any:
    """``z - max - log(sum exp(z - max))``; in the exact systems ``z - z_k - log1p(sum_{j != k}
    exp(z_j - z_k))`` with ``z_k`` a largest element (by midpoint, the first of ties): the same
    value for any k, and no ``log`` of ``1 + tiny`` where the softmax saturates."""
    ar = cx.ar
    if getattr(ar, "exact", False) and not isinstance(z, NegInfMasked):
        mid = ar.to_float64(z)
        hot = np.zeros(mid.shape, dtype=bool)
        np.put_along_axis(hot, np.expand_dims(np.argmax(mid, axis=dim), dim), True, axis=dim)
        zk = ar.sum(ar.mul(z, ar.asarray(hot.astype(np.float64))), axis=dim, keepdims=True)
        shifted = ar.sub(z, zk)
        shifted = ar.where(hot, ar.mul(shifted, ar.const(0.0)), shifted)  # exactly 0 at k
        e = ar.exp(shifted)
        others = ar.sum(ar.mul(e, ar.asarray((~hot).astype(np.float64))), axis=dim, keepdims=True)
        out = ar.sub(shifted, ar.log1p(others))
        if getattr(ar, "reuse_softmax", False) and dim % len(shapes.shape(z)) == 1:
            _remember(out, (e, ar.add(ar.const(1.0), others)))  # e is exactly 1 at k
        return out
    m = ar.max(z, axis=dim, keepdims=True)
    shifted = ar.sub(z, m)
    total = ar.sum(ar.exp(shifted), axis=dim, keepdims=True)
    return ar.sub(shifted, ar.log(total))


@op("aten._log_softmax_backward_data.default")
def log_softmax_backward(cx: Any, grad: Any, out: Any, dim: int, dtype: Any = None) -> Any:
    """g - exp(out) * sum(g), torch's formula; in the exact systems, fed by an NLL backward:
    ``c * w[t] * xent_grad`` (no cancellation where the softmax saturates)."""
    ar = cx.ar
    src, ls = cx.origin(0), cx.origin(1)
    nd = len(shapes.shape(out))
    if (
        isinstance(ar, ExactDerivatives)
        and src is not None
        and ls is not None
        and str(src.target) == "aten.nll_loss_backward.default"
        and str(ls.target) == "aten._log_softmax.default"
        and nd == 2
        and dim % nd == 1
    ):
        go = cx.value(src.args[0])
        target = np.asarray(cx.value(src.args[2]))
        reduction, ignore = int(src.args[4]), int(src.args[5])
        t = _onehot(target, ignore, shapes.shape(out)[1])
        parts = _SOFTMAX_PARTS.get(id(cx.value(ls)))
        e, total = parts if parts is not None else _shifted_exp(cx, cx.value(ls.args[0]), 1)
        c = go if reduction != 1 else ar.div(go, cx.value(src.args[6]))
        if reduction == 0:  # "none": one upstream gradient per row, not per class
            c = shapes.reshape(c, (-1, 1))
        grad = ar.xent_grad(e, total, t)
        if src.args[3] is not None:  # class weights: w[t_i] times the unweighted row
            rows = _weights(cx, target, cx.value(src.args[3]), ignore)
            grad = ar.mul(grad, shapes.reshape(rows, (-1, 1)))
        return ar.mul(grad, c)
    return ar.sub(grad, ar.mul(ar.exp(out), ar.sum(grad, axis=dim, keepdims=True)))


def _onehot(target: np.ndarray, ignore: int, classes: int) -> np.ndarray:
    t = np.zeros((target.size, classes))
    keep = target != ignore
    t[np.flatnonzero(keep), target[keep]] = 1.0
    return t


def _weights(cx: Any, target: np.ndarray, weight: Any, ignore: int) -> Any:
    """Per-row weights: weight[target] (1 without weights), 0 where target == ignore_index."""
    keep = (target != ignore).astype(np.float64)
    w = cx.ar.asarray(keep)
    if weight is not None:
        safe = np.where(target != ignore, target, 0)
        w = cx.ar.mul(shapes.index(weight, (safe,)), w)
    return w


@op("aten.nll_loss_forward.default")
def nll_loss_forward(
    cx: Any, logp: Any, target: np.ndarray, weight: Any, reduction: int, ignore: int
) -> tuple[Any, Any]:
    """(loss, total weight) as torch's CPU kernel: "none": ``-logp[i, t_i] * w_i`` (+0 where
    ignored); else ``0 - logp[i, t_i] (* w_i) - ...`` (the sum of the negated picks added to
    0, so a zero loss is +0.0 as torch's), over the total weight for "mean"."""
    ar = cx.ar
    target = np.asarray(target).ravel()
    if len(shapes.shape(logp)) == 1:
        logp = shapes.reshape(logp, (1, -1))
    keep = target != ignore
    safe = np.where(keep, target, 0)
    picked = shapes.index(logp, (np.arange(target.size), safe))
    w = _weights(cx, target, weight, ignore)
    zero = ar.asarray(np.zeros(target.size))
    neg = ar.mul(picked, ar.const(-1.0))  # exact
    total_w = sum_dims(cx, w, None, False)
    if REDUCTIONS[int(reduction)] == "none":
        return ar.where(keep, ar.mul(neg, w) if weight is not None else neg, zero), total_w
    terms = ar.mul(ar.mul(picked, w), ar.const(-1.0)) if weight is not None else neg
    loss = ar.add(ar.const(0.0), sum_dims(cx, ar.where(keep, terms, zero), None, False))
    if REDUCTIONS[int(reduction)] == "mean":
        loss = ar.div(loss, total_w)
    return loss, total_w


@op("aten.nll_loss_backward.default")
def nll_loss_backward(
    cx: Any, go: Any, logp: Any, target: np.ndarray, weight: Any, reduction: int, ignore: int,
    total_w: Any,
) -> Any:  # fmt: skip
    """torch's CPU kernel: ``w_i * -(go / total weight)`` ("mean"; ``-go`` for "sum", ``-w_i *
    go_i`` for "none") at (i, t_i), +0 elsewhere (without weights: no product)."""
    ar = cx.ar
    shape = shapes.shape(logp)
    target = np.asarray(target).ravel()
    n, classes = (1, shape[0]) if len(shape) == 1 else shape
    hot = _onehot(target, ignore, classes) != 0
    if int(reduction) == 0:
        g = shapes.reshape(go, (n, 1))
        if weight is not None:
            w = shapes.reshape(_weights(cx, target, weight, ignore), (n, 1))
            g = ar.mul(ar.mul(w, ar.const(-1.0)), g)
        else:
            g = ar.mul(g, ar.const(-1.0))
    else:
        g = ar.div(go, total_w) if int(reduction) == 1 else go
        g = ar.mul(g, ar.const(-1.0))
        if weight is not None:
            w = shapes.reshape(_weights(cx, target, weight, ignore), (n, 1))
            g = ar.mul(w, g)
    out = ar.where(hot, shapes.expand(g, (n, classes)), ar.asarray(np.zeros((n, classes))))
    return shapes.reshape(out, shape)


@op("aten.mse_loss.default")
def mse_loss(cx: Any, a: Any, b: Any, reduction: int = 1) -> Any:
    ar = cx.ar
    d = ar.sub(a, b)
    sq = ar.mul(d, d)
    if REDUCTIONS[int(reduction)] == "none":
        return sq
    total = sum_dims(cx, sq, None, False)
    if REDUCTIONS[int(reduction)] == "mean":
        total = ar.div(total, exact_count(ar, np.prod(shapes.shape(sq))))
    return total


@op("aten.mse_loss_backward.default")
def mse_loss_backward(cx: Any, grad: Any, a: Any, b: Any, reduction: int) -> Any:
    """torch's CPU kernel: ``norm * (a - b) * grad``, norm = 2 / numel ("mean", the float64
    quotient held in the format) or 2; the exact systems: 2 (a - b) grad / numel."""
    ar = cx.ar
    mean = REDUCTIONS[int(reduction)] == "mean"
    count = float(np.prod(shapes.shape(a)))
    if isinstance(ar, ExactDerivatives):  # the exact rational 2 / numel
        g = ar.mul(ar.mul(ar.sub(a, b), ar.const(2.0)), grad)
        return ar.div(g, ar.const(count)) if mean else g
    return ar.mul(ar.mul(ar.const(2.0 / count if mean else 2.0), ar.sub(a, b)), grad)


def _reduce(cx: Any, terms: Any, reduction: int) -> Any:
    if REDUCTIONS[int(reduction)] == "none":
        return terms
    total = sum_dims(cx, terms, None, False)
    if REDUCTIONS[int(reduction)] == "mean":
        total = cx.ar.div(total, exact_count(cx.ar, np.prod(shapes.shape(terms))))
    return total


@op("aten.binary_cross_entropy_with_logits.default")
def bce_with_logits(
    cx: Any, x: Any, t: Any, weight: Any = None, pos_weight: Any = None, reduction: int = 1
) -> Any:
    """(1 - t) x + l softplus(-x), softplus(-x) = log(1 + exp(-|x|)) + max(-x, 0), with
    l = 1 + (pos_weight - 1) t (1 without pos_weight); a strict machine rounds torch's own
    sequence, :func:`bce_terms_torch`."""
    ar = cx.ar
    if not isinstance(ar, ExactDerivatives):
        return _reduce(cx, bce_terms_torch(ar, x, t, weight, pos_weight), reduction)
    neg = ar.mul(x, ar.const(-1.0))
    zero = ar.asarray(np.zeros(shapes.shape(x)))
    soft = ar.add(
        ar.log(ar.add(ar.const(1.0), ar.exp(ar.mul(ar.abs(x), ar.const(-1.0))))),
        ar.where(ar.positive(neg), neg, zero),
    )
    if pos_weight is not None:
        soft = ar.mul(soft, ar.add(ar.mul(ar.sub(pos_weight, ar.const(1.0)), t), ar.const(1.0)))
    terms = ar.add(ar.mul(ar.sub(ar.const(1.0), t), x), soft)
    if weight is not None:
        terms = ar.mul(terms, weight)
    return _reduce(cx, terms, reduction)


@op("aten.huber_loss.default")
def huber_loss(cx: Any, x: Any, t: Any, reduction: int = 1, delta: float = 1.0) -> Any:
    """d^2 / 2 where |d| < delta, else delta (|d| - delta / 2); d = x - t."""
    ar = cx.ar
    d = ar.sub(x, t)
    ad = ar.abs(d)
    dl = ar.const(float(delta))
    small = ar.positive(ar.sub(dl, ad))
    quad = ar.mul(ar.mul(d, d), ar.const(0.5))
    lin = ar.mul(dl, ar.sub(ad, ar.mul(dl, ar.const(0.5))))
    return _reduce(cx, ar.where(small, quad, lin), reduction)


@op("aten.huber_loss_backward.default")
def huber_loss_backward(cx: Any, g: Any, x: Any, t: Any, reduction: int, delta: float) -> Any:
    """g * clamp(d, -delta, delta) (/ numel for "mean")."""
    ar = cx.ar
    d = ar.sub(x, t)
    dl = ar.const(float(delta))
    small = ar.positive(ar.sub(dl, ar.abs(d)))
    pos = ar.positive(d)
    full = np.full(shapes.shape(d), float(delta))
    clamp = ar.where(small, d, ar.where(pos, ar.asarray(full), ar.asarray(-full)))
    out = ar.mul(clamp, g)
    if REDUCTIONS[int(reduction)] == "mean":
        out = ar.div(out, exact_count(ar, np.prod(shapes.shape(x))))
    return out


def bce_terms_torch(ar: Any, x: Any, t: Any, weight: Any = None, pos_weight: Any = None) -> Any:
    """torch's CPU sequence for BCE with logits, each operation rounded: ``(1 - t) * x -
    l * log_sigmoid(x)``, log_sigmoid(x) = ``min(x, 0) - log1p(exp(-|x|))``, l = ``(pos_weight
    - 1) * t + 1``, then ``* weight``."""
    v = np.asarray(x, dtype=np.float64)
    low = ar.where(v > 0, ar.asarray(np.zeros(v.shape)), x)  # std::min(x, 0): -0, NaN kept
    logsig = ar.sub(low, ar.log1p(ar.exp(ar.mul(ar.abs(x), ar.const(-1.0)))))
    if pos_weight is not None:
        logsig = ar.mul(ar.add(ar.mul(ar.sub(pos_weight, ar.const(1.0)), t), ar.const(1.0)), logsig)
    terms = ar.sub(ar.mul(ar.sub(ar.const(1.0), t), x), logsig)
    return terms if weight is None else ar.mul(terms, weight)
