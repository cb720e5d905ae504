"""Pairwise distances: ``torch.cdist``'s direct kernel (``_cdist_forward``, ``_cdist_backward``)
for p = 2 and p = 1.

torch sends p = 2 between larger sets (more than 25 rows) to its matrix-product form
(``_euclidean_dist``: sums, ``matmul``, ``clamp_min``, ``sqrt``), traced as those ops; the
direct kernel computes ``dist_ij = (sum_k |x1_ik - x2_jk|^p)^(1/p)`` and its backward
``grad_x1_i = sum_j (g_ij (x1_i - x2_j)) / dist_ij`` (p = 2; 0 where ``dist_ij == 0``, torch's
convention) or ``sum_j g_ij sign(x1_i - x2_j)`` (p = 1). The zero test and the signs are the
exact systems' proofs (:func:`fpgrad.graph.ops.norms.eq_scalar`, ``positive``): a distance
the balls cannot tell from 0 escalates and ends undetermined, never guessed. Emulated columns
round in this order (difference, power, the system's sum, root), not necessarily in the order
of torch's vectorised kernel.
"""

from __future__ import annotations

from typing import Any, NoReturn

import numpy as np

from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.ops._util import sum_dims
from fpgrad.graph.ops.norms import eq_scalar
from fpgrad.graph.ops.registry import op


def _refuse(cx: Any, what: str, fix: str = "use p=1 or p=2") -> NoReturn:
    raise InputError(f"{cx.label()}: {what}; {fix}, or write the distance with torch ops "
                     "(x1[:, None] - x2[None]).norm(dim=-1)")  # fmt: skip


def _pairs(cx: Any, x1: Any, x2: Any) -> Any:
    """``x1_i - x2_j`` of shape (..., P, R, M)."""
    s1, s2 = tuple(shapes.shape(x1)), tuple(shapes.shape(x2))
    if len(s1) < 2 or s1[:-2] != s2[:-2] or s1[-1] != s2[-1]:
        _refuse(cx, f"operands of shapes {list(s1)} and {list(s2)}",
                "expand both to one batch shape and the same feature size")  # fmt: skip
    full = (*s1[:-1], s2[-2], s1[-1])
    a = shapes.expand(shapes.unsqueeze(x1, len(s1) - 1), full)
    b = shapes.expand(shapes.unsqueeze(x2, len(s2) - 2), full)
    return cx.ar.sub(a, b)


def _order(cx: Any, p: float) -> int:
    if float(p) not in (1.0, 2.0):
        _refuse(cx, f"p = {p} is not supported")
    return int(p)


def _sign(cx: Any, d: Any) -> Any:
    """sign(d) in the system: +1, -1, or 0 where d is exactly 0 (undecided: escalation)."""
    ar = cx.ar
    up = np.asarray(ar.positive(d), dtype=bool)
    down = np.asarray(ar.positive(ar.mul(d, ar.const(-1.0))), dtype=bool)
    return ar.asarray(up.astype(np.float64) - down.astype(np.float64))


@op("aten._cdist_forward.default")
def cdist(cx: Any, x1: Any, x2: Any, p: float, compute_mode: Any = None) -> Any:
    ar = cx.ar
    d = _pairs(cx, x1, x2)
    if _order(cx, p) == 1:
        return sum_dims(cx, ar.abs(d), [-1], False)
    return ar.sqrt(sum_dims(cx, ar.mul(d, d), [-1], False))


@op("aten._cdist_backward.default")
def cdist_backward(cx: Any, grad: Any, x1: Any, x2: Any, p: float, dist: Any) -> Any:
    ar = cx.ar
    d = _pairs(cx, x1, x2)
    full = shapes.shape(d)
    g = shapes.expand(shapes.unsqueeze(grad, len(full) - 1), full)
    if _order(cx, p) == 1:
        terms = ar.mul(g, _sign(cx, d))
    else:
        zero = eq_scalar(cx, dist, 0.0)
        safe = ar.where(zero, ar.asarray(np.ones(zero.shape)), dist) if zero.any() else dist
        q = ar.div(ar.mul(g, d), shapes.expand(shapes.unsqueeze(safe, len(full) - 1), full))
        if zero.any():
            z = np.broadcast_to(zero[..., None], full)
            q = ar.where(z, ar.asarray(np.zeros(full)), q)
        terms = q
    return sum_dims(cx, terms, [len(full) - 2], False)
