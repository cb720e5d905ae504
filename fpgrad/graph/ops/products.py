"""Running products: ``cumprod`` (``prod`` is refused, see :data:`HINTS`).

``cumprod`` runs ``out_i = out_(i-1) * x_i`` along the dimension, one multiplication of the
system each (torch's CPU order). The exact systems compute the exact products. A strict machine rounds every product into its
format; torch's CPU kernels carry a wider accumulator (float for float16/bfloat16, double for
float32), so an emulated column may differ from the native one in the last place.
``cumprod``'s backward is torch's composite formula in supported ops (the same eagerly and
traced, unlike ``prod``'s).
"""

from __future__ import annotations

from typing import Any

from fpgrad.graph import shapes
from fpgrad.graph.ops.index import running
from fpgrad.graph.ops.registry import HINTS, op


@op("aten.cumprod.default")
def cumprod(cx: Any, x: Any, dim: int, dtype: Any = None) -> Any:
    shape = shapes.shape(x)
    if not shape or not shape[int(dim) % len(shape)]:
        return x
    return running(x, int(dim) % len(shape), cx.ar.mul)


# torch's prod backward is data-dependent: eagerly grad * result / input (inputs without zeros),
# under any dispatch mode (tracing, a native run that records its ops) the exclusive-cumprod
# form: no column could be the model's own eager gradient, so prod is refused with a rewrite.
HINTS["aten.prod"] = (
    "torch computes prod's backward one way eagerly (result / input) and another under tracing, "
    "so no column could be eager's: write x.cumprod(dim).select(dim, -1) (the same product)"
)
