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
| inaccurate | normal, right sign, relative error above ``sqrt(u)`` (u: the unit roundoff) |
| ok | with relative error, error in ulps of the format at e, correct digits |

``inaccurate``: rounding explains relative errors of a small multiple of ``u = 2**-p`` (p the
format's precision in bits: half an ulp per correctly rounded operation, a few per chain of
them). An error above ``sqrt(u)`` (float16: 2**-5.5, 2.2%; bfloat16: 2**-4, 6.25%; float32:
2**-12) means at least half of the format's significant bits are wrong, which no plausible
number of roundings of that size explains: cancellation, an absorbed addend or a lost term did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fpgrad.diagnose.verdict_names import VERDICTS
from fpgrad.numbers.formats import Format
from fpgrad.numbers.rounding import STOCHASTIC_MODES, Mode
from fpgrad.reference.array import ExactArray

#: subkinds of a rounding zero (codes 1, 2 of :attr:`Verdicts.kind`; 0: none)
SUBKINDS = ("", "underflow", "lost")


def inaccurate_threshold(fmt: Format) -> float:
    """Relative error above which a normal value of the right sign is ``inaccurate``:
    ``sqrt(u)`` with ``u = 2**-(man_bits + 1)`` the unit roundoff (see the module docstring).

    >>> from fpgrad.numbers.formats import get_format
    >>> inaccurate_threshold(get_format("bfloat16"))
    0.0625
    """
    return math.ldexp(1.0, -(fmt.man_bits + 1)) ** 0.5


@dataclass
class Verdicts:
    """Per-element verdicts of one computed array against one exact array, as uint8 codes;
    the names (:attr:`verdict`, :attr:`subkind`) are object arrays made on request."""

    rel_err: np.ndarray
    ulps: np.ndarray
    digits: np.ndarray
    code: np.ndarray  # uint8: index of the verdict in VERDICTS
    kind: np.ndarray  # uint8: index of the subkind in SUBKINDS

    @property
    def verdict(self) -> np.ndarray:
        """The verdict names (str objects), shape of the array."""
        return np.asarray(VERDICTS, dtype=object)[self.code.ravel()].reshape(self.code.shape)

    @property
    def subkind(self) -> np.ndarray:
        """The subkind names: underflow or lost for rounding zeros, "" otherwise (str objects)."""
        return np.asarray(SUBKINDS, dtype=object)[self.kind.ravel()].reshape(self.kind.shape)


def exact_exponent(ex: ExactArray) -> np.ndarray:
    """floor(log2|e|) for non-zero e, correct at powers of two (uses the low word)."""
    mant, exp = np.frexp(np.abs(ex.hi))
    below = (mant == 0.5) & (ex.lo * np.sign(ex.hi) < 0)  # hi rounded up onto a power of two
    return np.where(below, exp - 2, exp - 1)


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
    rounding mode of the column (it decides a rounding zero's ``underflow``/``lost``).
    Vectorised, a few temporaries of the array's size, no Python object per element."""
    c = np.asarray(computed, dtype=np.float64)
    shape = c.shape

    def flat(a: np.ndarray) -> np.ndarray:  # 1-d (a view where it can be), shape of c
        return np.broadcast_to(a, shape).reshape(-1)

    hi, lo, zero, und = flat(ex.hi), flat(ex.lo), flat(ex.zero), flat(ex.undetermined_mask())
    c = c.reshape(-1)
    zero_c = c == 0
    with np.errstate(all="ignore"):
        err = c - hi  # exact when c is near e (Sterbenz)
        err -= lo
        np.abs(err, out=err)
        rel = err / np.abs(hi)
        np.copyto(rel, np.where(zero_c, 0.0, np.inf), where=zero)  # exact 0: no error iff c = 0
        e_exp = np.maximum(exact_exponent(ExactArray(hi, lo, zero)), fmt.emin)
        e_exp -= fmt.man_bits
        ulps = err / np.ldexp(1.0, e_exp.astype(np.int64, copy=False))
        at_zero = np.abs(c)
        at_zero /= fmt.smallest_subnormal
        at_zero[zero_c] = 0.0
        np.copyto(ulps, at_zero, where=zero)
        digits = np.log10(rel)
        np.negative(digits, out=digits)
        digits[~(rel > 0)] = np.inf
    np.maximum(digits, 0.0, out=digits)

    # the verdict of the first rule that holds, in this order: nan, overflow, undetermined,
    # structural_zero, spurious_nonzero, rounding_zero, wrong_sign, subnormal, inaccurate, ok.
    # Written from the last rule to the first, each overwriting: a rule's other conditions
    # (finite, non-zero computed value, non-zero exact value) are those of the rules before it
    code = np.zeros(c.size, dtype=np.uint8)  # ok
    with np.errstate(invalid="ignore"):
        np.copyto(code, _C["inaccurate"], where=rel > inaccurate_threshold(fmt))
        np.copyto(code, _C["subnormal"], where=np.abs(c) < fmt.smallest_normal)
        np.copyto(code, _C["wrong_sign"], where=np.sign(c) != np.sign(hi))
    np.copyto(code, np.where(zero, _C["structural_zero"], _C["rounding_zero"]), where=zero_c)
    np.copyto(code, _C["spurious_nonzero"], where=zero & ~zero_c)
    np.copyto(code, _C["undetermined"], where=und)
    np.copyto(code, _C["overflow"], where=np.isinf(c))
    np.copyto(code, _C["nan"], where=np.isnan(c))
    kind = np.zeros(c.size, dtype=np.uint8)
    rz = np.flatnonzero(code == _C["rounding_zero"])
    if rz.size:  # underflow (1) or lost (2), judged on the rounding zeros only
        sub = ExactArray(hi[rz], lo[rz], zero[rz], None, und[rz])
        kind[rz] = np.where(underflows(sub, fmt, mode), 1, 2)
    return Verdicts(*(a.reshape(shape) for a in (rel, ulps, digits, code, kind)))


_C = {v: np.uint8(i) for i, v in enumerate(VERDICTS)}


def signal_counts(ex: ExactArray, computed: np.ndarray, fmt: Format) -> dict[str, int]:
    """How many elements :func:`classify` would call ``rounding_zero``, ``subnormal``,
    ``overflow`` or ``nan`` (together: ``overflow``) and ``structural_zero``, and how many
    certified non-zero exact values lie below the format's smallest normal
    (``exact_subnormal_range``), from masks alone (no errors, no logarithms): what "where the
    signal died" counts per tensor."""
    c = np.asarray(computed, dtype=np.float64)
    zero, und = ex.zero, ex.undetermined_mask()
    zero_c = c == 0
    known = ~zero & ~und  # a certified non-zero exact value
    with np.errstate(invalid="ignore"):
        small = (np.abs(c) < fmt.smallest_normal) & ~zero_c & (np.sign(c) == np.sign(ex.hi))
    return {
        "rounding_zero": int(np.count_nonzero(known & zero_c)),
        "subnormal": int(np.count_nonzero(known & small)),
        "overflow": int(np.count_nonzero(~np.isfinite(c))),
        "structural_zero": int(np.count_nonzero(zero & ~und & zero_c)),
        "exact_subnormal_range": int(
            np.count_nonzero(known & (np.abs(ex.hi) < fmt.smallest_normal))
        ),
    }
