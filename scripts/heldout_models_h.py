"""Held-out probe models, part 8 (state-space and linear-attention sequence models, efficient
attention, MLP-Mixer/gMLP, point clouds and molecules, tabular trees and sparsemax, detection
heads and box losses, multi-resolution vision, GAN/style blocks, self-supervised losses,
time series, survival, ranking, ordinal, structured softmaxes, MoE load balancing, knowledge
graphs, recommenders), registered in :data:`heldout_models_a.MODELS`.

Small (batch <= 8, widths <= 32); ``scripts/probe_heldout.py --part h [--half]`` runs them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from heldout_models_a import Case, model
from torch import nn

# ---------------------------------------------------------------- sequence models


class SelectiveScan(nn.Module):
    """Mamba-style block: input-dependent step ``delta = softplus(.)``, ``A = -exp(A_log)``,
    ``dA = exp(delta A)``, a sequential scan ``h = dA h + delta B x``, ``y = C h + D x``,
    gated by SiLU."""

    def __init__(self, d: int = 4, n: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d, 2 * d)
        self.conv = nn.Conv1d(d, d, 3, padding=2, groups=d)
        self.x_proj = nn.Linear(d, 1 + 2 * n, bias=False)
        self.dt_proj = nn.Linear(1, d)
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, n + 1, dtype=torch.float64)).repeat(d, 1)
        )
        self.D = nn.Parameter(torch.ones(d))
        self.out = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d)
        b, L, d = x.shape
        xz = self.inp(x)
        u, z = xz.chunk(2, -1)
        u = F.silu(self.conv(u.transpose(1, 2))[..., :L].transpose(1, 2))
        dbc = self.x_proj(u)
        dt, B, C = dbc.split([1, self.n, self.n], -1)
        delta = F.softplus(self.dt_proj(dt))  # (B, L, d)
        A = -torch.exp(self.A_log)  # (d, n)
        dA = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, d, n)
        dBx = delta.unsqueeze(-1) * B.unsqueeze(2) * u.unsqueeze(-1)
        h = x.new_zeros(b, d, self.n)
        ys = []
        for t in range(L):
            h = dA[:, t] * h + dBx[:, t]
            ys.append((h * C[:, t].unsqueeze(1)).sum(-1))
        y = torch.stack(ys, 1) + u * self.D
        y = self.out(y * F.silu(z))
        return self.head(y.mean(1))


@model
def mamba_selective_scan() -> Case:
    return SelectiveScan(), torch.randn(2, 5, 4), torch.tensor([0, 2]), nn.CrossEntropyLoss()


class CumDecay(nn.Module):
    """Parallel form of a diagonal linear recurrence (S4/LRU-like): per-step decays
    ``a = sigmoid(.)``, ``P = cumprod(a)``, ``h_t = P_t cumsum(x / P)``, plus a
    log-space cumsum form."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(d, d)
        self.val = nn.Linear(d, d)
        self.head = nn.Linear(2 * d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.gate(x)) * 0.5 + 0.5  # (B, L, d) in (0.5, 1)
        v = self.val(x)
        P = torch.cumprod(a, 1)
        h1 = P * torch.cumsum(v / P, 1)
        la = torch.cumsum(torch.log(a), 1)
        h2 = torch.exp(la) * torch.cumsum(v * torch.exp(-la), 1)
        return self.head(torch.cat([h1[:, -1], h2.mean(1)], -1))


@model
def s4_cumprod_decay() -> Case:
    return CumDecay(), torch.randn(3, 6, 4), torch.tensor([0, 1, 1]), nn.CrossEntropyLoss()


class LinearAttention(nn.Module):
    """Causal linear attention (Katharopoulos, RWKV-like): ``phi = elu + 1``, running sums of
    ``phi(k) v^T`` and ``phi(k)`` by cumsum, normalised."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = F.elu(self.q(x)) + 1, F.elu(self.k(x)) + 1
        v = self.v(x)
        kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), 1)  # (B, L, d, d)
        ks = torch.cumsum(k, 1)
        num = torch.einsum("bld,blde->ble", q, kv)
        den = (q * ks).sum(-1, keepdim=True) + 1e-6
        return self.head((num / den).mean(1))


@model
def linear_attention_elu() -> Case:
    return LinearAttention(), torch.randn(2, 6, 4), torch.tensor([1, 2]), nn.CrossEntropyLoss()


class RWKVTimeMix(nn.Module):
    """RWKV-4 time mixing written as a loop: token shift, learned decay ``w = -exp(w_raw)``,
    bonus ``u``, numerator/denominator state with a running max for stability."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.full((d,), 0.5, dtype=torch.float64))
        self.k, self.v, self.r, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.w_raw = nn.Parameter(torch.zeros(d, dtype=torch.float64) - 0.5)
        self.u = nn.Parameter(torch.full((d,), 0.3, dtype=torch.float64))
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prev = F.pad(x, (0, 0, 1, -1))  # token shift
        xx = x * self.mix + prev * (1 - self.mix)
        k, v, r = self.k(xx), self.v(xx), torch.sigmoid(self.r(xx))
        w = -torch.exp(self.w_raw)
        b, L, d = x.shape
        num = x.new_zeros(b, d)
        den = x.new_zeros(b, d)
        pmax = x.new_full((b, d), -1e38)
        outs = []
        for t in range(L):
            kt, vt = k[:, t], v[:, t]
            ww = self.u + kt
            m = torch.maximum(pmax, ww)
            e1, e2 = torch.exp(pmax - m), torch.exp(ww - m)
            outs.append((e1 * num + e2 * vt) / (e1 * den + e2))
            ww = pmax + w
            m = torch.maximum(ww, kt)
            e1, e2 = torch.exp(ww - m), torch.exp(kt - m)
            num, den, pmax = e1 * num + e2 * vt, e1 * den + e2, m
        y = self.o(r * torch.stack(outs, 1))
        return self.head(y.mean(1))


@model
def rwkv_time_mix() -> Case:
    return RWKVTimeMix(), torch.randn(2, 5, 4), torch.tensor([1, 0]), nn.CrossEntropyLoss()


class Retention(nn.Module):
    """RetNet retention: decay mask ``gamma^(n-m)`` on the lower triangle (a constant), no
    softmax, GroupNorm over heads, swish gate."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.g = (nn.Linear(d, d) for _ in range(4))
        self.gn = nn.GroupNorm(heads, d)
        self.o = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)
        self.register_buffer("gammas", 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, L, d = x.shape
        dh = d // self.h

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, L, self.h, dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        n = torch.arange(L, dtype=x.dtype)
        diff = n[:, None] - n[None, :]
        D = self.gammas.view(-1, 1, 1) ** diff.clamp(min=0) * (diff >= 0)
        ret = (q @ k.transpose(-1, -2) / math.sqrt(dh)) * D
        y = (ret @ v).transpose(1, 2).reshape(b * L, d)
        y = self.gn(y).view(b, L, d) * F.silu(self.g(x))
        return self.head(self.o(y).mean(1))


@model
def retnet_retention() -> Case:
    return Retention(), torch.randn(2, 5, 8), torch.tensor([0, 2]), nn.CrossEntropyLoss()


class BandedAttention(nn.Module):
    """Longformer-style sliding window: scores masked with ``-inf`` outside ``|i - j| <= w``
    plus one global token attending everywhere."""

    def __init__(self, d: int = 4, w: int = 1) -> None:
        super().__init__()
        self.w = w
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, L, d = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        i = torch.arange(L)
        band = (i[:, None] - i[None, :]).abs() <= self.w
        band = band | (i[:, None] == 0) | (i[None, :] == 0)  # token 0 global
        s = s.masked_fill(~band, float("-inf"))
        return self.head((s.softmax(-1) @ v).mean(1))


@model
def longformer_banded() -> Case:
    return BandedAttention(), torch.randn(2, 6, 4), torch.tensor([1, 0]), nn.CrossEntropyLoss()


class ChunkAttention(nn.Module):
    """Reformer/Transformer-XL-ish local chunking: the sequence cut into chunks of 2, each
    attending to itself and the previous chunk (``cat`` of the shifted keys), causal inside."""

    def __init__(self, d: int = 4, c: int = 2) -> None:
        super().__init__()
        self.c = c
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, L, d = x.shape
        c, n = self.c, L // self.c
        q = self.q(x).view(b, n, c, d)
        k = self.k(x).view(b, n, c, d)
        v = self.v(x).view(b, n, c, d)
        kp = torch.cat([k.new_zeros(b, 1, c, d), k[:, :-1]], 1)
        vp = torch.cat([v.new_zeros(b, 1, c, d), v[:, :-1]], 1)
        kk, vv = torch.cat([kp, k], 2), torch.cat([vp, v], 2)  # (b, n, 2c, d)
        s = q @ kk.transpose(-1, -2) / math.sqrt(d)
        i = torch.arange(c)
        j = torch.arange(2 * c) - c
        causal = j[None, :] <= i[:, None]
        first = torch.zeros(n, 1, 2 * c, dtype=torch.bool)
        first[0, :, :c] = True  # the first chunk has no previous chunk
        mask = ~causal | first
        s = s.masked_fill(mask, torch.finfo(s.dtype).min)
        y = (s.softmax(-1) @ vv).view(b, L, d)
        return self.head(y.mean(1))


@model
def reformer_chunked() -> Case:
    return ChunkAttention(), torch.randn(2, 6, 4), torch.tensor([2, 0]), nn.CrossEntropyLoss()


class Performer(nn.Module):
    """FAVOR+ positive random features with a fixed projection buffer:
    ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)``, non-causal linear attention."""

    def __init__(self, d: int = 4, m: int = 6) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.register_buffer("W", torch.randn(m, d, dtype=torch.float64))
        self.head = nn.Linear(d, 2)
        self.m = m

    def phi(self, z: torch.Tensor) -> torch.Tensor:
        z = z / z.shape[-1] ** 0.25
        return torch.exp(z @ self.W.t() - (z * z).sum(-1, keepdim=True) / 2) / math.sqrt(self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.phi(self.q(x)), self.phi(self.k(x)), self.v(x)
        kv = k.transpose(-1, -2) @ v
        num = q @ kv
        den = q @ k.sum(1, keepdim=True).transpose(-1, -2)
        return self.head((num / den).mean(1))


@model
def performer_favor() -> Case:
    return Performer(), torch.randn(2, 5, 4), torch.tensor([0, 1]), nn.CrossEntropyLoss()


class RelShift(nn.Module):
    """Transformer-XL relative attention: position scores ``q @ R^T`` realigned by the
    pad-and-view trick (``F.pad`` a zero column, view as (L+1, L), drop the first row), plus
    the learned biases u and v."""

    def __init__(self, d: int = 4, L: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.r = nn.Linear(d, d, bias=False)
        self.u = nn.Parameter(0.1 * torch.randn(d, dtype=torch.float64))
        self.vb = nn.Parameter(0.1 * torch.randn(d, dtype=torch.float64))
        pos = torch.arange(L - 1, -1, -1, dtype=torch.float64)
        inv = 1 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        ang = pos[:, None] * inv[None, :]
        self.register_buffer("R", torch.cat([ang.sin(), ang.cos()], -1))
        self.head = nn.Linear(d, 3)

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        b, L, M = x.shape
        x = F.pad(x, (1, 0))
        x = x.view(b, M + 1, L)
        return x[:, 1:].view(b, L, M)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, L, d = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        ac = (q + self.u) @ k.transpose(-1, -2)
        bd = self.rel_shift((q + self.vb) @ self.r(self.R).t())
        s = (ac + bd) / math.sqrt(d)
        mask = torch.ones(L, L, dtype=torch.bool).triu(1)
        s = s.masked_fill(mask, float("-inf"))
        return self.head((s.softmax(-1) @ v).mean(1))


@model
def transformer_xl_relshift() -> Case:
    return RelShift(), torch.randn(2, 4, 4), torch.tensor([2, 1]), nn.CrossEntropyLoss()


class LNLSTM(nn.Module):
    """A layer-normalised LSTM cell written by hand, unrolled."""

    def __init__(self, d: int = 3, h: int = 4) -> None:
        super().__init__()
        self.h = h
        self.wx = nn.Linear(d, 4 * h, bias=False)
        self.wh = nn.Linear(h, 4 * h, bias=False)
        self.ln_x, self.ln_h, self.ln_c = nn.LayerNorm(4 * h), nn.LayerNorm(4 * h), nn.LayerNorm(h)
        self.head = nn.Linear(h, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, L, _ = x.shape
        h = x.new_zeros(b, self.h)
        c = x.new_zeros(b, self.h)
        for t in range(L):
            g = self.ln_x(self.wx(x[:, t])) + self.ln_h(self.wh(h))
            i, f, o, u = g.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(u)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
        return self.head(h)


@model
def layernorm_lstm_cell() -> Case:
    return LNLSTM(), torch.randn(3, 4, 3), torch.tensor([0, 1, 1]), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- MLP-style vision


class MixerBlock(nn.Module):
    def __init__(self, tokens: int = 4, d: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, d, 2, 2)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.tok = nn.Sequential(nn.Linear(tokens, 8), nn.GELU(), nn.Linear(8, tokens))
        self.ch = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)  # (B, T, d)
        h = h + self.tok(self.ln1(h).transpose(1, 2)).transpose(1, 2)
        h = h + self.ch(self.ln2(h))
        return self.head(h.mean(1))


@model
def mlp_mixer() -> Case:
    return MixerBlock(), torch.randn(2, 1, 4, 4), torch.tensor([0, 2]), nn.CrossEntropyLoss()


class GMLP(nn.Module):
    """gMLP spatial gating unit: split channels, LayerNorm one half, a linear map over the
    sequence axis (weights near 0, bias 1 as in the paper), multiply."""

    def __init__(self, L: int = 5, d: int = 4) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.ln_sgu = nn.LayerNorm(2 * d)
        self.spatial = nn.Conv1d(L, L, 1)
        nn.init.uniform_(self.spatial.weight, -0.01, 0.01)
        nn.init.ones_(self.spatial.bias)
        self.down = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(self.ln(x)))
        u, v = h.chunk(2, -1)
        v = self.spatial(self.ln_sgu(v))
        return self.head((x + self.down(u * v)).mean(1))


@model
def gmlp_sgu() -> Case:
    return GMLP(), torch.randn(2, 5, 4), torch.tensor([1, 0]), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- point clouds, molecules


class PointNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tnet = nn.Sequential(nn.Conv1d(3, 8, 1), nn.ReLU(), nn.Conv1d(8, 9, 1))
        self.mlp = nn.Sequential(nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8), nn.ReLU(),
                                 nn.Conv1d(8, 16, 1))  # fmt: skip
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, N)
        t = self.tnet(x).max(2).values.view(-1, 3, 3) + torch.eye(3, dtype=x.dtype)
        x = torch.bmm(t, x)
        return self.head(self.mlp(x).max(2)[0])


@model
def pointnet_tnet() -> Case:
    return PointNet(), torch.randn(4, 3, 10), torch.tensor([0, 1, 2, 0]), nn.CrossEntropyLoss()


class EdgeConv(nn.Module):
    """DGCNN edge convolution: k nearest neighbours by ``cdist`` + ``topk``, neighbour
    features gathered, ``cat(x_i, x_j - x_i)``, shared MLP, max over neighbours."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = k
        self.mlp = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, 3)
        b, n, c = x.shape
        d = torch.cdist(x, x)
        idx = d.topk(self.k + 1, largest=False).indices[..., 1:]  # (B, N, k)
        nb = torch.gather(x.unsqueeze(1).expand(b, n, n, c), 2,
                          idx.unsqueeze(-1).expand(b, n, self.k, c))  # fmt: skip
        ctr = x.unsqueeze(2).expand_as(nb)
        e = self.mlp(torch.cat([ctr, nb - ctr], -1)).amax(2)
        return self.head(e.mean(1))


@model
def dgcnn_edgeconv() -> Case:
    return EdgeConv(), torch.randn(2, 7, 3), torch.tensor([0, 1]), nn.CrossEntropyLoss()


class SchNet(nn.Module):
    """SchNet interaction: pairwise distances, Gaussian smearing ``exp(-gamma (d - mu)^2)``,
    cosine cutoff ``0.5 (cos(pi d / rc) + 1) (d < rc)``, continuous filters, neighbour sum,
    shifted softplus, energy as the atom sum (MSE)."""

    def __init__(self, f: int = 8, g: int = 6, rc: float = 3.0) -> None:
        super().__init__()
        self.rc = rc
        self.emb = nn.Embedding(4, f)
        self.register_buffer("mu", torch.linspace(0, rc, g, dtype=torch.float64))
        self.gamma = 10.0 / rc
        self.filt = nn.Sequential(nn.Linear(g, f), nn.Softplus(), nn.Linear(f, f))
        self.lin1, self.lin2 = nn.Linear(f, f, bias=False), nn.Linear(f, f)
        self.out = nn.Sequential(nn.Linear(f, 4), nn.Softplus(), nn.Linear(4, 1))

    def forward(self, z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.emb(z)  # (B, A, f)
        d = (pos.unsqueeze(2) - pos.unsqueeze(1)).pow(2).sum(-1).add(1e-9).sqrt()  # (B, A, A)
        rbf = torch.exp(-self.gamma * (d.unsqueeze(-1) - self.mu) ** 2)
        cut = 0.5 * (torch.cos(d * math.pi / self.rc) + 1) * (d < self.rc)
        eye = torch.eye(z.shape[1], dtype=torch.bool)
        cut = cut.masked_fill(eye, 0.0)
        W = self.filt(rbf) * cut.unsqueeze(-1)
        m = (W * self.lin1(h).unsqueeze(1)).sum(2)
        h = h + self.lin2(F.softplus(m) - math.log(2.0))
        return self.out(h).sum((1, 2))


@model
def schnet_rbf_cutoff() -> Case:
    z = torch.randint(0, 4, (2, 5))
    pos = torch.randn(2, 5, 3)
    return SchNet(), (z, pos), torch.randn(2), nn.MSELoss()


class EGNN(nn.Module):
    """E(n)-equivariant layer: messages from ``h_i, h_j, |x_i - x_j|^2``, coordinate update
    ``x_i + mean_j (x_i - x_j) phi_x(m_ij)``, node update; loss on the coordinates and h."""

    def __init__(self, f: int = 4) -> None:
        super().__init__()
        self.phi_e = nn.Sequential(nn.Linear(2 * f + 1, 8), nn.SiLU(), nn.Linear(8, 8), nn.SiLU())
        self.phi_x = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 1, bias=False))
        self.phi_h = nn.Sequential(nn.Linear(f + 8, 8), nn.SiLU(), nn.Linear(8, f))

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # (N, f), (N, 3)
        n = h.shape[0]
        diff = x.unsqueeze(1) - x.unsqueeze(0)  # (N, N, 3)
        d2 = (diff**2).sum(-1, keepdim=True)
        hi, hj = h.unsqueeze(1).expand(n, n, -1), h.unsqueeze(0).expand(n, n, -1)
        m = self.phi_e(torch.cat([hi, hj, d2], -1))
        off = (1 - torch.eye(n, dtype=x.dtype)).unsqueeze(-1)
        m = m * off
        x = x + (diff * self.phi_x(m)).sum(1) / (n - 1)
        h = h + self.phi_h(torch.cat([h, m.sum(1)], -1))
        return torch.cat([x, h], -1)


@model
def egnn_coords() -> Case:
    return EGNN(), (torch.randn(5, 4), torch.randn(5, 3)), torch.randn(5, 7), nn.MSELoss()


# ---------------------------------------------------------------- tabular


def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    zs = torch.sort(z, dim=dim, descending=True).values
    k = torch.arange(1, z.shape[dim] + 1, dtype=z.dtype)
    cs = zs.cumsum(dim) - 1
    support = (k * zs > cs).to(z.dtype)
    kz = support.sum(dim, keepdim=True)
    tau = (cs.gather(dim, kz.long() - 1)) / kz
    return torch.clamp(z - tau, min=0)


class TabNetStep(nn.Module):
    """TabNet-like attentive transformer: a sparsemax feature mask times a prior, feature
    transformer with GLU, two steps with the prior updated as ``prior * (gamma - mask)``."""

    def __init__(self, f: int = 6, d: int = 4) -> None:
        super().__init__()
        self.att = nn.ModuleList([nn.Linear(d, f) for _ in range(2)])
        self.ft = nn.ModuleList([nn.Linear(f, 2 * d) for _ in range(2)])
        self.bn = nn.BatchNorm1d(f)
        self.head = nn.Linear(d, 2)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        prior = torch.ones_like(x)
        a = x.new_zeros(x.shape[0], self.d) + 0.1
        out = 0
        for att, ft in zip(self.att, self.ft, strict=True):
            mask = sparsemax(att(a) * prior)
            prior = prior * (1.5 - mask)
            a = F.glu(ft(mask * x))
            out = out + F.relu(a)
        return self.head(out)


@model
def tabnet_sparsemax() -> Case:
    return TabNetStep(), torch.randn(8, 6), torch.randint(0, 2, (8,)), nn.CrossEntropyLoss()


class SoftTrees(nn.Module):
    """NODE-style soft oblivious trees: feature selection by softmax, sigmoid splits with
    thresholds and temperatures, leaf probabilities as products over depth."""

    def __init__(self, f: int = 5, trees: int = 3, depth: int = 2) -> None:
        super().__init__()
        self.sel = nn.Parameter(torch.randn(trees, depth, f, dtype=torch.float64))
        self.thr = nn.Parameter(0.1 * torch.randn(trees, depth, dtype=torch.float64))
        self.log_t = nn.Parameter(torch.zeros(trees, depth, dtype=torch.float64))
        self.leaves = nn.Parameter(torch.randn(trees, 2**depth, dtype=torch.float64))
        bits = torch.tensor([[(i >> k) & 1 for k in range(depth)] for i in range(2**depth)])
        self.register_buffer("bits", bits.to(torch.float64))  # (leaves, depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = torch.einsum("bf,tdf->btd", x, self.sel.softmax(-1))
        s = torch.sigmoid((feat - self.thr) * torch.exp(-self.log_t))  # (B, T, D)
        s = s.unsqueeze(2)  # (B, T, 1, D)
        p = (self.bits * s + (1 - self.bits) * (1 - s)).prod(-1)  # (B, T, leaves)
        return (p * self.leaves).sum(-1).mean(-1)


@model
def node_soft_trees() -> Case:
    return SoftTrees(), torch.randn(6, 5), torch.randn(6), nn.MSELoss()


class WideDeep(nn.Module):
    """Wide & Deep with feature hashing: a crossed feature hashed as ``(a * 31 + b) % M``
    into a wide embedding (dim 1), deep embeddings, an MLP, BCE with logits."""

    def __init__(self, M: int = 13) -> None:
        super().__init__()
        self.M = M
        self.wide = nn.Embedding(M, 1)
        self.ea, self.eb = nn.Embedding(5, 4), nn.Embedding(7, 4)
        self.deep = nn.Sequential(nn.Linear(8 + 2, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, cat: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        a, b = cat[:, 0], cat[:, 1]
        cross = (a * 31 + b) % self.M
        deep = self.deep(torch.cat([self.ea(a), self.eb(b), dense], -1))
        return (self.wide(cross) + deep).squeeze(-1)


@model
def wide_deep_hashing() -> Case:
    cat = torch.stack([torch.randint(0, 5, (8,)), torch.randint(0, 7, (8,))], 1)
    return (WideDeep(), (cat, torch.randn(8, 2)), torch.randint(0, 2, (8,)).double(),
            nn.BCEWithLogitsLoss())  # fmt: skip


# ---------------------------------------------------------------- detection


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of (x1, y1, x2, y2) boxes, elementwise."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.max(a[..., :2], b[..., :2])
    rb = torch.min(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a + area_b - inter
    iou = inter / union
    clt = torch.min(a[..., :2], b[..., :2])
    crb = torch.max(a[..., 2:], b[..., 2:])
    cwh = (crb - clt).clamp(min=0)
    carea = cwh[..., 0] * cwh[..., 1]
    return iou - (carea - union) / carea


def _cxcywh(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


class YoloHead(nn.Module):
    """YOLOv3-style head on a 3x3 grid with 2 anchors: ``sigmoid(tx) + grid``,
    ``anchor * exp(tw)``, objectness; the loss (in the targets' callable) MSE on the decoded
    boxes of responsible cells plus BCE with logits on objectness."""

    def __init__(self, na: int = 2) -> None:
        super().__init__()
        self.na = na
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.LeakyReLU(0.1))
        self.pred = nn.Conv2d(8, na * 5, 1)
        self.register_buffer("anchors", torch.tensor([[1.0, 1.5], [2.0, 1.0]], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pred(self.body(x))  # (B, na*5, G, G)
        b, _, g, _ = p.shape
        p = p.view(b, self.na, 5, g, g).permute(0, 1, 3, 4, 2)
        gy, gx = torch.meshgrid(torch.arange(g, dtype=x.dtype), torch.arange(g, dtype=x.dtype),
                                indexing="ij")  # fmt: skip
        xy = torch.sigmoid(p[..., :2]) + torch.stack([gx, gy], -1)
        wh = torch.exp(p[..., 2:4]) * self.anchors.view(1, self.na, 1, 1, 2)
        return torch.cat([xy, wh, p[..., 4:5]], -1)  # (B, na, G, G, 5)


def _yolo_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    obj = t[..., 4]
    box = ((out[..., :4] - t[..., :4]) ** 2).sum(-1)
    return (box * obj).sum() / obj.sum() + F.binary_cross_entropy_with_logits(out[..., 4], obj)


@model
def yolo_head() -> Case:
    t = torch.rand(2, 2, 3, 3, 5) * 2
    t[..., 4] = (torch.rand(2, 2, 3, 3) < 0.3).double()
    t[0, 0, 0, 0, 4] = 1.0
    return YoloHead(), torch.randn(2, 3, 6, 6), t, _yolo_loss


class BoxRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.net(x)
        return _cxcywh(torch.cat([torch.sigmoid(r[:, :2]), torch.exp(r[:, 2:]) * 0.3], -1))


def _giou_loss(pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - _giou(pred, t)).mean() + F.smooth_l1_loss(pred, t)


@model
def ssd_giou_loss() -> Case:
    c = torch.rand(8, 2) * 0.6 + 0.2
    wh = torch.rand(8, 2) * 0.3 + 0.1
    return BoxRegressor(), torch.randn(8, 6), _cxcywh(torch.cat([c, wh], 1)), _giou_loss


class DetrHead(nn.Module):
    """DETR decoder outputs (queries through a small MLP) with class logits (+ no-object) and
    sigmoid boxes; the set loss on a FIXED matching: CE with a down-weighted no-object class,
    L1 and GIoU on matched pairs, plus the ``cdist`` L1 cost matrix's trace term."""

    def __init__(self, q: int = 4, d: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(q, d, dtype=torch.float64))
        self.mix = nn.Linear(6, d)
        self.cls = nn.Linear(d, classes + 1)
        self.box = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.query.unsqueeze(0) + self.mix(x).unsqueeze(1))  # (B, Q, d)
        return torch.cat([self.cls(h), torch.sigmoid(self.box(h))], -1)


def _detr_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    logits, boxes = out[..., :4], out[..., 4:]
    labels = t[..., 0].long()  # 3 = no object
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=out.dtype)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), weight=weight)
    matched = (labels != 3).to(out.dtype)
    tb = t[..., 1:]
    l1 = ((boxes - tb).abs().sum(-1) * matched).sum() / matched.sum()
    gi = ((1 - _giou(_cxcywh(boxes), _cxcywh(tb))) * matched).sum() / matched.sum()
    cost = torch.cdist(boxes, tb, p=1)  # the matcher's cost; the diagonal is the matching
    return ce + 5 * l1 + 2 * gi + 0.01 * torch.diagonal(cost, dim1=1, dim2=2).mean()


@model
def detr_fixed_matching_loss() -> Case:
    t = torch.zeros(2, 4, 5)
    t[..., 0] = torch.tensor([[0, 2, 3, 3], [1, 3, 0, 3]])
    t[..., 1:3] = torch.rand(2, 4, 2) * 0.6 + 0.2
    t[..., 3:] = torch.rand(2, 4, 2) * 0.3 + 0.1
    return DetrHead(), torch.randn(2, 6), t, _detr_loss


class CenterNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.hm = nn.Conv2d(8, 2, 1)
        nn.init.constant_(self.hm.bias, -2.19)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hm(self.body(x))


def _centernet_focal(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """CornerNet/CenterNet's penalty-reduced focal loss on a Gaussian heatmap."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = gt.eq(1).to(p.dtype)
    neg = 1 - pos
    pos_loss = torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = torch.log(1 - p) * p**2 * (1 - gt) ** 4 * neg
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


@model
def centernet_focal_heatmap() -> Case:
    yy, xx = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    gt = torch.zeros(2, 2, 6, 6)
    for b, c, cy, cx in ((0, 0, 2, 3), (0, 1, 4, 1), (1, 0, 1, 1), (1, 1, 3, 4)):
        gt[b, c] = torch.maximum(gt[b, c], torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 2))
    return CenterNet(), torch.randn(2, 1, 6, 6), gt, _centernet_focal


# ---------------------------------------------------------------- multi-resolution vision


class HRFusion(nn.Module):
    """HRNet exchange unit: a high- and a low-resolution branch; low -> high by 1x1 conv and
    bilinear upsampling, high -> low by a strided 3x3 conv; summed, ReLU."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.down0 = nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.hi, self.lo = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.lo2hi = nn.Sequential(nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.hi2lo = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c))
        self.head = nn.Linear(3 * c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        lo = F.relu(self.down0(h))
        h, lo = self.hi(h), self.lo(lo)
        up = F.interpolate(self.lo2hi(lo), size=h.shape[-2:], mode="bilinear", align_corners=False)
        h2, lo2 = F.relu(h + up), F.relu(lo + self.hi2lo(h))
        return self.head(torch.cat([h2.mean((2, 3)), lo2.mean((2, 3))], 1))


@model
def hrnet_fusion() -> Case:
    return HRFusion(), torch.randn(2, 1, 8, 8), torch.tensor([0, 1]), nn.CrossEntropyLoss()


class FPN(nn.Module):
    """FPN top-down pathway: lateral 1x1 convs, nearest 2x upsampling added, 3x3 smoothing;
    per-level heads averaged."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, c, 3, 2, 1)
        self.c2 = nn.Conv2d(c, 2 * c, 3, 2, 1)
        self.c3 = nn.Conv2d(2 * c, 4 * c, 3, 2, 1)
        self.lat = nn.ModuleList([nn.Conv2d(k * c, c, 1) for k in (1, 2, 4)])
        self.smooth = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1) for _ in range(3)])
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = F.relu(self.c1(x))
        f2 = F.relu(self.c2(f1))
        f3 = F.relu(self.c3(f2))
        p3 = self.lat[2](f3)
        p2 = self.lat[1](f2) + F.interpolate(p3, scale_factor=2, mode="nearest")
        p1 = self.lat[0](f1) + F.interpolate(p2, size=f1.shape[-2:], mode="nearest")
        outs = [s(p).mean((2, 3)) for s, p in zip(self.smooth, (p1, p2, p3), strict=True)]
        return self.head(torch.stack(outs, 0).mean(0))


@model
def fpn_topdown() -> Case:
    return FPN(), torch.randn(2, 1, 16, 16), torch.tensor([1, 0]), nn.CrossEntropyLoss()


class DeformLite(nn.Module):
    """Deformable-conv-lite: a conv predicts per-pixel offsets, the feature map is resampled
    by ``grid_sample`` at the base grid plus offsets, then a regular conv."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        self.feat = nn.Conv2d(1, c, 3, padding=1)
        self.offset = nn.Conv2d(c, 2, 3, padding=1)
        nn.init.normal_(self.offset.weight, std=0.05)
        self.conv = nn.Conv2d(c, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.tanh(self.feat(x))
        b, _, h, w = f.shape
        ys = torch.linspace(-1, 1, h, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, dtype=x.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        base = torch.stack([gx, gy], -1).unsqueeze(0)
        grid = base + 0.3 * torch.tanh(self.offset(f)).permute(0, 2, 3, 1)
        s = F.grid_sample(f, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return self.head(F.relu(self.conv(s)).mean((2, 3)))


@model
def deformable_grid_sample() -> Case:
    return DeformLite(), torch.randn(2, 1, 6, 6), torch.tensor([0, 1]), nn.CrossEntropyLoss()


# ---------------------------------------------------------------- GAN / style


class PatchGAN(nn.Module):
    """Pix2Pix discriminator: conv stride 2 + LeakyReLU(0.2), conv + InstanceNorm2d + LeakyReLU,
    a 1-channel patch map; BCE with logits against a map of ones."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, 4, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(4, 8, 4, 2, 1, bias=False), nn.InstanceNorm2d(8, affine=True),
            nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3, 1, 1),
        )  # fmt: skip

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([a, b], 1))


@model
def pix2pix_patchgan() -> Case:
    return (PatchGAN(), (torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)),
            torch.ones(2, 1, 4, 4), nn.BCEWithLogitsLoss())  # fmt: skip


class ModConv(nn.Module):
    """StyleGAN2 modulated convolution: style ``s = A w + 1``, weights scaled per sample,
    demodulated by ``rsqrt(sum w^2 + 1e-8)``, run as a grouped conv with groups = batch;
    noise (a fixed buffer) with a learned strength, bias, leaky ReLU * sqrt(2)."""

    def __init__(self, cin: int = 3, cout: int = 4, wdim: int = 6) -> None:
        super().__init__()
        self.affine = nn.Linear(wdim, cin)
        nn.init.ones_(self.affine.bias)
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(cout, dtype=torch.float64))
        self.noise_strength = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        self.register_buffer("noise", torch.randn(1, 1, 6, 6, dtype=torch.float64))
        self.cout = cout

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b, cin, h, wd = x.shape
        s = self.affine(w)  # (B, cin)
        wt = self.weight.unsqueeze(0) * s.view(b, 1, cin, 1, 1) / math.sqrt(cin * 9)
        d = torch.rsqrt(wt.pow(2).sum([2, 3, 4]) + 1e-8)
        wt = wt * d.view(b, self.cout, 1, 1, 1)
        y = F.conv2d(x.reshape(1, b * cin, h, wd), wt.reshape(b * self.cout, cin, 3, 3),
                     padding=1, groups=b)  # fmt: skip
        y = y.view(b, self.cout, h, wd) + self.noise * self.noise_strength
        return F.leaky_relu(y + self.bias.view(1, -1, 1, 1), 0.2) * math.sqrt(2)


@model
def stylegan2_modconv() -> Case:
    return (
        ModConv(),
        (torch.randn(2, 3, 6, 6), torch.randn(2, 6)),
        torch.randn(2, 4, 6, 6),
        nn.MSELoss(),
    )


class AdaIN(nn.Module):
    """Style transfer's AdaIN: content features normalised by their per-channel mean and std
    (``var(unbiased=False) + eps``) and re-scaled by the style's statistics; a decoder conv;
    content loss plus a style loss on the statistics."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
        self.dec = nn.Conv2d(c, 1, 3, padding=1)

    @staticmethod
    def stats(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = f.mean((2, 3), keepdim=True)
        sd = (f.var((2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
        return mu, sd

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        fc, fs = self.enc(content), self.enc(style)
        mc, sc = self.stats(fc)
        ms, ss = self.stats(fs)
        t = (fc - mc) / sc * ss + ms
        out = self.dec(t)
        fo = self.enc(out)
        mo, so = self.stats(fo)
        style_term = ((mo - ms) ** 2).mean() + ((so - ss) ** 2).mean()
        return ((fo - t) ** 2).mean((1, 2, 3)) + 0.5 * style_term


@model
def adain_style_transfer() -> Case:
    return (AdaIN(), (torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6)), torch.zeros(2),
            lambda out, t: (out - t).sum())  # fmt: skip


class Critic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        eps = torch.full((real.shape[0], 1), 0.3, dtype=real.dtype)
        mix = (eps * real + (1 - eps) * fake).requires_grad_(True)
        d = self.net(mix)
        (g,) = torch.autograd.grad(d.sum(), mix, create_graph=True)
        gp = ((g.norm(2, dim=1) - 1) ** 2).mean()
        return self.net(fake).mean() - self.net(real).mean() + 10 * gp


@model
def wgan_gp_penalty() -> Case:
    return (Critic(), (torch.randn(4, 4), torch.randn(4, 4)), torch.zeros(()),
            lambda out, t: out + t)  # fmt: skip


# ---------------------------------------------------------------- self-supervised


class Encoder(nn.Module):
    def __init__(self, d: int = 6, e: int = 4) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, e))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.f(a), self.f(b)], 0)


def _nt_xent(z: torch.Tensor, _t: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    z = F.normalize(torch.cat([z[0], z[1]], 0), dim=1)
    n = z.shape[0] // 2
    s = z @ z.t() / tau
    s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(s, target)


def _nt_xent_finfo(z: torch.Tensor, _t: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    z = F.normalize(torch.cat([z[0], z[1]], 0), dim=1)
    n = z.shape[0] // 2
    s = z @ z.t() / tau
    s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool), torch.finfo(s.dtype).min)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(s, target)


@model
def simclr_ntxent_inf() -> Case:
    return Encoder(), (torch.randn(4, 6), torch.randn(4, 6)), torch.zeros(4), _nt_xent


@model
def simclr_ntxent_finfo_min() -> Case:
    return Encoder(), (torch.randn(4, 6), torch.randn(4, 6)), torch.zeros(4), _nt_xent_finfo


class BYOL(nn.Module):
    """BYOL: online encoder + predictor; the target encoder an EMA copy held as frozen
    parameters (requires_grad False), under no_grad; symmetric ``2 - 2 cos`` loss."""

    def __init__(self) -> None:
        super().__init__()
        self.online = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
        self.pred = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.target = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
        with torch.no_grad():
            for pt, po in zip(self.target.parameters(), self.online.parameters(), strict=True):
                pt.copy_(0.99 * pt + 0.01 * po)
                pt.requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        pa, pb = self.pred(self.online(a)), self.pred(self.online(b))
        with torch.no_grad():
            ta, tb = self.target(a), self.target(b)

        def loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return 2 - 2 * (F.normalize(p, dim=-1) * F.normalize(z.detach(), dim=-1)).sum(-1)

        return (loss(pa, tb) + loss(pb, ta)).mean()


@model
def byol_ema_target() -> Case:
    return (BYOL(), (torch.randn(4, 6), torch.randn(4, 6)), torch.zeros(()),
            lambda out, t: out + t)  # fmt: skip


def _barlow(z: torch.Tensor, _t: torch.Tensor, lam: float = 5e-3) -> torch.Tensor:
    a, b = z[0], z[1]
    a = (a - a.mean(0)) / a.std(0)
    b = (b - b.mean(0)) / b.std(0)
    c = a.t() @ b / a.shape[0]
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lam * off


@model
def barlow_twins() -> Case:
    return Encoder(), (torch.randn(6, 6), torch.randn(6, 6)), torch.zeros(6), _barlow


class CLIP(nn.Module):
    """CLIP with a learnable temperature: ``logit_scale`` a parameter, ``exp`` clamped at 100,
    symmetric cross-entropy over the in-batch image-text pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
        self.txt = nn.EmbeddingBag(10, 4, mode="mean")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))

    def forward(self, img: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        i = F.normalize(self.img(img), dim=-1)
        t = F.normalize(self.txt(tok), dim=-1)
        return self.logit_scale.exp().clamp(max=100) * i @ t.t()


def _clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


@model
def clip_learned_temperature() -> Case:
    return (CLIP(), (torch.randn(4, 6), torch.randint(0, 10, (4, 3))), torch.arange(4),
            _clip_loss)  # fmt: skip


class TwoTower(nn.Module):
    """Two-tower recommender: user and item towers (embeddings + MLP), in-batch negatives with
    a log-Q correction of fixed item sampling probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.ue, self.ie = nn.Embedding(10, 6), nn.Embedding(12, 6)
        self.ut = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        self.it = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        self.register_buffer("logq", torch.log(torch.linspace(0.02, 0.2, 12, dtype=torch.float64)))

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        eu, ei = self.ut(self.ue(u)), self.it(self.ie(i))
        return eu @ ei.t() / 0.1 - self.logq[i].unsqueeze(0)


@model
def two_tower_inbatch() -> Case:
    return (TwoTower(), (torch.randint(0, 10, (6,)), torch.randperm(12)[:6]), torch.arange(6),
            nn.CrossEntropyLoss())  # fmt: skip


# ---------------------------------------------------------------- time series


class NBeats(nn.Module):
    """N-BEATS: two blocks with a generic and a polynomial-trend basis (a constant matrix),
    doubly residual backcast / forecast stacking."""

    def __init__(self, back: int = 8, fore: int = 4) -> None:
        super().__init__()
        self.b1 = nn.Sequential(nn.Linear(back, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.t1 = nn.Linear(16, back + fore)
        self.b2 = nn.Sequential(nn.Linear(back, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.t2 = nn.Linear(16, 3, bias=False)
        tb = torch.arange(back, dtype=torch.float64) / back
        tf = torch.arange(fore, dtype=torch.float64) / fore
        self.register_buffer("Pb", torch.stack([tb**k for k in range(3)]))
        self.register_buffer("Pf", torch.stack([tf**k for k in range(3)]))
        self.back = back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        th = self.t1(self.b1(x))
        x = x - th[:, : self.back]
        f = th[:, self.back :]
        th2 = self.t2(self.b2(x))
        x = x - th2 @ self.Pb
        return f + th2 @ self.Pf


@model
def nbeats_blocks() -> Case:
    return NBeats(), torch.randn(6, 8), torch.randn(6, 4), nn.L1Loss()


class DeepAR(nn.Module):
    """DeepAR: a GRU over lagged values and covariates, Gaussian head with
    ``sigma = softplus(.) + 1e-3``; the negative log-likelihood written by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 6, batch_first=True)
        self.mu, self.sig = nn.Linear(6, 1), nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return torch.cat([self.mu(h), F.softplus(self.sig(h)) + 1e-3], -1)


def _gauss_nll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mu, sd = out[..., 0], out[..., 1]
    return (torch.log(sd) + 0.5 * ((y - mu) / sd) ** 2 + 0.5 * math.log(2 * math.pi)).mean()


@model
def deepar_gaussian() -> Case:
    return DeepAR(), torch.randn(3, 5, 3), torch.randn(3, 5), _gauss_nll


class GRUD(nn.Module):
    """GRU-D: missing values imputed with a decay toward the empirical mean,
    ``gamma = exp(-relu(W delta + b))``, hidden state decayed before each GRU cell step."""

    def __init__(self, d: int = 3, h: int = 4) -> None:
        super().__init__()
        self.gx = nn.Linear(d, d)
        self.gh = nn.Linear(d, h)
        self.cell = nn.GRUCell(2 * d, h)
        self.head = nn.Linear(h, 2)
        self.register_buffer("xmean", torch.zeros(d, dtype=torch.float64) + 0.1)
        self.h = h

    def forward(self, x: torch.Tensor, m: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        b, L, d = x.shape
        h = x.new_zeros(b, self.h)
        last = x.new_zeros(b, d)
        for t in range(L):
            gx = torch.exp(-F.relu(self.gx(delta[:, t])))
            gh = torch.exp(-F.relu(self.gh(delta[:, t])))
            last = torch.where(m[:, t] > 0, x[:, t], last)
            xt = m[:, t] * x[:, t] + (1 - m[:, t]) * (gx * last + (1 - gx) * self.xmean)
            h = self.cell(torch.cat([xt, m[:, t]], -1), gh * h)
        return self.head(h)


@model
def gru_d_decay() -> Case:
    m = (torch.rand(3, 4, 3) > 0.3).double()
    delta = torch.rand(3, 4, 3) * 2
    return (GRUD(), (torch.randn(3, 4, 3), m, delta), torch.tensor([0, 1, 1]),
            nn.CrossEntropyLoss())  # fmt: skip


class TFTGating(nn.Module):
    """Temporal Fusion Transformer's gated residual network (ELU, GLU gate, LayerNorm) and
    variable selection (softmax weights over per-variable GRNs); quantile (pinball) heads."""

    def __init__(self, nvar: int = 3, d: int = 4) -> None:
        super().__init__()
        self.proj = nn.ModuleList([nn.Linear(1, d) for _ in range(nvar)])
        self.sel = nn.Linear(nvar * d, nvar)
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.ln = nn.LayerNorm(d)
        self.q = nn.Linear(d, 3)
        self.register_buffer("taus", torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))

    def grn(self, a: torch.Tensor) -> torch.Tensor:
        return self.ln(a + F.glu(self.fc2(F.elu(self.fc1(a)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, nvar)
        es = [p(x[:, i : i + 1]) for i, p in enumerate(self.proj)]
        w = self.sel(torch.cat(es, -1)).softmax(-1)
        h = (torch.stack([self.grn(e) for e in es], 1) * w.unsqueeze(-1)).sum(1)
        return self.q(self.grn(h))


def _quantile_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    taus = torch.tensor([0.1, 0.5, 0.9], dtype=out.dtype)
    e = y.unsqueeze(-1) - out
    return torch.maximum(taus * e, (taus - 1) * e).mean()


@model
def tft_grn_quantiles() -> Case:
    return TFTGating(), torch.randn(6, 3), torch.randn(6), _quantile_loss


class ConvTasNet(nn.Module):
    """Conv-TasNet-lite: 1-D conv encoder (ReLU), TCN blocks (1x1 conv, PReLU, global layer
    norm, dilated depthwise conv, residual), sigmoid masks for 2 speakers, transposed-conv
    decoder; negative SI-SNR loss with a fixed permutation."""

    def __init__(self, n: int = 8, k: int = 4) -> None:
        super().__init__()
        self.enc = nn.Conv1d(1, n, k, k // 2, bias=False)
        self.blocks = nn.ModuleList()
        for dil in (1, 2):
            self.blocks.append(nn.ModuleDict({
                "in": nn.Conv1d(n, n, 1), "act": nn.PReLU(), "gln": nn.GroupNorm(1, n),
                "dw": nn.Conv1d(n, n, 3, padding=dil, dilation=dil, groups=n),
                "out": nn.Conv1d(n, n, 1),
            }))  # fmt: skip
        self.mask = nn.Conv1d(n, 2 * n, 1)
        self.dec = nn.ConvTranspose1d(n, 1, k, k // 2, bias=False)
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, T)
        w = F.relu(self.enc(x))
        h = w
        for blk in self.blocks:
            y = blk["gln"](blk["act"](blk["in"](h)))
            h = h + blk["out"](blk["dw"](y))
        m = torch.sigmoid(self.mask(h)).view(x.shape[0], 2, self.n, -1)
        s = self.dec((m * w.unsqueeze(1)).flatten(0, 1))
        return s.view(x.shape[0], 2, -1)


def _si_snr(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    proj = (est * ref).sum(-1, keepdim=True) * ref / (ref.pow(2).sum(-1, keepdim=True) + 1e-8)
    noise = est - proj
    ratio = proj.pow(2).sum(-1) / (noise.pow(2).sum(-1) + 1e-8)
    return -(10 * torch.log10(ratio + 1e-8)).mean()


@model
def conv_tasnet_sisnr() -> Case:
    return ConvTasNet(), torch.randn(2, 1, 16), torch.randn(2, 2, 16), _si_snr


# ---------------------------------------------------------------- survival, ranking, ordinal


class CoxNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.SELU(), nn.Linear(8, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def _cox_ph(risk: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Cox partial likelihood (Breslow, no ties): samples sorted by descending time, the risk
    set of each event is every earlier (longer-surviving) sample: ``logcumsumexp``."""
    time, event = t[:, 0], t[:, 1]
    order = torch.argsort(time, descending=True)
    r, e = risk[order], event[order]
    return -((r - torch.logcumsumexp(r, 0)) * e).sum() / e.sum()


@model
def cox_partial_likelihood() -> Case:
    t = torch.stack([torch.randperm(8).double() + 1, torch.tensor([1, 0, 1, 1, 0, 1, 1, 0.0])], 1)
    return CoxNet(), torch.randn(8, 5), t, _cox_ph


class Scorer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, items, 4)
        return self.net(x).squeeze(-1)


def _listnet_listmle(s: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    listnet = -(F.softmax(rel, -1) * F.log_softmax(s, -1)).sum(-1).mean()
    order = torch.argsort(rel, -1, descending=True)
    so = torch.gather(s, -1, order)
    # ListMLE: -sum_i (s_i - logsumexp(s_i..s_n)), the tail sums by a flipped logcumsumexp
    tail = torch.flip(torch.logcumsumexp(torch.flip(so, [-1]), -1), [-1])
    return listnet + (tail - so).sum(-1).mean()


@model
def listnet_listmle() -> Case:
    return Scorer(), torch.randn(3, 5, 4), torch.rand(3, 5) * 3, _listnet_listmle


class CORAL(nn.Module):
    """CORAL ordinal regression: one shared weight vector, K-1 rank biases, BCE with logits on
    the cumulative ``y > k`` levels."""

    def __init__(self, K: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.w = nn.Linear(8, 1, bias=False)
        self.b = nn.Parameter(torch.arange(K - 1, 0, -1, dtype=torch.float64) / K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(self.body(x)) + self.b


def _coral_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    levels = (y.unsqueeze(1) > torch.arange(logits.shape[1]).unsqueeze(0)).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, levels, reduction="sum") / y.shape[0]


@model
def coral_ordinal() -> Case:
    return CORAL(), torch.randn(8, 5), torch.randint(0, 4, (8,)), _coral_loss


# ---------------------------------------------------------------- structured softmaxes, MoE


class HierSoftmax(nn.Module):
    """Two-level (class-based) hierarchical softmax: p(cluster) p(word | cluster); 9 words in
    3 clusters; NLL of the target word gathered from both levels."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.body = nn.Linear(4, d)
        self.cluster = nn.Linear(d, 3)
        self.within = nn.Linear(d, 9)  # 3 clusters x 3 words

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        lc = F.log_softmax(self.cluster(h), -1)  # (B, 3)
        lw = F.log_softmax(self.within(h).view(-1, 3, 3), -1)  # (B, 3, 3)
        return (lc.unsqueeze(-1) + lw).flatten(1)  # log p(word), (B, 9)


@model
def hierarchical_softmax() -> Case:
    return HierSoftmax(), torch.randn(6, 4), torch.randint(0, 9, (6,)), nn.NLLLoss()


class MoS(nn.Module):
    """Mixture of softmaxes: K softmaxes over the vocabulary mixed by a prior; the loss is
    the NLL of ``log(sum_k pi_k softmax_k)`` (probabilities mixed, then log)."""

    def __init__(self, d: int = 6, K: int = 3, V: int = 7) -> None:
        super().__init__()
        self.K, self.d = K, d
        self.prior = nn.Linear(4, K)
        self.latent = nn.Linear(4, K * d)
        self.dec = nn.Linear(d, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pi = self.prior(x).softmax(-1)  # (B, K)
        h = torch.tanh(self.latent(x)).view(-1, self.K, self.d)
        p = self.dec(h).softmax(-1)  # (B, K, V)
        return torch.log((pi.unsqueeze(-1) * p).sum(1) + 1e-8)


@model
def mixture_of_softmaxes() -> Case:
    return MoS(), torch.randn(6, 4), torch.randint(0, 7, (6,)), nn.NLLLoss()


class SwitchMoE(nn.Module):
    """Switch-Transformer layer: top-1 routing (argmax), expert outputs scaled by the router
    probability, the load-balancing auxiliary loss ``E sum_i f_i P_i`` (f the dispatch
    fraction through ``scatter_add`` of ones, P the mean router probability)."""

    def __init__(self, d: int = 4, E: int = 3) -> None:
        super().__init__()
        self.E = E
        self.router = nn.Linear(d, E)
        self.experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, d)) for _ in range(E)]
        )
        self.head = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, d)
        p = self.router(x).softmax(-1)
        top = p.argmax(-1)
        gate = p.gather(1, top[:, None])
        outs = torch.stack([e(x) for e in self.experts], 1)  # (N, E, d)
        y = outs.gather(1, top[:, None, None].expand(-1, 1, x.shape[1])).squeeze(1) * gate
        f = x.new_zeros(self.E).scatter_add(0, top, x.new_ones(x.shape[0])) / x.shape[0]
        aux = self.E * (f * p.mean(0)).sum()
        return torch.cat([self.head(x + y), aux.expand(x.shape[0], 1)], 1)


def _moe_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out[:, :2], y) + 0.01 * out[0, 2]


@model
def switch_moe_aux_loss() -> Case:
    return SwitchMoE(), torch.randn(8, 4), torch.randint(0, 2, (8,)), _moe_loss


# ---------------------------------------------------------------- knowledge graphs


class RotatE(nn.Module):
    """RotatE: entity embeddings as (re, im) pairs, relations as phases; the tail scored by
    ``|h o r - t|`` (complex modulus per dimension summed); a TransE L1 score beside it;
    self-adversarial negative sampling loss with logsigmoid."""

    def __init__(self, ne: int = 8, nr: int = 3, d: int = 4, gamma: float = 6.0) -> None:
        super().__init__()
        self.ent = nn.Embedding(ne, 2 * d)
        self.phase = nn.Embedding(nr, d)
        self.rel_t = nn.Embedding(nr, 2 * d)
        self.gamma, self.d = gamma, d

    def score(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        hr, hi = self.ent(h).chunk(2, -1)
        tr, ti = self.ent(t).chunk(2, -1)
        ph = self.phase(r) * math.pi
        cr, ci = torch.cos(ph), torch.sin(ph)
        re, im = hr * cr - hi * ci - tr, hr * ci + hi * cr - ti
        rot = torch.stack([re, im], 0).norm(dim=0).sum(-1)
        transe = (self.ent(h) + self.rel_t(r) - self.ent(t)).abs().sum(-1)
        return self.gamma - rot - 0.1 * transe

    def forward(self, h: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                neg: torch.Tensor) -> torch.Tensor:  # fmt: skip
        pos = self.score(h, r, t)  # (B,)
        ns = self.score(h.unsqueeze(1).expand_as(neg), r.unsqueeze(1).expand_as(neg), neg)
        w = F.softmax(ns, -1).detach()
        return -F.logsigmoid(pos) - (w * F.logsigmoid(-ns)).sum(-1)


@model
def rotate_transe_kg() -> Case:
    h, r, t = torch.randint(0, 8, (4,)), torch.randint(0, 3, (4,)), torch.randint(0, 8, (4,))
    neg = torch.randint(0, 8, (4, 3))
    return (RotatE(), (h, r, t, neg), torch.zeros(4),
            lambda out, z: (out + z).mean())  # fmt: skip
