"""Hyperbolic, inverse trigonometric and base-2/10 functions of the emulated machines: ``sinh``,
``cosh``, ``tan``, ``asin``, ``acos``, ``asinh``, ``acosh``, ``atanh``, ``exp2``, ``log2``,
``log10``, correctly rounded in every mode as :class:`fpgrad.arith.emulated.EmulatedArith`'s
other functions (float64 first, within 2**-40; the mpmath Ziv loop where that does not decide).

The trigonometric and hyperbolic ones have dyadic values only at the exact points given (sinh,
tan, asin, asinh, atanh of 0; cosh of 0; acos and acosh of 1): elsewhere the value is
transcendental (Lindemann-Weierstrass), so the loop ends. ``exp2`` of an integer, ``log2`` of
a power of two and ``log10`` of a power of ten are exact: their mpmath functions return that
value itself (as pow's do), so the loop ends on a rounding boundary too. ``cosh`` carries its distance to 1, ``2 sinh^2(x / 2)`` (x / 2 exact), so
that a result just above 1 is not lost in a relative bound. Outside a domain (|x| > 1 for
asin, acos and atanh, x < 1 for acosh) the result is NaN, as torch's; atanh(+-1) = +-inf.

``atan2(y, x)`` (:meth:`TrigFunctions.atan2`) takes two arguments: numpy's ``arctan2`` first
(within 2**-40), mpmath's ``atan2`` in the Ziv loop where that does not decide. Its only dyadic
value is 0 (y = 0, x > 0; elsewhere ``atan(y / x) (+- pi)`` of a rational is transcendental),
which numpy returns exactly with C99's signed zeros and +-pi on the negative x axis. An infinite
argument is replaced by a finite pair with the same angle (``(+-inf, x)`` by ``(+-1, 0)``,
``(+-inf, +-inf)`` by ``(+-1, +-1)``, ``(y, +-inf)`` by ``(+-0, +-1)``), so that the loop sees
finite numbers; NaN in, NaN out.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
from mpmath.ctx_mp import MPContext

from fpgrad.arith.emulated_functions import _fraction, _same
from fpgrad.numbers.rounding import Mode, round_to

FUNC_REL_ERR = 2.0**-40  # numpy's arctan2 and power are within a few float64 ulps (as emulated's)
_BIG = 2.0**1000  # as emulated._BIG: above every emulable format's max


def _plain(f: Any) -> Any:
    def f64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros_like(x), f(x)

    return f64


def _mp(name: str) -> Any:
    def fmp(c: MPContext, v: Any) -> tuple[int, Any]:
        return 0, getattr(c, name)(v)

    return fmp


def _f64_cosh(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ones_like(x), 2 * np.sinh(0.5 * x) ** 2


def _mp_cosh(c: MPContext, v: Any) -> tuple[int, Any]:
    return 1, 2 * c.sinh(v / 2) ** 2


def _mp_exp2(c: MPContext, v: Any) -> tuple[int | Fraction, Any]:
    f = _fraction(v)
    if isinstance(f, Fraction) and f.denominator == 1:
        return Fraction(2) ** int(f), c.mpf(0)
    return 0, c.power(2, v)


def _mp_log(base: int) -> Any:
    def fmp(c: MPContext, v: Any) -> tuple[int | Fraction, Any]:
        f, k = _fraction(v), 0
        if isinstance(f, Fraction) and f > 0:
            while f > 1 and f % base == 0:
                f, k = f / base, k + 1
            while base == 2 and f < 1 and (1 / f).denominator == 1 and (1 / f) % 2 == 0:
                f, k = f * 2, k - 1
            if f == 1:
                return Fraction(k), c.mpf(0)
        return 0, c.log(v, base)

    return fmp


#: name -> (float64 function, mpmath function, exact points, domain (lo, hi, open) or None)
TRIG = {
    "sinh": (_plain(np.sinh), _mp("sinh"), (0.0,), None),
    "cosh": (_f64_cosh, _mp_cosh, (0.0,), None),
    "tan": (_plain(np.tan), _mp("tan"), (0.0,), None),
    "asin": (_plain(np.arcsin), _mp("asin"), (0.0,), (-1.0, 1.0, False)),
    "acos": (_plain(np.arccos), _mp("acos"), (1.0,), (-1.0, 1.0, False)),
    "asinh": (_plain(np.arcsinh), _mp("asinh"), (0.0,), None),
    "acosh": (_plain(np.arccosh), _mp("acosh"), (1.0,), (1.0, np.inf, False)),
    "atanh": (_plain(np.arctanh), _mp("atanh"), (0.0,), (-1.0, 1.0, True)),
    "exp2": (_plain(np.exp2), _mp_exp2, (0.0,), None),
    "log2": (_plain(np.log2), _mp_log(2), (1.0,), (0.0, np.inf, True)),
    "log10": (_plain(np.log10), _mp_log(10), (1.0,), (0.0, np.inf, True)),
}


class TrigFunctions:
    """The functions of :data:`TRIG` as methods (a mixin of EmulatedArith: ``_function``)."""

    def _trig(self, name: str, a: Any) -> np.ndarray:
        f64, fmp, points, domain = TRIG[name]
        x = np.asarray(a, dtype=np.float64)
        if domain is None:
            return self._function(x, f64, fmp, points)  # type: ignore[attr-defined]
        lo, hi, is_open = domain
        with np.errstate(invalid="ignore", divide="ignore"):
            inside = (x > lo) & (x < hi) if is_open else (x >= lo) & (x <= hi)
            safe = np.where(inside, x, points[0])
            out = np.asarray(self._function(safe, f64, fmp, points), dtype=np.float64)  # type: ignore[attr-defined]
            edge = np.where((x == lo) | (x == hi), f64(x)[1], np.nan)  # atanh(+-1) = +-inf
            edge = np.asarray(self._round(edge), dtype=np.float64)  # type: ignore[attr-defined]
        return np.where(inside, out, edge if is_open else np.nan)

    def sinh(self, a: Any) -> np.ndarray:
        return self._trig("sinh", a)

    def cosh(self, a: Any) -> np.ndarray:
        return self._trig("cosh", a)

    def tan(self, a: Any) -> np.ndarray:
        return self._trig("tan", a)

    def asin(self, a: Any) -> np.ndarray:
        return self._trig("asin", a)

    def acos(self, a: Any) -> np.ndarray:
        return self._trig("acos", a)

    def asinh(self, a: Any) -> np.ndarray:
        return self._trig("asinh", a)

    def acosh(self, a: Any) -> np.ndarray:
        return self._trig("acosh", a)

    def atanh(self, a: Any) -> np.ndarray:
        return self._trig("atanh", a)

    def exp2(self, a: Any) -> np.ndarray:
        return self._trig("exp2", a)

    def log2(self, a: Any) -> np.ndarray:
        return self._trig("log2", a)

    def log10(self, a: Any) -> np.ndarray:
        return self._trig("log10", a)

    def atan2(self, y: Any, x: Any) -> np.ndarray:
        """atan2(y, x), correctly rounded in the machine's mode (see the module's docstring)."""
        yy, xx = np.broadcast_arrays(np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64))
        yi, xi = np.isinf(yy), np.isinf(xx)
        ys = np.where(yi, np.copysign(1.0, yy), np.where(xi, np.copysign(0.0, yy), yy))
        xs = np.where(yi & ~xi, 0.0, np.where(xi, np.copysign(1.0, xx), xx))
        nan = np.isnan(yy) | np.isnan(xx)
        ys, xs = np.where(nan, np.nan, ys), np.where(nan, np.nan, xs)
        with np.errstate(all="ignore"):
            u = np.arctan2(ys, xs)
        special = ~np.isfinite(u) | (u == 0)  # NaN, or the exact zeros (signed as C99)

        def hard(i: int) -> Any:
            a, b = float(ys.flat[i]), float(xs.flat[i])
            return lambda c, v: (0, c.atan2(c.mpf(a), c.mpf(b)))

        return self._rounded(u, special, hard)

    def pow_tensor(self, a: Any, b: Any) -> np.ndarray:
        """a ** b elementwise (``pow.Tensor_Tensor``), correctly rounded: numpy's float64 power
        (within 2**-40), the Ziv loop of :func:`~fpgrad.arith.emulated_functions.mp_pow` where
        that does not decide (exact powers recognised there). Exact by IEEE 754's rules (numpy's
        value): a base of 0, 1 or +-inf, an exponent of 0 or +-inf, NaN; a negative base gives
        NaN for a non-integer exponent, and an integer one is the caller's to refuse."""
        aa, bb = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
        with np.errstate(all="ignore"):
            u = np.power(aa, bb)
            special = ~np.isfinite(aa) | ~np.isfinite(bb) | (aa <= 0) | (aa == 1) | (bb == 0)
            special |= np.isnan(aa) | np.isnan(bb)
            # overflow / underflow of float64 (a positive base): stand-ins that round as the value
            u = np.where(~special & (u > _BIG), _BIG, u)
            u = np.where(~special & (u < 2.0**-1001), 2.0**-1000, u)

        def hard(i: int) -> Any:
            from fpgrad.arith.emulated_functions import mp_pow

            return mp_pow(float(bb.flat[i]))

        return self._rounded(u, special, hard, lambda i: float(aa.flat[i]))

    def _rounded(self, u: np.ndarray, special: np.ndarray, hard: Any, arg: Any = None) -> np.ndarray:
        """Correct rounding of values ``u`` known within 2**-40 relative (exact where
        ``special``): the ends of each interval rounded alike decide, else the Ziv loop of
        ``hard(i)`` (an mpmath function of ``arg(i)``, or of nothing) for element ``i``."""
        with np.errstate(all="ignore"):
            err = np.abs(u) * FUNC_REL_ERR
            certain = np.ones(u.shape, dtype=bool)
            for m in self._ends_modes():
                certain &= _same(round_to(u - err, self.fmt, m), round_to(u + err, self.fmt, m))  # type: ignore[attr-defined]
            out = np.array(self._round(u), dtype=np.float64)  # type: ignore[attr-defined]
        todo = ~special & ~certain
        if todo.any():
            flat = out.reshape(-1)
            for i in np.flatnonzero(todo.reshape(-1)):
                x = arg(int(i)) if arg is not None else 0.0
                flat[i] = self._ziv(x, hard(int(i)))  # type: ignore[attr-defined]
            out = flat.reshape(u.shape)
        return out

    def _ends_modes(self) -> tuple[Mode, ...]:
        """The modes whose roundings of an interval's ends must agree: the machine's, or both
        directed ones for stochastic rounding (the interval inside one open cell)."""
        if getattr(self, "stochastic", False):
            return (Mode.DOWN, Mode.UP)
        return (self.mode,)  # type: ignore[attr-defined]
