"""Captured models give the one result type: Comparison, with per-op attribution and diagnosis."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import torch
from torch import nn

import fpgrad
from fpgrad.diagnose.comparison import Comparison, compare
from fpgrad.diagnose.verdicts import VERDICTS


class Shrink(nn.Module):
    """Multiplies by 2^-30: in float16 the product of values below 1 underflows to 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0**-30


def shrinking_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Shrink(), nn.Linear(6, 3))
    x = torch.randn(5, 4)  # |tanh(W x + b)| < 1; times 2^-30: below float16's 2^-24
    return model, x, torch.tensor([0, 1, 2, 0, 1])


def test_captured_compare_is_a_comparison_with_per_op_attribution() -> None:
    model, x, y = shrinking_model()
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    c = compare(net, "float16,float32")
    assert isinstance(c, Comparison)
    assert c.kinds == {"float16": "native", "float32": "native"}
    # the native column is the model's own eager autograd, keyed by named_parameters()
    m16 = copy.deepcopy(model).half()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nn.CrossEntropyLoss()(m16(x.half()), y).backward()
    finally:
        torch.set_num_threads(threads)
    for name, p in m16.named_parameters():
        assert np.array_equal(c.values("float16")[name], p.grad.double().numpy()), name
    # the first op computing 0 where the exact value is not: the 2^-30 scaling, in float16 only
    att = c.attribution["float16"]
    first = att["first_rounding_zero_forward"]
    assert first is not None and first["op"] == "2 (aten.mul)" and first["direction"] == "forward"
    assert att["first_lost"].startswith("2 (aten.mul): ")
    assert c.attribution["float32"]["first_rounding_zero_forward"] is None
    # every place row is an op that computes (views and transposes are not places)
    assert all(r["kind"] not in ("aten.view", "aten.t", "aten.detach") for r in att["places"])
    # the diagnosis names the op and the remedy; the text table shows it
    texts = [f["text"] for f in c.findings if f["precision"] == "float16"]
    assert any("forward values first round to zero in 2 (aten.mul)" in t for t in texts)
    assert any(t.startswith("compute 2 (aten.mul) in float32") for t in texts)
    out = c.render(max_rows=5)
    assert "Where the signal died (counts per op output" in out and "2 (aten.mul)" in out
    assert "Per parameter" in out and "Gradients (value, verdict" in out
    # the JSON is that of every comparison: every element, counts matching the columns
    buf = io.StringIO()
    c.write_json(buf)
    doc = json.loads(buf.getvalue())
    assert len(doc["gradients"]) == sum(p.numel() for p in model.parameters())
    for p in ("float16", "float32"):
        codes = np.concatenate([g.cols[p].code.ravel() for g in c.grads])
        counts = np.bincount(codes, minlength=len(VERDICTS))
        assert {v: doc["summary"][p][v] for v in VERDICTS} == dict(
            zip(VERDICTS, counts.tolist(), strict=True)
        )
    assert doc["attribution"]["float16"]["first_lost"] == att["first_lost"]


def test_loss_scale_judges_backward_ops_against_the_scaled_exact_values() -> None:
    """A loss gradient of about 1e-7 lies below float16's normal range; under S = 2^12 the
    backward computes S times it, judged against S times the exact values: in range."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    y = model(x).detach() + 1e-6  # dL/d(out) = 2 (out - y) / 12, about -1.7e-7
    net = fpgrad.from_module(model, x, y, nn.MSELoss())
    plain = compare(net, "float16,float32", findings=False)
    scaled = compare(net, "float16,float32", loss_scale=2.0**12, findings=False)

    def seed_row(c: Comparison, p: str) -> dict:
        rows = c.attribution[p]["places"]
        return next(r for r in rows if r["kind"] == "aten.mse_loss_backward")

    for p in ("float16", "float32"):
        assert seed_row(plain, p)["direction"] == "backward"
        assert seed_row(plain, p)["exact_subnormal_range"] == (12 if p == "float16" else 0)
        assert seed_row(scaled, p)["exact_subnormal_range"] == 0
    assert (
        seed_row(scaled, "float32")["subnormal"]
        == seed_row(scaled, "float32")["rounding_zero"]
        == 0
    )
    for name in net.param_names:  # gradients of S * loss (float32: exact scaling by 2^12)
        np.testing.assert_array_equal(
            scaled.values("float32")[name], plain.values("float32")[name] * 2.0**12
        )


def test_an_overflow_names_its_op_and_a_remedy() -> None:
    from fpgrad.scenarios.graph_norm_fp16 import build

    model, x, y, loss = build()
    c = compare(fpgrad.from_module(model, x, y, loss), "float16")
    att = c.attribution["float16"]
    assert att["first_overflow"]["op"] == "norm (aten.pow)"
    assert att["first_nonfinite"] == "norm (aten.pow)"
    texts = [f["text"] for f in c.findings]
    assert any(t.startswith("compute norm (aten.pow) in float32") for t in texts)
