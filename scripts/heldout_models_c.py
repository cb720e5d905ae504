"""Held-out probe models, part 3 (decoder layer, weight norm, cdist, masks, padding modes,
BiLSTM, ConvNeXt, VAE, mixture of experts, focal loss), registered in
:data:`heldout_models_a.MODELS`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from heldout_models_a import Case, model
from torch import nn


class DecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=tgt.dtype)
        return self.head(self.dec(tgt, memory, tgt_mask=mask, tgt_is_causal=True)).flatten(0, 1)


@model
def transformer_decoder_layer() -> Case:
    data = (torch.randn(2, 3, 8), torch.randn(2, 4, 8))
    return DecoderLayer().eval(), data, torch.randint(0, 3, (6,)), nn.CrossEntropyLoss()


@model
def weight_norm_conv() -> Case:
    from torch.nn.utils.parametrizations import weight_norm

    m = nn.Sequential(weight_norm(nn.Conv1d(2, 4, 3, padding=1)), nn.GELU(), nn.Flatten(),
                      nn.Linear(4 * 6, 1))  # fmt: skip
    return m, torch.randn(3, 2, 6), torch.randn(3, 1), nn.MSELoss()


class Cdist(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.centers = nn.Parameter(torch.randn(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(self.proj(x), self.centers)


@model
def cdist_prototypes() -> Case:
    return Cdist(), torch.randn(4, 4), torch.randint(0, 5, (4,)), nn.CrossEntropyLoss()


class SdpaBoolMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.out(a.squeeze(1).mean(1)).squeeze(-1)


@model
def sdpa_bool_mask() -> Case:
    keep = torch.tensor([[True, True, False], [True, True, True]])
    return SdpaBoolMask(), (torch.randn(2, 3, 4), keep), torch.randn(2), nn.MSELoss()


@model
def reflect_same_conv() -> Case:
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding="same", padding_mode="reflect"), nn.SiLU(),
                      nn.Conv2d(3, 2, 3, padding="same", padding_mode="replicate"),
                      nn.Upsample(scale_factor=2, mode="bilinear"), nn.PixelUnshuffle(2),
                      nn.Flatten(), nn.Linear(8 * 4 * 4, 2))  # fmt: skip
    return m, torch.randn(2, 1, 4, 4), torch.randint(0, 2, (2,)), nn.CrossEntropyLoss()


class BiLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 3)
        self.lstm = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(tok))
        return self.fc(out.amax(1))


@model
def bilstm_maxpool() -> Case:
    return BiLSTM(), torch.randint(0, 8, (2, 4)), torch.tensor([0, 1]), nn.CrossEntropyLoss()


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(1e-1 * torch.ones(c))
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(h))))
        x = x + h.permute(0, 3, 1, 2)
        return self.head(x.mean([-2, -1]))


@model
def convnext_block() -> Case:
    return (
        ConvNeXtBlock(),
        torch.randn(2, 4, 5, 5),
        torch.randint(0, 2, (2,)),
        nn.CrossEntropyLoss(),
    )


class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 8)
        self.mu, self.logvar = nn.Linear(8, 2), nn.Linear(8, 2)
        self.dec = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 6))

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.enc(x))
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + eps * torch.exp(0.5 * logvar)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1, keepdim=True)
        return torch.cat([self.dec(z), kl], dim=1)


def vae_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    recon, kl = out[:, :-1], out[:, -1]
    return F.binary_cross_entropy_with_logits(recon, x, reduction="sum") / x.shape[0] + kl.mean()


@model
def vae_reparam() -> Case:
    x = torch.rand(4, 6)
    return VAE(), (x, torch.randn(4, 2)), (x > 0.5).float(), vae_loss


class MoE(nn.Module):
    def __init__(self, d: int = 4, experts: int = 3) -> None:
        super().__init__()
        self.gate = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, idx = torch.topk(self.gate(x).softmax(-1), 2, dim=-1)
        outs = torch.stack([e(x) for e in self.experts], dim=1)  # (B, E, d)
        picked = torch.gather(outs, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.head((w.unsqueeze(-1) * picked).sum(1))


@model
def moe_topk() -> Case:
    return MoE(), torch.randn(5, 4), torch.randint(0, 2, (5,)), nn.CrossEntropyLoss()


def focal_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, reduction="none")
    pt = torch.exp(-ce)
    return ((1 - pt) ** 2.0 * ce).mean()


@model
def focal_loss_mlp() -> Case:
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return m, torch.randn(6, 4), torch.randint(0, 3, (6,)), focal_loss
