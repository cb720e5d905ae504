"""Error-free matrix products by splitting into float64 slices (Ozaki, Ogita, Oishi, Rump 2012).

Each row of A (each column of B) gets a power-of-two scale 2**e above its largest element;
slice i holds the next ``b`` bits of every element, as float64 multiples of
``2**(e - b*(i+1))``, extracted from every word of a multi-word matrix with the
``(x + sigma) - sigma`` trick. With digits below ``2**(b+1)``, every dot product of a slice of A
with a slice of B is a sum of integers (in one unit) below ``2**53``, so BLAS computes it
exactly, whatever its order of summation or use of FMA. All pairs of one level ``i + j = s``
go into a single BLAS call (the slices concatenated along the inner dimension), so each level
sum is exact too.

:func:`exact_products` keeps every slice and every pair: the unevaluated sum of its matrices
is the exact product. :func:`matmul_levels` computes the exact levels ``s < L`` and all the
pairs below them as one float64 product (the *tail*, about ``2**-(b L)`` of the result, so its
rounding, bounded by :func:`tail_factor`, lands about ``2**-(b L + 38)`` down). Its slices
are as wide as the digits they nominally hold allow (:func:`wide_bits`: 21 bits for an inner
dimension of 256, 22 for 128, where digits below ``2**(b+1)`` allow 20): the slicing counts
the digits above their nominal bound (:func:`digit_caps`), the levels are exact BLAS products
for digits within it (:func:`levels_exact`) and the tail is bounded with it; where a digit
exceeds it the product is cut again with :func:`digit_bits`. 5 levels of 21 bits reach
2**-144, with 15 + 6 slice products (k-word times k-word; fewer against a float64 matrix,
whose slices run out sooner). The slicing there is compiled (:func:`fpgrad.arith.jit_ball.slices`).
Both slicings are exact only for words within their scale (no |word| above 2**e); operands
with words beyond it (non-canonical expansions) are renormalised first, exactly.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np

MAX_SLICES = 120  # 2**-2100: past the float64 range whatever b


def digit_bits(n: int, pairs: int = 1) -> int:
    """Largest b with pairs * n * 2**(2b + 2) <= 2**53 (digits below 2**(b+1))."""
    return max(1, (51 - math.ceil(math.log2(max(n, 1))) - math.ceil(math.log2(max(pairs, 1)))) // 2)


def scale_exponents(top: np.ndarray, axis: int) -> np.ndarray:
    """e with max |top| along ``axis`` below 2**e (the top word bounds each element)."""
    mx = np.max(np.abs(top), axis=axis) * (1.0 + 2.0**-48)
    return np.frexp(mx)[1].astype(np.int64)


def slices(words: np.ndarray, e: np.ndarray, b: int, count: int | None) -> tuple[np.ndarray, bool]:
    """Slices of ``words`` (k, rows, cols) scaled by ``e`` (broadcastable to (rows, cols)).

    ``count=None``: until the remainder is zero. Returns (slices (n, rows, cols), remainder
    is zero).
    """
    rem = np.array(words, dtype=np.float64, copy=True)
    out = []
    limit = MAX_SLICES if count is None else count
    # per word, the largest |element| / 2**e over rows: a word joins once a slice unit reaches it
    with np.errstate(divide="ignore"):
        reach = [float(np.max(np.abs(w) * np.ldexp(1.0, -e))) if w.size else 0.0 for w in rem]
    live = [r > 0 for r in reach]
    i = 0
    while any(live) and i < limit:
        unit = 2.0 ** (-b * (i + 1))
        sigma = np.ldexp(1.5, e - b * (i + 1) + 52)  # ulp(sigma) = 2**(e - b(i+1))
        acc = None
        last = i == limit - 1
        for w in range(len(rem)):
            if not live[w] or reach[w] < unit / 2:  # rounds to 0 at this unit: skip the word
                continue
            s = (rem[w] + sigma) - sigma
            acc = s if acc is None else acc + s
            reach[w] = min(reach[w], unit / 2)
            if last:  # no more slices: what is left only counts as non-zero (in the bound)
                continue
            rem[w] -= s
            if count is None or w == 0 or len(rem) == 1:  # lower words: rarely exhausted early
                live[w] = bool(rem[w].any())
        out.append(acc if acc is not None else np.zeros(words.shape[1:]))
        i += 1
    if not out:
        out.append(np.zeros(words.shape[1:]))
    return np.stack(out), not any(live)


def _scaled(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, its scale exponents along ``axis``, kept 2-D), x renormalised (exactly,
    :func:`_renormalised`) where a |word| exceeds 2**e or a zero word 0 holds non-zero words:
    then :func:`slices` is exact (as :func:`fpgrad.arith.jit_ball.slices` without faults);
    ValueError where that is still so (NaN, inf)."""
    for again in (False, True):
        top = np.max(np.abs(x[0]), axis=axis, keepdims=True)
        e = np.expand_dims(scale_exponents(x[0], axis), axis)
        if np.all(np.abs(x) <= np.where(top > 0, np.ldexp(1.0, e), 0.0)):
            return x, e
        if again:
            raise ValueError("exact_products: words beyond the float64 range")
        x = _renormalised(x)
    raise AssertionError("unreachable")


def exact_products(a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Matrices whose (unevaluated) sum is exactly ``a @ b``; a, b: float64 or (k, ...) words."""
    a = a[None] if a.ndim == 2 else a
    b = b[None] if b.ndim == 2 else b
    n = a.shape[2]
    bits = digit_bits(n, 1)
    a, ea = _scaled(a, 1)
    b, eb = _scaled(b, 0)
    sa, za = slices(a, ea, bits, None)
    sb, zb = slices(b, eb, bits, None)
    assert za and zb, "operands beyond the float64 range"
    return [sa[i] @ sb[j] for i in range(len(sa)) for j in range(len(sb))]


def wide_bits(n: int, levels: int) -> int:
    """Largest b whose levels ``s < levels`` stay exact for nominal digits: at most 2**b in
    slice 0 and ``0.75 2**b`` later (rounding to nearest leaves ``2**(b-1)`` of a word, and a
    canonical expansion's next word adds at most half of that where it takes over), i.e.
    ``n 2**(2b) w_s <= 2**53 / (1 + 2**-8)`` with ``w_0 = 1``, ``w_s = 1.5 + 0.5625 (s - 1)``
    (the margin covers the 4 units of :func:`digit_caps`). Nominal only: :func:`matmul_levels`
    counts the digits beyond it."""
    weight = 1.0 if levels < 2 else 1.5 + 0.5625 * (levels - 2)
    b = 26
    while b > 1 and n * 2.0 ** (2 * b) * weight * (1 + 2.0**-8) > 2.0**53:
        b -= 1
    return b


def levels_exact(n: int, levels: int, da: np.ndarray, db: np.ndarray) -> bool:
    """Whether every level ``s < levels`` is an exact BLAS product for slices whose |digits|
    are at most ``da``, ``db``: ``n sum_{i+j=s} da_i db_j <= 2**53`` (every partial sum of
    the integer products is then an integer of at most 53 bits, whatever the order);
    evaluated in rationals."""
    fa = [Fraction(float(x)) for x in da]
    fb = [Fraction(float(x)) for x in db]
    return all(n * sum(fa[i] * fb[s - i] for i in range(s + 1)) <= 2**53 for s in range(levels))


def digit_caps(levels: int, bits: int, wide: bool) -> np.ndarray:
    """The |digit| bound of each slice that :func:`matmul_levels` checks: nominal for wide
    slices (``2**b``, then ``0.75 2**b``, each plus 4 units), ``2**(b+1)`` for narrow ones."""
    if not wide:
        return np.full(levels, 2.0 ** (bits + 1))
    return np.array([2.0**bits + 4] + [0.75 * 2.0**bits + 4] * (levels - 1))


def tail_factor(
    n: int, levels: int, bits: int, ka: int, kb: int, spread: float | None = None
) -> float:
    """Bound of the tail's error per unit of ``n 2**(ea + eb)`` (see :func:`matmul_levels`).

    ``spread``: ``sum_{i<L} d_i 2**-bits`` with ``d_i`` a bound on the |digits| of a's slice i
    (default ``2 L``: digits below ``2**(bits+1)``). With ``|A_i| <= d_i 2**(ea - bits (i+1))``,
    the remainders of b after t slices ``|R_t| <= kb 2**(eb - bits t - 1)`` (each word's
    remainder at most half the last unit), ``|R^a_L| <= ka 2**(ea - bits L - 1)`` and the
    words of b each below ``2**eb`` (as its top word, which sets eb): the float64 product of
    the blocks [A_0 .. A_{L-1}, R^a_L] and [R_L .. R_1, b] sums (L + 1) n products whose
    absolute values add up to at most ``n 2**(ea + eb - bits L) S`` with
    ``S = kb spread / 2 + ka kb / 2``, so it errs by gamma_{(L+1) n} S; holding each remainder
    and b as one rounded float64 of its words (two additions, error gamma_2 times the sum of
    the words' absolute values) adds ``(2 gamma_2 + gamma_2**2) S``.
    """
    if spread is None:
        spread = 2.0 * levels
    u = 2.0**-53
    big = (levels + 1) * n * u
    gamma_n = big / (1 - big)
    gamma_2 = 2 * u / (1 - 2 * u)
    total = (kb * spread / 2 + ka * kb / 2) * (1 + 2.0**-50)
    err = (gamma_n + 2.01 * gamma_2) * total * (1 + 2.0**-50)
    return math.ldexp(err, -bits * levels) * (1 + 2.0**-40)


def exact_levels(n: int, prec: int, ka: int, kb: int, wide: bool = True) -> tuple[int, int]:
    """(L, bits): the fewest exact levels whose tail errs below 2**-(prec + 2) n 2**(ea + eb).

    ``wide``: slices of :func:`wide_bits`, else of :func:`digit_bits`; the tail bounded with
    :func:`digit_caps`."""
    for levels in range(1, MAX_SLICES):
        bits = wide_bits(n, levels) if wide else digit_bits(n, levels)
        spread = math.ldexp(float(digit_caps(levels, bits, wide).sum()), -bits)
        if tail_factor(n, levels, bits, ka, kb, spread) <= 2.0 ** -(prec + 2):
            return levels, bits
    raise ValueError(f"no slicing reaches {prec} bits for inner dimension {n}")


@functools.lru_cache(maxsize=256)
def _plan(
    n: int, prec: int, ka: int, kb: int, wide: bool
) -> tuple[int, int, np.ndarray, bool, float]:
    """(levels, bits, digit caps, levels exact for them, tail factor) of one product shape."""
    levels, bits = exact_levels(n, prec, ka, kb, wide)
    caps = digit_caps(levels, bits, wide)
    caps.flags.writeable = False
    spread = math.ldexp(float(caps.sum()), -bits)
    tail = tail_factor(n, levels, bits, ka, kb, spread)
    return levels, bits, caps, levels_exact(n, levels, caps, caps), tail


def _cut(
    x: np.ndarray,
    by_row: bool,
    bits: int,
    levels: int,
    sl: np.ndarray,
    s_at: list[int],
    s_r: int,
    tl: np.ndarray,
    t_at: list[int],
    t_r: int,
    caps: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int, int, int, int]:
    """jit_ball.slices of x (K, R, C): slice i of row r at ``sl.flat[s_at[i] + r s_r:][:C]``,
    remainder t at ``tl.flat[t_at[t] + r t_r:][:C]`` (none where ``t_at[t] < 0``). Returns
    (scale exponents, largest |word 0|, per row or column; the four counts of
    jit_ball.slices: digits above ``caps``, then faults)."""
    from fpgrad.arith import jit_ball

    x = np.ascontiguousarray(x, dtype=np.float64)
    size = x.shape[1] if by_row else x.shape[2]
    expo = np.empty(size, dtype=np.int64)
    top = np.empty(size)
    out = jit_ball.slices(
        x, by_row, bits, levels, expo, top,
        sl.reshape(-1), np.array(s_at, dtype=np.int64), s_r,
        tl.reshape(-1), np.array(t_at, dtype=np.int64), t_r, caps,
    )  # fmt: skip
    return expo, top, int(out[0]), int(out[1]), int(out[2]), int(out[3])


def _renormalised(x: np.ndarray) -> np.ndarray:
    """x's k words renormalised by :func:`fpgrad.arith.expansion.renorm`: error-free for k
    terms into k words (k - 1 VecSum passes leave one term, so the last word is not a rounded
    sum; two_sum is exact), so word 0 is the rounded sum of the words (unless a sum
    overflows: then inf or NaN, a fault again)."""
    from fpgrad.arith import expansion

    return expansion.renorm(list(x), x.shape[0]) if x.shape[0] > 1 else x


def _slice_pair(a: np.ndarray, b: np.ndarray, levels: int, bits: int, caps: np.ndarray) -> tuple:
    """Slices and remainders of a (by row) and b (by column), laid out for the products."""
    _, m, n = a.shape
    p = b.shape[2]
    big = levels + 1
    acat = np.empty((m, big, n))  # acat[:, i] = slice i of a; acat[:, L] = a's remainder
    brev = np.empty((levels, n, p))  # brev[L - 1 - j] = slice j of b
    btail = np.empty((big, n, p))  # btail[L - t] = b's remainder after t slices
    # a's remainder after L slices goes to slot L of acat (the others are not kept)
    at = [i * n for i in range(big)]
    keep = [-1] * levels + [levels * n]
    cut_a = _cut(a, True, bits, levels, acat, at, big * n, acat, keep, big * n, caps)
    bs = [(levels - 1 - j) * n * p for j in range(levels)]
    bt = [(levels - t) * n * p for t in range(big)]
    cut_b = _cut(b, False, bits, levels, brev, bs, p, btail, bt, p, caps)
    return acat, brev, btail, cut_a, cut_b


def matmul_levels(
    a: np.ndarray, b: np.ndarray, prec: int, rounding: float = 0.0
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Terms of ``a @ b`` to about ``prec`` bits of max|a row| * max|b col| * n.

    ``a``: (ka, m, n) words, ``b``: (kb, n, p) words, 1 <= ka, kb <= 3 (else ValueError).
    Returns (terms (T, m, p), bound, underflow risk) with ``|a @ b - sum(terms)| <= bound``
    elementwise. The terms are the exact levels 0 .. L-1 (all slice pairs i + j = s, one BLAS
    call each) and one float64 product of everything below (the *tail*: each slice of a with
    the remainder of b below level L, and the remainder of a with b), whose rounding the bound
    covers (:func:`tail_factor`). ``rounding``: a relative error bound on the caller's rounding of
    the terms' sum, added to the bound against ``sum |terms| <= n 2**(ea + eb) * 4.01``.
    An operand with faults (words off their row's or column's scale, see
    :func:`fpgrad.arith.jit_ball.slices`: huge lower words, a zero word 0 over non-zero words)
    is renormalised (exactly, :func:`_renormalised`) and cut again; faults left, or digits
    above their caps in narrow slices, set the risk flag (the bound is then void).
    """
    ka, m, n = a.shape
    kb, _, p = b.shape
    if not (1 <= ka <= 3 and 1 <= kb <= 3):
        raise ValueError(f"matmul_levels: 1 to 3 words, not {ka} and {kb}")
    levels, bits, caps, exact, tail = _plan(n, prec, ka, kb, True)
    acat, brev, btail, cut_a, cut_b = _slice_pair(a, b, levels, bits, caps)
    if cut_a[5] or cut_b[5]:  # rare: canonical words (BallArith's) have no faults
        a = _renormalised(a) if cut_a[5] else a
        b = _renormalised(b) if cut_b[5] else b
        acat, brev, btail, cut_a, cut_b = _slice_pair(a, b, levels, bits, caps)
    if cut_a[4] or cut_b[4] or not exact:  # digits above their caps: narrow slices
        levels, bits, caps, exact, tail = _plan(n, prec, ka, kb, False)
        acat, brev, btail, cut_a, cut_b = _slice_pair(a, b, levels, bits, caps)
    unsound = bool(cut_a[4] or cut_b[4] or cut_a[5] or cut_b[5]) or not exact
    ea, top_a, na, ra, _, _ = cut_a
    eb, top_b, nb, rb, _, _ = cut_b
    big = levels + 1
    terms = np.empty((big, m, p))
    count = 0
    for s in range(levels):
        lo, hi = max(0, s - nb + 1), min(s, na - 1)
        if lo > hi:
            continue
        left = acat[:, lo : hi + 1, :].reshape(m, -1)
        right = brev[levels - 1 - s + lo : levels - s + hi].reshape(-1, p)
        np.matmul(left, right, out=terms[count])
        count += 1
    # tail pairs: slice i of a (i < na) with b's remainder after L - i slices (zero past rb),
    # and a's remainder after L slices (zero when ra < L) with b itself
    lo = max(0, levels - rb)
    hi = levels if ra >= levels else min(levels - 1, na - 1)
    factor = 8.0 * rounding
    if lo <= hi:
        left = acat[:, lo : hi + 1, :].reshape(m, -1)
        np.matmul(left, btail[lo : hi + 1].reshape(-1, p), out=terms[count])
        count += 1
        factor += tail
    nz_a, nz_b = top_a > 0, top_b > 0
    # factor n 2**(ea + eb) as a product of powers of two (exact while risk is False)
    scale_a = np.where(nz_a, np.ldexp(1.0, ea), 0.0)
    scale_b = np.where(nz_b, np.ldexp(factor * n * (1 + 2.0**-40), eb), 0.0)
    bound = np.multiply.outer(scale_a, scale_b)
    ea_nz, eb_nz = ea[nz_a], eb[nz_b]
    risk = bool(ea_nz.size and eb_nz.size)
    risk = risk and bool(
        ea_nz.min() + eb_nz.min() - bits * (levels + 2) - 60 < -1000
        or ea_nz.max() + eb_nz.max() > 900
        or max(ea_nz.max(), eb_nz.max()) > 960  # sigma = 1.5 2**(e - bits + 52) finite
    )
    return terms[:count], bound, risk or unsound
