"""Zeros by cancellation proven on captured graphs (fpgrad/graph/identities.py).

Held-out style models (several shapes and seeds) of the kinds the identities cover: a bias
before training-mode batch norm (Conv1d, Conv2d, Linear; also through a second Linear) and
attention's key bias (nn.MultiheadAttention with and without masks, separate q/k/v Linears
with scaled_dot_product_attention or a hand-written softmax). The exact reference must
certify >= 17 digits with no undetermined element, give exact zeros exactly where the
identity holds, and agree with torch float64. Near misses must stay certified non-zero.
The rules themselves are checked on random data that satisfies their input facts.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.graph import identities as ids
from fpgrad.graph.exact import exact_graph, settle_zeros
from tests.graph_models import small_cnn, transformer_block

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched")
CE = nn.CrossEntropyLoss()


# ---- helpers ---------------------------------------------------------------------------------
def _torch64(model: nn.Module, inputs: tuple, y: torch.Tensor, loss=CE) -> dict:
    m = copy.deepcopy(model).double()
    xs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    names = [n for n, _ in m.named_parameters()]
    grads = torch.autograd.grad(loss(m(*xs), y), [p for _, p in m.named_parameters()])
    return {n: g.numpy() for n, g in zip(names, grads, strict=True)}


def _exact(model: nn.Module, inputs: tuple, y: torch.Tensor, loss=CE):  # noqa: ANN202
    net = fpgrad.from_module(model, inputs, y, loss)
    return exact_graph(net.graph)


def check(model: nn.Module, inputs: tuple, y: torch.Tensor, zeros: dict, method: str = "fast",
          loss=CE):  # noqa: ANN201  # fmt: skip
    """Certified, no undetermined element, torch float64 agreement; ``zeros[param]`` is the
    exact set of elements proven 0 (a slice or a bool mask); every other listed parameter,
    and every unlisted one, has no zero by identity."""
    ex = _exact(model, inputs, y, loss)
    assert ex.method == method
    assert ex.certified_digits >= 17
    assert ex.result.undetermined_count == 0
    ref = _torch64(model, inputs, y, loss)
    scale = max(float(np.max(np.abs(t))) for t in ref.values())
    for name, t in ref.items():
        e = ex.float64(f"grads/{name}")
        z = ex.result.zero(f"grads/{name}")
        want = np.zeros(z.shape, dtype=bool)
        if name in zeros:
            want.reshape(-1)[zeros[name]] = True
        if name in zeros or not z.any():  # unlisted: structural zeros (embeddings) allowed
            assert np.array_equal(z, want), (name, z, want)
        # torch float64 agrees to 1e-8 relative; where the exact value is 0 by cancellation,
        # torch computes rounding noise, small against the model's gradients
        rest = ~want
        if rest.any():
            bound = 1e-8 * float(np.max(np.abs(t[rest])))
            assert np.max(np.abs(e - t)[rest]) <= bound, name
        assert np.all(np.abs(t[want]) <= 1e-8 * scale), name
    return ex


def certified_nonzero(ex, name: str) -> None:  # noqa: ANN001
    key = f"grads/{name}"
    assert not ex.result.zero(key).any()
    assert not ex.result.undetermined(key).any()
    assert np.all(ex.digits[key] >= 17)


# ---- models ----------------------------------------------------------------------------------
class ConvBN(nn.Module):
    def __init__(self, dims: int, cin: int, c: int, k: int, pool: bool) -> None:
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv = conv(cin, c, k, padding=1)
        self.bn = bn(c)
        self.act = nn.SiLU()
        self.pool = (nn.MaxPool2d(2) if dims == 2 else nn.Identity()) if pool else nn.Identity()
        self.fc = nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act(self.bn(self.conv(x))))
        return self.fc(h.view(h.size(0), -1))


def conv_bn(dims: int, seed: int, n: int, cin: int, c: int, size: int, pool: bool = False):  # noqa: ANN201
    torch.manual_seed(seed)
    shape = (n, cin, size) if dims == 1 else (n, cin, size, size)
    x = torch.randn(*shape)
    model = ConvBN(dims, cin, c, 3, pool)
    model(x)  # materialise the lazy Linear
    return model, (x,), torch.randint(0, 3, (n,))


class LinearBN(nn.Module):
    def __init__(self, d_in: int, d: int, two: bool) -> None:
        super().__init__()
        self.a = nn.Linear(d_in, d)
        self.b = nn.Linear(d, d) if two else nn.Identity()
        self.bn = nn.BatchNorm1d(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bn(self.b(self.a(x)))))


class MHA(nn.Module):
    def __init__(self, d: int, heads: int, mask: str) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mask = mask
        self.head = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        kw: dict = {}
        if self.mask in ("causal", "both"):
            kw["attn_mask"] = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        if self.mask in ("padding", "both"):
            kw["key_padding_mask"] = pad
        if self.mask == "float":  # an additive per-key float mask: shift-invariant per query
            kw["attn_mask"] = torch.linspace(-1.0, 2.0, n).expand(n, n).contiguous()
        h = x + self.attn(x, x, x, need_weights=False, **kw)[0]
        return self.head(h).flatten(0, 1)


class QKV(nn.Module):
    """Separate q/k/v Linears; SDPA or a hand-written softmax; near-miss variants."""

    def __init__(self, d: int, heads: int, kind: str) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o = nn.Linear(d, 4)
        self.heads, self.kind = heads, kind
        if kind == "some_keys":
            self.k = nn.Linear(d, d, bias=False)
            self.kb = nn.Parameter(torch.randn(d))

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        k = self.k(x)
        if self.kind == "some_keys":  # a bias added to the first key only: not shift-invariant
            k = torch.cat([k[:, :1] + self.kb, k[:, 1:]], dim=1)
        q, kk, v = self.split(self.q(x)), self.split(k), self.split(self.v(x))
        if self.kind == "softmax":
            s = q @ kk.transpose(-1, -2) / math.sqrt(d // self.heads)
            a = torch.softmax(s, dim=-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, kk, v, is_causal=self.kind == "causal")
        h = a.transpose(1, 2).reshape(b, n, d)
        if self.kind == "k_elsewhere":  # the key also feeds the output directly
            h = h + k
        return self.o(h).flatten(0, 1)


def mha(seed: int, d: int, heads: int, n: int, length: int, mask: str):  # noqa: ANN201
    torch.manual_seed(seed)
    model = MHA(d, heads, mask)
    x = torch.randn(n, length, d)
    pad = torch.zeros(n, length, dtype=torch.bool)
    pad[-1, -1] = True
    return model, (x, pad), torch.randint(0, 5, (n * length,))


def qkv(seed: int, d: int, heads: int, n: int, length: int, kind: str):  # noqa: ANN201
    torch.manual_seed(seed)
    return QKV(d, heads, kind), (torch.randn(n, length, d),), torch.randint(0, 4, (n * length,))


# ---- batch norm ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dims,seed,n,cin,c,size,pool",
    [(2, 1, 2, 1, 3, 4, True), (2, 2, 3, 2, 2, 3, False), (1, 3, 4, 2, 3, 5, False),
     (1, 4, 2, 1, 2, 4, False)],
)  # fmt: skip
def test_conv_bias_before_batch_norm_is_proven_zero(dims, seed, n, cin, c, size, pool) -> None:  # noqa: ANN001
    model, inputs, y = conv_bn(dims, seed, n, cin, c, size, pool)
    check(model, inputs, y, {"conv.bias": slice(None)})


@pytest.mark.parametrize("seed", [0, 5])
def test_small_cnn_of_the_graph_tests(seed: int) -> None:
    model, x, y = small_cnn(seed)
    ex = check(model, (x,), y, {"conv1.bias": slice(None)})
    assert ex.bits == 150  # the fast balls' level: no escalation


@pytest.mark.parametrize("seed,n,two", [(0, 5, False), (1, 3, True), (2, 7, True)])
def test_linear_bias_before_batch_norm_is_proven_zero(seed: int, n: int, two: bool) -> None:
    torch.manual_seed(seed)
    model = LinearBN(4, 3, two)
    x, y = torch.randn(n, 4), torch.randint(0, 3, (n,))
    # through a second Linear too: a.bias's gradient is W_b^T (sum of BN's dx) = 0
    zeros = {"a.bias": slice(None), **({"b.bias": slice(None)} if two else {})}
    check(model, (x,), y, zeros)


def test_eval_mode_batch_norm_is_not_a_zero() -> None:
    model, x, y = small_cnn(0, train=False)  # running statistics: the bias matters
    ex = check(model, (x,), y, {})
    certified_nonzero(ex, "conv1.bias")


class BiasAfterBN(nn.Module):
    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2, affine=False)
        self.shift = nn.Parameter(torch.randn(1, 2, 1, 1))
        self.skip = skip
        self.fc = nn.Linear(2 * 9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        h = torch.tanh(self.bn(c) + self.shift)
        if self.skip:  # the conv output also bypasses batch norm
            h = h + 0.5 * c
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("skip", [False, True])
def test_bias_after_batch_norm_or_around_it_is_not_a_zero(skip: bool) -> None:
    torch.manual_seed(3)
    model = BiasAfterBN(skip)
    x, y = torch.randn(3, 1, 3, 3), torch.tensor([0, 1, 2])
    ex = check(model, (x,), y, {} if skip else {"conv.bias": slice(None)})
    certified_nonzero(ex, "shift")
    if skip:
        certified_nonzero(ex, "conv.bias")


# ---- attention -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "seed,d,heads,n,length,mask",
    [(0, 4, 2, 2, 3, "none"), (1, 4, 1, 1, 4, "causal"), (2, 6, 3, 2, 3, "padding"),
     (3, 4, 2, 2, 3, "both"), (4, 4, 2, 2, 3, "float")],
)  # fmt: skip
def test_mha_key_bias_is_proven_zero(seed, d, heads, n, length, mask) -> None:  # noqa: ANN001
    model, inputs, y = mha(seed, d, heads, n, length, mask)
    check(model, inputs, y, {"attn.in_proj_bias": slice(d, 2 * d)})


@pytest.mark.parametrize(
    "seed,d,heads,length,kind",
    [(0, 4, 2, 3, "sdpa"), (1, 6, 2, 4, "causal"), (2, 4, 1, 3, "softmax"),
     (3, 4, 2, 2, "softmax")],
)  # fmt: skip
def test_separate_key_linear_bias_is_proven_zero(seed, d, heads, length, kind) -> None:  # noqa: ANN001
    model, inputs, y = qkv(seed, d, heads, 2, length, kind)
    check(model, inputs, y, {"k.bias": slice(None)})


@pytest.mark.parametrize("kind", ["k_elsewhere", "some_keys"])
def test_key_bias_near_misses_are_not_zeros(kind: str) -> None:
    model, inputs, y = qkv(7, 4, 2, 2, 3, kind)
    ex = check(model, inputs, y, {})
    certified_nonzero(ex, "kb" if kind == "some_keys" else "k.bias")


def test_transformer_block_stays_on_the_fast_balls() -> None:
    model, inputs, y = transformer_block()  # GELU: the balls' ncdf/npdf slots
    ex = check(model, inputs, y, {"attn.in_proj_bias": slice(4, 8)})
    assert ex.bits == 150


class Shifted(nn.Module):
    """A scalar added to every feature before LayerNorm, and to every logit."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.s = nn.Parameter(torch.tensor([0.3]))
        self.ln = nn.LayerNorm(4)
        self.out = nn.Linear(4, 3)
        self.c = nn.Parameter(torch.tensor([0.7]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(self.inp(x) + self.s)) + self.c


def test_layer_norm_and_log_softmax_shifts_are_proven_zero() -> None:
    torch.manual_seed(2)
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    check(Shifted(), (x,), y, {"s": slice(None), "c": slice(None)})


# ---- the rules on random data ----------------------------------------------------------------
def _sample(gid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random values satisfying ``gid``: each group's values minus their mean (sum ~ 0)."""
    g = gid.ravel()
    x = rng.standard_normal(g.size)
    x[g == ids.ZERO] = 0.0
    pos = g >= 0
    if pos.any():
        sums = np.bincount(g[pos], weights=x[pos])
        counts = np.bincount(g[pos])
        x[pos] -= (sums / counts)[g[pos]]
    return x.reshape(gid.shape)


def _holds(fact: np.ndarray | None, value: np.ndarray) -> bool:
    if fact is None:
        return True
    f, v = fact.ravel(), value.ravel()
    if np.any(np.abs(v[f == ids.ZERO]) > 1e-12):
        return False
    pos = f >= 0
    sums = np.bincount(f[pos], weights=v[pos]) if pos.any() else np.zeros(0)
    return bool(np.all(np.abs(sums) <= 1e-12))


def _along(shape: tuple, axes: list) -> np.ndarray:
    out = ids._along(shape, axes)
    assert out is not None
    return out


def test_rules_keep_facts_that_hold_on_random_data() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = _along((3, 4, 2), [1])  # sums over axis 1 are 0
        b = _along((3, 4, 2), [0, 1])
        xa, xb = _sample(a, rng), _sample(b, rng)
        cases = [
            (ids.reduce_axes(a, [1], False), xa.sum(1)),
            (ids.reduce_axes(a, [0], True), xa.sum(0, keepdims=True)),
            (ids.reduce_axes(b, [1, 2], False), xb.sum((1, 2))),
            (ids.add(a, b, a.shape), xa + 2.5 * xb),
            (ids.broadcast(a, (3, 4, 2), (5, 3, 4, 2)), np.broadcast_to(xa, (5, 3, 4, 2))),
            (ids.scale(a, np.broadcast_to(np.arange(3)[:, None, None], a.shape)),
             xa * rng.standard_normal(3)[:, None, None]),
            (ids.matmul(a[0], None, (4, 2), (2, 5)), xa[0] @ rng.standard_normal((2, 5))),
            (ids.matmul(None, np.ascontiguousarray(a[0].T), (5, 2), (2, 4)),
             rng.standard_normal((5, 2)) @ xa[0].T),
        ]  # fmt: skip
        for fact, value in cases:
            assert fact is not None
            assert _holds(fact, value)
    # conclusions: a sum over a group's axis is exactly 0 (ZERO), a copy is no conclusion
    assert (ids.reduce_axes(a, [1], False) == ids.ZERO).all()
    assert (ids.reduce_axes(b, [0, 1], False) == ids.ZERO).all()
    assert not (ids.reduce_axes(b, [1], False) == ids.ZERO).any()


def test_rules_drop_facts_that_would_not_hold() -> None:
    a = _along((3, 4), [1])
    # a slice of a group: no fact (its part need not sum to 0)
    assert ids.gather(a, np.arange(12).reshape(3, 4)[:, :2].copy()) is None
    # a factor that varies inside a group: no fact
    assert ids.scale(a, np.broadcast_to(np.arange(4), (3, 4))) is None
    # adding an unknown tensor, or a group that spans rows times a matrix: no fact
    assert ids.add(a, None, a.shape) is None
    assert ids.matmul(_along((3, 4), [0, 1]), None, (3, 4), (4, 2)) is None
    # summing over the other axis keeps the groups but concludes nothing
    out = ids.reduce_axes(a, [0], False)
    assert out is not None and not (out == ids.ZERO).any()


def test_a_proof_contradicted_by_an_enclosure_is_an_error() -> None:
    from fpgrad.arith.ball import BallArith

    ar = BallArith(100)
    value = ar.asarray(np.array([1.0, 0.0]))
    out = settle_zeros(ar, value, np.array([False, True]), "x")
    assert ar.to_float64(out).tolist() == [1.0, 0.0]
    with pytest.raises(RuntimeError, match="bug"):
        settle_zeros(ar, value, np.array([True, False]), "x")


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True,
                                                norm_first=True)  # fmt: skip
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x)).flatten(0, 1)


class CrossAttention(nn.Module):
    """kdim and vdim differ from the embedding: separate projection weights, packed bias."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=5, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, k, v, need_weights=False)[0]).flatten(0, 1)


def test_torch_encoder_layer_and_cross_attention_key_bias() -> None:
    torch.manual_seed(0)
    y = torch.randint(0, 3, (6,))
    ex = check(EncoderLayer(), (torch.randn(2, 3, 4),), y,
               {"layer.self_attn.in_proj_bias": slice(4, 8)})  # fmt: skip
    assert ex.bits == 150
    inputs = (torch.randn(2, 3, 4), torch.randn(2, 4, 3), torch.randn(2, 4, 5))
    check(CrossAttention(), inputs, y, {"attn.in_proj_bias": slice(4, 8)})


# ---- GELU's normal CDF and density on the fast balls -----------------------------------------
@pytest.mark.parametrize("name", ["ncdf", "npdf"])
def test_ball_normal_cdf_and_density_enclose_arb(name: str) -> None:
    """Every fast ball (points and balls with a radius) overlaps Arb's at 600 bits, across the
    series range, its edge at |a| = 12 and the tails; >= 17 digits where Phi >= 1e-35."""
    from fpgrad.arith import arb as arbmod
    from fpgrad.arith import expansion as xp
    from fpgrad.arith.arb import ArbArith
    from fpgrad.arith.ball import Ball, BallArith
    from fpgrad.reference.exact import _mp_context

    xs = np.concatenate([np.linspace(-13, 13, 131), [0.0, 3.3e-8, -0.7, 11.999, -11.999, 12.0,
                         -12.0, 12.0001, -12.0001, 25.0, -25.0]])  # fmt: skip
    ref_ar = ArbArith(600)
    ref = getattr(ref_ar, name)(ref_ar.asarray(xs))
    mids, rr = arbmod.to_mpf(ref, 600), arbmod.radii(ref)
    for rad in (np.zeros(xs.size), np.abs(xs) * 1e-30 + 1e-40):
        ar = BallArith(150)
        b = ar.asarray(xs)
        out = getattr(ar, name)(Ball(b.mid, rad))
        assert ar.range_errors == 0
        got = xp.to_mpf(out.mid, _mp_context(out.mid.shape[0]))
        for i in range(xs.size):
            assert abs(got[i] - mids[i]) <= out.rad[i] + rr[i], xs[i]
            if abs(xs[i]) <= 12 and xs[i] >= -10.5:
                assert out.rad[i] <= 1e-17 * abs(float(mids[i])), xs[i]


def test_no_key_bias_claim_when_a_query_sees_no_key() -> None:
    """A sequence whose every key is padded has no softmax (0/0): nothing is claimed."""
    model, (x, pad), y = mha(0, 4, 2, 2, 3, "padding")
    pad[0, :] = True
    graph = fpgrad.from_module(model, (x, pad), y, CE).graph
    assert ids.prove_zeros(graph).zeros == {}
    pad[0, :] = False  # the same model with a key for every query: the k third is proven
    zeros = ids.prove_zeros(fpgrad.from_module(model, (x, pad), y, CE).graph).zeros
    assert [int(m.sum()) for m in zeros.values()] == [4]
