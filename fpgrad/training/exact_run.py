"""The certified exact trajectory: multi-word balls, else Arb balls at a forecast precision."""

from __future__ import annotations

import math
import statistics
import sys
from typing import Any

import numpy as np

from fpgrad.diagnose.verdicts import VERDICTS, classify
from fpgrad.errors import InputError
from fpgrad.graph.layers import evaluate
from fpgrad.model.network import Network
from fpgrad.numbers.formats import get_format
from fpgrad.run.optim import ArithOptimizer, OptimConfig
from fpgrad.training.history import History, _dead_units, _flat


class ExactRun:
    """The exact run: the optimizer's formulas in certified balls, the multi-word balls of
    :mod:`fpgrad.arith.ball` (``balls``, at the fast level at or above ``bits``) or Arb balls
    at ``bits`` (:mod:`fpgrad.arith.arb`); the radii bound every value (:meth:`ball_digits`)."""

    def __init__(self, net: Network, cfg: OptimConfig, bits: int, balls: bool = False):
        from fpgrad.run.runlog import record

        record("exact", "exact")
        self.net = net
        if balls:
            from fpgrad.arith.ball import LEVELS, BallArith

            self.ar: Any = BallArith(min(level for level in LEVELS if level >= bits))
        else:
            from fpgrad.arith.arb import ArbArith

            self.ar = ArbArith(bits, slice_products=True)
        self.bits = self.ar.bits if balls else bits
        self.params = {k: self.ar.asarray(v) for k, v in net.params.items()}
        self.opt = ArithOptimizer(self.ar, self.params, cfg)
        self.history = History(f"exact@{bits}")
        self.exact_params: list[dict[str, Any]] = []
        self.failed_at: int | None = None  #: the first step the balls could not vouch for
        #: why the ball run gave way to Arb balls (one line, with the step), or None
        self.fallback: str | None = None
        self.grads: dict[str, Any] = {}  #: the last step's gradients (kept for radius_report)
        #: Arb balls: each step works at :meth:`working_bits` (``bits`` at most)
        self.adaptive = not balls
        #: the number of steps the run is meant to take (lets :meth:`working_bits` lower the
        #: precision to what the remaining steps need), or None
        self.horizon: int | None = None
        #: (steps done, the parameters' accuracy in bits) before each step
        self._accuracy: list[tuple[int, int]] = []
        self._rates: list[float] = []  #: digits lost per step over each probe
        #: the forecast's rate: the median of the last ``ARB_PROBES_KEPT`` probes' rates
        self._rate: float | None = None

    def vector(self) -> np.ndarray:
        return _flat([self.ar.to_float64(v) for v in self.params.values()])

    def record_initial(self) -> None:
        self.history.params.append(self.vector())
        self.exact_params.append(dict(self.params))

    def trace(self, rows: np.ndarray) -> Any:
        """Loss, gradients and forward outputs at the current parameters on ``rows``
        (a subclass evaluates another kind of network: :mod:`fpgrad.graph.train`)."""
        return evaluate(self.net, self.ar, self.params, rows)

    def working_bits(self) -> int:
        """The Arb precision of the next step, between ``ARB_FLOOR_BITS`` and ``bits``: at most
        ``ARB_MARGIN_BITS`` above the relative accuracy of the least accurate parameter (balls
        that contain 0 or are exact left out), so rounding adds about 2^-32 of the radii the
        parameters already carry; and, with a ``horizon``, outside the probes at most what the
        remaining steps need to end with 27 digits (:func:`arb_bits_for`'s forecast at the
        median rate of the last ``ARB_PROBES_KEPT`` probes). A probe is ``ARB_RATE_STEPS``
        steps under the first bound alone (rounding too small to move the radii), every
        ``ARB_PROBE_EVERY`` steps from the first; the accuracy it loses per step from its step
        ``ARB_PROBE_SETTLE`` is the radii's own growth, which the forecast's rounding would
        hide. Any precision encloses: this only spends fewer bits where the radii have grown
        or few steps remain."""
        from fpgrad.arith.arb import min_rel_bits

        acc = min(
            (b for b in (min_rel_bits(v) for v in self.params.values()) if b is not None),
            default=None,
        )
        if acc is None:
            self._accuracy.clear()  # exact parameters: no trail yet
            return self.bits
        done = len(self.history.loss)
        trail = self._accuracy
        trail.append((done, acc))
        bits = min(self.bits, acc + ARB_MARGIN_BITS)
        if self.horizon is None:
            return max(ARB_FLOOR_BITS, bits)
        phase = done % ARB_PROBE_EVERY
        if phase == ARB_RATE_STEPS or (phase > ARB_RATE_STEPS and self._rate is None):
            first = next(t for t, _ in trail if t >= done - ARB_RATE_STEPS + ARB_PROBE_SETTLE)
            start = next(a for t, a in trail if t == first)
            since = done - first
            if since > 0:
                self._rates.append(max(start - acc, 0) * math.log10(2) / since)
                self._rate = statistics.median(self._rates[-ARB_PROBES_KEPT:])
        if phase >= ARB_RATE_STEPS and self._rate is not None:
            left = max(self.horizon - done, 0)
            bits = min(bits, _forecast_bits(self._rate, left))
        return max(ARB_FLOOR_BITS, bits)

    def step(self, rows: np.ndarray) -> None:
        if self.adaptive:
            self.ar.prec = self.working_bits()
        trace = self.trace(rows)
        new = self.opt.step(self.params, trace.grads)
        self.grads = trace.grads
        moved = any(_changed(new[k], self.params[k]) for k in new)
        self.params = new
        hist = self.history
        hist.loss.append(float(np.asarray(self.ar.to_float64(trace.loss))))
        g = _flat([self.ar.to_float64(v) for v in trace.grads.values()])
        hist.grad_norm.append(float(np.linalg.norm(g)))
        acts = [ly.name for ly in self.net.layers if ly.is_activation]  # what _dead_units reads
        outs = {k: self.ar.to_float64(trace.forward[k]) for k in acts}
        hist.dead_units.append(_dead_units(self.net, outs))
        hist.moved.append(moved)
        hist.params.append(self.vector())
        self.exact_params.append(dict(new))
        if self.failed_at is None and self.failed():
            self.failed_at = len(hist.loss)

    def record_final(self, rows: np.ndarray) -> None:
        """Append the loss at the final parameters on ``rows`` (one extra forward pass)."""
        trace = self.trace(rows)
        self.history.loss.append(float(np.asarray(self.ar.to_float64(trace.loss))))
        if self.failed_at is None and self.failed():  # the balls could not vouch for it
            self.failed_at = len(self.history.loss) - 1

    def digits_now(self) -> float:
        """Certified significant digits of the current parameters (as :meth:`ball_digits`)."""
        return self._digits([self.params])

    def _cap(self) -> int:
        return math.floor(self.bits * math.log10(2))

    def failed(self) -> bool:
        """Multi-word balls could not vouch (a value out of range, a ReLU branch undecided:
        their values are no longer enclosures). Arb balls always enclose."""
        if _is_ball(next(iter(self.params.values()), None)):
            nan = any(
                np.isnan(b.rad).any() or np.isnan(b.mid[0]).any() for b in self.params.values()
            )
            return bool(self.ar.range_errors or self.ar.uncertain_branches or nan)
        return False

    def radius_report(self) -> str:
        """Where the radii stand after the last step, for the fallback line: the widest
        relative radius (radius / |midpoint|, zero midpoints aside) of the gradient, of the
        optimizer's state (momentum buffer; Adam's m and v), of the update and of the
        parameters, each with its parameter's name; multi-word balls only ("" otherwise)."""
        if not _is_ball(next(iter(self.params.values()), None)):
            return ""
        opt = self.opt
        parts = [
            ("gradient", self.grads),
            ("momentum buffer", opt.buf),
            ("m", opt.m),
            ("v", opt.v),
            ("update", opt.update),
            ("parameters", self.params),
        ]
        said = []
        for what, values in parts:
            worst, where = 0.0, ""
            for k, b in values.items():
                m = np.abs(b.mid[0])
                nonzero = m > 0
                top = (
                    float(np.max(np.asarray(b.rad)[nonzero] / m[nonzero])) if nonzero.any() else 0.0
                )
                if top > worst or not where:
                    worst, where = top, k
            if where:
                said.append(f"{what} {worst:.1e} ({where})")
        return "widest relative radii: " + ", ".join(said)

    def ball_digits(self) -> float:
        """Certified significant digits of every parameter at every step, from the radii
        (capped by what the working precision carries; exact zeros do not count, a ball that
        contains 0 otherwise counts as 0 digits)."""
        return self._digits(self.exact_params)

    def unsigned_params(self) -> list[str]:
        """Parameters whose ball contains 0 without being exactly 0 at some step (their
        certified digits count as 0)."""
        from fpgrad.reference.exact import arb_digits, ball_digits

        digits_of = ball_digits if _is_ball(next(iter(self.params.values()), None)) else arb_digits
        names: list[str] = []
        for params in self.exact_params:
            for name, value in params.items():
                if name not in names and digits_of(value, self._cap())[2].any():
                    names.append(name)
        return names

    def _digits(self, steps: list[dict[str, Any]]) -> float:
        from fpgrad.reference.exact import arb_min_digits, ball_digits

        balls = _is_ball(next(iter(self.params.values()), None))
        worst = float(self._cap())
        for params in steps:
            for value in params.values():
                if not balls:
                    least = arb_min_digits(value, self._cap())
                    worst = worst if least is None else min(worst, least)
                    continue
                d, zero, _, _ = ball_digits(value, self._cap())
                kept = d[~zero]
                if kept.size:
                    worst = min(worst, float(np.min(kept)))
        return worst


def _few_digits_note(exact: ExactRun, digits: float, method: str, max_bits: int | None) -> str:
    """Why the exact trajectory certifies fewer than 17 digits and which option can help:
    the Arb run stops at its cap (--exact-bits alone cannot pass it); parameters whose balls
    contain 0 are named (a value exactly 0 by cancellation stays unsigned at every precision)."""
    from fpgrad.reference.exact import DEFAULT_MAX_BITS

    cap = DEFAULT_MAX_BITS if max_bits is None else max_bits
    names = exact.unsigned_params()
    where = ""
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        where = (
            f"; balls containing 0 in {shown} (a value exactly 0 by cancellation stays "
            "undetermined at every precision)"
        )
    undecided = int(getattr(exact.ar, "uncertain_branches", 0) or 0)
    if undecided and not _is_ball(next(iter(exact.params.values()), None)):
        where += (
            f"; {undecided} comparisons (a ReLU input, a maximum) stayed undecided and their "
            "balls hold both branches: more bits decide one only if it is not exactly at its "
            "kink"
        )
    if method == "arb" and exact.bits >= cap:
        fix = f"raise --exact-max-bits (the Arb run stopped at its cap, {cap} bits)"
    else:
        fix = "raise --exact-bits or use --exact-method arb"
    return f"the exact trajectory certifies only {digits:.1f} digits{where}: {fix}"


def _is_ball(a: Any) -> bool:
    from fpgrad.arith.ball import Ball

    return isinstance(a, Ball)


def _changed(a: Any, b: Any) -> bool:
    if _is_ball(a):
        return bool(np.any(a.mid != b.mid))
    if isinstance(a, np.ndarray) and a.dtype == object:  # Arb balls: midpoints moved
        return any(x.mid() != y.mid() for x, y in zip(a.ravel(), b.ravel(), strict=True))
    return bool(np.any(a != b))


ARB_MARGIN_BITS = 32  #: adaptive Arb runs: working bits above the parameters' accuracy
ARB_FLOOR_BITS = 128  #: ... and never fewer than these
ARB_RATE_STEPS = 20  #: steps of a probe: the adaptive run measures its radii's growth
ARB_PROBE_EVERY = 40  #: a probe starts every this many steps
#: ... and measures from its step this many: the first steps still carry the rounding of the
#: steps before (the first probe: the radii's rise from exact parameters)
ARB_PROBE_SETTLE = 5
ARB_PROBES_KEPT = 3  #: the forecast's rate is the median of the rates of this many last probes
ARB_WATCH_EVERY = 10  #: an Arb run checks its certified digits every this many steps


def _forecast_bits(lost_per_step: float, steps: int) -> int:
    """Bits for 17 digits, 10 more and a quarter more than ``lost_per_step * steps``,
    rounded up to a multiple of 64."""
    digits = 27 + 1.25 * max(lost_per_step, 0.0) * steps
    return 64 * math.ceil(digits / math.log10(2) / 64)


def arb_bits_for(lost_per_step: float, steps: int, cap: int) -> int:
    """The Arb precision expected to keep 17 certified digits over ``steps`` steps that lose
    ``lost_per_step`` digits each (as measured on a shorter run): 17 digits, 10 more, and a
    quarter more than ``lost_per_step * steps``, in bits, rounded up to a multiple of 64;
    at least :data:`fpgrad.reference.exact.ARB_START_BITS`, at most ``cap``. A forecast, not a
    certificate: the run it starts says itself how many digits it certified."""
    from fpgrad.reference.exact import ARB_START_BITS

    return min(max(_forecast_bits(lost_per_step, steps), ARB_START_BITS), cap)


def exact_trajectory(
    net: Network,
    cfg: OptimConfig,
    schedule: list[np.ndarray],
    bits: int,
    method: str = "auto",
    progress: bool = False,
    max_bits: int | None = None,
    run_type: type[ExactRun] | None = None,
) -> tuple[ExactRun, float, str]:
    """The certified exact run over ``schedule``: (run, certified digits, method).

    ``run_type``: the :class:`ExactRun` subclass that evaluates ``net`` (default ExactRun).

    ``method="fast"``: multi-word balls (at most 150 bits); ``"arb"``: Arb balls from
    ``max(bits, 256)`` bits; ``"auto"``: fast when ``bits`` <= 150 and the balls vouch for at
    least 17 digits, else Arb balls. A run that certifies fewer than 17 digits stops at that
    step and the trajectory is recomputed in Arb balls at the precision that the digits it
    lost per step forecast for the whole schedule (:func:`arb_bits_for`; at least twice the
    last precision), up to ``max_bits`` (default :data:`fpgrad.reference.exact.DEFAULT_MAX_BITS`), where
    the run goes to the end whatever it certifies. A fall back is announced on stderr in one
    line (the step, the digits, the widest radii), on a terminal or not.
    """
    from fpgrad.arith.ball import MAX_BITS
    from fpgrad.reference.exact import ALIASES, ARB_START_BITS, DEFAULT_MAX_BITS

    cap_bits = DEFAULT_MAX_BITS if max_bits is None else max_bits
    make = run_type or ExactRun
    n = len(schedule)

    def steps(run: ExactRun, what: str, watch: bool = False) -> tuple[int | None, float]:
        """Run the schedule; ``watch``: stop at the first checked step (balls: every step;
        Arb: step 1 and every ARB_WATCH_EVERY steps) whose parameters certify fewer than 17
        digits, and return (that step, digits lost per step since step 1)."""
        run.record_initial()
        iterator: Any = schedule
        if progress:
            from tqdm import tqdm

            iterator = tqdm(schedule, desc=f"fpgrad train: exact ({what})", leave=False)
        first: tuple[int, float] | None = None
        # Arb digits cost a Python loop per element: checked every ARB_WATCH_EVERY steps
        every = 1 if _is_ball(next(iter(run.params.values()), None)) else ARB_WATCH_EVERY
        for rows in iterator:
            run.step(rows)
            if run.failed():
                return None, 0.0
            t = len(run.history.loss)
            if watch and (t % every == 0 or t == 1):
                d = run.digits_now()
                first = (t, d) if first is None else first
                if d < 17:
                    return t, (first[1] - d) / max(t - first[0], 1)
        run.record_final(schedule[-1])
        return None, 0.0

    method = ALIASES.get(method, method)
    if method not in ("auto", "fast", "arb"):
        raise InputError(f"unknown exact method {method!r}; use auto, fast or arb")
    fallback = None
    prec = min(max(bits, ARB_START_BITS), cap_bits)
    if method != "arb" and bits <= MAX_BITS:
        run = make(net, cfg, bits, balls=True)
        low, rate = steps(run, "balls", watch=method == "auto")
        if not run.failed():
            digits = run.ball_digits()
            if digits >= 17 or method == "fast":
                return run, digits, "fast"
            if low is not None:
                prec = max(prec, arb_bits_for(rate, n, cap_bits))
                why = (
                    f"step {low}: {digits:.1f} certified digits, {rate:.2f} lost per step; "
                    f"{run.radius_report()}"
                )
            else:
                why = f"{digits:.1f} certified digits after {n} steps; {run.radius_report()}"
        else:
            why = (
                f"step {run.failed_at}: a value out of 2**-800..2**800, a ReLU input too close "
                "to 0 or a NaN radius"
            )
        if method == "fast":
            raise InputError(
                f"the fast exact run cannot certify this training ({why}); use --exact-method arb"
            )
        fallback = (
            f"the ball exact run cannot vouch ({why}); recomputing in Arb balls at {prec} bits"
        )
        print(f"fpgrad train: {fallback}", file=sys.stderr)
    while True:
        exact = make(net, cfg, prec)
        exact.fallback, exact.horizon = fallback, n
        low, rate = steps(exact, f"arb {prec} bits", watch=prec < cap_bits)
        if low is None:  # to the end: an unchecked step may still hold fewer than 17 digits
            digits = exact.ball_digits()
            if digits >= 17 or prec >= cap_bits:
                return exact, digits, "arb"
        prec = min(max(2 * prec, arb_bits_for(rate, n, cap_bits)), cap_bits)


def exact_gradient_counts(
    net: Network,
    params: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    precision: str,
    rows: np.ndarray,
    bits: int,
    max_bits: int | None = None,
) -> dict[str, int]:
    """Verdict counts of ``grads`` against the certified exact gradients at the same
    parameters and batch (:func:`fpgrad.reference.exact.exact_trace`, noise around exact zeros removed).

    At non-finite parameters there is no exact gradient: elements are counted as nan or
    overflow by their own values, the rest as ``no_reference``.
    """
    return exact_check(net, params, grads, precision, rows, bits, max_bits)[0]


def _exact_at(
    net: Network, params: dict[str, np.ndarray], rows: np.ndarray, bits: int, max_bits: int | None
) -> Any:
    """The certified exact trace at float64 ``params`` on ``rows``; None at non-finite ones."""
    from fpgrad.graph.layers import exact_trace
    from fpgrad.reference.exact import DEFAULT_MAX_BITS

    if not all(np.all(np.isfinite(v)) for v in params.values()):
        return None
    wide = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    part = net.with_params(wide).with_data(net.x[rows], net.y[rows])
    cap = DEFAULT_MAX_BITS if max_bits is None else max_bits
    return exact_trace(part, bits, allow_uncertified=True, max_bits=cap)


def _exact_loss(exact: Any) -> float:
    """The exact loss of a certified trace, rounded to float64 (hi + lo)."""
    a = exact.exact_array("loss")
    return float(np.asarray(a.hi, dtype=np.float64).sum() + np.asarray(a.lo).sum())


def exact_loss_at(
    net: Network,
    params: dict[str, np.ndarray],
    rows: np.ndarray,
    bits: int,
    max_bits: int | None = None,
) -> float | None:
    """The certified exact loss at float64 ``params`` on ``rows``; None at non-finite ones."""
    exact = _exact_at(net, params, rows, bits, max_bits)
    return None if exact is None else _exact_loss(exact)


def exact_check(
    net: Network,
    params: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    precision: str,
    rows: np.ndarray,
    bits: int,
    max_bits: int | None = None,
) -> tuple[dict[str, int], float | None]:
    """(:func:`exact_gradient_counts`, the exact loss at ``params`` or None at non-finite
    parameters), from one exact trace."""
    exact = _exact_at(net, params, rows, bits, max_bits)
    if exact is None:
        flat = _flat(list(grads.values()))
        nan, inf = int(np.isnan(flat).sum()), int(np.isinf(flat).sum())
        return {"nan": nan, "overflow": inf, "no_reference": flat.size - nan - inf}, None
    fmt = get_format(precision)
    counts: dict[str, int] = {}
    for k, g in grads.items():
        v = classify(exact.exact_array(f"grads/{k}"), g, fmt)
        found = np.bincount(v.code.ravel(), minlength=len(VERDICTS))
        for name, n in zip(VERDICTS, found.tolist(), strict=True):
            if n:
                counts[name] = counts.get(name, 0) + n
    return counts, _exact_loss(exact)
