"""Hand-built cases with known verdicts: each zero kind, overflow, and where the signal died."""

from __future__ import annotations

import math

import pytest

from fpgrad.diagnose.comparison import compare
from tests.nets import net_from


def test_dead_relu_gives_structural_zeros_in_every_precision() -> None:
    # unit 1: W x + b = -x0 - x1 - 4 < 0 for every (positive) input: dead in exact arithmetic too
    net = net_from(
        [
            {"type": "dense", "weight": [[1.0, 2.0], [-1.0, -1.0]], "bias": [0.5, -4.0]},
            {"type": "relu"},
            {"type": "dense", "weight": [[1.0, -2.0]], "bias": [0.0]},
        ],
        "mse",
        x=[[1.0, 0.5], [0.25, 2.0], [3.0, 1.0]],
        y=[[0.0], [1.0], [0.5]],
    )
    result = compare(net)
    for p in result.precisions:
        for param, dead in (("dense0.weight", [2, 3]), ("dense0.bias", [1])):
            verdicts = result.verdicts(param, p)
            assert all(verdicts[i] == "structural_zero" for i in dead), (p, param, verdicts)
            alive = [v for i, v in enumerate(verdicts) if i not in dead]
            assert "structural_zero" not in alive
        assert result.counts(p)["rounding_zero"] == 0
        # the output-layer weight on the dead unit is a structural zero too (its input is 0)
        assert result.verdicts("dense2.weight", p)[1] == "structural_zero"


def test_gradient_near_1e9_underflows_in_float16_and_is_fine_in_bfloat16() -> None:
    # one linear unit, MSE: dL/dw = 2 (w x - y) x with x = 2**-15 (exact in both formats)
    # and residual 2**-15: gradient 2 * 2**-30 ~ 1.9e-9 < 2**-25 (half float16's smallest subnormal)
    x = 2.0**-15
    net = net_from(
        [{"type": "dense", "weight": [[0.0]], "bias": False}],
        "mse",
        x=[[x]],
        y=[[-(2.0**-15)]],
    )
    result = compare(net, precisions="float16,bfloat16")
    g = result.gradient("dense0.weight", (0, 0))
    assert math.isclose(float(g["exact"]), 2 * 2.0**-30, rel_tol=1e-30)
    assert g["float16"]["verdict"] == "rounding_zero"
    assert g["float16"]["kind"] == "underflow"
    assert g["bfloat16"]["verdict"] == "ok"
    assert g["bfloat16"]["value"] == 2 * 2.0**-30


def test_confident_softmax_loses_the_gradient_in_float16() -> None:
    # logits 12 apart: p(true) = 1/(1+e^-12) = 1 - 6.1e-6 rounds to 1 in float16 (ulp/2 = 2**-11 below 1)
    net = net_from(
        [{"type": "dense", "weight": [[6.0], [-6.0]], "bias": [0.0, 0.0]}],
        "cross_entropy",
        x=[[1.0]],
        y=[0],
    )
    result = compare(net, precisions="float16,float32")
    g = result.gradient("dense0.bias", (0,))
    exact = float(g["exact"])
    assert -7e-6 < exact < -5e-6
    assert g["float16"]["verdict"] == "rounding_zero"
    assert (
        g["float16"]["kind"] == "lost"
    )  # float16 can hold 6e-6 (a subnormal): an intermediate lost it
    # float32 keeps it, but p - 1 cancels: 1 - 6.1e-6 holds only ~17 bits of the difference, a
    # relative error near 2^-7 = 2^-24 / 6.1e-6, far beyond sqrt(u) = 2^-12: inaccurate, not ok
    assert g["float32"]["verdict"] == "inaccurate"
    assert 2.0**-12 < g["float32"]["rel_err"] < 2.0**-24 / 6e-6
    died = result.attribution["float16"]["first_rounding_zero_backward"]
    assert died["layer"] == "dense0" and died["op"] == "loss backward (cross_entropy)"
    assert result.attribution["float32"]["first_rounding_zero_backward"] is None


def test_overflow_to_inf_is_reported_with_its_first_op() -> None:
    # z = 300 * 300 = 90000 > 65504: float16 overflows in the first dense layer; bfloat16 holds it
    net = net_from(
        [
            {"type": "dense", "weight": [[300.0]], "bias": [0.0]},
            {"type": "tanh"},
            {"type": "dense", "weight": [[1.0]], "bias": [0.0]},
        ],
        "mse",
        x=[[300.0]],
        y=[[0.5]],
    )
    result = compare(net, precisions="float16,bfloat16")
    first = result.attribution["float16"]["first_overflow"]
    assert first["layer"] == "dense0" and first["direction"] == "forward"
    assert result.attribution["bfloat16"]["first_overflow"] is None
    # tanh saturates to exactly 1 in both, so the dense0 gradients die or blow up in float16
    verdicts16 = set(result.verdicts("dense0.weight", "float16"))
    assert verdicts16 & {"overflow", "nan", "rounding_zero"}


def test_loss_that_rounds_to_zero_has_a_verdict() -> None:
    net = net_from(
        [{"type": "dense", "weight": [[6.0], [-6.0]], "bias": [0.0, 0.0]}],
        "cross_entropy",
        x=[[1.0]],
        y=[0],
    )
    result = compare(net, precisions="float16,float64")
    assert result.loss["float16"]["verdict"] == "rounding_zero"
    assert result.loss["float64"]["verdict"] == "ok"
    # torch computes log(1 + e^-12) without log1p: float64 keeps ~11 digits here, not 16
    assert result.loss["float64"]["rel_err"] < 1e-9


@pytest.mark.parametrize("reference", ["original", "rounded"])
def test_reference_modes_are_reported(reference: str) -> None:
    # input 0.1 is not a float16 value: "rounded" evaluates exact at round(0.1) per precision
    net = net_from(
        [{"type": "dense", "weight": [[1.0]], "bias": [0.0]}], "mse", x=[[0.1]], y=[[0.0]]
    )
    result = compare(net, precisions="float16", reference=reference)
    g = result.gradient("dense0.weight", (0, 0))["float16"]
    if reference == "rounded":
        assert g["verdict"] == "ok" and g["ulps"] <= 0.5  # only arithmetic rounding left
        assert "exact" in g
    else:
        assert g["ulps"] > 0.5  # storage rounding of 0.1 counts too
    assert result.reference == reference
