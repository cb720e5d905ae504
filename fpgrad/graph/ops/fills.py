"""Tensors filled with one value: ``new_ones``, ``new_full``, ``full``, ``full_like`` (``new_zeros``
and ``zeros`` live with the index ops)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.ops.registry import op


def _filled(cx: Any, size: Any, value: Any, dtype: Any) -> Any:
    """``size`` filled with ``value``: rounded into the system as torch casts a fill (an
    integer or boolean array for such a ``dtype``)."""
    shape = tuple(int(v) for v in size)
    if dtype is not None and not dtype.is_floating_point:
        return torch.full(shape, value, dtype=dtype).numpy()
    if isinstance(value, bool) or not math.isfinite(float(value)):
        raise InputError(f"{cx.label()}: a fill of {value!r} is not supported (finite only)")
    return cx.ar.asarray(np.full(shape, float(value)))


@op("aten.new_ones.default")
def new_ones(cx: Any, x: Any, size: Any, **kwargs: Any) -> Any:
    return _filled(cx, size, 1, kwargs.get("dtype"))


@op("aten.new_full.default")
def new_full(cx: Any, x: Any, size: Any, value: Any, **kwargs: Any) -> Any:
    """``x.new_full(size, value)``: also ``torch.full`` in a trace, where make_fx names it so."""
    return _filled(cx, size, value, kwargs.get("dtype"))


@op("aten.full.default")
def full(cx: Any, size: Any, value: Any, **kwargs: Any) -> Any:
    return _filled(cx, size, value, kwargs.get("dtype"))


@op("aten.full_like.default")
def full_like(cx: Any, x: Any, value: Any, **kwargs: Any) -> Any:
    dtype = kwargs.get("dtype")
    if dtype is None and isinstance(x, np.ndarray) and not np.issubdtype(x.dtype, np.floating):
        return np.full(x.shape, value, dtype=x.dtype)  # an index tensor's like
    return _filled(cx, shapes.shape(x), value, dtype)
