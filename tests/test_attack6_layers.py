"""Layers attack6 drove to their corners and found certified correctly, kept as regressions:
each against the interval oracle (:mod:`tests.oracle.interval_ad`, written from the layer's
definition) through :func:`tests.test_attack5_certificates.check`, fast balls and Arb.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.oracle import interval_ad as A
from tests.test_attack5_certificates import _t, check

SYSTEMS = [None, 256]
ST, PD, DL, G = 2, 2, 2, 2  # conv1d stride, padding, dilation, groups


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    for idx in np.ndindex(shape):
        out[idx] = A.V(0)
    return out


class Conv(nn.Module):
    def __init__(self, w: np.ndarray, b: np.ndarray) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(_t(w)), nn.Parameter(_t(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.conv1d(x, self.w, self.b, stride=ST, padding=PD, dilation=DL, groups=G))


def _conv_oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
    w, b, xs = p["w"], p["b"], A.arr(x.numpy())
    n, c, length = xs.shape
    o, cg, k = w.shape
    xp = _zeros((n, c, length + 2 * PD))
    xp[:, :, PD : PD + length] = xs
    lo = (length + 2 * PD - DL * (k - 1) - 1) // ST + 1
    out = np.empty((n, o, lo), dtype=object)
    for ni, oi, li in np.ndindex(out.shape):
        g, acc = oi // (o // G), b[oi]
        for ci in range(cg):
            for ki in range(k):
                acc = acc + w[oi, ci, ki] * xp[ni, g * cg + ci, li * ST + ki * DL]
        out[ni, oi, li] = acc
    d = A.tanh(out) - A.arr(t.numpy())
    return A.total(d * d) / d.size


@pytest.mark.parametrize("bits", SYSTEMS)
def test_grouped_strided_dilated_conv1d_across_the_float64_range(bits: int | None) -> None:
    """conv1d with stride, padding, dilation and groups; weights 1e300, 1 and 1e-300 per tap,
    inputs 1e-300 and -1e300 rows, a subnormal bias: every product exact, sums across 600
    decades."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 2, 3)) * np.array([1e300, 1.0, 1e-300])
    b = np.array([0.0, -1e-300, 5e-324, 1.0])
    x = rng.standard_normal((2, 4, 6))
    x[0, 0], x[1, 2], x[0, 1, 0] = 1e-300, -1e300, 0.0
    t = torch.zeros(2, 4, 3, dtype=torch.float64)
    check(Conv(w, b), _t(x), t, nn.MSELoss(), _conv_oracle, bits=bits)


class Pools(nn.Module):
    """max_pool2d (kernel 3, stride 2, padding 1, ceil_mode) and a non-divisible adaptive
    average pool (5 -> 3), on integer-valued inputs: ties everywhere."""

    def __init__(self) -> None:
        super().__init__()
        w = np.array([[2, 2, -1, 2, 0], [2, 0, 0, -3, 2], [-1, -1, -1, -1, -1],
                      [0, 5, 5, 0, -2], [5, 0, -4, 5, 5]], dtype=np.float64)  # fmt: skip
        self.w = nn.Parameter(_t(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (self.w * x)[None, None]
        mp = F.max_pool2d(h, 3, 2, padding=1, ceil_mode=True).reshape(-1)
        return torch.cat([mp, F.adaptive_avg_pool2d(h, 3).reshape(-1)])


def _windows(n: int, k: int, s: int, p: int) -> list[list[int]]:
    """torch's ceil-mode windows of one axis, cells inside the input only."""
    out = (n + 2 * p - k + s - 1) // s + 1
    if (out - 1) * s >= n + p:
        out -= 1
    return [[i for i in range(o * s - p, o * s - p + k) if 0 <= i < n] for o in range(out)]


def _pools_oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
    h = p["w"] * A.arr(x.numpy())
    rows = _windows(5, 3, 2, 1)
    outs = [A.first_max([h[i, j] for i in r for j in c]) for r in rows for c in rows]
    spans = [range((i * 5) // 3, -((-(i + 1) * 5) // 3)) for i in range(3)]
    for r in spans:
        for c in spans:
            cells = [h[i, j] for i in r for j in c]
            outs.append(A.total(np.array(cells, dtype=object)) / len(cells))
    d = np.array(outs, dtype=object) - A.arr(t.numpy())
    return A.total(d * d) / d.size


@pytest.mark.parametrize("bits", SYSTEMS)
def test_ceil_mode_max_pool_ties_and_non_divisible_adaptive_pool(bits: int | None) -> None:
    x = torch.ones(5, 5, dtype=torch.float64)
    t = _t(np.linspace(-1.0, 2.0, 18))
    model = Pools()
    assert model(x).shape == (18,)
    check(model, x, t, nn.MSELoss(), _pools_oracle, bits=bits)


class Tokens(nn.Module):
    """Embedding with a padding index, tied to the output projection (the padding row still
    gets the projection's gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(5, 3, padding_idx=0)
        with torch.no_grad():
            self.e.weight.copy_(_t(np.linspace(-2.0, 2.0, 15).reshape(5, 3)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.e(idx)) @ self.e.weight.T


def _tokens_oracle(p: dict, idx: torch.Tensor, t: torch.Tensor) -> A.V:
    w = p["e.weight"]
    pad = A.arr([float(v.v.mid) for v in w[0]])  # the padding row: no gradient via the lookup
    out = np.empty(t.shape, dtype=object)
    for b, pos in np.ndindex(idx.shape):
        i = int(idx[b, pos])
        h = A.tanh(pad if i == 0 else w[i])
        for v in range(w.shape[0]):
            out[b, pos, v] = A.total(h * w[v])
    d = out - A.arr(t.numpy())
    return A.total(d * d) / d.size


def test_embedding_with_padding_and_repeats_tied_to_the_projection() -> None:
    idx = torch.tensor([[0, 1, 0, 4], [4, 4, 0, 1]])
    t = _t(np.linspace(1.0, -1.0, 40).reshape(2, 4, 5))
    check(Tokens(), idx, t, nn.MSELoss(), _tokens_oracle)


class TanhPool(nn.Module):
    """conv2d (padding 1) -> tanh -> max_pool2d(2) on an image that is 0 outside a patch: the
    convolution is the bias in the blank region, so many windows hold equal maxima."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(_t(np.linspace(-1.0, 1.25, 18).reshape(2, 1, 3, 3)))
        self.b = nn.Parameter(_t([0.25, -0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(torch.tanh(F.conv2d(x, self.w, self.b, padding=1)), 2)


def _tanh_pool_oracle(p: dict, x: torch.Tensor, t: torch.Tensor) -> A.V:
    """The first maximum of tanh(z) is that of z (tanh is strictly increasing): decided on
    the exact z, its tanh taken after."""
    w, b = p["w"], p["b"]
    xp = _zeros((8, 8))
    xp[1:7, 1:7] = A.arr(x.numpy()[0, 0])
    outs = []
    for o in range(2):
        z = np.empty((6, 6), dtype=object)
        for i, j in np.ndindex(z.shape):
            z[i, j] = b[o] + A.total(w[o, 0] * xp[i : i + 3, j : j + 3])
        for i, j in np.ndindex(3, 3):
            outs.append(
                A.tanh(A.first_max([z[2 * i + a, 2 * j + c] for a in (0, 1) for c in (0, 1)]))
            )
    d = np.array(outs, dtype=object) - A.arr(t.numpy().ravel())
    return A.total(d * d) / d.size


@pytest.mark.parametrize("bits", SYSTEMS)
def test_max_pool_ties_after_tanh_are_decided_on_its_argument(bits: int | None) -> None:
    """Equal maxima after tanh: the balls of tanh(z) cannot tell equal values apart, so the
    routing was undecided and every value of the model undetermined, after escalating to the
    8192-bit cap (loss and 20 gradients, four Arb runs). tanh is strictly increasing: the exact
    systems decide the first maximum on z (exact here), as torch's rule on exact values."""
    x = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    x[0, 0, 1:3, 2:4] = _t([[1.0, -2.0], [0.5, 3.0]])
    t = _t(np.linspace(-0.5, 0.75, 18).reshape(1, 2, 3, 3))
    ex = check(TanhPool(), x, t, nn.MSELoss(), _tanh_pool_oracle, bits=bits)
    assert ex.bits <= 256, ex.escalations
