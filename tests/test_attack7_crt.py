"""Adversarial review of the int8 CRT product engine's certificates (attack7).

Oracle: exact Python integers (every word times 2**1074); ``|exact - sum(terms)| <= bound``
is decided in integers, and balls must contain the exact product. The findings hold against
fpgrad.arith.jit_crt / crt and against the float64 engine (fpgrad.arith.ozaki, the fallback).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fpgrad.arith import crt, digits, ozaki
from fpgrad.arith import expansion as xp
from fpgrad.arith.ball import Ball, BallArith

PREC, ROUNDING = 133, 8 * xp.ETA[3]
SHIFT = 1074  # every float64 is an integer times 2**-1074
pytestmark = pytest.mark.skipif(not crt.usable(), reason="torch._int_mm absent or inexact here")


def spy_crt(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, per product of the CRT engine from here on (crt.matmul_words, which crt.matmul
    and BallArith call), whether the int8 engine computed it."""
    real = crt.matmul_words
    calls: list[bool] = []

    def spy(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(out is not None)
        return out

    monkeypatch.setattr(crt, "matmul_words", spy)
    return calls


def _ints(x: np.ndarray) -> np.ndarray:
    """(k, r, c) words -> (r, c) exact sums as Python ints times 2**SHIFT."""
    out = np.empty(x.shape[1:], dtype=object)
    for idx in np.ndindex(*x.shape[1:]):
        total = 0
        for w in x[(slice(None), *idx)]:
            num, den = float(w).as_integer_ratio()
            total += num * (2**SHIFT // den)
        out[idx] = total
    return out


def _misses(a: np.ndarray, b: np.ndarray, terms: np.ndarray, bound: np.ndarray) -> int:
    """How many elements have ``|a @ b - sum(terms)| > bound`` (exactly, in integers)."""
    want = _ints(a) @ _ints(b)  # times 2**(2 SHIFT)
    got = _ints(terms) * 2**SHIFT
    bad = 0
    for idx in np.ndindex(*want.shape):
        num, den = float(bound[idx]).as_integer_ratio()
        bad += abs(want[idx] - got[idx]) * den > num * 2 ** (2 * SHIFT)
    return bad


def _encloses(a: np.ndarray, b: np.ndarray, out: Ball) -> bool:
    """Whether every ball of ``out`` contains the exact product of the words of a and b."""
    return _misses(a, b, out.mid, np.asarray(out.rad)) == 0


def _sound_or_none(a: np.ndarray, b: np.ndarray, prec: int = PREC) -> bool:
    """crt.matmul declines (None) or its terms are within its bound; False if it claims more."""
    out = crt.matmul(a, b, prec, ROUNDING)
    if out is None:
        return True
    terms, bound, _ = out
    return _misses(a, b, terms, bound) == 0


def _ones(n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((3, 2, n))
    b = np.zeros((3, n, 2))
    a[0], b[0] = 1.0, 1.0
    return a, b


# ---- finding 1: huge lower words that cancel (a non-canonical expansion) ---------------------
# word 1 = 2**(e+s), word 2 = -2**(e+s): the element is word 0, but the chunk sum
# (s0 + s1) + s2 rounded s0 away (not exact past 2**53 units): the top chunk was lost while
# |d| stayed within its cap. Before the fix: an error of 1.0 against a bound of 1e-41.


@pytest.mark.parametrize("shift", [60, 70, 200])
@pytest.mark.parametrize("side", ["a", "b"])
def test_huge_cancelling_lower_words_are_declined(shift: int, side: str) -> None:
    a, b = _ones()
    x, pos = (a, (0, 3)) if side == "a" else (b, (3, 1))
    x[(1, *pos)], x[(2, *pos)] = 2.0**shift, -(2.0**shift)
    assert crt.matmul(a, b, PREC, ROUNDING) is None
    x[(2, *pos)] = 0.0  # not cancelling: a chunk above its cap, declined as before
    assert crt.matmul(a, b, PREC, ROUNDING) is None


def test_huge_cancelling_lower_words_float64_engine() -> None:
    a, b = _ones()
    a[1, 0, 3], a[2, 0, 3] = 2.0**70, -(2.0**70)
    terms, bound, risk = ozaki.matmul_levels(a, b, PREC, ROUNDING)
    assert risk or _misses(a, b, terms, bound) == 0


def test_huge_cancelling_lower_words_ball_product(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _ones()
    a[1, 0, 3], a[2, 0, 3] = 2.0**70, -(2.0**70)
    monkeypatch.setattr(crt, "applies", lambda m, n, p: True)
    ar = BallArith(150)
    out = ar._matmul(Ball(a, np.zeros(a.shape[1:])), Ball(b, np.zeros(b.shape[1:])))
    assert ar.range_errors or _encloses(a, b, out)


# ---- finding 2: a zero word 0 over non-zero lower words ------------------------------------
# The row (column) scale is 0 (a proven-zero row) while its lower words hold a value: before
# the fix crt returned 0 with bound 0 (errors up to 8.0 here).


@pytest.mark.parametrize("low", [1.0, 2.0**-60, 2.0**-300, -(2.0**-1074)])
@pytest.mark.parametrize("side", ["a", "b"])
def test_zero_top_word_over_nonzero_lower_words(low: float, side: str) -> None:
    a, b = _ones()
    if side == "a":
        a[0, 0], a[1, 0, 2], a[2, 0, 5] = 0.0, low, -low / 3
    else:
        b[0, :, 1], b[1, 2, 1], b[2, 5, 1] = 0.0, low, low
    assert crt.matmul(a, b, PREC, ROUNDING) is None
    a, b = _ones()
    a[:, 0], b[:, :, 1] = -0.0, -0.0  # signed zeros: a genuine zero row and column
    out = crt.matmul(a, b, PREC, ROUNDING)
    assert out is not None and not out[0][:, 0].any() and not out[1][0].any()


def test_zero_top_word_float64_engine() -> None:
    rng = np.random.default_rng(1)
    a, b = np.zeros((3, 2, 16)), np.zeros((3, 16, 2))
    a[0, 1], b[0] = rng.normal(size=16), rng.normal(size=(16, 2))
    b[1] = b[0] * rng.normal(size=(16, 2)) * 2.0**-60
    a[1, 0] = rng.normal(size=16) * 2.0**-300
    a[2, 0] = a[1, 0] * rng.normal(size=16) * 2.0**-60
    terms, bound, risk = ozaki.matmul_levels(a, b, PREC, ROUNDING)
    assert risk or _misses(a, b, terms, bound) == 0


# ---- finding 3: NaN operands -----------------------------------------------------------------
# NaN chunks passed ``abs(d) > cap`` (False for NaN) and np.int8(NaN) gave residues: crt
# returned finite terms (7.0 for a row of 8 ones with one NaN), risk False; a NaN row (word 0
# all NaN: scale 0) came back as an exact 0.


@pytest.mark.parametrize("where", ["word0", "row", "word2", "inf", "inf_word1"])
def test_nan_and_inf_operands_are_declined(where: str) -> None:
    a, b = _ones()
    if where == "word0":
        a[0, 0, 0] = np.nan
    elif where == "row":
        a[0, 0, :] = np.nan
    elif where == "word2":
        a[2, 0, 0] = np.nan
    elif where == "inf":
        a[0, 0, 0] = np.inf
    else:
        a[1, 0, 0] = -np.inf
    assert crt.matmul(a, b, PREC, ROUNDING) is None


def test_nan_operand_is_not_certified_by_the_ball_product() -> None:
    rng = np.random.default_rng(2)
    m, n = crt.MIN_OUTER, crt.MIN_INNER
    am, bm = rng.normal(size=(m, n)), rng.normal(size=(n, m))
    am[3, 5] = np.nan
    ar = BallArith(150)
    with np.errstate(invalid="ignore"):
        out = ar._matmul(ar.asarray(am), ar.asarray(bm))
    assert np.isnan(out.mid[0, 3]).all() and ar.range_errors > 0


# ---- finding 4: no plan -> AssertionError instead of None ----------------------------------


@pytest.mark.parametrize("prec", [150, 200, 1000])
def test_precisions_without_a_plan_are_declined(prec: int) -> None:
    a, b = _ones()
    assert crt.matmul(a, b, prec, ROUNDING) is None


@pytest.mark.parametrize("prec", [53, 64, 100, 108, 133, 149])
def test_every_planned_precision_is_sound(prec: int) -> None:
    rng = np.random.default_rng(prec)
    a, b = _gen(rng, 3, (3, 20), prec, "canon"), _gen(rng, 3, (20, 3), prec, "canon")
    out = crt.matmul(a, b, prec, ROUNDING)
    assert out is not None and _misses(a, b, out[0], out[1]) == 0


def test_more_than_three_words_are_declined() -> None:
    a, b = _ones()
    a4 = np.concatenate([a, np.zeros((2, *a.shape[1:]))])
    assert crt.matmul(a4, b, PREC, ROUNDING) is None
    assert crt.matmul(a, np.concatenate([b, b[:1]]), PREC, ROUNDING) is None


def test_float64_engine_more_than_three_words() -> None:
    code = textwrap.dedent("""
        import numpy as np
        from fractions import Fraction
        from fpgrad.arith import ozaki
        a, b = np.zeros((4, 2, 8)), np.zeros((1, 8, 2))
        a[0], a[3], b[0] = 1.0, 1.0, 1.0
        try:
            t, bound, risk = ozaki.matmul_levels(a, b, 133, 0.0)
        except (ValueError, AssertionError):
            print("declined")
        else:
            got = sum(Fraction(float(x)) for x in t[:, 0, 0])
            print("sound" if risk or abs(got - 16) <= Fraction(float(bound[0, 0])) else "unsound")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() in ("declined", "sound"), run.stdout


def test_float64_engine_declines_four_words_on_either_side() -> None:
    a, b = _ones()
    with pytest.raises(ValueError):
        ozaki.matmul_levels(a, np.concatenate([b, b[:1]]), PREC, ROUNDING)
    with pytest.raises(ValueError):
        ozaki.matmul_levels(a[:0], b, PREC, ROUNDING)


def test_slicing_counts_words_off_their_scale() -> None:
    """jit_ball.slices' faults: lower words above 2**e, NaN, inf, non-zero words under a zero
    word 0; none for canonical words, exact zero rows or lower words at 2**e exactly."""
    rng = np.random.default_rng(3)
    x = _gen(rng, 3, (4, 16), PREC, "canon")
    levels, bits = 3, 20
    caps = ozaki.digit_caps(levels, bits, False)

    def faults(w: np.ndarray, by_row: bool = True) -> int:
        sl = np.empty((levels, *w.shape[1:]))
        tl = np.empty((levels + 1, *w.shape[1:]))
        rows, cols = w.shape[1:]
        s_at = [i * rows * cols for i in range(levels)]
        t_at = [t * rows * cols for t in range(levels + 1)]
        with np.errstate(all="ignore"):
            return ozaki._cut(w, by_row, bits, levels, sl, s_at, cols, tl, t_at, cols, caps)[5]

    assert faults(x) == 0 and faults(x, False) == 0
    e = np.frexp(np.abs(x[0]).max(axis=1) * (1 + 2.0**-48))[1]
    y = x.copy()
    y[1, 2, 5] = 2.0 ** e[2]  # at the bound: no fault
    y[:, 3] = 0.0  # an exact zero row
    assert faults(y) == 0
    for idx, val in [((1, 2, 5), 2.0 ** (e[2] + 1)), ((2, 0, 0), np.nan), ((0, 1, 1), np.inf),
                     ((2, 3, 7), 2.0**-1074), ((1, 3, 0), -np.nan)]:  # fmt: skip
        y = x.copy()
        y[:, 3] = 0.0
        y[idx] = val
        assert faults(y) == 1 or (val == np.inf and faults(y) > 1), idx  # inf: a void scale
    with pytest.raises(ValueError):
        faults(np.concatenate([x, x[:1]]))


@pytest.mark.parametrize("side", ["a", "b"])
def test_exact_products_of_non_canonical_words(side: str) -> None:
    a, b = _ones()
    x = a if side == "a" else b.transpose(0, 2, 1)  # rows of a, columns of b
    x[1, 0, 3], x[2, 0, 3] = 2.0**70, -(2.0**70)
    x[0, 1], x[1, 1, 2], x[2, 1, 5] = 0.0, 2.0**-300, -(2.0**-301)
    got = _ints(np.stack(ozaki.exact_products(a, b))) * 2**SHIFT
    assert (got == _ints(a) @ _ints(b)).all()
    x[2, 0, 0] = np.nan
    with pytest.raises(ValueError):
        ozaki.exact_products(a, b)


def test_float64_engine_on_adversarial_products() -> None:
    """120 seeded cases of every regime but "window": matmul_levels within its bound, no risk
    (non-canonical operands are renormalised exactly, not declined)."""
    rng = np.random.default_rng(8008)
    regimes = REGIMES[:10]
    for case in range(120):
        ra, rb = str(regimes[case % 10]), str(rng.choice(regimes))
        ka, kb = (int(k) for k in rng.integers(1, 4, 2))
        prec = int(rng.choice([53, 100, 133, 150]))
        n = int(rng.integers(1, 40))
        m, p = (int(k) for k in rng.integers(1, 4, 2))
        a = _gen(rng, ka, (m, n), prec, ra)
        b = _gen(rng, kb, (p, n), prec, rb).transpose(0, 2, 1)
        terms, bound, risk = ozaki.matmul_levels(a, b, prec, ROUNDING)
        assert not risk and _misses(a, b, terms, bound) == 0, (case, ra, rb, ka, kb, prec, n)


# ---- property test: seeded adversarial operands ----------------------------------------------

REGIMES = ("canon", "spread", "subnormal", "zeros", "pow2", "edge", "trunc", "opposing", "res127",
           "noncanon", "window")  # fmt: skip


def _gen(rng: np.random.Generator, k: int, shape: tuple[int, int], prec: int, regime: str,
         bits: int | None = None) -> np.ndarray:  # fmt: skip
    """(k, r, c) words of one regime; rows are the scaled lines (transpose for b)."""
    r, c = shape
    size = r * c
    lo, hi = (-700, 300) if regime == "spread" else (-20, 20)
    head = rng.uniform(1, 2, size) * np.ldexp(1.0, rng.integers(lo, hi + 1, size))
    head *= rng.choice([-1.0, 1.0], size)
    parts = [head] + [head * rng.normal(size=size) * 2.0 ** (-53 * i) for i in (1, 2)]
    x = xp.renorm(parts, 3).reshape(3, r, c)
    bits = bits or prec + 8
    if regime == "spread":
        x[:, np.arange(r), rng.integers(0, c, r)] = 0.0
        x[0, np.arange(r), rng.integers(0, c, r)] = 2.0**300
    elif regime == "subnormal":
        mask = rng.random((r, c)) < 0.4
        x[0][mask] = rng.integers(-(2**20), 2**20, mask.sum()) * 2.0**-1074
        x[1:, mask] = 0.0
    elif regime == "zeros":
        x[:, rng.random(r) < 0.4] = 0.0
        x[:, :, rng.random(c) < 0.3] = 0.0
        x[:, rng.random((r, c)) < 0.3] = 0.0
    elif regime == "pow2":
        e = int(rng.integers(-30, 30))
        x[0] = rng.choice([-1.0, 1.0], (r, c)) * 2.0**e
        x[1:] = 0.0
        if rng.random() < 0.5:
            x[1] = rng.choice([-1.0, 0.0, 1.0], (r, c)) * 2.0 ** (e - 54)
    elif regime == "edge":  # row maxima at / just below a power of two, inflation edge
        e = int(rng.integers(-10, 10))
        tops = [2.0**e, np.nextafter(2.0**e, 0), 2.0**e * (1 - 2.0**-48), 2.0**e * (1 - 2.0**-49),
                2.0**e * (1 - 2.0**-47), 2.0**e * (1 + 2.0**-52)]  # fmt: skip
        x[:] = x * 2.0 ** (e - 21)
        for q in range(r):
            t = float(rng.choice(tops)) * float(rng.choice([-1.0, 1.0]))
            x[:, q, int(rng.integers(c))] = [t, np.copysign(np.spacing(t) / 2, -t), 0.0]
    elif regime == "trunc":  # lower words at the truncation bit 2**(e - B) of the row scale
        e = np.frexp(np.abs(x[0]).max(axis=1) * (1 + 2.0**-48))[1][:, None]
        unit = np.ldexp(1.0, e - bits)
        x[1] = unit * rng.choice([-1.5, -1.0, -0.5, 0.5, 1.0, 0.5 + 2.0**-20], (r, c))
        x[2] = unit * rng.choice([-0.5, 0.0, 0.25], (r, c)) * 2.0**-20
    elif regime == "opposing":  # non-canonical: lower words oppose the top word
        x[0] = np.ldexp(rng.choice([-1.0, 1.0], (r, c)), rng.integers(-3, 3, (r, c)))
        x[1] = -x[0] * 2.0**-53
        x[2] = x[0] * rng.choice([2.0**-106, -(2.0**-80), 2.0**-54], (r, c))
    elif regime == "res127":  # integers X at +-127, +-128, +-(2**B - 1) units
        ints = rng.choice([127, -127, 128, -128, 1, -1, 254, 2**53 - 1], (r, c)).astype(float)
        x[0] = ints * 2.0**-60
        x[1:] = 0.0
        x[0, :, 0] = 2.0**-61 * rng.choice([1.0, -1.0], r)  # rows of scale 2**-60
    elif regime == "noncanon":  # huge cancelling lower words; word 0 zero over lower words
        q = int(rng.integers(r))
        big = 2.0 ** float(rng.integers(30, 300)) * np.abs(x[0, q]).max()
        x[1, q, int(rng.integers(c))] += big
        x[2, q, int(rng.integers(c))] -= big
        x[0, int(rng.integers(r))] = 0.0  # its lower words stay
    elif regime == "window":  # near the window edges 2**-860 / 2**1000: None allowed
        x = x * 2.0 ** float(rng.choice([-840.0, -870.0, 970.0, 990.0, 1000.0]))
    return x[:k].copy()


def test_adversarial_products_within_their_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """300 seeded cases: random regimes (both operands), words 1..3, prec 53..149, short and
    cut inner dimensions. Every crt result is within its bound; declines only where expected."""
    rng = np.random.default_rng(7007)
    declined = {reg: 0 for reg in REGIMES}
    done = 0
    for case in range(300):
        ra, rb = rng.choice(REGIMES, 2)
        ka, kb = rng.integers(1, 4, 2)
        prec = int(rng.choice([53, 64, 80, 100, 108, 120, 133, 140, 149]))
        n = int(rng.integers(1, 40))
        m, p = rng.integers(1, 4, 2)
        bits = crt.plan(n, prec, int(ka), int(kb), ROUNDING).a.bits
        a = _gen(rng, int(ka), (int(m), n), prec, str(ra), bits)
        b = _gen(rng, int(kb), (int(p), n), prec, str(rb), bits).transpose(0, 2, 1)
        with monkeypatch.context() as mp:
            if case % 4 == 0:
                mp.setattr(crt, "INT32_TERMS", int(rng.integers(1, 9)))  # int64 sums
            out = crt.matmul(a, b, prec, ROUNDING)
        if out is None:
            declined[str(ra)] += 1
            declined[str(rb)] += 1
            assert {"window", "subnormal", "noncanon"} & {ra, rb}, (case, ra, rb)
            continue
        terms, bound, risk = out
        assert not risk
        assert _misses(a, b, terms, bound) == 0, (case, ra, rb, ka, kb, prec, n)
        done += 1
    assert done > 180 and declined["window"] > 0 and declined["noncanon"] > 0, (done, declined)


@pytest.mark.parametrize("bits", [100, 150])
def test_both_engines_enclose_adversarial_ball_products(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BallArith.matmul with the CRT engine and with the float64 engine alone, same inputs."""
    rng = np.random.default_rng(bits)
    ar = BallArith(bits)
    for case in range(12):
        # not "window"; not "noncanon": BallArith's radius terms take |x| <= |word 0| HI_BOUND
        # (its own midpoints are canonical); the engine alone on it: test_float64_engine_on_...
        reg = str(REGIMES[case % 9])
        n = int(rng.integers(5, 30))
        am = _gen(rng, ar.k, (3, n), ar.mm_prec, reg)
        bm = _gen(rng, ar.k, (2, n), ar.mm_prec, str(rng.choice(REGIMES[:9]))).transpose(0, 2, 1)
        arad = np.abs(am[0]) * 2.0**-130 * (case % 2)
        for engine in (True, False):
            with monkeypatch.context() as mp:
                mp.setattr(crt, "applies", lambda m, n, p, e=engine: e)
                out = ar._matmul(Ball(am, arad), Ball(np.ascontiguousarray(bm), np.zeros((n, 2))))
            # the radius part |a.rad| |b| adds to the error: |exact - mid| + it <= rad
            part = _ints(arad[None]) @ np.abs(_ints(bm))
            miss = _ints(am) @ _ints(bm) - _ints(out.mid) * 2**SHIFT
            for idx in np.ndindex(*miss.shape):
                num, den = float(out.rad[idx]).as_integer_ratio()
                assert (abs(miss[idx]) + part[idx]) * den <= num * 2 ** (2 * SHIFT), (case, reg)
        assert ar.range_errors == 0


@pytest.mark.parametrize("flip", [False, True])
def test_engine_shape_ball_products_enclose_on_a_sample(
    flip: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real path (crt.applies and crt.cost choose the engine for 64 x 192 x 64) on mixed
    adversarial rows, a transposed operand (the flipped product) and int64 sums: 8 x 8
    elements checked."""
    rng = np.random.default_rng(77 + flip)
    m, n = 64, 192
    ar = BallArith(150)
    regs = ["spread", "trunc", "zeros", "edge", "res127", "pow2", "opposing", "subnormal"]
    am = np.concatenate([_gen(rng, 3, (8, n), ar.mm_prec, r) for r in regs], axis=1)
    bt = np.concatenate([_gen(rng, 3, (8, n), ar.mm_prec, r) for r in regs[::-1]], axis=1)
    bm = bt.transpose(0, 2, 1) if flip else np.ascontiguousarray(bt.transpose(0, 2, 1))
    monkeypatch.setattr(crt, "fast", lambda: True)  # the engine, whatever this CPU's int8 unit
    monkeypatch.setattr(digits, "COSTS", {})  # not the digit engine (tests/test_digits.py)
    assert crt.applies(m, n, m)
    monkeypatch.setattr(crt, "INT32_TERMS", 50)
    calls = spy_crt(monkeypatch)
    out = ar._matmul(Ball(am, np.zeros((m, n))), Ball(bm, np.zeros((n, m))))
    assert calls == [True] and ar.range_errors == 0
    rows, cols = rng.choice(m, 8, replace=False), rng.choice(m, 8, replace=False)
    sub = Ball(out.mid[:, rows][:, :, cols], np.asarray(out.rad)[np.ix_(rows, cols)])
    assert _encloses(am[:, rows], bm[:, :, cols], sub)


@pytest.mark.parametrize("prec", [53, 108, 133])
def test_window_edges_are_sound_or_declined(prec: int) -> None:
    """Scale exponents at the plan's window (row scales near 2**lo, 2**1000) and at the
    engine's range limits (``ea + eb - 2B - 60`` at -1000, ``ea + eb`` at 900), +-2."""
    rng = np.random.default_rng(prec)
    n = 24
    pl = crt.plan(n, prec, 2, 2, ROUNDING)
    pairs = []
    for total in range(2 * pl.a.bits - 942, 2 * pl.a.bits - 937):
        pairs += [(ea, total - ea) for ea in (pl.a.lo - 1, pl.a.lo, pl.a.lo + 1, total // 2)]
    pairs += [(ea, t - ea) for t in (898, 899, 900, 901) for ea in (1001, 1000, 999, 500)]
    seen = {"none": 0, "done": 0}
    for ea, eb in pairs:
        a, b = rng.normal(size=(2, 3, n)), rng.normal(size=(2, n, 3))
        a[1], b[1] = a[1] * 2.0**-60, b[1] * 2.0**-60
        a[0, :, 0], b[0, 0, :] = 0.75, 0.75  # scales 2**ea, 2**eb
        a, b = a * 2.0**ea, b * 2.0**eb
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            continue
        out = crt.matmul(a, b, prec, ROUNDING)
        seen["none" if out is None else "done"] += 1
        assert out is None or _misses(a, b, out[0], out[1]) == 0, (ea, eb)
    assert seen["none"] > 0 and seen["done"] > 0, seen
