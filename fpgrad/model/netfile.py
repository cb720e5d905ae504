"""TOML network files to :class:`~fpgrad.model.network.Network`; all validation of user input.

The format (documented in docs/reference/files.md)::

    name = "tiny"            # optional
    seed = 0                 # seed of the init schemes

    [[layer]]
    type = "dense"           # dense, batch_norm, batch_norm_eval, relu, leaky_relu, sigmoid,
                             # tanh, softmax
    out = 4                  # width; "in" is taken from the previous layer or the data
    init = "he_normal"       # or a table {scheme = "uniform", low = -1, high = 1}
    bias_init = "zeros"      # default zeros; bias = false for no bias
    # weight = [[...], ...]  # explicit values instead of init, shape [out, in]
    # bias = [...]

    [loss]
    type = "mse"             # mse, cross_entropy (from logits), bce (from logits)

    [data]
    x = [[...], ...]         # or x_file = "x.npy" / "x.csv" (relative to the TOML file)
    y = [...]                # or y_file; class indices for cross_entropy, or one-hot rows

    [policy.mixed]           # optional precision policies (fpgrad.model.policy), any number
    extends = "autocast"     # optional: start from a built-in policy
    params = "float32"       # master weights; data = "..." for the inputs (default: params)
    softmax = "float32"      # op class = precision or "input"; default = "..." for the rest
    layers = { out = "float32" }

Every number written is a float64 and is taken exactly.

Long module: every rule a network file must satisfy is checked here, in one place, so that a
file, an imported model and the Python API are held to the same rules.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.model.network import (
    ACTIVATIONS,
    INIT_SCHEMES,
    LAYER_TYPES,
    LOSSES,
    Layer,
    Loss,
    Network,
    init_array,
    layer_seed,
)
from fpgrad.model.validate import (
    MAX_ELEMENTS,
    MAX_LAYERS,
    MAX_WIDTH,
    check_float,
    check_int,
    check_name,
    load_csv,
    load_npy,
    load_toml,
)

_TOP_KEYS = {"name", "seed", "layer", "loss", "data", "policy"}
_LAYER_KEYS = {
    "dense": {"type", "name", "in", "out", "init", "bias_init", "weight", "bias"},
    "batch_norm": {"type", "name", "eps", "weight", "bias", "init", "bias_init"},
    "batch_norm_eval": {
        "type",
        "name",
        "eps",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "init",
        "bias_init",
    },
    "leaky_relu": {"type", "name", "slope"},
}
_INIT_KEYS = {"scheme", "value", "low", "high", "mean", "std", "gain"}


def load_network(path: str | Path) -> Network:
    """Read and validate a network file; raises InputError with a one-line message."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise InputError(
            f"load_network: path must be a str or pathlib.Path (got {type(path).__name__})"
        )
    path = Path(path)
    doc = load_toml(path, "network file")
    return parse_network(doc, base=path.parent, source=str(path))


def parse_network(
    doc: dict[str, Any], base: Path | None = None, source: str = "network"
) -> Network:
    """Build a Network from a parsed TOML document (a dict)."""
    where = source
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise InputError(
            f"{where}: unknown top-level key {sorted(unknown)[0]!r}; "
            f"allowed: {', '.join(sorted(_TOP_KEYS))}"
        )
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise InputError(f"{where}: seed must be a non-negative integer below 2**63 (got {seed!r})")
    if "data" not in doc:
        raise InputError(f"{where}: missing [data] table with x and y")
    x, y = _parse_data(doc["data"], base or Path("."), where)
    loss = _parse_loss(doc.get("loss"), where)
    layers_doc = doc.get("layer")
    if not isinstance(layers_doc, list) or not layers_doc:
        raise InputError(f'{where}: no layers; add [[layer]] tables (type = "dense", out = N)')

    if len(layers_doc) > MAX_LAYERS:
        raise InputError(f"{where}: {len(layers_doc)} layers, above the limit of {MAX_LAYERS}")
    if not any(
        isinstance(s, dict)
        and (
            s.get("type") in ("dense", "batch_norm")
            or (s.get("type") == "batch_norm_eval" and s.get("weight", True) is not False)
        )
        for s in layers_doc
    ):
        raise InputError(
            f'{where}: the network has no parameter; add a [[layer]] with type = "dense"'
        )
    layers: list[Layer] = []
    width = x.shape[1]
    names: set[str] = set()
    budget = [MAX_ELEMENTS - x.size - y.size]  # numbers the parameters may still take
    for index, spec in enumerate(layers_doc):
        layer, width = _parse_layer(spec, index, width, seed, where, budget)
        if layer.name in names:
            raise InputError(f"{where}: layer {index}: duplicate layer name {layer.name!r}")
        names.add(layer.name)
        layers.append(layer)
    y = _check_targets(loss, y, width, where)
    net = Network(tuple(layers), loss, x, y, name=check_name(doc.get("name", Path(source).stem),
                                                             f"{where}: name"))  # fmt: skip
    return parse_policies(doc.get("policy", {}), net, where)


def parse_policies(doc: Any, net: Network, where: str) -> Network:
    """``[policy.NAME]`` tables, each checked against the network's layers."""
    from dataclasses import replace

    from fpgrad.model.policy import parse_policy

    if not isinstance(doc, dict):
        raise InputError(
            f"{where}: policy must be tables [policy.NAME]; see docs/howto/policies.md"
        )
    policies = {}
    for name, table in doc.items():
        policy = parse_policy(name, table, where)
        policy.resolve(net)  # unknown layer names fail here, at load time
        policies[name] = policy
    return replace(net, policies=policies) if policies else net


# ---- data ------------------------------------------------------------------------------


def _parse_data(data: Any, base: Path, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(data, dict):
        raise InputError(f"{where}: [data] must be a table with x and y")
    unknown = set(data) - {"x", "y", "x_file", "y_file"}
    if unknown:
        raise InputError(
            f"{where}: [data]: unknown key {sorted(unknown)[0]!r}; use x, y, x_file, y_file"
        )
    x = _array_field(data, "x", base, where)
    y = _array_field(data, "y", base, where)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise InputError(f"{where}: data x must be a 2-D array [batch, features] (got {x.ndim}-D)")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{where}: data x is empty")
    if y.ndim == 0:
        raise InputError(f"{where}: data y is a single number; give one target per input row")
    if x.size + y.size > MAX_ELEMENTS or x.shape[1] > MAX_WIDTH:
        raise InputError(
            f"{where}: [data] holds {x.size + y.size} numbers ({x.shape[1]} features), above "
            f"the limit of {MAX_ELEMENTS} numbers and {MAX_WIDTH} features; use less data"
        )
    if y.shape[0] != x.shape[0]:
        raise InputError(
            f"{where}: data y has {y.shape[0]} rows but x has {x.shape[0]}; give one target per input row"
        )
    return x, y


def _array_field(data: dict[str, Any], key: str, base: Path, where: str) -> np.ndarray:
    if key in data and f"{key}_file" in data:
        raise InputError(f"{where}: [data]: give either {key} or {key}_file, not both")
    if key in data:
        arr = _to_array(data[key], f"{where}: [data].{key}")
    elif f"{key}_file" in data:
        arr = _read_array_file(base / str(data[f"{key}_file"]), where)
    else:
        raise InputError(f"{where}: [data] needs {key} (inline array) or {key}_file (.npy or .csv)")
    _check_finite(arr, f"{where}: [data].{key}")
    return arr


def _read_array_file(path: Path, where: str) -> np.ndarray:
    arr = load_array_file(path, where)
    if arr.dtype.kind not in "fiub":
        raise InputError(f"{where}: data file {str(path)!r} holds {arr.dtype}, not numbers")
    return _exact_float64(arr, f"data file {path}", where)


def load_array_file(path: Path, where: str) -> np.ndarray:
    """The array in a .npy (never unpickled) or .csv file, as stored; one-line errors."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return load_npy(path, where)
    if suffix == ".csv":
        return load_csv(path, where)
    raise InputError(f"{where}: data file {str(path)!r}: unknown format; use .npy or .csv")


def _to_array(value: Any, where: str) -> np.ndarray:
    try:
        arr = np.array(value, dtype=object)
    except ValueError:
        raise InputError(f"{where}: ragged array; every row must have the same length") from None
    flat = arr.ravel()
    for v in flat:
        if isinstance(v, (list, tuple)):
            raise InputError(f"{where}: ragged array; every row must have the same length")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InputError(f"{where}: expected numbers, found {v!r}")
        if isinstance(v, int) and abs(v) > 2**53:
            raise InputError(f"{where}: integer {v} is not exactly a float64; write it as a float")
    return arr.astype(np.float64)


def _exact_float64(arr: np.ndarray, what: str, where: str) -> np.ndarray:
    if arr.dtype.kind in "iu" and arr.size and np.abs(arr).max() > 2**53:
        raise InputError(f"{where}: {what}: integers above 2**53 are not exact float64 values")
    return np.asarray(arr, dtype=np.float64)


def _check_finite(arr: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(
            f"{where}: non-finite value {arr[idx]} at index {list(idx)}; data and weights must be finite"
        )


# ---- loss and targets --------------------------------------------------------------------


def _parse_loss(spec: Any, where: str) -> Loss:
    if spec is None:
        raise InputError(
            f'{where}: missing [loss] table; add type = "mse", "cross_entropy" or "bce"'
        )
    if not isinstance(spec, dict) or "type" not in spec:
        raise InputError(f"{where}: [loss] needs type = one of {', '.join(LOSSES)}")
    unknown = set(spec) - {"type"}
    if unknown:
        raise InputError(f"{where}: [loss]: unknown key {sorted(unknown)[0]!r}")
    kind = spec["type"]
    if kind not in LOSSES:
        raise InputError(f"{where}: unknown loss {kind!r}; known losses: {', '.join(LOSSES)}")
    return Loss(kind)


def _check_targets(loss: Loss, y: np.ndarray, width: int, where: str) -> np.ndarray:
    """Validate targets against the output width; returns them in canonical shape."""
    kind = loss.kind
    if kind == "cross_entropy":
        if width < 2:
            raise InputError(
                f"{where}: cross_entropy needs at least 2 outputs (the last layer gives {width})"
            )
        if y.ndim == 1:
            if np.any(y != np.round(y)) or y.min() < 0 or y.max() >= width:
                raise InputError(
                    f"{where}: cross_entropy targets must be class indices 0..{width - 1} "
                    "(or one-hot rows)"
                )
            return y
        if y.ndim == 2 and y.shape[1] == width:
            if np.any(y < 0):
                raise InputError(f"{where}: cross_entropy probability targets must be non-negative")
            return y
        raise InputError(
            f"{where}: cross_entropy targets have shape {list(y.shape)}; need [batch] class "
            f"indices or [batch, {width}] one-hot rows"
        )
    if y.ndim == 1 and width == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] != width:
        raise InputError(
            f"{where}: {kind} targets have shape {list(y.shape)} but the network outputs "
            f"[batch, {width}]; make them match"
        )
    if kind == "bce" and (np.any(y < 0) or np.any(y > 1)):
        raise InputError(f"{where}: bce targets must lie in [0, 1]")
    return y


# ---- layers ------------------------------------------------------------------------------


def _parse_layer(
    spec: Any, index: int, width: int, seed: int, where: str, budget: list[int]
) -> tuple[Layer, int]:
    if not isinstance(spec, dict) or "type" not in spec:
        raise InputError(f"{where}: layer {index}: needs type = one of {', '.join(LAYER_TYPES)}")
    kind = spec["type"]
    if kind not in LAYER_TYPES:
        raise InputError(
            f"{where}: layer {index}: unknown layer type {kind!r}; known: {', '.join(LAYER_TYPES)}"
        )
    allowed = _LAYER_KEYS.get(kind, {"type", "name"})
    unknown = set(spec) - allowed
    if unknown:
        raise InputError(
            f"{where}: layer {index} ({kind}): unknown key {sorted(unknown)[0]!r}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    name = check_name(spec.get("name", f"{kind}{index}"), f"{where}: layer {index}: name")
    at = f"{where}: layer {index} ({name})"
    if index == 0 and kind in ACTIVATIONS:
        raise InputError(
            f"{at}: the first layer is an activation ({kind}); start with a dense layer "
            "(an activation of the data belongs in the data)"
        )
    rng = layer_seed(seed, index)
    if kind == "dense":
        return _parse_dense(spec, at, width, rng, name, budget)
    if kind == "batch_norm":
        eps = _eps(spec, at)
        _spend(budget, 2 * width, at)
        gamma = _param(spec, "weight", "init", (width,), at, rng, width, width, default="constant1")
        beta = _param(spec, "bias", "bias_init", (width,), at, rng, width, width, default="zeros")
        return Layer(name, kind, {"weight": gamma, "bias": beta}, eps=eps), width
    if kind == "batch_norm_eval":
        return _parse_batch_norm_eval(spec, at, width, rng, name, budget), width
    if kind == "leaky_relu":
        slope = check_float(
            _number(spec.get("slope", 0.01), f"{at}: slope"), f"{at}: slope", -1e30, 1e30
        )
        return Layer(name, kind, slope=slope), width
    return Layer(name, kind), width


def _eps(spec: dict[str, Any], at: str) -> float:
    eps = check_float(_number(spec.get("eps", 1e-5), f"{at}: eps"), f"{at}: eps", 0, 1e30)
    if not eps > 0:
        raise InputError(f"{at}: eps must be positive (got {eps})")
    return eps


def _parse_batch_norm_eval(
    spec: dict[str, Any],
    at: str,
    width: int,
    rng: np.random.Generator,
    name: str,
    budget: list[int],
) -> Layer:
    """Eval-mode batch norm: running_mean and running_var [width] required (the statistics the
    layer normalises with); weight (default ones) and bias (default zeros), each ``false`` for
    none, as torch's affine=False (neither) and bias=False."""
    eps = _eps(spec, at)
    stats: dict[str, np.ndarray] = {}
    for key in ("running_mean", "running_var"):
        if key not in spec:
            raise InputError(
                f"{at}: batch_norm_eval needs {key} = [{width} numbers] (the module's running "
                "statistics); without them use batch_norm (batch statistics)"
            )
        arr = _to_array(spec[key], f"{at}: {key}")
        if arr.shape != (width,):
            raise InputError(f"{at}: {key} has shape {list(arr.shape)}; expected [{width}]")
        _check_finite(arr, f"{at}: {key}")
        stats[key] = arr
    if np.any(stats["running_var"] < 0):
        bad = float(stats["running_var"][stats["running_var"] < 0][0])
        raise InputError(f"{at}: running_var must be >= 0 (a variance; found {bad})")
    if spec.get("weight", True) is False and spec.get("bias", True) is not False:
        raise InputError(
            f"{at}: weight = false needs bias = false too (torch's BatchNorm1d(affine=False) has "
            "neither); give weight = ones for a bias alone"
        )
    _spend(budget, 4 * width, at)
    params: dict[str, np.ndarray] = {}
    if spec.get("weight", True) is not False:
        params["weight"] = _param(
            spec, "weight", "init", (width,), at, rng, width, width, default="constant1"
        )
    elif "init" in spec:
        raise InputError(f"{at}: weight = false has no init; remove init")
    if spec.get("bias", True) is not False:
        params["bias"] = _param(
            spec, "bias", "bias_init", (width,), at, rng, width, width, default="zeros"
        )
    elif "bias_init" in spec:
        raise InputError(f"{at}: bias = false has no bias_init; remove bias_init")
    return Layer(name, "batch_norm_eval", params, eps=eps, stats=stats)


def _spend(budget: list[int], n: int, at: str) -> None:
    """Take ``n`` numbers from the network's element budget (:data:`MAX_ELEMENTS`)."""
    budget[0] -= n
    if budget[0] < 0:
        raise InputError(
            f"{at}: the network holds more than {MAX_ELEMENTS} numbers (parameters and data); "
            "use smaller layers or less data"
        )


def _parse_dense(
    spec: dict[str, Any],
    at: str,
    width: int,
    rng: np.random.Generator,
    name: str,
    budget: list[int],
) -> tuple[Layer, int]:
    if "in" in spec and spec["in"] != width:
        raise InputError(
            f"{at}: in = {spec['in']} but the previous layer (or the data) gives {width} features; "
            "fix in or the layer before"
        )
    if "weight" in spec:
        weight = _to_array(spec["weight"], f"{at}: weight")
        if weight.ndim != 2:
            raise InputError(f"{at}: weight must be a 2-D array [out, in] (got {weight.ndim}-D)")
        out = weight.shape[0]
        if "out" in spec and spec["out"] != out:
            raise InputError(f"{at}: out = {spec['out']} but weight has {out} rows")
        if weight.shape[1] != width:
            raise InputError(
                f"{at}: weight has shape {list(weight.shape)} but the input has {width} features; "
                f"use shape [{out}, {width}] (torch.nn.Linear's [out, in])"
            )
        if "init" in spec:
            raise InputError(f"{at}: give either weight or init, not both")
        _check_finite(weight, f"{at}: weight")
        _spend(budget, (width + 1) * out, at)
    else:
        out = spec.get("out")
        if not isinstance(out, int) or isinstance(out, bool) or out < 1:
            raise InputError(
                f"{at}: dense layer needs out = a positive integer (or explicit weight)"
            )
        check_int(out, f"{at}: out", 1, MAX_WIDTH)
        _spend(budget, (width + 1) * out, at)
        weight = _param(
            spec, "weight", "init", (out, width), at, rng, width, out, default="xavier_uniform"
        )
    params = {"weight": weight}
    if spec.get("bias", True) is not False:
        params["bias"] = _param(
            spec, "bias", "bias_init", (out,), at, rng, width, out, default="zeros"
        )
    return Layer(name, "dense", params), out


def _param(
    spec: dict[str, Any],
    key: str,
    init_key: str,
    shape: tuple[int, ...],
    at: str,
    rng: np.random.Generator,
    fan_in: int,
    fan_out: int,
    default: str,
) -> np.ndarray:
    value = spec.get(key)
    if value is not None and value is not True:
        arr = _to_array(value, f"{at}: {key}")
        if arr.shape != shape:
            raise InputError(f"{at}: {key} has shape {list(arr.shape)}; expected {list(shape)}")
        if init_key in spec:
            raise InputError(f"{at}: give either {key} or {init_key}, not both")
        _check_finite(arr, f"{at}: {key}")
        return arr
    init = spec.get(init_key, default)
    if init == "constant1":
        return np.ones(shape)
    if isinstance(init, str):
        init = {"scheme": init}
    if not isinstance(init, dict) or "scheme" not in init:
        raise InputError(f"{at}: {init_key} must be a scheme name or a table with scheme = ...")
    unknown = set(init) - _INIT_KEYS
    if unknown:
        raise InputError(f"{at}: {init_key}: unknown key {sorted(unknown)[0]!r}")
    scheme = init["scheme"]
    if scheme not in INIT_SCHEMES:
        raise InputError(f"{at}: unknown init scheme {scheme!r}; known: {', '.join(INIT_SCHEMES)}")
    kwargs = {
        k: check_float(_number(v, f"{at}: {init_key}.{k}"), f"{at}: {init_key}.{k}", -1e30, 1e30)
        for k, v in init.items()
        if k != "scheme"
    }
    if "std" in kwargs:
        kwargs["std"] += 0.0  # -0.0 is 0 (numpy refuses a negative zero scale)
    if kwargs.get("std", 1.0) < 0:
        raise InputError(f"{at}: {init_key}.std must be >= 0 (got {kwargs['std']})")
    if kwargs.get("low", -1.0) > kwargs.get("high", 1.0):
        raise InputError(
            f"{at}: {init_key}: low = {kwargs.get('low', -1.0)} is above high = "
            f"{kwargs.get('high', 1.0)}; swap them"
        )
    arr = init_array(scheme, shape, rng, fan_in, fan_out, **kwargs)
    _check_finite(arr, f"{at}: {init_key}")
    return arr


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: expected a number, found {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{where}: must be finite (got {value})")
    return float(value)


__all__ = ["load_network", "parse_network", "ACTIVATIONS"]
