"""Captured models in several precisions against the certified exact reference.

Native precisions (float16, bfloat16, float32, float64) run the model eagerly in the dtype
(:mod:`fpgrad.graph.native`); emulated ones interpret the graph on the strict machine
(:mod:`fpgrad.arith.emulated`). Every gradient element gets a verdict
(:func:`fpgrad.verdicts.classify`); the first op whose output holds inf or NaN is named by
its module path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tabulate import tabulate

from fpgrad.errors import InputError
from fpgrad.graph.exact import GraphExact, exact_graph
from fpgrad.graph.interpret import interpret
from fpgrad.graph.native import native_run
from fpgrad.graph.network import GraphNetwork
from fpgrad.graph.ops.pointwise import MissingSlot
from fpgrad.jsonutil import dumps
from fpgrad.precisions import emulated_systems, parse_precisions
from fpgrad.verdicts import VERDICTS, Verdicts, classify


@dataclass
class GraphComparison:
    """Gradients per precision, their verdicts, and the exact reference."""

    network: str
    precisions: list[str]
    kinds: dict[str, str]
    exact: GraphExact
    loss: dict[str, float]
    grads: dict[str, dict[str, np.ndarray]]
    verdicts: dict[str, dict[str, Verdicts]]
    first_nonfinite: dict[str, str | None]
    #: precision -> "label: n of m" of the first op (graph order) whose output is 0 where the
    #: exact value is certainly not (where the signal died), or None
    first_lost: dict[str, str | None]
    notes: list[str] = field(default_factory=list)

    def counts(self, precision: str) -> dict[str, int]:
        """Verdict counts over every gradient element of ``precision``."""
        out = dict.fromkeys(VERDICTS, 0)
        for v in self.verdicts[precision].values():
            names, n = np.unique(v.verdict.astype(str), return_counts=True)
            for name, c in zip(names, n, strict=True):
                out[str(name)] += int(c)
        return out

    def gradient(self, param: str, precision: str) -> np.ndarray:
        return self.grads[precision][param]

    def to_dict(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "precisions": self.precisions,
            "kinds": self.kinds,
            "exact_method": self.exact.method,
            "certified_digits": self.exact.certified_digits,
            "loss": {"exact": decimal_string_of(self.exact), **self.loss},
            "summary": {p: self.counts(p) for p in self.precisions},
            "first_nonfinite": self.first_nonfinite,
            "first_lost": self.first_lost,
            "parameters": {
                name: {p: _count(self.verdicts[p][name]) for p in self.precisions}
                for name in self.exact.trace.grads
            },
            "notes": self.notes,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return dumps(self.to_dict(), indent=indent)

    def render(self, max_rows: int | None = None) -> str:
        """Verdict counts per precision (``max_rows``: accepted for the CLI; one row each)."""
        rows = []
        for p in self.precisions:
            c = self.counts(p)
            rows.append(
                [p, self.kinds[p], *(c[v] for v in VERDICTS), self.first_nonfinite[p] or "-"]
            )
        head = ["precision", "ran", *VERDICTS, "first inf/nan"]
        died = [[p, self.first_lost[p]] for p in self.precisions if self.first_lost[p]]
        lines = [
            f"{self.network}: gradients of {len(self.exact.trace.grads)} parameters; exact "
            f"({self.exact.method}) certified to {self.exact.certified_digits:.1f} digits",
            tabulate(rows, head),
        ]
        if died:
            lines += ["", "first op computing 0 where the exact value is not:", tabulate(died)]
        return "\n".join(lines + self.notes)


def decimal_string_of(exact: GraphExact) -> str:
    arr = exact.arrays["loss"]
    return repr(float(arr.hi)) if not arr.zero else "0"


def _count(v: Verdicts) -> dict[str, int]:
    names, n = np.unique(v.verdict.astype(str), return_counts=True)
    return {str(k): int(c) for k, c in zip(names, n, strict=True)}


def compare_graph(
    net: GraphNetwork,
    precisions: str | list[str] | None = None,
    exact_bits: int = 150,
    allow_uncertified: bool = False,
) -> GraphComparison:
    """Every precision's gradients of ``net`` with verdicts against the exact reference."""
    precs = parse_precisions(precisions)
    for p in precs:
        if p.kind == "policy":
            raise InputError(
                f"precision policy {p.name!r} is not supported on captured models yet; "
                "name formats (float16, bfloat16:emulated, fp8_e4m3, ...)"
            )
    exact = exact_graph(net.graph, exact_bits, allow_uncertified)
    systems = emulated_systems()
    grads: dict[str, dict[str, np.ndarray]] = {}
    verdicts: dict[str, dict[str, Verdicts]] = {}
    loss: dict[str, float] = {}
    first: dict[str, str | None] = {}
    lost: dict[str, str | None] = {}
    for p in precs:
        if p.kind == "native":
            tr = native_run(net.graph, p.name)
            g = tr.grads
            loss[p.name] = float(tr.loss)
            values = tr.values
        else:
            ar = systems(p.name)
            try:
                it = interpret(net.graph, ar)
            except MissingSlot as exc:
                raise InputError(f"{p.name}: {exc}; compare it natively instead") from None
            g = {k: ar.to_float64(v) for k, v in it.grads.items()}
            loss[p.name] = float(ar.to_float64(it.loss))
            values = {k: v for k, v in it.values.items() if isinstance(v, np.ndarray)}
        grads[p.name] = g
        verdicts[p.name] = {k: classify(exact.arrays[f"grads/{k}"], g[k], p.fmt) for k in g}
        first[p.name] = _first_nonfinite(net, values)
        lost[p.name] = _first_lost(net, exact, values)
    return GraphComparison(
        network=net.name,
        precisions=[p.name for p in precs],
        kinds={p.name: p.kind for p in precs},
        exact=exact,
        loss=loss,
        grads=grads,
        verdicts=verdicts,
        first_nonfinite=first,
        first_lost=lost,
        notes=["exact: evaluated at the parameters and data as written (float64 values, exact)"],
    )


def _first_lost(net: GraphNetwork, exact: GraphExact, values: dict[str, Any]) -> str | None:
    """``label: n of m`` for the first op (graph order, constants skipped) whose computed
    output is 0 where the exact value is certainly non-zero."""
    constants = net.graph.constants
    for node in net.graph.ops:
        v = values.get(node.name)
        if node.name in constants or not (isinstance(v, np.ndarray) and v.dtype.kind == "f"):
            continue
        nz = exact.nonzero(node.name)
        if nz is None or nz.shape != v.shape:
            continue
        n = int(np.count_nonzero((v == 0) & nz))
        if n:
            return f"{net.graph.label(node)}: {n} of {v.size}"
    return None


def _first_nonfinite(net: GraphNetwork, values: dict[str, Any]) -> str | None:
    """The label of the first op (graph order, constants skipped) whose output holds inf or
    NaN."""
    constants = net.graph.constants  # masks hold -inf by design
    for node in net.graph.ops:
        if node.name in constants:
            continue
        v = values.get(node.name)
        if isinstance(v, np.ndarray) and v.dtype.kind == "f" and not np.isfinite(v).all():
            return net.graph.label(node)
    return None
