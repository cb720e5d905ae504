"""Forward and backward pass of a fpgrad Network, written from the mathematics.

Numbers are gmpy2 ``mpq`` (exact rationals) while the computation is rational: dense layers,
relu and leaky_relu (branch decided on the exact sign: relu'(0) = 0, leaky'(0) = slope), mse,
the row sums of targets. The first irrational operation (exp, log, tanh, sqrt) turns its values
into mpmath ``mpf`` at ``prec`` bits, and everything computed from them stays ``mpf``. The
formulas (mean reductions, training batch norm with biased variance and ``eps``):

- dense ``z = x W^T + b``; ``dW = dz^T x``, ``db = sum_b dz``, ``dx = dz W``;
- sigmoid ``s = 1 / (1 + e^-x)``, ``s' = s(x) s(-x)``; tanh, ``tanh' = 1 / cosh^2``;
- softmax ``p = e^(z - max) / sum e^(z - max)``, ``dx = p (dy - <dy, p>)``;
- batch norm ``xhat = (x - mean) / sqrt(var + eps)``, ``y = gamma xhat + beta``,
  ``dx = inv / n (n dxhat - sum dxhat - xhat sum(dxhat xhat))``;
- mse ``sum (y - t)^2 / N``, ``dy = 2 (y - t) / N``; cross-entropy from logits
  ``-sum_b sum_j t_bj log softmax(z_b)_j / B``, ``dz = (softmax(z) sum_j t_bj - t) / B`` (one-hot
  rows for class indices); bce from logits ``sum softplus(z) - t z / N``, ``dz = (s(z) - t) / N``.

:func:`oracle` runs this twice (``P`` and ``P + 2000`` bits, ``P`` from the network's depth and
the largest exp argument whose result cancels, capped at 2e4) and classifies every element: ``EXACT`` (a
rational, the same in both runs), ``ZERO`` (an exact rational 0, or an mpf 0 in both runs or one
that shrank by 2**1000 when the precision rose: cancellation to an exact zero), ``NUMERIC``
(two mpf that agree to 2**-1000 relative) or ``UNKNOWN``. A zero reached only through mpf
(a bias before batch norm: exactly 0, noise of 2**-P at P bits) rests on that 2,000-bit margin
(and an element that is 0 at P bits but not at P + 2000 is ZERO when a third run at P + 4000
shrinks it by 2**1000 again):
this is a test's oracle, not a certificate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mpmath
import numpy as np
from gmpy2 import mpq

from fpgrad.model.network import Network

EXACT, ZERO, NUMERIC, UNKNOWN = 0, 1, 2, 3
BASE_BITS = 4000
BITS_PER_DENSE = 2200  # float64 exponents span 2**-1074 .. 2**1024 per product
CHECK_BITS = 2000
MAX_REACH = 2e4  # beyond, the two-run agreement check decides (UNKNOWN when it fails)
AGREE = 1000  # NUMERIC: the two runs agree to 2**-AGREE relative


@dataclass
class OracleResult:
    """Per key ("loss", "forward/NAME", "backward/NAME", "grads/PARAM"): the values (object
    arrays of mpq or mpf, from the higher run) and their classes (int arrays)."""

    values: dict[str, np.ndarray]
    status: dict[str, np.ndarray]
    bits: int
    branches_agree: bool


class _Pass:
    """One evaluation at ``prec`` bits; ``reach`` records the largest |argument| of the exps
    whose results later cancel (softmax, cross-entropy, bce: ``p - t`` near saturation), to size
    the precision, and ``masks`` the ReLU branches taken. tanh and sigmoid derivatives are
    written without cancellation (``1 / cosh^2``, ``s(x) s(-x)``)."""

    def __init__(self, prec: int) -> None:
        self.mp = mpmath.MPContext()
        self.mp.prec = prec
        self.reach = 0.0
        self.masks: list[np.ndarray] = []
        self.map = np.frompyfunc

    # ---- elementwise helpers --------------------------------------------------------------
    def real(self, a: np.ndarray) -> np.ndarray:
        """Values as mpf (an mpq converted at ``prec`` bits; float64 data exactly)."""
        mp = self.mp

        def conv(v: Any) -> Any:
            if isinstance(v, mpmath.mpf) or type(v).__name__ == "mpf":
                return v
            q = mpq(v)
            return mp.mpf(int(q.numerator)) / mp.mpf(int(q.denominator))

        return np.asarray(np.frompyfunc(conv, 1, 1)(a), dtype=object)

    def unify(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """All mpq if every operand is rational, else all mpf."""
        if all(_rational(a) for a in arrays):
            return arrays
        return tuple(self.real(a) for a in arrays)

    def fn(self, f: Any, a: np.ndarray) -> np.ndarray:
        out = np.frompyfunc(f, 1, 1)(self.real(a))
        return np.asarray(out, dtype=object)

    def note_reach(self, a: np.ndarray) -> None:
        if a.size:
            top = max(_magnitude(v) for v in a.ravel())
            self.reach = min(max(self.reach, top), MAX_REACH)

    def positive(self, a: np.ndarray) -> np.ndarray:
        mask = np.array([v > 0 for v in a.ravel()], dtype=bool).reshape(a.shape)
        self.masks.append(mask)
        return mask

    def sum(self, a: np.ndarray, axis: int) -> np.ndarray:
        return np.sum(a, axis=axis, keepdims=True)

    def exp(self, a: np.ndarray) -> np.ndarray:
        return self.fn(self.mp.exp, a)

    def sigmoid(self, a: np.ndarray) -> np.ndarray:
        mp = self.mp
        return self.fn(lambda v: 1 / (1 + mp.exp(-v)), a)


def _magnitude(v: Any) -> float:
    """|v| as a float, inf beyond float64."""
    try:
        return abs(float(v))
    except OverflowError:
        return math.inf


def _rational(a: np.ndarray) -> bool:
    return all(type(v) is type(mpq(0)) for v in np.asarray(a, dtype=object).ravel())


def _q(a: Any) -> np.ndarray:
    """float64 values as exact rationals."""
    arr = np.asarray(a, dtype=np.float64)
    out = np.empty(arr.shape, dtype=object)
    flat = out.reshape(-1)
    for i, v in enumerate(arr.ravel().tolist()):
        flat[i] = mpq(v)
    return out


def _zero_like(ps: _Pass, a: np.ndarray) -> Any:
    return mpq(0) if _rational(a) else ps.mp.mpf(0)


def evaluate(net: Network, prec: int) -> tuple[dict[str, np.ndarray], _Pass]:
    """One pass at ``prec`` bits: every value by key, and the pass (reach, masks)."""
    ps = _Pass(prec)
    out: dict[str, np.ndarray] = {}
    h = _q(net.x)
    inputs: list[np.ndarray] = []
    keep: list[dict[str, Any]] = []
    for ly in net.layers:
        inputs.append(h)
        h, k = _forward(ps, ly, h)
        keep.append(k)
        out[f"forward/{ly.name}"] = h
    loss, dy = _loss(ps, net, h)
    out["loss"] = np.asarray(loss, dtype=object)
    grads: dict[str, np.ndarray] = {}
    for ly, x, k in zip(reversed(net.layers), reversed(inputs), reversed(keep), strict=True):
        out[f"backward/{ly.name}"] = dy
        dy, pg = _backward(ps, ly, x, k, dy)
        for p, g in pg.items():
            grads[f"grads/{ly.name}.{p}"] = g
    for name in net.params:
        out[f"grads/{name}"] = grads[f"grads/{name}"]
    return out, ps


def _forward(ps: _Pass, ly: Any, x: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    kind = ly.kind
    mp = ps.mp
    if kind == "dense":
        w = _q(ly.params["weight"])
        x, w = ps.unify(x, w)
        z = x.dot(w.T)
        if "bias" in ly.params:
            z, b = ps.unify(z, _q(ly.params["bias"]))
            z = z + b[None, :]
        return z, {"w": w}
    if kind in ("relu", "leaky_relu"):
        mask = ps.positive(x)
        slope = mpq(0) if kind == "relu" else mpq(ly.slope)
        other = x * slope if _rational(x) else x * ps.real(np.array(slope, dtype=object))[()]
        return np.where(mask, x, other), {"mask": mask, "slope": slope}
    if kind == "sigmoid":
        return ps.sigmoid(x), {}
    if kind == "tanh":
        return ps.fn(mp.tanh, x), {}
    if kind == "softmax":
        p = _softmax(ps, x)
        return p, {"p": p}
    if kind == "batch_norm":
        n = x.shape[0]
        mean = ps.sum(x, 0) / n if _rational(x) else ps.sum(x, 0) / mp.mpf(n)
        xc = x - mean
        var = ps.sum(xc * xc, 0) / (n if _rational(x) else mp.mpf(n))
        (var_eps,) = ps.unify(var + mpq(ly.eps) if _rational(var) else var + mp.mpf(ly.eps))
        inv = ps.fn(lambda v: 1 / mp.sqrt(v), var_eps)
        xhat = ps.real(xc) * inv
        gamma = ps.real(_q(ly.params["weight"]))[None, :]
        beta = ps.real(_q(ly.params["bias"]))[None, :]
        return xhat * gamma + beta, {"xhat": xhat, "inv": inv, "gamma": gamma, "n": n}
    raise AssertionError(kind)


def _softmax(ps: _Pass, z: np.ndarray) -> np.ndarray:
    z = ps.real(z)
    shifted = z - np.max(z, axis=1, keepdims=True)
    ps.note_reach(shifted)
    e = ps.exp(shifted)
    return e / ps.sum(e, 1)


def _backward(
    ps: _Pass, ly: Any, x: np.ndarray, k: dict[str, Any], dy: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    kind = ly.kind
    mp = ps.mp
    if kind == "dense":
        dy, x, w = ps.unify(dy, x, k["w"])
        grads = {"weight": dy.T.dot(x)}
        if "bias" in ly.params:
            grads["bias"] = np.sum(dy, axis=0)
        return dy.dot(w), grads
    if kind in ("relu", "leaky_relu"):
        slope = k["slope"]
        other = dy * slope if _rational(dy) else dy * ps.real(np.array(slope, dtype=object))[()]
        if kind == "relu":
            other = np.full(dy.shape, _zero_like(ps, dy), dtype=object)
        return np.where(k["mask"], dy, other), {}
    if kind == "sigmoid":
        d = ps.fn(lambda v: 1 / ((1 + mp.exp(-v)) * (1 + mp.exp(v))), x)  # s(x) s(-x)
        return ps.real(dy) * d, {}
    if kind == "tanh":
        return ps.real(dy) * ps.fn(lambda v: 1 / mp.cosh(v) ** 2, x), {}
    if kind == "softmax":
        p = k["p"]
        dy = ps.real(dy)
        # dy_i - <dy, p> = sum_j p_j (dy_i - dy_j) since sum_j p_j = 1: no cancellation when
        # p is nearly one-hot (the difference form would need the 1 - p_k bits)
        b, c = dy.shape
        inner = np.array(
            [
                [sum(p[r, j] * (dy[r, i] - dy[r, j]) for j in range(c)) for i in range(c)]
                for r in range(b)
            ],
            dtype=object,
        )
        return p * inner, {}
    if kind == "batch_norm":
        xhat, inv, gamma, n = k["xhat"], k["inv"], k["gamma"], k["n"]
        dy = ps.real(dy)
        grads = {"weight": np.sum(dy * xhat, axis=0), "bias": np.sum(dy, axis=0)}
        dxhat = dy * gamma
        inner = dxhat * n - ps.sum(dxhat, 0) - xhat * ps.sum(dxhat * xhat, 0)
        return inner * inv / mp.mpf(n), grads
    raise AssertionError(kind)


def _loss(ps: _Pass, net: Network, out: np.ndarray) -> tuple[Any, np.ndarray]:
    kind = net.loss.kind
    mp = ps.mp
    if kind == "mse":
        t = _q(net.y)
        out, t = ps.unify(out, t)
        r = out - t
        count = r.size if _rational(r) else mp.mpf(r.size)
        return np.sum(r * r) / count, r * 2 / count
    if kind == "cross_entropy":
        b, c = out.shape
        if net.y.ndim == 1:
            t = np.full((b, c), mpq(0), dtype=object)
            for i, cls in enumerate(np.asarray(net.y).astype(int).tolist()):
                t[i, cls] = mpq(1)
        else:
            t = _q(net.y)
        row = np.sum(t, axis=1, keepdims=True)  # exact: sum_j t_bj (not assumed to be 1)
        z = ps.real(out)
        m = np.max(z, axis=1, keepdims=True)
        ps.note_reach(z - m)
        e = ps.exp(z - m)
        top = np.argmax(z == m, axis=1)  # a maximum: its e is exactly exp(0) = 1
        rest = np.array([[sum(e[i, j] for j in range(c) if j != top[i])] for i in range(b)])
        # log p = (z - m) - log(1 + the others): no cancellation, and m (possibly huge) never
        # absorbs the tiny log1p
        logp = (z - m) - ps.fn(mp.log1p, rest)
        tr = ps.real(t)
        loss = -np.sum(tr * logp) / mp.mpf(b)
        total = ps.sum(e, 1)
        grad = e / total * ps.real(row) - tr
        for i in range(b):  # one-hot rows: p_c - 1 = -(sum of the other e_j) / total, exactly
            hot = [j for j in range(c) if t[i, j] != 0]
            if len(hot) == 1 and t[i, hot[0]] == 1:
                k = hot[0]
                grad[i, k] = -sum(e[i, j] for j in range(c) if j != k) / total[i, 0]
        return loss, grad / mp.mpf(b)
    if kind == "bce":
        t = ps.real(_q(net.y))
        z = ps.real(out)
        ps.note_reach(z)  # s(z) - t cancels when s(z) is near t = 1
        soft = np.frompyfunc(lambda v: max(v, 0) + mp.log1p(mp.exp(-abs(v))), 1, 1)(z)
        count = mp.mpf(z.size)
        return np.sum(soft - z * t) / count, (ps.sigmoid(out) - t) / count
    raise AssertionError(kind)


def precision_for(net: Network) -> int:
    """``P`` for a network: a base, the exponent range of each dense layer, and 1.5 times
    the bits of the largest exp argument (from a first pass at the base precision)."""
    dense = sum(1 for ly in net.layers if ly.kind == "dense")
    base = BASE_BITS + BITS_PER_DENSE * dense
    _, ps = evaluate(net, base)
    return base + int(1.5 * ps.reach / math.log(2)) + 64


def oracle(net: Network, prec: int | None = None) -> OracleResult:
    """Every value of ``net`` at ``P`` and ``P + 2000`` bits, classified per element."""
    p = precision_for(net) if prec is None else prec
    low, lps = evaluate(net, p)
    high, hps = evaluate(net, p + CHECK_BITS)
    agree = len(lps.masks) == len(hps.masks) and all(
        np.array_equal(a, b) for a, b in zip(lps.masks, hps.masks, strict=True)
    )
    status = {}
    for key, hi in high.items():
        lo = low[key]
        st = np.array(
            [_classify(a, b) for a, b in zip(lo.ravel(), hi.ravel(), strict=True)], dtype=np.int8
        ).reshape(hi.shape)
        status[key] = st if agree else np.full(hi.shape, UNKNOWN, dtype=np.int8)
    if agree and any((st == UNKNOWN).any() for st in status.values()):
        # 0 at P bits, noise at P + 2000: a third run at P + 4000 must shrink it by 2**1000
        third, _ = evaluate(net, p + 2 * CHECK_BITS)
        for key, st in status.items():
            for i in np.ndindex(st.shape):
                if st[i] != UNKNOWN:
                    continue
                a, b, c = low[key][i], high[key][i], third[key][i]
                if a == 0 and _classify(b, c) == ZERO:
                    st[i] = ZERO
    if lps.reach >= MAX_REACH:
        # an exp argument beyond the oracle's reach: a zero that both runs agree on may be a
        # value e^-(huge) that cancelled at both precisions, so it proves nothing
        for key, st in status.items():
            for i in np.ndindex(st.shape):
                v = high[key][i]
                if st[i] == ZERO and not isinstance(v, type(mpq(0))):
                    st[i] = UNKNOWN
    return OracleResult(high, status, p + CHECK_BITS, agree)


def _classify(a: Any, b: Any) -> int:
    if isinstance(b, type(mpq(0))):
        if a != b:
            return UNKNOWN
        return ZERO if b == 0 else EXACT
    if b == 0:  # 0 at P + 2000 bits: an exact zero, or noise at P that vanished
        return ZERO
    if a == 0:
        return UNKNOWN
    ab = abs(b)
    if abs(a - b) <= ab * mpmath.ldexp(1, -AGREE):
        return NUMERIC
    if ab <= abs(a) * mpmath.ldexp(1, -AGREE):  # shrank by 2**1000: noise around 0
        return ZERO
    return UNKNOWN
