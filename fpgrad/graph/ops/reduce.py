"""Sums and means over dimensions."""

from __future__ import annotations

from typing import Any

from fpgrad.graph.ops import op
from fpgrad.graph.ops._util import count, sum_dims


@op("aten.sum.dim_IntList")
def sum_dim(cx: Any, x: Any, dims: Any, keepdim: bool = False, dtype: Any = None) -> Any:
    return sum_dims(cx, x, dims, keepdim)


@op("aten.sum.default")
def sum_all(cx: Any, x: Any, dtype: Any = None) -> Any:
    return sum_dims(cx, x, None, False)


@op("aten.mean.dim")
def mean_dim(cx: Any, x: Any, dims: Any, keepdim: bool = False, dtype: Any = None) -> Any:
    return cx.ar.div(sum_dims(cx, x, dims, keepdim), cx.ar.const(float(count(x, dims))))


@op("aten.mean.default")
def mean_all(cx: Any, x: Any, dtype: Any = None) -> Any:
    return cx.ar.div(sum_dims(cx, x, None, False), cx.ar.const(float(count(x, None))))
