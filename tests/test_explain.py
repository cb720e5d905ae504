"""fpgrad.present.explain (exact parsing, per-format descriptions, notes) and fpgrad.jsonutil."""

from __future__ import annotations

import doctest
import json
import math
from enum import Enum
from fractions import Fraction

import numpy as np
import pytest

import fpgrad.jsonutil as jsonutil
import fpgrad.present.explain as explain_module
from fpgrad.errors import InputError
from fpgrad.jsonutil import dumps, jsonable
from fpgrad.numbers.rounding import round_exact
from fpgrad.present.explain import exact_decimal, explain, parse_value, render_explain


def by_format(result: dict) -> dict[str, dict]:
    return {f["format"]: f for f in result["formats"]}


def has_note(row: dict, text: str) -> bool:
    return any(text in n for n in row["notes"])


def test_default_formats_and_strict_json() -> None:
    r = explain("65520")
    assert [f["format"] for f in r["formats"]] == ["float16", "bfloat16", "float32", "float64"]
    text = json.dumps(r, allow_nan=False)  # strict JSON as it is
    assert json.loads(text) == r


def test_1e_minus_8() -> None:
    r = explain("1e-8")
    assert r["exact"] == "1e-8" and r["exact_fraction"] == "1/100000000"
    assert r["float64"] == 1e-8 and r["float64_exact"] is False
    f16, bf16 = by_format(r)["float16"], by_format(r)["bfloat16"]
    assert (
        f16["value"] == 0.0 and f16["class"] == "zero" and f16["bits_text"] == "0|00000|0" + "0" * 9
    )
    assert has_note(f16, "underflows to zero: below half the smallest subnormal")
    assert f16["abs_error"] == 1e-8 and f16["rel_error"] == 1.0
    assert bf16["class"] == "normal" and abs(bf16["value"] - 1e-8) <= 2**-9 * 1e-8
    assert bf16["value"] == 1.0011717677116394e-08
    assert bf16["rel_error"] < 2**-8  # half an ulp relative to bfloat16's precision 8


def test_65520() -> None:
    rows = by_format(explain("65520", ["float16", "bfloat16", "fp8_e4m3"]))
    f16 = rows["float16"]
    assert f16["value"] == "inf" and f16["class"] == "inf" and f16["abs_error"] == "inf"
    assert f16["bits_text"] == "0|11111|0000000000"
    assert has_note(f16, "a tie between 65504.0 and 65536.0: goes to the even one, 65536.0")
    assert has_note(f16, "overflows to inf")
    assert f16["lost_addend_up"] is None
    assert rows["bfloat16"]["value"] == 65536.0 and rows["bfloat16"]["abs_error"] == 16.0
    e4m3 = rows["fp8_e4m3"]
    assert e4m3["value"] == "nan" and has_note(e4m3, "overflows to NaN (fp8_e4m3 has no inf)")
    neg = by_format(explain("-65520", ["float16"]))["float16"]
    assert neg["value"] == "-inf" and has_note(neg, "overflows to -inf")


def test_tie_to_even() -> None:
    r = explain("1+2**-11", ["float16", "float32"])
    assert r["exact"] == "1.00048828125" and r["float64_exact"] is True
    f16, f32 = by_format(r)["float16"], by_format(r)["float32"]
    assert f16["value"] == 1.0 and f16["exact"] is False
    assert has_note(f16, "a tie between 1.0 and 1.0009765625: goes to the even one, 1.0")
    assert f16["error_ulps"] == 0.5
    assert f32["exact"] is True and f32["abs_error"] == 0.0
    assert has_note(f32, "exactly representable in float32")


def test_point_one_in_float32() -> None:
    f32 = by_format(explain("0.1", ["float32"]))["float32"]
    assert f32["value"] == float(np.float32(0.1)) == 0.10000000149011612
    assert f32["decimal"] == "0.100000001490116119384765625"  # exact: a dyadic rational
    assert f32["abs_error_exact"] == "1.490116119384765625e-9"


def test_decimal_input_is_rounded_exactly_not_through_float64() -> None:
    """1.00048828125000000001 is just above the float16 midpoint 1 + 2**-11, but its nearest
    float64 is the midpoint itself, which then ties to 1.0: rounding twice is wrong."""
    text = "1.00048828125000000001"
    assert float(text) == 1 + 2**-11
    r = explain(text, ["float16", "bfloat16"])
    assert r["float64_exact"] is False
    f16 = by_format(r)["float16"]
    assert f16["value"] == 1 + 2**-10
    assert has_note(f16, "rounding the input to float64 first (1.00048828125) gives 1.0 here")
    assert has_note(f16, "torch's float64->float16 cast gives 1.0 here")
    assert not has_note(by_format(r)["bfloat16"], "float64 first")  # bfloat16: 1.0 either way
    # the same trap at the bottom of the range: just above half the smallest subnormal
    sub = by_format(explain("2.98023223876953125000001e-8", ["float16"]))["float16"]
    assert sub["value"] == 2.0**-24 and sub["class"] == "subnormal"
    assert has_note(sub, "rounding the input to float64 first")


def test_torch_double_rounding_trap() -> None:
    f16 = by_format(explain("1+2**-11+2**-40", ["float16"]))["float16"]
    assert f16["value"] == 1 + 2**-10
    assert has_note(
        f16,
        "double rounding trap: torch's float64->float16 cast gives 1.0 here; "
        "the correct result is 1.0009765625 (it rounds through float32 first)",
    )
    assert not has_note(f16, "float64 first")  # the input is a float64


def test_subnormal_and_half_subnormal() -> None:
    f16 = by_format(explain("3*2**-20", ["float16"]))["float16"]
    assert f16["class"] == "subnormal" and f16["exact"] is True
    assert has_note(f16, "subnormal: below the smallest normal 6.103515625e-05, 6 significant")
    half = by_format(explain("2**-25", ["float16"]))["float16"]
    assert half["value"] == 0.0
    assert has_note(half, "exactly half the smallest subnormal; the tie goes to even")


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("1", "float16"),
        ("1+2**-10", "float16"),
        ("2**-14", "float16"),
        ("65504", "float16"),
        ("448", "fp8_e4m3"),
        ("0", "float16"),
        ("2**-24", "float16"),
        ("3", "bfloat16"),
        ("2**-1022", "float64"),
    ],
)
def test_lost_addends_are_the_largest(value: str, name: str) -> None:
    """t is swamped (v + t rounds back to v) and the next float64 after t is not."""
    row = by_format(explain(value, [name]))[name]
    v = Fraction(row["value"])
    for key, sign in (("lost_addend_up", 1), ("lost_addend_down", -1)):
        t = row[key]
        assert round_exact(v + sign * Fraction(t), name) == v, (key, t)
        bigger = Fraction(float(np.nextafter(t, math.inf)))
        assert round_exact(v + sign * bigger, name) != v, (key, t)


def test_lost_addend_values() -> None:
    one = by_format(explain("1", ["float16"]))["float16"]
    assert one["lost_addend_up"] == 2**-11  # half an ulp: the tie goes to even 1.0
    assert one["lost_addend_down"] == 2**-12  # below a power of two the gap is halved
    odd = by_format(explain("1+2**-10", ["float16"]))["float16"]
    assert odd["lost_addend_up"] == float(np.nextafter(2**-11, 0))  # odd: the tie moves it


def test_parse_value() -> None:
    assert parse_value("1e-8") == Fraction(1, 10**8)
    assert parse_value(" -3.5 ") == Fraction(-7, 2)
    assert parse_value("0x1.8p-3") == Fraction(3, 16)
    assert parse_value("-0x1p-1074") == -Fraction(1, 2**1074)
    assert parse_value("2*0x1.0p+4 + 1") == 33
    assert parse_value("(1+2)*3/4") == Fraction(9, 4)
    assert parse_value("2**-24") == Fraction(1, 2**24)
    assert parse_value("1_000.5") == Fraction(2001, 2)
    assert parse_value("10**400") == 10**400
    assert parse_value("inf") == math.inf and parse_value("-Infinity") == -math.inf
    assert math.isnan(parse_value("nan"))
    z = parse_value("-0")
    assert z == 0 and math.copysign(1, z) < 0
    assert parse_value(0.1) == Fraction(0.1) and parse_value(Fraction(1, 3)) == Fraction(1, 3)


@pytest.mark.parametrize(
    "bad",
    [
        "abc",
        "",
        "1e-8x",
        "__import__('os')",
        "2**0.5",
        "1/0",
        "10**10**10",
        "1j",
        "True",
        "x+1",
        "[1]",
        "1 if 1 else 2",
        "0x1.8",
        "2**100000",
        "1e-8; 2",
    ],
)
def test_bad_values(bad: str) -> None:
    with pytest.raises(InputError, match=r"cannot parse value .*: write a number like 1e-8"):
        explain(bad)


def test_bad_value_message() -> None:
    with pytest.raises(InputError) as info:
        explain("abc")
    assert str(info.value) == (
        "cannot parse value 'abc': write a number like 1e-8, 65520 or 1+2**-11"
    )
    with pytest.raises(InputError, match="unknown format 'float17'"):
        explain("1", ["float17"])


def test_specials() -> None:
    rows = by_format(explain("-inf", ["float16", "fp8_e4m3"]))
    assert rows["float16"]["value"] == "-inf" and rows["float16"]["exact"] is True
    assert rows["fp8_e4m3"]["value"] == "nan" and rows["fp8_e4m3"]["exact"] is False
    nan = by_format(explain("nan", ["bfloat16"]))["bfloat16"]
    assert nan["class"] == "nan" and nan["ulp"] == "nan"
    zero = by_format(explain("-0", ["float16"]))["float16"]
    assert zero["repr"] == "-0.0" and zero["bits_text"].startswith("1|")
    huge = explain("1e400", ["float64"])
    assert huge["float64"] == "inf" and by_format(huge)["float64"]["value"] == "inf"


def test_render() -> None:
    text = render_explain(explain("65520", ["float16", "bfloat16"]))
    assert "| format" in text and "sign|exponent|mantissa" in text
    assert "float16: overflows to inf" in text and "65536.0" in text
    assert text.splitlines()[0] == "value    65520"
    assert "float64  65520.0  (exact)" in text


def test_exact_decimal() -> None:
    assert exact_decimal(Fraction(1, 3), 5) == "0.33333..."
    assert exact_decimal(Fraction(2) ** -24) == "5.9604644775390625e-8"
    assert exact_decimal(Fraction(2) ** -1074).endswith("...e-324")
    assert exact_decimal(-0.0) == "-0" and exact_decimal(math.inf) == "inf"


class Color(Enum):
    RED = "red"


def test_jsonable() -> None:
    obj = {
        "a": [np.float32(1.5), np.int64(3), np.bool_(True)],
        "b": np.array([[1.0, np.inf], [-np.inf, np.nan]]),
        1: (Fraction(1, 3), Color.RED, None, "s"),
        "c": {"d": float("nan")},
    }
    out = jsonable(obj)
    assert out == {
        "a": [1.5, 3, True],
        "b": [[1.0, "inf"], ["-inf", "nan"]],
        "1": ["1/3", "red", None, "s"],
        "c": {"d": "nan"},
    }
    assert type(out["a"][1]) is int and type(out["a"][2]) is bool
    json.dumps(out, allow_nan=False)
    assert dumps({"x": np.float64(-np.inf)}) == '{"x": "-inf"}'


def test_doctests() -> None:
    for module in (explain_module, jsonutil):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted >= 2


def test_cli_accepts_negative_values(capsys) -> None:  # noqa: ANN001
    from fpgrad.cli import main

    assert main(["explain", "-1e-8", "--format", "float16"]) == 0
    out = capsys.readouterr().out
    assert "float16" in out
    assert main(["explain", "--format", "bfloat16", "-65520", "--json"]) == 0
    assert '"-65536' in capsys.readouterr().out.replace(" ", "")
