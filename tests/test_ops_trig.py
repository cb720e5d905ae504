"""Hyperbolic and inverse trigonometric ops (``fpgrad/graph/ops/trig.py``,
``fpgrad/arith/emulated_trig.py``): a model through all eight, native bit for bit and exact =
torch float64; the emulated kernels correctly rounded on every fp8 value in every mode and on a
float16 sample, against MPFR (gmpy2), domain edges included (NaN outside, atanh(+-1) = +-inf)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gmpy2 import mpfr
from torch import nn

import fpgrad
from fpgrad.arith.emulated import EmulatedArith
from fpgrad.arith.emulated_trig import TRIG
from fpgrad.numbers.formats import Format, get_format
from fpgrad.numbers.rounding import Mode
from tests.oracle.native_exact import check
from tests.test_emulated import DIRECTED, all_values, as_float, assert_same, context, finish


class _Trig(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        t = torch.tanh(h) * 0.9
        parts = [torch.sinh(h), torch.cosh(h), torch.tan(t), torch.asin(t), torch.acos(t),
                 torch.asinh(h), torch.acosh(1.1 + h * h), torch.atanh(t)]  # fmt: skip
        return sum(p[:, i : i + 1] for i, p in enumerate(parts))


def test_trig_model_native_bit_for_bit_and_exact() -> None:
    torch.manual_seed(0)
    model, x, y = _Trig(), torch.randn(6, 4), torch.randn(6, 1)
    check(model, x, y, nn.MSELoss(), digits=30)
    fpgrad.compare(fpgrad.from_module(model, x, y, nn.MSELoss()), "bfloat16:emulated,float16")


def oracle(fmt: Format, mode: Mode, name: str, a: np.ndarray) -> np.ndarray:
    ctx = context(fmt, mode)
    f = getattr(ctx, name)
    return finish([float("nan") if v != v else as_float(f(mpfr(v))) for v in a.tolist()], fmt, mode)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_every_fp8_value_every_mode(name: str) -> None:
    fmt = get_format(name)
    v = all_values(fmt)
    for fn in TRIG:
        for mode in DIRECTED:
            got = getattr(EmulatedArith(fmt, mode=mode), fn)(v)
            assert_same(got, oracle(fmt, mode, fn, v), v)


def test_float16_sample_and_domain_edges() -> None:
    fmt = get_format("float16")
    v = np.concatenate([all_values(fmt)[::61], [1.0, -1.0, 0.0, -0.0, 1.0009765625, 0.99951171875]])
    for fn in TRIG:
        for mode in (Mode.NEAREST_EVEN, Mode.UP, Mode.TOWARD_ZERO):
            got = getattr(EmulatedArith(fmt, mode=mode), fn)(v)
            assert_same(got, oracle(fmt, mode, fn, v), v)
