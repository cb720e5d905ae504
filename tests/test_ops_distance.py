"""``torch.cdist``'s direct kernel (``fpgrad/graph/ops/distance.py``): native float32/float64
columns bit for bit with eager autograd, the exact reference holding torch float64's
gradients (a distance exactly 0 included: torch's 0 there), p other than 1 and 2 refused in
one line, and a dtype without a CPU kernel (float16 cdist) named in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph
from tests.oracle.native_exact import check


class _Prototypes(nn.Module):
    """Logits = minus the distances of an embedding to 5 learned prototypes."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.f, self.protos, self.p = nn.Linear(4, 3), nn.Parameter(torch.randn(5, 3)), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(self.f(x), self.protos, p=self.p)


class _Coincident(nn.Module):
    """Row 0 of a * x equals row 0 of b: a distance exactly 0 (p = 2: torch's 0 gradient
    there, p = 1: sign(0) = 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([[1.0, 2.0], [0.5, 0.5]]))
        self.b = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 0.5], [0.5, 1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(self.a * x, self.b, p=2) + torch.cdist(self.a * x, self.b, p=1)


def _case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    if name == "coincident":
        return _Coincident(), torch.ones(2, 2), torch.randn(2, 3), nn.MSELoss()
    p = 2.0 if name == "p2" else 1.0
    return _Prototypes(p), torch.randn(6, 4), torch.randint(0, 5, (6,)), nn.CrossEntropyLoss()


@pytest.mark.parametrize("name", ["p2", "p1", "coincident"])
def test_cdist_native_bit_for_bit_and_exact(name: str) -> None:
    model, x, y, loss = _case(name)
    check(model, x, y, loss, digits=30)
    fpgrad.compare(fpgrad.from_module(model, x, y, loss), "bfloat16:emulated,float16:emulated")


def test_cdist_other_orders_and_missing_kernels_are_one_line() -> None:
    model, x, y, loss = _case("p2")
    model.p = 3.0
    net = fpgrad.from_module(model, x, y, loss)
    with pytest.raises(InputError, match="p = 3.0 is not supported") as exc:
        exact_graph(net.graph)
    assert "\n" not in str(exc.value)
    model.p = 2.0
    net = fpgrad.from_module(model, x, y, loss)
    with pytest.raises(InputError, match="float16: torch has no CPU kernel") as exc:
        fpgrad.compare(net, "float16")
    assert "\n" not in str(exc.value) and "float16:emulated" in str(exc.value)
