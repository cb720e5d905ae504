"""The exact reference: every value of a trace with its certified significant digits.

Two methods, one result type (:class:`ExactResult`):

* ``"fast"`` (the default for ``bits <= 150``): multi-word ball arithmetic
  (:mod:`fpgrad.arith.ball`). Each value carries a midpoint in 2 or 3 float64 words and a
  rigorous radius; its certified digits are ``-log10(radius / |midpoint|)``, so one
  evaluation certifies itself. Runs that leave what the fast path can vouch for (values
  outside 2**-800 .. 2**800, a ReLU input whose ball contains 0, fewer than 17 digits) fall
  back to mpmath under ``method="auto"``.
* ``"mpmath"``: mpmath at N bits, certified by a second evaluation at 2N bits. Every value
  is compared between the two evaluations; the number of significant decimal digits on which
  they agree is its certified precision. The 2N-bit values are the ones reported.

The minimum over all values is the run's certificate. Values that are zero in both
evaluations (or balls of radius 0 around 0) are exact zeros (the exact number systems use
cancellation-free formulas for saturating functions, so saturation never rounds them to 0).
A value that is not certified, lies below ``2**-(N/2)`` times the largest value of the trace,
and (mpmath) is exactly 0 at N bits or shrinks by at least ``2**(N/2)`` when the precision
doubles, or (fast) whose
ball contains 0 with ``2 * radius`` below that bound, is *vanishing*: rounding noise around
an exact zero (cancellation). It is reported as zero, counted separately, never as certified
digits. A genuinely tiny value keeps its size when the precision doubles (or has a small
ball), so it is never taken for noise: it either certifies or fails certification.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mpmath
import numpy as np

from fpgrad.arith import expansion
from fpgrad.arith.ball import LEVELS as FAST_LEVELS
from fpgrad.arith.ball import MAX_BITS as FAST_MAX_BITS
from fpgrad.arith.ball import Ball, BallArith
from fpgrad.arith.mp import MPArith
from fpgrad.errors import InputError
from fpgrad.evaluate import Trace, evaluate
from fpgrad.network import Network
from fpgrad.verdicts import ExactArray

DEFAULT_BITS = 150  # the fast path's top level; above FAST_MAX_BITS only mpmath can honour
MIN_BITS = 64
REQUIRED_DIGITS = 17  # enough to round correctly into float64 and every smaller format
METHODS = ("auto", "fast", "mpmath")


@dataclass
class ExactResult:
    """A certified exact trace.

    ``digits`` maps each value's key ("loss", "forward/dense0", "grads/dense0.weight", ...) to
    an array of certified significant digits (inf for exact zeros). ``method`` says which
    system computed it: "mpmath" (two precisions, N and 2N bits) or "fast" (multi-word balls,
    :mod:`fpgrad.arith.ball`). :meth:`exact_array` gives any value as an
    :class:`~fpgrad.verdicts.ExactArray` (``hi + lo`` float64 and an exact-zero mask), the
    interchange format, vectorised for the fast method. :attr:`trace` holds mpf arrays (at 2N
    bits for mpmath; the exact sums of the words for the fast method, built on first access,
    with vanishing values replaced by exact zeros in both).
    """

    bits: int
    certified_digits: float
    digits: dict[str, np.ndarray]
    vanishing: int
    vanishing_bound_bits: int
    method: str = "mpmath"
    _trace: Trace | None = field(default=None, repr=False)
    _balls: Trace | None = field(default=None, repr=False)
    _arrays: dict[str, ExactArray] = field(default_factory=dict, repr=False)

    @property
    def trace(self) -> Trace:
        if self._trace is None:
            assert self._balls is not None
            self._trace = _mp_trace(self._balls, self.bits)
        return self._trace

    def keys(self) -> list[str]:
        return list(self.digits)

    def exact_array(self, key: str) -> ExactArray:
        """The value of ``key`` as hi + lo float64 pairs and an exact-zero mask."""
        if key not in self._arrays:
            if self._balls is not None:
                ball = _lookup(self._balls, key)
                hi, lo = expansion.hi_lo(ball.mid)
                self._arrays[key] = ExactArray(hi, lo, ball.mid[0] == 0)
            else:
                self._arrays[key] = ExactArray.from_mp(
                    np.asarray(_lookup(self.trace, key), dtype=object)
                )
        return self._arrays[key]

    def words(self, key: str, flat: np.ndarray) -> np.ndarray | None:
        """The fast method's midpoint words (k, len(flat)) of the elements ``flat`` of ``key``,
        whose exact sums are the values; None for the mpmath method."""
        if self._balls is None:
            return None
        mid = _lookup(self._balls, key).mid
        return mid.reshape(mid.shape[0], -1)[:, np.asarray(flat, dtype=np.int64)]

    def mp_values(self, key: str, flat: np.ndarray) -> np.ndarray:
        """The elements ``flat`` (row-major indices) of ``key`` as mpf objects, converting only
        those (the fast method's word sums, as :attr:`trace` would hold them)."""
        if self._trace is None and self._balls is not None:
            mid = _lookup(self._balls, key).mid
            words = mid.reshape(mid.shape[0], -1)[:, np.asarray(flat, dtype=np.int64)]
            return expansion.to_mpf(words, _mp_context(self.bits))
        return np.asarray(_lookup(self.trace, key), dtype=object).reshape(-1)[flat]


def exact_trace(
    net: Network,
    bits: int = DEFAULT_BITS,
    *,
    allow_uncertified: bool = False,
    method: str = "auto",
    progress: bool | None = None,
) -> ExactResult:
    """Evaluate ``net`` exactly and certify the digits of every value.

    ``method="mpmath"``: mpmath at ``bits`` and ``2*bits``, certified by agreement.
    ``method="fast"``: multi-word ball arithmetic at the fast level at or above ``bits``
    (100: double-double, 150: triple-double; at most 150), certified by its rigorous radii;
    an InputError when the network leaves what the fast path can certify. ``method="auto"`` (default): the fast path when
    ``bits <= 150``, and mpmath whenever the fast path cannot certify the run (range, an
    uncertain ReLU branch, fewer than 17 digits).
    ``progress``: a tqdm bar on stderr for runs longer than 2 s; None: only when stderr is a
    terminal.
    """
    if method not in METHODS:
        raise InputError(f"unknown exact method {method!r}; use one of {', '.join(METHODS)}")
    if bits < MIN_BITS:
        raise InputError(
            f"--exact-bits {bits} is too low: use at least {MIN_BITS} (default {DEFAULT_BITS})"
        )
    if method == "fast" and bits > FAST_MAX_BITS:
        raise InputError(
            f"the fast exact path carries at most {FAST_MAX_BITS} bits; asked for {bits}"
        )
    if method != "mpmath" and bits <= FAST_MAX_BITS:
        level = min(b for b in FAST_LEVELS if b >= bits)
        result, why = _fast(net, level, progress)
        if result is not None and (result.certified_digits >= REQUIRED_DIGITS or method == "fast"):
            return _check(result, allow_uncertified)
        if method == "fast":
            raise InputError(
                f"the fast exact path cannot certify this network ({why}); use method='mpmath'"
            )
    return _check(_mpmath(net, bits, progress), allow_uncertified)


def _check(result: ExactResult, allow_uncertified: bool) -> ExactResult:
    if result.certified_digits < REQUIRED_DIGITS and not allow_uncertified:
        digits = result.digits
        worst = min(digits, key=lambda k: float(digits[k].min()) if digits[k].size else math.inf)
        raise InputError(
            f"the exact reference certifies only {result.certified_digits:.1f} digits at "
            f"{result.bits} bits (worst: {worst}); raise --exact-bits or pass --allow-uncertified"
        )
    return result


def _mpmath(net: Network, bits: int, progress: bool | None) -> ExactResult:
    with _Progress(net, 2, progress, f"exact (mpmath {bits}/{2 * bits} bits)") as bar:
        low = evaluate(net, bar.wrap(MPArith(bits)))
        high = evaluate(net, bar.wrap(MPArith(2 * bits)))
    cap = math.floor(bits * math.log10(2))  # what N bits can carry at most
    digits: dict[str, np.ndarray] = {}
    vanishing = 0
    bound_bits = bits // 2
    pairs = list(_pairs(low, high))
    # noise around an exact zero is judged against the whole trace: a gradient that is zero
    # by cancellation (a bias before batch norm) is noise in every element of its array
    scale = max(
        (abs(v) for _, lo, _, _ in pairs for v in np.asarray(lo, dtype=object).ravel()),
        default=mpmath.mpf(0),
    )
    for key, lo, hi, setter in pairs:
        lo_arr = np.asarray(lo, dtype=object)
        hi_arr = np.asarray(hi, dtype=object)
        d, vanish = _agreement(lo_arr, hi_arr, cap, bound_bits, scale)
        if vanish.any():
            vanishing += int(vanish.sum())
            hi_arr = np.where(vanish, mpmath.mpf(0), hi_arr)
            setter(hi_arr if hi_arr.ndim else hi_arr[()])
        digits[key] = d
    certified = min((float(d.min()) for d in digits.values() if d.size), default=float(cap))
    certified = min(certified, float(cap))
    return ExactResult(bits, certified, digits, vanishing, bound_bits, "mpmath", _trace=high)


def _fast(net: Network, bits: int, progress: bool | None) -> tuple[ExactResult | None, str]:
    """Ball evaluation; (None, reason) when the run leaves what the fast path can certify."""
    ar = BallArith(bits)
    with _Progress(net, 1, progress, f"exact (fast, {bits} bits)") as bar:
        balls = evaluate(net, bar.wrap(ar))
    if ar.range_errors:
        return None, f"{ar.range_errors} values outside 2**-800 .. 2**800"
    if ar.uncertain_branches:
        return None, f"{ar.uncertain_branches} ReLU inputs too close to 0 to decide"
    cap = math.floor(bits * math.log10(2))
    bound_bits = bits // 2
    digits: dict[str, np.ndarray] = {}
    vanishing = 0
    items = list(_items(balls))
    scale = max(
        (float(np.max(np.abs(b.mid[0]))) for _, b, _ in items if b.mid[0].size), default=0.0
    )
    for key, ball, setter in items:
        d, vanish = ball_digits(ball, cap, bound_bits, scale)
        if vanish.any():
            vanishing += int(vanish.sum())
            mid = np.where(vanish, 0.0, ball.mid)
            setter(Ball(mid, np.where(vanish, 0.0, ball.rad)))
        digits[key] = d
    certified = min((float(d.min()) for d in digits.values() if d.size), default=float(cap))
    certified = min(certified, float(cap))
    return ExactResult(bits, certified, digits, vanishing, bound_bits, "fast", _balls=balls), ""


def ball_digits(
    ball: Ball, cap: int, bound_bits: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Certified digits per element (from the radius) and the mask of vanishing elements.

    Vanishing: the ball contains 0 and ``|value| <= 2 rad <= 2**-bound_bits`` times the
    largest midpoint of the trace (``scale``): zero to within the bound, as the mpmath path
    defines it.
    """
    m = np.abs(ball.mid[0])
    r = ball.rad
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.clip(-np.log10(r / m), 0.0, cap)
    d = np.where(r == 0, np.where(m == 0, np.inf, float(cap)), d)
    vanish = (r > 0) & (m <= r) & (2 * r <= scale * 2.0**-bound_bits)
    return np.where(vanish, np.inf, d), vanish


def _items(trace: Trace) -> Iterator[tuple[str, Any, Any]]:
    def setter_for(mapping: dict[str, Any], name: str):  # noqa: ANN202
        def set_value(value: Any) -> None:
            mapping[name] = value

        return set_value

    def set_loss(value: Any) -> None:
        trace.loss = value

    yield "loss", trace.loss, set_loss
    for section in ("forward", "backward", "grads"):
        mapping = getattr(trace, section)
        for name in mapping:
            yield f"{section}/{name}", mapping[name], setter_for(mapping, name)


def _lookup(trace: Trace, key: str) -> Any:
    if key == "loss":
        return trace.loss
    section, name = key.split("/", 1)
    return getattr(trace, section)[name]


@functools.cache
def _mp_context(bits: int) -> mpmath.ctx_mp.MPContext:
    """The mpmath context that holds the word sums of the fast level ``bits`` exactly enough."""
    ctx = mpmath.MPContext()
    ctx.prec = 53 * FAST_LEVELS[bits] + 64
    return ctx


def _mp_trace(balls: Trace, bits: int) -> Trace:
    """The ball midpoints as mpf object arrays (the exact word sums, rounded far below the radii)."""
    ctx = _mp_context(bits)
    out = Trace(system=balls.system, loss=None)
    loss = expansion.to_mpf(balls.loss.mid, ctx)
    out.loss = loss[()] if loss.ndim == 0 else loss
    for section in ("forward", "backward", "grads"):
        src, dst = getattr(balls, section), getattr(out, section)
        for name, ball in src.items():
            dst[name] = expansion.to_mpf(ball.mid, ctx)
    return out


class _Progress:
    """A tqdm bar over the matrix products of ``evaluations`` passes, shown after 2 s."""

    def __init__(self, net: Network, evaluations: int, enabled: bool | None, desc: str) -> None:
        dense = sum(1 for ly in net.layers if ly.kind == "dense")
        self.total = 3 * dense * evaluations
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Any = None
        self.desc = desc

    def __enter__(self) -> _Progress:
        if self.enabled and self.total:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                desc=self.desc,
                unit="matmul",
                delay=2.0,
                file=sys.stderr,
                leave=False,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def wrap(self, ar: Any) -> Any:
        return ar if self.bar is None else _Ticking(ar, self.bar)


class _Ticking:
    """An Arith that advances a progress bar after each matrix product."""

    def __init__(self, ar: Any, bar: Any) -> None:
        self._ar = ar
        self._bar = bar
        self.name = ar.name

    def matmul(self, a: Any, b: Any) -> Any:
        out = self._ar.matmul(a, b)
        self._bar.update(1)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ar, name)


def _pairs(low: Trace, high: Trace) -> Iterator[tuple[str, Any, Any, Any]]:
    """(key, low value, high value, setter of the high value) for every value of a trace."""
    for (key, lo, _), (_, hi, set_hi) in zip(_items(low), _items(high), strict=True):
        yield key, lo, hi, set_hi


def _agreement(
    lo: np.ndarray, hi: np.ndarray, cap: int, bound_bits: int, scale: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Certified digits per element, and the mask of vanishing elements.

    Vanishing: the two evaluations disagree, both lie below ``2**-bound_bits * scale`` (the
    largest value of the trace), and the value is exactly 0 at N bits or shrinks by at least
    ``2**bound_bits`` at 2N bits: the signature of rounding noise around an exact zero.
    """
    flat_lo, flat_hi = lo.ravel(), hi.ravel()
    bound = scale * mpmath.ldexp(1, -bound_bits)
    shrink = mpmath.ldexp(1, -bound_bits)
    out = np.empty(flat_hi.size)
    vanish = np.zeros(flat_hi.size, dtype=bool)
    for i, (a, b) in enumerate(zip(flat_lo, flat_hi, strict=True)):
        if a == b:
            out[i] = math.inf if b == 0 else cap
            continue
        if b == 0:
            rel = mpmath.mpf(1)
        else:
            rel = abs(a - b) / abs(b)
        d = float(-mpmath.log10(rel)) if rel > 0 else cap
        noise = a == 0 or abs(b) <= abs(a) * shrink
        if d < REQUIRED_DIGITS and abs(a) <= bound and abs(b) <= bound and noise:
            vanish[i] = True
            out[i] = math.inf
            continue
        out[i] = max(0.0, min(d, cap))
    return out.reshape(hi.shape), vanish.reshape(hi.shape)


def decimal_string(value: Any, digits: float) -> str:
    """``value`` as a decimal string with ``digits`` significant digits (all, for exact zeros)."""
    if value == 0:
        return "0"
    n = 40 if math.isinf(digits) else max(1, int(digits))
    ctx = getattr(value, "context", mpmath.mp)  # print in the value's own precision, never 53 bits
    return ctx.nstr(value, n, strip_zeros=False, min_fixed=1, max_fixed=0)
