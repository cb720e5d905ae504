"""Constants holding -inf (masks) stay torch's numbers in the exact systems: sound only where
their finite values are exact. A -inf table whose finite values torch rounds (``arange / 3``)
was certified with torch's roundings (loss 1e-17 off, 42 digits claimed); now refused in one
line, and the rewrite it names runs against an mpmath oracle. An ``empty`` constant (torch's
uninitialised memory) is zeros, so what in-place writes leave is deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.arith.ball import BallArith
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.interpret import interpret
from tests.oracle import graph_reference as R
from tests.test_graph_oracle import check as oracle_check


class Table(nn.Module):
    """Scores plus a table [0, 1/3] with the last two keys masked, built three ways."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin, self.how = nn.Linear(3, 4), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.arange(4, dtype=x.dtype)
        if self.how == "where":
            m = torch.where(a < 2, a / 3, torch.full((4,), float("-inf"), dtype=x.dtype))
            return (self.lin(x) + m).softmax(-1)
        if self.how == "write":
            m = torch.full((4,), float("-inf"), dtype=x.dtype)
            m[:2] = a[:2] / 3
            return (self.lin(x) + m).softmax(-1)
        s = self.lin(x) + torch.where(a < 2, a / 3, torch.zeros_like(a))  # the rewrite
        return s.masked_fill(a >= 2, float("-inf")).softmax(-1)


def _oracle(p: dict, x: np.ndarray, t: np.ndarray) -> object:
    z = R.linear(x, p["lin.weight"], p["lin.bias"])
    table = [R.CTX.mpf(0), R.CTX.mpf(1) / 3]
    out = np.empty(z.shape, dtype=object)
    for i in range(z.shape[0]):
        e = [R.CTX.exp(z[i, j] + table[j]) for j in range(2)]
        for j in range(4):
            out[i, j] = e[j] / sum(e) if j < 2 else R.CTX.mpf(0)
    return R.mse(out, t)


@pytest.mark.parametrize("how", ["where", "write"])
def test_a_minus_inf_table_with_rounded_values_is_refused(how: str) -> None:
    torch.manual_seed(0)
    net = fpgrad.from_module(Table(how), torch.randn(2, 3), torch.rand(2, 4), nn.MSELoss())
    with pytest.raises(InputError, match="-inf") as err:
        exact_graph(net.graph)
    assert "\n" not in str(err.value) and "masked_fill" in str(err.value)


def test_the_named_rewrite_runs_against_the_oracle() -> None:
    torch.manual_seed(0)
    oracle_check(Table("apart"), torch.randn(2, 3), torch.rand(2, 4), nn.MSELoss(), _oracle)


class ExactMask(nn.Module):
    """A causal -inf mask of exact zeros (``triu`` of a filled table) added to the scores."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.full((3, 3), float("-inf"), dtype=x.dtype).triu(1)
        return (self.lin(x)[:, None, :] + mask).softmax(-1).sum(1)


def test_an_exact_minus_inf_mask_still_runs() -> None:
    torch.manual_seed(1)
    net = fpgrad.from_module(ExactMask(), torch.randn(2, 3), torch.rand(2, 3), nn.MSELoss())
    assert exact_graph(net.graph).result.certified_digits >= 17


def test_an_empty_constant_is_deterministic() -> None:
    """F.affine_grid's traced backward fills ``empty`` through slices: its garbage (NaN, inf,
    huge) made the fast balls count range errors at random, and sent the writes' exact values
    back to torch's float64 ones in Arb (a certificate 1.2e-17 off, seen in CI)."""
    from tests.test_ops_grid_sample import STN

    torch.manual_seed(1)
    x, y = torch.randn(2, 2, 3, 3), torch.tensor([1, 2])
    net = fpgrad.from_module(STN("bilinear", "zeros", False), x, y, nn.CrossEntropyLoss())
    for _ in range(3):
        ar = BallArith(150)
        interpret(net.graph, ar)
        assert ar.range_errors == 0


class Alibi(nn.Module):
    """Causal -inf mask plus an ALiBi table over T keys (T * T above the Arb probe's bound):
    built from exact numbers (slope 2**-3 times integer distances), or with 0.1 + 0.2 added
    (torch's sum is a rounding)."""

    def __init__(self, t: int, rounded: bool) -> None:
        super().__init__()
        self.lin, self.t, self.rounded = nn.Linear(2, 2), t, rounded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.t
        pos = torch.arange(t, dtype=x.dtype)
        table = (pos[None, :] - pos[:, None]) * 0.125
        mask = torch.full((t, t), float("-inf"), dtype=x.dtype).triu(1) + table
        if self.rounded:
            mask = (mask + torch.full((t, t), 0.1, dtype=x.dtype)) + torch.full(
                (t, t), 0.2, dtype=x.dtype
            )
        h = self.lin(x)  # (t, 2)
        return ((h @ h.T) * 0.01 + mask).softmax(-1).sum(0, keepdim=True)


@pytest.mark.parametrize("rounded", [False, True])
def test_a_large_computed_mask_is_checked_by_twosum(rounded: bool) -> None:
    from fpgrad.graph import interpret as itp

    t = 260
    assert t * t > itp.PROBE_MAX
    torch.manual_seed(0)
    net = fpgrad.from_module(Alibi(t, rounded), torch.randn(t, 2), torch.rand(1, t), nn.MSELoss())
    if rounded:
        with pytest.raises(InputError, match="-inf"):
            exact_graph(net.graph)
        return
    res = exact_graph(net.graph).result
    assert res.certified_digits >= 17


def test_sum_is_exact() -> None:
    from fpgrad.graph.exact_floats import sum_is_exact

    a = np.array([1.0, -np.inf, 2.0**-1074, 1e308, 3.0])
    b = np.array([2.0**-60, 5.0, 2.0**-1074, 1e308, -3.0])
    with np.errstate(over="ignore"):
        s = a + b
    assert not sum_is_exact(a, b, s)  # 1 + 2**-60 rounds
    assert sum_is_exact(a[1:3], b[1:3], s[1:3])  # -inf skipped, subnormals exact
    assert not sum_is_exact(a[3:], b[3:], s[3:])  # 1e308 + 1e308 overflows (attack27)
    assert sum_is_exact(
        np.array([[0.5], [0.25]]),
        np.array([1.0, -np.inf]),
        np.array([[1.5, -np.inf], [1.25, -np.inf]]),
    )


class Written(nn.Module):
    """``empty`` written in slices: -inf, then 0.25 (exact) into a view of the written table."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.empty(3, 4, dtype=x.dtype)
        e[:, 0] = float("-inf")
        e[:, 1:] = 0.25
        return (self.lin(x) + e[0]).softmax(-1)


def test_a_fill_of_a_written_table_is_refused_for_what_it_is() -> None:
    # the refusal names the reason (read from a constant computed earlier), not a rounding
    torch.manual_seed(0)
    net = fpgrad.from_module(Written(), torch.randn(2, 3), torch.rand(2, 4), nn.MSELoss())
    with pytest.raises(InputError, match="computed earlier") as err:
        exact_graph(net.graph)
    assert "\n" not in str(err.value) and "roundings" not in str(err.value)


class IntTable(nn.Module):
    """A causal -inf mask plus an int64 distance table (T * T above the Arb probe's bound)."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.lin, self.t = nn.Linear(2, 2), t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(self.t)
        mask = torch.full((self.t, self.t), float("-inf"), dtype=x.dtype).triu(1)
        h = self.lin(x)
        return ((h @ h.T) * 0.01 + (mask + (pos[None, :] - pos[:, None]))).softmax(-1).sum(0)


def test_an_integer_table_added_to_a_large_mask_is_exact() -> None:
    t = 260
    torch.manual_seed(0)
    net = fpgrad.from_module(IntTable(t), torch.randn(t, 2), torch.rand(t), nn.MSELoss())
    assert exact_graph(net.graph).result.certified_digits >= 17
