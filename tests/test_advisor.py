"""The loss-scale advisor against hand-computed cases, and its command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fpgrad.cli import main
from fpgrad.diagnose.advisor import advise
from tests.nets import net_from


def one_layer(x: list[float], target: float) -> Any:
    """z = w . x with w = 0, MSE against ``target`` on one sample: dL/dz = -2 target, and the
    gradient of w is dL/dz * x."""
    layer = {"type": "dense", "out": 1, "weight": [[0.0] * len(x)], "bias": False}
    return net_from([layer], "mse", [x], [[target]])


def test_hand_computed_safe_range() -> None:
    # dL/dz = 1, exact gradients 2^-30 and 2^3. float16: 2^-30 S must exceed half the smallest
    # subnormal, 2^-25 (2^-30 * 2^5 = 2^-25 is a tie and rounds to 0), and 2^3 S must stay
    # below 65520 (2^3 * 2^13 = 65536 overflows): S = 2^6 .. 2^12.
    net = one_layer([2.0**-30, 8.0], -0.5)
    a = advise(net, "float16", exponents=(0, 20))
    assert a.safe == [6, 12] and a.safe_gradients == [6, 12]
    assert a.normal is None  # 2^-30 S >= 2^-14 needs S >= 2^16, where 2^3 S overflows
    expected_under = {k: 1 if k <= 5 else 0 for k in range(0, 21)}
    expected_over = {k: 1 if k >= 13 else 0 for k in range(0, 21)}
    for k in range(0, 21):
        row = a.row(k)
        assert row["gradients"]["underflow"] == expected_under[k], k
        assert row["gradients"]["overflow"] == expected_over[k], k
        # the small gradient is subnormal from 2^6 (2^-24) up to 2^15 (2^-15)
        assert row["gradients"]["subnormal"] == (1 if 6 <= k <= 15 else 0), k
        assert row["signals"]["overflow"] == (1 if k >= 16 else 0), k  # dL/dz = 1, scaled
        assert row["seed"]["overflow"] == (1 if k >= 16 else 0), k  # S itself
    # the largest safe scale with 3 binades of headroom: 2^(12 - 3), also the middle of 6..12
    assert a.recommended == 9 and a.recommended_scale == 512.0
    # GradScaler's rules: 2^16 (the seed overflows), 2^15, 2^14, 2^13 overflow, 2^12 is clean
    assert a.dynamic is not None
    assert a.dynamic["settled"] == 12 and a.dynamic["skipped"] == 4
    assert [s["exponent"] for s in a.dynamic["steps"]] == [16, 15, 14, 13, 12]
    # torch: the 2^-30 input itself underflows in float16, so that gradient is lost at every
    # scale; 2^3 S overflows from 2^13 on
    assert a.row(9)["measured"] == {"rounding_zero": 1, "underflow": 0, "lost": 1, "nonfinite": 0}
    assert a.row(13)["measured"]["nonfinite"] == 1
    assert json.loads(a.to_json())["recommended"]["exponent"] == 9


def test_scaling_removes_measured_underflow() -> None:
    # dL/dz = 2 * 2^-20 = 2^-19; gradients 2^-19 * 2^-6 = 2^-25 (a tie: 0 in float16) and 2^-19
    net = one_layer([2.0**-6, 1.0], -(2.0**-20))
    a = advise(net, "float16", exponents=(0, 16))
    assert a.safe == [1, 15]  # capped by the seed: S must be a float16 value
    assert a.row(0)["gradients"]["underflow"] == 1
    assert a.row(0)["measured"] == {"rounding_zero": 1, "underflow": 1, "lost": 0, "nonfinite": 0}
    for k in range(1, 16):
        assert a.row(k)["measured"]["rounding_zero"] == 0, k
    assert a.row(16)["measured"]["nonfinite"] == 2
    # every gradient is normal from 2^11 (2^-25 S >= 2^-14); the values could grow to 2^34
    # before overflowing, halfway is 2^22: the seed caps it at 2^15, where GradScaler settles
    assert a.normal == [11, 15]
    assert a.recommended == 15 and a.dynamic is not None and a.dynamic["settled"] == 15
    assert "capped at 2^15" in a.reason


def test_signals_scope_and_empty_safe_range() -> None:
    # a backward signal of 2^-40 cannot be kept in float16 together with the seed
    net = one_layer([1.0], -(2.0**-41))  # dL/dz = 2^-40 = the gradient
    a = advise(net, "float16", scope="all", measure=False)
    assert a.safe is None and a.safe_gradients is None
    assert a.recommended == 15  # the largest scale without overflow
    assert "no scale is safe" in a.reason
    assert a.dynamic is None


def test_bfloat16_needs_no_scale() -> None:
    net = one_layer([2.0**-30, 8.0], -0.5)
    a = advise(net, "bfloat16", measure=False)
    # 2^-30 S > 2^-134 (half of 2^-133) from S = 2^-103; 2^3 S < 2^128 - 2^119 up to 2^124
    assert a.safe == [-103, 124]
    assert a.normal == [-96, 124]  # 2^-30 S >= 2^-126
    assert a.recommended == 0 and "no scaling" in a.reason


def test_emulated_format_is_predicted_only() -> None:
    a = advise(one_layer([2.0**-10, 1.0], -0.5), "fp8_e5m2")
    assert a.dynamic is None and any("no torch dtype" in n for n in a.notes)
    # fp8_e5m2: 2^-10 S > 2^-17 (half the smallest subnormal) from S = 2^-6; S < 61440
    # (57344 plus half an ulp) up to 2^15
    assert a.safe == [-6, 15]


NET = """
[[layer]]
type = "dense"
out = 1
weight = [[0.0, 0.0]]
bias = false
[loss]
type = "mse"
[data]
x = [[9.313225746154785e-10, 8.0]]
y = [[-0.5]]
"""


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "net.toml"
    path.write_text(NET)  # x = [2^-30, 8]
    assert main(["advise", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Safe scales (no gradient underflows, nothing overflows): 2^6 .. 2^12" in out
    assert "Recommended static scale: 2^9 = 512" in out
    assert "settles at 2^12" in out
    assert main(["advise", str(path), "--json", "--exponents", "0..3", "--no-measure"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["exponent"] for r in doc["rows"]] == [0, 1, 2, 3] and doc["dynamic"] is None
    for args, needle in [
        (["--format", "float64"], "needs no loss scale"),
        (["--format", "nope"], "nope"),
        (["--exponents", "5"], "write LO..HI"),
        (["--exponents", "5..1"], "is empty"),
        (["--headroom", "-1"], "headroom"),
    ]:
        assert main(["advise", str(path), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_autocast_policy_drops_the_seed_cap_and_measures_the_policy() -> None:
    # the net of test_scaling_removes_measured_underflow under autocast: the matmul runs in
    # float16, the loss in float32. dL/dz = 2^-19 reaches the float16 matmul backward, which
    # gives 2^-25 (a tie: 0) and 2^-19; the seed S is a float32 value: no cap at 2^15. The
    # largest value, 2^-19 S, overflows float16 from S = 2^35: safe 2^1 .. 2^34, every value
    # normal from 2^11, recommended halfway: 2^22.
    net = one_layer([2.0**-6, 1.0], -(2.0**-20))
    a = advise(net, policy="autocast", exponents=(0, 36))
    assert a.format == "float16 (policy autocast)"
    assert a.safe == [1, 34] and a.normal == [11, 34] and a.recommended == 22
    assert all(a.row(k)["seed"] == {"underflow": 0, "subnormal": 0, "overflow": 0} for k in (0, 36))
    assert a.row(0)["measured"] == {"rounding_zero": 1, "underflow": 1, "lost": 0, "nonfinite": 0}
    for k in range(1, 35):
        assert a.row(k)["measured"] == {
            "rounding_zero": 0,
            "underflow": 0,
            "lost": 0,
            "nonfinite": 0,
        }, k
    assert a.row(35)["measured"]["nonfinite"] == 2
    assert a.dynamic is not None and a.dynamic["settled"] == 16 and a.dynamic["skipped"] == 0
    assert any("policy autocast" in n for n in a.notes)


def test_policy_without_a_low_precision_op_needs_no_scale(tmp_path: Path) -> None:
    from dataclasses import replace

    from fpgrad.errors import InputError
    from fpgrad.model.policy import parse_policy

    net = one_layer([1.0], -1.0)
    wide = parse_policy("wide", {"params": "float64", "default": "float64"})
    net = replace(net, policies={"wide": wide})
    with pytest.raises(InputError, match="float64 needs no loss scale"):
        advise(net, policy="wide")
    with pytest.raises(InputError, match="unknown policy 'nope'"):
        advise(net, policy="nope")


def test_counts_by_binary_search_equal_the_masks() -> None:
    # values on and around every threshold of every scale, with low words of each sign: the
    # sorted counts give what the elementwise comparisons give
    import math

    import numpy as np

    from fpgrad.diagnose.advisor.scales import _counts, _Limits, _Values
    from fpgrad.numbers.formats import get_format

    rng = np.random.default_rng(4)
    for name in ("float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"):
        lim = _Limits.of(get_format(name))
        ks = range(-40, 41, 3)
        ties = [math.ldexp(t, -k) for k in ks for t in (lim.underflow, lim.normal, lim.overflow)]
        mag = np.concatenate([ties * 3, np.exp2(rng.uniform(-200, 200, 3000))])
        rest = np.concatenate(
            [np.repeat([-1.0, 0.0, 1.0], len(ties)) * np.tile(ties, 3) * 2.0**-60,
             rng.normal(size=3000) * mag[-3000:] * 2.0**-58]
        )  # fmt: skip
        v = _Values(mag, rest, 0)

        def le(t: float, mag: np.ndarray = mag, rest: np.ndarray = rest) -> np.ndarray:
            return (mag < t) | ((mag == t) & (rest <= 0))

        def lt(t: float, mag: np.ndarray = mag, rest: np.ndarray = rest) -> np.ndarray:
            return (mag < t) | ((mag == t) & (rest < 0))

        for k in ks:
            under = le(math.ldexp(lim.underflow, -k))
            sub = ~under & lt(math.ldexp(lim.normal, -k))
            t = math.ldexp(lim.overflow, -k)
            over = ~lt(t) if lim.overflow_tie else ~le(t)
            want = {
                "underflow": int(under.sum()),
                "subnormal": int(sub.sum()),
                "overflow": int(over.sum()),
            }
            assert _counts(v, lim, k) == want, (name, k)
            assert 0 < want["underflow"] + want["subnormal"] < len(mag)
