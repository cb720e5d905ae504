"""Captured models in several precisions against the certified exact reference.

Native precisions (float16, bfloat16, float32, float64) run the model eagerly in the dtype
(:mod:`fpgrad.graph.native`); emulated ones interpret the graph on the strict machine
(:mod:`fpgrad.arith.emulated`). Every gradient element gets a verdict
(:func:`fpgrad.diagnose.verdicts.classify`) in the format torch computed it in; the first op whose
output holds inf or NaN is named by its module path.

Precision policies (:mod:`fpgrad.graph.policy`) run natively, cast per op (or under the real
``torch.autocast("cpu")``). With a loss scale S every column backpropagates S * loss and its
gradients are judged against S times the exact ones; with ``reference="rounded"`` each column
is judged against the exact gradients at the parameters and data rounded into its formats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import fx

from fpgrad.diagnose.verdicts import VERDICTS, ExactArray, Verdicts, classify, signal_counts
from fpgrad.errors import InputError
from fpgrad.graph.capture import Graph
from fpgrad.graph.exact import GraphExact, exact_graph
from fpgrad.graph.interpret import interpret
from fpgrad.graph.names import MOVES, op_name
from fpgrad.graph.native import native_run
from fpgrad.graph.ops.pointwise import MissingSlot
from fpgrad.graph.policy import GraphPlan, how_key, resolve, scaled_seed
from fpgrad.graph.precisions import Precision, emulated_systems, parse_precisions
from fpgrad.numbers.formats import Format, get_format

if TYPE_CHECKING:
    from fpgrad.graph.network import GraphNetwork
    from fpgrad.model.network import Network

REFERENCES = ("original", "rounded")


@dataclass
class GraphComparison:
    """Gradients per precision, their verdicts, and the exact reference: what the gallery's
    captured scenarios and sweeps read. Shown (tables, JSON, reports) as the one
    :class:`~fpgrad.diagnose.comparison.Comparison` (:func:`fpgrad.diagnose.captured.to_comparison`)."""

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
    loss_scale: float = 1.0
    reference: str = "original"
    #: precision -> the format each gradient was computed in ("grads/<param>" -> name)
    formats: dict[str, dict[str, str]] = field(default_factory=dict)
    #: policy column -> how it ran and what it casts (:meth:`GraphPlan` summary)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: reference "rounded": precision -> its own exact reference
    references: dict[str, GraphExact] = field(default_factory=dict)
    #: precision -> the format the loss was computed in
    loss_formats: dict[str, str] = field(default_factory=dict)
    #: precision -> per op node (graph order): where the signal died (:func:`op_places`)
    places: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def format_of(self, precision: str) -> str:
        """The narrowest format of a column (a policy's lowest), for figures."""
        names = set(self.formats.get(precision, {}).values()) or {precision.split(":")[0]}
        from fpgrad.numbers.formats import get_format

        return min(names, key=lambda n: (get_format(n).bits, get_format(n).precision, n))

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


def compare_graph(
    net: GraphNetwork,
    precisions: str | list[str] | None = None,
    exact_bits: int = 150,
    allow_uncertified: bool = False,
    loss_scale: float = 1.0,
    reference: str = "original",
    exact_max_bits: int | None = None,
) -> GraphComparison:
    """Every precision's gradients of ``net`` with verdicts against the exact reference (see
    the module docstring for policies, ``loss_scale`` and ``reference``)."""
    from fpgrad.run.runlog import record
    from fpgrad.run.scaling import StaticScaler

    if reference not in REFERENCES:
        raise InputError(f"unknown reference {reference!r}; use original or rounded")
    StaticScaler(loss_scale)  # a power of two, or a one-line error
    precs = parse_precisions(precisions, net.policies)
    plans = {p.name: resolve(p.policy, net.graph) for p in precs if p.policy is not None}
    kw: dict[str, Any] = {} if exact_max_bits is None else {"max_bits": exact_max_bits}
    record("exact", "exact")
    exact = exact_graph(net.graph, exact_bits, allow_uncertified, **kw)
    refs = {
        p.name: exact_graph(
            _rounded(net.graph, p, plans.get(p.name)), exact_bits, allow_uncertified, **kw
        )  # fmt: skip
        if reference == "rounded"
        else exact
        for p in precs
    }
    k = int(math.log2(loss_scale))
    scaled_graph = scaled_seed(net.graph, loss_scale)
    systems = emulated_systems()
    grads: dict[str, dict[str, np.ndarray]] = {}
    verdicts: dict[str, dict[str, Verdicts]] = {}
    formats: dict[str, dict[str, str]] = {}
    loss: dict[str, float] = {}
    first: dict[str, str | None] = {}
    lost: dict[str, str | None] = {}
    loss_formats: dict[str, str] = {}
    places: dict[str, list[dict[str, Any]]] = {}
    forward = forward_nodes(net.graph)
    masks: dict[str, np.ndarray] | None = None
    fused: list[str] = []
    for p in precs:
        plan = plans.get(p.name)
        if p.kind == "native" or plan is not None:
            record(p.name, "native" if plan is None else how_key(plan))
            tr = native_run(net.graph, p.name, loss_scale=loss_scale, plan=plan)
            g = tr.grads
            loss[p.name] = float(tr.loss)
            values = tr.values
            fmts = {key: tr.formats[f"grads/{key}"] for key in g}
            node_formats = tr.formats
            loss_formats[p.name] = tr.formats.get("loss", p.name)
            if tr.fused:
                fused.append(p.name)
        else:
            record(p.name, "emulated")
            ar = systems(p.name)
            try:
                it = interpret(scaled_graph, ar)
            except MissingSlot as exc:
                raise InputError(f"{p.name}: {exc}; compare it natively instead") from None
            g = {key: ar.to_float64(v) for key, v in it.grads.items()}
            loss[p.name] = float(ar.to_float64(it.loss))
            values = {key: v for key, v in it.values.items() if isinstance(v, np.ndarray)}
            fmts = dict.fromkeys(g, p.name)
            node_formats = {}
            loss_formats[p.name] = p.name
        grads[p.name] = g
        formats[p.name] = fmts
        verdicts[p.name] = {
            key: classify(
                _scaled(refs[p.name].arrays[f"grads/{key}"], k),
                g[key],
                p.fmt if p.kind == "emulated" else get_format(fmts[key]),
            )
            for key in g
        }
        if masks is None:  # where -inf is an intended mask: the same in every column
            masks = _mask_positions(net.graph, values)
        places[p.name], lost[p.name], first[p.name] = op_places(
            net, refs[p.name], values, node_formats, p.fmt, forward, k, masks
        )  # fmt: skip
    notes = [
        "exact: evaluated at the parameters and data as written (float64 values, exact)"
        if reference == "original"
        else "exact: evaluated per precision at the parameters and data rounded into it "
        "(a policy: parameters into its params format, data into its data format)"
    ]
    if fused:
        notes.append(
            f"{', '.join(fused)}: torch ran nn.LSTM through oneDNN's fused kernel (CPU): loss "
            "and gradients are torch's, op-by-op attribution is not available"
        )
    if loss_scale != 1.0:
        notes.append(
            f"loss scale {loss_scale:g}: gradients are those of the backward of "
            f"{loss_scale:g} * loss, judged against {loss_scale:g} times the exact ones"
        )
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
        notes=notes,
        loss_scale=loss_scale,
        reference=reference,
        formats=formats,
        policies={name: _plan_dict(plan, formats[name]) for name, plan in plans.items()},
        references={n: r for n, r in refs.items() if r is not exact},
        loss_formats=loss_formats,
        places=places,
    )


def _plan_dict(plan: GraphPlan, formats: dict[str, str]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for prec in plan.dtypes.values():
        counts[prec] = counts.get(prec, 0) + 1
    cast = ", ".join(f"{n} ops to {prec}" for prec, n in sorted(counts.items()))
    grads: dict[str, int] = {}
    for prec in formats.values():
        grads[prec] = grads.get(prec, 0) + 1
    summary = (
        f"params {plan.params}, data {plan.data}; "
        + (f"autocast to {plan.autocast_dtype}" if plan.how == "autocast" else f"cast {cast}")
        + "; gradients computed in "
        + ", ".join(f"{prec} ({n})" for prec, n in sorted(grads.items()))
    )
    return {
        "ran": plan.describe(),
        "how": plan.how,
        "summary": summary,
        "params": plan.params,
        "data": plan.data,
        "description": plan.description,
        "cast": dict(plan.dtypes),
        "rules": dict(plan.rules),
        "gradient_formats": formats,
    }


def _scaled(ex: ExactArray, k: int) -> ExactArray:
    """``ex`` times 2^k (exact)."""
    if k == 0:
        return ex
    rad = None if ex.rad is None else np.ldexp(ex.rad, k)
    return ExactArray(np.ldexp(ex.hi, k), np.ldexp(ex.lo, k), ex.zero, rad, ex.undetermined)


def _rounded(graph: Graph, p: Precision, plan: GraphPlan | None) -> Graph:
    """``graph`` with parameters and floating data correctly rounded into the column's
    formats (a policy: parameters into ``params``, data into ``data``)."""
    from fpgrad.numbers.rounding import round_to

    pf = get_format(plan.params) if plan is not None else p.fmt
    df = get_format(plan.data) if plan is not None else p.fmt

    def rnd(a: np.ndarray, fmt: Any) -> np.ndarray:
        return round_to(a, fmt) if np.asarray(a).dtype.kind == "f" else a

    return replace(
        graph,
        params={n: rnd(v, pf) for n, v in graph.params.items()},
        inputs=[rnd(x, df) for x in graph.inputs],
        targets=rnd(graph.targets, df),
    )


def forward_nodes(graph: Graph) -> set[str]:
    """The op nodes the loss depends on (the forward); every other op is backward."""
    out = next(n for n in graph.gm.graph.nodes if n.op == "output")
    loss = out.args[0][0]
    seen: set[str] = set()
    todo = [loss] if isinstance(loss, fx.Node) else []
    while todo:
        node = todo.pop()
        if node.name not in seen:
            seen.add(node.name)
            todo += node.all_input_nodes
    return seen


def op_places(
    net: GraphNetwork,
    exact: GraphExact,
    values: dict[str, Any],
    formats: dict[str, str],
    default: Format,
    forward: set[str],
    k: int,
    masks: dict[str, np.ndarray],
) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """One pass over the op nodes with one floating output (graph order, constants skipped):

    - the rows of "where the signal died", for the ops that compute (those that only move
      values, :data:`~fpgrad.graph.names.MOVES`, left out): module path, op, direction, the
      format it was computed in and :func:`signal_counts` against the exact value (backward
      values against 2^k times it), an intended ``-inf`` mask (:func:`_mask_positions`) no
      overflow;
    - ``label: n of m`` of the first op (moves included) whose output is 0 where the exact
      value is certainly non-zero, or None;
    - the label of the first op (moves included) whose output holds inf or NaN other than an
      intended ``-inf`` mask, or None."""
    constants = net.graph.constants
    rows: list[dict[str, Any]] = []
    lost: str | None = None
    nonfinite: str | None = None
    for node in net.graph.ops:
        v = values.get(node.name)
        if node.name in constants or not (isinstance(v, np.ndarray) and v.dtype.kind == "f"):
            continue
        m = masks.get(node.name)
        mask = m & np.isneginf(v) if m is not None and m.shape == v.shape else None
        if nonfinite is None:
            bad = ~np.isfinite(v) if mask is None else ~np.isfinite(v) & ~mask
            if bad.any():
                nonfinite = net.graph.label(node)
        ex = exact.node_array(node.name)
        if ex is None or ex.hi.shape != v.shape:
            continue
        if lost is None:
            n = int(np.count_nonzero((v == 0) & ~ex.zero & ~ex.undetermined_mask()))
            if n:
                lost = f"{net.graph.label(node)}: {n} of {v.size}"
        if op_name(node) in MOVES:
            continue
        back = node.name not in forward
        fmt = get_format(formats[node.name]) if node.name in formats else default
        counts = signal_counts(_scaled(ex, k) if back else ex, v, fmt)
        if mask is not None:  # a mask's -inf is no overflow (and counts nowhere else)
            counts["overflow"] -= int(np.count_nonzero(mask))
        rows.append(
            {
                "layer": net.graph.paths.get(node.name, "") or "<top>",
                "kind": op_name(node),
                "direction": "backward" if back else "forward",
                "quantity": node.name,
                "op": net.graph.label(node),
                "format": fmt.name,
                "size": int(v.size),
                **counts,
            }
        )
    return rows, lost, nonfinite


#: ops that move a mask's -inf entries without computing: replayed on an indicator tensor
_MASK_MOVES = {
    "t", "view", "_unsafe_view", "reshape", "permute", "transpose", "expand", "squeeze",
    "unsqueeze", "detach", "alias", "clone", "_to_copy", "slice", "select", "contiguous",
    "repeat",
}  # fmt: skip


def _mask_positions(graph: Graph, values: dict[str, Any]) -> dict[str, np.ndarray]:
    """Node name -> where its output is an intended -inf: the -inf entries of floating data
    and constants, ``masked_fill(x, m, -inf)`` under ``m``, carried through ``add`` (alpha 1),
    ``masked_fill`` with a finite value and the ops of :data:`_MASK_MOVES`. A -inf anywhere
    else (an overflow, or a mask read by any other op) is not a mask."""
    import torch
    from torch import fx

    from fpgrad.graph.names import op_key

    raw = [*(graph.params[n] for n in graph.param_names), *graph.inputs, graph.targets]
    feed = iter(raw)
    out: dict[str, np.ndarray] = {}

    def value(arg: Any) -> Any:
        return values.get(arg.name) if isinstance(arg, fx.Node) else None

    constants = graph.constants  # a walk of the whole graph: once, not per node
    for node in graph.gm.graph.nodes:
        if node.op == "placeholder":
            v = np.asarray(next(feed, None))
            if v.dtype.kind == "f" and np.isneginf(v).any():
                out[node.name] = np.isneginf(v)
            continue
        if node.op != "call_function":
            continue
        v = values.get(node.name)
        if not (isinstance(v, np.ndarray) and v.dtype.kind == "f"):
            continue
        if node.name in constants:
            if np.isneginf(v).any():
                out[node.name] = np.isneginf(v)
            continue
        key = op_key(node).removeprefix("aten.")
        name = key.split(".")[0]
        args = node.args
        ins = [out.get(a.name) if isinstance(a, fx.Node) else None for a in args]
        try:
            if name.startswith("masked_fill") and len(args) > 2:
                m = value(args[1])
                if m is None:
                    continue
                m = np.broadcast_to(np.asarray(m, dtype=bool), v.shape)
                old = ins[0] if ins[0] is not None else np.zeros(v.shape, dtype=bool)
                old = np.broadcast_to(old, v.shape)
                fill = args[2]
                got = (m | old) if fill == float("-inf") else (old & ~m)
            elif name == "add" and len(args) >= 2 and node.kwargs.get("alpha", 1) == 1:
                if ins[0] is None and ins[1] is None:
                    continue
                got = np.zeros(v.shape, dtype=bool)
                for m in ins[:2]:
                    if m is not None:
                        got = got | np.broadcast_to(m, v.shape)
            elif name in _MASK_MOVES and ins and ins[0] is not None:
                if any(isinstance(a, fx.Node) for a in (*args[1:], *node.kwargs.values())):
                    continue
                indicator = torch.from_numpy(np.where(ins[0], -np.inf, 0.0))
                moved = node.target(indicator, *args[1:], **node.kwargs)
                got = np.isneginf(moved.detach().to(torch.float64).numpy())
            else:
                continue
        except (TypeError, ValueError, RuntimeError):  # shapes that do not fit: no mask
            continue
        if got.shape == v.shape and got.any():
            out[node.name] = np.ascontiguousarray(got)
    return out


def compare_graph_path(
    net: Network, precisions: str | list[str] | None = None, **kwargs: Any
) -> Any:
    """:func:`fpgrad.graph.compare.compare_graph` of ``from_network(net)``: the layer
    network through the captured-graph path, to run beside :func:`fpgrad.diagnose.comparison.compare`
    (the layer path). ``kwargs``: ``exact_bits``, ``allow_uncertified``."""
    from fpgrad.graph.from_network import from_network

    return compare_graph(from_network(net), precisions, **kwargs)
