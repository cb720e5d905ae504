"""Helpers shared by the op modules."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
from torch import fx

from fpgrad.arith.base import ExactDerivatives
from fpgrad.graph import shapes


def scalar(cx: Any, x: Any) -> Any:
    """A Python number as a constant of the system; arrays pass through."""
    if isinstance(x, (bool, int, float)):
        return cx.ar.const(float(x))
    if isinstance(x, np.ndarray) and x.dtype.kind in "iu":
        return enter_integers(cx.ar, x)
    if isinstance(x, np.ndarray) and x.dtype.kind in "bf":  # a constant computed by torch
        return cx.ar.asarray(x.astype(np.float64))
    return x


_F64_MAX = float(np.finfo(np.float64).max)


#: ops that create a filled constant (torch's ``lowest()`` in a backward formula)
_FILLS = {"aten.scalar_tensor.default", "aten.full.default", "aten.full_like.default",
          "aten.new_full.default"}  # fmt: skip


def formula_fill(graph: Any, node: Any) -> bool:
    """Is ``node`` a fill that only the backward reads (logcumsumexp's ``lowest()``), so that
    its float64 maximum stands for the dtype's? A model's own constant (one that reaches the
    loss) is rounded into the format as any value is."""
    if getattr(node, "op", None) != "call_function" or str(node.target) not in _FILLS:
        return False
    return not feeds_forward_outputs(SimpleNamespace(graph=graph), node)


def lowest_as_format(ar: Any, x: np.ndarray) -> np.ndarray:
    """A float64 constant with float64's largest magnitude (torch's ``lowest()`` or ``max()``
    of the float64 trace, e.g. in logcumsumexp's backward) as a machine's largest magnitude:
    what torch's formula uses in that dtype, not the infinity rounding would give."""
    fmt = getattr(ar, "fmt", None)
    if fmt is None or isinstance(ar, ExactDerivatives) or not (np.abs(x) == _F64_MAX).any():
        return x
    return np.where(np.abs(x) == _F64_MAX, np.copysign(float(fmt.max), x), x)


def enter_integers(ar: Any, x: np.ndarray) -> Any:
    """An integer array as values of ``ar``: in the exact systems the integers themselves
    (beyond 2^53 as the sum of the float64 nearest and the small rest), elsewhere their
    float64 roundings (torch's conversion)."""
    hi = np.asarray(x).astype(np.float64)
    if not isinstance(ar, ExactDerivatives) or not (np.abs(hi) > 2.0**53).any():
        return ar.asarray(hi)
    exact = np.asarray(x).astype(object)
    rest = exact - np.vectorize(int, otypes=[object])(hi) if exact.size else exact
    return ar.add(ar.asarray(hi), ar.asarray(np.asarray(rest, dtype=object).astype(np.float64)))


def zeros(cx: Any, shape: tuple[int, ...]) -> Any:
    return cx.ar.asarray(np.zeros(shape))


def sum_dims(cx: Any, x: Any, dims: Any, keepdim: bool) -> Any:
    """Sum over ``dims`` (None or empty: all): in the exact systems one slot call per axis,
    last axis first; in a rounding machine one slot call over the reduced axes flattened."""
    nd = len(shapes.shape(x))
    if nd == 0:
        return x
    axes = range(nd) if dims is None or len(dims) == 0 else dims
    axes = sorted({int(d) % nd for d in axes}, reverse=True)
    shape = shapes.shape(x)
    if 0 in shape:  # a sum over no element is exactly 0 (torch's too), in every system
        kept = tuple(1 if i in axes else n for i, n in enumerate(shape))
        out = zeros(cx, kept)
    elif len(axes) > 1 and not isinstance(cx.ar, ExactDerivatives):
        # a rounding machine sums every reduced element in one accumulation, rounded once
        # (torch's float16/bfloat16 ``sum`` over several dims: one float accumulator): the
        # reduced axes moved last in their order and flattened, row-major as torch's
        # contiguous order. One slot call per axis rounded into the format per axis:
        # fp8_e5m2's sum of three rows [2, 0.25] gave 2 + 2 + 2 = 6 for 6.75 -> 7, and
        # float16's of three rows [1024, 0.5] 3072 where torch gives 3074.
        order = sorted(axes)
        kept_axes = [i for i in range(nd) if i not in order]
        moved = shapes.reshape(shapes.permute(x, (*kept_axes, *order)),
                               (*(shape[i] for i in kept_axes), -1))  # fmt: skip
        out = cx.ar.sum(moved, axis=len(kept_axes), keepdims=False)
        kept = tuple(1 if i in axes else n for i, n in enumerate(shape))
        out = shapes.reshape(out, kept)
    else:
        out = x
        for a in axes:
            out = cx.ar.sum(out, axis=a, keepdims=True)
    if not keepdim:
        out = shapes.reshape(out, [s for i, s in enumerate(shapes.shape(out)) if i not in axes])
    return out


def exact_count(ar: Any, n: Any) -> Any:
    """An element count (a mean's, a norm's or a pooling window's divisor; a scalar or an
    array) as a value of the system, exactly: the operation is a division by ``n`` itself,
    correctly rounded once, as torch's kernels divide by the integer count in float (float16
    and bfloat16 too). A rounding machine must not store ``n`` in its format first: fp8_e5m2
    holds 9 as 8, so a mean of 9 elements summing to 10 gave 10 / 8 = 1.25 for 1.0, and
    float16 holds 2049 as 2048 (``ar.count``: the float64 integer, unrounded)."""
    arr = np.asarray(n, dtype=np.float64)
    exact = getattr(ar, "count", None)
    if exact is not None:
        return exact(arr)
    return ar.const(float(arr)) if arr.ndim == 0 else ar.asarray(arr)


def count(x: Any, dims: Any) -> int:
    """How many elements a reduction over ``dims`` (None or empty: all) takes."""
    s = shapes.shape(x)
    if dims is None or len(dims) == 0:
        return int(np.prod(s)) if s else 1
    return int(np.prod([s[int(d) % len(s)] for d in set(int(d) % len(s) for d in dims)]))


class MissingSlot(ValueError):
    """The number system lacks a slot an op needs (the exact reference then uses mpmath)."""


def _slot(cx: Any, name: str) -> Any:
    fn = getattr(cx.ar, name, None)
    if fn is None:
        raise MissingSlot(f"{cx.label()} needs the slot {name!r}, which {cx.ar.name} lacks")
    return fn


def above(cx: Any, x: Any, threshold: float = 0.0) -> Any:
    """torch's ``!(x <= threshold)``: x > threshold, or NaN (a strict machine's NaN takes
    the branch torch's kernels take for it); the exact systems hold no NaN."""
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        return ar.positive(x if threshold == 0 else ar.sub(x, ar.const(float(threshold))))
    x = np.asarray(x, dtype=np.float64)  # exact comparison with the threshold the format holds
    return (x > (ar.const(float(threshold)) if threshold != 0 else 0.0)) | np.isnan(x)


def feeds_forward_outputs(cx: Any, node: Any, detached: bool = True) -> bool:
    """Does ``node`` reach the loss or a tap's value (the graph's forward outputs: flat
    outputs 0 and those after the gradients, :func:`fpgrad.graph.capture.split_outputs`)?
    A backward op reaches only gradients. ``detached=False``: not through ``detach`` (a
    value the loss is differentiated through)."""
    out = next(n for n in node.graph.nodes if n.op == "output")
    flat = list(out.args[0])
    first_value = 1 + len(cx.graph.param_names) + len(cx.graph.taps)
    targets = {id(v) for v in [flat[0], *flat[first_value:]] if isinstance(v, fx.Node)}
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if id(n) in targets:
            return True
        if id(n) not in seen:
            seen.add(id(n))
            todo += [u for u in n.users if detached or str(u.target) != "aten.detach.default"]
    return False


def integers(*xs: Any) -> bool:
    """Integer tensors (and Python ints) only: torch's integer arithmetic, in numpy int64
    (cumprod's backward counts zeros and computes indices so)."""
    arrays = [x for x in xs if isinstance(x, np.ndarray)]
    return bool(arrays) and all(
        (isinstance(x, np.ndarray) and x.dtype.kind in "iu") or (isinstance(x, int) and not isinstance(x, bool))
        for x in xs
    )
