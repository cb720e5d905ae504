"""The certified exact reference of a captured graph.

The graph is interpreted in the exact reference's ball systems by :func:`fpgrad.reference.exact.certify`:
first the fast multi-word balls, then Arb balls at escalating precision (an op the fast balls
lack, such as GELU's normal CDF, goes straight to Arb). Every claim is read off the balls, as
for layer networks (:mod:`fpgrad.reference.exact`): exact zeros, undetermined values, certified digits.
The loss and the parameter gradients are the certified values; every node's value of the
evaluation that stands is kept for attribution (:meth:`GraphExact.nonzero`).

Zeros by cancellation (a bias before training-mode batch norm, attention's key bias) are
proven by :mod:`fpgrad.graph.identities` from the graph's structure; each such element is set
to an exact zero ball during the evaluation, after checking that its enclosure contains 0 (an
enclosure that excludes 0 contradicts the proof: an error, never a silent zero). Elements
whose enclosure is not finite keep it (the identities assume finite values).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import mpmath
import numpy as np
from torch import fx

from fpgrad.arith import arb as arbmod
from fpgrad.arith import expansion
from fpgrad.arith.ball import HI_BOUND, Ball
from fpgrad.graph.capture import Graph
from fpgrad.graph.identities import Identities, prove_zeros
from fpgrad.graph.interpret import GraphTrace, interpret
from fpgrad.graph.ops.pointwise import MissingSlot
from fpgrad.reference.array import ExactArray
from fpgrad.reference.exact import (
    DEFAULT_BITS,
    DEFAULT_MAX_BITS,
    ExactResult,
    Work,
    arb_digits,
    ball_digits,
    certify,
    hi_lo_arb,
)

#: ops whose cost is a matrix product (multiply-adds estimated from their output and inputs)
_PRODUCTS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution",
             "aten.convolution_backward")  # fmt: skip


@dataclass
class GraphExact:
    """Certified loss and gradients (``keys``: "loss", "grads/<param>")."""

    result: ExactResult
    identities: Identities = field(default_factory=Identities)

    @property
    def method(self) -> str:
        return self.result.method

    @property
    def bits(self) -> int:
        return self.result.bits

    @property
    def certified_digits(self) -> float:
        return self.result.certified_digits

    @property
    def digits(self) -> dict[str, np.ndarray]:
        return self.result.digits

    @property
    def vanishing(self) -> int:
        return 0

    @property
    def trace(self) -> GraphTrace:
        return self.result.raw  # type: ignore[no-any-return]

    @property
    def arrays(self) -> dict[str, ExactArray]:
        return {key: self.result.exact_array(key) for key in self.result.keys()}

    def float64(self, key: str) -> np.ndarray:
        """Nearest float64 values (for display and tolerances)."""
        return self.result.exact_array(key).hi

    def node_array(self, node: str) -> ExactArray | None:
        """``node``'s exact value as an :class:`ExactArray` (exact zeros, undetermined balls,
        radii), or None when it is not one floating array."""
        v = self.trace.values.get(node)
        if v is None or isinstance(v, tuple | list):
            return None
        if isinstance(v, Ball):
            _, zero, und, rad = ball_digits(v, 0.0)
            hi, lo = expansion.hi_lo(v.mid)
        elif isinstance(v, np.ndarray) and v.dtype == object:
            _, zero, und, rad = arb_digits(v, 0.0)
            hi, lo = hi_lo_arb(v)
        else:
            return None
        hi, lo = np.where(zero | und, 0.0, hi), np.where(zero | und, 0.0, lo)
        return ExactArray(hi, lo, zero, rad, und)

    def nonzero(self, node: str) -> np.ndarray | None:
        """Mask of the elements of ``node``'s exact value that are certainly non-zero (balls
        that exclude 0), or None when the node's value is not one floating array."""
        v = self.trace.values.get(node)
        if v is None or isinstance(v, tuple | list):
            return None
        if isinstance(v, np.ndarray) and v.dtype != object:
            return None  # an integer or constant array
        return self.result.nonzero(v)


def settle_zeros(ar: Any, value: Any, mask: np.ndarray, where: str) -> Any:
    """``value`` (balls of ``ar``) with the elements ``mask`` proven exactly 0 set to exact
    zeros. Raises RuntimeError where a finite enclosure excludes 0 (the proof and the balls
    disagree: a bug); leaves non-finite enclosures, and every element after a range error
    of the fast balls (that evaluation is discarded), as they are."""
    if isinstance(value, Ball):
        if getattr(ar, "range_errors", 0):
            return value
        m0, rad = value.mid[0], np.asarray(value.rad)
        finite = np.isfinite(m0) & np.isfinite(rad) & mask
        with np.errstate(invalid="ignore"):
            excludes = np.abs(m0) / HI_BOUND > rad
    else:
        arr = np.asarray(value, dtype=object)
        finite = np.zeros(mask.shape, dtype=bool)
        excludes = np.zeros(mask.shape, dtype=bool)
        picked = arr[mask]
        if picked.size and not hasattr(picked.flat[0], "is_finite"):
            # mpmath numbers (rounded, no enclosure that could contradict the proof)
            finite[mask] = [bool(mpmath.isfinite(v)) for v in picked]
        else:
            finite[mask] = [bool(v.is_finite()) for v in picked]
            excludes[mask] = ~arbmod.contains_zero(picked)
    if (finite & excludes).any():
        raise RuntimeError(
            f"{where}: {int((finite & excludes).sum())} values proven exactly 0 by a structural "
            "identity have enclosures that exclude 0; this is a bug in fpgrad, please report it"
        )
    if not finite.any():
        return value
    return ar.where(finite, ar.asarray(np.zeros(mask.shape)), value)


def settler(graph: Graph, ar: Any, zeros: dict[str, np.ndarray]) -> Any:
    """The ``settle`` of :func:`~fpgrad.graph.interpret.interpret` for the exact systems: the
    elements ``zeros`` (node name -> mask, proven by :mod:`fpgrad.graph.identities`) set to
    exact zeros; None when there are none."""
    if not zeros:
        return None

    def settle(node: fx.Node, value: Any) -> Any:
        mask = zeros.get(node.name)
        return value if mask is None else settle_zeros(ar, value, mask, graph.label(node))

    return settle


def _run(graph: Graph, ids: Identities) -> Any:
    def run(ar: Any) -> tuple[list[tuple[str, Any]], Any]:
        trace = interpret(graph, ar, settle=settler(graph, ar, ids.zeros))
        items = [("loss", trace.loss), *((f"grads/{k}", v) for k, v in trace.grads.items())]
        return items, trace

    return run


def work(graph: Graph) -> Work:
    """Elements held and multiply-adds of one evaluation, from the float64 run's shapes."""
    from fpgrad.graph.native import native_run

    values = native_run(graph, "float64").values
    held = sum(int(np.size(v)) for v in values.values() if isinstance(v, np.ndarray))
    macs = matmuls = 0
    for node in graph.ops:
        name = str(node.target).rsplit(".", 1)[0]
        if node.target is operator.getitem or name not in _PRODUCTS:
            continue
        out = values.get(node.name)
        ins = [values.get(a.name) for a in node.all_input_nodes]
        sizes = [int(np.size(v)) for v in ins if isinstance(v, np.ndarray)]
        if isinstance(out, np.ndarray) and sizes:  # out * (inner size) ~ out * max_in / rows
            macs += int(np.size(out)) * max(1, max(sizes) // max(1, np.shape(out)[0]))
        elif sizes:
            macs += max(sizes) * 8
        matmuls += 1
    return Work(held, macs, matmuls)


def exact_graph(
    graph: Graph,
    bits: int = DEFAULT_BITS,
    allow_uncertified: bool = False,
    max_bits: int = DEFAULT_MAX_BITS,
) -> GraphExact:
    """Evaluate ``graph`` exactly and certify the loss and every gradient element."""
    ids = prove_zeros(graph)
    run = _run(graph, ids)
    w = work(graph)
    try:
        result = certify(run, w, bits, allow_uncertified=allow_uncertified, max_bits=max_bits)
    except MissingSlot:  # the fast balls lack an op: Arb from the start
        result = certify(
            run, w, bits, allow_uncertified=allow_uncertified, method="arb", max_bits=max_bits
        )
    return GraphExact(result, ids)
