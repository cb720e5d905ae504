"""Layer entries, data and a loss to a :class:`~fpgrad.model.network.Network` (through the network-file rules)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.model.from_torch.modules import LOSS_NAMES, Imported, _Entry, entries_from_module
from fpgrad.model.network import Network


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
    from fpgrad.model.netfile import parse_network

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


# ---- state dicts and model files ---------------------------------------------------------------
