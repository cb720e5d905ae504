"""Adversarial checks on today's ops (attack14): each test states a fact that the certified
reference, a native or an emulated column must respect, with an oracle written independently
of fpgrad (torch eager autograd, mpmath from torch's definitions)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.native import native_run
from tests.oracle.graph_reference import CTX
from tests.test_graph_oracle import _claims


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


class _GatherOne(nn.Module):
    """``w[0].gather(0, i)`` with a 0-d index i (valid in torch for a 1-d input: the index
    counts as one element); its backward is scatter_add with that 0-d index."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -3.0]],
                                           dtype=torch.float64))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.w * x
        return (t[0].gather(0, torch.tensor(1)) * t[1, 2]).reshape(1)


def test_gather_with_a_zero_dim_index_into_a_vector() -> None:
    """L = (t01 t12)^2 with t = w (x = 1): dL/dw01 = 2 t01 t12^2, dL/dw12 = 2 t01^2 t12, 0
    elsewhere (exact dyadic numbers; torch float64 gives them exactly). The exact reference
    must enclose them, claim the zeros, and the emulated column must run."""
    x = torch.ones(2, 3, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    model, loss = _GatherOne(), nn.MSELoss()
    net = fpgrad.from_module(model, x, y, loss)
    m = copy.deepcopy(model)
    loss(m(x), y).backward()
    want = np.zeros((2, 3))
    want[0, 1], want[1, 2] = 2 * -1.0 * 9.0, 2 * 1.0 * -3.0
    assert np.array_equal(m.w.grad.numpy(), want)  # torch agrees with the hand derivative
    ex = exact_graph(net.graph).result
    _claims(ex, "grads/w", np.array([[CTX.mpf(v) for v in row] for row in want], dtype=object),
            CTX.mpf(0))  # fmt: skip
    fpgrad.compare(net, "float32,bfloat16:emulated")


class _ReadsRunningMean(nn.Module):
    """``bn(x) + running_mean w``, the running mean read before the training-mode batch norm
    updates it in place (as eager runs the forward, top to bottom)."""

    def __init__(self, after: bool = False) -> None:
        super().__init__()
        self.after = after
        self.bn = nn.BatchNorm1d(2).double()
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        self.w = nn.Parameter(torch.tensor([0.5, 2.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.after:
            h = self.bn(x)
            return h + self.bn.running_mean * self.w
        r = self.bn.running_mean * self.w
        return self.bn(x) + r


@pytest.mark.parametrize("after", [False, True])
def test_a_running_mean_read_before_the_batch_norm_updates_it(after: bool) -> None:
    """L = mean over (i, c) of (b_ic + m_c w_c)^2, b the batch-normalized x (biased variance,
    eps 1e-5), m the running mean before the step (read before the norm) or after its update
    ``0.9 m + 0.1 mean(x_c)`` (read after); dL/dw_c = sum_i 2 (b_ic + m_c w_c) m_c / 6
    (mpmath, from the definitions). The exact reference must enclose them or refuse the
    model: before the update the graph held the updated buffer (8.04 for 9.125); after it,
    torch's float64 update, 1.05 + 4.4e-17 for the real 1.05 (a loss 9e-17 off, +-6e-43)."""
    from fpgrad.errors import InputError

    x = torch.tensor([[1.0, 2.0], [3.0, -4.0], [0.5, 0.25]], dtype=torch.float64)
    y = torch.zeros(3, 2, dtype=torch.float64)
    model, loss = _ReadsRunningMean(after), nn.MSELoss()
    m = copy.deepcopy(model)
    value = loss(m(x), y)
    value.backward()
    try:
        net = fpgrad.from_module(model, x, y, loss)
    except InputError as e:  # refusing the model is sound
        assert "running" in str(e)
        return
    ex = exact_graph(net.graph).result
    xs = [[CTX.mpf(float(v)) for v in row] for row in x.tolist()]
    ms, ws = [CTX.mpf(1), CTX.mpf(-2)], [CTX.mpf(0.5), CTX.mpf(2)]
    total, grads = CTX.mpf(0), []
    for c in range(2):
        col = [r[c] for r in xs]
        mean = sum(col) / 3
        var = sum((v - mean) ** 2 for v in col) / 3
        b = [(v - mean) / CTX.sqrt(var + CTX.mpf(1e-5)) for v in col]
        if after:
            ms[c] = CTX.mpf(0.9) * ms[c] + CTX.mpf(0.1) * mean
        total += sum((bi + ms[c] * ws[c]) ** 2 for bi in b)
        grads.append(sum(2 * (bi + ms[c] * ws[c]) * ms[c] for bi in b) / 6)
    assert abs(total / 6 - CTX.mpf(value.item())) < 1e-12  # torch agrees with the oracle
    _claims(ex, "loss", np.array(total / 6, dtype=object), CTX.mpf(0))
    _claims(ex, "grads/w", np.array(grads, dtype=object), CTX.mpf(0))


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2).double()
        self.spare = nn.Parameter(torch.ones(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def test_a_parameter_that_does_not_reach_the_loss_is_named() -> None:
    """torch trains such a model (the parameter's grad stays None); fpgrad refuses it, and the
    refusal must name the parameter and the reason, not blame the forward's control flow."""
    from fpgrad.errors import InputError

    x = torch.ones(2, 3, dtype=torch.float64)
    y = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(InputError, match="spare.*does not reach the loss"):
        fpgrad.from_module(_Unused(), x, y, nn.MSELoss())
