"""Small torch models for the captured-graph tests (tiny: float16 matmul is slow on CPU)."""

from __future__ import annotations

import torch
from torch import nn

from fpgrad.examples.transformer_block import Block as AttentionBlock


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


def TransformerBlock(vocab: int = 7, d: int = 4, heads: int = 2) -> nn.Module:  # noqa: N802
    """The example's block (fpgrad/examples/transformer_block.py), MLP twice as wide, a
    boolean padding mask; small by default."""
    return AttentionBlock(vocab=vocab, d=d, heads=heads, mlp=2, float_mask=False)


def transformer_block(seed: int = 0):  # noqa: ANN201
    torch.manual_seed(seed)
    model = TransformerBlock()
    tokens = torch.randint(0, 7, (2, 3))
    pad = torch.tensor([[False, False, False], [False, False, True]])
    targets = torch.randint(0, 7, (6,))
    return model, (tokens, pad), targets


class SmallCNN(nn.Module):
    """Conv2d, BatchNorm2d, SiLU, max and average pooling, view, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.SiLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, groups=1)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act(self.bn(self.conv1(x))))
        h = self.avg(self.act(self.conv2(h)))
        return self.fc(h.view(h.size(0), -1))


def small_cnn(seed: int = 0, train: bool = True):  # noqa: ANN201
    torch.manual_seed(seed)
    model = SmallCNN().train(train)
    return model, torch.randn(3, 1, 6, 6), torch.tensor([0, 2, 1])
