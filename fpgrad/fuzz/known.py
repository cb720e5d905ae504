"""The inputs of issue 18 that once broke the exit-code contract, one case each."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from fpgrad.fuzz.cases import CANARY, GOOD_NET, Case, npy_bytes, toml_doc


def _net(**changes: Any) -> bytes:
    """GOOD_NET with top-level or data changes (``data_x=...`` sets data.x)."""
    doc = json.loads(json.dumps(GOOD_NET))
    for k, v in changes.items():
        if k.startswith("data_"):
            doc["data"] = {**doc["data"], k[5:]: v}
            if v is None:
                del doc["data"][k[5:]]
        elif k == "layers":
            doc["layer"] = v
        else:
            doc[k] = v
    return toml_doc(doc).encode()


def known_cases() -> list[Case]:
    """The inputs of issue 18 that once broke the contract, one case each."""
    cmp = ["compare", "{d}/net.toml", "--precisions", "float32", "--max-rows", "2"]
    dense = {"type": "dense", "out": 2}
    tanh = {"type": "tanh"}
    c = [
        Case("known", cmp, {"net.toml": _net(data_y=1.5)}),  # a scalar target
        Case("known", cmp, {"net.toml": _net(data_x=None, data_x_file="x.npy"), "x.npy": b""}),
    ]
    npz = io.BytesIO()
    np.savez(npz, x=np.ones((3, 2)))
    huge = npy_bytes(np.ones((3, 2))).replace(b"(3, 2)", b"(300000000, 200000)")
    broken = npy_bytes(np.ones((3, 2))).replace(b"(3, 2)", b"(3, '''")  # a tokenizer error
    for content in (
        npz.getvalue(),
        huge,
        broken,
        "link:/dev/zero",
        "fifo",
        "dir",
        b"\x93NUMPY\x01",
    ):
        files = {"net.toml": _net(data_x=None, data_x_file="x.npy"), "x.npy": content}
        c.append(Case("known", cmp, files))
    for csv in (b"\xff\xfe1\n2\n3\n", f"{CANARY}:x:0\n".encode(), "link:/etc/passwd"):
        c.append(
            Case("known", cmp, {"net.toml": _net(data_y=None, data_y_file="y.csv"), "y.csv": csv})
        )
    c += [
        Case("known", cmp, {"net.toml": b"\xff\xfe[[layer]]"}),  # not UTF-8
        Case("known", cmp, {"net.toml": b"x = " + b"[" * 5000 + b"]" * 5000}),
        Case("known", cmp, {"net.toml": b"seed = 1" + b"0" * 5000 + b"\n"}),
        Case("known", cmp, {"net.toml": "fifo"}),
        Case("known", cmp, {"net.toml": "link:/dev/zero"}),
    ]
    # a 10**6-wide layer is allowed; its successor puts the network over MAX_ELEMENTS (a
    # 2-10**6-2 net, 5M numbers, is a valid network that compare runs: not a refusal case)
    for out in (10**6, 10**9):
        wide = [{"type": "dense", "out": out}, tanh, {"type": "dense", "out": 10}]
        c.append(Case("known", cmp, {"net.toml": _net(layers=wide)}))
    for init in (
        {"scheme": "normal", "std": -1.0},
        {"scheme": "uniform", "low": 1.0, "high": -1.0},
        {"scheme": "uniform", "low": -1e308, "high": 1e308},
    ):
        c.append(
            Case("known", cmp, {"net.toml": _net(layers=[{**dense, "init": init}, tanh, dense])})
        )
    zero_std = [{**dense, "init": {"scheme": "normal", "std": -0.0}}, tanh, dense]
    c.append(Case("known-ok", cmp, {"net.toml": _net(layers=zero_std)}))
    c += [
        Case("known", cmp, {"net.toml": _net(layers=[tanh, dense])}),  # activation first
        Case("known", cmp, {"net.toml": _net(layers=[tanh])}),  # no parameter
        Case(
            "known",
            cmp,
            {
                "net.toml": _net(
                    layers=[dense, {"type": "batch_norm"}, dense], data_x=[[1.0, 2.0]], data_y=[0]
                )
            },
        ),
        Case(
            "known",
            cmp,
            {"net.toml": _net(layers=[dense, {"type": "leaky_relu", "slope": 1e300}, dense])},
        ),
        Case(
            "known-ok",
            ["advise", "{d}/net.toml", "--no-measure"],
            {"net.toml": _net(data_x=[[1e-310, 5e-324], [2e-320, -1e-315], [0.0, 1e-309]])},
        ),
        Case("known", cmp, {"net.toml": _net(policy={"p": {"extends": 5}})}),
        Case("known", cmp, {"net.toml": _net(policy={"p": {"extends": ["autocast"]}})}),
        Case("known", ["explain", "1e99999999"]),
        Case("known-ok", ["explain", "10**10000"]),
        Case("known", ["explain", "1e-8", "--format", "e" + "9" * 3000 + "m2"]),
        Case(
            "known", ["compare", "{d}/net.toml", "--exact-bits", str(2**40)], {"net.toml": _net()}
        ),
        Case(
            "known", ["compare", "{d}/net.toml", "--exact-bits", str(2**31)], {"net.toml": _net()}
        ),
    ]
    train = ["train", "{d}/net.toml", "--steps", "1", "--precisions", "float32"]
    files = {"net.toml": _net(), "file": b"x"}
    for extra in (
        ["--lr", "1e308"],
        ["--seed", "-1"],
        ["--lr", "-1e-3"],
        ["--out", "{d}/file"],
        ["--out", ""],
        ["--out", "/proc/x"],
        ["--steps", "0"],
    ):
        c.append(Case("known", train + extra, files))
    c += [
        Case("known", ["report", "--only", ",", "--out", "{d}/r"]),
        Case("known", ["import", "{d}/m.toml", "--out", ""], {}),
    ]
    import torch

    model = {
        "state_dict": "m.pt",
        "modules": ["Linear(2, 2)", "Tanh()", "Linear(2, 1)"],
        "loss": {"type": "mse"},
        "data": {"x": [[1.0, 2.0], [0.5, 1.0]], "y": [0.5, 0.25]},
    }
    good = {
        "0.weight": torch.ones(2, 2),
        "0.bias": torch.zeros(2),
        "2.weight": torch.ones(1, 2),
        "2.bias": torch.zeros(1),
    }
    variants: list[tuple[dict[Any, Any], list[str]]] = [
        ({**good, 3: torch.ones(1)}, model["modules"]),
        ({**good, "0.weight": torch.ones(2, 2).to_sparse()}, model["modules"]),
        ({**good, "0.bias": torch.zeros(2, device="meta")}, model["modules"]),
        (good, ["Linear(2, 2)", "LeakyReLU('abc')", "Linear(2, 1)"]),
        (
            {**good, "1.weight": torch.ones(2), "1.bias": torch.zeros(2)},
            ["Linear(2, 2)", "BatchNorm1d(2, eps=None)", "Linear(2, 1)"],
        ),
        ({"0.weight": torch.ones(4096, 4096), "0.bias": torch.zeros(4096)}, ["Linear(4096, 4096)"]),
    ]
    for sd, modules in variants:
        buf = io.BytesIO()
        torch.save(sd, buf)
        doc = toml_doc({**model, "modules": modules}).encode()
        c.append(
            Case(
                "known",
                ["compare", "{d}/m.toml", "--precisions", "float32"],
                {"m.toml": doc, "m.pt": buf.getvalue()},
            )
        )
    c.append(
        Case(
            "known",
            ["sweep", "{d}/net.toml", "--out", "{d}/s", "--seeds", "0..1000000000000"],
            {"net.toml": _net()},
        )
    )
    return c
