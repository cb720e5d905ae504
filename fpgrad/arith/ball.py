"""The fast exact reference: multi-word balls (midpoint in k float64 words, radius in float64).

A :class:`Ball` holds, for every element, a midpoint as an unevaluated sum of k float64 words
(:mod:`fpgrad.arith.expansion`) and a float64 radius that bounds the distance from the
midpoint to the exact value. Every operation computes the new midpoint in multi-word
arithmetic and the new radius from the old radii (Lipschitz bounds of the operation) plus a
bound on its own rounding error, all rounded upward by a small inflation factor. So a value's
certified precision is read off its own ball: nothing is assumed, and no second evaluation is
needed.

Matrix products are error-free slice products (:mod:`fpgrad.arith.ozaki`) truncated at the
working precision, with a rigorous bound on what was dropped; radii propagate through
``|A| rB + rA |B| + rA rB`` in float64 BLAS, inflated by the BLAS error bound.

Limits, counted instead of guessed: a value whose magnitude leaves [2**-800, 2**800] (or that
underflows to zero) increments :attr:`BallArith.range_errors`; a comparison (ReLU mask)
whose ball contains zero increments :attr:`BallArith.uncertain_branches`. A run with either
count non-zero is not certified by this system (:mod:`fpgrad.exact` falls back to mpmath).

The per-operation error constants (:data:`fpgrad.arith.expansion.ETA` and ``eta_fn`` for the
elementary functions) are tested against mpmath with a margin of at least 2**3
(tests/test_fast_exact.py); they are not machine-checked proofs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.arith import elementary as el
from fpgrad.arith import expansion as xp
from fpgrad.arith import ozaki

RU = 1.0 + 2.0**-45  # upward inflation of radius formulas (a few float64 roundings)
HI_BOUND = 1.0 + 2.0**-48  # |value| <= |word 0| * HI_BOUND for the expansions used here
RANGE = (2.0**-800, 2.0**800)

# working precisions the fast path offers: bits -> words
LEVELS = {100: 2, 150: 3}
MAX_BITS = 150
# error bound of the elementary functions per word count: measured worst cases are 2**-98
# (k=2) and 2**-150 (k=3) in tests/test_fast_exact.py, which checks them with a margin of 8
ETA_FN = {2: 2.0**-92, 3: 2.0**-146}


class Ball:
    """Multi-word midpoints ``mid`` (k, *shape) and float64 radii ``rad`` (shape)."""

    __slots__ = ("mid", "rad")

    def __init__(self, mid: np.ndarray, rad: np.ndarray) -> None:
        self.mid = mid
        self.rad = rad

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rad.shape

    @property
    def size(self) -> int:
        return int(self.rad.size)

    @property
    def ndim(self) -> int:
        return self.rad.ndim

    @property
    def T(self) -> Ball:  # noqa: N802 - numpy's name
        return Ball(np.swapaxes(self.mid, -1, -2) if self.ndim >= 2 else self.mid, self.rad.T)

    def __getitem__(self, idx: Any) -> Ball:
        idx = idx if isinstance(idx, tuple) else (idx,)
        return Ball(self.mid[(slice(None), *idx)], self.rad[idx])

    def __len__(self) -> int:
        return self.shape[0]

    def words(self) -> list[np.ndarray]:
        return list(self.mid)

    def __repr__(self) -> str:
        return f"Ball(shape={self.shape}, words={self.mid.shape[0]})"


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


class BallArith:
    """Balls with k-word midpoints at a working precision of ``bits`` (100: k=2; 128, 150: k=3)."""

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
        # slice products: bits below max|a| max|b| n; at 150 bits the elementwise error, not the
        # product truncation, limits what certifies (measured), so the products stop earlier
        self.mm_prec = bits + 8 if self.k == 2 else bits - 20
        self.range_errors = 0
        self.uncertain_branches = 0
        self._tanh_cache: dict[int, tuple[Ball, np.ndarray, np.ndarray]] = {}
        self._sig_cache: dict[int, tuple[Ball, np.ndarray, np.ndarray]] = {}
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

    def _fn_rad(self, mid: np.ndarray, prop: np.ndarray) -> np.ndarray:
        """Propagated radius plus the function's own error, rounded up."""
        return (prop + self.eta_fn * np.abs(mid[0])) * RU

    # ---- arithmetic ---------------------------------------------------------------------
    def add(self, a: Ball, b: Ball) -> Ball:
        mid = xp.add(a.words(), b.words(), self.k)
        rad = (a.rad + b.rad + self.eta * (np.abs(a.mid[0]) + np.abs(b.mid[0]))) * RU
        return self._ball(mid, rad)

    def sub(self, a: Ball, b: Ball) -> Ball:
        mid = xp.add(a.words(), [-w for w in b.mid], self.k)
        rad = (a.rad + b.rad + self.eta * (np.abs(a.mid[0]) + np.abs(b.mid[0]))) * RU
        return self._ball(mid, rad)

    def mul(self, a: Ball, b: Ball) -> Ball:
        mid = xp.mul(a.words(), b.words(), self.k)
        a0, b0 = np.abs(a.mid[0]), np.abs(b.mid[0])
        rad = (
            (a0 * b.rad + b0 * a.rad) * HI_BOUND + a.rad * b.rad + self.eta * np.abs(mid[0])
        ) * RU
        lost = (a0 > 0) & (b0 > 0) & (mid[0] == 0)
        if lost.any():
            self.range_errors += int(lost.sum())
        return self._ball(mid, rad)

    def div(self, a: Ball, b: Ball) -> Ball:
        mid = xp.div(a.words(), b.words(), self.k)
        q0 = np.abs(mid[0])
        den = np.abs(b.mid[0]) / HI_BOUND - b.rad
        with np.errstate(divide="ignore", invalid="ignore"):
            prop = np.where(den > 0, (a.rad + q0 * HI_BOUND * b.rad) / den, np.inf)
        prop = np.where((a.rad == 0) & (b.rad == 0), 0.0, prop)
        rad = (prop * RU + self.eta * q0) * RU
        lost = (a.mid[0] != 0) & (mid[0] == 0)
        if lost.any():
            self.range_errors += int(lost.sum())
        return self._ball(mid, rad)

    def matmul(self, a: Ball, b: Ball) -> Ball:
        """a @ b, computed when first used."""
        return _LazyBall(lambda: self._matmul(a, b), (a.shape[0], b.shape[1]))

    def _matmul(self, a: Ball, b: Ball) -> Ball:
        am, bm = a.mid, b.mid
        n = a.shape[-1]
        levels, bound, risk = ozaki.matmul_levels(am, bm, self.mm_prec, 8 * self.eta)
        if risk:
            self.range_errors += 1
        mid = xp.renorm(levels, self.k) if levels else np.zeros((self.k, a.shape[0], b.shape[1]))
        rad = bound  # includes the rounding of the levels into k words (normwise, see ozaki)
        gamma = 1.0 + (n + 8) * 2.0**-52  # float64 BLAS error on non-negative data
        if b.rad.any():
            rad = rad + ((np.abs(am[0]) * HI_BOUND + a.rad) @ b.rad) * gamma
        if a.rad.any():
            rad = rad + (a.rad @ (np.abs(bm[0]) * HI_BOUND)) * gamma
        out = self._ball(mid, rad * RU)
        if self.progress is not None:
            self.progress("matmul")
        return out

    def sum(self, a: Ball, axis: int, keepdims: bool = False) -> Ball:
        axis = axis % a.ndim
        w = np.moveaxis(a.mid, axis + 1, -1)
        n = w.shape[-1]
        depth = 0
        while w.shape[-1] > 1:
            m = w.shape[-1]
            h = m // 2
            s = xp.add(list(w[..., :h]), list(w[..., h : 2 * h]), self.k)
            w = np.concatenate([s, w[..., 2 * h :]], axis=-1) if m % 2 else s
            depth += 1
        mid = w[..., 0]
        mags = np.sum(np.abs(a.mid[0]), axis=axis)
        rad = (np.sum(a.rad, axis=axis) * (1 + (n + 2) * 2.0**-52) + depth * self.eta * mags) * RU
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
        if not keepdims:
            mid = np.squeeze(mid, axis + 1)
            rad = np.squeeze(rad, axis)
        return Ball(mid, rad)

    # ---- elementary functions ---------------------------------------------------------------
    def exp(self, a: Ball) -> Ball:
        out = np.abs(a.mid[0]) > el.EXP_DOMAIN
        self._domain(out)
        x = a.mid
        if out.any():  # flagged above; keep the words finite and in the table's range
            x = np.where(out, 0.0, x)
        mid = el.exp(x, self.k, self.bits)
        return self._ball(mid, self._fn_rad(mid, np.abs(mid[0]) * HI_BOUND * np.expm1(a.rad) * RU))

    def log(self, a: Ball) -> Ball:
        a0 = a.mid[0]
        bad = ~(a0 > 0)
        self._domain(bad)
        mid = el.log(np.where(bad, 1.0, a.mid), self.k, self.bits)
        den = a0 / HI_BOUND - a.rad
        with np.errstate(divide="ignore", invalid="ignore"):
            prop = np.where(den > 0, a.rad / den, np.inf)
        # Newton's correction x exp(-y) - 1 is accurate in absolute terms: error ~ eta (|log| + 1)
        return self._ball(mid, (prop + self.eta_fn * (np.abs(mid[0]) + 1.0)) * RU)

    def _tanh_parts(self, z: Ball) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hit = self._tanh_cache.get(id(z))
        if hit is not None and hit[0] is z:
            return hit[1], hit[2], hit[3]  # type: ignore[misc]
        t, e, d = el.tanh_parts(z.mid, self.k, self.bits)
        self._tanh_cache[id(z)] = (z, t, e, d)  # type: ignore[assignment]
        return t, e, d

    def tanh(self, a: Ball) -> Ball:
        t, _, _ = self._tanh_parts(a)
        slope = np.minimum(1.0, 4.0 * np.exp(-2.0 * np.maximum(np.abs(a.mid[0]) - a.rad, 0.0)))
        return self._ball(t, self._fn_rad(t, a.rad * slope * RU))

    def tanh_deriv(self, z: Ball, t: Ball) -> Ball:
        self._domain(np.abs(z.mid[0]) > el.EXP_DOMAIN / 2)
        _, e, d = self._tanh_parts(z)
        mid = el.sech2(e, d, self.k)
        # |d sech^2 / dz| <= 2 sech^2: relative change at most expm1(2 r)
        return self._ball(
            mid, self._fn_rad(mid, np.abs(mid[0]) * HI_BOUND * np.expm1(2 * z.rad) * RU)
        )

    def _sigmoid_parts(self, z: Ball) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        hit = self._sig_cache.get(id(z))
        if hit is not None and hit[0] is z:
            return hit[1], hit[2], hit[3]  # type: ignore[misc]
        s, e, d = el.sigmoid_parts(z.mid, self.k, self.bits)
        self._sig_cache[id(z)] = (z, s, e, d)  # type: ignore[assignment]
        return s, e, d

    def sigmoid(self, a: Ball) -> Ball:
        self._domain(a.mid[0] < -el.EXP_DOMAIN)
        s, _, _ = self._sigmoid_parts(a)
        prop = np.minimum(a.rad / 4, np.abs(s[0]) * HI_BOUND * np.expm1(a.rad)) * RU
        return self._ball(s, self._fn_rad(s, prop))

    def sigmoid_deriv(self, z: Ball, s: Ball) -> Ball:
        self._domain(np.abs(z.mid[0]) > el.EXP_DOMAIN)
        _, e, d = self._sigmoid_parts(z)
        mid = xp.mul(e, xp.mul(d, d, self.k), self.k)  # s(z) s(-z) = E / (1 + E)^2 = E R^2
        return self._ball(mid, self._fn_rad(mid, np.abs(mid[0]) * HI_BOUND * np.expm1(z.rad) * RU))

    def sqrt(self, a: Ball) -> Ball:
        a0 = a.mid[0]
        self._domain(a0 < 0)
        mid = xp.sqrt(np.where(a0 < 0, 0.0, a.mid), self.k)
        lo = a0 / HI_BOUND - a.rad
        with np.errstate(divide="ignore", invalid="ignore"):
            prop = np.where(
                lo > 0,
                a.rad / (np.sqrt(lo) + np.sqrt(lo)),
                np.sqrt(np.maximum(a0, 0) * HI_BOUND + a.rad),
            )
        prop = np.where(a.rad == 0, 0.0, prop)
        return self._ball(mid, self._fn_rad(mid, prop))

    def abs(self, a: Ball) -> Ball:
        return Ball(np.where(a.mid[0] < 0, -a.mid, a.mid), a.rad)

    def positive(self, a: Ball) -> np.ndarray:
        a0 = a.mid[0]
        unsure = (a.rad > 0) & (np.abs(a0) / HI_BOUND <= a.rad)
        if unsure.any():
            self.uncertain_branches += int(unsure.sum())
        return a0 > 0

    def where(self, mask: np.ndarray, a: Ball, b: Ball) -> Ball:
        return Ball(np.where(mask, a.mid, b.mid), np.where(mask, a.rad, b.rad))

    def to_float64(self, a: Ball) -> np.ndarray:
        return xp.hi_lo(a.mid)[0]

    # ---- loss derivatives without cancellation --------------------------------------------
    def xent_grad(self, e: Ball, total: Ball, t: np.ndarray) -> Ball:
        p = self.div(e, total)
        out = self.sub(self.mul(p, self.asarray(t.sum(axis=1, keepdims=True))), self.asarray(t))
        nz = t != 0
        hot = (nz.sum(axis=1) == 1) & (np.where(nz, t, 0).sum(axis=1) == 1.0)
        if hot.any():  # one-hot rows: p_k - 1 = -sum_{j != k} p_j
            others = self.sum(
                self.mul(e, self.asarray((~nz).astype(np.float64))), axis=1, keepdims=True
            )
            comp = self.div(others, total)
            rows = np.flatnonzero(hot)
            cols = np.argmax(nz[rows], axis=1)
            out.mid[:, rows, cols] = -comp.mid[:, rows, 0]
            out.rad[rows, cols] = comp.rad[rows, 0]
        return out

    def bce_grad(self, z: Ball, t: np.ndarray) -> Ball:
        out = self.sub(self.sigmoid(z), self.asarray(t))
        ones = t == 1.0
        if ones.any():  # sigmoid(z) - 1 = -sigmoid(-z)
            neg = self.sigmoid(Ball(-z.mid, z.rad))
            out.mid[:, ones] = -neg.mid[:, ones]
            out.rad[ones] = neg.rad[ones]
        return out

    # ---- helpers ------------------------------------------------------------------------------
    def _domain(self, bad: np.ndarray) -> None:
        if np.any(bad):
            self.range_errors += int(np.sum(bad))
