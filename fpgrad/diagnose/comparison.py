"""Traces of several precisions against the certified exact trace.

:func:`compare` is the API behind ``fpgrad compare``: per gradient element and precision a
verdict (see :mod:`fpgrad.diagnose.verdicts`), counts per precision, and per layer where the signal
died (rounding zeros, subnormals and overflows in forward values and backward signals).

The result type lives in :mod:`fpgrad.diagnose.result`; a captured model's comparison is laid
out in it by :mod:`fpgrad.diagnose.captured`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fpgrad.diagnose.diagnosis import diagnose
from fpgrad.diagnose.result import (
    Column,
    Comparison,
    GradColumns,
    Scaled,
    summary_of,
)
from fpgrad.diagnose.verdicts import classify, signal_counts
from fpgrad.errors import InputError
from fpgrad.graph.layers import exact_trace
from fpgrad.graph.precisions import Precision, parse_precisions
from fpgrad.model.network import Network, double_softmax_warning
from fpgrad.model.policy import Plan, format_of
from fpgrad.numbers.rounding import round_to
from fpgrad.progress import phase
from fpgrad.reference.exact import (
    DEFAULT_BITS,
    DEFAULT_MAX_BITS,
    ExactResult,
)
from fpgrad.run.evaluate import Trace
from fpgrad.run.scaling import StaticScaler

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


def compare(
    net: Network,
    precisions: str | list[str] | None = None,
    exact_bits: int = DEFAULT_BITS,
    reference: str = "original",
    allow_uncertified: bool = False,
    loss_scale: float = 1.0,
    exact: ExactResult | None = None,
    exact_max_bits: int = DEFAULT_MAX_BITS,
    findings: bool = True,
    progress: bool | None = None,
) -> Comparison:
    """Evaluate ``net`` in each precision and exactly; verdict every gradient element.

    ``precisions`` may name precision policies (:mod:`fpgrad.model.policy`: built-ins such as
    ``autocast`` or the network file's own). With ``loss_scale`` S (a power of two) every
    precision backpropagates S * loss, and backward values and gradients are judged as
    computed, against S times the exact ones. ``exact``: a precomputed
    ``exact_trace(net, exact_bits, allow_uncertified=...)`` of this same network, reused.
    ``exact_max_bits``: the cap of the exact reference's precision escalation.
    ``findings``: the diagnosis in words (:mod:`fpgrad.diagnose.diagnosis`; runs the advisor's counts).
    ``progress``: bars on stderr for phases over 2 s (None: when stderr is a terminal).
    """
    from fpgrad.diagnose import api_args

    api_args.check_network(net, "compare")
    api_args.check_names(precisions, "precisions", "compare")
    api_args.check_int(exact_bits, "exact_bits", "compare")
    api_args.check_int(exact_max_bits, "exact_max_bits", "compare")
    api_args.check_real(loss_scale, "loss_scale", "compare")
    if not isinstance(net, Network):  # a captured torch model (fpgrad.from_module)
        from fpgrad.diagnose.captured import to_comparison
        from fpgrad.graph.compare import compare_graph

        if exact is not None:
            raise InputError("captured models compute their own exact reference; pass exact=None")
        gc = compare_graph(
            net, precisions, exact_bits, allow_uncertified, loss_scale, reference, exact_max_bits
        )
        return to_comparison(gc, net, parse_precisions(precisions, net.policies), findings)
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
    scaled = {p.name: Scaled(refs[p.name], loss_scale) for p in precs}
    certified = min(r.certified_digits for r in (exact, *refs.values()))
    vanishing = max(r.vanishing for r in (exact, *refs.values()))

    loss: dict[str, Any] = {"exact": Scaled(exact, 1.0).strings("loss", np.zeros(1, int))[0]}
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
    grads = _gradient_columns(net, precs, Scaled(exact, loss_scale), scaled, traces, reference)
    summary = {p.name: summary_of(grads, p.name) for p in precs}
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
    notes += list(net.notes)
    twice = double_softmax_warning(net)
    if twice:
        notes.append(f"warning: {twice}")
    result = Comparison(
        network=net.name,
        precisions=[p.name for p in precs],
        reference=reference,
        exact_bits=exact_bits,
        exact_method=exact.method,
        certified_digits=certified,
        vanishing=vanishing,
        loss=loss,
        grads=grads,
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
    if findings:
        result.findings = diagnose(result, net, exact, precs)
    return result


def _rounded(net: Network, plan: Plan) -> Network:
    """``net`` with parameters (and running statistics) rounded into the plan's parameter
    format, data into its data format: what a policy's run starts from."""
    pf, df = format_of(plan.params), format_of(plan.data)
    out = net.with_params({k: round_to(v, pf) for k, v in net.params.items()})
    out = out.map_stats(lambda a: round_to(a, pf))
    y = net.y if net.class_targets else round_to(net.y, df)
    return out.with_data(round_to(net.x, df), y)


def _gradient_columns(
    net: Network,
    precs: list[Precision],
    exact: Scaled,
    refs: dict[str, Scaled],
    traces: dict[str, Trace],
    reference: str,
) -> list[GradColumns]:
    out: list[GradColumns] = []
    for name in net.params:
        key = f"grads/{name}"
        cols: dict[str, Column] = {}
        for p in precs:
            ref_ex = refs[p.name].exact_array(key)
            fmt = p.format_of(key, traces[p.name])
            value = np.asarray(traces[p.name].grads[name], dtype=np.float64)
            v = classify(ref_ex, value, fmt, p.mode)
            own = reference == "rounded"
            cols[p.name] = Column(
                value,
                v.code,
                v.kind,
                v.rel_err,
                v.ulps,
                v.digits,
                ref_ex if own else None,
                refs[p.name].digits[key] if own else None,
                fmt.smallest_normal,
            )

        def strings(flat: np.ndarray, precision: str | None, key: str = key) -> list[str]:
            src = exact if precision is None else refs[precision]
            return src.strings(key, flat)

        out.append(
            GradColumns(
                name,
                tuple(np.shape(net.params[name])),
                exact.exact_array(key),
                exact.digits[key],
                cols,
                strings,
            )
        )
    return out


def _attribution(net: Network, exact: Scaled, trace: Trace, p: Precision) -> dict[str, Any]:
    rows = []
    for place in places(net):
        section = "forward" if place.direction == "forward" else "backward"
        key = f"{section}/{place.layer}"
        ex = exact.exact_array(key)
        fmt = p.format_of(key, trace)
        computed = np.asarray(getattr(trace, section)[place.layer])
        n = signal_counts(ex, computed, fmt)
        row = {
            "layer": place.layer,
            "kind": place.kind,
            "direction": place.direction,
            "quantity": place.quantity,
            "op": place.op,
            "format": fmt.name,
            "size": int(computed.size),
            "rounding_zero": n["rounding_zero"],
            "subnormal": n["subnormal"],
            "overflow": n["overflow"],
            "structural_zero": n["structural_zero"],
            "exact_subnormal_range": n["exact_subnormal_range"],
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
