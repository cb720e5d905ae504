"""Adversarial review of -inf constants and zeros by linear forms (attack24).

Constants computed from a -inf constant kept torch's float64 numbers as exact: a finite
result (``exp(mask + 0.5)``) was never checked, and a -inf result passed when each finite
value was *somewhere* among the numbers read (``1 + 2**-60`` rounds to the 1 of a table,
``log(fl(e))`` to the 1 beside it). Each was certified 16-19 orders of magnitude outside its
enclosure (mpmath oracle at 80 digits, scripts in the review's report); now refused in one
line, while exact arithmetic on a mask (``(mask + 0.5) * 2``, refused before) now runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph


class Derived(nn.Module):
    """Scores times, or plus, a 3x3 table derived from a causal -inf mask."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin, self.how = nn.Linear(3, 3), how
        rows = [[1.0, 0, 0], [math.e, 1.0, 0], [1.0, math.e, 1.0]]
        self.register_buffer("tab", torch.tensor(rows, dtype=torch.float64))
        self.register_buffer("col", torch.tensor([[1.0, 0, 0]] * 3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.full((3, 3), float("-inf"), dtype=x.dtype).triu(1)
        if self.how == "exp":  # finite: exp(0.5) below the diagonal, exp(-inf) = 0 above
            return self.lin(x) @ (m + 0.5).exp()
        if self.how == "exp_":  # the same in place
            m.add_(0.5)
            m.exp_()
            return self.lin(x) @ m
        if self.how == "tiny":  # 1 + 2**-60 rounds to the table's 1
            d = (m + 2.0**-60) + self.col
            return (self.lin(x)[:, None, :] + d).softmax(-1).sum(1)
        if self.how == "log":  # log(fl(e)) rounds to 1.0, one of the table's entries
            return (self.lin(x)[:, None, :] + self.tab.log()).softmax(-1).sum(1)
        d = (m + 0.5) * 2.0 + self.tab.tril()  # exact: 1 + the table's exact entries
        return (self.lin(x)[:, None, :] + d).softmax(-1).sum(1)


@pytest.mark.parametrize("how", ["exp", "exp_", "tiny", "log"])
def test_a_rounded_constant_from_a_minus_inf_mask_is_refused(how: str) -> None:
    torch.manual_seed(0)
    net = fpgrad.from_module(Derived(how), torch.randn(2, 3), torch.randn(2, 3), nn.MSELoss())
    with pytest.raises(InputError, match="-inf") as err:
        exact_graph(net.graph)
    assert "\n" not in str(err.value) and "masked_fill" in str(err.value)


def test_exact_arithmetic_on_a_mask_runs() -> None:
    """``(mask + 0.5) * 2``: 1.0 is none of the numbers read, so it was refused before."""
    from tests.oracle.native_exact import check

    torch.manual_seed(0)
    check(Derived("exact"), torch.randn(2, 3), torch.randn(2, 3), nn.MSELoss())
