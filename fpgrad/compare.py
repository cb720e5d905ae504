"""Traces of several precisions against the certified exact trace.

:func:`compare` is the API behind ``fpgrad compare``: per gradient element and precision a
verdict (see :mod:`fpgrad.verdicts`), counts per precision, and per layer where the signal
died (rounding zeros, subnormals and overflows in forward values and backward signals).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import mpmath
import numpy as np

from fpgrad.errors import InputError
from fpgrad.evaluate import Trace
from fpgrad.exact import (
    DEFAULT_BITS,
    DEFAULT_MAX_BITS,
    ExactResult,
    decimal_string,
    exact_trace,
)
from fpgrad.jsonutil import jsonable
from fpgrad.network import Network
from fpgrad.policy import Plan, format_of
from fpgrad.precisions import Precision, parse_precisions
from fpgrad.progress import phase
from fpgrad.rounding import round_to
from fpgrad.scaling import StaticScaler
from fpgrad.verdicts import VERDICTS, ExactArray, classify

REFERENCES = ("original", "rounded")
SIGNAL_COUNTS = ("rounding_zero", "subnormal", "overflow", "structural_zero")


@dataclass(frozen=True)
class Place:
    """A tensor of the trace: a layer's output (forward) or dL/d(output) (backward)."""

    layer: str
    kind: str
    direction: str  # "forward" | "backward"
    quantity: str  # "z", "a", "dL/dz", "dL/da"
    op: str  # the operation that produced it

    def label(self) -> str:
        return f"{self.layer} {self.quantity}"


def places(net: Network) -> list[Place]:
    """Forward places from input to loss, then backward places from the loss back."""
    out: list[Place] = []
    for layer in net.layers:
        q = "a" if layer.is_activation else "z"
        out.append(
            Place(layer.name, layer.kind, "forward", q, f"{layer.name} forward ({layer.kind})")
        )
    for i in range(len(net.layers) - 1, -1, -1):
        layer = net.layers[i]
        q = "dL/da" if layer.is_activation else "dL/dz"
        if i == len(net.layers) - 1:
            op = f"loss backward ({net.loss.kind})"
        else:
            nxt = net.layers[i + 1]
            op = f"{nxt.name} backward ({nxt.kind})"
        out.append(Place(layer.name, layer.kind, "backward", q, op))
    return out


@dataclass
class Comparison:
    """The result of :func:`compare`; renders as tables (:meth:`render`) or JSON (:meth:`to_json`)."""

    network: str
    precisions: list[str]
    reference: str
    exact_bits: int
    exact_method: str
    certified_digits: float
    vanishing: int
    loss: dict[str, Any]
    gradients: list[dict[str, Any]]
    summary: dict[str, dict[str, int]]
    attribution: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    loss_scale: float = 1.0
    #: per column: the plan it ran (what each layer computed in) and the dtypes observed
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the exact reference's working and cap bits, undetermined count and escalations
    exact_info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "schema": "fpgrad.compare/1",
                "network": self.network,
                "reference": self.reference,
                "exact": {
                    "bits": self.exact_bits,
                    "method": self.exact_method,
                    "certified_digits": self.certified_digits,
                    **self.exact_info,
                    "vanishing_values": self.vanishing,
                },
                "precisions": self.precisions,
                "policies": self.policies,
                "loss_scale": self.loss_scale,
                "loss": self.loss,
                "summary": self.summary,
                "gradients": self.gradients,
                "attribution": self.attribution,
                "notes": self.notes,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def render(self, max_rows: int | None = None) -> str:
        from fpgrad.render import render_comparison

        return render_comparison(self, max_rows=max_rows)

    def counts(self, precision: str) -> dict[str, int]:
        """Verdict counts of the gradient elements in ``precision``."""
        return self.summary[precision]

    def verdicts(self, param: str, precision: str) -> list[str]:
        """Verdicts of every element of one parameter's gradient, in row-major order."""
        return [g[precision]["verdict"] for g in self.gradients if g["param"] == param]

    def gradient(self, param: str, index: tuple[int, ...]) -> dict[str, Any]:
        """The entry of one gradient element (exact string and per-precision columns)."""
        for g in self.gradients:
            if g["param"] == param and tuple(g["index"]) == tuple(index):
                return g
        raise KeyError(f"{param}{list(index)}")


def compare(
    net: Network,
    precisions: str | list[str] | None = None,
    exact_bits: int = DEFAULT_BITS,
    reference: str = "original",
    allow_uncertified: bool = False,
    loss_scale: float = 1.0,
    exact: ExactResult | None = None,
    exact_max_bits: int = DEFAULT_MAX_BITS,
    progress: bool | None = None,
) -> Comparison:
    """Evaluate ``net`` in each precision and exactly; verdict every gradient element.

    ``precisions`` may name precision policies (:mod:`fpgrad.policy`: built-ins such as
    ``autocast`` or the network file's own). With ``loss_scale`` S (a power of two) every
    precision backpropagates S * loss, and backward values and gradients are judged as
    computed, against S times the exact ones. ``exact``: a precomputed
    ``exact_trace(net, exact_bits, allow_uncertified=...)`` of this same network, reused.
    ``exact_max_bits``: the cap of the exact reference's precision escalation.
    ``progress``: bars on stderr for phases over 2 s (None: when stderr is a terminal).
    """
    if not isinstance(net, Network):  # a captured torch model (fpgrad.from_module)
        from fpgrad.graph.compare import compare_graph

        if reference != "original" or loss_scale != 1.0 or exact is not None:
            raise InputError(
                "captured models compare with the original reference, no loss scale, yet"
            )
        return compare_graph(net, precisions, exact_bits, allow_uncertified)  # type: ignore[return-value]
    if reference not in REFERENCES:
        raise InputError(f"unknown reference {reference!r}; use original or rounded")
    StaticScaler(loss_scale)  # a power of two, or a one-line error
    precs = parse_precisions(precisions, net.policies)
    plans = {p.name: p.plan(net) for p in precs}
    if exact is None:
        exact = exact_trace(
            net,
            exact_bits,
            allow_uncertified=allow_uncertified,
            max_bits=exact_max_bits,
            progress=progress,
        )
    elif exact.requested_bits != exact_bits:
        raise InputError(f"the exact trace given has {exact.requested_bits} bits, not {exact_bits}")
    refs: dict[str, ExactResult] = {}
    for p in precs:
        if reference == "rounded":
            rounded = (
                _rounded(net, plans[p.name])
                if p.kind == "policy"
                else net.map_values(lambda a, fmt=p.fmt: round_to(a, fmt))
            )
            refs[p.name] = exact_trace(
                rounded,
                exact_bits,
                allow_uncertified=allow_uncertified,
                max_bits=exact_max_bits,
                progress=progress,
            )
        else:
            refs[p.name] = exact
    traces = {
        p.name: p.run(net, loss_scale)
        for p in phase(precs, "fpgrad compare: precisions", progress, "precision")
    }
    scaled = {p.name: _Scaled(refs[p.name], loss_scale) for p in precs}
    certified = min(r.certified_digits for r in (exact, *refs.values()))
    vanishing = max(r.vanishing for r in (exact, *refs.values()))

    loss: dict[str, Any] = {"exact": _Scaled(exact, 1.0).text("loss", ())}
    for p in precs:
        ex = refs[p.name].exact_array("loss")
        v = classify(
            ex, np.asarray(traces[p.name].loss), p.format_of("loss", traces[p.name]), p.mode
        )
        loss[p.name] = {
            "value": float(traces[p.name].loss),
            "verdict": str(v.verdict[()]),
            "kind": str(v.subkind[()]) or None,
            "rel_err": float(v.rel_err[()]),
        }
    gradients = _gradient_entries(net, precs, _Scaled(exact, loss_scale), scaled, traces, reference)
    summary = {p.name: _summary(gradients, p.name) for p in precs}
    attribution = {p.name: _attribution(net, scaled[p.name], traces[p.name], p) for p in precs}
    policies = {
        p.name: {**plans[p.name].to_dict(), "observed": traces[p.name].ran_in} for p in precs
    }
    notes = [
        "exact: evaluated at the parameters and data as written (float64 values, exact)"
        if reference == "original"
        else "exact: evaluated per precision at the parameters and data rounded into it"
    ]
    undetermined = max(r.undetermined_count for r in (exact, *refs.values()))
    if undetermined:
        notes.append(
            f"{undetermined} exact values are undetermined: their certified balls still contain "
            f"0 at {exact.max_bits} bits (sign unknown; shown as |e| <= bound); raise "
            "--exact-max-bits to try harder"
        )
    if loss_scale != 1.0:
        notes.append(
            f"loss scale {loss_scale:g}: backward values and gradients are those of "
            f"{loss_scale:g} * loss, judged against {loss_scale:g} times the exact ones"
        )
    return Comparison(
        network=net.name,
        precisions=[p.name for p in precs],
        reference=reference,
        exact_bits=exact_bits,
        exact_method=exact.method,
        certified_digits=certified,
        vanishing=vanishing,
        loss=loss,
        gradients=gradients,
        summary=summary,
        attribution=attribution,
        notes=notes,
        loss_scale=loss_scale,
        policies=policies,
        exact_info={
            "working_bits": max(r.bits for r in (exact, *refs.values())),
            "max_bits": exact.max_bits,
            "undetermined_values": undetermined,
            "escalations": exact.escalations,
        },
    )


def _rounded(net: Network, plan: Plan) -> Network:
    """``net`` with parameters rounded into the plan's parameter format, data into its data
    format: what a policy's run starts from."""
    pf, df = format_of(plan.params), format_of(plan.data)
    out = net.with_params({k: round_to(v, pf) for k, v in net.params.items()})
    y = net.y if net.class_targets else round_to(net.y, df)
    return out.with_data(round_to(net.x, df), y)


class _Scaled:
    """An exact result seen through a loss scale S: backward values and gradients times S."""

    def __init__(self, ref: ExactResult, scale: float):
        self.ref, self.scale = ref, scale
        self.k = int(math.log2(scale))
        self.digits = ref.digits

    def scaled(self, key: str) -> bool:
        return self.k != 0 and key.split("/")[0] in ("backward", "grads")

    def exact_array(self, key: str) -> ExactArray:
        ex = self.ref.exact_array(key)
        if not self.scaled(key):
            return ex
        rad = None if ex.rad is None else np.ldexp(ex.rad, self.k)
        return ExactArray(
            np.ldexp(ex.hi, self.k), np.ldexp(ex.lo, self.k), ex.zero, rad, ex.undetermined
        )

    def text(self, key: str, idx: tuple[int, ...]) -> str:
        """An exact element as shown: its certified digits, or its bound when it is
        undetermined (``|e| <= r``)."""
        ex = self.exact_array(key)
        if ex.undetermined is not None and ex.undetermined[idx]:
            assert ex.rad is not None
            return f"|e| <= {ex.rad[idx]:.3g}"
        digits = float(self.digits[key][idx])
        if key == "loss":
            return decimal_string(self.ref.trace.loss, digits)
        return decimal_string(self.grad_value(key.split("/", 1)[1], idx), digits)

    def grad_value(self, name: str, idx: tuple[int, ...]) -> Any:
        """The exact gradient element (an mpf), times S."""
        v = np.asarray(self.ref.trace.grads[name], dtype=object)[idx]
        if self.k == 0 or v == 0:
            return v
        return getattr(v, "context", mpmath.mp).ldexp(v, self.k)


def _gradient_entries(
    net: Network,
    precs: list[Precision],
    exact: _Scaled,
    refs: dict[str, _Scaled],
    traces: dict[str, Trace],
    reference: str,
) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for name in net.params:
        key = f"grads/{name}"
        shape = np.shape(net.params[name])
        cols: dict[str, Any] = {}
        for p in precs:
            ref = refs[p.name]
            ref_ex = ref.exact_array(key)
            v = classify(
                ref_ex, traces[p.name].grads[name], p.format_of(key, traces[p.name]), p.mode
            )
            cols[p.name] = (traces[p.name].grads[name], v, ref, ref_ex)
        for idx in np.ndindex(shape):
            entry: dict[str, Any] = {
                "param": name,
                "index": list(idx),
                "exact": exact.text(key, idx),
            }
            for p in precs:
                values, v, ref, _ = cols[p.name]
                col: dict[str, Any] = {
                    "value": float(values[idx]),
                    "verdict": v.verdict[idx],
                    "kind": v.subkind[idx] or None,
                    "rel_err": float(v.rel_err[idx]),
                    "ulps": float(v.ulps[idx]),
                    "digits": float(v.digits[idx]),
                }
                if reference == "rounded":
                    col["exact"] = ref.text(key, idx)
                entry[p.name] = col
            entries.append(entry)
    return entries


def _summary(gradients: list[dict[str, Any]], precision: str) -> dict[str, int]:
    counts = Counter(g[precision]["verdict"] for g in gradients)
    out = {v: counts.get(v, 0) for v in VERDICTS}
    kinds = Counter(g[precision]["kind"] for g in gradients if g[precision]["kind"])
    out["rounding_zero_underflow"] = kinds.get("underflow", 0)
    out["rounding_zero_lost"] = kinds.get("lost", 0)
    return out


def _attribution(net: Network, exact: _Scaled, trace: Trace, p: Precision) -> dict[str, Any]:
    rows = []
    for place in places(net):
        section = "forward" if place.direction == "forward" else "backward"
        key = f"{section}/{place.layer}"
        ex = exact.exact_array(key)
        fmt = p.format_of(key, trace)
        v = classify(ex, getattr(trace, section)[place.layer], fmt, p.mode)
        verdicts = v.verdict
        row = {
            "layer": place.layer,
            "kind": place.kind,
            "direction": place.direction,
            "quantity": place.quantity,
            "op": place.op,
            "format": fmt.name,
            "size": int(verdicts.size),
            "rounding_zero": int(np.sum(verdicts == "rounding_zero")),
            "subnormal": int(np.sum(verdicts == "subnormal")),
            "overflow": int(np.sum((verdicts == "overflow") | (verdicts == "nan"))),
            "structural_zero": int(np.sum(verdicts == "structural_zero")),
            "exact_subnormal_range": int(np.sum(~ex.zero & (np.abs(ex.hi) < fmt.smallest_normal))),
        }
        rows.append(row)
    first_backward = next(
        (r for r in rows if r["direction"] == "backward" and r["rounding_zero"]), None
    )
    first_forward = next(
        (r for r in rows if r["direction"] == "forward" and r["rounding_zero"]), None
    )
    first_overflow = next((r for r in rows if r["overflow"]), None)

    def where(r: dict[str, Any] | None) -> dict[str, Any] | None:
        if r is None:
            return None
        return {
            k: r[k] for k in ("layer", "direction", "quantity", "op", "rounding_zero", "overflow")
        }

    return {
        "places": rows,
        "first_rounding_zero_backward": where(first_backward),
        "first_rounding_zero_forward": where(first_forward),
        "first_overflow": where(first_overflow),
    }
