"""Layer networks evaluated on the graph path: the one evaluation of every number system.

A :class:`~fpgrad.model.network.Network` is compiled to torch modules and captured with taps
(:func:`fpgrad.graph.from_network.from_network`): the graph returns, besides the loss and the
parameter gradients, every layer's output and dL/d(output). :func:`evaluate` interprets it in
any number system (emulated machines, certified balls) and returns the layer values as a
:class:`~fpgrad.run.evaluate.Trace`; :func:`exact_trace` certifies them
(:func:`fpgrad.reference.exact.certify`, with the zeros :mod:`fpgrad.graph.identities` proves).
Graphs are captured once per network object and batch size.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fpgrad.arith.base import Arith
from fpgrad.graph.capture import Graph
from fpgrad.graph.exact import settler
from fpgrad.graph.from_network import from_network
from fpgrad.graph.identities import Identities, prove_zeros
from fpgrad.graph.interpret import GraphTrace, interpret
from fpgrad.graph.policy import scaled_seed
from fpgrad.model.network import Network
from fpgrad.reference.exact import (
    DEFAULT_BITS,
    DEFAULT_MAX_BITS,
    ExactResult,
    certify,
    layer_work,
    trace_items,
)
from fpgrad.run.evaluate import Trace

if TYPE_CHECKING:
    from fpgrad.model.policy import Plan


@dataclass
class _Captured:
    """One network's tapped graph at one batch size, its scaled copies, its proven zeros."""

    graph: Graph
    scaled: dict[float, Graph] = field(default_factory=dict)
    ids: Identities | None = None

    def at(self, scale: float) -> Graph:
        if scale not in self.scaled:
            self.scaled[scale] = scaled_seed(self.graph, scale)
        return self.scaled[scale]

    def zeros(self) -> dict[str, np.ndarray]:
        if self.ids is None:
            self.ids = prove_zeros(self.graph)
        return self.ids.zeros


#: id(network) -> (a weak reference to it, batch size -> its capture)
_GRAPHS: dict[int, tuple[weakref.ref[Network], dict[int, _Captured]]] = {}


def _captured(net: Network, rows: np.ndarray | None) -> tuple[_Captured, Network]:
    entry = _GRAPHS.get(id(net))
    if entry is None or entry[0]() is not net:
        key = id(net)
        _GRAPHS[key] = entry = (weakref.ref(net, lambda _: _GRAPHS.pop(key, None)), {})
    sub = net if rows is None else net.with_data(net.x[rows], net.y[rows])
    n = int(sub.x.shape[0])
    if n not in entry[1]:
        entry[1][n] = _Captured(from_network(sub, taps=True).graph)
    return entry[1][n], sub


def _with_data(graph: Graph, net: Network, sub: Network) -> Graph:
    if sub is net:
        return graph
    y = sub.y.astype(np.int64) if net.class_targets else np.asarray(sub.y, dtype=np.float64)
    return replace(graph, inputs=[np.asarray(sub.x, dtype=np.float64)], targets=y)


def _tapped(net: Network, rows: np.ndarray | None, loss_scale: float) -> tuple[_Captured, Graph]:
    cap, sub = _captured(net, rows)
    return cap, _with_data(cap.at(loss_scale), net, sub)


def tapped(net: Network, rows: np.ndarray | None = None, loss_scale: float = 1.0) -> Graph:
    """The tapped graph of ``net`` on the samples ``rows`` (all when None) whose backward
    starts from ``loss_scale``, captured once per network and batch size; the data of
    ``rows`` replace the traced ones."""
    return _tapped(net, rows, loss_scale)[1]


def as_trace(net: Network, it: GraphTrace) -> Trace:
    """The layer values of a tapped graph's interpretation."""
    trace = Trace(system=it.system, loss=it.loss)
    for layer in net.layers:
        trace.forward[layer.name], trace.backward[layer.name] = it.taps[layer.name]
    trace.grads = {k: it.grads[k] for k in net.params}
    return trace


def evaluate(
    net: Network,
    ar: Arith,
    params: dict[str, Any] | None = None,
    rows: np.ndarray | None = None,
    loss_scale: float = 1.0,
) -> Trace:
    """Forward and backward pass of ``net`` in the number system ``ar``.

    ``params`` (``layer.param`` -> arrays of ``ar``) replaces the network's float64 values,
    e.g. the weights of a training run in that system; ``rows`` selects a mini-batch;
    ``loss_scale`` S starts the backward from S (the backward of S * loss).
    """
    cap, graph = _tapped(net, rows, loss_scale)
    settle = settler(graph, ar, cap.zeros()) if getattr(ar, "exact", False) else None
    return as_trace(net, interpret(graph, ar, params=params, keep=False, settle=settle))


def exact_trace(
    net: Network,
    bits: int = DEFAULT_BITS,
    *,
    allow_uncertified: bool = False,
    method: str = "auto",
    progress: bool | None = None,
    max_bits: int = DEFAULT_MAX_BITS,
) -> ExactResult:
    """Enclose every value of ``net``'s forward and backward pass in certified balls.

    ``method="fast"``: the multi-word balls only (an InputError when they cannot vouch);
    ``"arb"``: Arb balls from ``max(bits, 256)`` bits; ``"auto"`` (default): fast first when
    ``bits <= 150``, then Arb. Arb raises its precision (x4 per step) while a ReLU branch is
    undecided or a value is neither an exact zero nor certified to 17 digits, up to
    ``max_bits``; what still contains 0 there is undetermined. A result whose certified values
    have fewer than 17 digits is an InputError unless ``allow_uncertified``. Zeros by
    cancellation (a dense bias before training-mode batch norm) are proven by
    :mod:`fpgrad.graph.identities`. ``progress``: a tqdm bar on stderr for runs longer than
    2 s; None: only on a terminal.
    """
    from fpgrad.run.runlog import record

    record("exact", "exact")

    def run(ar: Any) -> tuple[list[tuple[str, Any]], Any]:
        trace = evaluate(net, ar)
        return list(trace_items(trace)), trace

    return certify(
        run,
        layer_work(net),
        bits,
        allow_uncertified=allow_uncertified,
        method=method,
        progress=progress,
        max_bits=max_bits,
    )


def evaluate_plan(
    net: Network,
    plan: Plan,
    arith: Callable[[str], Arith],
    params: dict[str, Any] | None = None,
    rows: np.ndarray | None = None,
    loss_scale: float = 1.0,
) -> Trace:
    """Forward and backward of ``net`` under a precision policy's :class:`~fpgrad.model.policy.Plan`
    in systems of float64 arrays (``arith(precision)``, e.g. the emulated machines): every op of
    a layer, forward and backward, computes in the layer's ``compute`` system, the loss's ops in
    the plan's ``loss`` one; a value read from another system is rounded into the reader's (a
    cast, as autocast's); parameters are stored in ``plan.params`` (``params`` overrides, in
    it) and their gradients rounded into it; data are stored in ``plan.data``. ``loss_scale``
    as in :func:`evaluate`."""
    _, graph = _tapped(net, rows, loss_scale)
    store, data = arith(plan.params), arith(plan.data)
    compute = {lp.layer: arith(lp.compute) for lp in plan.layers}
    loss_ar = arith(plan.loss)
    systems = {
        node.name: compute.get(graph.paths.get(node.name, ""), loss_ar) for node in graph.ops
    }
    stored = params if params is not None else {k: store.asarray(v) for k, v in net.params.items()}
    it = interpret(graph, store, params=stored, keep=False, systems=systems, data=data)
    trace = as_trace(net, it)
    trace.system = plan.policy
    trace.grads = {k: store.asarray(g) for k, g in trace.grads.items()}  # float64 arrays
    for lp in plan.layers:
        trace.formats[f"forward/{lp.layer}"] = trace.formats[f"backward/{lp.layer}"] = lp.output
        trace.ran_in[lp.layer] = {"compute": lp.compute, "params": lp.params, "output": lp.output}
    trace.formats["loss"] = plan.loss
    trace.ran_in["loss"] = {"compute": plan.loss, "params": None, "output": plan.loss}
    for key in trace.grads:
        trace.formats[f"grads/{key}"] = plan.params
    return trace
