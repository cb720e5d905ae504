"""Held-out probe models, part 4 (GAN discriminator with spectral norm, graph message passing,
diffusion block, coupling flow, mixture density head, WaveNet, Perceiver, Siamese, capsules,
DenseNet, squeeze-excitation, MobileNetV2, seq2seq with attention, circular padding, rotary and
ALiBi attention), registered in :data:`heldout_models_a.MODELS`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from heldout_models_a import Case, model
from torch import nn


class SNDisc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import spectral_norm

        self.c1 = spectral_norm(nn.Conv2d(1, 3, 3, stride=2, padding=1))
        self.c2 = spectral_norm(nn.Conv2d(3, 4, 3, stride=2, padding=1))
        self.fc = spectral_norm(nn.Linear(4 * 2 * 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.c1(x), 0.2)
        h = F.leaky_relu(self.c2(h), 0.2)
        return self.fc(h.flatten(1)).squeeze(-1)


@model
def gan_disc_sn_eval() -> Case:
    m = SNDisc()
    m(torch.randn(2, 1, 8, 8))  # one power iteration in training mode, then frozen
    return m.eval(), torch.randn(4, 1, 8, 8), torch.tensor([1.0, 0.0, 1.0, 0.0]), \
        nn.BCEWithLogitsLoss()  # fmt: skip


@model
def gan_disc_sn_train() -> Case:
    return SNDisc(), torch.randn(4, 1, 8, 8), torch.tensor([1.0, 0.0, 1.0, 0.0]), \
        nn.BCEWithLogitsLoss()  # fmt: skip


class GCN(nn.Module):
    """Message passing over an edge list: symmetric degree normalisation, ``index_add_``."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, n: int) -> None:
        super().__init__()
        self.register_buffer("src", src)
        self.register_buffer("dst", dst)
        self.n = n
        self.lin1, self.lin2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def prop(self, h: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(self.src.shape[0], dtype=h.dtype)
        deg = torch.zeros(self.n, dtype=h.dtype).index_add_(0, self.dst, ones) + 1
        norm = (deg[self.src] * deg[self.dst]).rsqrt().unsqueeze(-1)
        out = h / deg.unsqueeze(-1)  # self loops
        return out.index_add_(0, self.dst, h[self.src] * norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.prop(self.lin1(x)))
        return self.lin2(self.prop(h))


def _edges() -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.tensor([0, 1, 1, 2, 2, 3, 3, 4, 0, 4])
    d = torch.tensor([1, 0, 2, 1, 3, 2, 4, 3, 4, 0])
    return s, d


@model
def gcn_index_add() -> Case:
    s, d = _edges()
    return GCN(s, d, 5), torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]), nn.CrossEntropyLoss()


class GraphSAGEMean(nn.Module):
    """Mean aggregation with ``scatter_add`` and neighbour counts, then concat with self."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("src", src)
        self.register_buffer("dst", dst)
        self.lin = nn.Linear(6, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.dst.unsqueeze(-1).expand(-1, x.shape[1])
        agg = torch.zeros_like(x).scatter_add(0, idx, x[self.src])
        cnt = torch.zeros(x.shape[0], 1, dtype=x.dtype).scatter_add(
            0, self.dst.unsqueeze(-1), torch.ones(self.dst.shape[0], 1, dtype=x.dtype))
        h = torch.tanh(self.lin(torch.cat([x, agg / cnt.clamp(min=1)], dim=-1)))
        return self.out(h).squeeze(-1)


@model
def sage_scatter_mean() -> Case:
    s, d = _edges()
    return GraphSAGEMean(s, d), torch.randn(5, 3), torch.randn(5), nn.MSELoss()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiffusionBlock(nn.Module):
    def __init__(self, c: int = 4, tdim: int = 8) -> None:
        super().__init__()
        self.tmlp = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, c))
        self.n1, self.n2 = nn.GroupNorm(2, c), nn.GroupNorm(2, c)
        self.c1, self.c2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.na = nn.GroupNorm(2, c)
        self.qkv, self.proj = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
        self.tdim = tdim

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.tmlp(timestep_embedding(t, self.tdim))
        h = self.c1(F.silu(self.n1(x))) + temb[:, :, None, None]
        h = x + self.c2(F.silu(self.n2(h)))
        b, c, hh, ww = h.shape
        q, k, v = self.qkv(self.na(h)).reshape(b, 3, c, hh * ww).unbind(1)
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)
        o = (v @ a.transpose(1, 2)).reshape(b, c, hh, ww)
        return h + self.proj(o)


@model
def diffusion_unet_block() -> Case:
    x = torch.randn(2, 4, 4, 4)
    return DiffusionBlock(), (x, torch.tensor([3.0, 250.0])), torch.randn(2, 4, 4, 4), \
        nn.MSELoss()  # fmt: skip


class AffineCoupling(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d // 2, 8), nn.ReLU(), nn.Linear(8, d))
        self.scale = nn.Parameter(torch.ones(d // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa, xb = x.chunk(2, dim=1)
        s, t = self.net(xa).chunk(2, dim=1)
        log_s = self.scale * torch.tanh(s)
        yb = xb * torch.exp(log_s) + t
        y = torch.cat([xa, yb], dim=1)
        logp = -0.5 * (y**2).sum(1) - 0.5 * y.shape[1] * math.log(2 * math.pi)
        return logp + log_s.sum(1)


def nll_flow(logp: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return -logp.mean()


@model
def flow_affine_coupling() -> Case:
    return AffineCoupling(), torch.randn(6, 4), torch.zeros(6), nll_flow


class MDN(nn.Module):
    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 8), nn.Tanh())
        self.pi, self.mu, self.ls = nn.Linear(8, k), nn.Linear(8, k), nn.Linear(8, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return torch.stack([F.log_softmax(self.pi(h), -1), self.mu(h), self.ls(h)], dim=1)


def mdn_nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logpi, mu, ls = out.unbind(1)
    z = (y[:, None] - mu) * torch.exp(-ls)
    ll = -0.5 * z**2 - ls - 0.5 * math.log(2 * math.pi)
    return -torch.logsumexp(logpi + ll, dim=-1).mean()


@model
def mdn_logsumexp() -> Case:
    return MDN(), torch.randn(6, 2), torch.randn(6), mdn_nll


class WaveNet(nn.Module):
    def __init__(self, c: int = 4, layers: int = 3) -> None:
        super().__init__()
        self.inp = nn.Conv1d(1, c, 1)
        self.filt = nn.ModuleList(nn.Conv1d(c, c, 2, dilation=2**i) for i in range(layers))
        self.gate = nn.ModuleList(nn.Conv1d(c, c, 2, dilation=2**i) for i in range(layers))
        self.res = nn.ModuleList(nn.Conv1d(c, c, 1) for _ in range(layers))
        self.skip = nn.ModuleList(nn.Conv1d(c, c, 1) for _ in range(layers))
        self.out = nn.Conv1d(c, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        skips = torch.zeros_like(h)
        for i, (f, g, r, s) in enumerate(zip(self.filt, self.gate, self.res, self.skip, strict=True)):
            p = F.pad(h, (2**i, 0))
            z = torch.tanh(f(p)) * torch.sigmoid(g(p))
            skips = skips + s(z)
            h = h + r(z)
        return self.out(F.relu(skips) + h)  # h: the last residual conv reaches the loss


@model
def wavenet_gated() -> Case:
    return WaveNet(), torch.randn(2, 1, 8), torch.randint(0, 3, (2, 8)), nn.CrossEntropyLoss()


class Perceiver(nn.Module):
    def __init__(self, d: int = 8, n_lat: int = 3) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_lat, d) * 0.2)
        self.inp = nn.Linear(3, d)
        self.xattn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.ln = nn.LayerNorm(d)
        self.self_attn = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.inp(x)
        q = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        h = q + self.xattn(self.ln(q), kv, kv, need_weights=False)[0]
        return self.head(self.self_attn(h).mean(1))


@model
def perceiver_latents() -> Case:
    return Perceiver().eval(), torch.randn(2, 5, 3), torch.tensor([0, 1]), nn.CrossEntropyLoss()


class Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.pairwise_distance(self.enc(a), self.enc(b))


def contrastive(d: torch.Tensor, same: torch.Tensor, margin: float = 2.0) -> torch.Tensor:
    return (same * d.pow(2) + (1 - same) * F.relu(margin - d).pow(2)).mean()


@model
def siamese_contrastive() -> Case:
    data = (torch.randn(6, 4), torch.randn(6, 4))
    return Siamese(), data, torch.tensor([1.0, 0, 1, 0, 0, 1]), contrastive


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    n2 = (s**2).sum(dim, keepdim=True)
    return n2 / (1 + n2) * s / torch.sqrt(n2 + 1e-8)


class Capsules(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.prim = nn.Conv2d(1, 8, 3)
        self.W = nn.Parameter(torch.randn(4, 3, 4, 2) * 0.3)  # in caps, out caps, out dim, in dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = squash(self.prim(x).reshape(x.shape[0], 4, 2, -1).mean(-1))  # (B, 4, 2)
        uhat = torch.einsum("iojk,bik->bioj", self.W, u)  # (B, 4, 3, 4)
        v = squash(uhat.mean(1))  # one routing step: uniform couplings
        return v.norm(dim=-1)


def margin_loss(lengths: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    t = torch.zeros_like(lengths).scatter(1, y[:, None], 1.0)  # F.one_hot: refused (.item())
    loss = t * F.relu(0.9 - lengths) ** 2 + 0.5 * (1 - t) * F.relu(lengths - 0.1) ** 2
    return loss.sum(1).mean()


@model
def capsule_squash() -> Case:
    return Capsules(), torch.randn(2, 1, 4, 4), torch.tensor([0, 2]), margin_loss


class DenseBlock(nn.Module):
    def __init__(self, c: int = 2, growth: int = 2, n: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c + i * growth), nn.ReLU(),
                          nn.Conv2d(c + i * growth, growth, 3, padding=1, bias=False))
            for i in range(n))  # fmt: skip
        self.head = nn.Linear(c + n * growth, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return self.head(torch.cat(feats, 1).mean((2, 3)))


@model
def densenet_block() -> Case:
    return DenseBlock(), torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 1]), nn.CrossEntropyLoss()


class SEBlock(nn.Module):
    def __init__(self, c: int = 4, r: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, c, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(c, c // r), nn.Linear(c // r, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1).flatten(1)))))
        h = h * s[:, :, None, None]
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


@model
def squeeze_excite() -> Case:
    return SEBlock(), torch.randn(3, 2, 5, 5), torch.tensor([0, 2, 1]), nn.CrossEntropyLoss()


class InvertedResidual(nn.Module):
    def __init__(self, c: int = 3, t: int = 2) -> None:
        super().__init__()
        h = c * t
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(inplace=True),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
            nn.ReLU6(inplace=True), nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + self.block(x)).mean((2, 3)))


@model
def mobilenetv2_inverted() -> Case:
    m = InvertedResidual()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval(), torch.randn(2, 3, 4, 4) * 3, torch.tensor([0, 1]), nn.CrossEntropyLoss()


class Seq2Seq(nn.Module):
    def __init__(self, v: int = 5, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.enc = nn.LSTM(d, d, batch_first=True)
        self.dec = nn.LSTMCell(2 * d, d)
        self.attn = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(2 * d, v)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        enc, (h, c) = self.enc(self.emb(src))
        h, c = h[0], c[0]
        ctx = torch.zeros_like(h)
        logits = []
        for t in range(tgt_in.shape[1]):  # teacher forcing: the true previous token
            h, c = self.dec(torch.cat([self.emb(tgt_in[:, t]), ctx], -1), (h, c))
            scores = torch.bmm(enc, self.attn(h).unsqueeze(-1)).squeeze(-1)
            ctx = torch.bmm(scores.softmax(-1).unsqueeze(1), enc).squeeze(1)
            logits.append(self.out(torch.cat([h, ctx], -1)))
        return torch.stack(logits, 1).flatten(0, 1)


@model
def lstm_seq2seq_attn() -> Case:
    src, tgt = torch.randint(0, 5, (2, 4)), torch.randint(0, 5, (2, 4))
    return Seq2Seq(), (src, tgt[:, :-1]), tgt[:, 1:].reshape(-1), nn.CrossEntropyLoss()


@model
def circular_conv() -> Case:
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                      nn.Flatten(), nn.Linear(3 * 4 * 4, 2))  # fmt: skip
    return m, torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), nn.CrossEntropyLoss()


def rope(x: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary embedding: pairs (even, odd) rotated, recombined with stack/flatten."""
    t, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=x.dtype) / d))
    ang = torch.arange(t, dtype=x.dtype)[:, None] * inv[None]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class AttnBias(nn.Module):
    def __init__(self, kind: str, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.kind, self.h = kind, heads
        self.qkv, self.o, self.head = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2)
        if self.kind == "rope":
            s = rope(q) @ rope(k).transpose(-1, -2)
        s = s / math.sqrt(d // self.h)
        if self.kind == "alibi":
            slopes = torch.tensor([2.0**-1, 2.0**-2], dtype=x.dtype)
            pos = torch.arange(t, dtype=x.dtype)
            s = s - slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        s = s.masked_fill(causal, float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.head(x + self.o(o)).flatten(0, 1)


@model
def rope_attention() -> Case:
    return AttnBias("rope"), torch.randn(2, 3, 8), torch.randint(0, 3, (6,)), \
        nn.CrossEntropyLoss()  # fmt: skip


@model
def alibi_attention() -> Case:
    return AttnBias("alibi"), torch.randn(2, 3, 8), torch.randint(0, 3, (6,)), \
        nn.CrossEntropyLoss()  # fmt: skip
