"""The int8 digit product engine (fpgrad.arith.digits): exact digits, sound bounds, faults
declined, the split of long diagonals, and where fpgrad.arith.crt chooses it."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from fpgrad.arith import crt, digits, jit_digits, products
from fpgrad.arith import expansion as xp

pytestmark = pytest.mark.skipif(
    not (crt.usable() and digits.usable()), reason="torch._int_mm is not exact here"
)

ROUND3 = 8 * xp.ETA[3]
ROUND2 = 8 * xp.ETA[2]


def _words(
    rng: np.random.Generator, shape: tuple[int, int], k: int, spread: int = 20
) -> np.ndarray:
    x = rng.normal(size=shape) * np.exp2(rng.integers(-spread, spread + 1, size=shape))
    w = [x]
    for _ in range(k - 1):
        w.append(w[-1] * 2.0**-53 * rng.uniform(-1, 1, size=shape))
    return np.stack(w)


def _exact(x: np.ndarray) -> list[list[Fraction]]:
    return [[sum((Fraction(float(x[w, i, j])) for w in range(x.shape[0])), Fraction(0))
             for j in range(x.shape[2])] for i in range(x.shape[1])]  # fmt: skip


def _check(a: np.ndarray, b: np.ndarray, out: tuple) -> float:
    """Every result within its bound (exact rationals); returns the largest error / bound."""
    mid, bound = out[0], out[1]
    ea, eb = _exact(a), _exact(b)
    worst = 0.0
    for i in range(a.shape[1]):
        for j in range(b.shape[2]):
            c = sum((ea[i][k] * eb[k][j] for k in range(a.shape[2])), Fraction(0))
            got = sum((Fraction(float(mid[w, i, j])) for w in range(mid.shape[0])), Fraction(0))
            err = abs(got - c)
            assert err <= Fraction(float(bound[i, j])), (i, j, float(err), float(bound[i, j]))
            if bound[i, j] > 0:
                worst = max(worst, float(err / Fraction(float(bound[i, j]))))
    return worst


def _spy_digits(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, per call of the digit engine from here on, whether it computed the product."""
    real = digits.matmul_words
    calls: list[bool] = []

    def spy(*args: object) -> object:
        out = real(*args)  # type: ignore[arg-type]
        calls.append(out is not None)
        return out

    monkeypatch.setattr(digits, "matmul_words", spy)
    return calls


@pytest.mark.parametrize("seed", range(8))
def test_products_are_within_their_bound(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, n, p = (int(v) for v in rng.integers(1, 14, 3))
    ka, kb = (int(v) for v in rng.integers(1, 4, 2))
    a, b = _words(rng, (m, n), ka), _words(rng, (n, p), kb)
    if seed % 3 == 1:  # zero rows and columns, cancelling pairs
        a[:, 0] = 0.0
        b[:, :, -1] = 0.0
        if n > 1:
            a[:, -1, 1] = -a[:, -1, 0]
            b[:, 1] = b[:, 0]
    for words, prec, rounding in ((3, 133, ROUND3), (2, 108, ROUND2), (3, 60, ROUND3)):
        out = digits.matmul_words(a, b, prec, rounding, words)
        assert out is not None
        assert np.isfinite(out[0]).all() and np.isfinite(out[1]).all()
        _check(a, b, out)


def test_exact_cuts_are_exact_products() -> None:
    """float64 data on both sides: every pair kept, the product rounded only into the words."""
    rng = np.random.default_rng(3)
    a = np.zeros((3, 7, 9))
    b = np.zeros((3, 9, 5))
    a[0], b[0] = rng.normal(size=(7, 9)), rng.normal(size=(9, 5))
    widths = crt.exact_widths(a, b, 9, 133, ROUND3)
    assert all(widths)
    pl = digits.plan(9, 133, 3, 3, ROUND3, *widths)
    assert pl.last == pl.ta + pl.tb - 2  # no diagonal dropped
    out = digits.matmul_words(a, b, 133, ROUND3, 3, pl)
    assert out is not None
    _check(a, b, out)
    exact = np.array([[float(v) for v in row] for row in _exact(out[0][:1])])
    assert np.array_equal(out[0][0], exact)


@pytest.mark.parametrize("per_row", [True, False])
def test_digits_are_the_cut_integers(per_row: bool) -> None:
    """The balanced base-256 digits sum to the scaled integer X of the cut, at the extremes of
    what the digits hold: X 2**(e - B) is the operand for an exact cut."""
    pl = digits.plan(8, 133, 1, 1, 0.0, 64, 64)
    c = pl.a
    rng = np.random.default_rng(5)
    ints = [int(v) for v in rng.integers(-(2**62), 2**62, 30)]
    ints += [2**63 - 1 - 2**11, -(2**63) + 2**11, 0, 1, -1, 127, -128, 2**56 - 1]
    x = np.array([float(v) for v in ints]).reshape(1, -1)
    words = x[None] if per_row else x.T[None]
    rows, cols = words.shape[1:]
    q = rows if per_row else cols
    expo, top = np.empty(q, dtype=np.int64), np.empty(q)
    out = np.empty((rows, pl.ta, cols) if per_row else (pl.ta, rows, cols), dtype=np.int8)
    assert jit_digits.digits(words, per_row, c.bc, c.nch, c.lo, c.hi, c.caps, expo, top, out,
                             c.exact) == 0  # fmt: skip
    for idx, v in enumerate(x[0]):
        r, col = (0, idx) if per_row else (idx, 0)
        ds = out[r, :, col] if per_row else out[::-1, r, col]  # most significant first
        got = 0
        for d in ds:
            got = got * 256 + int(d)
        e = int(expo[r] if per_row else expo[col])
        assert Fraction(got) * Fraction(2) ** (e - c.bits) == Fraction(float(v))


def test_faults_and_the_window_decline() -> None:
    rng = np.random.default_rng(7)
    a, b = _words(rng, (6, 5), 3), _words(rng, (5, 4), 3)
    for bad in (np.nan, np.inf):
        x = a.copy()
        x[0, 2, 3] = bad
        assert digits.matmul_words(x, b, 133, ROUND3, 3) is None
    x = a.copy()
    x[2, 1, 1] = 1e30  # a lower word far above word 0
    assert digits.matmul_words(x, b, 133, ROUND3, 3) is None
    x = a.copy()
    x[0, 4] = 0.0  # a zero word 0 over non-zero lower words
    assert digits.matmul_words(x, b, 133, ROUND3, 3) is None
    for scale in (2.0**-990, 2.0**960):
        assert digits.matmul_words(a * scale, b, 133, ROUND3, 3) is None


def test_long_diagonals_are_split_and_exact() -> None:
    """pairs n 2**14 >= 2**31: the diagonals are summed in int64 from parts; the results are
    the CRT engine's words (both bounds hold against each other) and within an exact check
    on a few columns."""
    rng = np.random.default_rng(11)
    n = 9000
    a, b = _words(rng, (3, n), 3, spread=2), _words(rng, (n, 2), 3, spread=2)
    pl = digits.plan(n, 133, 3, 3, ROUND3)
    assert any(digits._count(s, pl.ta, pl.tb) * n > digits.PAIR_TERMS for s in range(pl.last + 1))
    out = digits.matmul_words(a, b, 133, ROUND3, 3, pl)
    ref = crt.matmul_words(a, b, 133, ROUND3, False, 3)
    assert out is not None and ref is not None
    diff = np.abs((out[0][0] - ref[0][0]) + (out[0][1] - ref[0][1]) + (out[0][2] - ref[0][2]))
    assert (diff <= out[1] + ref[1]).all()
    _check(a[:, :1], b[:, :, :1], (out[0][:, :1, :1], out[1][:1, :1]))


def test_plan_meets_its_target() -> None:
    """The dropped diagonals and the cut each err below 2**-(prec + 8) per unit, and the
    combine's groups stay exact."""
    for n, prec, widths in ((128, 133, (0, 0)), (256, 133, (52, 0)), (64, 108, (52, 68))):
        pl = digits.plan(n, prec, 3, 3, ROUND3, *widths)
        assert pl.factor < 2.0 ** -(prec + 6)
        assert pl.last <= pl.ta + pl.tb - 2
        big = max(digits._count(s, pl.ta, pl.tb) for s in range(pl.last + 1)) * n * 2**14
        assert big * 65793 < 2**50


def test_products_choose_the_digit_engine_by_machine_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the class has digit constants and they estimate it cheaper, products.matmul_words
    returns the digit engine's words; a class without them never takes it."""
    rng = np.random.default_rng(2)
    a, b = _words(rng, (256, 128), 3, spread=1), _words(rng, (128, 256), 3, spread=1)
    real = digits.matmul_words
    calls = _spy_digits(monkeypatch)
    monkeypatch.setattr(crt, "fast", lambda: True)
    for cls in ("amx", "vnni"):
        monkeypatch.setattr(crt, "machine", lambda cls=cls: cls)
        calls.clear()
        pl = crt.plan(128, 133, 3, 3, ROUND3)
        dp = digits.plan(128, 133, 3, 3, ROUND3)
        dig = digits.cost(256, 128, 256, dp)
        crt_ms, oz_ms = crt.cost(256, 128, 256, 3, 3, pl, 133)
        out = products.matmul_words(a, b, 133, ROUND3, 3)
        took = dig is not None and dig < min(crt_ms, oz_ms)
        assert bool(calls) == took
        if cls == "vnni":
            assert dig is None and not calls
        else:  # this shape (both operands 3-word balls, inner dimension 128) is its case
            assert took
        if took:
            assert out is not None
            ref = real(a, b, 133, ROUND3, 3)
            assert ref is not None and np.array_equal(out[0], ref[0])


def test_a_word_count_out_of_range_is_an_error() -> None:
    """Not a crash of the compiled kernels' 3-row scratch (attack31): a ValueError."""
    rng = np.random.default_rng(1)
    a, b = _words(rng, (4, 5), 3), _words(rng, (5, 3), 3)
    with pytest.raises(ValueError, match="words"):
        digits.matmul_words(a, b, 133, ROUND3, 4)
    with pytest.raises(ValueError, match="words"):
        crt.matmul_words(a, b, 133, ROUND3, False, 4)


@pytest.mark.parametrize("flip", [False, True])
def test_ball_products_in_the_digit_engine_enclose(
    flip: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BallArith's real path with the digit engine forced (an "amx" class, its cost 0) on
    attack7's adversarial rows (spread, truncation edges, zeros, subnormal, opposing pairs),
    radii on both operands and a transposed operand: every checked element encloses the
    exact product of the midpoints."""
    from fpgrad.arith.ball import BallArith
    from fpgrad.arith.ball_base import Ball
    from tests.test_attack7_crt import _encloses, _gen

    rng = np.random.default_rng(31 + flip)
    m, n = 48, 96
    ar = BallArith(150)
    regs = ["spread", "trunc", "zeros", "edge", "res127", "pow2", "opposing", "subnormal"]
    am = np.concatenate([_gen(rng, 3, (6, n), ar.mm_prec, r) for r in regs], axis=1)
    bt = np.concatenate([_gen(rng, 3, (6, n), ar.mm_prec, r) for r in regs[::-1]], axis=1)
    bm = bt.transpose(0, 2, 1) if flip else np.ascontiguousarray(bt.transpose(0, 2, 1))
    monkeypatch.setattr(crt, "fast", lambda: True)
    monkeypatch.setattr(crt, "machine", lambda: "amx")
    monkeypatch.setattr(digits, "cost", lambda *a: 0.0)
    calls = _spy_digits(monkeypatch)
    ra = np.abs(am[0]) * 2.0**-100
    out = ar._matmul(Ball(am, ra), Ball(bm, np.zeros((n, m))))
    assert calls == [True]
    rows, cols = rng.choice(m, 8, replace=False), rng.choice(m, 8, replace=False)
    sub = Ball(out.mid[:, rows][:, :, cols], np.asarray(out.rad)[np.ix_(rows, cols)])
    assert _encloses(am[:, rows], bm[:, :, cols], sub)


def test_row_blocks_give_the_same_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """Results computed in blocks of rows (at most digits.BLOCK_OUT each, bounding the diagonal
    sums in memory) are the words and bounds of one block, bit for bit."""
    rng = np.random.default_rng(21)
    a, b = _words(rng, (37, 24), 3), _words(rng, (24, 11), 2)
    whole = digits.matmul_words(a, b, 133, ROUND3, 3)
    monkeypatch.setattr(digits, "BLOCK_OUT", 40)  # 3 rows of 11 results per block
    blocked = digits.matmul_words(a, b, 133, ROUND3, 3)
    assert whole is not None and blocked is not None
    assert np.array_equal(whole[0], blocked[0]) and np.array_equal(whole[1], blocked[1])
    assert whole[3] == blocked[3]
    _check(a[:, :5], b, (blocked[0][:, :5], blocked[1][:5]))
