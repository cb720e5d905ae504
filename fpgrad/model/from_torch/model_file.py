"""State dicts (``torch.load(weights_only=True)`` or safetensors) and model files (TOML)."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.model.from_torch.modules import (
    _BN_BUFFERS,
    _SPEC_CLASSES,
    LOSS_NAMES,
    MODEL_KEYS,
    MODES,
    SUPPORTED_TEXT,
    Imported,
    _Entry,
    _leaf,
)
from fpgrad.model.from_torch.network import _data_array, _finish
from fpgrad.model.network import Network


def load_state_dict(path: str | Path, key: str | None = None) -> dict[str, Any]:
    """A state dict of tensors from ``torch.save`` (read with ``weights_only=True``, so no
    arbitrary object is ever unpickled) or from a ``.safetensors`` file."""
    import pickle

    import torch

    from fpgrad.model.validate import regular_file_size

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
            found, detail = refused_pickle(exc)
            if found is None:
                raise InputError(
                    f"{path}: not a state dict file of torch.save ({detail}); save the weights "
                    "with torch.save(model.state_dict(), PATH)"
                ) from None
            raise InputError(
                f"{path}: torch.load(weights_only=True) refused it: it holds a pickled object "
                f"({found}), not only tensors, and fpgrad never unpickles arbitrary "
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
    from fpgrad.model.validate import MAX_ELEMENTS

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


#: the global a weights-only unpickler refused, in torch's wordings before and after 2.6
_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
#: torch's preamble, which advises ``weights_only=False``: never quoted
_PREAMBLE = re.compile(r"^\s*Weights only load failed\.")


def refused_pickle(exc: BaseException) -> tuple[str | None, str]:
    """(the refused global, or None; a one-line detail) of torch.load(weights_only=True)'s
    UnpicklingError, without torch's advice to load it with weights_only=False."""
    text = str(exc)
    found = _GLOBAL.search(text)
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if detail:
        return (found.group(1) if found else None), detail.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not _PREAMBLE.match(ln) and "weights_only" not in ln
             and not ln.startswith("Check the documentation")]  # fmt: skip
    return (found.group(1) if found else None), (lines[0] if lines else type(exc).__name__)


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
    from fpgrad.model.validate import load_toml

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

    from fpgrad.model.netfile import parse_policies

    if not isinstance(tables, dict):
        raise InputError(f"{where}: policy must be tables [policy.NAME]; see docs/howto/policies.md")
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
    from fpgrad.model.netfile import load_array_file

    return _data_array(load_array_file(path, where), f"file {path}")


def load_any(path: str | Path) -> Network:
    """A fpgrad network file or a model file (detected by its ``state_dict``/``modules`` keys)."""
    from fpgrad.model.netfile import load_network

    doc = read_toml(path)
    if is_model_doc(doc):
        return load_model_file(path).network
    return load_network(path)


# ---- writing a fpgrad network file ------------------------------------------------------------
