"""Step functions: ``floor``, ``ceil``, ``trunc``, ``round`` (half to even; the
straight-through estimators of quantisation-aware training call them) and ``threshold``
(``nn.Threshold``).

Machines: numpy's ``floor``, ``ceil``, ``trunc``, ``rint`` of the format's values (exact: an
integer part of a binary float is a float of the same format) and torch's ``x <= t ? v : x``.
Exact systems: the integer ``n`` is a candidate from the float64 midpoint, then proven:
``n <= x < n + 1`` (floor), and so on, each bound by the system's exact sign test
(``positive``); a candidate one off (a midpoint rounded across an integer) moves by one, and a
ball the test cannot place (an integer inside it, not its value) is counted by ``positive``
and escalates, then ends undetermined. Their derivative is 0 (torch's backward is
``zeros_like``); ``threshold``'s is ``threshold_backward``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fpgrad.arith.base import ExactDerivatives
from fpgrad.errors import InputError
from fpgrad.graph import shapes
from fpgrad.graph.ops._util import above
from fpgrad.graph.ops.registry import op

#: float64 pieces of an integer part: 2^1024 falls below 2^53 in 20, each piece 2^-52 of the last
_PIECES = 40

_MACHINE = {"floor": np.floor, "ceil": np.ceil, "trunc": np.trunc, "round": np.rint}


def _pos(ar: Any, x: Any) -> np.ndarray:
    """x > 0, proven (an undecided element is counted by ``positive`` and escalates)."""
    return np.asarray(ar.positive(x), dtype=bool)


def _floor(ar: Any, x: Any) -> tuple[Any, Any]:
    """(floor(x), x - floor(x)) in the exact system: float64 integer parts of the remainder
    added up (each exact) until the remainder's float64 floor is -1, 0 or 1 (a value of many
    words far apart needs one piece per word), then the remainder proven in [0, 1), moved by one where
    it is not; a remainder that does not settle is refused, never returned unproven."""
    shape = shapes.shape(x)
    total, rest = ar.asarray(np.zeros(shape)), x
    for _ in range(_PIECES):  # each piece leaves at most half an ulp of the float: 2^-52 of it
        m = np.floor(np.asarray(ar.to_float64(rest), dtype=np.float64))
        if not np.isfinite(m).all():
            raise InputError("floor of a value beyond float64's range")
        if not (np.abs(m) > 1).any():  # rest in [-1, 2): the steps below place it
            break
        total, rest = ar.add(total, ar.asarray(m)), ar.sub(rest, ar.asarray(m))
    else:
        raise InputError(f"floor: the integer part did not settle in {_PIECES} pieces")
    undecided = getattr(ar, "uncertain_branches", 0)
    for _ in range(3):
        low = _pos(ar, ar.mul(rest, ar.const(-1.0)))  # rest < 0
        high = ~_pos(ar, ar.sub(ar.const(1.0), rest))  # not rest < 1
        step = high.astype(np.float64) - low
        if not step.any():
            return total, rest
        total, rest = ar.add(total, ar.asarray(step)), ar.sub(rest, ar.asarray(step))
    if getattr(ar, "uncertain_branches", 0) != undecided:  # counted: escalates, never claimed
        return total, rest
    raise InputError("floor: the fraction left is not proven in [0, 1)")


def _integral(cx: Any, x: Any, kind: str) -> Any:
    ar = cx.ar
    if not isinstance(ar, ExactDerivatives):
        return ar.asarray(_MACHINE[kind](np.asarray(x, dtype=np.float64)))
    f, frac = _floor(ar, x)
    if kind == "floor":
        return f
    up_one = ar.add(f, ar.const(1.0))
    if kind == "ceil":
        return ar.where(_pos(ar, frac), up_one, f)  # frac exactly 0: x is f
    if kind == "trunc":
        neg = _pos(ar, ar.mul(x, ar.const(-1.0)))
        return ar.where(neg & _pos(ar, frac), up_one, f)
    half = ar.sub(frac, ar.const(0.5))
    up = _pos(ar, half)
    tie = ~(up | _pos(ar, ar.mul(half, ar.const(-1.0))))  # frac exactly 1/2: to even
    odd = np.zeros(tie.shape, dtype=bool)
    if tie.any():  # f's parity, exactly: f - 2 floor(f / 2) > 0
        g, _ = _floor(ar, ar.mul(f, ar.const(0.5)))
        odd = _pos(ar, ar.sub(f, ar.mul(g, ar.const(2.0))))
    return ar.where(up | (tie & odd), up_one, f)


@op("aten.floor.default")
def floor(cx: Any, x: Any) -> Any:
    return _integral(cx, x, "floor")


@op("aten.ceil.default")
def ceil(cx: Any, x: Any) -> Any:
    return _integral(cx, x, "ceil")


@op("aten.trunc.default")
def trunc(cx: Any, x: Any) -> Any:
    return _integral(cx, x, "trunc")


@op("aten.round.default")
def round_(cx: Any, x: Any) -> Any:
    """Half to even, as torch (``torch.round``: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2)."""
    return _integral(cx, x, "round")


@op("aten.threshold.default", "aten.threshold_.default")
def threshold(cx: Any, x: Any, t: float, value: float) -> Any:
    """torch's ``x <= t ? value : x`` (NaN kept), ``value`` as the system's constant."""
    ar = cx.ar
    v = float(value) if isinstance(ar, ExactDerivatives) else float(np.float64(ar.const(float(value))))
    return ar.where(above(cx, x, float(t)), x, ar.asarray(np.full(shapes.shape(x), v)))


def _sides(cx: Any, x: Any, lambd: float) -> tuple[np.ndarray, np.ndarray]:
    """(x > lambd, x < -lambd) with ``lambd`` in the system: the exact systems' sign tests,
    a machine's comparisons of its values (NaN: neither)."""
    ar = cx.ar
    lam = ar.const(float(lambd))
    if isinstance(ar, ExactDerivatives):
        up = np.asarray(ar.positive(ar.sub(x, lam)), dtype=bool)
        down = np.asarray(ar.positive(ar.sub(ar.mul(x, ar.const(-1.0)), lam)), dtype=bool)
        return up, down
    v, lf = np.asarray(x, dtype=np.float64), float(np.float64(lam))
    with np.errstate(invalid="ignore"):
        return v > lf, v < -lf


def _outside(cx: Any, x: Any, lambd: float) -> np.ndarray:
    """torch's ``!(x >= -lambd && x <= lambd)`` with ``lambd`` in the system (NaN: True)."""
    up, down = _sides(cx, x, lambd)
    if isinstance(cx.ar, ExactDerivatives):  # no NaN there
        return up | down
    return up | down | np.isnan(np.asarray(x, dtype=np.float64))


@op("aten.hardshrink.default")
def hardshrink(cx: Any, x: Any, lambd: float = 0.5) -> Any:
    """x where |x| > lambd, else +0 (torch's kernel)."""
    return cx.ar.where(_outside(cx, x, lambd), x, cx.ar.asarray(np.zeros(shapes.shape(x))))


@op("aten.hardshrink_backward.default", "aten.softshrink_backward.default")
def shrink_backward(cx: Any, g: Any, x: Any, lambd: float) -> Any:
    return cx.ar.where(_outside(cx, x, lambd), g, cx.ar.asarray(np.zeros(shapes.shape(g))))


@op("aten.softshrink.default")
def softshrink(cx: Any, x: Any, lambd: float = 0.5) -> Any:
    """x - lambd above lambd, x + lambd below -lambd, x * 0 between (a signed zero). A
    machine narrower than float32 computes as torch's float16/bfloat16 kernel: in float32
    (lambd, the comparisons and the difference), then one rounding into the format."""
    ar = cx.ar
    lam = ar.const(float(lambd))
    fmt = getattr(ar, "fmt", None)
    if fmt is not None and fmt.precision < 24 and not isinstance(ar, ExactDerivatives):
        v = np.asarray(x, dtype=np.float64)
        l32 = np.float32(lambd)
        with np.errstate(invalid="ignore", over="ignore"):
            v32 = v.astype(np.float32)
            out = np.where(v > l32, ar._round((v32 - l32).astype(np.float64)), v * 0.0)
            return np.where(v < -l32, ar._round((v32 + l32).astype(np.float64)), out)
    up, down = _sides(cx, x, lambd)
    mid = ar.mul(x, ar.const(0.0))
    out = ar.where(down, ar.add(x, lam), mid) if down.any() else mid
    return ar.where(up, ar.sub(x, lam), out) if up.any() else out


@op("aten.rrelu_with_noise.default", "aten.rrelu_with_noise_backward.default")
def rrelu(cx: Any, *args: Any, **kwargs: Any) -> Any:
    """Randomized leaky ReLU in eval mode: leaky ReLU with slope (lower + upper) / 2 (torch's
    float64 value); training mode draws random slopes and is refused."""
    from fpgrad.errors import InputError
    from fpgrad.graph.ops.pointwise import leaky_relu, leaky_relu_backward

    backward = str(cx.node.target).startswith("aten.rrelu_with_noise_backward")
    names = ["g"] * backward + ["x", "noise", "lower", "upper", "training"]
    vals = dict(zip(names, args, strict=False)) | kwargs
    lower, upper = float(vals.get("lower", 1 / 8)), float(vals.get("upper", 1 / 3))
    if vals.get("training", False):
        raise InputError(f"{cx.label()}: RReLU in training mode draws random slopes; call model.eval()")
    slope = (lower + upper) / 2
    if backward:
        return leaky_relu_backward(cx, vals["g"], vals["x"], slope, False)
    return leaky_relu(cx, vals["x"], slope)


@op("aten.nan_to_num.default")
def nan_to_num(cx: Any, x: Any, nan: float | None = None, posinf: float | None = None,
               neginf: float | None = None) -> Any:  # fmt: skip
    """The exact systems hold no NaN or infinity: x itself. An emulated machine: NaN -> nan
    (0), +-inf -> posinf / neginf (the format's largest finite value by default), as torch."""
    ar = cx.ar
    if isinstance(ar, ExactDerivatives):
        return x
    big = float(ar.fmt.max)  # type: ignore[attr-defined]
    v = np.asarray(x, dtype=np.float64)
    fills = [float(np.float64(ar.const(float(f)))) if f is not None else d
             for f, d in ((nan, 0.0), (posinf, big), (neginf, -big))]  # fmt: skip
    out = np.where(np.isnan(v), fills[0], v)
    out = np.where(np.isposinf(v), fills[1], out)
    return ar.asarray(np.where(np.isneginf(v), fills[2], out))
