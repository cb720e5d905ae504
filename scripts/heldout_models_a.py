"""Held-out probe models, part 1 (attention, transformers, convolutions): the registry
``MODELS`` (name -> () -> (model, inputs, targets, loss)) read by ``probe_heldout.py``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
