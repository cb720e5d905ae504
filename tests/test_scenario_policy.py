"""Scenario mixed_precision_policy (small configuration): autocast keeps float16's underflow
of a confident classifier's small gradients; bfloat16, a loss scale and a float32 head do not."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios import mixed_precision_policy as mpp
from fpgrad.scenarios.base import ScenarioResult

SCALED = "autocast, S=2^15"
AUTOCAST_PLAN = "dense, relu float16; loss float32; params float32"


@pytest.fixture(scope="module")
def result() -> ScenarioResult:
    return mpp.run(small=True)


def test_autocast_still_flushes_the_confident_classifiers_gradients(
    result: ScenarioResult,
) -> None:
    r, d = result, result.data
    assert r.holds is False and "the claim fails" in r.markdown()
    # the batch: confident, correct, two of six classes absent
    b = d["batch"]
    assert b["accuracy"] == 1.0 and b["class_counts"] == [1, 2, 0, 4, 1, 0]
    assert all(mpp.MARGIN[0] <= m <= mpp.MARGIN[1] for m in b["margins"])
    assert all(g <= mpp.MAX_GAP for g in b["max_gaps"])
    assert d["nonzero"] == d["elements"] == 94
    assert d["rounding_zeros"] == {
        "float16": 8,
        "float32": 0,
        "autocast": 5,
        "autocast_bf16": 0,
        SCALED: 0,
        mpp.USER: 0,
    }
    f16, ac = d["summary"]["float16"], d["summary"]["autocast"]
    assert (f16["rounding_zero_underflow"], f16["rounding_zero_lost"], f16["subnormal"]) == (
        5,
        3,
        32,
    )
    # autocast's parameter gradients are float32: no subnormals, its zeros are of kind lost
    assert (ac["rounding_zero_lost"], ac["subnormal"], ac["wrong_sign"]) == (5, 0, 0)
    # every element autocast loses is below float16's flush threshold, in the output layer
    assert d["autocast_zeros_by_param"] == {"out.weight": 5}
    assert d["autocast_zeros_below_f16_flush"] == 5
    for z in d["autocast_zeros"]:
        assert 0 < abs(Fraction(z["exact"])) <= Fraction(1, 2**25), z
    # where it dies: the float32 loss gradient (p - t)/B cast to float16 for the matmul backward
    first = d["autocast_first_rounding_zero_backward"]
    assert (first["layer"], first["quantity"], first["op"]) == (
        "out",
        "dL/dz",
        "loss backward (cross_entropy)",
    )
    assert first["rounding_zero"] == d["logit_gradient_below_f16_flush"] == 14
    assert d["logit_gradient_log2_range"][0] < -25 < d["logit_gradient_log2_range"][1]


def test_remedies_and_plans(result: ScenarioResult) -> None:
    d = result.data
    # the advisor's scale is inside its safe range and lifts the smallest gradient above 2^-25
    assert d["scale_log2"] == 15
    assert d["advisor"]["float16"]["safe"] == [12, 15]  # 2^15: float16's loss holds no more
    lo, hi = d["advisor"]["autocast"]["safe"]  # autocast's float32 loss: no such cap
    assert lo == 12 and hi > 15
    assert d["smallest_gradient_times_scale_log2"] > -25
    assert d["gradient_log2_range"][0] + 15 == pytest.approx(
        d["smallest_gradient_times_scale_log2"]
    )
    assert d["plans"] == {
        "float16": "all float16",
        "float32": "all float32",
        "autocast": AUTOCAST_PLAN,
        "autocast_bf16": "dense, relu bfloat16; loss float32; params float32",
        SCALED: AUTOCAST_PLAN,
        mpp.USER: "dense, relu float16; dense, loss float32; params float32",
    }
    md = result.markdown()
    for plan in d["plans"].values():
        assert plan in md
    assert "2^15" in result.verdict and "advisor" in result.verdict


def test_training_keeps_autocasts_zeros_and_freezes_weights(result: ScenarioResult) -> None:
    t = result.data["training"]
    runs = t["runs"]
    assert t["verdict_steps"] == [0, 5, 9]
    ac = runs["autocast"]
    assert all(n == 5 for n in ac["rounding_zeros"].values())
    assert ac["frozen"] == 5
    for label in ("autocast+dynamic", "autocast+scale=32768", mpp.USER):
        r = runs[label]
        assert not any(r["rounding_zeros"].values()), label
        assert r["frozen"] == 0 and r["skipped"] == 0, label
        assert r["distance"] < ac["distance"] / 5, label
    assert runs["autocast+dynamic"]["scale"] == 2.0**16  # GradScaler's start; never overflows
    f16 = runs["float16+master+scale=32768"]
    assert all(n == 2 for n in f16["rounding_zeros"].values())
    assert f16["distance"] > ac["distance"]
    assert t["exact_loss"][1] < t["exact_loss"][0]


def test_renders_deterministically(result: ScenarioResult, tmp_path: Path) -> None:
    r = result
    assert r.verdict in r.markdown()
    json.dumps(r.to_dict(), allow_nan=False)
    assert {s.figure for s in r.sections if s.figure} == set(r.figures)
    for name, draw in r.figures.items():
        assert name.startswith(r.name) and name.endswith(".png")
        draw(tmp_path / f"a_{name}")
        draw(tmp_path / f"b_{name}")
        png = (tmp_path / f"a_{name}").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert png == (tmp_path / f"b_{name}").read_bytes()
    assert math.isfinite(r.data["certified_digits"]) and r.data["certified_digits"] >= 17


def test_torch_autocast_itself_loses_the_same_elements(result: ScenarioResult) -> None:
    """torch.autocast("cpu", float16) with the logits upcast for the loss (CUDA's list) gives
    exactly 0 at the scenario's autocast zeros and nowhere else."""
    net = mpp.network()
    p = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in net.params.items()}
    x = torch.tensor(net.x, dtype=torch.float32)
    y = torch.tensor(net.y, dtype=torch.long)
    with one_torch_thread(), torch.autocast("cpu", dtype=torch.float16):
        h = torch.relu(F.linear(x, p["hidden.weight"], p["hidden.bias"]))
        z = F.linear(h, p["out.weight"], p["out.bias"])
        assert z.dtype == torch.float16
        F.cross_entropy(z.float(), y).backward()
    zeros = {
        (name, tuple(int(i) for i in idx))
        for name, t in p.items()
        for idx in np.argwhere(t.grad.numpy() == 0)
    }
    expected = {(z["param"], tuple(z["index"])) for z in result.data["autocast_zeros"]}
    assert zeros == expected and len(zeros) == 5
