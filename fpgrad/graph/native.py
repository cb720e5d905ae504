"""Native columns: what torch really computes in float16/bfloat16/float32/float64.

The model runs eagerly in the dtype (parameters, buffers and floating data correctly rounded
into it by :func:`fpgrad.run.torch_native.to_dtype`), with real autograd, on one thread; an
:class:`~fpgrad.graph.capture.OpRecorder` keeps each op's output, and the ops are paired with
the graph's nodes in order (:func:`~fpgrad.graph.capture.align`). Parameter gradients are
those of ``torch.autograd.grad``: the model's own eager autograd, bit for bit.

With a loss scale S the backward starts from ``grad_outputs=torch.ones_like(loss) * S`` (the
graph gets the same ``mul``: :func:`fpgrad.graph.policy.scaled_seed`). With a policy plan
(:mod:`fpgrad.graph.policy`) the run casts per op, or runs under the real ``torch.autocast``;
``formats`` then says which dtype each node's output and each gradient was computed in.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fpgrad.errors import InputError
from fpgrad.graph.capture import (
    Graph,
    OpRecorder,
    align,
    copy_model,
    fused_rnn,
    joint_function,
    loss_in,
    trainable,
)
from fpgrad.graph.names import MOVES, op_name
from fpgrad.run.torch_native import DTYPES, one_torch_thread, to_dtype

if TYPE_CHECKING:
    from fpgrad.graph.policy import GraphPlan

#: ops that only move values: a gradient's format is that of the op before them
_MOVES = {*MOVES, "aten._to_copy"}
_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class NativeTrace:
    """float64 views of what torch computed: loss, gradients by name, node outputs."""

    system: str
    loss: np.ndarray
    grads: dict[str, np.ndarray]
    values: dict[str, Any] = field(default_factory=dict)
    #: node name or "grads/<param>" -> the dtype (precision name) torch computed it in
    formats: dict[str, str] = field(default_factory=dict)
    #: tap name -> (value, gradient) (:data:`fpgrad.graph.capture.TAPS`)
    taps: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: eager ran oneDNN's fused recurrent layer: no op-by-op values (loss and gradients are)
    fused: bool = False


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


def _dtype_name(value: Any) -> str | None:
    """The torch dtype name (``float32``) of a recorded op output's first floating tensor."""
    for t in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return str(t.dtype).removeprefix("torch.")
    return None


def _into(value: np.ndarray, precision: str) -> torch.Tensor:
    if np.asarray(value).dtype.kind == "f":
        return to_dtype(value, precision)
    return torch.from_numpy(np.array(value, copy=True))  # the forward may write to it


def model_in(graph: Graph, precision: str) -> torch.nn.Module:
    """A copy of the model with parameters and floating buffers correctly rounded into
    ``precision`` (from the captured float64 values)."""
    model = copy_model(graph.model).to(torch.float64)
    with torch.no_grad():
        for name, p in model.named_parameters():  # frozen ones are rounded as buffers are
            value = graph.params[name] if name in graph.params else p.detach().numpy()
            p.data = to_dtype(value, precision)
        for _, b in model.named_buffers():
            if b.is_floating_point():
                b.data = to_dtype(b.detach().numpy(), precision)
    return model


def native_run(
    graph: Graph,
    precision: str,
    keep: bool = True,
    loss_scale: float = 1.0,
    plan: GraphPlan | None = None,
) -> NativeTrace:
    """Forward and backward of the model in the torch dtype ``precision``, eagerly; with
    ``loss_scale`` S the backward of S * loss; with ``plan`` the policy's run (parameters in
    ``plan.params``, data in ``plan.data``; ``precision`` is then only its name)."""
    if plan is not None:
        return _policy_run(graph, plan, precision, loss_scale)
    if precision not in DTYPES:
        raise ValueError(f"{precision!r} is not a torch dtype")
    from fpgrad.graph.policy import scaled_seed

    graph = scaled_seed(graph, loss_scale)
    model = model_in(graph, precision)
    names = graph.param_names
    ps = [p.detach().clone().requires_grad_() for _, p in trainable(model)]
    args = [_into(x, precision) for x in (*graph.inputs, graph.targets)]
    rec = OpRecorder() if keep else None
    with one_torch_thread():
        fn = joint_function(
            model, names, loss_in(graph.loss_fn, DTYPES[precision], precision), loss_scale
        )
        with kernels_of(precision):
            if rec is None:
                out = fn(ps, *args)
            else:
                with rec:
                    out = fn(ps, *args)
    loss, grads, taps = _outputs(graph, out)
    values: dict[str, Any] = {}
    formats: dict[str, str] = {}  # the dtype each value was computed in
    fused = False
    if rec is not None:
        ops = [n for n in graph.ops if n.target is not operator.getitem]
        try:
            pairs = align(ops, rec.records)
        except InputError as exc:
            if fused_rnn(rec.records):
                _unfused_run_aligns(ops, fn, ps, args)
                pairs, fused = [], True  # oneDNN's fused LSTM: loss and grads are eager's
            else:  # torch's kernel upcast part of the function (F.rms_norm in float16)
                try:
                    pairs = align(ops, rec.records, casts=True)
                except InputError:
                    raise exc from None
        for node, r in pairs:
            values[node.name] = _f64(r[1])
            formats[node.name] = _dtype_name(r[1]) or precision
        _getitems(graph, values)
    return NativeTrace(
        system=precision,
        loss=_f64(loss),
        grads={n: _f64(g) for n, g in zip(names, grads, strict=True)},
        values=values,
        formats={
            **{k: formats.get(k, precision) for k in values},
            **{f"grads/{n}": precision for n in names},
        },  # fmt: skip
        taps=taps,
        fused=fused,
    )


@contextlib.contextmanager
def kernels_of(precision: str) -> Iterator[None]:
    """Turn torch's missing CPU kernel for a dtype (``"cdist" not implemented for 'Half'``)
    into one line naming it and the emulated column that replaces it."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        base = precision.split(":")[0].split("+")[0]
        if "cannot be converted to type" in msg and "without overflow" in msg:
            # the model's own code in this dtype: a Python number beyond its range
            # (x.new_full(.., -1e38) in float16): torch itself refuses to run it
            raise InputError(f"{precision}: the model itself fails in {base} under torch ({msg}): "
                             f"a number it writes into a {base} tensor (new_full, fill, "
                             f"masked_fill, torch.full) is beyond {base}'s range; write "
                             "torch.finfo(x.dtype).min or .max, or leave "
                             f"{base} out of --precisions") from None  # fmt: skip
        if "not implemented for" not in msg:
            raise
        raise InputError(f"{precision}: torch has no CPU kernel for this model ({msg}); "
                         f"compare '{base}:emulated' instead") from None  # fmt: skip


def _unfused_run_aligns(ops: list[Any], fn: Any, ps: list[torch.Tensor], args: list[Any]) -> None:
    """Raise InputError unless the same run with oneDNN off is the graph op for op: then the
    eager run differs from the trace only by oneDNN's fused recurrent kernel (the same
    function, rounded its way), not by a forward that depends on its dtype."""
    import warnings

    rec, fresh = OpRecorder(), [p.detach().clone().requires_grad_() for p in ps]
    with warnings.catch_warnings(), one_torch_thread():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on oneDNN's TF32 flag
        with torch.backends.mkldnn.flags(enabled=False), rec:
            fn(fresh, *args)
    align(ops, rec.records)


def _outputs(graph: Graph, out: tuple[Any, ...]) -> tuple[Any, Any, dict[str, Any]]:
    """(loss, gradients, tap name -> (value, gradient) as float64) of a joint's return."""
    if not graph.taps:
        return out[0], out[1], {}
    loss, grads, tap_grads, tap_values = out
    pairs = zip(graph.taps, tap_values, tap_grads, strict=True)
    return loss, grads, {t: (_f64(v), _f64(g)) for t, v, g in pairs}


def _getitems(graph: Graph, values: dict[str, Any]) -> None:
    for node in graph.ops:
        if node.target is operator.getitem and node.args[0].name in values:
            values[node.name] = values[node.args[0].name][node.args[1]]


def _policy_run(graph: Graph, plan: GraphPlan, name: str, loss_scale: float) -> NativeTrace:
    from fpgrad.graph.policy import CastMode, scaled_seed

    graph = scaled_seed(graph, loss_scale)
    model = model_in(graph, plan.params)
    names = graph.param_names
    ps = [p.detach().clone().requires_grad_() for _, p in trainable(model)]
    args = [_into(x, plan.data) for x in (*graph.inputs, graph.targets)]
    nodes = [n for n in graph.ops if n.target is not operator.getitem]
    mode = CastMode(nodes, plan.dtypes, keep_f64=plan.how == "cuda", owners=plan.owners)
    loss_fn = loss_in(graph.loss_fn, DTYPES[plan.params], plan.params)
    try:
        with one_torch_thread(), kernels_of(name):
            fn = joint_function(model, names, loss_fn, loss_scale)
            if plan.how == "autocast":
                with torch.autocast("cpu", dtype=DTYPES[plan.autocast_dtype]), mode:
                    out = fn(ps, *args)
            else:
                with mode:
                    out = fn(ps, *args)
        mode.finish()
    except InputError as exc:
        if plan.how != "autocast" or "the policy run" not in str(exc):
            raise
        # real autocast's casts are autograd nodes: a value read both through a cast and
        # directly has its gradients added in another order than the float64 trace's
        raise InputError(
            f"{exc}, or torch.autocast's casts (autograd nodes) ordered the backward "
            f'differently from the captured graph; a policy with extends = "{name}" casts '
            "the same ops below autograd (docs/howto/policies.md)"
        ) from None
    loss, grads, taps = _outputs(graph, out)
    formats = {
        k: _NAMES[v.dtype]
        for k, v in mode.values.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    }
    for node in graph.ops:  # an element of a multi-output op: its own dtype
        src = mode.values.get(node.args[0].name) if node.target is operator.getitem else None
        if isinstance(src, (tuple, list)):
            item = src[node.args[1]]
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                formats[node.name] = _NAMES[item.dtype]
    values = {k: _f64(v) for k, v in mode.values.items()}
    _getitems(graph, values)
    out = next(n for n in graph.gm.graph.nodes if n.op == "output")
    for pname, node in zip(names, out.args[0][1:], strict=True):
        while isinstance(node, torch.fx.Node) and op_name(node) in _MOVES:
            node = node.args[0]
        where = node.name if isinstance(node, torch.fx.Node) else ""
        formats[f"grads/{pname}"] = formats.get(where, plan.params)
    formats["loss"] = _NAMES[loss.dtype]
    return NativeTrace(
        system=name,
        loss=_f64(loss),
        grads={n: _f64(g) for n, g in zip(names, grads, strict=True)},
        values=values,
        formats=formats,
        taps=taps,
    )
