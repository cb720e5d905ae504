"""More rules of the zero-sum pass (:mod:`fpgrad.graph.identities`): masked softmax rows,
``masked_fill(g, m, 0)`` and the input gradient of a pointwise (1x1) convolution.

* **Masked softmax.** Where the input of ``_softmax`` is ``masked_fill(s, m, -inf)`` or
  ``s + c`` with a constant ``c`` holding ``-inf`` (``m``, ``c`` constants), the softmax output
  is exactly 0 at the masked positions, so its backward ``y (g - sum(g y))`` is exactly 0
  there: those elements are ``ZERO`` in the fact (removing a zero keeps every group's sum).
* ``masked_fill(x, m, 0)`` with a constant mask (torch's backward of ``masked_fill``): the
  output is exactly 0 under ``m`` and ``x`` elsewhere. A group of ``x`` with a member under
  ``m`` that is not already ``ZERO`` loses that member's value, so the group is dropped
  (``UNKNOWN``); groups that only lose proven zeros keep their sum. A hand-written causal
  attention (``masked_fill(-inf)``, softmax, then the backward's ``masked_fill(0)`` with the
  same mask) keeps the per-query zero sum, so the key bias is proven 0.
* ``convolution_backward``'s input gradient of a convolution with kernel size 1 in every
  spatial dimension, stride 1, padding 0, one group, not transposed: ``dx[n, c, s] = sum_o
  W[o, c] g[n, o, s]``, a matrix product over the channel axis at every position (the rule of
  ``mm``), so a bias before a 1x1 convolution and a training batch norm is proven 0 (the
  depthwise convolution's bias of a depthwise-separable block).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from fpgrad.graph.names import op_key, origin
from fpgrad.graph.zero_facts import UNKNOWN, ZERO, Fact, canon, matmul, reduce_axes


def _key(node: fx.Node) -> str:
    return op_key(node)


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def _neg_inf_positions(p: Any, node: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """Where the value of ``node`` (a softmax input of ``shape``) is ``-inf`` by a constant
    mask: ``masked_fill(s, m, -inf)`` or ``s + c`` with ``c`` a constant; else None."""
    node = origin(node)
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    key = _key(node)
    if key in ("aten.masked_fill.Scalar", "aten.masked_fill_.Scalar") and len(node.args) > 2:
        value, mask = node.args[2], node.args[1]
        if not (isinstance(value, float) and value == float("-inf")) or not isinstance(mask, fx.Node):
            return None
        m = p.constant(mask, node)
        if m is None or m.dtype.is_floating_point:
            return None
        arr = m.detach().numpy().astype(bool)
    elif key == "aten.add.Tensor" and len(node.args) == 2 and not node.kwargs:
        arr = None
        for x in node.args:
            c = p.constant(x, node) if isinstance(x, fx.Node) else None
            if c is not None and c.dtype.is_floating_point:
                arr = np.isneginf(c.detach().numpy())
        if arr is None:
            return None
    else:
        return None
    try:
        return np.broadcast_to(arr, shape)
    except ValueError:
        return None


def softmax_zeros(p: Any, node: fx.Node, fact: Fact, fwd: fx.Node) -> Fact:
    """The softmax backward's fact with the positions of a constant ``-inf`` mask ``ZERO``."""
    if fact is None:
        return None
    masked = _neg_inf_positions(p, fwd.args[0], fact.shape)
    if masked is None or not masked.any():
        return fact
    out = fact.copy()
    out[masked] = ZERO
    return canon(out)


def masked_fill_zero(p: Any, node: fx.Node) -> Fact:
    """``masked_fill(x, m, 0)`` with a constant ``m``: see the module docstring."""
    if len(node.args) < 3 or node.args[2] != 0 or not isinstance(node.args[1], fx.Node):
        return None
    f, shape = p.fact(node.args[0]), _shape(node)
    m = p.constant(node.args[1], node)
    if f is None or shape is None or m is None or m.dtype.is_floating_point or f.shape != shape:
        return None
    try:
        masked = np.broadcast_to(m.detach().numpy().astype(bool), shape)
    except ValueError:
        return None
    out = f.copy()
    lost = np.unique(out[masked & (out >= 0)])
    if lost.size:
        out[np.isin(out, lost)] = UNKNOWN
    out[masked] = ZERO
    return canon(out)


def conv_backward(p: Any, node: fx.Node) -> Any:
    """(input gradient of a pointwise convolution, None, bias gradient) facts."""
    g, _x, w = node.args[:3]
    stride, padding, _dil, transposed, _opad, groups, mask = node.args[4:11]
    f, shape, ws = p.fact(g), _shape(g), _shape(w)
    if f is None or shape is None:
        return None
    bias = reduce_axes(f, [a for a in range(len(shape)) if a != 1], False) if mask[2] else None
    grad_in = None
    pointwise = (
        ws is not None and len(ws) == len(shape) and all(k == 1 for k in ws[2:])
        and all(s == 1 for s in stride) and all(q == 0 for q in padding)
        and not transposed and groups == 1
    )  # fmt: skip
    if mask[0] and pointwise:
        o, c = ws[0], ws[1]
        lead = np.moveaxis(f, 1, -1)  # (N, *S, O)
        rows = int(np.prod(lead.shape[:-1], dtype=np.int64))
        out = matmul(np.ascontiguousarray(lead.reshape(rows, o)), None, (rows, o), (o, c))
        if out is not None:
            grad_in = canon(np.ascontiguousarray(np.moveaxis(out.reshape(*lead.shape[:-1], c), -1, 1)))
    return (grad_in, None, bias)


def constant_values(graph: Any) -> tuple[dict[str, Any], set[tuple[str, str]]]:
    """Torch values of the graph's constant nodes, computed as the interpreter does, and the
    (reader, constant) pairs where the constant's tensor was written in place after the read
    (the final value is not what that reader saw: ``c[1, 0] = -inf`` after ``scores + c``)."""
    raw = [*(graph.params[n] for n in graph.param_names), *graph.inputs, graph.targets]
    names = graph.constants
    values: dict[str, Any] = {}
    seen: dict[tuple[str, str], int] = {}
    feeds = iter(raw)
    for node in graph.gm.graph.nodes:
        for a in node.all_input_nodes:
            if isinstance(values.get(a.name), torch.Tensor):
                seen[(node.name, a.name)] = values[a.name]._version
        if node.op == "placeholder":
            value = next(feeds)
            if np.asarray(value).dtype.kind != "f":  # a copy: in-place ops must not reach it
                values[node.name] = torch.from_numpy(np.array(value, copy=True))
        elif node.op == "get_attr":
            values[node.name] = getattr(graph.gm, str(node.target)).clone()
        elif node.op == "call_function" and node.name in names:
            values[node.name] = node.target(
                *fx.node.map_arg(node.args, lambda n: values[n.name]),
                **fx.node.map_arg(node.kwargs, lambda n: values[n.name]),
            )
    stale = {key for key, v in seen.items() if values[key[1]]._version != v}
    return values, stale
