"""The exact reference: mpmath at N bits, certified by a second evaluation at 2N bits.

Every value of the trace (loss, forward values, backward signals, gradients) is compared
between the two evaluations; the number of significant decimal digits on which they agree
is its certified precision, and the minimum over all values is the run's certificate. The
2N-bit values are the ones reported.

Values that are zero in both evaluations are exact zeros (the exact number system uses
cancellation-free formulas for saturating functions, so saturation never rounds it to 0).
A value that does not agree between the two evaluations, lies below ``2**-(N/2)`` times the
largest value of its array at N bits, and shrinks by at least ``2**(N/2)`` when the
precision doubles is *vanishing*: rounding noise around an exact zero (cancellation, e.g. the
gradient of a bias before batch norm). It is reported as zero, counted separately, never as
certified digits. A genuinely tiny value keeps its size when the precision doubles, so it is
never taken for noise: it either certifies or fails certification.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mpmath
import numpy as np

from fpgrad.arith.mp import MPArith
from fpgrad.errors import InputError
from fpgrad.evaluate import Trace, evaluate
from fpgrad.network import Network

DEFAULT_BITS = 256
MIN_BITS = 64
REQUIRED_DIGITS = 17  # enough to round correctly into float64 and every smaller format


@dataclass
class ExactResult:
    """A certified exact trace.

    ``trace`` holds mpf arrays at 2N bits with vanishing values replaced by exact zeros;
    ``digits`` maps each value's key ("grads/dense0.weight", ...) to an array of certified
    significant digits (inf for exact zeros).
    """

    trace: Trace
    bits: int
    certified_digits: float
    digits: dict[str, np.ndarray]
    vanishing: int
    vanishing_bound_bits: int


def exact_trace(
    net: Network, bits: int = DEFAULT_BITS, *, allow_uncertified: bool = False
) -> ExactResult:
    """Evaluate ``net`` exactly (mpmath at ``bits`` and ``2*bits``) and certify the digits."""
    if bits < MIN_BITS:
        raise InputError(
            f"--exact-bits {bits} is too low: use at least {MIN_BITS} (default {DEFAULT_BITS})"
        )
    low = evaluate(net, MPArith(bits))
    high = evaluate(net, MPArith(2 * bits))
    cap = math.floor(bits * math.log10(2))  # what N bits can carry at most
    digits: dict[str, np.ndarray] = {}
    vanishing = 0
    bound_bits = bits // 2
    for key, lo, hi, setter in _pairs(low, high):
        lo_arr = np.asarray(lo, dtype=object)
        hi_arr = np.asarray(hi, dtype=object)
        d, vanish = _agreement(lo_arr, hi_arr, cap, bound_bits)
        if vanish.any():
            vanishing += int(vanish.sum())
            hi_arr = np.where(vanish, mpmath.mpf(0), hi_arr)
            setter(hi_arr if hi_arr.ndim else hi_arr[()])
        digits[key] = d
    certified = min((float(d.min()) for d in digits.values() if d.size), default=float(cap))
    certified = min(certified, float(cap))
    result = ExactResult(high, bits, certified, digits, vanishing, bound_bits)
    if certified < REQUIRED_DIGITS and not allow_uncertified:
        worst = min(digits, key=lambda k: float(digits[k].min()) if digits[k].size else math.inf)
        raise InputError(
            f"the exact reference certifies only {certified:.1f} digits at {bits} bits "
            f"(worst: {worst}); raise --exact-bits or pass --allow-uncertified"
        )
    return result


def _pairs(low: Trace, high: Trace) -> Iterator[tuple[str, Any, Any, Any]]:
    """(key, low value, high value, setter of the high value) for every value of a trace."""

    def setter_for(mapping: dict[str, Any], name: str):  # noqa: ANN202
        def set_value(value: Any) -> None:
            mapping[name] = value

        return set_value

    def set_loss(value: Any) -> None:
        high.loss = value

    yield "loss", low.loss, high.loss, set_loss
    for section in ("forward", "backward", "grads"):
        lo_map, hi_map = getattr(low, section), getattr(high, section)
        for name in lo_map:
            yield f"{section}/{name}", lo_map[name], hi_map[name], setter_for(hi_map, name)


def _agreement(
    lo: np.ndarray, hi: np.ndarray, cap: int, bound_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Certified digits per element, and the mask of vanishing elements."""
    flat_lo, flat_hi = lo.ravel(), hi.ravel()
    scale = max((abs(v) for v in flat_lo), default=mpmath.mpf(0))
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
        if d < REQUIRED_DIGITS and a != 0 and abs(a) <= bound and abs(b) <= abs(a) * shrink:
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
