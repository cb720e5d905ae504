"""Adversarial checks on today's ops (attack13): each test states a fact the certified
reference or an emulated column must respect, with an oracle written independently of
fpgrad (mpmath, Fraction, torch float64 on exactly representable data)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from tests.oracle.graph_reference import CTX
from tests.test_graph_oracle import _claims


class _AmaxOfAView(nn.Module):
    """``t == amax(t.reshape(1, 2, 2), dim=(0, 2), keepdim=True)`` with t of shape (2, 2, 1):
    the comparison's shapes are those of amax's own backward (t against t's maxima over
    dims 0 and 2), but the maxima are taken over another grouping of t's elements (the rows
    of the reshaped view, not t's columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[[1.0], [3.0]], [[2.0], [0.5]]], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(self.w * x)
        m = t.reshape(1, 2, 2).amax(dim=(0, 2), keepdim=True)
        return torch.where(t == m, t, 0.0 * t).sum().reshape(1)


def test_eq_with_the_amax_of_a_reshaped_view_is_not_amax_backward() -> None:
    """Here t[i, j] == max(t[j, 0], t[j, 1]) holds nowhere (tanh is injective, and each
    t[i, j] differs from both values of row j unless i = j and t[j, j] is row j's larger
    one, which it is not): the loss is exactly 0 and so is every gradient (torch float64
    gives exactly 0 too). A structural tie rule that reads the maxima as t's own column
    maxima would certify a nonzero loss."""
    x = torch.ones(2, 2, 1, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    model, loss = _AmaxOfAView(), nn.MSELoss(reduction="sum")
    net = fpgrad.from_module(model, x, y, loss)
    ex = exact_graph(net.graph).result
    m = copy.deepcopy(model)
    value = loss(m(x), y)
    value.backward()
    assert value.item() == 0.0 and not m.w.grad.any()  # torch agrees with the hand analysis
    _claims(ex, "loss", np.array(CTX.mpf(0), dtype=object), CTX.mpf(0))
    _claims(ex, "grads/w", np.zeros((2, 2, 1), dtype=object) + CTX.mpf(0), CTX.mpf(0))
