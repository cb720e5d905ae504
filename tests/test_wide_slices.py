"""Wide Ozaki slices (fpgrad.arith.ozaki.wide_bits) and the compiled digit counts.

Slices are as wide as their nominal digits allow: jit_ball.slices counts the digits above
their nominal bound (ozaki.digit_caps), the levels are exact BLAS products for digits within
it (ozaki.levels_exact) and the tail is bounded with it; matmul_levels cuts the product again
with the narrow slices of ozaki.digit_bits (digits below 2**(b+1)) where a digit exceeds it.
Checked here against exact rationals, with cancellation, magnitudes from 2**-300 to 2**300
and exact zeros, and on both fallback paths. Also: ball_digits' compiled kernel against its
numpy formulas.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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
        caps = ozaki.digit_caps(levels, bits, True)
        assert ozaki.levels_exact(n, levels, caps, caps)
        spread = math.ldexp(float(caps.sum()), -bits)
        assert ozaki.tail_factor(n, levels, bits, 3, 3, spread) <= 2.0**-135
        assert bits >= ozaki.digit_bits(n, levels)  # never narrower than the safe slices


def test_levels_exact_is_the_integer_bound() -> None:
    b = 21
    nominal = np.array([2.0**b] + [0.75 * 2.0**b] * 4)
    assert ozaki.levels_exact(256, 5, nominal, nominal)
    assert ozaki.levels_exact(256, 5, nominal * 2, nominal)  # 2**52.7
    assert not ozaki.levels_exact(256, 5, nominal * 4, nominal)  # 2**53.7
    # digits 2**22: level 1 is n 2**45, exactly 2**53 at n = 256 (exact); one unit more is not
    d = np.array([2.0**22, 2.0**22])
    assert ozaki.levels_exact(256, 2, d, d) and not ozaki.levels_exact(512, 2, d, d)
    assert not ozaki.levels_exact(256, 2, d + np.array([0.0, 1.0]), d)


@pytest.fixture
def fresh_plans() -> Iterator[None]:
    """matmul_levels' plans made under this test's patches only (and forgotten after)."""
    ozaki._plan.cache_clear()
    yield
    ozaki._plan.cache_clear()


def _spy_cuts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(bits, digits above their caps) of every operand matmul_levels cuts."""
    calls: list[tuple[int, int]] = []
    real = ozaki._cut

    def spy(*args: object) -> tuple:
        out = real(*args)  # type: ignore[arg-type]
        calls.append((int(args[2]), out[4]))  # type: ignore[call-overload]
        return out

    monkeypatch.setattr(ozaki, "_cut", spy)
    return calls


@pytest.mark.usefixtures("fresh_plans")
def test_fallback_when_the_levels_would_not_be_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # slices far too wide for exact levels: cut again with digit_bits, within the bound
    calls = _spy_cuts(monkeypatch)
    monkeypatch.setattr(ozaki, "wide_bits", lambda n, levels: 26)
    rng = np.random.default_rng(5)
    _check_within_bound(_words(rng, (2, 64), -3, 3), _words(rng, (64, 2), -3, 3), 133)
    narrow = ozaki.exact_levels(64, 133, 3, 3, wide=False)[1]
    assert [c[0] for c in calls] == [26, 26, narrow, narrow]


@pytest.mark.usefixtures("fresh_plans")
def test_fallback_when_digits_exceed_their_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    # nominal caps far too low: digits above them are counted, and the product is cut again
    calls = _spy_cuts(monkeypatch)
    real = ozaki.digit_caps
    monkeypatch.setattr(
        ozaki,
        "digit_caps",
        lambda levels, bits, wide: real(levels, bits, wide) / (8 if wide else 1),
    )
    rng = np.random.default_rng(6)
    _check_within_bound(_words(rng, (2, 64), -3, 3), _words(rng, (64, 2), -3, 3), 133)
    assert calls[0][1] > 0 and calls[2][1] == 0 and calls[3][1] == 0


def test_slice_digits_are_counted_against_their_caps() -> None:
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
        caps = np.array([2.0**bits, 2.0**20, 2.0**19 + 5, 3.0])
        out = ozaki._cut(x, by_row, bits, levels, sl, s_at, cols, tl, t_at, cols, caps)
        expo = out[0][:, None] if by_row else out[0][None, :]
        over = 0
        for i in range(levels):
            digits = np.abs(np.ldexp(sl[i], bits * (i + 1) - expo))
            assert np.all(digits == np.round(digits))  # integers in their unit
            assert digits.max() <= 2.0 ** (bits + 1)
            over += int((digits > caps[i]).sum())
        assert out[4] == over > 0
        nominal = ozaki._cut(x, by_row, bits, levels, sl, s_at, cols, tl, t_at, cols,
                             ozaki.digit_caps(levels, bits, True))  # fmt: skip
        assert nominal[4] == 0


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
