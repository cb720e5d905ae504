"""Data movement and indexing: flips, rolls, repeats, triangles, padding, gathers, scatters,
nearest upsampling, the first maximum along a dimension, cumulative sums.

Every forward op here copies values: which input element (or fill) each output element
holds is found by replaying the op in torch on the float64 numbers ``1..n`` (exact below
2^53; 0 is a fill), so index semantics (negative dims, shifts, reflection, nearest-neighbour
rounding) are torch's own; values never pass through torch. The sums (``index_add``,
``scatter_add``, ``index_put(accumulate=True)``, the padding, upsampling, unfold and diagonal
backward, ``cumsum``) take each target's addends in the order of torch's CPU kernels
(source order along the index) and round as those kernels do: where they accumulate in
float (index_add, scatter_add, upsampling backward, cumsum), as the system's ``sum`` (an
emulated machine's accumulation: its default, a float32 accumulator rounded once, is
torch's float16/bfloat16 result); elsewhere every addition rounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fpgrad.arith.base import ExactDerivatives
from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.ops.conv import _first_max
from fpgrad.graph.ops.registry import op


# ---- index maps ------------------------------------------------------------------------------
def _tensors(args: Any) -> Any:
    """Integer numpy arrays (index tensors) as torch tensors, lists recursively."""
    if isinstance(args, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(args).reshape(args.shape))  # 0-d: 0-d
    if isinstance(args, (list, tuple)):
        return type(args)(_tensors(a) for a in args)
    return args


def _ids(shape: Any) -> torch.Tensor:
    """The float64 numbers ``1..n`` in ``shape`` (exact: n < 2^53)."""
    n = math.prod(int(v) for v in shape)
    if n >= 2**53:
        raise InputError(f"a tensor of {n} elements is too large to index")
    return torch.arange(1, n + 1, dtype=torch.float64).reshape(tuple(int(v) for v in shape))


def _replay(fn: Callable[..., torch.Tensor], shape: Any, *args: Any) -> np.ndarray:
    """For each element of ``fn(x, *args)``, the flat index in ``x`` (of ``shape``) it copies,
    -1 where it is a fill: ``fn`` run by torch on the numbers ``1..n`` (:func:`_ids`)."""
    with torch.no_grad():
        out = fn(_ids(shape), *_tensors(args))
    return out.numpy().astype(np.int64) - 1


def _replay_all(fn: Callable[..., Any], shape: Any, *args: Any) -> list[np.ndarray]:
    """:func:`_replay` for an op returning several tensors."""
    with torch.no_grad():
        outs = fn(_ids(shape), *_tensors(args))
    return [o.numpy().astype(np.int64) - 1 for o in outs]


def _flat_ids(shape: Any) -> torch.Tensor:
    """The int64 flat indices ``0..n-1`` in ``shape``."""
    n = math.prod(int(s) for s in shape)
    return torch.arange(n, dtype=torch.int64).reshape(tuple(int(s) for s in shape))


def _pick(cx: Any, x: Any, src: np.ndarray, fill: float = 0.0) -> Any:
    """An array of ``src``'s shape: element ``x.flat[src]``, or ``fill`` where ``src < 0``."""
    out_shape = src.shape
    fills = src < 0
    if fills.all():
        return cx.ar.asarray(np.full(out_shape, float(fill)))
    flat = shapes.reshape(x, (-1,))
    picked = shapes.reshape(shapes.index(flat, (np.where(fills, 0, src).ravel(),)), out_shape)
    if not fills.any():
        return picked
    return cx.ar.where(~fills, picked, cx.ar.asarray(np.full(out_shape, float(fill))))


def _ranks(t: np.ndarray) -> np.ndarray:
    """For each entry of the 1-D ``t``, how many earlier entries equal it."""
    order = np.argsort(t, kind="stable")
    s = t[order]
    pos = np.arange(t.size)
    new = np.ones(t.size, dtype=bool)
    new[1:] = s[1:] != s[:-1]
    start = np.maximum.accumulate(np.where(new, pos, 0))
    rank = np.empty(t.size, dtype=np.int64)
    rank[order] = pos - start
    return rank


def _accumulate(cx: Any, base: Any, targets: np.ndarray, values: Any, wide: bool) -> Any:
    """``base`` with ``values.flat[i]`` added to ``base.flat[targets.flat[i]]`` for every
    ``i``, each target's addends in increasing ``i``. ``wide``: each touched element is the
    system's ``sum`` of ``(base, its addends, trailing exact zeros)``, so an emulated machine
    accumulates as its ``sum`` does (fp32, the default: a float32 accumulator rounded once,
    as torch's CPU kernels for index_add, scatter_add, nearest upsampling's backward and
    cumsum do in float16 and bfloat16); else one addition of the system per addend, rounded
    each (torch's kernels for index_put, padding and unfold backward)."""
    shape = shapes.shape(base)
    total = shapes.reshape(base, (-1,))
    t = targets.ravel()
    v = shapes.reshape(values, (-1,))
    if t.size != shapes.shape(v)[0]:
        raise ValueError(f"{t.size} targets for {shapes.shape(v)[0]} values")
    if t.size == 0:
        return base
    rank = _ranks(t)
    if not wide:  # round r adds every target's r-th addend
        for r in range(int(rank.max()) + 1):
            sel = np.nonzero(rank == r)[0]
            tr = t[sel]
            new = cx.ar.add(shapes.index(total, (tr,)), shapes.index(v, (sel,)))
            total = shapes.place(total, new, (tr,))
        return shapes.reshape(total, shape)
    touched = np.unique(t)
    row = np.searchsorted(touched, t)
    zero = _zeros(cx, (touched.size,))
    cols = [shapes.index(total, (touched,))]
    for r in range(int(rank.max()) + 1):
        sel = np.nonzero(rank == r)[0]
        cols.append(shapes.place(zero, shapes.index(v, (sel,)), (row[sel],)))
    sums = cx.ar.sum(shapes.stack(cols, 1), axis=1)
    return shapes.reshape(shapes.place(total, sums, (touched,)), shape)


def _assign(cx: Any, base: Any, targets: np.ndarray, values: Any, what: str) -> Any:
    """``base`` with ``base.flat[targets.flat[i]] = values.flat[i]``; refused where two
    values go to one place (torch leaves which one is written unspecified)."""
    t = targets.ravel()
    if np.unique(t).size != t.size:
        raise InputError(f"{cx.label()}: {what} writes two values to one element (torch leaves "
                         "which one unspecified); use an accumulating form (scatter_add, "
                         "index_put(accumulate=True))")  # fmt: skip
    shape = shapes.shape(base)
    flat = shapes.place(shapes.reshape(base, (-1,)), shapes.reshape(values, (-1,)), (t,))
    return shapes.reshape(flat, shape)


def _zeros(cx: Any, shape: Any) -> Any:
    return cx.ar.asarray(np.zeros(tuple(int(s) for s in shape)))


# ---- pure movement ---------------------------------------------------------------------------
@op("aten.flip.default")
def flip(cx: Any, x: Any, dims: Any) -> Any:
    return _pick(cx, x, _replay(torch.flip, shapes.shape(x), dims))


@op("aten.roll.default")
def roll(cx: Any, x: Any, shifts: Any, dims: Any = ()) -> Any:
    return _pick(cx, x, _replay(torch.roll, shapes.shape(x), shifts, dims))


@op("aten.repeat.default")
def repeat(cx: Any, x: Any, repeats: Any) -> Any:
    return _pick(cx, x, _replay(torch.Tensor.repeat, shapes.shape(x), list(repeats)))


@op("aten.triu.default")
def triu(cx: Any, x: Any, diagonal: int = 0) -> Any:
    """x above the diagonal, exact zeros elsewhere (torch writes 0, not 0 * x)."""
    return _pick(cx, x, _replay(torch.triu, shapes.shape(x), diagonal))


@op("aten.tril.default")
def tril(cx: Any, x: Any, diagonal: int = 0) -> Any:
    return _pick(cx, x, _replay(torch.tril, shapes.shape(x), diagonal))


@op("aten.constant_pad_nd.default")
def constant_pad_nd(cx: Any, x: Any, pad: Any, value: float = 0.0) -> Any:
    """Negative pads crop; the fill is ``value`` (torch's float64, taken exactly, or rounded
    into the format); a non-finite fill is refused."""
    if not math.isfinite(float(value)):
        raise InputError(f"{cx.label()}: padding with {value} is not supported (finite only)")
    src = _replay(torch.constant_pad_nd, shapes.shape(x), list(pad), 0.0)
    return _pick(cx, x, src, float(value))


_A = torch.ops.aten
#: each backward of a copying op -> (its forward, input sizes and forward arguments from the
#: backward's arguments, given a function returning an argument's shape)
_Spec = tuple[Any, Callable[[tuple, Callable[[Any], Any]], tuple[Any, tuple]]]


def _pad_args(a: tuple, shape_of: Callable[[Any], Any]) -> tuple[Any, tuple]:
    return shape_of(a[1]), (list(a[2]),)  # (grad, self, padding)


def _up_args(a: tuple, shape_of: Callable[[Any], Any]) -> tuple[Any, tuple]:
    return a[2], (a[1], *a[3:])  # (grad, output_size, input_size, *scales)


def _up_nearest_args(a: tuple, shape_of: Callable[[Any], Any]) -> tuple[Any, tuple]:
    """As :func:`_up_args`, but torch's nearest backward kernel (``nearest_idx``) copies the
    index where an output size equals the input size and halves it where it is twice the
    input size, whatever the scale (its forward uses the scale): the replayed forward gets no
    scale there (size ratios 1 and 1/2 give exactly those indices)."""
    out, sizes = list(a[1]), list(a[2])
    spatial = sizes[len(sizes) - len(out):]
    scales = list(a[3:]) + [None] * (len(out) - len(a[3:]))
    scales = [None if o in (i, 2 * i) else sc for o, i, sc in zip(out, spatial, scales, strict=True)]
    return a[2], (a[1], *scales)


def _sized_args(a: tuple, shape_of: Callable[[Any], Any]) -> tuple[Any, tuple]:
    return a[1], tuple(a[2:])  # (grad, input_sizes, *forward arguments)


_COPIES: dict[str, _Spec] = {
    **{f"aten.{k}{d}d_backward.default": (getattr(_A, f"{k}{d}d").default, _pad_args)
       for k in ("reflection_pad", "replication_pad") for d in (1, 2, 3)},
    **{f"aten.upsample_nearest{d}d_backward.default": (
        getattr(_A, f"upsample_nearest{d}d").default, _up_nearest_args) for d in (1, 2, 3)},
    **{f"aten._upsample_nearest_exact{d}d_backward.default": (
        getattr(_A, f"_upsample_nearest_exact{d}d").default, _up_args) for d in (1, 2, 3)},
    "aten.unfold_backward.default": (torch.Tensor.unfold, _sized_args),
    "aten.diagonal_backward.default": (torch.diagonal, _sized_args),
}  # fmt: skip
#: backward ops that sum each incoming gradient element into the input element it copied
COPY_BACKWARDS = frozenset(_COPIES)
#: ops whose every output element is a copy of one input element or torch's exact zero
#: fill, replayable by torch on index tensors (:mod:`fpgrad.graph.identities`' moves)
COPY_FORWARDS = frozenset({k.replace("_backward", "") for k in _COPIES} | {
    "aten.flip.default", "aten.roll.default", "aten.repeat.default", "aten.triu.default",
    "aten.tril.default", "aten.unfold.default", "aten.diagonal.default", "aten.rot90.default",
    "aten.unbind.int"})  # fmt: skip
#: the copies that fill exact zeros: a structural fact even for an input without one
ZERO_FILLS = frozenset({"aten.triu.default", "aten.tril.default"})


def _copy_map(
    key: str, args: tuple, kwargs: dict, shape_of: Callable[[Any], Any]
) -> tuple[Any, Any]:
    """(input sizes, for each incoming gradient element the flat input index it is added to),
    the forward replayed by torch (keyword arguments passed on: upsampling's ``scales_h``...);
    (None, None) where a shape is unknown."""
    forward, split = _COPIES[key]
    sizes, fargs = split(args, shape_of)
    if sizes is None:
        return None, None
    src = _replay(lambda t, *a: forward(t, *a, **kwargs), sizes, *fargs)
    return tuple(int(v) for v in sizes), src


@op(*(k.replace("_backward", "") for k in _COPIES), "aten.unfold.default",
    "aten.diagonal.default", "aten.rot90.default", "aten.im2col.default")  # fmt: skip
def copy(cx: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Reflection / replication padding, nearest upsampling, windows (``unfold``, ``im2col``:
    ``nn.Unfold``, its zero padding a fill), diagonals, rotations: every output element a copy
    of an input one (torch's index rule, replayed)."""
    fn = cx.node.target
    return _pick(cx, x, _replay(lambda t, *a: fn(t, *a, **kwargs), shapes.shape(x), *args))


@op("aten.unbind.int")
def unbind(cx: Any, x: Any, dim: int = 0) -> list:
    srcs = _replay_all(torch.unbind, shapes.shape(x), dim)
    return [_pick(cx, x, s) for s in srcs]


@op(*_COPIES)
def copy_backward(cx: Any, g: Any, *args: Any, **kwargs: Any) -> Any:
    """Each incoming gradient element added to the input element it was copied from, in the
    order of the incoming gradient (torch's CPU loops)."""
    sizes, src = _copy_map(str(cx.node.target), (g, *args), kwargs, shapes.shape)
    wide = "upsample" in str(cx.node.target)  # torch's kernel: a float accumulator
    return _accumulate(cx, _zeros(cx, sizes), src, g, wide)


@op("aten.col2im.default")
def col2im(cx: Any, cols: Any, output_size: Any, kernel_size: Any, dilation: Any,
           padding: Any, stride: Any) -> Any:  # fmt: skip
    """``nn.Fold`` (and ``im2col``'s backward): each column element added into the image
    element ``im2col`` copies it from (``im2col`` replayed on the image's shape; elements
    from the zero padding are dropped), in the columns' order with every addition rounded,
    as torch's CPU kernel (``col2im``: ``data_im[...] += data_col[...]``)."""
    cshape = [int(v) for v in shapes.shape(cols)]
    kh, kw = (int(v) for v in kernel_size)
    sizes = (*cshape[:-2], cshape[-2] // (kh * kw), *(int(v) for v in output_size))
    im2col = torch.ops.aten.im2col.default
    src = _replay(im2col, sizes, kernel_size, dilation, padding, stride).ravel()
    keep = np.flatnonzero(src >= 0)
    vals = shapes.index(shapes.reshape(cols, (-1,)), (keep,))
    return _accumulate(cx, _zeros(cx, sizes), src[keep], vals, False)


def backward_sources(node: Any) -> np.ndarray | None:
    """For a node of :data:`COPY_BACKWARDS`: for each element of its incoming gradient, the
    flat index of the input element it is added to (from the node's arguments and recorded
    shapes); None where a shape is not recorded."""

    def shape_of(a: Any) -> Any:
        val = getattr(a, "meta", {}).get("val")
        return tuple(val.shape) if isinstance(val, torch.Tensor) else None

    return _copy_map(str(node.target), tuple(node.args), dict(node.kwargs), shape_of)[1]


# ---- index tensors ---------------------------------------------------------------------------
@op("aten.new_zeros.default")
def new_zeros(cx: Any, x: Any, size: Any, **kwargs: Any) -> Any:
    """Exact zeros of the system (integer or boolean zeros for such a ``dtype``)."""
    dtype = kwargs.get("dtype")
    if dtype is not None and not dtype.is_floating_point:
        return torch.zeros(tuple(size), dtype=dtype).numpy()
    return _zeros(cx, size)


@op("aten.index_select.default")
def index_select(cx: Any, x: Any, dim: int, index: np.ndarray) -> Any:
    return _pick(cx, x, _replay(torch.index_select, shapes.shape(x), dim, index))


@op("aten.index_add.default", "aten.index_add_.default")
def index_add(cx: Any, x: Any, dim: int, index: np.ndarray, source: Any, alpha: Any = 1) -> Any:
    """``x`` with ``source``'s slices added at ``index`` along ``dim``, in index order."""
    if alpha != 1:
        raise InputError(f"{cx.label()}: index_add with alpha={alpha} is not supported")
    targets = torch.index_select(_flat_ids(shapes.shape(x)), dim, _tensors(index)).numpy()
    return _accumulate(cx, x, targets, source, True)


@op("aten.gather.default")
def gather(cx: Any, x: Any, dim: int, index: np.ndarray, sparse_grad: bool = False) -> Any:
    return _pick(cx, x, _replay(torch.gather, shapes.shape(x), dim, index))


def _scatter_places(cx: Any, x: Any, dim: int, index: np.ndarray, src: Any) -> tuple[Any, Any]:
    """(flat targets in ``x``, the values of ``src`` at ``index``'s positions)."""
    index = np.asarray(index)
    shape = shapes.shape(x)
    shape1 = tuple(shape) or (1,)  # a 0-d index is one element (torch: only for dim <= 1)
    if index.ndim == 0:
        index = index.reshape((1,) * len(shape1))
    d = int(dim) % max(len(shape1), 1)
    if index.size and (index.min() < -shape1[d] or index.max() >= shape1[d]):
        raise InputError(f"{cx.label()}: index out of range")
    coords: list[Any] = list(np.indices(index.shape))
    coords[d] = index % shape1[d]
    targets = np.ravel_multi_index(tuple(coords), shape1)
    if src is None:
        return targets, None
    s_shape = shapes.shape(src) or (1,)
    own = np.ravel_multi_index(tuple(np.indices(index.shape)), s_shape)
    return targets, shapes.index(shapes.reshape(src, (-1,)), (own.ravel(),))


@op("aten.scatter_add.default", "aten.scatter_add_.default")
def scatter_add(cx: Any, x: Any, dim: int, index: np.ndarray, src: Any) -> Any:
    """``x`` plus ``src``'s values added at ``index`` along ``dim``, in index order."""
    targets, vals = _scatter_places(cx, x, dim, index, src)
    return _accumulate(cx, x, targets, vals, True)


@op("aten.scatter.src", "aten.scatter_.src")
def scatter_src(cx: Any, x: Any, dim: int, index: np.ndarray, src: Any) -> Any:
    targets, vals = _scatter_places(cx, x, dim, index, src)
    return _assign(cx, x, targets, vals, "scatter")


@op("aten.scatter.value", "aten.scatter_.value")
def scatter_value(cx: Any, x: Any, dim: int, index: np.ndarray, value: float) -> Any:
    """``value`` written at ``index`` along ``dim`` (a place written twice gets it twice)."""
    targets, _ = _scatter_places(cx, x, dim, index, None)
    targets = np.unique(targets)
    fill = cx.ar.asarray(np.full(targets.size, float(value)))
    return _assign(cx, x, targets, fill, "scatter")


def _index_targets(x: Any, indices: Any) -> np.ndarray:
    """Flat indices of ``x[indices]`` (torch's advanced indexing, replayed)."""
    idx = [None if i is None else _tensors(np.asarray(i)) for i in indices]
    return torch.ops.aten.index.Tensor(_flat_ids(shapes.shape(x)), idx).numpy()


@op("aten.index.Tensor")
def index(cx: Any, x: Any, indices: Any) -> Any:
    return _pick(cx, x, _index_targets(x, indices))


@op("aten.index_put.default", "aten.index_put_.default")
def index_put(cx: Any, x: Any, indices: Any, values: Any, accumulate: bool = False) -> Any:
    """``x[indices] = values`` (``+=`` in element order with ``accumulate``)."""
    targets = _index_targets(x, indices)
    vals = shapes.expand(values, targets.shape) if shapes.shape(values) != targets.shape else values
    if accumulate:
        return _accumulate(cx, x, targets, vals, False)
    return _assign(cx, x, targets, vals, "index_put")


# ---- first extremum, cumulative sum ----------------------------------------------------------
def _extremum(cx: Any, x: Any, dim: int, keepdim: bool, lowest: bool) -> tuple[Any, np.ndarray]:
    """(the maximum or minimum along ``dim``, the index of its first occurrence)."""
    if isinstance(x, np.ndarray) and x.dtype.kind in "biu" and x.ndim:  # counts, masks
        d = int(dim) % x.ndim
        first = (np.argmin if lowest else np.argmax)(x, axis=d)  # the first, as torch's
        out = np.take_along_axis(x, np.expand_dims(first, d), d)
        out = out if keepdim else np.squeeze(out, d)
        return out, first if not keepdim else np.expand_dims(first, d)
    ar = cx.ar
    shape = shapes.shape(x)
    if not shape:
        return x, np.zeros((), dtype=np.int64)
    d = int(dim) % len(shape)
    others = [i for i in range(len(shape)) if i != d]
    moved = shapes.permute(x, [*others, d])
    rows = math.prod(shape[i] for i in others)
    cols = shapes.reshape(moved, (rows, 1, shape[d], 1, 1))
    if lowest:  # the first minimum of x is the first maximum of -x (negation is exact)
        cols = ar.mul(cols, ar.const(-1.0))
    m = ar.max(cols, axis=2, keepdims=True)
    first = _first_max(ar, cols, m).reshape([shape[i] for i in others])
    if not isinstance(ar, ExactDerivatives):  # a machine's NaN: torch returns the first NaN
        nan = np.isnan(ar.to_float64(cols)).reshape(rows, shape[d])
        if nan.any():
            first = np.where(nan.any(1), np.argmax(nan, 1), first.ravel()).reshape(first.shape)
    if lowest:
        m = ar.mul(m, ar.const(-1.0))
    out = shapes.reshape(m, [shape[i] for i in others])
    if keepdim:
        out, first = shapes.unsqueeze(out, d), np.expand_dims(first, d)
    return out, first.astype(np.int64)


@op("aten.max.dim")
def max_dim(cx: Any, x: Any, dim: int, keepdim: bool = False) -> tuple[Any, np.ndarray]:
    """(the maximum along ``dim``, the index of its first occurrence: torch's CPU choice),
    decided as max pooling decides it: on exact values, an undecidable tie escalates."""
    return _extremum(cx, x, dim, keepdim, False)


@op("aten.min.dim")
def min_dim(cx: Any, x: Any, dim: int, keepdim: bool = False) -> tuple[Any, np.ndarray]:
    return _extremum(cx, x, dim, keepdim, True)


@op("aten.argmax.default", "aten.argmin.default")
def argmax(cx: Any, x: Any, dim: Any = None, keepdim: bool = False) -> np.ndarray:
    """The index of the first maximum (minimum), decided as :func:`max_dim` decides it;
    ``dim=None``: of the flattened tensor (``keepdim``: every dimension kept as 1)."""
    lowest = str(cx.node.target) == "aten.argmin.default"
    if dim is None:
        shape = shapes.shape(x)
        first = _extremum(cx, shapes.reshape(x, (-1,)), 0, False, lowest)[1]
        return first.reshape((1,) * len(shape)) if keepdim else first
    return _extremum(cx, x, dim, keepdim, lowest)[1]


@op("aten.cumsum.default")
def cumsum(cx: Any, x: Any, dim: int, dtype: Any = None) -> Any:
    """Running sums along ``dim``: ``out_i = out_{i-1} + x_i`` (torch's CPU order), one
    addition of the system each; a system with a ``cumsum`` slot (the emulated machines:
    their accumulation, as in their ``sum``) computes them itself. A mask or integer tensor
    (cumprod's backward counts zeros so) sums as torch's int64."""
    if isinstance(x, np.ndarray) and x.dtype.kind in "biu":
        return np.cumsum(x.astype(np.int64), axis=int(dim) % max(x.ndim, 1)) if x.ndim else x
    shape = shapes.shape(x)
    if not shape or shape[int(dim) % len(shape)] <= 1:
        return x
    d = int(dim) % len(shape)
    slot = getattr(cx.ar, "cumsum", None)
    if slot is not None:
        return slot(x, d)
    return running(x, d, cx.ar.add)


def running(x: Any, d: int, combine: Callable[[Any, Any], Any]) -> Any:
    """``out_i = combine(out_(i-1), x_i)`` along dimension ``d`` (``out_0 = x_0``), one call
    of the system's operation each, in torch's CPU order (cumsum, cumprod)."""
    lead = (slice(None),) * d
    parts = [shapes.index(x, (*lead, slice(0, 1)))]
    for i in range(1, shapes.shape(x)[d]):
        parts.append(combine(parts[-1], shapes.index(x, (*lead, slice(i, i + 1)))))
    return shapes.cat(parts, d)
