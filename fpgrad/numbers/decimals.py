"""Decimal strings of exact multi-word values, correctly rounded, with integer arithmetic.

A fast exact result holds each value as the exact sum of float64 words; its decimal string
(in JSON and the element table) needs only Python integers: the sum as ``M * 2**E``, scaled
by a power of ten, one division, round half to even. Far cheaper per element than building
an mpmath number and printing it, and the same layout as
:func:`fpgrad.reference.exact.decimal_string` (``d.ddd...e±x``, all ``n`` digits kept).
:func:`decimal_strings` does whole columns at once on numpy object arrays of Python integers
(about 3x fewer seconds per element than one :func:`words_decimal` call each), the scalar path
only where the bulk one declines.
"""

from __future__ import annotations

import math

import numpy as np

_LOG10_2 = math.log10(2)
EXACT_ZERO_DIGITS = 40  # as fpgrad.reference.exact.decimal_string prints exact values


def words_decimal(words: list[float], n: int) -> str:
    """The exact sum of ``words`` (finite float64) to ``n`` significant digits, rounded half
    to even.

    >>> words_decimal([0.1], 20)
    '1.0000000000000000555e-1'
    >>> words_decimal([1.0, 2.0**-60], 3), words_decimal([-2.5e-300, 0.0], 1)
    ('1.00e+0', '-2.e-300')
    """
    parts = []
    for w in words:
        if w:
            m, e = math.frexp(w)
            parts.append((int(m * 9007199254740992.0), e - 53))  # 2**53: the exact significand
    if not parts:
        return "0"
    low = min(e for _, e in parts)
    total = sum(m << (e - low) for m, e in parts)
    if total == 0:
        return "0"
    sign = "-" if total < 0 else ""
    num, den = (abs(total) << low, 1) if low >= 0 else (abs(total), 1 << -low)
    x = math.floor((num.bit_length() - den.bit_length()) * _LOG10_2)  # within one of log10
    top = 10**n
    while True:
        s = n - 1 - x
        q, r = divmod(num * 10**s, den) if s >= 0 else divmod(num, den * 10**-s)
        if q >= top:
            x += 1
        elif q < top // 10:
            x -= 1
        else:
            break
    if 2 * r > (den if s >= 0 else den * 10**-s) or (
        2 * r == (den if s >= 0 else den * 10**-s) and q % 2
    ):
        q += 1
        if q == top:
            q, x = top // 10, x + 1
    d = str(q)
    return f"{sign}{d[0]}.{d[1:]}e{x:+d}"


def decimal_strings(words: np.ndarray, digits: np.ndarray) -> list[str]:
    """Strings of the columns of ``words`` (k, m) with ``digits`` certified digits each (inf:
    an exact value, printed with 40)."""
    n = np.where(np.isinf(digits), EXACT_ZERO_DIGITS, np.maximum(1, np.floor(digits)))
    n = n.astype(np.int64)
    bulk = _bulk(np.asarray(words, dtype=np.float64), n)
    return [
        o if o is not None else words_decimal(words[:, i].tolist(), int(n[i]))
        for i, o in enumerate(bulk)
    ]


def _bulk(words: np.ndarray, n: np.ndarray) -> list[str | None]:
    """:func:`words_decimal` of the columns of ``words`` (k, m) to ``n`` digits each, on numpy
    object arrays of Python integers (no interpreter loop); None where a column needs the scalar
    path (a zero or integral sum, an exponent guess off by one: rare)."""
    m = words.shape[1]
    if m == 0:
        return []
    frac, exp = np.frexp(words)
    mant = (frac * 9007199254740992.0).astype(np.int64)  # 2**53: exact significands
    nonzero = mant != 0
    e = np.where(nonzero, exp.astype(np.int64) - 53, np.iinfo(np.int64).max)
    low = e.min(axis=0)
    ok = nonzero.any(axis=0) & (low < 0)
    approx = np.abs(words.sum(axis=0))  # within a few ulps of |sum|: the exponent guess
    ok &= (approx > 0) & np.isfinite(approx)
    x = np.zeros(m, dtype=np.int64)
    x[ok] = np.floor(np.log10(approx[ok])).astype(np.int64)
    s = n - 1 - x
    ok &= s >= 0
    shift = np.where(nonzero & ok, e - np.where(ok, low, 0), 0)
    total = np.zeros(m, dtype=object)
    for row, sh in zip(mant, shift, strict=True):
        total = total + (row.astype(object) << sh.astype(object))
    neg = (total < 0).astype(bool)
    total = np.abs(total)
    k = np.where(ok, -low, 1).astype(object)
    ten = np.array([10**j for j in range(int(s[ok].max(initial=0)) + 1)], dtype=object)
    num = total * ten[np.where(ok, s, 0)]
    q = num >> k
    r = num - (q << k)
    half = np.left_shift(np.ones(m, dtype=object), k - 1)
    up = ((r > half) | ((r == half) & (q % 2 == 1))).astype(bool)
    q = q + up
    if len(ten) <= int(n.max()):
        ten = np.array([10**j for j in range(int(n.max()) + 1)], dtype=object)
    top, lo_lim = ten[n], ten[n - 1]
    carry = (q == top).astype(bool)
    q = np.where(carry, lo_lim, q)
    x = x + carry
    ok &= ((q >= lo_lim) & (q < top)).astype(bool) & (total != 0).astype(bool)
    out: list[str | None] = []
    for good, sign, d, xx in zip(ok.tolist(), neg.tolist(), q.tolist(), x.tolist(), strict=True):
        if good:
            d = str(d)
            out.append(f"{'-' if sign else ''}{d[0]}.{d[1:]}e{xx:+d}")
        else:
            out.append(None)
    return out
