"""A pre-norm transformer block for ``fpgrad compare fpgrad/examples/transformer_block.py:build``.

Embedding, causal self-attention (nn.MultiheadAttention with a -inf causal mask and a key
padding mask), LayerNorm, a GELU MLP and residual adds, on 2 sequences of 5 tokens; the
token embeddings are large (std 30), so float16 attention scores grow large.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Embedding, pre-norm causal self-attention with a key padding mask (``pad``: True where
    padded; as a ``-inf`` float mask, or as the boolean itself with ``float_mask=False``), a
    GELU MLP ``mlp`` times wider, residual adds and a linear head; logits per token."""

    def __init__(
        self, vocab: int = 11, d: int = 8, heads: int = 2, mlp: int = 4, float_mask: bool = True
    ) -> None:
        super().__init__()
        self.float_mask = float_mask
        self.emb = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp * d), nn.GELU(), nn.Linear(mlp * d, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        n = tokens.shape[1]
        causal = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        a = self.ln1(h)
        mask = torch.zeros(pad.shape).masked_fill(pad, float("-inf")) if self.float_mask else pad
        h = h + self.attn(a, a, a, attn_mask=causal, key_padding_mask=mask, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h).flatten(0, 1)


def build() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor, nn.Module]:
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.emb.weight.mul_(30.0)
    tokens = torch.randint(0, 11, (2, 5))
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    targets = torch.randint(0, 11, (10,))
    return model, (tokens, pad), targets, nn.CrossEntropyLoss()
