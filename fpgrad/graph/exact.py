"""The certified exact reference of a captured graph.

The graph is interpreted in the exact reference's ball systems by :func:`fpgrad.exact.certify`:
first the fast multi-word balls, then Arb balls at escalating precision (an op the fast balls
lack, such as GELU's normal CDF, goes straight to Arb). Every claim is read off the balls, as
for layer networks (:mod:`fpgrad.exact`): exact zeros, undetermined values, certified digits.
The loss and the parameter gradients are the certified values; every node's value of the
evaluation that stands is kept for attribution (:meth:`GraphExact.nonzero`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fpgrad.exact import DEFAULT_BITS, DEFAULT_MAX_BITS, ExactResult, Work, certify
from fpgrad.graph.capture import Graph
from fpgrad.graph.interpret import GraphTrace, interpret
from fpgrad.graph.ops.pointwise import MissingSlot
from fpgrad.verdicts import ExactArray

#: ops whose cost is a matrix product (multiply-adds estimated from their output and inputs)
_PRODUCTS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.convolution", "aten.convolution_backward")


@dataclass
class GraphExact:
    """Certified loss and gradients (``keys``: "loss", "grads/<param>")."""

    result: ExactResult

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

    def nonzero(self, node: str) -> np.ndarray | None:
        """Mask of the elements of ``node``'s exact value that are certainly non-zero (balls
        that exclude 0), or None when the node's value is not one floating array."""
        v = self.trace.values.get(node)
        if v is None or isinstance(v, tuple | list):
            return None
        if isinstance(v, np.ndarray) and v.dtype != object:
            return None  # an integer or constant array
        return self.result.nonzero(v)


def _run(graph: Graph) -> Any:
    def run(ar: Any) -> tuple[list[tuple[str, Any]], Any]:
        trace = interpret(graph, ar)
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
    run = _run(graph)
    w = work(graph)
    try:
        result = certify(run, w, bits, allow_uncertified=allow_uncertified, max_bits=max_bits)
    except MissingSlot:  # the fast balls lack an op: Arb from the start
        result = certify(
            run, w, bits, allow_uncertified=allow_uncertified, method="arb", max_bits=max_bits
        )
    return GraphExact(result)
