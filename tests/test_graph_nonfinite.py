"""The first inf/NaN of captured models' native columns: an intended -inf mask is no overflow."""

from __future__ import annotations

import torch
from torch import nn

import fpgrad
from fpgrad.graph.compare import compare_graph


class Attention(nn.Module):
    """nn.MultiheadAttention with a float causal mask given as data (-inf above the diagonal)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0].sum(-1)


class HandAttention(nn.Module):
    """Scores masked by ``masked_fill(causal, -inf)`` before softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        scores = self.q(x) @ self.k(x).transpose(1, 2)
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(scores, -1).sum(-1)


def _first(model: nn.Module, inputs: object, scale: float) -> str | None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8) * scale
    y = torch.randn(2, 4)
    args = (x, *inputs) if isinstance(inputs, tuple) else x
    net = fpgrad.from_module(model, args, y, nn.MSELoss())
    return compare_graph(net, "float32", allow_uncertified=True).first_nonfinite["float32"]


def test_causal_mask_is_not_an_overflow() -> None:
    torch.manual_seed(1)
    causal = torch.triu(torch.full((4, 4), float("-inf")), diagonal=1)
    assert _first(Attention(), (causal,), 1.0) is None
    torch.manual_seed(1)
    assert _first(HandAttention(), (), 1.0) is None


def test_overflowing_scores_are_reported() -> None:
    torch.manual_seed(1)
    causal = torch.triu(torch.full((4, 4), float("-inf")), diagonal=1)
    got = _first(Attention(), (causal,), 1e20)  # q.k ~ 1e40 > float32's 3.4e38
    assert got is not None and got.startswith("attn ")
    torch.manual_seed(1)
    got = _first(HandAttention(), (), 1e20)
    assert got is not None and "masked_fill" not in got, got
