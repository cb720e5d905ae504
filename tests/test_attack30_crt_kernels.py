"""Adversarial review (attack30) of the CRT kernels compiled per (words, chunks) and per limb
count, with fused multiply-adds (commit 0e2b0c2 and the two after it).

- ``jit_crt.residues`` for every (K, nch) in 1..3 x 1..4 that ``crt.plan`` produces (truncated
  and exact cuts, several chunk widths, rows and columns) against an exact model of the chunks
  in Fractions (every word rounded half-even at each chunk's unit). Wherever the kernel reports
  no fault, its residues are those of the model's integer X, every chunk is within its cap,
  ``|X| <= Amax``, ``|x - X u| <= K u/2`` (0 for an exact cut), the row is at a scale in the
  window, and a zero-scale row is all zeros: the facts ``crt.plan``'s bound rests on. Where
  the model's chunks are within their caps, the kernel reports no fault. Words: chunk 0 at its
  cap exactly (ties to even) and just over, lower words at and past the low cap, ties at
  every chunk's unit, the truncation error at exactly K u/2, NaN/inf/subnormal/-0.0 in any
  word, zero rows over non-zero lower words, huge (cancelling) lower words, row maxima at the
  (1 + 2**-48) edge and at the window edges.
- ``jit_crt.recombine`` for every limb count 1..8 (1..6 and each top from plans, 7 and 8
  synthetic) against the exact integer algorithm in Python ints (CRT digits times the limbs
  of M/m_j and -M, balanced carries, half-even): the terms bit for bit and the fault count
  exactly; |C| <= Cmax is never a fault and within the dropped-limb bound, with
  ``sum |terms| <= Cmax + D + 2 P(jt)``; Cmax < |C| <= (M - 1)/2 is a fault or still within
  the bound. Blocks of 256 crossed, int32 and int64 sums, sums at +-n 127**2.
- ``crt.matmul`` end to end on such operands: the exact product (tests.test_attack7_crt's
  integer oracle) within sum(terms) +- bound, or None; the float64 engine as a peer.

Oracle: Python ints and Fractions only. No wrong result went unreported on ee3de99. One
decline (not a wrong result, older than 0e2b0c2): rows whose scale is above about
2**(971 + bc) (bc the cut's chunk width: from 2**975 at 4-bit exact cuts) are faults although
the window goes to 2**1000, because chunk 0's sigma overflows to inf
(test_rows_near_the_top_of_the_window_are_sound_or_declined).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from fpgrad.arith import crt, jit_crt, ozaki
from fpgrad.arith import expansion as xp
from tests.test_attack7_crt import SHIFT, _ints, _misses
from tests.test_attack29_crt_exact_cuts import _sym

R150, R100 = 8 * xp.ETA[3], 8 * xp.ETA[2]
BETA = 40
NAN, INF = float("nan"), float("inf")


def _amax(cut: crt.Cut) -> int:
    return sum(int(c) * 2 ** (cut.bc * (cut.nch - 1 - i)) for i, c in enumerate(cut.caps))


# ---- residues --------------------------------------------------------------------------------


def _cuts() -> list[tuple[crt.Plan, str]]:
    """Plans whose cuts cover every (K, nch) of the residue kernel, truncated and exact, with
    the narrowest and widest chunks; 'a' or 'b' names the cut to use (K its operand's words)."""
    out: list[tuple[crt.Plan, str]] = []
    seen: set[tuple[int, int, int, bool]] = set()
    for prec in (1, 20, 28, 45, 60, 77, 100, 117, 133, 149):
        for k in (1, 2, 3):
            full = crt.plan(16, prec, k, 3, R150)
            widths = {0, 4, 12, 40, 44, 52, 80, 84, 120, 124, 160, full.a.bits}
            for width in sorted(w for w in widths if w <= full.a.bits):
                pl = crt.plan(16, prec, k, 3, R150, width, 0)
                key = (k, pl.a.nch, pl.a.bc, pl.a.exact)
                if key not in seen:
                    seen.add(key)
                    out.append((pl, "a"))
            pl = crt.plan(16, prec, 3, k, R150)
            key = (k, pl.b.nch, pl.b.bc, pl.b.exact)
            if key not in seen:
                seen.add(key)
                out.append((pl, "b"))
    return out


KINDS = ["rand", "cap", "capover", "lowcap", "lowover", "tie", "maxerr", "exact", "half",
         "special", "zero", "w0zero", "huge"]  # fmt: skip


def _element(rng: np.random.Generator, k: int, e: int, cut: crt.Cut, kind: str) -> list[float]:
    """k words of one element of a row (column) at scale 2**e, of one adversarial kind."""
    w = [0.0] * k
    s = float(rng.choice([-1.0, 1.0]))
    bc, bits, nch = cut.bc, cut.bits, cut.nch
    u0, u = math.ldexp(1.0, e - bc), math.ldexp(1.0, e - bits)
    cap0 = float(cut.caps[0])
    if kind == "rand":  # a multi-word value, lower words far below or not
        h = s * float(rng.uniform(1, 2)) * math.ldexp(1.0, e - int(rng.integers(1, 80)))
        w[0] = h
        for i in range(1, k):
            w[i] = h * float(rng.uniform(-1, 1)) * 2.0 ** -int(rng.integers(1, 60) * i)
    elif kind in ("cap", "capover"):  # chunk 0: 2**bc from word 0, 4 + delta from the rest
        deltas = (
            [0.0, 0.5, -0.5, -1.0, 0.5 - 2.0**-20]
            if kind == "cap"
            else [0.5 + 2.0**-20, 1.0, 1.5, 2.5]
        )
        delta = float(rng.choice(deltas))
        w[0] = s * float(rng.choice([math.ldexp(1 - 2.0**-47, e), math.ldexp(1.0, e) - u0 / 2]))
        if k == 2:
            w[1] = s * (4 + delta) * u0
        elif k == 3:
            w[1], w[2] = s * 2 * u0, s * (2 + delta) * u0
    elif kind in ("lowcap", "lowover"):  # lower words at the low cap of chunk 0, or past it
        if kind == "lowcap":
            mult = float(rng.choice([cap0, cap0 - 1, cap0 - 0.5, cap0 / 2]))
            w[0] = float(rng.choice([0.0, -s * u0]))
        else:
            mult = float(rng.choice([cap0 + 1, cap0, cap0 / 2 + 1]))
            w[0] = float(rng.choice([0.0, s * u0, 0.5 * u0]))
        if k == 1:
            w[0] = s * (2**bc - 1) * u0
        else:
            w[1] = s * mult * u0
            if k == 3:
                if kind == "lowcap":
                    w[1], w[2] = s * (mult - 2) * u0, s * 2 * u0
                else:
                    ulp = math.ulp(w[1])
                    w[2] = float(rng.choice([-w[1], ulp, -s * (mult - 1) * u0, s * u0]))
    elif kind == "tie":  # (j + 1/2) units of one chunk, in one word (word 0 at 2**(e-1) + it)
        i = int(rng.integers(nch))
        ui = math.ldexp(1.0, e - bc * (i + 1))
        val = s * (int(rng.integers(0, 8)) + 0.5) * ui
        q = int(rng.integers(k))
        if q == 0 and bc * (i + 1) + 1 <= 53 and rng.random() < 0.5:
            val += s * math.ldexp(1.0, e - 1)
        w[q] = val
    elif kind == "maxerr":  # every word's remainder a tie rounded the same way: K u/2
        w[0] = s * math.ldexp(1.0, e - 1)
        if bits + 1 <= 53:
            w[0] += s * u / 2
        if k > 1:
            w[1] = s * 2.5 * u
        if k > 2:
            w[2] = s * 0.5 * u
    elif kind == "exact":  # multiples of u
        nb = min(bits, 52)
        w[0] = math.ldexp(float(rng.integers(-(2**nb) + 1, 2**nb)), e - nb)
        for i in range(1, k):
            sh = int(rng.integers(0, max(1, bits - 60)))
            w[i] = math.ldexp(float(rng.integers(-(2**20), 2**20)), e - bits + sh)
    elif kind == "half":  # half a unit of the last chunk in one word
        w[int(rng.integers(k))] = s * u / 2
    elif kind == "special":
        w[0] = s * float(rng.uniform(0, 1)) * math.ldexp(1.0, e - 1)
        choices = [NAN, INF, -INF, 2.0**-1074, -(2.0**-1074), -0.0, 2.0**-1022, -(2.0**-1030)]
        w[int(rng.integers(k))] = float(rng.choice(choices))
    elif kind == "zero":
        w = [float(v) for v in rng.choice([0.0, -0.0], k)]
    elif kind == "w0zero":  # word 0 zero, a lower word within the row's scale
        w[0] = float(rng.choice([0.0, -0.0]))
        if k > 1:
            w[1] = s * float(rng.uniform(0, 1)) * math.ldexp(1.0, e - int(rng.integers(1, 60)))
    elif kind == "huge":  # lower words far above the row's scale, cancelling or not
        if k == 1:
            w[0] = s * math.ldexp(1.0, e - 2)
        else:
            w[1] = s * math.ldexp(1.0, min(e + int(rng.choice([1, 2, 10, 60, 200])), 1023))
            if k == 3 and rng.random() < 0.7:
                w[2] = -w[1]
    return w


LEADERS = [0.5, 0.75, 1 - 2.0**-47, 1 - 2.0**-48, 1 - 2.0**-49, 1 - 2.0**-53, 1.0]


def _group(
    rng: np.random.Generator, k: int, size: int, cut: crt.Cut, kinds: list[str], edges: bool
) -> np.ndarray:
    """(k, size) words of one row or column: a leader fixing its scale and kinds, or (1 in 10)
    a zero row, its lower words zero or not; near or past the window's edges with ``edges``."""
    out = np.zeros((k, size))
    if rng.random() < 0.1:  # word 0 all zero: so must be every word
        out[:] = rng.choice([0.0, -0.0], (k, size))
        if "special" in kinds and rng.random() < 0.5:  # a fault
            out[int(rng.integers(k)), int(rng.integers(size))] = float(
                rng.choice([1.0, 2.0**-1074, NAN, -INF, -0.0])
            )
        return out
    e = int(rng.integers(-40, 40))
    if edges and rng.random() < 0.2:
        e = int(rng.choice([cut.lo, cut.lo + 1, cut.hi - 1, cut.hi, cut.lo - 1, cut.hi + 1]))
    for c in range(size):
        out[:, c] = _element(rng, k, e, cut, kinds[int(rng.integers(len(kinds)))])
    lead = int(rng.integers(size))
    out[:, lead] = 0.0
    out[0, lead] = float(rng.choice([-1, 1])) * math.ldexp(float(rng.choice(LEADERS)), e)
    return out


def _model(ws: list[float], e: int, bc: int, nch: int) -> tuple[list[int], list[Fraction], list]:
    """The chunks d_i of words ws at scale 2**e (each word rounded half-even to each chunk's
    unit in turn), the lower words' size before each chunk in its units, the remainders."""
    rem = [Fraction(w) for w in ws]
    d: list[int] = []
    lows: list[Fraction] = []
    for i in range(nch):
        unit = Fraction(2) ** (e - bc * (i + 1))
        lows.append(sum((abs(r) for r in rem[1:]), Fraction(0)) / unit)
        di = 0
        for q, r in enumerate(rem):
            t = round(r / unit)
            rem[q] = r - t * unit
            di += t
        d.append(di)
    return d, lows, rem


def _check_residues(
    x: np.ndarray, per_row: bool, pl: crt.Plan, cut: crt.Cut, seen: Counter[str]
) -> None:
    """One kernel call against the model (see the module docstring)."""
    k = x.shape[0]
    mods = [int(m) for m in pl.mods]
    nq = x.shape[1] if per_row else x.shape[2]
    out = np.zeros((len(mods), *x.shape[1:]), dtype=np.int8)
    expo, top = np.zeros(nq, dtype=np.int64), np.zeros(nq)
    args = (cut.lo, cut.hi, pl.mods, cut.rtab, cut.caps, expo, top, out)
    seen["calls"] += 1
    if seen["calls"] % 2:  # both ways of passing exact
        faults = jit_crt.residues(x, per_row, cut.bc, cut.nch, *args, cut.exact)
    else:
        faults = jit_crt.residues(x, per_row, cut.bc, cut.nch, *args, exact=cut.exact)
    groups = [x[:, q, :] if per_row else x[:, :, q] for q in range(nq)]
    if faults == -1:  # a non-zero row whose scale leaves the window
        seen["window"] += 1
        ok = False
        for g in groups:
            t = max((abs(float(v)) for v in g[0] if v == v), default=0.0)
            if t > 0:
                e = math.frexp(t)[1]  # |t| < 2**e, the kernel's e is e or e + 1
                ok |= not (cut.lo <= e and e + 1 <= cut.hi) or t == INF
        assert ok, "window fault without a row outside the window"
        return
    assert faults >= 0
    amax, caps = _amax(cut), [int(c) for c in cut.caps]
    expect_fault = False
    for q, g in enumerate(groups):
        finite = bool(np.isfinite(g).all())
        t = max((abs(float(v)) for v in g[0] if v == v), default=0.0)
        if t == 0.0:  # zero scale: every word must be 0 (NaN not)
            bad = bool(np.any(g != 0.0) | np.any(np.isnan(g)))
            expect_fault |= bad
            if faults == 0:
                assert not bad and top[q] == 0.0
                res = out[:, q, :] if per_row else out[:, :, q]
                assert not res.any()
                seen["zero rows"] += 1
            continue
        if not finite:
            expect_fault = True
            continue
        e = int(expo[q])
        if e - cut.bc + 52 > 1023:  # sigma of chunk 0 is inf: declined (sound, see below)
            expect_fault = True
            seen["sigma overflow"] += 1
        if faults == 0:
            assert top[q] == t and Fraction(t) < Fraction(2) ** e <= 4 * Fraction(t)
            assert cut.lo <= e <= cut.hi
        for c in range(g.shape[1]):
            ws = [float(v) for v in g[:, c]]
            d, lows, rem = _model(ws, e, cut.bc, cut.nch)
            over = any(abs(di) > ci for di, ci in zip(d, caps, strict=True))
            over |= k > 1 and any(lo > ci for lo, ci in zip(lows, caps, strict=True))
            over |= cut.exact and any(rem)
            expect_fault |= over
            if faults:
                continue
            assert all(abs(di) <= ci for di, ci in zip(d, caps, strict=True)), (ws, e, d)
            big = sum(di * 2 ** (cut.bc * (cut.nch - 1 - i)) for i, di in enumerate(d))
            assert abs(big) <= amax
            idx = (q, c) if per_row else (c, q)
            got = [int(v) for v in out[(slice(None), *idx)]]
            assert got == [_sym(big, m) for m in mods], (ws, e, big)
            unit = Fraction(2) ** (e - cut.bits)
            err = abs(sum((Fraction(w) for w in ws), Fraction(0)) - big * unit)
            assert err <= Fraction(k, 2) * unit, (ws, e)
            assert not cut.exact or err == 0
            seen["elements"] += 1
            seen["d0 at cap"] += abs(d[0]) == caps[0]
            seen["error K u/2"] += err == Fraction(k, 2) * unit
            seen["low at cap"] += k > 1 and lows[0] == caps[0]
    if faults:
        assert expect_fault, "a fault where every chunk is within its cap"
        seen["faults"] += 1
    else:
        seen["clean"] += 1


def test_residues_against_the_exact_chunk_model() -> None:
    """Every (K, nch) and cut kind, rows and columns, adversarial words (module docstring)."""
    rng = np.random.default_rng(3001)
    seen: Counter[str] = Counter()
    combos: Counter[tuple[int, int, bool]] = Counter()
    for pl, side in _cuts():
        cut = pl.a if side == "a" else pl.b
        for rep in range(72):
            # the kernel's contract holds for any word count K with any cut (K u/2)
            kk = int(rng.integers(1, 4))
            if rep < 8:
                kk = 1 + rep % 3
            per_row = bool(rep % 2)
            nq, size = int(rng.integers(1, 5)), int(rng.integers(1, 7))
            if rep % 6 == 0:
                kinds = KINDS
            elif rep % 6 in (1, 2):  # mostly clean, at the caps and ties
                kinds = ["cap", "lowcap", "tie", "maxerr", "exact", "rand", "w0zero"]
            elif rep % 6 == 3:
                kinds = ["exact", "zero", "w0zero", "cap"]
            else:
                kinds = [str(rng.choice(KINDS))]
            x = np.stack([_group(rng, kk, size, cut, kinds, rep % 5 == 4) for _ in range(nq)], 1)
            if not per_row:
                x = np.ascontiguousarray(x.transpose(0, 2, 1))
            _check_residues(x, per_row, pl, cut, seen)
            combos[(kk, cut.nch, cut.exact)] += 1
    assert {(kk, n) for kk, n, _ in combos} == {(kk, n) for kk in (1, 2, 3) for n in (1, 2, 3, 4)}
    assert {ex for *_, ex in combos} == {True, False}
    assert seen["clean"] > 2000 and seen["faults"] > 1500 and seen["window"] > 50, seen
    assert seen["d0 at cap"] > 300 and seen["error K u/2"] > 300 and seen["low at cap"] > 80, seen
    assert seen["zero rows"] > 300, seen


def test_residues_decline_words_and_chunks_outside_the_compiled_range() -> None:
    pl = crt.plan(16, 133, 3, 3, R150)
    c = pl.a
    for words, nch in ((np.zeros((4, 2, 2)), c.nch), (np.zeros((3, 2, 2)), 5)):
        out = np.zeros((len(pl.mods), 2, 2), dtype=np.int8)
        e, t = np.zeros(2, dtype=np.int64), np.zeros(2)
        with pytest.raises(ValueError):
            jit_crt.residues(words, True, c.bc, nch, c.lo, c.hi, pl.mods, c.rtab, c.caps, e, t, out)
    with pytest.raises(ValueError):
        jit_crt.recombine(np.zeros((3, 1), dtype=np.int64), pl.mods[:3], pl.cinv[:3],
                          np.zeros((9, 4)), BETA, 0, 1.0, np.ones(9), np.ones(1), np.zeros((1, 1)))  # fmt: skip


# ---- recombine -------------------------------------------------------------------------------


class _Basis:
    """What the recombination needs of a plan, with the bounds of crt.plan's docstring:
    moduli, the constants' limbs from j0, top, cap, pw, Cmax, D, P(jt)."""

    def __init__(self, mods: list[int], j0: int, cmax: int, width: int, n: int) -> None:
        self.mods, self.j0, self.cmax, self.width, self.n = mods, j0, cmax, width, n
        self.big_m = math.prod(mods)
        self.nj = -(-self.big_m.bit_length() // BETA)
        nm = len(mods)
        smax = (127 * nm + nm // 2 + 1) * (2**BETA - 1)
        self.drop = Fraction(smax * (2 ** (BETA * j0) - 1), 2**BETA - 1)

        def p_sum(j: int) -> Fraction:
            return Fraction(2 ** (BETA - 1) * (2 ** (BETA * j) - 2 ** (BETA * j0)), 2**BETA - 1)

        jt = j0
        while cmax + self.drop + p_sum(jt + 1) >= 2 ** (BETA * (jt + 1)):
            jt += 1
        self.jt, self.top = jt, jt - j0
        self.cap = math.ceil((cmax + self.drop + p_sum(jt)) / 2 ** (BETA * jt))
        self.terms_sum = cmax + self.drop + 2 * p_sum(jt)
        consts = [self.big_m // m for m in mods] + [-self.big_m]
        self.limbs_int = [
            [(1 if c > 0 else -1) * ((abs(c) >> (BETA * j)) & (2**BETA - 1)) for c in consts]
            for j in range(j0, self.nj)
        ]
        self.cinv = [_sym(pow(self.big_m // m, -1, m), m) for m in mods]

    @classmethod
    def of_plan(cls, pl: crt.Plan, n: int) -> _Basis:
        width = pl.a.bits + pl.b.bits
        j0, frac = divmod(math.frexp(float(pl.pw[0]))[1] - 1 + width, BETA)
        assert frac == 0
        out = cls([int(m) for m in pl.mods], j0, n * _amax(pl.a) * _amax(pl.b), width, n)
        # the plan's constants are those of its docstring
        assert out.top == pl.top and out.cap == pl.cap, (out.top, pl.top, out.cap, pl.cap)
        assert np.array_equal(pl.limbs, np.array(out.limbs_int, dtype=float))
        assert [int(c) for c in pl.cinv] == out.cinv and 8 * out.cmax <= out.big_m
        return out

    def args(self) -> tuple:
        pw = np.array([math.ldexp(1.0, BETA * j - self.width) for j in range(self.j0, self.nj)])
        return (np.array(self.mods, dtype=np.int64), np.array(self.cinv, dtype=np.int64),
                np.array(self.limbs_int, dtype=float), BETA, self.top, float(self.cap), pw)  # fmt: skip

    def exact(self, prods: list[int]) -> tuple[int, list[int], int, int]:
        """The integer algorithm on one element's residue sums: (k, limbs from j0, final carry,
        the kept value sum_l S_l 2**(BETA l) for l >= j0)."""
        t = [_sym(p * ci, m) for p, ci, m in zip(prods, self.cinv, self.mods, strict=True)]
        k = round(sum((Fraction(tj, m) for tj, m in zip(t, self.mods, strict=True)), Fraction(0)))
        limbs, carry, kept = [], 0, 0
        for lo, row in enumerate(self.limbs_int):
            s = sum(tj * w for tj, w in zip(t, row, strict=False)) + k * row[-1]
            kept += s * 2 ** (BETA * (self.j0 + lo))
            v = s + carry
            carry = round(Fraction(v, 2**BETA))
            limbs.append(v - carry * 2**BETA)
        return k, limbs, carry, kept


def _prods(rng: random.Random, values: list[int], mods: list[int], n: int) -> list[list[int]]:
    """Residue sums as a GEMM gives them: C mod m plus multiples of m, |.| <= n 127**2."""
    lim = n * 127 * 127
    out = []
    for m in mods:
        row = []
        for c in values:
            r = c % m
            q = rng.choice(
                [0, 0, -1, (lim - r) // m, -((lim + r) // m), rng.randint(-lim, lim) // m]
            )
            row.append(r + q * m)
        out.append(row)
    return out


def _run_recombine(
    basis: _Basis, values: list[int], rng: random.Random, dtype: type, seen: Counter[str]
) -> tuple[int, np.ndarray, np.ndarray, list[list[int]]]:
    """recombine on the residue sums of ``values``: (faults, terms, scale, the sums)."""
    prods = _prods(rng, values, basis.mods, basis.n)
    arr = np.array(prods, dtype=dtype)
    assert [[int(v) for v in row] for row in arr] == prods
    scale = np.array([math.ldexp(1.0, rng.randint(-200, 200)) for _ in values])
    terms = np.full((basis.top + 1, len(values)), NAN)
    bad = jit_crt.recombine(arr, *basis.args(), scale, terms)
    seen["recombined"] += len(values)
    return bad, terms, scale, prods


def _values(basis: _Basis, rng: random.Random) -> tuple[list[int], list[int]]:
    """(|C| <= Cmax: edges, limb boundaries and ties, random; Cmax < |C| <= (M - 1)/2)."""
    cmax, big_m = basis.cmax, basis.big_m
    valid = [0, 1, -1, cmax, -cmax, cmax - 1, 1 - cmax]
    for j in range(basis.nj + 1):
        for c in (2 ** (BETA * j), 2 ** (BETA * j) // 2, 3 * 2 ** (BETA * j) // 2):
            for dlt in (-1, 0, 1):
                valid += [c + dlt, -c - dlt]
    for _ in range(4):  # every limb a tie, +-2**(BETA - 1)
        ties = sum(2 ** (BETA * j - 1) * rng.choice([-1, 1, 3]) for j in range(1, basis.nj + 1))
        valid += [ties, -ties, ties >> BETA * rng.randint(0, basis.nj)]
    valid += [rng.randint(-cmax, cmax) >> rng.randint(0, cmax.bit_length()) for _ in range(40)]
    valid = [v for v in valid if abs(v) <= cmax]
    valid += [rng.randint(-cmax, cmax) for _ in range(300 - len(valid))]  # two blocks of 256
    beyond = [cmax + 1, 2 * cmax, big_m // 8, big_m // 8 + 1, big_m // 4, (big_m - 1) // 2,
              (big_m - 1) // 2 - 1, (big_m - 1) // 2 - rng.randint(0, 2**20)]  # fmt: skip
    beyond += [rng.randint(cmax + 1, (big_m - 1) // 2) for _ in range(24)]
    beyond = [v for v in beyond if cmax < v <= (big_m - 1) // 2]
    return valid, beyond + [-v for v in beyond]


def _check_element(
    basis: _Basis, c: int, prods: list[int], terms: np.ndarray, scale: float
) -> tuple[int, int]:
    """The terms of one element against the integer algorithm, bit for bit; returns (the
    faults the kernel must count for it, the kept value)."""
    _, limbs, carry, kept = basis.exact(prods)
    for lo in range(basis.top + 1):
        want = Fraction(limbs[lo]) * Fraction(2) ** (BETA * (basis.j0 + lo) - basis.width)
        assert Fraction(float(terms[basis.top - lo])) == want * Fraction(scale), (c, lo)
    faults = sum(v != 0 for v in limbs[basis.top + 1 :]) + (carry != 0)
    return faults + (abs(limbs[basis.top]) > basis.cap), kept


def _check_recombine(basis: _Basis, rng: random.Random, seen: Counter[str]) -> None:
    valid, beyond = _values(basis, rng)
    assert len(valid) > 256
    fits = basis.n * 127 * 127 < 2**31
    seen["bases"] += 1
    dtype = np.int32 if fits and seen["bases"] % 2 else np.int64  # as _int_products
    seen[dtype.__name__] += 1
    unit = Fraction(2) ** -basis.width
    bad, terms, scale, sums = _run_recombine(basis, valid, rng, dtype, seen)
    assert bad == 0, "a fault for |C| <= Cmax"
    for e, c in enumerate(valid):
        col = [row[e] for row in sums]
        faults, kept = _check_element(basis, c, col, terms[:, e], float(scale[e]))
        assert faults == 0
        assert abs(c - kept) <= basis.drop
        total = sum((abs(Fraction(float(t))) for t in terms[:, e]), Fraction(0))
        assert total <= basis.terms_sum * unit * Fraction(float(scale[e]))
    seen["valid"] += len(valid)
    for c in beyond:  # one call each: a fault, or terms still within the bound
        bad, terms, scale, sums = _run_recombine(basis, [c], rng, np.int64, seen)
        col = [row[0] for row in sums]
        got = sum((Fraction(float(t)) for t in terms[:, 0]), Fraction(0)) / Fraction(scale[0])
        if bad:
            seen["beyond: fault"] += 1
        else:
            assert abs(got / unit - c) <= basis.drop, c
            seen["beyond: within"] += 1
        if abs(Fraction(c, basis.big_m)) < Fraction(1, 4):  # k certainly right: bit for bit
            faults, _ = _check_element(basis, c, col, terms[:, 0], float(scale[0]))
            assert bad == faults, (c, bad, faults)
            seen["beyond: exact count"] += 1


# (n, prec, ka, kb, exact_a, exact_b) for each (limbs, top) crt.plan gives
PLANS = [(1, 1, 1, 1, 0, 0), (1, 9, 1, 1, 0, 0), (1, 9, 3, 3, 0, 0), (1, 29, 1, 1, 0, 0),
         (1, 29, 3, 3, 0, 0), (1, 65, 1, 1, 0, 0), (1, 69, 1, 1, 0, 0), (8, 105, 1, 1, 0, 0),
         (1, 109, 1, 1, 0, 0), (10**6, 137, 1, 1, 0, 0), (1, 149, 1, 1, 0, 0),
         (256, 133, 3, 3, 0, 0), (256, 108, 2, 2, 0, 0), (300, 53, 1, 1, 28, 52),
         (33, 149, 3, 2, 152, 0), (crt.INT32_TERMS, 133, 3, 3, 0, 0)]  # fmt: skip


def test_recombine_against_the_integer_algorithm_for_every_limb_count() -> None:
    """Plans with 1..6 limbs and every top they give; 7 and 8 limbs on synthetic bases (j0 = 0
    and 1, Cmax = M // 8): bit for bit, faults counted exactly, bounds (module docstring)."""
    rng = random.Random(3002)
    seen: Counter[str] = Counter()
    shapes = set()
    for n, *args in PLANS:
        basis = _Basis.of_plan(crt.plan(n, *args[:3], R150, *args[3:]), n)
        shapes.add((len(basis.limbs_int), basis.top))
        _check_recombine(basis, rng, seen)
    assert {(1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (4, 2), (4, 3), (5, 3), (5, 4), (6, 4),
            (6, 5)} <= shapes  # fmt: skip
    for nm, j0 in ((33, 0), (38, 0), (39, 0), (45, 0), (44, 1), (48, 1)):
        mods = list(crt.MODULI[:nm])
        basis = _Basis(mods, j0, math.prod(mods) // 8, 200, 1000)
        shapes.add((len(basis.limbs_int), basis.top))
        _check_recombine(basis, rng, seen)
    assert {nl for nl, _ in shapes} == set(range(1, jit_crt.MAX_LIMBS + 1)), shapes
    assert seen["beyond: fault"] > 500 and seen["beyond: exact count"] > 300, seen
    assert seen["int32"] > 3 and seen["int64"] > 3, seen


# ---- crt.matmul end to end -------------------------------------------------------------------

MM_PRECS = [(20, R150), (29, 0.0), (53, R150), (80, 0.0), (100, R100), (133, R150), (149, R150)]
MM_KINDS = [
    ["rand", "cap", "lowcap", "tie", "maxerr", "exact", "w0zero", "zero"],  # clean, at the caps
    ["exact", "zero", "cap"],  # exact cuts
    KINDS,  # anything: faults give None
    ["cap"],  # every element at its chunk cap, one sign: C' near Cmax
]


def _peer_agrees(a: np.ndarray, b: np.ndarray, prec: int, rounding: float, got: tuple) -> bool:
    """The float64 engine's terms within the sum of both bounds of crt's (when it is sound)."""
    terms, bound, risk = ozaki.matmul_levels(a, b, prec, rounding)
    if risk:
        return True
    diff = _ints(got[0]) - _ints(terms)  # times 2**SHIFT
    for idx in np.ndindex(*diff.shape):
        both = Fraction(float(got[1][idx])) + Fraction(float(bound[idx]))
        if abs(Fraction(int(diff[idx]), 2**SHIFT)) > both:
            return False
    return True


def test_matmul_within_its_bound_on_adversarial_operands() -> None:
    """The exact product of the exact operands within sum(terms) +- bound, or None where the
    chunk model finds a fault (a word outside the cut's caps); 1..3 words on either side,
    every planned chunk count, exact and truncated cuts, results past a block of 256."""
    rng = np.random.default_rng(3003)
    seen: Counter[str] = Counter()
    for case in range(420):
        prec, rounding = MM_PRECS[case % len(MM_PRECS)]
        mode = case % len(MM_KINDS)
        ka, kb = (int(v) for v in rng.integers(1, 4, 2))
        n = int(rng.choice([1, 3, 8, 33, 100]))
        m, p = (17, 17) if case % 9 == 0 else (int(v) for v in rng.integers(1, 6, 2))
        full = crt.plan(n, prec, ka, kb, rounding)
        kinds = MM_KINDS[mode]
        a = np.stack([_group(rng, ka, n, full.a, kinds, False) for _ in range(m)], 1)
        b = np.stack([_group(rng, kb, n, full.b, kinds, False) for _ in range(p)], 1)
        b = np.ascontiguousarray(b.transpose(0, 2, 1))
        if mode == 3:
            a, b = np.abs(a), np.abs(b)
        out = crt.matmul(a, b, prec, rounding)
        if out is None:  # declined: each side's kernel call against the chunk model
            seen["none"] += 1
            pl = crt.plan(n, prec, ka, kb, rounding, *crt.exact_widths(a, b, n, prec, rounding))
            _check_residues(a, True, pl, pl.a, seen)
            _check_residues(b, False, pl, pl.b, seen)
            continue
        assert np.isfinite(a).all() and np.isfinite(b).all(), case
        terms, bound, risk = out
        assert not risk
        assert _misses(a, b, terms, bound) == 0, case
        assert _peer_agrees(a, b, prec, rounding, out), case
        seen["products"] += 1
        seen["results"] += m * p
        seen["exact cuts"] += any(crt.exact_widths(a, b, n, prec, rounding))
        seen[f"words {ka}x{kb}"] += 1
    assert seen["products"] > 300 and seen["exact cuts"] > 60 and seen["none"] < 120, seen


@pytest.mark.parametrize("prec", [53, 133])
def test_rows_near_the_top_of_the_window_are_sound_or_declined(prec: int) -> None:
    """Rows at scales 2**960 .. 2**1000 against columns at 2**-100 (so ea + eb <= 900).
    Finding (a decline, not a wrong result; older than 0e2b0c2): chunk 0's sigma,
    ldexp(1.5, e - bc + 52), was inf once e > 971 + bc while the window claimed hi = 1000, so
    such rows became NaN chunks (faults). The window now ends at 971 + bc (declined as out
    of range, test_crt_exact_cuts). Checked here: sound or None, whichever."""
    rng = np.random.default_rng(3004)
    declined = 0
    for s in (960, 971, 975, 990, 999):
        a = np.ldexp(rng.integers(1, 16, (1, 8, 8)).astype(float), s)
        b = np.ldexp(rng.integers(-16, 16, (2, 8, 8)).astype(float), -100)
        b[1] = np.ldexp(rng.normal(size=(8, 8)), -160)
        out = crt.matmul(a, b, prec)
        if out is None:
            declined += 1
            continue
        terms, bound, risk = out
        assert not risk and _misses(a, b, terms, bound) == 0
    assert declined <= 4


def test_huge_cancelling_lower_words_at_every_cut() -> None:
    """Word 1 = 2**(e + s), word 2 = -word 1 (s from 40 to 200) beside ordinary words, every
    cut, rows and columns: (s0 + s1) + s2 drops chunk 0 of word 0 once s passes about
    53 - bc, so only the lower-word check stands between it and a wrong chunk: a fault, and
    the model agrees wherever the kernel reports none."""
    rng = np.random.default_rng(3005)
    seen: Counter[str] = Counter()
    for pl, side in _cuts():
        cut = pl.a if side == "a" else pl.b
        for per_row in (True, False):
            for shift in (40, 52, 53, 60, 200):
                e = int(rng.integers(-40, 40))
                x = _group(rng, 3, 5, cut, ["rand", "cap", "exact"], False)[:, None, :]
                if not x[0].any():
                    x[0, 0, 1] = math.ldexp(0.75, e)
                e = math.frexp(float(np.abs(x[0]).max()) * (1 + 2.0**-48))[1]
                x[0, 0, 0] = math.ldexp(1 + 2.0**-9, e - 2)  # a chunk 0 to lose
                x[1, 0, 0] = math.ldexp(1.0, e + shift)
                x[2, 0, 0] = -x[1, 0, 0]
                x = np.ascontiguousarray(x if per_row else x.transpose(0, 2, 1))
                before = seen["faults"]
                _check_residues(x, per_row, pl, cut, seen)
                assert seen["faults"] == before + 1, (cut, shift)
    assert seen["faults"] > 400, seen
