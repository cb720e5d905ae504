"""Ordering ops: ``topk``, ``sort`` (``argsort``, ``msort``), ``kthvalue``, ``median``.

Which input element lands where is torch's own kernel's choice, replayed: torch's CPU kernels
(partial sort, nth_element, stable or unstable sort, selection) decide by comparing elements
and nothing else, so on any numbers with the same order pattern (the same pairs equal, the
same pairs ordered the same way) they return the same indices. Each op runs the torch op on
the float64 **ranks** of its input:

- a machine's values (an emulated format: every value exact in float64, NaN ranked where
  torch's kernel ranks NaN) are their own ranks;
- the exact systems' ranks come from a proven order: the elements sorted by their float64
  midpoints, every adjacent pair proven strictly ordered (``positive`` of the difference) or
  proven equal (neither difference positive: an exact tie), a pair the balls cannot decide
  counted by ``positive`` (the precision escalates; Arb's untracked mask leaves nothing
  certified), and a row whose midpoint order a proof contradicts re-sorted by exact
  comparisons. The values ranked are those of the op's input or, through a chain of strictly
  increasing elementwise ops (``_ties.increasing_root``) and softmax / log-softmax along the
  same dimension (increasing in each element of a row, one denominator), of the chain's
  root: equal logits are an exact tie where their softmax balls cannot be told apart.

The values are then copied from the chosen elements (exact); the backward is torch's own
``new_zeros`` + ``scatter`` with these indices.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import fx

from fpgrad.arith.base import ExactDerivatives
from fpgrad.graph import shapes
from fpgrad.graph.ops._ties import above, increasing_root
from fpgrad.graph.ops.index import _pick
from fpgrad.graph.ops.registry import op


def _rows(shape: tuple[int, ...], d: int) -> np.ndarray:
    """Flat indices of an array of ``shape``, dimension ``d`` last, as (rows, n)."""
    ids = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    return np.moveaxis(ids, d, -1).reshape(-1, shape[d])


def _proven_ranks(cx: Any, x: Any, ids: np.ndarray) -> np.ndarray:
    """Ranks (rows, n) of the exact values ``x.flat[ids]``: 0 for the smallest of each row,
    equal for proven ties, one more at every proven strict step."""
    ar = cx.ar
    rows, n = ids.shape
    vals = _pick(cx, x, ids)
    order = np.argsort(ar.to_float64(vals), axis=1, kind="stable")
    sv = _pick(cx, x, np.take_along_axis(ids, order, 1))
    lo = shapes.index(sv, (slice(None), slice(0, n - 1)))
    hi = shapes.index(sv, (slice(None), slice(1, n)))
    up = np.asarray(above(ar, hi, lo), dtype=bool)
    down = np.asarray(above(ar, lo, hi), dtype=bool)
    for r in np.flatnonzero(down.any(axis=1)):  # midpoints misordered: exact comparisons
        order[r], up[r] = _exact_sort(cx, x, ids[r])
    steps = np.concatenate([np.zeros((rows, 1)), np.cumsum(up, axis=1, dtype=np.float64)], 1)
    ranks = np.empty((rows, n))
    np.put_along_axis(ranks, order, steps, axis=1)
    return ranks


def _exact_sort(cx: Any, x: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the order of ``x.flat[ids]`` by exact comparisons, which adjacent steps are strict)."""
    ar = cx.ar

    def elem(i: int) -> Any:
        return _pick(cx, x, ids[i : i + 1])

    def cmp(i: int, j: int) -> int:
        a, b = elem(i), elem(j)
        if bool(np.asarray(above(ar, a, b))[0]):
            return 1
        return -1 if bool(np.asarray(above(ar, b, a))[0]) else 0

    order = np.array(sorted(range(ids.size), key=functools.cmp_to_key(cmp)), dtype=np.int64)
    up = np.array([cmp(int(order[i + 1]), int(order[i])) > 0 for i in range(ids.size - 1)])
    return order, up.reshape(-1).astype(bool)


_SOFTMAX = ("aten._softmax.default", "aten._log_softmax.default")


def _order_source(cx: Any, x: Any, d: int) -> Any:
    """The value whose order along ``d`` is x's (see the module's docstring): x itself, or the
    root of increasing elementwise ops and same-dimension softmaxes below the op's input."""
    node = cx.origin(0)
    shape = tuple(shapes.shape(x))
    src = x
    while isinstance(node, fx.Node):
        root = increasing_root(node)
        if root is None and str(node.target) in _SOFTMAX and len(node.args) > 1:
            if int(node.args[1]) % len(shape) == d:
                root = node.args[0]
        if not isinstance(root, fx.Node):
            break
        val = cx.env.get(root.name)
        if val is None or tuple(shapes.shape(val)) != shape:
            break
        node, src = root, val
    return src


def ranks(cx: Any, x: Any, dim: int) -> tuple[torch.Tensor, int]:
    """(a float64 tensor of x's shape with x's order pattern along ``dim``, dim in range)."""
    shape = tuple(shapes.shape(x))
    if not shape:
        return torch.zeros((), dtype=torch.float64), 0
    d = int(dim) % len(shape)
    if not isinstance(cx.ar, ExactDerivatives):
        return torch.from_numpy(np.array(cx.ar.to_float64(x), dtype=np.float64)), d
    x = _order_source(cx, x, d)
    ids = _rows(shape, d)
    flat = np.empty(ids.size)
    if shape[d] > 1 and ids.size:
        flat[ids.ravel()] = _proven_ranks(cx, x, ids).ravel()
    else:
        flat[:] = 0.0
    return torch.from_numpy(flat.reshape(shape)), d


def _take(cx: Any, x: Any, d: int, index: torch.Tensor) -> Any:
    """The elements of ``x`` at ``index`` along dimension ``d`` (exact copies)."""
    shape = tuple(shapes.shape(x))
    if not shape:
        return x
    flat = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    return _pick(cx, x, torch.gather(flat, d, index).numpy())


def _chosen(cx: Any, x: Any, d: int, index: torch.Tensor) -> tuple[Any, np.ndarray]:
    return _take(cx, x, d, index), index.numpy().astype(np.int64)


@op("aten.topk.default")
def topk(
    cx: Any, x: Any, k: int, dim: int = -1, largest: bool = True, sorted: bool = True
) -> tuple[Any, np.ndarray]:
    """torch.topk: the k largest (smallest) along ``dim`` and their indices, torch's choice."""
    r, d = ranks(cx, x, dim)
    index = torch.topk(r, int(k), d, bool(largest), bool(sorted)).indices
    return _chosen(cx, x, d, index)


@op("aten.sort.default")
def sort(cx: Any, x: Any, dim: int = -1, descending: bool = False) -> tuple[Any, np.ndarray]:
    """torch.sort (argsort, msort): values along ``dim`` in order and their indices."""
    return sort_stable(cx, x, stable=None, dim=dim, descending=descending)


@op("aten.sort.stable")
def sort_stable(
    cx: Any, x: Any, *, stable: bool | None = None, dim: int = -1, descending: bool = False
) -> tuple[Any, np.ndarray]:
    r, d = ranks(cx, x, dim)
    index = torch.sort(r, stable=stable, dim=d, descending=bool(descending)).indices
    return _chosen(cx, x, d, index)


@op("aten.kthvalue.default")
def kthvalue(
    cx: Any, x: Any, k: int, dim: int = -1, keepdim: bool = False
) -> tuple[Any, np.ndarray]:
    """torch.kthvalue: the k-th smallest along ``dim`` and its index, torch's choice."""
    r, d = ranks(cx, x, dim)
    index = torch.kthvalue(r, int(k), d, True).indices
    values, idx = _chosen(cx, x, d, index)
    if keepdim or not shapes.shape(x):
        return values, idx
    return shapes.squeeze_dims(values, [d]), np.squeeze(idx, d)


@op("aten.median.dim")
def median_dim(cx: Any, x: Any, dim: int, keepdim: bool = False) -> tuple[Any, np.ndarray]:
    """torch.median along ``dim``: the lower median and its index, torch's choice."""
    r, d = ranks(cx, x, dim)
    index = torch.median(r, d, True).indices
    values, idx = _chosen(cx, x, d, index)
    if keepdim or not shapes.shape(x):
        return values, idx
    return shapes.squeeze_dims(values, [d]), np.squeeze(idx, d)


@op("aten.median.default")
def median(cx: Any, x: Any) -> Any:
    """torch.median of all elements: the lower median (its backward spreads the gradient
    over every element equal to it, through exact comparisons)."""
    flat = shapes.reshape(x, (-1,))
    values, _ = median_dim(cx, flat, 0, False)
    return values
