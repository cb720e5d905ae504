"""Elementwise ops and their backward ops (cancellation-free where the output saturates)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from torch import fx

from fpgrad.arith.base import ExactDerivatives
from fpgrad.graph import shapes
from fpgrad.graph.ops._util import MissingSlot as MissingSlot  # re-exported: its old home
from fpgrad.graph.ops._util import _slot, above, integers, scalar, zeros
from fpgrad.graph.ops.registry import op


@op("aten.add.Tensor", "aten.add.Scalar")
def add(cx: Any, a: Any, b: Any, alpha: float = 1) -> Any:
    """a + alpha b; a constant additive mask with -inf (``scores + causal``) gives a
    :class:`NegInfMasked` when softmax reads the sum."""
    if integers(a, b, alpha):
        return np.asarray(a, dtype=np.int64) + int(alpha) * np.asarray(b, dtype=np.int64)
    for x, y in ((a, b), (b, a)):
        if (
            isinstance(x, np.ndarray)
            and x.dtype.kind == "f"
            and np.isneginf(x).any()
            and alpha == 1
        ):
            return _add_mask(cx, y, x)
    for x, y in ((a, b), (b, a)):
        if isinstance(x, NegInfMasked) and alpha == 1:
            only_softmax(cx)
            return NegInfMasked(add(cx, x.value, y), x.mask)
    if isinstance(cx.ar, ExactDerivatives) and isinstance(b, int | float):
        from fpgrad.graph.ops.smooth import expm1_plus_one

        found = expm1_plus_one(cx, b, alpha)  # expm1's backward: exp(x), not expm1(x) + 1
        if found is not None:
            return found
    if isinstance(b, float) and alpha == 1 and isinstance(cx.ar, ExactDerivatives):
        from fpgrad.graph.ops.derived import derived_constant

        factor = derived_constant(cx, b)  # label smoothing's eps / C (probability targets)
        if factor is not None:
            return cx.ar.add(scalar(cx, a), factor)
    b = scalar(cx, b)
    if alpha != 1:
        b = cx.ar.mul(b, cx.ar.const(float(alpha)))
    return cx.ar.add(scalar(cx, a), b)


def _data(cx: Any, node: Any) -> np.ndarray | None:
    """The float64 values of an input or target placeholder ``node`` (None for others)."""
    g = cx.graph
    holders = [n for n in g.gm.graph.nodes if n.op == "placeholder"][len(g.param_names) :]
    for holder, value in zip(holders, [*g.inputs, g.targets], strict=False):
        if holder is node:
            arr = np.asarray(value)
            return arr.astype(np.float64) if arr.dtype.kind == "f" else None
    return None


@op("aten.sub.Tensor", "aten.sub.Scalar")
def sub(cx: Any, a: Any, b: Any, alpha: float = 1) -> Any:
    """a - alpha b; in the exact systems ``sigmoid(z) - t`` of data targets (BCE with logits'
    backward) is the system's ``bce_grad`` (``-sigmoid(-z)`` where t = 1: no cancellation)."""
    if integers(a, b, alpha):
        return np.asarray(a, dtype=np.int64) - int(alpha) * np.asarray(b, dtype=np.int64)
    src = cx.origin(0) if isinstance(cx.node.args[0], fx.Node) else None
    if alpha == 1 and isinstance(cx.ar, ExactDerivatives) and src is not None:
        if str(src.target) == "aten.sigmoid.default":
            t = _data(cx, cx.node.args[1])
            if t is not None and t.shape == shapes.shape(a):
                return cx.ar.bce_grad(cx.value(src.args[0]), t)
    b = scalar(cx, b)
    if alpha != 1:
        b = cx.ar.mul(b, cx.ar.const(float(alpha)))
    return cx.ar.sub(scalar(cx, a), b)


@op("aten.rsub.Scalar")
def rsub(cx: Any, a: Any, b: Any, alpha: float = 1) -> Any:
    return sub(cx, b, a, alpha) if alpha == 1 else sub(cx, b, mul(cx, a, alpha))


@op("aten.mul.Tensor", "aten.mul.Scalar")
def mul(cx: Any, a: Any, b: Any) -> Any:
    """a * b; in the exact systems var's backward scale (torch's float64 2 / (n - correction))
    is the rational it rounds: a * 2 / (n - correction), and label smoothing's ``fl(1 - eps)``
    and ``fl(eps / C)`` are ``1 - eps`` and ``eps / C``, nn.MultiheadAttention's
    ``fl(sqrt(1 / d))`` is ``1 / sqrt(d)`` (:mod:`fpgrad.graph.ops.derived`)."""
    if isinstance(b, float) and isinstance(cx.ar, ExactDerivatives):
        from fpgrad.graph.ops.derived import derived_constant
        from fpgrad.graph.ops.reduce import dof, var_backward_divisor

        div = var_backward_divisor(cx, b)
        if div is not None:
            ar = cx.ar
            return ar.div(ar.mul(scalar(cx, a), ar.const(2.0)), dof(cx, *div))
        factor = derived_constant(cx, b)
        if factor is not None:
            return cx.ar.mul(scalar(cx, a), factor)
    return cx.ar.mul(scalar(cx, a), scalar(cx, b))


@op("aten.div.Tensor", "aten.div.Scalar")
def div(cx: Any, a: Any, b: Any) -> Any:
    """a / b; in the exact systems a division whose readers all mask ``b == 0`` (a norm's
    or std's backward) skips those elements (:func:`fpgrad.graph.ops.norms.masked_division`)."""
    from fpgrad.graph.ops.norms import masked_division

    out = masked_division(cx, a, b)
    return cx.ar.div(scalar(cx, a), scalar(cx, b)) if out is None else out


@op("aten.neg.default")
def neg(cx: Any, a: Any) -> Any:
    return cx.ar.mul(a, cx.ar.const(-1.0))  # exact in every system


@op("aten.exp.default")
def exp(cx: Any, a: Any) -> Any:
    return cx.ar.exp(a)


@op("aten.log.default")
def log(cx: Any, a: Any) -> Any:
    return cx.ar.log(a)


@op("aten.sqrt.default")
def sqrt(cx: Any, a: Any) -> Any:
    return cx.ar.sqrt(a)


@op("aten.rsqrt.default")
def rsqrt(cx: Any, a: Any) -> Any:
    return cx.ar.div(cx.ar.const(1.0), cx.ar.sqrt(a))  # 1/sqrt: two certified slots


@op("aten.reciprocal.default")
def reciprocal(cx: Any, a: Any) -> Any:
    return cx.ar.div(cx.ar.const(1.0), a)


@op("aten.pow.Tensor_Scalar")
def pow_scalar(cx: Any, a: Any, e: float) -> Any:
    """Integer powers by repeated products; half-integer powers as powers of sqrt(a)
    (``x.pow(-0.5)``'s backward reads ``x.pow(-1.5)``)."""
    ar = cx.ar
    e = float(e)
    if not abs(e) <= 64:  # inf and NaN included
        from fpgrad.errors import InputError

        raise InputError(f"{cx.label()}: pow with exponent {e} is not supported (|exponent| <= 64 is)")
    if 2 * e != int(2 * e):
        return _fractional_pow(cx, a, e)
    if e != int(e):
        base = ar.sqrt(a)
        n = abs(int(2 * e))
    else:
        base, n = a, abs(int(e))
    if n == 0:
        return ar.asarray(np.ones(shapes.shape(a)))
    out, first = None, True
    while n:  # square and multiply
        if n & 1:
            out = base if first else ar.mul(out, base)
            first = False
        n >>= 1
        if n:
            base = ar.mul(base, base)
    return out if e > 0 else ar.div(ar.const(1.0), out)


def _fractional_pow(cx: Any, a: Any, e: float) -> Any:
    """``a ** e`` for an exponent that is no integer or half: the machines' correctly rounded
    power (slot ``pow_const``); the exact systems' ``exp(e log a)`` (enclosing slots), 0 where
    a is exactly 0 (e > 0); a negative base (torch: NaN) or 0 to a negative power (inf) is
    refused, and a base the sign test cannot place escalates."""
    from fpgrad.errors import InputError

    ar = cx.ar
    if not isinstance(ar, ExactDerivatives):
        return _slot(cx, "pow_const")(a, e)
    pos = np.asarray(ar.positive(a), dtype=bool)
    neg = np.asarray(ar.positive(ar.mul(a, ar.const(-1.0))), dtype=bool)
    zero = ~(pos | neg)
    if neg.any() or (zero.any() and e < 0):
        what = "a negative base (torch: NaN)" if neg.any() else "0 to a negative power (inf)"
        raise InputError(f"{cx.label()}: pow with exponent {e} of {what}; keep the base positive "
                         "(clamp it, or add an epsilon)")  # fmt: skip
    shape = shapes.shape(a)
    safe = ar.where(zero, ar.asarray(np.ones(shape)), a) if zero.any() else a
    out = ar.exp(ar.mul(ar.const(e), ar.log(safe)))
    return ar.where(zero, ar.asarray(np.zeros(shape)), out) if zero.any() else out


@op("aten.relu.default", "aten.relu_.default")
def relu(cx: Any, x: Any) -> Any:
    """torch's ``x < 0 ? 0 : x``: +0.0 for a negative, NaN and -0.0 kept (relu'(0) = 0)."""
    if integers(x):
        return np.maximum(x, 0)
    ar, zero = cx.ar, zeros(cx, shapes.shape(x))
    if isinstance(ar, ExactDerivatives):
        return ar.where(ar.positive(x), x, zero)  # no NaN; the branch the certifier tracks
    return ar.where(np.asarray(x, dtype=np.float64) < 0, zero, x)


@op("aten.threshold_backward.default")
def threshold_backward(cx: Any, grad: Any, out: Any, threshold: float) -> Any:
    """torch's ``out <= threshold ? 0 : grad``: +0.0 below, the gradient where out is NaN."""
    return cx.ar.where(above(cx, out, threshold), grad, zeros(cx, shapes.shape(grad)))


@op("aten.leaky_relu.default", "aten.leaky_relu_.default")
def leaky_relu(cx: Any, x: Any, slope: float = 0.01) -> Any:
    ar = cx.ar
    return ar.where(ar.positive(x), x, ar.mul(x, ar.const(float(slope))))


@op("aten.leaky_relu_backward.default")
def leaky_relu_backward(cx: Any, grad: Any, x: Any, slope: float, self_is_result: bool) -> Any:
    ar = cx.ar
    return ar.where(ar.positive(x), grad, ar.mul(grad, ar.const(float(slope))))


@op("aten.tanh.default")
def tanh(cx: Any, x: Any) -> Any:
    return cx.ar.tanh(x)


@op("aten.tanh_backward.default")
def tanh_backward(cx: Any, grad: Any, t: Any) -> Any:
    """grad * sech^2(z) from tanh's input z when the graph has it (no 1 - t*t cancellation)."""
    src = cx.origin(1)
    if src is not None and str(src.target) in ("aten.tanh.default", "aten.tanh_.default"):
        return cx.ar.mul(grad, cx.ar.tanh_deriv(cx.value(src.args[0]), t))
    ar = cx.ar
    return ar.mul(grad, ar.sub(ar.const(1.0), ar.mul(t, t)))


@op("aten.sigmoid.default")
def sigmoid(cx: Any, x: Any) -> Any:
    return cx.ar.sigmoid(x)


@op("aten.sigmoid_backward.default")
def sigmoid_backward(cx: Any, grad: Any, s: Any) -> Any:
    """grad * s(z) s(-z) from sigmoid's input z when the graph has it (no 1 - s)."""
    src = cx.origin(1)
    if src is not None and str(src.target) in ("aten.sigmoid.default", "aten.sigmoid_.default"):
        return cx.ar.mul(grad, cx.ar.sigmoid_deriv(cx.value(src.args[0]), s))
    ar = cx.ar
    return ar.mul(grad, ar.mul(s, ar.sub(ar.const(1.0), s)))


@op("aten.silu.default", "aten.silu_.default")
def silu(cx: Any, x: Any) -> Any:
    return cx.ar.mul(x, cx.ar.sigmoid(x))


@op("aten.silu_backward.default")
def silu_backward(cx: Any, grad: Any, x: Any) -> Any:
    """grad * s(x) (1 + x s(-x)): torch's formula with 1 - s(x) written as s(-x)."""
    ar = cx.ar
    s = ar.sigmoid(x)
    s_neg = ar.sigmoid(ar.mul(x, ar.const(-1.0)))
    return ar.mul(grad, ar.mul(s, ar.add(ar.const(1.0), ar.mul(x, s_neg))))


#: torch's tanh-GELU constants as its CPU kernel holds them (float64): sqrt(2/pi), 0.044715
GELU_BETA = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5
GELU_KAPPA = 0.044715


def _gelu_constants(cx: Any) -> tuple[Any, Any]:
    """(beta, kappa) of the tanh GELU: the definition's reals ``sqrt(2 / pi)`` (as
    ``2 npdf(0)``) and ``44715 / 10^6`` in the exact systems, as label smoothing's and
    attention's constants (:mod:`fpgrad.graph.ops.derived`); torch's float64 roundings of
    them elsewhere (what its kernels compute with)."""
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        beta = ar.mul(_slot(cx, "npdf")(ar.const(0.0)), ar.const(2.0))
        return beta, ar.div(ar.const(44715.0), ar.const(1e6))
    return ar.const(GELU_BETA), ar.const(GELU_KAPPA)


@op("aten.gelu.default")
def gelu(cx: Any, x: Any, approximate: str = "none") -> Any:
    """x Phi(x), Phi the standard normal CDF (the slot ``ncdf``); ``approximate="tanh"``:
    x/2 (1 + tanh(u)), u = beta (x + kappa x^3) (:func:`_gelu_constants`)."""
    if approximate == "tanh":
        ar = cx.ar
        return ar.mul(ar.mul(x, ar.const(0.5)), _one_plus_tanh(cx, _gelu_inner(cx, x)))
    return cx.ar.mul(x, _slot(cx, "ncdf")(x))


@op("aten.gelu_backward.default")
def gelu_backward(cx: Any, grad: Any, x: Any, approximate: str = "none") -> Any:
    """grad (Phi(x) + x phi(x)), phi the standard normal density (the slot ``npdf``); tanh:
    grad ((1 + t)/2 + x/2 sech^2(u) beta (1 + 3 kappa x^2)), torch's formula."""
    ar = cx.ar
    if approximate == "tanh":
        u = _gelu_inner(cx, x)
        beta, kappa = _gelu_constants(cx)
        left = ar.mul(_one_plus_tanh(cx, u), ar.const(0.5))
        x2 = ar.mul(ar.mul(x, x), ar.const(3.0))
        slope = ar.add(ar.const(1.0), ar.mul(x2, kappa))
        sech2 = ar.tanh_deriv(u, ar.tanh(u))
        right = ar.mul(ar.mul(ar.mul(x, ar.const(0.5)), sech2), ar.mul(slope, beta))
        return ar.mul(grad, ar.add(left, right))
    d = ar.add(_slot(cx, "ncdf")(x), ar.mul(x, _slot(cx, "npdf")(x)))
    return ar.mul(grad, d)


def _gelu_inner(cx: Any, x: Any) -> Any:
    ar = cx.ar
    beta, kappa = _gelu_constants(cx)
    cube = ar.mul(ar.mul(x, x), x)
    return ar.mul(ar.add(x, ar.mul(cube, kappa)), beta)


def _one_plus_tanh(cx: Any, u: Any) -> Any:
    """1 + tanh(u): as torch rounds it in a strict machine; 2 sigmoid(2u) in the exact
    systems (no cancellation where tanh(u) is near -1)."""
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        return ar.mul(ar.sigmoid(ar.mul(u, ar.const(2.0))), ar.const(2.0))
    return ar.add(ar.const(1.0), ar.tanh(u))


@op("aten.abs.default")
def abs_(cx: Any, x: Any) -> Any:
    return cx.ar.abs(x)


@op("aten.sgn.default", "aten.sign.default")
def sgn(cx: Any, x: Any) -> Any:
    """-1, 0 or 1, decided by exact comparisons (L1 loss's derivative)."""
    ar = cx.ar
    pos = ar.positive(x)
    neg = ar.positive(ar.mul(x, ar.const(-1.0)))
    return ar.asarray(pos.astype(np.float64) - neg.astype(np.float64))


@op("aten.div_.Scalar", "aten.div_.Tensor")
def div_inplace(cx: Any, a: Any, b: Any) -> Any:
    """In place, as a new value (capture refuses in-place ops whose input is read later)."""
    return div(cx, a, b)


@op("aten.mul_.Scalar", "aten.mul_.Tensor")
def mul_inplace(cx: Any, a: Any, b: Any) -> Any:
    return mul(cx, a, b)


class NegInfMasked(NamedTuple):
    """A value that is -inf where ``mask`` (``masked_fill`` with -inf): -inf is a mask, never
    a number. ``value`` holds the other elements (0 under the mask); only softmax reads it
    (capture refuses any other reader: :func:`fpgrad.graph.ops.unsupported_message`). A
    tuple, so that attribution skips it as it skips multi-output values."""

    value: Any
    mask: np.ndarray


@op("aten.masked_fill.Scalar", "aten.masked_fill_.Scalar")
def masked_fill(cx: Any, x: Any, mask: np.ndarray, value: float) -> Any:
    """x with ``value`` where ``mask``; -inf gives a :class:`NegInfMasked` (softmax's mask)."""
    ar = cx.ar
    inner = x.value if isinstance(x, NegInfMasked) else x
    shape = shapes.shape(inner)
    where = np.broadcast_to(np.asarray(mask, dtype=bool), shape)
    if np.isneginf(value):
        old = x.mask if isinstance(x, NegInfMasked) else np.zeros(shape, dtype=bool)
        zero = ar.asarray(np.zeros(shape))
        return NegInfMasked(ar.where(where, zero, inner), old | where)
    if not np.isfinite(value):
        from fpgrad.errors import InputError

        raise InputError(f"{cx.label()}: masked_fill with {value} is not supported (-inf as a "
                         "softmax mask and finite values are)")  # fmt: skip
    out = ar.where(where, ar.asarray(np.full(shape, float(value))), inner)
    if isinstance(x, NegInfMasked):
        left = x.mask & ~where
        if not left.any():  # every -inf overwritten: a plain value again
            return out
        only_softmax(cx)  # some -inf remain: still a mask
        return NegInfMasked(out, left)
    return out


def _add_mask(cx: Any, x: Any, mask: np.ndarray) -> NegInfMasked:
    """x + a constant with -inf entries (finite ones added), read by softmax only."""
    only_softmax(cx)
    ar = cx.ar
    inner = x.value if isinstance(x, NegInfMasked) else x
    shape = np.broadcast_shapes(shapes.shape(inner), mask.shape)
    neg = np.broadcast_to(np.isneginf(mask), shape)
    if np.isposinf(mask).any() or np.isnan(mask).any():
        from fpgrad.errors import InputError

        raise InputError(f"{cx.label()}: an additive mask with +inf or NaN is not supported")
    finite = np.where(np.isneginf(mask), 0.0, mask)
    out = ar.add(inner, ar.asarray(np.broadcast_to(finite, shape).copy()))
    old = x.mask if isinstance(x, NegInfMasked) else np.zeros(shape, dtype=bool)
    zero = ar.asarray(np.zeros(shape))
    return NegInfMasked(ar.where(neg, zero, out), np.broadcast_to(old, shape) | neg)


def only_softmax(cx: Any) -> None:
    """Refuse a -inf mask that anything but softmax (or another mask) reads."""
    readers = {str(u.target) for u in cx.node.users}
    bad = readers - {"aten._softmax.default", "aten.masked_fill.Scalar", "aten.add.Tensor"}
    if bad:
        from fpgrad.errors import InputError

        raise InputError(f"{cx.label()}: a -inf mask is read by {', '.join(sorted(bad))}; "
                         "-inf is a mask that only softmax reads")  # fmt: skip


def masked_softmax(cx: Any, x: NegInfMasked, dim: int) -> Any:
    """softmax of a value with -inf under its mask: exactly 0 there; the shift is the
    maximum of the other elements (the masked ones hold a copy of their row's first)."""
    ar = cx.ar
    keep = ~x.mask
    if not keep.any(axis=dim).all():
        from fpgrad.errors import InputError

        raise InputError(f"{cx.label()}: a softmax row is -inf everywhere (torch gives NaN)")
    idx = list(np.indices(x.mask.shape, sparse=True))
    idx[dim] = np.expand_dims(np.argmax(keep, axis=dim), dim)
    head = shapes.expand(shapes.index(x.value, tuple(idx)), x.mask.shape)
    z = ar.where(keep, x.value, head)
    zero = ar.asarray(np.zeros(x.mask.shape))
    e = ar.where(keep, ar.exp(ar.sub(z, ar.max(z, axis=dim, keepdims=True))), zero)
    return ar.div(e, ar.sum(e, axis=dim, keepdims=True))


@op("aten.elu.default", "aten.elu_.default")
def elu(cx: Any, x: Any, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> Any:
    """scale x for x > 0, else scale alpha (exp(input_scale x) - 1)."""
    ar = cx.ar
    neg = ar.mul(ar.sub(ar.exp(ar.mul(x, ar.const(float(input_scale)))), ar.const(1.0)),
                 _coef(cx, alpha, scale))  # fmt: skip
    return ar.where(ar.positive(x), ar.mul(x, ar.const(float(scale))), neg)


def _coef(cx: Any, *factors: float) -> Any:
    """The product of float constants: exact in the exact systems (SELU's ``alpha * scale``
    is not a float64), torch's float64 product elsewhere."""
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        out = ar.const(float(factors[0]))
        for f in factors[1:]:
            out = ar.mul(out, ar.const(float(f)))
        return out
    return ar.const(math.prod(float(f) for f in factors))


#: the ops whose output ELU's backward may have saved (in place: run as new values, so the
#: node's input still holds x; nn.ELU/SELU/CELU(inplace=True))
_ELUS = {"aten.elu.default", "aten.elu_.default", "aten.celu.default", "aten.celu_.default"}


@op("aten.elu_backward.default")
def elu_backward(
    cx: Any, g: Any, alpha: float, scale: float, input_scale: float, is_result: bool, xr: Any
) -> Any:
    """g scale (x > 0), else g input_scale scale alpha exp(input_scale x) (from x, also when
    torch saved the output: then x is the input of the elu node)."""
    ar = cx.ar
    if is_result:
        src = cx.origin(5)
        if src is None or str(src.target) not in _ELUS:
            from fpgrad.errors import InputError

            raise InputError(f"{cx.label()}: in-place ELU is not supported; use inplace=False")
        xr = cx.value(src.args[0])
    from fpgrad.graph.ops.smooth import celu_scale

    if celu_scale(cx, alpha, scale, input_scale):  # celu's: exp(x / alpha), exactly
        neg = ar.mul(g, ar.exp(ar.div(xr, ar.const(float(alpha)))))
    else:
        c = _coef(cx, input_scale, scale, alpha)
        neg = ar.mul(g, ar.mul(ar.exp(ar.mul(xr, ar.const(float(input_scale)))), c))
    # NaN input: the negative branch (NaN), as torch's vectorized kernel (b > 0 selects);
    # its scalar tail (b <= 0 selects) would give g * scale
    return ar.where(ar.positive(xr), ar.mul(g, ar.const(float(scale))), neg)
