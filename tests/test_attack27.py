"""attack27: a constant holding -inf whose finite table overflows to inf (``c + c`` of 1.5e308:
the real sum, 3e308, is finite) was kept as torch's inf by both the vectorised TwoSum and the
Arb probe (only finite elements were compared), and the exact reference certified ``x / c``
as 0 (loss 0.135427031839..., 77 digits; the real one is 0.135427032192...). Now an infinite
or NaN element computed from finite operands is refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.exact_floats import sum_is_exact


class Overflow(nn.Module):
    """A -inf mask whose finite element 1.5e308 is doubled (sum, difference or product)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin, self.how = nn.Linear(2, 2), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.arange(2, dtype=x.dtype)
        inf = torch.full((2,), float("-inf"), dtype=x.dtype)
        c = torch.where(a < 1, inf, torch.full((2,), 1.5e308, dtype=x.dtype))
        d = c + c if self.how == "add" else c - (-c) if self.how == "sub" else c * 2
        return self.lin(x) / d * 1e300


@pytest.mark.parametrize("how", ["add", "sub", "mul"])
def test_an_overflowing_minus_inf_table_is_refused(how: str) -> None:
    torch.manual_seed(0)
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    net = fpgrad.from_module(Overflow(how).double(), x, t, nn.MSELoss())
    with pytest.raises(InputError, match="-inf"):
        exact_graph(net.graph, allow_uncertified=True)


def test_sum_is_exact_overflow() -> None:
    a = np.array([1.5e308, -np.inf, np.inf, 1.0])
    s = a + a
    assert not sum_is_exact(a, a, s)  # 3e308 is no inf
    assert sum_is_exact(a[1:], a[1:], s[1:])  # -inf + -inf, inf + inf, 1 + 1
    f32 = np.array([3e38, 1.0], dtype=np.float32)
    assert not sum_is_exact(f32.astype(np.float64), f32.astype(np.float64), f32 + f32)


def _closure_loop(mode: str, watched: bool) -> tuple[list, nn.Module, Any]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt: Any = (torch.optim.LBFGS if mode == "lbfgs" else torch.optim.SGD)(m.parameters(), lr=0.1)
    x = torch.randn(3, 4)

    def run() -> None:
        for i in range(3):

            def closure(i: int = i) -> torch.Tensor:
                opt.zero_grad()
                loss = m(x).pow(2).sum()
                loss.backward()
                if i == 1:
                    raise ValueError("a NaN check")
                return loss

            if mode != "mixed" or i == 1:
                try:
                    opt.step(closure)
                except ValueError:
                    pass
            else:
                opt.zero_grad()
                m(x).pow(2).sum().backward()
                opt.step()

    if not watched:
        run()
        return [], m, opt
    with fpgrad.watch(m, opt) as w:
        run()
    recs = w.records()
    recs = recs.to_dict("records") if hasattr(recs, "to_dict") else recs
    return [(r["step"], r["ops"], r["skipped"]) for r in recs if r["kind"] == "step"], m, opt


@pytest.mark.parametrize("mode", ["closure", "mixed", "lbfgs"])
def test_a_step_whose_closure_raised_ends_not_stepped(mode: str) -> None:
    # the closure flag stayed set: the raised step merged with the next (2 step records for 3
    # steps, the raised one stepped), and the next step's forward and backward went unrecorded
    steps, m, opt = _closure_loop(mode, watched=True)
    ops = 0 if mode != "mixed" else steps[0][1]
    assert steps == [(0, ops, False), (1, 0, True), (2, ops, False)]
    assert mode != "mixed" or ops > 0
    _, m0, opt0 = _closure_loop(mode, watched=False)  # watching changes nothing
    for p, q in zip(m.parameters(), m0.parameters(), strict=True):
        assert torch.equal(p, q)
    assert str(opt.state_dict()) == str(opt0.state_dict())
