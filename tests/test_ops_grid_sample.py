"""Spatial transformers: ``F.affine_grid`` + ``F.grid_sample`` (aten ``affine_grid_generator``,
``grid_sampler_2d(_backward)``).

A small spatial transformer (localisation net -> theta -> affine_grid -> grid_sample ->
classifier) in every supported mode: native float32/float64 bit for bit against eager
autograd and the exact balls around torch float64 (:mod:`tests.oracle.native_exact`); the
bilinear cases also against an mpmath oracle written here from the definitions (torch's
documented unnormalisation, clamp and bilinear weights; gradients by central differences),
with grid points outside the image. Ties (coordinates exactly on pixel centres, integers,
the clamp bounds) are proven where the arithmetic is exact and undetermined where the balls
cannot place them, never a wrong value. An emulated float32 machine reproduces torch's
float32 CPU kernel's forward and grid gradient bit for bit. Reflection padding and bicubic
interpolation are refused in one line.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph
from tests.oracle import graph_reference as R
from tests.oracle.graph_reference import CTX
from tests.oracle.native_exact import check
from tests.test_graph_oracle import check as oracle_check

BIAS = (1.45, 0.2, 0.3, -0.1, 1.35, -0.2)  # a zoom out: many grid points outside the image


class STN(nn.Module):
    """loc: Linear(H W -> 6) of channel 0 -> theta; affine_grid; grid_sample; Linear head."""

    def __init__(self, mode: str, pad: str, align: bool, hw: int = 3, c: int = 2,
                 bias: tuple = BIAS, scale: float = 0.3) -> None:  # fmt: skip
        super().__init__()
        self.loc, self.head = nn.Linear(hw * hw, 6), nn.Linear(c * hw * hw, 3)
        self.cfg = (mode, pad, align)
        with torch.no_grad():
            self.loc.weight.mul_(scale)
            self.loc.bias.copy_(torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode, pad, align = self.cfg
        theta = self.loc(x[:, 0].flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=align)
        out = F.grid_sample(x, grid, mode=mode, padding_mode=pad, align_corners=align)
        return self.head(out.flatten(1))


CASES = [(m, p, a) for m in ("bilinear", "nearest") for p in ("zeros", "border") for a in (False, True)]


@pytest.mark.parametrize("mode,pad,align", CASES)
def test_native_bit_for_bit_and_exact(mode: str, pad: str, align: bool) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 2])
    check(STN(mode, pad, align, hw=4), x, y, nn.CrossEntropyLoss())


# ---- the oracle: written from the definitions, in mpmath -------------------------------


def _base(n: int, align: bool) -> np.ndarray:
    """torch's base grid: its float64 linspace(-1, 1, n) (data), times (n - 1) / n exactly."""
    r = R.mp(torch.linspace(-1, 1, n, dtype=torch.float64))
    return r if align else r * CTX.mpf(n - 1) / n


def _sample(img: np.ndarray, gx: Any, gy: Any, pad: str, align: bool) -> np.ndarray:
    """Bilinear sample of (C, H, W) ``img`` at normalised (gx, gy): per channel."""
    c, h, w = img.shape

    def coord(g: Any, n: int) -> Any:
        v = (g + 1) * (n - 1) / 2 if align else ((g + 1) * n - 1) / 2
        return min(max(v, CTX.mpf(0)), CTX.mpf(n - 1)) if pad == "border" else v

    ix, iy = coord(gx, w), coord(gy, h)
    x0, y0 = int(CTX.floor(ix)), int(CTX.floor(iy))
    fx, fy = ix - x0, iy - y0
    out = np.array([CTX.mpf(0)] * c, dtype=object)
    for dy, dx, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)),
                       (1, 1, fy * fx)):  # fmt: skip
        yy, xx = y0 + dy, x0 + dx
        if 0 <= yy < h and 0 <= xx < w:
            out = out + img[:, yy, xx] * wt
    return out


def _oracle(pad: str, align: bool) -> Any:
    def forward(p: dict, x: np.ndarray, t: np.ndarray) -> Any:
        n, c, h, w = x.shape
        theta = R.linear(x[:, 0].reshape(n, -1), p["loc.weight"], p["loc.bias"]).reshape(n, 2, 3)
        bx, by = _base(w, align), _base(h, align)
        feats = []
        for b in range(n):
            out = np.empty((c, h, w), dtype=object)
            for i in range(h):
                for j in range(w):
                    v = np.array([bx[j], by[i], CTX.mpf(1)], dtype=object)
                    gx, gy = np.dot(theta[b, 0], v), np.dot(theta[b, 1], v)
                    out[:, i, j] = _sample(x[b], gx, gy, pad, align)
            feats.append(out.reshape(-1))
        z = R.linear(np.array(feats, dtype=object), p["head.weight"], p["head.bias"])
        return R.cross_entropy(z, t)

    return forward


@pytest.mark.parametrize("pad", ["zeros", "border"])
@pytest.mark.parametrize("align", [False, True])
def test_bilinear_against_mpmath_oracle(pad: str, align: bool) -> None:
    """Points inside and outside the image (the zoom out of BIAS), random data: no ties."""
    torch.manual_seed(1)
    x, y = torch.randn(2, 2, 3, 3), torch.tensor([1, 2])
    oracle_check(STN("bilinear", pad, align), x, y, nn.CrossEntropyLoss(), _oracle(pad, align))


# ---- ties: pixel centres, integer coordinates, the clamp bounds ---------------------------


@pytest.mark.parametrize("mode,pad", [(m, p) for m in ("bilinear", "nearest") for p in ("zeros", "border")])
def test_exact_ties_are_proven(mode: str, pad: str) -> None:
    """theta exactly the identity (loc weights 0): every grid point lands on a pixel centre,
    its coordinate an exact integer (align_corners with 5 pixels, or 2 pixels without); the
    last column/row's east/south corner is outside the image and the border's coordinates sit
    on the clamp bounds 0 and n - 1. The exact systems prove each floor and clamp and give
    torch's own one-sided derivatives (equal to torch float64's, which is exact here)."""
    torch.manual_seed(2)
    for hw, align in ((5, True), (2, False)):
        model = STN(mode, pad, align, hw=hw, bias=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), scale=0.0)
        x, y = torch.randn(2, 2, hw, hw), torch.tensor([0, 1])
        check(model, x, y, nn.CrossEntropyLoss())


class ThirdsSTN(STN):
    """theta = (t / 3) * 3: the identity in exact arithmetic, but a ball around it."""

    def __init__(self) -> None:
        super().__init__("bilinear", "zeros", True, hw=5, bias=(0.0,) * 6, scale=0.0)
        self.t = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = ((self.loc(x[:, 0].flatten(1)) + self.t) / 3 * 3).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return self.head(F.grid_sample(x, grid, align_corners=True).flatten(1))


def test_unprovable_tie_is_undetermined_never_wrong() -> None:
    """Integer coordinates the balls cannot place (``t / 3 * 3``): the floors escalate and end
    undetermined (the run is uncertified: allowed here); every element still claimed is torch
    float64's (exact here)."""
    torch.manual_seed(3)
    model, x, y = ThirdsSTN(), torch.randn(1, 2, 5, 5), torch.tensor([1])
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    ex = exact_graph(net.graph, allow_uncertified=True).result
    assert ex.undetermined_count > 0
    ref = ThirdsSTN()
    ref.load_state_dict(model.state_dict())
    ref = ref.double()
    loss = nn.CrossEntropyLoss()(ref(x.double()), y)
    loss.backward()
    for name, p in ref.named_parameters():
        mid, rad = ex.enclosure(f"grads/{name}")
        und = ex.undetermined(f"grads/{name}").reshape(-1)
        m = np.array([float(v) for v in np.asarray(mid, dtype=object).reshape(-1)])
        r = p.grad.numpy().reshape(-1)
        ok = ~und
        assert np.all(np.abs(r - m)[ok] <= np.asarray(rad).reshape(-1)[ok] + 1e-12), name


# ---- emulated machines ------------------------------------------------------------------


def test_emulated_float32_matches_torch_kernel() -> None:
    """Forward and grid gradient bit for bit with torch's float32 CPU kernel (its fused
    multiply-adds included), grid points on the image's corners and centre among them."""
    from fpgrad.arith.emulated import EmulatedArith
    from fpgrad.graph.ops import grid_sample as G

    cx = type("Cx", (), {"ar": EmulatedArith("float32"), "label": lambda self: "t"})()
    torch.manual_seed(4)
    for mode, pad, align in CASES:
        mi, pi = ("bilinear", "nearest").index(mode), ("zeros", "border").index(pad)
        x, go = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 7)
        g = torch.rand(2, 6, 7, 2) * 2.6 - 1.3
        g[0, 0, :3] = torch.tensor([[-1.0, 1.0], [0.0, 0.0], [1.0, -1.0]])
        out = torch.ops.aten.grid_sampler_2d(x, g, mi, pi, align)
        _, gg = torch.ops.aten.grid_sampler_2d_backward(go, x, g, mi, pi, align, [True, True])
        a = [t.double().numpy() for t in (x, g, go)]
        o = G.grid_sampler_2d(cx, a[0], a[1], mi, pi, align)
        _, g2 = G.grid_sampler_2d_backward(cx, a[2], a[0], a[1], mi, pi, align, [True, True])
        assert np.array_equal(np.asarray(o), out.double().numpy()), (mode, pad, align)
        assert np.array_equal(np.asarray(g2), gg.double().numpy()), (mode, pad, align)


def test_emulated_bfloat16_runs() -> None:
    torch.manual_seed(5)
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 2])
    cmp = fpgrad.compare(fpgrad.from_module(STN("bilinear", "border", False, hw=4), x, y,
                                            nn.CrossEntropyLoss()), "bfloat16:emulated")  # fmt: skip
    for v in cmp.values("bfloat16:emulated").values():
        assert np.isfinite(v).all()


@pytest.mark.parametrize("mode,pad", [("bicubic", "zeros"), ("bilinear", "reflection")])
def test_unsupported_modes_refused(mode: str, pad: str) -> None:
    torch.manual_seed(6)
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 2])
    net = fpgrad.from_module(STN(mode, pad, False, hw=4), x, y, nn.CrossEntropyLoss())
    with pytest.raises(InputError, match="not supported") as err:
        exact_graph(net.graph)
    assert "\n" not in str(err.value)
