"""A captured model's comparison as the one result type, :class:`~fpgrad.diagnose.comparison.Comparison`.

:func:`fpgrad.graph.compare.compare_graph` computes (gradients per precision, their verdicts,
the certified reference, per-op counts); :func:`to_comparison` lays that out as a layer
network's comparison is laid out: one :class:`~fpgrad.diagnose.comparison.GradColumns` per
parameter (arrays shared, decimal strings made only for the elements shown), the loss with its
verdict, counts per precision and parameter, where the signal died per op node (module path
and aten op, forward then backward) and the diagnosis in words. Tables, JSON, ``--out``
reports and figures are then those of every comparison.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fpgrad.diagnose.result import Column, Comparison, GradColumns, Scaled, summary_of
from fpgrad.diagnose.verdicts import classify
from fpgrad.numbers.formats import Format, get_format

if TYPE_CHECKING:
    from fpgrad.graph.compare import GraphComparison
    from fpgrad.graph.network import GraphNetwork
    from fpgrad.graph.precisions import Precision


def to_comparison(
    gc: GraphComparison,
    net: GraphNetwork,
    precs: list[Precision],
    findings: bool = True,
) -> Comparison:
    """``gc`` as a :class:`Comparison` (``precs``: its columns, parsed; ``findings``: the
    diagnosis in words, with the loss-scale advisor's counts over the same exact trace)."""
    exact = Scaled(gc.exact.result, gc.loss_scale)
    refs = {
        p: Scaled(gc.references[p].result, gc.loss_scale) if p in gc.references else exact
        for p in gc.precisions
    }
    rounded = gc.reference == "rounded"
    by_name = {p.name: p for p in precs}

    def fmt_of(p: str, name: str) -> Format:  # an emulated column: its own format
        return by_name[p].fmt if by_name[p].kind == "emulated" else get_format(name)

    grads = []
    for name in net.param_names:
        key = f"grads/{name}"
        cols = {}
        for p in gc.precisions:
            v = gc.verdicts[p][name]
            fmt = fmt_of(p, gc.formats[p][name])
            cols[p] = Column(
                np.asarray(gc.grads[p][name], dtype=np.float64),
                v.code,
                v.kind,
                v.rel_err,
                v.ulps,
                v.digits,
                refs[p].exact_array(key) if rounded else None,
                refs[p].digits[key] if rounded else None,
                fmt.smallest_normal,
            )

        def strings(flat: np.ndarray, precision: str | None, key: str = key) -> list[str]:
            return (exact if precision is None else refs[precision]).strings(key, flat)

        shape = tuple(np.shape(gc.grads[gc.precisions[0]][name]))
        grads.append(
            GradColumns(name, shape, exact.exact_array(key), exact.digits[key], cols, strings)
        )
    one = np.zeros(1, dtype=np.int64)
    loss: dict[str, Any] = {"exact": Scaled(gc.exact.result, 1.0).strings("loss", one)[0]}
    for p in gc.precisions:
        v = classify(
            refs[p].ref.exact_array("loss"), np.asarray(gc.loss[p]), fmt_of(p, gc.loss_formats[p])
        )
        loss[p] = {
            "value": float(gc.loss[p]),
            "verdict": str(v.verdict[()]),
            "kind": str(v.subkind[()]) or None,
            "rel_err": float(v.rel_err[()]),
        }
    results = [gc.exact, *gc.references.values()]
    undetermined = max(r.result.undetermined_count for r in results)
    notes = list(gc.notes)
    if undetermined:
        notes.append(
            f"{undetermined} exact values are undetermined: their certified balls still contain "
            f"0 at {gc.exact.result.max_bits} bits (sign unknown; shown as |e| <= bound); raise "
            "--exact-max-bits to try harder"
        )
    result = Comparison(
        network=gc.network,
        precisions=list(gc.precisions),
        reference=gc.reference,
        exact_bits=gc.exact.result.requested_bits or gc.exact.bits,
        exact_method=gc.exact.method,
        certified_digits=min(r.certified_digits for r in results),
        vanishing=0,
        loss=loss,
        grads=grads,
        summary={p: summary_of(grads, p) for p in gc.precisions},
        attribution={p: _attribution(gc, p) for p in gc.precisions},
        notes=notes,
        loss_scale=gc.loss_scale,
        policies={p: _policy(gc, p) for p in gc.precisions},
        exact_info={
            "working_bits": max(r.bits for r in results),
            "max_bits": gc.exact.result.max_bits,
            "undetermined_values": undetermined,
            "escalations": gc.exact.result.escalations,
        },
        kinds=dict(gc.kinds),
    )
    if findings:
        from fpgrad.diagnose.diagnosis import diagnose

        result.findings = diagnose(result, net, gc.exact.result, precs)
    return result


def _attribution(gc: GraphComparison, p: str) -> dict[str, Any]:
    rows = gc.places[p]

    def first(test: Any) -> dict[str, Any] | None:
        r = next((r for r in rows if test(r)), None)
        if r is None:
            return None
        keys = ("layer", "direction", "quantity", "op", "rounding_zero", "overflow")
        return {k: r[k] for k in keys}

    return {
        "places": rows,
        "first_rounding_zero_backward": first(
            lambda r: r["direction"] == "backward" and r["rounding_zero"]
        ),
        "first_rounding_zero_forward": first(
            lambda r: r["direction"] == "forward" and r["rounding_zero"]
        ),
        "first_overflow": first(lambda r: r["overflow"]),
        "first_lost": gc.first_lost[p],
        "first_nonfinite": gc.first_nonfinite[p],
    }


def _policy(gc: GraphComparison, p: str) -> dict[str, Any]:
    if p in gc.policies:
        return {**gc.policies[p], "uniform": False, "graph": True}
    ran = "emulated" if gc.kinds[p] == "emulated" else "native"
    return {"summary": f"all {p} ({ran})", "uniform": True, "graph": True}
