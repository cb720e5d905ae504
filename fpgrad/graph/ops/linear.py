"""Matrix products: mm, addmm, bmm (through the system's 2-D matmul slot)."""

from __future__ import annotations

from typing import Any

from fpgrad.graph import shapes
from fpgrad.graph.ops._util import scalar
from fpgrad.graph.ops.registry import op


@op("aten.mm.default")
def mm(cx: Any, a: Any, b: Any) -> Any:
    return cx.ar.matmul(a, b)


@op("aten.addmm.default")
def addmm(cx: Any, bias: Any, a: Any, b: Any, beta: float = 1, alpha: float = 1) -> Any:
    """beta * bias + alpha * (a @ b): the product, then the bias added (as nn.Linear)."""
    ar = cx.ar
    prod = ar.matmul(a, b)
    if alpha != 1:
        prod = ar.mul(prod, scalar(cx, alpha))
    if beta != 1:
        bias = ar.mul(bias, scalar(cx, beta))
    return ar.add(prod, bias)


@op("aten.bmm.default")
def bmm(cx: Any, a: Any, b: Any) -> Any:
    """One 2-D product per batch entry, stacked."""
    parts = [
        shapes.unsqueeze(cx.ar.matmul(shapes.index(a, i), shapes.index(b, i)), 0)
        for i in range(shapes.shape(a)[0])
    ]
    return shapes.cat(parts, 0)
