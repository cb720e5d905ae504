"""Step functions (``fpgrad/graph/ops/steps.py``) and ``var_mean``/``std_mean``: native
float32/float64 columns bit for bit with eager autograd; the exact reference holds torch
float64's loss and gradients; the exact integer parts are proven where float64 cannot see them
(1 - 2^-60, 2^60 + 1.5: Fraction oracle), and round's exact halves go to the even neighbour."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from tests.oracle.graph_reference import CTX
from tests.oracle.native_exact import check


class _Steps(nn.Module):
    """Quantisation-aware training's straight-through estimators, a threshold, var_mean and
    std_mean over rows."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x) * 4
        q = h + (h.round() - h).detach() + (h.floor() - h).detach() * 0.5
        q = q + (h.ceil() - h).detach() * 0.25 + (h.trunc() - h).detach() * 0.125
        v, m = torch.var_mean(h, 1, keepdim=True)
        s, m2 = torch.std_mean(h, 1, keepdim=True)
        return nn.functional.threshold(q, 0.1, -3.0) * v + m * s + m2 + h * h.round()


@pytest.mark.parametrize("seed", [0, 1])
def test_steps_native_bit_for_bit_and_exact(seed: int) -> None:
    torch.manual_seed(seed)
    model, x, y = _Steps(), torch.randn(5, 4), torch.randn(5, 6)
    check(model, x, y, nn.MSELoss(), digits=30)
    fpgrad.compare(fpgrad.from_module(model, x, y, nn.MSELoss()), "bfloat16:emulated,float16")


class _Integer(nn.Module):
    """loss = (w * q(x + b))^2 summed: q's exact value is the gradient of w / 2w."""

    def __init__(self, kind: str, b: list[float]) -> None:
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.b = torch.tensor(b, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * getattr(torch, self.kind)(x + self.b)


def _q(kind: str, v: Fraction) -> int:
    if kind == "round":
        f = math.floor(v)
        return f + 1 if v - f > Fraction(1, 2) or (v - f == Fraction(1, 2) and f % 2) else f
    return {"floor": math.floor, "ceil": math.ceil, "trunc": math.trunc}[kind](v)


@pytest.mark.parametrize("kind", ["floor", "ceil", "trunc", "round"])
def test_exact_integer_parts_below_float64_resolution(kind: str) -> None:
    """x + b with x = (1, 1, 2^60, -2.5, 0.5, 1.5, -7, 3) and b = (-2^-60, 2^-60, 1.5, 0, ...):
    float64 would round 1 - 2^-60 to 1 and 2^60 + 1.5 to 2^60; the exact reference must
    give q(x + b) of the reals, so d loss / dw = 2 w q^2 summed (w = 1), to the last bit."""
    xs = [1.0, 1.0, 2.0**60, -2.5, 0.5, 1.5, -7.0, 3.0]
    bs = [-(2.0**-60), 2.0**-60, 1.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    x = torch.tensor(xs, dtype=torch.float64)
    net = fpgrad.from_module(_Integer(kind, bs), x, torch.zeros(8, dtype=torch.float64),
                             lambda o, t: (o * o).sum())  # fmt: skip
    ex = exact_graph(net.graph).result
    want = sum(2 * Fraction(_q(kind, Fraction(a) + Fraction(b))) ** 2 for a, b in zip(xs, bs, strict=True))
    mid, rad = ex.enclosure("grads/w")
    m = CTX.mpf(np.asarray(mid, dtype=object).reshape(-1)[0])
    got = Fraction(int(m.man)) * Fraction(2) ** int(m.exp) if m else Fraction(0)
    assert abs(got - want) <= Fraction(float(np.asarray(rad).reshape(-1)[0]))
    assert ex.undetermined_count == 0


def test_fractional_powers_and_local_response_norm() -> None:
    """``** 0.75`` (nn.LocalResponseNorm), ``** (1/3)``, ``** -0.3`` on positive bases: native
    bit for bit, exact = torch float64; 0 ** -0.25 (a relu's zero into a negative power, whose
    inf torch masks afterwards) is refused in one line, not certified."""
    from fpgrad.errors import InputError

    torch.manual_seed(0)
    lrn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.LocalResponseNorm(3), nn.Flatten())
    check(lrn, torch.randn(2, 1, 5, 5), torch.randn(2, 36), nn.MSELoss(), digits=30)

    class Powers(nn.Module):
        def __init__(self, eps: float) -> None:
            super().__init__()
            self.lin, self.eps = nn.Linear(4, 4), eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return (torch.relu(h) + self.eps) ** 0.75 + (h.abs() + 1) ** (1 / 3) + (h * h + 1) ** -0.3

    x, y = torch.randn(6, 4), torch.randn(6, 4)
    check(Powers(1e-3), x, y, nn.MSELoss(), digits=30)
    net = fpgrad.from_module(Powers(0.0), x, y, nn.MSELoss())
    with pytest.raises(InputError, match="0 to a negative power"):
        exact_graph(net.graph)


class _Transmittance(nn.Module):
    """NeRF's transmittance T_i = prod_{j<=i} (1 - alpha_j) by cumprod, along both dims."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.lin(x))
        return torch.cumprod(1 - a, -1) * a + torch.cumprod(a, 0)


def test_cumprod_and_prod_refusal() -> None:
    """cumprod: native bit for bit, exact = torch float64; prod is refused in one line with
    the cumprod rewrite (torch's prod backward differs eagerly and under tracing)."""
    from fpgrad.errors import InputError

    torch.manual_seed(0)
    x, y = torch.randn(3, 4), torch.randn(3, 5)
    check(_Transmittance(), x, y, nn.MSELoss(), digits=30)

    class WithZeros(nn.Module):  # relu's zeros inside the running product (torch's masked path)
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumprod(torch.relu(self.lin(x)) + (self.lin(x) > 0.5).to(x.dtype), -1)

    check(WithZeros(), x, y, nn.MSELoss(), digits=30)

    class Prod(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).prod(-1, keepdim=True)

    with pytest.raises(InputError, match="cumprod") as exc:
        fpgrad.from_module(Prod(), x, torch.randn(3, 1), nn.MSELoss())
    assert "\n" not in str(exc.value)


class _Shrinks(nn.Module):
    """Hardshrink, softshrink, RReLU in eval mode, nan_to_num on finite values."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.rrelu = nn.RReLU(0.1, 0.3).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return (nn.functional.hardshrink(h, 0.3) + nn.functional.softshrink(h, 0.2)
                + self.rrelu(h) + torch.nan_to_num(h * h))  # fmt: skip


def test_shrinks_rrelu_and_nan_to_num() -> None:
    """Native bit for bit and exact = torch float64; emulated float16 equals torch's float16
    kernel on values at and around the thresholds (both in the format); RReLU in training mode
    is refused in one line."""
    from fpgrad.arith.emulated import EmulatedArith
    from fpgrad.errors import InputError

    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randn(5, 6)
    check(_Shrinks(), x, y, nn.MSELoss(), digits=30)
    for dt, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        v = torch.tensor([-0.5, -0.3, -0.2998, 0.0, -0.0, 0.2, 0.3, 0.30005, 1.0, float("nan"),
                          float("inf"), -float("inf")], dtype=dt)  # fmt: skip
        _same_as_torch(EmulatedArith(name), v)
    train = _Shrinks()
    train.rrelu.train()
    with pytest.raises(InputError, match="RReLU in training mode"):
        fpgrad.compare(fpgrad.from_module(train, x, y, nn.MSELoss()), "float32")


def _same_as_torch(ar: object, v: torch.Tensor) -> None:
    from fpgrad.graph.ops import steps

    cx = type("Cx", (), {"ar": ar, "label": lambda self: "t"})()
    a = v.double().numpy()
    for got, want in [
        (steps.hardshrink(cx, a, 0.3), nn.functional.hardshrink(v, 0.3)),
        (steps.softshrink(cx, a, 0.3), nn.functional.softshrink(v, 0.3)),
        (steps.nan_to_num(cx, a), torch.nan_to_num(v)),
        (steps.nan_to_num(cx, a, 1.0, 2.0, -3.0), torch.nan_to_num(v, 1.0, 2.0, -3.0)),
    ]:
        w = want.double().numpy()
        g = np.asarray(got, dtype=np.float64)
        assert np.array_equal(g, w, equal_nan=True) and np.array_equal(np.signbit(g), np.signbit(w))
