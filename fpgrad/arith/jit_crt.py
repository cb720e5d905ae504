"""Compiled kernels of the integer (CRT) product engine, :mod:`fpgrad.arith.crt`.

Integers are held in float64 wherever they stay below 2**50 (every operation on them is then
exact); a residue is reduced by ``y = x - m rint(x fl(1/m))`` for an odd modulus m and
``|x| <= 2**50``: ``fl(x fl(1/m))`` is within ``(2u + u**2) |x / m| < 1 / (2m)`` of ``x / m``
(u = 2**-53), while ``x / m`` is at least ``1 / (2m)`` from every half-integer (``2x`` is even,
``(2j + 1) m`` odd), so the rint is that of ``x / m`` and y is the symmetric residue,
``|y| <= (m - 1) / 2``, computed exactly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

from fpgrad.arith.jit_ball import renorm_store
from fpgrad.arith.jit_cut import cut_row, rint, scale_exponent, scales, tops
from fpgrad.arith.jit_words import JIT, words_tag


def residues(
    words: np.ndarray, per_row: bool, bc: int, nch: int, *args: Any, exact: bool = False
) -> int:
    """Symmetric residues of the scaled integers of a (R, C) matrix of K <= 3 words;
    ``args``: lo, hi, mods, rtab, caps, expo, top, out (then ``exact``, by position or name).

    Each row (``per_row``) or column q gets the scale exponent ``expo[q]`` of
    :func:`fpgrad.arith.jit_ball.slices` (``max |word 0| (1 + 2**-48) < 2**expo``; ``top[q]``
    the max). Element x becomes the integer ``X = sum_i d_i 2**(bc (nch - 1 - i))``, its
    chunk i the sum over words of ``(w + sigma_i) - sigma_i`` (w: the word's remainder,
    ``ulp(sigma_i) = 2**(e - bc (i + 1))``), scaled by ``2**(bc (i + 1) - e)`` to an integer
    ``d_i``; each word's remainder after chunk nch is at most half its unit, so
    ``|x - X 2**(e - bc nch)| <= K 2**(e - bc nch - 1)``. ``out[j, r, c] = X mod mods[j]``
    (symmetric, int8) from ``sum_i d_i rtab[i, j]`` (``rtab[i, j] = 2**(bc (nch-1-i)) mod
    mods[j]``, |.| <= 127), exact while ``|d_i| <= caps[i] <= 2**(bc + 1)`` and
    ``nch 2**(bc + 1) 127 <= 2**50`` (the caller checks); ``nch <= 4``. Returns -1 (nothing
    written) when a non-zero scale leaves [lo, hi], else the number of faults: chunks with
    ``|d_i| > caps[i]`` or NaN, lower words with ``|w1| + |w2| > caps[i]`` units before chunk
    i (so every ``(w + sigma) - sigma`` and the sum of a chunk are exact) and rows or columns
    whose word 0 is all zero (scale 0) holding a non-zero or NaN word; with ``exact``, also
    elements with a non-zero remainder after chunk nch (so that ``x = X 2**(e - bc nch)``
    wherever the count is 0). Where that count is not 0, the residues are void.

    The kernel compiles once per (K, nch) (:func:`fpgrad.arith.jit_words.words_tag`), so
    missing words and chunks cost nothing.
    """
    if not (1 <= words.shape[0] <= 3 and 1 <= nch <= 4):
        raise ValueError("residues: 1 to 3 words and 1 to 4 chunks")
    if len(args) == 9:  # (lo, hi, mods, rtab, caps, expo, top, out, exact)
        *args, exact = args
    tags = words_tag(words.shape[0]), words_tag(nch)
    return _residues(words, per_row, bc, *args, bool(exact), *tags)


@njit(fastmath={"contract"}, **JIT)
def _residues(
    words: np.ndarray,
    per_row: bool,
    bc: int,
    lo: int,
    hi: int,
    mods: np.ndarray,
    rtab: np.ndarray,
    caps: np.ndarray,
    expo: np.ndarray,
    top: np.ndarray,
    out: np.ndarray,
    exact: bool,
    kw: tuple[float, ...],
    kc: tuple[float, ...],
) -> int:
    """:func:`residues` for ``len(kw)`` words and ``len(kc)`` chunks (constants). Fused
    multiply-adds (``contract``) change nothing: the chunk sums ``sum_i d_i rtab[i, j]`` are
    integers below 2**50 (exact either way), ``m rint(.)`` is exact, and an unrounded
    ``x fl(1/m)`` is nearer ``x / m`` than its rounding, so the rint is the same."""
    nw, nch = len(kw), len(kc)
    rows, cols = words.shape[1], words.shape[2]
    over, sig, up = scales(words, per_row, bc, nch, lo, hi, expo, top)
    if over < 0:
        return -1
    nm = mods.shape[0]
    fm = np.empty(nm)
    im = np.empty(nm)
    for j in range(nm):
        fm[j] = float(mods[j])
        im[j] = 1.0 / fm[j]
    rem = np.zeros((3, cols))
    ch = np.zeros((4, cols))
    tab = np.zeros((4, nm))
    tab[:nch] = rtab
    srow = np.empty(cols)
    urow = np.empty(cols)
    for r in range(rows):
        over += cut_row(words, r, per_row, nw, nch, sig, up, caps, exact, rem, ch, srow, urow)
        c0, c1, c2, c3 = ch[0], ch[1], ch[2], ch[3]
        for j in range(nm):  # one pass per modulus over 1-D views: LLVM vectorises it
            t0, t1, t2, t3 = tab[0, j], tab[1, j], tab[2, j], tab[3, j]
            m, inv = fm[j], im[j]
            oj = out[j, r]
            for c in range(cols):
                x = c0[c] * t0
                if nch > 1:
                    x += c1[c] * t1
                if nch > 2:
                    x += c2[c] * t2
                if nch > 3:
                    x += c3[c] * t3
                oj[c] = np.int8(x - m * rint(x * inv))
    return over


@njit(**JIT)
def exact_bits(words: np.ndarray, per_row: bool, limit: int) -> int:
    """The fewest bits B with every word of a (K, R, C) matrix a multiple of ``2**(e - B)``,
    e the scale exponent of its row (``per_row``) or column as :func:`residues` takes it
    (``max |word 0| (1 + 2**-48) < 2**e``); ``limit + 1`` as soon as B would exceed ``limit``
    (and for NaN or inf). 0 when every word is 0. A finite word ``m 2**(f - 1075)`` (m its
    integer significand, f its biased exponent, 1 for subnormals) is a multiple of
    ``2**(f - 1075 + t)``, t the trailing zero bits of m, read from the float64 ``2**t``.
    Rows are scanned lowest word first, so multi-word balls stop at their first row.
    """
    nw, rows, cols = words.shape
    nq = rows if per_row else cols
    top = np.empty(nq)
    tops(words, per_row, top)
    expo = np.empty(nq, dtype=np.int64)
    for q in range(nq):
        if not top[q] < math.inf:  # inf
            return limit + 1
        expo[q] = scale_exponent(top[q])
    bits = words.view(np.int64)
    lowf = np.empty(cols)
    lowi = lowf.view(np.int64)
    field = np.empty(cols, dtype=np.int64)
    need = 0
    for r in range(rows):
        for w in range(nw - 1, -1, -1):
            row = bits[w, r]
            live = 0
            for c in range(cols):  # a zero row of a lower word: skipped
                live |= row[c] << 1  # the sign bit dropped: -0.0 is zero
            if live == 0:
                continue
            for c in range(cols):  # branch-free: vectorised
                raw = row[c]
                f = (raw >> 52) & 0x7FF
                mant = (raw & 0xFFFFFFFFFFFFF) | (np.int64(f != 0) << 52)
                lowf[c] = float(mant & -mant)  # 2**t (0 for a zero word)
                field[c] = f
            bad = 0
            er = expo[r] if per_row else 0
            for c in range(cols):
                e = er if per_row else expo[c]
                f = field[c]
                b = e - ((f if f else 1) - 1075 + ((lowi[c] >> 52) - 1023))
                b = b if lowi[c] != 0 else 0  # a zero word fits any width
                need = b if b > need else need
                bad |= f == 0x7FF
            if need > limit or bad:
                return limit + 1
    return need


MAX_LIMBS = 8  #: the most limbs :func:`recombine` sums (its accumulators)


def recombine(
    prods: np.ndarray, mods: np.ndarray, cinv: np.ndarray, limbs: np.ndarray, *args: Any
) -> int:
    """Terms of the integers C (one per column e) given ``prods[j, e] = C mod mods[j]``;
    ``args``: beta, top, cap, pw, scale, terms.

    CRT digits: ``t_j`` = the symmetric residue of ``prods[j] cinv[j]`` (``cinv[j]`` the
    inverse of ``M / m_j`` mod m_j, M the product of the moduli; exact while
    ``|prods| 127 <= 2**50``), so ``C = sum_j t_j M / m_j - k M`` with
    ``k = rint(sum_j t_j fl(1/m_j))`` whenever ``|C| / M <= 1/2 - N**2 2**-53`` (the float
    sum errs by at most ``(N + 2) 2**-53 sum_j |t_j / m_j|``). Limb sums
    ``S_l = sum_j t_j limbs[l, j] + k limbs[l, N]`` (signed limbs of ``M / m_j`` and -M, from the
    caller's lowest kept limb up; integers below 2**53 in every partial sum, the caller's
    bound), then carries upward: ``v = S_l + carry``, ``carry = rint(v 2**-beta)``, limb
    ``v - carry 2**beta`` (|limb| <= 2**(beta - 1), exact). Limb l <= top times
    ``pw[l] scale[e]`` (powers of two) goes to ``terms[top - l, e]``, largest first.
    Returns how many limbs above ``top`` and final carries are non-zero, plus how many limbs
    ``top`` exceed ``cap`` in absolute value: 0 whenever C is within the caller's bound (so
    a wrong k, off by at least M, is caught; anything counted is a fault).

    The kernel compiles once per number of limbs (at most :data:`MAX_LIMBS`), whose sums
    it accumulates in one pass over each digit.
    """
    return _recombine(prods, mods, cinv, limbs, *args, _NO_WORDS, _tags(limbs), ())[0]


_NO_WORDS = np.empty((1, 1))


def _tags(limbs: np.ndarray) -> tuple[float, ...]:
    """The limb count as a compile-time constant (1 to :data:`MAX_LIMBS`)."""
    if not 1 <= limbs.shape[0] <= MAX_LIMBS:
        raise ValueError(f"recombine: 1 to {MAX_LIMBS} limbs")
    return words_tag(limbs.shape[0])


def recombine_words(
    prods: np.ndarray, mods: np.ndarray, cinv: np.ndarray, limbs: np.ndarray, *args: Any
) -> tuple[int, int]:
    """:func:`recombine` with each result's terms renormalised into k words at once (the
    words of :func:`fpgrad.arith.jit_ball.renorm` on the terms, by the same code, without
    the terms in memory); ``args``: beta, top, cap, pw, scale, mid (k, size). Returns (the
    faults of :func:`recombine`, the results whose word 0 leaves the guarded range)."""
    *rest, mid = args
    return _recombine(prods, mods, cinv, limbs, *rest, _NO_WORDS, mid, _tags(limbs),
                      words_tag(mid.shape[0]))  # fmt: skip


@njit(fastmath={"contract"}, inline="always", **JIT)
def _digit(p: float, ci: float, m: float, inv: float) -> float:
    """The CRT digit of a residue product p: the symmetric residue of ``p ci`` modulo m
    (``inv = 1/m``; exact, see :func:`recombine`)."""
    t = p * ci
    return t - m * rint(t * inv)


@njit(fastmath={"contract"}, **JIT)
def _four(
    a: float,
    t0: float,
    t1: float,
    t2: float,
    t3: float,
    w0: float,
    w1: float,
    w2: float,
    w3: float,
) -> float:
    """``a + t0 w0 + t1 w1 + t2 w2 + t3 w3``, added left to right (exact for the limb sums of
    :func:`_recombine`, integers below 2**53 after every step)."""
    a += t0 * w0
    a += t1 * w1
    a += t2 * w2
    a += t3 * w3
    return a


@njit(fastmath={"contract"}, **JIT)
def _recombine(
    prods: np.ndarray,
    mods: np.ndarray,
    cinv: np.ndarray,
    limbs: np.ndarray,
    beta: int,
    top: int,
    cap: float,
    pw: np.ndarray,
    scale: np.ndarray,
    terms: np.ndarray,
    mid: np.ndarray,
    kl: tuple[float, ...],
    kw: tuple[float, ...],
) -> tuple[int, int]:
    """:func:`recombine` for ``len(kl)`` limbs (a constant), into ``terms``, or with
    ``len(kw)`` = k > 0 words, renormalised into ``mid`` (:func:`recombine_words`). Fused
    multiply-adds (``contract``) change nothing proven: every limb sum, ``m rint(.)``,
    ``v 2**-beta`` and ``cy 2**beta`` is exact either way, an unrounded ``t fl(1/m)`` only
    brings the rint nearer ``t / m``, and the k sum rounds once per term instead of twice
    (within the bound)."""
    nl = len(kl)
    nm, size = prods.shape
    block = 256
    lw = np.zeros((MAX_LIMBS, nm + 1))
    lw[:nl] = limbs
    ksum = np.empty(block)
    acc = np.zeros((MAX_LIMBS, block))
    a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
    a4, a5, a6, a7 = acc[4], acc[5], acc[6], acc[7]
    carry = np.empty(block)
    k = len(kw)
    rest = np.empty((top + 1 if k else 1, block))  # a block's terms, renormalised in place
    s = np.empty(block)
    words = np.empty((3, block))
    down = math.ldexp(1.0, -beta)
    up = math.ldexp(1.0, beta)
    bad = 0
    flagged = 0
    for start in range(0, size, block):
        n = min(block, size - start)
        for e in range(n):
            ksum[e] = 0.0
        for lo in range(nl):
            for e in range(n):
                acc[lo, e] = 0.0
        j = 0
        while j + 4 <= nm:  # four digits per pass: the accumulators loaded and stored once
            q0, q1, q2, q3 = prods[j, start : start + n], prods[j + 1, start : start + n], \
                prods[j + 2, start : start + n], prods[j + 3, start : start + n]  # fmt: skip
            m0, m1, m2, m3 = float(mods[j]), float(mods[j + 1]), float(mods[j + 2]), \
                float(mods[j + 3])  # fmt: skip
            i0, i1, i2, i3 = 1.0 / m0, 1.0 / m1, 1.0 / m2, 1.0 / m3
            c0, c1, c2, c3 = float(cinv[j]), float(cinv[j + 1]), float(cinv[j + 2]), \
                float(cinv[j + 3])  # fmt: skip
            v00, v01, v02, v03 = lw[0, j], lw[0, j + 1], lw[0, j + 2], lw[0, j + 3]
            v10, v11, v12, v13 = lw[1, j], lw[1, j + 1], lw[1, j + 2], lw[1, j + 3]
            v20, v21, v22, v23 = lw[2, j], lw[2, j + 1], lw[2, j + 2], lw[2, j + 3]
            v30, v31, v32, v33 = lw[3, j], lw[3, j + 1], lw[3, j + 2], lw[3, j + 3]
            v40, v41, v42, v43 = lw[4, j], lw[4, j + 1], lw[4, j + 2], lw[4, j + 3]
            v50, v51, v52, v53 = lw[5, j], lw[5, j + 1], lw[5, j + 2], lw[5, j + 3]
            v60, v61, v62, v63 = lw[6, j], lw[6, j + 1], lw[6, j + 2], lw[6, j + 3]
            v70, v71, v72, v73 = lw[7, j], lw[7, j + 1], lw[7, j + 2], lw[7, j + 3]
            for e in range(n):
                t0 = _digit(float(q0[e]), c0, m0, i0)
                t1 = _digit(float(q1[e]), c1, m1, i1)
                t2 = _digit(float(q2[e]), c2, m2, i2)
                t3 = _digit(float(q3[e]), c3, m3, i3)
                ks = ksum[e]
                ks += t0 * i0
                ks += t1 * i1
                ks += t2 * i2
                ks += t3 * i3
                ksum[e] = ks
                a0[e] = _four(a0[e], t0, t1, t2, t3, v00, v01, v02, v03)
                if nl > 1:
                    a1[e] = _four(a1[e], t0, t1, t2, t3, v10, v11, v12, v13)
                if nl > 2:
                    a2[e] = _four(a2[e], t0, t1, t2, t3, v20, v21, v22, v23)
                if nl > 3:
                    a3[e] = _four(a3[e], t0, t1, t2, t3, v30, v31, v32, v33)
                if nl > 4:
                    a4[e] = _four(a4[e], t0, t1, t2, t3, v40, v41, v42, v43)
                if nl > 5:
                    a5[e] = _four(a5[e], t0, t1, t2, t3, v50, v51, v52, v53)
                if nl > 6:
                    a6[e] = _four(a6[e], t0, t1, t2, t3, v60, v61, v62, v63)
                if nl > 7:
                    a7[e] = _four(a7[e], t0, t1, t2, t3, v70, v71, v72, v73)
            j += 4
        first = j
        for j in range(first, nm + 1):  # the digits left, one per pass, then k (j = nm)
            w0, w1, w2, w3 = lw[0, j], lw[1, j], lw[2, j], lw[3, j]
            w4, w5, w6, w7 = lw[4, j], lw[5, j], lw[6, j], lw[7, j]
            last = j == nm
            m = 1.0 if last else float(mods[j])
            inv = 1.0 / m
            ci = 1.0 if last else float(cinv[j])
            pj = prods[min(j, nm - 1), start : start + n]
            for e in range(n):
                if last:
                    t = rint(ksum[e])  # k, against the limbs of -M
                else:
                    t = _digit(float(pj[e]), ci, m, inv)
                    ksum[e] += t * inv
                a0[e] += t * w0
                if nl > 1:
                    a1[e] += t * w1
                if nl > 2:
                    a2[e] += t * w2
                if nl > 3:
                    a3[e] += t * w3
                if nl > 4:
                    a4[e] += t * w4
                if nl > 5:
                    a5[e] += t * w5
                if nl > 6:
                    a6[e] += t * w6
                if nl > 7:
                    a7[e] += t * w7
        for e in range(n):
            carry[e] = 0.0
        for lo in range(nl):  # carried upward: limbs up to top are terms, those above 0
            ac = acc[lo]
            keep = lo <= top
            f = pw[lo]
            sc = scale[start : start + n]
            row = top - lo if keep else 0
            out = rest[row, :n] if k else terms[row, start : start + n]
            for e in range(n):
                v = ac[e] + carry[e]
                cy = rint(v * down)
                carry[e] = cy
                limb = v - cy * up
                if keep:
                    out[e] = (limb * f) * sc[e]
                    if lo == top:
                        bad += abs(limb) > cap
                else:
                    bad += limb != 0.0
        for e in range(n):
            bad += carry[e] != 0.0
        if k:
            flagged += renorm_store(kw, rest, top + 1, n, s, words, mid, start)
    return bad, flagged
