"""nn activations with ``inplace=True`` (relu_, leaky_relu_, elu_, celu_, silu_, mish_ and
SELU's elu_): run as new values under capture's in-place rules; the native float32 column is
the eager model's own autograd bit for bit and the exact gradients equal torch float64's (the
constants here are exact in float32, so torch's 1/float32(alpha) is CELU's 1/alpha)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from tests.test_graph_capture import eager_grads

ACTS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky": lambda: nn.LeakyReLU(0.1, inplace=True),
    "elu": lambda: nn.ELU(0.5, inplace=True),
    "selu": lambda: nn.SELU(inplace=True),
    "celu": lambda: nn.CELU(0.5, inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "mish": lambda: nn.Mish(inplace=True),
}


@pytest.mark.parametrize("name", sorted(ACTS))
def test_inplace_activation_matches_eager_and_float64(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), ACTS[name](), nn.Linear(6, 3))
    x, y = torch.randn(7, 5), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    loss = nn.CrossEntropyLoss()
    cmp = fpgrad.compare(fpgrad.from_module(model, x, y, loss), "float32")
    native = eager_grads(model, x, y, loss, torch.float32)
    ref = copy.deepcopy(model).double()
    loss(ref(x.double()), y).backward()
    for pname, p in ref.named_parameters():
        np.testing.assert_array_equal(cmp.values("float32")[pname], native[pname], err_msg=pname)
        exact = cmp.column(pname).exact.hi
        np.testing.assert_allclose(exact, p.grad.numpy(), rtol=1e-12, atol=1e-15, err_msg=pname)
