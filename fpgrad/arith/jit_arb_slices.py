"""Compiled loops of :mod:`fpgrad.arith.arb_slices`: read python-flint balls, cut their
midpoints into float64 slices, and write the products' balls back through FLINT.

Balls are passed as in :mod:`fpgrad.arith.jit_arb` (object pointers, the ``arb_struct``'s byte
offset ``off``, the arb type's address ``tp``). An ``arf_struct`` is read as FLINT 3 lays it
out (arf.h): the exponent (an fmpz, read only while small), ``size`` (limbs << 1 | sign),
then two limbs in place or (more than two limbs) the limb count allocated and a pointer to
them; the limbs are least significant first, the top one normalised (its top bit set), so
``|mid| = M 2**(exp - 64 nl)`` with M the limbs' integer. A ``mag_struct`` follows at byte 32:
the exponent (an fmpz) and a 30-bit mantissa, ``rad = man 2**(exp - 30)``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types

from fpgrad.arith.jit_arb import JIT, all_arb, load_word

_I = types.int64
_V = types.void
arf_set_mpn = types.ExternalFunction("arf_set_mpn", _V(_I, _I, _I, types.int32))
arf_mul_2exp_si = types.ExternalFunction("arf_mul_2exp_si", _V(_I, _I, _I))
arf_set_round = types.ExternalFunction("arf_set_round", types.int32(_I, _I, _I, types.int32))
mag_set_d_2exp_fmpz = types.ExternalFunction("mag_set_d_2exp_fmpz", _V(_I, types.float64, _I))
arb_add_error_2exp_si = types.ExternalFunction("arb_add_error_2exp_si", _V(_I, _I))

SMALL = 1 << 40  #: exponents read only below this in magnitude (fmpz small: below 2**62)
ZERO_EXP = -(1 << 62)  #: ``mexp`` of an exact zero midpoint
MAG_BITS = 30
RND_DOWN = 0  #: FLINT's ARF_RND_DOWN (toward 0)


@njit(**JIT)
def _ctz(x: np.uint64) -> int:
    """Trailing zero bits of a non-zero limb: the exponent of its lowest set bit, a power of
    two that float64 holds exactly."""
    return math.frexp(float(x & (~x + np.uint64(1))))[1] - 1


@njit(**JIT)
def scan(
    ptrs: np.ndarray, off: int, tp: int, mexp: np.ndarray, nl: np.ndarray, limbs: np.ndarray,
    neg: np.ndarray, low: np.ndarray, rman: np.ndarray, rexp: np.ndarray,
) -> int:  # fmt: skip
    """Per ball: the midpoint's exponent (:data:`ZERO_EXP` for 0), limb count, limb address,
    sign, lowest set bit (``exp - 64 nl + ctz(limb 0)``: |mid| is a multiple of 2**low) and
    the radius's mantissa and exponent (``rman 2**(rexp - 30)``). Returns 0, or 1 where an
    element is not a ball, 2 for a midpoint or radius that is not finite or has an exponent
    of :data:`SMALL` or more (the caller keeps arb_dot)."""
    if not all_arb(ptrs, tp):
        return 1
    for i in range(ptrs.size):
        a = ptrs[i] + off
        e = load_word(a)
        size = load_word(a + 8)
        r_e = load_word(a + 32)
        r_m = load_word(a + 40)
        if r_m < 0 or r_m >= (1 << MAG_BITS) or not (-SMALL < r_e < SMALL):
            return 2  # an infinite radius has a huge exponent
        rman[i] = r_m
        rexp[i] = r_e if r_m != 0 else 0
        if size == 0:
            if e != 0:
                return 2  # inf or NaN
            mexp[i] = ZERO_EXP
            nl[i] = 0
            neg[i] = False
            low[i] = ZERO_EXP
            continue
        if not (-SMALL < e < SMALL):
            return 2
        k = size >> 1
        mexp[i] = e
        nl[i] = k
        neg[i] = (size & 1) == 1
        addr = a + 16 if k <= 2 else load_word(a + 24)
        limbs[i] = addr
        low[i] = e - 64 * k + _ctz(np.uint64(load_word(addr)))
    return 0


FLOOR = 2.0**-1022  #: radius and |mid| ratios below this are raised to it (upper bounds)


@njit(**JIT)
def prepare(
    mexp: np.ndarray, low: np.ndarray, rman: np.ndarray, rexp: np.ndarray, cols: int,
    by_row: bool, scale: np.ndarray, elem: np.ndarray, kgrp: np.ndarray, rho: np.ndarray,
    nz: np.ndarray,
) -> tuple[int, bool, bool, float]:  # fmt: skip
    """For a (rows, cols) operand read by :func:`scan`, per row (``by_row``) or column g:
    ``scale[g]`` the largest exponent of its non-zero midpoints and radii (0 where all are
    0) and ``kgrp[g]`` the largest exponent of its radii relative to that scale (0 where all
    are 0); ``elem`` each element's scale; ``nz`` 1.0 where the midpoint is not 0; ``rho``
    with ``rad / 2**scale <= rho 2**kgrp``, ``rho <= 1`` and at least :data:`FLOOR` where the
    radius is not 0. Returns (w, any radius, floored, least): the bits below the scale that
    the midpoints reach (0: all zero), whether a radius is not 0, whether one was raised to
    :data:`FLOOR`, and the least positive ``rho`` (inf where none is)."""
    n = mexp.size
    lowest = -(1 << 62)
    for g in range(scale.size):
        scale[g] = lowest
        kgrp[g] = lowest
    for i in range(n):
        g = i // cols if by_row else i % cols
        if mexp[i] != ZERO_EXP and mexp[i] > scale[g]:
            scale[g] = mexp[i]
        if rman[i] > 0 and rexp[i] > scale[g]:
            scale[g] = rexp[i]
    for g in range(scale.size):
        if scale[g] == lowest:
            scale[g] = 0
    w = 0
    for i in range(n):
        g = i // cols if by_row else i % cols
        e = scale[g]
        elem[i] = e
        if mexp[i] != ZERO_EXP:
            nz[i] = 1.0
            w = max(w, e - low[i])
        else:
            nz[i] = 0.0
        if rman[i] > 0:
            kgrp[g] = max(kgrp[g], rexp[i] - e)  # rad < 2**(rexp - e) of the scale
    radius = False
    for g in range(kgrp.size):
        if kgrp[g] == lowest:
            kgrp[g] = 0
        else:
            radius = True
    floored = False
    least = math.inf
    for i in range(n):
        if rman[i] > 0:
            g = i // cols if by_row else i % cols
            shift = rexp[i] - elem[i] - kgrp[g] - MAG_BITS  # rad / 2**e = rman 2**(shift + K)
            if shift < -1022:  # rman < 2**30: below 2**-992, maybe below FLOOR
                floored = True
            rho[i] = FLOOR if shift < -1022 - MAG_BITS else max(math.ldexp(rman[i], shift), FLOOR)
            least = min(least, rho[i])
        else:
            rho[i] = 0.0
    return w, radius, floored, least


@njit(**JIT)
def _bits(addr: int, nl: int, lo: int, width: int) -> int:
    """Bits ``lo .. lo + width - 1`` (width <= 32) of the integer in ``nl`` limbs at ``addr``,
    bits outside 0 .. 64 nl - 1 read as 0."""
    shift = 0
    if lo < 0:  # bits below 0 are 0: read from 0 and shift into place
        if lo + width <= 0:
            return 0
        shift = -lo
        width = lo + width
        lo = 0
    q = lo >> 6
    if q >= nl:
        return 0
    r = lo & 63
    v = np.uint64(load_word(addr + 8 * q)) >> np.uint64(r)
    if r + width > 64 and q + 1 < nl:
        v |= np.uint64(load_word(addr + 8 * (q + 1))) << np.uint64(64 - r)
    return int(v & np.uint64((1 << width) - 1)) << shift


@njit(**JIT)
def cut(
    mexp: np.ndarray, nl: np.ndarray, limbs: np.ndarray, neg: np.ndarray, scale: np.ndarray,
    beta: int, out: np.ndarray, reverse: bool, alpha: np.ndarray,
) -> tuple[bool, float]:  # fmt: skip
    """Slices of each midpoint against its row's (column's) ``scale`` e: the signed bits
    ``2**-(t+1) beta .. 2**-t beta`` of ``mid / 2**e`` (|mid| < 2**e), so ``mid = sum_t s_t
    2**(e - (t+1) beta) + r`` with ``|r| < 2**(e - T beta)`` and ``r`` of mid's sign
    (truncation toward 0). Element ``i`` of ``out`` (R, T, C) is ``out[i // C, t, i % C]``,
    or with ``reverse`` (R = 1) ``out[0 ... T - 1 - t ...]``: ``out[T - 1 - t, 0, i]`` read as
    (T, 1, C). ``alpha[i]``: an upper bound of ``|mid| / 2**e`` (its top 53 bits rounded up;
    at least 2**-1000 where it is not 0). Returns whether one was raised to 2**-1000, and
    the least positive ``alpha`` (inf where none is)."""
    nt = out.shape[0] if reverse else out.shape[1]
    cols = out.shape[2]
    floored = False
    least = math.inf
    for i in range(mexp.size):
        r0 = i // cols
        c0 = i - r0 * cols
        if mexp[i] == ZERO_EXP:
            for t in range(nt):
                if reverse:
                    out[nt - 1 - t, 0, i] = 0.0
                else:
                    out[r0, t, c0] = 0.0
            alpha[i] = 0.0
            continue
        k = nl[i]
        addr = limbs[i]
        top = mexp[i] - scale[i]  # <= 0: mid / 2**e = M 2**(top - 64 k)
        sign = -1.0 if neg[i] else 1.0
        for t in range(nt):
            # floor(M 2**(top - 64k + (t+1) beta)) mod 2**beta: M's bits from 64k - top - (t+1) beta
            v = sign * _bits(addr, k, 64 * k - top - (t + 1) * beta, beta)
            if reverse:
                out[nt - 1 - t, 0, i] = v
            else:
                out[r0, t, c0] = v
        if top < -999:  # |mid| / 2**e < 2**top: 2**-1000 at most, no subnormal rounding
            alpha[i] = 2.0**-1000
            floored = True
        else:
            hi = np.uint64(load_word(addr + 8 * (k - 1))) >> np.uint64(11)  # top 53 bits
            rest = (np.uint64(load_word(addr + 8 * (k - 1))) & np.uint64(2047)) != 0
            for w in range(k - 1):
                rest = rest or load_word(addr + 8 * w) != 0
            alpha[i] = math.ldexp(float(hi) + (1.0 if rest else 0.0), top - 53)
        least = min(least, alpha[i])
    return floored, least


@njit(**JIT)
def combine(ts: np.ndarray, ks: np.ndarray, f: np.ndarray, e: np.ndarray) -> None:
    """``f 2**e >= sum_i ts[i] 2**ks[i]`` elementwise (ts >= 0): e the largest ks[i] among the
    terms that are not 0 there (0 where all are), each term shifted by ``ks[i] - e`` (exact
    down to 2**-1022; where it is negative the term may round in the subnormals, so 2**-1074
    more; shifts below -1100 taken as -1100, larger), the sum times 1 + 2**-50 for its own
    roundings (at most 5 of 2**-53 relative)."""
    nt, m, p = ts.shape
    low = -(1 << 62)
    for i in range(m):
        for j in range(p):
            top = low
            for t in range(nt):
                if ts[t, i, j] > 0.0 and ks[t, i, j] > top:
                    top = ks[t, i, j]
            if top == low:
                top = 0
            total = 0.0
            for t in range(nt):
                v = ts[t, i, j]
                if v > 0.0:
                    shift = max(ks[t, i, j] - top, -1100)
                    total += math.ldexp(v, shift)
                    if shift < 0:
                        total += 2.0**-1074
            f[i, j] = total * (1.0 + 2.0**-50)
            e[i, j] = top


@njit(**JIT)
def assemble(
    diag: np.ndarray, ea: np.ndarray, eb: np.ndarray, beta: int, err_f: np.ndarray,
    err_e: np.ndarray, out: np.ndarray, prec: int, off: int, tp: int, scratch: np.ndarray,
    digits: np.ndarray, words: np.ndarray,
) -> bool:  # fmt: skip
    """Each result ``C_ij = 2**(ea_i + eb_j) sum_s diag[s, i, j] 2**-((s+2) beta)`` (the
    diagonals exact integers below 2**53) summed exactly in base-2**beta digits, set as the
    ball's midpoint and truncated to ``prec`` bits (arf_set_round toward 0; where inexact, one
    unit in its last place added to the radius); the radius set to an upper bound of ``err_f
    2**(err_e + ea + eb)`` first (mag_set_d_2exp_fmpz). ``out``: fresh zero balls, row-major.
    ``scratch``: one int64 (the exponent, a small fmpz); ``digits``: S + 1 int64; ``words``:
    uint64 limbs for at least ``S beta + 56`` bits."""
    if not all_arb(out, tp):
        return False
    ns, m, p = diag.shape
    last = ns - 1
    expo = scratch.ctypes.data  # an fmpz (a small one: the int64 itself)
    for i in range(m):
        for j in range(p):
            for s in range(ns):
                digits[s] = np.int64(diag[s, i, j])
            for s in range(last, 0, -1):  # carries: digits 1.. in [0, 2**beta)
                c = digits[s] >> beta
                digits[s] -= c << beta
                digits[s - 1] += c
            negative = digits[0] < 0
            if negative:
                for s in range(ns):
                    digits[s] = -digits[s]
                for s in range(last, 0, -1):
                    c = digits[s] >> beta
                    digits[s] -= c << beta
                    digits[s - 1] += c
            nw = words.size
            for w in range(nw):
                words[w] = np.uint64(0)
            for s in range(ns):  # digit s at bit (S - s) beta; digit 0 below 2**55
                d = np.uint64(digits[s])
                if d == 0:
                    continue
                pos = (last - s) * beta
                q = pos >> 6
                r = pos & 63
                words[q] |= d << np.uint64(r)
                if r > 0 and q + 1 < nw:
                    words[q + 1] |= d >> np.uint64(64 - r)
            top = nw
            while top > 0 and words[top - 1] == 0:
                top -= 1
            ball = out[i * p + j] + off  # a fresh zero ball: arf at 0, mag at 32
            if err_f[i, j] > 0.0:  # the radius first: an upper bound of err_f 2**(err_e+ea+eb)
                scratch[0] = err_e[i, j] + ea[i] + eb[j]
                mag_set_d_2exp_fmpz(ball + 32, err_f[i, j], expo)
            if top > 0:
                arf_set_mpn(ball, words.ctypes.data, top, 1 if negative else 0)
                arf_mul_2exp_si(ball, ball, ea[i] + eb[j] - (last + 2) * beta)
                if arf_set_round(ball, ball, prec, RND_DOWN) != 0:
                    # truncated to prec bits: below one unit in the last place, 2**(exp - prec)
                    arb_add_error_2exp_si(ball, load_word(ball) - prec)
    return True
