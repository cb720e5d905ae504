"""Adversarial checks on today's ops (attack14): each test states a fact that the certified
reference, a native or an emulated column must respect, with an oracle written independently
of fpgrad (torch eager autograd, mpmath from torch's definitions)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

import fpgrad
from fpgrad.graph.native import native_run


class _ScalarWeight(nn.Module):
    """``w x`` with a 0-d parameter w (nn.Parameter(torch.tensor(1.25)))."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.25, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.max_pool2d(self.w * x, 2)


def test_a_zero_dim_parameter_runs_natively_bit_for_bit() -> None:
    """A 0-d parameter is a valid model; the native float64 and float32 columns are torch's
    eager loss and gradient (same shape, bit for bit)."""
    x = torch.tensor([[[[0.5, -1.0, 2.0, 0.25], [1.5, 3.0, -2.0, 0.75],
                        [0.125, -0.5, 1.0, 2.5], [-3.0, 0.5, 0.25, 1.0]]]],
                     dtype=torch.float64)  # fmt: skip
    y = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    model, loss = _ScalarWeight(), nn.MSELoss()
    net = fpgrad.from_module(model, x, y, loss)
    for dt, name in ((torch.float64, "float64"), (torch.float32, "float32")):
        trace = native_run(net.graph, name)
        m = copy.deepcopy(model).to(dt)
        value = loss(m(x.to(dt)), y.to(dt))
        value.backward()
        assert np.asarray(trace.grads["w"]).shape == ()
        assert np.array_equal(np.asarray(trace.grads["w"]), m.w.grad.double().numpy())
        assert np.asarray(trace.loss) == value.item()
    fpgrad.compare(net, "float32,bfloat16:emulated")
