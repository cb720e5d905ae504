"""Constants torch derives in float64 from a definition, as the reals they round.

Label smoothing:
torch's cross-entropy with label smoothing ``eps`` over ``C`` classes returns
``fl(1 - eps) * nll + smooth * fl(eps / C)`` and seeds its backward with the same two float64
constants (``aten.mul.Scalar`` nodes); with probability targets ``t`` it weighs the
log-probabilities by ``t * fl(1 - eps) + fl(eps / C)`` (``mul.Scalar``, ``add.Scalar``). The exact systems use ``1 - eps`` and ``eps / C``
themselves: ``eps`` is the ``label_smoothing`` of a traced ``F.cross_entropy`` call
(:attr:`Graph.smoothing`) that rounds to both constants, else the one float64 ``eps`` that
does (an InputError where several do: 0.1 and its predecessor both give 0.9 and 0.1 / 3).

nn.MultiheadAttention with ``need_weights=True`` scales q by torch's float64
``sqrt(1 / head_dim)``: the exact systems use ``1 / sqrt(head_dim)``.
"""

from __future__ import annotations

import math
import operator
from typing import Any

from torch import fx, nn

from fpgrad.errors import InputError
from fpgrad.graph import shapes

_NLL_FORWARD = ("aten.nll_loss_forward.default", "aten.nll_loss2d_forward.default")
_NLL_BACKWARD = ("aten.nll_loss_backward.default", "aten.nll_loss2d_backward.default")
_MUL = "aten.mul.Scalar"


def _is(node: Any, targets: tuple[str, ...] | str) -> bool:
    names = (targets,) if isinstance(targets, str) else targets
    return isinstance(node, fx.Node) and str(node.target) in names


def _forward_pair(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(the nll's mul, the smoothing mul, the nll node) when ``node`` is one of the two muls
    of ``add(mul(nll, fl(1 - eps)), mul(smooth, fl(eps / C)))``."""
    for add in node.users:
        if str(add.target) != "aten.add.Tensor" or not all(_is(a, _MUL) for a in add.args[:2]):
            continue
        m1, m2 = add.args[0], add.args[1]
        src = m1.args[0]  # type: ignore[union-attr]
        if (
            isinstance(src, fx.Node)
            and src.target is operator.getitem
            and src.args[1] == 0
            and _is(src.args[0], _NLL_FORWARD)
        ):
            return m1, m2, src.args[0]  # type: ignore[return-value]
    return None


def _backward_pair(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(the nll's mul, the smoothing mul, the nll backward node) when ``node`` and one sibling
    scale the same seed, one of them feeding ``nll_loss_backward`` as its grad_output."""
    seed = node.args[0]
    if not isinstance(seed, fx.Node):
        return None
    muls = [u for u in seed.users if _is(u, _MUL) and isinstance(u.args[1], float)]
    if len(muls) != 2 or node not in muls:
        return None
    for m1, m2 in (muls, muls[::-1]):
        for user in m1.users:
            if _is(user, _NLL_BACKWARD) and user.args[0] is m1 and _smoothed_forward(user, m1, m2):
                return m1, m2, user
    return None


def _smoothed_forward(back: fx.Node, m1: fx.Node, m2: fx.Node) -> bool:
    """Does the forward of this ``nll_loss_backward`` (the nll whose total weight it reads)
    mix its loss with the same two constants (:func:`_forward_pair`)? torch's label smoothing
    always does; a model that scales its own seed twice (``torch.add(.., alpha=0.9)``, whose
    forward is an ``add`` with alpha, no ``mul.Scalar``) is no label smoothing."""
    total = back.args[6] if len(back.args) > 6 else None
    if not (isinstance(total, fx.Node) and total.target is operator.getitem):
        return False
    nll = total.args[0]
    if not _is(nll, _NLL_FORWARD):
        return False
    for item in nll.users:  # type: ignore[union-attr]
        if item.target is not operator.getitem or item.args[1] != 0:
            continue
        for mul in item.users:
            pair = _forward_pair(mul) if _is(mul, _MUL) else None
            if (
                pair is not None
                and pair[2] is nll
                and (pair[0].args[1], pair[1].args[1]) == (m1.args[1], m2.args[1])
            ):
                return True
    return False


def _probability_pair(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(the ``mul.Scalar(t, fl(1 - eps))``, the ``add.Scalar(.., fl(eps / C))``, the log-softmax)
    when ``node`` is one of them and the sum multiplies a log-softmax."""
    mul = node if _is(node, _MUL) else node.args[0]
    if not _is(mul, _MUL) or len(mul.users) != 1:  # type: ignore[union-attr]
        return None
    add = next(iter(mul.users))  # type: ignore[union-attr]
    if (
        not _is(add, "aten.add.Scalar")
        or add.args[0] is not mul
        or (node is not mul and node is not add)
    ):
        return None
    for user in add.users:
        if _is(user, "aten.mul.Tensor"):
            other = user.args[0] if user.args[1] is add else user.args[1]
            if _is(other, "aten._log_softmax.default"):
                return mul, add, other  # type: ignore[return-value]
    return None


def _candidates(a: float, b: float, classes: int) -> list[float]:
    """Every float64 eps with ``1 - eps == a`` and ``eps / classes == b`` in float64."""
    eps, out = b * classes, []
    for _ in range(16):
        eps = math.nextafter(eps, -math.inf)
    for _ in range(33):
        if 1.0 - eps == a and eps / classes == b:
            out.append(eps)
        eps = math.nextafter(eps, math.inf)
    return out


def smoothing_factor(cx: Any, scale: float) -> Any | None:
    """The exact value (in ``cx.ar``) of the label-smoothing constant ``scale`` that this
    ``aten.mul.Scalar`` or ``aten.add.Scalar`` node applies, or None when it is not one."""
    node = cx.node
    if _is(node, _MUL):
        pair = _forward_pair(node) or _backward_pair(node) or _probability_pair(node)
    else:
        pair = _probability_pair(node) if _is(node, "aten.add.Scalar") else None
    if pair is None:
        return None
    m1, m2, nll = pair
    if _is(nll, "aten._log_softmax.default"):
        logp = nll
    else:
        logp = nll.args[0] if _is(nll, _NLL_FORWARD) else nll.args[1]
    shape = shapes.shape(cx.value(logp))
    classes = shape[1] if len(shape) >= 2 else shape[0]
    a, b = m1.args[1], m2.args[1]
    if not isinstance(a, float) or not isinstance(b, float) or classes < 1:
        return None
    cands = _candidates(a, b, classes)
    traced = {e for e in cx.graph.smoothing if e in cands}
    if len(traced) == 1:
        eps = traced.pop()
    elif len(cands) == 1:
        eps = cands[0]
    elif not cands:
        return None
    else:
        raise InputError(
            f"{cx.label()}: label smoothing is one of {len(cands)} float64 values that torch "
            f"rounds to the constants {a!r} and {b!r}; call F.cross_entropy (or "
            "nn.CrossEntropyLoss) with label_smoothing so that the exact reference knows which"
        )
    ar = cx.ar
    if node is m1:
        return ar.sub(ar.const(1.0), ar.const(eps))
    return ar.div(ar.const(eps), ar.const(float(classes)))


def attention_scale(cx: Any, scale: float) -> Any | None:
    """``1 / sqrt(head_dim)`` (in ``cx.ar``) where this node, inside an
    ``nn.MultiheadAttention``, multiplies by torch's float64 ``sqrt(1 / head_dim)``; else None."""
    try:
        module = cx.graph.model.get_submodule(cx.graph.paths.get(cx.node.name, ""))
    except AttributeError:
        return None
    if not isinstance(module, nn.MultiheadAttention):
        return None
    dim = float(module.head_dim)
    if scale != math.sqrt(1.0 / dim):
        return None
    return cx.ar.div(cx.ar.const(1.0), cx.ar.sqrt(cx.ar.const(dim)))


def derived_constant(cx: Any, value: float) -> Any | None:
    """The real constant (in ``cx.ar``) that the float ``value`` of this node rounds, where
    torch derived it from a definition (label smoothing, attention's scale, erf's
    ``2 / sqrt(pi)``); else None."""
    if _is(cx.node, ("aten.mul.Tensor", _MUL)):
        found = attention_scale(cx, value)
        if found is not None:
            return found
        from fpgrad.graph.ops.smooth import erf_scale

        found = erf_scale(cx, value)  # erf's backward: 2 / sqrt(pi)
        if found is not None:
            return found
        from fpgrad.graph.ops.trig import log_scale

        found = log_scale(cx, value)  # exp2's, log2's, log10's backward: ln 2, ln 10
        if found is not None:
            return found
        from fpgrad.graph.ops.blend import lerp_scale

        found = lerp_scale(cx, value)  # lerp's backward: 1 - w
        if found is not None:
            return found
        from fpgrad.graph.ops.trig import pow_base_scale

        found = pow_base_scale(cx, value)  # pow.Scalar's backward: ln(base)
        if found is not None:
            return found
    return smoothing_factor(cx, value)


class _Probe:
    """An arithmetic that computes nothing: every operation returns this probe (never None)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


class _ProbeContext:
    """What the derived-constant rules read of an op's context, before any evaluation: the
    node, the graph, a probe arithmetic, and values of the traced shapes."""

    def __init__(self, graph: Any, node: fx.Node) -> None:
        import numpy as np

        self.graph, self.node, self.ar, self._np = graph, node, _Probe(), np

    def value(self, node: Any) -> Any:
        val = node.meta.get("val") if isinstance(node, fx.Node) else node
        return self._np.zeros(tuple(val.shape)) if hasattr(val, "shape") else val

    def label(self) -> str:
        return self.graph.label(self.node)


def literal_scale(graph: Any, node: fx.Node) -> bool:
    """Do the exact systems multiply by this ``mul`` node's Python float itself? False where
    they read it as a derived real (:func:`derived_constant`, var's backward ``2 / (n - c)``)
    or where the rules cannot tell before evaluation."""
    from fpgrad.graph.ops.reduce import var_backward_divisor

    value = node.args[1] if len(node.args) > 1 else None
    if not isinstance(value, float):
        return True  # mul reads only float scalars as derived constants
    cx = _ProbeContext(graph, node)
    try:
        return derived_constant(cx, value) is None and var_backward_divisor(cx, value) is None
    except Exception:  # noqa: BLE001 - a rule that cannot run on the probe: no rational
        return False
