"""Vectorised multi-word floating point: a value is the unevaluated sum of k float64 words.

An *expansion* of k words is a float64 array of shape ``(k, *shape)`` (word 0 the largest),
or any sequence of k arrays. k = 2 is double-double (about 2**-104 relative), k = 3
triple-double (about 2**-155). Every routine here is built from the error-free transforms
:func:`two_sum` and :func:`two_prod` (Dekker's product: numpy has no fused multiply-add) and
one renormalisation, so each is a handful of whole-array numpy operations.

Accuracy (tested against mpmath in tests/test_fast_exact.py, stated with margin in
:data:`ETA`): :func:`add` errs by at most ``ETA[k] * (|a| + |b|)``, :func:`mul` and
:func:`div` by ``ETA[k] * |result|``. Valid while every word stays a normal float64 (the
ball arithmetic in :mod:`fpgrad.arith.ball` guards the range).

:class:`~fpgrad.arith.ball.BallArith` runs compiled copies of the k = 2, 3 kernels
(:mod:`fpgrad.arith.jit_words`), which give the same words; these are the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import mpmath
import numpy as np

# relative error bound per operation, with a margin over the measured errors
ETA = {1: 2.0**-52, 2: 2.0**-100, 3: 2.0**-148}

_SPLITTER = 134217729.0  # 2**27 + 1 (Veltkamp)

Words = Sequence[np.ndarray]


def two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s + e == a + b exactly, s = fl(a + b) (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a == hi + lo exactly, each with at most 26 significant bits (Veltkamp)."""
    t = _SPLITTER * a
    hi = t - (t - a)
    return hi, a - hi


def two_prod(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p + e == a * b exactly, p = fl(a * b) (Dekker)."""
    p = a * b
    ah, al = split(a)
    bh, bl = split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def renorm(terms: list, k: int) -> np.ndarray:
    """k words whose sum is sum(terms), up to about 2**(-53k) of sum |terms|.

    ``terms`` should come roughly largest first. Repeated VecSum passes (each error-free)
    peel off one word at a time; the last word is the plain sum of what is left.
    """
    rest = [np.asarray(t, dtype=np.float64) for t in terms]
    words: list[np.ndarray] = []
    while len(words) < k - 1 and len(rest) > 1:
        s = rest[-1]
        errs = []
        for t in rest[-2::-1]:
            s, e = two_sum(t, s)
            errs.append(e)
        words.append(s)
        rest = errs[::-1]
    last = rest[0]
    for t in rest[1:]:
        last = last + t
    words.append(last)
    shape = np.broadcast_shapes(*(w.shape for w in words))
    out = np.empty((k, *shape))
    for i in range(k):
        out[i] = words[i] if i < len(words) else 0.0
    for i in range(k - 1):  # one more pass so word 0 is the sum rounded to float64
        out[i], out[i + 1] = two_sum(out[i], out[i + 1])
    return out


def neg(a: np.ndarray) -> np.ndarray:
    return -a


def add_generic(a: Words, b: Words, k: int) -> np.ndarray:
    """a + b (any word counts) as k words."""
    terms = []
    for i in range(max(len(a), len(b))):  # interleave by level, largest first
        if i < len(a):
            terms.append(a[i])
        if i < len(b):
            terms.append(b[i])
    return renorm(terms, k)


def sub(a: Words, b: Words, k: int) -> np.ndarray:
    return add(a, [-w for w in b], k)


def mul_generic(a: Words, b: Words, k: int) -> np.ndarray:
    """a * b as k words: exact partial products above level k-1, plain ones at k-1."""
    levels: list[list[np.ndarray]] = [[] for _ in range(k + 1)]
    for i in range(min(len(a), k)):
        for j in range(min(len(b), k - i)):
            s = i + j
            if s < k - 1:
                p, e = two_prod(a[i], b[j])
                levels[s].append(p)
                levels[s + 1].append(e)
            else:
                levels[s].append(a[i] * b[j])
    terms = [t for level in levels for t in level]
    return renorm(terms, k)


def div_generic(a: Words, b: Words, k: int) -> np.ndarray:
    """a / b as k words by long division: k float64 quotient digits."""
    b0 = b[0]
    q = [a[0] / b0]
    r = np.asarray(a) if not isinstance(a, np.ndarray) else a
    kk = k + 1  # the remainder carries one extra word
    for _ in range(k - 1):
        r = sub(r, mul(b, [q[-1]], kk), kk)
        q.append(r[0] / b0)
    return renorm(q, k)


def sqrt(a: Words, k: int) -> np.ndarray:
    """sqrt(a) for a >= 0 by Newton steps on the float64 root."""
    a0 = a[0]
    s = np.sqrt(a0)
    safe = np.where(s > 0, s, 1.0)
    x = s[None]
    for _ in range(k - 1):
        r = sub(a, mul(x, x, k + 1), k + 1)  # a - x^2
        corr = r[0] / (2 * safe)
        x = add(x, [np.where(s > 0, corr, 0.0)], k)
    return renorm(list(x), k)


def from_float(x: np.ndarray, k: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros((k, *x.shape))
    out[0] = x
    return out


def const(value: mpmath.mpf | float | str, k: int) -> np.ndarray:
    """An mpmath value (or decimal string) rounded to k words."""
    ctx = mpmath.MPContext()
    ctx.prec = 60 * k + 60
    v = ctx.mpf(value)
    words = []
    for _ in range(k):
        w = float(v)
        words.append(w)
        v = v - w
    return np.array(words)


def to_mpf(words: np.ndarray, ctx: mpmath.ctx_mp.MPContext) -> np.ndarray:
    """Object array of the exact sums of the words, rounded to ``ctx.prec``."""
    flat = words.reshape(words.shape[0], -1)
    out = np.empty(flat.shape[1], dtype=object)
    mpf = ctx.mpf
    fsum = ctx.fsum
    cols = flat.T.tolist()
    for i, ws in enumerate(cols):
        out[i] = fsum([mpf(w) for w in ws if w != 0.0]) if any(ws) else mpf(0)
    return out.reshape(words.shape[1:])


def hi_lo(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest float64 of the value, nearest float64 of the rest) for canonical words."""
    hi = words[0]
    rest = words[1]
    for w in words[2:]:
        rest = rest + w
    s, e = two_sum(hi, rest)  # canonicalise: the words may overlap by a bit
    lo = e
    return s, lo


# ---- specialised kernels for k = 2 and k = 3 (few whole-array operations) -----------------


def fast_two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """s + e == a + b exactly when |a| >= |b| (or a == 0)."""
    s = a + b
    return s, b - (s - a)


def _stack(*words: np.ndarray) -> np.ndarray:
    shape = np.broadcast_shapes(*(np.shape(w) for w in words))
    out = np.empty((len(words), *shape))
    for i, w in enumerate(words):
        out[i] = w
    return out


def _w(a: Words, i: int) -> np.ndarray | float:
    return a[i] if i < len(a) else 0.0


def add(a: Words, b: Words, k: int) -> np.ndarray:
    """a + b as k words; error at most ETA[k] * (|a| + |b|)."""
    if k == 3:
        s0, e0 = two_sum(a[0], b[0])
        a1, b1 = _w(a, 1), _w(b, 1)
        s1, e1 = two_sum(a1, b1)
        t1, e2 = two_sum(s1, e0)
        t2 = (_w(a, 2) + _w(b, 2)) + (e1 + e2)
        r0, u = two_sum(s0, t1)
        r1, r2 = two_sum(u, t2)
        r0, r1 = fast_two_sum(r0, r1)
        return _stack(r0, r1, r2)
    if k == 2:
        s0, e0 = two_sum(a[0], b[0])
        e0 = e0 + (_w(a, 1) + _w(b, 1))
        r0, r1 = fast_two_sum(s0, e0)
        return _stack(r0, r1)
    return add_generic(a, b, k)


def mul(a: Words, b: Words, k: int) -> np.ndarray:
    """a * b as k words; error at most ETA[k] * |a * b|."""
    if len(b) > len(a):
        a, b = b, a
    if k == 3:
        a0, b0 = a[0], b[0]
        ah, al = split(a0)
        bh, bl = split(b0)
        p00 = a0 * b0
        q00 = ((ah * bh - p00) + ah * bl + al * bh) + al * bl
        a1 = _w(a, 1)
        a1h, a1l = split(a1)
        p10 = a1 * b0
        q10 = ((a1h * bh - p10) + a1h * bl + a1l * bh) + a1l * bl
        s2 = _w(a, 2) * b0 + q10
        if len(b) > 1:
            b1 = b[1]
            b1h, b1l = split(b1)
            p01 = a0 * b1
            q01 = ((ah * b1h - p01) + ah * b1l + al * b1h) + al * b1l
            s1, e1 = two_sum(p01, p10)
            s2 = s2 + (a1 * b1 + _w(b, 2) * a0 + q01 + e1)
        else:
            s1 = p10
        s1, e2 = two_sum(s1, q00)
        s2 = s2 + e2
        r0, u = fast_two_sum(p00, s1)
        r1, r2 = fast_two_sum(u, s2)
        return _stack(r0, r1, r2)
    if k == 2:
        p, q = two_prod(a[0], b[0])
        q = q + (a[0] * _w(b, 1) + _w(a, 1) * b[0])
        r0, r1 = fast_two_sum(p, q)
        return _stack(r0, r1)
    return mul_generic(a, b, k)


def div(a: Words, b: Words, k: int) -> np.ndarray:
    """a / b as k words by long division; error at most ETA[k] * |a / b|."""
    if k not in (2, 3):
        return div_generic(a, b, k)
    b0 = b[0]
    q0 = a[0] / b0
    r = add(a, -mul(b, [q0], k), k)
    q1 = r[0] / b0
    if k == 2:
        r0, r1 = fast_two_sum(q0, q1)
        return _stack(r0, r1)
    r = add(r, -mul(b, [q1], k), k)
    q2 = r[0] / b0
    r0, u = fast_two_sum(q0, q1)
    r1, r2 = fast_two_sum(u, q2)
    return _stack(r0, r1, r2)
