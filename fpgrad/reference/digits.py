"""Certified digits of ball arrays (multi-word balls and Arb balls) and their decimal strings:
the queries :class:`fpgrad.reference.exact.ExactResult` is built from and answers with.

What the digits claim is stated in :mod:`fpgrad.reference.exact`: an exact zero is the ball
{0}; an undetermined value's ball contains 0; otherwise the digits are ``-log10(rad / |mid|)``
(a lower bound), so the sign and every reported digit are proven.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, MutableMapping
from typing import Any

import mpmath
import numpy as np

from fpgrad.arith import arb as arbmod
from fpgrad.arith.ball import Ball


def ball_digits(ball: Ball, cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(certified digits, exact zeros, undetermined, radii) of a multi-word ball array.

    Exact zero: radius 0 at 0. Undetermined: the ball contains 0 otherwise. Digits:
    ``-log10(rad / |mid|)`` with ``|mid| >= |word 0| / HI_BOUND``, capped at ``cap``; one
    compiled pass (:func:`fpgrad.arith.jit_ball.digits`).
    """
    return ball_summary(ball, cap)[:4]  # type: ignore[return-value]


def ball_summary(
    ball: Ball, cap: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """:func:`ball_digits` and the least digits of the elements neither zero nor undetermined
    (``cap`` when there are none), from the same pass."""
    from fpgrad.arith import jit_ball

    r = np.asarray(ball.rad, dtype=np.float64)
    m0 = np.ascontiguousarray(ball.mid[0], dtype=np.float64).reshape(-1)
    d = np.empty(r.shape)
    zero = np.empty(r.shape, dtype=bool)
    undet = np.empty(r.shape, dtype=bool)
    low = jit_ball.digits(
        m0, np.ascontiguousarray(r).reshape(-1), float(cap),
        d.reshape(-1), zero.reshape(-1), undet.reshape(-1),
    )  # fmt: skip
    return d, zero, undet, r, float(low)


def ball_flags(ball: Ball, cap: float) -> tuple[None, np.ndarray, np.ndarray, np.ndarray, float]:
    """:func:`ball_summary` without the digits array (None in its place): exact zeros,
    undetermined elements, radii and the least digits, in one pass without a logarithm per
    element (:func:`fpgrad.arith.jit_ball.flags`); :class:`LazyDigits` makes the digits when
    asked."""
    from fpgrad.arith import jit_ball

    r = np.asarray(ball.rad, dtype=np.float64)
    m0 = np.ascontiguousarray(ball.mid[0], dtype=np.float64).reshape(-1)
    zero = np.empty(r.shape, dtype=bool)
    undet = np.empty(r.shape, dtype=bool)
    low = jit_ball.flags(
        m0, np.ascontiguousarray(r).reshape(-1), float(cap), zero.reshape(-1), undet.reshape(-1)
    )
    return None, zero, undet, r, float(low)


class LazyDigits(MutableMapping):
    """Certified digits per key (as :func:`ball_digits`), each array made at its first read:
    a trace holds far more values than a table shows. Keys keep their order; a value set
    replaces the one that would be made."""

    def __init__(self, cap: float) -> None:
        self._cap = cap
        self._balls: dict[str, Ball | None] = {}
        self._made: dict[str, np.ndarray] = {}

    def add(self, key: str, ball: Ball) -> None:
        self._balls[key] = ball
        self._made.pop(key, None)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._made:
            ball = self._balls[key]  # KeyError for an unknown key
            assert ball is not None
            self._made[key] = ball_summary(ball, self._cap)[0]
        return self._made[key]

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        self._made[key] = value
        self._balls.setdefault(key, None)

    def __delitem__(self, key: str) -> None:
        del self._balls[key]
        self._made.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._balls)

    def __len__(self) -> int:
        return len(self._balls)


def arb_digits(
    values: np.ndarray, cap: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(certified digits, exact zeros, undetermined, radii) of an Arb ball array."""
    arr = np.asarray(values, dtype=object)
    zero = arbmod.exact_zero(arr)
    undet = ~zero & arbmod.contains_zero(arr)
    bits = arbmod.rel_bits(arr)  # a lower bound on -log2(rad / |mid|)
    d = np.clip(bits * math.log10(2), 0.0, cap)
    d = np.where(zero, np.inf, np.where(undet, 0.0, d))
    return d, zero, undet, arbmod.radii(arr)


def arb_min_digits(values: np.ndarray, cap: float) -> float | None:
    """The fewest certified digits in an Arb ball array, as :func:`arb_digits` counts them
    (exact zeros left out: None when all are; a ball that contains 0 counts 0), without the
    radii."""
    arr = np.asarray(values, dtype=object)
    zero = arbmod.exact_zero(arr)
    if zero.all():
        return None
    if (arbmod.contains_zero(arr) & ~zero).any():
        return 0.0
    return float(np.clip(np.min(arbmod.rel_bits(arr)[~zero]) * math.log10(2), 0.0, cap))


def hi_lo_arb(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Nearest float64 of each midpoint and the nearest float64 of the rest."""
    arr = np.asarray(values, dtype=object)
    mids = arbmod.to_mpf(arr, 64)
    flat = mids.ravel()
    hi = np.empty(flat.size)
    lo = np.empty(flat.size)
    for i, v in enumerate(flat):
        h = float(v)
        hi[i] = h
        lo[i] = float(v - h) if math.isfinite(h) else 0.0
    return hi.reshape(arr.shape), lo.reshape(arr.shape)


def decimal_string(value: Any, digits: float) -> str:
    """``value`` as a decimal string with ``digits`` significant digits (all, for exact zeros)."""
    if value == 0:
        return "0"
    n = 40 if math.isinf(digits) else max(1, int(digits))
    ctx = getattr(value, "context", mpmath.mp)  # print in the value's own precision, never 53 bits
    return ctx.nstr(value, n, strip_zeros=False, min_fixed=1, max_fixed=0)


def min_digits(d: np.ndarray, undetermined: np.ndarray) -> float:
    """The fewest certified digits of ``d`` outside the undetermined elements (inf if none)."""
    kept = d[~undetermined]
    return float(kept.min()) if kept.size else math.inf


def uncertified_fix(escalations: list[str], bits: int) -> str:
    """What to do when the exact reference certifies too few digits, from its escalations: a
    higher cap only helps where Arb stopped at the cap (not where it was not tried, or stopped
    at its memory bound)."""
    skip = "arb not tried: "
    skipped = [e for e in escalations if e.startswith(skip)]
    if skipped:  # a higher cap changes nothing: the Arb fallback never ran
        return (f"the certified Arb fallback was not tried ({skipped[0][len(skip):]}); use a "
                "smaller batch or model, or pass --allow-uncertified (the fast balls still "
                "enclose every value)")  # fmt: skip
    if any(e.startswith("arb: precision capped") for e in escalations):
        return (f"the Arb fallback stopped at {bits} bits, its memory bound for this network (a "
                "higher --exact-max-bits changes nothing); use a smaller batch or model, or "
                "pass --allow-uncertified")  # fmt: skip
    return "raise --exact-max-bits or pass --allow-uncertified"
