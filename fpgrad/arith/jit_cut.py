"""Compiled kernels that cut a matrix of multi-word values into integers, per row or column.

The cut shared by the int8 product engines (:mod:`fpgrad.arith.crt`,
:mod:`fpgrad.arith.digits`): each row (or column) q gets the scale exponent ``expo[q]`` with
``max |word 0| (1 + 2**-48) < 2**expo`` (as :func:`fpgrad.arith.jit_ball.slices`), and each
element the integer ``X = sum_i d_i 2**(bc (nch - 1 - i))`` of nch chunks of bc bits: chunk i
the sum over words of ``(w + sigma_i) - sigma_i`` (w: the word's remainder,
``ulp(sigma_i) = 2**(e - bc (i + 1))``), scaled to an integer. Faults (chunks over their caps,
NaN, huge lower words, non-zero words in a zero row, with ``exact`` a remainder left) are
counted, never hidden: where the count is not 0 the cut is void.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fpgrad.arith.jit_words import JIT

ROUND = 1.5 * 2.0**52  # (x + ROUND) - ROUND: x rounded to the nearest integer, |x| <= 2**51


@njit(**JIT)
def rint(x: float) -> float:
    """x rounded to the nearest integer (ties to even) for |x| <= 2**51, in two additions
    (``ulp(ROUND + x) = 1``): unlike libm's rint, LLVM vectorises it."""
    return (x + ROUND) - ROUND


@njit(**JIT)
def tops(words: np.ndarray, per_row: bool, top: np.ndarray) -> None:
    """``top[q]``: the largest |word 0| of row (``per_row``) or column q (NaN passed over)."""
    rows, cols = words.shape[1], words.shape[2]
    top[:] = 0.0
    for r in range(rows):
        w0 = words[0, r]
        if per_row:
            mx = 0.0
            for c in range(cols):
                v = abs(w0[c])
                mx = v if v > mx else mx
            top[r] = mx
        else:
            for c in range(cols):
                v = abs(w0[c])
                top[c] = v if v > top[c] else top[c]


@njit(**JIT)
def scale_exponent(top: float) -> int:
    """e with ``top (1 + 2**-48) < 2**e``: the scale of a row or column whose words are
    bounded by its largest word 0 (:func:`fpgrad.arith.jit_ball.slices` takes the same)."""
    return math.frexp(top * (1.0 + 2.0**-48))[1]


@njit(**JIT)
def scales(
    words: np.ndarray,
    per_row: bool,
    bc: int,
    nch: int,
    lo: int,
    hi: int,
    expo: np.ndarray,
    top: np.ndarray,
) -> tuple[int, np.ndarray, np.ndarray]:
    """The scales of a cut (:func:`fpgrad.arith.jit_crt.residues`): ``top``, ``expo`` per row or column, each
    chunk's sigma and the factor that scales it to an integer; the count of faults of zero
    rows or columns holding a non-zero or NaN word, or -1 when a non-zero scale leaves
    [lo, hi]."""
    nw = words.shape[0]
    rows, cols = words.shape[1], words.shape[2]
    nq = top.shape[0]
    tops(words, per_row, top)
    over = 0
    for q in range(nq):  # a zero scale claims the row (column) is 0: every word must be
        if top[q] == 0.0:
            for w in range(nw):
                for s in range(cols if per_row else rows):
                    v = words[w, q, s] if per_row else words[w, s, q]
                    over += v != 0.0  # NaN too
    sig = np.empty((nch, nq))
    up = np.empty((nch, nq))
    for q in range(nq):
        expo[q] = scale_exponent(top[q])
        if top[q] > 0.0 and (expo[q] < lo or expo[q] > hi):
            return -1, sig, up
    for q in range(nq):
        for i in range(nch):
            sig[i, q] = math.ldexp(1.5, expo[q] - bc * (i + 1) + 52)
            up[i, q] = math.ldexp(1.0, bc * (i + 1) - expo[q])
    return over, sig, up


@njit(inline="always", **JIT)
def cut_row(
    words: np.ndarray,
    r: int,
    per_row: bool,
    nw: int,
    nch: int,
    sig: np.ndarray,
    up: np.ndarray,
    caps: np.ndarray,
    exact: bool,
    rem: np.ndarray,
    ch: np.ndarray,
    srow: np.ndarray,
    urow: np.ndarray,
) -> int:
    """Row r of a cut (:func:`fpgrad.arith.jit_crt.residues`): its nch chunks into ``ch[:nch]`` (integers), the
    words' remainders left in ``rem``; returns the row's faults (chunks over their caps or
    NaN, huge lower words, with ``exact`` a remainder left)."""
    cols = words.shape[2]
    over = 0
    r0, r1, r2 = rem[0], rem[1], rem[2]
    for w in range(nw):
        for c in range(cols):
            rem[w, c] = words[w, r, c]
    for i in range(nch):
        if per_row:
            for c in range(cols):
                srow[c] = sig[i, r]
                urow[c] = up[i, r]
        else:
            for c in range(cols):
                srow[c] = sig[i, c]
                urow[c] = up[i, c]
        ci = ch[i]
        cap = caps[i]
        if nw == 1:
            for c in range(cols):
                sigma = srow[c]
                x0 = r0[c]
                s0 = (x0 + sigma) - sigma
                r0[c] = x0 - s0
                d = s0 * urow[c]  # exact: a multiple of one unit, scaled by 2**k
                ci[c] = d
                over += not abs(d) <= cap  # NaN counted
        else:
            for c in range(cols):
                sigma = srow[c]
                x0, x1, x2 = r0[c], r1[c], r2[c]
                s0 = (x0 + sigma) - sigma
                s1 = (x1 + sigma) - sigma
                s2 = (x2 + sigma) - sigma  # 0 for two words
                r0[c], r1[c], r2[c] = x0 - s0, x1 - s1, x2 - s2
                d = ((s0 + s1) + s2) * urow[c]  # exact: multiples of one unit, scaled
                ci[c] = d
                low = (abs(x1) + abs(x2)) * urow[c]  # huge lower words
                over += (not abs(d) <= cap) | (not low <= cap)  # NaN counted
    if exact:  # nothing left below the last chunk (NaN counted)
        for c in range(cols):
            over += (r0[c] != 0.0) | (r1[c] != 0.0) | (r2[c] != 0.0)
    return over
