"""The int8 CRT product engine (fpgrad.arith.crt, Ozaki scheme II) against exact rationals.

Every returned ball must enclose the exact product: random multi-word operands with a huge
exponent spread within a row, zeros, subnormals, +-2**k edges, residues at +-127, inner
dimensions cut for the int32 accumulator (a mocked smaller limit), and the CRT recombination
at the extremes of its proven range. Also: the residues are those of one integer within the
truncation bound, exact products are exact in both engines, and the fallbacks.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from fpgrad.arith import crt, jit_crt, ozaki
from fpgrad.arith import expansion as xp
from fpgrad.arith.ball import Ball, BallArith
from tests.test_wide_slices import _exact, _words

PREC, ROUNDING = 133, 8 * xp.ETA[3]
pytestmark = pytest.mark.skipif(not crt.usable(), reason="torch._int_mm absent or inexact here")


def _check(a: np.ndarray, b: np.ndarray, prec: int = PREC) -> tuple[np.ndarray, np.ndarray]:
    """crt.matmul's terms are within its bound of the exact a @ b, element by element."""
    out = crt.matmul(a, b, prec, ROUNDING)
    assert out is not None
    terms, bound, risk = out
    assert not risk
    fa, fb = _exact(a), _exact(b)
    n = a.shape[2]
    for i in range(a.shape[1]):
        for j in range(b.shape[2]):
            want = sum((fa[i][q] * fb[q][j] for q in range(n)), Fraction(0))
            got = sum((Fraction(float(t[i, j])) for t in terms), Fraction(0))
            assert abs(want - got) <= Fraction(float(bound[i, j])), (i, j)
    return terms, bound


@pytest.mark.parametrize("n", [1, 10, 256])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("prec", "k"), [(PREC, 3), (108, 2)])  # 150- and 100-bit balls
def test_random_multiword_products_within_their_bound(n: int, seed: int, prec: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = _words(rng, (3, n), -300, 300)[:k], _words(rng, (n, 4), -300, 300)[:k]
    _, bound = _check(a, b, prec)
    # the bound is tight: about 2**-(prec + 9) of n max|a row| max|b col|
    scale = np.abs(a[0]).max(axis=1)[:, None] * np.abs(b[0]).max(axis=0)[None, :] * n
    assert np.all(bound <= scale * 2.0 ** -(prec + 6))


def test_cancellation_zeros_subnormals_and_power_of_two_edges() -> None:
    rng = np.random.default_rng(2)
    n = 200
    a, b = _words(rng, (5, n), -40, 40), _words(rng, (n, 5), -40, 40)
    a[:, 0] = 0.0  # a zero row
    b[:, :, 1] = 0.0  # a zero column
    a[0, 1, :3] = [2.0**-1074, -(2.0**-1074), 2.0**-1060]  # subnormals beside normal values
    a[1:, 1, :3] = 0.0
    a[:, 2] = 0.0
    a[0, 2, :4] = [2.0**5, -(2.0**5), np.nextafter(2.0**5, 0), 1.0]  # max exactly 2**k
    a[:, 3] = -a[:, 4]  # rows that cancel ...
    b[:, :, 2] = b[:, :, 3]  # ... against equal columns
    terms, bound = _check(a, b)
    assert not np.any(terms[:, 0]) and not np.any(terms[:, :, 1])
    assert np.all(bound[0] == 0) and np.all(bound[:, 1] == 0)


def test_residues_are_those_of_one_integer_within_the_truncation_bound() -> None:
    """Per element, the N residues are consistent with one integer X (CRT) and
    ``|x - X 2**(e - B)| <= K 2**(e - B - 1)``; values at X = +-127, +-2**B and +-1 units."""
    rng = np.random.default_rng(3)
    pl = crt.plan(64, PREC, 3, 3, ROUNDING)
    x = _words(rng, (4, 64), -60, 0)
    x[:, 0] = 0.0
    x[0, 0, :8] = [0.5, 127 * 2.0**-pl.a.bits, -127 * 2.0**-pl.a.bits, 2.0**-pl.a.bits,
                   -(2.0**-pl.a.bits), 128 * 2.0**-pl.a.bits, -(0.5 - 2.0**-54), 3 * 2.0**-pl.a.bits]  # fmt: skip
    x[:, 1] = np.abs(x[:, 1])  # one sign only
    nm = len(pl.mods)
    out = np.empty((nm, 4, 64), dtype=np.int8)
    expo, top = np.empty(4, dtype=np.int64), np.empty(4)
    over = jit_crt.residues(
        x, True, pl.a.bc, pl.a.nch, pl.a.lo, pl.a.hi, pl.mods, pl.a.rtab, pl.a.caps, expo, top, out
    )
    assert over == 0 and expo[0] == 0
    mods = [int(m) for m in pl.mods]
    big_m = int(np.prod([Fraction(m) for m in mods]))
    seen = set()
    for r in range(4):
        for c in range(64):
            res = [int(v) for v in out[:, r, c]]
            assert all(abs(v) <= (m - 1) // 2 for v, m in zip(res, mods, strict=True))
            big = sum(
                v * (big_m // m) * pow(big_m // m, -1, m) for v, m in zip(res, mods, strict=True)
            )
            big %= big_m
            big = big - big_m if big > big_m // 2 else big
            seen.add(big)
            val = sum(Fraction(float(w)) for w in x[:, r, c])
            unit = Fraction(2) ** (int(expo[r]) - pl.a.bits)
            assert abs(val - big * unit) <= 3 * unit / 2
    assert {127, -127, 1, -1, 128, 3, 0, 2 ** (pl.a.bits - 1)} <= seen


def test_inner_dimension_cut_for_the_int32_accumulator(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    a, b = _words(rng, (3, 61), -20, 20), _words(rng, (61, 2), -20, 20)
    a[0, :, :] = np.sign(a[0]) * 2.0**20  # every residue product large: the same in each cut
    whole, _ = _check(a, b)
    monkeypatch.setattr(crt, "INT32_TERMS", 7)  # 9 pieces, int64 sums
    cut, _ = _check(a, b)
    assert np.array_equal(whole, cut)


def test_row_blocks_give_the_same_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recombination in blocks of rows (BLOCK_OUT results each, a partial last block)
    gives the terms and bound of one block."""
    rng = np.random.default_rng(41)
    a, b = _words(rng, (7, 40), -20, 20), _words(rng, (40, 5), -20, 20)
    whole, bound = _check(a, b)
    for block in (1, 5, 11):  # a row per block (p > block), two rows, two and a bit
        monkeypatch.setattr(crt, "BLOCK_OUT", block)
        cut, cbound = _check(a, b)
        assert np.array_equal(whole, cut) and np.array_equal(bound, cbound)


def test_recombination_at_the_extremes_of_its_range() -> None:
    """Integers C from 0 to +-Cmax (and with multiples of each modulus added, as GEMM sums
    give them) come back within the dropped-limb bound; C beyond the proven range is caught."""
    n = 256
    pl = crt.plan(n, PREC, 3, 3, ROUNDING)
    mods = [int(m) for m in pl.mods]
    amax = sum(int(c) * 2 ** (pl.a.bc * (pl.a.nch - 1 - i)) for i, c in enumerate(pl.a.caps))
    cmax = n * amax * amax
    rng = np.random.default_rng(5)
    values = [0, 1, -1, cmax, -cmax, cmax - 1, 2 ** (2 * pl.a.bits), -(2 ** (2 * pl.a.bits)) + 12345]
    values += [int(v) for v in rng.integers(-(2**62), 2**62, 8)]
    values += [cmax * int(v) // 2**20 for v in rng.integers(-(2**20), 2**20, 8)]
    big = np.array([[c % m + m * int(rng.integers(-1000, 1000)) for c in values] for m in mods])
    prods = big.astype(np.int64)
    scale = np.ones(len(values))
    terms = np.empty((pl.top + 1, len(values)))
    bad = jit_crt.recombine(prods, pl.mods, pl.cinv, pl.limbs, crt.BETA, pl.top, pl.cap, pl.pw,
                            scale, terms)  # fmt: skip
    assert bad == 0
    drop = Fraction(n * 2 ** (2 * pl.a.bits), 2 ** (PREC + 12))
    for e, c in enumerate(values):
        got = sum((Fraction(float(t)) for t in terms[:, e]), Fraction(0)) * 2 ** (2 * pl.a.bits)
        assert abs(got - c) <= drop
    big_m = int(np.prod([Fraction(m) for m in mods]))
    beyond = np.array([[(big_m // 2 - 1) % m] for m in mods], dtype=np.int64)
    bad = jit_crt.recombine(beyond, pl.mods, pl.cinv, pl.limbs, crt.BETA, pl.top, pl.cap, pl.pw,
                            np.ones(1), np.empty((pl.top + 1, 1)))  # fmt: skip
    assert bad > 0


def test_out_of_window_scales_fall_back_to_the_float64_engine() -> None:
    rng = np.random.default_rng(6)
    a, b = _words(rng, (2, 200), -5, 5), _words(rng, (200, 2), -5, 5)
    tiny = a * 2.0**-900  # every row scale below the window: None, the float64 engine's case
    assert crt.matmul(tiny, b, PREC, ROUNDING) is None
    huge = b * 2.0**1010
    assert crt.matmul(a, huge, PREC, ROUNDING) is None


def _ball_product(
    ar: BallArith, a: Ball, b: Ball, engine: str, monkeypatch: pytest.MonkeyPatch
) -> Ball:
    with monkeypatch.context() as mp:
        mp.setattr(
            crt, "applies", (lambda m, n, p: True) if engine == "crt" else (lambda m, n, p: False)
        )
        return ar._matmul(a, b)


def test_exact_claims_are_exact_in_both_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Integer operands: the float64 engine's levels are the exact product; the CRT engine's
    midpoint may miss it by the limbs it drops (within its radius), and a proven-zero row is
    exactly 0 with radius 0 in both."""
    rng = np.random.default_rng(7)
    a = rng.integers(-(2**20), 2**20, (6, 256)).astype(float)
    b = rng.integers(-(2**20), 2**20, (256, 5)).astype(float)
    a[2] = 0.0
    ar = BallArith(150)
    ba, bb = ar.asarray(a), ar.asarray(b)
    want = a.astype(object) @ b.astype(object)  # exact integers
    for engine in ("crt", "float64"):
        out = _ball_product(ar, ba, bb, engine, monkeypatch)
        assert np.all(out.rad[2] == 0) and not out.mid[:, 2].any()  # the exact claim
        assert np.count_nonzero(out.rad == 0) == 5
        for i in range(6):
            for j in range(5):
                got = sum(Fraction(float(w)) for w in out.mid[:, i, j])
                assert abs(got - want[i, j]) <= Fraction(float(out.rad[i, j]))
        if engine == "float64":
            assert np.array_equal(out.mid[0], want.astype(float)) and not out.mid[1:].any()


def test_balls_with_radii_enclose_the_exact_product(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(8)
    ar = BallArith(150)
    am, bm = _words(rng, (3, 200), -30, 30), _words(rng, (200, 3), -30, 30)
    a = Ball(am, np.abs(am[0]) * 2.0**-120)
    b = Ball(bm, np.zeros(bm.shape[1:]))
    out = _ball_product(ar, a, b, "crt", monkeypatch)
    fa, fb = _exact(am), _exact(bm)
    for i in range(3):
        for j in range(3):
            want = sum((fa[i][q] * fb[q][j] for q in range(200)), Fraction(0))
            got = sum(Fraction(float(w)) for w in out.mid[:, i, j])
            radius_part = sum(Fraction(float(a.rad[i, q])) * abs(fb[q][j]) for q in range(200))
            assert abs(want - got) + radius_part <= Fraction(float(out.rad[i, j]))


def test_engine_choice_is_by_capability_and_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    lo, hi = crt.MIN_OUTER, crt.MIN_INNER
    monkeypatch.setattr(crt, "fast", lambda: False)  # no int8 unit: never, whatever the shape
    assert not crt.applies(lo, hi, lo) and not crt.applies(1024, 1024, 1024)
    monkeypatch.setattr(crt, "fast", lambda: True)
    assert crt.applies(lo, hi, lo) and not crt.applies(lo, hi - 1, lo)
    assert not crt.applies(lo - 1, hi, lo) and not crt.applies(lo, hi, lo - 1)
    import torch

    def broken(a: object, b: object, out: object = None) -> object:
        raise RuntimeError("no int8 kernel")

    with monkeypatch.context() as mp:
        mp.setattr(torch, "_int_mm", broken)
        crt.usable.cache_clear()
        try:
            assert not crt.usable() and not crt.applies(1024, 1024, 1024)
        finally:
            mp.undo()
            crt.usable.cache_clear()
    assert crt.usable()
    # the float64 engine alone gives the same enclosure contract
    rng = np.random.default_rng(9)
    a, b = _words(rng, (2, 256), -3, 3), _words(rng, (256, 2), -3, 3)
    terms, bound, _ = ozaki.matmul_levels(a, b, PREC, ROUNDING)
    cterms, cbound = _check(a, b)
    for i in range(2):
        for j in range(2):
            diff = sum(Fraction(float(t)) for t in terms[:, i, j]) - sum(
                Fraction(float(t)) for t in cterms[:, i, j]
            )
            assert abs(diff) <= Fraction(float(bound[i, j])) + Fraction(float(cbound[i, j]))


@pytest.mark.parametrize(
    ("caps", "env", "want"),
    [
        ({"avx2": True}, "", False),  # AVX2 alone: torch's _int_mm is a plain loop there
        ({"avx2": True, "avx512_vnni": True}, "", True),
        ({"amx_int8": True}, "", True),
        ({"avx512_vnni": False, "avx_vnni": True}, "", False),  # not in INT8_FEATURES
        ({"avx2": True}, "1", True),  # the override, both ways
        ({"avx512_vnni": True}, "0", False),
        ({"avx2": True}, "yes", True),  # the words of fpgrad.errors.switch too
        ({"avx512_vnni": True}, "off", False),
    ],
)
def test_fast_is_the_cpu_features_or_the_override(
    caps: dict, env: str, want: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    monkeypatch.setenv(crt.INT8_ENV, env)
    crt.fast.cache_clear()
    try:
        assert crt.fast() is want
        assert crt.applies(crt.MIN_OUTER, crt.MIN_INNER, crt.MIN_OUTER) is want
    finally:
        monkeypatch.undo()
        crt.fast.cache_clear()


def test_fast_without_a_capability_query(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def missing() -> dict:
        raise AttributeError("no get_capabilities in this torch")

    monkeypatch.setattr(torch.cpu, "get_capabilities", missing)
    monkeypatch.delenv(crt.INT8_ENV, raising=False)
    crt.fast.cache_clear()
    try:
        assert not crt.fast()
    finally:
        monkeypatch.undo()
        crt.fast.cache_clear()


@pytest.mark.parametrize("k", [2, 3])
def test_words_at_once_are_the_renormalised_terms(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """crt.matmul_words renormalises each block's terms in the recombination: the same words,
    bit for bit, and the same count of results out of the guarded range, as jit_ball.renorm
    on crt.matmul's terms; across row blocks, and with results beyond 2**800 (counted)."""
    from fpgrad.arith import jit_ball
    from fpgrad.arith.jit_words import words_tag

    monkeypatch.setattr(crt, "BLOCK_OUT", 700)  # several row blocks, blocks of 256 split
    rng = np.random.default_rng(31)
    for m, n, p, scale in ((37, 50, 29, 0), (64, 192, 64, 0), (9, 16, 11, 420)):
        a = _words(rng, (m, n), -30, 30)[:k] * 2.0**scale  # k = 2: the 3-word values cut
        b = np.ldexp(rng.normal(size=(1, n, p)), scale)  # float64 data: an exact cut
        b[0, :, 0] = 0.0  # a zero column: zero results
        for prec in (PREC if k == 3 else 108, 60):
            terms, bound, risk = crt.matmul(a, b, prec, ROUNDING)
            want = np.empty((k, m * p))
            flagged = jit_ball.renorm(words_tag(k), terms.reshape(len(terms), -1), want)
            words, bound2, risk2, got = crt.matmul_words(a, b, prec, ROUNDING, False, k)
            assert np.array_equal(words.reshape(k, -1), want, equal_nan=True)
            assert np.array_equal(np.signbit(words.reshape(k, -1)), np.signbit(want))
            assert got == flagged and np.array_equal(bound, bound2) and risk == risk2
            assert (flagged > 0) == (scale > 0)


@pytest.mark.parametrize(
    ("caps", "want"),
    [
        ({"amx_int8": True, "avx512_vnni": True}, "amx"),
        ({"avx512_vnni": True}, "vnni"),
        ({}, "vnni"),
    ],
)
def test_machine_class_is_torchs_amx_capability(
    caps: dict, want: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """crt.machine picks the cost constants' class from torch's capabilities, once."""
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    crt.machine.cache_clear()
    try:
        assert crt.machine() == want and want in crt.COSTS
    finally:
        monkeypatch.undo()
        crt.machine.cache_clear()
