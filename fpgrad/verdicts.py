"""Verdicts: a computed value against its exact value, elementwise and vectorised.

The exact value ``e`` arrives as a double-double ``hi + lo`` (``hi`` the nearest float64,
``lo`` the nearest float64 of the rest) plus an exact-zero mask, so that errors of float64
results are measured against more than float64 precision.

| verdict | meaning |
| --- | --- |
| structural_zero | e == 0 exactly, and so is the computed value |
| spurious_nonzero | e == 0 exactly, the computed value is not (cancellation noise) |
| rounding_zero | e != 0, computed 0; ``underflow`` if abs(e) <= half the smallest subnormal |
|               | (the format cannot hold e), else ``lost`` (an intermediate killed it) |
| overflow, nan | computed +-inf or NaN (e is always finite) |
| wrong_sign | non-zero, sign differs from e |
| subnormal | non-zero, below the format's smallest normal |
| undetermined | the exact value's enclosure still contains 0 at the precision cap: its |
|              | sign is unknown (bound: abs(e) <= rad); never judged as a zero or a value |
| ok | with relative error, error in ulps of the format at e, correct digits |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fpgrad.formats import Format
from fpgrad.rounding import STOCHASTIC_MODES, Mode

VERDICTS = (
    "ok",
    "structural_zero",
    "rounding_zero",
    "subnormal",
    "overflow",
    "nan",
    "wrong_sign",
    "spurious_nonzero",
    "undetermined",
)


@dataclass
class ExactArray:
    """An exact array as ``hi + lo`` float64 pairs, a mask of proven exact zeros, and
    (from certified balls) radii ``rad`` and the mask of ``undetermined`` elements (the ball
    contains 0 but is not proven zero; ``hi = lo = 0`` there)."""

    hi: np.ndarray
    lo: np.ndarray
    zero: np.ndarray
    rad: np.ndarray | None = None
    undetermined: np.ndarray | None = None

    def undetermined_mask(self) -> np.ndarray:
        if self.undetermined is None:
            return np.zeros(np.shape(self.hi), dtype=bool)
        return self.undetermined

    @classmethod
    def from_mp(cls, values: np.ndarray) -> ExactArray:
        arr = np.asarray(values, dtype=object)
        flat = arr.ravel()
        hi = np.empty(flat.size)
        lo = np.empty(flat.size)
        zero = np.empty(flat.size, dtype=bool)
        for i, v in enumerate(flat):  # v keeps its own context and precision
            zero[i] = v == 0
            h = float(v)
            hi[i] = h
            lo[i] = float(v - h) if np.isfinite(h) else 0.0
        return cls(hi.reshape(arr.shape), lo.reshape(arr.shape), zero.reshape(arr.shape))


@dataclass
class Verdicts:
    """Per-element verdicts of one computed array against one exact array."""

    verdict: np.ndarray  # str
    subkind: np.ndarray  # str: "underflow" / "lost" for rounding zeros, "" otherwise
    rel_err: np.ndarray
    ulps: np.ndarray
    digits: np.ndarray


def exact_exponent(ex: ExactArray) -> np.ndarray:
    """floor(log2|e|) for non-zero e, correct at powers of two (uses the low word)."""
    mant, exp = np.frexp(np.abs(ex.hi))
    e = exp - 1
    below = (mant == 0.5) & (ex.lo * np.sign(ex.hi) < 0)  # hi rounded up onto a power of two
    return np.where(below, e - 1, e)


def underflows(ex: ExactArray, fmt: Format, mode: Mode | str = "nearest_even") -> np.ndarray:
    """Correct rounding of ``e`` into ``fmt`` in ``mode`` gives zero.

    Nearest modes: ``abs(e)`` at most half the smallest subnormal (ties go to the even 0);
    toward zero: below the smallest subnormal; up (down): non-positive (non-negative) values
    below it; odd: never (a non-zero value rounds to an odd neighbour); stochastic: zero is
    one of the two outcomes whenever ``abs(e)`` is below the smallest subnormal.
    """
    m = Mode(mode)
    tiny = fmt.smallest_subnormal
    mag, rest = np.abs(ex.hi), ex.lo * np.sign(ex.hi)
    below = (mag < tiny) | ((mag == tiny) & (rest < 0))
    if m in (Mode.NEAREST_EVEN, Mode.NEAREST_AWAY):
        half = tiny / 2
        if m is Mode.NEAREST_EVEN:
            hit = (mag < half) | ((mag == half) & (rest <= 0))
        else:
            hit = (mag < half) | ((mag == half) & (rest < 0))
    elif m is Mode.TOWARD_ZERO or m in STOCHASTIC_MODES:
        hit = below
    elif m is Mode.UP:
        hit = below & (ex.hi < 0)
    elif m is Mode.DOWN:
        hit = below & (ex.hi > 0)
    else:  # round to odd: the smallest subnormal is odd, so nothing non-zero becomes 0
        hit = np.zeros(np.shape(mag), dtype=bool)
    return ~ex.zero & ~ex.undetermined_mask() & hit


def classify(
    ex: ExactArray, computed: np.ndarray, fmt: Format, mode: Mode | str = "nearest_even"
) -> Verdicts:
    """Verdicts of ``computed`` (float64 values of the format) against ``ex``; ``mode``: the
    rounding mode of the column (it decides a rounding zero's ``underflow``/``lost``)."""
    c = np.asarray(computed, dtype=np.float64)
    shape = c.shape
    verdict = np.full(shape, "ok", dtype=object)
    subkind = np.full(shape, "", dtype=object)
    with np.errstate(all="ignore"):
        err = np.abs((c - ex.hi) - ex.lo)  # c - hi is exact when c is near e (Sterbenz)
        rel = np.where(ex.zero, np.where(c == 0, 0.0, np.inf), err / np.abs(ex.hi))
        e_exp = np.maximum(exact_exponent(ex), fmt.emin)
        ulp = np.ldexp(1.0, (e_exp - fmt.man_bits).astype(np.int64))
        ulps = np.where(
            ex.zero, np.where(c == 0, 0.0, np.abs(c) / fmt.smallest_subnormal), err / ulp
        )
        digits = np.where(rel > 0, -np.log10(rel), np.inf)
    digits = np.maximum(digits, 0.0)

    zero_c = c == 0
    finite = np.isfinite(c)
    und = ex.undetermined_mask()
    sign_differs = finite & ~zero_c & ~ex.zero & ~und & (np.sign(c) != np.sign(ex.hi))
    # order matters: later assignments do not overwrite earlier, more specific ones
    rules = [
        (np.isnan(c), "nan"),
        (np.isinf(c), "overflow"),
        (und, "undetermined"),
        (ex.zero & zero_c, "structural_zero"),
        (ex.zero & ~zero_c, "spurious_nonzero"),
        (~ex.zero & zero_c, "rounding_zero"),
        (sign_differs, "wrong_sign"),
        (finite & ~zero_c & (np.abs(c) < fmt.smallest_normal), "subnormal"),
    ]
    assigned = np.zeros(shape, dtype=bool)
    for mask, name in rules:
        take = mask & ~assigned
        verdict[take] = name
        assigned |= take
    rz = verdict == "rounding_zero"
    under = underflows(ex, fmt, mode)
    subkind[rz & under] = "underflow"
    subkind[rz & ~under] = "lost"
    return Verdicts(verdict, subkind, rel, ulps, digits)
