"""fpgrad.numbers.formats: constants against numpy/torch, defining identities, bit views."""

from __future__ import annotations

import doctest
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import fpgrad.numbers.formats as formats
from fpgrad.errors import InputError
from fpgrad.numbers.formats import CATALOGUE, Format, Special, get_format
from fpgrad.numbers.rounding import round_exact, round_to

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
INT_VIEW = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def torch_decode(name: str, codes: np.ndarray) -> np.ndarray:
    """Values of bit patterns as torch reads them (an integer tensor viewed as the dtype)."""
    dtype = TORCH_DTYPES[name]
    bits = torch.finfo(dtype).bits
    ints = torch.tensor(codes.astype(np.int64)).to(INT_VIEW[bits])  # wraps to two's complement
    return ints.view(dtype).to(torch.float64).numpy()


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_constants_equal_torch_finfo(name: str) -> None:
    fmt = get_format(name)
    fi = torch.finfo(TORCH_DTYPES[name])
    assert fmt.bits == fi.bits
    assert fmt.eps == fi.eps
    assert fmt.max == fi.max
    assert fmt.smallest_normal == fi.smallest_normal == fi.tiny
    assert fmt.smallest_subnormal == torch_decode(name, np.array([1]))[0]  # code 1
    assert fmt.smallest_subnormal == 2.0 ** (fmt.emin - fmt.man_bits)


@pytest.mark.parametrize("name", ["float16", "float32", "float64"])
def test_constants_equal_numpy_finfo(name: str) -> None:
    fmt = get_format(name)
    fi = np.finfo(np.dtype(name))
    assert (fmt.eps, fmt.max, fmt.smallest_normal) == (fi.eps, fi.max, fi.smallest_normal)
    assert fmt.smallest_subnormal == fi.smallest_subnormal
    assert (fmt.man_bits, fmt.exp_bits, fmt.bits) == (fi.nmant, fi.iexp, fi.bits)
    assert (fmt.emin, fmt.emax) == (fi.minexp, fi.maxexp - 1)


@pytest.mark.parametrize("name", list(CATALOGUE) + ["e5m7", "e3m2", "e8m1", "e2m1", "e11m52"])
def test_defining_identities(name: str) -> None:
    """ml_dtypes-style: each constant checked against the identity that defines it."""
    fmt = get_format(name)
    one = 1.0
    assert fmt.eps == 2.0**-fmt.man_bits
    assert round_to(one + fmt.eps, fmt).item() == one + fmt.eps  # the successor of 1
    assert round_to(one + fmt.eps / 2, fmt).item() == one  # a tie: 1 is even
    assert round_to(one + fmt.eps * 0.75, fmt).item() == one + fmt.eps
    assert fmt.smallest_normal == 2.0**fmt.emin
    assert round_to(fmt.smallest_normal, fmt).item() == fmt.smallest_normal
    tiny = fmt.smallest_subnormal
    assert round_to(tiny, fmt).item() == tiny
    assert round_to(tiny / 2, fmt).item() == 0.0  # half the smallest subnormal rounds to zero
    assert round_to(tiny * 0.5000001, fmt).item() == tiny
    assert round_to(2.0**fmt.emax, fmt).item() == 2.0**fmt.emax  # 2**emax is finite
    overflow = (lambda v: v == math.inf) if fmt.has_inf else math.isnan
    # exact values, as 2**(emax + 1) is beyond float64 for float64-sized exponents
    assert overflow(round_exact(Fraction(2) ** (fmt.emax + 1), fmt))  # 2**(emax + 1) is not
    top, gap = Fraction(fmt.max), Fraction(fmt.ulp(fmt.max))  # spacing in the top binade
    assert round_exact(top, fmt) == fmt.max
    assert round_exact(top + gap * Fraction(49, 100), fmt) == fmt.max
    tie = round_exact(top + gap / 2, fmt)  # the tie above max goes to the even side:
    if fmt.special is Special.IEEE:
        assert overflow(tie)  # max's significand is all ones (odd): overflow
    else:
        assert tie == fmt.max  # all-ones is NaN, so max (1.1...10) is even and wins the tie
        assert overflow(round_exact(top + gap / 2 + gap / 2**60, fmt))
    assert fmt.precision == fmt.man_bits + 1 and fmt.bits == 1 + fmt.exp_bits + fmt.man_bits


def test_catalogue_values() -> None:
    f16, bf16, f32 = get_format("float16"), get_format("bfloat16"), get_format("float32")
    assert (f16.max, f16.smallest_normal, f16.smallest_subnormal) == (65504, 2**-14, 2**-24)
    assert (bf16.max, bf16.eps) == (float.fromhex("0x1.fep127"), 2**-7)
    assert f32.max == float.fromhex("0x1.fffffep127")
    e4m3, e5m2 = get_format("fp8_e4m3"), get_format("fp8_e5m2")
    assert (e4m3.max, e4m3.emax, e4m3.emin, e4m3.smallest_subnormal) == (448, 8, -6, 2**-9)
    assert e4m3.special is Special.FN and not e4m3.has_inf
    assert (e5m2.max, e5m2.emax, e5m2.smallest_subnormal) == (57344, 15, 2**-16)
    tf32 = get_format("tf32")
    assert tf32.bits == 19 and tf32.eps == 2**-10 and tf32.max == (2 - 2**-10) * 2.0**127
    assert tf32.smallest_normal == 2**-126 and tf32.smallest_subnormal == 2**-136
    e5m7 = get_format("e5m7")
    assert e5m7.bits == 13 and e5m7.precision == 8 and e5m7.max == (2 - 2**-7) * 2**15
    assert e5m7.smallest_normal == 2**-14 and e5m7.smallest_subnormal == 2**-21
    assert get_format("E5M7") == e5m7 and get_format(" half ") is f16
    for alias, name in [("bf16", "bfloat16"), ("e4m3fn", "fp8_e4m3"), ("float8_e5m2", "fp8_e5m2")]:
        assert get_format(alias).name == name


def test_float16_bit_views_match_numpy() -> None:
    fmt = get_format("float16")
    codes = np.arange(2**16, dtype=np.uint32)
    ref = codes.astype(np.uint16).view(np.float16).astype(np.float64)
    ours = np.array([fmt.decode(int(c)) for c in codes])
    nan = np.isnan(ref)
    assert nan.sum() == 2 * (2**10 - 1)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan], ref[~nan])
    assert np.array_equal(np.signbit(ours[~nan]), np.signbit(ref[~nan]))  # -0.0 at 0x8000
    back = [fmt.encode(v) for v in ours[~nan].tolist()]
    assert back == codes[~nan].tolist()
    assert np.isnan(fmt.decode(fmt.encode(math.nan)))


@pytest.mark.parametrize("name", ["bfloat16", "fp8_e4m3", "fp8_e5m2"])
def test_bit_views_match_torch(name: str) -> None:
    fmt = get_format(name)
    codes = np.arange(2**fmt.bits)
    ref = torch_decode(name, codes)
    ours = np.array([fmt.decode(int(c)) for c in codes])
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan)
    assert nan.sum() == (2 if fmt.special is Special.FN else 2 * (2**fmt.man_bits - 1))
    assert np.array_equal(ours[~nan], ref[~nan])
    assert np.array_equal(np.signbit(ours[~nan]), np.signbit(ref[~nan]))
    assert [fmt.encode(v) for v in ours[~nan].tolist()] == codes[~nan].tolist()


def test_split_bits_and_describe() -> None:
    f16 = get_format("float16")
    assert f16.split_bits(1.0) == ("0", "01111", "0000000000")
    assert f16.split_bits(-(2.0**-24)) == ("1", "00000", "0000000001")
    assert f16.split_bits(math.inf) == ("0", "11111", "0000000000")
    assert get_format("fp8_e4m3").split_bits(math.nan) == ("0", "1111", "111")
    d = f16.describe()
    assert d["max"] == 65504 and d["precision"] == 11 and d["overflow"] == "inf"
    with pytest.raises(ValueError):
        f16.encode(1 + 2**-11)  # not a value of float16
    with pytest.raises(ValueError):
        get_format("fp8_e4m3").encode(math.inf)


def test_ulp() -> None:
    f16 = get_format("float16")
    assert f16.ulp(1.0) == 2**-10 and f16.ulp(0.0) == 2**-24 and f16.ulp(2**-20) == 2**-24
    assert f16.ulp(65504) == 32 and math.isnan(f16.ulp(math.inf))


def test_bad_names_and_fields() -> None:
    with pytest.raises(
        InputError,
        match=r"unknown format 'float17' \(did you mean 'float16'\?\); known formats: float16, ",
    ):
        get_format("float17")
    with pytest.raises(InputError, match="eXmY"):
        get_format("fp4")
    with pytest.raises(InputError, match="exponent bits must be 2..11"):
        get_format("e12m3")
    with pytest.raises(InputError, match="mantissa bits must be 1..52"):
        get_format("e5m53")
    with pytest.raises(InputError, match="mantissa bits must be 1..52"):
        get_format("e5m0")
    with pytest.raises(InputError, match="exponent bits"):
        Format("tiny", 1, 3)
    assert issubclass(InputError, ValueError)


def test_doctests() -> None:
    result = doctest.testmod(formats)
    assert result.failed == 0 and result.attempted >= 3
