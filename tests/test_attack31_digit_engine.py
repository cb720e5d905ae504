"""Adversarial review (attack31) of the int8 digit product engine (fpgrad.arith.digits and its
kernels in fpgrad.arith.jit_digits, on the CRT engine's cut).

The claim under test: ``digits.matmul_words(a, b, prec, rounding, words)`` returns None, or
words ``mid`` and ``bound`` with ``|sum_w mid[w] - A B| <= bound`` for every result, where A
and B are the exact sums of the float64 words (never NaN or inf). The oracle is Python
integers (every float64 an integer multiple of 2**-1074), independent of the library.

Inputs: random multi-word expansions (1 to 3 words each side, mixed), operands whose cut
integers have extreme balanced digits (every digit below the top one -128 or 127, so that every
kept and every dropped digit product is +-2**14) at the largest unsplit inner dimension of a
diagonal and past it, expansions at the chunk caps (lower words of several units of chunk 0,
half-unit ties: the cut integers up to Amax), row maxima at the ``2**e (1 - 2**-48)`` edge,
exact cancellation, zero rows, -0.0, NaN, inf, zero top words over lower words, lower words
above the top word, magnitudes from subnormal to 2**1000, float64 / float32 / integer data
stored in 1 to 3 words (with ``rounding = 0`` where the products are exact), degenerate
shapes, and inner dimensions that split the diagonals. The plan is taken both from the
library's path (exact widths) and forced to the truncated cut.

Finding (f86e464, still in 9fbd666): ``digits.plan`` asserts ``big (256**3 - 1) / 255 <
2**50`` (the combine's groups exact) instead of raising ValueError, so an inner dimension from
54973 at prec 133 (65281 at prec 108; from 49738 to 116054 elsewhere in prec 53..149), well
below ``digits.PAIR_TERMS``, raises AssertionError out of ``digits.matmul_words`` where it
should return None: test_plan_accepts_or_declines_every_legitimate_shape and
test_long_inner_dimensions_decline_or_are_right fail there. From f86e464 to 17d2a82 it also
escaped the engine chooser the exact balls' matmul calls (``crt.matmul_words(..., True, k)``,
then ``products.matmul_words``) on an amx machine class; since ce15a15 the chooser gives this
engine inner dimensions up to ``digits.MAX_INNER`` = 256 only, so the balls no longer reach it
(test_long_inner_dimensions_in_the_engine_chooser guards that). No wrong certificate was found.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from fpgrad.arith import crt, digits, jit_crt, jit_digits
from fpgrad.arith import expansion as xp

pytestmark = pytest.mark.skipif(
    not (crt.usable() and digits.usable()), reason="torch._int_mm is not exact here"
)

R1, R2, R3 = 8 * xp.ETA[1], 8 * xp.ETA[2], 8 * xp.ETA[3]
# (words, prec, rounding): the library's two, and others in range (prec 90 and 51: the dropped
# diagonals' bound is the largest part of the factor; prec 50 with 3 words: the cut's)
SETTINGS = (
    (3, 133, R3),
    (2, 108, R2),
    (1, 50, R1),
    (3, 50, R3),
    (3, 90, R3),
    (3, 51, R3),
    (3, 20, R3),
    (3, 149, R3),
    (2, 60, R2),
)
UNIT = 1074  # every float64 is an integer multiple of 2**-1074


def _int(x: float) -> int:
    """x 2**1074, exactly (x finite)."""
    if x == 0.0:
        return 0
    m, e = math.frexp(x)
    mant, sh = int(m * 2.0**53), e - 53 + UNIT
    return mant << sh if sh >= 0 else mant >> -sh


def _exact(w: np.ndarray) -> np.ndarray:
    """The exact values of (k, r, c) words, as an (r, c) object array of integers in 2**-1074."""
    out = np.empty(w.shape[1:], dtype=object)
    for idx in np.ndindex(w.shape[1:]):
        out[idx] = sum(_int(float(w[(t, *idx)])) for t in range(w.shape[0]))
    return out


def _verify(a: np.ndarray, b: np.ndarray, out: tuple) -> float:
    """Every result within its bound (exact integers); returns the largest error / bound."""
    mid, bound = out[0], out[1]
    assert mid.shape[1:] == bound.shape == (a.shape[1], b.shape[2])
    assert np.isfinite(mid).all() and np.isfinite(bound).all() and (bound >= 0).all()
    assert out[2] is False
    exact = _exact(a).dot(_exact(b)) if a.shape[2] else np.zeros(bound.shape, dtype=object)
    worst = 0.0
    for i, j in np.ndindex(bound.shape):
        got = sum(_int(float(mid[w, i, j])) for w in range(mid.shape[0])) << UNIT
        err, lim = abs(got - exact[i, j]), _int(float(bound[i, j])) << UNIT
        assert err <= lim, (i, j, err / 2.0 ** (2 * UNIT), float(bound[i, j]))
        if lim:
            worst = max(worst, err / lim)
    return worst


def _product(a, b, words, prec, rounding, forced=False, must=True) -> float | None:
    """digits.matmul_words checked against the oracle; ``forced``: the truncated cut's plan
    instead of the library's (exact widths); ``must``: ordinary data, declining is a failure."""
    pl = digits.plan(a.shape[2], prec, a.shape[0], b.shape[0], rounding) if forced else None
    out = digits.matmul_words(a, b, prec, rounding, words, pl)
    if out is None:
        assert not must, ("declined", words, prec, forced)
        return None
    assert out[0].shape[0] == words
    return _verify(a, b, out)


def _expansion(rng, shape, k, spread=20, ratio=2.0**-53) -> np.ndarray:
    x = rng.normal(size=shape) * np.exp2(rng.integers(-spread, spread + 1, size=shape))
    w = [x]
    for _ in range(k - 1):
        w.append(w[-1] * ratio * rng.uniform(-1, 1, size=shape))
    return np.stack(w)


def _words(vals: np.ndarray, k: int) -> np.ndarray:
    """k float64 words of each rational in ``vals`` (nearest splits; exact where they fit)."""
    out = np.zeros((k, *vals.shape))
    for idx in np.ndindex(vals.shape):
        r = Fraction(vals[idx])
        for w in range(k):
            out[(w, *idx)] = f = float(r)
            r -= Fraction(f)
    return out


# ---- random expansions, every setting, both plans --------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_random_expansions_are_within_their_bound(seed: int) -> None:
    rng = np.random.default_rng(3100 + seed)
    m, n, p = (int(v) for v in rng.integers(1, 9, 3))
    ka, kb = (int(v) for v in rng.integers(1, 4, 2))
    spread = int(rng.choice([0, 3, 20, 60]))
    ratio = float(rng.choice([2.0**-53, 2.0**-30, 2.0**-60]))
    a, b = _expansion(rng, (m, n), ka, spread, ratio), _expansion(rng, (n, p), kb, spread, ratio)
    for words, prec, rounding in SETTINGS:
        for forced in (False, True):
            _product(a, b, words, prec, rounding, forced)


def _kind(rng, k: int, shape: tuple[int, int]) -> np.ndarray:
    """k words of one of: a random expansion, float64 data with an exponent spread up to 120
    (exact cuts up to the truncated width, or past it), few-bit data, exact two-float sums,
    float32 word 0 under random lower words."""
    kind = int(rng.integers(0, 5))
    if kind == 0:
        return _expansion(rng, shape, k, int(rng.choice([0, 5, 40])))
    x = np.zeros((k, *shape))
    if kind == 1:
        x[0] = rng.normal(size=shape) * np.exp2(-rng.integers(0, int(rng.integers(1, 121)), shape))
    elif kind == 2:
        x[0] = rng.integers(-15, 16, shape) * 2.0 ** int(rng.integers(-30, 30))
    elif kind == 3:
        x[0] = rng.normal(size=shape)
        if k > 1:
            low = rng.integers(-(2**20), 2**20, shape).astype(float)
            x[1] = np.ldexp(low, -int(rng.integers(53, 100)))
    else:
        x = _expansion(rng, shape, k, 3)
        x[0] = x[0].astype(np.float32).astype(float)
    return x


def test_mixed_kinds_random_precisions() -> None:
    """400 products: words 1..3, prec 20..149, operands of different kinds each side (exact
    and truncated cuts mixed), the library's plan or the truncated one."""
    rng = np.random.default_rng(3150)
    for _ in range(400):
        words, prec = int(rng.integers(1, 4)), int(rng.integers(20, 150))
        rounding = 8 * xp.ETA[words]
        m, n, p = (int(v) for v in rng.integers(1, 9, 3))
        a = _kind(rng, int(rng.integers(1, 4)), (m, n))
        b = _kind(rng, int(rng.integers(1, 4)), (n, p))
        _product(a, b, words, prec, rounding, forced=bool(rng.random() < 0.3))


# ---- extreme digits --------------------------------------------------------------------------


def _extreme_operands(pl: digits.Plan, low: int, n: int, p: int) -> tuple[np.ndarray, ...]:
    """a (3, 1, n), b (3, n, p): every element but an anchor (3/4, the scales 2**0) the cut
    integer with digits [top, low, ..., low] (top the least that keeps it positive), the
    columns of b alternately +-; every kept and dropped digit pair then +-2**14 but the top's."""

    def value(t: int, bits: int) -> Fraction:
        top = 1 if low < 0 else 0
        x = 0
        for d in [top] + [low] * (t - 1):
            x = x * 256 + d
        assert 0 < x < 2**bits * 3 // 4  # below the anchor
        return Fraction(x, 2**bits)

    wa = _words(np.array([value(pl.ta, pl.a.bits)], dtype=object), 3)[:, 0]
    wb = _words(np.array([value(pl.tb, pl.b.bits)], dtype=object), 3)[:, 0]
    a = np.empty((3, 1, n))
    b = np.empty((3, n, p))
    a[:] = wa[:, None, None]
    b[:] = wb[:, None, None]
    b[:, :, 1::2] *= -1.0
    a[:, 0, 0] = b[:, 0, :] = 0.0
    a[0, 0, 0] = b[0, 0, :] = 0.75
    return a, b


def _digits_of(x: np.ndarray, per_row: bool, cut: crt.Cut, t: int) -> tuple[int, np.ndarray]:
    rows, cols = x.shape[1:]
    q = rows if per_row else cols
    expo, top = np.empty(q, dtype=np.int64), np.empty(q)
    out = np.empty((rows, t, cols) if per_row else (t, rows, cols), dtype=np.int8)
    faults = jit_digits.digits(x, per_row, cut.bc, cut.nch, cut.lo, cut.hi, cut.caps, expo, top,
                               out, cut.exact)  # fmt: skip
    return faults, out


@pytest.mark.parametrize(
    ("prec", "extra"),
    [(133, 0), (133, 1), (133, 1101), (90, 0), (51, 0), (20, 0), (149, 0)],
)
@pytest.mark.parametrize("low", [-128, 127])
def test_extreme_digits_at_the_int32_limit(prec: int, extra: int, low: int) -> None:
    """n = PAIR_TERMS // (longest kept diagonal) + extra: the largest inner dimension summed in
    one int32 GEMM per diagonal, the first split one, and one split into uneven parts; with
    every digit below the top -128 each part sums to its largest magnitude (the split must keep
    it below 2**31) and the dropped diagonals reach their bound exactly."""
    pl0 = digits.plan(8, prec, 3, 3, R3)
    longest = max(digits._count(s, pl0.ta, pl0.tb) for s in range(pl0.last + 1))
    n = digits.PAIR_TERMS // longest + extra if extra or prec == 133 else 7
    pl = digits.plan(n, prec, 3, 3, R3)
    a, b = _extreme_operands(pl, low, n, 2)
    faults, da = _digits_of(a, True, pl.a, pl.ta)
    assert faults == 0 and (da[0, 1:, 1:] == low).all()
    faults, db = _digits_of(b, False, pl.b, pl.tb)
    assert faults == 0 and (db[: pl.tb - 1, 1:, 0] == low).all()
    for ds, cut, t in ((da[0, :, 1], pl.a, pl.ta), (db[::-1, 1, 0], pl.b, pl.tb)):
        spread = sum(abs(int(d)) * 256 ** (t - 1 - i) for i, d in enumerate(ds))
        assert spread <= digits._spread(cut.amax, t)  # the rounding's charge (plan)
    out = digits.matmul_words(a, b, prec, R3, 3, pl)
    assert out is not None
    _verify(a, b, out)
    if prec == 133:
        ref = crt.matmul_words(a, b, prec, R3, False, 3)
        assert ref is not None
        _verify(a, b, ref)


def test_group_sums_at_their_exactness_limit() -> None:
    """n = 54972 (prec 133), the largest inner dimension f86e464's plan accepts: with every
    digit below the top -128, the combine's groups of three diagonals reach 2**50 (1 - 1.2e-5)
    there."""
    n = 54972
    pl = digits.plan(n, 133, 3, 3, R3)
    a, b = _extreme_operands(pl, -128, n, 2)
    out = digits.matmul_words(a, b, 133, R3, 3, pl)
    assert out is not None
    _verify(a, b, out)


# ---- the cut at its caps ---------------------------------------------------------------------


def _capped(rng, shape: tuple[int, int], k: int, bc: int) -> np.ndarray:
    """Words whose cut reaches the chunk caps: word 0 just below 2**0 (or anywhere below),
    lower words of a few units of chunk 0 plus (near) half units: ties at every chunk."""
    x = np.zeros((k, *shape))
    u0 = 2.0**-bc
    for idx in np.ndindex(shape):
        s = float(rng.choice([-1.0, 1.0]))
        e = int(rng.choice([45, 46, 47]))  # (1 - 2**-e)(1 + 2**-48) < 1: the scale 2**0
        first = idx == (0, 0)  # one element at the caps for certain
        e = 47 if first else e
        x[(0, *idx)] = s * (1 - 2.0**-e) if rng.random() < 0.8 or first else s * rng.random()
        for w in range(1, k):
            c = 2 if first else int(rng.integers(-2, 3))
            f = float(rng.choice([0.5, -0.5, 0.5 - 2.0**-20, 0.5 + 2.0**-30, 0.25, 0.0]))
            f = 0.5 - 2.0**-20 if first else f
            x[(w, *idx)] = s * u0 * (c + f)
    return x


@pytest.mark.parametrize("seed", range(9))
def test_expansions_at_the_chunk_caps(seed: int) -> None:
    """The digits are the cut's integers (their residues those of the CRT kernel, for the same
    cut) up to Amax, and the products are within their bound."""
    rng = np.random.default_rng(3200 + seed)
    words, prec, rounding = SETTINGS[seed]
    k = 1 + seed % 3
    m, n, p = (int(v) for v in rng.integers(1, 6, 3))
    pl = digits.plan(n, prec, k, k, rounding)
    a, b = _capped(rng, (m, n), k, pl.a.bc), _capped(rng, (n, p), k, pl.b.bc)
    mods = np.array(crt.MODULI[:5], dtype=np.int64)
    largest = 0
    for x, per_row, cut, t in ((a, True, pl.a, pl.ta), (b, False, pl.b, pl.tb)):
        faults, out = _digits_of(x, per_row, cut, t)
        rtab = np.array([[crt._sym(pow(2, cut.bc * (cut.nch - 1 - i), int(q)), int(q))
                          for q in mods] for i in range(cut.nch)])  # fmt: skip
        q = x.shape[1] if per_row else x.shape[2]
        expo, top = np.empty(q, dtype=np.int64), np.empty(q)
        res = np.empty((len(mods), *x.shape[1:]), dtype=np.int8)
        assert faults == jit_crt.residues(x, per_row, cut.bc, cut.nch, cut.lo, cut.hi, mods,
                                          rtab, cut.caps, expo, top, res, cut.exact)  # fmt: skip
        assert faults == 0
        for r, c in np.ndindex(x.shape[1:]):
            ds = out[r, :, c] if per_row else out[::-1, r, c]
            big = 0
            for d in ds:
                big = big * 256 + int(d)
            assert abs(big) <= cut.amax
            largest = max(largest, abs(big) / cut.amax)
            spread = sum(abs(int(d)) * 256 ** (t - 1 - i) for i, d in enumerate(ds))
            assert spread <= digits._spread(cut.amax, t)  # the rounding's charge (plan)
            assert [crt._sym(big, int(q)) for q in mods] == [int(v) for v in res[:, r, c]]
    assert largest > 0.99  # the caps were reached
    _product(a, b, words, prec, rounding, forced=True)
    # the library's plan may cut exactly at another width, where these words pass chunk 0's
    # cap (|x| > 2**e + 4 units): declined, or right
    _product(a, b, words, prec, rounding, must=False)


def test_a_carry_past_the_last_digit_is_a_fault() -> None:
    """Too few digits for the integers (every chunk entered, a carry left): the kernel counts
    faults instead of writing truncated digits."""
    pl = digits.plan(4, 133, 3, 3, R3)
    c = pl.a
    entered = -(-(c.bc * (c.nch - 1) + 1) // 8)  # digits that take in every chunk
    x = _expansion(np.random.default_rng(5), (3, 4), 3, 0)
    for t in range(entered, pl.ta):
        assert _digits_of(x, True, c, t)[0] > 0
    assert _digits_of(x, True, c, pl.ta)[0] == 0
    # fewer digits than the chunks need, the chunks they take in all 0: a chunk never entered
    x = np.zeros((1, 1, 2))
    x[0, 0] = (0.5, -0.25)
    for t in range(1, entered):
        assert _digits_of(x, True, c, t)[0] > 0


# ---- edges, ties, cancellation ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_row_maxima_at_the_scale_edges(seed: int) -> None:
    rng = np.random.default_rng(3300 + seed)
    m, n, p = (int(v) for v in rng.integers(1, 6, 3))
    ka, kb = (int(v) for v in rng.integers(1, 4, 2))
    a, b = _expansion(rng, (m, n), ka, 2), _expansion(rng, (n, p), kb, 2)
    tops = (1 - 2.0**-48, 1 - 2.0**-49, 1 - 2.0**-47, 1 - 2.0**-53, 0.5, 0.75,
            (1 - 2.0**-48) * (1 - 2.0**-52))  # fmt: skip
    for x, per_row in ((a, True), (b, False)):
        for q in range(x.shape[1] if per_row else x.shape[2]):
            e = int(rng.integers(-5, 6))
            top = math.ldexp(float(rng.choice(tops)), e) * float(rng.choice([-1, 1]))
            idx = int(rng.integers(0, x.shape[2] if per_row else x.shape[1]))
            at = (slice(None), q, idx) if per_row else (slice(None), idx, q)
            x[at] = 0.0
            x[at][0] = top
            if x.shape[0] > 1:  # a lower word pushing past 2**e
                x[at][1] = math.ldexp(float(rng.choice([1, -1, 0.5, 3])), e - 49) * np.sign(top)
    for words, prec, rounding in SETTINGS:
        for forced in (False, True):
            _product(a, b, words, prec, rounding, forced)


@pytest.mark.parametrize("seed", range(4))
def test_exact_cancellation(seed: int) -> None:
    """Rows of a are (u, -u) and columns of b (v, v), permuted: every product exactly 0, or
    that plus a tiny lowest word."""
    rng = np.random.default_rng(3400 + seed)
    m, h, p = (int(v) for v in rng.integers(1, 6, 3))
    ka, kb = (int(v) for v in rng.integers(1, 4, 2))
    a, b = _expansion(rng, (m, h), ka, 10), _expansion(rng, (h, p), kb, 10)
    perm = rng.permutation(2 * h)
    a = np.ascontiguousarray(np.concatenate([a, -a], axis=2)[:, :, perm])
    b = np.ascontiguousarray(np.concatenate([b, b], axis=1)[:, perm])
    for words, prec, rounding in SETTINGS[:4]:
        _product(a, b, words, prec, rounding)
    a[-1, 0, 0] += a[0, 0, 0] * 2.0 ** -int(rng.integers(40, 200))
    for words, prec, rounding in SETTINGS[:4]:
        _product(a, b, words, prec, rounding, forced=True)


# ---- faults, zeros, magnitudes ---------------------------------------------------------------


def test_nonfinite_and_malformed_words_are_declined() -> None:
    rng = np.random.default_rng(3500)
    a, b = _expansion(rng, (4, 5), 3), _expansion(rng, (5, 3), 3)
    for bad in (np.nan, np.inf, -np.inf):
        for w in range(3):
            for left in (True, False):
                x, y = (a.copy(), b) if left else (a, b.copy())
                (x if left else y)[w, 1, 2] = bad
                for words, prec, rounding in SETTINGS[:3]:
                    assert digits.matmul_words(x, y, prec, rounding, words) is None
    for left in (True, False):  # a zero word 0 over non-zero lower words in a whole row of a
        for whole in (False, True):  # (a column of b): its scale 0 cannot hold them
            x, y = (a.copy(), b) if left else (a, b.copy())
            at = (slice(None), 2) if left else (slice(None), slice(None), 2)
            z = x if left else y
            if whole:
                z[at][0] = 0.0
            else:
                z[at] = 0.0
                z[at][2, 1] = 1e-300
            assert digits.matmul_words(x, y, 133, R3, 3) is None
            # one element's word 0 zero in a row with a scale: declined or right
            x, y = (a.copy(), b) if left else (a, b.copy())
            (x if left else y)[0, 1, 1] = 0.0
            _product(x, y, 3, 133, R3, must=False)
    for big in (1e30, 4.0, 1.0):  # lower words at and above word 0: declined or right
        x = a.copy()
        x[1] = x[0] * big
        x[2, 0, 0] = -x[0, 0, 0] * big
        for words, prec, rounding in SETTINGS[:3]:
            _product(x, b, words, prec, rounding, must=False)


def test_zero_rows_negative_zeros_and_subnormals() -> None:
    rng = np.random.default_rng(3600)
    a, b = _expansion(rng, (5, 6), 3), _expansion(rng, (6, 4), 2)
    a[:, 1] = 0.0
    a[:, 3] = -0.0
    a[:, 0, 2] = -0.0
    b[:, :, 2] = -0.0
    b[:, 4] = 0.0
    b[0, 3, 1] = 5e-324  # a subnormal next to normal words: far below the cut
    a[0, 4, 5] = -(2.0**-1060)
    for words, prec, rounding in SETTINGS:
        for forced in (False, True):
            pl = digits.plan(6, prec, 3, 2, rounding) if forced else None
            out = digits.matmul_words(a, b, prec, rounding, words, pl)
            assert out is not None
            _verify(a, b, out)


@pytest.mark.parametrize("seed", range(6))
def test_magnitudes_from_subnormal_to_huge(seed: int) -> None:
    """Rows and columns scaled by 2**k, k from -1074 to 1000: declined or right; rows within
    2**+-400 never declined."""
    rng = np.random.default_rng(3700 + seed)
    m, n, p = (int(v) for v in rng.integers(1, 6, 3))
    ka, kb = (int(v) for v in rng.integers(1, 4, 2))
    a, b = _expansion(rng, (m, n), ka, 4), _expansion(rng, (n, p), kb, 4)
    ks = (-1074, -1060, -1000, -990, -960, -940, -900, -600, -470, 0, 470, 600, 900, 960, 1000)
    mild = seed < 2
    pick = (lambda s: rng.integers(-400, 401, s)) if mild else (lambda s: rng.choice(ks, s))
    with np.errstate(over="ignore", under="ignore"):
        a = np.ldexp(a, pick(m)[None, :, None])
        b = np.ldexp(b, pick(p)[None, None, :])
    a[~np.isfinite(a)] = 1.0
    b[~np.isfinite(b)] = -1.0
    for words, prec, rounding in SETTINGS:
        for forced in (False, True):
            _product(a, b, words, prec, rounding, forced, must=mild)


@pytest.mark.parametrize(("ea", "eb"), [(500, 523), (1000, 23), (-300, 990), (470, 470), (900, 0)])
def test_products_near_overflow(ea: int, eb: int) -> None:
    """Rows of a at 2**ea, columns of b at 2**eb (every element near its scale, the same sign):
    results up to about 2**(ea + eb + 2), past the float64 range for the first two: declined
    or finite and right."""
    rng = np.random.default_rng(ea + 7 * eb)
    a = np.ldexp(_expansion(rng, (3, 4), 3, 0), ea)
    b = np.ldexp(_expansion(rng, (4, 2), 3, 0), eb)
    a[0] = np.ldexp(np.abs(rng.uniform(0.5, 0.99, (3, 4))), ea)
    b[0] = np.ldexp(np.abs(rng.uniform(0.5, 0.99, (4, 2))), eb)
    for words, prec, rounding in SETTINGS[:3]:
        for forced in (False, True):
            _product(a, b, words, prec, rounding, forced, must=ea + eb < 900)


# ---- data kinds, shapes, long inner dimensions -----------------------------------------------


@pytest.mark.parametrize("kind", ["float64", "float32", "int8", "wide"])
def test_float_and_integer_data_in_words(kind: str) -> None:
    """float64, float32 and integer data stored in 1 to 3 words (zero lower words): exact cuts;
    integer data with rounding 0 is exact (bound 0 where the plan drops nothing)."""
    rng = np.random.default_rng(3800)
    m, n, p = 6, 9, 5
    if kind == "float64":
        a0, b0 = rng.normal(size=(m, n)), rng.normal(size=(n, p))
    elif kind == "float32":
        a0 = rng.normal(size=(m, n)).astype(np.float32).astype(float)
        b0 = rng.normal(size=(n, p)).astype(np.float32).astype(float)
    elif kind == "int8":
        a0 = rng.integers(-128, 128, (m, n)).astype(float)
        b0 = rng.integers(-128, 128, (n, p)).astype(float)
    else:
        a0 = rng.normal(size=(m, n)) * np.exp2(rng.integers(-60, 61, (m, n)))
        b0 = rng.normal(size=(n, p)).astype(np.float32).astype(float)
    for ka, kb in ((1, 1), (3, 3), (1, 3), (3, 1), (2, 3)):
        a, b = np.zeros((ka, m, n)), np.zeros((kb, n, p))
        a[0], b[0] = a0, b0
        for words, prec, rounding in SETTINGS:
            _product(a, b, words, prec, rounding)
        if kind == "int8":
            for words in (1, 2, 3):
                out = digits.matmul_words(a, b, 133, 0.0, words)
                assert out is not None
                _verify(a, b, out)
                assert np.array_equal(out[0][0], a0 @ b0)


@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (1, 7, 1), (5, 1, 4), (1, 1, 9), (9, 1, 1), (1, 40, 1), (17, 3, 1)]
)
def test_degenerate_shapes(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    m, n, p = shape
    for ka, kb in ((1, 3), (3, 1), (3, 3)):
        a, b = _expansion(rng, (m, n), ka, 30), _expansion(rng, (n, p), kb, 30)
        for words, prec, rounding in SETTINGS[:3]:
            _product(a, b, words, prec, rounding)
            _product(a, b, words, prec, rounding, forced=True)


def test_empty_products() -> None:
    for m, n, p in ((0, 3, 2), (2, 3, 0), (0, 3, 0)):
        out = digits.matmul_words(np.zeros((3, m, n)), np.zeros((3, n, p)), 133, R3, 3)
        assert out is not None and out[0].shape == (3, m, p) and out[1].shape == (m, p)
    assert digits.matmul_words(np.zeros((3, 2, 0)), np.zeros((3, 0, 2)), 133, R3, 3) is None


def test_split_diagonals_of_random_expansions() -> None:
    """n = 11000: the longest diagonals split into parts; every result checked exactly."""
    rng = np.random.default_rng(3900)
    n = 11000
    a, b = _expansion(rng, (2, n), 3, 3), _expansion(rng, (n, 3), 3, 3)
    for words, prec, rounding in ((3, 133, R3), (2, 108, R2), (3, 90, R3)):
        pl = digits.plan(n, prec, 3, 3, rounding)
        assert any(digits._count(s, pl.ta, pl.tb) * n > digits.PAIR_TERMS
                   for s in range(pl.last + 1))  # fmt: skip
        _product(a, b, words, prec, rounding)


# ---- plans for every legitimate argument (the finding) ---------------------------------------


def test_plan_accepts_or_declines_every_legitimate_shape() -> None:
    """plan(n, prec, ...) for 1 <= n <= PAIR_TERMS (the inner dimensions matmul_words plans)
    and prec 20..149 is a Plan or ValueError (matmul_words and crt.matmul_words decline on
    ValueError only); f86e464 raises AssertionError from n = 54973 at prec 133."""
    failures = []
    for n in (1, 2, 1000, 8000, 30000, 49738, 54972, 54973, 65281, 100000, digits.PAIR_TERMS):
        for prec in (20, 53, 108, 133, 149):
            for k, widths in ((1, (0, 0)), (3, (0, 0)), (3, (52, 0))):
                try:
                    digits.plan(n, prec, k, k, R3, *widths)
                except ValueError:
                    pass
                except AssertionError as exc:
                    failures.append((n, prec, k, widths, str(exc)))
    assert not failures, failures[:4]


def _long_operands() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4000)
    n = 54973
    a, b = _expansion(rng, (1, n), 3, 2), _expansion(rng, (n, 1), 3, 2)
    assert crt.exact_widths(a, b, n, 133, R3) == (0, 0)
    return a, b


def test_long_inner_dimensions_decline_or_are_right() -> None:
    """n = 54973 (3-word operands, prec 133): the digit engine returns None or a sound
    result (f86e464: AssertionError from plan)."""
    a, b = _long_operands()
    out = digits.matmul_words(a, b, 133, R3, 3)
    if out is not None:
        _verify(a, b, out)


def test_long_inner_dimensions_in_the_engine_chooser(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same product through the chooser the exact balls call (machine class amx, as torch
    reports on this machine, forced elsewhere): None or a sound result (AssertionError from
    f86e464 to 17d2a82; ce15a15 keeps the digit engine to n <= digits.MAX_INNER)."""
    a, b = _long_operands()
    monkeypatch.setattr(crt, "machine", lambda: "amx")
    try:  # fpgrad.arith.products where it exists, else crt's own choice
        from fpgrad.arith import products

        out = products.matmul_words(a, b, 133, R3, 3)
    except ImportError:
        out = crt.matmul_words(a, b, 133, R3, True, 3)
    if out is not None:
        _verify(a, b, out)
