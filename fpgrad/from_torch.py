"""Bring your own model: a torch module (or a state dict and a list of modules) becomes a
fpgrad :class:`~fpgrad.network.Network`.

Two ways in:

* Python: :func:`network_from_module` (``module, x, y, loss``) walks an ``nn.Sequential``
  (nested Sequentials flattened) or a simple module whose ``forward`` is a chain of layers
  (traced with ``torch.fx``) and maps every layer to a fpgrad layer.
* Files: a *model file* (TOML) names the modules in order, the state dict saved with
  ``torch.save(model.state_dict(), PATH)`` and the data (:func:`load_model_file`)::

      name = "digits"
      state_dict = "mlp.pt"          # loaded with torch.load(weights_only=True), or .safetensors
      modules = ["Linear(64, 32)", "ReLU()", "Linear(32, 10)"]
      [loss]
      type = "cross_entropy"
      [data]
      x_file = "x.npy"
      y_file = "y.npy"

Mapping (torch -> fpgrad): Linear -> dense; ReLU, LeakyReLU(negative_slope), Sigmoid, Tanh ->
the activations; Softmax(dim=1 or -1) -> softmax; BatchNorm1d in training mode -> batch_norm
(batch statistics, biased variance; ``affine=False`` or ``bias=False`` become gamma = 1,
beta = 0, which change no value); BatchNorm1d in eval mode with running statistics ->
batch_norm_eval (its running_mean and running_var, not updated; no weight or bias where torch
has none); a final LogSoftmax with NLLLoss -> cross_entropy on
the logits (torch's cross_entropy *is* log_softmax followed by nll_loss); Flatten (first, on
[batch, ...] data), Identity and Dropout (p=0, or in eval mode; in a model file any p, noted)
are dropped. A model file's ``mode = "eval"`` puts its BatchNorm1d modules in eval mode.
Anything else is refused, by name and place. Weights and data are widened to float64 exactly.

Every imported network goes through :func:`fpgrad.netfile.parse_network` as the document that
``fpgrad import`` writes, so an imported model and its TOML file are the same network, checked
by the same rules. Files are never unpickled beyond tensors: ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import ast
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.network import Network

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover
    pass

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


# ---- the Python API --------------------------------------------------------------------------


def network_from_module(
    module: Any, x: Any, y: Any, loss: Any = "cross_entropy", name: str = "model"
) -> Network:
    """The fpgrad network of a torch module and one batch of data.

    ``module``: an ``nn.Sequential`` (nested ones are flattened), one supported layer, or a
    module whose ``forward`` is a chain of supported layers and functions (traced by torch.fx).
    ``x``: inputs [batch, features] (or [batch, ...] with a leading ``nn.Flatten``); ``y``: the
    targets as the loss takes them. ``loss``: "cross_entropy" (from logits; class indices or
    probability rows), "mse", "bce" (with logits), "nll" (after a final LogSoftmax), or the
    torch loss module (CrossEntropyLoss, MSELoss, BCEWithLogitsLoss, NLLLoss; mean reduction).
    Raises :class:`~fpgrad.errors.InputError` naming any unsupported module.
    """
    return import_module(module, x, y, loss, name).network


def import_module(
    module: Any, x: Any, y: Any, loss: Any = "cross_entropy", name: str = "model"
) -> Imported:
    """As :func:`network_from_module`, with the document and the origin of every layer."""
    entries = entries_from_module(module)
    return _finish(entries, _data_array(x, "x"), _data_array(y, "y"), loss, name, source=name)


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
    from fpgrad.validate import check_float

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


def _data_array(value: Any, what: str) -> np.ndarray:
    """Data as float64 (exact widening of floats; integers up to 2**53)."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if value.is_floating_point():
                value = value.to(torch.float64)
            value = value.numpy()
    except ImportError:  # pragma: no cover
        pass
    try:
        arr = np.asarray(value)
    except ValueError:
        raise InputError(
            f"data {what}: ragged array; every row must have the same length"
        ) from None
    if arr.dtype == object or arr.dtype.kind not in "fiu":
        raise InputError(f"data {what}: expected numbers, got an array of {arr.dtype}")
    if arr.dtype.kind in "iu" and arr.size and np.abs(arr).max() > 2**53:
        raise InputError(f"data {what}: integers above 2**53 are not exact float64 values")
    return np.asarray(arr, dtype=np.float64)


def _resolve_loss(loss: Any, entries: list[_Entry]) -> str:
    """The fpgrad loss kind; a final LogSoftmax with NLL becomes cross_entropy on the logits."""
    kind = _loss_kind(loss)
    last = entries[-1].kind if entries else None
    logsm = [i for i, e in enumerate(entries) if e.kind == "log_softmax"]
    if kind == "nll":
        if last != "log_softmax":
            raise InputError(
                "NLLLoss needs log-probabilities: end the model with LogSoftmax(dim=1), or use "
                "cross_entropy on the logits"
            )
        entries.pop()
        return "cross_entropy"
    if logsm:
        e = entries[logsm[0]]
        raise InputError(
            f"LogSoftmax at index {logsm[0]} ({e.path}) is supported only as the last module "
            'with NLLLoss (loss = "nll"), which is cross_entropy on the logits'
        )
    return kind


def _loss_kind(loss: Any) -> str:
    if isinstance(loss, str):
        if loss not in LOSS_NAMES:
            raise InputError(f"unknown loss {loss!r}; use one of {', '.join(LOSS_NAMES)}")
        return loss
    from torch import nn

    cls = type(loss).__name__
    table = {
        nn.CrossEntropyLoss: "cross_entropy",
        nn.MSELoss: "mse",
        nn.BCEWithLogitsLoss: "bce",
        nn.NLLLoss: "nll",
    }
    kind = table.get(type(loss))  # type: ignore[call-overload]
    if kind is None:
        hint = (
            "; BCELoss takes probabilities: drop the final Sigmoid and use BCEWithLogitsLoss "
            "(fpgrad's bce is from logits)"
            if cls == "BCELoss"
            else ""
        )
        raise InputError(
            f"unsupported loss {cls}; fpgrad supports CrossEntropyLoss, MSELoss, "
            f"BCEWithLogitsLoss and NLLLoss (after LogSoftmax){hint}"
        )
    if getattr(loss, "reduction", "mean") != "mean":
        raise InputError(f"{cls}(reduction={loss.reduction!r}): fpgrad's losses take the mean")
    for attr in ("weight", "pos_weight"):
        if getattr(loss, attr, None) is not None:
            raise InputError(f"{cls} with {attr}: class weights are not supported; remove {attr}")
    if getattr(loss, "label_smoothing", 0.0):
        raise InputError(
            f"{cls}(label_smoothing={loss.label_smoothing}): give smoothed probability rows as y "
            "instead (cross_entropy takes probability targets)"
        )
    return kind


def _layer_name(path: str, kind: str, index: int, used: set[str]) -> str:
    base = path.replace(".", "_") if path else f"{kind}{index}"
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name


def _finish(
    entries: list[_Entry],
    x: np.ndarray,
    y: np.ndarray,
    loss: Any,
    name: str,
    source: str,
) -> Imported:
    from fpgrad.netfile import parse_network

    entries = list(entries)
    notes = [e.note for e in entries if e.note]
    if x.ndim == 0:
        raise InputError("data x must be an array [batch, features]")
    flattened = False
    while entries and entries[0].kind in ("flatten", "identity"):
        e = entries.pop(0)
        if e.kind == "flatten":
            if e.flatten not in ((1, -1), (1, x.ndim - 1)):
                raise InputError(
                    f"{e.label} at {e.path}: flattens dims {e.flatten}; fpgrad needs "
                    "Flatten(start_dim=1, end_dim=-1) (one row per sample)"
                )
            if x.ndim > 2:
                x = x.reshape(x.shape[0], -1)
            flattened = True
    if x.ndim > 2:
        raise InputError(
            f"data x has shape {list(x.shape)}; fpgrad takes [batch, features]: start the model "
            "with nn.Flatten() or reshape x"
        )
    kept: list[_Entry] = []
    for e in entries:
        if e.kind == "flatten" and e.flatten not in ((1, -1), (1, 1)):
            raise InputError(
                f"{e.label} at {e.path}: Flatten{e.flatten} on [batch, features] values; fpgrad "
                "supports Flatten(start_dim=1) only"
            )
        if e.kind not in ("flatten", "identity"):
            kept.append(e)
    kind = _resolve_loss(loss, kept)
    if not kept:
        raise InputError("the model has no layer fpgrad can evaluate")
    layers: list[dict[str, Any]] = []
    origin: dict[str, str] = {}
    used: set[str] = set()
    if flattened:
        notes.append("inputs flattened to [batch, features] by the leading Flatten")
    if _loss_kind(loss) == "nll":
        notes.append(
            "final LogSoftmax + NLLLoss evaluated as cross_entropy on the logits (the same function)"
        )
    for i, e in enumerate(kept):
        lname = _layer_name(e.path, e.kind, i, used)
        origin[lname] = e.path
        spec: dict[str, Any] = {"type": e.kind, "name": lname}
        if e.kind == "dense":
            spec["weight"] = e.params["weight"].tolist()
            spec["bias"] = e.params["bias"].tolist() if "bias" in e.params else False
        elif e.kind == "batch_norm":
            spec["eps"] = e.eps
            spec["weight"] = e.params["weight"].tolist()
            spec["bias"] = e.params["bias"].tolist()
        elif e.kind == "batch_norm_eval":
            spec["eps"] = e.eps
            spec["running_mean"] = e.stats["running_mean"].tolist()
            spec["running_var"] = e.stats["running_var"].tolist()
            for pname in ("weight", "bias"):
                spec[pname] = e.params[pname].tolist() if pname in e.params else False
        elif e.kind == "leaky_relu":
            spec["slope"] = e.slope
        layers.append(spec)
    doc = {
        "name": name,
        "layer": layers,
        "loss": {"type": kind},
        "data": {"x": x.tolist(), "y": y.tolist()},
    }
    net = replace(parse_network(doc, source=source), notes=tuple(notes))
    return Imported(net, doc, origin, notes)


# ---- state dicts and model files ---------------------------------------------------------------


def load_state_dict(path: str | Path, key: str | None = None) -> dict[str, Any]:
    """A state dict of tensors from ``torch.save`` (read with ``weights_only=True``, so no
    arbitrary object is ever unpickled) or from a ``.safetensors`` file."""
    import pickle

    import torch

    from fpgrad.validate import regular_file_size

    path = Path(path)
    regular_file_size(path, "state dict file")
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InputError(
                f"{path}: reading .safetensors needs the safetensors package "
                "(pip install safetensors), or save with torch.save(model.state_dict(), PATH)"
            ) from None
        try:
            obj: Any = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a malformed file is bad input
            raise InputError(f"{path}: not a safetensors file ({_first_line(exc)})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            if found is None:
                detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
                raise InputError(
                    f"{path}: not a state dict file of torch.save "
                    f"({detail.group(1).strip() if detail else _first_line(exc)}); save the weights "
                    "with torch.save(model.state_dict(), PATH)"
                ) from None
            raise InputError(
                f"{path}: torch.load(weights_only=True) refused it: it holds a pickled object "
                f"({found.group(1)}), not only tensors, and fpgrad never unpickles arbitrary "
                "objects; save the weights with torch.save(model.state_dict(), PATH)"
            ) from None
        except Exception as exc:  # noqa: BLE001 - anything torch.load cannot read is bad input
            raise InputError(
                f"{path}: not a state dict file of torch.save ({type(exc).__name__}: "
                f"{_first_line(exc)}); "
                "save the weights with torch.save(model.state_dict(), PATH)"
            ) from None
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = ", ".join(map(repr, list(obj)[:8])) if isinstance(obj, Mapping) else "none"
            raise InputError(f"{path}: no entry {key!r} for state_dict_key (entries: {keys})")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise InputError(
            f"{path} holds a {type(obj).__name__}, not a state dict; save "
            "torch.save(model.state_dict(), PATH)"
        )
    _check_tensors(obj, path, torch)
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        nested = [k for k in bad if isinstance(obj[k], Mapping)]
        hint = (
            f"; if it is a checkpoint, name the state dict's entry: state_dict_key = {nested[0]!r}"
            if nested
            else ""
        )
        raise InputError(
            f"{path}: entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a tensor{hint}"
        )
    return dict(obj)


def _check_tensors(obj: Mapping[Any, Any], path: Path, torch: Any) -> None:
    """String keys; dense, real, materialized tensors; at most MAX_ELEMENTS numbers in all."""
    from fpgrad.validate import MAX_ELEMENTS

    total = 0
    for k, v in obj.items():
        if not isinstance(k, str):
            raise InputError(
                f"{path}: a key of the state dict is a {type(k).__name__}, not a string; save "
                "torch.save(model.state_dict(), PATH)"
            )
        if not isinstance(v, torch.Tensor):
            continue
        if v.layout != torch.strided or v.is_meta or v.is_complex() or v.is_quantized:
            kind = "a meta" if v.is_meta else f"a {v.layout}/{v.dtype}"
            raise InputError(
                f"{path}: entry {k!r} is {kind} tensor; save dense real weights "
                "(tensor.to_dense(), on the cpu)"
            )
        total += v.numel()
        if total > MAX_ELEMENTS:
            raise InputError(
                f"{path}: the state dict holds more than {MAX_ELEMENTS} numbers; fpgrad's exact "
                "reference is for smaller models"
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_SPEC = re.compile(
    r"^\s*(?:\(?(?P<path>[A-Za-z0-9_][A-Za-z0-9_.]*)\)?\s*:\s*)?"
    r"(?P<cls>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<args>\(.*\))?\s*$",
    re.DOTALL,
)


def parse_spec(text: str, where: str) -> tuple[str | None, str, list[Any], dict[str, Any], bool]:
    """``"[PATH:] Class[(literal args)]"`` -> (path, class, args, kwargs, bare).

    The syntax of ``print(model)``'s lines: ``"(0): Linear(in_features=64, out_features=32)"``,
    ``"fc1: Linear(64, 32)"``, ``"ReLU()"``, or a bare ``"Linear"`` whose shape comes from the
    state dict. Arguments are literals (``ast.literal_eval``); nothing is evaluated.
    """
    if not isinstance(text, str):
        raise InputError(f'{where}: expected a string like "Linear(64, 32)", found {text!r}')
    m = _SPEC.match(text)
    if not m:
        raise InputError(
            f'{where}: cannot read {text!r}; write a module as "Linear(64, 32)", "ReLU()" or '
            '"fc1: Linear" (path in the state dict, then the class)'
        )
    cls = m.group("cls")
    if cls not in _SPEC_CLASSES:
        hint = (
            '; list the modules inside it one by one, with their paths ("features.0: Linear")'
            if cls in ("Sequential", "ModuleList", "ModuleDict")
            else ""
        )
        raise InputError(
            f"{where}: unsupported module {cls!r}; fpgrad supports: {SUPPORTED_TEXT}{hint}"
        )
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if m.group("args") is not None:
        try:
            call = ast.parse(f"f{m.group('args')}", mode="eval").body
            assert isinstance(call, ast.Call)
            args = [ast.literal_eval(a) for a in call.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
            if any(k.arg is None for k in call.keywords):
                raise ValueError("**kwargs")
        except (SyntaxError, ValueError, AssertionError, TypeError):
            raise InputError(
                f"{where}: the arguments of {text.strip()!r} must be literals "
                "(numbers, True/False, None)"
            ) from None
    for k in ("device", "dtype"):
        if k in kwargs:
            raise InputError(f"{where}: drop {k}= from {cls}: the state dict decides it")
    return m.group("path"), cls, args, kwargs, m.group("args") is None


def entries_from_state_dict(
    specs: list[Any], state_dict: Mapping[str, Any], where: str = "model", mode: str = "train"
) -> list[_Entry]:
    """The layers named by ``specs`` (see :func:`parse_spec`), in order, with their tensors
    from ``state_dict``. Every tensor of the state dict must belong to one module; shapes must
    match the modules' arguments. ``mode`` "eval" makes a BatchNorm1d with running statistics
    batch_norm_eval (its running_mean and running_var required); Dropout is the identity in
    either mode."""
    from torch import nn

    if not isinstance(specs, list) or not specs:
        raise InputError(
            f"{where}: modules must be a non-empty list, e.g. "
            '["Linear(64, 32)", "ReLU()", "Linear(32, 10)"]'
        )
    remaining = dict(state_dict)
    keys_text = ", ".join(list(state_dict)[:6]) + (", ..." if len(state_dict) > 6 else "")
    keys_text = keys_text or "none, it is empty"
    entries: list[_Entry] = []
    paths: set[str] = set()
    parsed = [parse_spec(text, f"{where}: modules[{i}]") for i, text in enumerate(specs)]
    for i, (text, (path, cls, args, kwargs, bare)) in enumerate(zip(specs, parsed, strict=True)):
        at = f"{where}: modules[{i}]"
        path = str(i) if path is None else path
        if path in paths:
            raise InputError(f"{at}: path {path!r} is used twice; each module has its own path")
        paths.add(path)
        label = f"{at} {str(text).strip()!r}"
        prefix = f"{path}."
        if cls in ("Linear", "BatchNorm1d"):
            if bare:
                args, kwargs = _shape_from_state_dict(cls, path, state_dict, label, keys_text)
            try:
                meta = getattr(nn, cls)(*args, **kwargs, device="meta")
            except Exception as exc:  # noqa: BLE001 - torch's own argument checks
                raise InputError(f"{label}: {_first_line(exc)}") from None
            tensors: dict[str, Any] = {}
            for pname, p in meta.named_parameters(recurse=False):
                key = prefix + pname
                if key not in state_dict:
                    raise InputError(
                        f"{label}: the state dict has no {key!r} (its keys: {keys_text}); "
                        'give the module\'s path, e.g. "fc1: Linear"'
                    )
                t = state_dict[key]
                if tuple(t.shape) != tuple(p.shape):
                    raise InputError(
                        f"{label} expects {key} of shape {list(p.shape)} but the state dict "
                        f"holds {list(t.shape)}"
                    )
                tensors[pname] = t
                remaining.pop(key, None)
            if cls == "BatchNorm1d":
                tensors.setdefault("weight", None)
                tensors.setdefault("bias", None)
                if mode == "eval" and meta.track_running_stats:
                    tensors.update(_running_stats(label, prefix, state_dict, meta.num_features))
                for b in _BN_BUFFERS:  # running statistics: unused in training mode
                    remaining.pop(prefix + b, None)
            elif "bias" not in tensors:
                tensors["bias"] = None
            if (prefix + "bias") in remaining and cls == "Linear":
                raise InputError(
                    f"{label} has bias=False but the state dict holds {prefix}bias; "
                    "remove bias=False"
                )
            # eval mode without running statistics uses batch statistics, as training mode
            meta.train(not (cls == "BatchNorm1d" and mode == "eval" and meta.track_running_stats))
            entries.append(_leaf(path, meta, i, params=tensors))
        else:
            try:
                mod = getattr(nn, cls)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - torch's own argument checks
                raise InputError(f"{label}: {_first_line(exc)}") from None
            if cls == "Dropout":
                mod.eval()  # one deterministic pass: dropout as in eval mode, the identity
            entry = _leaf(path, mod, i)
            if cls == "Dropout" and mod.p != 0:
                entry.note = (
                    f"modules[{i}] Dropout(p={mod.p}): evaluated as in eval mode, the identity "
                    "(training-mode dropout is random; fpgrad evaluates one deterministic pass)"
                )
            entries.append(entry)
    if remaining:
        key = next(iter(remaining))
        raise InputError(
            f"{where}: state dict key {key!r} belongs to no module in modules; list every module "
            'with its path ("fc1: Linear", or its index in nn.Sequential)'
        )
    return entries


def _running_stats(
    label: str, prefix: str, state_dict: Mapping[str, Any], n: int
) -> dict[str, Any]:
    """running_mean and running_var [n] of an eval-mode BatchNorm1d from the state dict."""
    out: dict[str, Any] = {}
    for b in ("running_mean", "running_var"):
        t = state_dict.get(prefix + b)
        if t is None:
            raise InputError(
                f'{label}: mode = "eval" normalises with the running statistics, but the state '
                f"dict has no {prefix}{b}; save the module's state dict with its buffers, or use "
                'BatchNorm1d(..., track_running_stats=False) (batch statistics) or mode = "train"'
            )
        if tuple(t.shape) != (n,):
            raise InputError(
                f"{label} expects {prefix}{b} of shape [{n}] but the state dict holds "
                f"{list(t.shape)}"
            )
        out[b] = t
    return out


def _shape_from_state_dict(
    cls: str, path: str, sd: Mapping[str, Any], label: str, keys_text: str
) -> tuple[list[Any], dict[str, Any]]:
    if cls == "Linear":
        w = sd.get(f"{path}.weight")
        if w is None or w.ndim != 2:
            raise InputError(
                f"{label}: the state dict has no 2-D {path}.weight to size it (its keys: "
                f'{keys_text}); give the path ("fc1: Linear") or the shape ("Linear(64, 32)")'
            )
        return [int(w.shape[1]), int(w.shape[0])], {"bias": f"{path}.bias" in sd}
    for key in ("weight", "running_mean"):
        t = sd.get(f"{path}.{key}")
        if t is not None and t.ndim == 1:
            kwargs: dict[str, Any] = {}
            if f"{path}.weight" not in sd:
                kwargs["affine"] = False
            elif f"{path}.bias" not in sd:
                kwargs["bias"] = False
            if f"{path}.running_mean" not in sd:
                kwargs["track_running_stats"] = False
            return [int(t.shape[0])], kwargs
    raise InputError(
        f"{label}: the state dict has no {path}.weight or {path}.running_mean to size it "
        f'(its keys: {keys_text}); give the size: "BatchNorm1d(32)"'
    )


def is_model_doc(doc: Mapping[str, Any]) -> bool:
    """A model file (state dict + modules) rather than a fpgrad network file."""
    return "state_dict" in doc or "modules" in doc


def read_toml(path: str | Path) -> dict[str, Any]:
    from fpgrad.validate import load_toml

    return load_toml(path, "network file")


def load_model_file(path: str | Path) -> Imported:
    """A model file: ``state_dict`` (path), ``modules`` (list), ``[loss]``, ``[data]``."""
    path = Path(path)
    doc = read_toml(path)
    where = str(path)
    unknown = set(doc) - MODEL_KEYS
    if unknown:
        raise InputError(
            f"{where}: unknown key {sorted(unknown)[0]!r} in a model file; allowed: "
            f"{', '.join(sorted(MODEL_KEYS))}"
        )
    for key in ("state_dict", "modules", "loss", "data"):
        if key not in doc:
            raise InputError(f"{where}: a model file needs {key} ({_MODEL_HELP[key]})")
    if not isinstance(doc["state_dict"], str):
        raise InputError(f"{where}: state_dict must be a path (string) to the saved state dict")
    key = doc.get("state_dict_key")
    if key is not None and not isinstance(key, str):
        raise InputError(f"{where}: state_dict_key must be a string")
    mode = doc.get("mode", "train")
    if mode not in MODES:
        raise InputError(f'{where}: mode = {mode!r}: use "train" (the default) or "eval"')
    sd = load_state_dict(path.parent / doc["state_dict"], key)
    entries = entries_from_state_dict(doc["modules"], sd, where, mode)
    loss = doc["loss"]
    if not isinstance(loss, dict) or set(loss) != {"type"}:
        raise InputError(f"{where}: [loss] needs exactly type = one of {', '.join(LOSS_NAMES)}")
    x, y = _model_data(doc["data"], path.parent, where)
    imported = _finish(entries, x, y, loss["type"], str(doc.get("name", path.stem)), where)
    if "policy" in doc:
        imported = _with_policies(imported, doc["policy"], where)
    return imported


def _with_policies(imported: Imported, tables: Any, where: str) -> Imported:
    """``[policy.NAME]`` tables of a model file; ``layers`` may name torch paths
    (``features.3``) or fpgrad layer names."""
    from dataclasses import replace

    from fpgrad.netfile import parse_policies

    if not isinstance(tables, dict):
        raise InputError(f"{where}: policy must be tables [policy.NAME]; see the README")
    by_path = {path: name for name, path in imported.origin.items() if path}
    translated: dict[str, Any] = {}
    for pname, table in tables.items():
        table = dict(table) if isinstance(table, dict) else table
        if isinstance(table, dict) and isinstance(table.get("layers"), dict):
            table["layers"] = {by_path.get(k, k): v for k, v in table["layers"].items()}
        translated[pname] = table
    net = parse_policies(translated, imported.network, where)
    doc = {**imported.doc, "policy": translated}
    return replace(imported, network=net, doc=doc)


_MODEL_HELP = {
    "state_dict": 'state_dict = "model.pt", saved with torch.save(model.state_dict(), PATH)',
    "modules": 'modules = ["Linear(64, 32)", "ReLU()", "Linear(32, 10)"], in order',
    "loss": '[loss] with type = "cross_entropy", "mse", "bce" or "nll"',
    "data": "[data] with x and y, or x_file and y_file (.npy or .csv)",
}


def _model_data(data: Any, base: Path, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(data, dict):
        raise InputError(f"{where}: [data] must be a table with x and y")
    unknown = set(data) - {"x", "y", "x_file", "y_file"}
    if unknown:
        raise InputError(
            f"{where}: [data]: unknown key {sorted(unknown)[0]!r}; use x, y, x_file, y_file"
        )
    out = []
    for k in ("x", "y"):
        if k in data and f"{k}_file" in data:
            raise InputError(f"{where}: [data]: give either {k} or {k}_file, not both")
        if k in data:
            out.append(_data_array(data[k], k))
        elif f"{k}_file" in data:
            out.append(_read_array(base / str(data[f"{k}_file"]), where))
        else:
            raise InputError(f"{where}: [data] needs {k} (inline array) or {k}_file (.npy or .csv)")
    return out[0], out[1]


def _read_array(path: Path, where: str) -> np.ndarray:
    from fpgrad.netfile import load_array_file

    return _data_array(load_array_file(path, where), f"file {path}")


def load_any(path: str | Path) -> Network:
    """A fpgrad network file or a model file (detected by its ``state_dict``/``modules`` keys)."""
    from fpgrad.netfile import load_network

    doc = read_toml(path)
    if is_model_doc(doc):
        return load_model_file(path).network
    return load_network(path)


# ---- writing a fpgrad network file ------------------------------------------------------------


def _toml_value(v: Any, indent: str = "") -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):  # pragma: no cover - parse_network refuses these
            raise InputError(f"non-finite value {v} cannot be written")
        return repr(v)  # shortest repr: reads back to the same float64
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        if v and isinstance(v[0], list):
            inner = indent + "  "
            rows = ",\n".join(inner + _toml_value(r, inner) for r in v)
            return "[\n" + rows + ",\n" + indent + "]"
        return "[" + ", ".join(_toml_value(r, indent) for r in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")  # pragma: no cover


def network_toml(imported: Imported, data_files: tuple[str, str] | None = None) -> str:
    """The fpgrad network file of an imported model (weights written exactly). With
    ``data_files`` the data table names those files instead of holding the values."""
    net = imported.network
    lines = [
        f"# fpgrad network imported from a torch model ({net.name}); every number is exact",
        f"name = {json.dumps(net.name)}",
        "",
    ]
    for spec, layer in zip(imported.doc["layer"], net.layers, strict=True):
        origin = imported.origin[layer.name]
        lines.append("[[layer]]" + (f"  # torch: {origin}" if origin else ""))
        for k, v in spec.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    lines += ["[loss]", f"type = {json.dumps(net.loss.kind)}", "", "[data]"]
    if data_files:
        lines += [f"x_file = {json.dumps(data_files[0])}", f"y_file = {json.dumps(data_files[1])}"]
    else:
        lines += [f"x = {_toml_value(net.x.tolist())}", f"y = {_toml_value(net.y.tolist())}"]
    for pname, table in imported.doc.get("policy", {}).items():
        lines += ["", f"[policy.{json.dumps(pname)}]"]
        for k, v in table.items():
            if isinstance(v, dict):
                inner = ", ".join(f"{json.dumps(a)} = {json.dumps(b)}" for a, b in v.items())
                lines.append(f"{k} = {{ {inner} }}")
            else:
                lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def write_network(imported: Imported, out: str | Path, data: str = "auto") -> list[str]:
    """Write ``out`` (a fpgrad TOML network file); data inline, or as ``.npy`` files beside it
    (``data="npy"``; ``"auto"``: files when the data holds more than 4096 numbers). Returns the
    paths written."""
    if data not in ("auto", "inline", "npy"):
        raise InputError(f"unknown data mode {data!r}; use auto, inline or npy")
    out = Path(out)
    net = imported.network
    use_files = data == "npy" or (data == "auto" and net.x.size + net.y.size > 4096)
    written = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        files = None
        if use_files:
            stem = out.name[: -len(out.suffix)] if out.suffix else out.name
            files = (f"{stem}.x.npy", f"{stem}.y.npy")
            np.save(out.parent / files[0], net.x)
            np.save(out.parent / files[1], net.y)
            written += [str(out.parent / f) for f in files]
        out.write_text(network_toml(imported, files))
    except OSError as exc:
        raise InputError(f"cannot write {str(out)!r}: {exc.strerror}") from None
    return [str(out), *written]


__all__ = [
    "Imported",
    "SUPPORTED",
    "entries_from_module",
    "entries_from_state_dict",
    "import_module",
    "is_model_doc",
    "load_any",
    "load_model_file",
    "load_state_dict",
    "network_from_module",
    "network_toml",
    "parse_spec",
    "write_network",
]
