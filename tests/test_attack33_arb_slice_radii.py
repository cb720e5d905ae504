"""Adversarial checks of the radius bounds of fpgrad.arith.arb_slices (after attack32's rewrite).

Targets the per-row (A) and per-column (B) radius scales of ``jit_arb_slices.prepare`` (``kgrp``,
``rho`` floored at 2**-1022), the |mid| ratios of ``cut`` (``alpha`` floored at 2**-1000), the
radius products through ``ball._nonneg_matmul`` (subnormal underflow) and ``_errors``
(per-element exponents, terms shifted into the subnormals). Oracle: exact rational interval
arithmetic: the exact range of ``(A' B')_ij`` over the balls lies in ``c +- w`` with ``c = sum
mid_a mid_b`` and ``w = sum |mid_a| rad_b + rad_a |mid_b| + rad_a rad_b`` (its upper end is
attained; the check asks for all of ``c +- w``, which a sound ball of this engine, bounding
exactly these terms, holds). Declining (None) is allowed.
"""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
from flint import arb

from fpgrad.arith import arb_slices as S
from tests.arb_exact import ball as _ball
from tests.arb_exact import engine as _engine
from tests.arb_exact import flint_product as _flint
from tests.arb_exact import obj as _obj
from tests.arb_exact import q as _q
from tests.arb_exact import r as _r

pytestmark = pytest.mark.skipif(S._jit() is None, reason="no compiled Arb slice kernels")

F = Fraction
PRECS = (128, 467, 1000, 1200, 3000)


def _lg(x: Fraction) -> int:
    """floor(log2 x) within one (x > 0); a very low number for 0."""
    if x == 0:
        return -(10**9)
    return x.numerator.bit_length() - x.denominator.bit_length()


def _bad(got: np.ndarray | None, a: np.ndarray, b: np.ndarray) -> list[tuple]:
    """Entries whose ball misses part of the exact range (worst-case corners per entry)."""
    if got is None:
        return []
    m, n = a.shape
    p = b.shape[1]
    assert got.shape == (m, p)
    qa = [[(_q(a[i, k]), _r(a[i, k])) for k in range(n)] for i in range(m)]
    qb = [[(_q(b[k, j]), _r(b[k, j])) for j in range(p)] for k in range(n)]
    out = []
    for i in range(m):
        for j in range(p):
            c = w = F(0)
            for k in range(n):
                (ma, ra), (mb, rb) = qa[i][k], qb[k][j]
                c += ma * mb
                w += abs(ma) * rb + ra * abs(mb) + ra * rb
            gc, gr = _q(got[i, j]), _r(got[i, j])
            if not (gc - gr <= c - w and c + w <= gc + gr):
                out.append((i, j, got[i, j], float(c), _lg(w), _lg(gr)))
    return out


def _check(a: np.ndarray, b: np.ndarray, prec: int, tag: object = "") -> np.ndarray | None:
    got = _engine(a, b, prec)
    bad = _bad(got, a, b)
    assert not bad, (tag, prec, a.shape, b.shape, bad[:2])
    return got


def _rad(rng: random.Random, e: int) -> Fraction:
    """A radius just below 2**e with a random 30-bit mantissa (exact as a mag)."""
    return F(rng.getrandbits(30) | (1 << 29)) * F(2) ** (e - 30)


def _mid(rng: random.Random, e: int, bits: int) -> Fraction:
    man = rng.getrandbits(bits) | (1 << (bits - 1)) | 1
    return (-1) ** rng.randint(0, 1) * F(man) * F(2) ** (e - bits)


def _third(prec: int) -> Fraction:
    return F(2 ** (prec + 60) // 3, 2 ** (prec + 60))  # more bits than prec: always cut


# ---------------------------------------------------------------- random, adversarial scales


def _group_op(rng: random.Random, rows: int, cols: int, by_row: bool, prec: int) -> np.ndarray:
    """Per row (by_row) or column: a radius scale ``kg`` relative to the midpoints (about
    1000-1100 binades below the cut error, near 0, or above every midpoint), radii at ``kg``,
    1010-1085 binades below it (rho at the floor) or near it; midpoints at the scale, 990-1110
    binades below it (alpha at its floor) or near it, and zeros."""
    out = np.empty((rows, cols), dtype=object)
    for g in range(rows if by_row else cols):
        u = rng.random()
        if u < 0.45:
            kg = -(prec + 16) - rng.randint(960, 1110)
        elif u < 0.8:
            kg = rng.randint(-40, 0)
        else:
            kg = rng.randint(1, 30)
        for h in range(cols if by_row else rows):
            v = rng.random()
            if v < 0.25:
                mid = _mid(rng, 0, rng.choice([prec + 200, 60, 1]))
            elif v < 0.45:
                mid = _mid(rng, -rng.randint(990, 1110), rng.choice([1, 53, prec + 50]))
            elif v < 0.6:
                mid = _mid(rng, -rng.randint(0, 40), rng.choice([1, 53, prec + 50]))
            else:
                mid = F(0)
            v = rng.random()
            if v < 0.3:
                rad = F(0)
            elif v < 0.55:
                rad = _rad(rng, kg)
            elif v < 0.85:
                rad = _rad(rng, kg - rng.randint(1010, 1085))
            else:
                rad = _rad(rng, kg - rng.randint(0, 60))
            out[(g, h) if by_row else (h, g)] = _ball(mid, rad)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_random_radius_scales_per_row_and_column(seed: int) -> None:
    rng = random.Random(3300 + seed)
    for case in range(250):
        prec = rng.choice(PRECS)
        m, n, p = rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 2)
        a = _group_op(rng, m, n, True, prec)
        b = _group_op(rng, n, p, False, prec)
        _check(a, b, prec, (seed, case))


def _wide_ball(rng: random.Random, base: int) -> arb:
    """Midpoints and radii spread over thousands of binades below ``base`` (a row's or column's
    exponent), radii above every midpoint, zeros."""
    mid = F(0)
    if rng.random() >= 0.15:
        u = rng.random()
        if u < 0.3:
            me = base - rng.choice([0, 1, 2])
        elif u < 0.6:
            me = base - rng.randint(995, 1105)
        elif u < 0.8:
            me = base - rng.randint(0, 1300)
        else:
            me = base - rng.randint(1900, 3200)
        mid = _mid(rng, me, rng.choice([1, 2, 30, 53, 64, 200, 1100, 3100]))
    if rng.random() < 0.3:
        return _ball(mid)
    u = rng.random()
    if u < 0.2:
        re = base + rng.randint(1, 40)
    elif u < 0.5:
        re = base - rng.randint(1015, 1080)
    elif u < 0.7:
        re = base - rng.randint(1900, 2300)
    elif u < 0.85:
        re = base - rng.randint(0, 60)
    else:
        re = base - rng.randint(3000, 4500)
    return _ball(mid, _rad(rng, re))


@pytest.mark.parametrize("seed", range(2))
def test_random_wide_spreads_and_zero_midpoint_products(seed: int) -> None:
    rng = random.Random(3310 + seed)
    for case in range(150):
        prec = rng.choice(PRECS)
        m, n, p = rng.randint(1, 3), rng.choice([1, 2, 3, 5, 40]), rng.randint(1, 3)
        sh = rng.choice([0, 10, 1200])
        ba = [rng.randint(-sh, sh) for _ in range(m)]
        bb = [rng.randint(-sh, sh) for _ in range(p)]
        a = np.empty((m, n), dtype=object)
        b = np.empty((n, p), dtype=object)
        for i, k in np.ndindex(a.shape):
            a[i, k] = _wide_ball(rng, ba[i])
        for k, j in np.ndindex(b.shape):
            b[k, j] = _wide_ball(rng, bb[j])
        if rng.random() < 0.4:  # only radius terms in some products: B's midpoints 0 there
            for k in range(n):
                if rng.random() < 0.5:
                    for j in range(p):
                        b[k, j] = arb(0, b[k, j].rad())
        _check(a, b, prec, (seed, case))


# ---------------------------------------------------------------- targeted sweeps


@pytest.mark.parametrize("prec", [128, 1200])
def test_radius_ratios_at_the_floor_of_a_row(prec: int) -> None:
    """A row whose largest radius (kgrp) meets an exact 0 of B, and a radius 2**-(1010..1088)
    below it (rho at or next to 2**-1022, in the subnormals before the floor) that meets 1 -
    2**-50: the only radius of the entry, next to a cut midpoint. The same by columns."""
    x = 1 + _third(prec) * F(2) ** -(prec + 40)
    for kg in (-5, -(prec + 16) - 1030):
        for d in range(1010, 1089, 3):
            for frac in (F(1, 2), F(3, 4), F(2**30 - 1, 2**30)):
                a = _obj([[_ball(x), _ball(0, F(2) ** kg), _ball(0, frac * F(2) ** (kg - d))]])
                b = _obj([[_ball(x)], [_ball(0)], [_ball(1 - F(1, 2**50))]])
                _check(a, b, prec, (kg, d, frac))
                _check(b.T, a.T, prec, (kg, d, frac, "T"))


@pytest.mark.parametrize("prec", [128, 1000, 3000])
def test_midpoint_ratios_at_the_alpha_floor(prec: int) -> None:
    """|mid| 2**-(990..1110) below its row's scale (alpha exact, rounded up, or at the 2**-1000
    floor) times a radius of B; the row's scale from a midpoint or from a larger radius."""
    for big in (_ball(1), _ball(0, F(2) ** 40)):
        for d in range(990, 1111, 4):
            for bits in (1, 60, prec + 10):
                man = (1 << bits) - 1
                small = F(man, 2**bits) * F(2) ** -d
                a = _obj([[big, _ball(small), _ball(-small)]])
                b = _obj([[_ball(0)], [_ball(1, F(3, 2**12))], [_ball(0, F(2) ** -(d % 64))]])
                _check(a, b, prec, (d, bits))
                _check(b.T, a.T, prec, (d, bits, "T"))


@pytest.mark.parametrize("prec", PRECS)
def test_rows_scaled_by_a_radius_with_only_radius_terms(prec: int) -> None:
    """Rows (columns) whose scale is a radius larger than every midpoint, and every product of
    midpoints exactly 0: the ball is 0 +- the radius terms alone."""
    rng = random.Random(prec)
    for case in range(40):
        n = rng.randint(1, 3)
        a = np.empty((2, n), dtype=object)
        b = np.empty((n, 2), dtype=object)
        for k in range(n):
            za = rng.random() < 0.5  # where A's midpoint is non-zero, B's row of midpoints is 0
            for i in range(2):
                e = rng.randint(-1200, 40)
                mid = F(0) if not za else _mid(rng, e - rng.randint(1, 1100), 53)
                a[i, k] = _ball(mid, _rad(rng, e) if rng.random() < 0.8 else 0)
            for j in range(2):
                e = rng.randint(-1200, 40)
                mid = F(0) if za else _mid(rng, e - rng.randint(1, 1100), 53)
                b[k, j] = _ball(mid, _rad(rng, e - rng.choice([0, 1030, 2100])))
        got = _check(a, b, prec, case)
        if got is not None:
            assert all(_q(x) == 0 for x in got.flat), (case, got)


@pytest.mark.parametrize("prec", [128, 467, 1000, 1200])
def test_cut_error_and_radius_terms_900_to_1200_binades_apart(prec: int) -> None:
    """The cut error (eps N, about 2**-(prec+16) of the scales) next to a radius term 900-1200
    binades below it, and the reverse: a radius term 900-1200 binades above the cut error of
    another row's scale."""
    t = _third(prec)
    for gap in range(900, 1201, 20):
        lo = F(2) ** -(prec + 16 + gap)
        a = _obj([[_ball(t), _ball(-t, lo)], [_ball(0, F(2) ** 1200), _ball(t, lo * 3 / 4)]])
        b = _obj([[_ball(t), _ball(0)], [_ball(t), _ball(t, F(2) ** -gap)]])
        _check(a, b, prec, gap)
        _check(b.T, a.T, prec, (gap, "T"))


def test_subnormal_radius_products_over_2000_terms() -> None:
    """ra @ rb where every product rho_a rho_b is 1.4 2**-1074 (rounded to one unit in the
    subnormals by BLAS) over 2000 terms: only _nonneg_matmul's n 2**-1074 covers the lost 40%."""
    n = 2000
    c = F(1270499309, 2**30)  # c**2 = 1.4 (to 1e-9): rho_a rho_b = c**2 2**-1074
    a = np.empty((1, n), dtype=object)
    b = np.empty((n, 1), dtype=object)
    a[0, 0], b[0, 0] = _ball(0, 1), _ball(0)  # the row's scale, against an exact 0
    a[0, 1], b[1, 0] = _ball(0), _ball(0, 1)  # the column's scale, against an exact 0
    ta, tb = _ball(0, c * F(2) ** -499), _ball(0, c * F(2) ** -573)  # scales 2**1, ratios /2
    for k in range(2, n):
        a[0, k], b[k, 0] = ta, tb
    for prec in (128, 3000):
        got = _check(a, b, prec)
        if got is not None:
            assert _lg(_r(got[0, 0])) <= _lg((n - 2) * c * c * F(2) ** -1072) + 2


def test_long_inner_dimension_near_the_floors() -> None:
    rng = random.Random(2000)
    for prec in (467, 1200):
        a = np.empty((2, 2000), dtype=object)
        b = np.empty((2000, 2), dtype=object)
        for i, k in np.ndindex(a.shape):
            a[i, k] = _wide_ball(rng, 3 * i)
        for k, j in np.ndindex(b.shape):
            b[k, j] = _wide_ball(rng, -7 * j)
        _check(a, b, prec)


# ---------------------------------------------------------------- widths against arb_mat


@pytest.mark.parametrize("prec", [128, 467, 1000])
def test_radii_within_the_scales_up_to_1000_bits(prec: int) -> None:
    """Up to 1000 bits, every radius is within 2 bits of the larger of FLINT's radius and
    2**-prec of the scales (the documented cost: errors relative to rows and columns)."""
    rng = random.Random(33 + prec)

    def top(x: arb) -> int:
        c, r = _q(x), _r(x)
        return max(_lg(abs(c)) + 1, _lg(r) + 1)

    for case in range(60):
        m, n, p = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 3)
        a = np.empty((m, n), dtype=object)
        b = np.empty((n, p), dtype=object)
        for i, k in np.ndindex(a.shape):
            a[i, k] = _wide_ball(rng, 0)
        for k, j in np.ndindex(b.shape):
            b[k, j] = _wide_ball(rng, 0)
        got = _check(a, b, prec, case)
        if got is None:  # a floor hit above S.FLOORED_PRECS: declined, arb_dot's balls
            assert prec + S.GUARD > S.FLOORED_PRECS
            continue
        ref = _flint(a, b, prec)
        for i, j in np.ndindex(got.shape):
            ea = max(top(a[i, k]) for k in range(n))
            eb = max(top(b[k, j]) for k in range(n))
            floor = max(_lg(_r(ref[i, j])), ea + eb - prec)  # in binades
            r = _r(got[i, j])
            assert r == 0 or _lg(r) <= floor + 2, (case, i, j, got[i, j], ref[i, j])


@pytest.mark.parametrize("prec", [1200, 3000])
def test_exact_row_next_to_a_row_with_radii(prec: int) -> None:
    """Each entry's exponent from its non-zero terms only (was 127-1927 bits wide: attack33).
    matmul itself (B narrow, so it takes the engine at any precision): an exact row of A,
    cut (full precision), next to a row with a radius; FLINT's radius is about 2**-prec."""
    t = _third(prec)
    a = _obj([[_ball(t), _ball(-t)], [_ball(t, F(2) ** -(prec - 5)), _ball(t)]])
    b = _obj([[_ball(3)], [_ball(5)]])
    got = S.matmul(a, b, prec)
    assert got is not None and not _bad(got, a, b)
    ref = _flint(a, b, prec)
    assert _lg(_r(got[0, 0])) <= _lg(_r(ref[0, 0])) + 8, (got[0, 0], ref[0, 0])


def test_vanishing_term_does_not_set_the_exponent() -> None:
    a = _obj([[_ball(0, F(2) ** 100), _ball(1)]])
    b = _obj([[_ball(0, F(2) ** -2000)], [_ball(1)]])
    for prec in (128, 1000, 3000):
        got = _check(a, b, prec)
        assert _lg(_r(got[0, 0])) <= -1890, (prec, got[0, 0])
