"""Held-out probe: ~30 small torch models people write, through ``fpgrad.from_module``.

For each model: (1) capture (or a one-line refusal), (2) native float32 and float64 columns
against torch's own eager autograd bit for bit, (3) the certified exact reference against torch
float64 (every gradient inside its ball plus a 1e-9 relative allowance; zero claims listed;
certified digits >= 17), (4) ``fpgrad.compare(net, "float16,bfloat16,float32")`` with its
render, timed.

    PYTHONPATH=. python scripts/probe_heldout.py [NAME ...] [--no-compare] [--json OUT]
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Case = tuple[nn.Module, Any, torch.Tensor, Any]
MODELS: dict[str, Callable[[], Case]] = {}


def model(fn: Callable[[], Case]) -> Callable[[], Case]:
    MODELS[fn.__name__] = fn
    return fn


# ---------------------------------------------------------------- attention / transformers


class PreNormBlock(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, mask: str = "causal") -> None:
        super().__init__()
        self.heads, self.mask = heads, mask
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"),
                                nn.Linear(2 * d, d), nn.Dropout(0.0))  # fmt: skip
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        if self.mask == "causal":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a float (ALiBi-like) additive bias, finite
            pos = torch.arange(t, dtype=x.dtype)
            bias = -(pos[None, :] - pos[:, None]).abs() * 0.5
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        a = a.transpose(1, 2).contiguous().view(b, t, d)
        x = x + self.drop(self.o(a))
        x = x + self.ff(self.ln2(x))
        return self.head(x.mean(dim=1))


@model
def prenorm_causal() -> Case:
    m = PreNormBlock(mask="causal").eval()
    return m, torch.randn(2, 5, 8), torch.randint(0, 3, (2,)), nn.CrossEntropyLoss()


@model
def prenorm_floatmask() -> Case:
    m = PreNormBlock(mask="float").eval()
    return m, torch.randn(2, 5, 8), torch.randint(0, 3, (2,)), nn.CrossEntropyLoss()


class TEL(nn.Module):
    def __init__(self, norm_first: bool, act: str = "relu") -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=act,
                                              batch_first=True, norm_first=norm_first)  # fmt: skip
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x)[:, 0])


@model
def tel_postnorm() -> Case:
    return TEL(False).eval(), torch.randn(2, 4, 8), torch.randint(0, 2, (2,)), nn.CrossEntropyLoss()


@model
def tel_prenorm_gelu() -> Case:
    return (
        TEL(True, "gelu").eval(),
        torch.randn(2, 4, 8),
        torch.randint(0, 2, (2,)),
        nn.CrossEntropyLoss(),
    )


class MHAPad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        out, _ = self.mha(x, x, x, key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(out.dtype)
        return self.head((out * keep).sum(1) / keep.sum(1)).squeeze(-1)


@model
def mha_key_padding() -> Case:
    pad = torch.tensor([[False, False, False, True, True], [False, False, False, False, False]])
    return MHAPad().eval(), (torch.randn(2, 5, 8), pad), torch.randn(2), nn.MSELoss()


class TinyViT(nn.Module):
    def __init__(self, d: int = 8, p: int = 4, img: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, p, stride=p)
        n = (img // p) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, d) + 0.02 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, d))
        self.enc = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True,
                                              norm_first=True, activation="gelu")  # fmt: skip
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1) + self.pos
        return self.head(self.norm(self.enc(h))[:, 0])


@model
def tiny_vit() -> Case:
    return (
        TinyViT().eval(),
        torch.randn(2, 3, 8, 8),
        torch.randint(0, 3, (2,)),
        nn.CrossEntropyLoss(),
    )


# ---------------------------------------------------------------- convolutions


class BasicBlock(nn.Module):
    def __init__(self, cin: int = 3, cout: int = 4, stride: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + self.down(x))
        return self.fc(torch.flatten(self.pool(h), 1))


def _randomize_bn(m: nn.Module) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.2, 0.2)


@model
def resnet_block_train() -> Case:
    m = BasicBlock().train()
    _randomize_bn(m)
    return m, torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss()


@model
def resnet_block_eval() -> Case:
    m = BasicBlock()
    _randomize_bn(m)
    return m.eval(), torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss()


@model
def depthwise_separable() -> Case:
    m = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 6, 1),
                      nn.BatchNorm2d(6), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(6, 3))  # fmt: skip
    return m.train(), torch.randn(4, 4, 6, 6), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss()


@model
def dilated_conv() -> Case:
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=2, dilation=2), nn.ELU(),
                      nn.Conv2d(4, 2, 3, dilation=2), nn.Flatten(), nn.Linear(2 * 2 * 2, 1))  # fmt: skip
    return m, torch.randn(3, 2, 6, 6), torch.randn(3, 1), nn.MSELoss()


class TextCNN(nn.Module):
    def __init__(self, vocab: int = 12, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.conv = nn.Conv1d(d, 5, 3, padding=1)
        self.conv2 = nn.Conv1d(d, 5, 2, dilation=2)
        self.fc = nn.Linear(10, 2)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        e = self.emb(tok).transpose(1, 2)
        a = F.relu(self.conv(e)).max(dim=2).values
        b, _ = torch.max(torch.tanh(self.conv2(e)), dim=-1)
        return self.fc(torch.cat([a, b], dim=1))


@model
def text_cnn() -> Case:
    tok = torch.tensor([[3, 5, 7, 1, 0, 0], [2, 9, 11, 4, 6, 0], [8, 8, 1, 2, 0, 0]])
    return TextCNN(), tok, torch.tensor([0, 1, 1]), nn.CrossEntropyLoss()


class UNetBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.enc(x)
        h = self.up(self.mid(self.pool(s)))
        return self.dec(torch.cat([h, s], dim=1))


@model
def unet_block() -> Case:
    return UNetBlock(), torch.randn(2, 1, 6, 6), (torch.rand(2, 1, 6, 6) > 0.5).double().float(), \
        nn.BCEWithLogitsLoss()  # fmt: skip


@model
def conv1d_causal_pad() -> Case:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(2, 4, 3)
            self.c2 = nn.Conv1d(4, 2, 3)
            self.pool = nn.AvgPool1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.silu(self.c1(F.pad(x, (2, 0))))
            return self.pool(self.c2(F.pad(h, (2, 0))))

    return M(), torch.randn(2, 2, 8), torch.randn(2, 2, 4), nn.SmoothL1Loss()


@model
def maxpool1d_groupnorm() -> Case:
    m = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Mish(),
                      nn.MaxPool1d(2), nn.Flatten(), nn.Linear(4 * 4, 2))  # fmt: skip
    return m, torch.randn(3, 3, 8), torch.randint(0, 2, (3,)), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- norms, embeddings, heads


@model
def layernorm_noaffine() -> Case:
    m = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6, elementwise_affine=False), nn.Softplus(),
                      nn.Linear(6, 2))  # fmt: skip
    return m, torch.randn(4, 5), torch.randint(0, 2, (4,)), nn.CrossEntropyLoss()


class BilinearM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(4, 5, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.bil(a, b)


@model
def bilinear() -> Case:
    return (
        BilinearM(),
        (torch.randn(4, 4), torch.randn(4, 5)),
        torch.randint(0, 3, (4,)),
        nn.CrossEntropyLoss(),
    )


class Bags(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.bag_mean = nn.EmbeddingBag(10, 4, mode="mean")
        self.bag_sum = nn.EmbeddingBag(10, 4, mode="sum")
        self.fc = nn.Linear(12, 2)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.emb(tok).mean(1), self.bag_mean(tok), self.bag_sum(tok)], 1))


@model
def embedding_bag() -> Case:
    tok = torch.tensor([[1, 2, 3], [4, 4, 9], [0, 7, 2]])
    return Bags(), tok, torch.tensor([0, 1, 0]), nn.CrossEntropyLoss()


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(8, d)
        self.ln = nn.LayerNorm(d)
        self.dec = nn.Linear(d, vocab, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tok.shape[1])
        h = self.ln(self.emb(tok) + self.pos(pos)[None])
        return self.dec(h).reshape(-1, self.emb.num_embeddings)


@model
def tied_lm() -> Case:
    tok = torch.randint(0, 11, (2, 5))
    return TiedLM(), tok, torch.randint(0, 11, (10,)), nn.CrossEntropyLoss()


class SwiGLU(nn.Module):
    def __init__(self, d: int = 6, h: int = 8) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.up = nn.Linear(d, 2 * h, bias=False)
        self.down = nn.Linear(h, d, bias=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.head(x + self.down(F.silu(a) * b))


@model
def swiglu_rmsnorm() -> Case:
    return SwiGLU(), torch.randn(4, 6), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss()


class CosineHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4)
        self.protos = nn.Parameter(torch.randn(3, 4))
        self.scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.proj(x), dim=-1)
        p = F.normalize(self.protos, dim=-1, eps=1e-8)
        return self.scale * torch.einsum("bd,cd->bc", z, p)


@model
def normalize_einsum() -> Case:
    return CosineHead(), torch.randn(4, 5), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss()


class BmmM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(2, 3, 4))
        self.b = nn.Parameter(torch.randn(2, 3, 5))
        self.w = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(x, self.w(x).transpose(1, 2))  # (2, 3, 3)
        h = torch.baddbmm(self.b, h, torch.tanh(self.a) @ torch.ones(2, 4, 5, dtype=x.dtype),
                          beta=0.5, alpha=2.0)  # fmt: skip
        return torch.einsum("bij,bij->bi", h, h)


@model
def bmm_baddbmm() -> Case:
    return BmmM(), torch.randn(2, 3, 4), torch.randn(2, 3), nn.L1Loss()


class WhereMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.where(mask.unsqueeze(-1), self.fc(x), torch.zeros_like(x))
        h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
        return self.out(pooled).squeeze(-1)


@model
def where_mask() -> Case:
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    return WhereMask(), (torch.randn(3, 3, 4), mask), torch.randn(3), nn.MSELoss()


@model
def softmax_dim1_4d() -> Case:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.sm = nn.Softmax(dim=1)
            self.fc = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.sm(self.conv(x)).flatten(1))

    return M(), torch.randn(2, 2, 4, 4), torch.randint(0, 2, (2,)), nn.CrossEntropyLoss()


@model
def label_smoothing_ce() -> Case:
    m = nn.Sequential(nn.Linear(5, 8), nn.Hardswish(), nn.Linear(8, 4))
    return m, torch.randn(6, 5), torch.randint(0, 4, (6,)), nn.CrossEntropyLoss(label_smoothing=0.1)


@model
def nll_ignore_weights() -> Case:
    m = nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 4), nn.LogSoftmax(dim=-1))
    loss = nn.NLLLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.5]), ignore_index=-100)
    return m, torch.randn(6, 5), torch.tensor([0, 3, -100, 2, 1, -100]), loss


@model
def mse_regression() -> Case:
    m = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.ELU(), nn.Linear(8, 2))
    return m, torch.randn(8, 4), torch.randn(8, 2), nn.MSELoss()


@model
def flatten_unflatten_pool() -> Case:
    m = nn.Sequential(nn.Linear(12, 2 * 3 * 4), nn.Unflatten(1, (2, 3, 4)), nn.Conv2d(2, 4, 2),
                      nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(4, 3))  # fmt: skip
    return m, torch.randn(4, 12), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss()


@model
def activations_zoo() -> Case:
    m = nn.Sequential(nn.Linear(4, 6), nn.Hardswish(), nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 6),
                      nn.GELU(), nn.Linear(6, 6), nn.Mish(), nn.Linear(6, 6), nn.ELU(),
                      nn.Linear(6, 6), nn.Softplus(), nn.Linear(6, 6), nn.Hardsigmoid(),
                      nn.Linear(6, 6), nn.SELU(), nn.Linear(6, 6), nn.Tanhshrink(),
                      nn.Linear(6, 2))  # fmt: skip
    return m, torch.randn(5, 4), torch.randint(0, 2, (5,)), nn.CrossEntropyLoss()


class ManualNorm(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(4, d)
        self.g = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))
        self.out = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        mu = h.mean(dim=-1, keepdim=True)
        c = h - mu
        var = c.pow(2).mean(dim=-1, keepdim=True)
        h = c * torch.rsqrt(var.clamp(min=1e-6)) * self.g
        std = h.std(dim=0, keepdim=True)
        return self.out(h / (std + 1e-5) / math.sqrt(6))


@model
def manual_layernorm() -> Case:
    return ManualNorm(), torch.randn(5, 4), torch.randint(0, 2, (5,)), nn.CrossEntropyLoss()


class Chains(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 12)
        self.out = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.fc(x).view(b, 3, 4).permute(0, 2, 1).contiguous()  # (b, 4, 3)
        h = h.unsqueeze(1).expand(b, 2, 4, 3).reshape(b, 2 * 4 * 3)[:, ::2]  # (b, 12)
        h = h.reshape(b, 4, 3).transpose(-1, -2).flatten(1) * torch.sigmoid(h.sum(-1, keepdim=True))
        return self.out(h).squeeze(1)


@model
def view_chains() -> Case:
    return Chains(), torch.randn(3, 6), torch.randn(3), nn.HuberLoss(delta=0.5)


@model
def bn1d_mlp_train() -> Case:
    m = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.LeakyReLU(0.2), nn.Linear(6, 6),
                      nn.BatchNorm1d(6, affine=False), nn.PReLU(), nn.Linear(6, 2))  # fmt: skip
    return m.train(), torch.randn(8, 5), torch.randint(0, 2, (8,)), nn.CrossEntropyLoss()


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.gru = nn.GRU(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        out, h = self.gru(self.emb(tok))
        return self.fc(h[-1])


@model
def gru_classifier() -> Case:
    return (
        GRUClassifier(),
        torch.randint(0, 9, (3, 4)),
        torch.tensor([0, 1, 1]),
        nn.CrossEntropyLoss(),
    )


class PosEncAttn(nn.Module):
    """Sinusoidal positions built in forward, hand-written masked softmax attention, logits
    scaled by 1/temperature, BCE-with-logits multi-label head."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, 4)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        pos = torch.arange(t, dtype=x.dtype).unsqueeze(1)
        div = torch.exp(torch.arange(0, self.d, 2, dtype=x.dtype) * (-math.log(10000.0) / self.d))
        pe = torch.zeros(t, self.d, dtype=x.dtype)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        h = self.inp(x) + pe
        q, k, v = self.qkv(h).split(self.d, dim=-1)
        s = q @ k.transpose(-2, -1) / math.sqrt(self.d)
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        s = s.masked_fill(causal, float("-inf"))
        a = s.softmax(dim=-1) @ v
        return self.out(a.mean(1)) / 0.7


@model
def posenc_attention() -> Case:
    return (
        PosEncAttn(),
        torch.randn(2, 4, 3),
        (torch.rand(2, 4) > 0.5).float(),
        nn.BCEWithLogitsLoss(),
    )


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c2 = nn.Conv2d(2, 1, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(2, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.up(F.leaky_relu(self.inorm(self.c(x)), 0.1)))


@model
def upsample_instancenorm() -> Case:
    return Upsampler(), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 8, 8), nn.MSELoss()


class LogitsOps(nn.Module):
    """logsumexp, cumsum, clamp, abs and a KL-divergence head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)
        z = z + 0.01 * torch.cumsum(z.clamp(-3.0, 3.0).abs(), dim=-1)
        return F.log_softmax(z, dim=-1)


@model
def kl_div_head() -> Case:
    t = torch.softmax(torch.randn(4, 5), -1)
    return LogitsOps(), torch.randn(4, 4), t, nn.KLDivLoss(reduction="batchmean")


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
    return ConvNeXtBlock(), torch.randn(2, 4, 5, 5), torch.randint(0, 2, (2,)), nn.CrossEntropyLoss()


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


# ---------------------------------------------------------------- the checks


def _tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _cast(x: Any, dt: torch.dtype) -> Any:
    return x.to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def eager(
    m: nn.Module, inputs: Any, targets: torch.Tensor, loss: Any, dt: torch.dtype
) -> tuple[Any, dict]:
    mm = copy.deepcopy(m).to(dt)
    lf = copy.deepcopy(loss).to(dt) if isinstance(loss, nn.Module) else loss
    out = lf(mm(*[_cast(x, dt) for x in _tuple(inputs)]), _cast(targets, dt))
    out.backward()
    grads = {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in mm.named_parameters()
    }
    return out.detach(), grads


def _same(a: np.ndarray, b: torch.Tensor) -> bool:
    b = b.detach().double().numpy()
    a = np.asarray(a, dtype=np.float64).reshape(b.shape)
    return bool(
        np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(b))
    )


def probe(name: str, do_compare: bool) -> dict[str, Any]:
    import fpgrad
    from fpgrad.graph.exact import exact_graph
    from fpgrad.graph.native import native_run

    rec: dict[str, Any] = {"model": name}
    torch.manual_seed(0)
    m, inputs, targets, loss = MODELS[name]()
    t0 = time.perf_counter()
    try:
        net = fpgrad.from_module(m, inputs, targets, loss)
        rec["capture"] = "ok"
    except Exception as e:  # noqa: BLE001
        kind = type(e).__name__
        msg = str(e).splitlines()[0] if str(e) else kind
        rec["capture"] = f"refused: {msg}" if kind == "InputError" else f"CRASH {kind}: {msg}"
        if kind != "InputError":
            rec["trace"] = traceback.format_exc()
        rec["wall"] = time.perf_counter() - t0
        return rec
    # (2) native columns bit for bit
    native = {}
    for prec, dt in (("float32", torch.float32), ("float64", torch.float64)):
        try:
            tr = native_run(net.graph, prec)
            el, eg = eager(m, inputs, targets, loss, dt)
            bad = [k for k in eg if not _same(tr.grads[k], eg[k])]
            if not _same(tr.loss, el):
                bad.insert(0, "loss")
            native[prec] = "yes" if not bad else "NO: " + ",".join(bad[:4])
        except Exception as e:  # noqa: BLE001
            native[prec] = f"CRASH {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rec["trace"] = traceback.format_exc()
    rec["native"] = native
    # (3) exact
    try:
        ex = exact_graph(net.graph).result
        el, eg = eager(m, inputs, targets, loss, torch.float64)
        problems, zeros = [], {}
        pairs = [("loss", el)] + [(f"grads/{k}", g) for k, g in eg.items()]
        # float64's own error scales with the largest value it computes, not with a tensor
        # whose exact value is 0 (a structural zero: torch returns rounding noise there)
        scale = max(float(np.abs(r.detach().numpy()).max(initial=0.0)) for _, r in pairs)
        for key, ref in pairs:
            mid, rad = ex.enclosure(key)
            r = ref.detach().numpy().astype(np.float64).reshape(-1)
            mid_f = np.array([float(v) for v in np.asarray(mid, dtype=object).reshape(-1)])
            rad_f = np.asarray(rad, dtype=np.float64).reshape(-1)
            allow = 1e-9 * scale + 1e-300
            off = np.abs(r - mid_f) > rad_f + allow
            if off.any():
                i = int(np.argmax(off))
                problems.append(
                    f"{key}[{i}] torch {r[i]:.17g} mid {mid_f[i]:.17g} rad {rad_f[i]:.3g}"
                )
            z = np.asarray(ex.zero(key)).reshape(-1)
            if z.any():
                zeros[key] = (
                    int(z.sum()),
                    float(np.abs(r[z]).max()),
                    float(np.abs(r).max(initial=0.0)),
                )
        rec["exact"] = "ok" if not problems else "OUTSIDE: " + "; ".join(problems[:3])
        rec["digits"] = float(ex.certified_digits)
        rec["undetermined"] = int(ex.undetermined_count)
        rec["zeros"] = zeros
    except Exception as e:  # noqa: BLE001
        kind = type(e).__name__
        rec["exact"] = (
            f"{'refused' if kind == 'InputError' else 'CRASH ' + kind}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        rec["trace"] = traceback.format_exc()
    # (4) compare
    if do_compare:
        try:
            res = fpgrad.compare(net, "float16,bfloat16,float32")
            text = res.render(max_rows=4)
            rec["compare"] = f"ok ({len(text)} chars)"
        except Exception as e:  # noqa: BLE001
            kind = type(e).__name__
            rec["compare"] = (
                f"{'refused' if kind == 'InputError' else 'CRASH ' + kind}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            rec["trace"] = traceback.format_exc()
    rec["wall"] = time.perf_counter() - t0
    return rec


def main(argv: list[str]) -> int:
    do_compare = "--no-compare" not in argv
    out = None
    if "--json" in argv:
        out = argv[argv.index("--json") + 1]
        argv = [a for a in argv if a != out]
    names = [a for a in argv if not a.startswith("--")] or list(MODELS)
    torch.set_num_threads(1)
    rows = []
    for name in names:
        rec = probe(name, do_compare)
        rows.append(rec)
        flag = "  SLOW" if rec["wall"] > 60 else ""
        print(f"{name:24s} capture={rec['capture'][:110]}", flush=True)
        if "native" in rec:
            print(f"{'':24s} native={rec['native']} exact={rec.get('exact', '')[:200]} "
                  f"digits={rec.get('digits', float('nan')):.1f} und={rec.get('undetermined')} "
                  f"zeros={rec.get('zeros')} compare={rec.get('compare')} wall={rec['wall']:.1f}s{flag}",
                  flush=True)  # fmt: skip
        if "trace" in rec:
            print(rec["trace"], flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
