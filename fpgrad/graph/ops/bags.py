"""``nn.EmbeddingBag`` / ``F.embedding_bag``: ``_embedding_bag`` and its backward.

Modes ``sum`` and ``mean`` (``per_sample_weights`` with ``sum``, ``padding_idx``,
``include_last_offset``, offsets or 2-D inputs): each bag is the sum of its rows, gathered
and added by the system's matmul with a 0/1 bag matrix (an exact sum in the exact systems),
each row first multiplied by its sample weight; ``mean`` divides the sum by the bag's number
of non-padding entries in the system (an empty bag is 0, as torch's). The backward adds
``grad[bag] * weight`` (``/ size`` for ``mean``) into each entry's row, the same way. The
emulated systems sum in their matmul's order, not in the order of torch's CPU kernel (fbgemm).
``max`` mode and ``scale_grad_by_freq`` are refused in one line.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fpgrad.graph import shapes
from fpgrad.graph.ops import taps
from fpgrad.graph.ops.registry import op

_MODES = {0: "sum", 1: "mean", 2: "max"}


def _refuse(cx: Any, what: str) -> None:
    from fpgrad.errors import InputError

    raise InputError(f"{cx.label()}: EmbeddingBag with {what} is not supported (sum and mean are)")


def _bags(indices: Any, offsets: Any, n_bags: int, padding_idx: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat indices, bag of each entry, entry kept: not the padding index)."""
    idx = np.asarray(indices).ravel().astype(np.int64)
    off = np.asarray(offsets).ravel().astype(np.int64)
    bag = np.searchsorted(off[:n_bags], np.arange(idx.size), side="right") - 1
    keep = np.ones(idx.size, dtype=bool) if padding_idx is None or padding_idx < 0 else idx != padding_idx
    return idx, bag, keep


def _n_bags(offsets: Any, include_last: bool) -> int:
    n = int(np.asarray(offsets).size)
    return n - 1 if include_last else n


def _sizes(cx: Any, bag: np.ndarray, keep: np.ndarray, n_bags: int) -> Any:
    """The number of kept entries per bag (at least 1: an empty bag's sum is 0), (B, 1)."""
    counts = np.bincount(bag[keep], minlength=n_bags)[:n_bags].astype(np.float64)
    return cx.ar.asarray(np.maximum(counts, 1.0).reshape(-1, 1))


@op("aten._embedding_bag.default")
def embedding_bag(cx: Any, weight: Any, indices: Any, offsets: Any, scale_grad_by_freq: bool = False,
                  mode: int = 0, sparse: bool = False, per_sample_weights: Any = None,
                  include_last_offset: bool = False, padding_idx: int | None = -1) -> tuple:  # fmt: skip
    if mode not in (0, 1):
        _refuse(cx, f"mode={_MODES.get(mode, mode)!r}")
    if scale_grad_by_freq:
        _refuse(cx, "scale_grad_by_freq=True")
    ar = cx.ar
    n_bags = _n_bags(offsets, include_last_offset)
    idx, bag, keep = _bags(indices, offsets, n_bags, padding_idx)
    rows = shapes.index(weight, (idx,))  # (N, D)
    if per_sample_weights is not None:
        rows = ar.mul(rows, shapes.unsqueeze(per_sample_weights, 1))
    member = np.zeros((n_bags, idx.size))
    member[bag[keep], np.arange(idx.size)[keep]] = 1.0
    out = taps.select_sum(cx, member, rows)
    if mode == 1:
        out = ar.div(out, _sizes(cx, bag, keep, n_bags))
    # torch's integer outputs (offset2bag, bag_size, max_indices), from its own kernel
    dummy = torch.zeros(shapes.shape(weight), dtype=torch.float64)
    ints = torch.ops.aten._embedding_bag.default(
        dummy, torch.from_numpy(np.asarray(indices)), torch.from_numpy(np.asarray(offsets)),
        False, mode, False, None, include_last_offset,
        -1 if padding_idx is None else padding_idx,
    )  # fmt: skip
    return (out, *(t.numpy().copy() for t in ints[1:]))


@op("aten._embedding_bag_backward.default")
def embedding_bag_backward(cx: Any, grad: Any, indices: Any, offsets: Any, offset2bag: Any,
                           bag_size: Any, maximum_indices: Any, num_weights: int,
                           scale_grad_by_freq: bool, mode: int, sparse: bool,
                           per_sample_weights: Any, padding_idx: int | None = -1) -> Any:  # fmt: skip
    if mode not in (0, 1):
        _refuse(cx, f"mode={_MODES.get(mode, mode)!r}")
    if scale_grad_by_freq or sparse:
        _refuse(cx, "scale_grad_by_freq=True" if scale_grad_by_freq else "sparse=True")
    ar = cx.ar
    n_bags = shapes.shape(grad)[0]
    idx, bag, keep = _bags(indices, offsets, n_bags, padding_idx)
    g = grad
    if mode == 1:
        g = ar.div(g, _sizes(cx, bag, keep, n_bags))
    entries = shapes.index(g, (bag,))  # (N, D): each entry's bag gradient
    if per_sample_weights is not None:
        entries = ar.mul(entries, shapes.unsqueeze(per_sample_weights, 1))
    onehot = np.zeros((int(num_weights), idx.size))
    onehot[idx[keep], np.arange(idx.size)[keep]] = 1.0
    return taps.select_sum(cx, onehot, entries)
