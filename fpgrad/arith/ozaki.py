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
is the exact product. :func:`matmul_levels` keeps the levels ``s <= L`` needed for a target
precision and returns a rigorous bound on what it dropped.
"""

from __future__ import annotations

import math

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


def exact_products(a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Matrices whose (unevaluated) sum is exactly ``a @ b``; a, b: float64 or (k, ...) words."""
    a = a[None] if a.ndim == 2 else a
    b = b[None] if b.ndim == 2 else b
    n = a.shape[2]
    bits = digit_bits(n, 1)
    ea = scale_exponents(a[0], axis=1)[:, None]
    eb = scale_exponents(b[0], axis=0)[None, :]
    sa, za = slices(a, ea, bits, None)
    sb, zb = slices(b, eb, bits, None)
    assert za and zb, "operands beyond the float64 range"
    return [sa[i] @ sb[j] for i in range(len(sa)) for j in range(len(sb))]


def matmul_levels(
    a: np.ndarray, b: np.ndarray, prec: int, rounding: float = 0.0
) -> tuple[list[np.ndarray], np.ndarray, bool]:
    """Levels of ``a @ b`` to about ``prec`` bits of max|a row| * max|b col| * n.

    ``a``: (ka, m, n) words, ``b``: (kb, n, p) words. Returns (levels, bound, underflow risk)
    where ``|a @ b - sum(levels)| <= bound`` elementwise (a rigorous bound on the dropped
    slices and pairs; the levels themselves are exact). ``rounding``: a relative error bound
    on the caller's rounding of the levels' sum, added to the bound against
    ``sum |levels| <= n max|a row| max|b col| 2**3``.
    """
    _, m, n = a.shape
    p = b.shape[2]
    need = prec + 2 + math.ceil(math.log2(max(n, 2)))  # bits below max|a| max|b| n
    top = 8
    while True:  # levels 0 .. top-1, at most top pairs per level
        bits = digit_bits(n, top)
        want = -(-need // bits)
        if want <= top:
            top = want
            break
        top = want
    ea = scale_exponents(a[0], axis=1)  # (m,)
    eb = scale_exponents(b[0], axis=0)  # (p,)
    sa, za = slices(a, ea[:, None], bits, top)
    sb, zb = slices(b.transpose(0, 2, 1), eb[:, None], bits, top)  # column scales of b
    na, nb = len(sa), len(sb)
    acat = np.ascontiguousarray(sa.transpose(1, 0, 2))  # (m, na, n)
    brev = np.ascontiguousarray(sb[::-1].transpose(0, 2, 1))  # (nb, n, p), index nb-1-j
    levels = []
    last = min(top - 1, na + nb - 2)
    for s in range(last + 1):
        lo, hi = max(0, s - nb + 1), min(s, na - 1)
        if lo > hi:
            continue
        left = acat[:, lo : hi + 1, :].reshape(m, -1)
        t0, t1 = nb - 1 - (s - lo), nb - 1 - (s - hi)
        right = brev[t0 : t1 + 1].reshape(-1, p)
        levels.append(left @ right)
    # dropped pairs i + j > last (i < na, j < nb): |slice_i| <= 2**(e - b*i + 1)
    dropped = 0.0
    for i in range(na):
        for j in range(nb):
            if i + j > last:
                dropped += 2.0 ** (-bits * (i + j))
    factor = (
        4.0 * dropped + 8.0 * rounding
    )  # sum_s |level s| <= n 2**(ea + eb) * 4 * (1 + 2**-b ...)
    ka, kb = a.shape[0], b.shape[0]
    if not za:
        factor += 2.0 * ka * 2.0 ** (-bits * na)
    if not zb:
        factor += 2.0 * kb * 2.0 ** (-bits * nb)
    if factor:
        bound = np.ldexp(factor * n * (1 + 2.0**-40), ea[:, None] + eb[None, :])
        bound = np.where(
            (np.max(np.abs(a[0]), axis=1)[:, None] > 0)
            & (np.max(np.abs(b[0]), axis=0)[None, :] > 0),
            bound,
            0.0,
        )
    else:
        bound = np.zeros((m, p))
    nz_a = ea[np.max(np.abs(a[0]), axis=1) > 0]
    nz_b = eb[np.max(np.abs(b[0]), axis=0) > 0]
    risk = bool(nz_a.size and nz_b.size and nz_a.min() + nz_b.min() - bits * (top + 2) < -1000)
    risk = risk or bool(nz_a.size and nz_b.size and nz_a.max() + nz_b.max() > 900)
    return levels, bound, risk
