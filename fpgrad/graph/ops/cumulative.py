"""Running extrema and log-sum-exp: ``cummax``, ``cummin``, ``logcumsumexp``; the ``zeros`` and
``scalar_tensor`` their backward formulas create.

``cummax`` (``cummin``) keeps, at each position, the largest (smallest) element so far and its
index; torch's CPU kernel moves to a later element when it is ``>=`` (``<=``) the running one,
so a tie goes to the **latest** index, and a NaN stays (the index moves to each later NaN).
fpgrad runs torch's own kernel on the float64 ranks of the values
(:func:`fpgrad.graph.ops.ordering.ranks`): a machine's values are their own ranks; the exact
systems' ranks come from a proven order, exact ties included, and a pair the balls cannot
decide escalates, then ends undetermined, never guessed. The values are exact copies of the
chosen elements; the backward is torch's ``zeros`` + ``scatter_add`` at these indices.

``logcumsumexp`` runs ``out_i = log(exp(out_(i-1)) + exp(x_i))`` along the dimension. The exact
systems compute ``m + log(exp(out_(i-1) - m) + exp(x_i - m))`` with ``m`` the larger float64
midpoint (an exact point: no overflow, no cancellation). A strict machine rounds torch's
helper ``log1p(exp(min - max)) + max`` one operation at a time in its format (equal infinite
arguments give the new element, NaN propagates, as torch's ``_log_add_exp_helper``); torch's
CPU kernel accumulates in double (float for float16/bfloat16), so an emulated column may
differ from the native one in the last place, as for ``cumprod``. Its backward is torch's
composite formula (``log |g|`` where ``g > 0`` / ``g < 0``, torch's lowest float64 where not:
``exp`` of it is 0 in a machine and a positive number below 2^-(10^308) in the exact systems).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fpgrad.arith.base import ExactDerivatives
from fpgrad.graph import shapes
from fpgrad.graph.ops._util import lowest_as_format
from fpgrad.graph.ops.ordering import _take, ranks
from fpgrad.graph.ops.registry import op


def _running_extremum(cx: Any, x: Any, dim: int, fn: Any) -> tuple[Any, np.ndarray]:
    shape = tuple(shapes.shape(x))
    if not shape:
        return x, np.zeros((), dtype=np.int64)
    r, d = ranks(cx, x, dim)
    index = fn(r, d).indices
    return _take(cx, x, d, index), index.numpy().astype(np.int64)


@op("aten.cummax.default")
def cummax(cx: Any, x: Any, dim: int) -> tuple[Any, np.ndarray]:
    """torch.cummax: running maxima and their indices (a tie: the latest), torch's choice."""
    return _running_extremum(cx, x, dim, torch.cummax)


@op("aten.cummin.default")
def cummin(cx: Any, x: Any, dim: int) -> tuple[Any, np.ndarray]:
    return _running_extremum(cx, x, dim, torch.cummin)


def _step_exact(ar: Any, prev: Any, x: Any) -> Any:
    """log(exp(prev) + exp(x)) about the float64 point m = max(mid prev, mid x)."""
    m = np.maximum(np.asarray(ar.to_float64(prev), dtype=np.float64),
                   np.asarray(ar.to_float64(x), dtype=np.float64))  # fmt: skip
    mm = ar.asarray(m)
    s = ar.add(ar.exp(ar.sub(prev, mm)), ar.exp(ar.sub(x, mm)))
    return ar.add(mm, ar.log(s))


def _step_machine(ar: Any, prev: Any, x: Any) -> Any:
    """torch's ``_log_add_exp_helper(x, prev)``, each operation rounded by the machine."""
    p = np.asarray(prev, dtype=np.float64)
    v = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lo, hi = np.minimum(v, p), np.maximum(v, p)  # NaN propagates (torch: the NaN itself)
        same_inf = (lo == hi) & np.isinf(lo)
        lo_s, hi_s = np.where(same_inf, 0.0, lo), np.where(same_inf, 0.0, hi)
        out = ar.add(ar.log1p(ar.exp(ar.sub(lo_s, hi_s))), hi_s)
    return np.where(same_inf, v, out).astype(np.float64)


@op("aten.logcumsumexp.default")
def logcumsumexp(cx: Any, x: Any, dim: int) -> Any:
    shape = tuple(shapes.shape(x))
    if not shape or not all(shape):
        return x
    d = int(dim) % len(shape)
    ar = cx.ar
    step = _step_exact if isinstance(ar, ExactDerivatives) else _step_machine
    lead = (slice(None),) * d
    parts = [shapes.index(x, (*lead, slice(0, 1)))]
    if not isinstance(ar, ExactDerivatives):  # torch starts from -inf: log1p(exp(-inf)) + x
        parts[0] = step(ar, np.full(np.shape(parts[0]), -np.inf), parts[0])
    for i in range(1, shape[d]):
        parts.append(step(ar, parts[-1], shapes.index(x, (*lead, slice(i, i + 1)))))
    return shapes.cat(parts, d)


def _floating(dtype: Any) -> bool:
    return dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)


@op("aten.zeros.default")
def zeros(cx: Any, size: Any, **kwargs: Any) -> Any:
    """Exact zeros of the system (integer or boolean zeros for such a ``dtype``)."""
    dtype = kwargs.get("dtype")
    if not _floating(dtype):
        return torch.zeros(tuple(int(s) for s in size), dtype=dtype).numpy()
    return cx.ar.asarray(np.zeros(tuple(int(s) for s in size)))


@op("aten.scalar_tensor.default")
def scalar_tensor(cx: Any, value: Any, **kwargs: Any) -> Any:
    """A 0-d tensor holding ``value``, rounded into the system as torch casts it; float64's
    largest magnitude (torch's ``lowest()`` of the traced dtype, in logcumsumexp's backward)
    is the format's largest in a machine (what torch's kernel of that dtype uses), not inf."""
    dtype = kwargs.get("dtype")
    if not _floating(dtype):
        return torch.scalar_tensor(value, dtype=dtype).numpy()
    return cx.ar.asarray(lowest_as_format(cx.ar, np.array(float(value))))
