"""Small torch models for the captured-graph tests (tiny: float16 matmul is slow on CPU)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm written by hand: pow, mean, rsqrt."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, d: int, act: nn.Module) -> None:
        super().__init__()
        self.norm = RMSNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), act, nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(self.norm(x))


class ResidualMLP(nn.Module):
    """Input projection, residual blocks with hand-written RMSNorm, a head."""

    def __init__(self, d_in: int = 4, d: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.Sequential(Block(d, nn.ReLU()), Block(d, nn.Tanh()),
                                    Block(d, nn.SiLU()), Block(d, nn.LeakyReLU(0.1)))  # fmt: skip
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.blocks(self.inp(x))))


def residual_mlp(seed: int = 0, n: int = 6) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = ResidualMLP()
    x = torch.randn(n, 4)
    y = torch.randint(0, 3, (n,))
    return model, x, y
