"""The compiled path of :func:`fpgrad.numbers.rounding.round_to`: one pass over the float64 bit patterns.

Imported lazily by :mod:`fpgrad.numbers.rounding` (importing numba costs about a second), never by
users. Per element, on the int64 bit pattern ``b`` of the float64 input:

1. ``a = |b|`` (the sign bit ``s`` kept aside), the biased exponent field ``E = a >> 52`` and the
   integer significand ``sig`` (the hidden bit added for normals): ``|x| = sig * 2**exp2`` with
   ``exp2 = max(E, 1) - 1075``.
2. The exponent ``e = E - 1023`` (-1023 for float64 subnormals and zero, exactly as in the numpy
   path), clamped up to ``emin`` when subnormals are on; the format's quantum at ``x`` is
   ``2**(e - man_bits)``, so ``shift = e - man_bits - exp2`` bits of ``sig`` lie below it
   (``shift <= 0``: ``x`` is already on the grid).
3. ``q = sig >> shift`` and the remainder ``rem`` decide the step ``up`` in {0, 1} per mode
   (``rem`` against half a quantum; the parity of ``q`` for ties to even and round to odd; the
   sign for up/down; a pre-drawn ``u < rem / 2**shift`` for stochastic rounding).
4. The result's bits: for ``shift <= 52`` the low ``shift`` bits of ``a`` are cleared and
   ``up << shift`` added, so a carry runs into the exponent field by itself (and a carry out of
   the top binade gives inf's bit pattern); for ``shift >= 53`` every bit of ``sig`` lies below
   the quantum (``q = 0``), and the result is 0 or the smallest subnormal of the format.
5. Flush to zero (subnormals off, after rounding), overflow (magnitude above max) to the
   caller's values for each sign, the sign bit, and the caller's values for inf and NaN inputs.

Non-negative float64 values are ordered like their bit patterns as int64, so the comparisons
with ``max`` and the smallest normal are integer comparisons. The loop bodies have no
data-dependent branch, so LLVM can vectorise them. Nearest even, the default, has a loop of its own
(about 30% faster than the shared one); the other deterministic modes share a loop in which the
mode switches terms of the step's formula on or off (one loop per mode would double the cold
compile time); the stochastic modes share a third.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types

# mode codes: the order of fpgrad.numbers.rounding.Mode
NEAREST_EVEN, NEAREST_AWAY, TOWARD_ZERO, UP, DOWN, ODD, STOCHASTIC, STOCHASTIC_EQUAL = range(8)

_ABS = 0x7FFF_FFFF_FFFF_FFFF
_MANT = (1 << 52) - 1
_HIDDEN = 1 << 52
_INF = 0x7FF0_0000_0000_0000
_NAN = 0x7FF8_0000_0000_0000  # numpy's np.nan: every NaN result is this one


@numba.njit(inline="always")
def _pow2(k):
    """2.0**k for -1022 <= k <= 1023, from its bit pattern."""
    return np.int64((k + 1023) << 52).view(np.float64)


@numba.njit(inline="always")
def _split(b, sub, man_bits, emin):
    """Steps 1-3 of the module: the pieces of ``b`` that the rounding decision needs."""
    a = b & _ABS
    s = b ^ a  # the sign bit alone
    biased = a >> 52
    e = biased - 1023
    if sub:
        e = max(e, emin)
    exp2 = max(biased, 1) - 1075
    sig = (a & _MANT) | (_HIDDEN if biased != 0 else 0)
    shift = e - man_bits - exp2  # >= -1 (float64 subnormals with man_bits = 52)
    sh = min(max(shift, 0), 54)  # 54: every bit of sig (< 2**53) is below the quantum
    q = sig >> sh
    rem = sig & ((np.int64(1) << sh) - 1)
    half = np.int64(1) << max(sh - 1, 0)  # sh = 0: rem = 0 < half = 1, nothing moves
    return a, s, biased, shift, sh, q, rem, half


@numba.njit(inline="always")
def _assemble(
    a,
    s,
    biased,
    shift,
    sh,
    up,
    sub,
    max_bits,
    sn_bits,
    qmin_bits,
    over_pos,
    over_neg,
    inf_pos,
    inf_neg,
):
    """Steps 4-5 of the module: the result's bits from the step ``up``."""
    if shift <= 52:
        m = ((a >> sh) + np.int64(up)) << sh  # a carry runs into the exponent field
    else:
        m = qmin_bits if up else np.int64(0)
    if not sub and m < sn_bits:
        m = np.int64(0)  # flush to zero, after rounding
    if m > max_bits:
        r = over_neg if s != 0 else over_pos
    else:
        r = m | s
    if biased == 2047:
        r = _NAN if a != _INF else (inf_neg if s != 0 else inf_pos)
    return r


_SIGNATURE = types.void(
    types.Array(types.int64, 1, "C", readonly=True),  # float64 inputs, viewed as int64
    types.Array(types.int64, 1, "C"),  # float64 outputs, viewed as int64
    types.Array(types.float64, 1, "C", readonly=True),  # uniform draws (stochastic modes)
    types.int64,  # mode code
    types.boolean,  # subnormals
    types.int64,  # man_bits
    types.int64,  # emin
    types.int64,  # bits of max
    types.int64,  # bits of the smallest normal
    types.int64,  # bits of the smallest subnormal 2**(emin - man_bits)
    types.int64,  # result bits of an overflowing positive value
    types.int64,  # ... and of a negative one
    types.int64,  # result bits of +inf
    types.int64,  # ... and of -inf
)


@numba.njit(_SIGNATURE, cache=True, nogil=True)
def round_bits(
    src,
    dst,
    draws,
    mode,
    sub,
    man_bits,
    emin,
    max_bits,
    sn_bits,
    qmin_bits,
    over_pos,
    over_neg,
    inf_pos,
    inf_neg,
):
    """dst[i] = the bits of src[i] rounded (see the module)."""
    n = src.shape[0]
    if mode == NEAREST_EVEN:  # the default mode has a loop of its own: about 30% faster
        for i in range(n):
            a, s, biased, shift, sh, q, rem, half = _split(src[i], sub, man_bits, emin)
            up = (rem > half) | ((rem == half) & ((q & 1) == 1))
            dst[i] = _assemble(
                a,
                s,
                biased,
                shift,
                sh,
                up,
                sub,
                max_bits,
                sn_bits,
                qmin_bits,
                over_pos,
                over_neg,
                inf_pos,
                inf_neg,
            )
    elif mode < STOCHASTIC:
        # one loop for the other five: the mode switches terms of the step's formula on or off
        away = mode == NEAREST_AWAY  # at or above half: up
        inexact_pos = mode == UP  # inexact and positive: up
        inexact_neg = mode == DOWN  # inexact and negative: up
        inexact_even = mode == ODD  # inexact and q even: up (TOWARD_ZERO: every term off)
        for i in range(n):
            a, s, biased, shift, sh, q, rem, half = _split(src[i], sub, man_bits, emin)
            up = (away & (rem >= half)) | (
                (rem != 0)
                & (
                    (inexact_pos & (s == 0))
                    | (inexact_neg & (s != 0))
                    | (inexact_even & ((q & 1) == 0))
                )
            )
            dst[i] = _assemble(
                a,
                s,
                biased,
                shift,
                sh,
                up,
                sub,
                max_bits,
                sn_bits,
                qmin_bits,
                over_pos,
                over_neg,
                inf_pos,
                inf_neg,
            )
    else:
        for i in range(n):
            a, s, biased, shift, sh, q, rem, half = _split(src[i], sub, man_bits, emin)
            if mode == STOCHASTIC:
                # frac = rem / 2**shift, the numpy path's y - floor(y): exact, as both scalings
                t = max(shift, 0)
                h = t >> 1
                up = draws[i] < float(rem) * _pow2(-h) * _pow2(h - t)
            else:  # STOCHASTIC_EQUAL
                up = (rem != 0) & (draws[i] < 0.5)
            dst[i] = _assemble(
                a,
                s,
                biased,
                shift,
                sh,
                up,
                sub,
                max_bits,
                sn_bits,
                qmin_bits,
                over_pos,
                over_neg,
                inf_pos,
                inf_neg,
            )
