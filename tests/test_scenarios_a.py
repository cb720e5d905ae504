"""Scenarios of the gallery, part A: each runs in its reduced configuration (small=True) and
its computed verdict is checked against the science it should find."""

from __future__ import annotations

import math

import pytest

from fpgrad.numbers.formats import get_format
from fpgrad.scenarios import (
    dead_relu_remedies,
    deep_sigmoid_vanishing,
    fp16_gradient_underflow,
    loss_near_zero_stall,
    relu_killed_by_rounding,
)


@pytest.fixture(scope="module")
def remedies():
    return dead_relu_remedies.run(small=True)


def test_dead_relu_remedies_side_by_side(remedies) -> None:
    r = remedies
    d = r.data
    assert r.holds is None  # some remedies do what is claimed, He init does not
    assert d["claims"] == {
        "momentum_moves_dead_units": True,
        "weight_decay_shrinks_without_reviving": True,
        "batch_norm_keeps_units_alive": True,
        "leaky_relu_keeps_gradients": True,
        "he_init_keeps_units_alive": False,
    }
    assert d["revivers"] == []
    labels = ["exact", *dead_relu_remedies.RUNS_SMALL]
    for label in labels:
        assert d["outcomes"]["plain"][label] == "stays dead (4/4)"
        assert d["outcomes"]["batch_norm"][label] == "active throughout"
        assert d["stats"]["he_init"][label]["start"] == d["he_nonpositive_units"] == 2
        assert d["stats"]["dying_plain"][label]["moved_while_dead"] == 0
        assert d["stats"]["dying_momentum"][label]["moved_while_dead"] > 0
        assert d["stats"]["dying_momentum"][label]["end"] == 4
        # dead ReLU units have exactly zero gradients; leaky units never do
        assert d["zero_gradient_units"]["plain"][label] == 4
        assert d["zero_gradient_units"]["leaky"][label] == 0
    # leaky units learn exactly, but bfloat16 swamps every one of their small updates
    leaky = d["stats"]["leaky"]
    assert leaky["exact"]["moved_while_dead"] == d["steps"] * dead_relu_remedies.HIDDEN
    assert leaky["bfloat16"]["moved_while_dead"] == 0
    # a dead unit's gradient is 0, so weight decay alone scales it by (1 - lr wd) per step
    steps = d["steps"]
    factor = (1 - dead_relu_remedies.LR * dead_relu_remedies.WEIGHT_DECAY) ** steps
    assert d["weight_decay_factor"] == pytest.approx(factor, rel=1e-15)
    for ratio in d["stats"]["weight_decay"]["exact"]["dead_norm_ratio"]:
        assert ratio == pytest.approx(factor, rel=1e-12)
    assert "None of the remedies revives" in r.verdict


def test_relu_killed_by_rounding_is_a_rounding_zero() -> None:
    r = relu_killed_by_rounding.run(small=True)
    d = r.data
    assert r.holds is True
    assert d["exact_alive"] and d["exact_nonzero"]
    assert d["float16_tiny_verdicts"] == {"rounding_zero (lost)": 5}
    assert d["float16_tiny_verdicts_rounded_reference"] == {"rounding_zero (lost)": 5}
    assert d["other_precisions_alive"] == {"bfloat16": True, "float32": True, "float64": True}
    assert d["out_weight_float16"] == {"verdict": "rounding_zero", "kind": "underflow"}
    back, fwd = d["first_rounding_zero_backward"], d["first_rounding_zero_forward"]
    assert (back["layer"], back["quantity"], back["op"]) == (
        "hidden",
        "dL/dz",
        "act backward (relu)",
    )
    assert (fwd["layer"], fwd["quantity"]) == ("hidden", "z")
    # the stored weight 1 + 2^-12 rounds to 1: a structural zero at the rounded values
    assert d["stored_float16"] == {"rounding_zero (lost)": 5}
    assert d["stored_float16_rounded_reference"] == {"structural_zero": 5}
    # products above 2^-25 survive, below it float16 rounds them to 0
    sweep = d["sweep"]
    assert (sweep["last_whole_k"], sweep["partial_k"], sweep["first_dead_k"]) == (11, [12], 13)
    assert "2^-13" in r.verdict


def test_deep_sigmoid_float16_flushes_early_layers() -> None:
    r = deep_sigmoid_vanishing.run(small=True)
    d = r.data
    assert r.holds is True
    assert d["first_flush"]["sigmoid"] == {
        "float16": 5,
        "bfloat16": None,
        "float32": None,
        "float64": None,
    }
    for act in ("tanh", "relu"):
        assert all(v is None for v in d["first_flush"][act].values())
        assert d["exact_zero_layers"][act] == []
    assert d["decay_bits_per_layer"]["sigmoid"] > 1.5
    assert abs(d["decay_bits_per_layer"]["relu"]) < 0.5
    # below the flushed layer every float16 element is a rounding zero; exact is far below 2^-25
    norms = d["norms"]["sigmoid"]
    for i in range(5):
        assert norms["computed"]["float16"][i] == 0
        assert 0 < norms["exact"][i] < 2.0**-24
        assert set(norms["float16_counts"][i]) == {"rounding_zero"}


def test_fp16_underflow_and_loss_scale_window() -> None:
    r = fp16_gradient_underflow.run(small=True)
    d = r.data
    assert r.holds is True
    assert d["summary"]["float16"]["rounding_zero"] == 59
    assert d["summary"]["bfloat16"]["rounding_zero"] == 0
    assert d["window_predicted"] == [12, 14, 16]
    assert d["window_measured_master"] == [12, 14]
    assert d["window_measured_float16_unscale"] == []
    # with fp32 unscaling, float16 loses exactly the elements the exact values predict
    for k in range(2, 15, 2):
        assert d["measured_master"][k]["rounding_zero"] == d["predicted"][k]["underflow"]
    # S = 2^16 is not a float16 number: the scaled loss's gradient overflows at the start
    assert 2.0**16 > get_format("float16").max
    m16 = d["measured_master"][16]
    assert m16["nonfinite"] == d["elements"]
    assert m16["first_overflow"]["op"] == "loss backward (mse)"


def test_loss_near_zero_stall_floor_and_softmax_margin() -> None:
    r = loss_near_zero_stall.run(small=True)
    d = r.data
    assert r.holds is True
    mse = d["mse"]
    for p in ("float16", "bfloat16"):
        assert mse["loss_floor"][p]["detected"]
        assert mse["stall"][p]["detected"]
    assert mse["exact_drop_last_window"] > 10
    # float16's loss reads 0 with master weights, but the exact loss at them is not 0
    assert mse["exact_loss_at_final_params"]["float16+master"] > 0
    ce = d["ce"]
    assert ce["first_lost_integer_margin"] == {
        "float16": 8,
        "bfloat16": 6,
        "float32": 18,
        "float64": 38,
    }
    for p, (lo, hi) in ce["bisected"].items():
        theory = get_format(p).precision * math.log(2)
        assert ce["theory"][p] == pytest.approx(theory)
        assert lo <= theory <= hi, p
    assert ce["float16_at_first_lost"]["kind"] == "lost"
    assert ce["other_class_float16_at_first_lost"]["verdict"] == "ok"
    # torch's float16 log_softmax rounds log p(true) to 0; softmax alone does not reach 1 yet
    assert ce["torch_float16_at_first_lost"]["log_softmax"] == 0
    assert ce["torch_float16_at_first_lost"]["softmax"] == 1 - 2.0**-11
