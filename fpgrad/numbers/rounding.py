"""Correct rounding into any :class:`~fpgrad.numbers.formats.Format`, from float64 or from exact values.

Two paths that share one set of semantics:

- :func:`round_to`: from float64 arrays, by one of two bit-identical implementations (both
  exact, so the result is correctly rounded: one rounding, never via float32):

  - a compiled numba kernel (:mod:`fpgrad.numbers._rounding_kernel`): one pass over the float64 bit
    patterns, rounding the integer significand at the format's quantum (about 1.5-3x the time
    of a float64 multiply of the same array); loaded lazily, once :data:`KERNEL_AFTER` values
    have been rounded in the process, so that importing fpgrad or rounding a few small arrays
    never pays for importing numba;
  - :func:`_round_to_numpy`, vectorised numpy in a few passes (the reference, and the fallback
    without numba): the value is scaled by an exact power of two so that the format's quantum
    becomes 1, rounded to an integer, and scaled back.
- :func:`round_exact`: one high-precision number (mpmath, gmpy2, Fraction, int, float), rounded
  with exact integer arithmetic: integer significand times a power of two, ties broken on parity.

Semantics (both paths): round with an unbounded exponent range above and the format's grid below
(its subnormal grid, or with subnormals off a precision-p grid unbounded below followed by a flush
to zero); then apply the overflow rules of :func:`round_to`.

>>> float(round_to(1 + 2**-11, "float16"))  # a tie: goes to the even neighbour 1.0
1.0
>>> round_exact(Fraction(1, 3), "bfloat16", Mode.UP)
0.333984375
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from enum import Enum
from fractions import Fraction
from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.numbers.formats import Format, Overflow, get_format


class Mode(Enum):
    """Rounding modes; ``x`` is the exact value, ``lo <= x <= hi`` its two neighbours."""

    NEAREST_EVEN = "nearest_even"  #: nearer of lo, hi; a tie goes to the even significand.
    NEAREST_AWAY = "nearest_away"  #: nearer of lo, hi; a tie goes to the larger magnitude.
    TOWARD_ZERO = "toward_zero"  #: the neighbour of smaller magnitude (truncation).
    UP = "up"  #: hi (toward +inf).
    DOWN = "down"  #: lo (toward -inf).
    ODD = "odd"  #: truncate; if inexact, the neighbour with an odd significand (last bit set).
    STOCHASTIC = "stochastic"  #: hi with probability (x - lo) / (hi - lo), else lo.
    STOCHASTIC_EQUAL = "stochastic_equal"  #: if inexact, lo or hi with probability 1/2 each.


#: Modes whose result depends on a random draw.
STOCHASTIC_MODES = (Mode.STOCHASTIC, Mode.STOCHASTIC_EQUAL)
#: Modes that round to the nearer neighbour (their overflow follows ``fmt.overflow_policy``).
NEAREST_MODES = (Mode.NEAREST_EVEN, Mode.NEAREST_AWAY, *STOCHASTIC_MODES)


def parse_mode(name: str | Mode) -> Mode:
    """The :class:`Mode` called ``name`` (its value, case-insensitive; ``-`` works as ``_``)."""
    if isinstance(name, Mode):
        return name
    key = str(name).strip().lower().replace("-", "_")
    for mode in Mode:
        if key in (mode.value, mode.name.lower()):
            return mode
    known = ", ".join(m.value for m in Mode)
    raise InputError(f"unknown rounding mode {name!r}; known modes: {known}")


def _as_format(fmt: Format | str) -> Format:
    return fmt if isinstance(fmt, Format) else get_format(fmt)


def _inf_value(fmt: Format) -> float:
    """What an infinite result becomes in ``fmt``: inf, NaN (no inf), or max (saturating)."""
    if fmt.overflow_policy is Overflow.SATURATE:
        return fmt.max
    return math.inf if fmt.has_inf else math.nan


def _overflow_value(fmt: Format, mode: Mode, negative: bool) -> float:
    """The magnitude that an overflowing result of sign ``negative`` becomes (NaN: no number)."""
    if mode in NEAREST_MODES:  # the format's policy
        return math.nan if fmt.overflow_policy is Overflow.NAN else _inf_value(fmt)
    if mode is Mode.UP:  # IEEE 754 7.4: +inf for positive results, -max for negative
        return fmt.max if negative else _inf_value(fmt)
    if mode is Mode.DOWN:  # -inf for negative results, +max for positive
        return _inf_value(fmt) if negative else fmt.max
    return fmt.max  # TOWARD_ZERO and ODD (max has an odd significand): the largest finite value


def _generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else rng)


def _as_values(x: Any) -> np.ndarray:
    """``x`` as a float64 array: numbers, nested lists of them, numpy arrays, CPU tensors; an
    InputError for anything else (None, strings, dicts, complex, ragged lists, meta tensors)."""
    from fpgrad.errors import InputError

    if x is None or isinstance(x, (str, bytes, dict)):
        raise InputError(
            f"round_to: values must be numbers or an array of them (got {type(x).__name__})"
        )
    try:
        if type(x).__module__.startswith("torch") and hasattr(x, "detach"):
            x = x.detach().cpu().double().numpy()  # any dtype torch has (bfloat16 too)
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{arr.dtype} values")
        return np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError, OverflowError, RuntimeError, NotImplementedError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"round_to: values must be real numbers or a rectangular array of them ({first[:120]})"
        ) from None


def round_to(
    x: Any,
    fmt: Format | str,
    mode: Mode | str = Mode.NEAREST_EVEN,
    subnormals: bool | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Correctly round float64 values ``x`` into ``fmt``; a float64 array of the same shape.

    ``subnormals=None`` uses ``fmt.subnormals``. With subnormals off, values are rounded to
    precision ``p`` with an exponent range unbounded below, and a result whose magnitude is below
    the smallest normal becomes a zero of the sign of ``x`` (flush to zero with tininess detected
    after rounding, as x86 FTZ). Overflow (rounded magnitude above ``fmt.max``): nearest and
    stochastic modes follow ``fmt.overflow_policy``; directed modes follow IEEE 754 (toward zero
    and odd give max, up gives +inf / -max, down gives +max / -inf), where an infinity becomes NaN
    in a format without inf and max under a saturating policy. Input inf is treated the same way;
    NaN stays NaN; zeros keep their sign, and so do results that round to zero.

    Stochastic modes draw ``u = rng.random()`` per element (``rng``: a numpy Generator or an
    int seed; None means seed 0, so results are reproducible) and round up when ``u < frac``,
    the exact fractional distance to the lower neighbour (exact to 2**-53).

    Runs the compiled kernel once it is loaded (see the module: after :data:`KERNEL_AFTER`
    values in the process, or one call that large; ``FPGRAD_ROUNDING_KERNEL=0`` keeps the numpy
    path), else the numpy path; the two give identical bits (a NaN result is always np.nan).
    The result is a new C-ordered array.

    >>> float(round_to(65520.0, "float16"))  # the tie above max goes to 65536: overflow
    inf
    >>> float(round_to(1e-8, "float16"))  # below half the smallest subnormal 2**-25
    0.0
    >>> float(round_to(1 + 2**-11, "float16"))  # a tie between 1 and 1+2**-10: even wins
    1.0
    >>> round_to([2.5 * 2**-24, -0.0, 70000.0], "float16", "toward_zero").tolist()
    [1.1920928955078125e-07, -0.0, 65504.0]
    """
    fmt = _as_format(fmt)
    mode = parse_mode(mode)
    sub = fmt.subnormals if subnormals is None else bool(subnormals)
    x = _as_values(x)
    if _use_kernel(x.size):
        return _round_to_kernel(x, fmt, mode, sub, rng)
    return _round_to_numpy(x, fmt, mode, sub, rng)


def _round_to_numpy(
    x: Any,
    fmt: Format | str,
    mode: Mode | str = Mode.NEAREST_EVEN,
    subnormals: bool | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """:func:`round_to` in vectorised numpy, a few passes: the reference path, and the fallback
    without numba. The value is scaled by an exact power of two so that the format's quantum
    becomes 1, rounded to an integer, and scaled back; every step is exact in float64."""
    fmt = _as_format(fmt)
    mode = parse_mode(mode)
    sub = fmt.subnormals if subnormals is None else bool(subnormals)
    x = np.asarray(x, dtype=np.float64)
    shape = x.shape
    x = np.ascontiguousarray(x).reshape(-1)  # 1-d, so that in-place operations work for 0-d
    # Few passes and few temporaries (allocating large arrays dominates the cost).
    # k = man_bits - e, where e = floor(log2 |x|) comes from the exponent field. For float64
    # subnormals the field gives -1023; that is only used below emin >= -1022: clamped up when
    # subnormals are on, and when they are off every result from such an input is below the
    # smallest normal and flushed either way. The quantum of the grid at x is 2**-k.
    k = x.view(np.int64) >> 52
    k &= 0x7FF
    k -= 1023
    if sub:
        np.maximum(k, fmt.emin, out=k)  # below the normal range the quantum stays 2**quantum_min
    np.subtract(fmt.man_bits, k, out=k)  # |k| <= 1076
    scratch = np.empty_like(k)
    with np.errstate(invalid="ignore", over="ignore"):
        y = np.abs(x)
        y *= _pow2(np.right_shift(k, 1, out=scratch))  # y = |x| 2**k in two exact steps
        y *= _pow2(np.subtract(k, np.right_shift(k, 1, out=scratch), out=scratch))
        # y = |x| / quantum < 2**p, exactly (inf for inf, nan for nan)
        if mode is Mode.NEAREST_EVEN:
            r = np.rint(y, out=y)  # numpy's rint breaks ties to even
        elif mode is Mode.TOWARD_ZERO:
            r = np.floor(y, out=y)
        else:
            r = np.floor(y)
            frac = np.subtract(y, r, out=y)  # exact: distance to the lower neighbour, in quanta
            if mode is Mode.NEAREST_AWAY:
                step = frac >= 0.5
            elif mode is Mode.UP:  # away from zero for positive x, toward zero for negative x
                step = (frac != 0.0) & ~np.signbit(x)
            elif mode is Mode.DOWN:
                step = (frac != 0.0) & np.signbit(x)
            elif mode is Mode.ODD:  # inexact and even: step to the odd neighbour
                step = (frac != 0.0) & (np.fmod(r, 2.0) == 0.0)
            else:
                u = _generator(rng).random(size=x.shape)
                step = (u < frac) if mode is Mode.STOCHASTIC else ((frac != 0.0) & (u < 0.5))
            r += step
        # back to the magnitude: exact unless it leaves float64's range, which only happens
        # far above max (inf: overflow) or far below the smallest normal (flushed)
        r *= _pow2(np.negative(np.right_shift(k, 1, out=scratch), out=scratch))
        r *= _pow2(np.subtract(np.right_shift(k, 1, out=scratch), k, out=scratch))
        if not sub:
            np.copyto(r, 0.0, where=r < fmt.smallest_normal)  # flush after rounding
        over = r > fmt.max
        if over.any():
            neg = np.signbit(x)
            np.copyto(r, _overflow_value(fmt, mode, negative=False), where=over & ~neg)
            np.copyto(r, _overflow_value(fmt, mode, negative=True), where=over & neg)
        if not np.isfinite(x).all():
            np.copyto(r, _inf_value(fmt), where=np.isinf(x))
            np.copyto(r, np.nan, where=np.isnan(x))
        np.copysign(r, x, out=r)  # signed zeros and signs
        nan = np.isnan(r)
        if nan.any():
            r[nan] = np.nan  # a positive NaN
        return r.reshape(shape)


def _pow2(k: np.ndarray) -> np.ndarray:
    """2.0**k, in place of the int64 array ``k`` (-1022 <= k <= 1023): the exponent field."""
    k += 1023
    k <<= 52
    return k.view(np.float64)


# ---- the compiled path -----------------------------------------------------------------------

#: round_to loads the numba kernel once this many values have been rounded in the process (one
#: large call does it at once). Before that, the numpy path serves: importing numba and loading
#: the compiled kernel from its cache takes about a second, which a script that rounds a few
#: small arrays would never win back. Once loaded, the kernel serves every call.
KERNEL_AFTER = 1 << 20
#: Environment variable: "0" keeps round_to on the numpy path (the kernel is never loaded).
KERNEL_ENV = "FPGRAD_ROUNDING_KERNEL"

_kernel: Any = None  # the compiled function; False when numba is missing or disabled
_numpy_values = 0  # values rounded by the numpy path before the kernel was loaded
_MODE_CODE = {mode: code for code, mode in enumerate(Mode)}  # the kernel's order
_NO_DRAWS = np.empty(0)
_NAN_BITS = 0x7FF8_0000_0000_0000  # np.nan


def _load_kernel() -> Any:
    """The compiled kernel (importing numba and compiling or loading it once), or None when
    numba is not installed or ``FPGRAD_ROUNDING_KERNEL=0``."""
    global _kernel
    if _kernel is None:
        from fpgrad.errors import switch

        wanted = switch(KERNEL_ENV) is not False  # a bad value raises before the cache
        _kernel = False
        if wanted:
            try:
                from fpgrad.numbers._rounding_kernel import round_bits
            except ImportError:  # numba is not installed: the numpy path serves
                pass
            else:
                _kernel = round_bits
    return _kernel or None


def _use_kernel(n: int) -> bool:
    global _numpy_values
    if _kernel is None:
        _numpy_values += n
        if _numpy_values < KERNEL_AFTER:
            return False
        _load_kernel()
    return _kernel is not False


def _bits(value: float) -> int:
    """The float64 bit pattern of ``value`` as a Python int (NaN: numpy's np.nan)."""
    return _NAN_BITS if math.isnan(value) else int(np.float64(value).view(np.int64))


@functools.lru_cache(maxsize=512)
def _kernel_args(fmt: Format, mode: Mode, sub: bool) -> tuple[int | bool, ...]:
    """The kernel's scalar arguments after the arrays (the order of its signature)."""
    over, inf = _overflow_value(fmt, mode, negative=False), _inf_value(fmt)
    return (
        _MODE_CODE[mode],
        sub,
        fmt.man_bits,
        fmt.emin,
        _bits(fmt.max),
        _bits(fmt.smallest_normal),
        _bits(math.ldexp(1.0, fmt.quantum_min)),
        _bits(over),
        _bits(-_overflow_value(fmt, mode, negative=True)),
        _bits(inf),
        _bits(-inf),
    )


def _round_to_kernel(
    x: Any,
    fmt: Format | str,
    mode: Mode | str = Mode.NEAREST_EVEN,
    subnormals: bool | None = None,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """:func:`round_to` by the numba kernel (:mod:`fpgrad.numbers._rounding_kernel`): one pass over the
    float64 bit patterns, bit-identical to :func:`_round_to_numpy` (stochastic modes draw the
    same ``rng.random(n)``). Loads the kernel if needed; raises ImportError without numba."""
    kernel = _load_kernel()
    if kernel is None:
        raise ImportError(f"the rounding kernel needs numba (and {KERNEL_ENV} not 0)")
    fmt = _as_format(fmt)
    mode = parse_mode(mode)
    sub = fmt.subnormals if subnormals is None else bool(subnormals)
    x = np.asarray(x, dtype=np.float64)
    shape = x.shape
    flat = np.ascontiguousarray(x).reshape(-1)  # a view when x is C-contiguous; C order
    if not flat.flags.aligned:  # the kernel's signature promises aligned arrays
        flat = flat.copy()
    out = np.empty(flat.shape, dtype=np.float64)
    draws = _generator(rng).random(size=flat.shape) if mode in STOCHASTIC_MODES else _NO_DRAWS
    kernel(flat.view(np.int64), out.view(np.int64), draws, *_kernel_args(fmt, mode, sub))
    return out.reshape(shape)


# ---- the exact path --------------------------------------------------------------------------

_HUGE_EXP = 1100  # 2**1100 overflows every format (they fit inside float64)
_TINY_EXP = -1200  # 2**-1200 is far below half of every smallest subnormal (>= 2**-1074)


def _exact_parts(value: Any) -> tuple[bool, int, int, int] | float:
    """``(negative, n, d, shift)`` with ``|value| = n / d * 2**shift``, or a float for inf/NaN.

    ``-0.0`` is reported as ``(True, 0, 1, 0)``.
    """
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"cannot round a boolean {value!r}")
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return value
        n, d = abs(value).as_integer_ratio()
        return (math.copysign(1.0, value) < 0, n, d, 0)
    if isinstance(value, (int, np.integer)):
        v = int(value)
        return (v < 0, abs(v), 1, 0)
    if isinstance(value, Fraction):
        return (value < 0, abs(value.numerator), value.denominator, 0)
    mod = type(value).__module__ or ""
    if mod.startswith("mpmath"):
        import mpmath

        # read the value's own words: mpmath.mpf(value) would round it to the global precision
        v = value if hasattr(value, "_mpf_") else mpmath.mpf(value)
        if not mpmath.isfinite(v):
            return float(v)
        sign, man, exp, _ = v._mpf_  # value = (-1)**sign * man * 2**exp exactly
        return (bool(sign), int(man), 1, int(exp))
    if mod.startswith("gmpy2"):
        import gmpy2

        if type(value).__name__ == "mpfr":
            if not gmpy2.is_finite(value):
                return float(value)
            if value == 0:
                return (gmpy2.is_signed(value), 0, 1, 0)
            man, exp = value.as_mantissa_exp()
            return (man < 0, abs(int(man)), 1, int(exp))
        q = gmpy2.mpq(value)
        return (q < 0, abs(int(q.numerator)), int(q.denominator), 0)
    if isinstance(value, numbers.Rational):
        return (value < 0, abs(int(value.numerator)), int(value.denominator), 0)
    raise InputError(
        f"cannot round {type(value).__name__} exactly; give a float, int, Fraction, "
        "mpmath mpf or gmpy2 mpfr/mpq"
    )


def _floor_log2(n: int, d: int) -> int:
    """floor(log2(n / d)) for positive integers."""
    e = n.bit_length() - d.bit_length()
    if (n << -e if e < 0 else n) < (d << e if e > 0 else d):
        e -= 1
    return e


def round_exact(
    value: Any,
    fmt: Format | str,
    mode: Mode | str = Mode.NEAREST_EVEN,
    subnormals: bool | None = None,
) -> float:
    """Correctly round one exact number into ``fmt`` with integer arithmetic; same rules as
    :func:`round_to`. Accepts float, int, Fraction, mpmath mpf, gmpy2 mpfr/mpq. Deterministic
    modes only.

    >>> round_exact(Fraction(65520), "float16")
    inf
    >>> round_exact(Fraction(2**-25) + Fraction(1, 10**30), "float16")  # just above a tie
    5.960464477539063e-08
    """
    fmt = _as_format(fmt)
    mode = parse_mode(mode)
    if mode in STOCHASTIC_MODES:
        raise InputError(f"round_exact is deterministic; mode {mode.value!r} needs round_to")
    sub = fmt.subnormals if subnormals is None else bool(subnormals)
    parts = _exact_parts(value)
    if isinstance(parts, float):
        if math.isnan(parts):
            return math.nan
        return math.copysign(_inf_value(fmt), parts)
    neg, n, d, shift = parts
    if n == 0:
        return -0.0 if neg else 0.0
    # exponent estimate; clamp absurd magnitudes to stand-ins that round the same way
    approx = n.bit_length() - d.bit_length() + shift
    if approx > _HUGE_EXP:
        n, d, shift = 1, 1, _HUGE_EXP
    elif approx < _TINY_EXP:
        n, d, shift = 1, 1, _TINY_EXP
    if shift >= 0:
        n <<= shift
    else:
        d <<= -shift
    e = _floor_log2(n, d)
    if sub:
        e = max(e, fmt.emin)
    qexp = e - fmt.man_bits  # quantum 2**qexp
    num, den = (n, d << qexp) if qexp >= 0 else (n << -qexp, d)
    q, rem = divmod(num, den)  # |value| / quantum = q + rem / den
    if rem:
        twice = 2 * rem
        if mode is Mode.NEAREST_EVEN:
            q += twice > den or (twice == den and q % 2 == 1)
        elif mode is Mode.NEAREST_AWAY:
            q += twice >= den
        elif mode is Mode.UP:
            q += not neg
        elif mode is Mode.DOWN:
            q += neg
        elif mode is Mode.ODD:
            q |= 1
        # TOWARD_ZERO: keep q
    if q.bit_length() + qexp > 1024:  # beyond float64, hence above every format's max
        mag = math.inf
    else:
        mag = math.ldexp(float(q), qexp)  # q has at most p <= 53 bits: exact
    if not sub and mag < fmt.smallest_normal:
        mag = 0.0
    if mag > fmt.max:
        mag = _overflow_value(fmt, mode, neg)
    return math.nan if math.isnan(mag) else (-mag if neg else mag)


def round_exact_array(
    values: Sequence[Any] | np.ndarray,
    fmt: Format | str,
    mode: Mode | str = Mode.NEAREST_EVEN,
    subnormals: bool | None = None,
) -> np.ndarray:
    """:func:`round_exact` over an (object) array; a float64 array of the same shape."""
    fmt = _as_format(fmt)
    mode = parse_mode(mode)
    arr = np.asarray(values, dtype=object)
    out = np.empty(arr.shape, dtype=np.float64)
    for idx, v in np.ndenumerate(arr):
        out[idx] = round_exact(v, fmt, mode, subnormals)
    return out
