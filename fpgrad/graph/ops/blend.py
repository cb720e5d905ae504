"""Fused pointwise blends: ``lerp`` (Scalar and Tensor weight), ``addcmul``, ``addcdiv`` (with
``value``), and their in-place forms (as new values).

Exact systems: the real values ``a + w (b - a)``, ``a + v t1 t2``, ``a + v t1 / t2`` (``v``
the float64 number torch is given). Emulated machines round the operations of torch's CPU
kernels, one rounding each, including their fused multiply-adds (torch's AVX2 and AVX-512
kernels, vectorised body and scalar tail alike, compute ``addcmul`` as ``fma(v t1, t2, a)`` and
``lerp`` as ``fma(w, b - a, a)`` for ``|w| < 0.5``, else ``fma(w - 1, b - a, b)``; ``addcdiv``
has no fused step: ``a + (v t1) / t2``): a machine at least as wide as float32 rounds each step
in its format and mode (so ``float32:emulated`` is torch's float32 kernel bit for bit); a
narrower one (float16, bfloat16, fp8) computes as torch's float16/bfloat16 kernels, in float32
(nearest even; ``v`` and a Scalar weight converted to float32) and rounds the result once into
its format in its mode (as :func:`fpgrad.graph.ops.steps.softshrink`). So ``lerp`` is exactly
``a`` at ``w = 0`` and exactly ``b`` at ``w = 1`` in every column. Their backward ops are
torch's formulas in supported ops; ``lerp.Scalar``'s multiplies the gradient for ``a`` by
torch's float64 ``1 - w``, which the exact systems read as the real ``1 - w``
(:func:`lerp_scale`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from torch import fx

from fpgrad.arith.base import ExactDerivatives
from fpgrad.errors import InputError
from fpgrad.graph.ops._util import feeds_forward_outputs, scalar
from fpgrad.graph.ops.registry import op


@functools.cache
def _float32() -> Any:
    from fpgrad.arith.emulated import EmulatedArith

    return EmulatedArith("float32")  # torch's float opmath: nearest even


def _machine(cx: Any) -> tuple[Any, Any]:
    """(the machine the kernel's steps round in, the final rounding into cx's format)."""
    ar = cx.ar
    fmt = getattr(ar, "fmt", None)
    if fmt is not None and fmt.precision < 24:
        return _float32(), ar._round
    return ar, lambda v: v


def _value(m: Any, v: Any) -> Any:
    """A Python scalar as the kernel's scalar (converted into m's format), a tensor as itself."""
    return (
        m.const(float(v)) if isinstance(v, (bool, int, float)) else np.asarray(v, dtype=np.float64)
    )


@op("aten.addcmul.default", "aten.addcmul_.default")
def addcmul(cx: Any, a: Any, t1: Any, t2: Any, *, value: float = 1) -> Any:
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        return ar.add(
            scalar(cx, a), ar.mul(ar.mul(scalar(cx, t1), ar.const(float(value))), scalar(cx, t2))
        )
    m, out = _machine(cx)
    return out(m.fma(m.mul(m.const(float(value)), _value(m, t1)), _value(m, t2), _value(m, a)))


@op("aten.addcdiv.default", "aten.addcdiv_.default")
def addcdiv(cx: Any, a: Any, t1: Any, t2: Any, *, value: float = 1) -> Any:
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        q = ar.div(ar.mul(scalar(cx, t1), ar.const(float(value))), scalar(cx, t2))
        return ar.add(scalar(cx, a), q)
    m, out = _machine(cx)
    return out(
        m.add(_value(m, a), m.div(m.mul(m.const(float(value)), _value(m, t1)), _value(m, t2)))
    )


@op("aten.lerp.Scalar", "aten.lerp.Tensor", "aten.lerp_.Scalar", "aten.lerp_.Tensor")
def lerp(cx: Any, a: Any, b: Any, w: Any) -> Any:
    """a + w (b - a); the machines as torch's kernel (see the module's docstring)."""
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        return ar.add(scalar(cx, a), ar.mul(scalar(cx, w), ar.sub(scalar(cx, b), scalar(cx, a))))
    m, out = _machine(cx)
    a, b, w = _value(m, a), _value(m, b), _value(m, w)
    d = m.sub(b, a)
    shape = np.broadcast_shapes(np.shape(d), np.shape(w))
    with np.errstate(invalid="ignore"):
        small = np.broadcast_to(np.abs(np.asarray(w, dtype=np.float64)) < 0.5, shape)
    low = m.fma(w, d, a)
    high = m.fma(m.sub(w, m.const(1.0)), d, b)
    return out(
        np.where(small, np.broadcast_to(low, shape), np.broadcast_to(high, shape)).astype(
            np.float64
        )
    )


_LERPS = ("aten.lerp.Scalar", "aten.lerp_.Scalar")


def _differentiated(cx: Any, x: Any) -> bool:
    """Does ``x`` depend on a parameter other than through ``detach`` (so that autograd
    emits a gradient for it)?"""
    params = [n for n in cx.node.graph.nodes if n.op == "placeholder"][: len(cx.graph.param_names)]
    targets, seen, todo = {id(p) for p in params}, set(), [x]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or id(n) in seen:
            continue
        if id(n) in targets:
            return True
        seen.add(id(n))
        if str(n.target) != "aten.detach.default":
            todo += n.all_input_nodes
    return False


def lerp_scale(cx: Any, value: float) -> Any | None:
    """The real ``1 - w`` where this ``mul.Scalar`` is a ``lerp(a, b, w)``'s backward for
    ``a`` multiplying by torch's float64 ``fl(1 - w)`` (0.7 for w = 0.3 is 2^-54 off); else
    None. The node must multiply a gradient (a value that reaches no forward output); the
    lerps counted are the differentiated ``lerp.Scalar`` whose ``a`` depends on a parameter
    (only those have that backward) and whose ``fl(1 - w)`` is ``value``. Where those lerps
    have several ``w``, or the backward has more such products than lerps (a model's own
    ``add(.., alpha=0.7)`` or custom backward's ``* 0.7`` beside them), the products cannot
    be told apart: an InputError."""
    node = cx.node
    if str(node.target) != "aten.mul.Scalar" or not isinstance(value, float):
        return None
    graph = node.graph
    lerps = [n for n in graph.nodes if str(n.target) in _LERPS
             and isinstance(n.args[2], (int, float)) and 1.0 - float(n.args[2]) == value
             and feeds_forward_outputs(cx, n, detached=False)
             and _differentiated(cx, n.args[0])]  # fmt: skip
    muls = [
        n
        for n in graph.nodes
        if str(n.target) == "aten.mul.Scalar"
        and len(n.args) == 2
        and n.args[1] == value
        and isinstance(n.args[0], fx.Node)
        and not feeds_forward_outputs(cx, n.args[0])
    ]  # a gradient times the constant
    if not lerps or node not in muls:
        return None
    ws = {float(n.args[2]) for n in lerps}
    if len(ws) != 1 or len(muls) > len(lerps):
        raise InputError(
            f"{cx.label()}: the backward multiplies by {value!r}, torch's float64 1 - w of "
            f"lerp (w in {sorted(ws)}), in {len(muls)} places for {len(lerps)} lerps: the exact "
            "reference cannot tell lerp's 1 - w from the model's own constant; use another "
            "weight or constant (or a tensor weight)"
        )
    ar = cx.ar
    return ar.sub(ar.const(1.0), ar.const(ws.pop()))
