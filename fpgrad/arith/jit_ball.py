"""Compiled array kernels of the ball arithmetic: elementwise ops, sums, renormalisation, slices.

One pass per operation: the midpoint words (the intrinsics of :mod:`.jit_words`,
bit-identical to the numpy kernels of :mod:`.expansion`), the radius by the formulas of
:class:`fpgrad.arith.ball.BallArith` and the range guard, element by element. Arrays are
C-contiguous float64: midpoints ``(k, ...)`` with k = 2 or 3, radii without the word axis;
``kw`` is :func:`fpgrad.arith.jit_words.words_tag` (k as a compile-time constant). Inner
loops run along contiguous memory without calls, so LLVM vectorises them.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fpgrad.arith.jit_words import JIT, two_sum, w_add, w_div, w_mul, words_intrinsic

RU = 1.0 + 2.0**-45  # as fpgrad.arith.ball
HI_BOUND = 1.0 + 2.0**-48
LO, HI = 2.0**-800, 2.0**800  # the guarded range of |word 0|
ADD, SUB, MUL, DIV = 0, 1, 2, 3
BLOCK = 256  # elements per block of the renormalisation
LOG10_2 = math.log10(2.0)

w_two_sum = words_intrinsic(lambda k, a, b: two_sum(a, b), "cc", 2)


TINY_PAD = 8 * 2.0**-1074  #: covers the absolute (subnormal) rounding of a radius formula
TWO_PROD_MIN = 2.0**-969  #: products at least this large have an exact TwoProd error term


@njit(**JIT)
def _single(rad: float, w: tuple) -> bool:
    """An exact single float: radius 0 and every word after the first 0."""
    return rad == 0.0 and w[1] == 0.0 and w[2] == 0.0


@njit(**JIT)
def bad(m0: float) -> int:
    """1 when |m0| leaves the guarded range [2**-800, 2**800] (0 excepted)."""
    a = abs(m0)
    return int(not a <= HI) | int(a < LO and a > 0.0)


@njit(**JIT)
def binop(
    kw: tuple,
    op: int,
    am: np.ndarray,
    ar: np.ndarray,
    bm: np.ndarray,
    br: np.ndarray,
    eta: float,
    om: np.ndarray,
    orad: np.ndarray,
) -> int:
    """om, orad = a op b on (k, R, C) words and (R, C) radii; returns the range-error count.

    An operand of shape (k, 1, C) broadcasts along the rows. ``eta``: the relative error
    bound of the k-word operation (expansion.ETA[k]).

    Exact operands (radius 0, one non-zero word at most: inputs, parameters, constants) add,
    subtract and multiply without a rounding term. For k = 2 and 3 (:mod:`.jit_words`) with
    every lower word 0, ``add`` returns TwoSum(a0, b0) = (s, e) with s + e = a0 + b0 exactly
    (the later TwoSums and FastTwoSums meet only zeros and the exact pair (s, e)), and ``mul``
    returns TwoProd(a0, b0) = (p, fma(a0, b0, -p)), exact when |p| >= 2**-969 or an operand is
    0; an overflow or a product below that is a range error (``bad``), whose evaluation is
    discarded. Such a sum or product is the exact value, so its radius is 0: ``1 - 1.0`` is
    the ball {0} (a proven zero, where it was 0 +- 2**-147), and ``(1 - mask) * -1e4`` is exact.
    (``finfo(float64).min`` itself lies above the guarded 2**800: a range error, so a mask
    built from it still sends the evaluation to Arb.)

    Division's radius ``(ra + q0 HI rb) / den`` (``den = |b0| / HI - rb``: ``|b| >= den`` on
    the ball) rounds each of its operations to nearest: relatively within 2**-53 (covered by
    RU) where the result is normal, within 2**-1075 absolutely where it falls below 2**-1022,
    which no factor covers: ``(0 +- 2**-1074) / 23`` gave the radius 0, the ball {0}. So a
    positive ``ra`` adds ``TINY_PAD`` after the division (it covers the quotient's rounding;
    ``TINY_PAD / den`` the numerator's, as in MUL), and the radius is 0 only where ``ra = 0``
    and ``q0 rb = 0``: a proven 0 divided by a ball away from 0, or exact operands. A
    normal ``prop`` loses the pad in its rounding (``TINY_PAD < ulp(2**-1019) / 2``).
    """
    k = len(kw)
    rows, cols = om.shape[1], om.shape[2]
    sgn = -1.0 if op == SUB else 1.0  # exact negation of b's words
    count = 0
    for r in range(rows):
        ia = r if am.shape[1] > 1 else 0
        ib = r if bm.shape[1] > 1 else 0
        if op == ADD or op == SUB:
            for c in range(cols):
                a = (am[0, ia, c], am[1, ia, c], am[2, ia, c] if k == 3 else 0.0)
                b0 = bm[0, ib, c] * sgn
                b = (b0, bm[1, ib, c] * sgn, bm[2, ib, c] * sgn if k == 3 else 0.0)
                m = w_add(kw, a, b)
                ra, rb = ar[ia, c], br[ib, c]
                # two single floats (exact: radius 0, lower words 0) add exactly: the words are
                # their TwoSum (proof in the docstring), so no rounding term
                e = 0.0 if _single(ra, a) and _single(rb, b) else eta
                orad[r, c] = (ra + rb + e * (abs(a[0]) + abs(b0))) * RU
                om[0, r, c], om[1, r, c] = m[0], m[1]
                if k == 3:
                    om[2, r, c] = m[2]
                count += bad(m[0])
        elif op == MUL:
            for c in range(cols):
                a = (am[0, ia, c], am[1, ia, c], am[2, ia, c] if k == 3 else 0.0)
                b = (bm[0, ib, c], bm[1, ib, c], bm[2, ib, c] if k == 3 else 0.0)
                m = w_mul(kw, a, b)
                a0, b0, ra, rb = abs(a[0]), abs(b[0]), ar[ia, c], br[ib, c]
                # three products that can fall below 2**-1022 (2**-600 radii): each errs by at
                # most 2**-1075 absolutely, which RU does not cover; the pad is lost in any
                # normal radius and only keeps a ball that holds non-zero values from being {0}
                pad = (
                    TINY_PAD
                    if (ra > 0.0 and (rb > 0.0 or b0 > 0.0)) or (rb > 0.0 and a0 > 0.0)
                    else 0.0
                )
                # two single floats multiply exactly (TwoProd) unless the product is below
                # 2**-969 (then its error can fall below 2**-1074; a range error here anyway)
                exact = (
                    _single(ra, a)
                    and _single(rb, b)
                    and (abs(m[0]) >= TWO_PROD_MIN or a0 == 0.0 or b0 == 0.0)
                )
                e = 0.0 if exact else eta
                orad[r, c] = ((a0 * rb + b0 * ra) * HI_BOUND + ra * rb + e * abs(m[0]) + pad) * RU
                om[0, r, c], om[1, r, c] = m[0], m[1]
                if k == 3:
                    om[2, r, c] = m[2]
                count += bad(m[0]) + int(a0 > 0.0 and b0 > 0.0 and m[0] == 0.0)
        else:
            for c in range(cols):
                a = (am[0, ia, c], am[1, ia, c], am[2, ia, c] if k == 3 else 0.0)
                b = (bm[0, ib, c], bm[1, ib, c], bm[2, ib, c] if k == 3 else 0.0)
                m = w_div(kw, a, b)
                q0, ra, rb = abs(m[0]), ar[ia, c], br[ib, c]
                den = abs(b[0]) / HI_BOUND - rb
                prop = (ra + q0 * HI_BOUND * rb) / den if den > 0.0 else np.inf
                if q0 > 0.0 and rb > 0.0:  # q0 HI rb can fall below 2**-1022 (see MUL)
                    prop += TINY_PAD / den
                if ra > 0.0:  # the quotient can fall below 2**-1022 (0 +- 2**-1074 over 23)
                    prop += TINY_PAD
                if ra == 0.0 and rb == 0.0:
                    prop = 0.0
                orad[r, c] = (prop * RU + eta * q0) * RU
                om[0, r, c], om[1, r, c] = m[0], m[1]
                if k == 3:
                    om[2, r, c] = m[2]
                count += bad(m[0]) + int(a[0] != 0.0 and m[0] == 0.0)
    return count


@njit(**JIT)
def sum_last(kw: tuple, w: np.ndarray, out: np.ndarray) -> None:
    """out[:, r] = sum of w[:, r, :] by the pairwise tree of BallArith.sum (same order)."""
    k = len(kw)
    rows, n = w.shape[1], w.shape[2]
    buf = np.zeros((3, max(n, 1)))
    for r in range(rows):
        for j in range(k):
            for i in range(n):
                buf[j, i] = w[j, r, i]
        m = n
        while m > 1:
            h = m // 2
            for i in range(h):
                s = w_add(
                    kw,
                    (buf[0, i], buf[1, i], buf[2, i]),
                    (buf[0, i + h], buf[1, i + h], buf[2, i + h]),
                )
                buf[0, i], buf[1, i], buf[2, i] = s[0], s[1], s[2]
            if m % 2:
                buf[0, h], buf[1, h], buf[2, h] = buf[0, 2 * h], buf[1, 2 * h], buf[2, 2 * h]
            m = h + m % 2
        for j in range(k):
            out[j, r] = buf[j, 0]


@njit(**JIT)
def sum_rows(
    kw: tuple, w: np.ndarray, rad: np.ndarray, out: np.ndarray, mags: np.ndarray, rsum: np.ndarray
) -> None:
    """Column sums of (k, R, C) words, R >= 1: ``out[:, c]`` by the pairwise tree of
    :func:`sum_last` (the same operations per column, run across columns); ``mags[c]``,
    ``rsum[c]``: the sums of ``|w[0, :, c]|`` and ``rad[:, c]`` row after row (numpy's order
    for axis 0 of a C-contiguous array, so the same floats)."""
    k = len(kw)
    n, cols = w.shape[1], w.shape[2]
    buf = np.zeros((3, n, cols))
    for j in range(k):
        for i in range(n):
            for c in range(cols):
                buf[j, i, c] = w[j, i, c]
    m = n
    while m > 1:
        h = m // 2
        for i in range(h):
            for c in range(cols):
                s = w_add(
                    kw,
                    (buf[0, i, c], buf[1, i, c], buf[2, i, c]),
                    (buf[0, i + h, c], buf[1, i + h, c], buf[2, i + h, c]),
                )
                buf[0, i, c], buf[1, i, c], buf[2, i, c] = s[0], s[1], s[2]
        if m % 2:
            for j in range(3):
                for c in range(cols):
                    buf[j, h, c] = buf[j, 2 * h, c]
        m = h + m % 2
    for j in range(k):
        for c in range(cols):
            out[j, c] = buf[j, 0, c]
    for c in range(cols):
        mags[c] = abs(w[0, 0, c])
        rsum[c] = rad[0, c]
    for i in range(1, n):
        for c in range(cols):
            mags[c] += abs(w[0, i, c])
            rsum[c] += rad[i, c]


@njit(inline="always", **JIT)
def renorm_block(
    kw: tuple, rest: np.ndarray, nterms: int, n: int, s: np.ndarray, words: np.ndarray
) -> None:
    """words[:k, :n] = expansion.renorm of the terms rest[:nterms, :n] (overwritten), element
    by element; ``s`` a scratch row. The one body of :func:`renorm` and of the CRT engine's
    renormalisation (:func:`fpgrad.arith.jit_crt.recombine_words`), so both give the same words."""
    k = len(kw)
    count = nterms
    nw = 0
    while nw < k - 1 and count > 1:  # VecSum: peel off one word, keep the errors
        last = rest[count - 1]
        for j in range(n):
            s[j] = last[j]
        for t in range(count - 2, -1, -1):
            rt = rest[t]  # 1-D views: LLVM vectorises these loops (2x faster than 2-D indexing)
            for j in range(n):
                x = w_two_sum(kw, rt[j], s[j])
                s[j], rt[j] = x[0], x[1]
        wn = words[nw]
        for j in range(n):
            wn[j] = s[j]
        nw += 1
        count -= 1
    wn = words[nw]
    r0 = rest[0]
    for j in range(n):
        wn[j] = r0[j]
    for t in range(1, count):
        rt = rest[t]
        for j in range(n):
            wn[j] = wn[j] + rt[j]
    for i in range(nw + 1, k):
        wi = words[i]
        for j in range(n):
            wi[j] = 0.0
    for i in range(k - 1):
        hi, lo = words[i], words[i + 1]
        for j in range(n):
            x = w_two_sum(kw, hi[j], lo[j])
            hi[j], lo[j] = x[0], x[1]


@njit(inline="always", **JIT)
def renorm_store(kw: tuple, rest: np.ndarray, nterms: int, n: int, s: np.ndarray,
                 words: np.ndarray, out: np.ndarray, start: int) -> int:  # fmt: skip
    """:func:`renorm_block` of a block, its k words into ``out[:, start:start + n]``; returns
    how many results' word 0 leaves the guarded range. What :func:`renorm`, the CRT
    recombination and the digit engine's combine each do with a block's terms."""
    renorm_block(kw, rest, nterms, n, s, words)
    for i in range(len(kw)):
        oi = out[i]
        for j in range(n):
            oi[start + j] = words[i, j]
    flagged = 0
    for j in range(n):
        flagged += bad(words[0, j])
    return flagged


@njit(**JIT)
def renorm(kw: tuple, terms: np.ndarray, out: np.ndarray) -> int:
    """out (k, N) = expansion.renorm of the T >= 1 terms (T, N), element by element.

    The same operations in the same order as the numpy version, run on blocks of elements.
    Returns the number of results whose word 0 leaves the guarded range.
    """
    nterms, size = terms.shape
    rest = np.empty((nterms, BLOCK))
    s = np.empty(BLOCK)
    words = np.empty((3, BLOCK))
    flagged = 0
    for start in range(0, size, BLOCK):
        n = min(BLOCK, size - start)
        for t in range(nterms):
            for j in range(n):
                rest[t, j] = terms[t, start + j]
        flagged += renorm_store(kw, rest, nterms, n, s, words, out, start)
    return flagged


@njit(**JIT)
def slices(
    words: np.ndarray,
    per_row: bool,
    bits: int,
    count: int,
    expo: np.ndarray,
    top: np.ndarray,
    sl: np.ndarray,
    s_at: np.ndarray,
    s_r: int,
    tl: np.ndarray,
    t_at: np.ndarray,
    t_r: int,
    cap: np.ndarray,
) -> tuple[int, int, int, int]:
    """Cut each element of a (R, C) matrix of K <= 3 words into slices (Ozaki's splitting).

    Element (r, c) has the words ``words[:, r, c]``.
    Each row (``per_row``) or column q gets the scale 2**expo[q] above the largest |word 0|
    in it (``top[q]``; both computed here, as :func:`fpgrad.arith.ozaki.scale_exponents`).
    Slice i < count of an element is the sum of its words rounded to multiples of
    2**(e - bits (i + 1)) by ``(w + sigma) - sigma``, one word at a time, stored at
    ``sl[s_at[i] + r s_r + c]``; the float64 sum of what remains after t slices (t = 0: the
    value) at ``tl[t_at[t] + r t_r + c]``, t <= count (not kept where ``t_at[t] < 0``).
    Returns (1 + the last slice index with a non-zero digit anywhere, the last t whose
    remainder has a non-zero word anywhere, -1 for none; how many digits of slice i exceed
    ``cap[i]`` in absolute value, over all i: digits are |slice| / unit, compared as
    ``|slice| > cap[i] * unit``, a power-of-two scaling, exact in the guarded range; the
    number of faults: words ``w`` with ``not |w| <= 2**e`` (NaN, inf, lower words above the
    scale; in a row or column of scale 0, any non-zero word). ValueError unless 1 <= K <= 3.

    Without faults every step is exact (bits <= 26). Proof: let ``u = 2**(e - bits (i + 1))``,
    so sigma is ``1.5 2**52 u``. At i = 0 word 0 is below ``2**e = 2**bits u`` (it sets e) and
    the lower words are at most that (no fault); after an exact slice i - 1 a remainder is at
    most half its unit, ``2**(bits - 1) u``: by induction every word x before slice i has
    ``|x| <= 2**bits u <= 2**51 u``. Then ``x + sigma`` lies in ``[2**52 u, 2**53 u]`` where
    the floats are the multiples of u (where ``u < 2**-1074``: of the spacing 2**-1074, and s
    = x), so it rounds to ``sigma + s`` with s a multiple of u nearest x, and subtracting
    sigma gives s exactly; ``x - s`` is exact (``|x - s| <= u / 2``: x itself where s = 0,
    else a multiple of ulp(x) <= u / 2 at most ``2**53 ulp(x)``). Each ``|s| <= 2**bits u +
    u / 2``, so the partial sums of the three are multiples of u below ``2**29 u``: exact. So
    the slices and remainders of an element sum exactly to its words' sum, each word's
    remainder after slice i is at most half its unit and the sum of an element's |words| is
    at most ``K 2**e`` (the premises of :func:`fpgrad.arith.ozaki.tail_factor`). A zero scale
    (word 0 all zero) without faults: every word of the row (column) is 0, and so is the row.
    """
    nw, rows, cols = words.shape
    if nw < 1 or nw > 3:
        raise ValueError("jit_ball.slices: 1 to 3 words")
    rem = np.zeros((3, cols))
    top[:] = 0.0
    for r in range(rows):  # the scales
        for c in range(cols):
            rem[0, c] = abs(words[0, r, c])
        if per_row:
            mx = 0.0
            for c in range(cols):
                v = rem[0, c]
                mx = v if v > mx else mx
            top[r] = mx
        else:
            for c in range(cols):
                v = rem[0, c]
                top[c] = v if v > top[c] else top[c]
    sig = np.empty((count, top.shape[0]))  # 1.5 * 2**(e - bits (i + 1) + 52)
    lim = np.empty((count, top.shape[0]))  # cap[i] * 2**(e - bits (i + 1))
    wlim = np.empty(top.shape[0])  # 2**e, 0 for a zero scale: the bound on every |word|
    for q in range(top.shape[0]):
        expo[q] = math.frexp(top[q] * (1.0 + 2.0**-48))[1]
        wlim[q] = math.ldexp(1.0, expo[q]) if top[q] > 0.0 else 0.0
        for i in range(count):
            sig[i, q] = math.ldexp(1.5, expo[q] - bits * (i + 1) + 52)
            lim[i, q] = math.ldexp(cap[i], expo[q] - bits * (i + 1))
    srow = np.empty(cols)
    lrow = np.empty(cols)
    last_slice = 0
    last_rem = -1
    over = 0
    faults = 0
    for r in range(rows):
        for w in range(nw):
            if per_row:
                wl = wlim[r]
                for c in range(cols):
                    v = words[w, r, c]
                    rem[w, c] = v
                    faults += not abs(v) <= wl  # NaN counted
            else:
                for c in range(cols):
                    v = words[w, r, c]
                    rem[w, c] = v
                    faults += not abs(v) <= wlim[c]
        live = False
        for c in range(cols):
            live |= (rem[0, c] != 0.0) | (rem[1, c] != 0.0) | (rem[2, c] != 0.0)
        if t_at[0] >= 0:
            base_t = np.uint64(t_at[0] + r * t_r)  # unsigned indices: no wrap-around tests
            for c in range(cols):
                tl[base_t + np.uint64(c)] = (rem[0, c] + rem[1, c]) + rem[2, c]
        if live:
            last_rem = max(last_rem, 0)
        for i in range(count):
            if per_row:
                for c in range(cols):
                    srow[c] = sig[i, r]
                    lrow[c] = lim[i, r]
            else:
                for c in range(cols):
                    srow[c] = sig[i, c]
                    lrow[c] = lim[i, c]
            base_s = np.uint64(s_at[i] + r * s_r)
            digits = False
            live = False
            for c in range(cols):
                sigma = srow[c]
                x0, x1, x2 = rem[0, c], rem[1, c], rem[2, c]
                s0 = (x0 + sigma) - sigma
                s1 = (x1 + sigma) - sigma
                s2 = (x2 + sigma) - sigma
                x0, x1, x2 = x0 - s0, x1 - s1, x2 - s2
                rem[0, c], rem[1, c], rem[2, c] = x0, x1, x2
                si = (s0 + s1) + s2  # exact: multiples of one unit, far below 2**53 of it
                sl[base_s + np.uint64(c)] = si
                digits |= si != 0.0
                live |= (x0 != 0.0) | (x1 != 0.0) | (x2 != 0.0)
                over += abs(si) > lrow[c]
            if t_at[i + 1] >= 0:
                base_t = np.uint64(t_at[i + 1] + r * t_r)
                for c in range(cols):  # its own loop: fewer arrays per loop, cheap alias checks
                    tl[base_t + np.uint64(c)] = (rem[0, c] + rem[1, c]) + rem[2, c]
            if digits:
                last_slice = max(last_slice, i + 1)
            if live:
                last_rem = max(last_rem, i + 1)
    return last_slice, last_rem, over, faults


@njit(**JIT)
def _zero_undet(m: float, r: float) -> tuple[bool, bool]:
    """(exact zero, undetermined) of a ball with |word 0| m and radius r, as :func:`digits`
    defines them."""
    z = m == 0.0 and r == 0.0
    return z, not z and not (m / HI_BOUND > r)


@njit(**JIT)
def flags(m0: np.ndarray, rad: np.ndarray, cap: float, zero: np.ndarray,
          undet: np.ndarray) -> float:  # fmt: skip
    """:func:`digits` without the per-element digits: the exact zeros and undetermined
    elements, and the least digits of the others (``cap`` if none), from the largest
    ``rad HI_BOUND / |m0|`` among them (one logarithm; log2 is monotone)."""
    worst = 0.0
    for i in range(m0.size):
        m, r = abs(m0[i]), rad[i]
        z, u = _zero_undet(m, r)
        zero[i], undet[i] = z, u
        if not z and not u and r != 0.0:
            x = r * HI_BOUND / m
            worst = x if x > worst else worst
    if worst == 0.0:
        return cap
    return min(max(-math.log2(worst) * LOG10_2, 0.0), cap)


@njit(**JIT)
def digits(m0: np.ndarray, rad: np.ndarray, cap: float, d: np.ndarray, zero: np.ndarray,
           undet: np.ndarray) -> float:  # fmt: skip
    """The numpy formulas of :func:`fpgrad.reference.exact.ball_digits` in one pass (1-D);
    returns the least digits of the elements neither zero nor undetermined (``cap`` if none).

    Exact zero: ``m0 == 0`` and ``rad == 0`` (digits inf). Undetermined: otherwise not
    ``|m0| / HI_BOUND > rad`` (NaN included; digits 0). Else ``rad == 0``: ``cap``; else
    ``-log2(rad HI_BOUND / |m0|) log10(2)`` clipped to ``[0, cap]`` (log2: half the time
    of log10; the two differ in the last bit at most).
    """
    low = cap
    for i in range(m0.size):
        m, r = abs(m0[i]), rad[i]
        z, u = _zero_undet(m, r)
        zero[i], undet[i] = z, u
        if z:
            d[i] = np.inf
        elif u:
            d[i] = 0.0
        elif r == 0.0:
            d[i] = cap
        else:
            d[i] = min(max(-math.log2(r * HI_BOUND / m) * LOG10_2, 0.0), cap)
            low = min(low, d[i])
    return low
