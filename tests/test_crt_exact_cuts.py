"""Exact cuts of the int8 CRT engine (fpgrad.arith.crt): float32 and float64 operands are cut
to integers without truncation, at the width their bits need (jit_crt.exact_bits), and the
product then needs fewer moduli. Checked against exact rationals: the width is the least that
holds every word; a cut declared exact that is not is a fault (never a silent truncation);
products of exact and truncated operands stay within their bound; the engine choice
(crt.cost) is a fixed function of shapes and words.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from fpgrad.arith import crt, jit_crt
from fpgrad.arith import expansion as xp
from fpgrad.arith.ball import Ball, BallArith
from tests.test_crt import _check
from tests.test_wide_slices import _exact, _words

PREC, ROUNDING = 133, 8 * xp.ETA[3]
pytestmark = pytest.mark.skipif(not crt.usable(), reason="torch._int_mm absent or inexact here")


def _need(words: np.ndarray, per_row: bool) -> int:
    """The oracle of jit_crt.exact_bits: the least B with every word a multiple of
    2**(e - B), from Fraction denominators (e as the residue kernel takes it)."""
    top = np.abs(words[0]).max(axis=1 if per_row else 0)
    expo = np.frexp(top * (1.0 + 2.0**-48))[1]
    need = 0
    for w in words:
        for (r, c), v in np.ndenumerate(w):
            if v == 0:
                continue
            f = Fraction(float(v))
            e = int(expo[r if per_row else c])
            # v = num / 2**d: multiple of 2**(e - B) iff e - B <= -d + (trailing zeros of num)
            num, den = f.numerator, f.denominator
            tz = (abs(num) & -abs(num)).bit_length() - 1
            low = tz - (den.bit_length() - 1)
            need = max(need, e - low)
    return need


@pytest.mark.parametrize("per_row", [True, False])
def test_exact_bits_is_the_least_width_that_holds_every_word(per_row: bool) -> None:
    rng = np.random.default_rng(11)
    cases = [
        rng.normal(size=(1, 7, 9)),  # float64 data
        rng.normal(size=(1, 7, 9)).astype(np.float32).astype(np.float64),  # float32 data
        np.ldexp(rng.integers(1, 2**20, (1, 5, 6)).astype(float), rng.integers(-30, 30, (1, 5, 6))),
        np.array([[[2.0**-1074, 3 * 2.0**-1074, 1e-310], [0.0, -0.0, 2.0**-1022]]]),  # subnormal
        np.array([[[1.0, 2.0**-60, -0.0], [0.75, -(2.0**-52), 0.0]]]),
        np.zeros((2, 3, 4)),
    ]
    two = rng.normal(size=(2, 4, 5))  # two words: the lower ones far below
    two[1] *= 2.0**-60
    cases.append(two)
    for x in cases:
        x = np.ascontiguousarray(x)
        want = _need(x, per_row)
        assert jit_crt.exact_bits(x, per_row, 2000) == want
        assert jit_crt.exact_bits(x, per_row, want) == want  # at the limit: still the width
        if want:
            assert jit_crt.exact_bits(x, per_row, want - 1) == want  # above it: limit + 1


def test_exact_bits_refuses_nan_and_inf_in_any_word() -> None:
    for bad in (np.nan, np.inf, -np.inf):
        for w in (0, 1):
            x = np.zeros((2, 3, 3))
            x[0] = 1.0
            x[w, 1, 2] = bad
            assert jit_crt.exact_bits(x, True, 100) == 101
            assert jit_crt.exact_bits(x, False, 100) == 101


def test_a_cut_declared_exact_that_is_not_is_a_fault() -> None:
    """The residue kernel checks the exact cut: a word below its last unit is a fault."""
    pl = crt.plan(16, PREC, 1, 1, ROUNDING, 40, 40)
    assert pl.a.exact and pl.b.exact and pl.a.bits == 40
    x = np.zeros((1, 2, 16))
    x[0, :, 0] = 1.0
    x[0, 0, 5] = 2.0**-38  # within 40 bits of the scale 2**1
    nm = len(pl.mods)
    out = np.empty((nm, 2, 16), dtype=np.int8)
    expo, top = np.empty(2, dtype=np.int64), np.empty(2)
    args = (pl.a.bc, pl.a.nch, pl.a.lo, pl.a.hi, pl.mods, pl.a.rtab, pl.a.caps, expo, top, out)
    assert jit_crt.residues(x, True, *args, True) == 0
    x[0, 1, 7] = 2.0**-40  # one bit further down: not a multiple of 2**(1 - 40)
    assert jit_crt.residues(x, True, *args, True) == 1
    assert jit_crt.residues(x, True, *args, False) == 0  # a truncated cut takes it (rounded)


@pytest.mark.parametrize("n", [1, 9, 200])
def test_products_with_exact_cuts_are_within_their_bound(n: int) -> None:
    rng = np.random.default_rng(12 + n)
    f64 = rng.normal(size=(1, 4, n)) * np.ldexp(1.0, rng.integers(-20, 20, (1, 4, n)))
    f32 = rng.normal(size=(1, n, 3)).astype(np.float32).astype(np.float64)
    f32[0, 0, 0] = 2.0**-100  # 100 bits below its column's largest: 124 bits, still exact
    multi = _words(rng, (n, 3), -30, 30)
    for a, b in ((f64, f32), (f64, multi), (_words(rng, (4, n), -30, 30), f32)):
        ex = crt.exact_widths(a, b, n, PREC, ROUNDING)
        assert bool(ex[0]) == (a.shape[0] == 1) and bool(ex[1]) == (b.shape[0] == 1)
        _check(a, b)


def test_exact_cuts_need_fewer_moduli_and_bound_no_truncation() -> None:
    full = crt.plan(256, PREC, 3, 3, ROUNDING)
    one = crt.plan(256, PREC, 3, 1, ROUNDING, 0, 72)  # a float64 weight matrix
    both = crt.plan(256, PREC, 1, 1, ROUNDING, 68, 72)  # inputs times weights
    assert len(both.mods) < len(one.mods) < len(full.mods)
    assert both.factor < one.factor <= full.factor
    # both exact: only the dropped limbs and the caller's rounding remain (about 2**-145)
    assert both.factor < 2.0**-140


@pytest.mark.parametrize("cls", sorted(crt.COSTS))
def test_engine_choice_is_a_function_of_shapes_and_words(
    cls: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """crt.cost, fixed constants per machine class: tiny products go to the float64 slices,
    the MLP's large ones to the int8 GEMMs; whichever engine runs, the ball encloses the
    exact product."""
    monkeypatch.setattr(crt, "fast", lambda: True)
    monkeypatch.setattr(crt, "machine", lambda: cls)
    pl = crt.plan(10, PREC, 3, 3, ROUNDING)
    c, o = crt.cost(10, 10, 10, 3, 3, pl, PREC)
    assert o < c
    pl = crt.plan(256, PREC, 3, 1, ROUNDING, 0, 72)
    c, o = crt.cost(128, 256, 256, 3, 1, pl, PREC)
    assert c < o
    assert crt.cost(128, 256, 256, 3, 1, pl, PREC) == (c, o)
    rng = np.random.default_rng(13)
    ar = BallArith(150)
    am = _words(rng, (3, 64), -5, 5)
    bm = rng.normal(size=(64, 2))
    b = ar.asarray(bm)
    out = ar._matmul(Ball(am, np.zeros((3, 64))), b)
    fa, fb = _exact(am), _exact(b.mid)
    for i in range(3):
        for j in range(2):
            want = sum((fa[i][q] * fb[q][j] for q in range(64)), Fraction(0))
            got = sum(Fraction(float(w)) for w in out.mid[:, i, j])
            assert abs(want - got) <= Fraction(float(out.rad[i, j]))


def test_the_window_keeps_every_sigma_finite() -> None:
    """A cut's window [lo, hi] is where the residue kernel's constants are finite and normal
    (chunk 0's sigma 1.5 2**(e - bc + 52), the last unit 2**(e - B)): a row at the top of
    the window is cut, one above it declined (-1), not turned into NaN chunks."""
    import math

    for n, prec, ea, eb in ((8, 53, 4, 4), (256, PREC, 0, 72), (64, 100, 0, 0)):
        pl = crt.plan(n, prec, 1, 1, ROUNDING, ea, eb)
        for c in (pl.a, pl.b):
            assert math.isfinite(math.ldexp(1.5, c.hi - c.bc + 52))
            assert math.ldexp(1.0, c.lo - c.bits) >= 2.0**-1022
    pl = crt.plan(8, 53, 1, 1, ROUNDING, 4, 4)
    c = pl.a
    for e, want in ((c.hi, 0), (c.hi + 1, -1)):
        x = np.full((1, 1, 8), 2.0 ** (e - 1))  # scale exponent e
        out = np.empty((len(pl.mods), 1, 8), dtype=np.int8)
        got = jit_crt.residues(
            x, True, c.bc, c.nch, c.lo, c.hi, pl.mods, c.rtab, c.caps,
            np.empty(1, dtype=np.int64), np.empty(1), out, c.exact,
        )  # fmt: skip
        assert got == want
