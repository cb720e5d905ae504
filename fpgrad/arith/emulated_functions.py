"""The elementary functions of :class:`fpgrad.arith.emulated.EmulatedArith` (exp, log, log1p,
tanh, sigmoid, ncdf, npdf; softplus, expm1, erf, sin, cos, atan) as ``(base, u)`` pairs, at high precision (mpmath, for the Ziv
loop) and in float64 (the first, usually decisive, try); the rounding is in
:mod:`fpgrad.arith.emulated`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
from mpmath.ctx_mp import MPContext

from fpgrad.arith.expansion import two_prod

# The functions at high precision, as (base, u): the value is the exact ``base`` plus ``u``, and
# ``u`` carries a small *relative* error. Saturating functions put their distance to +-1 in u,
# so that tanh(1415) = 1 - 2e-1229 is never taken for 1 by an error bound relative to 1.
# The base is an integer, or (softplus) the argument itself as an exact Fraction.
MPFunction = Callable[[MPContext, Any], tuple[int | Fraction, Any]]


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


# ---- the smooth activations' functions (fpgrad.graph.ops.smooth) ----------------------------
# None of them takes a dyadic value at a non-zero dyadic argument (Lindemann-Weierstrass for
# softplus, expm1, sin, cos; Lambert for atan); for erf it is not proven, as for ncdf above.


def _mp_softplus(c: MPContext, v: Any) -> tuple[int | Fraction, Any]:
    """log(1 + e^v): v + log1p(e^-v) for v > 0 with the exact v as base (a tail relative to
    log1p(e^-v), so that v + 2**-4000 is never taken for v), else log1p(e^v)."""
    if v > 0:  # v is the float64 argument itself: Fraction(float(v)) is exact
        return Fraction(float(v)), c.log1p(c.exp(-v))
    return 0, c.log1p(c.exp(v))


def _mp_expm1(c: MPContext, v: Any) -> tuple[int, Any]:
    if v < -1:
        return -1, c.exp(v)  # -1 + e^v: the distance to -1 in the tail
    return 0, c.expm1(v)


def _mp_erf(c: MPContext, v: Any) -> tuple[int, Any]:
    if abs(v) > 1:
        sign = 1 if v > 0 else -1
        return sign, -sign * c.erfc(abs(v))  # erf(v) = sign (1 - erfc |v|)
    return 0, c.erf(v)


def _mp_sin(c: MPContext, v: Any) -> tuple[int, Any]:
    return 0, c.sin(v)


def _mp_cos(c: MPContext, v: Any) -> tuple[int, Any]:
    if abs(v) < 1:
        return 1, -2 * c.sin(v / 2) ** 2  # cos v = 1 - 2 sin^2(v / 2): the distance to 1
    return 0, c.cos(v)


def _mp_atan(c: MPContext, v: Any) -> tuple[int, Any]:
    return 0, c.atan(v)


_ERF = np.frompyfunc(math.erf, 1, 1)


def _f64_softplus(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x + log1p(e^-x) (x > 0, base x) or log1p(e^x): exp's few ulps pass through log1p with
    a factor y / ((1 + y) log1p(y)) <= 1."""
    pos = x > 0
    return np.where(pos, x, 0.0), np.log1p(np.exp(-np.abs(x)))


def _f64_expm1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low = x < -1
    return np.where(low, -1.0, 0.0), np.where(low, np.exp(x), np.expm1(x))


def _f64_erf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """libm's erf (|x| <= 1) or sign (1 - erfc |x|), the tail erfc |x| (a few ulps each)."""
    big = np.abs(x) > 1
    sign = np.where(x > 0, 1.0, -1.0)
    tail = -sign * np.asarray(_ERFC(np.abs(x)), dtype=np.float64)
    return np.where(big, sign, 0.0), np.where(big, tail, np.asarray(_ERF(x), dtype=np.float64))


def _f64_sin(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros_like(x), np.sin(x)


def _f64_cos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1 - 2 sin^2(x / 2) for |x| < 1 (x / 2 exact; the tail a few ulps), else libm's cos."""
    small = np.abs(x) < 1
    half = np.sin(0.5 * x)
    return np.where(small, 1.0, 0.0), np.where(small, -2.0 * half * half, np.cos(x))


def _f64_atan(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros_like(x), np.arctan(x)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise equality with NaN equal to NaN."""
    return (a == b) | (np.isnan(a) & np.isnan(b))


def _same_scalar(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def exact_pow(v: Fraction, p: float) -> Fraction | None:
    """``v ** p`` for ``v > 0`` where it is rational, else None: with v = m 2^j (m odd) and
    p = num / den in lowest terms (den a power of two), the power is rational exactly when m
    is an integer's den-th power r^den and den divides j num; it is then r^num 2^(j num / den)."""
    num, den = Fraction(p).as_integer_ratio()
    m, j = v.numerator, 0
    while m % 2 == 0:
        m, j = m // 2, j + 1
    d = v.denominator
    while d % 2 == 0:
        d, j = d // 2, j - 1
    if d != 1 or (j * num) % den:
        return None
    r = round(m ** (1.0 / den)) if den > 1 else m
    for cand in (r - 1, r, r + 1):
        if cand > 0 and cand**den == m:
            return Fraction(cand) ** num * Fraction(2) ** (j * num // den)
    return None


def mp_pow(p: float) -> MPFunction:
    """``v ** p`` at the context's precision; an exact power as its Fraction (u = 0)."""

    def f(c: MPContext, v: Any) -> tuple[int | Fraction, Any]:
        exact = exact_pow(_fraction(v), p) if v > 0 else None  # type: ignore[arg-type]
        if exact is not None:
            return exact, c.mpf(0)
        return 0, c.power(v, c.mpf(p))

    return f


def f64_pow(p: float) -> F64Function:
    def f(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros_like(x), np.power(x, p)

    return f


def _clamp(c: MPContext, v: Any) -> Any:
    """``v`` with a magnitude above 2**1100 or below 2**-1200 replaced by that power of two
    (same sign): stand-ins that :func:`~fpgrad.numbers.rounding.round_exact` rounds as it rounds ``v``,
    in every mode and format, so the exact retry never builds a Fraction of ~x / ln 2 bits."""
    if not v or not c.isfinite(v):
        return v
    e = int(c.mag(v))  # |v| < 2**e, within a few units
    if e > 1100:
        return c.ldexp(c.sign(v), 1100)
    if e < -1200:
        return c.ldexp(c.sign(v), -1200)
    return v


def _fraction(v: Any) -> Fraction | float:
    """An mpmath mpf as an exact Fraction (inf/NaN as floats), whatever its context."""
    sign, man, exp, _ = v._mpf_
    if not man:
        return float(v)  # zero, inf or NaN
    f = Fraction(int(man)) * (Fraction(2) ** int(exp))
    return -f if sign else f
