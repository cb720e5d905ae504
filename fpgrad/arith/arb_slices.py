"""Products of Arb balls through exact float64 slices (Ozaki scheme I at any precision).

FLINT's ``arb_dot`` multiplies and adds every term at the working precision: about 60-80 ns
per term of two 467-bit balls here, 17-37 ns where one operand is short. :func:`matmul` gives
an enclosure of the same product from float64 BLAS instead:

- Each row of A (column of B) gets the scale ``e``: the largest exponent of its midpoints and
  radii, so ``|mid| < 2**e`` and ``rad < 2**e``. Each midpoint is cut toward 0 into T signed
  slices of ``beta`` bits, ``mid = sum_t s_t 2**(e - (t+1) beta) + r`` with ``|s_t| < 2**beta``
  and ``|r| < 2**(e - T beta)`` (``r = 0`` where the slices hold every bit of every midpoint).
- For each diagonal ``s = i + j`` up to S, one BLAS product of A's slices i side by side
  with B's slices s - i stacked: every term is an integer below ``2**(2 beta)`` and ``beta``
  is the largest with ``n min(Ta, Tb) (2**beta - 1)**2 < 2**53``, so every partial sum, in
  any order, with or without fused multiply-adds, is an exact integer: the products are exact.
- Each result's diagonals are summed exactly (integer digits of base ``2**beta`` with
  carries), set as the ball's midpoint and truncated to ``prec`` bits (one unit in the last
  place into the radius where inexact).
- The radius also gets, as ``mag_set_d_2exp_fmpz`` (an upper bound) of a float64 bound: the
  cut remainders and the diagonals past S, for each term whose midpoints are both non-zero
  (the others are exact zeros) at most ``2**(ea+eb) (2**-Ta beta + 2**-Tb beta + sum_{s>S}
  cnt(s) 2**-s beta)`` (each slice pair ``|a_i b_j| < 2**(ea + eb - (i+j) beta)``; the bound in
  rationals, chosen below ``2**-(prec+GUARD)``; a term is 0 for an operand cut exactly), and
  ``|mid A| rad B + rad A |mid B| + rad A rad B`` from upper bounds of |mid| and rad relative
  to their scales (radii scaled by a power of two per row of A and column of B, raised to at
  least 2**-1022 of the largest there, |mid| to at least 2**-1000 of its scale) through BLAS
  with its error bound, subnormals included (:func:`fpgrad.arith.ball._nonneg_matmul`); each
  result's exponent from its non-zero terms. Above :data:`FLOORED_PRECS` a product that hit a
  floor declines (the floors' bumps could pass ``2**-(prec+GUARD)`` of the scales there).

So the result encloses the exact product of any matrices in the balls, as arb_dot's does; it
is not bit-identical to it: its midpoint error is relative to the rows' and columns' scales
``2**(ea+eb)`` per term, not to each term, with GUARD bits to spare. Used by
:class:`fpgrad.arith.arb.ArbArith` where ``slice_products`` is set (the exact training run,
:mod:`fpgrad.training.exact_run`) from :data:`MIN_PREC` bits (and only within
:data:`FULL_PRECS` where both operands need more than one slice); it declines (None: the
caller keeps arb_dot) for non-finite balls, exponents beyond 2**40 and elements that are not
balls.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache
from typing import Any

import numpy as np
from flint import arb

from fpgrad.arith import arb_kernels

GUARD = 16  #: cut remainders and dropped diagonals below 2**-(prec+GUARD) 2**(ea+eb) a term
#: the least precision that takes this engine, and the precisions at which a product of two
#: operands that both need more than one slice takes it (scripts/bench_arb_products.py: with
#: one narrow operand, such as pixel data, the slices are 1.9-4.3x faster than arb_dot from
#: 128 to 1600 bits; with two full-precision operands 1.2-2x from 128 to 800 bits, about even
#: at 1200 and 1.2-2x slower at 1600, where the slice pairs, one per 21 bits of each operand,
#: grow as the square of the precision)
MIN_PREC = 128
FULL_PRECS = (128, 1000)
#: the floors (radii 2**-1022 of their row's or column's largest, |mid| 2**-1000 of its scale)
#: stay below 2**-(prec+GUARD) of the scales up to here; above, a product that hit one declines
FLOORED_PRECS = 990
_state: dict[str, Any] = {}


def _jit() -> Any | None:
    """The compiled kernels (after arb_kernels has loaded libflint and checked the layout),
    checked once against exact rationals; None where that fails."""
    if "ok" not in _state:
        _state["ok"] = False
        if arb_kernels.available():
            try:
                from fpgrad.arith import jit_arb_slices
            except (ImportError, OSError, RuntimeError):
                return None
            _state["jit"] = jit_arb_slices
            _state["ok"] = _self_check(jit_arb_slices)
    return _state["jit"] if _state["ok"] else None


def _read(a: np.ndarray, jit: Any) -> tuple[np.ndarray, ...] | None:
    ptrs, held = arb_kernels._addresses(a)
    n = ptrs.size
    mexp, nl, limbs, low = (np.empty(n, np.int64) for _ in range(4))
    rman, rexp = np.empty(n, np.int64), np.empty(n, np.int64)
    neg = np.empty(n, np.bool_)
    status = jit.scan(
        ptrs, arb_kernels._state["off"], id(arb), mexp, nl, limbs, neg, low, rman, rexp
    )
    if status:
        return None
    return held, mexp, nl, limbs, neg, low, rman, rexp


@lru_cache(maxsize=256)
def _up(x: Fraction) -> tuple[float, int]:
    """(f, k) with ``f 2**k >= x`` (f a float64 in [0.5, 1] or 0)."""
    if x <= 0:
        return 0.0, 0
    k = x.numerator.bit_length() - x.denominator.bit_length() + 1  # x < 2**k
    scaled = x / Fraction(2) ** k
    f = float(scaled)
    if Fraction(f) < scaled:
        f = math.nextafter(f, math.inf)
    return f, k


def plan(n: int, prec: int, wa: int, wb: int) -> tuple[int, int, int, int, Fraction] | None:
    """(beta, Ta, Tb, S, eps): slice width, slices of A and B, last diagonal and the bound of
    the cut remainders and dropped diagonals per term, in units of ``2**(ea+eb)``. ``wa`` (``wb``):
    the bits below the scale that A's (B's) midpoints reach (0: all zero). None where no
    slice width of at least 8 bits keeps the products exact."""
    clamp = prec + GUARD + 28  # above this, wa and wb cut to the cap for every width
    return _plan(n, prec, min(wa, clamp), min(wb, clamp))


@lru_cache(maxsize=256)
def _plan(n: int, prec: int, wa: int, wb: int) -> tuple[int, int, int, int, Fraction] | None:
    for beta in range(26, 7, -1):
        cap = -(-(prec + GUARD + 2) // beta)
        ta = min(cap, -(-wa // beta))
        tb = min(cap, -(-wb // beta))
        if n * max(1, min(ta, tb)) * (2**beta - 1) ** 2 < 2**53:
            break
    else:
        return None
    if ta == 0 or tb == 0:
        return beta, ta, tb, 0, Fraction(0)
    # integers in units of 2**-(beta (ta + tb)): 2**-(beta t) is 2**(beta (ta + tb - t))
    full = ta + tb

    def unit(t: int) -> int:
        return 1 << (beta * (full - t))

    cut = (0 if wa <= ta * beta else unit(ta)) + (0 if wb <= tb * beta else unit(tb))
    target = Fraction(1, 2 ** (prec + GUARD)) * (1 << (beta * full))
    dropped = 0
    last = full - 2
    while last > 0:  # drop diagonals from the end while the bound allows
        more = dropped + (min(last, ta - 1) - max(0, last - tb + 1) + 1) * unit(last)
        if cut + more > target:
            break
        dropped = more
        last -= 1
    return beta, ta, tb, last, Fraction(cut + dropped, 1 << (beta * full))


def usable(a: Any, b: Any, prec: int) -> bool:
    """Does :func:`matmul` take ``a @ b`` at ``prec`` bits: 2-D object arrays of matching
    shapes, from :data:`MIN_PREC` bits (it may still decline: None)?"""
    objects = arb_kernels._objects
    return prec >= MIN_PREC and objects(a) and objects(b) and a.shape[1] == b.shape[0]


def matmul(a: np.ndarray, b: np.ndarray, prec: int) -> np.ndarray | None:
    """``a @ b`` (2-D object arrays of arb balls, n >= 1) as enclosing balls at ``prec``
    bits, or None where this engine declines (see the module docstring)."""
    jit = _jit()
    return None if jit is None else _product(a, b, prec, jit)


def _product(
    a: np.ndarray, b: np.ndarray, prec: int, jit: Any, choose: bool = True
) -> np.ndarray | None:
    if not (arb_kernels._objects(a) and arb_kernels._objects(b)):
        raise TypeError("arb_slices: 2-D object arrays of arb balls only")
    m, n = a.shape
    p = b.shape[1]
    if b.shape[0] != n or prec < 2:  # checked before the kernels read n * p of b's pointers
        raise ValueError(f"arb_slices: {a.shape} @ {b.shape} at {prec} bits")
    ra = _read(a, jit)
    rb = _read(b, jit)
    if ra is None or rb is None:
        return None
    _, mexp_a, nl_a, limbs_a, neg_a, low_a, rman_a, rexp_a = ra
    _, mexp_b, nl_b, limbs_b, neg_b, low_b, rman_b, rexp_b = rb
    ea, ka, sa = np.empty(m, np.int64), np.empty(m, np.int64), np.empty(m * n, np.int64)
    eb, kb, sb = np.empty(p, np.int64), np.empty(p, np.int64), np.empty(n * p, np.int64)
    rad_a, nz_a, rad_b, nz_b = np.empty(m * n), np.empty(m * n), np.empty(n * p), np.empty(n * p)
    wa, has_a, fl_a, rmin_a = jit.prepare(
        mexp_a, low_a, rman_a, rexp_a, n, True, ea, sa, ka, rad_a, nz_a
    )
    wb, has_b, fl_b, rmin_b = jit.prepare(
        mexp_b, low_b, rman_b, rexp_b, p, False, eb, sb, kb, rad_b, nz_b
    )
    pl = plan(n, prec, wa, wb)
    if pl is None:
        return None
    beta, ta, tb, last, eps = pl
    if choose and min(ta, tb) > 1 and not FULL_PRECS[0] <= prec <= FULL_PRECS[1]:
        return None  # arb_dot is as fast or faster here
    acat = np.empty((m, ta, n))  # acat[i, t, k]: slice t of a_ik; rows (m, ta n) in BLAS
    al_a = np.empty(m * n)
    cut_a = jit.cut(mexp_a, nl_a, limbs_a, neg_a, sa, beta, acat, False, al_a)
    brev = np.empty((tb, n, p))  # brev[tb - 1 - t, k, j]: slice t of b_kj
    al_b = np.empty(n * p)
    cut_b = jit.cut(mexp_b, nl_b, limbs_b, neg_b, sb, beta, brev.reshape(tb, 1, n * p), True, al_b)
    if (fl_a or fl_b or cut_a[0] or cut_b[0]) and prec + GUARD > FLOORED_PRECS:
        return None  # a floor's bump could pass 2**-(prec+GUARD) of the scales: arb_dot's
    diag = np.zeros((last + 1, m, p))
    if ta and tb:
        rows = acat.reshape(m, ta * n)
        for s in range(last + 1):
            lo, hi = max(0, s - tb + 1), min(s, ta - 1)
            # slices lo..hi of A's rows side by side: a view with a row stride, no copy
            left = rows[:, lo * n : (hi + 1) * n]
            np.matmul(left, brev[tb - 1 - s + lo : tb - s + hi].reshape(-1, p), out=diag[s])
    pairs = None
    if eps:  # the terms whose midpoints are both non-zero: N_ij (exact small integers)
        pairs = nz_a.reshape(m, n) @ nz_b.reshape(n, p)
    err_f, err_e = _errors(
        (al_a.reshape(m, n), cut_a[1]), (al_b.reshape(n, p), cut_b[1]),
        (rad_a.reshape(m, n), ka[:, None], rmin_a) if has_a else None,
        (rad_b.reshape(n, p), kb[None, :], rmin_b) if has_b else None, pairs, _up(eps), jit,
    )  # fmt: skip
    out = arb_kernels.fresh((m, p))
    po, ho = arb_kernels._addresses(out)
    words = np.zeros((last * beta + 56) // 64 + 2, dtype=np.uint64)
    done = jit.assemble(
        diag, ea, eb, beta, err_f, err_e, po, prec,
        arb_kernels._state["off"], id(arb), np.zeros(1, np.int64),
        np.zeros(last + 1, np.int64), words,
    )  # fmt: skip
    del ra, rb, ho  # the operands and the result lived through the kernels
    return out if done else None


def _errors(
    al_a: tuple[np.ndarray, float], al_b: tuple[np.ndarray, float],
    rad_a: tuple[np.ndarray, np.ndarray, float] | None,
    rad_b: tuple[np.ndarray, np.ndarray, float] | None, pairs: np.ndarray | None,
    eps: tuple[float, int], jit: Any,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(f, E): every result's radius bound is at most ``f 2**(E + ea + eb)`` elementwise:
    ``|mid A| rad B + rad A |mid B| + rad A rad B`` (the radii ``rho 2**K`` with K per row of
    A, per column of B) and ``eps N`` (``pairs`` N: the terms whose midpoints are both
    non-zero, the only ones cut or dropped), each relative to the scales. Each operand comes
    with its least positive entry."""
    aa, bb = al_a[0], al_b[0]
    shape = (aa.shape[0], bb.shape[1])
    n = aa.shape[1]
    gamma = 1.0 + (n + 4) * 2.0**-52

    def upper(p: tuple[np.ndarray, float], q: tuple[np.ndarray, float]) -> np.ndarray:
        # non-negative operands, every positive one a normal float64 <= 1: BLAS errs by at
        # most gamma - 1 of the result unless a term can fall below 2**-1020, where each of
        # the n products and additions may also lose 2**-1075 (ball._nonneg_matmul)
        out = (p[0] @ q[0]) * gamma
        if p[1] * q[1] < 2.0**-1020:
            terms = (p[0] > 0).astype(np.float64) @ (q[0] > 0).astype(np.float64)
            out += np.where(terms > 0, n * 2.0**-1074, 0.0)
        return out

    terms: list[tuple[np.ndarray, np.ndarray | int]] = []
    if rad_b is not None:
        rb, kb, rbmin = rad_b
        terms.append((upper(al_a, (rb, rbmin)), kb))
    if rad_a is not None:
        ra, ka, ramin = rad_a
        terms.append((upper((ra, ramin), al_b), ka))
        if rad_b is not None:
            terms.append((upper((ra, ramin), (rb, rbmin)), ka + kb))
    f, k = eps  # eps <= f 2**k
    if f and pairs is not None:
        terms.append((pairs * f, k))  # exact: N < 2**53 times a float, rounded up below
    if not terms:
        return np.zeros(shape), np.zeros(shape, np.int64)
    ts = np.empty((len(terms), *shape))
    ks = np.empty((len(terms), *shape), np.int64)
    for i, (t, kt) in enumerate(terms):
        ts[i] = t
        ks[i] = kt
    f_out, e_out = np.empty(shape), np.empty(shape, np.int64)
    jit.combine(ts, ks, f_out, e_out)
    return f_out, e_out


def _self_check(jit: Any) -> bool:
    """Random products at three precisions: exact balls (short, long and zero midpoints, mixed
    exponents), the exact product of the midpoints inside each result; then balls with radii
    (the radii read from the balls' memory too), the extreme corners inside each result."""
    rng = np.random.default_rng(7)
    for prec, (m, n, p) in ((128, (3, 5, 4)), (467, (6, 9, 5)), (1600, (4, 3, 7))):
        a, b, fa, fb = _random_pair(rng, m, n, p, prec)
        got = _product(a, b, prec, jit, choose=False)
        if got is None:
            return False
        want = fa @ fb
        for i in range(m):
            for j in range(p):
                if not _contains(got[i, j], want[i, j]):
                    return False
    # radii of 2**-20 .. 2**-2 of the midpoints: a radius misread shows at a corner
    a = np.array(
        [[arb(k + 2, 2.0**-k) for k in range(3)], [arb(-3, 0.25), arb(1, 2**-20), arb(0.5)]]
    )
    b = np.array([[arb(1.5, 2.0**-5)], [arb(-2, 0.5)], [arb(7)]])
    got = _product(a.astype(object), b.astype(object), 200, jit, choose=False)
    if got is None:
        return False
    for i in range(2):
        lo = hi = Fraction(0)
        for k in range(3):  # the exact range of a sum of products of intervals
            ends = [
                x * y
                for x in (
                    _fraction(a[i, k]) - _radius(a[i, k]),
                    _fraction(a[i, k]) + _radius(a[i, k]),
                )
                for y in (
                    _fraction(b[k, 0]) - _radius(b[k, 0]),
                    _fraction(b[k, 0]) + _radius(b[k, 0]),
                )
            ]
            lo, hi = lo + min(ends), hi + max(ends)
        if not (_contains(got[i, 0], lo) and _contains(got[i, 0], hi)):
            return False
    return True


def _radius(x: arb) -> Fraction:
    return _fraction(arb(x.rad()))


def _fraction(x: arb) -> Fraction:
    man, exp = x.mid().man_exp()
    return Fraction(int(man)) * Fraction(2) ** int(exp)


def _contains(ball: arb, value: Fraction) -> bool:
    return abs(_fraction(ball) - value) <= _radius(ball)


def _random_pair(
    rng: np.random.Generator, m: int, n: int, p: int, prec: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact balls of ``prec``-bit midpoints (some short, some zero) and their rationals."""
    from flint import ctx

    old = ctx.prec
    ctx.prec = prec
    try:
        out = []
        for shape in ((m, n), (n, p)):
            vals = []
            for _ in range(shape[0] * shape[1]):
                kind = rng.integers(0, 4)
                if kind == 0:
                    vals.append(arb(0))
                elif kind == 1:
                    vals.append(arb(int(rng.integers(-16, 17))))
                else:
                    e = int(rng.integers(-40, 40))
                    vals.append(arb(float(rng.standard_normal())) * arb(2) ** e / 3)
            arr = np.empty(len(vals), dtype=object)
            arr[:] = [arb(v.mid()) for v in vals]
            out.append(arr.reshape(shape))
    finally:
        ctx.prec = old
    fa = np.array([[_fraction(x) for x in row] for row in out[0]], dtype=object)
    fb = np.array([[_fraction(x) for x in row] for row in out[1]], dtype=object)
    return out[0], out[1], fa, fb
