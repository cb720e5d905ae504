"""Compiled kernels of the int8 digit product engine, :mod:`fpgrad.arith.digits`.

An operand is cut as the CRT engine cuts it (:func:`fpgrad.arith.jit_crt.residues`: the same
scales, chunks and fault checks), and its integer ``X = sum_i d_i 2**(bc (nch - 1 - i))`` is
written in T balanced base-256 digits ``X = sum_t g_t 256**(T - 1 - t)``, ``-128 <= g_t <=
127``, by exact int64 carries. The products of the digit matrices are exact int32 GEMMs; the
sums of their diagonals are recombined here into k words.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from fpgrad.arith.jit_ball import renorm_store
from fpgrad.arith.jit_cut import cut_row, rint, scales
from fpgrad.arith.jit_words import JIT, words_tag


def digits(words: np.ndarray, per_row: bool, bc: int, nch: int, *args: Any) -> int:
    """Balanced base-256 digits of the scaled integers of a (R, C) matrix of K <= 3 words;
    ``args``: lo, hi, caps, expo, top, out, exact.

    The cut (``expo``, ``top``, the integer X of each element, its error and faults) is that
    of :func:`fpgrad.arith.jit_crt.residues` with the same arguments. ``out`` (int8) receives
    the T digits of X, most significant first: ``out[r, t, c]`` for a cut by row (the left
    operand, laid out as T blocks of columns), ``out[T - 1 - t, r, c]`` by column (the right
    operand, blocks of rows in reverse). Each chunk enters an int64 accumulator shifted by its
    bit offset from the next digit (below 8), and each digit is ``((acc + 128) & 255) - 128``
    with ``acc = (acc - digit) >> 8`` after it (exact: ``|acc| < 2**50``). A carry left after
    the T digits (X beyond what T digits hold) is a fault. Returns -1 (nothing written) when a
    non-zero scale leaves [lo, hi], else the number of faults; where it is not 0 the digits
    are void."""
    if not (1 <= words.shape[0] <= 3 and 1 <= nch <= 4):
        raise ValueError("digits: 1 to 3 words and 1 to 4 chunks")
    lo, hi, caps, expo, top, out, exact = args
    return _digits(words, per_row, bc, nch, lo, hi, caps, expo, top, out, bool(exact))


@njit(**JIT)
def _digits(
    words: np.ndarray,
    per_row: bool,
    bc: int,
    nch: int,
    lo: int,
    hi: int,
    caps: np.ndarray,
    expo: np.ndarray,
    top: np.ndarray,
    out: np.ndarray,
    exact: bool,
) -> int:
    nw = words.shape[0]
    rows, cols = words.shape[1], words.shape[2]
    ndig = out.shape[1] if per_row else out.shape[0]
    over, sig, up = scales(words, per_row, bc, nch, lo, hi, expo, top)
    if over < 0:
        return -1
    rem = np.zeros((3, cols))
    ch = np.zeros((4, cols))
    srow = np.empty(cols)
    urow = np.empty(cols)
    acc = np.empty(cols, dtype=np.int64)
    for r in range(rows):
        over += cut_row(words, r, per_row, nw, nch, sig, up, caps, exact, rem, ch, srow, urow)
        for c in range(cols):
            acc[c] = 0
        nxt = nch - 1  # the next chunk to enter, lowest first (bit offset bc (nch - 1 - i))
        for t in range(ndig):  # digit t from the least significant: weight 256**t
            while nxt >= 0 and bc * (nch - 1 - nxt) < 8 * (t + 1):
                sh = bc * (nch - 1 - nxt) - 8 * t
                cn = ch[nxt]
                for c in range(cols):  # |chunk| <= 2**41 (caps, checked): exact in int64
                    d = cn[c]
                    d = d if abs(d) <= 2.0**45 else 0.0  # a fault already counted (or NaN)
                    acc[c] += np.int64(d) << sh
                nxt -= 1
            row = out[r, ndig - 1 - t] if per_row else out[t, r]
            for c in range(cols):
                a = acc[c]
                g = ((a + 128) & 255) - 128
                row[c] = np.int8(g)
                acc[c] = (a - g) >> 8
        over += nxt >= 0  # a chunk never entered: too few digits (a planning error)
        for c in range(cols):
            over += acc[c] != 0
    return over


def combine(diags: np.ndarray, *args: Any) -> tuple[int, int]:
    """The k words of each result from its diagonal sums; ``args``: group, pw, scale, mid.

    ``diags[s, e]`` (int32 or int64): ``V_s``, the sum of the digit products of diagonal s
    (most significant first), exact. Groups of ``group`` consecutive diagonals become exact
    float64 integers ``T_g = sum V_s 256**(last - s)`` (the caller bounds them by 2**50), whose
    weights ``pw[g]`` fall by ``2**(8 group)`` from group to group (a short last group's by
    less: its ``pw`` is its own). Carries go upward from the last group:
    ``c = rint(T_g 2**-w)``, ``T_g -= c 2**w``, ``T_{g-1} += c`` (w the bits between the two
    weights; every step exact), and pairs of the reduced groups after the first are packed into
    one term ``T_g 2**w + T_{g+1}`` (below 2**49: exact). The terms, times ``scale[e]``
    (powers of two), are renormalised into ``mid`` (k, size) by
    :func:`fpgrad.arith.jit_ball.renorm_block`. Returns (0, the results whose word 0 leaves
    the guarded range)."""
    group, pw, scale, mid = args
    return _combine(diags, group, pw, scale, mid, words_tag(mid.shape[0]))


@njit(**JIT)
def _combine(
    diags: np.ndarray,
    group: int,
    pw: np.ndarray,
    scale: np.ndarray,
    mid: np.ndarray,
    kw: tuple[float, ...],
) -> tuple[int, int]:
    nd, size = diags.shape
    ng = pw.shape[0]
    nt = 1 + ng // 2  # the first group, then pairs of groups
    block = 256
    grp = np.empty((ng, block))
    rest = np.empty((nt, block))
    s = np.empty(block)
    words = np.empty((3, block))
    shift = np.empty(ng)  # 2**w between group g - 1 and g (g >= 1)
    for g in range(1, ng):
        shift[g] = pw[g - 1] / pw[g]
    flagged = 0
    for start in range(0, size, block):
        n = min(block, size - start)
        sc = scale[start : start + n]
        for g in range(ng):
            term = grp[g]
            d0 = g * group
            for e in range(n):
                term[e] = 0.0
            for d in range(d0, min(d0 + group, nd)):
                vd = diags[d, start : start + n]
                for e in range(n):  # exact: integers below 2**53 (the caller's bound)
                    term[e] = term[e] * 256.0 + float(vd[e])
        for g in range(ng - 1, 0, -1):  # carries upward: exact
            up, lo, w = grp[g - 1], grp[g], shift[g]
            iw = 1.0 / w
            for e in range(n):
                c = rint(lo[e] * iw)
                lo[e] = lo[e] - c * w
                up[e] = up[e] + c
        f0 = pw[0]
        for e in range(n):
            rest[0, e] = (grp[0, e] * f0) * sc[e]
        for t in range(1, nt):
            g = 2 * t - 1
            hi = grp[g]
            f = pw[g]
            if g + 1 < ng:  # two groups in one term: |hi| 2**w + |lo| below 2**49
                lo, w = grp[g + 1], shift[g + 1]
                f = pw[g + 1]
                for e in range(n):
                    rest[t, e] = ((hi[e] * w + lo[e]) * f) * sc[e]
            else:
                for e in range(n):
                    rest[t, e] = (hi[e] * f) * sc[e]
        flagged += renorm_store(kw, rest, nt, n, s, words, mid, start)
    return 0, flagged
