"""Hyperbolic, inverse trigonometric and base-2/10 functions: ``sinh``, ``cosh``, ``tan``,
``asin``, ``acos``, ``asinh``, ``acosh``, ``atanh``, ``exp2``, ``log2``, ``log10``, and
``atan2`` (:func:`atan2`: two arguments, a cut on the negative x axis), and the power of two
tensors ``pow.Tensor_Tensor`` (:func:`pow_tensor`, positive bases) and of a number to a tensor
``pow.Scalar`` (:func:`pow_scalar_base`; the backward's ``ln(base)`` read as the real one).

Each is one slot: the emulated machines' correctly rounded function
(:mod:`fpgrad.arith.emulated_trig`), Arb's in the exact systems (the fast balls have none:
:class:`~fpgrad.graph.ops.pointwise.MissingSlot` sends the run to Arb, as for sin and cos).
Outside a domain Arb's ball is NaN and nothing is certified there. Their backward ops are
torch's formulas in supported ops (``cosh`` for sinh, ``1 + tan^2``, ``rsqrt(1 - x^2)``,
``rsqrt(x^2 + 1)``, ``rsqrt(x - 1) rsqrt(x + 1)`` in torch's form, ``1 / (1 - x^2)``), whose
constants are the integers 1 and 2.

``exp2``, ``log2``, ``log10`` are the machines' slots; in the exact systems ``exp(x ln 2)``,
``log x / ln 2``, ``log x / ln 10`` with the real logarithms. Their backward multiplies by
torch's float64 ``ln 2`` (``ln 10``): :func:`log_scale` reads that constant as the real one
where the node is that backward (``grad exp2(x)`` times it, or the ``x`` of a ``log2(x)``
times it, divided into the gradient) and reaches no forward output; a model's own
``x * 0.6931471805599453`` in its forward stays the float.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import fx

from fpgrad.arith.base import ExactDerivatives
from fpgrad.errors import InputError
from fpgrad.graph.names import origin as _through
from fpgrad.graph.ops._util import _slot, feeds_forward_outputs, scalar
from fpgrad.graph.ops.registry import op

NAMES = ("sinh", "cosh", "tan", "asin", "acos", "asinh", "acosh", "atanh")


def _register(name: str) -> None:
    def fn(cx: Any, x: Any) -> Any:
        return _slot(cx, name)(x)

    fn.__name__ = name
    op(f"aten.{name}.default")(fn)


for _name in NAMES:
    _register(_name)


def _ln(cx: Any, base: float) -> Any:
    return cx.ar.log(cx.ar.const(base))


@op("aten.exp2.default")
def exp2(cx: Any, x: Any) -> Any:
    if isinstance(cx.ar, ExactDerivatives):
        return cx.ar.exp(cx.ar.mul(x, _ln(cx, 2.0)))
    return _slot(cx, "exp2")(x)


@op("aten.log2.default")
def log2(cx: Any, x: Any) -> Any:
    if isinstance(cx.ar, ExactDerivatives):
        return cx.ar.div(cx.ar.log(x), _ln(cx, 2.0))
    return _slot(cx, "log2")(x)


@op("aten.log10.default")
def log10(cx: Any, x: Any) -> Any:
    if isinstance(cx.ar, ExactDerivatives):
        return cx.ar.div(cx.ar.log(x), _ln(cx, 10.0))
    return _slot(cx, "log10")(x)


#: the float64 ln 2 and ln 10 of torch's derivative formulas (its ln 10 is one ulp below the
#: correctly rounded 2.302585092994046) -> (base, the exp op, the log op)
_SCALES = {0.6931471805599453: (2.0, "aten.exp2.default", "aten.log2.default"),
           2.3025850929940455: (10.0, None, "aten.log10.default")}  # fmt: skip


def _scale_muls(cx: Any, node: fx.Node, value: float) -> list[fx.Node]:
    """The backward's ``mul`` nodes reading ``node`` that multiply by ``value``."""
    return [u for u in node.users if str(u.target) in ("aten.mul.Scalar", "aten.mul.Tensor")
            and len(u.args) == 2 and u.args[0] is node and u.args[1] == value
            and not feeds_forward_outputs(cx, u)]  # fmt: skip


def log_scale(cx: Any, value: float) -> Any | None:
    """The real ``ln 2`` (``ln 10``) where this ``mul`` is exp2's or log2's (log10's) backward
    multiplying by torch's float64 one (see the module's docstring); else None. The exp2
    (log2) must be a forward value the loss is differentiated through (not one computed in a
    custom backward, nor a detached one), with no more such products than it has backwards
    (one per differentiated exp2, one per differentiated log2 of ``x``): a custom
    ``autograd.Function``'s own ``* 0.6931471805599453`` stays the float."""
    found = _SCALES.get(value)
    node = cx.node
    if found is None or str(node.target) not in ("aten.mul.Scalar", "aten.mul.Tensor"):
        return None
    base, exp_op, log_op = found
    src = node.args[0]
    ok = False
    if exp_op and isinstance(src, fx.Node) and str(src.target) == "aten.mul.Tensor":
        for e in {
            _through(a) for a in src.args if str(getattr(_through(a), "target", "")) == exp_op
        }:
            prods = [m for p in e.users for m in _scale_muls(cx, p, value)
                     if str(p.target) == "aten.mul.Tensor"]  # fmt: skip
            ok = ok or (len(prods) <= 1 and feeds_forward_outputs(cx, e, detached=False))
    if not ok and isinstance(src, fx.Node):
        logs = [
            u for u in src.users if str(u.target) == log_op and feeds_forward_outputs(cx, u, False)
        ]
        ok = 0 < len(_scale_muls(cx, src, value)) <= len(logs) and all(
            str(u.target) == "aten.div.Tensor" and u.args[1] is node for u in node.users
        )
    if not ok or feeds_forward_outputs(cx, node):
        return None
    return _ln(cx, base)


@op("aten.atan2.default", "aten.atan2_.default")
def atan2(cx: Any, y: Any, x: Any) -> Any:
    """atan2(y, x): the machines' correctly rounded atan2 (signed zeros and +-pi on the
    negative x axis as C99), Arb's in the exact systems (the fast balls have none). The exact
    systems hold no signed zero: where y is proven exactly 0 and x is not proven positive,
    torch's value is +-pi (or +-0 at x = 0) by the sign of a zero, so the run is refused in one
    line; where the balls cannot decide, Arb's ball spans the cut and nothing is certified."""
    ar = cx.ar
    fn = _slot(cx, "atan2")
    if isinstance(ar, ExactDerivatives):
        before = getattr(ar, "uncertain_branches", 0)
        yp = np.asarray(ar.positive(y), dtype=bool)
        yn = np.asarray(ar.positive(ar.mul(y, ar.const(-1.0))), dtype=bool)
        xp = np.asarray(ar.positive(x), dtype=bool)
        on_cut = ~(yp | yn) & ~xp
        if on_cut.any() and getattr(ar, "uncertain_branches", 0) == before:
            raise InputError(f"{cx.label()}: atan2 at y = 0 exactly with x <= 0: torch gives +-pi "
                             "(or +-0) by the sign of a zero, which the exact reference does not "
                             "hold; keep y off 0 there (add an epsilon) or x > 0")  # fmt: skip
    return fn(y, x)


@op("aten.pow.Tensor_Tensor", "aten.pow_.Tensor")
def pow_tensor(cx: Any, a: Any, b: Any) -> Any:
    """``a ** b`` of two tensors, for a positive base: the machines' correctly rounded power
    (slot ``pow_tensor``: IEEE 754's exact cases at a base of 0, 1 or inf and an exponent of 0
    or inf, NaN for a negative base and a non-integer exponent, as torch); the exact systems'
    ``exp(b log a)`` with every base proven positive. A base torch would raise to an integer
    power while negative (a real value), and in the exact systems any base not proven
    positive, is refused in one line; a base the sign test cannot place escalates."""
    ar = cx.ar
    a, b = scalar(cx, a), scalar(cx, b)
    hint = "keep the base positive (clamp it, or add an epsilon; exp(b * log(a)) says so)"
    if not isinstance(ar, ExactDerivatives):
        av, bv = np.broadcast_arrays(
            np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        )
        with np.errstate(invalid="ignore"):
            if ((av < 0) & (np.floor(bv) == bv)).any():
                raise InputError(f"{cx.label()}: pow(tensor, tensor) of a negative base to an "
                                 f"integer power; {hint}")  # fmt: skip
        return _slot(cx, "pow_tensor")(a, b)
    before = getattr(ar, "uncertain_branches", 0)
    pos = np.asarray(ar.positive(a), dtype=bool)
    if not pos.all() and getattr(ar, "uncertain_branches", 0) == before:
        raise InputError(f"{cx.label()}: pow(tensor, tensor) of a base that is not positive "
                         f"(0 or negative); {hint}")  # fmt: skip
    return ar.exp(ar.mul(b, ar.log(a)))


@op("aten.pow.Scalar")
def pow_scalar_base(cx: Any, base: Any, e: Any) -> Any:
    """``base ** e`` with a Python number base (RoPE's ``10000 ** (arange(0, d, 2) / d)``): the
    power of two tensors, the base a constant (:func:`pow_tensor`). Its backward multiplies
    ``base ** e`` by torch's float64 ``ln(base)``: :func:`pow_base_scale` reads it as the real
    one."""
    return pow_tensor(cx, base, e)


def pow_base_scale(cx: Any, value: float) -> Any | None:
    """The real ``ln(base)`` where this ``mul`` is the backward of a differentiated
    ``pow.Scalar(base, e)``: ``detach(base ** e) * fl(ln base)`` (the float within 2 ulps of
    the real logarithm, whatever the platform's ``log``), no forward output reading it and no
    more such products than the power has backwards (one); else None (a model's own constant
    stays the float)."""
    node = cx.node
    if str(node.target) not in ("aten.mul.Scalar", "aten.mul.Tensor") or len(node.args) != 2:
        return None
    src = node.args[0]
    power = _through(src)
    if not (isinstance(src, fx.Node) and src is not power and isinstance(power, fx.Node)):
        return None  # the backward reads the power through detach
    if str(power.target) != "aten.pow.Scalar" or not isinstance(power.args[0], int | float):
        return None
    base = float(power.args[0])
    if not (math.isfinite(base) and base > 0 and base != 1):
        return None
    if abs(value - math.log(base)) > 2 * math.ulp(math.log(base)):
        return None
    readers = [m for d in _detached(power) for m in _scale_muls(cx, d, value)]
    if len(readers) > 1 or not feeds_forward_outputs(cx, power, detached=False):
        return None
    if feeds_forward_outputs(cx, node):
        return None
    return cx.ar.log(cx.ar.const(base))


def _detached(node: fx.Node) -> list[fx.Node]:
    """Every node reading ``node`` through detach, alias or clone chains."""
    out, todo = [], [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if str(u.target) in ("aten.detach.default", "aten.alias.default", "aten.clone.default"):
                out.append(u)
                todo.append(u)
    return out
