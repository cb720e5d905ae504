"""The counts of a widening cast (``_to_copy``) from those of its input, without a pass over it.

Under autocast most casts of tensors that an earlier op of the same step wrote widen a
``bfloat16`` (or ``float16``) tensor the watch already counted: a weight or bias gradient
widened to ``float32``, the logits widened for the loss. :func:`remember` keeps each counted
half-precision output's counts (zeros, subnormals, infs, NaNs, smallest and largest finite
non-zero magnitude) by ``id``, with a weak reference, its version counter, data pointer, shape,
strides and dtype; :func:`cast_stats` gives a cast's counts when its input is such a tensor
unchanged since (the same object, version, pointer, shape, strides and dtype), or a
contiguous view of all of one (same data pointer, same number of elements, both contiguous:
the same elements in the same order). The output format holds every input value (``float32``
or ``float64`` from ``bfloat16`` or ``float16``), so each output element is its input element:
zeros, infs, NaNs and the finite non-zero magnitudes are the same; the subnormals are the same
when both formats have the same smallest normal (``bfloat16`` and ``float32``) and none when
the input has none (the wider format's smallest normal is not larger); else no derivation.
Anything else (other ops, narrowing casts, inputs not counted this step) is counted as before.
The counts are what a pass over the output would find; the rest of the record (created /
inherited) is decided from them as for any output.

A write through an alias with a version counter of its own (``y.data.zero_()``, ``out=y.data``)
leaves ``y``'s version as it was: the watch calls :func:`written` after each mutating op, which
drops the counts of every kept tensor in a storage the op wrote (a storage known by the address
of its start). Inference tensors (no version
counter) are never kept. A write torch does not see at all (through ``numpy()``, a raw storage)
is not detected: the counts kept before it are used.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from fpgrad.watching.families import _WIDER, SMALLEST_NORMAL

#: id of a counted output -> (weak reference, version, data pointer, shape, strides, dtype,
#: (zeros, subnormals, infs, nans, min_abs, max_abs)); emptied by :func:`forget`.
_COUNTED: dict[int, tuple] = {}
#: At most this many entries (then emptied: only a speed-up is lost).
LIMIT = 4096
_TO_COPY = torch.ops.aten._to_copy.default
#: The formats whose outputs are kept (the inputs of widening casts worth a derivation).
KEPT = (torch.bfloat16, torch.float16)


def remember(t: torch.Tensor, st: dict[str, Any]) -> None:
    """Keep the counts ``st`` of the output ``t`` (``zeros``, ``subnormals``, ``infs``, ``nans``,
    ``min_abs``, ``max_abs``) for the casts of it later in the step (formats of :data:`KEPT`
    only)."""
    if t.dtype not in KEPT or t.is_inference():  # (an inference tensor has no version)
        return
    if len(_COUNTED) >= LIMIT:
        forget()
    ptr = t.data_ptr()
    _COUNTED[id(t)] = (
        weakref.ref(t),
        t._version,
        ptr,
        t.shape,
        t.stride(),
        t.dtype,
        (st["zeros"], st["subnormals"], st["infs"], st["nans"], st["min_abs"], st["max_abs"]),
    )
    _BY_STORAGE.setdefault(ptr - int(t.storage_offset()) * t.element_size(), []).append(id(t))


#: storage start (``data_ptr - storage_offset * element_size``, the same for every tensor of a
#: storage) -> ids kept with data in it (an id may be stale: dropping it only costs a count).
_BY_STORAGE: dict[int, list[int]] = {}
#: id of a mutating op -> (the op, positions and names of the arguments that it writes).
_WRITES: dict[int, tuple[Any, list[int], list[str]]] = {}


def written(func: Any, args: tuple, kwargs: dict) -> None:
    """Drop the counts of every kept tensor in a storage that the mutating op ``func`` wrote
    (its arguments marked written in its schema, tensors or lists of them)."""
    if not _COUNTED:
        return
    w = _WRITES.get(id(func))
    if w is None or w[0] is not func:
        sch = func._schema.arguments
        pos = [i for i, a in enumerate(sch) if a.alias_info is not None and a.alias_info.is_write]
        w = _WRITES[id(func)] = (func, pos, [sch[i].name for i in pos])
    _, pos, names = w
    for i, n in zip(pos, names, strict=True):
        x = args[i] if i < len(args) else kwargs.get(n)
        for t in x if isinstance(x, (list, tuple)) else (x,):
            if isinstance(t, torch.Tensor):
                try:
                    start = t.data_ptr() - int(t.storage_offset()) * t.element_size()
                except (RuntimeError, NotImplementedError):  # no storage to read: drop all
                    forget()
                    return
                for k in _BY_STORAGE.pop(start, ()):
                    _COUNTED.pop(k, None)


def forget() -> None:
    """Drop every kept count (at the end of a step)."""
    _COUNTED.clear()
    _BY_STORAGE.clear()


def _kept(x: torch.Tensor) -> tuple | None:
    """The kept counts of ``x`` when it is the tensor counted (the same object) and unchanged
    since (version, data pointer, shape, strides, dtype), else None."""
    e = _COUNTED.get(id(x))
    if e is None or e[0]() is not x:
        return None
    _, version, ptr, shape, stride, dtype, counts = e
    if x._version != version or x.data_ptr() != ptr or x.shape != shape or x.stride() != stride:
        return None
    return counts if x.dtype == dtype else None


def cast_stats(func: Any, args: tuple, t: torch.Tensor) -> dict[str, Any] | None:
    """The counts of ``t = _to_copy(args[0], ...)`` from its input's kept counts (see the
    module docstring for the proof), or None when they do not follow."""
    if func is not _TO_COPY or not args:
        return None
    x = args[0]
    if not isinstance(x, torch.Tensor):
        return None
    counts = _kept(x)
    if counts is None and x._base is not None:  # a view of a counted tensor, all of it
        base = x._base
        if (
            x.numel() == base.numel()
            and x.data_ptr() == base.data_ptr()
            and x.is_contiguous()
            and base.is_contiguous()
            and x.dtype == base.dtype
        ):
            counts = _kept(base)
    if counts is None or t.shape != x.shape:
        return None
    dtype = x.dtype
    z, s, i, n, lo, hi = counts
    out = t.dtype
    if dtype not in _WIDER.get(out, ()):  # not every input value is an output value
        return None
    if s and SMALLEST_NORMAL[out] != SMALLEST_NORMAL[dtype]:
        return None
    return {"zeros": z, "subnormals": s, "infs": i, "nans": n, "min_abs": lo, "max_abs": hi}
