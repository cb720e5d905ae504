"""Shape-only operations on arrays of any number system (exact: no value changes).

numpy arrays (float64 values of an emulated machine, mpf object arrays) take numpy's own
operations; a :class:`~fpgrad.arith.ball.Ball` applies the same operation to each midpoint
word (leading axis) and to its radii.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fpgrad.arith.ball import Ball


def shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if isinstance(x, Ball) else tuple(np.shape(x))


def reshape(x: Any, new: Sequence[int]) -> Any:
    new = tuple(int(s) for s in new)
    if isinstance(x, Ball):
        rad = x.rad.reshape(new)
        return Ball(x.mid.reshape(x.mid.shape[0], *rad.shape), rad)
    return np.reshape(x, new)


def permute(x: Any, dims: Sequence[int]) -> Any:
    nd = len(shape(x))
    dims = tuple(int(d) % nd if nd else 0 for d in dims)
    if isinstance(x, Ball):
        return Ball(np.transpose(x.mid, (0, *(d + 1 for d in dims))), np.transpose(x.rad, dims))
    return np.transpose(x, dims)


def transpose(x: Any, a: int, b: int) -> Any:
    nd = len(shape(x))
    dims = list(range(nd))
    dims[a % nd], dims[b % nd] = dims[b % nd], dims[a % nd]
    return permute(x, dims)


def expand(x: Any, sizes: Sequence[int]) -> Any:
    old = shape(x)
    lead = len(sizes) - len(old)
    full = tuple(old[i - lead] if (s == -1 and i >= lead) else int(s) for i, s in enumerate(sizes))
    if isinstance(x, Ball):
        k = x.mid.shape[0]
        mid = x.mid.reshape(k, *(1,) * lead, *old)
        return Ball(np.broadcast_to(mid, (k, *full)), np.broadcast_to(x.rad, full))
    return np.broadcast_to(x, full)


def index(x: Any, idx: Any) -> Any:
    """``x[idx]`` (basic or integer-array indexing)."""
    return x[idx]


def squeeze_dims(x: Any, dims: Sequence[int]) -> Any:
    nd = len(shape(x))
    dims = {int(d) % nd for d in dims if shape(x)[int(d) % nd] == 1}
    return reshape(x, [s for i, s in enumerate(shape(x)) if i not in dims])


def unsqueeze(x: Any, dim: int) -> Any:
    s = list(shape(x))
    dim = dim % (len(s) + 1)
    s.insert(dim, 1)
    return reshape(x, s)


def cat(parts: Sequence[Any], dim: int) -> Any:
    if isinstance(parts[0], Ball):
        nd = parts[0].ndim
        d = dim % nd
        return Ball(
            np.concatenate([p.mid for p in parts], axis=d + 1),
            np.concatenate([p.rad for p in parts], axis=d),
        )
    return np.concatenate(list(parts), axis=dim)


def place(zeros: Any, x: Any, idx: tuple[Any, ...]) -> Any:
    """A copy of ``zeros`` (an array of exact zeros of the system) with ``x`` at ``idx``."""
    if isinstance(zeros, Ball):
        mid, rad = zeros.mid.copy(), zeros.rad.copy()
        mid[(slice(None), *idx)] = x.mid
        rad[idx] = x.rad
        return Ball(mid, rad)
    out = np.array(zeros, copy=True)
    if isinstance(x, np.ndarray) and x.ndim == 0:
        x = x[()]  # its element: an object array would store a 0-d array as one element
    out[idx] = x
    return out


def stack(parts: Sequence[Any], dim: int) -> Any:
    return cat([unsqueeze(p, dim) for p in parts], dim)
