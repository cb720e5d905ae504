"""attack19: today's code (linear-form cancellations, out= writes, ops18 blends and cumulative
ops, heldout3's scatter_reduce/fills/checkpointing) against independent oracles (mpmath,
fractions)."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import torch
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.identities import prove_zeros


def _contains(ex, key: str, truth: list) -> None:  # noqa: ANN001
    mid, rad = ex.enclosure(key)
    for m, r, t in zip(mid.reshape(-1), rad.reshape(-1), truth, strict=True):
        assert abs(mpmath.mpf(m) - t) <= mpmath.mpf(float(r)) * (1 + 1e-12) + 1e-300, (
            key, m, r, t)  # fmt: skip


class LerpAgainstOwnConstant(nn.Module):
    """``lerp(x, y, 0.1) - 0.9 x``: d/dx = 1 - 0.1 - 0.9 with the doubles 0.1 and 0.9, which is
    -2**-55 (about -2.8e-17), not 0."""

    def __init__(self) -> None:
        super().__init__()
        self.x, self.y = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return torch.lerp(self.x, self.y, 0.1) + self.x * (-0.9) + inp


def test_lerp_backward_scale_is_no_rational_for_linear_forms() -> None:
    """Was: the backward's ``mul.Scalar(g, fl(0.9))`` (which the exact systems read as the real
    ``1 - 0.1``, lerp_scale) and the model's ``mul.Tensor(g, -0.9)`` were given the rationals
    0.9 and -0.9, so ``add`` was 'proven' exactly 0 and the exact reference raised
    'proven exactly 0 ... enclosures that exclude 0' (mpmath would set 0 silently). Truth:
    grad x = g (1 - 0.1 - 0.9), g = 2 (out - t) / 3."""
    torch.manual_seed(0)
    m, inp, t = LerpAgainstOwnConstant(), torch.randn(3), torch.randn(3)
    net = fpgrad.from_module(m, inp, t, nn.MSELoss())
    assert not prove_zeros(net.graph).zeros
    ex = exact_graph(net.graph).result
    mpmath.mp.prec = 300
    xs = [mpmath.mpf(float(v)) for v in m.x.detach().double()]
    ys = [mpmath.mpf(float(v)) for v in m.y.detach().double()]
    w, c = mpmath.mpf(0.1), mpmath.mpf(-0.9)
    out = [
        a + w * (b - a) + c * a + mpmath.mpf(float(i))
        for a, b, i in zip(xs, ys, inp.double(), strict=True)
    ]
    g = [2 * (o - mpmath.mpf(float(tt))) / 3 for o, tt in zip(out, t.double(), strict=True)]
    _contains(ex, "grads/x", [gi * (1 - w + c) for gi in g])
    _contains(ex, "grads/y", [gi * w for gi in g])
    assert Fraction(1) - Fraction(0.1) - Fraction(0.9) != 0
