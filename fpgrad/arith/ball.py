"""The fast exact reference: multi-word balls (midpoint in k float64 words, radius in float64).

A :class:`Ball` holds, for every element, a midpoint as an unevaluated sum of k float64 words
(:mod:`fpgrad.arith.expansion`) and a float64 radius that bounds the distance from the
midpoint to the exact value. Every operation computes the new midpoint in multi-word
arithmetic and the new radius from the old radii (Lipschitz bounds of the operation) plus a
bound on its own rounding error, all rounded upward by a small inflation factor. So a value's
certified precision is read off its own ball: nothing is assumed, and no second evaluation is
needed.

Matrix products are exact slice products (:mod:`fpgrad.arith.ozaki`) down to the working
precision plus one float64 product of the rest, with a rigorous bound on its rounding;
radii propagate through ``(|A| + rA) rB + rA |B|``, upper bounds from float32 GEMMs
(:mod:`fpgrad.arith.radius`; float64 BLAS, inflated by its error bound, outside their range).

Elementwise operations, sums, the slicing and the renormalisation run in compiled kernels
(:mod:`fpgrad.arith.jit_ball`, :mod:`fpgrad.arith.jit_elementary`; numba, compiled on first
use and cached on disk): one pass per operation for midpoint, radius and range guard, with
the same words as the numpy kernels of :mod:`fpgrad.arith.expansion` and
:mod:`fpgrad.arith.elementary` (tested bit for bit).

Limits, counted instead of guessed: a value whose magnitude leaves [2**-800, 2**800] (or that
underflows to zero) increments :attr:`BallArith.range_errors`; a comparison (ReLU mask)
whose ball contains zero increments :attr:`BallArith.uncertain_branches`. A run with either
count non-zero is not certified by this system (:mod:`fpgrad.reference.exact` falls back to Arb balls).

The per-operation error constants (:data:`fpgrad.arith.expansion.ETA` and ``eta_fn`` for the
elementary functions) are tested against mpmath with a margin of at least 2**3
(tests/test_fast_exact.py); they are not machine-checked proofs.

The ball value (:class:`Ball`, the constants ``RU``, ``HI_BOUND``, ``RANGE``) lives in
:mod:`fpgrad.arith.ball_base`, the elementary functions in :mod:`fpgrad.arith.ball_functions`;
both are imported here, so ``from fpgrad.arith.ball import Ball, HI_BOUND, ...`` keeps working.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.arith import crt, ozaki, products, radius
from fpgrad.arith import expansion as xp
from fpgrad.arith.ball_base import HI_BOUND, RANGE, RU, Ball, _jit, _words_tag, exact_zeros
from fpgrad.arith.ball_functions import ETA_FN, BallFunctions
from fpgrad.arith.base import ExactDerivatives

# working precisions the fast path offers: bits -> words
LEVELS = {100: 2, 150: 3}
MAX_BITS = 150


def _keep_freed_memory() -> None:
    """Ask glibc to recycle freed arrays instead of unmapping them (once per process).

    Multi-word arithmetic makes many short-lived temporaries of a few hundred KiB; by default
    each is a fresh mmap and costs a page fault per 4 KiB, which makes numpy 3-5x slower here.
    A larger mmap threshold keeps them in the heap; the trim threshold bounds what is kept.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 2**20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


_MALLOC_TUNED = False


def _grid(shape: tuple[int, ...], out: tuple[int, ...]) -> tuple[int, int] | None:
    """(rows, cols) of an operand of ``shape`` broadcast to the 2-D view of ``out``, or None."""
    if len(out) > 2:
        return None
    pad = (1,) * (2 - len(shape)) + tuple(shape)
    full = (1,) * (2 - len(out)) + tuple(out)
    if any(s not in (1, f) for s, f in zip(pad, full, strict=True)):
        return None
    return pad[0], pad[1]


def _prove_zeros(a: Ball, b: Ball, mid: np.ndarray, rad: np.ndarray) -> None:
    """Set ``rad`` (of ``a @ b``, midpoint ``mid``) to 0 where every term has an exact-zero factor.

    There ``a_ik b_kj`` is exactly 0 for every k (a proven zero times anything), so the product
    is exactly 0; the product's error bound, a row-times-column norm, does not see it. Decided
    by a float32 product of the supports (1 where an element is not a proven zero): a sum of
    non-negative numbers, zero exactly when every product is. Only elements whose midpoint is
    already 0 with a positive radius are looked at; their midpoint words are exact sums of
    exact zeros, so 0 already.
    """
    cand = (mid[0] == 0) & (rad > 0)
    if not cand.any():
        return
    rows, cols = np.flatnonzero(cand.any(axis=1)), np.flatnonzero(cand.any(axis=0))
    live_a = ~exact_zeros(Ball(a.mid[:, rows], np.asarray(a.rad)[rows]))
    live_b = ~exact_zeros(Ball(b.mid[:, :, cols], np.asarray(b.rad)[:, cols]))
    support = live_a.astype(np.float32) @ live_b.astype(np.float32)  # BLAS: no subtraction
    dead = (support == 0) & cand[np.ix_(rows, cols)]
    if dead.any():
        r, c = np.nonzero(dead)
        assert not mid[:, rows[r], cols[c]].any(), "a sum of exact zeros is 0"
        rad[rows[r], cols[c]] = 0.0


class _LazyBall(Ball):
    """A matrix product computed on first use (the input gradient of the first layer never is)."""

    __slots__ = ("_thunk", "_shape")

    def __init__(self, thunk: Any, shape: tuple[int, ...]) -> None:
        self._thunk = thunk
        self._shape = shape

    def _force(self) -> None:
        if self._thunk is not None:
            out = self._thunk()
            self._thunk = None
            Ball.mid.__set__(self, out.mid)  # type: ignore[attr-defined]
            Ball.rad.__set__(self, out.rad)  # type: ignore[attr-defined]

    @property  # type: ignore[override]
    def mid(self) -> np.ndarray:
        self._force()
        return Ball.mid.__get__(self)  # type: ignore[attr-defined]

    @property  # type: ignore[override]
    def rad(self) -> np.ndarray:
        self._force()
        return Ball.rad.__get__(self)  # type: ignore[attr-defined]

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def size(self) -> int:
        return int(np.prod(self._shape))

    @property
    def ndim(self) -> int:
        return len(self._shape)


def _nonneg_matmul(p: np.ndarray, q: np.ndarray, gamma: float) -> np.ndarray:
    """An upper bound of ``p @ q`` for non-negative float64 ``p`` (m, n), ``q`` (n, p): the
    BLAS product times ``gamma`` (its relative error) where no term is below 2**-1020, else
    also ``n 2**-1074`` wherever some term ``p_ik q_kj`` is positive: each of the n products
    and n - 1 additions (or n fused multiply-adds) in the subnormal range errs by at most
    2**-1075 absolutely, which no relative factor covers (2**-600 times 2**-600 gives 0)."""
    out = (p @ q) * gamma
    pp, qq = p[p > 0], q[q > 0]
    if pp.size and qq.size and float(pp.min()) * float(qq.min()) < 2.0**-1020:
        terms = (p > 0).astype(np.float64) @ (q > 0).astype(np.float64)  # exact counts
        out += np.where(terms > 0, q.shape[0] * 2.0**-1074, 0.0)
    return out


class BallArith(BallFunctions, ExactDerivatives):
    """Balls with k-word midpoints at a working precision of ``bits`` (100: k=2; 128, 150: k=3)."""

    exact = True  #: an exact reference: structural identities and cancellation-free forms

    def __init__(self, bits: int = MAX_BITS) -> None:
        _keep_freed_memory()
        if bits not in LEVELS:
            raise ValueError(
                f"fast exact precision {bits} not offered; choose one of {sorted(LEVELS)}"
            )
        self.bits = bits
        self.k = LEVELS[bits]
        self.name = f"ball@{bits}"
        self.eta = xp.ETA[self.k]  # basic operations
        self.eta_fn = ETA_FN[self.k]  # exp, log, tanh, sigmoid, sqrt (tested with margin)
        # products err below 2**-mm_prec n max|a row| max|b col| (ozaki.exact_levels); at 150
        # bits the elementwise error limits what certifies about as much as the products
        # (measured), so they stop earlier: 2**-135 (inner dimension 256: 5 exact levels of
        # 22 bits and a float64 tail, 2**-149; 64: 5 levels of 23 bits, 10: 4 of 24)
        self.mm_prec = bits + 8 if self.k == 2 else bits - 17
        self.range_errors = 0
        self.uncertain_branches = 0
        self._tanh_cache: dict[int, tuple[Ball, tuple[Ball, Ball, int, int]]] = {}
        self._sig_cache: dict[int, tuple[Ball, tuple[Ball, Ball, int, int]]] = {}
        self._ncdf_cache: dict[int, tuple[Ball, Ball]] = {}
        self.progress: Any = None  # optional callable(str) called after each matrix product

    # ---- construction and bookkeeping ---------------------------------------------------
    def asarray(self, x: np.ndarray | Ball) -> Ball:
        if isinstance(x, Ball):  # already exact (e.g. parameters updated in exact arithmetic)
            return x
        x = np.asarray(x, dtype=np.float64)
        self._guard(x[None])
        return Ball(xp.from_float(x, self.k), np.zeros(x.shape))

    def const(self, value: float) -> Ball:
        return self.asarray(np.asarray(float(value)))

    def _guard(self, mid: np.ndarray) -> None:
        a = np.abs(mid[0])
        bad = ~(a <= RANGE[1]) | ((a < RANGE[0]) & (a > 0))
        if bad.any():
            self.range_errors += int(bad.sum())

    def _ball(self, mid: np.ndarray, rad: np.ndarray) -> Ball:
        self._guard(mid)
        return Ball(mid, np.asarray(rad, dtype=np.float64))

    # ---- arithmetic ---------------------------------------------------------------------
    def _binop(self, op: int, a: Ball, b: Ball) -> Ball:
        """One compiled pass: words, radius (formulas in jit_ball.binop) and range guard."""
        jb, _ = _jit()
        k = self.k
        shape = np.broadcast_shapes(a.shape, b.shape)
        out_m = np.empty((k, *shape))
        out_r = np.empty(shape)
        full = (1,) * (2 - len(shape)) + shape if len(shape) <= 2 else (1, out_r.size)
        args = []
        for x in (a, b):
            grid = _grid(x.shape, shape)
            mid, rad = x.mid, np.asarray(x.rad, dtype=np.float64)
            if grid is None:  # more than two axes: broadcast in memory
                mid = mid.reshape(k, *(1,) * (len(shape) - x.ndim), *x.shape)
                mid = np.broadcast_to(mid, (k, *shape)).reshape(k, *full)
                rad = np.broadcast_to(rad, shape).reshape(full)
                grid = full
            elif grid[1] != full[1]:  # broadcast along the columns: in memory
                mid = np.broadcast_to(mid.reshape(k, *grid), (k, grid[0], full[1]))
                rad = np.broadcast_to(rad.reshape(grid), (grid[0], full[1]))
                grid = (grid[0], full[1])
            args.append(np.ascontiguousarray(mid, dtype=np.float64).reshape(k, *grid))
            args.append(np.ascontiguousarray(rad).reshape(grid))
        bad = jb.binop(
            _words_tag(k), op, *args, self.eta, out_m.reshape(k, *full), out_r.reshape(full)
        )
        self.range_errors += int(bad)
        return Ball(out_m, out_r)

    def add(self, a: Ball, b: Ball) -> Ball:
        return self._binop(0, a, b)

    def sub(self, a: Ball, b: Ball) -> Ball:
        return self._binop(1, a, b)

    def mul(self, a: Ball, b: Ball) -> Ball:
        return self._binop(2, a, b)

    def div(self, a: Ball, b: Ball) -> Ball:
        return self._binop(3, a, b)

    def matmul(self, a: Ball, b: Ball) -> Ball:
        """a @ b, computed when first used."""
        return _LazyBall(lambda: self._matmul(a, b), (a.shape[0], b.shape[1]))

    def _matmul(self, a: Ball, b: Ball) -> Ball:
        jb, _ = _jit()
        am, bm = a.mid, b.mid
        m, n = a.shape
        # the slicing reads rows: compute (a b)^T = b^T a^T when that copies fewer transposes
        at, bt = am.transpose(0, 2, 1), bm.transpose(0, 2, 1)
        copies = am.size * (not am.flags.c_contiguous) + bm.size * (not bm.flags.c_contiguous)
        flip = (
            bm.size * (not bt.flags.c_contiguous) + am.size * (not at.flags.c_contiguous) < copies
        )
        left, right = (bt, at) if flip else (am, bm)  # (a b)^T = b^T a^T
        done = None
        if crt.applies(left.shape[1], n, right.shape[2]):  # int8 GEMMs (exact int_mm here)
            done = products.matmul_words(left, right, self.mm_prec, 8 * self.eta, self.k)
        if done is not None:  # the words of the renormalised terms, and the range count
            mid, bound, risk, flagged = done
            self.range_errors += flagged
        else:
            terms, bound, risk = ozaki.matmul_levels(left, right, self.mm_prec, 8 * self.eta)
            if len(terms):
                mid = np.empty((self.k, *terms.shape[1:]))
                tag = _words_tag(self.k)
                self.range_errors += jb.renorm(
                    tag, terms.reshape(len(terms), -1), mid.reshape(self.k, -1)
                )
            else:
                mid = np.zeros((self.k, *terms.shape[1:]))
        if risk:
            self.range_errors += 1
        if flip:
            mid, bound = np.ascontiguousarray(mid.transpose(0, 2, 1)), bound.T
        rad = bound  # includes the rounding of the terms into k words (normwise, see ozaki)
        gamma = 1.0 + (n + 8) * 2.0**-52  # float64 BLAS relative error, non-negative data
        if b.rad.any():  # float32 bounds (fpgrad.arith.radius), float64 out of their range
            up = radius.upper_matmul(am[0], a.rad, None, b.rad, rad)
            if up is None:
                up = rad + _nonneg_matmul(np.abs(am[0]) * HI_BOUND + a.rad, b.rad, gamma)
            rad = up
        if a.rad.any():
            up = radius.upper_matmul(None, a.rad, bm[0], None, rad)
            if up is None:
                up = rad + _nonneg_matmul(a.rad, np.abs(bm[0]) * HI_BOUND, gamma)
            rad = up
        rad = rad * RU
        _prove_zeros(a, b, mid, rad)
        out = Ball(mid, rad)  # range guarded by renorm
        if self.progress is not None:
            self.progress("matmul")
        return out

    def sum(self, a: Ball, axis: int, keepdims: bool = False) -> Ball:
        """Pairwise (tree) sum along ``axis``: ``depth`` roundings of ETA each per element.

        Radius: ``sum r_i + depth ETA sum |x_i|`` (level by level, the additions' operands add
        up to at most ``sum |x_i|``), from float64 totals enlarged by their own error bound.
        """
        jb, _ = _jit()
        axis = axis % a.ndim
        am, ar = a.mid, np.asarray(a.rad, dtype=np.float64)
        n = am.shape[axis + 1]
        fast = am.ndim == 3 and am.dtype == np.float64 and am.flags.c_contiguous
        if axis == 0 and n and fast and ar.flags.c_contiguous and am.shape[2] > 1:
            # the same floats as below in one pass, without the transposed copy (one column:
            # numpy sums it pairwise, not row by row)
            cols = am.shape[2]
            mid, mags, rsum = np.empty((self.k, cols)), np.empty(cols), np.empty(cols)
            jb.sum_rows(_words_tag(self.k), am, ar, mid, mags, rsum)
        else:
            w = np.moveaxis(am, axis + 1, -1)
            mid = np.empty((self.k, *w.shape[1:-1]))
            jb.sum_last(
                _words_tag(self.k),
                np.ascontiguousarray(w, dtype=np.float64).reshape(self.k, -1, n),
                mid.reshape(self.k, -1),
            )
            mags, rsum = np.sum(np.abs(am[0]), axis=axis), np.sum(ar, axis=axis)
        depth, m = 0, n
        while m > 1:
            m, depth = m // 2 + m % 2, depth + 1
        # rsum and mags are float64 totals of n non-negative terms (row after row, or numpy's
        # pairwise): each within (n - 1) 2**-53 / (1 - (n - 1) 2**-53) <= (n + 2) 2**-52 of
        # the exact total, below it at worst (1 and 4095 terms 0.99 2**-53 give 1), so both
        # take that factor; RU covers HI_BOUND (|x_i| <= |w0_i| HI_BOUND) and the roundings here
        grow = 1 + (n + 2) * 2.0**-52
        rad = (rsum * grow + depth * self.eta * (mags * grow)) * RU
        if keepdims:
            mid = np.expand_dims(mid, axis + 1)
            rad = np.expand_dims(rad, axis)
        return self._ball(mid, rad)

    def max(self, a: Ball, axis: int, keepdims: bool = False) -> Ball:
        axis = axis % a.ndim
        mask = np.ones(a.shape, dtype=bool)
        for i in range(self.k):  # lexicographic on the words: exact for canonical expansions
            w = np.where(mask, a.mid[i], -np.inf)
            top = np.max(w, axis=axis, keepdims=True)
            mask &= w == top
        first = np.argmax(mask, axis=axis)
        idx = np.expand_dims(first, axis)
        mid = np.take_along_axis(a.mid, idx[None], axis=axis + 1)
        rad = np.max(a.rad, axis=axis, keepdims=True)  # max is 1-Lipschitz in the sup norm
        if self.k > 1:  # words not canonical (a round-to-even tie): the order may be off
            excess = np.max(_excess_over(a.mid, mid), axis=axis, keepdims=True)
            rad = np.where(excess > 0, (rad + excess) * (1 + 2.0**-52), rad)
        if not keepdims:
            mid = np.squeeze(mid, axis + 1)
            rad = np.squeeze(rad, axis)
        return Ball(mid, rad)

    def abs(self, a: Ball) -> Ball:
        return Ball(np.where(a.mid[0] < 0, -a.mid, a.mid), a.rad)

    def positive(self, a: Ball) -> np.ndarray:
        a0 = a.mid[0]
        unsure = ~(a.rad <= 0) & ~(np.abs(a0) / HI_BOUND > a.rad)  # NaN radii: unsure
        if unsure.any():
            self.uncertain_branches += int(unsure.sum())
        return a0 > 0

    def where(self, mask: np.ndarray, a: Ball, b: Ball) -> Ball:
        return Ball(np.where(mask, a.mid, b.mid), np.where(mask, a.rad, b.rad))

    def to_float64(self, a: Ball) -> np.ndarray:
        return xp.hi_lo(a.mid)[0]

    # ---- helpers ------------------------------------------------------------------------------
    def _domain(self, bad: np.ndarray) -> None:
        if np.any(bad):
            self.range_errors += int(np.sum(bad))


def _excess_over(words: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """An upper bound of ``max(0, value(words) - value(chosen))`` per element (``chosen``
    broadcast along the reduced axis); exactly 0 where the words are equal.

    The lexicographic order of the words is the order of the values for canonical expansions
    (word 0 the nearest float to the value, and so on down), but an expansion whose word 0 came
    from a round-to-even tie can sit one unit of word 0 off, so :meth:`BallArith.max` may pick a
    midpoint below another one. The value difference is ``sum_w (a_w - c_w)`` exactly; each of
    the k float differences errs by at most 2**-53 of itself (or 2**-1075 when subnormal) and
    their rounded sum by ``(k - 1) 2**-53`` of the sum of magnitudes, so ``s + 2**-49 sum |d_w|
    + k 2**-1074`` bounds it for k <= 8 (the bound is then rounded up once more)."""
    d = words - chosen
    s = d.sum(axis=0)
    err = np.abs(d).sum(axis=0) * 2.0**-49 + words.shape[0] * 2.0**-1074
    ub = (s + err) * (1 + 2.0**-52)
    same = np.all(d == 0, axis=0)
    return np.where(same | ~(ub > 0), 0.0, ub)
