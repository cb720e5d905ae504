"""The elementary functions of :class:`fpgrad.arith.emulated.EmulatedArith` (exp, log, log1p,
tanh, sigmoid, ncdf, npdf) as ``(base, u)`` pairs, at high precision (mpmath, for the Ziv
loop) and in float64 (the first, usually decisive, try); the rounding is in
:mod:`fpgrad.arith.emulated`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from mpmath.ctx_mp import MPContext

from fpgrad.arith.expansion import two_prod

# The functions at high precision, as (base, u): the value is the exact ``base`` plus ``u``, and
# ``u`` carries a small *relative* error. Saturating functions put their distance to +-1 in u,
# so that tanh(1415) = 1 - 2e-1229 is never taken for 1 by an error bound relative to 1.
MPFunction = Callable[[MPContext, Any], tuple[int, Any]]


def _mp_exp(c: MPContext, v: Any) -> tuple[int, Any]:
    return 0, c.exp(v)


def _mp_log(c: MPContext, v: Any) -> tuple[int, Any]:
    return 0, c.log(v)


def _mp_log1p(c: MPContext, v: Any) -> tuple[int, Any]:
    return 0, c.log1p(v)


def _mp_tanh(c: MPContext, v: Any) -> tuple[int, Any]:
    if abs(v) < 1:
        return 0, c.tanh(v)
    sign = 1 if v > 0 else -1
    return sign, -sign * 2 / (c.exp(2 * abs(v)) + 1)  # tanh |v| = 1 - 2 / (e^(2|v|) + 1)


def _mp_sigmoid(c: MPContext, v: Any) -> tuple[int, Any]:
    if v > 0:
        return 1, -1 / (1 + c.exp(v))  # sigmoid(v) = 1 - sigmoid(-v)
    return 0, 1 / (1 + c.exp(-v))


def _mp_ncdf(c: MPContext, v: Any) -> tuple[int, Any]:
    if v > 0:
        return 1, -c.erfc(v / c.sqrt(2)) / 2  # Phi(v) = 1 - Phi(-v)
    return 0, c.erfc(-v / c.sqrt(2)) / 2


def _mp_npdf(c: MPContext, v: Any) -> tuple[int, Any]:
    return 0, c.exp(-v * v / 2) / c.sqrt(2 * c.pi)


# The functions in float64, as (base, u): the value is the exact base (0 or +-1) plus u, and u
# has a relative error below FUNC_REL_ERR (each is a few libm operations of <= 4 ulp each).
# Saturating functions carry their distance to +-1 in u, as the mpmath versions below.
F64Function = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _f64_exp(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros_like(x), np.exp(x)


def _f64_log(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros_like(x), np.log(x)


def _f64_log1p(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros_like(x), np.log1p(x)


def _f64_tanh(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    big = np.abs(x) >= 1
    sign = np.where(x > 0, 1.0, -1.0)
    tail = -sign * 2.0 / (np.exp(2.0 * np.abs(x)) + 1.0)  # tanh|x| = 1 - 2 / (e^(2|x|) + 1)
    return np.where(big, sign, 0.0), np.where(big, tail, np.tanh(x))


def _f64_sigmoid(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos = x > 0
    tail = 1.0 / (1.0 + np.exp(np.abs(x)))  # sigmoid(-|x|), relative error a few ulps
    return np.where(pos, 1.0, 0.0), np.where(pos, -tail, tail)  # sigmoid(x) = 1 - sigmoid(-x)


_ERFC = np.frompyfunc(math.erfc, 1, 1)
_RSQRT2 = math.sqrt(0.5)
_RSQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _f64_ncdf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Phi(x) = erfc(-x / sqrt 2) / 2 (x <= 0) or 1 - erfc(x / sqrt 2) / 2: libm's erfc (a few
    ulps) of an argument t off by 2 ulps, whose effect 2 t^2 2**-52 stays below 3e-13 where
    erfc(t) is a normal float64 (t < 27); tests/test_emulated_gelu.py checks every float16 and
    bfloat16 input against MPFR."""
    tail = np.asarray(_ERFC(np.abs(x) * _RSQRT2), dtype=np.float64) * 0.5
    pos = x > 0
    return np.where(pos, 1.0, 0.0), np.where(pos, -tail, tail)


def _f64_npdf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exp(-x^2 / 2) / sqrt(2 pi) from the exact square (hi + lo): a few ulps."""
    hi, lo = two_prod(x, x)
    return np.zeros_like(x), np.exp(-0.5 * hi) * np.exp(-0.5 * lo) * _RSQRT2PI
