"""Native columns: what torch really computes in float16/bfloat16/float32/float64.

The model runs eagerly in the dtype (parameters, buffers and floating data correctly rounded
into it by :func:`fpgrad.torch_native.to_dtype`), with real autograd, on one thread; an
:class:`~fpgrad.graph.capture.OpRecorder` keeps each op's output, and the ops are paired with
the graph's nodes in order (:func:`~fpgrad.graph.capture.align`). Parameter gradients are
those of ``torch.autograd.grad``: the model's own eager autograd, bit for bit.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fpgrad.graph.capture import Graph, OpRecorder, align, joint_function, loss_in
from fpgrad.torch_native import DTYPES, one_torch_thread, to_dtype


@dataclass
class NativeTrace:
    """float64 views of what torch computed: loss, gradients by name, node outputs."""

    system: str
    loss: np.ndarray
    grads: dict[str, np.ndarray]
    values: dict[str, Any] = field(default_factory=dict)


def _f64(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (
            value.detach().to(torch.float64).numpy().copy()
            if value.is_floating_point()
            else value.detach().numpy().copy()
        )
    if isinstance(value, (tuple, list)):
        return tuple(_f64(v) for v in value)
    return value


def _into(value: np.ndarray, precision: str) -> torch.Tensor:
    if np.asarray(value).dtype.kind == "f":
        return to_dtype(value, precision)
    return torch.from_numpy(np.ascontiguousarray(value))


def model_in(graph: Graph, precision: str) -> torch.nn.Module:
    """A copy of the model with parameters and floating buffers correctly rounded into
    ``precision`` (from the captured float64 values)."""
    model = copy.deepcopy(graph.model).to(torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = to_dtype(graph.params[name], precision)
        for _, b in model.named_buffers():
            if b.is_floating_point():
                b.data = to_dtype(b.detach().numpy(), precision)
    return model


def native_run(graph: Graph, precision: str, keep: bool = True) -> NativeTrace:
    """Forward and backward of the model in the torch dtype ``precision``, eagerly."""
    if precision not in DTYPES:
        raise ValueError(f"{precision!r} is not a torch dtype")
    model = model_in(graph, precision)
    names = graph.param_names
    ps = [p.detach().clone().requires_grad_() for _, p in model.named_parameters()]
    args = [_into(x, precision) for x in (*graph.inputs, graph.targets)]
    rec = OpRecorder() if keep else None
    with one_torch_thread():
        fn = joint_function(model, names, loss_in(graph.loss_fn, DTYPES[precision], precision))
        if rec is None:
            loss, grads = fn(ps, *args)
        else:
            with rec:
                loss, grads = fn(ps, *args)
    values: dict[str, Any] = {}
    if rec is not None:
        ops = [n for n in graph.ops if n.target is not operator.getitem]
        for node, r in align(ops, rec.records):
            values[node.name] = _f64(r[1])
        for node in graph.ops:
            if node.target is operator.getitem and node.args[0].name in values:
                values[node.name] = values[node.args[0].name][node.args[1]]
    return NativeTrace(
        system=precision,
        loss=_f64(loss),
        grads={n: _f64(g) for n, g in zip(names, grads, strict=True)},
        values=values,
    )
