"""Bicubic upsampling (``F.interpolate(mode='bicubic')``): native columns bit for bit against
eager autograd, the exact column against torch float64 and against an mpmath oracle written
from Keys' cubic convolution (A = -3/4) and torch's source coordinates, up and down, with and
without align_corners, by size and by scale factor."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from tests.oracle import graph_reference as R
from tests.oracle.native_exact import check
from tests.test_graph_oracle import check as oracle_check


class Up(nn.Module):
    def __init__(self, size: tuple[int, int] | None, scale: float | None, align: bool,
                 hw: tuple[int, int]) -> None:  # fmt: skip
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.size, self.scale, self.align = size, scale, align
        oh, ow = size if size else (math.floor(hw[0] * scale), math.floor(hw[1] * scale))  # type: ignore[operator]
        self.head = nn.Linear(2 * oh * ow, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.interpolate(self.conv(x), size=self.size, scale_factor=self.scale, mode="bicubic",
                          align_corners=self.align)  # fmt: skip
        return self.head(torch.tanh(z).flatten(1))


CASES = [((6, 7), None, False), ((6, 7), None, True), ((2, 3), None, False), ((2, 3), None, True),
         (None, 2.0, False), (None, 1.5, False), ((3, 4), None, False)]  # fmt: skip


@pytest.mark.parametrize(("size", "scale", "align"), CASES)
def test_bicubic_native_bit_for_bit_and_exact(size: tuple | None, scale: float | None, align: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 3, 4)
    check(Up(size, scale, align, (3, 4)), x, torch.tensor([0, 1]), nn.CrossEntropyLoss())


def _weights(n: int, o: int, align: bool, scale: float | None) -> list[list[tuple[int, Fraction]]]:
    """The oracle's own interpolation rows, from the definitions (not fpgrad's code)."""
    if n == o:
        return [[(j, Fraction(1))] for j in range(o)]
    if align:
        r = Fraction(n - 1, o - 1) if o > 1 else Fraction(0)
    else:
        r = Fraction(1) / Fraction(scale) if scale else Fraction(n, o)
    a = Fraction(-3, 4)

    def kernel(d: Fraction) -> Fraction:  # Keys: |d| <= 1, 1 < |d| < 2, else 0
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return Fraction(0)

    rows = []
    for j in range(o):
        s = r * j if align else r * (j + Fraction(1, 2)) - Fraction(1, 2)
        i = math.floor(s)
        rows.append([(min(max(k, 0), n - 1), kernel(s - k)) for k in range(i - 1, i + 3)])
    return rows


def _interp(z: np.ndarray, size: tuple[int, int], align: bool, scale: float | None) -> np.ndarray:
    n, c, h, w = z.shape
    rh, rw = _weights(h, size[0], align, scale), _weights(w, size[1], align, scale)
    out = np.empty((n, c, size[0], size[1]), dtype=object)
    for b in range(n):
        for ch in range(c):
            for p, row_h in enumerate(rh):
                for q, row_w in enumerate(rw):
                    out[b, ch, p, q] = sum(R.CTX.mpf(wh.numerator) / wh.denominator
                                           * R.CTX.mpf(ww.numerator) / ww.denominator * z[b, ch, i, k]
                                           for i, wh in row_h for k, ww in row_w)  # fmt: skip
    return out


@pytest.mark.parametrize(("size", "scale", "align"), [((6, 7), None, False), ((2, 3), None, True),
                                                      ((4, 6), 1.5, False)])  # fmt: skip
def test_bicubic_against_mpmath_oracle(size: tuple, scale: float | None, align: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 1, 3, 4)
    model = Up(None if scale else size, scale, align, (3, 4))

    def f(p: dict, xs: np.ndarray, t: np.ndarray) -> object:
        w, b = p["conv.weight"], p["conv.bias"]
        z = np.empty((1, 2, 3, 4), dtype=object)
        for ch in range(2):
            z[0, ch] = xs[0, 0] * w[ch, 0, 0, 0] + b[ch]
        u = np.vectorize(R.CTX.tanh, otypes=[object])(_interp(z, size, align, scale))
        return R.cross_entropy(R.linear(u.reshape(1, -1), p["head.weight"], p["head.bias"]), t)

    oracle_check(model, x, torch.tensor([1]), nn.CrossEntropyLoss(), f)


def test_bicubic_emulated_columns_run() -> None:
    torch.manual_seed(2)
    net = fpgrad.from_module(Up((5, 6), None, False, (3, 4)), torch.randn(2, 1, 3, 4),
                             torch.tensor([0, 1]), nn.CrossEntropyLoss())  # fmt: skip
    result = fpgrad.compare(net, "bfloat16:emulated,fp8_e4m3")
    assert "bfloat16:emulated" in result.render()
