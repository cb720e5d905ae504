"""Whether an exact system's values are exactly given float64 numbers (a ball of radius 0 at
that float, an exact Arb ball, an mpmath number equal to it): where they are, torch's float64
values of a constant are the real ones."""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.arith.ball import Ball


def equals_floats(v: Any, floats: np.ndarray) -> bool:
    """Is every element of the system value ``v`` exactly the float64 in ``floats``?"""
    if isinstance(v, Ball):
        mid, rad = np.asarray(v.mid), np.asarray(v.rad)
        if mid.shape[1:] != floats.shape:
            return False
        return bool(np.all(rad == 0) and np.all(mid[1:] == 0) and np.array_equal(mid[0], floats))
    arr = np.asarray(v, dtype=object)
    if arr.shape != floats.shape:
        return False
    for x, f in zip(arr.ravel(), floats.ravel(), strict=True):
        if hasattr(x, "is_exact"):  # an Arb ball
            from flint import arb

            if not (x.is_exact() and x == arb(float(f))):
                return False
        elif not x == float(f):  # mpmath: an exact comparison with the float
            return False
    return True


def sum_is_exact(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> bool:
    """Is every finite element of ``s`` exactly the real ``a + b`` (numpy broadcasting, as
    torch's)? TwoSum: ``t = a + b`` and its error ``(a - (t - (t - a))) + (b - (t - a))`` are
    exact for finite ``t`` (subnormals included), so ``t == s`` with a zero error proves it.
    A finite ``s`` has finite operands (an infinite one makes ``t`` inf or NaN); an infinite or
    NaN ``s`` of finite operands is an overflow (the real sum is finite): False."""
    with np.errstate(all="ignore"):
        t = a + b
        bb = t - a
        err = (a - (t - bb)) + (b - bb)
    fin = np.isfinite(s)
    if np.any(np.broadcast_to(np.isfinite(a) & np.isfinite(b), s.shape) & ~fin):
        return False
    t, err = np.broadcast_to(t, s.shape)[fin], np.broadcast_to(err, s.shape)[fin]
    return bool(np.all(t == s[fin]) and np.all(err == 0))


def all_non_finite(v: Any) -> bool:
    """Is every element of the system value ``v`` infinite or NaN (where torch's value is: a
    finite real one there, an overflow of finite inputs, is no exact value)?"""
    if isinstance(v, Ball):
        return not bool(np.any(np.isfinite(np.asarray(v.mid)).all(axis=0)))
    for x in np.asarray(v, dtype=object).ravel():
        fin = x.is_finite() if hasattr(x, "is_finite") else np.isfinite(float(x))
        if fin:
            return False
    return True
