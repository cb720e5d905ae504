"""Smooth elementwise functions: softplus, log_sigmoid, mish, celu, log1p, expm1, erf, sin, cos,
atan, and the backward ops their traces emit.

Exact systems (:class:`~fpgrad.arith.base.ExactDerivatives`): cancellation-free forms built
from enclosing slots, so every value is an enclosure (each slot encloses its exact result for
every point of its input balls, hence so does any composition):

- ``softplus(t) = max(t, 0) + log1p(exp(-|t|))`` with ``max(t, 0) = (t + |t|) / 2`` (no
  branch: a ball around 0 needs no decision), ``log_sigmoid(x) = -softplus(-x) = (x - |x|) / 2
  - log1p(exp(-|x|))``; the derivatives are ``sigmoid(beta x)`` and ``sigmoid(-x)`` through the
  sigmoid slot (no ``1 - s``);
- softplus's linear branch (torch: ``x`` where ``beta x > threshold``) is decided by the exact
  comparison ``beta x - threshold > 0`` (:func:`~fpgrad.graph.ops.pointwise.above`): a tie
  takes the log branch as torch does, a ball straddling the threshold is an uncertain branch
  (the fast balls escalate to Arb, whose ``where`` takes the union of both branches, and the
  reference ends undetermined at its cap); the log branch is computed on 0 where the linear one
  is taken, so a large ``beta x`` leaves no range error behind;
- ``expm1``: the system's (the fast balls' Taylor polynomial near 0 with a proven tail,
  :meth:`~fpgrad.arith.ball_functions.BallFunctions.expm1`; Arb's); its backward's
  ``expm1(x) + 1`` is ``exp(x)`` (:func:`expm1_plus_one`);
- ``erf``, ``sin``, ``cos``, ``atan``: Arb's functions (the fast balls have no such slot:
  :class:`~fpgrad.graph.ops.pointwise.MissingSlot` sends the run to Arb); ``erf`` is Arb's erf
  itself, not ``2 Phi(x sqrt 2) - 1`` (which cancels near 0); erf's backward scale
  ``fl(2 / sqrt(pi))`` is the real ``2 sqrt(2) phi(0)`` (:func:`erf_scale`);
- celu: ``alpha expm1(x / alpha)`` with the exact quotient (torch's ``1 / alpha`` in float64
  forward and ``1 / float32(alpha)`` backward both stand for it: :func:`celu_scale`).

Strict machines (emulated formats): torch's formulas op by op, each transcendental one
correctly rounded function of the format (as sigmoid, tanh and GELU's Phi): softplus is
``softplus(fl(beta x)) / beta`` with the format's correctly rounded softplus (no overflow of
``exp`` inside), its backward ``grad * sigmoid(fl(beta x))``; log_sigmoid ``-softplus(-x)``,
its buffer ``exp(-|x|)``, its backward ``grad * sigmoid(-x)``; mish ``x * tanh(softplus(x))``,
its backward torch's ``grad (t + (x s) (1 - t t))``; celu is elu with ``input_scale =
1 / alpha``; log1p, expm1, erf, sin, cos, atan one correctly rounded function each.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
from torch import fx

from fpgrad.arith.base import ExactDerivatives
from fpgrad.graph import shapes
from fpgrad.graph.ops._util import _slot, above, feeds_forward_outputs, zeros
from fpgrad.graph.ops.registry import OPS, op


def _exact(cx: Any) -> bool:
    return isinstance(cx.ar, ExactDerivatives)


def _neg(ar: Any, x: Any) -> Any:
    return ar.mul(x, ar.const(-1.0))  # exact in every system


def _exact_softplus(ar: Any, t: Any) -> Any:
    """``(t + |t|) / 2 + log1p(exp(-|t|))``: the argument of log1p lies in (0, 1], so the
    sum never cancels (both terms are >= 0) and a saturated ``t`` keeps its tail."""
    half = ar.mul(ar.add(t, ar.abs(t)), ar.const(0.5))
    return ar.add(half, ar.log1p(ar.exp(_neg(ar, ar.abs(t)))))


def _beta_x(cx: Any, x: Any, beta: float) -> Any:
    """``beta x`` (exact product in the exact systems up to their enclosure; torch's rounded
    product in a strict machine); ``x`` itself for beta = 1."""
    return x if beta == 1 else cx.ar.mul(x, cx.ar.const(float(beta)))


def _log_branch(cx: Any, t: Any, linear: np.ndarray) -> Any:
    """``t`` where the log branch may be taken, 0 where the linear one surely is (exact
    systems only; an undecided element keeps ``t``, so its log branch is not widened)."""
    unsure = getattr(linear, "unsure", None)
    sure = np.asarray(linear, dtype=bool)
    if unsure is not None:
        sure = sure & ~np.asarray(unsure, dtype=bool)
    return cx.ar.where(sure, zeros(cx, shapes.shape(t)), t)


@op("aten.softplus.default")
def softplus(cx: Any, x: Any, beta: float = 1.0, threshold: float = 20.0) -> Any:
    """torch's ``beta x > threshold ? x : log1p(exp(beta x)) / beta``."""
    ar = cx.ar
    t = _beta_x(cx, x, beta)
    linear = above(cx, t, threshold)
    if _exact(cx):
        sp = _exact_softplus(ar, _log_branch(cx, t, linear))
    else:
        sp = _slot(cx, "softplus")(t)
    if beta != 1:
        sp = ar.div(sp, ar.const(float(beta)))
    return ar.where(linear, x, sp)


@op("aten.softplus_backward.default")
def softplus_backward(cx: Any, grad: Any, x: Any, beta: float, threshold: float) -> Any:
    """torch's ``beta x > threshold ? grad : grad z / (z + 1)``, ``z = exp(beta x)``: that
    quotient is ``sigmoid(beta x)``."""
    ar = cx.ar
    t = _beta_x(cx, x, beta)
    linear = above(cx, t, threshold)
    s = ar.sigmoid(_log_branch(cx, t, linear) if _exact(cx) else t)
    return ar.where(linear, grad, ar.mul(grad, s))


@op("aten.log_sigmoid_forward.default")
def log_sigmoid_forward(cx: Any, x: Any) -> tuple[Any, Any]:
    """(log sigmoid(x), torch's CPU buffer ``exp(-|x|)``)."""
    ar = cx.ar
    e = ar.exp(_neg(ar, ar.abs(x)))
    if _exact(cx):
        half = ar.mul(ar.sub(x, ar.abs(x)), ar.const(0.5))  # min(x, 0)
        return ar.sub(half, ar.log1p(e)), e
    return _neg(ar, _slot(cx, "softplus")(_neg(ar, x))), e


@op("aten.log_sigmoid_backward.default")
def log_sigmoid_backward(cx: Any, grad: Any, x: Any, buffer: Any) -> Any:
    """``grad sigmoid(-x)`` (torch's ``(max_deriv - sign b / (1 + b)) grad`` from its
    buffer is the same function); the buffer is not read."""
    ar = cx.ar
    return ar.mul(grad, ar.sigmoid(_neg(ar, x)))


def _softplus_any(cx: Any, x: Any) -> Any:
    return _exact_softplus(cx.ar, x) if _exact(cx) else _slot(cx, "softplus")(x)


@op("aten.mish.default", "aten.mish_.default")
def mish(cx: Any, x: Any) -> Any:
    """``x tanh(softplus(x))`` (torch's mish has no threshold)."""
    return cx.ar.mul(x, cx.ar.tanh(_softplus_any(cx, x)))


@op("aten.mish_backward.default")
def mish_backward(cx: Any, grad: Any, x: Any) -> Any:
    """torch's ``grad (t + x s (1 - t^2))``, ``t = tanh(softplus(x))``, ``s = sigmoid(x)``;
    ``1 - t^2`` is the system's ``tanh_deriv`` (``sech^2`` in the exact systems)."""
    ar = cx.ar
    sp = _softplus_any(cx, x)
    t = ar.tanh(sp)
    right = ar.mul(ar.mul(x, ar.sigmoid(x)), ar.tanh_deriv(sp, t))
    return ar.mul(grad, ar.add(t, right))


@op("aten.celu.default", "aten.celu_.default")
def celu(cx: Any, x: Any, alpha: float = 1.0) -> Any:
    """``x`` for x > 0, else ``alpha (exp(x / alpha) - 1)`` (torch: elu with input_scale
    ``1 / alpha``; the exact systems: ``alpha expm1(x / alpha)``, dividing by alpha itself)."""
    if not _exact(cx):
        return OPS["aten.elu.default"](cx, x, alpha, 1.0, 1.0 / float(alpha))  # pointwise.elu
    ar = cx.ar
    a = ar.const(float(alpha))
    neg = ar.mul(_slot(cx, "expm1")(ar.div(x, a)), a)  # no cancellation near 0
    return ar.where(ar.positive(x), x, neg)


def celu_scale(cx: Any, alpha: float, scale: float, input_scale: float) -> bool:
    """Is this ``elu_backward`` (exact systems) celu's, whose ``input_scale`` torch derived
    from alpha (``1 / alpha``, or ``1 / float32(alpha)`` as derivatives.yaml writes it)? Then
    its derivative is ``exp(x / alpha)`` exactly: ``input_scale scale alpha`` stands for 1."""
    if not _exact(cx) or scale != 1:
        return False
    backward = getattr(cx, "node", None)  # None: called outside a graph
    node = backward.args[5] if backward is not None and len(backward.args) > 5 else None
    if not isinstance(node, fx.Node):
        return False
    alpha = float(alpha)
    if alpha == 0:
        return False
    a32 = float(np.float32(alpha))  # 0 for |alpha| below float32's range: torch's 1 / 0 is inf
    inv32 = 1.0 / a32 if a32 != 0 else math.copysign(math.inf, a32)
    if input_scale not in (1.0 / alpha, inv32):
        return False
    celu = elu = False
    for user in [*node.users, node]:  # celu(x) reads x; in place, torch saves celu_'s output
        a = _arg(user, 1, "alpha", 1.0)
        if not isinstance(a, (int, float)) or float(a) != alpha:
            continue
        if str(user.target) in ("aten.celu.default", "aten.celu_.default"):
            celu = True
        elif str(user.target) in ("aten.elu.default", "aten.elu_.default"):
            elu |= (_arg(user, 2, "scale", 1), _arg(user, 3, "input_scale", 1)) == (1, input_scale)
    if celu and elu and Fraction(input_scale) * Fraction(alpha) != 1:
        # an elu of the same input whose backward carries the same constants: this node may
        # be either's, and their derivatives differ (e^(x / alpha) and alpha input_scale
        # e^(input_scale x)); which op autograd derived it from is not in the node
        from fpgrad.errors import InputError

        raise InputError(
            f"{cx.label()}: elu_backward could be celu's or elu's (elu and celu of the same "
            f"input with alpha={alpha!r}, whose float32 gives celu's input_scale "
            f"{input_scale!r}); use a different alpha for one of them"
        )
    return celu


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


@op("aten.log1p.default")
def log1p(cx: Any, x: Any) -> Any:
    return cx.ar.log1p(x)


@op("aten.expm1.default")
def expm1(cx: Any, x: Any) -> Any:
    return _slot(cx, "expm1")(x)


def expm1_plus_one(cx: Any, b: float, alpha: float) -> Any | None:
    """``exp(x)`` (in ``cx.ar``) where this ``add.Scalar`` node adds 1 to ``expm1(x)`` (torch's
    expm1 backward: ``grad (result + 1)``): the same real, without the cancellation of
    ``expm1(x) + 1`` for x << 0; else None."""
    if b != 1 or alpha != 1 or str(cx.node.target) != "aten.add.Scalar":
        return None
    if not isinstance(cx.node.args[0], fx.Node):
        return None
    src = cx.origin(0)
    if src is None or str(src.target) != "aten.expm1.default":
        return None
    return cx.ar.exp(cx.value(src.args[0]))


@op("aten.erf.default")
def erf(cx: Any, x: Any) -> Any:
    return _slot(cx, "erf")(x)


@op("aten.sin.default")
def sin(cx: Any, x: Any) -> Any:
    return _slot(cx, "sin")(x)


@op("aten.cos.default")
def cos(cx: Any, x: Any) -> Any:
    return _slot(cx, "cos")(x)


@op("aten.atan.default")
def atan(cx: Any, x: Any) -> Any:
    return _slot(cx, "atan")(x)


#: torch's float64 ``2 / sqrt(pi)`` in erf's backward (``mul.Scalar(exp(-x^2), c)``)
ERF_SCALE = 2.0 / math.sqrt(math.pi)


def erf_scale(cx: Any, value: float) -> Any | None:
    """``2 / sqrt(pi) = 2 sqrt(2) phi(0)`` (in ``cx.ar``) where this node multiplies
    ``exp(-x^2)`` of an erf's input ``x`` by torch's float64 ``2 / sqrt(pi)``; else None."""
    node = cx.node
    if value != ERF_SCALE or str(node.target) not in ("aten.mul.Scalar", "aten.mul.Tensor"):
        return None
    chain = node.args[0]
    for name in ("aten.exp.default", "aten.neg.default", "aten.pow.Tensor_Scalar"):
        if not isinstance(chain, fx.Node) or str(chain.target) != name:
            return None
        if name.startswith("aten.pow") and chain.args[1] != 2:
            return None
        chain = chain.args[0]
    if not isinstance(chain, fx.Node) or not any(
        str(u.target) == "aten.erf.default" for u in chain.users
    ):
        return None
    if feeds_forward_outputs(cx, node):
        return None  # the model's own constant (torch's backward never feeds the loss)
    ar = cx.ar
    two_phi0 = ar.mul(_slot(cx, "npdf")(ar.const(0.0)), ar.const(2.0))
    return ar.mul(ar.sqrt(ar.const(2.0)), two_phi0)
