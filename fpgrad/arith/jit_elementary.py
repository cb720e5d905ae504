"""Compiled exp, tanh, sigmoid and log balls: :mod:`.elementary`'s algorithms, one pass each.

Per element the midpoint follows :mod:`fpgrad.arith.elementary` operation for operation
(same reduction, tables and polynomials, emitted through the intrinsics of
:mod:`.jit_words`), so the words are bit-identical to the numpy version and its measured
error bounds hold (log: up to its float64 starting point, from libm here). Radii: the
formulas of :class:`fpgrad.arith.ball.BallArith`, with two rigorous shortcuts that keep the
main loops free of calls, so that LLVM vectorises them: ``expm1(x) <= x (1 + x)`` for
``0 <= x <= 2**-10`` (within the upward rounding RU), and tanh's slope bound
``4 exp(-2(|z| - r)) <= 4 E (1 + 2**-30) (1 + expm1(2r))`` from the computed
``E = exp(-2|z|)`` (accurate to about 2**-146; the margin covers word 0 and the roundings).
Elements with radii above 2**-11, and tanh arguments below 2**-10 (where expm1 takes its
tiny-argument path), are redone one by one with libm's exp and expm1 in BallArith's
formulas. Range and domain checks are counted on the way.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
from numba import njit

from fpgrad.arith import elementary as el
from fpgrad.arith.jit_words import (
    JIT,
    Num,
    V,
    add,
    div,
    mul,
    pow2,
    rint,
    select,
    two_prod,
    w_add,
    w_mul,
    words_intrinsic,
)

RU = 1.0 + 2.0**-45  # as fpgrad.arith.ball
HI_BOUND = 1.0 + 2.0**-48
LO, HI = 2.0**-800, 2.0**800
DOMAIN = el.EXP_DOMAIN
SMALL = 2.0**-9  # |x| below: expm1 by its tiny-argument path
RAD_MAX = 2.0**-11  # radii above: libm radius formulas
BLK = 128  # elements per block: the stages of one block stay in the L1 cache
J1, J2 = el._J1, el._J2
_TAB = el._tables()
LN2 = [float(v) for v in _TAB["ln2"]]
FACT = [[float(v) for v in row] for row in _TAB["inv_fact"]]
INV_LN2 = 1.0 / math.log(2.0)


@cache
def tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """exp and expm1 tables (t1, tm1_1, t2, tm1_2) of elementary, one row of 4 words per entry."""
    return tuple(np.ascontiguousarray(_TAB[n].T) for n in ("t1", "tm1_1", "t2", "tm1_2"))  # type: ignore[return-value]


# ---- elementary's algorithms on compile-time values ---------------------------------------------


def _expm1_fast(t: list[Num], k: int) -> tuple[Num, ...]:
    f = FACT
    t0 = t[0]
    if k == 2:
        q = t0 * t0 * (0.5 + t0 * (f[0][3] + t0 * f[0][4]))
        return add(t, [q], k)
    g = add([f[0][3], f[1][3]], two_prod(t0, f[0][4] + t0 * f[0][5]), 2)
    h = add([0.5], mul(t[:2], g, 2), 2)
    q = mul(mul(t[:2], t[:2], 2), h, 2)
    return add(t, q, k)


def _expm1_tiny(t: list[Num], k: int) -> tuple[Num, ...]:
    f = FACT
    t0 = t[0]
    g6 = f[0][6] + t0 * (f[0][7] + t0 * f[0][8])
    g5 = add([f[0][5], f[1][5]], two_prod(t0, g6), 2)
    g4 = add([f[0][4], f[1][4]], mul(t[:2], g5, 2), 2)
    g = add([f[0][3], f[1][3]], mul(t[:2], g4, 2), 2)
    w = 3 if k >= 3 else 2
    h = add([f[i][2] for i in range(w)], mul(t[:2], g, 2), w)
    q = mul(mul(t[:w], t[:w], w), h, w)
    return add(t, q, k)


def _reduce(k: int, x: list[Num]) -> list[Num]:
    """(n, j1, j2, t): x = n ln2 + j1 / 2**14 + j2 / 2**28 + t, as elementary.exp_core."""
    x0 = x[0]
    n = rint(x0 * INV_LN2)
    head = [x0 - n * LN2[0], *x[1:k]]
    tail = [-n * LN2[1], -n * LN2[2], -n * LN2[3]]
    if k == 2:
        tail = [tail[0], tail[1] + tail[2]]
    r = add(head, tail, k)
    j1 = rint(r[0] * 2.0**el._B1)
    r0 = r[0] - j1 * 2.0**-el._B1
    j2 = rint(r0 * 2.0**el._B2)
    t = add([r0 - j2 * 2.0**-el._B2, *r[1:]], [0.0], k)
    return [n, j1, j2, *t]


def _exp(k: int, t: list[Num], t1: list[Num], t2: list[Num], n: V) -> list[Num]:
    """2**n T1 (T2 + T2 expm1(t))."""
    e = mul(t1, add(t2, mul(t2, _expm1_fast(t, k), k), k), k)
    s = pow2(n)
    return [w * s for w in e]


def _expm1_small(k: int, t: list[Num], t1: list[Num], t2: list[Num], tm1: Any, tm2: Any) -> Any:
    """expm1 for |x| < 2**-9 (n == 0): (T1 - 1) + T1 ((T2 - 1) + T2 expm1(t))."""
    u1 = add(tm2, mul(t2, _expm1_tiny(t, k), k), k)
    return add(tm1, mul(t1, u1, k), k)


def _recip_one_plus(e: list[Num], k: int) -> tuple[Num, ...]:
    return div([1.0], add(e, [1.0], k), k)


def _tanh(
    k: int, t: Any, t1: Any, t2: Any, tm1: Any, tm2: Any, n: V, sign: V, clip: V, small: bool
) -> list[Num]:  # noqa: E501
    """(tanh |a|/-2 with its sign, sech^2, E word 0) as elementary.tanh_parts, a = -2|z|."""
    e = _exp(k, t, t1, t2, n)
    m = _expm1_small(k, t, t1, t2, tm1, tm2) if small else add(e, [-1.0], k)
    e = [select(clip.v, 0.0, w) for w in e]
    m = [select(clip.v, c, w) for c, w in zip((-1.0, 0.0, 0.0), m, strict=False)]
    r = _recip_one_plus(e, k)
    th = [w * -sign for w in mul(m, r, k)]
    r2 = [w * 2.0 for w in r]
    d = mul(mul(r2, r2, k), e, k)
    pad = [0.0] * (3 - k)
    return [*th, *pad, *d, *pad, e[0]]


def _sigmoid(k: int, t: Any, t1: Any, t2: Any, n: V, neg: V, clip: V) -> list[Num]:
    """(sigmoid z, s(z) s(-z), E word 0) as elementary.sigmoid_parts, E = exp(-|z|)."""
    e = [select(clip.v, 0.0, w) for w in _exp(k, t, t1, t2, n)]
    r = _recip_one_plus(e, k)
    er = mul(e, r, k)
    s = [select(neg.v, a, b) for a, b in zip(er, r, strict=True)]
    d = mul(e, mul(r, r, k), k)
    pad = [0.0] * (3 - k)
    return [*s, *pad, *d, *pad, e[0]]


exp_reduce = words_intrinsic(_reduce, "w", nout=6)
exp_words = words_intrinsic(_exp, "wwwc")
tanh_words = words_intrinsic(
    lambda k, t, t1, t2, tm1, tm2, c: _tanh(k, t, t1, t2, tm1, tm2, *c, small=False), "wwwwwc", 7
)
tanh_words_small = words_intrinsic(
    lambda k, t, t1, t2, tm1, tm2, c: _tanh(k, t, t1, t2, tm1, tm2, *c, small=True), "wwwwwc", 7
)
sigmoid_words = words_intrinsic(lambda k, t, t1, t2, c: _sigmoid(k, t, t1, t2, *c), "wwwc", 7)


@njit(**JIT)
def _bad(m0: float) -> int:
    """1 when |m0| leaves the guarded range [2**-800, 2**800] (0 excepted)."""
    a = abs(m0)
    return int(not a <= HI) | int(a < LO and a > 0.0)


@njit(**JIT)
def _reduce_block(kw: tuple, a: np.ndarray, n: int, tab: tuple, red: np.ndarray) -> None:
    """red[:, j] = (n, j1, j2, t, T1[j1], T2[j2]) for the arguments a[:, j], j < n.

    Two loops: the reduction (vectorised) and the table look-ups (gathers), so that every
    loop's memory accesses stay affine. Arguments within the domain give ``|j1| <= J1`` and
    ``|j2| <= J2``; any other (a NaN midpoint, counted where it arose) reads entry 0 and
    stores j1 = j2 = 0: ``int(NaN)`` indexed out of the tables (numba checks no bounds).
    """
    t1, _, t2, _ = tab
    for j in range(n):
        r = exp_reduce(kw, (a[0, j], a[1, j], a[2, j]))
        red[0, j], red[1, j], red[2, j], red[3, j], red[4, j], red[5, j] = r
    for j in range(n):
        f1, f2 = red[1, j], red[2, j]
        f1 = f1 if abs(f1) <= J1 else 0.0  # NaN: 0
        f2 = f2 if abs(f2) <= J2 else 0.0
        red[1, j], red[2, j] = f1, f2
        i1, i2 = int(f1) + J1, int(f2) + J2
        red[6, j], red[7, j], red[8, j] = t1[i1, 0], t1[i1, 1], t1[i1, 2]
        red[9, j], red[10, j], red[11, j] = t2[i2, 0], t2[i2, 1], t2[i2, 2]


@njit(**JIT)
def _args(red: np.ndarray, j: int) -> tuple:
    """(t, T1, T2) of element j of a reduced block."""
    return (
        (red[3, j], red[4, j], red[5, j]),
        (red[6, j], red[7, j], red[8, j]),
        (red[9, j], red[10, j], red[11, j]),
    )


@njit(**JIT)
def tanh(
    kw: tuple,
    zm: np.ndarray,
    zr: np.ndarray,
    eta_fn: float,
    tab: tuple,
    tm: np.ndarray,
    tr: np.ndarray,
    dm: np.ndarray,
    dr: np.ndarray,
    fix: np.ndarray,
) -> tuple[int, int]:
    """tanh z into (tm, tr) and sech^2 z into (dm, dr); returns their range-error counts.

    The sech^2 count includes |z| > DOMAIN / 2 (there sech^2 leaves the float64 range).
    ``fix``: a uint8 scratch array of the size of z.
    """
    k = len(kw)
    t1, tm1, t2, tm2 = tab
    size = zm.shape[1]
    a = np.zeros((3, BLK))
    ctl = np.empty((2, BLK))
    red = np.empty((12, BLK))
    bad_t = 0
    bad_d = 0
    nfix = 0
    for start in range(0, size, BLK):
        n = min(BLK, size - start)
        for j in range(n):  # a = -2|z|, exact; clipped to -DOMAIN
            q = np.uint64(start + j)  # unsigned: no wrap-around test, the loop vectorises
            z0, z1 = zm[0, q], zm[1, q]
            z2 = zm[2, q] if k == 3 else 0.0
            sign = -1.0 if z0 < 0 else 1.0
            f = -2.0 * sign
            a0 = z0 * f
            clip = a0 < -DOMAIN
            a[0, j] = -DOMAIN if clip else a0
            a[1, j] = 0.0 if clip else z1 * f
            a[2, j] = 0.0 if clip else z2 * f
            ctl[0, j] = sign
            ctl[1, j] = 1.0 if clip else 0.0
        _reduce_block(kw, a, n, tab, red)
        for j in range(n):  # midpoints (few arrays per loop: LLVM's alias checks stay cheap)
            t, g1, g2 = _args(red, j)
            w = tanh_words(kw, t, g1, g2, g1, g2, (red[0, j], ctl[0, j], ctl[1, j] != 0.0))
            q = np.uint64(start + j)
            tm[0, q], tm[1, q], dm[0, q], dm[1, q] = w[0], w[1], w[3], w[4]
            if k == 3:
                tm[2, q], dm[2, q] = w[2], w[5]
            red[3, j], red[4, j], red[5, j] = w[0], w[3], w[6]
        for j in range(n):  # radii
            q = np.uint64(start + j)
            t0, d0, e0, r = red[3, j], red[4, j], red[5, j], zr[q]
            x = 2.0 * r
            em = x * (1.0 + x)  # >= expm1(2r) / (1 + 2**-51) for 2r <= 2**-10
            slope = 4.0 * e0 * (1.0 + 2.0**-30) * (1.0 + em)  # >= 4 exp(-2(|z| - r))
            slope = slope if slope < 1.0 else 1.0
            tr[q] = (r * slope * RU + eta_fn * abs(t0)) * RU
            dr[q] = (abs(d0) * HI_BOUND * em * RU + eta_fn * abs(d0)) * RU
            redo = (abs(a[0, j]) < SMALL) | (x > 2.0 * RAD_MAX)
            fix[q] = redo
            nfix += redo
            bad_t += _bad(t0)
            bad_d += _bad(d0) + int(abs(zm[0, q]) > DOMAIN / 2)
    if nfix == 0:
        return bad_t, bad_d
    for q in range(size):  # one by one: expm1's tiny-argument path, libm radii
        if not fix[q]:
            continue
        z0, z1 = zm[0, q], zm[1, q]
        z2 = zm[2, q] if k == 3 else 0.0
        sign = -1.0 if z0 < 0 else 1.0
        if abs(z0) < SMALL / 2:  # -2|z| = a, |a| < SMALL: not clipped
            f = -2.0 * sign
            a[0, 0], a[1, 0], a[2, 0] = z0 * f, z1 * f, z2 * f
            _reduce_block(kw, a, 1, tab, red)
            t, g1, g2 = _args(red, 0)
            i1, i2 = int(red[1, 0]) + J1, int(red[2, 0]) + J2
            m1 = (tm1[i1, 0], tm1[i1, 1], tm1[i1, 2])
            m2 = (tm2[i2, 0], tm2[i2, 1], tm2[i2, 2])
            w = tanh_words_small(kw, t, g1, g2, m1, m2, (red[0, 0], sign, False))
            bad_t += _bad(w[0]) - _bad(tm[0, q])
            bad_d += _bad(w[3]) - _bad(dm[0, q])
            tm[0, q], tm[1, q], dm[0, q], dm[1, q] = w[0], w[1], w[3], w[4]
            if k == 3:
                tm[2, q], dm[2, q] = w[2], w[5]
        r = zr[q]
        slope = min(1.0, 4.0 * math.exp(-2.0 * max(abs(z0) - r, 0.0)))
        t0, d0 = tm[0, q], dm[0, q]
        tr[q] = (r * slope * RU + eta_fn * abs(t0)) * RU
        dr[q] = (abs(d0) * HI_BOUND * math.expm1(2 * r) * RU + eta_fn * abs(d0)) * RU
    return bad_t, bad_d


@njit(**JIT)
def sigmoid(
    kw: tuple,
    zm: np.ndarray,
    zr: np.ndarray,
    eta_fn: float,
    tab: tuple,
    sm: np.ndarray,
    sr: np.ndarray,
    dm: np.ndarray,
    dr: np.ndarray,
    fix: np.ndarray,
) -> tuple[int, int]:
    """sigmoid z into (sm, sr) and s(z) s(-z) into (dm, dr); returns their range-error counts.

    The sigmoid count includes z < -DOMAIN, the derivative's |z| > DOMAIN. ``fix``: a uint8
    scratch array of the size of z.
    """
    k = len(kw)
    size = zm.shape[1]
    a = np.zeros((3, BLK))
    ctl = np.empty((2, BLK))
    red = np.empty((12, BLK))
    bad_s = 0
    bad_d = 0
    nfix = 0
    for start in range(0, size, BLK):
        n = min(BLK, size - start)
        for j in range(n):  # a = -|z|, clipped to -DOMAIN
            q = np.uint64(start + j)
            z0, z1 = zm[0, q], zm[1, q]
            z2 = zm[2, q] if k == 3 else 0.0
            neg = z0 < 0
            f = 1.0 if neg else -1.0
            a0 = z0 * f
            clip = a0 < -DOMAIN
            a[0, j] = -DOMAIN if clip else a0
            a[1, j] = 0.0 if clip else z1 * f
            a[2, j] = 0.0 if clip else z2 * f
            ctl[0, j] = 1.0 if neg else 0.0
            ctl[1, j] = 1.0 if clip else 0.0
        _reduce_block(kw, a, n, tab, red)
        for j in range(n):  # midpoints
            t, g1, g2 = _args(red, j)
            w = sigmoid_words(kw, t, g1, g2, (red[0, j], ctl[0, j] != 0.0, ctl[1, j] != 0.0))
            q = np.uint64(start + j)
            sm[0, q], sm[1, q], dm[0, q], dm[1, q] = w[0], w[1], w[3], w[4]
            if k == 3:
                sm[2, q], dm[2, q] = w[2], w[5]
            red[3, j], red[4, j] = w[0], w[3]
        for j in range(n):  # radii
            q = np.uint64(start + j)
            s0, d0, r = red[3, j], red[4, j], zr[q]
            em = r * (1.0 + r)  # >= expm1(r) / (1 + 2**-51) for r <= 2**-10
            prop = abs(s0) * HI_BOUND * em
            prop = (prop if prop < r / 4 else r / 4) * RU
            sr[q] = (prop + eta_fn * abs(s0)) * RU
            dr[q] = (abs(d0) * HI_BOUND * em * RU + eta_fn * abs(d0)) * RU
            redo = r > 2.0 * RAD_MAX
            fix[q] = redo
            nfix += redo
            bad_s += _bad(s0) + int(zm[0, q] < -DOMAIN)
            bad_d += _bad(d0) + int(abs(zm[0, q]) > DOMAIN)
    if nfix:
        for q in range(size):  # libm radii
            if fix[q]:
                r = zr[q]
                em = math.expm1(r)
                s0, d0 = sm[0, q], dm[0, q]
                prop = min(r / 4, abs(s0) * HI_BOUND * em) * RU
                sr[q] = (prop + eta_fn * abs(s0)) * RU
                dr[q] = (abs(d0) * HI_BOUND * em * RU + eta_fn * abs(d0)) * RU
    return bad_s, bad_d


@njit(**JIT)
def exp(
    kw: tuple, xm: np.ndarray, xr: np.ndarray, eta_fn: float, tab: tuple, om: np.ndarray,
    orad: np.ndarray,
) -> int:  # fmt: skip
    """exp x into (om, orad); returns the range-error count (|x| > DOMAIN included)."""
    k = len(kw)
    size = xm.shape[1]
    a = np.zeros((3, BLK))
    red = np.empty((12, BLK))
    bad = 0
    for start in range(0, size, BLK):
        n = min(BLK, size - start)
        for j in range(n):  # |x| > DOMAIN: flagged; keep the words finite, in the tables
            q = np.uint64(start + j)
            x0, x1 = xm[0, q], xm[1, q]
            x2 = xm[2, q] if k == 3 else 0.0
            out = abs(x0) > DOMAIN
            a[0, j] = 0.0 if out else x0
            a[1, j] = 0.0 if out else x1
            a[2, j] = 0.0 if out else x2
            bad += int(out)
        _reduce_block(kw, a, n, tab, red)
        for j in range(n):  # midpoints
            t, g1, g2 = _args(red, j)
            e = exp_words(kw, t, g1, g2, red[0, j])
            q = np.uint64(start + j)
            om[0, q], om[1, q] = e[0], e[1]
            if k == 3:
                om[2, q] = e[2]
            red[3, j] = e[0]
        for j in range(n):  # radii
            q = np.uint64(start + j)
            e0, r = red[3, j], xr[q]
            em = r * (1.0 + r) if r <= 2.0 * RAD_MAX else math.expm1(r)
            orad[q] = (abs(e0) * HI_BOUND * em * RU + eta_fn * abs(e0)) * RU
            bad += _bad(e0)
    return bad


@njit(**JIT)
def log(
    kw: tuple, xm: np.ndarray, xr: np.ndarray, eta_fn: float, tab: tuple, om: np.ndarray,
    orad: np.ndarray,
) -> int:  # fmt: skip
    """log x into (om, orad) by Newton steps y += x exp(-y) - 1; returns the range errors."""
    k = len(kw)
    a = np.zeros((3, 1))
    red = np.empty((12, 1))
    bad = 0
    for j in range(xm.shape[1]):
        x0, x1 = xm[0, j], xm[1, j]
        x2 = xm[2, j] if k == 3 else 0.0
        if not x0 > 0:
            bad += 1
            x0, x1, x2 = 1.0, 0.0, 0.0
        y = (math.log(x0), 0.0, 0.0)
        for _ in range(2 if k == 3 else 1):
            a[0, 0], a[1, 0], a[2, 0] = -y[0], -y[1], -y[2]
            _reduce_block(kw, a, 1, tab, red)
            t, g1, g2 = _args(red, 0)
            e = exp_words(kw, t, g1, g2, red[0, 0])
            c = w_add(kw, w_mul(kw, (x0, x1, x2), e), (-1.0, 0.0, 0.0))
            y = w_add(kw, y, c)
        den = xm[0, j] / HI_BOUND - xr[j]
        prop = xr[j] / den if den > 0 else math.inf
        # Newton's correction is accurate in absolute terms: error ~ eta (|log| + 1)
        orad[j] = (prop + eta_fn * (abs(y[0]) + 1.0)) * RU
        om[0, j], om[1, j] = y[0], y[1]
        if k == 3:
            om[2, j] = y[2]
        bad += _bad(y[0])
    return bad
