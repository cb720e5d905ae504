"""Adversarial review (attack29) of the int8 CRT engine's exact cuts and engine choice.

fpgrad.arith.crt cuts an operand exactly (no truncation error in its bound) when
jit_crt.exact_bits finds every word a multiple of 2**(e - E), and crt.cost picks the engine
per product. Here: exact_bits against a Fraction oracle on adversarial words (subnormals,
row maxima at and just below powers of two and the (1 + 2**-48) inflation edge, exact 2- and
3-word sums, -0.0 lower words, non-canonical lower words); the residue kernel's exact mode
against exact integers (every accepted cut gives the residues of the exact integer, every
cut narrower than the words is a fault); crt.matmul on operands of chosen exact widths (4
.. 170 bits, the 4-multiple and chunk boundaries, just past the truncated width), exact and
truncated mixed, at both BallArith precisions and other ones, near the window edges, with
int64 sums; BallArith._matmul with radii and transposed operands against the exact supremum
over the balls, with either engine; the engine choice's determinism; exact_trace of a small
dense/ReLU/MSE network against a Fraction oracle with the CRT engine forced.

Oracle: exact Python integers (words times 2**1074, tests.test_attack7_crt) and Fractions;
never a floating-point computation. No finding: every test here passes on 855dab4.
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from fpgrad.arith import crt, jit_crt
from fpgrad.arith import expansion as xp
from fpgrad.arith.ball import Ball, BallArith
from tests.test_attack7_crt import SHIFT, _ints, _misses, spy_crt
from tests.test_crt_exact_cuts import _need

pytestmark = pytest.mark.skipif(not crt.usable(), reason="torch._int_mm absent or inexact here")

R150, R100 = 8 * xp.ETA[3], 8 * xp.ETA[2]
PRECS = [(133, R150, 3), (108, R100, 2), (53, R150, 3), (149, R150, 3), (80, 0.0, 3)]


def _sym(x: int, m: int) -> int:
    r = x % m
    return r - m if r > m // 2 else r


# ---- exact_bits and the residue kernel's exact mode ------------------------------------------


def _rows(rng: np.random.Generator, k: int, r: int, c: int) -> np.ndarray:
    """(k, r, c) words, each row of one adversarial kind."""
    x = np.zeros((k, r, c))
    for q in range(r):
        kind = int(rng.integers(8))
        s = int(rng.integers(-30, 30))
        if kind == 0:  # subnormal row (outside every window: the kernel returns -1)
            x[0, q] = rng.integers(-(2**30), 2**30, c) * 2.0**-1074
        elif kind == 1:  # the row's max exactly a power of two
            x[0, q] = rng.normal(size=c) * 2.0**s / 8
            x[0, q, rng.integers(c)] = 2.0**s * rng.choice([-1, 1])
        elif kind == 2:  # max just below a power of two, around the (1 + 2**-48) inflation
            x[0, q] = np.ldexp(rng.integers(-(2**20), 2**20, c).astype(float), s - 20)
            edge = [1 - 2.0**-47, 1 - 2.0**-48, 1 - 2.0**-49, 1 - 2.0**-53, 1 - 2.0**-50]
            x[0, q, rng.integers(c)] = 2.0**s * float(rng.choice(edge))
        elif kind == 3:  # exact 2- and 3-word sums
            x[0, q] = rng.normal(size=c) * 2.0**s
            if k > 1:
                low = rng.integers(-(2**20), 2**20, c).astype(float)
                x[1, q] = np.ldexp(low, s - int(rng.integers(53, 100)))
            if k > 2:
                low = rng.integers(-(2**10), 2**10, c).astype(float)
                x[2, q] = np.ldexp(low, s - int(rng.integers(100, 150)))
        elif kind == 4:  # float32 data over -0.0 lower words
            x[0, q] = rng.normal(size=c).astype(np.float32)
            x[1:, q] = -0.0
        elif kind == 5:  # a zero row of signed zeros
            x[:, q] = rng.choice([0.0, -0.0], (k, c))
        elif kind == 6:  # lower words above their element's word 0, within the row's scale
            x[0, q] = rng.normal(size=c) * 2.0**-30
            x[0, q, 0] = 1.0
            if k > 1:
                x[1, q] = np.ldexp(rng.integers(-(2**10), 2**10, c).astype(float), -12)
        else:  # small integers
            x[0, q] = rng.integers(-16, 16, c)
    return x


def test_exact_bits_and_exact_residues_against_exact_integers() -> None:
    """400 seeded operands: exact_bits is the Fraction oracle's least width; for cut widths
    around it and at the chunk boundaries, the exact-mode kernel faults exactly when the cut
    is narrower than the words, and otherwise writes the residues of the exact integer
    ``x 2**(B - e)`` (which must be an integer)."""
    rng = np.random.default_rng(2901)
    seen: Counter[str] = Counter()
    for case in range(400):
        k = int(rng.integers(1, 4))
        r, c = int(rng.integers(1, 5)), int(rng.integers(1, 9))
        per_row = bool(rng.random() < 0.5)
        x = _rows(rng, k, r, c)
        if not per_row:
            x = np.ascontiguousarray(x.transpose(0, 2, 1))
        need = _need(x, per_row)
        assert jit_crt.exact_bits(x, per_row, 2000) == need, case
        widths = {max(4, need), max(4, -(-need // 4) * 4), max(4, need - 1), need + 1, 40, 41, 81}
        for width in sorted(w for w in widths if w <= 160):
            pl = crt.plan(16, 133, 3, 3, R150, width, width)
            cut = pl.a
            nq = x.shape[1] if per_row else x.shape[2]
            out = np.zeros((len(pl.mods), *x.shape[1:]), dtype=np.int8)
            expo, top = np.empty(nq, dtype=np.int64), np.empty(nq)
            faults = jit_crt.residues(
                x, per_row, cut.bc, cut.nch, cut.lo, cut.hi, pl.mods, cut.rtab, cut.caps,
                expo, top, out, True,
            )  # fmt: skip
            if faults == -1:
                seen["window"] += 1
                continue
            if cut.bits < need:
                assert faults > 0, (case, width, need)
                seen["fault"] += 1
                continue
            assert faults == 0, (case, width, need)
            for idx in np.ndindex(*x.shape[1:]):
                q = idx[0] if per_row else idx[1]
                v = sum((Fraction(float(w)) for w in x[(slice(None), *idx)]), Fraction(0))
                big = v * Fraction(2) ** (cut.bits - int(expo[q])) if top[q] > 0 else Fraction(0)
                assert big.denominator == 1, (case, width, idx)
                for j, m in enumerate(pl.mods):
                    assert int(out[(j, *idx)]) == _sym(big.numerator, int(m)), (case, width, idx)
            seen["exact"] += 1
    assert seen["exact"] > 500 and seen["fault"] > 200, seen


# ---- crt.matmul on operands of chosen exact widths ---------------------------------------------

WIDTHS = [1, 2, 3, 4, 5, 8, 24, 39, 40, 41, 44, 53, 60, 79, 80, 81, 84, 100, 106, 119, 120, 121,
          124, 136, 137, 140, 143, 144, 145, 148, 152, 159, 160, 161, 170]  # fmt: skip


def _line(
    rng: np.random.Generator, k: int, c: int, width: int, s: int, negzero: bool
) -> np.ndarray:
    """(k, c) words of one row: integers below 2**width times 2**(s - width), split exactly
    over the k words (the last word rounds what is left: then not exact), max near 2**s."""
    out = np.zeros((k, c))
    vals = []
    for _ in range(c):
        u = rng.random()
        if u < 0.15:
            big = 0
        elif u < 0.3:
            big = int(
                rng.choice([1, -1, 127, -128, 2**width - 1, -(2**width - 1), 2 ** (width - 1), 3])
            )
        else:
            big = int(rng.integers(-(2 ** min(width, 62)) + 1, 2 ** min(width, 62)))
            big = (big << max(0, width - 62)) | int(rng.random() < 0.5)
        vals.append(max(-(2**width - 1), min(2**width - 1, big)))
    j, u = int(rng.integers(c)), rng.random()
    sign = int(rng.choice([1, -1]))
    if u < 0.3:
        vals[j] = (2**width - 1) * sign
    elif u < 0.5:
        vals[j] = 2 ** (width - 1) * sign
    elif u < 0.6 and width > 50:
        vals[j] = (2**width - 2 ** (width - 50)) * sign  # (1 - 2**-50) 2**s: the scale bumps
    for jj, big in enumerate(vals):
        rest = big
        for w in range(k):
            if rest == 0:
                break
            cut = max(0, abs(rest).bit_length() - 53)
            hi = (abs(rest) >> cut) << cut
            hi = rest if w == k - 1 else (hi if rest > 0 else -hi)
            out[w, jj] = np.ldexp(float(hi), s - width)
            rest -= hi
        if negzero:
            out[1:, jj][out[1:, jj] == 0] = -0.0
    return out


def _operand(rng: np.random.Generator, k: int, r: int, c: int, kind: str) -> np.ndarray:
    x = np.zeros((k, r, c))
    for q in range(r):
        width = int(rng.choice(WIDTHS))
        lo, hi = {"up": (50, 400), "down": (-400, -50), "lowwin": (-995, -820),
                  "hiwin": (880, 1010)}.get(kind, (-40, 40))  # fmt: skip
        s = int(rng.integers(lo, hi))
        width = min(width, s + 1074)
        with np.errstate(all="ignore"):
            x[:, q] = _line(rng, k, c, max(1, width), s, kind == "negzero")
    if kind == "bigmess" and r:
        q = int(rng.integers(r))
        x[1 % k, q, int(rng.integers(c))] += np.abs(x[0, q]).max() * float(
            rng.choice([0.5, 1.0, 1.5])
        )
    return x


def test_exact_width_products_within_their_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """260 seeded products of rows of chosen exact widths (exact and truncated cuts mixed),
    words 1..3, five precisions, inner dimensions 1..300, int64 sums every third case: every
    result within its bound (exactly), exact cuts taken on both sides and on one side."""
    rng = np.random.default_rng(2902)
    kinds = ["plain", "plain", "negzero", "lowwin", "hiwin", "bigmess", "up", "up", "down", "down"]
    seen: Counter[str] = Counter()
    for case in range(260):
        prec, rounding, kmax = PRECS[int(rng.integers(len(PRECS)))]
        ka, kb = (int(v) for v in rng.integers(1, kmax + 1, 2))
        n = int(rng.choice([1, 2, 3, 7, 8, 9, 16, 33, 64, 130, 300]))
        m, p = (int(v) for v in rng.integers(1, 4, 2))
        kind_a, kind_b = (str(v) for v in rng.choice(kinds, 2))
        a = _operand(rng, ka, m, n, kind_a)
        b = np.ascontiguousarray(_operand(rng, kb, p, n, kind_b).transpose(0, 2, 1))
        with monkeypatch.context() as mp:
            if case % 3 == 0:
                mp.setattr(crt, "INT32_TERMS", int(rng.integers(1, 9)))
            with np.errstate(all="ignore"):
                ex = crt.exact_widths(a, b, n, prec, rounding)
                out = crt.matmul(a, b, prec, rounding)
        if out is None:
            seen["none"] += 1
            continue
        terms, bound, risk = out
        assert not risk
        assert _misses(a, b, terms, bound) == 0, (case, prec, ka, kb, n, kind_a, kind_b, ex)
        seen[f"done{bool(ex[0])}{bool(ex[1])}"] += 1
    assert seen["doneTrueTrue"] > 30 and seen["doneTrueFalse"] + seen["doneFalseTrue"] > 20, seen


@pytest.mark.parametrize(("prec", "rounding"), [(133, R150), (108, R100)])
def test_widths_at_chunk_boundaries_and_past_the_truncated_width(
    prec: int, rounding: float
) -> None:
    """One row of each width W: the exact width is W rounded up to 4 (0 past the truncated
    cut's width, where the operand is truncated), and the product with a 3-word operand
    and with a float64 one is within its bound."""
    rng = np.random.default_rng(prec)
    n = 20
    trunc = crt.plan(n, prec, 1, 1, rounding).a.bits
    other3 = _operand(rng, 3 if prec == 133 else 2, 3, n, "plain").transpose(0, 2, 1)
    other1 = _operand(rng, 1, 3, n, "plain").transpose(0, 2, 1)
    for width in sorted({40, 41, 44, 80, 81, 84, 120, 121, 144, 145, trunc - 1, trunc, trunc + 1,
                         trunc + 3, trunc + 4, 160}):  # fmt: skip
        k = min(3, -(-width // 53))
        a = np.zeros((k, 2, n))
        for q in range(2):
            a[:, q] = _line(rng, k, n, width, int(rng.integers(-5, 5)), False)
        a[:, :, 0] = 0.0
        a[:, 0, 0] = _line(rng, k, 1, width, 0, False)[:, 0]
        a[0, 0, 0] = 1.0  # the row's max: scale 2**1, and one element needing every bit
        a[:, 0, 1] = 0.0
        a[-1, 0, 1] = 2.0 ** (1 - width)
        need = _need(a, True)
        ex = crt.exact_widths(a, np.ascontiguousarray(other1), n, prec, rounding)[0]
        assert ex == (max(4, -(-need // 4) * 4) if need <= trunc else 0), (width, need, trunc)
        for b in (other1, other3):
            b = np.ascontiguousarray(b)
            out = crt.matmul(a, b, prec, rounding)
            assert out is not None, width
            assert _misses(a, b, out[0], out[1]) == 0, (width, b.shape[0])


@pytest.mark.parametrize(("prec", "rounding"), [(133, R150), (108, R100)])
def test_small_exact_widths_at_the_window_edges(prec: int, rounding: float) -> None:
    """Integers of W bits times 2**(e - W): row scales at the exact cut's window lo = B - 992
    +-1, products at the terms' limit ea + eb - Ba - Bb - 60 = -1000 +-10 and at
    ea + eb = 900, scales near 2**1000 (small chunks: sigma overflows there). Sound or None."""
    rng = np.random.default_rng(2903 + prec)
    n = 12
    seen: Counter[str] = Counter()
    for width in (4, 8, 40, 52):
        pairs = []
        for total in range(2 * width - 945, 2 * width - 925, 3):
            pairs += [
                (ea, total - ea) for ea in (width - 993, width - 992, width - 991, total // 2)
            ]
        pairs += [(ea, t - ea) for t in (899, 900, 901) for ea in (1001, 1000, 990, 972, 500)]
        for ea, eb in pairs:
            ia = rng.integers(-(2**width - 1), 2**width, (1, 3, n)).astype(float)
            ib = rng.integers(-(2**width - 1), 2**width, (1, n, 3)).astype(float)
            ia[0, :, 0], ib[0, 0, :] = 2**width - 1, -(2**width - 1)
            with np.errstate(all="ignore"):
                a, b = np.ldexp(ia, ea - width), np.ldexp(ib, eb - width)
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                continue
            assert crt.exact_widths(a, b, n, prec, rounding)[0] > 0
            out = crt.matmul(a, b, prec, rounding)
            seen["none" if out is None else "done"] += 1
            assert out is None or _misses(a, b, out[0], out[1]) == 0, (width, ea, eb)
    assert seen["none"] > 20 and seen["done"] > 20, seen


# ---- BallArith: both engines, radii, flips ----------------------------------------------------


def _sup_misses(am: np.ndarray, ra: np.ndarray, bm: np.ndarray, rb: np.ndarray, out: Ball) -> int:
    """Elements where sup over the balls |sum_q a_q b_q - mid| exceeds rad (exactly: the
    supremum of each product over its box is at a corner)."""
    big_a, big_b = _ints(am), _ints(bm)
    rad_a, rad_b = _ints(ra[None]), _ints(rb[None])
    mid = _ints(out.mid) * 2**SHIFT
    bad = 0
    for i in range(big_a.shape[0]):
        for j in range(big_b.shape[1]):
            hi = lo = 0
            for q in range(big_a.shape[1]):
                a0, a1 = big_a[i, q] - rad_a[i, q], big_a[i, q] + rad_a[i, q]
                b0, b1 = big_b[q, j] - rad_b[q, j], big_b[q, j] + rad_b[q, j]
                corners = (a0 * b0, a0 * b1, a1 * b0, a1 * b1)
                hi, lo = hi + max(corners), lo + min(corners)
            num, den = float(out.rad[i, j]).as_integer_ratio()
            bad += max(hi - mid[i, j], mid[i, j] - lo) * den > num * 2 ** (2 * SHIFT)
    return bad


def _data(rng: np.random.Generator, shape: tuple[int, int], kind: str, k: int) -> np.ndarray:
    m, n = shape
    if kind == "f64":
        x = rng.normal(size=shape) * np.ldexp(1.0, rng.integers(-20, 20, shape))
    elif kind == "f32":
        x = rng.normal(size=shape).astype(np.float32).astype(np.float64)
    elif kind == "int":
        x = rng.integers(-1000, 1000, shape).astype(float)
    elif kind == "pow2":
        x = np.ldexp(rng.choice([-1.0, 1.0], shape), rng.integers(-100, 100, shape))
    elif kind == "edge":
        x = rng.normal(size=shape)
        tops = [1.0, np.nextafter(1.0, 0), 1 - 2.0**-49, 1 - 2.0**-47, 1 + 2.0**-52, 0.5]
        for q in range(m):
            x[q, rng.integers(n)] = float(rng.choice(tops))
    elif kind == "sparse":
        x = rng.normal(size=shape) * (rng.random(shape) < 0.2)
        x[rng.random(m) < 0.3] = 0.0
    else:  # spread
        x = rng.normal(size=shape) * np.ldexp(1.0, rng.integers(-600, 300, shape))
    w = np.asarray(xp.from_float(x, k)).reshape(k, *shape)
    if rng.random() < 0.3:  # a genuine multi-word value: truncated, not exact
        y = rng.normal(size=shape) * np.abs(w[0])
        w = np.asarray(xp.renorm([w[0], y * 2.0**-60, y * 2.0**-130], k)).reshape(k, *shape)
    return np.ascontiguousarray(w)


@pytest.mark.parametrize("seed", [0, 1])
def test_ball_products_enclose_with_either_engine(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BallArith(100 / 150)._matmul on float64, float32, integer, power-of-two, edge, sparse,
    spread and multi-word operands with radii, transposed (flipped) operands and int64
    sums; crt.fast forced True and the CRT engine forced half the time (else crt.cost
    chooses). The ball contains the exact supremum of the products; the same call twice
    gives the same engine and the same bits."""
    rng = np.random.default_rng(2904 + seed)
    monkeypatch.setattr(crt, "fast", lambda: True)
    calls = spy_crt(monkeypatch)
    kinds = ["f64", "f32", "int", "pow2", "edge", "sparse", "spread"]
    seen: Counter[str] = Counter()
    for case in range(12):
        ar = BallArith(int(rng.choice([100, 150])))
        m, n, p = (int(v) for v in rng.choice([8, 9, 12, 16, 33], 3))
        am = _data(rng, (m, n), str(rng.choice(kinds)), ar.k)
        bm = _data(rng, (n, p), str(rng.choice(kinds)), ar.k)
        ra = np.abs(am[0]) * 2.0 ** -int(rng.integers(20, 140)) * (case % 3 == 0)
        rb = np.abs(bm[0]) * 2.0 ** -int(rng.integers(20, 140)) * (case % 4 == 1)
        if case % 3 == 1:
            am = np.ascontiguousarray(am.transpose(0, 2, 1)).transpose(0, 2, 1)
        elif case % 3 == 2:
            bm = np.ascontiguousarray(bm.transpose(0, 2, 1)).transpose(0, 2, 1)
        with monkeypatch.context() as mp:
            if case % 4 == 0:
                mp.setattr(crt, "INT32_TERMS", int(rng.integers(1, 9)))
            if case % 2 == 0:
                mp.setattr(crt, "cost", lambda *a, **kw: (0.0, 1.0))
            calls.clear()
            with np.errstate(all="ignore"):
                out = ar._matmul(Ball(am, ra), Ball(bm, rb))
                again = ar._matmul(Ball(am, ra), Ball(bm, rb))
        assert np.array_equal(out.mid, again.mid) and np.array_equal(out.rad, again.rad)
        assert len(calls) == 2 and calls[0] == calls[1]
        seen["crt" if calls[0] else "f64"] += 1
        assert ar.range_errors or _sup_misses(am, ra, bm, rb, out) == 0, (seed, case)
    assert seen["crt"] >= 4, seen


@pytest.mark.parametrize("bits", [100, 150])
def test_dense_layer_shape_exact_weights_sampled(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MLP's product x @ W.T at a shape crt.cost gives to the int8 engine (64 x 192 x 64):
    a float64 weight matrix (exact cut, a transposed view) times k-word activations
    (truncated; also as a transposed view, so the product is flipped) and float32 inputs
    (exact), radii on the activations; 8 x 8 sampled elements against the exact supremum."""
    rng = np.random.default_rng(2905 + bits)
    monkeypatch.setattr(crt, "fast", lambda: True)
    real, calls = crt.matmul_words, []

    def spy(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        calls.append((out is not None, crt.exact_widths(
            np.ascontiguousarray(args[0]), np.ascontiguousarray(args[1]), args[0].shape[2],
            args[2], args[3])))  # type: ignore[index, arg-type]  # fmt: skip
        return out

    monkeypatch.setattr(crt, "matmul_words", spy)
    ar = BallArith(bits)
    m, n = 64, 192
    weight = rng.uniform(-1, 1, (m, n)) / np.sqrt(n)
    w = ar.asarray(weight)
    wt = Ball(w.mid.transpose(0, 2, 1), np.zeros((n, m)))  # W.T: a non-contiguous view
    acts = _data(rng, (m, n), "f64", ar.k)
    acts[1:] = np.abs(acts[:1]) * rng.normal(size=(ar.k - 1, m, n)) * 2.0**-100  # truncated
    acts = np.asarray(xp.renorm(list(acts), ar.k)).reshape(ar.k, m, n)
    inputs = ar.asarray(rng.normal(size=(m, n)).astype(np.float32).astype(np.float64))
    acts_t = np.ascontiguousarray(acts.transpose(0, 2, 1)).transpose(0, 2, 1)  # flips
    lefts = (Ball(acts, np.abs(acts[0]) * 2.0**-120), Ball(acts_t, np.zeros((m, n))), inputs)
    for left in lefts:
        calls.clear()
        with monkeypatch.context() as mp:
            if left is inputs:  # both exact: crt.cost may prefer the float64 slices; force it
                mp.setattr(crt, "cost", lambda *a, **kw: (0.0, 1.0))
            out = ar._matmul(left, wt)
        assert calls and calls[0][0], calls
        exact = calls[0][1]
        assert max(exact) > 0 and (min(exact) > 0) == (left is inputs), exact  # W: exact
        rows, cols = rng.choice(m, 8, replace=False), rng.choice(m, 8, replace=False)
        sub = Ball(out.mid[:, rows][:, :, cols], np.asarray(out.rad)[np.ix_(rows, cols)])
        bm = np.ascontiguousarray(wt.mid[:, :, cols])
        assert _sup_misses(left.mid[:, rows], np.asarray(left.rad)[rows], bm,
                           np.zeros(bm.shape[1:]), sub) == 0  # fmt: skip
        assert ar.range_errors == 0


# ---- exact_trace against a Fraction oracle -----------------------------------------------------


def _frac(x: np.ndarray) -> list[list[Fraction]]:
    return [[Fraction(float(v)) for v in row] for row in np.atleast_2d(x)]


def _mm(a: list, b: list) -> list:
    return [[sum((a[i][q] * b[q][j] for q in range(len(b))), Fraction(0)) for j in range(len(b[0]))]
            for i in range(len(a))]  # fmt: skip


def _tr(a: list) -> list:
    return [list(r) for r in zip(*a, strict=True)]


def _mpf_fraction(v: object) -> Fraction:
    sign, man, exp, _ = v._mpf_  # type: ignore[attr-defined]  # exactly (no re-rounding)
    return Fraction((-1) ** sign * man) * Fraction(2) ** exp if man else Fraction(0)


@pytest.mark.parametrize("engine", ["forced", "chosen"])
def test_exact_trace_of_a_relu_mlp_against_fractions(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """exact_trace(net, 150, "fast") of dense-ReLU-dense-ReLU-dense with MSE (float64,
    float32 and dyadic data) with crt.fast forced True (and the CRT engine forced): every
    value's ball (loss, forward, backward, parameter gradients) contains the exact rational
    of the oracle (z = x W^T + b, relu, mean((y - t)^2), reverse mode in Fractions)."""
    from fpgrad.graph.layers import exact_trace
    from fpgrad.model.network import Layer, Loss, Network

    monkeypatch.setattr(crt, "fast", lambda: True)
    if engine == "forced":
        monkeypatch.setattr(crt, "cost", lambda *a, **kw: (0.0, 1.0))
    calls = spy_crt(monkeypatch)
    for seed, kind in enumerate(("f64", "f32", "dyadic")):
        rng = np.random.default_rng(2906 + seed)
        sizes, batch = (12, 8, 10, 8), 9

        def dat(
            shape: tuple[int, ...], scale: float, kind: str = kind, rng: np.random.Generator = rng
        ) -> np.ndarray:
            if kind == "f32":
                return (rng.normal(size=shape) * scale).astype(np.float32).astype(np.float64)
            if kind == "dyadic":
                return np.ldexp(rng.integers(-64, 64, shape).astype(float), -6)
            return rng.normal(size=shape) * scale

        ws = [dat((o, i), 1 / np.sqrt(i)) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        bs = [dat((o,), 0.3) for o in sizes[1:]]
        x, y = dat((batch, sizes[0]), 1.0), dat((batch, sizes[-1]), 1.0)
        layers = []
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            layers.append(Layer(f"dense{2 * i}", "dense", {"weight": w, "bias": b}))
            if i < len(ws) - 1:
                layers.append(Layer(f"relu{2 * i + 1}", "relu"))
        net = Network(tuple(layers), Loss("mse"), x, y, name=f"attack29-{kind}")
        calls.clear()
        res = exact_trace(net, 150, method="fast", allow_uncertified=True)
        assert res.method == "fast" and res.bits == 150
        if engine == "forced":
            assert calls and all(calls), calls
        want: dict[str, object] = {}
        h, pre = _frac(x), []
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            z = _mm(h, _tr(_frac(w)))
            z = [[v + Fraction(float(c)) for v, c in zip(r, b, strict=True)] for r in z]
            want[f"forward/dense{2 * i}"] = z
            pre.append((h, z))
            h = z
            if i < len(ws) - 1:
                h = [[v if v > 0 else Fraction(0) for v in r] for r in z]
                want[f"forward/relu{2 * i + 1}"] = h
        t = _frac(y)
        count = len(t) * len(t[0])
        want["loss"] = [sum(((h[r][c] - t[r][c]) ** 2 for r in range(len(t))
                             for c in range(len(t[0]))), Fraction(0)) / count]  # fmt: skip
        g = [[2 * (h[r][c] - t[r][c]) / count for c in range(len(t[0]))] for r in range(len(t))]
        for i in range(len(ws) - 1, -1, -1):
            hin, _ = pre[i]
            want[f"backward/dense{2 * i}"] = g
            want[f"grads/dense{2 * i}.weight"] = _mm(_tr(g), hin)
            want[f"grads/dense{2 * i}.bias"] = [sum(col, Fraction(0)) for col in _tr(g)]
            gin = _mm(g, _frac(ws[i]))
            if i > 0:
                want[f"backward/relu{2 * i - 1}"] = gin
                zp = pre[i - 1][1]
                g = [[gi if zi > 0 else Fraction(0) for gi, zi in zip(gr, zr, strict=True)]
                     for gr, zr in zip(gin, zp, strict=True)]  # fmt: skip
        assert set(want) == set(res.radii), sorted(set(res.radii) ^ set(want))
        for key, value in want.items():
            mid, rad = res.enclosure(key)
            mid, rad = np.asarray(mid, dtype=object), np.asarray(rad)
            value = np.asarray(value, dtype=object).reshape(mid.shape)
            for idx in np.ndindex(*mid.shape):
                assert abs(_mpf_fraction(mid[idx]) - value[idx]) <= Fraction(float(rad[idx])), (
                    kind, key, idx,
                )  # fmt: skip
