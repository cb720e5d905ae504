"""Seeded hostile cases: mutated network, data and model files, hostile option values."""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CANARY = "CANARY-7f3a"  #: planted in data files; no message may quote it

#: hostile values for any field of a file or an option
HOSTILE: list[Any] = [
    -1,
    0,
    1,
    2,
    -(2**63),
    2**64,
    10**9,
    10**6,
    10**7,
    1.5,
    -0.0,
    1e308,
    -1e308,
    5e-324,
    math.inf,
    -math.inf,
    math.nan,
    "abc",
    "",
    "\u00e9\u0000",
    True,
    [],
    {},
    [[1.0]],
    {"scheme": "normal", "std": -1.0},
    {"scheme": "uniform", "low": 1e308, "high": -1e308},
    {"scheme": "uniform", "low": -1e308, "high": 1e308},
    "x" * 5000,
]
OPTION_VALUES = [
    "-1",
    "0",
    "1",
    "2",
    "1e308",
    "-1e-8",
    "nan",
    "inf",
    "2**40",
    "1099511627776",
    "2147483648",
    "9" * 5000,
    "abc",
    "",
    "0x10",
    "1e-400",
]
EXPLAIN_ATOMS = [
    "1e99999999",
    "10**10000",
    "10**100000",
    "2**-1074",
    "1e-8",
    "65520",
    "0x1.8p-3",
    "0x1p-99999999",
    "9" * 5000,
    "1" + "0" * 4299,
    "(" * 200 + "1" + ")" * 200,
    "1/0",
    "-0",
    "inf",
    "nan",
    "1e",
    "__import__('os')",
    "1_000",
    "0.1",
    "3**9999",
    "(1+2**-11)**10000",
    "1e100000",
    "1e-100000",
]

GOOD_NET: dict[str, Any] = {
    "name": "fuzz",
    "seed": 0,
    "layer": [
        {"type": "dense", "out": 2, "init": {"scheme": "normal", "std": 1.0}},
        {"type": "tanh"},
        {"type": "dense", "out": 2},
    ],
    "loss": {"type": "cross_entropy"},
    "data": {"x": [[1.0, 2.0], [0.5, -1.0], [0.25, 0.0]], "y": [0, 1, 1]},
}
GOOD_BN: dict[str, Any] = {
    "seed": 3,
    "layer": [
        {"type": "dense", "out": 3},
        {"type": "batch_norm", "eps": 1e-5},
        {"type": "leaky_relu", "slope": 0.1},
        {"type": "dense", "out": 1, "bias": False},
    ],
    "loss": {"type": "mse"},
    "data": {"x_file": "x.npy", "y_file": "y.csv"},
}


@dataclass
class Case:
    """One input: files to write (relative name -> bytes, or a special "fifo"/"dir"/"link:T")
    and the command line, with ``{d}`` standing for the case's directory."""

    kind: str
    argv: list[str]
    files: dict[str, bytes | str] = field(default_factory=dict)


# ---- TOML writing (inline tables, so any mutated value can be written) ---------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
        )
    return json.dumps(str(v))


def toml_doc(doc: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(str(k))} = {toml_value(v)}\n" for k, v in doc.items())


# ---- mutations -----------------------------------------------------------------------------


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    obj = dict(obj) if isinstance(obj, dict) else list(obj)
    obj[head] = _set(obj[head], rest, value) if rest else value
    return obj


def _drop(obj: Any, path: tuple[Any, ...]) -> Any:
    if len(path) == 1:
        obj = dict(obj) if isinstance(obj, dict) else list(obj)
        del obj[path[0]]
        return obj
    obj = dict(obj) if isinstance(obj, dict) else list(obj)
    obj[path[0]] = _drop(obj[path[0]], path[1:])
    return obj


def mutate_doc(doc: dict[str, Any], rng: random.Random, rounds: int) -> dict[str, Any]:
    """``rounds`` random edits: a value replaced by a hostile one, a key dropped or added, a
    layer type changed, a list grown."""
    for _ in range(rounds):
        paths = [p for p in _paths(doc) if p]
        path = rng.choice(paths)
        op = rng.random()
        if op < 0.55:
            doc = _set(doc, path, rng.choice(HOSTILE))
        elif op < 0.7:
            doc = _drop(doc, path)
        elif op < 0.8:
            parent = path[:-1]
            target = doc
            for k in parent:
                target = target[k]
            if isinstance(target, dict):
                doc = _set(
                    doc,
                    (*parent, rng.choice(["in", "eps", "slope", "weight", "bogus"])),
                    rng.choice(HOSTILE),
                )
        elif op < 0.9:
            kinds = ["dense", "relu", "batch_norm", "softmax", "sigmoid", "leaky_relu", "x"]
            out = rng.choice([1, 2, 3, 10**7, 0])  # 10**7: above MAX_WIDTH, refused
            layer = {"type": rng.choice(kinds), "out": out}
            layers = doc.get("layer") if isinstance(doc.get("layer"), list) else []
            doc = {**doc, "layer": [*layers[: rng.randrange(len(layers) + 1)], layer]}
        else:
            doc = _set(doc, path, [rng.choice(HOSTILE)] * rng.choice([1, 3, 100]))
    return doc


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    op = rng.randrange(6)
    if op == 0 or not data:
        return data[: rng.randrange(len(data) + 1)]
    if op == 1:
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
    if op == 2:
        i = rng.randrange(len(data))
        return data[:i] + rng.choice([b"\xff\xfe", b"[" * 5000, b"{", b"\x00", b"'''"]) + data[i:]
    if op == 3:
        return data + data[: rng.randrange(len(data) + 1)]
    if op == 4:
        return b"x = " + b"[" * rng.choice([50, 200, 2000]) + b"1" + b"]" * 10
    return data.replace(b"1", b"1" * rng.choice([2, 400, 5000]), 1)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=arr.dtype.hasobject)
    return buf.getvalue()


def npy_case(rng: random.Random) -> bytes | str:
    """A .npy file: valid, or broken in one of the ways seen in the wild."""
    x = np.asarray(rng.choice([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[1, 2], [3, 4], [5, 6]]]))
    op = rng.randrange(12)
    if op == 0:
        return b""
    if op == 1:
        buf = io.BytesIO()
        np.savez(buf, x=x)
        return buf.getvalue()  # an .npz under the .npy name
    if op == 2:
        data = npy_bytes(x)
        return data.replace(b"(3, 2)", b"(300000000, 200000)")
    if op == 3:
        return npy_bytes(x)[: rng.randrange(10, 120)]
    if op == 4:
        return npy_bytes(np.array([{"a": CANARY}, None], dtype=object))
    if op == 5:
        return npy_bytes(np.array([CANARY, "b"]))
    if op == 6:
        return npy_bytes(np.array(1.5))  # a scalar
    if op == 7:
        return npy_bytes(np.array([[1 + 2j, 3], [4, 5], [6, 7]]))
    if op == 8:
        return rng.choice(["fifo", "dir", "link:/dev/zero", "link:missing"])
    if op == 9:
        return npy_bytes(np.array([[2**62, 1], [2, 3], [4, 5]], dtype=np.int64))
    if op == 10:
        return mutate_bytes(npy_bytes(x), rng)
    return npy_bytes(x)


def csv_case(rng: random.Random) -> bytes | str:
    good = b"0.5\n0.25\n1.0\n"
    op = rng.randrange(8)
    if op == 0:
        return b""
    if op == 1:
        return f"root:x:0:0:{CANARY}:/root:/bin/bash\n".encode()
    if op == 2:
        return b"\xff\xfe\x00" + good
    if op == 3:
        return b"1,2\n3\n4,5\n"
    if op == 4:
        return b"1e999\n2\n3\n"
    if op == 5:
        return rng.choice(["fifo", "dir", "link:/dev/zero", "link:/etc/passwd"])
    if op == 6:
        return mutate_bytes(good, rng)
    return good


# ---- cases ---------------------------------------------------------------------------------


def _network_case(rng: random.Random) -> Case:
    base = GOOD_BN if rng.random() < 0.4 else GOOD_NET
    doc = mutate_doc(base, rng, rng.choice([0, 1, 1, 2, 3]))
    files: dict[str, bytes | str] = {"x.npy": npy_case(rng), "y.csv": csv_case(rng)}
    text = toml_doc(doc).encode()
    if rng.random() < 0.25:
        text = mutate_bytes(text, rng)
    files["net.toml"] = text
    cmd = rng.choice(["compare", "compare", "advise", "policies", "train"])
    argv = [cmd, "{d}/net.toml"] if cmd != "policies" else ["policies", "--network", "{d}/net.toml"]
    if cmd == "compare":
        argv += ["--precisions", "float32", "--max-rows", "3"]
    if cmd == "advise":
        argv += ["--no-measure", "--exponents", "0..2"]
    if cmd == "train":
        argv += ["--steps", "1", "--precisions", "float32"]
    return Case("network", argv, files)


def _model_case(rng: random.Random) -> Case:
    import torch

    sd: dict[Any, Any] = {
        "0.weight": torch.ones(2, 2) * 0.5,
        "0.bias": torch.zeros(2),
        "2.weight": torch.ones(1, 2),
        "2.bias": torch.zeros(1),
    }
    modules = ["Linear(2, 2)", "Tanh()", "Linear(2, 1)"]
    op = rng.randrange(12)
    if op == 0:
        sd[7] = torch.ones(1)
    elif op == 1:
        sd["0.weight"] = sd["0.weight"].to_sparse()
    elif op == 2:
        sd["0.bias"] = torch.zeros(2, device="meta")
    elif op == 3:
        modules[1] = rng.choice(["LeakyReLU('abc')", "LeakyReLU(1e300)", "ReLU(inplace='x')"])
    elif op == 4:
        modules = ["Linear(2, 2)", "BatchNorm1d(2, eps=None)", "Linear(2, 1)"]
        sd.update({"1.weight": torch.ones(2), "1.bias": torch.zeros(2)})
        sd = {k.replace("2.", "2."): v for k, v in sd.items()}
    elif op == 5:
        modules[0] = rng.choice(["Linear(10**9, 2)", "Linear(4096, 4096)", "Linear(-1, 2)"])
    elif op == 6:
        sd["0.weight"] = torch.ones(2, 2, dtype=torch.complex64)
    elif op == 7:
        sd = {"model": sd}
    elif op == 8:
        sd["0.weight"] = torch.full((2, 2), float("nan"))
    elif op == 9:
        modules[1] = "".join(rng.choice("()[],=ab'0.") for _ in range(rng.randrange(30)))
    buf = io.BytesIO()
    torch.save(sd, buf)
    state: bytes | str = buf.getvalue()
    if rng.random() < 0.2:
        state = mutate_bytes(bytes(state), rng)
    doc = {
        "state_dict": "model.pt",
        "modules": modules,
        "loss": {"type": "mse"},
        "data": {"x": [[1.0, 2.0], [0.5, 1.0]], "y_file": "y.csv"},
    }
    if rng.random() < 0.3:
        doc = mutate_doc(doc, rng, 1)
    files = {"model.toml": toml_doc(doc).encode(), "model.pt": state, "y.csv": b"0.5\n0.25\n"}
    if rng.random() < 0.5:
        argv = ["import", "{d}/model.toml", "--out", "{d}/out.toml"]
    else:
        argv = ["compare", "{d}/model.toml", "--precisions", "float32", "--max-rows", "2"]
    return Case("model", argv, files)


def _option_case(rng: random.Random) -> Case:
    files: dict[str, bytes | str] = {"net.toml": toml_doc(GOOD_NET).encode()}
    v = rng.choice(OPTION_VALUES)
    op = rng.randrange(10)
    if op == 0:
        argv = ["compare", "{d}/net.toml", "--precisions", "float32", "--exact-bits", v]
    elif op == 1:
        opt = rng.choice(["--lr", "--seed", "--batch-size", "--momentum", "--verdict-every"])
        argv = ["train", "{d}/net.toml", "--steps", "1", "--precisions", "float32", opt, v]
    elif op == 2:
        argv = ["train", "{d}/net.toml", "--steps", v, "--precisions", "float32"]
    elif op == 3:
        files["file"] = b"x"
        out = rng.choice(["", "{d}/file", "{d}/file/sub", "/proc/nope", "{d}/o"])
        argv = ["train", "{d}/net.toml", "--steps", "1", "--precisions", "float32", "--out", out]
    elif op == 4:
        argv = ["report", "--only", rng.choice([",", " ", ",,", "nope"]), "--out", "{d}/r"]
    elif op == 5:
        expr = rng.choice(EXPLAIN_ATOMS)
        if rng.random() < 0.5:
            expr += rng.choice(["+", "*", "**", "/", "-"]) + rng.choice(EXPLAIN_ATOMS)
        argv = ["explain", expr]
    elif op == 6:
        fmt = rng.choice(["e5m2", "e" + "9" * 3000 + "m2", "e12m3", "e2m0", "float16", "x"])
        argv = ["explain", "1e-8", "--format", fmt]
    elif op == 7:
        argv = ["compare", "{d}/net.toml", "--loss-scale", v, "--precisions", "float16"]
    elif op == 8:
        argv = ["advise", "{d}/net.toml", "--headroom", v, "--no-measure", "--exponents", "0..1"]
    else:
        axis = rng.choice(["--seeds", "--loss-scales", "--init-scales", "--precisions"])
        value = rng.choice(["0..10**12", "0..99999999", v, "2^-9999..2^9999", ",", "1,1"])
        argv = ["sweep", "{d}/net.toml", "--out", "{d}/s", "--workers", "0", axis, value]
        argv += ["--max-cells", "0"]
    return Case("option", argv, files)


def cases(seed: int, n: int) -> Iterator[Case]:
    """``n`` deterministic cases of every kind."""
    rng = random.Random(seed)
    makers = [_network_case, _network_case, _model_case, _option_case, _option_case]
    for _ in range(n):
        yield rng.choice(makers)(rng)
