"""Adversarial review of exact single floats in the fast balls (attack 25, commit 96a4b8b).

ADD, SUB and MUL of two exact single floats (radius 0, lower words 0) now carry no rounding
term. Checked here: the words are the exact rational wherever the radius is 0, for edge
operands (signed zeros, -0.0 lower words, the guard boundaries 2**-800 and 2**800, ties,
products near 2**-969, overflow, inf and NaN: those are counted as range errors); every
elementwise function and operation of the balls encloses the exact range over exact
single-word inputs and inputs with subnormal radii (the attack 9 harness, mpmath at 2300
bits); sums, maxima and matrix products of such balls enclose the exact interval range
(rationals). No finding: these are guards for the proof in jit_ball.binop.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from fpgrad.arith import expansion as xp
from fpgrad.arith.ball import Ball, BallArith

sys.path.insert(0, str(Path(__file__).parent))
import test_attack9_elementary as t9  # noqa: E402
from test_ball_exact_singles import _exact  # noqa: E402

EDGE = [
    0.0, -0.0, 1.0, -1.0, 3.0, 0.1, 1 + 2.0**-52, 1 - 2.0**-53, 2.0**53, 2.0**53 + 2,
    2.0**-800, -(2.0**-800), math.nextafter(2.0**-800, 1.0), 2.0**800, -(2.0**800),
    math.nextafter(2.0**800, 0.0), 2.0**-801, 2.0**-484, 2.0**-485, 1.5 * 2.0**-485,
    math.nextafter(2.0**-484, 1.0), (2**53 - 1) * 2.0**-537, 2.0**-400, 2.0**400, 1e300,
    5e-324, 2.0**-1022, 1.7976931348623157e308, math.inf, -math.inf, math.nan,
]  # fmt: skip


@pytest.mark.parametrize("bits", [100, 150])
@pytest.mark.parametrize("op", ["add", "sub", "mul"])
@pytest.mark.parametrize("neg_low", [False, True])
def test_edge_singles_are_exact_or_counted(bits: int, op: str, neg_low: bool) -> None:
    """Every pair of edge operands, one element at a time: a radius of 0 over finite words in
    the guarded range means the words sum to the exact rational; anything else raises the
    range count (lower words -0.0 count as 0 for ``_single``)."""
    for a in EDGE:
        for b in EDGE:
            ar = BallArith(bits)
            mids = [xp.from_float(np.array([v]), ar.k) for v in (a, b)]
            if neg_low:
                for m in mids:
                    m[1:] = -0.0
            with np.errstate(all="ignore"):
                out = getattr(ar, op)(Ball(mids[0], np.zeros(1)), Ball(mids[1], np.zeros(1)))
            words = [float(w) for w in np.asarray(out.mid)[:, 0]]
            r = float(np.asarray(out.rad)[0])
            m0 = abs(words[0])
            in_range = all(map(math.isfinite, words)) and (m0 == 0 or 2.0**-800 <= m0 <= 2.0**800)
            underflow = op == "mul" and m0 == 0 and a != 0 and b != 0
            if not in_range or underflow or not (math.isfinite(a) and math.isfinite(b)):
                assert ar.range_errors > 0 or not (math.isfinite(a) and math.isfinite(b)), (a, b)
                continue
            if r == 0:
                got = sum((Fraction(w) for w in words), Fraction(0))
                assert got == _exact(op, a, b), (op, a, b, words)


SIGN = [-1.0, 1.0]
SINGLE_MIDS = {
    "ints": lambda rng, n: rng.integers(-8, 9, n).astype(float),
    "halves": lambda rng, n: rng.integers(-16, 17, n) / 2.0,
    "pow2": lambda rng, n: rng.choice(SIGN, n) * np.ldexp(1.0, rng.integers(-40, 40, n)),
    "pow2_small": lambda rng, n: rng.choice(SIGN, n) * np.ldexp(1.0, rng.integers(-800, -400, n)),
    "pow2_tiny_path": lambda rng, n: rng.choice(SIGN, n) * np.ldexp(1.0, rng.integers(-14, -2, n)),
    "zero": lambda rng, n: np.zeros(n),
    "unit": t9.MIDS["unit"],
    "ncdf_edge": t9.MIDS["ncdf_edge"],
    "near_2^-800": t9.MIDS["near_2^-800"],
    "saturated": t9.MIDS["saturated"],
}
#: radii 0 (exact singles) and subnormal or underflowing ones
SMALL_RADII = [0.0, 0.0, 0.0, 2.0**-1074, 3 * 2.0**-1074, 2.0**-1060, 2.0**-1023, 2.0**-900]


def _single(w0: np.ndarray) -> np.ndarray:
    out = np.zeros((3, w0.size))
    out[0] = w0
    return out


def test_functions_of_exact_singles_enclose() -> None:
    """Each function of the balls (and expm1) over single-word midpoints with radius 0 or a
    subnormal radius encloses the exact range or is counted."""
    rng = np.random.default_rng(25)
    unary = dict(t9.UNARY)
    unary["expm1"] = (lambda ba, b: ba.expm1(b), t9.MP.expm1, False)
    saved = dict(t9.UNARY)
    t9.UNARY.update(unary)
    misses: list[tuple] = []
    try:
        for name in unary:
            for regime in SINGLE_MIDS.values():
                bits = int(rng.choice([100, 150]))
                radii = rng.choice(SMALL_RADII, 12)
                misses += t9.unary_misses(name, bits, _single(regime(rng, 12)), radii)
    finally:
        t9.UNARY.clear()
        t9.UNARY.update(saved)
    assert not misses, misses[:5]


def test_operations_of_exact_singles_enclose() -> None:
    rng = np.random.default_rng(26)
    names = list(SINGLE_MIDS)
    misses: list[tuple] = []
    for name in t9.BINARY:
        for bits in (100, 150):
            for _ in range(6):
                ra, rb = rng.choice(names, 2)
                a = (_single(SINGLE_MIDS[ra](rng, 24)), rng.choice(SMALL_RADII, 24))
                b = (_single(SINGLE_MIDS[rb](rng, 24)), rng.choice(SMALL_RADII, 24))
                misses += t9.binary_misses(name, bits, a, b)
    assert not misses, misses[:5]


def _value(words: np.ndarray) -> Fraction:
    return sum((Fraction(float(w)) for w in words), Fraction(0))


@pytest.mark.parametrize("bits", [100, 150])
def test_sums_maxima_and_products_of_exact_singles_enclose(bits: int) -> None:
    """Interval ranges in rationals: sum along each axis, max, and the matrix product of
    small integer, power-of-two and half-integer singles with radii 0 or subnormal."""
    rng = np.random.default_rng(27 + bits)
    for _ in range(40):
        ar = BallArith(bits)
        n, m, p = (int(v) for v in rng.integers(1, 6, 3))
        kind = int(rng.integers(0, 3))

        def make(shape: tuple[int, int], kind: int = kind, k: int = ar.k) -> Ball:
            if kind == 0:
                v = rng.integers(-3, 4, shape).astype(float)
            elif kind == 1:
                v = rng.choice(SIGN, shape) * np.ldexp(1.0, rng.integers(-60, 60, shape))
            else:
                v = rng.choice([0.0, 0.5, -0.5, 1.0, 3.0], shape)
            mid = np.zeros((k, *shape))
            mid[0] = v
            return Ball(mid, rng.choice(SMALL_RADII, shape))

        a, b = make((n, m)), make((m, p))
        outs = {"mm": ar._matmul(a, b), "s0": ar.sum(a, 0), "s1": ar.sum(a, 1), "mx": ar.max(a, 1)}
        assert ar.range_errors == 0
        va = [[(_value(a.mid[:, i, t]), Fraction(float(a.rad[i, t]))) for t in range(m)]
              for i in range(n)]  # fmt: skip
        vb = [[(_value(b.mid[:, t, j]), Fraction(float(b.rad[t, j]))) for j in range(p)]
              for t in range(m)]  # fmt: skip
        for key, out in outs.items():
            om, orad = np.asarray(out.mid), np.asarray(out.rad)
            for idx in np.ndindex(orad.shape):
                if key == "mm":
                    lo = hi = Fraction(0)
                    for t in range(m):
                        (x, rx), (y, ry) = va[idx[0]][t], vb[t][idx[1]]
                        c = [u * w for u in (x - rx, x + rx) for w in (y - ry, y + ry)]
                        lo, hi = lo + min(c), hi + max(c)
                elif key == "mx":
                    lo = max(x - r for x, r in va[idx[0]])
                    hi = max(x + r for x, r in va[idx[0]])
                else:
                    cells = [va[t][idx[0]] for t in range(n)] if key == "s0" else va[idx[0]]
                    lo = sum((x - r for x, r in cells), Fraction(0))
                    hi = sum((x + r for x, r in cells), Fraction(0))
                c, r = _value(om[(slice(None), *idx)]), Fraction(float(orad[idx]))
                assert c - r <= lo and hi <= c + r, (key, idx, float(c), float(r))
