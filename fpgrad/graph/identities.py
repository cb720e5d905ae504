"""Exact zero-sum identities of a captured graph, proven from its structure alone.

Some exact gradients are 0 by cancellation: a bias in front of training-mode batch norm (the
norm subtracts the per-channel batch mean), attention's key bias (softmax ignores a shift per
query). No ball can prove such a zero: its enclosure always keeps a small radius around 0.
This pass proves them statically, from the ops of the graph, never from values.

**Facts.** The fact of a floating tensor ``T`` is an int64 array ``gid`` of its shape:

* ``gid[i] == ZERO``: ``T[i] == 0`` exactly;
* ``gid[i] == g >= 0``: the elements labelled ``g`` sum to exactly 0 (every group has at least
  two elements: a one-element zero sum is a ``ZERO``);
* ``gid[i] == UNKNOWN``: nothing is claimed.

**Sources** (each identity holds for the exact values, with the forward statistics the graph
itself computed; the pass checks that the saved statistics come from that forward op):

* ``native_batch_norm_backward`` in training mode: ``dx = rstd (gw - mean(gw) - xhat
  mean(gw xhat))`` sums to 0 over (N, spatial) per channel, because ``sum(x - mean(x)) = 0``;
* ``native_layer_norm_backward``: ``dx`` sums to 0 over the normalised axes (same reason);
* ``_softmax_backward_data``: ``y (g - sum(g y))`` sums to 0 along ``dim`` as ``sum(y) = 1``;
* ``_log_softmax_backward_data``: ``g - exp(y) sum(g)`` sums to 0 along ``dim``;
* the CPU flash-attention backward's ``grad_key``: ``dk = ds^T q`` with ``ds = p (dp -
  sum(dp p))``, whose rows sum to 0 as every softmax row sums to 1, so ``dk`` sums to 0 over
  the keys (per batch, head and feature). Only when the mask is a constant that leaves every
  query at least one key (a fully masked row has no softmax) and dropout is 0.

**Propagation** (each rule is sound; anything else, or any doubt, drops the fact):

* data movement (views, transposes, permutes, squeeze/unsqueeze, expand, clone, select, slice,
  split, cat, select/slice_backward): run on index tensors by torch itself; a group stays a
  group only if every member is read the same number of times (copies form their own groups);
  zero fill is ``ZERO``;
* sums and means over axes: outputs linked by a shared group form a group; an output whose
  fibre holds only complete groups and zeros is ``ZERO`` (that is where a proof concludes);
* ``a + alpha b``: elements linked through a group of either operand form a group, unless one
  of them is ``UNKNOWN`` in an operand;
* ``t * c``, ``t / c``: a group survives when every member meets the same element of ``c``
  (a scalar, or ``c`` broadcast along the group);
* ``a @ b`` (mm, bmm, addmm): groups of ``a`` that each lie in one column give output groups
  ``{(i, k): i in R}`` per column ``k`` for each set ``R`` of rows they link (and likewise for
  ``b``'s rows).

:func:`prove_zeros` returns the elements proven exactly 0 at the nodes where a proof
concludes (reductions and the convolution's bias gradient); the exact reference
(:mod:`fpgrad.graph.exact`) sets them to exact zero balls after checking that each enclosure
contains 0.

The facts' labels and array-level rules live in :mod:`fpgrad.graph.zero_facts`; masked softmax
rows, ``masked_fill(g, m, 0)`` and the 1x1 convolution's input gradient in
:mod:`fpgrad.graph.identities_more`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from fpgrad.graph import identities_more as more
from fpgrad.graph.capture import Graph
from fpgrad.graph.identities_linear import LinearForms
from fpgrad.graph.names import op_key, origin
from fpgrad.graph.ops.derived import literal_scale
from fpgrad.graph.ops.index import COPY_BACKWARDS, COPY_FORWARDS, ZERO_FILLS, backward_sources
from fpgrad.graph.zero_facts import (
    ZERO,
    Fact,
    _along,
    _index_in,
    _unknown,
    add,
    broadcast,
    canon,
    gather,
    matmul,
    reduce,
    reduce_axes,
    scale,
)

#: ops whose every output element is a copy of one input element or a zero fill
_MOVES = {
    "aten.detach.default", "aten.alias.default", "aten.clone.default",
    "aten.contiguous.default", "aten.view.default", "aten._unsafe_view.default",
    "aten.reshape.default", "aten.t.default", "aten.transpose.int", "aten.permute.default",
    "aten.expand.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
    "aten.squeeze.default", "aten.slice.Tensor", "aten.select.int", "aten.cat.default",
    "aten.split.Tensor", "aten.split_with_sizes.default", "aten.select_backward.default",
    "aten.slice_backward.default", "aten.stack.default",
} | COPY_FORWARDS  # fmt: skip
#: data movement that fills zeros around its input: a fact even for an input without one
_FILLS = {"aten.select_backward.default", "aten.slice_backward.default"} | ZERO_FILLS
_SUMS = {"aten.sum.dim_IntList", "aten.sum.default", "aten.mean.dim", "aten.mean.default"}


@dataclass
class Identities:
    """What the pass proved: ``zeros[node]`` marks the elements of ``node``'s value that are
    exactly 0; ``facts[node]`` every fact derived (for tests and inspection)."""

    zeros: dict[str, np.ndarray] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(sum(int(m.sum()) for m in self.zeros.values()))


# ---- the pass --------------------------------------------------------------------------------
def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def _floating(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _item_of(node: Any, op: str, index: int) -> fx.Node | None:
    """The op node whose output ``index`` ``node`` reads (through detach/clone), if ``op``."""
    node = origin(node)
    if not (isinstance(node, fx.Node) and node.target is operator.getitem):
        return None
    parent, i = node.args
    if i != index or not isinstance(parent, fx.Node) or str(parent.target) != op:
        return None
    return parent


class _Pass:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.facts: dict[str, Any] = {}
        self.zeros: dict[str, np.ndarray] = {}
        self._consts: tuple[dict[str, Any], set[tuple[str, str]]] | None = None
        self.linear = LinearForms(graph.gm.graph, lambda n: literal_scale(graph, n))
        self.cancelled: set[str] = set()  # a + alpha b proven 0 by its linear form

    def fact(self, node: Any) -> Fact:
        if not isinstance(node, fx.Node):
            return None
        f = self.facts.get(node.name)
        return f if isinstance(f, np.ndarray) else None

    def run(self) -> Identities:
        constants = self.graph.constants
        for node in self.graph.gm.graph.nodes:
            if node.op != "call_function" or node.name in constants:
                continue
            key = _key(node)
            if key not in _SEEDS and key not in _ADD_SUB and not any(
                n.name in self.facts for n in node.all_input_nodes
            ):
                continue  # no fact flows in and the op creates none
            try:
                out = self.rule(node, key)
            except (ValueError, TypeError, IndexError, KeyError, AttributeError, RuntimeError):
                out = None  # arguments not as expected: no fact (never a wrong one)
            if out is None:
                continue
            if isinstance(out, tuple | list):
                if all(o is None for o in out):
                    continue
                out = tuple(out)
            self.facts[node.name] = out
            concludes = _concludes(node) or node.name in self.cancelled
            if concludes and isinstance(out, np.ndarray) and (out == ZERO).any():
                self.zeros[node.name] = out == ZERO
        return Identities(self.zeros, self.facts)

    # ---- dispatch ----------------------------------------------------------------------------
    def rule(self, node: fx.Node, key: str) -> Any:
        if key == "getitem":
            parent, i = node.args
            f = self.facts.get(parent.name) if isinstance(parent, fx.Node) else None
            return f[i] if isinstance(f, tuple) and i < len(f) else None
        if key in _ADD_SUB and self.linear.cancels(node):  # its linear form cancels
            self.cancelled.add(node.name)
            return np.full(_shape(node) or (), ZERO, dtype=np.int64)
        fn = _RULES.get(key)
        if fn is not None:
            return fn(self, node)
        if key in _MOVES:
            return self.move(node)
        return None

    def move(self, node: fx.Node) -> Any:
        """Data movement, replayed by torch on index tensors (value i + 1; 0 is a fill)."""
        inputs = list(node.all_input_nodes)
        if not all(_floating(n) for n in inputs):
            return None
        facts = [self.fact(n) for n in inputs]
        if all(f is None for f in facts) and _key(node) not in _FILLS:
            return None
        shapes = [_shape(n) for n in inputs]
        if any(s is None for s in shapes):
            return None
        offset, ids, gids = 0, {}, []
        for n, s, f in zip(inputs, shapes, facts, strict=True):
            size = int(np.prod(s, dtype=np.int64))
            ids[n.name] = torch.arange(offset + 1, offset + size + 1, dtype=torch.float64).reshape(s)
            gids.append(_unknown(s).ravel() if f is None else f.ravel())
            offset += size
        gid = np.concatenate(gids) if gids else np.zeros(0, dtype=np.int64)
        args = fx.node.map_arg(node.args, lambda n: ids.get(n.name, n))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: ids.get(n.name, n))
        try:
            with torch.no_grad():
                res = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - an op torch cannot replay on indices: no fact
            return None

        def one(t: Any) -> Fact:
            src = t.detach().contiguous().numpy().astype(np.int64) - 1
            return gather(gid, src)

        if isinstance(res, tuple | list):
            return tuple(one(t) for t in res)
        return one(res)

    # ---- sources -----------------------------------------------------------------------------
    def batch_norm_backward(self, node: fx.Node) -> Any:
        g, x, _w, _rm, _rv, smean, srstd, train, _eps, mask = node.args[:10]
        fwd = _item_of(smean, "aten.native_batch_norm.default", 1)
        if not (train and mask[0] and fwd is not None):
            return None
        if _item_of(srstd, "aten.native_batch_norm.default", 2) is not fwd:
            return None
        if not fwd.args[5] or origin(fwd.args[0]) is not origin(x):
            return None
        shape = _shape(node.args[0])
        if shape is None or len(shape) < 2:
            return None
        gid = np.broadcast_to(np.arange(shape[1]).reshape(1, -1, *([1] * (len(shape) - 2))), shape)
        return (canon(np.ascontiguousarray(gid)), None, None)

    def layer_norm_backward(self, node: fx.Node) -> Any:
        g, x, normalized, mean, rstd, _w, _b, mask = node.args[:8]
        fwd = _item_of(mean, "aten.native_layer_norm.default", 1)
        if not (mask[0] and fwd is not None):
            return None
        if _item_of(rstd, "aten.native_layer_norm.default", 2) is not fwd:
            return None
        if origin(fwd.args[0]) is not origin(x) or list(fwd.args[1]) != list(normalized):
            return None
        shape = _shape(g)
        if shape is None:
            return None
        return (_along(shape, list(range(len(shape) - len(normalized), len(shape)))), None, None)

    def group_norm_backward(self, node: fx.Node) -> Any:
        """dx sums to 0 over each (sample, group), as layer norm's: sum(x - mean) = 0."""
        g, x, mean, rstd, _w, n, c, hw, groups, mask = node.args[:10]
        fwd, gn = _item_of(mean, "aten.native_group_norm.default", 1), _shape(g)
        if not mask[0] or fwd is None or _item_of(rstd, str(fwd.target), 2) is not fwd or gn is None:
            return None
        if origin(fwd.args[0]) is not origin(x) or list(fwd.args[3:7]) != [n, c, hw, groups]:
            return None  # x (N, C, *) flat: index // (C/G HxW) = n G + c // (C/G), its group
        gid = np.repeat(np.arange(n * groups, dtype=np.int64), (c // groups) * hw)
        return (canon(gid.reshape(gn)), None, None)

    def softmax_backward(self, node: fx.Node, forward: str) -> Fact:
        g, y, dim = node.args[:3]
        fwd = origin(y)
        shape = _shape(g)
        if shape is None or not isinstance(fwd, fx.Node) or str(fwd.target) != forward:
            return None
        nd = max(1, len(shape))
        if int(fwd.args[1]) % nd != int(dim) % nd:
            return None
        fact = _along(shape, [int(dim) % nd]) if shape else None
        return more.softmax_zeros(self, node, fact, fwd) if forward == "aten._softmax.default" else fact

    def sdpa_backward(self, node: fx.Node) -> Any:
        fwd = _item_of(node.args[4], "aten._scaled_dot_product_flash_attention_for_cpu.default", 0)
        if fwd is None:
            return None
        lse = _item_of(node.args[5], "aten._scaled_dot_product_flash_attention_for_cpu.default", 1)
        if lse is not fwd or any(origin(a) is not origin(b) for a, b in
                                 zip(node.args[1:4], fwd.args[:3], strict=True)):  # fmt: skip
            return None
        dropout = _arg(node, 6, "dropout_p", 0.0)
        causal = bool(_arg(node, 7, "is_causal", False))
        mask = node.kwargs.get("attn_mask")
        if dropout or float(_arg(fwd, 3, "dropout_p", 0.0)):
            return None
        if causal != bool(_arg(fwd, 4, "is_causal", False)) or mask is not fwd.kwargs.get(
            "attn_mask"
        ):
            return None
        if node.kwargs.get("scale") != fwd.kwargs.get("scale"):
            return None
        qs, ks = _shape(node.args[1]), _shape(node.args[2])
        if qs is None or ks is None or not self.every_query_keeps_a_key(qs, ks, causal, mask, (fwd, node)):
            return None
        return (None, _along(ks, [len(ks) - 2]), None)

    def every_query_keeps_a_key(self, qs: tuple, ks: tuple, causal: bool, mask: Any, readers: tuple) -> bool:
        """Does every softmax row of the attention have a key that is not masked (the mask as
        each of ``readers`` reads it)?"""
        lq, lk = qs[-2], ks[-2]
        keep = np.ones((lq, lk), dtype=bool)
        if causal:
            keep &= np.tril(np.ones((lq, lk), dtype=bool))
        if mask is not None:
            values = [self.constant(mask, r) for r in readers]
            value = values[0] if all(v is not None for v in values) else None
            if value is None:
                return False  # a mask computed from floating data: not known statically
            arr = value.detach().numpy()
            if arr.dtype == bool:
                keep = keep & arr
            else:
                if np.isnan(arr).any() or np.isposinf(arr).any():
                    return False
                keep = keep & ~np.isneginf(arr)
        return bool(lk > 0 and keep.any(axis=-1).all())

    def constant(self, node: fx.Node, reader: fx.Node) -> torch.Tensor | None:
        """The torch value of a constant node (one that reads no floating data) as ``reader``
        reads it; None where it was written in place after that read."""
        if self._consts is None:
            self._consts = more.constant_values(self.graph)
        value = self._consts[0].get(node.name)
        if (reader.name, node.name) in self._consts[1]:
            return None
        return value if isinstance(value, torch.Tensor) else None

    # ---- linear rules ------------------------------------------------------------------------
    def sums(self, node: fx.Node) -> Fact:
        x = node.args[0]
        f, shape = self.fact(x), _shape(x)
        if f is None or shape is None:
            return None
        if str(node.target).endswith(".default"):
            return reduce_axes(f, [], False)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = bool(_arg(node, 2, "keepdim", False))
        nd = max(1, len(shape))
        axes = [int(d) % nd for d in dims] if dims else []
        return reduce_axes(f, axes, keep) if shape else f

    def copy_sums(self, node: fx.Node) -> Fact:
        """Padding / nearest-upsampling backward: input gradient ``i`` is the sum of the
        incoming gradient elements copied from ``i`` (each element added to exactly one):
        the rule of sums, with the copy map replayed by torch."""
        f, shape = self.fact(node.args[0]), _shape(node)
        src = backward_sources(node)
        if f is None or shape is None or src is None or src.shape != f.shape or (src < 0).any():
            return None
        out = reduce(f, src, int(np.prod(shape, dtype=np.int64)))
        return None if out is None else out.reshape(shape)

    def add_sub(self, node: fx.Node) -> Fact:
        a, b = node.args[:2]
        out = _shape(node)
        if out is None:
            return None
        if not isinstance(b, fx.Node):
            return self._operand(a, out) if b == 0 else None
        if not isinstance(a, fx.Node):
            return None
        return add(self._operand(a, out), self._operand(b, out), out)

    def _operand(self, x: Any, out: tuple[int, ...]) -> Fact:
        s = _shape(x)
        return None if s is None else broadcast(self.fact(x), s, out)

    def mul_div(self, node: fx.Node) -> Fact:
        a, b = node.args[:2]
        out = _shape(node)
        if out is None:
            return None
        divide = str(node.target).startswith("aten.div")
        if not isinstance(b, fx.Node):  # a Python scalar
            return self._operand(a, out)
        if not isinstance(a, fx.Node):
            return None if divide else self._operand(b, out)
        fa, fb = self._operand(a, out), self._operand(b, out)
        ia, ib = _index_in(_shape(a), out), _index_in(_shape(b), out)
        if ia is None or ib is None:
            return None
        if divide:  # a / b: only a's groups, b a common factor
            return None if fa is None else scale(fa, ib)
        if fa is not None:
            return scale(fa, ib, fb)
        return scale(fb, ia, fa)

    def neg(self, node: fx.Node) -> Fact:
        return self.fact(node.args[0])

    def mm(self, node: fx.Node) -> Fact:
        a, b = node.args[:2]
        sa, sb = _shape(a), _shape(b)
        if sa is None or sb is None:
            return None
        return matmul(self.fact(a), self.fact(b), sa, sb)

    def addmm(self, node: fx.Node) -> Fact:
        bias, a, b = node.args[:3]
        out, sa, sb, sc = _shape(node), _shape(a), _shape(b), _shape(bias)
        if out is None or sa is None or sb is None or sc is None:
            return None
        prod = matmul(self.fact(a), self.fact(b), sa, sb)
        if float(node.kwargs.get("beta", 1)) == 0:
            return prod
        return add(broadcast(self.fact(bias), sc, out), prod, out)


def _concludes(node: fx.Node) -> bool:
    """Is ``node`` where a proof may conclude zeros (a reduction, a source's output)?"""
    key = _key(node)
    if key == "getitem":
        parent = node.args[0]
        return isinstance(parent, fx.Node) and str(parent.target) in _SOURCES
    return key in _SUMS or key in _SOFTMAX


_RULES: dict[str, Callable[[_Pass, fx.Node], Any]] = {
    "aten.native_batch_norm_backward.default": _Pass.batch_norm_backward,
    "aten.native_layer_norm_backward.default": _Pass.layer_norm_backward,
    "aten.native_group_norm_backward.default": _Pass.group_norm_backward,
    "aten._softmax_backward_data.default": lambda p, n: p.softmax_backward(
        n, "aten._softmax.default"
    ),
    "aten._log_softmax_backward_data.default": lambda p, n: p.softmax_backward(
        n, "aten._log_softmax.default"
    ),
    "aten._scaled_dot_product_flash_attention_for_cpu_backward.default": _Pass.sdpa_backward,
    "aten.convolution_backward.default": more.conv_backward,
    "aten.masked_fill.Scalar": more.masked_fill_zero,
    "aten.add.Tensor": _Pass.add_sub,
    "aten.sub.Tensor": _Pass.add_sub,
    "aten.mul.Tensor": _Pass.mul_div,
    "aten.div.Tensor": _Pass.mul_div,
    "aten.mul.Scalar": _Pass.mul_div,
    "aten.div.Scalar": _Pass.mul_div,
    "aten.neg.default": _Pass.neg,
    "aten.mm.default": _Pass.mm,
    "aten.bmm.default": _Pass.mm,
    "aten.addmm.default": _Pass.addmm,
    **{k: _Pass.sums for k in _SUMS},
    **{k: _Pass.copy_sums for k in COPY_BACKWARDS},
}
#: ops whose linear form may cancel (:mod:`fpgrad.graph.identities_linear`)
_ADD_SUB = {"aten.add.Tensor", "aten.sub.Tensor", "aten.sum.dim_IntList"}
_SOFTMAX = {"aten._softmax_backward_data.default", "aten._log_softmax_backward_data.default"}
_SOURCES = {
    "aten.native_batch_norm_backward.default",
    "aten.native_layer_norm_backward.default", "aten.native_group_norm_backward.default",
    "aten._scaled_dot_product_flash_attention_for_cpu_backward.default",
    "aten.convolution_backward.default",
}


_SEEDS = {*_SOFTMAX, *_FILLS, "aten.native_batch_norm_backward.default",
          "aten.native_layer_norm_backward.default", "aten.native_group_norm_backward.default",
          "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"}  # fmt: skip
_KEYS: dict[Any, str] = {}


def _key(node: fx.Node) -> str:
    """:func:`~fpgrad.graph.capture.op_key`, cached per op (``str`` of an op is slow)."""
    key = _KEYS.get(node.target)
    if key is None:
        key = _KEYS[node.target] = op_key(node)
    return key


def prove_zeros(graph: Graph) -> Identities:
    """Run the pass over ``graph``: the elements proven exactly 0, per concluding node."""
    return _Pass(graph).run()
