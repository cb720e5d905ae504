"""Matrix products: mm, addmm, bmm, baddbmm, mv, dot, vdot (through the system's 2-D matmul
slot) and ``_trilinear`` (``nn.Bilinear``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.graph import shapes
from fpgrad.graph.ops._util import scalar, sum_dims
from fpgrad.graph.ops.registry import op


@op("aten.mm.default")
def mm(cx: Any, a: Any, b: Any) -> Any:
    return cx.ar.matmul(a, b)


@op("aten.mv.default")
def mv(cx: Any, a: Any, v: Any) -> Any:
    """Matrix times vector (``spectral_norm``'s power iteration): ``a @ v[:, None]``."""
    return shapes.reshape(cx.ar.matmul(a, shapes.unsqueeze(v, 1)), [shapes.shape(a)[0]])


@op("aten.dot.default", "aten.vdot.default")
def dot(cx: Any, u: Any, v: Any) -> Any:
    """The inner product of two vectors (real: ``vdot`` conjugates nothing), a 0-d value:
    ``u[None, :] @ v[:, None]``."""
    return shapes.reshape(cx.ar.matmul(shapes.unsqueeze(u, 0), shapes.unsqueeze(v, 1)), [])


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


@op("aten._trilinear.default")
def trilinear(cx: Any, i1: Any, i2: Any, i3: Any, expand1: Any, expand2: Any, expand3: Any,
              sumdim: Any, unroll_dim: int = 1) -> Any:  # fmt: skip
    """``sum over sumdim of i1 * i2 * i3``, each input unsqueezed at its ``expand`` dims
    (``nn.Bilinear``: ``x1^T W_o x2`` per output; its weight gradient is another
    ``_trilinear``): the products broadcast by the system's ``mul`` (``i1 * i2`` first),
    then the system's sums over ``sumdim``, last axis first (exact in the exact systems;
    the emulated systems round each product and sum, not in torch's bmm order)."""
    ar = cx.ar
    parts = []
    for x, dims in ((i1, expand1), (i2, expand2), (i3, expand3)):
        for d in sorted(int(d) for d in dims):
            x = shapes.unsqueeze(x, d)
        parts.append(x)
    prod = ar.mul(ar.mul(parts[0], parts[1]), parts[2])
    return sum_dims(cx, prod, list(sumdim), False) if len(sumdim) else prod
