"""``pow.Scalar``: a number to a tensor power. RoPE's frequency table on constants (exact
in the exact systems), a parameter-dependent exponent whose backward's float64 ``ln(base)``
is read as the real logarithm, and a model's own such constant that stays the float."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph
from tests.oracle import graph_reference as R
from tests.oracle.native_exact import check
from tests.test_graph_oracle import check as oracle_check


class Power(nn.Module):
    """``base ** lin(x)`` plus ``lin(x) * c`` with ``c`` a model constant."""

    def __init__(self, base: float, c: float = 0.0) -> None:
        super().__init__()
        self.lin, self.base, self.c = nn.Linear(3, 2), base, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        return self.base**z + z * self.c


def _oracle(base: float, c: float) -> object:
    def f(p: dict, x: np.ndarray, t: np.ndarray) -> object:
        z = R.linear(x, p["lin.weight"], p["lin.bias"])
        b, cc = R.CTX.mpf(base), R.CTX.mpf(c)  # c: the float the model holds
        return R.mse(np.vectorize(lambda v: R.CTX.power(b, v) + v * cc, otypes=[object])(z), t)

    return f


@pytest.mark.parametrize("base", [3.0, 10000.0, 0.5])
def test_number_to_tensor_power_against_oracle(base: float) -> None:
    """The backward multiplies by torch's float64 ln(base): taken as the float, the
    gradient would be 1e-17 relative off and certified anyway."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3) * 0.3, torch.randn(4, 2)
    oracle_check(Power(base), x, y, nn.MSELoss(), _oracle(base, 0.0))
    check(Power(base), x, y, nn.MSELoss())


def test_a_model_constant_equal_to_ln_base_stays_the_float() -> None:
    """``z * fl(ln 3)`` in the forward is the model's float, not ln 3."""
    torch.manual_seed(1)
    x, y = torch.randn(4, 3) * 0.3, torch.randn(4, 2)
    c = math.log(3.0)
    oracle_check(Power(3.0, c), x, y, nn.MSELoss(), _oracle(3.0, c))


class Rope(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv = 1.0 / (10000 ** (torch.arange(0, 4, 2, dtype=x.dtype) / 4))
        ang = torch.arange(x.shape[0], dtype=x.dtype)[:, None] * inv[None]
        h = self.lin(x)
        return torch.cat([h[:, :2] * ang.cos(), h[:, 2:] * ang.sin()], dim=1)


def test_rope_frequency_table_is_exact() -> None:
    """10000 ** (k / d) on constants: computed in the exact systems, not torch's float64."""
    torch.manual_seed(2)
    x, y = torch.randn(5, 4), torch.randn(5, 4)

    def f(p: dict, xs: np.ndarray, t: np.ndarray) -> object:
        h = R.linear(xs, p["lin.weight"], p["lin.bias"])
        inv = [1 / R.CTX.power(10000, R.CTX.mpf(k) / 4) for k in (0, 2)]
        out = np.empty(h.shape, dtype=object)
        for i in range(h.shape[0]):
            for j in range(2):
                out[i, j] = h[i, j] * R.CTX.cos(i * inv[j])
                out[i, 2 + j] = h[i, 2 + j] * R.CTX.sin(i * inv[j])
        return R.mse(out, t)

    oracle_check(Rope(), x, y, nn.MSELoss(), f)


def test_non_positive_base_is_refused() -> None:
    torch.manual_seed(3)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    net = fpgrad.from_module(Power(-2.0), x, y, nn.MSELoss())
    with pytest.raises(InputError, match="not positive"):
        exact_graph(net.graph)
