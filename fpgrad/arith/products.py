"""Which engine computes an exact matrix product of multi-word balls.

Three engines give the k words of ``a @ b`` and a bound to about ``2**-prec`` of
``n max|a row| max|b col|``: float64 slices (:func:`fpgrad.arith.ozaki.matmul_levels`, always
available), int8 GEMMs with the Chinese remainder theorem (:mod:`fpgrad.arith.crt`) and int8
GEMMs of base-256 digits (:mod:`fpgrad.arith.digits`), the last two where the CPU has an int8
unit and ``torch._int_mm`` is exact. The choice is a function of the shapes, the operands'
exact widths and the machine class (fixed cost constants, never a timing), so results do not
depend on the machine's load.
"""

from __future__ import annotations

import numpy as np

from fpgrad.arith import crt, digits


def matmul_words(
    a: np.ndarray, b: np.ndarray, prec: int, rounding: float, words: int
) -> tuple[np.ndarray, np.ndarray, bool, int] | None:
    """The k = ``words`` words of ``a @ b`` ((ka, m, n) and (kb, n, p) words), their bound,
    the risk flag and the results whose word 0 leaves the guarded range, from the int8 engine
    that :func:`fpgrad.arith.crt.cost` and :func:`fpgrad.arith.digits.cost` estimate cheapest
    here (the digit engine only up to an inner dimension of :data:`fpgrad.arith.digits.MAX_INNER`);
    None where the float64 slices are estimated cheaper or no int8 engine applies (the caller
    then takes them)."""
    ka, m, n = a.shape
    kb, _, p = b.shape
    widths = None
    if words and n <= digits.MAX_INNER and crt.machine() in digits.COSTS:
        a = np.ascontiguousarray(a, dtype=np.float64)
        b = np.ascontiguousarray(b, dtype=np.float64)
        try:
            widths = crt.exact_widths(a, b, n, prec, rounding)
            pl = crt.plan(n, prec, ka, kb, rounding, *widths)
            dp = digits.plan(n, prec, ka, kb, rounding, *widths)
        except ValueError:
            dp = None
        if dp is not None:
            crt_ms, oz_ms = crt.cost(m, n, p, ka, kb, pl, prec)
            dig_ms = digits.cost(m, n, p, dp)
            if dig_ms is not None and dig_ms < min(crt_ms, oz_ms):
                done = digits.matmul_words(a, b, prec, rounding, words, dp)
                if done is not None:
                    return done
            return crt.matmul_words(a, b, prec, rounding, True, words, widths, (crt_ms, oz_ms))
    return crt.matmul_words(a, b, prec, rounding, True, words, widths)
