"""Torch modules to layer entries: the supported modules, ``nn.Sequential`` walks and chains traced by torch.fx."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.model.network import Network

SUPPORTED = (
    "Linear",
    "ReLU",
    "LeakyReLU",
    "Sigmoid",
    "Tanh",
    "BatchNorm1d",
    "Softmax",
    "LogSoftmax (last, with NLLLoss)",
    "Flatten",
    "Identity",
    "Dropout (p=0 or eval mode)",
)
SUPPORTED_TEXT = ", ".join(SUPPORTED)
LOSS_NAMES = ("cross_entropy", "mse", "bce", "nll")
MODEL_KEYS = {"name", "state_dict", "state_dict_key", "modules", "mode", "loss", "data", "policy"}
MODES = ("train", "eval")
_SPEC_CLASSES = (
    "Linear",
    "ReLU",
    "LeakyReLU",
    "Sigmoid",
    "Tanh",
    "BatchNorm1d",
    "Softmax",
    "LogSoftmax",
    "Flatten",
    "Identity",
    "Dropout",
)
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class _Entry:
    """One layer of the chain: a fpgrad kind (or flatten/identity/log_softmax) and its values."""

    path: str  # where it lives in the torch model ("features.3", "fc1", an fx node name)
    label: str  # the torch class for messages ("Linear", "F.relu")
    kind: str
    params: dict[str, np.ndarray] = field(default_factory=dict)
    slope: float | None = None
    eps: float | None = None
    flatten: tuple[int, int] | None = None
    note: str | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Imported:
    """An imported model: the network, the fpgrad document it was built from, and where each
    fpgrad layer came from in the torch model."""

    network: Network
    doc: dict[str, Any]
    origin: dict[str, str]  # fpgrad layer name -> torch path
    notes: list[str] = field(default_factory=list)

    @property
    def param_names(self) -> dict[str, str]:
        """fpgrad parameter name (``features_3.weight``) -> state dict key (``features.3.weight``)."""
        return {
            f"{ly.name}.{p}": f"{self.origin[ly.name]}.{p}" if self.origin[ly.name] else p
            for ly in self.network.layers
            for p in ly.params
        }


def entries_from_module(module: Any) -> list[_Entry]:
    from torch import nn

    if not isinstance(module, nn.Module):
        raise InputError(
            f"expected a torch.nn.Module, got {type(module).__name__}; pass the model itself "
            "(or use a model file with its state dict)"
        )
    entries: list[_Entry] = []
    _walk(module, "", entries)
    if not entries:
        raise InputError(f"{type(module).__name__} has no layers to import")
    return entries


def _walk(module: Any, prefix: str, out: list[_Entry]) -> None:
    from torch import nn

    if type(module) is nn.Sequential:
        for child_name, child in module.named_children():
            _walk(child, f"{prefix}.{child_name}" if prefix else child_name, out)
        return
    if type(module).__name__ in _SPEC_CLASSES and type(module) is getattr(
        nn, type(module).__name__
    ):
        out.append(_leaf(prefix, module, len(out)))
        return
    if type(module).__module__.startswith("torch.nn"):  # a torch layer fpgrad does not have
        raise _unsupported(type(module).__name__, len(out), prefix)
    _trace_chain(module, prefix, out)


def _unsupported(cls: str, index: int, path: str) -> InputError:
    where = f" ({path})" if path else ""
    return InputError(
        f"unsupported module {cls!r} at index {index}{where}; fpgrad supports: {SUPPORTED_TEXT}"
    )


def _floats(t: Any, what: str) -> np.ndarray:
    """A tensor's values as float64, widened exactly."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise InputError(f"{what} is a {type(t).__name__}, not a tensor")
    if not t.is_floating_point():
        raise InputError(f"{what} has dtype {t.dtype}; fpgrad needs floating-point weights")
    return t.detach().to("cpu", torch.float64).numpy().copy()


def _leaf(path: str, mod: Any, index: int, params: dict[str, Any] | None = None) -> _Entry:
    """The entry of one supported torch layer. ``params`` overrides the module's own tensors
    (a module built on the meta device from a spec, filled from a state dict)."""
    cls = type(mod).__name__
    at = f"{cls} at index {index}" + (f" ({path})" if path else "")

    def get(pname: str) -> Any:
        return params[pname] if params is not None else getattr(mod, pname)

    if cls == "Linear":
        p = {"weight": _floats(get("weight"), f"{at}: weight")}
        bias = get("bias")
        if bias is not None:
            p["bias"] = _floats(bias, f"{at}: bias")
        return _Entry(path, cls, "dense", p)
    if cls == "BatchNorm1d":
        if not mod.training and mod.track_running_stats and mod.running_mean is not None:
            return _eval_batch_norm(path, index, mod, at, get)
        n = mod.num_features
        note = None
        if mod.affine and get("weight") is not None:
            gamma = _floats(get("weight"), f"{at}: weight")
        else:
            gamma, note = np.ones(n), "affine=False: gamma = 1 and beta = 0, which change no value"
        if mod.affine and get("bias") is not None:
            beta = _floats(get("bias"), f"{at}: bias")
        else:
            beta = np.zeros(n)
            note = note or "bias=False: beta = 0, which changes no value"
        if note:
            note = f"{cls} {path or index}: {note} (their gradients are reported; torch has none)"
        return _Entry(
            path,
            cls,
            "batch_norm",
            {"weight": gamma, "bias": beta},
            eps=_real(mod.eps, f"{at}: eps", positive=True),
            note=note,
        )
    if cls in ("ReLU", "Sigmoid", "Tanh"):
        return _Entry(path, cls, cls.lower())
    if cls == "LeakyReLU":
        return _Entry(
            path, cls, "leaky_relu", slope=_real(mod.negative_slope, f"{at}: negative_slope")
        )
    if cls in ("Softmax", "LogSoftmax"):
        _check_dim(mod.dim, at)
        return _Entry(path, cls, "softmax" if cls == "Softmax" else "log_softmax")
    if cls == "Flatten":
        return _Entry(path, cls, "flatten", flatten=(mod.start_dim, mod.end_dim))
    if cls == "Identity":
        return _Entry(path, cls, "identity")
    if cls == "Dropout":
        if mod.p != 0 and mod.training:
            raise InputError(
                f"{at}: Dropout(p={mod.p}) in training mode is random, and fpgrad evaluates one "
                "deterministic pass; call .eval() on it (it is then the identity) or remove it"
            )
        return _Entry(path, cls, "identity")
    raise _unsupported(cls, index, path)  # pragma: no cover - callers check the class


def _eval_batch_norm(path: str, index: int, mod: Any, at: str, get: Any) -> _Entry:
    """An eval-mode BatchNorm1d with running statistics: batch_norm_eval, normalising with
    running_mean and running_var (never updated); no weight or bias where torch has none."""
    stats = {b: _floats(get(b), f"{at}: {b}") for b in ("running_mean", "running_var")}
    if np.any(stats["running_var"] < 0):
        raise InputError(f"{at}: running_var has a negative value; a variance is >= 0")
    params: dict[str, np.ndarray] = {}
    for pname in ("weight", "bias"):
        t = get(pname) if mod.affine else None
        if t is not None:
            params[pname] = _floats(t, f"{at}: {pname}")
    note = (
        f"BatchNorm1d {path or index}: eval mode, normalised with its running statistics "
        "(running_mean, running_var: constants, not updated)"
    )
    eps = _real(mod.eps, f"{at}: eps", positive=True)
    return _Entry(path, "BatchNorm1d", "batch_norm_eval", params, eps=eps, note=note, stats=stats)


def _real(value: Any, at: str, positive: bool = False) -> float:
    """A module's numeric argument (slope, eps) as a float, within float32's range."""
    from fpgrad.model.validate import check_float

    v = check_float(value, at, 0.0 if positive else -3.4e38, 3.4e38, open_low=positive)
    return v


def _check_dim(dim: Any, at: str) -> None:
    # torch's implicit dim for a 2-D input is 1 (with a warning)
    if dim not in (1, -1, None):
        raise InputError(
            f"{at}: dim={dim} normalises over the batch; fpgrad's softmax is over the features "
            "(dim=1 or dim=-1)"
        )


# ---- modules that are not Sequential: a chain traced by torch.fx -----------------------------

_FN_KINDS = {
    "relu": "relu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "leaky_relu": "leaky_relu",
    "softmax": "softmax",
    "log_softmax": "log_softmax",
    "flatten": "flatten",
}


def _function_kind(node: Any) -> str | None:
    import torch
    import torch.nn.functional as F

    if node.op == "call_method":
        return _FN_KINDS.get(str(node.target))
    known = {
        F.relu: "relu",
        torch.relu: "relu",
        F.tanh: "tanh",
        torch.tanh: "tanh",
        F.sigmoid: "sigmoid",
        torch.sigmoid: "sigmoid",
        F.leaky_relu: "leaky_relu",
        F.softmax: "softmax",
        torch.softmax: "softmax",
        F.log_softmax: "log_softmax",
        torch.log_softmax: "log_softmax",
        torch.flatten: "flatten",
    }
    try:
        return known.get(node.target)
    except TypeError:  # pragma: no cover - an unhashable target
        return None


def _trace_chain(module: Any, prefix: str, out: list[_Entry]) -> None:
    import torch.fx

    cls = type(module).__name__
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the user's model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"cannot follow {cls}.forward with torch.fx ({first}); write the model as "
            "nn.Sequential, or give the modules in order in a model file"
        ) from None
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise InputError(f"{cls}.forward takes {len(inputs)} inputs; fpgrad needs one (x)")
    previous = inputs[0]
    for node in nodes:
        if node.op == "placeholder":
            continue
        if node.op == "get_attr":
            raise InputError(
                f"{cls}.forward uses the tensor {node.target!r} directly; fpgrad imports "
                f"chains of layers ({SUPPORTED_TEXT})"
            )
        if node.op == "output":
            if node.args[0] is not previous:
                raise InputError(
                    f"{cls}.forward must return the output of its last layer (one tensor)"
                )
            return
        tensors = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if not node.args or node.args[0] is not previous or len(tensors) != 1:
            raise InputError(
                f"{cls}.forward is not a chain at node {node.name!r} ({_node_text(node)}): "
                "fpgrad imports one layer after another (no branches, residuals or extra inputs)"
            )
        if node.op == "call_module":
            target = str(node.target)
            _walk(module.get_submodule(target), f"{prefix}.{target}" if prefix else target, out)
        else:
            out.append(_function_entry(node, cls, len(out)))
        previous = node


def _node_text(node: Any) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "?")
    return f"{node.op} {target}"


def _function_entry(node: Any, cls: str, index: int) -> _Entry:
    kind = _function_kind(node)
    at = f"{_node_text(node)} at index {index} (node {node.name!r} of {cls}.forward)"
    if kind is None:
        raise InputError(
            f"unsupported operation {_node_text(node)!r} at index {index} (node {node.name!r} of "
            f"{cls}.forward); fpgrad supports: {SUPPORTED_TEXT} and their torch.nn.functional forms"
        )
    args, kwargs = list(node.args[1:]), dict(node.kwargs)
    kwargs.pop("_stacklevel", None)
    kwargs.pop("inplace", None)
    if kwargs.pop("dtype", None) is not None:
        raise InputError(f"{at}: a dtype argument changes the precision; remove it")
    label = f"F.{kind}"
    if kind == "leaky_relu":
        slope = args[0] if args else kwargs.get("negative_slope", 0.01)
        return _Entry(node.name, label, kind, slope=float(slope))
    if kind in ("softmax", "log_softmax"):
        _check_dim(args[0] if args else kwargs.get("dim"), at)
        return _Entry(node.name, label, kind)
    if kind == "flatten":
        start = args[0] if args else kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
        return _Entry(node.name, label, kind, flatten=(int(start), int(end)))
    return _Entry(node.name, label, kind)


# ---- entries to a network --------------------------------------------------------------------
