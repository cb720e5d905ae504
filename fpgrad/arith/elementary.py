"""exp, expm1, log, tanh and sigmoid on multi-word arrays (:mod:`fpgrad.arith.expansion`).

exp(x) = 2**n * T1[j1] * T2[j2] * (1 + p(t)): n = round(x / ln 2) with ln 2 in 42-bit words
(so n*ln2 is exact word by word), j1 = round(r * 2**14) and j2 = round(r' * 2**28) index
tables of exp(j / 2**14) and exp(j / 2**28) (built once from small mpmath tables), and
|t| <= 2**-29 goes into a short Taylor polynomial (double-double suffices for its non-linear
part). expm1 near 0 uses the tables of T - 1 and, for |x| < 2**-11, a longer polynomial
accurate relative to t, so it never cancels. tanh and sigmoid are rational in exp(-|x|) and
expm1(-2|x|) without cancellation; their derivatives (sech^2 = 4 E R^2, s(z) s(-z) = E R^2
with R = 1 / (1 + E)) come from the same exponential.

Accuracy (relative, tested against mpmath in tests/test_fast_exact.py): about 2**-150 with
3 words, 2**-98 with 2. Every function states its domain: the caller
(:mod:`fpgrad.arith.ball`) guards the range in which words stay normal float64 numbers.
:class:`~fpgrad.arith.ball.BallArith` runs compiled copies (:mod:`fpgrad.arith.jit_elementary`,
the same words); these are the reference, and build the tables both use.
"""

from __future__ import annotations

import math
from functools import cache

import mpmath
import numpy as np

from fpgrad.arith import expansion as xp

EXP_DOMAIN = 700.0  # |x| beyond this: exp under/overflows float64 words
_B1, _B2 = 14, 28  # table resolutions 2**-14 and 2**-28
_J1 = 5682  # |j1| <= ceil(ln2/2 * 2**14) + 1
_J2 = 2**13 + 2  # |j2| <= 2**13 + 1


@cache
def _tables() -> dict[str, np.ndarray]:
    """exp and expm1 at j/2**14 and j/2**28 (4 words), ln 2 in 42-bit words, 1/i!.

    Each table is the product of two small mpmath tables in 4-word arithmetic (error about
    2**-200, far below what 3 words carry), so building them takes milliseconds.
    """
    ctx = mpmath.MPContext()
    ctx.prec = 300

    def mp_table(lo: int, hi: int, shift: int) -> np.ndarray:
        out = np.zeros((4, hi - lo + 1))
        for idx, j in enumerate(range(lo, hi + 1)):
            out[:, idx] = _words(ctx, ctx.exp(ctx.ldexp(j, -shift)), 4)
        return out

    def product_table(
        bound: int, coarse_shift: int, fine_bits: int, shift: int
    ) -> tuple[np.ndarray, ...]:
        j = np.arange(-bound, bound + 1)
        step = 2**fine_bits
        c = np.rint(j / step).astype(np.int64)
        d = j - c * step  # |d| <= step / 2
        cmax = int(np.abs(c).max())
        coarse = mp_table(-cmax, cmax, coarse_shift)
        fine = mp_table(-step // 2, step // 2, shift)
        t = xp.mul_generic(coarse[:, c + cmax], fine[:, d + step // 2], 4)
        return t, xp.add_generic(
            t, [-1.0], 4
        )  # exp(y) - 1 without cancellation: t is exact to 2**-200

    t1, tm1_1 = product_table(_J1, _B1 - 4, 4, _B1)
    t2, tm1_2 = product_table(_J2, _B2 - 7, 7, _B2)
    l42 = []
    rest = ctx.ln2
    for _ in range(5):  # 42-bit words: n * word is exact for |n| < 2**10
        scale = 41 - int(ctx.floor(ctx.log(abs(rest), 2)))
        w = float(ctx.ldexp(ctx.nint(ctx.ldexp(rest, scale)), -scale))
        l42.append(w)
        rest = rest - w
    inv_fact = np.zeros((4, 40))
    for i in range(40):
        inv_fact[:, i] = _words(ctx, 1 / ctx.factorial(i), 4)
    return {
        "t1": t1,
        "tm1_1": tm1_1,
        "t2": t2,
        "tm1_2": tm1_2,
        "ln2": np.array(l42),
        "inv_fact": inv_fact,
    }


def _words(ctx: mpmath.ctx_mp.MPContext, v: mpmath.mpf, k: int) -> list[float]:
    out = []
    for _ in range(k):
        w = float(v)
        out.append(w)
        v = v - w
    return out


def _expm1_fast(t: np.ndarray, k: int) -> np.ndarray:
    """expm1(t) for |t| <= 2**-29 (+tiny) to an absolute 2**-(53k + 1): enough for exp.

    t + t^2 h, h = 1/2 + t g, g = 1/6 + t/24 + t^2/120: double-double suffices for k = 3
    (t^2 h <= 2**-59), float64 for k = 2.
    """
    fact = _tables()["inv_fact"]
    t0 = t[0]
    if k == 2:
        q = t0 * t0 * (0.5 + t0 * (fact[0, 3] + t0 * fact[0, 4]))
        return xp.add(t, [q], k)
    g = xp.add(fact[:2, 3], xp.two_prod(t0, fact[0, 4] + t0 * fact[0, 5]), 2)
    h = xp.add([0.5], xp.mul(t[:2], g, 2), 2)
    q = xp.mul(xp.mul(t[:2], t[:2], 2), h, 2)
    return xp.add(t, q, k)


def _expm1_tiny(t: np.ndarray, k: int, bits: int) -> np.ndarray:
    """expm1(t) for |t| <= 2**-21 (+tiny) as k words, to about 2**-(bits + 8) of |expm1(t)|.

    expm1(t) = t + t^2 h(t), h = 1/2 + t g(t), g = 1/6 + t/24 + t^2/120 + ...: relative to t
    (what expm1 near 0 needs), the square and h in k words, g in double-double, its tail from
    t^6 on in float64.
    """
    t0 = t[0]
    fact = _tables()["inv_fact"]
    g6 = fact[0, 6] + t0 * (fact[0, 7] + t0 * fact[0, 8])  # 1/720 + t/5040 + t^2/40320
    g5 = xp.add(fact[:2, 5], xp.two_prod(t0, g6), 2)  # 1/120 + t g6
    g4 = xp.add(fact[:2, 4], xp.mul(t[:2], g5, 2), 2)  # 1/24 + t g5
    g = xp.add(fact[:2, 3], xp.mul(t[:2], g4, 2), 2)  # 1/6 + t g4
    w = 3 if k >= 3 else 2
    h = xp.add(fact[:w, 2], xp.mul(t[:2], g, 2), w)  # 1/2 + t g
    q = xp.mul(xp.mul(t[:w], t[:w], w), h, w)
    return xp.add(t, q, k)


def _take(table: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """k words of table entries (np.take is several times faster than fancy indexing)."""
    return np.take(table[:k], idx, axis=1)


def exp_core(
    x: np.ndarray, k: int, bits: int, want_m1: bool
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """(n, E, small): exp(x) = 2**n E; ``small`` = (flat indices with |x| < 2**-9, expm1 there).

    ``x``: k words with |x| <= EXP_DOMAIN (not checked here). Reduction: x = n ln2 + j1/2**14
    + j2/2**28 + t with |t| <= 2**-29; exp(x) = 2**n T1[j1] T2[j2] (1 + expm1(t)). Elsewhere
    expm1(x) = 2**n E - 1 cancels at most 10 bits of the 2**-159-accurate E (see below).
    """
    tab = _tables()
    ln2 = tab["ln2"]
    x0 = x[0]
    n = np.rint(x0 * (1.0 / math.log(2.0)))
    head = [x0 - n * ln2[0]] + [x[i] for i in range(1, k)]  # x0 - n*ln2[0] is exact (Sterbenz)
    tail = [-n * ln2[1], -n * ln2[2], -n * ln2[3]]  # exact products (42-bit words, |n| < 2**10)
    if k == 2:
        tail = [tail[0], tail[1] + tail[2]]
    r = xp.add(head, tail, k)
    j1 = np.rint(r[0] * 2.0**_B1)
    r0 = r[0] - j1 * 2.0**-_B1  # exact
    j2 = np.rint(r0 * 2.0**_B2)
    t = xp.add([r0 - j2 * 2.0**-_B2, *r[1:]], [0.0], k)  # exact head; renormalised words
    p = _expm1_fast(t, k)
    i2 = (j2 + _J2).astype(np.intp)
    i1 = (j1 + _J1).astype(np.intp)
    t2 = _take(tab["t2"], k, i2)
    t1 = _take(tab["t1"], k, i1)
    e = xp.mul(t1, xp.add(t2, xp.mul(t2, p, k), k), k)
    if not want_m1:
        return n, e, None
    # V = E - 1 loses log2(1/|V|) bits: harmless once |x| >= 2**-9 (|V| > 2**-10, E exact to
    # 2**-159). Below, expm1(a + b + t) = expm1 a + e^a (expm1 b + e^b expm1 t) with expm1 t
    # relative to t itself: no cancellation at all.
    small = np.flatnonzero(np.abs(x0.ravel()) < 2.0**-9)  # n == 0 and |j1| <= 32 there
    vs = np.zeros((k, 0))
    if small.size:
        flat = (k, -1)
        i1s, i2s = i1.ravel()[small], i2.ravel()[small]
        ps = _expm1_tiny(t.reshape(flat)[:, small], k, bits)
        u1 = xp.add(_take(tab["tm1_2"], k, i2s), xp.mul(_take(tab["t2"], k, i2s), ps, k), k)
        vs = xp.add(_take(tab["tm1_1"], k, i1s), xp.mul(_take(tab["t1"], k, i1s), u1, k), k)
    return n, e, (small, vs)


def exp(x: np.ndarray, k: int, bits: int) -> np.ndarray:
    n, e, _ = exp_core(x, k, bits, False)
    return e * np.ldexp(1.0, n.astype(np.int64))


def exp_and_expm1(x: np.ndarray, k: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """exp(x) and expm1(x), both accurate relative to themselves."""
    n, e, small = exp_core(x, k, bits, True)
    assert small is not None
    e = e * np.ldexp(1.0, n.astype(np.int64))
    m = xp.add(e, [-1.0], k)  # |x| >= 2**-9: at most 10 bits of the 2**-159 cancel
    idx, vs = small
    if idx.size:
        m.reshape(k, -1)[:, idx] = vs
    return e, m


def log(x: np.ndarray, k: int, bits: int) -> np.ndarray:
    """log(x) for x > 0 by Newton steps y += x exp(-y) - 1 from the float64 log."""
    y = xp.from_float(np.log(x[0]), k)
    for _ in range(2 if k == 3 else 1):
        e = exp(-y, k, bits)
        corr = xp.add(xp.mul(x, e, k), [np.full(x[0].shape, -1.0)], k)
        y = xp.add(y, corr, k)
    return y


def tanh_parts(z: np.ndarray, k: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tanh z, E, R) with E = exp(-2|z|), R = 1 / (1 + E): sech^2 z = 4 E R^2.

    tanh|z| = -expm1(-2|z|) / (1 + E): neither numerator nor denominator cancels.
    """
    sign = np.where(z[0] < 0, -1.0, 1.0)
    a2 = z * (-2.0 * sign)  # -2|z|, exact
    clip = a2[0] < -EXP_DOMAIN
    if clip.any():
        a2 = np.where(clip, _word_vector([-EXP_DOMAIN], k, a2.ndim), a2)
    e, m = exp_and_expm1(a2, k, bits)
    if clip.any():
        e = np.where(clip, 0.0, e)
        m = np.where(clip, _word_vector([-1.0], k, m.ndim), m)
    r = xp.div([np.ones(e.shape[1:])], xp.add(e, [1.0], k), k)
    t = xp.mul(m, r, k) * (-sign)
    return t, e, r


def sech2(e: np.ndarray, r: np.ndarray, k: int) -> np.ndarray:
    """4 E R^2 from :func:`tanh_parts`."""
    r2 = r * 2.0
    return xp.mul(xp.mul(r2, r2, k), e, k)


def _word_vector(head: list[float], k: int, ndim: int) -> np.ndarray:
    return np.array(head + [0.0] * (k - len(head))).reshape((k,) + (1,) * (ndim - 1))


def sigmoid_parts(z: np.ndarray, k: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigmoid z, E, R) with E = exp(-|z|), R = 1 / (1 + E): sigmoid = (1 or E) R."""
    neg = z[0] < 0
    a = np.where(neg, z, -z)  # -|z|
    clip = a[0] < -EXP_DOMAIN
    if clip.any():
        a = np.where(clip, _word_vector([-EXP_DOMAIN], k, a.ndim), a)
    e = exp(a, k, bits)
    if clip.any():
        e = np.where(clip, 0.0, e)
    r = xp.div([np.ones(e.shape[1:])], xp.add(e, [1.0], k), k)
    s = np.where(neg, xp.mul(e, r, k), r)
    return s, e, r
