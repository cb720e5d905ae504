"""Matrix products: mm, addmm, bmm, baddbmm (through the system's 2-D matmul slot)."""

from __future__ import annotations

from typing import Any

import numpy as np

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


@op("aten.baddbmm.default")
def baddbmm(cx: Any, inp: Any, a: Any, b: Any, beta: float = 1, alpha: float = 1) -> Any:
    """beta * inp + alpha * bmm(a, b), as addmm: the product, then ``inp`` added (a constant
    additive ``-inf`` mask stays a mask: ``nn.MultiheadAttention`` with ``need_weights`` adds
    its merged mask so). ``beta = 0`` ignores ``inp`` (torch: its NaN and inf do not reach
    the output)."""
    from fpgrad.graph.ops.pointwise import add

    ar = cx.ar
    prod = bmm(cx, a, b)
    if alpha != 1:
        prod = ar.mul(prod, scalar(cx, alpha))
    if beta == 0:
        return prod
    if beta != 1:
        if isinstance(inp, np.ndarray) and inp.dtype.kind == "f" and not np.isfinite(inp).all():
            from fpgrad.errors import InputError

            raise InputError(f"{cx.label()}: baddbmm with beta != 1 of a -inf mask is not "
                             "supported (beta = 1 is)")  # fmt: skip
        inp = ar.mul(scalar(cx, inp), scalar(cx, beta))
    return add(cx, prod, inp)
