"""Ordering ops (``fpgrad/graph/ops/ordering.py``): topk, sort, kthvalue, median.

Native float32/float64 columns equal torch's eager autograd bit for bit (ties included: the
kernels' choice is replayed on ranks); the exact reference holds torch float64's gradients
where float64 orders the values as the reals do, and follows the real order where float64
cannot see it (a gap of 2^-60), which an oracle written by hand checks.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from tests.oracle.graph_reference import CTX
from tests.oracle.native_exact import check


class _MoE(nn.Module):
    """Top-2 gating of 6 experts (a mixture-of-experts router); ``zero``: a router whose
    weights and bias are 0, so every row's 6 probabilities tie exactly."""

    def __init__(self, zero: bool) -> None:
        super().__init__()
        self.router, self.experts = nn.Linear(4, 6), nn.Linear(4, 18)
        if zero:
            nn.init.zeros_(self.router.weight)
            nn.init.zeros_(self.router.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.router(x).softmax(-1)
        v, i = p.topk(2, dim=-1)
        e = self.experts(x).view(-1, 6, 3)
        sel = torch.gather(e, 1, i[:, :, None].expand(-1, -1, 3))
        return (v[:, :, None] * sel).sum(1)


class _Sorts(nn.Module):
    """sort, unsorted topk, kthvalue, median along a dim and of everything, on w * x with
    repeated values in w (exact ties)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0, 1.0, 3.0, 2.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.w * x
        s, _ = torch.sort(z, dim=-1, descending=True)
        t, _ = torch.topk(z, 3, dim=-1, sorted=False)
        k = z.kthvalue(2, dim=0, keepdim=True).values
        med = z.median(dim=1).values
        ramp = torch.arange(6.0)
        return s * ramp + (t * ramp[:3]).sum(-1, keepdim=True) + k + med[:, None] + z.median()


CASES = {
    "moe_zero_router": lambda: (_MoE(True), torch.randn(5, 4), torch.randn(5, 3)),
    "moe": lambda: (_MoE(False), torch.randn(5, 4), torch.randn(5, 3)),
    "ties": lambda: (_Sorts(), torch.tensor([[1.0] * 6, [0.5, 0.25, 0.5, 1.0, 0.25, 2.0]]),
                     torch.randn(2, 6)),  # fmt: skip
    "random": lambda: (_Sorts(), torch.randn(3, 6), torch.randn(3, 6)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_bit_for_bit_and_exact_holds_float64(case: str) -> None:
    torch.manual_seed(0)
    model, x, y = CASES[case]()
    ex = check(model, x, y, nn.MSELoss(), digits=30)
    m64 = copy.deepcopy(model).double()
    nn.MSELoss()(m64(x.double()), y.double()).backward()
    for n, p in m64.named_parameters():
        zero = np.asarray(ex.zero(f"grads/{n}")).reshape(p.shape)
        assert np.all(p.grad.numpy()[zero] == 0), n  # a proven zero is torch float64's zero here
    fpgrad.compare(fpgrad.from_module(model, x, y, nn.MSELoss()), "bfloat16:emulated,float16")


class _Gap(nn.Module):
    """topk(1) of [1 + b0, 1 + b1] with b = (0, 2^-60): float64 rounds both to 1 (a tie),
    the reals put the second on top."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor([0.0, 2.0**-60], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x + self.b
        return torch.topk(z, 1, dim=-1).values * z[:, :1]


def test_exact_order_below_float64_resolution() -> None:
    """The real maximum is z1 = 1 + 2^-60; the loss (v z0 - y)^2 with v = z1 has
    d/db1 = 2 (z1 z0 - y) z0 and d/db0 = 2 (z1 z0 - y) z1 (Fractions); torch float64 sees a
    tie and routes v's share to b0 instead."""
    x = torch.ones(1, 2, dtype=torch.float64)
    y = torch.tensor([[0.5]], dtype=torch.float64)
    net = fpgrad.from_module(_Gap(), x, y, nn.MSELoss())
    ex = exact_graph(net.graph).result
    z0, z1 = Fraction(1), 1 + Fraction(2) ** -60
    r = 2 * (z1 * z0 - Fraction(1, 2))
    want = [r * z1, r * z0]
    mid, rad = ex.enclosure("grads/b")
    for k in range(2):
        m = CTX.mpf(np.asarray(mid, dtype=object).reshape(-1)[k])
        got = Fraction(int(m.man)) * Fraction(2) ** int(m.exp) if m else Fraction(0)
        assert abs(got - want[k]) <= Fraction(float(np.asarray(rad).reshape(-1)[k])) + Fraction(2) ** -200
    assert not np.any(ex.undetermined("grads/b"))


class _Unprovable(nn.Module):
    """topk(1) of [sqrt(w)^2, w] with w = 2: a real tie the balls cannot prove."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([torch.sqrt(self.w) ** 2, self.w]) * x
        return torch.topk(z, 1).values


def test_an_unprovable_tie_is_not_certified() -> None:
    """Which element wins decides where the gradient goes; a tie that neither midpoint nor
    proof decides leaves the result undetermined (or refused), never certified."""
    x = torch.ones(2, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    net = fpgrad.from_module(_Unprovable(), x, y, nn.MSELoss())
    try:
        ex = exact_graph(net.graph).result
    except fpgrad.errors.InputError:
        return
    assert ex.undetermined_count > 0 or not np.all(np.isfinite(ex.digits["grads/w"]))
