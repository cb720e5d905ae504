"""Matrix products by int8 GEMMs of balanced base-256 digits (Ozaki scheme I on int8).

Each operand is cut to integers exactly as :mod:`fpgrad.arith.crt` cuts it (the same scales
2**e per row of A and column of B, widths, chunk caps, exact cuts, windows and faults), and
each integer ``X`` (``|X| <= Amax``) is written in T balanced digits ``g_t in [-128, 127]``,
``X = sum_t g_t 256**(T - 1 - t)`` (:func:`fpgrad.arith.jit_digits.digits`). Then
``A'B' = sum_{i, j} A_i B_j 256**(Ta + Tb - 2 - (i + j))``; the pairs of one diagonal
``i + j = s`` go into one ``torch._int_mm`` call (the digit blocks concatenated along the inner
dimension, as :mod:`fpgrad.arith.ozaki` does with float64 slices), exact in int32 while
``pairs n 2**14 < 2**31`` (longer diagonals are split, each part summed in int64). The
diagonals ``s <= S`` are kept; their sums become exact float64 terms, three diagonals each,
renormalised into k words (:func:`fpgrad.arith.jit_digits.combine`).

Against the CRT engine this needs more GEMM work (about ``T**2 / 2`` digit pairs instead of
N moduli) but far less per element (a digit per 8 bits instead of a residue per modulus, and
T/3 terms per result instead of N times the limbs): where int8 GEMMs are as fast as on a CPU
with AMX-INT8 it is the cheaper engine for moderate inner dimensions, which
:mod:`fpgrad.arith.products` decides per shape and machine class (:func:`cost`). The bound
(:func:`plan`):
``|ab - A'B' uv| <= trunc n 2**(ea + eb)`` (the CRT engine's cut error, :func:`crt._trunc`),
the diagonals past S at most ``n 2**14 sum_{s > S} c_s 256**(Ta + Tb - 2 - s) uv`` (c_s the
pairs of diagonal s, ``|g| <= 128``), and the caller's rounding of the terms' sum against
``n (Amax + Ha)(Bmax + Hb) uv`` (a bound on the sum of all pairs' absolute values; ``Ha``: the
digits below the top one add at most ``128 (256**(T-1) - 1) / 255``, and the top one at most
``Amax / 256**(T-1) + 1/2`` units of its weight) plus twice the half-weights the carries
between groups leave (the terms renormalised are the carried groups).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fpgrad.arith import crt

#: the longest inner dimension :mod:`fpgrad.arith.products` gives this engine: its GEMM work
#: grows with n (about T**2 / 2 digit pairs against N moduli) while the per-element work it
#: saves does not; on the AMX Xeon it measured 10-25% ahead of the CRT engine at n = 64 and 128,
#: within 10% either way at n = 256, 10-25% behind at n = 512 (standalone products, a loaded
#: machine), and chosen at n = 1024 in a trace it made the benchmark's W = 1024 line slower
#: (22.4x against 21.1x); the cost model chooses within this limit
MAX_INNER = 256
GROUP = 3  # diagonals per float64 integer of the recombination: below 2**50 (plan checks)
PAIR_TERMS = (2**31 - 1) // 2**14  #: digit products of |g h| <= 2**14 summing below 2**31
#: results per block of rows: S + 1 <= 26 diagonal sums of 4 bytes each, at most 27 MB (int64
#: where split: 54); blocks of the CRT engine's 65,536 results made 512x128x512 and
#: 1024x128x1024 products about 20% slower (smaller GEMMs)
BLOCK_OUT = 262144


@dataclass(frozen=True)
class Plan:
    """The constants of one product shape (see :func:`plan`)."""

    a: crt.Cut
    b: crt.Cut
    ta: int  # digits of a's integers
    tb: int
    last: int  # S: the last diagonal kept
    pw: np.ndarray  # (groups,) 2**(8 (Ta + Tb - 2 - s_g) - Ba - Bb), s_g a group's last diagonal
    factor: float  # error bound per unit of n 2**(ea + eb)

    def pairs(self) -> int:
        """The digit pairs of the kept diagonals (GEMMs of n multiply-adds per result)."""
        return _pairs(self.ta, self.tb, self.last)


#: The constants of :func:`cost` (milliseconds, for the terms of :func:`cost_terms`) per
#: machine class (:func:`fpgrad.arith.crt.machine`), fitted by ``scripts/fit_crt_cost.py``
#: where this engine was measured: on the Xeon with AMX-INT8 (weights ``y**-0.5``, 100 shapes,
#: seed 1). A class without constants never takes this engine.
COSTS: dict[str, tuple[float, ...]] = {
    "amx": (1.031e-9, 0.9054e-6, 35.39e-6, 1.25e-6, 1.76e-6, 0.09413),
}


def cost_terms(m: int, n: int, p: int, pl: Plan) -> list[float]:
    """What :func:`matmul_words` takes time for: its GEMMs (per multiply-add of a digit
    pair), the diagonals it recombines and the results it renormalises, the digits it cuts per
    element of A and B, a fixed part."""
    return [pl.pairs() * m * n * p, (pl.last + 1) * m * p, m * p, m * n * pl.ta, n * p * pl.tb,
            1.0]  # fmt: skip


def cost(m: int, n: int, p: int, pl: Plan) -> float | None:
    """Estimated CPU milliseconds of this engine here (:data:`COSTS` of this machine class),
    or None where the class has no constants for it."""
    k = COSTS.get(crt.machine())
    return None if k is None else float(np.dot(k, cost_terms(m, n, p, pl)))


@functools.lru_cache(maxsize=256)
def _pairs(ta: int, tb: int, last: int) -> int:
    return sum(_count(s, ta, tb) for s in range(last + 1))


def _count(s: int, ta: int, tb: int) -> int:
    """c_s: the pairs (i, j), i < ta, j < tb, with i + j = s."""
    return max(0, min(s, ta - 1) - max(0, s - tb + 1) + 1)


def _ndigits(amax: int) -> int:
    """The fewest balanced base-256 digits that hold every |X| <= amax."""
    t = 1
    while 127 * (256**t - 1) // 255 < amax:
        t += 1
    return t


def _spread(amax: int, t: int) -> Fraction:
    """A bound on ``sum_t |g_t| 256**(T-1-t)`` for |X| <= amax in t digits."""
    w = 256 ** (t - 1)
    top = Fraction(amax, w) + Fraction(1, 2)
    return math.floor(top) * w + Fraction(128 * (w - 1), 255)


@functools.lru_cache(maxsize=256)
def plan(
    n: int, prec: int, ka: int, kb: int, rounding: float, exact_a: int = 0, exact_b: int = 0
) -> Plan:
    """Constants for (ka, m, n) @ (kb, n, p) words to ``2**-(prec + 2)`` of n max|a row|
    max|b col| (the float64 slices' promise): the cut's error (:func:`crt._trunc`) and the
    dropped diagonals each at most ``2**-(prec + 8)``, the rounding charged on top (module
    docstring). ``exact_a``, ``exact_b``: as :func:`fpgrad.arith.crt.plan`. All in rationals,
    rounded up once; ValueError where no cut of at most 4 chunks reaches ``prec``."""
    if not (1 <= ka <= 3 and 1 <= kb <= 3 and n >= 1 and prec >= 1):
        raise ValueError(f"no digit plan for {ka} x {kb} words, inner dimension {n}, prec {prec}")
    target = Fraction(1, 2 ** (prec + 8))
    ca, cb = crt.cut_widths(prec, ka, kb, exact_a, exact_b, target, False)
    trunc = crt._trunc(ka, kb, ca, cb, bool(exact_a), bool(exact_b))
    amax, bmax = ca[4], cb[4]
    ta, tb = _ndigits(amax), _ndigits(bmax)
    width = ca[0] + cb[0]
    top = ta + tb - 2

    def omitted(last: int) -> Fraction:
        tail = sum(_count(s, ta, tb) * 256 ** (top - s) for s in range(last + 1, top + 1))
        return Fraction(2**14 * tail, 2**width)

    big = max(_count(s, ta, tb) for s in range(top + 1)) * n * 2**14
    if big * (256**GROUP - 1) // 255 >= 2**50:  # the combine's groups would not stay exact
        raise ValueError(f"no digit plan for inner dimension {n} at prec {prec}")
    last = 0
    while last < top and omitted(last) > target:
        last += 1
    groups = -(-(last + 1) // GROUP)
    weights = [Fraction(2) ** (8 * (top - min(g * GROUP + GROUP - 1, last)) - width)
               for g in range(groups)]  # fmt: skip
    # the renormalised terms add up to at most |kept| + 2 P, P = sum_{g >= 1} pw[g - 1] / 2
    # (each carried group at most half its carry's weight), |kept| <= n spread (per unit)
    spread = _spread(amax, ta) * _spread(bmax, tb) / 2**width + sum(weights[:-1]) / n
    factor = (trunc + omitted(last) + Fraction(rounding) * spread) * (1 + Fraction(1, 2**40))
    pw = np.array([float(w) for w in weights])
    pw.flags.writeable = False

    def cut(c: tuple, exact: bool) -> crt.Cut:
        bits, nch, bc, caps, amx = c
        chunk_caps = np.array(caps, dtype=float)
        chunk_caps.flags.writeable = False
        return crt.Cut(bits, nch, bc, np.zeros((nch, 0)), chunk_caps, amx, exact, bits - 992,
                       min(1000, 971 + bc))  # fmt: skip

    return Plan(cut(ca, bool(exact_a)), cut(cb, bool(exact_b)), ta, tb, last, pw,
                float(factor) * (1 + 2.0**-50))  # fmt: skip


@functools.lru_cache(maxsize=1)
def usable() -> bool:
    """Whether ``torch._int_mm`` multiplies a strided left operand (a block of columns of a
    wider matrix, as :func:`_diagonals` passes it) exactly, int32 out (a fixed probe against
    int64, with the extreme digits -128 and 127 and an inner dimension at the int32 limit);
    decided once. :func:`fpgrad.arith.crt.usable` covers contiguous operands."""
    try:
        import torch

        rng = np.random.default_rng(15)
        for m, n, p, cols in ((9, 40, 17, 3), (8, 700, 24, 5), (3, PAIR_TERMS, 2, 1)):
            a = rng.integers(-128, 128, (m, cols * n)).astype(np.int8)
            b = rng.integers(-128, 128, (n * (cols - 1 if cols > 1 else 1), p)).astype(np.int8)
            a[0], b[:, 0] = -128, -128
            k = b.shape[0]
            got = torch._int_mm(torch.from_numpy(a)[:, :k], torch.from_numpy(b)).numpy()
            want = a[:, :k].astype(np.int64) @ b.astype(np.int64)
            if got.dtype != np.int32 or not np.array_equal(got.astype(np.int64), want):
                return False
        return True
    except Exception:  # noqa: BLE001 - no torch, no kernel for this CPU
        return False


def _diagonals(da: np.ndarray, db: np.ndarray, pl: Plan, n: int) -> np.ndarray:
    """``V_s`` for s <= S: (S + 1, m, p) int32 (int64 where a diagonal is split), exact.
    ``da``: (m, Ta n) int8 digit blocks of a; ``db``: (Tb n, p), b's blocks in reverse."""
    import torch

    m, p = da.shape[0], db.shape[1]
    ta, tb = pl.ta, pl.tb
    split = any(_count(s, ta, tb) * n > PAIR_TERMS for s in range(pl.last + 1))
    out = torch.empty((pl.last + 1, m, p), dtype=torch.int64 if split else torch.int32)
    left, right = torch.from_numpy(da), torch.from_numpy(db)
    step = max(1, PAIR_TERMS // n)  # pairs per call
    for s in range(pl.last + 1):
        lo, hi = max(0, s - tb + 1), min(s, ta - 1)
        if not split:
            torch._int_mm(left[:, lo * n : (hi + 1) * n],
                          right[(tb - 1 - s + lo) * n : (tb - s + hi) * n], out=out[s])  # fmt: skip
            continue
        out[s] = 0
        for i0 in range(lo, hi + 1, step):
            i1 = min(hi, i0 + step - 1)
            part = torch._int_mm(left[:, i0 * n : (i1 + 1) * n],
                                 right[(tb - 1 - s + i0) * n : (tb - s + i1) * n])  # fmt: skip
            out[s] += part
    return out.numpy()


def matmul_words(
    a: np.ndarray, b: np.ndarray, prec: int, rounding: float, words: int, pl: Plan | None = None
) -> tuple[np.ndarray, np.ndarray, bool, int] | None:
    """As :func:`fpgrad.arith.crt.matmul_words` with ``words`` = k > 0 (the k words of each
    result, its bound, False, the results whose word 0 leaves the guarded range), or None
    where this engine does not apply (no plan, a scale outside the window, a fault of the
    cut, a term that could leave the normal float64 range). ``pl``: the plan, if known."""
    from fpgrad.arith import jit_digits

    ka, m, n = a.shape
    kb, _, p = b.shape
    if not 1 <= words <= 3:
        raise ValueError(f"digits.matmul_words: 1 to 3 words, not {words}")
    if n > PAIR_TERMS or not usable():
        return None
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    if pl is None:
        try:
            pl = plan(n, prec, ka, kb, rounding, *crt.exact_widths(a, b, n, prec, rounding))
        except ValueError:
            return None
    da = np.empty((m, pl.ta, n), dtype=np.int8)
    db = np.empty((pl.tb, n, p), dtype=np.int8)
    ea, top_a = np.empty(m, dtype=np.int64), np.empty(m)
    eb, top_b = np.empty(p, dtype=np.int64), np.empty(p)
    for x, per_row, c, e, t, d in ((a, True, pl.a, ea, top_a, da), (b, False, pl.b, eb, top_b, db)):
        if jit_digits.digits(x, per_row, c.bc, c.nch, c.lo, c.hi, c.caps, e, t, d, c.exact) != 0:
            return None
    nz_a, nz_b = top_a > 0, top_b > 0
    ea_nz, eb_nz = ea[nz_a], eb[nz_b]
    if ea_nz.size and eb_nz.size:  # every term a normal float64, every weight finite
        low = 8 * (pl.ta + pl.tb - 2 - pl.last) - pl.a.bits - pl.b.bits
        if ea_nz.min() + eb_nz.min() + low - 60 < -1000:
            return None
        if ea_nz.max() + eb_nz.max() > 900:
            return None
    scale_a = np.where(nz_a, np.ldexp(1.0, ea), 0.0)
    scale = np.multiply.outer(scale_a, np.where(nz_b, np.ldexp(1.0, eb), 0.0))  # exact
    mid = np.empty((words, m, p))
    left, right = da.reshape(m, pl.ta * n), db.reshape(pl.tb * n, p)
    rows = max(1, min(m, BLOCK_OUT // max(p, 1)))
    flagged = 0
    for r0 in range(0, m, rows):  # row blocks: the diagonal sums of at most BLOCK_OUT results
        r1 = min(m, r0 + rows)
        diags = _diagonals(left[r0:r1], right, pl, n)
        flagged += jit_digits.combine(
            diags.reshape(pl.last + 1, (r1 - r0) * p), GROUP, pl.pw,
            scale[r0:r1].reshape(-1), mid[:, r0:r1].reshape(words, -1),
        )[1]  # fmt: skip
    return mid, scale * (pl.factor * n * (1 + 2.0**-40)), False, flagged
