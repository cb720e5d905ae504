"""A strict machine of any small format: every operation correctly rounded, on numpy float64 arrays.

Values are float64 numpy arrays holding values of the format. Each operation is the exact
operation on its (already rounded) operands, rounded once into the format with the chosen
:class:`~fpgrad.numbers.rounding.Mode`:

- ``add``, ``sub``, ``mul``, ``div``, ``sqrt``, ``fma``: computed in float64 together with the
  sign of the float64 error (an error-free transformation: TwoSum for sums, exact products,
  Dekker's TwoProduct for the remainder of a quotient or a square root). That sign turns the
  float64 result into the float64 result *rounded to odd*, and rounding an odd-rounded value of
  53 bits into any format of p <= 51 bits is correct in every rounding mode (Boldo and
  Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using rounding to
  odd", IEEE TC 2008). Plain float64-then-round would be right for round-to-nearest only (53 >=
  2p + 2, Figueroa) and wrong for directed modes (``1 - 2**-100`` rounds up to 1 in float64).
- ``exp``, ``log``, ``log1p``, ``tanh``, ``sigmoid``, ``ncdf``, ``npdf`` (GELU's normal CDF and density),
  ``softplus``, ``expm1``, ``erf``, ``sin``, ``cos``, ``atan`` (and
  :mod:`fpgrad.arith.emulated_trig`'s sinh, cosh, tan, asin, acos, asinh, acosh, atanh):
  numpy's (libm's) float64 value ``y`` with a relative error
  bound of 2**-40 (libm and numpy's SIMD kernels are within a few ulps, 2**-50); if the whole
  interval ``y (1 +- 2**-40)`` rounds to one value of the format, that is the correctly rounded
  result. Overflow and underflow are decided directly in every mode: a float64 result beyond
  2**1000 (exp's float64 overflow included) or within 2**-1000 of its base stands in as
  +-2**1000 or +-2**-1000, which round as the true value does in every mode and format.
  Otherwise (a result too close to a rounding boundary) the element is recomputed with mpmath
  in a Ziv loop (128, 256, ... bits) and rounded exactly; the loop clamps its value to
  2**+-1100 (2**-1200) first, so its cost does not grow with the argument.
  The exact special points (exp(0) = 1, log(1) = 0, tanh(0) = 0, sigmoid(0) = 1/2, infinities)
  are the only inputs whose results are dyadic, so the loop always ends.
- ``matmul`` and ``sum`` with an accumulation:

  * ``per_op``: sequential, left to right over the inner index: ``acc = p_0``, then
    ``acc = round(acc + p_k)`` for k = 1, 2, ..., with every product ``p_k = round(a_k b_k)``
    rounded too (no fused multiply-add). Vectorised across output elements.
  * ``fp32``: exact products, accumulated sequentially (same order) in a float32 accumulator
    rounded to nearest even after every add (``acc = RN32(acc + a_k b_k)``, what an FMA chain
    does), then one rounding of the accumulator into the format with the chosen mode. This is
    what torch does on this CPU, up to the order of the additions (its kernels block and
    vectorise the inner loop).
  * ``exact``: one rounding of the exact sum of the exact products (``math.fsum`` gives the
    nearest float64, a second ``fsum`` the sign of the remainder, hence the odd-rounded sum).

- ``max``, ``abs``, ``where``, ``positive``: exact.
- ``asarray`` and ``const`` (storage: parameters, data, constants such as 1 or 2) round to
  nearest even whatever the mode, as the native path and the ``rounded`` reference store
  them; the chosen mode applies to every operation. Element counts (a mean's divisor, a
  norm's or an average pool's) are exact (``count``): ``sum / n`` is one rounding.
- Stochastic modes draw from one seeded numpy Generator per machine, in evaluation order, so a
  run is reproducible. Their probability ``(x - lo) / (hi - lo)`` is that of the odd-rounded
  float64 value (error below 2**-(52 - p)) for arithmetic and of the float64 value (2**-(39 - p))
  for the functions; the two candidates are always the exact neighbours.
- Derivatives: :class:`~fpgrad.arith.base.OutputDerivatives`, the naive formulas computed from
  outputs (``1 - t*t``, ``s*(1 - s)``, ``p*sum(t) - t``, ``sigmoid(z) - t``), each op rounded.

Supported formats: at most 26 significand bits (p <= 26: a product of two values is exact in
float64) and at most 9 exponent bits (every exact sum, product, quotient and square root of two
values is a normal float64, so the error-free transformations are exact): every catalogue
format except float64, and custom ``eXmY`` with X <= 9, Y <= 25.

>>> ar = EmulatedArith("float16")
>>> float(ar.add(ar.asarray(1.0), ar.asarray(2.0**-11)))  # a tie: to even
1.0
>>> float(EmulatedArith("float16", mode="up").sub(ar.const(1.0), ar.const(2.0**-24)))
1.0
>>> float(EmulatedArith("float16", mode="down").sub(ar.const(1.0), ar.const(2.0**-24)))
0.99951171875

The functions' float64 and mpmath forms live in :mod:`fpgrad.arith.emulated_functions`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
from mpmath.ctx_mp import MPContext

from fpgrad.arith.base import OutputDerivatives
from fpgrad.arith.emulated_functions import (
    F64Function,
    MPFunction,
    _clamp,
    _f64_atan,
    _f64_cos,
    _f64_erf,
    _f64_exp,
    _f64_expm1,
    _f64_log,
    _f64_log1p,
    _f64_ncdf,
    _f64_npdf,
    _f64_sigmoid,
    _f64_sin,
    _f64_softplus,
    _f64_tanh,
    _fraction,
    _mp_atan,
    _mp_cos,
    _mp_erf,
    _mp_exp,
    _mp_expm1,
    _mp_log,
    _mp_log1p,
    _mp_ncdf,
    _mp_npdf,
    _mp_sigmoid,
    _mp_sin,
    _mp_softplus,
    _mp_tanh,
    _same,
    _same_scalar,
    f64_pow,
    mp_pow,
)
from fpgrad.arith.emulated_trig import TrigFunctions
from fpgrad.arith.expansion import two_prod, two_sum
from fpgrad.errors import InputError
from fpgrad.numbers.formats import FLOAT32, Format, get_format
from fpgrad.numbers.rounding import STOCHASTIC_MODES, Mode, parse_mode, round_exact, round_to

ACCUMULATIONS = ("fp32", "per_op", "exact")
DEFAULT_ACCUMULATION = "fp32"
MAX_PRECISION = 26  # 2p <= 53: the product of two values is exact in float64
MAX_EXP_BITS = 9  # values within 2**+-(256 + 26): sums, products, quotients stay normal float64

FUNC_REL_ERR = 2.0**-40  # bound on numpy's float64 exp/log/tanh/sigmoid relative error (>> 4 ulp)
_BIG = 2.0**1000  # above every emulable format's max (< 2**257); 2**1000 (1 + 2**-40) is finite
_ZIV_PRECS = (128, 256, 512, 1024, 4096)


def check_emulable(fmt: Format) -> None:
    """Raise :class:`InputError` unless ``fmt`` is within the emulation's documented limits."""
    if fmt.precision > MAX_PRECISION or fmt.exp_bits > MAX_EXP_BITS:
        raise InputError(
            f"format {fmt.name!r} cannot be emulated: emulation needs at most "
            f"{MAX_EXP_BITS} exponent bits and {MAX_PRECISION - 1} mantissa bits "
            f"(got e{fmt.exp_bits}m{fmt.man_bits}); use float64 natively"
        )


def parse_accumulation(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in ACCUMULATIONS:
        raise InputError(
            f"unknown accumulation {name!r}; known accumulations: {', '.join(ACCUMULATIONS)}"
        )
    return key


# ---- rounding to odd (from expansion.two_sum and two_prod, the error-free transformations) ----


def to_odd(y: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """The float64 result rounded to odd, from ``y = RN(x)`` and the sign of ``x - y``.

    If ``x`` is not a float64, of its two float64 neighbours (``y`` and the next one toward
    ``x``) take the one whose last significand bit is 1.
    """
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        inexact = (direction != 0) & np.isfinite(y) & np.isfinite(direction)
    even = (y.view(np.int64) & 1) == 0
    move = inexact & even
    if not move.any():
        return y
    toward = np.where(direction > 0, np.inf, -np.inf)
    return np.where(move, np.nextafter(y, toward), y)


# ---- the number system --------------------------------------------------------------------


class EmulatedArith(TrigFunctions, OutputDerivatives):
    """Float64 arrays of values of ``fmt``; every operation rounded once into ``fmt``."""

    def __init__(
        self,
        fmt: Format | str,
        accumulation: str = DEFAULT_ACCUMULATION,
        mode: Mode | str = Mode.NEAREST_EVEN,
        rng: np.random.Generator | int | None = None,
    ) -> None:
        self.fmt = fmt if isinstance(fmt, Format) else get_format(fmt)
        check_emulable(self.fmt)
        self.accumulation = parse_accumulation(accumulation)
        self.mode = parse_mode(mode)
        self.stochastic = self.mode in STOCHASTIC_MODES
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)
        self.name = f"emulated.{self.fmt.name}.{self.accumulation}.{self.mode.value}"
        self._mp = MPContext()

    # ---- rounding ------------------------------------------------------------------------
    def _round(self, x: Any, fmt: Format | None = None, mode: Mode | None = None) -> np.ndarray:
        """Round float64 values (exact, or odd-rounded) with this machine's mode and generator."""
        return round_to(x, fmt or self.fmt, mode or self.mode, rng=self.rng)

    def _round_odd(
        self,
        y: np.ndarray,
        direction: np.ndarray,
        fmt: Format | None = None,
        mode: Mode | None = None,
    ) -> np.ndarray:
        return self._round(to_odd(y, direction), fmt, mode)

    # ---- storage -------------------------------------------------------------------------
    def asarray(self, x: Any) -> np.ndarray:
        return round_to(np.asarray(x, dtype=np.float64), self.fmt)  # storage: nearest even

    def const(self, value: float) -> np.ndarray:
        return round_to(float(value), self.fmt)

    def count(self, n: Any) -> np.ndarray:
        """An element count, exact (not stored in the format): ``sum / n`` rounds once."""
        return np.asarray(n, dtype=np.float64)

    def to_float64(self, a: Any) -> np.ndarray:
        return np.array(a, dtype=np.float64)

    # ---- arithmetic ----------------------------------------------------------------------
    def add(self, a: Any, b: Any) -> np.ndarray:
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
        with np.errstate(invalid="ignore", over="ignore"):
            s, e = two_sum(a, b)
            out = self._round_odd(s, e)
        if self.mode is Mode.DOWN:  # IEEE 754 6.3: an exact zero sum is -0 when rounding down
            zero = (s == 0) & ~((a == 0) & (b == 0) & ~np.signbit(a) & ~np.signbit(b))
            out = np.where(zero & (out == 0), -0.0, out)
        return out

    def sub(self, a: Any, b: Any) -> np.ndarray:
        return self.add(a, -np.asarray(b, dtype=np.float64))

    def mul(self, a: Any, b: Any) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):
            return self._round(np.multiply(a, b, dtype=np.float64))  # exact: 2p <= 53 bits

    def div(self, a: Any, b: Any) -> np.ndarray:
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            q = a / b
            ok = np.isfinite(q) & np.isfinite(b) & (b != 0) & (q != 0)
            qs, bs = np.where(ok, q, 1.0), np.where(ok, b, 1.0)
            ph, pl = two_prod(qs, bs)
            rem = (np.where(ok, a, 1.0) - ph) - pl  # a - q b exactly (a - ph exact: Sterbenz)
            direction = np.where(ok, np.sign(rem) * np.sign(bs), 0.0)  # sign(a / b - q)
            return self._round_odd(q, direction)

    def sqrt(self, a: Any) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            q = np.sqrt(a)
            ok = np.isfinite(q) & (q > 0)
            qs = np.where(ok, q, 1.0)
            ph, pl = two_prod(qs, qs)
            rem = (np.where(ok, a, 1.0) - ph) - pl  # a - q**2 exactly
            return self._round_odd(q, np.where(ok, np.sign(rem), 0.0))

    def fma(self, a: Any, b: Any, c: Any) -> np.ndarray:
        """``a b + c`` with one rounding (the product is exact in float64)."""
        with np.errstate(invalid="ignore", over="ignore"):
            prod = np.multiply(a, b, dtype=np.float64)
        return self.add(prod, c)  # TwoSum is exact for any float64 operands

    def abs(self, a: Any) -> np.ndarray:
        return np.abs(np.asarray(a, dtype=np.float64))

    def positive(self, a: Any) -> np.ndarray:
        return np.asarray(a) > 0

    def where(self, mask: np.ndarray, a: Any, b: Any) -> np.ndarray:
        return np.where(mask, a, b).astype(np.float64)

    def max(self, a: Any, axis: int, keepdims: bool = False) -> np.ndarray:
        return np.max(np.asarray(a, dtype=np.float64), axis=axis, keepdims=keepdims)

    # ---- reductions ----------------------------------------------------------------------
    def matmul(self, a: Any, b: Any) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"matmul of shapes {a.shape} and {b.shape}")
        k = a.shape[1]
        if k == 0:
            return np.zeros((a.shape[0], b.shape[1]))
        if self.accumulation == "exact":
            rows = []
            for i in range(a.shape[0]):  # one row at a time: (N, K) exact products in memory
                with np.errstate(invalid="ignore", over="ignore"):
                    rows.append(self._exact_sum((a[i, :, None] * b).T))
            return np.stack(rows)
        # term k = a[:, k] b[k, :] (exact products, shape (M, N)), summed over k = 0, 1, ...
        terms = (np.multiply.outer(a[:, k_], b[k_, :]) for k_ in range(k))
        return self._sequential(terms, round_terms=self.accumulation == "per_op")

    def sum(self, a: Any, axis: int, keepdims: bool = False) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        moved = np.moveaxis(a, axis, -1)
        if moved.shape[-1] == 0:
            out = np.zeros(moved.shape[:-1])
        elif self.accumulation == "exact":
            out = self._exact_sum(moved)
        else:
            out = self._sequential((moved[..., i] for i in range(moved.shape[-1])), False)
        return np.expand_dims(out, axis) if keepdims else out

    def _sequential(self, terms: Any, round_terms: bool) -> np.ndarray:
        """Left-to-right accumulation: per_op (format) or fp32 (float32, then one rounding)."""
        with np.errstate(invalid="ignore", over="ignore"):
            if self.accumulation == "per_op":
                acc = None
                for t in terms:
                    t = self._round(t) if round_terms else t
                    acc = t if acc is None else self.add(acc, t)
                return np.asarray(acc)
            acc = None  # fp32: acc = RN32(acc + t), t exact
            for t in terms:
                if acc is None:
                    acc = round_to(t, FLOAT32)
                else:
                    s, e = two_sum(acc, t)
                    acc = round_to(to_odd(s, e), FLOAT32)
            return self._round(acc)

    def _exact_sum(self, terms: np.ndarray) -> np.ndarray:
        """One rounding of the exact sum over the last axis of exact float64 terms."""
        shape = terms.shape[:-1]
        flat = terms.reshape(-1, terms.shape[-1])
        s = np.empty(flat.shape[0])
        direction = np.zeros(flat.shape[0])
        finite = np.isfinite(flat).all(axis=1)
        for i, row in enumerate(flat.tolist()):
            if not finite[i]:
                s[i] = np.sum(flat[i])  # inf / NaN propagate as in any order
                continue
            total = math.fsum(row)  # the exact sum, rounded to nearest float64
            row.append(-total)
            direction[i] = math.fsum(row)  # the remainder, its sign exact
            s[i] = total
        return self._round_odd(s, direction).reshape(shape)

    # ---- functions -----------------------------------------------------------------------
    def exp(self, a: Any) -> np.ndarray:
        return self._function(a, _f64_exp, _mp_exp, (0.0,))

    def log(self, a: Any) -> np.ndarray:
        return self._function(a, _f64_log, _mp_log, (1.0,), positive_only=True)

    def log1p(self, a: Any) -> np.ndarray:
        """log(1 + a), correctly rounded (torch's log_sigmoid reads it); -inf at -1, NaN below."""
        return self._function(a, _f64_log1p, _mp_log1p, (0.0,), below=-1.0)

    def tanh(self, a: Any) -> np.ndarray:
        return self._function(a, _f64_tanh, _mp_tanh, (0.0,))

    def sigmoid(self, a: Any) -> np.ndarray:
        return self._function(a, _f64_sigmoid, _mp_sigmoid, (0.0,))

    def ncdf(self, a: Any) -> np.ndarray:
        """The standard normal CDF Phi (GELU), correctly rounded."""
        return self._function(a, _f64_ncdf, _mp_ncdf, (0.0,))

    def npdf(self, a: Any) -> np.ndarray:
        """The standard normal density phi (GELU's derivative), correctly rounded."""
        return self._function(a, _f64_npdf, _mp_npdf, ())

    def _function(
        self,
        a: Any,
        f64: F64Function,
        fmp: MPFunction,
        exact_points: tuple[float, ...],
        positive_only: bool = False,
        below: float | None = None,
    ) -> np.ndarray:
        """Correct rounding of a function given as ``base + u`` (see :data:`F64Function`)."""
        x = np.asarray(a, dtype=np.float64)
        with np.errstate(all="ignore"):
            base, u = f64(x)
            special = ~np.isfinite(x)  # and the points where the float64 result is exact:
            if positive_only:
                special |= x <= 0  # log: -inf at 0, NaN below
            if below is not None:
                special |= x <= below  # log1p: -inf at -1, NaN below
            for point in exact_points:
                special |= x == point  # exp(0) = 1, log(1) = 0, tanh(0) = 0, sigmoid(0) = 1/2
            # overflow and underflow decided here, in every mode, whatever the argument's size:
            # a result beyond 2**1000 (exp overflow included) or within 2**-1000 of base
            # (underflow of u, saturation) is replaced by a stand-in that rounds the same way
            # in every mode: +-2**1000 (above every format's max, and u +- err stays finite),
            # or +-2**-1000 (below half of every format's smallest subnormal; 1 -+ 2**-1000
            # round to odd as 1 -+ 2**-53 does). Neither is ever sent to the exact retry.
            u = np.where((np.abs(u) > _BIG) & ~special, np.copysign(_BIG, u), u)
            u = np.where((np.abs(u) < 2.0**-1001) & ~special, np.copysign(2.0**-1000, u), u)
            err = np.abs(u) * FUNC_REL_ERR
            ends = [self._odd_sum(base, u - err), self._odd_sum(base, u + err)]
            if self.stochastic:  # certain: the interval lies inside one open cell
                certain = np.ones(x.shape, dtype=bool)
                for mode in (Mode.DOWN, Mode.UP):
                    certain &= _same(*(round_to(e, self.fmt, mode) for e in ends))
            else:
                certain = _same(*(round_to(e, self.fmt, self.mode) for e in ends))
            value = self._odd_sum(base, u)
            value = np.where(special, np.where(base == 0, u, base + u), value)  # exact (or inf/NaN)
            out = self._round(value)
        hard = ~special & ~certain
        if hard.any():
            flat, xf = out.reshape(-1), x.reshape(-1)
            for i in np.flatnonzero(hard):
                flat[i] = self._ziv(float(xf[i]), fmp)
            out = flat.reshape(x.shape)
        return out

    # ---- the smooth activations' functions (fpgrad.graph.ops.smooth), correctly rounded ------
    def softplus(self, a: Any) -> np.ndarray:
        """log(1 + e^a) as one function (as sigmoid): no overflow of e^a in the format."""
        return self._function(a, _f64_softplus, _mp_softplus, ())

    def expm1(self, a: Any) -> np.ndarray:
        return self._function(a, _f64_expm1, _mp_expm1, (0.0,))

    def erf(self, a: Any) -> np.ndarray:
        return self._function(a, _f64_erf, _mp_erf, (0.0,))

    def sin(self, a: Any) -> np.ndarray:
        return self._function(a, _f64_sin, _mp_sin, (0.0,))

    def cos(self, a: Any) -> np.ndarray:
        return self._function(a, _f64_cos, _mp_cos, (0.0,))

    def atan(self, a: Any) -> np.ndarray:
        return self._function(a, _f64_atan, _mp_atan, (0.0,))

    def pow_const(self, a: Any, p: float) -> np.ndarray:
        """a ** p for a constant p, correctly rounded (NaN below 0, 0 or inf at 0)."""
        return self._function(a, f64_pow(p), mp_pow(p), (1.0,), positive_only=True)

    @staticmethod
    def _odd_sum(base: np.ndarray, u: np.ndarray) -> np.ndarray:
        """``base + u`` rounded to odd in float64 (exact inputs)."""
        s, e = two_sum(base, u)
        return to_odd(s, e)

    def _ziv(self, x: float, fmp: MPFunction) -> float:
        """Correct rounding of ``fmp(x)`` by evaluation at increasing precision."""
        c = self._mp
        for prec in _ZIV_PRECS:
            c.prec = prec
            base, u = fmp(c, c.mpf(x))  # the value is base + u, u within a few ulps of prec
            uf = _fraction(_clamp(c, u))  # a cost that does not grow with the exponent of u
            exact = isinstance(base, Fraction) and uf == 0  # pow's exact results: base itself
            if not isinstance(uf, Fraction) and not exact:  # 0 (exact: special points) or inf
                return float(self._round(base + uf))
            uf = Fraction(uf) if exact else uf
            err = 0 if exact else abs(uf) * Fraction(1, 2 ** (prec - 16))  # 65536 ulps
            lo, mid, hi = base + uf - err, base + uf, base + uf + err
            if not self.stochastic:
                r_lo, r_hi = (
                    round_exact(lo, self.fmt, self.mode),
                    round_exact(hi, self.fmt, self.mode),
                )
                if _same_scalar(r_lo, r_hi):
                    return r_lo
                continue
            down = round_exact(lo, self.fmt, Mode.DOWN), round_exact(hi, self.fmt, Mode.DOWN)
            up = round_exact(lo, self.fmt, Mode.UP), round_exact(hi, self.fmt, Mode.UP)
            if not (_same_scalar(*down) and _same_scalar(*up)):
                continue
            lo_n, hi_n = down[0], up[0]
            if lo_n == hi_n:
                return lo_n
            if not (math.isfinite(lo_n) and math.isfinite(hi_n)) or abs(hi_n) > self.fmt.max:
                return round_exact(mid, self.fmt, Mode.NEAREST_EVEN)  # overflow: the policy
            frac = float((mid - Fraction(lo_n)) / (Fraction(hi_n) - Fraction(lo_n)))
            return hi_n if self.rng.random() < frac else lo_n
        raise ArithmeticError(f"Ziv loop did not converge at {x!r}")  # pragma: no cover

    def cumsum(self, a: Any, axis: int) -> np.ndarray:
        """Running sums along ``axis``, each output the machine's :meth:`sum` of its prefix,
        carried along: per_op rounds every running sum into the format; fp32 keeps a float32
        accumulator and rounds each output from it (torch's CPU cumsum of float16/bfloat16
        accumulates in float); exact rounds each exact prefix sum once."""
        moved = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
        out = np.empty(moved.shape)
        acc: Any = None
        with np.errstate(invalid="ignore", over="ignore"):
            for i in range(moved.shape[-1]):
                t = moved[..., i]
                if self.accumulation == "exact":
                    out[..., i] = self._exact_sum(moved[..., : i + 1])
                elif self.accumulation == "per_op":
                    acc = t if acc is None else self.add(acc, t)
                    out[..., i] = acc
                else:  # fp32, as _sequential: acc = RN32(acc + t), t exact
                    s, e = (t, 0.0) if acc is None else two_sum(acc, t)
                    acc = round_to(to_odd(s, e), FLOAT32)
                    out[..., i] = self._round(acc)
        return np.moveaxis(out, -1, axis)

