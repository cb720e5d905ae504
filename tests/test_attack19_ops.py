"""attack19: today's code (linear-form cancellations, out= writes, ops18 blends and cumulative
ops, heldout3's scatter_reduce/fills/checkpointing) against independent oracles (mpmath,
fractions)."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import torch
from torch import nn

import fpgrad
from fpgrad.errors import InputError
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


class LerpOfConstantBesideAlpha(nn.Module):
    """``add(lerp(c, y, 0.1), z, alpha=0.9)`` with ``c`` a buffer: lerp has no backward for
    ``c``, and add's backward ``mul.Scalar(g, 0.9)`` is the model's own 0.9."""

    def __init__(self, a_param: bool = False) -> None:
        super().__init__()
        self.y, self.z = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
        if a_param:
            self.c = nn.Parameter(torch.randn(3))
        else:
            self.register_buffer("c", torch.randn(3))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return torch.add(torch.lerp(self.c, self.y, 0.1), self.z, alpha=0.9) + inp


def _lerp_alpha_truth(m: nn.Module, inp: torch.Tensor, t: torch.Tensor) -> tuple[list, list]:
    mpmath.mp.prec = 300

    def f(v: torch.Tensor) -> list:
        return [mpmath.mpf(float(a)) for a in v.detach().double()]

    c, y, z, i, tt = f(m.c), f(m.y), f(m.z), f(inp), f(t)
    w, al = mpmath.mpf(0.1), mpmath.mpf(0.9)
    out = [cc + w * (yy - cc) + al * zz + ii for cc, yy, zz, ii in zip(c, y, z, i, strict=True)]
    g = [2 * (o - q) / 3 for o, q in zip(out, tt, strict=True)]
    return [gi * al for gi in g], [gi * (1 - w) for gi in g]


def test_lerp_scale_is_not_read_into_a_models_own_alpha() -> None:
    """Was: with no lerp backward for a constant ``c``, lerp_scale still read add's backward
    ``mul.Scalar(g, fl(0.9))`` as the real ``1 - 0.1``: grads/z certified about 3e-17 off
    (radius 2e-44). Truth: grad z = 0.9 g with the double 0.9."""
    torch.manual_seed(0)
    m, inp, t = LerpOfConstantBesideAlpha(), torch.randn(3), torch.randn(3)
    ex = exact_graph(fpgrad.from_module(m, inp, t, nn.MSELoss()).graph).result
    _contains(ex, "grads/z", _lerp_alpha_truth(m, inp, t)[0])


def test_lerp_scale_beside_an_equal_alpha_is_exact_or_refused() -> None:
    """Both ``c`` (lerp's ``1 - w``) and ``z`` (the model's 0.9) differentiated: the two
    ``mul.Scalar(g, 0.9)`` cannot be told apart. Was: both read as the float 0.9, grads/c
    certified 3e-17 off the real 1 - 0.1. Either both are right or the model is refused."""
    torch.manual_seed(0)
    m, inp, t = LerpOfConstantBesideAlpha(a_param=True), torch.randn(3), torch.randn(3)
    try:
        ex = exact_graph(fpgrad.from_module(m, inp, t, nn.MSELoss()).graph).result
    except InputError:
        return
    gz, gc = _lerp_alpha_truth(m, inp, t)
    _contains(ex, "grads/z", gz)
    _contains(ex, "grads/c", gc)
