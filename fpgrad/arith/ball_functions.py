"""The elementary functions of :class:`fpgrad.arith.ball.BallArith` (exp, log, tanh, sigmoid and
their derivatives, log1p, the normal density and CDF, sqrt, expm1), each with its rigorous error bound.

:class:`BallFunctions` is a mixin: :class:`~fpgrad.arith.ball.BallArith` supplies the word
count ``k``, the error bound ``eta_fn``, the range-error count, the caches and the basic
operations it calls (declared below for the type checker only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fpgrad.arith import expansion as xp
from fpgrad.arith.ball_base import HI_BOUND, RU, Ball, _flat, _jit, _words_tag
from fpgrad.arith.jit_ball import TINY_PAD

# error bound of the elementary functions per word count: measured worst cases are 2**-98
# (k=2) and 2**-148.1 (k=3: tanh just above |z| = 2**-10, where E - 1 cancels ~9 bits; found
# by an adversarial review) in tests/test_fast_exact.py and tests/test_attack_findings.py,
# which check them with a margin of 8 (3 bits)
ETA_FN = {2: 2.0**-92, 3: 2.0**-144}


class BallFunctions:
    """Elementary functions of k-word balls, for :class:`fpgrad.arith.ball.BallArith`."""

    k: int
    eta_fn: float
    range_errors: int
    _tanh_cache: dict[int, tuple[Ball, tuple[Ball, Ball, int, int]]]
    _sig_cache: dict[int, tuple[Ball, tuple[Ball, Ball, int, int]]]
    _ncdf_cache: dict[int, tuple[Ball, Ball]]

    if TYPE_CHECKING:  # supplied by BallArith

        def const(self, value: float) -> Ball: ...
        def add(self, a: Ball, b: Ball) -> Ball: ...
        def mul(self, a: Ball, b: Ball) -> Ball: ...
        def div(self, a: Ball, b: Ball) -> Ball: ...
        def where(self, mask: np.ndarray, a: Ball, b: Ball) -> Ball: ...
        def _ball(self, mid: np.ndarray, rad: np.ndarray) -> Ball: ...
        def _domain(self, bad: np.ndarray) -> None: ...

    def _fn_rad(self, mid: np.ndarray, prop: np.ndarray) -> np.ndarray:
        """Propagated radius plus the function's own error, rounded up."""
        return (prop + self.eta_fn * np.abs(mid[0])) * RU

    # ---- compiled (jit_elementary) -----------------------------------------------------------
    def _unary(self, kernel: Any, a: Ball) -> Ball:
        _, je = _jit()
        mid, rad = _flat(a)
        out_m = np.empty((self.k, *a.shape))
        out_r = np.empty(a.shape)
        bad = kernel(
            _words_tag(self.k), mid, rad, self.eta_fn, je.tables(),
            out_m.reshape(self.k, -1), out_r.reshape(-1),
        )  # fmt: skip
        self.range_errors += int(bad)
        return Ball(out_m, out_r)

    def _pair(self, kernel: Any, cache: dict, z: Ball) -> tuple[Ball, Ball, int, int]:
        """(f z, f' z, range errors of each): one compiled pass, kept for the backward pass."""
        hit = cache.get(id(z))
        if hit is not None and hit[0] is z:
            return hit[1]  # type: ignore[no-any-return]
        _, je = _jit()
        mid, rad = _flat(z)
        fm, dm = np.empty((self.k, *z.shape)), np.empty((self.k, *z.shape))
        fr, dr = np.empty(z.shape), np.empty(z.shape)
        k = self.k
        bad_f, bad_d = kernel(
            _words_tag(k), mid, rad, self.eta_fn, je.tables(),
            fm.reshape(k, -1), fr.reshape(-1), dm.reshape(k, -1), dr.reshape(-1),
            np.empty(rad.size, dtype=np.uint8),
        )  # fmt: skip
        parts = (Ball(fm, fr), Ball(dm, dr), int(bad_f), int(bad_d))
        cache[id(z)] = (z, parts)
        return parts

    def exp(self, a: Ball) -> Ball:
        return self._unary(_jit()[1].exp, a)

    def log(self, a: Ball) -> Ball:
        return self._unary(_jit()[1].log, a)

    def tanh(self, a: Ball) -> Ball:
        t, _, bad, _ = self._pair(_jit()[1].tanh, self._tanh_cache, a)
        self.range_errors += bad
        return t

    def tanh_deriv(self, z: Ball, t: Ball) -> Ball:
        """sech^2 z = 4 E R^2 (no cancellation); |d sech^2/dz| <= 2 sech^2 bounds the radius."""
        _, d, _, bad = self._pair(_jit()[1].tanh, self._tanh_cache, z)
        self.range_errors += bad
        return d

    def sigmoid(self, a: Ball) -> Ball:
        s, _, bad, _ = self._pair(_jit()[1].sigmoid, self._sig_cache, a)
        self.range_errors += bad
        return s

    def sigmoid_deriv(self, z: Ball, s: Ball) -> Ball:
        """s(z) s(-z) = E R^2 (no cancellation)."""
        _, d, _, bad = self._pair(_jit()[1].sigmoid, self._sig_cache, z)
        self.range_errors += bad
        return d

    def log1p(self, a: Ball) -> Ball:
        """log(1 + a) without cancellation for small a.

        ``|a| + rad <= 2**-200``: ``a`` itself, the radius grown by ``(|a| + rad) 2**-200``
        (at least 2**-1074 where ``|a| + rad > 0``)
        (``|log1p(a) - a| <= a^2 / 2``); ``<= 2**-8``: ``2 atanh(u)`` with ``u = a / (2 + a)``,
        summed as ``2 u sum_{j<K} u^2j / (2j + 1)`` with the tail bounded by
        ``2 |u|^(2K+1) / ((2K + 1)(1 - u^2))``; elsewhere ``log(1 + a)``. Each branch sees
        only its own elements (the others are set to an exact 0), so no branch leaves the
        range for elements it does not serve.
        """
        bound = np.abs(a.mid[0]) * HI_BOUND + a.rad
        tiny = bound <= 2.0**-200
        small = (bound <= 2.0**-8) & ~tiny

        def only(mask: np.ndarray) -> Ball:
            return Ball(np.where(mask, a.mid, 0.0), np.where(mask, a.rad, 0.0))

        out = self.log(self.add(self.const(1.0), only(~(tiny | small))))
        if small.any():
            terms = 18 if self.k == 3 else 12  # |u|^(2K) <= 2**-160 (k=3), 2**-106 (k=2)
            x = only(small)
            u = self.div(x, self.add(self.const(2.0), x))
            u2 = self.mul(u, u)
            poly = self.div(self.const(1.0), self.const(2.0 * terms - 1))
            for j in range(terms - 2, -1, -1):
                odd = self.div(self.const(1.0), self.const(2.0 * j + 1))
                poly = self.add(self.mul(poly, u2), odd)
            series = self.mul(self.mul(self.const(2.0), u), poly)
            ub = np.minimum(np.abs(u.mid[0]) * HI_BOUND + u.rad, 2.0**-8)  # |u| <= ub
            with np.errstate(under="ignore"):
                tail = 2.0 * ub ** (2 * terms + 1) / ((2 * terms + 1) * (1.0 - ub * ub))
            series = Ball(series.mid, (series.rad + tail * RU) * RU)
            out = self.where(small, series, out)
        if tiny.any():
            # |log1p(x) - x| <= x^2 <= bound 2**-200 on the ball; where that product falls
            # below 2**-1022 it rounds down by up to 2**-1075 (to 0 below 2**-1075), but there
            # bound <= 2**-822 and x^2 <= 2**-1644 < 2**-1074: a floor of 2**-1074 holds it
            # (0 +- 2**-1074 gave [-2**-1074, 2**-1074], missing log1p(-2**-1074))
            square = np.maximum(bound * 2.0**-200, np.where(bound > 0, 2.0**-1074, 0.0))
            near = Ball(a.mid, (a.rad + square) * RU)
            out = self.where(tiny, near, out)
        return out

    def npdf(self, a: Ball) -> Ball:
        """The standard normal density ``exp(-a^2 / 2) / sqrt(2 pi)`` (the constant enclosed
        by Arb, :func:`_inv_sqrt_2pi`)."""
        e = self.exp(self.mul(self.const(-0.5), self.mul(a, a)))
        return self.mul(e, _inv_sqrt_2pi(self.k))

    def ncdf(self, a: Ball) -> Ball:
        """The standard normal CDF Phi, in three ranges of ``|a|``.

        ``|mid| HI_BOUND + rad <= 12``: at the midpoint ``m`` (``|m| <= ub = |word 0|
        HI_BOUND``), ``Phi(m) = 1/2 + phi(m) S(m)`` with ``S(m) = sum_n m^(2n+1) / (2n+1)!!``
        (every term of one sign, consecutive terms in the ratio ``m^2 / (2n+3)``), summed by
        Horner over ``n < N`` with the tail bounded by ``t_N / (1 - ub^2 / (2N+3))``,
        ``t_N = ub^(2N+1) / (2N+1)!!``, added to the radius. The ball's own radius adds
        ``max phi * rad`` (``Phi' = phi <= exp(-lo^2 / 2) / 2.5``, ``lo`` the least ``|a|``
        of the ball), so the left tail keeps its relative accuracy.
        Beyond 12: ``a > 0``: ``[1 - q, 1 + q]``; ``a < 0``: ``[0, 2 q]``, with ``q >= phi(lo)
        / lo >= 1 - Phi(lo)`` (Mills' ratio; the left tail is not certified there: the
        reference moves to Arb); a ball reaching ``|a| < 1``: ``[0, 1]``. Each range sees only
        its own elements (the others are set to 0).
        """
        hit = self._ncdf_cache.get(id(a))
        if hit is not None and hit[0] is a:  # GELU's backward asks again for its input
            return hit[1]
        out = self._ncdf(a)
        self._ncdf_cache[id(a)] = (a, out)
        return out

    def _ncdf(self, a: Ball) -> Ball:
        # a NaN radius or a non-finite midpoint encloses nothing: the ranges below would
        # turn it into a finite ball, so it counts as a range error (the run goes to Arb)
        self._domain(~np.isfinite(a.mid[0]) | np.isnan(a.rad))
        bound = np.abs(a.mid[0]) * HI_BOUND + a.rad
        mid_range = bound <= 12.0

        def only(mask: np.ndarray) -> Ball:
            return Ball(np.where(mask, a.mid, 0.0), np.where(mask, a.rad, 0.0))

        x = only(mid_range)
        ub = np.where(mid_range, np.abs(a.mid[0]) * HI_BOUND, 0.0)
        lo = np.maximum(np.abs(x.mid[0]) / HI_BOUND - x.rad, 0.0)  # least |a| in the ball
        lip = np.exp(-0.5 * lo * lo) / 2.5  # >= max phi on the ball (sqrt(2 pi) > 2.5)
        x = Ball(x.mid, np.zeros(x.rad.shape))  # the series at the midpoint, then |Phi'| rad
        terms = _ncdf_terms(float(ub.max()) if ub.size else 0.0)
        x2 = self.mul(x, x)
        one = self.const(1.0)
        poly = one
        for m in range(terms - 1, 0, -1):
            poly = self.add(one, self.div(self.mul(poly, x2), self.const(2.0 * m + 1)))
        series = self.mul(x, poly)
        tail = ub.copy()  # t_N = ub^(2N+1) / (2N+1)!!, each factor rounded up
        for m in range(1, terms + 1):
            tail = tail * (ub * ub / (2.0 * m + 1)) * RU
        ratio = ub * ub / (2.0 * terms + 3)
        tail = tail / (1.0 - ratio) * RU
        tail = np.where(ub > 0, np.maximum(tail, 2.0**-700), 0.0)  # no bound rounds to 0
        series = Ball(series.mid, (series.rad + tail) * RU)
        out = self.add(self.const(0.5), self.mul(self.npdf(x), series))
        # lip * rad can round below 2**-1074 (to 0 for a subnormal rad): a pad keeps the ball
        # of a non-zero rad from being the point Phi(mid) (0 +- 5e-324 gave {1/2})
        r_in = np.where(mid_range, a.rad, 0.0)
        out = Ball(out.mid, (out.rad + lip * r_in + np.where(r_in > 0, TINY_PAD, 0.0)) * RU)
        far = ~mid_range
        if far.any():
            lo = np.abs(a.mid[0]) / HI_BOUND - a.rad  # every point of the ball has |a| >= lo
            lo_ok = np.where(far & (lo >= 1.0), lo, 1.0)
            with np.errstate(under="ignore"):  # phi(lo) / lo (sqrt(2 pi) > 2.5), not below 2**-700
                q = np.maximum(np.exp(-0.5 * lo_ok * lo_ok) / (2.5 * lo_ok), 2.0**-700)
            right = a.mid[0] > 0
            mid = np.where(lo < 1.0, 0.5, np.where(right, 1.0, q))
            rad = np.where(lo < 1.0, 0.5, q) * RU  # a ball reaching |a| < 1: all of [0, 1]
            out = self.where(far, Ball(xp.from_float(mid, self.k), rad), out)
        return out

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

    def expm1(self, a: Ball) -> Ball:
        """``e^a - 1`` without cancellation near 0 (celu, ``torch.expm1``).

        ``ub = |word 0| HI_BOUND + rad`` bounds ``|a|`` on the ball. ``ub > 2**-4``:
        ``exp(a) - 1`` (the ball's own operations). ``ub <= 2**-4``: the Taylor polynomial
        ``P(a) = a (1 + a/2 (1 + a/3 (... (1 + a/N))))``, N = 24, evaluated in ball arithmetic
        (an enclosure of P over the ball), its radius grown by ``ub 2**-178``: for every
        ``|x| <= ub``, ``|e^x - 1 - P(x)| = |sum_{n > N} x^n / n!| <= |x|^(N+1) / (N+1)! /
        (1 - |x| / (N+2)) <= 2 ub (2**-4)^N / 25! < ub 2**-178.7``. Each branch sees only its
        own elements (the others are set to an exact 0).
        """
        ub = np.abs(a.mid[0]) * HI_BOUND + a.rad
        small = ub <= 2.0**-4

        def only(mask: np.ndarray) -> Ball:
            return Ball(np.where(mask, a.mid, 0.0), np.where(mask, a.rad, 0.0))

        out = self.add(self.exp(only(~small)), self.const(-1.0))
        if small.any():
            x = only(small)
            one = self.const(1.0)
            q = one
            for n in range(_EXPM1_TERMS, 1, -1):
                q = self.add(one, self.div(self.mul(x, q), self.const(float(n))))
            p = self.mul(x, q)
            tail = np.where(small, ub, 0.0) * _EXPM1_TAIL  # normal: ub >= 2**-800 in range
            out = self.where(small, Ball(p.mid, (p.rad + tail * RU) * RU), out)
        return out


#: expm1's Taylor terms and its tail bound relative to ub (2 (2**-4)^24 / 25! < 2**-178.7)
_EXPM1_TERMS = 24
_EXPM1_TAIL = 2.0**-178

_NCDF_TARGET = 2.0**-170  # the series' tail bound, absolute (certified Phi are above 2**-80)


def _ncdf_terms(ub: float) -> int:
    """Terms N of the series of :meth:`BallArith.ncdf` for ``|a| <= ub <= 12``: the first N
    whose tail bound is below :data:`_NCDF_TARGET` (at most 600)."""
    t, n = ub, 0
    while n < 600:
        n += 1
        t = t * ub * ub / (2.0 * n + 1)
        ratio = ub * ub / (2.0 * n + 3)
        if ratio < 0.5 and t / (1.0 - ratio) < _NCDF_TARGET:
            return n
    raise AssertionError("ncdf series: |a| above 12 reached the series")


_CONSTS: dict[tuple[str, int], Ball] = {}


def _inv_sqrt_2pi(k: int) -> Ball:
    """``1 / sqrt(2 pi)`` as a k-word ball: Arb encloses it at 400 bits; the words are its
    midpoint rounded greedily, the radius Arb's plus what the words leave out, rounded up."""
    key = ("inv_sqrt_2pi", k)
    if key not in _CONSTS:
        import mpmath
        from flint import arb, ctx

        old = ctx.prec
        ctx.prec = 400
        try:
            c = 1 / (2 * arb.pi()).sqrt()
            man, exp = c.mid().man_exp()
            rman, rexp = c.rad().mid().man_exp()
        finally:
            ctx.prec = old
        mp = mpmath.MPContext()
        mp.prec = 600
        rest = mp.ldexp(mp.mpf(int(man)), int(exp))
        words = []
        for _ in range(k):
            w = float(rest)
            words.append(w)
            rest = rest - mp.mpf(w)  # exact: 600 bits hold it
        left = abs(rest) + mp.ldexp(mp.mpf(int(rman)), int(rexp))
        rad = float(mp.mpf(left)) * 2.0  # float() rounds to nearest: doubling rounds up
        _CONSTS[key] = Ball(np.array(words), np.asarray(rad))
    return _CONSTS[key]
