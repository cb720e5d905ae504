"""Views, copies and index ops: values unchanged, only where they sit."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.ops._util import enter_integers
from fpgrad.graph.ops.registry import op
from fpgrad.graph.ops.steps import _integral, _pos


@op("aten.detach.default", "aten.alias.default", "aten.clone.default",
    "aten.lift_fresh_copy.default", "aten.contiguous.default")  # fmt: skip
def identity(cx: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


@op("aten._to_copy.default")
def to_copy(cx: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """A cast. Floating to floating keeps the value (every system holds its values in its own
    format; the native columns are torch's casts). To an integer or boolean dtype (targets
    held as floats, ``y.long()``, ``(y > 0).long()`` in a loss): numpy integers, a floating
    value truncated toward zero as torch does (``steps.trunc``, proven in the exact systems)
    or tested against 0; from integers or booleans to floating: the system's array."""
    dt = cx.node.kwargs.get("dtype")  # the interpreter drops torch-only keywords
    if dt is None:
        return x
    if isinstance(x, np.ndarray) and x.dtype.kind in "biu":
        if dt.is_floating_point:
            return enter_integers(cx.ar, x) if x.dtype.kind in "iu" else cx.ar.asarray(x.astype(np.float64))
        return x.astype(torch.empty((), dtype=dt).numpy().dtype)
    if dt.is_floating_point or dt.is_complex:
        return x
    ar = cx.ar
    if dt == torch.bool:
        return _pos(ar, x) | _pos(ar, ar.mul(x, ar.const(-1.0)))
    whole = np.asarray(ar.to_float64(_integral(cx, x, "trunc")), dtype=np.float64)
    if not np.isfinite(whole).all() or (np.abs(whole) >= 2.0**53).any():
        raise InputError(f"{cx.label()}: a cast to {dt} of a value that is not finite or "
                         "beyond 2^53 (torch's result is then unspecified)")  # fmt: skip
    return whole.astype(torch.empty((), dtype=dt).numpy().dtype)


@op("getitem")
def getitem(cx: Any, x: Any, i: int) -> Any:
    return x[i]


@op("aten.view.default", "aten._unsafe_view.default", "aten.reshape.default")
def view(cx: Any, x: Any, size: Any) -> Any:
    return shapes.reshape(x, size)


@op("aten.t.default")
def t(cx: Any, x: Any) -> Any:
    return x if len(shapes.shape(x)) < 2 else shapes.transpose(x, 0, 1)


@op("aten.transpose.int")
def transpose(cx: Any, x: Any, a: int, b: int) -> Any:
    return shapes.transpose(x, a, b)


@op("aten.permute.default")
def permute(cx: Any, x: Any, dims: Any) -> Any:
    return shapes.permute(x, dims)


@op("aten.expand.default")
def expand(cx: Any, x: Any, sizes: Any, implicit: bool = False) -> Any:
    return shapes.expand(x, sizes)


@op("aten.unsqueeze.default")
def unsqueeze(cx: Any, x: Any, dim: int) -> Any:
    return shapes.unsqueeze(x, dim)


@op("aten.squeeze.dim", "aten.squeeze.dims")
def squeeze(cx: Any, x: Any, dims: Any) -> Any:
    return shapes.squeeze_dims(x, [dims] if isinstance(dims, int) else dims)


@op("aten.stack.default")
def stack(cx: Any, parts: Any, dim: int = 0) -> Any:
    nd = len(shapes.shape(parts[0])) + 1
    return shapes.stack(list(parts), int(dim) % nd)


@op("aten.cat.default")
def cat(cx: Any, parts: Any, dim: int = 0) -> Any:
    return shapes.cat(parts, dim)


@op("aten.slice.Tensor")
def slice_(cx: Any, x: Any, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> Any:
    nd = len(shapes.shape(x))
    idx = [slice(None)] * nd
    idx[dim % nd] = slice(start, end, step)
    return shapes.index(x, tuple(idx))


@op("aten.select.int")
def select(cx: Any, x: Any, dim: int, index: int) -> Any:
    nd = len(shapes.shape(x))
    idx: list[Any] = [slice(None)] * nd
    idx[dim % nd] = int(index)
    return shapes.index(x, tuple(idx))


@op("aten.ones_like.default")
def ones_like(cx: Any, x: Any, **kwargs: Any) -> Any:
    return cx.ar.asarray(np.ones(shapes.shape(x)))


@op("aten.zeros_like.default")
def zeros_like(cx: Any, x: Any, **kwargs: Any) -> Any:
    return cx.ar.asarray(np.zeros(shapes.shape(x)))


@op("aten.embedding.default")
def embedding(cx: Any, weight: Any, indices: np.ndarray, *args: Any) -> Any:
    return shapes.index(weight, (np.asarray(indices),))


@op("aten.embedding_dense_backward.default")
def embedding_dense_backward(
    cx: Any, grad: Any, indices: np.ndarray, num_weights: int, padding_idx: int, scale: bool
) -> Any:
    """onehot(indices)^T @ grad: each row's gradients summed by the system's matmul."""
    if scale:
        from fpgrad.errors import InputError

        raise InputError(f"{cx.label()}: Embedding(scale_grad_by_freq=True) is not supported")
    idx = np.asarray(indices).ravel()
    onehot = np.zeros((idx.size, int(num_weights)))
    onehot[np.arange(idx.size), idx] = 1.0
    if padding_idx >= 0:
        onehot[:, padding_idx] = 0.0
    dim = shapes.shape(grad)[-1]
    g = shapes.reshape(grad, (idx.size, dim))
    from fpgrad.graph.ops import taps

    return taps.select_sum(cx, np.ascontiguousarray(onehot.T), g)


@op("aten.split.Tensor")
def split(cx: Any, x: Any, size: int, dim: int = 0) -> list:
    n = shapes.shape(x)[dim]
    return [slice_(cx, x, dim, s, min(s + size, n)) for s in range(0, n, size)]


@op("aten.split_with_sizes.default")
def split_with_sizes(cx: Any, x: Any, sizes: Any, dim: int = 0) -> list:
    out, start = [], 0
    for s in sizes:
        out.append(slice_(cx, x, dim, start, start + s))
        start += s
    return out


@op("aten.select_backward.default")
def select_backward(cx: Any, g: Any, sizes: Any, dim: int, index: int) -> Any:
    nd = len(sizes)
    idx: list[Any] = [slice(None)] * nd
    idx[dim % nd] = int(index)
    return shapes.place(cx.ar.asarray(np.zeros(tuple(sizes))), g, tuple(idx))


@op("aten.slice_backward.default")
def slice_backward(cx: Any, g: Any, sizes: Any, dim: int, start: int, end: int, step: int) -> Any:
    nd = len(sizes)
    idx: list[Any] = [slice(None)] * nd
    idx[dim % nd] = slice(start, end, step)
    return shapes.place(cx.ar.asarray(np.zeros(tuple(sizes))), g, tuple(idx))
