"""Rigorous balls at any precision: numpy object arrays of python-flint ``arb``.

Every operation of Arb (FLINT's ball arithmetic) returns a ball proven to contain the exact
result of the operation applied to any points of its input balls, so a value computed through
any chain of these operations encloses the exact value. This is the exact reference's
fallback when the fast multi-word balls (:mod:`fpgrad.arith.ball`) cannot vouch for a run, and
:mod:`fpgrad.reference.exact` escalates its precision until the balls are narrow enough or a cap is
reached.

Exact zeros: an arb ball of radius 0 at 0 is exactly 0; products with an exact 0 and sums of
exact zeros stay exact, and sums and products of float64 values (dyadic rationals) are exact
whenever the working precision holds their result, so rational computations decide their own
signs once the precision is high enough.

Branches: :meth:`ArbArith.positive` returns a :class:`BranchMask` that knows which elements
it could not decide (a ball that contains 0 and is not exactly 0); :meth:`ArbArith.where`
takes the union of both branches there, so undecided ReLU inputs still give enclosures.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import mpmath
import numpy as np
from flint import arb, arb_mat, ctx

from fpgrad.arith import arb_kernels, arb_slices
from fpgrad.arith.base import ExactDerivatives

#: exact-result marker of ``arb.rel_accuracy_bits`` (FLINT's ARF_PREC_EXACT)
_EXACT_BITS = 2**62


class BranchMask(np.ndarray):
    """A boolean mask (x > 0 where decided) with ``unsure``: elements not decided.

    Only the mask :meth:`ArbArith.positive` returns carries ``unsure``; anything numpy derives
    from it (a slice, a reshape, ``mask == i``) is a plain mask without it, since the
    elements may have moved. :meth:`ArbArith.untracked` says whether an undecided mask never
    reached :meth:`ArbArith.where` itself (its branches were then taken blindly).
    """

    unsure: np.ndarray | None

    def __array_finalize__(self, obj: Any) -> None:
        self.unsure = None


class _Prec:
    """Scoped working precision of FLINT's global context (restored on exit)."""

    __slots__ = ("prec", "old")

    def __init__(self, prec: int) -> None:
        self.prec = prec
        self.old = 0

    def __enter__(self) -> None:
        self.old = ctx.prec
        ctx.prec = self.prec

    def __exit__(self, *exc: object) -> None:
        ctx.prec = self.old


def _obj(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=object)


_ARB = np.frompyfunc(arb, 1, 1)
_EXP = np.frompyfunc(arb.exp, 1, 1)  # method descriptors: no Python frame per element
_LOG = np.frompyfunc(arb.log, 1, 1)
_LOG1P = np.frompyfunc(arb.log1p, 1, 1)
_TANH = np.frompyfunc(arb.tanh, 1, 1)
_SECH2 = np.frompyfunc(lambda v: v.sech() ** 2, 1, 1)
# square roots in networks are of non-negative quantities (a variance plus eps, Adam's second
# moment): a ball that reaches below 0 only by its radius is cut to its non-negative part; a
# ball entirely below 0 is a domain error (torch: NaN), never the square root of 0
_NAN = arb("nan")
_SQRT = np.frompyfunc(lambda v: _NAN if v < 0 else v.nonnegative_part().sqrt(), 1, 1)
_ARB_SQRT = np.frompyfunc(arb.sqrt, 1, 1)
_SIGMOID = np.frompyfunc(lambda v: 1 / (1 + (-v).exp()), 1, 1)
_ABS = np.frompyfunc(abs, 1, 1)
_ZERO = arb(0)
_NCDF = np.frompyfunc(lambda v: (-v / arb(2).sqrt()).erfc() / 2, 1, 1)
_NPDF = np.frompyfunc(lambda v: (-(v * v) / 2).exp() / (2 * arb.pi()).sqrt(), 1, 1)
_MAX = np.frompyfunc(arb.max, 2, 1)
_UNION = np.frompyfunc(arb.union, 2, 1)


def _to_arb(arr: np.ndarray) -> np.ndarray:
    """float64 values as exact arb balls; repeated values (masks, one-hot targets, pixel
    data) share one ball each (arb balls are immutable)."""
    if arr.size < 64:
        return _obj(_ARB(arr))
    flat = np.sort(arr, axis=None)  # NaNs last; -0.0 and 0.0 equal: the same ball
    values = flat[np.concatenate(([True], flat[1:] != flat[:-1]))]
    if 2 * values.size > arr.size:
        return _obj(_ARB(arr))
    # the first equal value (NaN: the first NaN; np.unique's inverse, without its argsort)
    return _obj(_ARB(values))[np.searchsorted(values, arr)]


#: id(an object array of balls) -> its arb_mat, while that array lives: an input and a
#: hidden activation each meet two products (forward, then backward) and convert once (the
#: interpreter never changes a value in place, as for loss.py's softmax parts)
_MATS: dict[int, Any] = {}
_MATS_KEPT = 8  #: at most this many (one evaluation of a layer stack reuses within a few)


def _as_mat(a: Any) -> Any:
    """``a`` (2-D) as an arb_mat (the same balls), from :data:`_MATS` when ``a``, or the
    array that ``a`` is the transpose of, was converted before."""
    if not (isinstance(a, np.ndarray) and a.dtype == object):
        return arb_mat(_obj(a).tolist())
    base = a.base
    if (
        isinstance(base, np.ndarray)
        and base.dtype == object
        and a.shape == base.shape[::-1]
        and a.strides == base.strides[::-1]
        and a.ctypes.data == base.ctypes.data
    ):
        return _kept_mat(base).transpose()  # a is base.T
    return _kept_mat(a)


def _kept_mat(a: np.ndarray) -> Any:
    key = id(a)
    mat = _MATS.get(key)
    if mat is None:
        mat = _MATS[key] = arb_mat(a.tolist())
        weakref.finalize(a, _MATS.pop, key, None)
        if len(_MATS) > _MATS_KEPT:  # arrays kept alive elsewhere (parameters): the oldest
            _MATS.pop(next(iter(_MATS)))
    return mat


class ArbArith(ExactDerivatives):
    """Object arrays of arb balls at ``prec`` bits (an enclosure at every step)."""

    exact = True  #: an exact reference: structural identities and cancellation-free forms
    #: the cross-entropy backward reuses the log-softmax's exponentials (fpgrad.graph.ops.loss)
    reuse_softmax = True

    def __init__(self, prec: int, slice_products: bool = False) -> None:
        self.prec = int(prec)
        #: matrix products from arb_slices.MIN_PREC bits through exact float64 slices where
        #: they are faster (:mod:`fpgrad.arith.arb_slices`: enclosures, not arb_dot's balls)
        self.slice_products = slice_products
        self.name = f"arb@{self.prec}"
        self.uncertain_branches = 0
        self.range_errors = 0  # arb has no range limit; kept for the Arith bookkeeping
        self._undecided: dict[int, BranchMask] = {}  # masks with undecided elements, by id
        self._unioned: set[int] = set()  # ... of which where() took both branches

    def _p(self) -> _Prec:
        return _Prec(self.prec)

    # ---- construction -------------------------------------------------------------------
    def asarray(self, x: Any) -> np.ndarray:
        arr = np.asarray(x)
        if arr.dtype == object:
            return arr  # already balls (parameters of an exact run)
        return _to_arb(np.asarray(arr, dtype=np.float64))

    def const(self, value: float) -> Any:
        return arb(float(value))

    # ---- arithmetic ---------------------------------------------------------------------
    def add(self, a: Any, b: Any) -> np.ndarray:
        with self._p():
            return _obj(np.add(a, b))

    def sub(self, a: Any, b: Any) -> np.ndarray:
        with self._p():
            return _obj(np.subtract(a, b))

    def mul(self, a: Any, b: Any) -> np.ndarray:
        with self._p():
            return _obj(np.multiply(a, b))

    def div(self, a: Any, b: Any) -> np.ndarray:
        with self._p():
            return _obj(np.true_divide(a, b))

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m, n = a.shape
        p = b.shape[1]
        if m == 0 or n == 0 or p == 0:
            return _obj(np.full((m, p), arb(0), dtype=object))
        if self.slice_products and arb_slices.usable(a, b, self.prec):
            done = arb_slices.matmul(a, b, self.prec)
            if done is not None:
                return done
        if arb_kernels.usable(a, b):  # 2-D object arrays of matching shapes, small enough
            try:  # arb_mat's balls without its copies (fpgrad.arith.arb_kernels)
                return arb_kernels.matmul(a, b, self.prec)
            except TypeError:  # an element that is not an arb ball: arb_mat converts it
                pass
        with self._p():
            prod = _as_mat(a) * _as_mat(b)
            # fromiter: no per-element probing for nested sequences (np.array does that)
            return np.fromiter(prod.entries(), dtype=object, count=m * p).reshape(m, p)

    def adam_update(
        self, m: np.ndarray, v: np.ndarray, g: np.ndarray, w: np.ndarray, scalars: list[Any]
    ) -> tuple[np.ndarray, ...] | None:
        """Adam's new m, v, update and parameter in one pass, the balls of the optimizer's
        own operations (:func:`fpgrad.arith.arb_kernels.adam_update`); None: not here."""
        balls = [np.asarray(c, dtype=object).item() for c in scalars]
        if any(type(c) is not arb for c in balls):
            return None
        return arb_kernels.adam_update(m, v, g, w, balls, self.prec)

    def sum(self, a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
        with self._p():
            if a.shape[axis] == 0:
                shape = list(a.shape)
                shape[axis] = 1
                out = np.full(shape, arb(0), dtype=object)
                return _obj(out if keepdims else np.squeeze(out, axis))
            return _obj(np.sum(a, axis=axis, keepdims=keepdims))

    def max(self, a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
        """The largest element along ``axis``, as a ball containing the true maximum."""
        with self._p():
            return _obj(_MAX.reduce(_obj(a), axis=axis, keepdims=keepdims))

    # ---- elementary functions -----------------------------------------------------------
    def exp(self, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_EXP(a))

    def log(self, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_LOG(a))

    def log1p(self, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_LOG1P(a))

    def tanh(self, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_TANH(a))

    def sigmoid(self, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_SIGMOID(a))

    def sqrt(self, a: np.ndarray) -> np.ndarray:
        arr = _obj(a)
        with self._p():
            if arr.ndim == 0:
                return _obj(_SQRT(arr))
            # balls entirely >= 0 (the usual case) need no cut: Arb's sqrt directly
            plain = np.asarray(np.greater_equal(arr, _ZERO), dtype=bool)
            out = _obj(_ARB_SQRT(arr))
            if not plain.all():
                out[~plain] = _SQRT(arr[~plain])
            return out

    def ncdf(self, a: np.ndarray) -> np.ndarray:
        """The standard normal CDF, erfc(-x / sqrt 2) / 2 (no cancellation in the left tail)."""
        with self._p():
            return _obj(_NCDF(a))

    def npdf(self, a: np.ndarray) -> np.ndarray:
        """The standard normal density exp(-x^2 / 2) / sqrt(2 pi)."""
        with self._p():
            return _obj(_NPDF(a))

    def abs(self, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_ABS(a))

    def neg(self, a: np.ndarray) -> np.ndarray:
        return _obj(-a)

    # ---- branches -----------------------------------------------------------------------
    def positive(self, a: np.ndarray) -> BranchMask:
        """a > 0 where the ball decides it; ``unsure`` where it contains 0 and is not 0."""
        arr = _obj(a)
        # arb's comparisons are True only where every point of the ball satisfies them
        both = arb_kernels.signs(arr, _ZERO) if arr.size else None
        if both is not None:
            yes, no = both
        else:
            yes = np.asarray(np.greater(arr, _ZERO), dtype=bool)
            no = np.asarray(np.less_equal(arr, _ZERO), dtype=bool)
        unsure = ~(yes | no)
        n = int(unsure.sum())
        self.uncertain_branches += n
        mask = yes.view(BranchMask)
        mask.unsure = unsure
        if n:
            self._undecided[id(mask)] = mask
        return mask

    def untracked(self) -> bool:
        """Did a mask with undecided elements never reach :meth:`where` itself (a mask
        derived from it was used instead, so the union of both branches was not taken)?"""
        return any(key not in self._unioned for key in self._undecided)

    def where(self, mask: np.ndarray, a: Any, b: Any) -> np.ndarray:
        out = _obj(np.where(mask, a, b))
        unsure = getattr(mask, "unsure", None)
        if unsure is not None and unsure.any():  # both branches possible: their union
            self._unioned.add(id(mask))
            shape = out.shape
            aa = np.broadcast_to(_obj(a), shape)
            bb = np.broadcast_to(_obj(b), shape)
            u = np.broadcast_to(unsure, shape)
            with self._p():
                out[u] = _UNION(aa[u], bb[u])
        return out

    def to_float64(self, a: Any) -> np.ndarray:
        arr = _obj(a)
        fast = arb_kernels.to_float64(arr) if arr.size else None
        if fast is not None:
            return fast
        return np.fromiter(map(float, arr.ravel()), np.float64, arr.size).reshape(arr.shape)

    # ---- cancellation-free derivatives --------------------------------------------------
    def tanh_deriv(self, z: np.ndarray, t: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_SECH2(z))  # 1 - tanh^2 = sech^2

    def sigmoid_deriv(self, z: np.ndarray, s: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(s * _SIGMOID(-z))  # s (1 - s) = s(z) s(-z)

    # ---- the smooth activations' functions (fpgrad.graph.ops.smooth): Arb's own ----------
    def expm1(self, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_EXPM1(a))

    def erf(self, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_ERF(a))

    def sin(self, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_SIN(a))

    def cos(self, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_COS(a))

    def atan(self, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(_ATAN(a))

    def atan2(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Arb's atan2: where y's ball contains 0 and x's reaches x <= 0 the ball spans the
        cut (+-pi), nothing certified there."""
        with self._p():
            return _obj(_ATAN2(y, x))


def _flint_unary(name: str) -> Any:
    """A method applying arb's ``name`` (NaN outside its domain: nothing certified there)."""
    f = np.frompyfunc(getattr(arb, name), 1, 1)

    def method(self: ArbArith, a: np.ndarray) -> np.ndarray:
        with self._p():
            return _obj(f(a))

    method.__name__ = name
    return method


for _name in ("sinh", "cosh", "tan", "asin", "acos", "asinh", "acosh", "atanh"):
    setattr(ArbArith, _name, _flint_unary(_name))

_EXPM1 = np.frompyfunc(arb.expm1, 1, 1)
_ERF = np.frompyfunc(arb.erf, 1, 1)
_SIN = np.frompyfunc(arb.sin, 1, 1)
_COS = np.frompyfunc(arb.cos, 1, 1)
_ATAN = np.frompyfunc(arb.atan, 1, 1)
_ATAN2 = np.frompyfunc(arb.atan2, 2, 1)


# ---- reading balls back ---------------------------------------------------------------------
_MID_MAN_EXP = np.frompyfunc(lambda v: v.mid().man_exp(), 1, 1)


def to_mpf(values: np.ndarray, prec: int) -> np.ndarray:
    """Exact midpoints as mpmath mpf (in a context wide enough to hold them exactly)."""
    c = mpmath.MPContext()
    c.prec = prec + 64
    flat = _obj(values).ravel()
    out = np.empty(flat.size, dtype=object)
    for i, v in enumerate(flat):
        mid = v.mid()
        if not mid.is_finite():  # a NaN ball (Arb gave up): no midpoint to report
            out[i] = c.mpf("nan")
            continue
        man, exp = mid.man_exp()
        out[i] = c.mpf((int(man), int(exp))) if man != 0 else c.mpf(0)
    return out.reshape(np.shape(values))


def radii(values: np.ndarray) -> np.ndarray:
    """Radii as float64, rounded up (inf where beyond float64's range)."""
    flat = _obj(values).ravel()
    out = np.empty(flat.size)
    for i, v in enumerate(flat):
        r = v.rad()
        if r == 0:
            out[i] = 0.0
            continue
        if not r.is_finite():  # Arb gave up on this value: an unbounded ball
            out[i] = math.inf
            continue
        man, exp = r.mid().man_exp()
        man, exp = int(man), int(exp)
        if exp + man.bit_length() > 1024:  # beyond float64: no finite bound to give
            out[i] = math.inf
            continue
        f = math.ldexp(float(man), exp)  # float(man) is exact: Arb radii carry 30 bits
        out[i] = np.nextafter(f, np.inf)  # ldexp may round (subnormal range): step up once
    return out.reshape(np.shape(values))


_REL_BITS = np.frompyfunc(arb.rel_accuracy_bits, 1, 1)


def rel_bits(values: np.ndarray) -> np.ndarray:
    """Relative accuracy of every ball in bits (FLINT's estimate of -log2(rad/|mid|));
    ``inf`` for exact values, negative when the ball contains 0."""
    bits = np.asarray(_REL_BITS(_obj(values)), dtype=np.int64).reshape(np.shape(values))
    return np.where(bits >= _EXACT_BITS - 1, math.inf, bits.astype(np.float64))


def min_rel_bits(values: np.ndarray) -> int | None:
    """The lowest relative accuracy in bits (:func:`rel_bits`) of the balls that are neither
    exact nor contain 0; None when there is none."""
    bits = np.asarray(_REL_BITS(_obj(values)), dtype=np.int64).ravel()
    bits = bits[(bits > 0) & (bits < _EXACT_BITS - 1)]
    return int(bits.min()) if bits.size else None


def exact_zero(values: np.ndarray) -> np.ndarray:
    """Balls that are exactly 0 (radius 0 at 0)."""
    return np.asarray(np.frompyfunc(arb.is_zero, 1, 1)(_obj(values)), dtype=bool)


def contains_zero(values: np.ndarray) -> np.ndarray:
    """Balls that contain 0, or that are not finite (NaN or unbounded: no sign is known)."""
    test = np.frompyfunc(lambda v: (0 in v) or not v.is_finite(), 1, 1)
    return np.asarray(test(_obj(values)), dtype=bool)
