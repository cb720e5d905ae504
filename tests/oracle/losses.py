"""Loss nodes for the interval oracle (:mod:`tests.oracle.interval_ad`), written from torch's
definitions (Loss.cpp and its CPU kernels), no fpgrad code.

Each node's local derivative is torch's backward formula, which for BCE is not the derivative
of its clamped forward: ``max(log x, -100)`` is flat below e^-100, yet torch's backward reads
``(x - t) / max(x (1 - x), EPSILON)`` everywhere. Branches are decided on intervals; a tie
follows torch; an interval across a threshold raises :class:`Undecided` (more digits).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpmath import iv

from tests.oracle.interval_ad import Undecided, V, lift

#: torch's ``constexpr float EPSILON = 1e-12`` as the float32 it is
BCE_EPSILON = float(np.float32(1e-12))


def _is_zero(x: Any) -> bool:
    return bool(x.a == 0 and x.b == 0)


def _sign(x: Any) -> int:
    if x.a > 0:
        return 1
    if x.b < 0:
        return -1
    if _is_zero(x):
        return 0
    raise Undecided("sign")


def smooth_l1(d: Any, beta: float) -> V:
    """z = |d|: d^2 / (2 beta) where z < beta, else z - beta / 2 (z = beta: linear); the
    derivative d / beta, or sign(d) where z >= beta (at d = 0 with beta = 0: 0)."""
    d = lift(d)
    s = _sign(d.v)
    z = d.v * s
    if beta == 0:
        return V(z, ((d, iv.mpf(s)),))
    if z.b < beta:
        return V(d.v * d.v / (2 * iv.mpf(beta)), ((d, d.v / iv.mpf(beta)),))
    if z.a >= beta:
        return V(z - iv.mpf(beta) / 2, ((d, iv.mpf(s)),))
    raise Undecided("smooth_l1 threshold")


def _floor_log(v: Any) -> Any:
    """max(log v, -100): log v where v > e^-100, -100 where v < e^-100 (v = 0 included)."""
    floor = iv.exp(iv.mpf(-100))
    if v.a > floor.b:
        return iv.log(v)
    if v.b < floor.a:
        return iv.mpf(-100)
    raise Undecided("log clamp")


def bce(x: Any, t: float) -> V:
    """torch's BCE of a probability x: value ``-(t max(log x, -100) + (1 - t) max(log(1 - x),
    -100))``, derivative ``(x - t) / max(x (1 - x), EPSILON)`` (the backward kernel)."""
    x = lift(x)
    t_iv = iv.mpf(t)
    one_minus = 1 - x.v
    value = -(t_iv * _floor_log(x.v) + (1 - t_iv) * _floor_log(one_minus))
    den = x.v * one_minus
    eps = iv.mpf(BCE_EPSILON)
    if den.a > eps.b:
        pass
    elif den.b <= eps.a:
        den = eps
    else:
        raise Undecided("bce denominator clamp")
    return V(value, ((x, (x.v - t_iv) / den),))


def xlogy(x: Any, y: Any) -> V:
    """x log y, 0 where x is exactly 0 (also at y = 0); derivatives log y and x / y."""
    x, y = lift(x), lift(y)
    if _is_zero(x.v):
        return V(iv.mpf(0), ((x, iv.mpf(0)), (y, iv.mpf(0))))
    _sign(x.v)  # an interval holding 0 that is not 0: undecided
    ly = iv.log(y.v)
    return V(x.v * ly, ((x, ly), (y, x.v / y.v)))


def soft_margin(x: Any, t: float) -> V:
    """log(1 + e^(-x t)), derivative -t / (1 + e^(x t))."""
    x = lift(x)
    u = -x.v * t
    return V(iv.log(1 + iv.exp(u)), ((x, -iv.mpf(t) / (1 + iv.exp(-u))),))


def elementwise(f: Any, *arrays: Any) -> np.ndarray:
    """``f`` applied elementwise over object arrays (or scalars broadcast)."""
    b = np.broadcast_arrays(*[np.asarray(a, dtype=object) for a in arrays])
    out = np.empty(b[0].shape, dtype=object)
    for i in np.ndindex(out.shape):
        out[i] = f(*(a[i] for a in b))
    return out


def clamp_min(v: Any, lo: float) -> V:
    """max(v, lo) with torch's clamp_min backward: the gradient passes where v >= lo (a tie
    included), 0 below."""
    v = lift(v)
    if v.v.a >= lo:
        return V(v.v, ((v, iv.mpf(1)),))
    if v.v.b < lo:
        return V(iv.mpf(lo), ((v, iv.mpf(0)),))
    raise Undecided("clamp_min")


def clamp_min_no_grad(v: Any, lo: float) -> V:
    """max(v, lo) with derivative 1: torch clamps cosine_similarity's norms in place under
    no_grad, so autograd differentiates as if unclamped."""
    v = lift(v)
    if v.v.a >= lo:
        return V(v.v, ((v, iv.mpf(1)),))
    if v.v.b < lo:
        return V(iv.mpf(lo), ((v, iv.mpf(1)),))
    raise Undecided("clamp_min")


def norm2(row: np.ndarray) -> V:
    """sqrt(sum x^2), torch's backward ``x / norm`` masked to 0 where the norm is exactly 0."""
    s = row[0] * row[0]
    for x in row[1:]:
        s = s + x * x
    if _is_zero(s.v):
        return V(iv.mpf(0), ((s, iv.mpf(0)),))
    if not s.v.a > 0:
        raise Undecided("norm")
    r = iv.sqrt(s.v)
    return V(r, ((s, 1 / (2 * r)),))
