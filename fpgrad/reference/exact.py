"""The exact reference: every value of a trace enclosed by rigorous balls, and certified.

Every value is a ball (midpoint and radius) that provably contains the exact value: the result
of the network's mathematics on the float64 parameters and data as written. Two systems, one
result type (:class:`ExactResult`):

* ``"fast"`` (tried first when ``bits <= 150``): multi-word float64 balls
  (:mod:`fpgrad.arith.ball`) at 100 or 150 bits.
* ``"arb"``: python-flint's Arb balls (:mod:`fpgrad.arith.arb`) at escalating precision
  (256, 1024, 4096 ... bits, up to ``max_bits``, default 8192).

The fast run stands only when it vouches for everything it reports: every value in range
(lazy products included), every ReLU branch decided, every value an exact zero or certified to
:data:`REQUIRED_DIGITS` digits. Otherwise the network is evaluated again in Arb balls, at a
precision raised until the same holds or the cap is reached.

What a result claims, per element (:meth:`ExactResult.zero`, :meth:`ExactResult.undetermined`):

* **exact zero**: the ball is exactly {0}: a product with an exact 0 (a dead unit's mask), a
  sum of exact zeros (in a matrix product: every term with a proven-zero factor, decided on
  the supports, :func:`fpgrad.arith.ball._prove_zeros`), rational arithmetic on float64 values carried out exactly (Arb at a
  precision that holds the result), or a structural identity stated in
  :mod:`fpgrad.run.evaluate` (the bias of a layer feeding batch norm);
* **undetermined**: the ball still contains 0 at the cap; reported with its bound
  ``|e| <= rad``, never as a zero and never with digits;
* **certified**: the ball excludes 0; its digits are ``-log10(rad / |mid|)``, so the sign and
  every reported digit are proven.

The digits of ball arrays and their decimal strings (:func:`ball_digits`, :func:`arb_digits`,
:func:`decimal_string`, ...) live in :mod:`fpgrad.reference.digits` and are imported here.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import mpmath
import numpy as np

from fpgrad.arith import arb as arbmod
from fpgrad.arith import expansion
from fpgrad.arith.arb import ArbArith
from fpgrad.arith.ball import HI_BOUND, Ball, BallArith
from fpgrad.arith.ball import LEVELS as FAST_LEVELS
from fpgrad.arith.ball import MAX_BITS as FAST_MAX_BITS
from fpgrad.errors import InputError
from fpgrad.model.network import Network
from fpgrad.reference.array import ExactArray
from fpgrad.reference.digits import (
    LazyDigits,
    arb_digits,
    ball_flags,
    hi_lo_arb,
    min_digits,
    uncertified_fix,
)
from fpgrad.reference.digits import arb_min_digits as arb_min_digits  # re-exported
from fpgrad.reference.digits import ball_digits as ball_digits  # re-exported
from fpgrad.reference.digits import ball_summary as ball_summary  # re-exported
from fpgrad.reference.digits import decimal_string as decimal_string  # re-exported
from fpgrad.run.evaluate import Trace

DEFAULT_BITS = 150  # the fast path's top level
MIN_BITS = 64
DEFAULT_MAX_BITS = 8192  # the cap of the Arb escalation (--exact-max-bits)
MAX_MAX_BITS = 65536  # the most any caller may ask for
ARB_START_BITS = 256
ARB_GROWTH = 4  # each escalation multiplies the precision by this
REQUIRED_DIGITS = 17  # enough to round correctly into float64 and every smaller format
METHODS = ("auto", "fast", "arb")
ALIASES = {"mpmath": "arb"}  # the old name of the fallback
#: work the Arb fallback may take on (trace elements; multiply-adds of the matrix products)
ARB_MAX_VALUES = 2_000_000
ARB_MAX_MACS = 60_000_000
#: memory the Arb fallback may use: it holds every value of the trace and a few temporaries,
#: each an object of about 64 + prec / 8 bytes; a precision beyond this budget is not tried
ARB_MEMORY = 2 * 2**30


@dataclass
class ExactResult:
    """A certified exact trace.

    Per value key ("loss", "forward/dense0", "backward/dense0", "grads/dense0.weight", ...):
    ``digits[key]`` certified significant digits (inf for exact zeros, 0 for undetermined
    elements), :meth:`zero` proven exact zeros, :meth:`undetermined` balls that contain 0 at
    the cap, :meth:`enclosure` midpoints (mpf) and radii (float64, rounded up). ``method``:
    "fast" or "arb"; ``bits``: the working precision of the evaluation that stands;
    ``certified_digits``: the minimum over elements that are neither zero nor undetermined.
    ``raw``: what the evaluation returned (a :class:`~fpgrad.run.evaluate.Trace` of balls for a
    layer network, a graph trace for a captured model).
    """

    bits: int
    certified_digits: float
    digits: MutableMapping[str, np.ndarray]
    method: str
    zeros: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    undetermined_masks: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    radii: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    #: why the precision was raised, in order ("fast@150: 2 ReLU inputs undecided", ...)
    escalations: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict, repr=False)
    raw: Any = field(default=None, repr=False)
    _trace: Trace | None = field(default=None, repr=False)
    _mids: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _arrays: dict[str, ExactArray] = field(default_factory=dict, repr=False)
    requested_bits: int = 0  #: the bits asked for (``bits`` is where the escalation ended)
    max_bits: int = DEFAULT_MAX_BITS  #: the cap of the escalation
    vanishing: int = 0  # no value is ever zeroed by a threshold (kept for old callers)
    vanishing_bound_bits: int = 0

    @property
    def undetermined_count(self) -> int:
        return int(sum(int(m.sum()) for m in self.undetermined_masks.values()))

    @property
    def trace(self) -> Trace:
        """A layer network's values as mpf arrays (exactly the balls' midpoints)."""
        if self._trace is None:
            assert isinstance(self.raw, Trace), "only layer networks have a Trace"
            self._trace = _map_trace(self.raw, self._to_mpf)
        return self._trace

    def _to_mpf(self, value: Any) -> Any:
        if isinstance(value, Ball):
            return expansion.to_mpf(value.mid, _mp_context(value.mid.shape[0]))
        return arbmod.to_mpf(value, self.bits)

    def keys(self) -> list[str]:
        return list(self.digits)

    def zero(self, key: str) -> np.ndarray:
        return self.zeros[key]

    def undetermined(self, key: str) -> np.ndarray:
        return self.undetermined_masks[key]

    def midpoints(self, key: str) -> np.ndarray:
        """The midpoints of ``key`` as an mpf object array (exactly)."""
        if key not in self._mids:
            self._mids[key] = np.asarray(self._to_mpf(self.values[key]), dtype=object)
        return self._mids[key]

    def enclosure(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(midpoints as an mpf object array, radii): ``|exact - mid| <= rad`` elementwise."""
        return self.midpoints(key), self.radii[key]

    def exact_array(self, key: str) -> ExactArray:
        """The value of ``key`` as hi + lo float64 pairs with its zero and undetermined
        masks and radii (the interchange format of verdicts)."""
        if key not in self._arrays:
            value = self.values[key]
            if isinstance(value, Ball):
                hi, lo = expansion.hi_lo(value.mid)
            else:
                hi, lo = hi_lo_arb(value)
            zero = self.zeros[key]
            und = self.undetermined_masks[key]
            hi = np.where(zero | und, 0.0, hi)
            lo = np.where(zero | und, 0.0, lo)
            self._arrays[key] = ExactArray(hi, lo, zero, self.radii[key], und)
        return self._arrays[key]

    def words(self, key: str, flat: np.ndarray) -> np.ndarray | None:
        """The fast method's midpoint words (k, len(flat)) of the elements ``flat`` of ``key``,
        whose exact sums are the values; None for Arb balls."""
        value = self.values[key]
        if not isinstance(value, Ball):
            return None
        mid = value.mid
        return mid.reshape(mid.shape[0], -1)[:, np.asarray(flat, dtype=np.int64)]

    def mp_values(self, key: str, flat: np.ndarray) -> np.ndarray:
        """The elements ``flat`` (row-major indices) of ``key`` as mpf objects (exactly the
        midpoints), converting only those."""
        value = self.values[key]
        idx = np.asarray(flat, dtype=np.int64)
        if isinstance(value, Ball):
            words = value.mid.reshape(value.mid.shape[0], -1)[:, idx]
            return expansion.to_mpf(words, _mp_context(value.mid.shape[0]))
        return arbmod.to_mpf(np.asarray(value, dtype=object).reshape(-1)[idx], self.bits)

    def nonzero(self, value: Any) -> np.ndarray:
        """Mask of the elements of a value of this result's system (any intermediate) that
        are certainly non-zero (balls that exclude 0)."""
        if isinstance(value, Ball):
            with np.errstate(invalid="ignore"):
                return np.abs(value.mid[0]) / HI_BOUND > value.rad
        return ~arbmod.contains_zero(value)


#: an evaluation: a number system in, (every value by key, what the evaluation returned) out
Run = Callable[[Any], tuple[list[tuple[str, Any]], Any]]


@dataclass
class Work:
    """What an evaluation holds and computes, for the Arb fallback's bounds."""

    values: int  #: elements held (data, parameters, intermediates)
    macs: int  #: multiply-adds of the matrix products
    matmuls: int = 0  #: matrix products (for the progress bar)


def certify(
    run: Run,
    work: Work,
    bits: int = DEFAULT_BITS,
    *,
    allow_uncertified: bool = False,
    method: str = "auto",
    progress: bool | None = None,
    max_bits: int = DEFAULT_MAX_BITS,
) -> ExactResult:
    """Enclose every value ``run`` produces in certified balls (see
    :func:`fpgrad.graph.layers.exact_trace`):
    fast balls first, then Arb at escalating precision up to ``max_bits`` or the memory
    bound of ``work``."""
    method = ALIASES.get(method, method)
    if method not in METHODS:
        raise InputError(f"unknown exact method {method!r}; use one of {', '.join(METHODS)}")
    if bits < MIN_BITS:
        raise InputError(
            f"--exact-bits {bits} is too low: use at least {MIN_BITS} (default {DEFAULT_BITS})"
        )
    if not MIN_BITS <= max_bits <= MAX_MAX_BITS:
        raise InputError(
            f"--exact-max-bits {max_bits} is out of range: use {MIN_BITS} .. {MAX_MAX_BITS} "
            f"(default {DEFAULT_MAX_BITS})"
        )
    if bits > max_bits:
        raise InputError(
            f"--exact-bits {bits} is above the cap --exact-max-bits {max_bits}: raise the cap"
        )
    if method == "fast" and bits > FAST_MAX_BITS:
        raise InputError(
            f"the fast exact path carries at most {FAST_MAX_BITS} bits; asked for {bits}"
        )
    escalations: list[str] = []
    too_big = _arb_too_big(work)
    if method != "arb" and bits <= FAST_MAX_BITS:
        level = min(b for b in FAST_LEVELS if b >= bits)
        fast, why, sound = _fast(run, work, level, progress)
        if not why:
            return _check(_finish(fast, bits, max_bits), allow_uncertified)
        if method == "fast":
            if sound:
                return _check(_finish(fast, bits, max_bits), allow_uncertified)
            raise InputError(
                f"the fast exact path cannot certify this network ({why}); use method='arb'"
            )
        escalations.append(f"fast@{level}: {why}")
        if too_big:
            if sound:  # the fast balls are enclosures: report what they prove
                fast.escalations = [*escalations, f"arb not tried: {too_big}"]
                return _check(_finish(fast, bits, max_bits), allow_uncertified)
            raise InputError(
                f"the fast exact path cannot certify this network ({why}) and it is too large "
                f"for the certified fallback ({too_big}); use a smaller batch or model"
            )
    elif too_big:
        raise InputError(
            f"the network is too large for the certified Arb reference ({too_big}); "
            "use --exact-bits 150 or less (the fast path), or a smaller batch or model"
        )
    result = _arb(run, work, max(bits, ARB_START_BITS), max_bits, progress, escalations)
    return _check(_finish(result, bits, max_bits), allow_uncertified)


def _finish(result: ExactResult, bits: int, max_bits: int) -> ExactResult:
    result.requested_bits, result.max_bits = bits, max_bits
    return result


def _check(result: ExactResult, allow_uncertified: bool) -> ExactResult:
    if result.certified_digits < REQUIRED_DIGITS and not allow_uncertified:
        digits = result.digits
        worst = min(digits, key=lambda k: min_digits(digits[k], result.undetermined_masks[k]))
        fix = uncertified_fix(result.escalations, result.bits)
        raise InputError(
            f"the exact reference certifies only {result.certified_digits:.1f} digits at "
            f"{result.bits} bits (worst: {worst}); {fix}"
        )
    return result


def layer_work(net: Network) -> Work:
    """Values and multiply-adds of one evaluation of a layer network."""
    batch = int(net.x.shape[0])
    values = net.x.size + sum(v.size for v in net.params.values())
    macs = matmuls = 0
    width = int(net.x.shape[1])
    for layer in net.layers:
        if layer.kind == "dense":
            out = int(net.params[f"{layer.name}.weight"].shape[0])
            macs += 3 * batch * width * out
            matmuls += 3
            width = out
        values += 2 * batch * width
    return Work(int(values), int(macs), matmuls)


def _arb_memory_bits(work: Work) -> int:
    """The highest Arb precision whose evaluation fits :data:`ARB_MEMORY`."""
    per_value = ARB_MEMORY / (4 * max(1, work.values))  # the trace and 3x temporaries
    return max(ARB_START_BITS, int((per_value - 64) * 8))


def _arb_too_big(work: Work) -> str:
    """Why the Arb fallback would take more than its bound of work ('' when it would not)."""
    if work.values > ARB_MAX_VALUES:
        return f"{work.values:,} values, above its bound of {ARB_MAX_VALUES:,}"
    if work.macs > ARB_MAX_MACS:
        return f"{work.macs:,} multiply-adds, above its bound of {ARB_MAX_MACS:,}"
    return ""


def _summarise(
    items: list[tuple[str, Any]],
    digits_of: Any,
    cap: float,
) -> tuple[LazyDigits, dict[str, np.ndarray], dict[str, np.ndarray], dict, float]:
    """digits (made when read where ``digits_of`` gives None), zeros, undetermined, radii, min."""
    digits = LazyDigits(cap)
    zeros: dict[str, np.ndarray] = {}
    undet: dict[str, np.ndarray] = {}
    rads: dict[str, np.ndarray] = {}
    worst = cap
    for key, value in items:
        d, z, u, r, *low = digits_of(value, cap)  # the least kept digits, when given
        zeros[key], undet[key], rads[key] = z, u, r
        if d is None:  # ball_flags: made when read
            digits.add(key, value)
        else:
            digits[key] = d
        if low:
            worst = min(worst, low[0])
            continue
        kept = d[~(z | u)]
        if kept.size:
            worst = min(worst, float(kept.min()))
    return digits, zeros, undet, rads, worst


def _fast(run: Run, work: Work, bits: int, progress: bool | None) -> tuple[ExactResult, str, bool]:
    """Ball evaluation: (result, why it cannot stand ('' when it can), whether its balls are
    sound enclosures: False after a range error, an undecided branch or a NaN radius)."""
    ar = BallArith(bits)
    # overflow or underflow inside the float64 words is counted in ar.range_errors
    with (
        np.errstate(all="ignore"),
        _Progress(work.matmuls, progress, f"exact (fast, {bits} bits)") as bar,
    ):
        items, raw = run(bar.wrap(ar))
        for _, ball in items:  # compute the lazy products now, so their range is checked
            ball.rad  # noqa: B018
    cap = math.floor(bits * math.log10(2))
    result = _result(items, raw, ball_flags, cap, bits, "fast")
    n_und = result.undetermined_count
    # a NaN radius or word 0 makes its element undetermined (ball_digits): none without
    broken = n_und and sum(int(np.isnan(b.rad).sum() + np.isnan(b.mid[0]).sum()) for _, b in items)
    if broken:  # 0 * inf in a radius formula: those balls are no enclosures
        return result, f"{broken} values with a NaN radius or midpoint", False
    if ar.range_errors:
        return result, f"{ar.range_errors} values outside 2**-800 .. 2**800", False
    if ar.uncertain_branches:
        return result, f"{ar.uncertain_branches} ReLU inputs too close to 0 to decide", False
    if n_und:
        return result, f"{n_und} values whose balls contain 0", True
    if result.certified_digits < REQUIRED_DIGITS:
        return result, f"{result.certified_digits:.1f} certified digits", True
    return result, "", True


def _result(
    items: list[tuple[str, Any]], raw: Any, digits_of: Any, cap: float, bits: int, method: str
) -> ExactResult:
    digits, zeros, undet, rads, worst = _summarise(items, digits_of, cap)
    return ExactResult(bits, worst, digits, method, zeros, undet, rads, values=dict(items), raw=raw)


def _arb(
    run: Run,
    work: Work,
    start: int,
    cap_bits: int,
    progress: bool | None,
    escalations: list[str],
) -> ExactResult:
    memory_bits = _arb_memory_bits(work)
    if memory_bits < cap_bits:
        cap_bits = max(min(start, cap_bits), memory_bits)
        escalations.append(f"arb: precision capped at {cap_bits} bits by the memory bound")
    prec = min(start, cap_bits)
    while True:
        ar = ArbArith(prec)
        with _Progress(work.matmuls, progress, f"exact (arb, {prec} bits)") as bar:
            items, raw = run(bar.wrap(ar))
        result = _result(items, raw, arb_digits, math.floor(prec * math.log10(2)), prec, "arb")
        if ar.untracked():  # an undecided branch was taken blindly: nothing is proven
            _all_undetermined(result)
        why = ""
        if ar.uncertain_branches:
            why = f"{ar.uncertain_branches} ReLU inputs undecided"
        elif result.undetermined_count:
            why = f"{result.undetermined_count} values whose balls contain 0"
        elif result.certified_digits < REQUIRED_DIGITS:
            why = f"{result.certified_digits:.1f} certified digits"
        if not why or prec >= cap_bits:
            if why:
                escalations.append(f"arb@{prec}: {why} (the cap)")
            result.escalations = list(escalations)
            return result
        escalations.append(f"arb@{prec}: {why}")
        prec = min(prec * ARB_GROWTH, cap_bits)


def _all_undetermined(result: ExactResult) -> None:
    """Withdraw every claim of ``result``: each value undetermined, unbounded."""
    for key, d in result.digits.items():
        result.digits[key] = np.zeros(d.shape)
        result.zeros[key] = np.zeros(d.shape, dtype=bool)
        result.undetermined_masks[key] = np.ones(d.shape, dtype=bool)
        result.radii[key] = np.full(d.shape, np.inf)
    result.certified_digits = 0.0


def trace_items(trace: Trace) -> Iterator[tuple[str, Any]]:
    """(key, value) of every value of a trace: the loss, forward, backward, gradients."""
    yield "loss", trace.loss
    for section in ("forward", "backward", "grads"):
        for name, value in getattr(trace, section).items():
            yield f"{section}/{name}", value


@functools.cache
def _mp_context(words: int) -> mpmath.ctx_mp.MPContext:
    """An mpmath context that holds the sum of ``words`` float64 words exactly."""
    ctx = mpmath.MPContext()
    ctx.prec = 53 * words + 64
    return ctx


def _map_trace(src: Trace, fn: Any) -> Trace:
    out = Trace(system=src.system, loss=None)
    loss = np.asarray(fn(src.loss), dtype=object)
    out.loss = loss[()] if loss.ndim == 0 else loss
    for section in ("forward", "backward", "grads"):
        dst = getattr(out, section)
        for name, value in getattr(src, section).items():
            dst[name] = fn(value)
    return out


class _Progress:
    """A tqdm bar over the matrix products of ``evaluations`` passes, shown after 2 s."""

    def __init__(self, matmuls: int, enabled: bool | None, desc: str) -> None:
        self.total = matmuls
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
        """``ar`` itself (its type unchanged: ops test it), its ``matmul`` advancing the bar."""
        if self.bar is None:
            return ar
        inner, bar = ar.matmul, self.bar

        def matmul(a: Any, b: Any) -> Any:
            out = inner(a, b)
            bar.update(1)
            return out

        ar.matmul = matmul
        return ar
