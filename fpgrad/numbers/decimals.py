"""Decimal strings of exact multi-word values, correctly rounded, with integer arithmetic.

A fast exact result holds each value as the exact sum of float64 words; its decimal string
(in JSON and the element table) needs only Python integers: the sum as ``M * 2**E``, scaled
by a power of ten, one division, round half to even. Far cheaper per element than building
an mpmath number and printing it, and the same layout as :func:`fpgrad.reference.exact.decimal_string`
(``d.ddd...e±x``, all ``n`` digits kept).
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
    return [words_decimal(col, int(k)) for col, k in zip(words.T.tolist(), n.tolist(), strict=True)]
