"""Held-out-style captured models (attack5): the certified exact reference against torch
float64 autograd at 1e-8 relative, and at least 17 certified digits where values are not tiny."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph


class CausalBlock(nn.Module):
    """Pre-RMSNorm single-head causal attention (masked_fill -inf) and a tanh MLP."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, 3))
        self.g = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.g
        q, k, v = self.qkv(h).chunk(3, -1)
        s = q @ k.transpose(-1, -2) / 2.0
        s = s.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
        h = x + self.out(torch.softmax(s, -1) @ v)
        return self.mlp(h).flatten(0, 1)


class NormCNN(nn.Module):
    """Conv2d with padding, BatchNorm2d (training), ReLU, MaxPool2d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1))


class ResRMS(nn.Module):
    """Two residual blocks x + W2 silu(W1 rmsnorm(x)), a hand-written RMSNorm."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 8), nn.SiLU(), nn.Linear(8, d))
                                    for _ in range(2))  # fmt: skip
        self.g = nn.Parameter(torch.full((d,), 0.75))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.g)
        return self.head(x)


def _case(name: str) -> tuple[nn.Module, Any, torch.Tensor]:
    torch.manual_seed(11)
    if name == "causal":
        return CausalBlock(), torch.randn(2, 3, 4), torch.randint(0, 3, (6,))
    if name == "cnn":
        return NormCNN(), torch.randn(2, 1, 4, 4), torch.tensor([0, 2])
    return ResRMS(), torch.randn(4, 5), torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("name", ["causal", "cnn", "resrms"])
def test_held_out_models_against_float64(name: str) -> None:
    model, x, t = _case(name)
    model = model.double()
    x = x.double()
    net = fpgrad.from_module(model, x, t, nn.CrossEntropyLoss())
    ex = exact_graph(net.graph, allow_uncertified=True).result
    assert ex.certified_digits >= 17
    m = copy.deepcopy(model)
    loss = nn.CrossEntropyLoss()(m(x), t)
    loss.backward()
    assert abs(float(ex.midpoints("loss")) - loss.item()) <= 1e-8 * abs(loss.item())
    scale = max(float(p.grad.abs().max()) for p in m.parameters())
    for pname, p in m.named_parameters():
        key = f"grads/{pname}"
        mid = np.array([float(v) for v in ex.midpoints(key).ravel()]).reshape(p.shape)
        g = p.grad.numpy()
        # exact zeros (a conv bias before batch norm) and undetermined values (a key bias,
        # zero by softmax's shift invariance, not proven for hand-written attention) are
        # rounding-size in float64
        np.testing.assert_allclose(mid, g, rtol=1e-8, atol=1e-14 * scale, err_msg=key)
        small = np.abs(g) <= 1e-14 * scale
        und = ex.undetermined(key).reshape(p.shape)
        assert not (und & ~small).any(), key
        big = ~small & ~ex.zero(key).reshape(p.shape)
        assert (np.asarray(ex.digits[key]).reshape(p.shape)[big] >= 17).all(), key
