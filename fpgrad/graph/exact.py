"""The certified exact reference of a captured graph.

First the fast multi-word balls (:class:`~fpgrad.arith.ball.BallArith`, 150 bits), whose
radii certify every value; when they cannot (a value out of their range, a ReLU input whose
ball contains 0, fewer than 17 digits), mpmath at N and 2N bits, certified by agreement, as
:mod:`fpgrad.exact` does for layer networks (the rigorous arb fallback plugs in here).
Certified digits are judged on the loss and the parameter gradients; every node's value is
kept for attribution (:meth:`GraphExact.nonzero`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mpmath
import numpy as np

from fpgrad.arith import expansion
from fpgrad.arith.ball import Ball, BallArith
from fpgrad.arith.mp import MPArith
from fpgrad.errors import InputError
from fpgrad.exact import REQUIRED_DIGITS, _agreement, ball_digits
from fpgrad.graph.capture import Graph
from fpgrad.graph.interpret import GraphTrace, interpret
from fpgrad.graph.ops.pointwise import MissingSlot
from fpgrad.verdicts import ExactArray


@dataclass
class GraphExact:
    """Certified loss and gradients (``keys``: "loss", "grads/<param>")."""

    method: str
    bits: int
    certified_digits: float
    digits: dict[str, np.ndarray]
    arrays: dict[str, ExactArray]
    vanishing: int
    trace: GraphTrace = field(repr=False)

    def float64(self, key: str) -> np.ndarray:
        """Nearest float64 values (for display and tolerances)."""
        return self.arrays[key].hi

    def nonzero(self, node: str) -> np.ndarray | None:
        """Mask of elements of ``node``'s value that are certainly non-zero (a ball not
        containing 0; for mpmath, above 2**-(bits/2) of the array's largest value), or None
        when the node's value is not one floating array."""
        v = self.trace.values.get(node)
        if isinstance(v, Ball):
            return np.abs(v.mid[0]) > 2 * v.rad
        if isinstance(v, np.ndarray) and v.dtype == object and v.size:
            hi = np.abs(np.asarray(np.vectorize(float, otypes=[float])(v)))
            return hi > 2.0 ** -(self.bits // 2) * float(np.max(hi))
        return None


def _keys(trace: GraphTrace) -> list[tuple[str, Any]]:
    return [("loss", trace.loss), *((f"grads/{k}", v) for k, v in trace.grads.items())]


def exact_graph(graph: Graph, bits: int = 150, allow_uncertified: bool = False) -> GraphExact:
    """Evaluate ``graph`` exactly and certify the loss and every gradient element."""
    result = _fast(graph) if bits <= 150 else None
    if result is None or result.certified_digits < REQUIRED_DIGITS:
        result = _mpmath(graph, max(bits, 150))
    if result.certified_digits < REQUIRED_DIGITS and not allow_uncertified:
        raise InputError(
            f"the exact reference certifies only {result.certified_digits:.1f} digits at "
            f"{result.bits} bits; raise --exact-bits or pass --allow-uncertified"
        )
    return result


def _fast(graph: Graph) -> GraphExact | None:
    ar = BallArith(150)
    try:
        trace = interpret(graph, ar)
    except MissingSlot:  # an op the balls cannot certify yet (GELU): mpmath
        return None
    if ar.range_errors or ar.uncertain_branches:
        return None
    cap = math.floor(150 * math.log10(2))
    items = _keys(trace)
    scale = max((float(np.max(np.abs(b.mid[0]))) for _, b in items if b.size), default=0.0)
    digits, arrays, vanishing = {}, {}, 0
    for key, ball in items:
        d, vanish = ball_digits(ball, cap, 75, scale)
        mid = np.where(vanish, 0.0, ball.mid)
        vanishing += int(vanish.sum())
        hi, lo = expansion.hi_lo(mid)
        digits[key] = d
        arrays[key] = ExactArray(hi, lo, mid[0] == 0)
    certified = min((float(d.min()) for d in digits.values() if d.size), default=float(cap))
    return GraphExact("fast", 150, min(certified, cap), digits, arrays, vanishing, trace)


def _mpmath(graph: Graph, bits: int) -> GraphExact:
    low = interpret(graph, MPArith(bits), keep=False)
    high = interpret(graph, MPArith(2 * bits))
    cap = math.floor(bits * math.log10(2))
    pairs = list(zip(_keys(low), _keys(high), strict=True))
    scale = max(
        (abs(v) for (_, lo), _ in pairs for v in np.asarray(lo, dtype=object).ravel()),
        default=mpmath.mpf(0),
    )
    digits, arrays, vanishing = {}, {}, 0
    for (key, lo), (_, hi) in pairs:
        lo_a, hi_a = np.asarray(lo, dtype=object), np.asarray(hi, dtype=object)
        d, vanish = _agreement(lo_a, hi_a, cap, bits // 2, scale)
        vanishing += int(vanish.sum())
        digits[key] = d
        arrays[key] = ExactArray.from_mp(np.where(vanish, mpmath.mpf(0), hi_a))
    certified = min((float(d.min()) for d in digits.values() if d.size), default=float(cap))
    return GraphExact("mpmath", bits, min(certified, cap), digits, arrays, vanishing, high)
