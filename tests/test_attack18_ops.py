"""Adversarial checks of the certified reference in saturated and edge regimes (attack18).
No wrong certificate was found; these tests keep the regimes that held and that no other test
covers: kinks reached by arguments that are exactly at the kink in the reals but not in
float64 (and the reverse), attention masks of +-1.7e308 that float64 absorbs, cross-entropy
logits near float64's maximum, and reductions that overflow float64 while finite in the
reals. Oracles: exact rationals (fractions) and mpmath at 4000 bits, written from the
definitions and torch's documented conventions at ties and kinks, never fpgrad's code."""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction as Fr
from typing import Any

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph

E = 2.0**-52


def _mp(q: Any) -> mpmath.mpf:
    return mpmath.mpf(q.numerator) / q.denominator if isinstance(q, Fr) else mpmath.mpf(q)


def _encloses(model: nn.Module, x: Any, t: torch.Tensor, loss: Any, truth: dict) -> None:
    """Every certified element of the exact result holds its oracle value: an exact zero
    only where the truth is 0, otherwise |truth - mid| <= rad; none undetermined."""
    ex = exact_graph(fpgrad.from_module(model, x, t, loss).graph).result
    assert ex.undetermined_count == 0
    with mpmath.workprec(4000):
        for key, want in truth.items():
            mid, rad = ex.enclosure(key)
            zero = np.asarray(ex.zero(key)).reshape(-1)
            mids = np.asarray(mid, dtype=object).reshape(-1)
            rads = np.asarray(rad, dtype=np.float64).reshape(-1)
            assert len(mids) == len(want)
            for i, (m, r, z, w) in enumerate(zip(mids, rads, zero, want, strict=True)):
                w = _mp(w)
                if z:
                    assert w == 0, (key, i, w)
                else:
                    assert abs(mpmath.mpf(m) - w) <= r, (key, i, mpmath.nstr(w, 30), m, r)


class _Grad(nn.Module):
    def __init__(self, p: Any, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p, dtype=torch.float64))
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        return self.f(p[0] * p[1] + p[2] + p[3]) * x


# ---- kinks reached by computed arguments -----------------------------------------------------
H = Fr(1, 2)
#: name -> (torch function, kinks, the function on the open pieces: z -> (value, slope))
KINKS: dict[str, tuple[Callable, list[float], Callable]] = {
    "relu": (F.relu, [0.0], lambda z: (z, 1) if z > 0 else (0, 0)),
    "leaky_relu": (lambda z: F.leaky_relu(z, 0.25), [0.0],
                   lambda z: (z, 1) if z > 0 else (z / 4, Fr(1, 4))),
    "hardtanh": (lambda z: F.hardtanh(z, -1.0, 2.0), [-1.0, 2.0],
                 lambda z: (Fr(-1), 0) if z < -1 else ((Fr(2), 0) if z > 2 else (z, 1))),
    "clamp": (lambda z: torch.clamp(z, -1.0, 2.0), [-1.0, 2.0],
              lambda z: (Fr(-1), 0) if z < -1 else ((Fr(2), 0) if z > 2 else (z, 1))),
    "threshold": (lambda z: F.threshold(z, 1.5, -2.0), [1.5],
                  lambda z: (z, 1) if z > Fr(3, 2) else (Fr(-2), 0)),
    "hardshrink": (lambda z: F.hardshrink(z, 0.5), [0.5, -0.5],
                   lambda z: (z, 1) if abs(z) > H else (0, 0)),
    "softshrink": (lambda z: F.softshrink(z, 0.5), [0.5, -0.5],
                   lambda z: (z - H, 1) if z > H else ((z + H, 1) if z < -H else (0, 0))),
    "abs": (torch.abs, [0.0], lambda z: (abs(z), 1 if z > 0 else -1)),
    "hardswish": (F.hardswish, [-3.0, 3.0],
                  lambda z: (Fr(0), 0) if z < -3 else
                  ((z, 1) if z > 3 else (z * (z + 3) / 6, (2 * z + 3) / Fr(6)))),
}  # fmt: skip


def _kink_points(k: float) -> list[tuple[float, float, float, float]]:
    """(a, b, c, d) with a b + c + d exactly k in the reals while float64 rounds a b, and
    the neighbours k +- |fl(a b) - a b| whose float64 evaluation lands exactly on k."""
    out = []
    for a, b in [(1 + E, 1 - E), (1 + E, 1 + E), (1 - E / 2, 1 - E / 2)]:
        fab = a * b
        d = float(Fr(fab) - Fr(a) * Fr(b))
        c = k - fab
        assert Fr(d) == Fr(fab) - Fr(a) * Fr(b)
        if Fr(c) == Fr(k) - Fr(fab):  # k - fl(a b) is a float64 (not for every k and pair)
            out += [(a, b, c, d), (a, b, c, 2 * d), (a, b, c, 0.0), (a, b, c, -d)]
    assert out
    return out


@pytest.mark.parametrize("name", sorted(KINKS))
def test_kinks_at_arguments_float64_misplaces(name: str) -> None:
    """``f(a b + c + d)`` where the real argument is exactly at a kink while float64 puts it
    2^-104 off, or 2^-104 off while float64 puts it exactly on the kink: the exact
    reference takes the real argument's branch (torch's own convention exactly at the
    kink, read off torch at the representable kink)."""
    tf, kinks, piece = KINKS[name]
    pts = [p for k in kinks for p in _kink_points(k)]
    t = Fr(0.3)
    loss, grads = Fr(0), [[Fr(0)] * len(pts) for _ in range(4)]
    for i, (a, b, c, d) in enumerate(pts):
        z = Fr(a) * Fr(b) + Fr(c) + Fr(d)
        if z in [Fr(k) for k in kinks]:
            zt = torch.tensor([float(z)], dtype=torch.float64, requires_grad=True)
            yt = tf(zt)
            yt.backward()
            v, s = Fr(yt.item()), Fr(zt.grad.item())  # type: ignore[union-attr]
        else:
            v, s = piece(z)
        loss += (v - t) ** 2
        for j, dz in enumerate([Fr(b), Fr(a), 1, 1]):
            grads[j][i] = 2 * (v - t) * s * dz
    model = _Grad([list(c) for c in zip(*pts, strict=True)], tf)
    y = torch.full((len(pts),), 0.3, dtype=torch.float64)
    truth = {"loss": [loss], "grads/p": [g for row in grads for g in row]}
    _encloses(model, torch.ones(1, dtype=torch.float64), y, nn.MSELoss(reduction="sum"), truth)


# ---- attention under masks float64 absorbs ---------------------------------------------------
BIG = 1.7e308
INF = float("inf")
MASKS = {
    "uniform_huge_row": [[-BIG] * 3, [0.0, -1e300, 0.0], [-1e308, -1.5e308, -1e308]],
    "huge_positive": [[1e308, 1e308, 0.0], [0.0, 0.0, 0.0], [5.0, -BIG, BIG]],
    "neg_inf_and_huge": [[0.0, -BIG, -INF], [-BIG, -BIG, -BIG], [-INF, 2.0, -BIG]],
}
_Q = [[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]]


class _Attend(nn.Module):
    def __init__(self, scale: float | None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(_Q, dtype=torch.float64).view(1, 1, 3, 2))
        self.scale = scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.w * x
        return F.scaled_dot_product_attention(q, q, q * 2.0, attn_mask=mask, scale=self.scale)


def _attention_truth(mask: list, scale: float | None) -> dict:
    def loss(*w: Any) -> Any:
        q = [[w[2 * i + j] for j in range(2)] for i in range(3)]
        sc = mpmath.mpf(scale) if scale is not None else 1 / mpmath.sqrt(2)
        total = mpmath.mpf(0)
        for i in range(3):
            s = {j: mpmath.fsum(q[i][k] * q[j][k] for k in range(2)) * sc + mpmath.mpf(mask[i][j])
                 for j in range(3) if mask[i][j] != -INF}  # fmt: skip
            top = max(s.values())
            e = {j: mpmath.exp(v - top) for j, v in s.items()}
            z = mpmath.fsum(e.values())
            for k in range(2):
                o = mpmath.fsum(2 * q[j][k] * e[j] / z for j in s)
                total += (o - mpmath.mpf(0.375)) ** 2
        return total / 6

    with mpmath.workprec(4000):
        w0 = [mpmath.mpf(v) for row in _Q for v in row]
        grads = []
        for i in range(6):

            def along(t: Any, i: int = i) -> Any:
                return loss(*w0[:i], t, *w0[i + 1 :])

            grads.append(mpmath.diff(along, w0[i]))
        return {"loss": [loss(*w0)], "grads/w": grads}


@pytest.mark.parametrize("scale", [None, 3.0])
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_attention_masks_float64_absorbs(mask: str, scale: float | None) -> None:
    """Additive masks of +-1.7e308 swallow the scores in float64 (a row of -1.7e308 is a
    uniform softmax there); in the reals the shift cancels and the scores decide: the
    certified loss and gradients need more than 1024 bits and are the reals'."""
    m = torch.tensor(MASKS[mask], dtype=torch.float64)
    x = torch.ones(1, 1, 3, 2, dtype=torch.float64)
    t = torch.full((1, 1, 3, 2), 0.375, dtype=torch.float64)
    _encloses(_Attend(scale), (x, m), t, nn.MSELoss(), _attention_truth(MASKS[mask], scale))


# ---- cross-entropy logits near float64's maximum ---------------------------------------------
class _Logits(nn.Module):
    def __init__(self, w: list) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x


def _ce_truth(w: list, target: list, ls: float) -> dict:
    """Loss and logit gradients of torch's cross-entropy (mean, label smoothing ls: the
    float64 ls, as torch stores it) from the definition."""
    with mpmath.workprec(4000):
        n, c = len(w), len(w[0])
        s = mpmath.mpf(ls)
        loss, grads = mpmath.mpf(0), []
        for i in range(n):
            z = [mpmath.mpf(v) for v in w[i]]
            top = max(z)
            lse = top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in z))
            p = [mpmath.exp(v - lse) for v in z]
            loss += (1 - s) * (lse - z[target[i]]) + s / c * mpmath.fsum(lse - v for v in z)
            grads += [((1 - s) * (p[k] - (k == target[i])) + s * (p[k] - mpmath.mpf(1) / c)) / n
                      for k in range(c)]  # fmt: skip
        return {"loss": [loss / n], "grads/w": grads}


CE_CASES = {
    "opposite_max": ([[1e308, -1e308, 0.0], [700.0, 709.9, 710.5]], [1, 0], 0.0),
    "equal_max_smoothed": ([[1e308, 1e308, 0.0], [1.0, 1.0 + E, 1.0]], [1, 0], 0.5),
    "max_and_one_ulp": (
        [[1.7976931348623157e308, 1.7976931348623155e308, -1.0], [-1e308, -1e308, -1e308]],
        [0, 2],
        0.25,
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CE_CASES))
def test_cross_entropy_logits_near_float64_max(case: str) -> None:
    """Logits of 1e308 (float64 rounds z - logsumexp to 0 or -inf) with label smoothing:
    the probabilities and the smoothed gradient are the reals' (the difference of two
    maximal logits is 2^971, not 0)."""
    w, target, ls = CE_CASES[case]
    x = torch.ones(len(w), len(w[0]), dtype=torch.float64)
    loss = nn.CrossEntropyLoss(label_smoothing=ls)
    _encloses(_Logits(w), x, torch.tensor(target), loss, _ce_truth(w, target, ls))


# ---- reductions that overflow float64, finite in the reals -----------------------------------
def _moments(w: list) -> tuple:
    m = mpmath.fsum(w) / len(w)
    return m, mpmath.fsum((v - m) ** 2 for v in w)


REDUCTIONS: dict[str, tuple[list, Callable, Callable]] = {
    "sum": ([BIG, BIG, -BIG], lambda w: w.sum().view(1) * 1e-300,
            lambda w: [mpmath.fsum(w) * mpmath.mpf(1e-300)]),
    "cumsum": ([BIG, BIG, -BIG], lambda w: w.cumsum(0) * 1e-300,
               lambda w: [mpmath.fsum(w[:k]) * mpmath.mpf(1e-300) for k in (1, 2, 3)]),
    "var": ([1e300, -1e300, 0.0], lambda w: (w.var() * 1e-300).view(1) * 1e-300,
            lambda w: [_moments(w)[1] / 2 * mpmath.mpf(1e-300) ** 2]),
    "std": ([1e300, -1e300, 0.0], lambda w: w.std().view(1) * 1e-300,
            lambda w: [mpmath.sqrt(_moments(w)[1] / 2) * mpmath.mpf(1e-300)]),
    "vector_norm": ([1e200, 1e200], lambda w: torch.linalg.vector_norm(w).view(1) * 1e-200,
                    lambda w: [mpmath.sqrt(w[0] ** 2 + w[1] ** 2) * mpmath.mpf(1e-200)]),
}  # fmt: skip


class _Reduce(nn.Module):
    def __init__(self, w: list, f: Callable) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.w * x)


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reductions_overflowing_float64(name: str) -> None:
    """Sums, running sums, variances and norms whose float64 intermediates overflow (torch:
    inf) while the real values are moderate: certified as the reals'."""
    w, f, of = REDUCTIONS[name]
    with mpmath.workprec(4000):
        w0 = [mpmath.mpf(v) for v in w]

        def loss(*ws: Any) -> Any:
            return mpmath.fsum(v**2 for v in of(list(ws)))

        grads = []
        for i in range(len(w0)):

            def along(t: Any, i: int = i) -> Any:
                return loss(*w0[:i], t, *w0[i + 1 :])

            grads.append(mpmath.diff(along, w0[i]))
        truth = {"loss": [loss(*w0)], "grads/w": grads}
    n = len(of(w0))
    x = torch.ones(len(w), dtype=torch.float64)
    _encloses(_Reduce(w, f), x, torch.zeros(n, dtype=torch.float64),
              nn.MSELoss(reduction="sum"), truth)  # fmt: skip
