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


def oracle(fmt: Format, mode: Mode, name: str, a: np.ndarray, *more: object) -> np.ndarray:
    """MPFR's function ``name`` of every value of ``a`` (then ``more`` arguments), correctly
    rounded into ``fmt`` in ``mode``; NaN for NaN."""
    ctx = context(fmt, mode)
    f = getattr(ctx, name)
    return finish([float("nan") if v != v else as_float(f(mpfr(v), *more)) for v in a.tolist()],
                  fmt, mode)  # fmt: skip


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


class _Logs(nn.Module):
    """exp2, log2, log10 (PSNR-like and entropy-in-bits terms)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return torch.exp2(h) + torch.log2(h * h + 1) - 10 * torch.log10(h * h + 0.5)


def test_base_2_and_10_functions_against_the_real_constants() -> None:
    """The exact gradient is that of the real function (d/dx 2^x = 2^x ln 2, d/dx log2 x =
    1 / (x ln 2)), which torch's float64 ln 2 misses by ~1e-17 relative: the mpmath oracle
    from the definitions (central differences) holds every certified ball and digit."""
    from tests.oracle import graph_reference as R
    from tests.test_graph_oracle import check as oracle_check

    def forward(p: dict, x: np.ndarray, t: np.ndarray) -> object:
        h = R.linear(x, p["lin.weight"], p["lin.bias"])
        two, ten = R.CTX.mpf(2), R.CTX.mpf(10)
        f = np.frompyfunc(lambda v: two**v + R.CTX.log(v * v + 1, 2)
                          - 10 * R.CTX.log(v * v + R.CTX.mpf(0.5), ten), 1, 1)  # fmt: skip
        return R.mse(np.asarray(f(h), dtype=object), t)

    torch.manual_seed(0)
    model = _Logs().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    oracle_check(model, x, y, nn.MSELoss(), forward)
    check(_Logs(), x.float(), y.float(), nn.MSELoss(), digits=30)


@pytest.mark.parametrize("fn", ["exp2", "log2", "log10"])
def test_base_2_and_10_kernels_every_fp8_value_and_exact_points(fn: str) -> None:
    """Every fp8 value in every mode against MPFR; 2^k, log2(2^k) and log10(10^k) are exact and
    sit on rounding boundaries in the directed modes (the Ziv loop must recognise them)."""
    for name in ("fp8_e4m3", "fp8_e5m2"):
        fmt = get_format(name)
        v = all_values(fmt)
        for mode in DIRECTED:
            assert_same(getattr(EmulatedArith(fmt, mode=mode), fn)(v), oracle(fmt, mode, fn, v), v)
    fmt = get_format("float16")
    v = np.array([3.0, -2.0, 8.0, 0.25, 1000.0, 100.0, 10.0, 1.5, 2.0**-20, 65504.0, -1.0, 0.0])
    for mode in DIRECTED:
        assert_same(getattr(EmulatedArith(fmt, mode=mode), fn)(v), oracle(fmt, mode, fn, v), v)


class _OwnLn2(nn.Module):
    """The model's own float ``* 0.6931471805599453`` beside a log2 of the same value and an
    exp2: a forward constant, not a derivative's (it must stay the float)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.lin(x) ** 2 + 1
        return torch.log2(u) + u * 0.6931471805599453 + torch.exp2(u) * 0.6931471805599453


def test_a_models_own_ln2_stays_the_float() -> None:
    from tests.oracle import graph_reference as R
    from tests.test_graph_oracle import check as oracle_check

    c = R.CTX.mpf(0.6931471805599453)  # the float, exactly

    def forward(p: dict, x: np.ndarray, t: np.ndarray) -> object:
        h = R.linear(x, p["lin.weight"], p["lin.bias"])
        f = np.frompyfunc(lambda v: R.CTX.log(v * v + 1, 2) + (v * v + 1) * c
                          + R.CTX.mpf(2) ** (v * v + 1) * c, 1, 1)  # fmt: skip
        return R.mse(np.asarray(f(h), dtype=object), t)

    torch.manual_seed(1)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    oracle_check(_OwnLn2().double(), x, y, nn.MSELoss(), forward)
