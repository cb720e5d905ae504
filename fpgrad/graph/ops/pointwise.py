"""Elementwise ops and their backward ops (cancellation-free where the output saturates)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.graph import shapes
from fpgrad.graph.ops import op
from fpgrad.graph.ops._util import scalar, zeros


@op("aten.add.Tensor", "aten.add.Scalar")
def add(cx: Any, a: Any, b: Any, alpha: float = 1) -> Any:
    b = scalar(cx, b)
    if alpha != 1:
        b = cx.ar.mul(b, cx.ar.const(float(alpha)))
    return cx.ar.add(scalar(cx, a), b)


@op("aten.sub.Tensor", "aten.sub.Scalar")
def sub(cx: Any, a: Any, b: Any, alpha: float = 1) -> Any:
    b = scalar(cx, b)
    if alpha != 1:
        b = cx.ar.mul(b, cx.ar.const(float(alpha)))
    return cx.ar.sub(scalar(cx, a), b)


@op("aten.rsub.Scalar")
def rsub(cx: Any, a: Any, b: Any, alpha: float = 1) -> Any:
    return sub(cx, b, a, alpha) if alpha == 1 else sub(cx, b, mul(cx, a, alpha))


@op("aten.mul.Tensor", "aten.mul.Scalar")
def mul(cx: Any, a: Any, b: Any) -> Any:
    return cx.ar.mul(scalar(cx, a), scalar(cx, b))


@op("aten.div.Tensor", "aten.div.Scalar")
def div(cx: Any, a: Any, b: Any) -> Any:
    return cx.ar.div(scalar(cx, a), scalar(cx, b))


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
    if 2 * e != int(2 * e) or abs(e) > 64:
        from fpgrad.errors import InputError

        raise InputError(
            f"{cx.label()}: pow with exponent {e} is not supported (integers and halves are)"
        )
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


@op("aten.relu.default")
def relu(cx: Any, x: Any) -> Any:
    return cx.ar.where(cx.ar.positive(x), x, zeros(cx, shapes.shape(x)))  # relu'(0) = 0


@op("aten.threshold_backward.default")
def threshold_backward(cx: Any, grad: Any, out: Any, threshold: float) -> Any:
    ar = cx.ar
    mask = ar.positive(out if threshold == 0 else ar.sub(out, ar.const(float(threshold))))
    return ar.where(mask, grad, zeros(cx, shapes.shape(grad)))


@op("aten.leaky_relu.default")
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
    if src is not None and str(src.target) == "aten.tanh.default":
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
    if src is not None and str(src.target) == "aten.sigmoid.default":
        return cx.ar.mul(grad, cx.ar.sigmoid_deriv(cx.value(src.args[0]), s))
    ar = cx.ar
    return ar.mul(grad, ar.mul(s, ar.sub(ar.const(1.0), s)))


@op("aten.silu.default")
def silu(cx: Any, x: Any) -> Any:
    return cx.ar.mul(x, cx.ar.sigmoid(x))


@op("aten.silu_backward.default")
def silu_backward(cx: Any, grad: Any, x: Any) -> Any:
    """grad * s(x) (1 + x s(-x)): torch's formula with 1 - s(x) written as s(-x)."""
    ar = cx.ar
    s = ar.sigmoid(x)
    s_neg = ar.sigmoid(ar.mul(x, ar.const(-1.0)))
    return ar.mul(grad, ar.mul(s, ar.add(ar.const(1.0), ar.mul(x, s_neg))))


class MissingSlot(ValueError):
    """The number system lacks a slot an op needs (the exact reference then uses mpmath)."""


def _slot(cx: Any, name: str) -> Any:
    fn = getattr(cx.ar, name, None)
    if fn is None:
        raise MissingSlot(f"{cx.label()} needs the slot {name!r}, which {cx.ar.name} lacks")
    return fn


@op("aten.gelu.default")
def gelu(cx: Any, x: Any, approximate: str = "none") -> Any:
    """x Phi(x), Phi the standard normal CDF (the slot ``ncdf``)."""
    _exact_gelu_only(cx, approximate)
    return cx.ar.mul(x, _slot(cx, "ncdf")(x))


@op("aten.gelu_backward.default")
def gelu_backward(cx: Any, grad: Any, x: Any, approximate: str = "none") -> Any:
    """grad (Phi(x) + x phi(x)), phi the standard normal density (the slot ``npdf``)."""
    _exact_gelu_only(cx, approximate)
    ar = cx.ar
    d = ar.add(_slot(cx, "ncdf")(x), ar.mul(x, _slot(cx, "npdf")(x)))
    return ar.mul(grad, d)


def _exact_gelu_only(cx: Any, approximate: str) -> None:
    if approximate != "none":
        from fpgrad.errors import InputError

        raise InputError(
            f"{cx.label()}: GELU(approximate={approximate!r}) is not supported yet; "
            "use GELU() (the exact erf form)"
        )


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


@op("aten.masked_fill.Scalar", "aten.masked_fill_.Scalar")
def masked_fill(cx: Any, x: Any, mask: np.ndarray, value: float) -> Any:
    """x with ``value`` where ``mask`` (a finite value: -inf masks belong in attention's mask)."""
    if not np.isfinite(value):
        from fpgrad.errors import InputError

        raise InputError(
            f"{cx.label()}: masked_fill with {value} is not supported; pass the mask to "
            "F.scaled_dot_product_attention (attn_mask) or use a large finite negative"
        )
    ar = cx.ar
    fill = ar.asarray(np.full(shapes.shape(x), float(value)))
    return ar.where(np.broadcast_to(np.asarray(mask, dtype=bool), shapes.shape(x)), fill, x)


@op("aten.elu.default")
def elu(cx: Any, x: Any, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> Any:
    """scale x for x > 0, else scale alpha (exp(input_scale x) - 1)."""
    ar = cx.ar
    neg = ar.mul(ar.sub(ar.exp(ar.mul(x, ar.const(float(input_scale)))), ar.const(1.0)),
                 ar.const(float(alpha) * float(scale)))  # fmt: skip
    return ar.where(ar.positive(x), ar.mul(x, ar.const(float(scale))), neg)


@op("aten.elu_backward.default")
def elu_backward(
    cx: Any, g: Any, alpha: float, scale: float, input_scale: float, is_result: bool, xr: Any
) -> Any:
    """g scale (x > 0), else g input_scale scale alpha exp(input_scale x) (from x, also when
    torch saved the output: then x is the input of the elu node)."""
    ar = cx.ar
    if is_result:
        src = cx.origin(5)
        if src is None or str(src.target) != "aten.elu.default":
            from fpgrad.errors import InputError

            raise InputError(f"{cx.label()}: in-place ELU is not supported; use inplace=False")
        xr = cx.value(src.args[0])
    c = float(input_scale) * float(scale) * float(alpha)
    neg = ar.mul(g, ar.mul(ar.exp(ar.mul(xr, ar.const(float(input_scale)))), ar.const(c)))
    return ar.where(ar.positive(xr), ar.mul(g, ar.const(float(scale))), neg)
