"""Smooth L1, BCE on probabilities, ``xlogy`` (KL divergence) and soft margin, forward and
backward, as torch's CPU kernels define them.

Strict machines (emulated formats) round torch's own sequence of operations (its vectorized
path); the exact systems compute the real value of torch's definition: every branch is an
exact comparison (:meth:`Arith.positive`, ties decided as torch decides them; a ball that
straddles the threshold escalates and ends undetermined at the cap), with cancellation-free
forms where the output saturates (``1 - sigmoid(z)`` as ``sigmoid(-z)``, softplus as
``log1p(exp(-|u|)) + max(u, 0)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.arith.base import ExactDerivatives
from fpgrad.graph import shapes
from fpgrad.graph.ops._util import exact_count
from fpgrad.graph.ops.loss import REDUCTIONS, _reduce, nll_loss_backward, nll_loss_forward
from fpgrad.graph.ops.norms import vector_norm
from fpgrad.graph.ops.registry import OPS, op

#: torch's ``constexpr float EPSILON = 1e-12`` (Loss.cpp), the clamp of BCE's backward
#: denominator: the float32 nearest 1e-12, 9.999999960041972e-13 exactly
BCE_EPSILON = float(np.float32(1e-12))

#: the clamp of BCE's logarithms (``std::max(log(.), -100)``)
LOG_FLOOR = -100.0


def _exact(cx: Any) -> bool:
    return isinstance(cx.ar, ExactDerivatives)


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _full(cx: Any, shape: tuple[int, ...], v: float) -> Any:
    return cx.ar.asarray(np.full(shape, v))


def _numel(x: Any) -> float:
    return float(np.prod(shapes.shape(x)))


def _mean_norm(cx: Any, out: Any, x: Any, reduction: int) -> Any:
    """``out / numel(x)`` for "mean" in the exact systems (the exact rational)."""
    if REDUCTIONS[int(reduction)] == "mean":
        return cx.ar.div(out, cx.ar.const(_numel(x)))
    return out


# ---- smooth L1 -----------------------------------------------------------------------------
@op("aten.smooth_l1_loss.default")
def smooth_l1_loss(cx: Any, x: Any, t: Any, reduction: int = 1, beta: float = 1.0) -> Any:
    """z = |x - t|: ``0.5 z z / beta`` where z < beta, else ``z - 0.5 beta`` (z = beta: the
    linear branch, torch's ``z >= beta`` select); beta = 0: ``|x - t|`` (torch's l1_loss)."""
    ar = cx.ar
    z = ar.abs(ar.sub(x, t))
    if float(beta) == 0.0:
        return _reduce(cx, z, reduction)
    b, half = ar.const(float(beta)), ar.const(0.5)
    quad = ar.div(ar.mul(ar.mul(half, z), z), b)
    lin = ar.sub(z, ar.mul(half, b))
    if _exact(cx):
        small = ar.positive(ar.sub(b, z))  # z < beta, decided exactly
    else:
        small = ~(_f64(z) >= _f64(b))  # blendv(quad, lin, z >= beta): NaN takes quad
    return _reduce(cx, ar.where(small, quad, lin), reduction)


@op("aten.smooth_l1_loss_backward.default")
def smooth_l1_loss_backward(
    cx: Any, g: Any, x: Any, t: Any, reduction: int, beta: float
) -> Any:  # fmt: skip
    """``norm * d * g``, d = x - t: d = ``1`` where x - t >= beta, ``-1`` where x - t <= -beta,
    else ``(x - t) / beta`` (ties: the sign, as torch's kernel); norm = 1 / numel ("mean") or
    1. beta <= 0: torch's l1_loss_backward, ``sgn(x - t) * (g / numel)``."""
    ar = cx.ar
    d = ar.sub(x, t)
    shape = shapes.shape(d)
    mean = REDUCTIONS[int(reduction)] == "mean"
    one, neg_one = _full(cx, shape, 1.0), _full(cx, shape, -1.0)
    zero = _full(cx, shape, 0.0)
    if float(beta) <= 0.0:
        if _exact(cx):
            sgn = ar.where(
                ar.positive(d), one, ar.where(ar.positive(ar.sub(zero, d)), neg_one, zero)
            )
            return _mean_norm(cx, ar.mul(sgn, g), x, reduction)
        df = _f64(d)
        sgn = ar.asarray((df > 0).astype(np.float64) - (df < 0).astype(np.float64))
        sgn = ar.where(np.isnan(df), d, sgn)
        return ar.mul(sgn, ar.div(g, ar.const(_numel(x))) if mean else g)
    b = ar.const(float(beta))
    if _exact(cx):
        inner = ar.where(ar.positive(ar.add(d, b)), ar.div(d, b), neg_one)  # x - t > -beta
        deriv = ar.where(ar.positive(ar.sub(b, d)), inner, one)  # x - t < beta
        return _mean_norm(cx, ar.mul(deriv, g), x, reduction)
    df = _f64(d)
    sign = ar.where(df > 0, one, neg_one)
    deriv = ar.where(np.abs(df) >= _f64(b), sign, ar.div(d, b))
    norm = ar.const(1.0 / _numel(x) if mean else 1.0)
    return ar.mul(ar.mul(norm, deriv), g)


# ---- binary cross-entropy on probabilities -------------------------------------------------
def _one_minus(cx: Any, x: Any, i: int) -> Any:
    """1 - x; in the exact systems ``sigmoid(-z)`` when argument ``i`` is ``sigmoid(z)`` (no
    cancellation where the sigmoid saturates at 1: the same real)."""
    ar = cx.ar
    src = cx.origin(i)
    if src is not None and str(src.target) == "aten.sigmoid.default":
        return ar.sigmoid(ar.mul(cx.value(src.args[0]), ar.const(-1.0)))
    return ar.sub(ar.const(1.0), x)


def _clamped_log(cx: Any, v: Any) -> Any:
    """``max(log v, -100)`` exactly: log v > -100 iff v > e^-100 (a real comparison; v =
    e^-100 exactly is impossible for a rational v); the log only where it is taken."""
    ar = cx.ar
    shape = shapes.shape(v)
    above = ar.positive(ar.sub(v, ar.exp(ar.const(LOG_FLOOR))))
    logs = ar.log(ar.where(above, v, _full(cx, shape, 1.0)))
    return ar.where(above, logs, _full(cx, shape, LOG_FLOOR))


def _max_floor(cx: Any, v: Any, floor: Any) -> Any:
    """torch's ``std::max(v, floor)``, ``v < floor ? floor : v`` (NaN keeps v), rounded."""
    vf = _f64(v)
    return cx.ar.where(vf < _f64(floor), cx.ar.asarray(np.full(vf.shape, _f64(floor))), v)


@op("aten.binary_cross_entropy.default")
def binary_cross_entropy(
    cx: Any, x: Any, t: Any, weight: Any = None, reduction: int = 1
) -> Any:  # fmt: skip
    """``(t - 1) max(log1p(-x), -100) - t max(log x, -100)`` (torch's kernel), times weight,
    reduced. x is a probability (torch refuses x outside [0, 1] in eager)."""
    ar = cx.ar
    if _exact(cx):
        log_x = _clamped_log(cx, x)
        log_1mx = _clamped_log(cx, _one_minus(cx, x, 0))
    else:
        floor = ar.const(LOG_FLOOR)
        log_1mx = _max_floor(cx, ar.log1p(ar.mul(x, ar.const(-1.0))), floor)
        log_x = _max_floor(cx, ar.log(x), floor)
    terms = ar.sub(ar.mul(ar.sub(t, ar.const(1.0)), log_1mx), ar.mul(t, log_x))
    if weight is not None:
        terms = ar.mul(terms, weight)
    return _reduce(cx, terms, reduction)


@op("aten.binary_cross_entropy_backward.default")
def binary_cross_entropy_backward(
    cx: Any, g: Any, x: Any, t: Any, weight: Any = None, reduction: int = 1
) -> Any:  # fmt: skip
    """``g (x - t) / max((1 - x) x, EPSILON)`` (torch's kernel, EPSILON the float32 1e-12),
    times weight, over numel for "mean". Exactly: the clamp decided by an exact comparison
    (a tie gives the same value either way), ``1 - x`` as :func:`_one_minus`, and ``x - t``
    as ``(1 - t) - (1 - x)`` where t > 1/2 (the same real, no cancellation at t = 1)."""
    ar = cx.ar
    eps = ar.const(BCE_EPSILON)
    if _exact(cx):
        om = _one_minus(cx, x, 1)
        den = ar.mul(om, x)
        den = ar.where(
            ar.positive(ar.sub(den, eps)), den, _full(cx, shapes.shape(den), BCE_EPSILON)
        )
        near_one = ar.to_float64(t) > 0.5  # either form encloses x - t: no verdict rests on it
        diff = ar.where(near_one, ar.sub(ar.sub(ar.const(1.0), t), om), ar.sub(x, t))
        out = ar.div(ar.mul(g, diff), den)
        if weight is not None:
            out = ar.mul(out, weight)
        return _mean_norm(cx, out, x, reduction)
    den = _max_floor(cx, ar.mul(ar.sub(ar.const(1.0), x), x), eps)
    out = ar.div(ar.mul(g, ar.sub(x, t)), den)
    if weight is not None:
        out = ar.mul(out, weight)
    if REDUCTIONS[int(reduction)] == "mean":
        out = ar.div(out, ar.const(_numel(x)))
    return out


# ---- xlogy (KL divergence) -----------------------------------------------------------------
@op("aten.xlogy.Tensor")
def xlogy(cx: Any, x: Any, y: Any) -> Any:
    """``x log y``, 0 where x = 0 (also for y = 0), NaN where y is NaN (torch's kernel).
    Exactly: x = 0 is decided by two exact comparisons (x > 0, x < 0); the log is taken only
    where x is not 0."""
    ar = cx.ar
    shape = np.broadcast_shapes(shapes.shape(x), shapes.shape(y))
    zero = _full(cx, shape, 0.0)
    if _exact(cx):
        xb = ar.add(x, zero)  # broadcast
        one = _full(cx, shape, 1.0)
        yb = ar.add(y, zero)
        pos = ar.positive(xb)
        neg = ar.positive(ar.sub(zero, xb))
        ys = ar.where(pos, yb, ar.where(neg, yb, one))
        prod = ar.mul(xb, ar.log(ys))
        return ar.where(pos, prod, ar.where(neg, prod, zero))
    xf, yf = np.broadcast_to(_f64(x), shape), np.broadcast_to(_f64(y), shape)
    prod = ar.mul(x, ar.log(y))
    out = ar.where(xf == 0, zero, prod)
    return ar.where(np.isnan(yf), ar.asarray(np.full(shape, np.nan)), out)


# ---- soft margin ---------------------------------------------------------------------------
def _softplus(cx: Any, u: Any) -> Any:
    """log(1 + e^u) = log1p(e^-|u|) + max(u, 0): no overflow, no cancellation."""
    ar = cx.ar
    zero = _full(cx, shapes.shape(u), 0.0)
    return ar.add(
        ar.log1p(ar.exp(ar.mul(ar.abs(u), ar.const(-1.0)))), ar.where(ar.positive(u), u, zero)
    )


@op("aten.soft_margin_loss.default")
def soft_margin_loss(cx: Any, x: Any, t: Any, reduction: int = 1) -> Any:
    """``log1p(exp(-x t))``, reduced (torch's ``neg, mul_, exp_, log1p_``); exactly: the
    softplus of -x t."""
    ar = cx.ar
    u = ar.mul(ar.mul(x, ar.const(-1.0)), t)
    terms = _softplus(cx, u) if _exact(cx) else ar.log1p(ar.exp(u))
    return _reduce(cx, terms, reduction)


@op("aten.soft_margin_loss_backward.default")
def soft_margin_loss_backward(cx: Any, g: Any, x: Any, t: Any, reduction: int) -> Any:
    """torch: z = exp(-t x); ``(t z * -norm) / (z + 1) * g``, norm = 1 / numel ("mean") or 1;
    exactly: ``-t sigmoid(-t x) g / numel`` (no overflow of z)."""
    ar = cx.ar
    mean = REDUCTIONS[int(reduction)] == "mean"
    u = ar.mul(ar.mul(t, ar.const(-1.0)), x)
    if _exact(cx):
        out = ar.mul(ar.mul(ar.mul(t, ar.const(-1.0)), ar.sigmoid(u)), g)
        return _mean_norm(cx, out, x, reduction)
    z = ar.exp(u)
    out = ar.mul(ar.mul(t, z), ar.const(-(1.0 / _numel(x) if mean else 1.0)))
    return ar.mul(ar.div(out, ar.add(z, ar.const(1.0))), g)


# ---- multi-class margin --------------------------------------------------------------------
def _margin_parts(
    cx: Any, x: Any, target: Any, margin: float, weight: Any
) -> tuple[Any, Any, np.ndarray, Any, int]:  # fmt: skip
    """(x as (N, C), z = (margin - x[i, t_i]) + x[i, d], the mask z > 0 off the target, the
    per-row weight w[t_i] (None without weights), C)."""
    ar = cx.ar
    shape = shapes.shape(x)
    x2 = shapes.reshape(x, (1, -1)) if len(shape) == 1 else x
    n, c = shapes.shape(x2)
    tgt = np.asarray(target, dtype=np.int64).ravel()
    if tgt.size != n or (tgt.size and (tgt.min() < 0 or tgt.max() >= c)):
        from fpgrad.errors import InputError

        raise InputError(f"{cx.label()}: multi_margin_loss target out of range")
    picked = shapes.reshape(shapes.index(x2, (np.arange(n), tgt)), (n, 1))
    z = ar.add(ar.sub(ar.const(float(margin)), picked), x2)
    off = np.ones((n, c), dtype=bool)
    off[np.arange(n), tgt] = False
    # z > 0 off the target, decided exactly in the exact systems (z = 0: no term, as torch);
    # at the target z is set to -1 first, so no undecidable ``margin - x_t + x_t`` is asked
    active = ar.positive(ar.where(off, z, _full(cx, (n, c), -1.0)))
    rows = None if weight is None else shapes.reshape(shapes.index(weight, (tgt,)), (n, 1))
    return x2, z, active, rows, c


@op("aten.multi_margin_loss.default")
def multi_margin_loss(
    cx: Any, x: Any, target: Any, p: int = 1, margin: float = 1.0, weight: Any = None,
    reduction: int = 1,
) -> Any:  # fmt: skip
    """Per row: ``sum_{d != t, z > 0} z^p w[t] / C``, z = (margin - x[t]) + x[d] (torch's
    kernel); "mean" over the rows, "sum" of them, "none" per row (p = 1 or 2)."""
    ar = cx.ar
    if int(p) not in (1, 2):
        from fpgrad.errors import InputError

        raise InputError(f"{cx.label()}: multi_margin_loss supports p = 1 and p = 2 only")
    x2, z, active, rows, c = _margin_parts(cx, x, target, margin, weight)
    h = z if int(p) == 1 else ar.mul(z, z)
    if rows is not None:
        h = ar.mul(h, rows)
    h = ar.where(active, h, _full(cx, shapes.shape(z), 0.0))
    per_row = ar.div(ar.sum(h, axis=1), exact_count(ar, c))
    if REDUCTIONS[int(reduction)] == "none":
        return per_row if len(shapes.shape(x)) > 1 else shapes.reshape(per_row, ())
    total = ar.sum(per_row, axis=0)
    if REDUCTIONS[int(reduction)] == "mean":
        total = ar.div(total, exact_count(ar, shapes.shape(x2)[0]))
    return total


@op("aten.multi_margin_loss_backward.default")
def multi_margin_loss_backward(
    cx: Any, go: Any, x: Any, target: Any, p: int, margin: float, weight: Any = None,
    reduction: int = 1,
) -> Any:  # fmt: skip
    """torch's kernel: h = g (p = 1) or ``2 g z`` (p = 2), times w[t]; h at (i, d) where z > 0,
    ``-sum h`` at the target, 0 elsewhere; times the upstream gradient. g = 1 / (N C) ("mean")
    or 1 / C (float64 quotients held in the format; exact rationals in the exact systems)."""
    ar = cx.ar
    x2, z, active, rows, c = _margin_parts(cx, x, target, margin, weight)
    n = shapes.shape(x2)[0]
    mean = REDUCTIONS[int(reduction)] == "mean"
    if _exact(cx):
        g = ar.div(ar.const(1.0), ar.const(float(n * c if mean else c)))
    else:
        g = ar.const(1.0 / (n * c) if mean else 1.0 / c)
    h = _full(cx, shapes.shape(z), 0.0)
    h = ar.add(h, g) if int(p) == 1 else ar.mul(ar.mul(ar.const(2.0), g), z)
    if rows is not None:
        h = ar.mul(h, rows)
    zero = _full(cx, shapes.shape(z), 0.0)
    h = ar.where(active, h, zero)
    hot = np.zeros(shapes.shape(z), dtype=bool)
    hot[np.arange(n), np.asarray(target, dtype=np.int64).ravel()] = True
    at_target = ar.sum(ar.mul(h, ar.const(-1.0)), axis=1, keepdims=True)
    grad = ar.where(hot, ar.add(zero, at_target), h)
    per_row = REDUCTIONS[int(reduction)] == "none" and len(shapes.shape(go)) > 0
    grad = ar.mul(grad, shapes.reshape(go, (n, 1)) if per_row else go)
    return shapes.reshape(grad, shapes.shape(x))


# ---- the other ops the loss traces read ----------------------------------------------------
@op("aten.empty_like.default")
def empty_like(cx: Any, x: Any, **kwargs: Any) -> Any:
    """Zeros of x's shape: torch's contents are arbitrary, and the traces of
    ``hinge_embedding_loss`` and ``cosine_embedding_loss`` fill it (``fill_``) before any read."""
    return _full(cx, shapes.shape(x), 0.0)


@op("aten.fill_.Scalar")
def fill_scalar(cx: Any, x: Any, value: float) -> Any:
    """A tensor of x's shape holding ``value`` (rounded into the system, as torch casts it),
    as a new value (capture refuses in-place ops whose input is read later)."""
    return _full(cx, shapes.shape(x), float(value))


@op("aten.sub_.Tensor")
def sub_inplace(cx: Any, a: Any, b: Any, alpha: float = 1) -> Any:
    """In place ``a - alpha b`` (``1 - cos`` on a filled tensor), as a new value."""
    return OPS["aten.sub.Tensor"](cx, a, b, alpha)


@op("aten.sqrt_.default")
def sqrt_inplace(cx: Any, a: Any) -> Any:
    """In place sqrt (cosine_embedding_loss's denominator), as a new value."""
    return cx.ar.sqrt(a)


@op("aten.norm.ScalarOpt_dim")
def norm_dim(cx: Any, x: Any, p: Any = 2, dim: Any = None, keepdim: bool = False) -> Any:
    """torch.norm over ``dim`` (``F.pairwise_distance``, so ``triplet_margin_loss``): torch
    computes it as ``linalg_vector_norm`` (:func:`fpgrad.graph.ops.norms.vector_norm`; orders
    1, 2 and inf), p = None being 2."""
    return vector_norm(cx, x, 2 if p is None else p, dim, keepdim)


@op("aten.norm.Scalar")
def norm_all(cx: Any, x: Any, p: Any = 2) -> Any:
    """torch.norm of the whole tensor (``x.norm()``; weight_norm with ``dim=None``): as
    ``linalg_vector_norm`` over every axis."""
    return vector_norm(cx, x, p, None, False)


# ---- nll_loss2d (cross-entropy per position: (N, C, H, W) or (N, C, L) logits) ----------------
def _rows(logp: Any) -> Any:
    """(N, C, *S) -> (N * prod(S), C): the class axis last, one row per position."""
    nd = len(shapes.shape(logp))
    moved = shapes.permute(logp, [0, *range(2, nd), 1])
    return shapes.reshape(moved, (-1, shapes.shape(logp)[1]))


@op("aten.nll_loss2d_forward.default")
def nll_loss2d_forward(
    cx: Any, logp: Any, target: np.ndarray, weight: Any, reduction: int, ignore: int
) -> tuple[Any, Any]:
    """``nll_loss_forward`` on the positions as rows (``nn.CrossEntropyLoss`` on segmentation
    or per-time-step logits); "none" gives the (N, H, W) map."""
    t = np.asarray(target)
    loss, total = nll_loss_forward(cx, _rows(logp), t.ravel(), weight, reduction, ignore)
    return (shapes.reshape(loss, t.shape) if int(reduction) == 0 else loss), total


@op("aten.nll_loss2d_backward.default")
def nll_loss2d_backward(
    cx: Any, go: Any, logp: Any, target: np.ndarray, weight: Any, reduction: int, ignore: int,
    total_w: Any,
) -> Any:  # fmt: skip
    """``nll_loss_backward`` on the positions as rows, moved back to (N, C, *S)."""
    shape = shapes.shape(logp)
    g = shapes.reshape(go, (-1,)) if int(reduction) == 0 else go
    rows = nll_loss_backward(cx, g, _rows(logp), np.asarray(target).ravel(), weight, reduction,
                             ignore, total_w)  # fmt: skip
    nd = len(shape)
    moved = shapes.reshape(rows, (shape[0], *shape[2:], shape[1]))
    return shapes.permute(moved, [0, nd - 1, *range(1, nd - 1)])
