"""What each power-of-two loss scale does to a set of exact values: underflow, subnormal,
overflow counts (found by binary search in the magnitudes sorted once)."""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field

import numpy as np

from fpgrad.diagnose.verdicts import ExactArray
from fpgrad.numbers.formats import Format

GROUPS = ("gradients", "signals")
SCOPES = ("gradients", "all")
TORCH_FORMATS = ("float16", "bfloat16", "float32")
MAX_ROWS = 40
_K_LIMIT = 600  # scale exponents considered: 2^-600 .. 2^600


def _log2_ratio(a: float, b: float) -> float:
    """log2(a / b) of positive floats without forming a / b, within +-4 * _K_LIMIT (a zero
    side counts as the far end)."""
    if a <= 0 or b <= 0:
        return -4.0 * _K_LIMIT if a <= 0 else 4.0 * _K_LIMIT
    return min(4.0 * _K_LIMIT, max(-4.0 * _K_LIMIT, math.log2(a) - math.log2(b)))


@dataclass
class _Values:
    """Non-zero exact magnitudes of one group as |hi| sorted, and apart the sorted |hi| of those
    whose low word's signed rest is negative or zero (for ties at a threshold), so that each
    threshold count is a few binary searches, not a pass. Built from ``mag`` and ``rest``."""

    mag: np.ndarray
    rest: InitVar[np.ndarray]
    zeros: int
    undetermined: int = 0  #: exact values whose certified ball still contains 0 (not judged)
    _neg: np.ndarray = field(init=False, repr=False)  # sorted |hi| whose rest < 0
    _nil: np.ndarray = field(init=False, repr=False)  # sorted |hi| whose rest == 0

    def __post_init__(self, rest: np.ndarray) -> None:
        self._neg = np.sort(self.mag[rest < 0])
        self._nil = np.sort(self.mag[rest == 0])
        self.mag = np.sort(self.mag)

    @classmethod
    def of(cls, arrays: list[ExactArray]) -> _Values:
        hi = np.concatenate([a.hi.ravel() for a in arrays]) if arrays else np.zeros(0)
        lo = np.concatenate([a.lo.ravel() for a in arrays]) if arrays else np.zeros(0)
        zero = np.concatenate([a.zero.ravel() for a in arrays]) if arrays else np.zeros(0, bool)
        und = (
            np.concatenate([a.undetermined_mask().ravel() for a in arrays])
            if arrays
            else np.zeros(0, bool)
        )
        keep = ~zero & ~und & (hi != 0)
        return cls(
            np.abs(hi[keep]),
            (lo * np.sign(hi))[keep],
            int((~keep & ~und).sum()),
            int(und.sum()),
        )

    @property
    def size(self) -> int:
        return int(self.mag.size)

    def _count(self, t: float, side: str) -> int:
        """How many |e| < t, plus those with |hi| == t whose rest is <= 0 (side "right") or
        < 0 (side "left")."""

        def at(a: np.ndarray) -> int:  # how many of ``a`` equal t
            return int(np.searchsorted(a, t, "right") - np.searchsorted(a, t, "left"))

        below = int(np.searchsorted(self.mag, t, "left"))
        if below == self.mag.size or self.mag[below] != t:  # no tie (the common case)
            return below
        return below + at(self._neg) + (at(self._nil) if side == "right" else 0)

    def le(self, t: float) -> int:  # how many |e| <= t
        return self._count(t, "right")

    def lt(self, t: float) -> int:  # how many |e| < t
        return self._count(t, "left")


@dataclass
class _Limits:
    """A format's thresholds at scale 1; tie rules of round-to-nearest-even."""

    underflow: float  # |v| <= this rounds to 0
    normal: float  # |v| < this rounds below the smallest normal
    overflow: float  # |v| >= this (or >, see tie) rounds to inf/NaN
    overflow_tie: bool  # True: a value exactly at ``overflow`` overflows

    @classmethod
    def of(cls, fmt: Format) -> _Limits:
        from fpgrad.numbers.rounding import round_to

        sub = fmt.smallest_subnormal
        top = fmt.max + fmt.ulp(fmt.max) / 2
        tie = not bool(np.isfinite(round_to(np.array([top]), fmt))[0])
        normal = fmt.smallest_normal - sub / 2 if fmt.subnormals else fmt.smallest_normal
        return cls(sub / 2, normal, top, tie)


def _row_counts(
    groups: dict[str, _Values], seed: _Values, lim: _Limits, k: int
) -> dict[str, dict[str, int]]:
    counts = {name: _counts(v, lim, k) for name, v in groups.items()}
    counts["seed"] = _counts(seed, lim, k)
    return counts


def _overflow(c: dict[str, dict[str, int]], seed: bool = True) -> int:
    return sum(c[g]["overflow"] for g in (*GROUPS, *(("seed",) if seed else ())))


def _counts(v: _Values, lim: _Limits, k: int) -> dict[str, int]:
    """Underflow / subnormal / overflow counts of ``v`` scaled by 2^k (exact thresholds)."""
    under = v.le(math.ldexp(lim.underflow, -k))
    sub = v.lt(math.ldexp(lim.normal, -k)) - under  # underflow < normal: a subset
    t = math.ldexp(lim.overflow, -k)
    over = v.size - (v.lt(t) if lim.overflow_tie else v.le(t))
    return {"underflow": under, "subnormal": sub, "overflow": over}
