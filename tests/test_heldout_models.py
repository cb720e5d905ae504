"""Held-out model findings (``scripts/probe_heldout.py``): each fix checked against torch.

Native columns equal torch's eager autograd bit for bit; the certified exact reference holds
torch float64's loss and gradients in its balls (plus a 1e-9 relative allowance for float64's
own rounding) or, where torch float64 is itself inexact, the mpmath oracle's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.native import native_run
from tests.oracle.native_exact import _bits, _eager, check

# ---- a constant written in place (sinusoidal positions) ---------------------------------------


class SinusoidalPositions(nn.Module):
    """``pe = zeros(t, d); pe[:, 0::2] = sin(...)``: a constant (no parameter, no floating
    data) filled in place after it is created; eager reads the filled table."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.d = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        pos = torch.arange(t, dtype=x.dtype).unsqueeze(1)
        div = torch.exp(torch.arange(0, self.d, 2, dtype=x.dtype) * (-math.log(10000.0) / self.d))
        pe = torch.zeros(t, self.d, dtype=x.dtype)
        h = self.inp(x) + pe  # read before the writes: zeros
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        return (h * (self.inp(x) + pe)).sum((1, 2))  # read after them: the table


def test_constant_written_in_place_is_read_as_written() -> None:
    torch.manual_seed(0)
    check(SinusoidalPositions(), torch.randn(2, 4, 3), torch.randn(2), nn.MSELoss())


# ---- baddbmm (nn.MultiheadAttention with need_weights and a mask) ----------------------------


class PaddedAttention(nn.Module):
    """``nn.MultiheadAttention`` with a key padding mask and the default ``need_weights``:
    torch merges the masks into a float ``-inf`` mask and adds it with ``baddbmm``."""

    def __init__(self, causal: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.causal = causal

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        mask = torch.triu(torch.ones(3, 3, dtype=torch.bool), diagonal=1) if self.causal else None
        return self.attn(x, x, x, key_padding_mask=pad, attn_mask=mask)[0]


def test_multihead_attention_need_weights_baddbmm() -> None:
    torch.manual_seed(1)
    pad = torch.tensor([[False, False, True], [False, False, False]])
    ex = check(PaddedAttention(), (torch.randn(2, 3, 4), pad), torch.randn(2, 3, 4), nn.MSELoss())
    # the key third of in_proj_bias: softmax ignores a shift per query (proven zeros)
    assert ex.zero("grads/attn.in_proj_bias").reshape(-1)[4:8].all()


def test_multihead_attention_need_weights_against_oracle() -> None:
    from tests.oracle import graph_reference as R
    from tests.test_graph_oracle import check as oracle_check

    torch.manual_seed(6)
    pad = torch.tensor([[False, False, False], [False, False, True]])

    def f(p: dict, x: np.ndarray, pad: np.ndarray, y: np.ndarray) -> Any:
        return R.mse(R.multihead(x, p, "attn", 2, R.causal_bias(3), pad), y)

    oracle_check(PaddedAttention(causal=True), (torch.randn(2, 3, 4), pad), torch.randn(2, 3, 4),
                 nn.MSELoss(), f, undetermined=True)  # fmt: skip


class Baddbmm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(2, 3, 4))
        self.b = nn.Parameter(torch.randn(2, 3, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.baddbmm(self.b, torch.tanh(self.a), x, beta=0.5, alpha=2.0)
        return torch.baddbmm(h, h, x.transpose(1, 2) @ x, beta=0.0) + torch.baddbmm(h, self.a, x)


def test_baddbmm_beta_alpha() -> None:
    torch.manual_seed(2)
    check(Baddbmm(), torch.randn(2, 4, 5), torch.randn(2, 3, 5), nn.MSELoss())
    net = fpgrad.from_module(Baddbmm(), torch.randn(2, 4, 5), torch.randn(2, 3, 5), nn.MSELoss())
    fpgrad.compare(net, "fp8_e4m3,bfloat16:emulated")  # the emulated columns interpret it


# ---- zeros by cancellation: masked softmax rows, 1x1 convolutions ------------------------------


class CausalSelfAttention(nn.Module):
    """Hand-written (nanoGPT-style) causal attention: ``masked_fill(-inf)``, softmax; its
    backward runs ``masked_fill(g, mask, 0)`` after the softmax backward. ``fill`` other than
    -inf: a finite score overwritten before the softmax (a near miss: no zero there)."""

    def __init__(self, d: int = 4, fill: float = float("-inf")) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, 2)
        self.d, self.fill = d, fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        q, k, v = self.qkv(x).split(self.d, dim=-1)
        s = q @ k.transpose(-2, -1) / math.sqrt(self.d)
        s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1), self.fill)
        return self.out((s.softmax(dim=-1) @ v).mean(1))


def test_masked_softmax_key_bias_is_a_proven_zero() -> None:
    torch.manual_seed(3)
    ex = check(CausalSelfAttention(), torch.randn(2, 4, 4), torch.randint(0, 2, (2,)),
               nn.CrossEntropyLoss())  # fmt: skip
    zero = ex.zero("grads/qkv.bias").reshape(-1)
    assert zero[4:8].all() and not zero[:4].any() and not zero[8:].any()


def test_finite_fill_before_softmax_is_no_zero() -> None:
    torch.manual_seed(3)
    ex = check(CausalSelfAttention(fill=0.0), torch.randn(2, 4, 4), torch.randint(0, 2, (2,)),
               nn.CrossEntropyLoss())  # fmt: skip
    assert not ex.zero("grads/qkv.bias").any()


def _separable(padding: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Conv2d(3, 4, 1, padding=padding),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))  # fmt: skip


def test_bias_before_pointwise_conv_and_batch_norm_is_a_proven_zero() -> None:
    torch.manual_seed(4)
    x = torch.randn(3, 3, 4, 4)
    model = _separable(0)
    model(x)  # materialise the lazy layer
    ex = check(model, x, torch.randint(0, 2, (3,)), nn.CrossEntropyLoss())
    assert ex.zero("grads/0.bias").all() and ex.zero("grads/1.bias").all()
    # padding makes the 1x1 convolution's border outputs its bias alone: no zero
    model = _separable(1)
    model(x)
    ex = check(model, x, torch.randint(0, 2, (3,)), nn.CrossEntropyLoss())
    assert not ex.zero("grads/0.bias").any() and ex.zero("grads/1.bias").all()


# ---- native float16/bfloat16 columns of nn.RMSNorm (torch upcasts inside the kernel) ----------


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


def test_rms_norm_half_columns_are_eager_bit_for_bit() -> None:
    torch.manual_seed(5)
    model, x, y = SwiGLU(), torch.randn(4, 6), torch.randint(0, 3, (4,))
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    for prec, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        tr = native_run(net.graph, prec)
        el, eg = _eager(model, x, y, nn.CrossEntropyLoss(), dt)
        _bits(tr.loss, el)
        for k, g in eg.items():
            _bits(tr.grads[k], g)
        # the values torch computed in float32 inside the kernel are judged as float32
        assert {tr.formats[k] for k in tr.values} == {prec, "float32"}
    cmp = fpgrad.compare(net, "float16,bfloat16,float32")
    assert cmp.certified_digits >= 17 and "norm" in cmp.render(max_rows=2)


class DtypeDependent(nn.Module):
    """A forward that computes something else in float16 (a cast and an extra op)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            x = x.float().exp().to(x.dtype)
        return self.fc(x)


def test_forward_depending_on_dtype_beyond_casts_is_refused() -> None:
    from fpgrad.errors import InputError

    net = fpgrad.from_module(DtypeDependent(), torch.randn(2, 3), torch.randn(2, 2), nn.MSELoss())
    with pytest.raises(InputError, match="diverges"):
        native_run(net.graph, "float16")


# ---- nn.EmbeddingBag ---------------------------------------------------------------------------


class Bags(nn.Module):
    """Mean bags over 2-D input (padding index, a bag of padding only), sum bags over offsets
    (an empty bag, ``include_last_offset``, per-sample weights)."""

    def __init__(self, pad: int | None = None, last: bool = False) -> None:
        super().__init__()
        self.mean = nn.EmbeddingBag(10, 4, mode="mean", padding_idx=pad)
        self.sum = nn.EmbeddingBag(10, 4, mode="sum", include_last_offset=last)
        self.last = last

    def forward(self, tok: torch.Tensor, off: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        off = torch.cat([off, torch.tensor([tok.numel()])]) if self.last else off
        return (self.mean(tok) * self.sum(tok.reshape(-1), off, per_sample_weights=w)).sum(1)


@pytest.mark.parametrize(("pad", "last"), [(None, False), (4, True)])
def test_embedding_bag_sum_and_mean(pad: int | None, last: bool) -> None:
    torch.manual_seed(6)
    tok = torch.tensor([[1, 2, 3], [4, 4, 9], [4, 4, 4]])
    data = (tok, torch.tensor([0, 2, 2]), torch.randn(9))
    check(Bags(pad, last), data, torch.randn(3), nn.MSELoss())
    net = fpgrad.from_module(Bags(pad, last), data, torch.randn(3), nn.MSELoss())
    fpgrad.compare(net, "fp8_e4m3,bfloat16:emulated")


def test_embedding_bag_max_is_refused_in_one_line() -> None:
    from fpgrad.errors import InputError

    model = nn.Sequential(nn.EmbeddingBag(6, 3, mode="max"), nn.Linear(3, 1))
    net = fpgrad.from_module(model, torch.tensor([[1, 2], [3, 3]]), torch.randn(2, 1), nn.MSELoss())
    with pytest.raises(InputError, match="mode='max' is not supported"):
        exact_graph(net.graph)


# ---- nn.Bilinear (aten._trilinear) --------------------------------------------------------------


class BilinearHead(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.bil = nn.Bilinear(4, 5, 3, bias=bias)
        self.fc = nn.Linear(5, 5)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.bil(a, torch.tanh(self.fc(b)))


@pytest.mark.parametrize("bias", [True, False])
def test_bilinear(bias: bool) -> None:
    torch.manual_seed(7)
    data = (torch.randn(4, 4), torch.randn(4, 5))
    check(BilinearHead(bias), data, torch.randint(0, 3, (4,)), nn.CrossEntropyLoss())
    net = fpgrad.from_module(BilinearHead(bias), data, torch.randint(0, 3, (4,)), nn.CrossEntropyLoss())
    fpgrad.compare(net, "fp8_e4m3,bfloat16:emulated")


def test_bilinear_against_oracle() -> None:
    from tests.oracle import graph_reference as R
    from tests.test_graph_oracle import check as oracle_check

    torch.manual_seed(8)

    def f(p: dict, a: np.ndarray, b: np.ndarray, y: np.ndarray) -> Any:
        w, bias = p["bil.weight"], p["bil.bias"]
        out = np.einsum("ni,oij,nj->no", a, w, b) + bias
        return R.mse(out, y)

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bil = nn.Bilinear(3, 2, 2)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.bil(a, b)

    oracle_check(Two(), (torch.randn(3, 3), torch.randn(3, 2)), torch.randn(3, 2), nn.MSELoss(), f)


# ---- a fused (oneDNN) LSTM column beside columns with op-by-op values --------------------------


class BiLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 3)
        self.lstm = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.emb(tok))
        return self.fc(out.amax(1))


def test_render_with_a_fused_lstm_column(tmp_path: Any) -> None:
    """float16 runs the graph's ops (values per op), float32 oneDNN's fused LSTM (none): the
    "where the signal died" table and the report's figure show the columns that have them."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    torch.manual_seed(9)
    net = fpgrad.from_module(BiLSTM(), torch.randint(0, 8, (2, 4)), torch.tensor([0, 1]),
                             nn.CrossEntropyLoss())  # fmt: skip
    cmp = fpgrad.compare(net, "float16,float32")
    assert cmp.attribution["float16"]["places"] and not cmp.attribution["float32"]["places"]
    text = cmp.render(max_rows=4)
    assert "Where the signal died" in text
    from fpgrad.present.report.own import write_compare_report

    write_compare_report(cmp, tmp_path)
    assert (tmp_path / "signal.png").stat().st_size > 0
    only = fpgrad.compare(net, "float32")
    only.render(max_rows=4)
    write_compare_report(only, tmp_path / "only")


# ---- weight normalisation (parametrizations.weight_norm) ----------------------------------------


def _weight_normed(dim: int | None) -> nn.Module:
    from torch.nn.utils.parametrizations import weight_norm

    return nn.Sequential(weight_norm(nn.Conv1d(2, 4, 3, padding=1), dim=dim), nn.GELU(),
                         nn.Flatten(), weight_norm(nn.Linear(4 * 6, 2), dim=1))  # fmt: skip


@pytest.mark.parametrize("dim", [0, None])
def test_weight_norm(dim: int | None) -> None:
    torch.manual_seed(10)
    x, y = torch.randn(3, 2, 6), torch.randn(3, 2)
    check(_weight_normed(dim), x, y, nn.MSELoss())
    net = fpgrad.from_module(_weight_normed(dim), x, y, nn.MSELoss())
    fpgrad.compare(net, "bfloat16:emulated,float16,bfloat16")
