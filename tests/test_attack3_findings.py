"""Adversarial findings on captured models (attack3): each test failed before its fix.

Oracles are exact rationals (``fractions.Fraction``) of the float64 parameters."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import torch
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph

W = [[1.0, 2.0], [3.0, 5.0], [4.0, 9.0], [1.5, -2.0], [0.25, 7.0]]


class _Fn(nn.Module):
    def __init__(self, f: object, rows: int) -> None:
        super().__init__()
        self.f = f
        self.w = nn.Parameter(torch.tensor(W[:rows]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.w * x)  # type: ignore[operator]


def _exact(model: nn.Module, rows: int) -> object:
    net = fpgrad.from_module(model, torch.ones(rows, 2), torch.zeros(2), nn.MSELoss())
    return exact_graph(net.graph).result


def _inside(ex: object, key: str, true: list[Fraction]) -> None:
    mid, rad = ex.enclosure(key)  # type: ignore[attr-defined]
    mid = np.asarray(mid, dtype=object).reshape(-1)
    rad = np.asarray(rad, dtype=np.float64).reshape(-1)
    with mpmath.workprec(400):
        for i, t in enumerate(true):
            exact = mpmath.mpf(t.numerator) / t.denominator
            assert abs(exact - mpmath.mpf(mid[i])) <= rad[i], f"{key}[{i}] outside its ball"


def _columns(rows: int) -> list[list[Fraction]]:
    return [[Fraction(W[i][j]) for i in range(rows)] for j in range(2)]


def test_user_constant_equal_to_var_scale_is_not_read_as_a_rational() -> None:
    """A user's float64 constant 0.6666666666666666 (== torch's 2/(3-0)) times ``w - mean(w)``
    beside ``w.var(0, correction=0)`` was read as exactly 2/3: a wrong loss, certified."""
    c = 0.6666666666666666

    def f(w: torch.Tensor) -> torch.Tensor:
        s = w.sum(0, keepdim=True) * c
        return (w * (s * (w - w.mean(0, keepdim=True)))).sum(0) + w.var(0, correction=0)

    ex = _exact(_Fn(f, 3), 3)
    out = []
    for col in _columns(3):
        s, mu = sum(col), sum(col) / 3
        out.append(sum(v * s * Fraction(c) * (v - mu) for v in col)
                   + sum((v - mu) ** 2 for v in col) / 3)  # fmt: skip
    _inside(ex, "loss", [sum(o * o for o in out) / 2])


def test_fractional_correction_divides_by_the_exact_n_minus_correction() -> None:
    """``var(correction=0.1)`` divided by float64's rounding of ``5 - 0.1`` (forward and
    backward): every certified digit past the 16th was wrong."""
    corr = 0.1
    ex = _exact(_Fn(lambda w: w.var(0, correction=corr), 5), 5)
    dof = 5 - Fraction(corr)
    out, grads = [], [[Fraction(0)] * 2 for _ in range(5)]
    for col in _columns(5):
        mu = sum(col) / 5
        out.append(sum((v - mu) ** 2 for v in col) / dof)
    for j, col in enumerate(_columns(5)):
        mu = sum(col) / 5
        for i, v in enumerate(col):
            grads[i][j] = out[j] * 2 * (v - mu) / dof
    _inside(ex, "loss", [sum(o * o for o in out) / 2])
    _inside(ex, "grads/w", [g for row in grads for g in row])


def test_fast_ncdf_counts_a_nan_radius_or_midpoint() -> None:
    """The fast ball ``ncdf`` of a ball with a NaN radius (0 * inf upstream) or a NaN / inf
    midpoint returned a finite ball ([0.90, 1.10] for midpoint 0.1, where Phi(0.1) = 0.54)
    with no range error; the run then only checks its outputs for NaN, so it laundered."""
    from fpgrad.arith import expansion
    from fpgrad.arith.ball import Ball, BallArith

    for mid, rad in ((0.1, np.nan), (np.nan, 0.0), (np.inf, 0.0), (-np.inf, 0.0)):
        ar = BallArith(150)
        ar.ncdf(Ball(expansion.from_float(np.array([mid]), ar.k), np.array([rad])))
        assert ar.range_errors == 1, (mid, rad)
