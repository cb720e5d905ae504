"""Kernels of the fast exact trace (issue 14).

The float32 radius products (fpgrad.arith.radius) bound the exact products from above: the
oracle is rational arithmetic (fractions), where every float is exact, so each bound is
compared with the exact value of ``(|x0| HI_BOUND + xr) @ (|y0| HI_BOUND + yr)``. The column
sums and the digit summary give the floats of the code they replace, bit for bit.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from fpgrad.arith import radius
from fpgrad.arith.ball import BallArith

H = Fraction(radius.HI_BOUND)


def _exact(m0: np.ndarray | None, r: np.ndarray | None) -> list[list[Fraction]]:
    ref = r if r is not None else m0
    assert ref is not None
    rows, cols = ref.shape
    return [
        [
            (abs(Fraction(float(m0[i, j]))) * H if m0 is not None else Fraction(0))
            + (Fraction(float(r[i, j])) if r is not None else Fraction(0))
            for j in range(cols)
        ]
        for i in range(rows)
    ]


def _wide(rng: np.random.Generator, shape: tuple[int, int], span: int) -> np.ndarray:
    """Values of both signs over 2**-span .. 2**span, some exact zeros."""
    v = rng.normal(size=shape) * np.exp2(rng.integers(-span, span, size=shape))
    v[rng.random(shape) < 0.1] = 0.0
    return v


@pytest.mark.parametrize("span", [2, 60, 300])
def test_operands_round_up_into_float32(span: int) -> None:
    """Every float32 element is >= its exact scaled value (fails without the upward factor,
    half the elements round down, or without the floor, tiny elements become 0) and exact
    zeros stay 0."""
    rng = np.random.default_rng(span)
    m0, r = _wide(rng, (20, 30), span), np.abs(_wide(rng, (20, 30), span)) * 2.0**-40
    for parts in ((m0, r), (m0, None), (None, r), (m0.T.copy().T, r.T.copy().T)):
        got = radius._scaled(*parts)
        assert got is not None
        f, shift = got
        exact = _exact(*parts)
        for i in range(20):
            for j in range(30):
                want = exact[i][j] * Fraction(2) ** shift
                assert Fraction(float(f[i, j])) >= want, (parts[0] is None, i, j)
                assert (f[i, j] == 0) == (want == 0)


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("span", [2, 40, 300])
def test_upper_matmul_bounds_the_exact_product(span: int, order: str, monkeypatch) -> None:  # noqa: ANN001
    """Also on column-major operands (transposed views: the kernel walks them transposed)."""
    monkeypatch.setattr(radius, "MIN_MACS", 0)
    rng = np.random.default_rng(span + 1)
    x0, xr = _wide(rng, (7, 64), span), np.abs(_wide(rng, (7, 64), span)) * 2.0**-30
    y0, yr = _wide(rng, (64, 5), span), np.abs(_wide(rng, (64, 5), span)) * 2.0**-30
    x0, xr, y0, yr = (np.asarray(v, order=order) for v in (x0, xr, y0, yr))
    acc = np.zeros((7, 5))
    for x, y in (((x0, xr), (None, yr)), ((None, xr), (y0, None)), ((x0, xr), (y0, yr))):
        got = radius.upper_matmul(*x, *y, acc)
        assert got is not None
        ex, ey = _exact(*x), _exact(*y)
        for i in range(7):
            for j in range(5):
                want = sum((ex[i][k] * ey[k][j] for k in range(64)), Fraction(0))
                assert Fraction(float(got[i, j])) >= want
                if want and span <= 40:  # useful: within 2**-12 (wider: floors)
                    assert Fraction(float(got[i, j])) <= want * (1 + Fraction(1, 2**12))


def test_float32_accumulation_losses_are_covered(monkeypatch) -> None:  # noqa: ANN001
    """A sum whose small terms each fall below half an ulp of the running float32 sum: the
    GEMM returns about the large term alone; the bound still covers all of them."""
    monkeypatch.setattr(radius, "MIN_MACS", 0)
    n = 4096
    xr = np.ones((1, n))
    yr = np.full((n, 1), 2.0**-26)
    yr[0, 0] = 1.0
    got = radius.upper_matmul(None, xr, None, yr, np.zeros((1, 1)))
    assert got is not None
    want = Fraction(1) + (n - 1) * Fraction(2) ** -26
    assert Fraction(float(got[0, 0])) >= want


def test_out_of_range_operands_fall_back(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(radius, "MIN_MACS", 0)
    ok, acc = np.ones((3, 3)), np.zeros((3, 3))
    assert radius.upper_matmul(None, ok, None, ok, acc) is not None
    for bad in (np.inf, np.nan, 2.0**600, 2.0**-600):
        assert radius.upper_matmul(None, np.full((3, 3), bad), None, ok, acc) is None
    assert radius.upper_matmul(np.full((3, 3), np.nan), ok, None, ok, acc) is None


def test_ball_products_with_radii_enclose_the_exact_product() -> None:
    """BallArith.matmul on balls with radii, through the float32 path: the exact product at
    the worst corner of the operand balls (every term pushed outward) lies within the result's
    radius of its midpoint, and the radius is not more than 2**-10 above that distance."""
    rng = np.random.default_rng(7)
    ar = BallArith(150)
    a, b = ar.asarray(rng.normal(size=(64, 128))), ar.asarray(rng.normal(size=(128, 160)))
    a.rad = np.abs(rng.normal(size=(64, 128))) * 2.0**-90
    b.rad = np.abs(rng.normal(size=(128, 160))) * 2.0**-90
    assert 64 * 128 * 160 >= radius.MIN_MACS  # the float32 path runs
    out = ar._matmul(a, b)

    def value(x: Any, *idx: int) -> Fraction:
        return sum((Fraction(float(w)) for w in x.mid[(slice(None), *idx)]), Fraction(0))

    for i, j in ((0, 0), (5, 17), (63, 159)):
        mid = value(out, i, j)
        exact = Fraction(0)
        for k in range(128):  # the corner that moves every term upward
            p, q = value(a, i, k), value(b, k, j)
            p2 = p + (1 if q >= 0 else -1) * Fraction(float(a.rad[i, k]))
            q2 = q + (1 if p >= 0 else -1) * Fraction(float(b.rad[k, j]))
            exact += p2 * q2
        rad = Fraction(float(out.rad[i, j]))
        assert abs(exact - mid) <= rad
        assert rad <= abs(exact - mid) * (1 + Fraction(1, 2**10)) + abs(mid) * Fraction(2) ** -130


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize(
    "shape", [(128, 256), (7, 3), (1, 4), (128, 1), (2, 5), (128, 2), (300, 3)]
)
def test_column_sums_give_the_floats_of_the_transposed_path(k: int, shape: tuple) -> None:
    """BallArith.sum over axis 0 of a C-contiguous ball (jit_ball.sum_rows) returns the words
    of the general path (jit_ball.sum_last on a transposed copy) and the radii of numpy's
    sums, bit for bit."""
    from fpgrad.arith import jit_ball
    from fpgrad.arith.ball import RU, Ball

    rng = np.random.default_rng(shape[0] * 10 + k)
    ar = BallArith(100 if k == 2 else 150)
    mid = rng.normal(size=(k, *shape)) * np.exp2(rng.integers(-30, 30, size=(k, *shape)))
    mid[1:] *= 2.0**-60
    rad = np.abs(rng.normal(size=shape)) * np.exp2(rng.integers(-110, -90, size=shape))
    got = ar.sum(Ball(mid, rad), 0)
    want = np.empty((k, shape[1]))
    words = np.ascontiguousarray(np.moveaxis(mid, 1, -1))
    jit_ball.sum_last((0.0,) * k, words, want)
    n, depth = shape[0], int(np.ceil(np.log2(shape[0])))
    mags = np.sum(np.abs(mid[0]), axis=0)
    grow = 1 + (n + 2) * 2.0**-52  # both float64 totals take their error factor (f3dd366)
    want_rad = (np.sum(rad, axis=0) * grow + depth * ar.eta * (mags * grow)) * RU
    assert np.array_equal(got.mid, want) and np.array_equal(got.rad, want_rad)
    kept = ar.sum(Ball(mid, rad), 0, keepdims=True)
    assert kept.mid.shape == (k, 1, shape[1]) and np.array_equal(kept.rad[0], got.rad)


def test_digit_summary_is_the_least_kept_digits() -> None:
    """ball_summary's least digits are those of the elements neither zero nor undetermined,
    as _summarise computed them from the arrays (zeros, NaN, radius 0, undetermined)."""
    from fpgrad.arith.ball import Ball
    from fpgrad.reference.digits import ball_flags
    from fpgrad.reference.exact import ball_summary

    rng = np.random.default_rng(3)
    m0 = rng.normal(size=(50, 40))
    rad = np.abs(m0) * np.exp2(-rng.uniform(0, 160, size=m0.shape))
    m0[0, :5], rad[0, :5] = 0.0, 0.0  # exact zeros
    rad[1, :5] = np.abs(m0[1, :5]) * 2  # undetermined
    rad[2, :3], m0[3, :3] = np.nan, np.nan
    rad[4, :5] = 0.0  # exact values: the cap
    ball = Ball(np.stack([m0, m0 * 2.0**-60]), rad)
    for cap in (45.0, 30.0, 0.0):
        d, z, u, r, low = ball_summary(ball, cap)
        kept = d[~(z | u)]
        assert low == float(kept.min()) == ball_flags(ball, cap)[4]
        assert np.array_equal(r, rad, equal_nan=True)
    only = Ball(np.zeros((2, 3)), np.zeros(3))  # nothing kept: the cap
    assert ball_summary(only, 45.0)[4] == 45.0
