"""The emulated machines' power with a constant exponent (``x ** p`` for p no integer or half:
``nn.LocalResponseNorm``'s ``** 0.75``), correctly rounded in every mode: every value of the
fp8 formats and a float16 sample against MPFR's ``pow`` (gmpy2), exact powers included (16 **
0.75 = 8 sits on a rounding boundary in the directed modes: the Ziv loop must recognise it),
and the Fraction test of exact powers against brute force."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from gmpy2 import mpfr

from fpgrad.arith import emulated
from fpgrad.arith.emulated import EmulatedArith
from fpgrad.arith.emulated_functions import exact_pow
from fpgrad.numbers.formats import Format, get_format
from fpgrad.numbers.rounding import Mode
from tests.test_emulated import DIRECTED, all_values, assert_same
from tests.test_ops_trig import oracle

EXPONENTS = [0.75, -0.25, 1 / 3, 2.125, -1.75, 0.0625, 1.25]


def oracle_pow(fmt: Format, mode: Mode, a: np.ndarray, p: float) -> np.ndarray:
    return oracle(fmt, mode, "pow", a, mpfr(p))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_pow_every_fp8_value_every_mode(name: str) -> None:
    fmt = get_format(name)
    v = all_values(fmt)
    for p in EXPONENTS:
        for mode in DIRECTED:
            got = EmulatedArith(fmt, mode=mode).pow_const(v, p)
            assert_same(got, oracle_pow(fmt, mode, v, p), v)


def test_pow_float16_sample_and_hard_path(monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = get_format("float16")
    v = all_values(fmt)[::97]
    for p in (0.75, -0.25, 1.25):
        for mode in (Mode.NEAREST_EVEN, Mode.UP):
            assert_same(EmulatedArith(fmt, mode=mode).pow_const(v, p), oracle_pow(fmt, mode, v, p), v)
    monkeypatch.setattr(emulated, "FUNC_REL_ERR", 2.0**-6)  # most elements take the Ziv loop
    v = np.concatenate([all_values(get_format("bfloat16"))[::211], [16.0, 81.0, 256.0, 0.0625]])
    for mode in (Mode.NEAREST_EVEN, Mode.DOWN):
        fmt = get_format("bfloat16")
        assert_same(EmulatedArith(fmt, mode=mode).pow_const(v, 0.75), oracle_pow(fmt, mode, v, 0.75), v)


def test_exact_pow_on_perfect_powers_and_others() -> None:
    """exact_pow(v, p) is v ** p where that is rational (v = k^den 2^(den j): k^num 2^(j num)),
    None where it is not (v = k^den + 1, or an exponent of two not divisible by den)."""
    for p in (0.75, -0.25, 1.25, 0.0625, -1.75, 2.0**-5, 3.03125):
        num, den = Fraction(p).as_integer_ratio()
        for k in range(1, 12):
            if k**den >= 2**53:
                continue
            for j in (-2, 0, 1, 3):
                v = Fraction(k**den) * Fraction(2) ** (den * j)
                assert exact_pow(v, p) == Fraction(k) ** num * Fraction(2) ** (j * num)
                if den > 1:
                    assert exact_pow(v * 2, p) is None  # 2^(den j + 1): no den-th root
                    if k > 1:
                        assert exact_pow(Fraction(k**den + 1) * Fraction(2) ** (den * j), p) is None
    assert exact_pow(Fraction(16), 0.75) == 8 and exact_pow(Fraction(3) ** 16, 2.0**-4) == 3
