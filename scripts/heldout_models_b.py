"""Held-out probe models, part 2 (norms, embeddings, heads, losses, recurrent and more),
registered in :data:`heldout_models_a.MODELS`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from heldout_models_a import Case, model
from torch import nn

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
