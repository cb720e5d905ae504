"""A rigorous independent oracle: scalar reverse-mode AD over mpmath's interval context.

Every value is an ``iv.mpf`` interval that provably holds the exact value (mpmath rounds
interval endpoints outward), so an fpgrad ball *disjoint* from the oracle's interval is a
proof that fpgrad's certificate is wrong. No fpgrad code is used. Kinks follow torch's
conventions (ReLU'(0) = 0, sign(0) = 0, max-pool ties to the first maximum); a kink input
that is not decided (an interval holding 0 that is not exactly 0) raises :class:`Undecided`,
and :func:`gradients` retries at a higher precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from mpmath import iv, mp


class Undecided(Exception):
    """A branch of a kink could not be decided at this precision."""


def _I(x: Any) -> Any:
    return x if isinstance(x, type(iv.mpf(0))) else iv.mpf(x)


def _is_point(x: Any) -> bool:
    return bool(x.a == x.b)


def _pos(x: Any) -> bool:
    return bool(x.a > 0)


def _neg(x: Any) -> bool:
    return bool(x.b < 0)


class V:
    """A node: interval value and (parent, local derivative) pairs."""

    __slots__ = ("v", "parents", "g")

    def __init__(self, v: Any, parents: tuple = ()) -> None:
        self.v, self.parents, self.g = _I(v), parents, iv.mpf(0)

    def __add__(self, o: Any) -> V:
        o = lift(o)
        return V(self.v + o.v, ((self, 1), (o, 1)))

    __radd__ = __add__

    def __sub__(self, o: Any) -> V:
        o = lift(o)
        return V(self.v - o.v, ((self, 1), (o, -1)))

    def __rsub__(self, o: Any) -> V:
        return lift(o) - self

    def __mul__(self, o: Any) -> V:
        o = lift(o)
        return V(self.v * o.v, ((self, o.v), (o, self.v)))

    __rmul__ = __mul__

    def __truediv__(self, o: Any) -> V:
        o = lift(o)
        q = self.v / o.v
        return V(q, ((self, 1 / o.v), (o, -q / o.v)))

    def __rtruediv__(self, o: Any) -> V:
        return lift(o) / self

    def __neg__(self) -> V:
        return V(-self.v, ((self, -1),))

    def __pow__(self, p: float) -> V:
        y = self.v ** iv.mpf(p)
        return V(y, ((self, iv.mpf(p) * self.v ** iv.mpf(p - 1)),))


def lift(x: Any) -> V:
    return x if isinstance(x, V) else V(x)


def _unary(f: Callable[[Any], tuple[Any, Any]]) -> Callable[[Any], Any]:
    def one(x: Any) -> V:
        x = lift(x)
        y, d = f(x.v)
        return V(y, ((x, d),))

    vec = np.frompyfunc(one, 1, 1)
    return lambda a: vec(a) if isinstance(a, np.ndarray) else one(a)


def _exp(x: Any) -> tuple[Any, Any]:
    y = iv.exp(x)
    return y, y


def _sech2(x: Any) -> Any:
    e = iv.exp(-2 * abs_iv(x))
    return 4 * e / (1 + e) ** 2


def abs_iv(x: Any) -> Any:
    if x.a >= 0:
        return x
    if x.b <= 0:
        return -x
    raise Undecided("abs of an interval holding 0")


def _tanh(x: Any) -> tuple[Any, Any]:
    ax = abs_iv(x) if not _is_point(x) or x.a != 0 else x
    e = iv.exp(-2 * ax)
    t = (1 - e) / (1 + e)
    return (t if x.a >= 0 else -t), _sech2(x)


def _sigmoid(x: Any) -> tuple[Any, Any]:
    s, c = 1 / (1 + iv.exp(-x)), 1 / (1 + iv.exp(x))
    return s, s * c


def _relu(x: Any) -> tuple[Any, Any]:
    if _pos(x):
        return x, iv.mpf(1)
    if _neg(x) or (_is_point(x) and x.a == 0):
        return iv.mpf(0), iv.mpf(0)
    raise Undecided("relu")


def _sign(x: Any) -> Any:
    if _pos(x):
        return iv.mpf(1)
    if _neg(x):
        return iv.mpf(-1)
    if _is_point(x) and x.a == 0:
        return iv.mpf(0)
    raise Undecided("sign")


def _abs(x: Any) -> tuple[Any, Any]:
    s = _sign(x)
    return s * x, s


def _log(x: Any) -> tuple[Any, Any]:
    return iv.log(x), 1 / x


def _log1p(x: Any) -> tuple[Any, Any]:
    return iv.log1p(x), 1 / (1 + x)


def _sqrt(x: Any) -> tuple[Any, Any]:
    y = iv.sqrt(x)
    return y, 1 / (2 * y)


def _erf_gelu(x: Any) -> tuple[Any, Any]:
    """GELU x Phi(x) with Phi = erfc(-x/sqrt2)/2 (mpmath's erfc at the interval's precision
    plus 2^-(prec - 8) relative: iv lacks erfc); derivative Phi + x phi. Point inputs only."""
    if not _is_point(x):
        raise Undecided("gelu of a non-point interval")
    with mp.workprec(iv.prec + 20):
        c = mp.erfc(-mp.mpf(x.a) / mp.sqrt(2)) / 2
        pad = abs(c) * mp.mpf(2) ** (8 - iv.prec)
        phi_c = iv.mpf([c - pad, c + pad])
    pdf = iv.exp(-x * x / 2) / iv.sqrt(2 * iv.pi)
    return x * phi_c, phi_c + x * pdf


exp = _unary(_exp)
tanh = _unary(_tanh)
sigmoid = _unary(_sigmoid)
relu = _unary(_relu)
absv = _unary(_abs)
log = _unary(_log)
log1p = _unary(_log1p)
sqrt = _unary(_sqrt)
gelu = _unary(_erf_gelu)


def leaky_relu(a: Any, slope: float) -> Any:
    def f(x: Any) -> tuple[Any, Any]:
        if _pos(x):
            return x, iv.mpf(1)
        if _neg(x) or (_is_point(x) and x.a == 0):
            return x * iv.mpf(slope), iv.mpf(slope)  # torch: slope at 0
        raise Undecided("leaky_relu")

    return _unary(f)(a)


def less(a: V, b: V) -> bool:
    """a < b decided, or Undecided (equal point values count as not less)."""
    if a.v.b < b.v.a:
        return True
    if a.v.a >= b.v.b:
        return False
    raise Undecided("comparison")


def first_max(vals: list[V]) -> V:
    """The first of the maxima (torch's max_pool / argmax convention): routes the gradient to
    it alone."""
    best = vals[0]
    for v in vals[1:]:
        if less(best, v):
            best = v
    return V(best.v, ((best, 1),))


def total(a: Any) -> V:
    flat = list(np.asarray(a, dtype=object).ravel())
    out = lift(flat[0])
    for v in flat[1:]:
        out = out + v
    return out


def arr(x: Any) -> np.ndarray:
    """Float64 data (numpy/torch) as an object array of constant nodes (exact)."""
    a = np.asarray(x, dtype=np.float64)
    return np.frompyfunc(lambda v: V(iv.mpf(float(v))), 1, 1)(a).astype(object).reshape(a.shape)


def backward(out: V) -> None:
    order: list[V] = []
    seen: set[int] = set()
    stack: list[tuple[V, bool]] = [(out, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p, _ in node.parents)
    out.g = iv.mpf(1)
    for node in reversed(order):
        for p, d in node.parents:
            p.g = p.g + node.g * d


def gradients(
    loss: Callable[[dict[str, np.ndarray]], V],
    params: dict[str, np.ndarray],
    dps: int = 320,
    max_dps: int = 40000,
    tight: float = 1e-40,
) -> tuple[Any, dict[str, np.ndarray], int]:
    """(loss interval, name -> gradient intervals, dps used). Raises the precision (x4) while a
    kink is undecided or an interval is wider than ``tight`` relative and holds 0 without being
    {0} (a cancellation the precision has not resolved yet), up to ``max_dps``."""
    while True:
        iv.dps = dps
        try:
            nodes = {k: arr(v) for k, v in params.items()}
            out = loss(nodes)
            backward(out)
            grads = {k: np.frompyfunc(lambda n: n.g, 1, 1)(v) for k, v in nodes.items()}
            if dps >= max_dps or all(
                _resolved(g) for g in [out.v, *(x for a in grads.values() for x in a.ravel())]
            ):
                return out.v, grads, dps
        except Undecided:
            if dps >= max_dps:
                raise
        dps = min(dps * 4, max_dps)


def _resolved(x: Any) -> bool:
    if x.a == 0 and x.b == 0:
        return True
    return bool(x.a > 0 or x.b < 0)
