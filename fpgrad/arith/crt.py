"""Matrix products by int8 GEMMs and the Chinese remainder theorem (Ozaki scheme II).

Each row of A (each column of B) gets the power-of-two scale 2**e of
:func:`fpgrad.arith.ozaki.scale_exponents`; its elements are cut to integers
``A' = round(a 2**(B - e))`` of about B bits (``|a - A' 2**(e - B)| <= ka 2**(e - B - 1)``,
:func:`fpgrad.arith.jit_crt.residues`), or exactly (``A' = a 2**(B - e)``) at the least width
B that holds every word of the operand (:func:`exact_widths`: float32 and float64 data, where
B is about 53 plus the exponent spread of a row, instead of prec + 11). The integer product
``C' = A' B'`` is known modulo N pairwise-coprime odd moduli m_j <= 255: one exact int8 GEMM
(``torch._int_mm``, int32 accumulator) of the symmetric residues each, |residue| <= 127, so an
inner dimension of at most :data:`INT32_TERMS` cannot overflow (longer ones are cut and
summed in int64). With ``M = prod m_j >= 8 max|C'|``, the CRT gives C' exactly
(:func:`fpgrad.arith.jit_crt.recombine`, in blocks of rows of :data:`BLOCK_OUT` results): its
CRT digits times the 40-bit limbs of the constants ``M / m_j`` and M (every partial sum an
integer below 2**53), carried to balanced limbs. The limbs above about 2**-(prec + 12) of
``n 2**(Ba + Bb)`` are the terms; the ones below (not computed), the truncation to A', B' and
the caller's rounding of the terms' sum go into the bound (:func:`plan`).

The engine is used where the CPU has an int8 dot-product unit (:func:`fast`, a property of the
machine) and ``torch._int_mm`` exists and passes an exactness probe (:func:`usable`; both
decided once per process) for products with an inner dimension of at least :data:`MIN_INNER`
and a result at least :data:`MIN_OUTER` wide both ways (:func:`applies`) that :func:`cost`
estimates cheaper here than the float64 slices; else :func:`fpgrad.arith.ozaki.matmul_levels`.
Rows whose scale leaves the window of :func:`plan` (magnitudes near 2**-860 or 2**1000), words
the residue kernel rejects (NaN, lower words far above word 0, a zero word 0 over non-zero
words, a remainder under an exact cut) and precisions or word counts without a plan make
:func:`matmul` return None: the float64 engine (and its range accounting) takes the product.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

INT32_TERMS = (2**31 - 1) // 127**2  #: 133144 products of |x| <= 127 sum below 2**31
BETA = 40  # limb width of the CRT constants
CHUNK_BITS = 40  # widest chunk of A' in the residue kernel
# the least shapes this engine is tried on; within them :func:`cost` chooses between it and
# the float64 slices (its residues and CRT cost per element of A, B and C, about 20-42 moduli
# each, its GEMMs per multiply-add): a shape rule, results never depend on timing.
MIN_INNER = 8
MIN_OUTER = 8
BLOCK_OUT = 65536  # results per block of rows: N int32 residue products of 11 MB at most


def _moduli() -> tuple[int, ...]:
    """Odd pairwise-coprime moduli, greedily from 255 down (each fits int8 as |r| <= 127)."""
    out: list[int] = []
    for m in range(255, 2, -2):
        if all(math.gcd(m, q) == 1 for q in out):
            out.append(m)
    return tuple(out)


MODULI = _moduli()


@dataclass(frozen=True)
class Cut:
    """How one operand becomes integers: B = nch * bc bits below its scale 2**e, cut in nch
    chunks of bc bits (the residue kernel's layout), and whether that is exact."""

    bits: int  # B
    nch: int
    bc: int
    rtab: np.ndarray  # (nch, N) float64: 2**(bc (nch - 1 - i)) mod m_j, symmetric
    caps: np.ndarray  # (nch,) bounds on the chunks |d_i| the residue kernel checks
    amax: int  # sum_i caps_i 2**(bc (nch - 1 - i)): a bound on |X| the checks prove
    exact: bool  # every word a multiple of 2**(e - B): X 2**(e - B) is the operand (checked)
    lo: int  # window of scale exponents: every residue-kernel constant normal and finite
    hi: int  # (chunk 0's sigma, 1.5 2**(e - bc + 52), needs e <= 971 + bc)


@dataclass(frozen=True)
class Plan:
    """The constants of one product shape (see :func:`plan`); ``a``, ``b``: its operands' cuts."""

    a: Cut
    b: Cut
    mods: np.ndarray  # (N,) int64
    cinv: np.ndarray  # (N,) int64: (M / m_j)**-1 mod m_j, symmetric
    limbs: np.ndarray  # (J - j0, N + 1) float64: BETA-bit limbs j0.. of M / m_j, then of -M
    top: int  # jt - j0: the highest limb that can be non-zero, from j0
    cap: float  # bound on |limb jt|: (Cmax + D + P(jt)) / 2**(BETA jt), rounded up
    pw: np.ndarray  # (J - j0,) 2**(BETA (j0 + l) - Ba - Bb)
    factor: float  # error bound per unit of n 2**(ea + eb)


def _sym(x: int, m: int) -> int:
    r = x % m
    return r - m if r > m // 2 else r


def _chunks(bits: int) -> tuple[int, int, int, list[int], int]:
    """(B, nch, bc, caps, amax) for at least ``bits`` bits: the fewest chunks of at most
    CHUNK_BITS, B rounded up to a multiple of their number."""
    nch = -(-bits // CHUNK_BITS)
    bits = nch * (-(-bits // nch))
    bc = bits // nch
    caps = [2**bc + 4] + [2 ** (bc + 1)] * (nch - 1)
    amax = sum(c * 2 ** (bc * (nch - 1 - i)) for i, c in enumerate(caps))
    return bits, nch, bc, caps, amax


def _trunc(ka: int, kb: int, ca: tuple, cb: tuple, exact_a: bool, exact_b: bool) -> Fraction:
    """The cut's error per unit ``n 2**(ea + eb)``: ``ab - A'B' uv = (a - A'u) b + A'u (b - B'v)``
    with ``|a - A'u| <= ka u/2`` (0 when exact), ``|b| <= (Bmax + kb/2) v`` (``B'v`` when
    exact) and ``|A'| <= Amax``; u = 2**(ea - Ba), v = 2**(eb - Bb)."""
    (ba, *_, amax), (bb, *_, bmax) = ca, cb
    left = 0 if exact_a else ka * (2 * bmax + (0 if exact_b else kb))
    right = 0 if exact_b else 2 * kb * amax
    return Fraction(left + right, 2 ** (ba + bb + 2))


def cut_widths(
    prec: int, ka: int, kb: int, exact_a: int, exact_b: int, target: Fraction, same: bool
) -> tuple[tuple, tuple]:
    """The cuts (:func:`_chunks`) of both operands: exact ones at their widths, truncated ones
    from ``prec + 3`` bits up (one width for both when ``same`` and both are truncated) until
    :func:`_trunc` is at most ``target``; ValueError past 4 chunks (the residue kernel's:
    prec <= 149)."""
    bits_a = exact_a if exact_a else prec + 3
    bits_b = exact_b if exact_b else prec + 3
    while True:
        ca, cb = _chunks(bits_a), _chunks(bits_b)
        if same and not (exact_a or exact_b):  # both truncated: one width (the CRT's cut)
            cb = ca
        if _trunc(ka, kb, ca, cb, bool(exact_a), bool(exact_b)) <= target:
            break
        if exact_a and exact_b:  # unreachable: exact cuts err by 0
            raise AssertionError("exact cuts with a truncation error")
        if not exact_a:
            bits_a = ca[0] + 1
        if not exact_b:
            bits_b = cb[0] + 1
    if max(ca[1], cb[1]) > 4:
        raise ValueError(f"no cut of {max(ca[0], cb[0])}-bit operands (at most 4 chunks)")
    return ca, cb


@functools.lru_cache(maxsize=256)
def plan(
    n: int, prec: int, ka: int, kb: int, rounding: float, exact_a: int = 0, exact_b: int = 0
) -> Plan:
    """Constants for (ka, m, n) @ (kb, n, p) words to about 2**-prec of n max|a row| max|b col|.

    ``exact_a`` (``exact_b``) > 0: a's (b's) words are multiples of ``2**(e - exact_a)`` with
    e its row's (column's) scale, so a's cut of at least that many bits is exact (the residue
    kernel checks it: a remainder is a fault). A truncated operand gets B bits, the fewest (a
    multiple of the chunk count; both the same when both are truncated) whose truncation error
    is at most ``2**-(prec+9)`` per unit ``n 2**(ea+eb)``, about the float64 engine's error at
    this prec. It rests only on what the residue kernel checks: chunks ``|d_0| <= 2**bc + 4``
    (rounding the words of ``|a| < 2**e`` one at a time adds at most ka/2) and ``|d_i| <=
    2**(bc+1)`` after, so ``|A'| <= Amax = sum_i cap_i 2**(bc (nch-1-i))``; each word rounds to
    its last unit ``u = 2**(e-Ba)``, ``|a - A' u| <= ka u/2`` and ``|b| <= (Bmax + kb/2) v``,
    so ``|ab - A'B' uv| <= n uv (ka (Bmax + kb/2) + kb Amax) / 2``, with a term 0 for an exact
    operand (:func:`_trunc`). ``|C'| <= Cmax = n Amax Bmax``; moduli until ``M >= 8 Cmax``.
    Each limb sum is at most ``Smax = (127 N + N/2 + 1) (2**BETA - 1)``, so the limbs below
    j0, not computed, add up to at most ``D = Smax (2**(BETA j0) - 1) / (2**BETA - 1)`` (j0
    the largest with ``D <= 2**-(prec+12) n 2**(Ba+Bb)``); the kept ones, carried from j0, sum
    to ``K = C' - D``, and after the carries those from j0 to below j add up to at most
    ``P(j) = 2**(BETA-1) (2**(BETA j) - 2**(BETA j0)) / (2**BETA - 1)``: the limbs above jt
    (the least with ``Cmax + D + P(jt+1) < 2**(BETA (jt+1))``) are 0, limb jt is at most
    ``(Cmax + D + P(jt)) / 2**(BETA jt)`` (both checked per element) and the terms' absolute
    values add up to at most ``Cmax + D + 2 P(jt)``, against which ``rounding`` (the
    caller's relative error on their sum) is charged. All in rationals, rounded up once.
    """
    if not (1 <= ka <= 3 and 1 <= kb <= 3 and n >= 1 and prec >= 1):
        raise ValueError(f"no CRT plan for {ka} x {kb} words, inner dimension {n}, prec {prec}")
    target = Fraction(1, 2 ** (prec + 9))
    ca, cb = cut_widths(prec, ka, kb, exact_a, exact_b, target, True)
    for c in (ca, cb):
        assert c[1] * 2 ** (c[2] + 1) * 127 <= 2**50, "residues exact (jit_crt)"
    amax, bmax = ca[4], cb[4]
    trunc = _trunc(ka, kb, ca, cb, bool(exact_a), bool(exact_b))
    width = ca[0] + cb[0]  # Ba + Bb
    cmax = n * amax * bmax
    mods: list[int] = []
    big_m = 1
    for m in MODULI:
        if big_m >= 8 * cmax:
            break
        mods.append(m)
        big_m *= m
    if big_m < 8 * cmax:
        raise ValueError(f"no CRT basis for {width}-bit products and inner dimension {n}")
    nm = len(mods)
    assert nm * nm < 2**50 // 8, "recombine's k exact: N**2 2**-53 < 1/2 - 1/8"

    def cut(c: tuple, exact: bool) -> Cut:
        bits, nch, bc, caps, amax = c
        rtab = np.array(
            [[_sym(pow(2, bc * (nch - 1 - i), m), m) for m in mods] for i in range(nch)],
            dtype=float,
        )
        assert np.abs(rtab).max() <= 127
        chunk_caps = np.array(caps, dtype=float)
        for arr in (rtab, chunk_caps):
            arr.flags.writeable = False
        # the window: every chunk's sigma 1.5 2**(e - bc (i + 1) + 52) and unit 2**(e - B)
        # normal and finite (chunk 0's sigma the largest, the last unit the smallest)
        return Cut(bits, nch, bc, rtab, chunk_caps, amax, exact, bits - 992, min(1000, 971 + bc))

    cinv = [_sym(pow(big_m // m, -1, m), m) for m in mods]
    nj = -(-big_m.bit_length() // BETA)
    smax = (127 * nm + nm // 2 + 1) * (2**BETA - 1)
    assert smax + 2**14 < 2**53, "limb sums and carries exact"
    unit = Fraction(n * 2**width)

    def dropped(j0: int) -> Fraction:
        return Fraction(smax * (2 ** (BETA * j0) - 1), 2**BETA - 1)

    j0 = 0
    while j0 + 1 < nj and dropped(j0 + 1) <= unit / 2 ** (prec + 12):
        j0 += 1

    def p_sum(j: int) -> Fraction:
        return Fraction(2 ** (BETA - 1) * (2 ** (BETA * j) - 2 ** (BETA * j0)), 2**BETA - 1)

    jt = j0
    while cmax + dropped(j0) + p_sum(jt + 1) >= 2 ** (BETA * (jt + 1)):
        jt += 1
    consts = [big_m // m for m in mods] + [-big_m]
    limbs = np.array(
        [[math.copysign((abs(c) >> (BETA * j)) & (2**BETA - 1), c) for c in consts]
         for j in range(j0, nj)]
    )  # fmt: skip
    terms_sum = cmax + dropped(j0) + 2 * p_sum(jt)
    cap = math.ceil((cmax + dropped(j0) + p_sum(jt)) / 2 ** (BETA * jt))
    assert cap < 2**52
    factor = (trunc + dropped(j0) / unit + Fraction(rounding) * terms_sum / unit) * (
        1 + Fraction(1, 2**40)
    )
    pw = np.array([math.ldexp(1.0, BETA * j - width) for j in range(j0, nj)])
    for arr in (limbs, pw):
        arr.flags.writeable = False
    return Plan(
        cut(ca, bool(exact_a)), cut(cb, bool(exact_b)), np.array(mods, dtype=np.int64),
        np.array(cinv, dtype=np.int64), limbs, jt - j0, float(cap), pw,
        float(factor) * (1 + 2.0**-50),
    )  # fmt: skip


def applies(m: int, n: int, p: int) -> bool:
    """Whether an (m, n) @ (n, p) product goes to this engine: :func:`fast`, :func:`usable`,
    ``n >= MIN_INNER`` and ``m, p >= MIN_OUTER``; otherwise
    :func:`fpgrad.arith.ozaki.matmul_levels` computes it."""
    return n >= MIN_INNER and min(m, p) >= MIN_OUTER and fast() and usable()


#: CPU features (``torch.cpu.get_capabilities``) with an int8 dot-product unit behind torch's
#: CPU int8 GEMM: with AVX512-VNNI a 128x256x256 ``_int_mm`` runs about 8x faster than a
#: float64 GEMM (docs/benchmarks.md); on AVX2 alone (an AMD EPYC, torch 2.13) about 10x
#: slower, a plain loop, and this engine then makes the MLP of scripts/bench_exact.py 12-14x
#: slower than the float64 slices (241.5-243x torch float64 against 17.5-19.9x, measured).
INT8_FEATURES = ("avx512_vnni", "amx_int8")
INT8_ENV = "FPGRAD_INT8_GEMM"  # "1" or "0": overrides :func:`fast` (read once per process)


def _capabilities() -> dict:
    """torch's CPU capabilities (``torch.cpu.get_capabilities()``); empty without torch or its
    capability query. Read by :func:`fast` and :func:`machine`, each decided once."""
    try:
        import torch

        return dict(torch.cpu.get_capabilities())
    except Exception:  # noqa: BLE001 - no torch, an older torch
        return {}


@functools.lru_cache(maxsize=1)
def fast() -> bool:
    """Whether this machine has one of :data:`INT8_FEATURES` (or :data:`INT8_ENV` is "1", and
    not "0"): a fixed property of the machine, decided once, never a timing, so results do not
    depend on load. Without torch (or its capability query): False."""
    from fpgrad.errors import switch

    forced = switch(INT8_ENV)
    if forced is not None:
        return forced
    return any(bool(_capabilities().get(f, False)) for f in INT8_FEATURES)


@functools.lru_cache(maxsize=1)
def usable() -> bool:
    """Whether ``torch._int_mm`` runs here and multiplies int8 exactly (a fixed probe with
    |x| <= 127 against int64: residues, the sign extremes, odd shapes); decided once. The
    extreme rows of the inner dimension 1101 sum to +-1101 * 127**2, an odd number above 2**24:
    a kernel accumulating in float32 fails the probe."""
    try:
        import torch

        rng = np.random.default_rng(14)
        for m, n, p in ((17, 40, 9), (33, 1101, 5), (8, 300, 48)):
            a = rng.integers(-127, 128, (m, n)).astype(np.int8)
            b = rng.integers(-127, 128, (n, p)).astype(np.int8)
            a[0], b[:, 0], a[1], b[:, 1] = -127, -127, 127, 127
            got = torch._int_mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()
            if got.dtype != np.int32 or not np.array_equal(
                got.astype(np.int64), a.astype(np.int64) @ b.astype(np.int64)
            ):
                return False
        return True
    except Exception:  # noqa: BLE001 - no torch, no kernel for this CPU: the float64 engine
        return False


def _int_products(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """``ra[j] @ rb[j]`` for every modulus j, exactly: (N, m, p) int32, or int64 when the inner
    dimension is cut into pieces of at most INT32_TERMS (each piece's int32 sum cannot
    overflow: ``INT32_TERMS 127**2 < 2**31``)."""
    import torch

    nm, m, n = ra.shape
    p = rb.shape[2]
    step = INT32_TERMS
    if n <= step:
        out = torch.empty((nm, m, p), dtype=torch.int32)
        la, lb, lo = torch.from_numpy(ra).unbind(0), torch.from_numpy(rb).unbind(0), out.unbind(0)
        for x, y, z in zip(la, lb, lo, strict=True):  # views made at once, not three per call
            torch._int_mm(x, y, out=z)
        return out.numpy()
    total = np.zeros((nm, m, p), dtype=np.int64)
    for lo in range(0, n, step):
        ta = torch.from_numpy(np.ascontiguousarray(ra[:, :, lo : lo + step]))
        tb = torch.from_numpy(np.ascontiguousarray(rb[:, lo : lo + step]))
        for j in range(nm):
            total[j] += torch._int_mm(ta[j], tb[j]).numpy()
    return total


def exact_widths(
    a: np.ndarray, b: np.ndarray, n: int, prec: int, rounding: float
) -> tuple[int, int]:
    """(exact_a, exact_b) for :func:`plan`: an operand whose words fit its truncated cut's
    width exactly (:func:`fpgrad.arith.jit_crt.exact_bits`, rounded up to a multiple of 4 and
    at most that width: float32 and float64 data, exact sums of a few of them) is cut exactly at
    that width; 0 otherwise (multi-word balls)."""
    from fpgrad.arith import jit_crt

    full = plan(n, prec, a.shape[0], b.shape[0], rounding)
    out = []
    for x, per_row, c in ((a, True, full.a), (b, False, full.b)):
        need = jit_crt.exact_bits(x, per_row, c.bits)
        out.append(min(max(4, -(-need // 4) * 4), c.bits) if need <= c.bits else 0)
    return out[0], out[1]


# The constants of :func:`cost` (milliseconds) for the terms of :func:`crt_terms` and
# :func:`slice_terms`, per machine class (:func:`machine`), fitted by
# ``scripts/fit_crt_cost.py``: on an AVX-512 VNNI EPYC (relative least squares, 159 shapes; 3
# of the choices cost over 10% more than the other engine's measured time), and on a Xeon with
# AMX-INT8, where the int8 GEMMs are faster and the per-element work slower (weights
# ``y**-0.5``, 200 shapes, seed 1; on 200 other shapes, seed 2, its choices took 0.7% more
# time than the better engine's, the EPYC's constants 5.0%). Fixed constants of the class:
# the engine chosen is a function of shapes, words and the machine, never of a timing.
COSTS: dict[str, tuple[tuple[float, ...], ...]] = {
    "vnni": (
        (2.800e-9, 0.4757e-6, 0.1584e-6, 0.0, 0.0, 4.028e-6, 4.324e-6, 0.130),
        (31.81e-9, 0.532e-6, 1.190e-6, 0.166e-6, 0.036),
    ),
    "amx": (
        (1.992e-9, 1.536e-6, 0.1485e-6, 0.7008e-6, 0.6861e-6, 0.0, 0.0, 0.1393),
        (35.37e-9, 2.55e-6, 1.83e-6, 0.0, 0.0),
    ),
}


@functools.lru_cache(maxsize=1)
def machine() -> str:
    """The class of :data:`COSTS` this machine belongs to: "amx" where torch reports
    ``amx_int8``, else "vnni"; decided once, like :func:`fast`."""
    return "amx" if _capabilities().get("amx_int8", False) else "vnni"


def crt_terms(m: int, n: int, p: int, ka: int, kb: int, pl: Plan) -> list[float]:
    """What the CRT engine's time grows with: its GEMMs (per multiply-add and modulus), the
    recombination per result and modulus (growing with the result's size, the cache it
    outgrows), the residues per element and modulus, the cuts per word, and a fixed part."""
    nm = len(pl.mods)
    big = max(0.0, math.log2(max(m * p, 1) / 16384))
    return [nm * m * n * p, nm * m * p, big * nm * m * p, nm * m * n, nm * n * p, m * n * ka,
            n * p * kb, 1.0]  # fmt: skip


def slice_terms(m: int, n: int, p: int, ka: int, kb: int, pl: Plan, prec: int) -> list[float]:
    """What :func:`fpgrad.arith.ozaki.matmul_levels` takes time for: its slice-pair GEMMs, the
    slicing of each operand per level, the sum of the levels per result, a fixed part."""
    from fpgrad.arith import ozaki

    levels, bits = ozaki._plan(n, prec, ka, kb, True)[:2]
    ends = []  # (slices with digits, remainder index) of a and b
    for c in (pl.a, pl.b):
        ends.append((-(-c.bits // bits),) * 2 if c.exact else (levels, levels + 1))
    (na, ra), (nb, rb) = ends
    pairs = sum(max(0, min(s, na - 1) - max(0, s - nb + 1) + 1) for s in range(levels))
    hi = levels if ra >= levels else min(levels - 1, na - 1)
    pairs += max(0, hi - max(0, levels - rb) + 1)
    return [pairs * m * n * p, levels * m * n * ka, levels * n * p * kb, m * p * (levels + 1), 1.0]


def cost(m: int, n: int, p: int, ka: int, kb: int, pl: Plan, prec: int) -> tuple[float, float]:
    """Estimated CPU milliseconds of an (m, n) @ (n, p) product of ka and kb words in this
    engine (plan ``pl``) and in :func:`fpgrad.arith.ozaki.matmul_levels`: the terms of
    :func:`crt_terms` and :func:`slice_terms` times this machine class's :data:`COSTS`."""
    kc, ko = COSTS[machine()]
    tc, to = crt_terms(m, n, p, ka, kb, pl), slice_terms(m, n, p, ka, kb, pl, prec)
    return float(np.dot(kc, tc)), float(np.dot(ko, to))


def matmul(
    a: np.ndarray, b: np.ndarray, prec: int, rounding: float = 0.0, choose: bool = False
) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """As :func:`fpgrad.arith.ozaki.matmul_levels` (terms, bound, risk), or None where this
    engine does not apply (no :func:`plan`: more than 3 words, prec above 149; a scale
    outside the window; a fault of :func:`fpgrad.arith.jit_crt.residues`) or, with
    ``choose``, where :func:`cost` finds the float64 slices cheaper."""
    done = matmul_words(a, b, prec, rounding, choose, 0)
    return None if done is None else done[:3]


def matmul_words(
    a: np.ndarray,
    b: np.ndarray,
    prec: int,
    rounding: float,
    choose: bool,
    words: int,
    widths: tuple[int, int] | None = None,
    costs: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, bool, int] | None:
    """As :func:`matmul`, but with ``words`` = k > 0 the first array is the k words of each
    result (its terms renormalised by :func:`fpgrad.arith.jit_crt.recombine_words`: the words
    of :func:`fpgrad.arith.jit_ball.renorm`, without the terms in memory), and the last item
    counts the results whose word 0 leaves the guarded range (0 with the terms). ``widths``:
    :func:`exact_widths` of these operands, ``costs``: their :func:`cost`, if the caller has
    them."""
    from fpgrad.arith import jit_crt

    ka, m, n = a.shape
    kb, _, p = b.shape
    if not 0 <= words <= 3:
        raise ValueError(f"crt.matmul_words: 0 (the terms) to 3 words, not {words}")
    a = np.ascontiguousarray(a, dtype=np.float64)
    b = np.ascontiguousarray(b, dtype=np.float64)
    try:
        if widths is None:
            widths = exact_widths(a, b, n, prec, rounding)
        pl = plan(n, prec, ka, kb, rounding, *widths)
    except ValueError:
        return None
    if choose:
        crt_ms, oz_ms = cost(m, n, p, ka, kb, pl, prec) if costs is None else costs
        if oz_ms <= crt_ms:
            return None
    nm = len(pl.mods)
    ra = np.empty((nm, m, n), dtype=np.int8)
    rb = np.empty((nm, n, p), dtype=np.int8)
    ea, top_a = np.empty(m, dtype=np.int64), np.empty(m)
    eb, top_b = np.empty(p, dtype=np.int64), np.empty(p)
    for x, per_row, c, e, t, r in ((a, True, pl.a, ea, top_a, ra), (b, False, pl.b, eb, top_b, rb)):
        args = (c.bc, c.nch, c.lo, c.hi, pl.mods, c.rtab, c.caps, e, t, r, c.exact)
        if jit_crt.residues(x, per_row, *args) != 0:
            return None
    nz_a, nz_b = top_a > 0, top_b > 0
    ea_nz, eb_nz = ea[nz_a], eb[nz_b]
    if ea_nz.size and eb_nz.size:  # every term a normal float64 (as ozaki's risk test)
        if ea_nz.min() + eb_nz.min() - pl.a.bits - pl.b.bits - 60 < -1000:
            return None
        if ea_nz.max() + eb_nz.max() > 900:
            return None
    assert n * 127**3 <= 2**50, "recombine: |prods cinv| <= 2**50 (jit_crt)"
    scale_a = np.where(nz_a, np.ldexp(1.0, ea), 0.0)
    scale = np.multiply.outer(scale_a, np.where(nz_b, np.ldexp(1.0, eb), 0.0))  # exact, normal
    out = np.empty((words or pl.top + 1, m, p))  # the words, or the terms
    kernel = jit_crt.recombine_words if words else jit_crt.recombine
    rows = max(1, min(m, BLOCK_OUT // max(p, 1)))
    flagged = 0
    for r0 in range(0, m, rows):  # row blocks: their N residue products stay in cache
        r1 = min(m, r0 + rows)
        prods = _int_products(ra[:, r0:r1], rb).reshape(nm, (r1 - r0) * p)
        done = kernel(
            prods, pl.mods, pl.cinv, pl.limbs, BETA, pl.top, pl.cap, pl.pw,
            scale[r0:r1].reshape(-1), out[:, r0:r1].reshape(len(out), -1),
        )  # fmt: skip
        bad, fl = done if words else (done, 0)
        flagged += fl
        if bad:
            raise AssertionError(f"CRT product beyond its proven bound ({bad} limbs)")
    return out, scale * (pl.factor * n * (1 + 2.0**-40)), False, flagged
