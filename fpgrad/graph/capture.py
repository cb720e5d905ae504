"""Capture a torch model's joint forward and backward as one graph of aten ops.

``make_fx`` traces a function that runs the model through ``torch.func.functional_call`` and
calls ``torch.autograd.grad`` of the loss with respect to every parameter. The trace is taken
at the dispatch level below autograd, so it records exactly the aten ops that eager autograd
runs (composite ops such as ``linear`` already split into ``t`` + ``addmm``; backward formulas
as the ops ``mm``, ``threshold_backward``, ...), in the order eager runs them: a
TorchDispatchMode around the eager model sees the same sequence (:mod:`fpgrad.graph.native`
checks it op by op). No decomposition table is applied, so nothing changes what a native
column computes.

Module paths: forward nodes carry ``nn_module_stack`` (``record_module_stack``); a backward
op inherits the path of the forward op whose autograd node runs it (matched through the
autograd sequence numbers in an eager float64 run).
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fpgrad.errors import InputError
from fpgrad.graph.checkpointing import no_checkpoint
from fpgrad.graph.names import op_name

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_SKIP = {"placeholder", "output", "get_attr"}


@dataclass
class Graph:
    """A captured joint forward+backward.

    ``gm.graph`` placeholders are the parameters (in ``param_names`` order), the inputs, then
    the targets; its output is ``(loss, *grads)``. ``paths[node.name]`` is the module path
    of each op node ("" for the loss and top-level code); ``params``, ``inputs`` and
    ``targets`` hold the float64 values (integers as given) the graph was traced with.
    """

    gm: fx.GraphModule
    param_names: list[str]
    params: dict[str, np.ndarray]
    inputs: list[np.ndarray]
    targets: np.ndarray
    paths: dict[str, str]
    model: nn.Module = field(repr=False)
    loss_fn: LossFn = field(repr=False)
    #: names of tapped intermediates (:data:`TAPS`): the output then also holds, after the
    #: parameter gradients, dL/d(tap) for each tap and the taps' values
    taps: list[str] = field(default_factory=list)
    #: the ``label_smoothing`` of every ``F.cross_entropy`` call traced (exact Python floats;
    #: the graph holds only torch's float64 ``1 - eps`` and ``eps / C``)
    smoothing: tuple[float, ...] = ()

    @property
    def constants(self) -> set[str]:
        """Nodes that read no floating data (masks, position tables, integer inputs): torch
        computes them once, in float64, for every system (the exact systems redo arithmetic
        on floating constants themselves: :func:`fpgrad.graph.interpret._exact_constant`)."""
        raw = [*(self.params[n] for n in self.param_names), *self.inputs, self.targets]
        out: set[str] = set()
        placeholders = iter(raw)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if np.asarray(next(placeholders)).dtype.kind != "f":
                    out.add(node.name)
            elif node.op == "get_attr":
                out.add(node.name)
            elif node.op == "call_function" and all(n.name in out for n in node.all_input_nodes):
                out.add(node.name)
        return out

    @property
    def ops(self) -> list[fx.Node]:
        """The op nodes in execution order (getitem of multi-output ops included)."""
        return [n for n in self.gm.graph.nodes if n.op not in _SKIP]

    def label(self, node: fx.Node) -> str:
        """``ff.0 (aten.addmm)``: where a node came from, for display."""
        path = self.paths.get(node.name, "")
        op = op_name(node)
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            op = f"{op_name(node.args[0])}[{node.args[1]}]"  # an output of a multi-output op
        return f"{path} ({op})" if path else f"<top> ({op})"


#: a model may set this attribute in its forward to a list of (name, tensor): intermediates
#: whose values and gradients the graph also returns (the layers of a layer network)
TAPS = "fpgrad_taps"


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also where a module holds a tensor computed from its
    parameters as a plain attribute (``torch.nn.utils.weight_norm``'s ``weight``, which its
    forward pre-hook recomputes): torch refuses to deepcopy a non-leaf tensor; the copy holds
    it detached."""
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for value in vars(mod).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters whose gradients are diagnosed: ``named_parameters()`` with
    ``requires_grad`` (a frozen parameter gets no gradient from torch; it enters the graph as
    a constant, as a buffer does)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def joint_function(
    model: nn.Module, names: list[str], loss_fn: LossFn, scale: float = 1.0
) -> Callable[..., Any]:
    """f(params, *inputs, targets) -> (loss, grads): the function every column runs. With
    ``scale`` S the backward starts from ``torch.ones_like(loss) * S``; with taps (:data:`TAPS`)
    it returns (loss, grads, tap gradients, tap values)."""

    def joint(params: list[torch.Tensor], *args: torch.Tensor) -> tuple[Any, ...]:
        *inputs, targets = args
        with no_checkpoint():
            out = functional_call(model, dict(zip(names, params, strict=True)), tuple(inputs))
            loss = loss_fn(out, targets)
        taps = [t for _, t in getattr(model, TAPS, None) or ()]
        wrt = [*params, *taps]
        if scale == 1.0:
            grads = torch.autograd.grad(loss, wrt)
        else:
            seed = torch.ones_like(loss, memory_format=torch.preserve_format) * scale
            grads = torch.autograd.grad(loss, wrt, grad_outputs=seed)
        if not taps:
            return loss, grads
        n = len(params)
        return loss, grads[:n], grads[n:], tuple(taps)

    return joint


def split_outputs(graph: Graph, flat: list[Any]) -> tuple[Any, list[Any], dict[str, tuple[Any, Any]]]:
    """(loss, parameter gradients, tap name -> (value, gradient)) from the graph's flat outputs."""
    n, k = len(graph.param_names), len(graph.taps)
    loss, grads = flat[0], flat[1 : 1 + n]
    tap_grads, tap_values = flat[1 + n : 1 + n + k], flat[1 + n + k :]
    taps = {t: (v, g) for t, v, g in zip(graph.taps, tap_values, tap_grads, strict=True)}
    return loss, grads, taps


class _Joint(nn.Module):
    """Holds the model so that ``make_fx`` records module paths under it."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, params: list[torch.Tensor], *args: torch.Tensor) -> Any:
        return self._fn(params, *args)


class OpRecorder(TorchDispatchMode):
    """Every aten op run below autograd: (op, outputs, autograd sequence numbers).

    ``seq`` is the sequence number of the autograd node a forward op created (the counter
    after the op, minus one); ``in_backward`` that of the autograd node running a backward op.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[Any, Any, int, int | None]] = []
        self._by_storage: dict[int, list[int]] = {}  # storage address -> records holding it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if args and isinstance(args[0], torch.Tensor) and _writes_first(func):
            self._freeze(args[0])
        out = func(*args, **(kwargs or {}))
        node = torch._C._current_autograd_node()
        seq = torch.autograd._get_sequence_nr() - 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self._by_storage.setdefault(_address(t), []).append(len(self.records))
        self.records.append((func, out, seq, None if node is None else node._sequence_nr()))
        return out

    def _freeze(self, target: torch.Tensor) -> None:
        """Before an in-place op writes ``target``'s storage: every recorded output sharing
        that storage is replaced by a copy of its value now (the value its op produced; eager
        and the graph read it as such), so that later writes do not show in the record."""
        if target.layout != torch.strided:
            return
        key = _address(target)
        for i in self._by_storage.get(key, ()):
            func, out, seq, back = self.records[i]
            if isinstance(out, (tuple, list)):
                out = type(out)(_copy_if(t, key) for t in out)
            else:
                out = _copy_if(out, key)
            self.records[i] = (func, out, seq, back)


def _writes_first(func: Any) -> bool:
    """Whether the aten op writes into its first argument (``add_``, ``sigmoid_``...)."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.arguments:
        return False
    info = schema.arguments[0].alias_info
    return bool(info is not None and info.is_write)


def _address(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


def _copy_if(t: Any, key: int) -> Any:
    return t.clone() if isinstance(t, torch.Tensor) and _address(t) == key else t


def as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    """A tensor or a tuple of tensors as a tuple (InputError otherwise)."""
    items = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    for t in items:
        if not isinstance(t, torch.Tensor):
            raise InputError(
                f"model inputs must be tensors (a tensor or a tuple of them), got "
                f"{type(t).__name__}; pass torch tensors"
            )
    return tuple(items)


class _Smoothing(TorchFunctionMode):
    """Records the ``label_smoothing`` argument of every ``F.cross_entropy`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.cross_entropy:
            eps = kwargs.get("label_smoothing", args[7] if len(args) > 7 else 0.0)
            if isinstance(eps, float) and eps:
                self.values.append(eps)
        return func(*args, **kwargs)


#: torch's messages for two operands of different floating dtypes (float64 traced, float32 made)
_MIXED_DTYPES = re.compile(
    r"(?i)(double|float64)\W.*\W(float|float32)\b|\b(float|float32)\W.*(double|float64)"
    r"|expected self\.dtype to be equal to src\.dtype"  # scatter, scatter_reduce: no names
)


def capture(model: nn.Module, inputs: Any, targets: torch.Tensor, loss: LossFn) -> Graph:
    """Trace ``loss(model(*inputs), targets)`` and its gradient w.r.t. every parameter.

    The model is copied and traced in float64 (the values as the user wrote them, widened
    exactly); the model itself is not modified. Raises :class:`InputError` listing every op
    no number system of fpgrad implements, with its module path.
    """
    import torch.fx.traceback as fx_traceback

    from fpgrad.graph.ops import unsupported_message
    from fpgrad.graph.out_writes import restore_out_targets
    from fpgrad.graph.values import check_values

    if not isinstance(model, nn.Module):
        raise InputError(f"from_module needs a torch nn.Module, got {type(model).__name__}")
    if not callable(loss):
        raise InputError("loss must be a torch loss module, a torch functional loss or a callable")
    if not isinstance(targets, torch.Tensor):
        raise InputError(f"targets must be a tensor, got {type(targets).__name__}")
    xs = as_tuple(inputs)
    for what, t in [*((f"input {i}", x) for i, x in enumerate(xs)), ("targets", targets)]:
        if t.numel() == 0:
            raise InputError(
                f"{what} is empty (shape {tuple(t.shape)}): there is no example to diagnose; "
                "pass at least one example (a batch of size >= 1)"
            )
    check_values(model, xs, targets, loss)
    m64 = copy_model(model).to(torch.float64)
    names = [n for n, _ in trainable(m64)]
    if not names:
        raise InputError(
            "the model has no parameters that require gradients: there is no gradient to "
            "diagnose"
        )
    ps = [p.detach().clone().requires_grad_() for _, p in trainable(m64)]
    before = {id(b): b.detach().clone() for b in m64.buffers()}  # out= may write them
    args = [_widen(t) for t in (*xs, targets)]
    # the values as given: the forward may change its inputs in place while it is traced
    params = {n: p.detach().numpy().copy() for n, p in zip(names, ps, strict=True)}
    data = [_np(t) for t in args]
    loss = loss_in(loss, torch.float64)
    fn = joint_function(m64, names, loss)
    joint = _Joint(m64, fn)

    def traced(params: list[torch.Tensor], *rest: torch.Tensor) -> Any:
        return joint(params, *rest)

    traced._orig_mod = joint  # type: ignore[attr-defined]  # make_fx: record module paths
    seen = _Smoothing()
    try:
        with fx_traceback.preserve_node_meta(), seen:
            gm = make_fx(traced, record_module_stack=True)(ps, *args)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the user's model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        unused = _UNUSED.search(first)
        if unused and int(unused.group(1)) < len(names):
            raise InputError(
                f"parameter {names[int(unused.group(1))]!r} does not reach the loss (torch "
                "leaves its gradient None); fpgrad compares every parameter's gradient: remove "
                "it, or hold it as a buffer"
            ) from None
        if _MIXED_DTYPES.search(first):
            raise InputError(
                f"torch could not trace the model in float64 ({first}): the forward creates "
                "float32 tensors (torch.eye, torch.ones, torch.tensor ... without dtype=) that "
                "meet the model's values; create them with dtype=x.dtype so that the model runs "
                "in every precision"
            ) from None
        if "_local_scalar_dense" in first:
            raise InputError(
                "torch could not trace the model's forward and backward: the model or the loss "
                "reads a tensor's value as a Python number (.item(), float(t), if t: ...; "
                "F.one_hot checks its classes so, pack_padded_sequence reads its lengths, "
                "F.gaussian_nll_loss checks var < 0); fpgrad needs a forward that make_fx can "
                "trace: write one-hot targets as zeros(...).scatter(1, y[:, None], 1.0), pad "
                "sequences and mask instead of packing, write the Gaussian NLL as "
                "0.5 * (log(var) + (x - t)**2 / var)"
            ) from None
        raise InputError(
            f"torch could not trace the model's forward and backward ({first}); fpgrad needs "
            "a forward that make_fx can trace (no data-dependent Python control flow)"
        ) from None
    restore_out_targets(gm, before)
    fresh = [torch.from_numpy(a.copy()) for a in data]
    paths = _module_paths(gm, copy_model(model).to(torch.float64), names, loss, fresh)
    taps = [name for name, _ in getattr(m64, TAPS, None) or ()]
    graph = Graph(
        gm=gm,
        param_names=names,
        params=params,
        inputs=data[:-1],
        targets=data[-1],
        paths=paths,
        model=copy_model(model),  # a snapshot: later changes to the user's model do not leak
        loss_fn=loss,
        taps=taps,
        smoothing=tuple(seen.values),
    )
    message = unsupported_message(graph)
    if message:
        raise InputError(message)
    return graph


#: torch.autograd.grad's error for an input the loss does not depend on
_UNUSED = re.compile(r"differentiated Tensor at index (\d+) appears to not have been used")
_NO_VALUE = {"aten.detach.default", "aten.alias.default"}
#: (traced, run) pairs that are one op: make_fx copies a tensor literal that eager lifts
_SAME = {("aten.lift_fresh_copy.default", "aten.lift_fresh.default")}


def fused_rnn(records: list[Any]) -> bool:
    """Whether eager ran oneDNN's fused recurrent layer (torch's float32/bfloat16 nn.LSTM on
    CPU), which the float64 trace holds as the cell's ops."""
    return any("mkldnn_rnn" in str(r[0]) for r in records)


def align(
    nodes: list[fx.Node], records: list[Any], casts: bool = False
) -> list[tuple[fx.Node, Any]]:
    """Pair graph op nodes with recorded eager ops, in order; a detach or alias present on
    one side only is skipped (they change no value). With ``casts``, a dtype cast
    (``_to_copy``) that eager runs and the float64 trace lacks is skipped too: torch's kernel
    computed part of the same function in another dtype (``F.rms_norm`` upcasts float16 and
    bfloat16 to float32). Raises InputError on any other difference: then the graph is not
    what eager runs."""
    pairs: list[tuple[fx.Node, Any]] = []
    i = j = 0
    skip = _NO_VALUE | ({"aten._to_copy.default"} if casts else set())
    while i < len(nodes) and j < len(records):
        node, rec = nodes[i], records[j]
        if node.target == rec[0] or (str(node.target), str(rec[0])) in _SAME:
            pairs.append((node, rec))
            i, j = i + 1, j + 1
        elif str(rec[0]) in skip:
            j += 1
        elif str(node.target) in _NO_VALUE:
            i += 1
        elif fused_rnn(records[j:]):
            raise InputError(
                "the eager run calls oneDNN's fused aten.mkldnn_rnn_layer where the graph (traced in "
                "float64) holds the cell's ops: torch runs nn.LSTM in float32/bfloat16 on CPU "
                "through oneDNN, whose rounding fpgrad cannot replay; compare inside "
                "`with torch.backends.mkldnn.flags(enabled=False):` (torch then runs the "
                "graph's ops, as it does for float64), or compare only float64 / emulated / "
                "exact columns"
            )
        else:
            raise InputError(
                f"the eager run diverges from the captured graph at op {i} ({node.target} "
                f"traced, {rec[0]} run): the model's forward depends on its dtype or data"
            )
    rest = [n for n in nodes[i:] if str(n.target) not in _NO_VALUE]
    rest_r = [r for r in records[j:] if str(r[0]) not in skip]
    if rest or rest_r:
        raise InputError(
            f"the eager run and the captured graph differ in length ({len(rest)} traced ops "
            f"and {len(rest_r)} run ops left over): the model's forward depends on its dtype"
        )
    return pairs


def loss_in(loss: LossFn, dtype: torch.dtype, precision: str | None = None) -> LossFn:
    """A loss module's copy with its floating buffers (class weights) in ``dtype``: widened
    exactly, or correctly rounded into ``precision``; other callables as given."""
    if not isinstance(loss, nn.Module):
        return loss
    out = copy.deepcopy(loss)
    with torch.no_grad():
        for _, b in out.named_buffers():
            if b.is_floating_point():
                if precision is None:
                    b.data = b.data.to(dtype)
                else:
                    from fpgrad.run.torch_native import to_dtype

                    b.data = to_dtype(b.detach().to(torch.float64).numpy(), precision)
    return out


def _widen(t: torch.Tensor) -> torch.Tensor:
    """A copy (never the caller's storage: the forward may write to its inputs), floating
    tensors widened exactly to float64."""
    return t.detach().to(torch.float64 if t.is_floating_point() else t.dtype, copy=True)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().copy()


def _forward_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]  # "model.blocks.0.ff.0" under the _Joint wrapper
    return path[len("model.") :] if path.startswith("model.") else ""


def _module_paths(
    gm: fx.GraphModule, m64: nn.Module, names: list[str], loss: LossFn, args: list[torch.Tensor]
) -> dict[str, str]:
    """Module path per op node: forward from ``nn_module_stack``, backward from the forward
    op that created the autograd node running it (an eager float64 run, matched op by op)."""
    ops = [n for n in gm.graph.nodes if n.op not in _SKIP and n.target is not operator.getitem]
    rec = OpRecorder()
    ps = [p.detach().clone().requires_grad_() for _, p in trainable(m64)]
    with rec:
        joint_function(m64, names, loss)(ps, *args)
    paths: dict[str, str] = {}
    by_seq: dict[int, str] = {}
    pairs = align(ops, rec.records)
    matched = {node.name: r for node, r in pairs}
    for node in ops:
        r = matched.get(node.name)
        if r is None or r[3] is None:
            paths[node.name] = _forward_path(node)
            if r is not None:
                by_seq.setdefault(r[2], paths[node.name])
        else:
            paths[node.name] = by_seq.get(r[3], "")
    for node in gm.graph.nodes:  # getitem: the path of the tuple it reads
        if node.target is operator.getitem:
            paths[node.name] = paths.get(node.args[0].name, "")
    return paths
