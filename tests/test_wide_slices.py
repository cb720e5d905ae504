"""Wide Ozaki slices (fpgrad.arith.ozaki.wide_bits) and the compiled digit counts.

Slices are as wide as their *measured* digits allow: jit_ball.slices reports the largest
|digit| of every slice, matmul_levels checks that every level is an exact BLAS product for
those digits (ozaki.levels_exact) and bounds the tail with them, and falls back to the
narrow slices of ozaki.digit_bits (digits below 2**(b+1), always) when they are wider than
nominal. Checked here against exact rationals, with cancellation, magnitudes from 2**-300 to
2**300 and exact zeros, and on the fallback path. Also: ball_digits' compiled kernel
against its numpy formulas.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from fpgrad.arith import expansion as xp
from fpgrad.arith import jit_ball, ozaki
from fpgrad.arith.ball import HI_BOUND, Ball
from fpgrad.reference.exact import ball_digits


def _words(rng: np.random.Generator, shape: tuple[int, int], lo: int, hi: int) -> np.ndarray:
    """3-word canonical values (renormalised), magnitudes 2**lo .. 2**hi, random signs."""
    n = shape[0] * shape[1]
    head = rng.uniform(1, 2, n) * np.ldexp(1.0, rng.integers(lo, hi + 1, n))
    head *= rng.choice([-1, 1], n)
    terms = [head] + [head * rng.normal(size=n) * 2.0 ** (-53 * i) for i in (1, 2)]
    return xp.renorm(terms, 3).reshape(3, *shape)


def _exact(x: np.ndarray) -> list[list[Fraction]]:
    return [
        [sum(Fraction(float(w)) for w in x[:, i, j]) for j in range(x.shape[2])]
        for i in range(x.shape[1])
    ]


def _check_within_bound(a: np.ndarray, b: np.ndarray, prec: int) -> np.ndarray:
    terms, bound, risk = ozaki.matmul_levels(a, b, prec)
    assert not risk
    fa, fb = _exact(a), _exact(b)
    n = a.shape[2]
    for i in range(a.shape[1]):
        for j in range(b.shape[2]):
            want = sum(fa[i][q] * fb[q][j] for q in range(n))
            got = sum(Fraction(float(t[i, j])) for t in terms)
            assert abs(want - got) <= Fraction(float(bound[i, j]))
    return bound


@pytest.mark.parametrize("n", [10, 64, 256])
@pytest.mark.parametrize("seed", [0, 1])
def test_wide_products_within_their_bound(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = _words(rng, (3, n), -300, 300)
    b = _words(rng, (n, 2), -300, 300)
    a[:, 0] = _words(rng, (1, n), -4, 4)[:, 0]  # a row of like magnitudes
    b[:, :, 0] = _words(rng, (n, 1), -4, 4)[:, :, 0]
    # cancellation: row 1 . column 0 is about 2**-100 of its terms
    a[:, 1, : n // 2] = a[:, 0, : n // 2]
    a[:, 1, n // 2 :] = 0.0
    a[:, 1, n - 1] = 0.0
    b[:, n // 2 :, 0] = 0.0
    b[:, -1, 0] = 0.0
    a[:, 2] = 0.0  # an exact zero row
    bound = _check_within_bound(a, b, 133)
    assert not bound[2].any()


def test_wide_products_of_float64_operands() -> None:
    rng = np.random.default_rng(3)
    a = np.zeros((3, 2, 256))
    a[0] = rng.normal(size=(2, 256))
    b = np.zeros((3, 256, 3))
    b[0] = rng.uniform(-1 / 16, 1 / 16, size=(256, 3))
    _check_within_bound(a, b, 133)


def test_level_choice_for_the_reference() -> None:
    # BallArith at 150 bits asks 2**-135 of n max|a row| max|b col| (nominal digits)
    for n in (10, 64, 128, 256, 1024):
        levels, bits = ozaki.exact_levels(n, 133, 3, 3)
        spread = (1 + 0.75 * (levels - 1)) * (1 + 2.0**-8)
        assert ozaki.tail_factor(n, levels, bits, 3, 3, spread) <= 2.0**-135
        assert bits >= ozaki.digit_bits(n, levels)  # never narrower than the safe slices


def test_levels_exact_is_the_integer_bound() -> None:
    b = 21
    nominal = np.array([2.0**b] + [0.75 * 2.0**b] * 4)
    assert ozaki.levels_exact(256, 5, nominal, nominal)
    assert ozaki.levels_exact(256, 5, nominal * 2, nominal)  # 2**52.7
    assert not ozaki.levels_exact(256, 5, nominal * 4, nominal)  # 2**53.7
    # digits 2**22: level 0 is n 2**44, level 1 n 2**45 (against 2**53, with a hair of slack)
    d = np.array([2.0**22, 2.0**22])
    assert ozaki.levels_exact(256, 1, d, d) and ozaki.levels_exact(128, 2, d, d)
    assert not ozaki.levels_exact(256, 2, d, d)


def test_fallback_to_narrow_slices_when_digits_are_too_wide(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # slices far too wide for exact levels: the measured digits fail the check, the product
    # is cut again with digit_bits and stays within its bound
    calls = []
    real = ozaki.levels_exact

    def spy(n: int, levels: int, da: np.ndarray, db: np.ndarray) -> bool:
        ok = real(n, levels, da, db)
        calls.append(ok)
        return ok

    monkeypatch.setattr(ozaki, "wide_bits", lambda n, levels: 26)
    monkeypatch.setattr(ozaki, "levels_exact", spy)
    rng = np.random.default_rng(5)
    a = _words(rng, (2, 64), -3, 3)
    b = _words(rng, (64, 2), -3, 3)
    _check_within_bound(a, b, 133)
    assert calls == [False, True]


def test_slice_digit_maxima() -> None:
    rng = np.random.default_rng(7)
    x = _words(rng, (5, 40), -30, 30)
    x[:, 3] = 0.0
    for by_row in (True, False):
        levels, bits = 4, 21
        rows, cols = x.shape[1], x.shape[2]
        sl = np.empty((levels, rows, cols))
        tl = np.empty((levels + 1, rows, cols))
        s_at = [i * rows * cols for i in range(levels)]
        t_at = [t * rows * cols for t in range(levels + 1)]
        expo, _, _, _, dmax = ozaki._cut(x, by_row, bits, levels, sl, s_at, cols, tl, t_at, cols)
        scale = expo[:, None] if by_row else expo[None, :]
        for i in range(levels):
            digits = np.abs(np.ldexp(sl[i], bits * (i + 1) - scale))
            assert np.all(digits == np.round(digits))  # integers in their unit
            assert dmax[i] == digits.max()
        assert dmax[0] <= 2.0**bits and dmax.max() <= 2.0 ** (bits + 1)


def test_digits_kernel_matches_the_numpy_formulas() -> None:
    rng = np.random.default_rng(11)
    n = 4000
    m0 = rng.normal(size=n) * np.ldexp(1.0, rng.integers(-900, 900, n))
    rad = np.abs(m0) * np.ldexp(1.0, rng.integers(-200, 5, n))
    special = [
        (0.0, 0.0), (0.0, 1e-300), (1.0, 0.0), (1.0, 1.0), (1.0, np.nan), (np.nan, 0.0),
        (np.inf, 1.0), (1.0, np.inf), (-2.0, 1.0), (5e-324, 0.0), (5e-324, 5e-324),
        (1.0, 1.0 / HI_BOUND), (1e300, 1e-300), (-0.0, 0.0),
    ]  # fmt: skip
    for i, (m, r) in enumerate(special):
        m0[i], rad[i] = m, r
    cap = 45.0
    d, zero, undet, r = ball_digits(Ball(np.stack([m0, np.zeros(n), np.zeros(n)]), rad), cap)
    with np.errstate(all="ignore"):
        mm = np.abs(m0)
        zero_np = (mm == 0) & (rad == 0)
        undet_np = ~zero_np & ~(mm / HI_BOUND > rad)
        d_np = np.clip(-np.log10(rad * HI_BOUND / mm), 0.0, cap)
        d_np = np.where(rad == 0, cap, d_np)
        d_np = np.where(zero_np, np.inf, np.where(undet_np, 0.0, d_np))
    assert np.array_equal(zero, zero_np) and np.array_equal(undet, undet_np)
    assert r is rad
    finite = np.isfinite(d_np)
    assert np.array_equal(np.isinf(d), ~finite)
    # log2 * log10(2) against log10: within a few units of the last place
    assert np.allclose(d[finite], d_np[finite], rtol=4 * 2.0**-52, atol=0)
    assert math.isinf(d[0]) and d[1] == 0.0 and d[2] == cap and d[4] == 0.0


def test_digits_kernel_on_scalars_and_strided_radii() -> None:
    ball = Ball(np.array([3.0, 0.0, 0.0]), np.asarray(2.0**-100))
    d, zero, undet, _ = ball_digits(ball, 45.0)
    assert d.shape == () and not zero and not undet
    assert abs(float(d) - (100 + math.log2(3 / HI_BOUND)) * math.log10(2)) < 1e-12
    mid = np.arange(1.0, 13.0).reshape(3, 4)
    words = np.stack([mid, 0 * mid, 0 * mid])
    t = Ball(words, np.full((3, 4), 2.0**-60)).T
    d, _, _, _ = ball_digits(t, 45.0)
    assert d.shape == (4, 3)
    assert np.allclose(d, -np.log10(2.0**-60 * HI_BOUND / mid.T), rtol=1e-15)
    assert jit_ball.LOG10_2 == math.log10(2.0)
