"""Adversarial checks of fpgrad.arith.arb_slices (Arb products through exact float64 slices).

Every returned ball must contain the exact range of its entry over all matrices in the input
balls; the oracle is exact rational interval arithmetic (fractions.Fraction), independent of
FLINT. Declining (None) is always allowed.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
from flint import acb, arb, arb_mat, arf, ctx

from fpgrad.arith import arb_slices as S
from tests.arb_exact import ball as _ball
from tests.arb_exact import engine as _engine
from tests.arb_exact import obj as _obj
from tests.arb_exact import q as _q
from tests.arb_exact import r as _r

pytestmark = pytest.mark.skipif(S._jit() is None, reason="no compiled Arb slice kernels")

F = Fraction
PRECS = (64, 128, 129, 200, 467, 700, 1023, 1024, 1200, 2000)


def _bad_entries(got: np.ndarray | None, a: np.ndarray, b: np.ndarray) -> list[tuple]:
    """The entries whose ball misses part of the exact range of (A' B')_ij over the balls
    (the sum of the exact interval products of the terms)."""
    if got is None:
        return []
    m, n = a.shape
    p = b.shape[1]
    assert got.shape == (m, p)

    def iv(x: arb) -> tuple[Fraction, Fraction]:
        c, r = _q(x), _r(x)
        return c - r, c + r

    ia = [[iv(a[i, k]) for k in range(n)] for i in range(m)]
    ib = [[iv(b[k, j]) for j in range(p)] for k in range(n)]
    bad = []
    for i in range(m):
        for j in range(p):
            lo = hi = F(0)
            for k in range(n):
                (al, ah), (bl, bh) = ia[i][k], ib[k][j]
                if al == ah and bl == bh:
                    v = al * bl
                    lo += v
                    hi += v
                else:
                    ps = (al * bl, al * bh, ah * bl, ah * bh)
                    lo += min(ps)
                    hi += max(ps)
            c, r = _q(got[i, j]), _r(got[i, j])
            if not (c - r <= lo and hi <= c + r):
                bad.append((i, j, got[i, j], float(lo), float(hi), float(r)))
    return bad


def _assert_encloses(a: np.ndarray, b: np.ndarray, prec: int, tag: str = "") -> np.ndarray | None:
    got = _engine(a, b, prec)
    bad = _bad_entries(got, a, b)
    assert not bad, (tag, prec, a.shape, b.shape, bad[:3])
    return got


def _lg(x: Fraction) -> float:
    return x.numerator.bit_length() - x.denominator.bit_length()


# ---------------------------------------------------------------- random operands


def _rnd_mid(rng: random.Random, bits: int, e: int) -> Fraction:
    man = rng.getrandbits(bits) | (1 << (bits - 1))
    if rng.random() < 0.3:
        man |= 1
    return (-1 if rng.random() < 0.5 else 1) * F(man) * F(2) ** (e - bits)


def _rnd_ball(rng: random.Random, prec: int, spread: int, radii: bool) -> arb:
    kind = rng.random()
    e = rng.randint(-spread, spread)
    if kind < 0.12:
        mid = F(0)
    elif kind < 0.25:
        mid = F(rng.randint(-300, 300))
    else:
        bits = rng.choice([1, 2, 3, 53, 64, 65, 128, 129, prec, prec + 1, 2 * prec, 576, 640])
        mid = _rnd_mid(rng, bits, e)
    rad = F(0)
    if radii and rng.random() < 0.7:
        base = e if mid == 0 else _lg(abs(mid))
        u = rng.random()
        if u < 0.3:
            re = base - prec + rng.randint(-20, 20)
        elif u < 0.5:
            re = base + rng.randint(-5, 5)  # wider than the midpoint
        elif u < 0.7:
            re = base - rng.randint(0, 3000)
        else:
            re = base - prec - rng.randint(1000, 1300)
        rad = F(rng.getrandbits(30) | (1 << 29)) * F(2) ** (re - 30)
    return _ball(mid, rad)


def _rnd_mat(rng: random.Random, shape: tuple[int, int], prec: int, spread: int, radii: bool):
    out = np.empty(shape, dtype=object)
    for idx in np.ndindex(shape):
        out[idx] = _rnd_ball(rng, prec, spread, radii)
    return out


def _tiny_rad(rng: random.Random) -> arb:
    return _ball(0, F(rng.getrandbits(30) | 1 << 29) * F(2) ** rng.randint(-1500, -100))


@pytest.mark.parametrize("seed", range(8))
def test_random_enclosures(seed: int) -> None:
    rng = random.Random(1000 + seed)
    for case in range(250):
        prec = rng.choice(PRECS)
        if rng.random() < 0.85:
            m, n, p = rng.randint(1, 4), rng.randint(1, 8), rng.randint(1, 4)
        else:
            m, n, p = rng.randint(1, 2), rng.choice([30, 100]), rng.randint(1, 2)
        spread = rng.choice([0, 4, 60, 300, 1100, 1500])
        radii = rng.random() < 0.6
        a = _rnd_mat(rng, (m, n), prec, spread, radii and rng.random() < 0.7)
        b = _rnd_mat(rng, (n, p), prec, spread, radii and rng.random() < 0.7)
        u = rng.random()
        if u < 0.15 and n > 1:  # cancellation: a[i, -1] = -a[i, 0], b[-1] = b[0]
            for i in range(m):
                a[i, -1] = -a[i, 0]
            for j in range(p):
                b[-1, j] = b[0, j]
        elif u < 0.3:  # zero-midpoint products with tiny radii next to cut terms
            for k in range(n):
                if rng.random() < 0.5:
                    b[k, 0] = _tiny_rad(rng)
                else:
                    for i in range(m):
                        a[i, k] = _tiny_rad(rng)
        elif u < 0.4:
            a = np.ascontiguousarray(a.T).T  # a non-contiguous view
        elif u < 0.5:
            for i in range(m):  # one object in several places
                a[i, rng.randrange(n)] = a[0, 0]
        _assert_encloses(a, b, prec, f"seed {seed} case {case}")


def test_same_array_both_operands() -> None:
    rng = random.Random(5)
    for prec in (128, 467, 1200):
        a = _rnd_mat(rng, (4, 4), prec, 60, True)
        _assert_encloses(a, a, prec)
        _assert_encloses(a.T, a, prec)
        _assert_encloses(a, a.T, prec)


# ---------------------------------------------------------------- targeted inputs


@pytest.mark.parametrize("prec", [128, 467, 1200])
def test_zero_midpoint_products_with_tiny_radii(prec: int) -> None:
    """A cut midpoint (its error bound sets the largest exponent of the radius terms) next to
    a zero-midpoint ball whose radius term lies ~2**-1074 below it: the only radius of the
    entry. Rounding that term to nearest in float64's subnormals lost up to a third of it
    (a = [[1 + 2**-300, 0 +- 5 2**-1229]], b = [[0], [1]] at 128 bits gave 0 +- 2**-1227)."""
    x = 1 + F(1, 2 ** (prec + 100))
    for e in range(-(prec + 1140), -(prec + 1000)):
        for frac in (F(5, 8), F(3, 4), F(2**29 + 7, 2**30)):
            a = _obj([[_ball(x), _ball(0, frac * F(2) ** e)]])
            b = _obj([[_ball(0)], [_ball(1 - F(1, 2**50))]])
            got = _engine(a, b, prec)
            assert not _bad_entries(got, a, b), (prec, e, frac, got)


@pytest.mark.parametrize("prec", [128, 200, 467, 1024, 1200])
def test_exponent_spread_in_rows_and_columns(prec: int) -> None:
    big, tiny = F(2) ** 300, F(2) ** -300
    rows = [
        [_ball(big), _ball(1), _ball(tiny * 3)],
        [_ball(-tiny), _ball(big + 1), _ball(0)],
        [_ball(1 + tiny), _ball(-1), _ball(big, F(2) ** 200)],
    ]
    a = _obj(rows)
    b = _obj([[_ball(0), _ball(tiny)], [_ball(1), _ball(-big)], [_ball(big), _ball(1, tiny)]])
    _assert_encloses(a, b, prec)
    _assert_encloses(b.T, a.T, prec)


@pytest.mark.parametrize("prec", [128, 467, 1200])
def test_exact_cancellation_and_zero_rows(prec: int) -> None:
    odd = F(2 ** (prec + 7) - 1, 2 ** (prec + 7))  # more bits than prec
    a = _obj([[_ball(odd), _ball(-odd), _ball(0)], [_ball(0), _ball(0), _ball(0)]])
    b = _obj([[_ball(odd)], [_ball(odd)], [_ball(5)]])
    got = _assert_encloses(a, b, prec)
    if got is not None:
        assert _q(got[1, 0]) == 0 and _r(got[1, 0]) == 0  # an exact zero row stays exact


@pytest.mark.parametrize("prec", [64, 128, 467, 1200, 2000])
def test_radius_shapes(prec: int) -> None:
    """Zero midpoints with radii, radii wider than their midpoints, radii 2**-1500 relative,
    and the same matrices with every radius 0."""
    third = F((2 ** (prec + 60)) // 3, 2 ** (prec + 60))
    a = _obj(
        [
            [_ball(0, 1), _ball(third, 4), _ball(-third, third * F(2) ** -1500)],
            [_ball(third, F(2) ** -(prec + 3)), _ball(0, F(2) ** -2000), _ball(7)],
        ]
    )
    b = _obj([[_ball(-third, 1)], [_ball(0, 3)], [_ball(third, F(2) ** -1400)]])
    _assert_encloses(a, b, prec)
    a0 = np.vectorize(lambda x: arb(x.mid()), otypes=[object])(a)
    b0 = np.vectorize(lambda x: arb(x.mid()), otypes=[object])(b)
    _assert_encloses(a0, b0, prec)
    _assert_encloses(a0, b, prec)
    _assert_encloses(a, b0, prec)


@pytest.mark.parametrize("limbs", [1, 2, 3, 9])
def test_long_midpoints_at_lower_precision(limbs: int) -> None:
    rng = random.Random(limbs)
    for prec in (64, 128, 200, 467):
        vals = [_rnd_mid(rng, 64 * limbs, rng.randint(-3, 3)) for _ in range(12)]
        a = _obj([vals[0:3], vals[3:6]])
        b = _obj([[vals[6], vals[7]], [vals[8], vals[9]], [vals[10], vals[11]]])
        a = np.vectorize(_ball, otypes=[object])(a)
        b = np.vectorize(_ball, otypes=[object])(b)
        _assert_encloses(a, b, prec)
        sparse = F(2 ** (64 * limbs - 1) + 1, 2 ** (64 * limbs))  # lowest set bit far below top
        _assert_encloses(_obj([[_ball(sparse), _ball(-sparse)]]), b[:2], prec)


def test_exponents_beyond_float64() -> None:
    for e in (-5000, -1100, 1100, 5000):
        a = _obj([[_ball(3 * F(2) ** e, F(2) ** (e - 30)), _ball(F(2) ** -e)]])
        b = _obj([[_ball(5 * F(2) ** e)], [_ball(-7 * F(2) ** e, F(2) ** (e - 200))]])
        for prec in (128, 1200):
            _assert_encloses(a, b, prec)
            _assert_encloses(b, a, prec)


def _certainly_holds(got: arb, x: arb, y: int) -> bool:
    """Does ``got`` contain x' y for every x' in x (y exact)? Checked in ball arithmetic
    (exponents too large for rationals): ``|mid(got) - y mid(x)| + |y| rad(x) <= rad(got)``
    where it holds for every point of the balls that enclose both sides."""
    slack = arb(got.rad()) - abs(arb(got.mid()) - arb(x.mid()) * y) - arb(x.rad()) * abs(y)
    return bool(slack >= 0)


def test_huge_exponents_decline_or_enclose() -> None:
    e = 2**39  # read as small fmpz; the oracle compares against FLINT's exact product
    a = _obj([[arb(arf((1, e)))]])
    b = _obj([[arb(arf((3, e)))]])
    got = _engine(a, b, 200)
    if got is not None:
        assert got[0, 0].contains(arb(arf((3, 2 * e))))
    old = ctx.prec
    ctx.prec = 200
    try:
        for big in (2**40 - 2, 2**40, 2**41, 2**62, 2**70):
            for x in (
                arb(arf((1, big))),
                arb(arf((-3, -big))),
                arb(arf(1), arf((1, big))),
                arb(arf(1), arf((1, -big))),
                arb(arf((1, -big)), arf((1, 2 - big))),
            ):
                for got in (
                    _engine(_obj([[x]]), _obj([[arb(5)]]), 200),
                    _engine(_obj([[arb(5)]]), _obj([[x]]), 200),
                ):
                    assert got is None or _certainly_holds(got[0, 0], x, 5), (big, x, got)
    finally:
        ctx.prec = old


def test_non_finite_balls_decline() -> None:
    one = _obj([[arb(1), arb(2)]])
    for x in (arb("nan"), arb("inf"), arb("-inf"), arb(1, "inf"), arb(0, "inf")):
        assert _engine(_obj([[x], [arb(1)]]), one, 200) is None
        assert _engine(one.T, _obj([[x, arb(1)]]), 200) is None
        assert S.matmul(_obj([[x], [arb(1)]]), one, 467) is None


def test_elements_that_are_not_balls() -> None:
    class Sub(arb):
        pass

    one = _obj([[arb(1)]])
    for x in (1, 1.5, acb(1), Sub(1), None):
        assert _engine(_obj([[x]]), one, 200) is None
    with pytest.raises(TypeError):
        _engine(np.ones((1, 1)), one, 200)


def test_shape_mismatch_is_refused_without_corruption() -> None:
    """Operands whose shapes do not match: a TypeError/ValueError or None, never a product
    read past b's elements (run apart: a bad read corrupts the heap)."""
    code = textwrap.dedent(
        """
        import numpy as np
        from flint import arb
        from fpgrad.arith import arb_slices as S
        assert S._jit() is not None
        out = []
        for sa, sb in [((2, 3), (2, 3)), ((2, 2), (4, 1)), ((1, 4), (2, 2)), ((1, 2), (1, 1)),
                       ((3, 2), (5, 2))]:
            a = np.empty(sa, dtype=object); a[...] = arb(1)
            b = np.empty(sb, dtype=object); b[...] = arb(1)
            try:
                got = S.matmul(a, b, 200)
                out.append(f"{sa}{sb}:" + ("None" if got is None else "RESULT"))
            except (TypeError, ValueError):
                out.append(f"{sa}{sb}:refused")
            import gc; gc.collect()
            junk = [arb(i) * 3 for i in range(20000)]
        print("|".join(out))
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "RESULT" not in run.stdout, run.stdout


def test_precision_extremes() -> None:
    a = _obj([[_ball(1 + F(1, 2**2500), F(1, 2**3000)), _ball(-F(5, 8))]])
    b = _obj([[_ball(3 + F(1, 2**2500))], [_ball(F(2**2400 + 1, 2**2400))]])
    for prec in (2, 8, 32, 64, 2000, 3000):
        _assert_encloses(a, b, prec)


# ---------------------------------------------------------------- inner dimensions


def _boundary_ns(prec: int) -> list[int]:
    """Inner dimensions on both sides of each change of the slice width."""
    out = {1, 2, 3}
    last = None
    for n in [*range(1, 130), 255, 256, 257, 511, 512, 513, 1999, 2000, 4095, 4096, 8191, 8192]:
        pl = S.plan(n, prec, prec + 100, prec + 100)
        if pl is None:
            continue
        if last is not None and pl[0] != last:
            out.update((n - 1, n))
        last = pl[0]
    return sorted(out)


@pytest.mark.parametrize("prec", [64, 128, 467, 1200, 2000])
def test_full_slices_at_the_exactness_limit(prec: int) -> None:
    """Every slice at its largest magnitude (all bits set, one sign): the BLAS sums reach
    n min(Ta, Tb) (2**beta - 1)**2, just below 2**53 at the widths' boundaries."""
    w = prec + 40
    ones = F(2**w - 1, 2**w)
    for n in _boundary_ns(prec) + [10000]:
        a = np.empty((1, n), dtype=object)
        b = np.empty((n, 2), dtype=object)
        a[...] = _ball(ones)
        b[:, 0] = _ball(-ones)
        b[:, 1] = _ball(ones * (1 - F(1, 2**w)))
        got = _engine(a, b, prec)
        if got is None:
            continue
        for j, want in enumerate((-n * ones * ones, n * ones * ones * (1 - F(1, 2**w)))):
            assert abs(_q(got[0, j]) - want) <= _r(got[0, j]), (prec, n, j, got[0, j])


def test_long_inner_dimensions_random() -> None:
    rng = random.Random(77)
    for prec, n in ((128, 500), (467, 2000), (1200, 500), (200, 10000)):
        a = np.empty((1, n), dtype=object)
        b = np.empty((n, 2), dtype=object)
        for k in range(n):
            a[0, k] = _ball(_rnd_mid(rng, 64, rng.randint(-8, 8)), F(rng.randint(0, 3), 2**100))
            b[k, 0] = _ball(rng.randint(0, 255))  # pixel data
            b[k, 1] = _ball(_rnd_mid(rng, prec, rng.randint(-8, 8)))
        _assert_encloses(a, b, prec)


# ---------------------------------------------------------------- exact results and quality


@pytest.mark.parametrize("prec", [128, 467, 1200])
def test_exact_operands_give_exact_midpoints(prec: int) -> None:
    """Short exact operands (two slices each, no cut, no diagonal droppable): the exact product
    with radius 0."""
    rng = random.Random(prec)
    a = np.empty((3, 5), dtype=object)
    b = np.empty((5, 4), dtype=object)
    for idx in np.ndindex(a.shape):
        a[idx] = _ball(rng.randint(-(2**40), 2**40))
    for idx in np.ndindex(b.shape):
        b[idx] = _ball(F(rng.randint(-(2**40), 2**40), 2**20))
    got = _engine(a, b, prec)
    assert got is not None
    for i in range(3):
        for j in range(4):
            want = sum(_q(a[i, k]) * _q(b[k, j]) for k in range(5))
            assert _q(got[i, j]) == want and _r(got[i, j]) == 0, (i, j, got[i, j])


@pytest.mark.parametrize("prec", [128, 467, 1200])
def test_radii_close_to_flint_on_ordinary_balls(prec: int) -> None:
    """Full-precision balls of one exponent range, with and without radii, and pixel data:
    within 4 bits of FLINT's own arb_mat product."""
    rng = np.random.default_rng(prec)
    old = ctx.prec
    ctx.prec = prec
    try:
        a = np.empty((3, 40), dtype=object)
        b = np.empty((40, 3), dtype=object)
        px = np.empty((40, 3), dtype=object)
        for idx in np.ndindex(a.shape):
            a[idx] = arb(float(rng.standard_normal())) / 7
        for idx in np.ndindex(b.shape):
            b[idx] = arb(float(rng.standard_normal())) / 11 + arb(0, 2.0 ** -(prec // 3))
            px[idx] = arb(int(rng.integers(0, 256)))
        for x, y in ((a, b), (a, px), (b.T, a.T)):
            got = _assert_encloses(x, y, prec)
            assert got is not None
            ref = arb_mat(x.tolist()) * arb_mat(y.tolist())
            for i in range(got.shape[0]):
                for j in range(got.shape[1]):
                    assert _lg(_r(got[i, j])) <= _lg(_r(ref[i, j])) + 4, (i, j)
    finally:
        ctx.prec = old
