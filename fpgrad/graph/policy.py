"""Precision policies on captured models: which dtype each aten op of the graph computes in.

A :class:`~fpgrad.model.policy.Policy` maps op classes and module paths to precisions. On a graph:

- a forward op takes the rule of the longest module path in ``policy.layers`` that is its own
  path or a parent of it, else that of its op class (:func:`op_class`), else ``default``;
- a backward op takes the precision of the forward op whose autograd node runs it (as under
  ``torch.autocast``, where a backward formula reads the casted inputs the forward saved);
- ``input`` (the default) casts nothing: torch's type promotion decides, as autocast does for
  ops on neither of its lists.

How the native column runs (:func:`policy_run`): the model eagerly, parameters in
``params``, data in ``data``, under a ``TorchDispatchMode`` that casts each op's floating
inputs to its precision (a correct rounding when narrowing) and records every output. The
built-ins ``autocast_cpu`` / ``autocast_cpu_bf16`` run under the real
``torch.autocast("cpu", ...)`` instead (nothing cast by fpgrad); ``autocast`` /
``autocast_bf16`` apply torch's CUDA op lists (:data:`CUDA_LOWER`, :data:`CUDA_FP32`, forward
ops; float64 inputs are not cast, as autocast does) by casting on this CPU. Every value is
judged in the dtype torch produced it in. Emulated formats in a policy are refused.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from fpgrad.errors import InputError
from fpgrad.graph.capture import (
    Graph,
    OpRecorder,
    align,
    copy_model,
    joint_function,
    trainable,
)
from fpgrad.graph.names import op_name
from fpgrad.model.policy import GROUPS, INPUT, Policy
from fpgrad.run.torch_native import DTYPES, one_torch_thread

#: aten op (overload dropped) -> the policy op class it belongs to
OP_CLASS: dict[str, str] = {
    **dict.fromkeys(
        ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution",
         "aten._scaled_dot_product_flash_attention_for_cpu"), "dense"),
    "aten.relu": "relu",
    "aten.leaky_relu": "leaky_relu",
    "aten.sigmoid": "sigmoid",
    "aten.sigmoid_": "sigmoid",
    "aten.tanh": "tanh",
    "aten.tanh_": "tanh",
    "aten._softmax": "softmax",
    "aten._log_softmax": "softmax",
    "aten.native_batch_norm": "batch_norm",
    "aten._native_batch_norm_legit_functional": "batch_norm",
    "aten.native_layer_norm": "layer_norm",
    **dict.fromkeys(
        ("aten.nll_loss_forward", "aten.mse_loss", "aten.huber_loss",
         "aten.binary_cross_entropy_with_logits"), "loss"),
}  # fmt: skip

#: torch.autocast("cuda") lower-precision list, as aten ops of a captured graph
CUDA_LOWER = frozenset(
    {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution",
     "aten._scaled_dot_product_flash_attention_for_cpu"}
)  # fmt: skip
#: torch.autocast("cuda") float32 list (fp32 and fp32_set_opt_dtype), as aten ops
CUDA_FP32 = frozenset(
    {"aten.exp", "aten.log", "aten.log1p", "aten.expm1", "aten.reciprocal", "aten.rsqrt",
     "aten.pow", "aten.softplus", "aten.native_layer_norm", "aten.nll_loss_forward",
     "aten.mse_loss", "aten.huber_loss", "aten.binary_cross_entropy_with_logits",
     "aten.logsumexp", "aten._softmax", "aten._log_softmax", "aten.sum", "aten.prod",
     "aten.cumsum"}
)  # fmt: skip
#: how a policy column ran: "autocast" (real torch.autocast on this CPU), "cuda" (the CUDA
#: lists applied by casting on this CPU), "cast" (the policy's own rules, cast per op)
HOWS = ("autocast", "cuda", "cast")
_FREE = {"aten._to_copy.default", "aten.detach.default", "aten.alias.default"}
_SAME = {("aten.lift_fresh_copy.default", "aten.lift_fresh.default")}  # as capture.align


def op_class(node: fx.Node) -> str:
    """The policy op class of a forward node ("" when none); a log-softmax feeding
    ``nll_loss_forward`` (cross-entropy) is part of the loss."""
    name = op_name(node)
    if name == "aten._log_softmax" and any(
        op_name(u) == "aten.nll_loss_forward" for u in node.users
    ):
        return "loss"
    return OP_CLASS.get(name, "")


def owners(graph: Graph) -> dict[str, str]:
    """Backward op node -> the forward op node whose autograd node runs it (an eager float64
    run, matched op by op through autograd sequence numbers)."""
    model = copy_model(graph.model).to(torch.float64)
    ps = [p.detach().clone().requires_grad_() for _, p in trainable(model)]
    args = [torch.from_numpy(np.array(a, copy=True)) for a in (*graph.inputs, graph.targets)]
    rec = OpRecorder()
    with rec, one_torch_thread():
        joint_function(model, graph.param_names, graph.loss_fn)(ps, *args)
    ops = [n for n in graph.ops if n.target is not operator.getitem]
    by_seq: dict[int, str] = {}
    out: dict[str, str] = {}
    for node, r in align(ops, rec.records):
        if r[3] is None:
            by_seq.setdefault(r[2], node.name)
        elif r[3] in by_seq:
            out[node.name] = by_seq[r[3]]
    return out


def _linear_bias_of(node: fx.Node) -> fx.Node | None:
    """The ``mm`` of ``linear`` when ``node`` is its bias add (``add(view(mm(x, t(w))), b)``
    with ``b`` a parameter), else None."""
    if op_name(node) != "aten.add" or len(node.args) != 2:
        return None
    x, b = node.args
    if not (isinstance(b, fx.Node) and b.op == "placeholder" and isinstance(x, fx.Node)):
        return None
    while op_name(x) in ("aten._unsafe_view", "aten.view") and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    return x if op_name(x) == "aten.mm" else None


@dataclass(frozen=True)
class GraphPlan:
    """A policy resolved against a graph: the precision of each op node that casts (absent:
    ``input``), the rule that chose it, and how the native column runs (:data:`HOWS`)."""

    policy: str
    params: str
    data: str
    how: str
    #: "autocast": the dtype of torch.autocast's lower-precision ops
    autocast_dtype: str = ""
    dtypes: dict[str, str] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)
    description: str = ""
    #: backward op node -> the forward op node whose autograd node runs it
    owners: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """How the column runs, in words (for reports)."""
        return {
            "autocast": "real torch.autocast('cpu') on this CPU, native kernels",
            "cuda": "torch.autocast('cuda') op lists emulated on this CPU by casting each op's "
            "inputs (torch's CPU kernels; no GPU ran)",
            "cast": "each op's inputs cast to its precision, torch's CPU kernels (native)",
        }[self.how]


def how_key(plan: GraphPlan) -> str:
    """The :data:`fpgrad.run.runlog.HOW` key of a policy column."""
    return "cuda_policy" if plan.how == "cuda" else "policy"


def _layer_rule(policy: Policy, path: str) -> tuple[str, str] | None:
    best = None
    for name, prec in policy.layers:
        if (path == name or path.startswith(name + ".")) and (
            best is None or len(name) > len(best[0])
        ):
            best = (name, prec)
    return None if best is None else (best[1], f"module {best[0]}")


def _rule(policy: Policy, path: str, kind: str) -> tuple[str, str]:
    by_layer = _layer_rule(policy, path)
    if by_layer is not None:
        return by_layer
    ops = dict(policy.ops)
    if kind and kind in ops:
        return ops[kind], f"op {kind}"
    for group, members in GROUPS.items():
        if kind in members and group in ops:
            return ops[group], f"op {group}"
    return policy.default, "default"


def resolve(policy: Policy, graph: Graph) -> GraphPlan:
    """The precision of every op node of ``graph`` under ``policy`` (see the module doc)."""
    if policy.emulated:
        raise InputError(
            f"policy {policy.name!r} names an emulated format; on captured models policies run "
            "natively only: use float16, bfloat16, float32 or float64 (or compare the format "
            "as a plain precision)"
        )
    paths = set(graph.paths.values())
    for name, _ in policy.layers:
        if not any(p == name or p.startswith(name + ".") for p in paths):
            known = ", ".join(sorted(p for p in paths if p)) or "none"
            raise InputError(
                f"policy {policy.name!r}: no module path {name!r} in the model; module paths: "
                f"{known}"
            )
    data = policy.data or policy.params
    base = dict(policy=policy.name, params=policy.params, data=data,
                description=policy.describe())  # fmt: skip
    device = policy.autocast_device
    from fpgrad.model.policy import BUILTIN

    if device == "cpu" and BUILTIN.get(policy.name) == policy:
        low = dict(policy.ops)["dense"]
        return GraphPlan(how="autocast", autocast_dtype=low, **base)  # type: ignore[arg-type]
    own = owners(graph)
    forward: dict[str, tuple[str, str]] = {}
    nodes = [n for n in graph.ops if n.target is not operator.getitem]
    for node in nodes:
        if node.name in own:
            continue
        name = op_name(node)
        if device == "cuda" and BUILTIN.get(policy.name) == policy:
            low = dict(policy.ops)["dense"]
            if name in CUDA_LOWER:
                forward[node.name] = (low, "autocast cuda lower-precision list")
            elif name in CUDA_FP32:
                forward[node.name] = ("float32", "autocast cuda float32 list")
            continue
        prec, why = _rule(policy, graph.paths.get(node.name, ""), op_class(node))
        if prec != INPUT:
            forward[node.name] = (prec, why)
    for node in nodes:  # linear on a 3-D input: mm + view + add of the bias, one op to autocast
        dense = _linear_bias_of(node)
        if dense is not None and dense.name in forward and node.name not in own:
            prec, why = forward[dense.name]
            forward[node.name] = (prec, f"{why} (the bias add of a linear)")
    dtypes, rules = {}, {}
    for node in nodes:
        chosen = forward.get(own.get(node.name, node.name))
        if chosen is not None:
            dtypes[node.name], rules[node.name] = chosen
    how = "cuda" if device == "cuda" and BUILTIN.get(policy.name) == policy else "cast"
    return GraphPlan(how=how, dtypes=dtypes, rules=rules, owners=own, **base)  # type: ignore[arg-type]


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())


def _model_cast(node: fx.Node, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a ``_to_copy`` run in another floating dtype than the traced one is the
    model's own cast of a mask or integers (``(y > k).to(logits.dtype)``: float64 in the
    trace, the run's dtype eagerly); autocast never casts a non-floating tensor."""
    src = args[0] if args else None
    want, traced = kwargs.get("dtype"), node.kwargs.get("dtype")
    return (
        isinstance(src, torch.Tensor)
        and not src.is_floating_point()
        and isinstance(want, torch.dtype)
        and want.is_floating_point
        and traced == torch.float64
    )


class CastMode(TorchDispatchMode):
    """Casts each op's floating inputs to its node's precision and records its output.

    A forward op casts every floating input (not float64 ones with ``keep_f64``, as autocast
    does). A backward op casts only the tensors its forward op cast (the inputs autograd
    saved before the cast; what torch.autocast would have saved is their cast) and the
    ``input_dtype`` of a softmax backward; gradients and saved outputs already have the
    forward's dtypes. Ops arrive in graph order; a ``_to_copy``, ``detach`` or ``alias`` the
    graph lacks (the casts of torch.autocast and of autograd's gradient dtype checks) is run
    uncast and not paired. Any other difference is an error."""

    def __init__(
        self,
        nodes: list[fx.Node],
        dtypes: dict[str, str],
        keep_f64: bool,
        owners: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.nodes, self.dtypes, self.keep_f64 = nodes, dtypes, keep_f64
        self.owners = owners or {}
        self.cast: dict[str, set[tuple[Any, ...]]] = {}  # forward node -> originals it cast
        self.i = 0
        self.values: dict[str, Any] = {}

    def _node(self, func: Any, kwargs: dict[str, Any], args: tuple = ()) -> fx.Node | None:
        if str(func) == "aten._to_copy.default":  # a cast the graph has casts to its dtype
            nxt = self.nodes[self.i] if self.i < len(self.nodes) else None
            if nxt is None or nxt.target != func:
                return None
            if nxt.kwargs.get("dtype") != kwargs.get("dtype") and not _model_cast(
                nxt, args, kwargs
            ):
                return None
        while (
            self.i < len(self.nodes)
            and self.nodes[self.i].target != func
            and str(self.nodes[self.i].target) in _FREE - {"aten._to_copy.default"}
        ):
            self.i += 1
        if self.i < len(self.nodes) and (
            self.nodes[self.i].target == func
            or (str(self.nodes[self.i].target), str(func)) in _SAME
        ):
            self.i += 1
            return self.nodes[self.i - 1]
        if str(func) in _FREE:
            return None
        at = self.nodes[self.i].target if self.i < len(self.nodes) else "the end"
        raise InputError(
            f"the policy run diverges from the captured graph at op {self.i} ({at} traced, "
            f"{func} run): the model's forward depends on its dtype"
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        node = self._node(func, kwargs, args)
        prec = None if node is None else self.dtypes.get(node.name)
        if node is not None and prec is not None:
            dtype = DTYPES[prec]
            retype = str(func).endswith("_backward_data.default")  # softmax's input_dtype
            owner = self.owners.get(node.name)
            done = self.cast.setdefault(node.name, set()) if owner is None else None
            saved = self.cast.get(owner, set()) if owner is not None else set()

            def cast(t: Any) -> Any:
                if retype and isinstance(t, torch.dtype) and t.is_floating_point:
                    return dtype
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    return t
                if t.dtype == dtype or (self.keep_f64 and t.dtype == torch.float64):
                    return t
                if done is not None:
                    done.add(_key(t))
                elif _key(t) not in saved:
                    return t
                return t.to(dtype)

            args, kwargs = tree_map(cast, (args, kwargs))
        out = func(*args, **kwargs)
        if node is not None:
            self.values[node.name] = out
        return out

    def finish(self) -> None:
        """Raise unless every graph op ran (detach and alias may be missing)."""
        rest = [n for n in self.nodes[self.i :] if str(n.target) not in _FREE]
        if rest:
            raise InputError(
                f"the policy run ended {len(rest)} ops before the captured graph (at "
                f"{rest[0].target}): the model's forward depends on its dtype"
            )


def scaled_seed(graph: Graph, scale: float) -> Graph:
    """``graph`` whose backward starts from ``scale`` (dL/dL = S): a ``mul`` after the seed
    ``ones_like``, as ``grad_outputs=torch.ones_like(loss) * S`` runs eagerly."""
    if scale == 1.0:
        return graph
    gm = copy.deepcopy(graph.gm)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    loss = out.args[0][0]
    seeds = [
        n for n in gm.graph.nodes
        if str(n.target) == "aten.ones_like.default" and n.args and n.args[0] is loss
    ]  # fmt: skip
    if len(seeds) != 1:
        raise InputError("cannot find the seed of the backward pass in the captured graph")
    seed = seeds[0]
    with gm.graph.inserting_after(seed):
        mul = gm.graph.call_function(torch.ops.aten.mul.Tensor, (seed, scale))
    seed.replace_all_uses_with(mul, delete_user_cb=lambda u: u is not mul)
    gm.recompile()
    paths = {**graph.paths, mul.name: graph.paths.get(seed.name, "")}
    return Graph(
        gm=gm, param_names=graph.param_names, params=graph.params, inputs=graph.inputs,
        targets=graph.targets, paths=paths, model=graph.model, loss_fn=graph.loss_fn,
        taps=graph.taps,
        smoothing=graph.smoothing,
    )  # fmt: skip


def show_plans(net: Any, names: list[str] | None, as_json: bool) -> str:
    """``fpgrad policies script.py:build``: per policy how it runs and, per module path, how
    many op nodes (forward and backward) it casts to each precision."""
    import json

    from fpgrad.model.policy import BUILTIN, require_policy

    known = [*BUILTIN, *net.policies]
    out: dict[str, Any] = {}
    for name in names or known:
        plan = resolve(require_policy(name, net.policies), net.graph)
        per: dict[str, dict[str, int]] = {}
        for node, prec in plan.dtypes.items():
            counts = per.setdefault(net.graph.paths.get(node, "") or "<top>", {})
            counts[prec] = counts.get(prec, 0) + 1
        out[name] = {"ran": plan.describe(), "description": plan.description,
                     "params": plan.params, "data": plan.data, "modules": per}  # fmt: skip
    if as_json:
        return json.dumps(out, indent=2)
    lines = []
    for name, d in out.items():
        lines.append(f"{name}: {d['description']}")
        lines.append(f"  runs as: {d['ran']}")
        for path, counts in sorted(d["modules"].items()):
            cast = ", ".join(f"{n} ops to {p}" for p, n in sorted(counts.items()))
            lines.append(f"  {path}: {cast}")
    return "\n".join(lines)


__all__ = [
    "CUDA_FP32",
    "CUDA_LOWER",
    "CastMode",
    "GraphPlan",
    "OP_CLASS",
    "op_class",
    "owners",
    "resolve",
]
