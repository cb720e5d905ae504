"""Held-out probe models, part 6 (Swin shifted windows, CBAM, FiLM, DeepSets, NeRF encoding,
highway, maxout, T5 relative buckets, checkpointing, ALBERT sharing, InfoNCE, Dice, CTC,
pinball, mixup, triplet, Gaussian/Poisson NLL, Conformer conv, ESPCN pixel shuffle, neural ODE,
Gumbel straight-through, VQ-VAE, spatial transformer, ArcFace, ShuffleNet, factorization
machine, DCN cross, BPR, adaptive softmax, GAT scatter softmax, packed LSTM, attention pooling,
DropPath with layer scale, distillation), registered in :data:`heldout_models_a.MODELS`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from heldout_models_a import Case, model
from torch import nn
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------- vision blocks


class SwinBlock(nn.Module):
    """Window attention (2x2 windows on a 4x4 map) with a cyclic shift (torch.roll) and a
    relative-position bias table gathered by a constant index."""

    def __init__(self, d: int = 4, ws: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.d, self.ws, self.heads = d, ws, heads
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.table = nn.Parameter(0.1 * torch.randn((2 * ws - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
        c = coords.flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("rel_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, H, W, C)
        b, h, w, c = x.shape
        ws = self.ws
        s = torch.roll(self.norm(x), shifts=(-1, -1), dims=(1, 2))
        win = (
            s.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        )
        qkv = self.qkv(win).reshape(win.shape[0], ws * ws, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        att = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        bias = self.table[self.rel_index.view(-1)].view(ws * ws, ws * ws, -1).permute(2, 0, 1)
        att = (att + bias.unsqueeze(0)).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(-1, ws * ws, c)
        o = self.proj(o).view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
        o = torch.roll(o.reshape(b, h, w, c), shifts=(1, 1), dims=(1, 2))
        return self.head((x + o).mean((1, 2)))


@model
def swin_shifted_window() -> Case:
    return SwinBlock(), torch.randn(2, 4, 4, 4), torch.tensor([0, 2]), nn.CrossEntropyLoss()


class CBAM(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3, padding=1)
        self.mlp = nn.Sequential(
            nn.Conv2d(c, 2, 1, bias=False), nn.ReLU(), nn.Conv2d(2, c, 1, bias=False)
        )
        self.spatial = nn.Conv2d(2, 1, 7, padding=3, bias=False)
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        ca = torch.sigmoid(
            self.mlp(F.adaptive_avg_pool2d(h, 1)) + self.mlp(F.adaptive_max_pool2d(h, 1))
        )
        h = h * ca
        sa = torch.cat([h.mean(1, keepdim=True), h.amax(1, keepdim=True)], 1)
        h = h * torch.sigmoid(self.spatial(sa))
        return self.head(h.mean((2, 3)))


@model
def cbam_block() -> Case:
    return CBAM(), torch.randn(2, 1, 5, 5), torch.tensor([1, 0]), nn.CrossEntropyLoss()


class PixelShuffleSR(nn.Module):
    """ESPCN: conv, tanh, conv to r^2 channels, PixelShuffle(2)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.ps = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ps(self.c2(torch.tanh(self.c1(x))))


@model
def espcn_pixel_shuffle() -> Case:
    return PixelShuffleSR(), torch.randn(2, 1, 3, 3), torch.randn(2, 1, 6, 6), nn.MSELoss()


class ShuffleUnit(nn.Module):
    """ShuffleNet: grouped 1x1 conv, channel shuffle (view/transpose), depthwise 3x3, grouped 1x1."""

    def __init__(self, c: int = 4, g: int = 2) -> None:
        super().__init__()
        self.g = g
        self.g1 = nn.Conv2d(c, c, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.g2 = nn.Conv2d(c, c, 1, groups=g, bias=False)
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.g1(x)))
        b, c, hh, ww = h.shape
        h = h.view(b, self.g, c // self.g, hh, ww).transpose(1, 2).contiguous().view(b, c, hh, ww)
        h = self.g2(self.bn2(self.dw(h)))
        return self.head(F.relu(x + h).mean((2, 3)))


@model
def shufflenet_unit() -> Case:
    return ShuffleUnit(), torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 1]), nn.CrossEntropyLoss()


class STN(nn.Module):
    """Spatial transformer: a localisation net predicts an affine theta; affine_grid + grid_sample."""

    def __init__(self) -> None:
        super().__init__()
        self.loc = nn.Linear(16, 6)
        with torch.no_grad():
            self.loc.weight.mul_(0.05)
            self.loc.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.loc(x.flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return self.head(F.grid_sample(x, grid, align_corners=False).flatten(1))


@model
def spatial_transformer() -> Case:
    return STN(), torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), nn.CrossEntropyLoss()


class DropPathBlock(nn.Module):
    """A residual MLP block with layer scale and DropPath (a fixed per-sample keep mask / keep
    probability, as timm's drop_path with its Bernoulli draw taken outside)."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gamma = nn.Parameter(1e-2 * torch.ones(d))
        self.register_buffer("keep", torch.tensor([1.0, 0.0, 1.0, 1.0]).view(-1, 1))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gamma * self.fc2(F.silu(self.fc1(x)))
        x = x + h.div(0.75) * self.keep
        return self.head(x)


@model
def droppath_layerscale() -> Case:
    return DropPathBlock(), torch.randn(4, 5), torch.tensor([0, 1, 2, 1]), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- conditioning / MLP variants


class FiLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.cond = nn.Linear(3, 8)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g, b = self.cond(z).chunk(2, dim=-1)
        h = F.relu(self.conv(x) * (1 + g.unsqueeze(-1)) + b.unsqueeze(-1))
        return self.head(h.mean(-1)).squeeze(-1)


@model
def film_conditioning() -> Case:
    return FiLM(), (torch.randn(3, 2, 5), torch.randn(3, 3)), torch.randn(3), nn.SmoothL1Loss()


class DeepSets(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(2, 6), nn.ELU(), nn.Linear(6, 6))
        self.rho = nn.Sequential(nn.Linear(6, 4), nn.ELU(), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = (self.phi(x) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return self.rho(h).squeeze(-1)


@model
def deepsets_masked() -> Case:
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    return DeepSets(), (torch.randn(3, 4, 2), mask), torch.randn(3), nn.MSELoss()


class NeRF(nn.Module):
    def __init__(self, bands: int = 3) -> None:
        super().__init__()
        self.register_buffer("freq", (2.0 ** torch.arange(bands)) * math.pi)
        d = 2 + 2 * 2 * bands
        self.l1, self.l2 = nn.Linear(d, 8), nn.Linear(8 + d, 8)
        self.sigma, self.rgb = nn.Linear(8, 1), nn.Linear(8, 3)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        a = p.unsqueeze(-1) * self.freq
        enc = torch.cat([p, torch.sin(a).flatten(1), torch.cos(a).flatten(1)], -1)
        h = F.relu(self.l1(enc))
        h = F.relu(self.l2(torch.cat([h, enc], -1)))
        return torch.cat([F.softplus(self.sigma(h)), torch.sigmoid(self.rgb(h))], -1)


@model
def nerf_posenc() -> Case:
    return NeRF(), torch.rand(4, 2), torch.rand(4, 4), nn.MSELoss()


class Highway(nn.Module):
    def __init__(self, d: int = 5, layers: int = 2) -> None:
        super().__init__()
        self.h = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.t = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        for t in self.t:
            nn.init.constant_(t.bias, -1.0)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for h, t in zip(self.h, self.t, strict=True):
            g = torch.sigmoid(t(x))
            x = g * F.relu(h(x)) + (1 - g) * x
        return self.head(x)


@model
def highway_net() -> Case:
    return Highway(), torch.randn(4, 5), torch.tensor([0, 1, 1, 0]), nn.CrossEntropyLoss()


class Maxout(nn.Module):
    def __init__(self, d_in: int = 4, d_out: int = 3, k: int = 3) -> None:
        super().__init__()
        self.k, self.d_out = k, d_out
        self.lin = nn.Linear(d_in, d_out * k)
        self.head = nn.Linear(d_out, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x).view(x.shape[0], self.d_out, self.k).max(-1).values
        return self.head(h)


@model
def maxout_mlp() -> Case:
    return Maxout(), torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1]), nn.CrossEntropyLoss()


class CheckpointMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Linear(4, 6), nn.GELU())
        self.b2 = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.b1, x, use_reentrant=False)
        h = checkpoint(self.b2, h, use_reentrant=False)
        return self.head(h)


@model
def grad_checkpoint() -> Case:
    return CheckpointMLP(), torch.randn(4, 4), torch.tensor([0, 2, 1, 0]), nn.CrossEntropyLoss()


class FM(nn.Module):
    """Factorization machine: linear + 0.5 * ((sum v x)^2 - sum (v x)^2) over embeddings."""

    def __init__(self, n: int = 10, k: int = 3) -> None:
        super().__init__()
        self.w = nn.Embedding(n, 1)
        self.v = nn.Embedding(n, k)
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        e = self.v(idx)
        inter = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        return self.b + self.w(idx).sum((1, 2)) + inter


@model
def factorization_machine() -> Case:
    idx = torch.tensor([[0, 3, 7], [1, 3, 9], [2, 5, 7], [0, 4, 8]])
    return FM(), idx, torch.tensor([1.0, 0, 1, 0]), nn.BCEWithLogitsLoss()


class DCN(nn.Module):
    """Deep & Cross network: x_{l+1} = x0 * (x_l . w_l) + b_l + x_l, beside a deep MLP."""

    def __init__(self, d: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(0.3 * torch.randn(d, 1)) for _ in range(layers))
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(d)) for _ in range(layers))
        self.deep = nn.Sequential(nn.Linear(d, 4), nn.ReLU())
        self.out = nn.Linear(d + 4, 1)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.w, self.b, strict=True):
            x = x0 * (x @ w) + b + x
        return self.out(torch.cat([x, self.deep(x0)], 1)).squeeze(1)


@model
def dcn_cross() -> Case:
    return DCN(), torch.randn(4, 4), torch.tensor([1.0, 0, 0, 1]), nn.BCEWithLogitsLoss()


class BPR(nn.Module):
    """Matrix factorisation trained with the BPR loss: -logsigmoid(s(u, i+) - s(u, i-))."""

    def __init__(self) -> None:
        super().__init__()
        self.u, self.i = nn.Embedding(4, 3), nn.Embedding(6, 3)

    def forward(self, trip: torch.Tensor) -> torch.Tensor:
        u, p, n = self.u(trip[:, 0]), self.i(trip[:, 1]), self.i(trip[:, 2])
        return (u * p).sum(-1) - (u * n).sum(-1)


def bpr_loss(diff: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(diff).mean()


@model
def bpr_matrix_factorization() -> Case:
    trip = torch.tensor([[0, 1, 2], [1, 3, 0], [2, 5, 4], [3, 0, 5], [0, 1, 3]])
    return BPR(), trip, torch.zeros(5), bpr_loss


class GumbelST(nn.Module):
    """Gumbel-softmax with fixed noise and the straight-through hard sample."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.dec = nn.Linear(3, 4)
        self.register_buffer("g", -torch.log(-torch.log(torch.rand(5, 3).clamp(1e-6, 1 - 1e-6))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ((self.enc(x) + self.g) / 0.5).softmax(-1)
        hard = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
        return self.dec(hard - y.detach() + y)


@model
def gumbel_straight_through() -> Case:
    return GumbelST(), torch.randn(5, 4), torch.randn(5, 4), nn.MSELoss()


class VQVAE(nn.Module):
    """Nearest codebook vector (argmin of squared distances), straight-through, codebook and
    commitment losses with detach."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 2), nn.Linear(2, 4)
        self.codebook = nn.Embedding(5, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.enc(x)
        d = (z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.weight.t()
             + self.codebook.weight.pow(2).sum(1))  # fmt: skip
        q = self.codebook(d.argmin(1))
        vq = F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())
        return self.dec(z + (q - z).detach()), vq


def vq_loss(out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out[0], x) + out[1]


@model
def vqvae_straight_through() -> Case:
    x = torch.randn(6, 4)
    return VQVAE(), x, x.clone(), vq_loss


class NeuralODE(nn.Module):
    """dz/dt = f(z), integrated with four fixed RK4 steps."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3))
        self.head = nn.Linear(3, 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = 0.25
        for _ in range(4):
            k1 = self.f(z)
            k2 = self.f(z + h / 2 * k1)
            k3 = self.f(z + h / 2 * k2)
            k4 = self.f(z + h * k3)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return self.head(z)


@model
def neural_ode_rk4() -> Case:
    return NeuralODE(), torch.randn(3, 3), torch.tensor([0, 1, 0]), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- sequence / attention


class T5Bias(nn.Module):
    """T5 relative-position buckets (log of integer distances, computed on constants) into a
    learned bias table added to the attention scores."""

    def __init__(self, d: int = 4, t: int = 6, buckets: int = 8, max_dist: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.bias = nn.Embedding(buckets, 1)
        self.t, self.buckets, self.max_dist = t, buckets, max_dist
        self.head = nn.Linear(d, 2)

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        nb = self.buckets // 2
        ret = (rel > 0).long() * nb
        n = rel.abs()
        max_exact = nb // 2
        is_small = n < max_exact
        large = max_exact + (torch.log(n.float() / max_exact) / math.log(self.max_dist / max_exact)
                             * (nb - max_exact)).long()  # fmt: skip
        large = torch.min(large, torch.full_like(large, nb - 1))
        return ret + torch.where(is_small, n, large)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(self.t)
        b = self.bias(self.bucket(pos[None, :] - pos[:, None])).squeeze(-1)
        s = self.q(x) @ self.k(x).transpose(1, 2) + b
        return self.head((s.softmax(-1) @ self.v(x)).mean(1))


@model
def t5_relative_bias() -> Case:
    return T5Bias(), torch.randn(2, 6, 4), torch.tensor([1, 0]), nn.CrossEntropyLoss()


class Albert(nn.Module):
    """ALBERT: factorised embedding (vocab -> 3 -> 8) and one encoder layer applied 3 times."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 3)
        self.proj = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.emb(ids))
        for _ in range(3):
            h = self.layer(h)
        return self.head(h[:, 0])


@model
def albert_shared_layers() -> Case:
    ids = torch.tensor([[1, 4, 2, 9], [3, 3, 0, 7]])
    return Albert(), ids, torch.tensor([0, 1]), nn.CrossEntropyLoss()


class ConformerConv(nn.Module):
    """Conformer convolution module: pointwise conv to 2C, GLU, depthwise conv, BatchNorm, SiLU,
    pointwise conv, residual; macaron half-step feed-forward before."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.ff = nn.Sequential(
            nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.SiLU(), nn.Linear(2 * c, c)
        )
        self.ln = nn.LayerNorm(c)
        self.pw1 = nn.Conv1d(c, 2 * c, 1)
        self.dw = nn.Conv1d(c, c, 3, padding=1, groups=c)
        self.bn = nn.BatchNorm1d(c)
        self.pw2 = nn.Conv1d(c, c, 1)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        x = x + 0.5 * self.ff(x)
        h = self.ln(x).transpose(1, 2)
        h = F.glu(self.pw1(h), dim=1)
        h = self.pw2(F.silu(self.bn(self.dw(h))))
        return self.head((x + h.transpose(1, 2)).mean(1))


@model
def conformer_conv() -> Case:
    return ConformerConv(), torch.randn(2, 5, 4), torch.tensor([2, 0]), nn.CrossEntropyLoss()


class GAT(nn.Module):
    """Graph attention: edge scores, softmax over each node's incoming edges with
    scatter_reduce(amax) and index_add, messages summed with index_add."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4, bias=False)
        self.a_src = nn.Parameter(0.5 * torch.randn(4))
        self.a_dst = nn.Parameter(0.5 * torch.randn(4))
        self.register_buffer("src", torch.tensor([0, 1, 2, 3, 4, 0, 2, 1, 0, 1, 2, 3, 4]))
        self.register_buffer("dst", torch.tensor([1, 2, 3, 4, 0, 2, 4, 3, 0, 1, 2, 3, 4]))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        e = F.leaky_relu(
            (h * self.a_src).sum(-1)[self.src] + (h * self.a_dst).sum(-1)[self.dst], 0.2
        )
        emax = x.new_zeros(x.shape[0]).scatter_reduce(
            0, self.dst, e, reduce="amax", include_self=False
        )
        w = torch.exp(e - emax[self.dst])
        den = x.new_zeros(x.shape[0]).index_add(0, self.dst, w)
        alpha = w / den[self.dst]
        out = torch.zeros_like(h).index_add(0, self.dst, alpha.unsqueeze(-1) * h[self.src])
        return self.head(F.elu(out))


@model
def gat_scatter_softmax() -> Case:
    return GAT(), torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]), nn.CrossEntropyLoss()


class PackedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = torch.tensor([4, 2, 3])
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)
        return self.head(h[-1])


@model
def packed_lstm() -> Case:
    return PackedLSTM(), torch.randn(3, 4, 3), torch.tensor([0, 1, 1]), nn.CrossEntropyLoss()


class AttnPool(nn.Module):
    """Attention pooling with a learned query and a length mask (masked_fill with -inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4, padding_idx=0)
        self.query = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        s = (h @ self.query).masked_fill(ids == 0, float("-inf"))
        return self.head((s.softmax(-1).unsqueeze(-1) * h).sum(1))


@model
def attention_pool_masked() -> Case:
    ids = torch.tensor([[3, 1, 5, 0, 0], [2, 7, 0, 0, 0], [4, 4, 6, 1, 2]])
    return AttnPool(), ids, torch.tensor([1, 0, 1]), nn.CrossEntropyLoss()


class CTCModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)
        self.out = nn.Linear(4, 4)  # blank + 3 symbols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0]).log_softmax(-1).transpose(0, 1)  # (T, B, C)


def ctc(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.ctc_loss(logp, y, torch.tensor([6, 6]), torch.tensor([2, 2]))


@model
def ctc_gru() -> Case:
    return CTCModel(), torch.randn(2, 6, 3), torch.tensor([[1, 2], [3, 3]]), ctc


# ---------------------------------------------------------------- losses people write


def info_nce(z: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    a, b = F.normalize(z[:, :3], dim=1), F.normalize(z[:, 3:], dim=1)
    logits = a @ b.t() / 0.07
    labels = torch.arange(z.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@model
def infonce_temperature() -> Case:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6)), torch.randn(5, 4), \
        torch.zeros(5), info_nce  # fmt: skip


def dice_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * y).sum((1, 2, 3))
    return (1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1)).mean() \
        + F.binary_cross_entropy_with_logits(logits, y)  # fmt: skip


@model
def dice_segmentation() -> Case:
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 1, 1))
    return m, torch.randn(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float(), dice_loss


def pinball(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    q = torch.tensor([0.1, 0.5, 0.9])
    e = y.unsqueeze(1) - out
    return torch.maximum(q * e, (q - 1) * e).mean() + 0.1 * F.huber_loss(out[:, 1], y, delta=0.5)


@model
def quantile_pinball() -> Case:
    m = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 3))
    return m, torch.randn(6, 3), torch.randn(6), pinball


class Mixup(nn.Module):
    """Mixup with a fixed lambda and permutation: mixed inputs; the loss mixes the two labels."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        self.register_buffer("perm", torch.tensor([2, 0, 3, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(0.7 * x + 0.3 * x[self.perm])


def mixup_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.7 * F.cross_entropy(out, y) + 0.3 * F.cross_entropy(out, y[torch.tensor([2, 0, 3, 1])])


@model
def mixup_fixed_lambda() -> Case:
    return Mixup(), torch.randn(4, 4), torch.tensor([0, 2, 1, 1]), mixup_ce


def triplet(z: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    a, p, n = z.chunk(3, 0)
    return nn.TripletMarginLoss(margin=1.0)(a, p, n)


@model
def triplet_embedding() -> Case:
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    return m, torch.randn(9, 4), torch.zeros(9), triplet


def gaussian_poisson(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mu, var = out[:, 0], F.softplus(out[:, 1]) + 1e-3
    return F.gaussian_nll_loss(mu, y[:, 0], var) + F.poisson_nll_loss(out[:, 2], y[:, 1])


def poisson_only(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.poisson_nll_loss(out[:, 2], y[:, 1]) + F.poisson_nll_loss(
        F.softplus(out[:, 1]), y[:, 1], log_input=False, full=True
    )


@model
def poisson_nll() -> Case:
    m = nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 3))
    y = torch.stack([torch.randn(5), torch.tensor([0.0, 1, 3, 2, 0])], 1)
    return m, torch.randn(5, 3), y, poisson_only


@model
def gaussian_poisson_nll() -> Case:
    m = nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 3))
    y = torch.stack([torch.randn(5), torch.tensor([0.0, 1, 3, 2, 0])], 1)
    return m, torch.randn(5, 3), y, gaussian_poisson


class ArcFace(nn.Module):
    """ArcFace: cos(theta + m) on the true class, theta = acos of the normalised logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 3))
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=1) @ F.normalize(self.w, dim=1).t()


def arcface_loss(cos: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
    onehot = torch.zeros_like(cos).scatter_(1, y.unsqueeze(1), 1.0)
    logits = 16.0 * torch.where(onehot > 0, torch.cos(theta + 0.3), cos)
    return F.cross_entropy(logits, y)


@model
def arcface_margin() -> Case:
    return ArcFace(), torch.randn(5, 4), torch.tensor([0, 3, 1, 2, 3]), arcface_loss


@model
def adaptive_log_softmax() -> Case:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.asm = nn.AdaptiveLogSoftmaxWithLoss(6, 10, cutoffs=[3, 6], div_value=2.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.asm.log_prob(torch.tanh(self.body(x)))

    return M(), torch.randn(5, 4), torch.tensor([0, 4, 9, 2, 7]), nn.NLLLoss()


def multimargin(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.multi_margin_loss(out, y, margin=0.5) + F.multilabel_soft_margin_loss(
        out, torch.zeros_like(out).scatter(1, y[:, None], 1.0)
    )


@model
def multiclass_hinge() -> Case:
    m = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    return m, torch.randn(6, 4), torch.tensor([0, 1, 2, 2, 1, 0]), multimargin


class Distill(nn.Module):
    """Knowledge distillation: the teacher's logits a constant buffer; KL at temperature T."""

    def __init__(self) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        self.register_buffer("teacher", 3.0 * torch.randn(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.student(x), self.teacher], 1)


def kd_loss(out: torch.Tensor, y: torch.Tensor, t: float = 4.0) -> torch.Tensor:
    s, te = out[:, :3], out[:, 3:]
    kl = F.kl_div(F.log_softmax(s / t, -1), F.softmax(te / t, -1), reduction="batchmean")
    return 0.7 * kl * t * t + 0.3 * F.cross_entropy(s, y)


@model
def distillation_kd() -> Case:
    return Distill(), torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]), kd_loss
