"""Held-out probe, part 7: the architectures people train, at realistic CPU-feasible sizes
(0.1M to a few M parameters, batch 4-16), written by hand (no torchvision): a ResNet-18-style
CNN, a MobileNetV2 block stack, a small U-Net, GPT-2-style decoders (fused
``scaled_dot_product_attention`` and a hand-written softmax), a BERT-style encoder with padding
mask and [CLS] pooling, a ViT-tiny, an LSTM language model with tied weights, a DLRM-style
recommender and a ConvNeXt stage.

Each model runs in a child process of its own (its peak RSS is its own), one thread:

1. one torch float64 forward+backward of the same model (fastest of 3), then
   ``fpgrad.compare(net, "float16,bfloat16,float32")`` timed with the child's peak RSS, its
   ``render()`` (default 60 rows) measured (lines, characters: bounded?), and the ratio;
   ``--cli NAME,...``: also ``python -m fpgrad compare THIS.py:build_NAME --out DIR`` under
   ``/usr/bin/time -v`` (wall, peak RSS, the files written: JSON, npz);
2. native float32/float64 loss and gradients against eager torch autograd, bit for bit;
3. the comparison's certified exact reference against torch float64 (every value inside its
   ball plus 1e-9 of the largest magnitude, float64's own error), certified digits, the
   undetermined count and each claimed structural zero with torch float64's value there
   (relative to the tensor's largest).

    PYTHONPATH=. python scripts/heldout_models_g.py [NAME ...] [--scale S] [--cli N1,N2]
        [--timeout SEC] [--json OUT]

``build_NAME()`` is each model's ``script.py:build`` for the CLI.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from heldout_checks import eager, native_checks
from torch import nn

Case = tuple[nn.Module, Any, torch.Tensor, Any]
MODELS: dict[str, Callable[[], Case]] = {}
SCALE = float(os.environ.get("HELDOUT_G_SCALE", "1"))


def _w(n: int) -> int:
    """A width scaled by ``HELDOUT_G_SCALE`` (at least 4, a multiple of 4)."""
    return max(4, int(round(n * SCALE / 4)) * 4)


def model(fn: Callable[[], Case]) -> Callable[[], Case]:
    MODELS[fn.__name__] = fn

    def build() -> Case:
        torch.manual_seed(0)
        return fn()

    globals()[f"build_{fn.__name__}"] = build
    return fn


# ---------------------------------------------------------------- vision: ResNet-18


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.short(x))


class ResNet18(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(3, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]),
                                  nn.ReLU(inplace=True))  # fmt: skip
        layers, cin = [], w[0]
        for i, c in enumerate(w):
            for j in range(2):
                layers.append(BasicBlock(cin, c, 2 if (j == 0 and i > 0) else 1))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


@model
def resnet18_cifar() -> Case:
    m = ResNet18(width=_w(16))  # train mode: batch statistics, as people train it
    return m, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- vision: MobileNetV2


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hid = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [
                nn.Conv2d(cin, hid, 1, bias=False),
                nn.BatchNorm2d(hid),
                nn.ReLU6(inplace=True),
            ]
        layers += [
            nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid),
            nn.ReLU6(inplace=True), nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]  # fmt: skip
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    # (expand, channels, repeats, stride)
    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1)]

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        c0 = _w(32)
        feats: list[nn.Module] = [nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0),
                                  nn.ReLU6(inplace=True)]  # fmt: skip
        cin = c0
        for t, c, n, s in self.CFG:
            for i in range(n):
                feats.append(InvertedResidual(cin, _w(c), s if i == 0 else 1, t))
                cin = _w(c)
        last = _w(320)
        feats += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(last, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean((2, 3))
        return self.classifier(h)


@model
def mobilenetv2_cifar() -> Case:
    m = MobileNetV2()
    return m, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- vision: U-Net


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class UNet(nn.Module):
    def __init__(self, cin: int = 3, classes: int = 4, base: int = 16) -> None:
        super().__init__()
        c = [base, 2 * base, 4 * base, 8 * base]
        self.inc = _double_conv(cin, c[0])
        self.downs = nn.ModuleList(_double_conv(c[i], c[i + 1]) for i in range(3))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2) for i in range(3))
        self.upconvs = nn.ModuleList(_double_conv(2 * c[i], c[i]) for i in range(3))
        self.outc = nn.Conv2d(c[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for d in self.downs:
            skips.append(d(F.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for i in reversed(range(3)):
            h = self.upconvs[i](torch.cat([skips.pop(), self.ups[i](h)], dim=1))
        return self.outc(h)


@model
def unet_small() -> Case:
    m = UNet(base=_w(8))
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 4, (4, 32, 32))  # per-pixel classes: nll_loss2d
    return m, x, y, nn.CrossEntropyLoss()


# ---------------------------------------------------------------- language: GPT-2


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, fused: bool, seq: int) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(seq, seq)).view(1, 1, seq, seq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # nanoGPT's manual path
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int, fused: bool, seq: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, fused, seq)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * d, d), nn.Dropout(0.0))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 512, seq: int = 32, d: int = 128, heads: int = 4,
                 layers: int = 2, fused: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.drop = nn.Dropout(0.0)
        self.h = nn.ModuleList(GPTBlock(d, heads, fused, seq) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, 0.0, 0.02)
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                nn.init.zeros_(mod.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, dtype=torch.long)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x)).flatten(0, 1)


def _gpt(fused: bool) -> Case:
    m = GPT(d=_w(128), fused=fused)
    idx = torch.randint(0, 512, (4, 32))
    y = torch.cat([idx[:, 1:], torch.randint(0, 512, (4, 1))], 1).flatten()
    return m, idx, y, nn.CrossEntropyLoss()


@model
def gpt2_sdpa() -> Case:
    return _gpt(True)


@model
def gpt2_manual_softmax() -> Case:
    return _gpt(False)


# ---------------------------------------------------------------- language: BERT


class BertLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, ext_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, hd).permute(0, 2, 1, 3)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd) + ext_mask
        probs = nn.functional.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(b, t, d)
        x = self.ln1(x + self.o(ctx))  # post-LN
        return self.ln2(x + self.ffn(x))


class Bert(nn.Module):
    def __init__(self, vocab: int = 500, seq: int = 32, d: int = 128, heads: int = 4,
                 layers: int = 2, classes: int = 3) -> None:  # fmt: skip
        super().__init__()
        self.word = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(seq, d)
        self.typ = nn.Embedding(2, d)
        self.ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(d, heads) for _ in range(layers))
        self.pool = nn.Linear(d, d)
        self.cls = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        pos = torch.arange(t).unsqueeze(0)
        x = self.ln(self.word(ids) + self.pos(pos) + self.typ(torch.zeros_like(ids)))
        ext = (1.0 - attn[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, ext)
        pooled = torch.tanh(self.pool(x[:, 0]))  # [CLS]
        return self.cls(pooled)


@model
def bert_cls_padding() -> Case:
    m = Bert(d=_w(128))
    lens = torch.tensor([32, 20, 9, 27, 32, 14, 5, 30])
    ids = torch.randint(1, 500, (8, 32))
    attn = (torch.arange(32)[None, :] < lens[:, None]).long()
    ids = ids * attn  # pad id 0
    ids[:, 0] = 101 % 500  # [CLS]
    return m, (ids, attn), torch.randint(0, 3, (8,)), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- vision: ViT-tiny


class ViTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, img: int = 32, patch: int = 4, d: int = 96, depth: int = 4,
                 heads: int = 3, classes: int = 10) -> None:  # fmt: skip
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n + 1, d))
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*(ViTBlock(d, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@model
def vit_tiny() -> Case:
    m = ViT(d=_w(96), depth=4)
    return m, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- language: LSTM LM


class LSTMLM(nn.Module):
    def __init__(self, vocab: int = 500, d: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, layers, dropout=0.0, batch_first=False)
        self.decoder = nn.Linear(d, vocab)
        self.decoder.weight = self.encoder.weight  # tied
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.encoder(src))
        return self.decoder(out).view(-1, self.decoder.out_features)


@model
def lstm_lm_tied() -> Case:
    m = LSTMLM(d=_w(128))
    data = torch.randint(0, 500, (21, 8))  # (seq + 1, batch), as the word_language_model example
    return m, data[:-1], data[1:].reshape(-1), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- recommender: DLRM


class DLRM(nn.Module):
    def __init__(self, dense: int = 13, tables: tuple[int, ...] = (1000, 500, 2000, 300, 800, 50),
                 d: int = 16) -> None:  # fmt: skip
        super().__init__()
        self.bot = nn.Sequential(nn.Linear(dense, 64), nn.ReLU(), nn.Linear(64, d), nn.ReLU())
        self.embs = nn.ModuleList(nn.EmbeddingBag(n, d, mode="sum") for n in tables)
        f = len(tables) + 1
        self.top = nn.Sequential(nn.Linear(d + f * (f - 1) // 2, 64), nn.ReLU(),
                                 nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))  # fmt: skip
        self.wide = nn.EmbeddingBag(tables[0], 1, mode="sum")  # wide part: a linear model
        li, lj = torch.tril_indices(f, f, offset=-1)
        self.register_buffer("li", li)
        self.register_buffer("lj", lj)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        z = self.bot(x)
        feats = [z] + [e(idx[i], offsets[i]) for i, e in enumerate(self.embs)]
        t = torch.stack(feats, dim=1)  # (B, F, d)
        inter = torch.bmm(t, t.transpose(1, 2))[:, self.li, self.lj]
        out = self.top(torch.cat([z, inter], dim=1))
        return (out + self.wide(idx[0], offsets[0])).squeeze(1)


@model
def dlrm_wide_deep() -> Case:
    m = DLRM()
    b = 16
    lens = torch.randint(1, 4, (6, b))
    offsets = torch.cat([torch.zeros(6, 1, dtype=torch.long), lens.cumsum(1)[:, :-1]], 1)
    total = int(lens.sum(1).max())
    idx = torch.stack([torch.randint(0, n, (total,)) for n in (1000, 500, 2000, 300, 800, 50)])
    # every table reads the same number of indices (total): pad the bags' tails into the last bag
    y = torch.randint(0, 2, (b,)).double().float()
    return m, (torch.randn(b, 13), idx, offsets), y, nn.BCEWithLogitsLoss()


# ---------------------------------------------------------------- vision: ConvNeXt stage


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.pwconv1 = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(1e-6 * torch.ones(d) * 1e5)  # layer scale (0.1 so it trains)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    def __init__(self, dims: tuple[int, ...] = (32, 64), depths: tuple[int, ...] = (2, 2),
                 classes: int = 10) -> None:  # fmt: skip
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        stages: list[nn.Module] = []
        for i, (d, n) in enumerate(zip(dims, depths, strict=True)):
            if i > 0:
                stages += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, 2)]
            stages += [ConvNeXtBlock(d) for _ in range(n)]
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stages(self.stem(x)).mean((-2, -1))))


@model
def convnext_stage() -> Case:
    m = ConvNeXtTiny(dims=(_w(32), _w(64)))
    return m, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- the checks


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(name: str) -> dict[str, Any]:
    import fpgrad
    from fpgrad.errors import InputError

    torch.set_num_threads(1)
    rec: dict[str, Any] = {"model": name}
    torch.manual_seed(0)
    m, inputs, targets, loss = MODELS[name]()
    # parameters as torch counts them (a tied weight once)
    rec["params"] = sum(p.numel() for p in m.parameters())
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        eager(m, inputs, targets, loss, torch.float64)
        ts.append(time.perf_counter() - t0)
    rec["torch_f64_s"] = min(ts)
    rec["rss_before_mib"] = _rss_mib()
    t0 = time.perf_counter()
    try:
        net = fpgrad.from_module(m, inputs, targets, loss)
    except Exception as e:  # noqa: BLE001
        rec["capture"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if type(e).__name__ != "InputError":
            rec["trace"] = traceback.format_exc()
        return rec
    rec["capture_s"] = time.perf_counter() - t0
    rec["capture"] = "ok"
    rec["graph_nodes"] = len(list(net.graph.nodes)) if hasattr(net.graph, "nodes") else None
    t0 = time.perf_counter()
    try:
        try:
            res = fpgrad.compare(net, "float16,bfloat16,float32")
        except InputError as e:  # as a user would: read the message, then retry
            if "--allow-uncertified" not in str(e):
                raise
            rec["compare_refused"] = str(e).splitlines()[0]
            rec["refused_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = fpgrad.compare(net, "float16,bfloat16,float32", allow_uncertified=True)
        rec["compare_s"] = time.perf_counter() - t0
        rec["ratio"] = rec["compare_s"] / rec["torch_f64_s"]
        rec["rss_compare_mib"] = _rss_mib()
        t0 = time.perf_counter()
        text = res.render()
        rec["render_s"] = time.perf_counter() - t0
        rec["render_lines"], rec["render_chars"] = len(text.splitlines()), len(text)
        rec["counts"] = {p: res.counts(p) for p in ("float16", "bfloat16", "float32")}
    except Exception as e:  # noqa: BLE001
        rec["compare"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rec["trace"] = traceback.format_exc()
        return rec
    # (2) native bit for bit
    native = native_checks(net, m, inputs, targets, loss,
                           [("float32", torch.float32), ("float64", torch.float64)], rec)  # fmt: skip
    rec["native"] = native
    # (3) exact against torch float64
    from fpgrad.graph.exact import exact_graph

    t0 = time.perf_counter()
    ex = exact_graph(net.graph, allow_uncertified=True).result
    rec["exact_s"] = time.perf_counter() - t0
    rec["escalations"] = list(getattr(ex, "escalations", []) or [])
    el, eg = eager(m, inputs, targets, loss, torch.float64)
    pairs = [("loss", el)] + [(f"grads/{k}", g) for k, g in eg.items()]
    scale = max(float(np.abs(r.detach().numpy()).max(initial=0.0)) for _, r in pairs)
    problems, zeros = [], {}
    for key, ref in pairs:
        mid, rad = ex.enclosure(key)
        r = ref.detach().numpy().astype(np.float64).reshape(-1)
        mid_f = np.asarray(mid, dtype=object).reshape(-1).astype(np.float64)
        rad_f = np.asarray(rad, dtype=np.float64).reshape(-1)
        off = np.abs(r - mid_f) > rad_f + 1e-9 * scale + 1e-300
        if off.any():
            i = int(np.argmax(off))
            problems.append(f"{key}[{i}] torch {r[i]:.17g} mid {mid_f[i]:.17g} rad {rad_f[i]:.3g}"
                            f" ({int(off.sum())} off)")  # fmt: skip
        z = np.asarray(ex.zero(key)).reshape(-1)
        if z.any():
            top = float(np.abs(r).max(initial=0.0))
            zeros[key] = [int(z.sum()), float(np.abs(r[z]).max()), top]
    rec["exact"] = "ok" if not problems else "OUTSIDE: " + "; ".join(problems[:4])
    rec["digits"] = float(ex.certified_digits)
    rec["undetermined"] = int(ex.undetermined_count)
    rec["zeros"] = zeros
    # a claimed zero is plausible where torch float64 gives 0 or ~1e-16 of the largest value
    rec["zeros_suspect"] = {k: v for k, v in zeros.items() if v[1] > 1e-13 * max(v[2], 1e-300)}
    rec["rss_end_mib"] = _rss_mib()
    return rec


def cli(name: str, timeout: float) -> dict[str, Any]:
    out = tempfile.mkdtemp(prefix=f"heldout_g_{name}_")
    here = Path(__file__).resolve()
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "fpgrad", "compare",
           f"{here}:build_{name}", "--precisions", "float16,bfloat16,float32", "--out", out, "--allow-uncertified"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(here.parent.parent))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    rss = [ln for ln in p.stderr.splitlines() if "Maximum resident" in ln]
    files = sorted(os.listdir(out))
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in files}
    return {
        "rc": p.returncode, "wall_s": wall, "stdout_lines": len(p.stdout.splitlines()),
        "stdout_chars": len(p.stdout),
        "peak_rss_mib": int(rss[0].split(":")[1]) / 1024 if rss else None,
        "files": sizes, "dir": out,
        "stderr_tail": "\n".join(p.stderr.splitlines()[-25:]) if p.returncode else "",
    }  # fmt: skip


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:  # the options are read by hand: say them, run nothing
        print(__doc__)
        return 0
    if argv and argv[0] == "--child":
        rec = child(argv[1])
        print("RESULT " + json.dumps(rec), flush=True)
        return 0
    timeout = 900.0
    if "--timeout" in argv:
        timeout = float(argv[argv.index("--timeout") + 1])
    clis: list[str] = []
    if "--cli" in argv:
        clis = argv[argv.index("--cli") + 1].split(",")
    out = argv[argv.index("--json") + 1] if "--json" in argv else None
    if "--scale" in argv:
        os.environ["HELDOUT_G_SCALE"] = argv[argv.index("--scale") + 1]
    skip = {a for i, a in enumerate(argv) if i > 0 and argv[i - 1].startswith("--")}
    names = [a for a in argv if not a.startswith("--") and a not in skip] or list(MODELS)
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in names:
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True,
                               text=True, timeout=timeout, env=env)  # fmt: skip
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            rec = (
                json.loads(lines[-1][7:])
                if lines
                else {"model": name, "crash": f"rc {p.returncode}", "stderr": p.stderr[-3000:]}
            )
        except subprocess.TimeoutExpired:
            rec = {"model": name, "crash": f"timeout {timeout:.0f}s"}
        rec["child_wall_s"] = time.perf_counter() - t0
        if name in clis:
            try:
                rec["cli"] = cli(name, timeout)
            except subprocess.TimeoutExpired:
                rec["cli"] = {"crash": f"timeout {timeout:.0f}s"}
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    print()
    print("| model | params | torch f64 | compare | ratio | peak RSS | render | native f32/f64 | "
          "exact | digits | undetermined | zeros (suspect) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        nat = r.get("native", {})
        print(f"| {r['model']} | {r.get('params', '-')} | {r.get('torch_f64_s', 0):.3f} s | "
              f"{r.get('compare_s', float('nan')):.1f} s{' (refused first)' if 'compare_refused' in r else ''} | {r.get('ratio', float('nan')):.0f}x | "
              f"{r.get('rss_compare_mib', float('nan')):.0f} MiB | "
              f"{r.get('render_lines', '-')} lines | {nat.get('float32', '-')}/{nat.get('float64', '-')} | "
              f"{(r.get('crash') or r.get('compare') or r.get('exact') or r.get('capture', '-'))[:80]} | "
              f"{r.get('digits', float('nan')):.1f} | {r.get('undetermined', '-')} | "
              f"{sum(v[0] for v in r.get('zeros', {}).values())} ({len(r.get('zeros_suspect', {}))}) |")  # fmt: skip
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
