"""Adversarial checks of the float32 radius bounds (fpgrad.arith.radius, attack 8).

Oracle: Python integers, every float64 scaled by ``2**S`` (``S = 1074 + 48``: the least
subnormal times ``HI_BOUND - 1`` is an integer there), so ``(|x0| HI_BOUND + xr) @ (|y0|
HI_BOUND + yr)`` is an exact integer times ``2**-2S`` and each returned float64 is compared
with it exactly. ``MIN_MACS`` is patched to 0 so that small shapes take the float32 path.
"""

from __future__ import annotations

import ctypes
import platform
import sys
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from fpgrad.arith import radius
from fpgrad.arith.ball import BallArith

S = 1074 + 48
HI = 2**48 + 1  # HI_BOUND * 2**48


def _ints(v: np.ndarray, *, hi: bool) -> np.ndarray:
    """Exact integers ``|v| 2**S`` (times ``HI_BOUND`` when ``hi``), an object array."""
    out = np.empty(v.shape, dtype=object)
    for idx, x in np.ndenumerate(v):
        num, den = abs(float(x)).as_integer_ratio()  # den a power of two <= 2**1074
        out[idx] = (num * HI * (2**S // den)) >> 48 if hi else num * (2**S // den)
    return out


def _exact(m0: np.ndarray | None, r: np.ndarray | None) -> np.ndarray:
    ref = r if r is not None else m0
    assert ref is not None
    out = np.zeros(ref.shape, dtype=object) + 0
    if m0 is not None:
        out = out + _ints(m0, hi=True)
    if r is not None:
        out = out + _ints(r, hi=False)
    return out


def _check(x: tuple[Any, Any], y: tuple[Any, Any], *, none_ok: bool = False) -> bool:
    """Assert upper_matmul(x, y) >= the exact product elementwise; False if it returned None."""
    ref = x[1] if x[1] is not None else x[0]
    acc = np.zeros((ref.shape[0], (y[1] if y[1] is not None else y[0]).shape[1]))
    got = radius.upper_matmul(*x, *y, acc)
    if got is None:
        assert none_ok, "unexpected fallback"
        return False
    want = np.dot(_exact(*x), _exact(*y))  # integers times 2**-2S
    for idx, w in np.ndenumerate(want):
        g = float(got[idx])
        assert not np.isnan(g)
        if g == np.inf:
            continue
        num, den = g.as_integer_ratio()
        assert num * (2 ** (2 * S) // den) >= w, (idx, g, float(Fraction(w, 2 ** (2 * S))))
    return True


@pytest.fixture(autouse=True)
def _small_products_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(radius, "MIN_MACS", 0)


def _just_above_f32(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Float64 values one float64 ulp above a float32: float32 rounding to nearest goes down
    by almost a full float32 ulp relative to them."""
    f = rng.uniform(1.0, 2.0, size=shape).astype(np.float32).astype(np.float64)
    return np.nextafter(f, np.inf) * np.exp2(rng.integers(-3, 3, size=shape))


def test_values_just_above_a_float32() -> None:
    rng = np.random.default_rng(1)
    x, y = _just_above_f32(rng, (6, 200)), _just_above_f32(rng, (200, 5))
    for parts in ((None, x), (x, None), (x, x * 2.0**-20)):  # each element rounds up
        got = radius._scaled(*parts)
        assert got is not None
        f, shift = got
        want = _exact(*parts) * 2**shift  # shift < S: still integers
        for idx, w in np.ndenumerate(want):
            num, den = float(f[idx]).as_integer_ratio()
            assert num * (2**S // den) >= w, idx
    assert _check((None, x), (None, y))
    assert _check((x, None), (None, y))
    assert _check((x, x * 2.0**-20), (y, None))
    # values just below 2**e times (1 + 2**-22): the upward factor pushes them past a binade
    z = np.full((4, 64), np.nextafter(1.0, 0.0))
    assert _check((None, z), (None, z.T.copy()))


def test_huge_dynamic_range_in_a_row_and_column() -> None:
    x = np.full((3, 50), 2.0**-1000)
    x[:, 7] = 2.0**300
    x[1, :] = 2.0**-1074
    y = np.full((50, 4), 2.0**300)
    y[::3, :] = 2.0**-1000
    y[7, 2] = 0.0
    assert _check((None, x), (None, y))
    assert _check((x, x * 2.0**-60), (None, y))
    assert _check((None, x), (-y, None))


def test_subnormal_inputs() -> None:
    sub = np.full((5, 40), 5e-324)
    sub[:, ::2] = 2.0**-1030
    big = np.ones((40, 3))
    mixed = sub.copy()
    mixed[2, 5] = 1.0  # sets the shift: the subnormals go to the float32 floor
    assert _check((None, mixed), (None, big))
    assert _check((mixed, None), (None, mixed.T.copy()))
    sub2 = sub.copy()
    sub2[0, 0] = 2.0**-350  # max within the shift cut: tiny ones go to the float32 floor
    assert _check((None, sub2), (None, sub2.T.copy()))
    assert _check((-sub2, sub2), (None, sub2.T.copy()))
    # all subnormal: shift > 400, the caller falls back
    assert not _check((None, sub), (None, big), none_ok=True)


def test_zeros_and_negative_zeros() -> None:
    z = np.zeros((4, 30))
    nz = -z
    one = np.ones((30, 2))
    assert _check((None, z), (None, one))
    assert _check((nz, z), (None, one))
    assert _check((nz, None), (one, None))
    part = np.ones((4, 30))
    part[1] = 0.0
    part[:, 3] = -0.0
    assert _check((part, None), (None, one))


@pytest.mark.parametrize("e", [-361, -360, 438, 439, 440])
def test_the_shift_cut(e: int) -> None:
    """Largest elements around the cut of 400: within it, the bound holds for both operands
    at the extreme shift; beyond it, None."""
    x = np.full((3, 20), 2.0**e * 1.75)
    x[0, :5] = 5e-324
    x[1, 3] = 0.0
    got = _check((None, x), (None, x.T.copy()), none_ok=True)
    shift = radius.TOP - (e + 1)
    assert got == (abs(shift) <= radius.MAX_SHIFT)
    _check((x, x), (x.T.copy(), None), none_ok=True)  # either way: no wrong bound


def test_near_float64_max_falls_back() -> None:
    x = np.full((2, 10), np.finfo(np.float64).max)
    assert not _check((None, x), (None, x.T.copy()), none_ok=True)
    assert not _check((x, None), (None, np.ones((10, 2))), none_ok=True)


def test_all_equal_columns() -> None:
    rng = np.random.default_rng(3)
    col = _just_above_f32(rng, (300, 1))
    y = np.repeat(col, 4, axis=1)
    x = np.repeat(col.T, 3, axis=0)
    assert _check((None, x), (None, y))
    assert _check((x, x), (y, None))


@pytest.mark.parametrize("layout", ["F", "T", "strided", "reversed", "broadcast", "mixed"])
def test_layouts(layout: str) -> None:
    rng = np.random.default_rng(4)
    base_x, base_y = _just_above_f32(rng, (6, 80)), _just_above_f32(rng, (80, 7))
    m0 = -rng.normal(size=(6, 80)) * 2.0**20
    if layout == "F":
        x, y, m = (np.asfortranarray(v) for v in (base_x, base_y, m0))
    elif layout == "T":
        x, y, m = base_x.T.copy().T, base_y.T.copy().T, m0.T.copy().T
    elif layout == "strided":
        x = np.repeat(base_x, 2, axis=1)[:, ::2]
        y = np.repeat(base_y, 2, axis=0)[::2]
        m = np.repeat(m0, 2, axis=1)[:, ::2]
    elif layout == "reversed":
        x, y, m = base_x[::-1, ::-1], base_y[::-1], m0[:, ::-1]
    elif layout == "broadcast":
        x = np.broadcast_to(base_x[:1], (6, 80))
        y = np.broadcast_to(base_y[:, :1], (80, 7))
        m = np.broadcast_to(m0[:, :1], (6, 80))
    else:  # midpoint C-order, radius F-order (the layout test looks at the radius only)
        x, y, m = np.asfortranarray(base_x), base_y, m0
    assert _check((None, x), (None, y))
    assert _check((m, x), (None, y))
    assert _check((None, x), (-y, None))
    assert _check((m, None), (None, y))


@pytest.mark.parametrize("shape", [(1, 300, 1), (1, 300, 9), (9, 300, 1), (1, 1, 1), (5, 1, 7)])
def test_vector_shapes(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    rows, n, cols = shape
    x, y = _just_above_f32(rng, (rows, n)), _just_above_f32(rng, (n, cols))
    assert _check((None, x), (None, y))
    assert _check((x, x), (y, None))
    assert _check((np.asfortranarray(x), None), (None, np.asfortranarray(y)))


def test_inner_dimension_at_the_cut() -> None:
    """n = 2**20 takes the float32 path (float32 sums far above 2**24 lose their small
    terms); n = 2**20 + 1 falls back. Checked with integers of the uniform values."""
    n = 2**20
    v = np.nextafter(np.float64(np.float32(1.0 + 2.0**-23)), np.inf)  # rounds down to float32
    x = np.full((1, n), v)
    x[0, 0] = 2.0**30
    y = np.full((n, 1), v)
    acc = np.zeros((1, 1))
    got = radius.upper_matmul(None, x, None, y, acc)
    assert got is not None
    want = Fraction(2.0**30) * Fraction(v) + (n - 1) * Fraction(v) ** 2
    assert Fraction(float(got[0, 0])) >= want
    xx = np.full((1, n + 1), v)
    assert radius.upper_matmul(None, xx, None, np.full((n + 1, 1), v), acc) is None


def test_seeded_property() -> None:
    """Random shapes, layouts, exponent spans (up to the shift cut) and parts: always >= exact."""
    rng = np.random.default_rng(20261207)
    fell_back = 0
    for _ in range(40):
        rows, n, cols = (int(v) for v in rng.integers(1, 24, size=3))
        span = int(rng.choice([1, 30, 200, 600]))

        def gen(shape: tuple[int, int], span: int = span) -> np.ndarray:
            v = rng.uniform(0.5, 1.0, size=shape) * np.exp2(rng.integers(-span, span, size=shape))
            v[rng.random(shape) < 0.1] = 0.0
            if span < 100 and rng.random() < 0.5:
                v = np.nextafter(v.astype(np.float32).astype(np.float64), np.inf)
            return np.asfortranarray(v) if rng.random() < 0.3 else v

        x0 = gen((rows, n)) * rng.choice([-1.0, 1.0], size=(rows, n))
        xr, y0, yr = gen((rows, n)), gen((n, cols)), gen((n, cols))
        parts = [((x0, xr), (None, yr)), ((None, xr), (y0, None)), ((x0, None), (None, yr))]
        for x, y in parts:
            fell_back += not _check(x, y, none_ok=True)
    assert fell_back < 60  # most cases run the float32 path


@pytest.mark.parametrize("case", ["both", "a_only", "b_only", "transposed"])
def test_ball_matmul_encloses_on_extreme_inputs(case: str) -> None:
    """End to end: |exact(mid a @ mid b) - mid| + |a| rb + ra |b| + ra rb <= rad, exactly,
    on midpoints spanning the guard's range and radii just above float32 values (subnormal
    ones too); ``transposed`` passes column-major views (the flipped product)."""
    rng = np.random.default_rng(8)
    ar = BallArith(150)
    m, n, p = 16, 256, 16  # 2**16 multiply-adds: MIN_MACS is patched to 0
    am = rng.normal(size=(m, n)) * np.exp2(rng.integers(-300, 300, size=(m, n)))
    bm = rng.normal(size=(n, p)) * np.exp2(rng.integers(-300, 300, size=(n, p)))
    am[0, :] = 2.0**-790
    bm[:, 0] = 2.0**700
    arad = _just_above_f32(rng, (m, n)) * np.abs(am) * 2.0**-40
    brad = _just_above_f32(rng, (n, p)) * 2.0**-100
    brad[:, 3] = 5e-324
    if case == "transposed":
        at, bt = ar.asarray(am.T.copy()), ar.asarray(bm.T.copy())
        at.rad, bt.rad = arad.T.copy(), brad.T.copy()
        a, b = at.T, bt.T
    else:
        a, b = ar.asarray(am), ar.asarray(bm)
        a.rad = arad if case != "b_only" else np.zeros((m, n))
        b.rad = brad if case != "a_only" else np.zeros((n, p))
    out = ar._matmul(a, b)

    def fr(v: float) -> Fraction:
        return Fraction(float(v))

    for i, j in ((0, 0), (0, 3), (5, 0), (7, 3), (15, 15), (3, 9)):
        mid = sum((fr(w) for w in out.mid[:, i, j]), Fraction(0))
        exact, spread = Fraction(0), Fraction(0)
        for k in range(n):
            pa = sum((fr(w) for w in a.mid[:, i, k]), Fraction(0))
            pb = sum((fr(w) for w in b.mid[:, k, j]), Fraction(0))
            ra, rb = fr(a.rad[i, k]), fr(b.rad[k, j])
            exact += pa * pb
            spread += abs(pa) * rb + ra * abs(pb) + ra * rb
        assert abs(exact - mid) + spread <= fr(out.rad[i, j]), (i, j)


def _set_ftz_daz(libm: Any, env: Any, on: bool) -> None:
    """Set (or clear) FTZ and DAZ in the MXCSR word of a glibc x86-64 fenv_t (offset 28)."""
    raw = bytearray(bytes(env))
    mx = int.from_bytes(raw[28:32], "little")
    raw[28:32] = ((mx | 0x8040) if on else (mx & ~0x8040)).to_bytes(4, "little")
    assert libm.fesetenv((ctypes.c_ubyte * 32).from_buffer_copy(bytes(raw))) == 0


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="x86 MXCSR")
def test_bounds_hold_with_flush_to_zero_and_denormals_are_zero() -> None:
    """A library built with -ffast-math may set FTZ/DAZ process-wide: then _up32 reads a
    subnormal float64 as 0 and writes 0 (not >= it, unlike step 2 of the module's proof); the
    ``2 n eta`` term must still cover it (a subnormal is below eta after any allowed shift)."""
    libm = ctypes.CDLL("libm.so.6")
    env = (ctypes.c_ubyte * 32)()
    assert libm.fegetenv(env) == 0
    x = np.ones((3, 40))
    x[0] = 5e-324
    x[1, ::2] = 2.0**-1030
    tiny = np.full((3, 40), 5e-324)  # all subnormal: top reads as 0 under DAZ, shift 0
    y = np.ones((40, 2))
    _set_ftz_daz(libm, env, True)
    try:
        daz = bool(np.array([5e-324])[0] == 0.0)
        results = [radius.upper_matmul(None, v, None, y, np.zeros((3, 2))) for v in (x, tiny)]
        results.append(radius.upper_matmul(x, None, None, y, np.zeros((3, 2))))
    finally:
        assert libm.fesetenv(env) == 0
    assert daz  # the mode was really on
    for v, got, hi in zip((x, tiny, x), results, (False, False, True), strict=True):
        assert got is not None
        want = np.dot(_exact(v if hi else None, None if hi else v), _exact(None, y))
        for idx, w in np.ndenumerate(want):
            num, den = float(got[idx]).as_integer_ratio()
            assert num * (2 ** (2 * S) // den) >= w, idx


@pytest.mark.parametrize("macs", ["small", "shift"])
def test_ball_matmul_radius_products_underflow(macs: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zero midpoints with radii 2**-600: the product ball holds +-n 2**-1200, not only 0.
    ``small``: below MIN_MACS (the real one); ``shift``: radii beyond the float32 shift cut."""
    if macs == "small":
        monkeypatch.setattr(radius, "MIN_MACS", 2**20)
    ar = BallArith(150)
    a, b = ar.asarray(np.zeros((2, 3))), ar.asarray(np.zeros((3, 2)))
    a.rad, b.rad = np.full((2, 3), 2.0**-600), np.full((3, 2), 2.0**-600)
    out = ar._matmul(a, b)
    assert ar.range_errors == 0  # nothing reports it
    assert Fraction(float(out.rad[0, 0])) >= 3 * Fraction(2) ** -1200


def test_elementwise_mul_and_div_radii_do_not_underflow_to_zero() -> None:
    """Zero midpoints with radii 2**-600 (the product holds +-2**-1200, not only 0) and a
    quotient whose q0 HI rb term falls below 2**-1074: the radius must stay positive."""
    ar = BallArith(150)
    a, b = ar.asarray(np.zeros(3)), ar.asarray(np.zeros(3))
    a.rad, b.rad = np.full(3, 2.0**-600), np.full(3, 2.0**-600)
    out = ar.mul(a, b)
    assert ar.range_errors == 0 and (out.rad > 0).all()
    for x, y in ((a, b), (b, a)):  # one exact factor 2**-600 times a radius 2**-600
        exact = ar.asarray(np.full(3, 2.0**-600))
        assert (ar.mul(exact, y).rad > 0).all() and (ar.mul(x, exact).rad > 0).all()
    # q = 2**-700 / 1 with the divisor's radius 2**-500: q0 rb = 2**-1200 (rounds to 0)
    num, den = ar.asarray(np.full(3, 2.0**-700)), ar.asarray(np.ones(3))
    den.rad = np.full(3, 2.0**-500)
    q = ar.div(num, den)
    assert Fraction(float(q.rad[0])) >= Fraction(2) ** -1200
