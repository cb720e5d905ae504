"""Structural facts the comparisons of :mod:`fpgrad.graph.ops.select` use in the exact
systems, where a ball of ``x - x`` never decides a tie: one value reached twice (the same
node, or the same pure op of the same arguments), and the maxima of a tensor (amax's traced
backward compares ``x`` with ``amax(x)``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from fpgrad.arith.ball import Ball
from fpgrad.graph import shapes
from fpgrad.graph.names import PASS_THROUGH

_VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
          "aten.unsqueeze.default", "aten.expand.default", *PASS_THROUGH}  # fmt: skip


def through(node: Any) -> Any:
    while isinstance(node, fx.Node) and str(node.target) in _VIEWS:
        node = node.args[0]
    return node


_IMPURE = {torch.Tag.inplace, torch.Tag.nondeterministic_seeded, torch.Tag.nondeterministic_bitwise}


def pure(node: fx.Node) -> bool:
    """An aten op whose value is a function of its arguments alone (not random, not in
    place, not uninitialised memory)."""
    target = node.target
    name = str(target).split(".")
    if len(name) != 3 or name[0] != "aten" or name[1].endswith("_") or "empty" in name[1]:
        return False
    return not (_IMPURE & set(getattr(target, "tags", ())))


def same(x: Any, y: Any, depth: int, memo: dict | None = None) -> bool:
    """Is ``y`` provably ``x``'s value: the same node, or the same deterministic op of the
    same arguments (``t.tanh()`` written twice), up to ``depth`` levels? Each pair of nodes
    is compared once (``memo``), so shared subgraphs cost no more than their size."""
    if x is y:
        return True
    if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)) or depth <= 0:
        return False
    memo = {} if memo is None else memo
    key = (x, y)
    if key not in memo:
        memo[key] = False  # a cycle cannot occur in a graph; this also bounds the work
        memo[key] = _same_op(x, y, depth, memo)
    return memo[key]


def _same_op(x: fx.Node, y: fx.Node, depth: int, memo: dict) -> bool:
    if x.op != "call_function" or y.op != "call_function" or x.target != y.target:
        return False
    if not pure(x) or x.kwargs != y.kwargs or len(x.args) != len(y.args):
        return False
    for a, b in zip(x.args, y.args, strict=True):
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            if not same(a, b, depth - 1, memo):
                return False
        elif type(a) is not type(b) or a != b:
            return False
    return True


def difference(ar: Any, a: Any, b: Any) -> Any:
    """a - b in the system; in the fast balls, where a and b hold identical words and zero
    radii (one exact value), exactly 0: a tie decided there, not sent to Arb (the balls'
    subtraction keeps a floor radius even when its result is exact)."""
    d = ar.sub(a, b)
    if isinstance(d, Ball) and isinstance(a, Ball) and isinstance(b, Ball):
        aa, bb = shapes.expand(a, d.shape), shapes.expand(b, d.shape)
        if aa.mid.shape[0] == bb.mid.shape[0]:
            tie = (aa.rad == 0) & (bb.rad == 0) & np.all(aa.mid == bb.mid, axis=0)
            if tie.any():
                d = ar.where(tie, ar.mul(d, ar.const(0.0)), d)
    return d


def above(ar: Any, a: Any, b: Any) -> Any:
    """The system's mask of a > b (``positive`` of :func:`difference`)."""
    return ar.positive(difference(ar, a, b))


#: elementwise ops strictly increasing in their first argument (with these coefficients > 0)
INCREASING = {
    "aten.tanh.default": (),
    "aten.sigmoid.default": (),
    "aten.exp.default": (),
    "aten.leaky_relu.default": (1,),
    "aten.elu.default": (1, 2, 3),
}


def increasing_root(node: Any) -> fx.Node | None:
    """``z`` where ``node`` is ``f(z)`` for a chain of strictly increasing elementwise ops
    (:data:`INCREASING`: tanh, sigmoid, exp, leaky ReLU and ELU with
    positive coefficients), else None: f(z_i) = f(z_j) exactly when z_i = z_j and the
    order is the same, so the maxima of f(z) are those of z, which the balls often hold
    exactly where the balls of f(z) cannot tell two equal values apart."""
    found = None
    while isinstance(node, fx.Node) and str(node.target) in INCREASING:
        coefs = [node.args[i] if i < len(node.args) else 1 for i in INCREASING[str(node.target)]]
        if not all(isinstance(c, (int, float)) and c > 0 for c in coefs):
            break
        found = node.args[0]
        while isinstance(found, fx.Node) and str(found.target) in PASS_THROUGH:
            found = found.args[0]
        node = found
    return found if isinstance(found, fx.Node) else None


def is_max(cx: Any, x: Any, axes: list[int]) -> np.ndarray | None:
    """Which elements of ``x`` equal the maximum over ``axes`` (see :func:`_ties_of_max`);
    None if an element is proven above the candidate (then no candidate was found)."""
    ar = cx.ar
    shape = shapes.shape(x)
    if not axes or 0 in shape:
        return np.ones(shape, dtype=bool)
    keep = [d for d in range(len(shape)) if d not in axes]
    perm = keep + axes
    outer = [shape[d] for d in keep]
    n = int(np.prod([shape[d] for d in axes]))
    flat = shapes.reshape(shapes.permute(x, perm), [*outer, n])
    mid = ar.to_float64(flat)
    k = np.argmax(mid, axis=-1)
    grid = tuple(np.indices(outer, sparse=True)) if outer else ()
    for _ in range(n):  # move k while an element's midpoint lies above the candidate's
        chosen = np.arange(n) == k[..., None]
        top = shapes.unsqueeze(shapes.index(flat, (*grid, k)), len(outer))  # x_k, as it is
        d = difference(ar, top, flat)
        dm = ar.to_float64(d)
        low = np.min(dm, axis=-1)
        if not (low < 0).any():
            break
        k = np.where(low < 0, np.argmin(dm, axis=-1), k)
    d = ar.where(chosen, ar.mul(d, ar.const(0.0)), d)  # the candidate: exactly 0
    below = np.array(ar.positive(d), dtype=bool)  # x_i < x_k
    above = np.array(ar.positive(ar.mul(d, ar.const(-1.0))), dtype=bool)  # x_i > x_k
    if above.any():
        return None
    tie = ~(below | above)
    inv = np.argsort(perm)
    return np.transpose(tie.reshape([*outer, *[shape[d] for d in axes]]), inv)
