"""Comparisons, boolean masks and piecewise-linear selections: gt/ge/lt/le/eq/ne, logical
and bitwise ops on masks, where, clamp, hardtanh, hardsigmoid, hardswish, PReLU,
maximum/minimum and amax, forward and backward.

Masks are plain numpy boolean arrays. Exact systems decide a comparison of two values by the
sign of their difference, computed in the system (:meth:`Arith.positive`): a tie is an exact
zero, decided as torch decides it; a ball straddling 0 is counted by ``positive`` (the fast
balls then escalate to Arb; Arb's undecided mask either reaches ``where`` itself, which takes
the union of both branches, or is untracked and the run is undetermined at the cap). Ties no
ball can show are structural (:mod:`fpgrad.graph.ops._ties`): an operand compared with itself
(or the same pure op of the same arguments), and amax's ``x == amax(x)`` (decided on z where
x = f(z), f strictly increasing). Emulated systems compare their rounded values as the
machine does (NaN compares false; a Python scalar is first rounded into the format, as torch
casts it to the tensor's dtype).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from fpgrad.arith.base import ExactDerivatives
from fpgrad.graph import shapes
from fpgrad.graph.ops._ties import above, increasing_root, is_max, same, through
from fpgrad.graph.ops._util import scalar
from fpgrad.graph.ops.registry import op

_WHERE = "aten.where.self"
_NUMPY = {"gt": np.greater, "ge": np.greater_equal, "lt": np.less, "le": np.less_equal,
          "eq": np.equal, "ne": np.not_equal}  # fmt: skip


def _exact(cx: Any) -> bool:
    return isinstance(cx.ar, ExactDerivatives)


def _plain(x: Any) -> bool:
    """A numpy boolean or integer array, or a Python number: not a value of the system."""
    if isinstance(x, (bool, int, float)):
        return True
    return isinstance(x, np.ndarray) and x.dtype.kind in "biu"


def _integral(x: Any) -> bool:
    """A mask, an integer array or a Python bool or int (torch keeps their dtype)."""
    return not isinstance(x, float) and _plain(x)


def _full(cx: Any, x: Any, shape: tuple[int, ...]) -> Any:
    """``x`` (a value or a Python number) as a value of ``shape``."""
    v = scalar(cx, x)
    return v if shapes.shape(v) == shape else shapes.expand(v, shape)


def _keep(cx: Any, mask: np.ndarray) -> np.ndarray:
    """``mask`` itself when every reader of this node uses it as a ``where`` condition (Arb's
    ``where`` then takes the union of both branches where it is undecided); else a plain
    copy (an undecided element then leaves Arb's mask untracked: nothing is certified)."""
    users = list(cx.node.users)
    if users and all(_reads_as_condition(u, cx.node, np.shape(mask)) for u in users):
        return mask
    return np.array(mask, dtype=bool)


def _reads_as_condition(user: fx.Node, node: fx.Node, shape: tuple[int, ...]) -> bool:
    """Is ``user`` a ``where`` whose condition alone is ``node``, selecting floating values
    (the system's ``where``) into an output of the mask's own shape (a broadcast mask
    would lose its undecided elements)?"""
    if str(user.target) != _WHERE or user.args[0] is not node or node in user.args[1:]:
        return False
    val = user.meta.get("val")
    return (isinstance(val, torch.Tensor) and val.is_floating_point()
            and tuple(val.shape) == tuple(shape))  # fmt: skip


def greater(cx: Any, a: Any, b: Any) -> np.ndarray:
    """a > b: in the exact systems the sign of a - b (0 exactly: False); elsewhere the
    machine's comparison of its values (NaN: False)."""
    ar = cx.ar
    if _exact(cx):
        return above(ar, scalar(cx, a), scalar(cx, b))
    return compare_rounded(cx, a, b, "gt")


def compare_rounded(cx: Any, a: Any, b: Any, kind: str) -> np.ndarray:
    """The comparison ``kind`` of a strict machine's values (Python numbers rounded into its
    format first), NaN as IEEE compares it."""

    def v(x: Any) -> Any:
        if isinstance(x, (bool, int, float)):
            return np.float64(cx.ar.const(float(x)))
        return np.asarray(x)

    with np.errstate(invalid="ignore"):
        return np.asarray(_NUMPY[kind](v(a), v(b)), dtype=bool)


def compare(cx: Any, a: Any, b: Any, kind: str) -> np.ndarray:
    """``a kind b`` (gt, ge, lt, le, eq, ne), broadcast; see the module's docstring."""
    if (_plain(a) and _plain(b)) or not _exact(cx):
        if _plain(a) and _plain(b):
            return np.asarray(_NUMPY[kind](np.asarray(a), np.asarray(b)), dtype=bool)
        return compare_rounded(cx, a, b, kind)
    if kind == "gt":
        return greater(cx, a, b)
    if kind == "lt":
        return greater(cx, b, a)
    above, below = greater(cx, a, b), greater(cx, b, a)
    out = {"ge": ~below, "le": ~above, "eq": ~(above | below), "ne": above | below}[kind]
    return np.array(out, dtype=bool)


def _same_value(cx: Any, a: Any, b: Any) -> bool:
    """Are both operands one node's value, element for element (through aliases and
    same-shape views)? Then every element ties: decided without a ball of x - x."""
    x, y = cx.node.args[0], cx.node.args[1]
    if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
        return False
    if not same(through(x), through(y), 256):
        return False
    base = cx.value(through(x))
    return shapes.shape(a) == shapes.shape(b) == shapes.shape(base)


def _register(kind: str) -> None:
    names = [f"aten.{kind}.Tensor", f"aten.{kind}.Scalar"]

    @op(*names)
    def cmp(cx: Any, a: Any, b: Any) -> np.ndarray:
        if _exact(cx):
            tie = _same_value(cx, a, b)
            if tie:
                return np.full(shapes.shape(a), kind in ("ge", "le", "eq"))
            tied = _ties_of_max(cx) if kind == "eq" else None
            if tied is not None:
                return tied
        return _keep(cx, compare(cx, a, b, kind))

    cmp.__name__ = kind
    cmp.__doc__ = f"torch's ``{kind}`` (a boolean mask): :func:`compare`."


for _kind in _NUMPY:
    _register(_kind)


# ---- masks ------------------------------------------------------------------------------------
def truth(cx: Any, x: Any) -> np.ndarray:
    """torch's truth value of a tensor: a mask as it is, a number != 0 (decided exactly)."""
    if isinstance(x, np.ndarray) and x.dtype.kind == "b":
        return np.asarray(x)
    if _plain(x):
        return np.asarray(x) != 0
    return compare(cx, x, 0.0, "ne")


@op("aten.logical_and.default", "aten.logical_and_.default")
def logical_and(cx: Any, a: Any, b: Any) -> np.ndarray:
    return np.logical_and(truth(cx, a), truth(cx, b))


@op("aten.logical_or.default", "aten.logical_or_.default")
def logical_or(cx: Any, a: Any, b: Any) -> np.ndarray:
    return np.logical_or(truth(cx, a), truth(cx, b))


@op("aten.logical_xor.default", "aten.logical_xor_.default")
def logical_xor(cx: Any, a: Any, b: Any) -> np.ndarray:
    return np.logical_xor(truth(cx, a), truth(cx, b))


@op("aten.logical_not.default", "aten.logical_not_.default")
def logical_not(cx: Any, a: Any) -> np.ndarray:
    return np.logical_not(truth(cx, a))


def _bits(cx: Any, *xs: Any) -> list[np.ndarray]:
    """Operands of a bitwise op: masks or integer arrays (``&``, ``|``, ``~`` of masks)."""
    out = []
    for x in xs:
        if not _plain(x):
            from fpgrad.errors import InputError

            raise InputError(f"{cx.label()}: a bitwise op of a floating tensor")
        out.append(np.asarray(x))
    return out


@op("aten.bitwise_and.Tensor", "aten.bitwise_and_.Tensor")
def bitwise_and(cx: Any, a: Any, b: Any) -> np.ndarray:
    x, y = _bits(cx, a, b)
    return np.asarray(x & y)


@op("aten.bitwise_or.Tensor", "aten.bitwise_or_.Tensor")
def bitwise_or(cx: Any, a: Any, b: Any) -> np.ndarray:
    x, y = _bits(cx, a, b)
    return np.asarray(x | y)


@op("aten.bitwise_xor.Tensor", "aten.bitwise_xor_.Tensor")
def bitwise_xor(cx: Any, a: Any, b: Any) -> np.ndarray:
    x, y = _bits(cx, a, b)
    return np.asarray(x ^ y)


@op("aten.bitwise_not.default", "aten.bitwise_not_.default")
def bitwise_not(cx: Any, a: Any) -> np.ndarray:
    (x,) = _bits(cx, a)
    return np.asarray(~x)


@op("aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar")
def where(cx: Any, cond: Any, a: Any, b: Any) -> Any:
    """a where ``cond`` else b, broadcast. A mask straight from a strict comparison reaches
    the system's ``where`` as it is (Arb: the union of both branches where undecided)."""
    if not (isinstance(cond, np.ndarray) and cond.dtype.kind == "b"):
        cond = truth(cx, cond)
    if _integral(a) and _integral(b):  # masks or integers: numpy's where, their dtype kept
        return np.where(np.asarray(cond), np.asarray(a), np.asarray(b))
    shape = tuple(np.broadcast_shapes(np.shape(cond), shapes.shape(scalar(cx, a)),
                                      shapes.shape(scalar(cx, b))))  # fmt: skip
    if np.shape(cond) != shape:
        cond = np.broadcast_to(np.asarray(cond), shape)
    return cx.ar.where(cond, _full(cx, a, shape), _full(cx, b, shape))


# ---- clamp and friends -----------------------------------------------------------------------
def _bound(cx: Any, x: Any) -> Any:
    """A clamp bound as a value: a Python number as given (exact systems) or rounded into the
    format, as torch's kernels cast it to the tensor's dtype."""
    return scalar(cx, x)


def clamp_value(cx: Any, x: Any, lo: Any, hi: Any) -> Any:
    """torch's ``min(max(x, lo), hi)`` (``hi`` when lo > hi; NaN kept; on a tie the input,
    so -0.0 clamped at 0.0 stays -0.0). Exact systems: branches by exact signs."""
    ar = cx.ar
    y = x
    for bound, upper in ((lo, False), (hi, True)):
        if bound is None:
            continue
        c = _bound(cx, bound)
        shape = tuple(np.broadcast_shapes(shapes.shape(y), shapes.shape(c)))
        y = _full(cx, y, shape)
        if _exact(cx):
            out = above(ar, y, c) if upper else above(ar, c, y)
        else:
            yy, cc = np.asarray(y), np.asarray(c)
            with np.errstate(invalid="ignore"):
                out = (yy > cc) if upper else (yy < cc)
        y = ar.where(out, _full(cx, c, shape), y)
    return y


@op("aten.clamp.default", "aten.clamp.Tensor", "aten.clamp_.default", "aten.clamp_.Tensor")
def clamp(cx: Any, x: Any, lo: Any = None, hi: Any = None) -> Any:
    """torch's clamp; its backward is traced as ge/le/logical_and/where. In place (``_``):
    as a new value (capture refuses one whose input is read later or aliased)."""
    return clamp_value(cx, x, lo, hi)


@op("aten.clamp_min.default", "aten.clamp_min.Tensor", "aten.clamp_min_.default",
    "aten.clamp_min_.Tensor")  # fmt: skip
def clamp_min(cx: Any, x: Any, lo: Any) -> Any:
    return clamp_value(cx, x, lo, None)


@op("aten.clamp_max.default", "aten.clamp_max.Tensor", "aten.clamp_max_.default",
    "aten.clamp_max_.Tensor")  # fmt: skip
def clamp_max(cx: Any, x: Any, hi: Any) -> Any:
    return clamp_value(cx, x, None, hi)


@op("aten.hardtanh.default", "aten.hardtanh_.default")
def hardtanh(cx: Any, x: Any, lo: float = -1.0, hi: float = 1.0) -> Any:
    """clamp(x, lo, hi) (ReLU6 is hardtanh(0, 6))."""
    return clamp_value(cx, x, lo, hi)


def _inside(cx: Any, x: Any, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """(x > lo, x < hi): exact signs, or the machine's comparison with the bounds in torch's
    compute type: float32 for a format no wider than float32 (torch's float32, bfloat16 and
    float16 CPU kernels convert the bounds to float: x = float32(0.7) is on the bound 0.7),
    float64 otherwise."""
    ar = cx.ar
    if _exact(cx):
        return above(ar, x, ar.const(float(lo))), above(ar, ar.const(float(hi)), x)
    xx = np.asarray(x)
    fmt = getattr(ar, "fmt", None)
    narrow = fmt is not None and fmt.man_bits <= 23
    with np.errstate(invalid="ignore", over="ignore"):
        a, b = (float(np.float32(lo)), float(np.float32(hi))) if narrow else (float(lo), float(hi))
        return xx > a, xx < b


@op("aten.hardtanh_backward.default")
def hardtanh_backward(cx: Any, g: Any, x: Any, lo: float, hi: float) -> Any:
    """torch's ``x <= lo || x >= hi ? 0 : g``: the gradient strictly inside only; 0 where x
    is NaN (a strict machine), as torch's vectorised kernel (its scalar tail gives g)."""
    ar = cx.ar
    zero = ar.asarray(np.zeros(shapes.shape(g)))
    above, below = _inside(cx, x, lo, hi)
    return ar.where(below, ar.where(above, g, zero), zero)  # each mask as positive gave it


@op("aten.hardsigmoid.default", "aten.hardsigmoid_.default")
def hardsigmoid(cx: Any, x: Any) -> Any:
    """min(max(x + 3, 0), 6) / 6 (torch's kernel, each step rounded); exact systems: 0 for
    x <= -3, 1 for x >= 3, else (x + 3) / 6 (exact 0 and 1 where saturated)."""
    ar = cx.ar
    shape = shapes.shape(x)
    t = ar.add(x, ar.const(3.0))
    if _exact(cx):
        y = ar.div(t, ar.const(6.0))
        y = ar.where(above(ar, ar.const(-3.0), x), ar.asarray(np.zeros(shape)), y)
        return ar.where(above(ar, x, ar.const(3.0)), ar.asarray(np.ones(shape)), y)
    return ar.div(clamp_value(cx, t, 0.0, 6.0), ar.const(6.0))


@op("aten.hardsigmoid_backward.default")
def hardsigmoid_backward(cx: Any, g: Any, x: Any) -> Any:
    """torch's ``-3 < x < 3 ? g / 6 : 0`` (NaN: 0); a strict machine multiplies by torch's
    constant, the float32 literal ``1.0f / 6.0f`` in every dtype (float64's gradient is
    3e-8 off), rounded into its format; the exact systems divide by 6."""
    ar = cx.ar
    zero = ar.asarray(np.zeros(shapes.shape(g)))
    above, below = _inside(cx, x, -3.0, 3.0)
    if _exact(cx):
        inner = ar.div(g, ar.const(6.0))
    else:
        inner = ar.mul(g, ar.const(float(np.float32(1.0) / np.float32(6.0))))
    return ar.where(below, ar.where(above, inner, zero), zero)


@op("aten.hardswish.default", "aten.hardswish_.default")
def hardswish(cx: Any, x: Any) -> Any:
    """x min(max(x + 3, 0), 6) / 6 (torch's kernel: the product, then the division); exact
    systems: 0 for x <= -3, x for x >= 3, else x (x + 3) / 6."""
    ar = cx.ar
    t = ar.add(x, ar.const(3.0))
    if _exact(cx):
        y = ar.div(ar.mul(x, t), ar.const(6.0))
        zero = ar.asarray(np.zeros(shapes.shape(x)))
        y = ar.where(above(ar, ar.const(-3.0), x), zero, y)
        return ar.where(above(ar, x, ar.const(3.0)), x, y)
    return ar.div(ar.mul(x, clamp_value(cx, t, 0.0, 6.0)), ar.const(6.0))


@op("aten.hardswish_backward.default")
def hardswish_backward(cx: Any, g: Any, x: Any) -> Any:
    """torch's ``x <= -3 ? 0 : (x < 3 ? g (x / 3 + 1/2) : g)`` (NaN: NaN, as torch's
    vectorised kernel; its scalar tail gives g); the exact systems write the slope as
    (2x + 3) / 6 (no cancellation near x = -3/2)."""
    ar = cx.ar
    zero = ar.asarray(np.zeros(shapes.shape(g)))
    above, below = _inside(cx, x, -3.0, 3.0)
    if _exact(cx):
        slope = ar.div(ar.add(ar.mul(x, ar.const(2.0)), ar.const(3.0)), ar.const(6.0))
        return ar.where(above, ar.where(below, ar.mul(g, slope), g), zero)
    nan = np.isnan(np.asarray(x))
    slope = ar.add(ar.div(x, ar.const(3.0)), ar.const(0.5))
    return ar.where(above | nan, ar.where(below | nan, ar.mul(g, slope), g), zero)


# ---- PReLU -----------------------------------------------------------------------------------
@op("aten._prelu_kernel.default")
def prelu(cx: Any, x: Any, w: Any) -> Any:
    """torch's ``x > 0 ? x : w x`` (w broadcast; NaN: w NaN = NaN)."""
    ar = cx.ar
    wx = ar.mul(w, x)
    shape = shapes.shape(wx)
    return ar.where(ar.positive(_full(cx, x, shape)), _full(cx, x, shape), wx)


@op("aten._prelu_kernel_backward.default")
def prelu_backward(cx: Any, g: Any, x: Any, w: Any) -> tuple[Any, Any]:
    """(``x > 0 ? g : w g``, ``x > 0 ? 0 : x g``): torch's kernel, elementwise (the weight's
    gradient is summed by the traced ``sum``)."""
    ar = cx.ar
    shape = shapes.shape(g)
    pos = ar.positive(_full(cx, x, shape))
    dx = ar.where(pos, g, _full(cx, ar.mul(w, g), shape))
    dw = ar.where(pos, ar.asarray(np.zeros(shape)), ar.mul(x, g))
    return dx, dw


# ---- maximum, minimum, amax ------------------------------------------------------------------
def _extreme(cx: Any, a: Any, b: Any, larger: bool) -> Any:
    """torch's maximum (``larger``) or minimum: the other operand where it is strictly
    larger (smaller), else ``a`` (a tie keeps a's -0.0 or 0.0); NaN if either is NaN."""
    ar = cx.ar
    shape = tuple(np.broadcast_shapes(shapes.shape(scalar(cx, a)), shapes.shape(scalar(cx, b))))
    aa, bb = _full(cx, a, shape), _full(cx, b, shape)
    if _exact(cx) and _same_value(cx, a, b):
        return aa  # maximum(x, x): no ball of x - x to decide
    if _exact(cx):
        return ar.where(above(ar, bb, aa) if larger else above(ar, aa, bb), bb, aa)
    x, y = np.asarray(aa, dtype=np.float64), np.asarray(bb, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        pick = (y > x) if larger else (y < x)
    out = ar.where(pick, bb, aa)
    return np.where(np.isnan(x) | np.isnan(y), np.nan, out)


@op("aten.maximum.default")
def maximum(cx: Any, a: Any, b: Any) -> Any:
    """Its backward is traced (eq/where/gt/masked_fill: a tie splits the gradient)."""
    return _extreme(cx, a, b, True)


@op("aten.minimum.default")
def minimum(cx: Any, a: Any, b: Any) -> Any:
    return _extreme(cx, a, b, False)


def _axes(x: Any, dims: Any) -> list[int]:
    nd = len(shapes.shape(x))
    if nd == 0:
        return []
    if dims is None or (not isinstance(dims, int) and len(dims) == 0):
        return list(range(nd))
    dims = [dims] if isinstance(dims, int) else dims
    return sorted({int(d) % nd for d in dims})


@op("aten.amax.default")
def amax(cx: Any, x: Any, dims: Any = (), keepdim: bool = False) -> Any:
    """The largest element over ``dims`` (all when empty), one slot call per axis (NaN
    propagates in a strict machine, as torch's amax)."""
    out = x
    for a in sorted(_axes(x, dims), reverse=True):
        out = cx.ar.max(out, axis=a, keepdims=True)
    if not keepdim:
        axes = _axes(x, dims)
        out = shapes.reshape(out, [s for i, s in enumerate(shapes.shape(out)) if i not in axes])
    return out


@op("aten.amin.default")
def amin(cx: Any, x: Any, dims: Any = (), keepdim: bool = False) -> Any:
    """-amax(-x) (negation is exact in every system)."""
    neg = cx.ar.mul(x, cx.ar.const(-1.0))
    return cx.ar.mul(amax(cx, neg, dims, keepdim), cx.ar.const(-1.0))


_EXTREMA = {"aten.amax.default": 1.0, "aten.amin.default": -1.0}


def _ties_of_max(cx: Any) -> np.ndarray | None:
    """``x == amax(x, dims)`` (amax's traced backward; amin's as the maxima of -x), decided
    in the exact systems without comparing the maximum's ball with itself: each slice's
    candidate k (the largest midpoint), then the sign of ``x_k - x_i`` for every other
    element (exactly 0: a tie, also a maximum). Elsewhere None (the plain comparison).
    amax's argument and the compared operand must both have x's shape: the views ``through``
    skips (reshape, unsqueeze, expand) then keep every element in place (a chain of them
    from one shape back to the same shape cannot grow the count, so every expand is
    trivial, and reshapes keep row-major order), so the maxima are over x's own ``dims``."""
    node = cx.node
    for i in (0, 1):
        m, other = through(node.args[i]), through(node.args[1 - i])
        if not (isinstance(m, fx.Node) and str(m.target) in _EXTREMA):
            continue
        if through(m.args[0]) is not other or not isinstance(other, fx.Node):
            continue
        x = cx.value(other)
        dims = m.args[1] if len(m.args) > 1 else ()
        axes = _axes(x, dims)
        kept = tuple(1 if d in axes else s for d, s in enumerate(shapes.shape(x)))
        if (shapes.shape(x) != shapes.shape(cx.value(node.args[1 - i]))
                or shapes.shape(cx.value(m.args[0])) != shapes.shape(x)
                or shapes.shape(cx.value(node.args[i])) != kept):  # fmt: skip
            continue  # not amax's backward (restored dims against x): the plain comparison
        root = increasing_root(other)  # the same maxima, decided on f's argument
        if root is not None and shapes.shape(cx.value(root)) == shapes.shape(x):
            x = cx.value(root)
        if _EXTREMA[str(m.target)] < 0:
            x = cx.ar.mul(x, cx.ar.const(-1.0))
        tied = is_max(cx, x, axes)
        return None if tied is None else _keep(cx, tied)
    return None
