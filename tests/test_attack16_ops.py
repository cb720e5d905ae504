"""Adversarial checks on the newest op families (attack16): each test states a fact that the
certified reference must respect, with an oracle written independently of fpgrad (exact
rationals, mpmath at 120 digits from torch's definitions)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from tests.oracle.graph_reference import CTX
from tests.test_graph_oracle import _claims


def _mpf(q: Fraction) -> object:
    return CTX.mpf(q.numerator) / q.denominator


class _SinePositions(nn.Module):
    """A sinusoidal position table written in place (``pe[0::2] = sin(..)``: ``copy_`` into
    slices of a fresh ``zeros``), added to ``w * x``: the table is a constant computed from
    float64 constants, which the exact systems compute as the reals (sin of the float
    ``fl(k + 1) * 0.7``), not as torch's float64 roundings of the sines."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pe = torch.zeros(4, dtype=torch.float64)
        pos = torch.arange(2, dtype=torch.float64) + 1.0
        pe[0::2] = torch.sin(pos * 0.7)
        pe[1::2] = torch.cos(pos * 0.7)
        return (self.w * x + pe).sum(0, keepdim=True)



def test_a_constant_written_in_place_keeps_its_exact_values() -> None:
    """L = (sum_i w_i + sin(c) + cos(c) + sin(2c) + cos(2c))^2 with c = fl(0.7) (the products
    k * c are exact in float64 for k = 1, 2); dL/dw_i = 2 sqrt(L). The re-read after each
    ``copy_`` entered torch's float64 sines, so the loss was certified to 77 digits and
    3e-16 off the real value."""
    x = torch.ones(4, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    net = fpgrad.from_module(_SinePositions(), x, y, nn.MSELoss())
    ex = exact_graph(net.graph).result
    c = CTX.mpf(0.7)
    s = 4 + CTX.sin(c) + CTX.cos(c) + CTX.sin(2 * c) + CTX.cos(2 * c)
    _claims(ex, "loss", np.array(s * s, dtype=object).reshape(()), CTX.mpf(10) ** -100)
    _claims(ex, "grads/w", np.array([2 * s] * 4, dtype=object), CTX.mpf(10) ** -100)
    assert ex.certified_digits >= 30


class _Overlapping(nn.Module):
    """A table written three times through overlapping views (a row, a column, a transposed
    slice), with a view taken before the writes and read both before and after them."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, 4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pe = torch.zeros(3, 4, dtype=torch.float64)
        v = pe[:, 1:3]
        before = (self.w * x + v.sum()).sum()
        pe[0] = torch.sin(torch.arange(4, dtype=torch.float64) * 0.3)
        pe[:, 2] = torch.cos(torch.arange(3, dtype=torch.float64) * 0.7)
        pe.T[3, 1:] = torch.exp(torch.tensor([0.1, 0.2], dtype=torch.float64))
        return (self.w * x + pe).sum().reshape(1) + v.sum() * 3 + before


def test_overlapping_writes_into_a_constant_table() -> None:
    """pe (mpmath): row 0 sin(j fl(0.3)), column 2 cos(i fl(0.7)) over it, pe[1:, 3] =
    exp(fl(0.1)), exp(fl(0.2)); the view v = pe[:, 1:3] reads zeros before the writes and
    the written values after. L = (12 + sum pe + 3 sum v + 12)^2, dL/dw = 4 sqrt(L) each
    (w enters twice)."""
    x = torch.ones(3, 4, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    net = fpgrad.from_module(_Overlapping(), x, y, nn.MSELoss())
    ex = exact_graph(net.graph).result
    pe = [[CTX.mpf(0)] * 4 for _ in range(3)]
    for j in range(4):
        pe[0][j] = CTX.sin(j * CTX.mpf(0.3))
    for i in range(3):
        pe[i][2] = CTX.cos(i * CTX.mpf(0.7))
    pe[1][3], pe[2][3] = CTX.exp(CTX.mpf(0.1)), CTX.exp(CTX.mpf(0.2))
    s = 24 + sum(sum(r) for r in pe) + 3 * sum(pe[i][j] for i in range(3) for j in (1, 2))
    _claims(ex, "loss", np.array(s * s, dtype=object).reshape(()), CTX.mpf(10) ** -100)
    _claims(ex, "grads/w", np.array([[4 * s] * 4] * 3, dtype=object), CTX.mpf(10) ** -100)
    assert ex.certified_digits >= 30


class _SineTable(nn.Module):
    """``w * x + sin(fl(k + 1) * 0.7)``, k = 0..3: a constant computed from float64 constants
    (no in-place write); 3 * fl(0.7) is not a float64, so torch's table is a rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(4, dtype=torch.float64) + 1.0
        return (self.w * x + torch.sin(pos * 0.7)).sum(0, keepdim=True)



def test_a_constant_table_is_exact_in_arb_too() -> None:
    """L = (4 + sum_k sin(k c))^2, c = fl(0.7), k = 1..4 (mpmath at 120 digits). The Arb
    system's values are numpy object arrays, which ``_exact_constant`` took for torch's own
    (integers, masks): the table entered as torch's float64 sines, certified to 77 digits
    and 1e-15 off."""
    x = torch.ones(4, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    net = fpgrad.from_module(_SineTable(), x, y, nn.MSELoss())
    ex = exact_graph(net.graph).result
    c = CTX.mpf(0.7)
    s = 4 + sum(CTX.sin(k * c) for k in range(1, 5))
    _claims(ex, "loss", np.array(s * s, dtype=object).reshape(()), CTX.mpf(10) ** -100)
    _claims(ex, "grads/w", np.array([2 * s] * 4, dtype=object), CTX.mpf(10) ** -100)


class _Thirds(nn.Module):
    """``w * x + c`` with c = arange(4) / 3 (or times fl(0.1), or sqrt), from an integer or a
    floating arange: arithmetic on constants alone either way."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.arange(4.0) if self.kind.startswith("float") else torch.arange(4)
        c = {"div": k / 3, "mul": k * 0.1, "sqrt": torch.sqrt(k)}[self.kind.split("_")[1]]
        return (self.w * x + c.to(torch.float64)).sum().reshape(1)


@pytest.mark.parametrize("kind", ["float_div", "int_div", "int_mul", "int_sqrt"])
def test_arithmetic_on_an_integer_constant_is_exact(kind: str) -> None:
    """L = (4 + sum_k c(k))^2 over k = 0..3 with c(k) = k / 3, k fl(0.1) or sqrt(k) (mpmath).
    ``arange(4.0) / 3`` was computed exactly, ``arange(4) / 3`` (an integer tensor: read as a
    creation op) kept torch's float32 quotients, certified to 43 digits, 3.6e-7 off."""
    x = torch.ones(4, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    net = fpgrad.from_module(_Thirds(kind), x, y, nn.MSELoss())
    ex = exact_graph(net.graph).result
    op = kind.split("_")[1]
    f = {"div": lambda k: CTX.mpf(k) / 3, "mul": lambda k: k * CTX.mpf(0.1), "sqrt": CTX.sqrt}[op]
    s = 4 + sum(f(k) for k in range(4))
    _claims(ex, "loss", np.array(s * s, dtype=object).reshape(()), CTX.mpf(10) ** -100)
    _claims(ex, "grads/w", np.array([2 * s] * 4, dtype=object), CTX.mpf(10) ** -100)


class _Fraction(nn.Module):
    """``(t - q(t)) * v`` with t = sum(w * x), q one of floor/ceil/trunc/round: with w powers
    of 2 far apart, t is an exact value of many words."""

    def __init__(self, kind: str, ws: list[float]) -> None:
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.tensor(ws, dtype=torch.float64))
        self.v = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = (self.w * x).sum(0, keepdim=True)
        return (t - getattr(torch, self.kind)(t)) * self.v


def _q(kind: str, t: Fraction) -> int:
    f = t.numerator // t.denominator
    if kind == "ceil" or (kind == "trunc" and t < 0):
        return -((-t.numerator) // t.denominator)
    if kind == "round":
        return f + 1 if t - f > Fraction(1, 2) or (t - f == Fraction(1, 2) and f % 2) else f
    return f


_WORDS = {
    "six": [2.0**e for e in (500, 400, 300, 200, 100)] + [0.5],
    "signs": [s * 2.0**e for s, e in ((-1, 500), (1, 400), (-1, 300), (1, 200), (-1, 100), (1, 1))]
    + [-0.5, 1e-300],
    "negative": [-(2.0**e) for e in (600, 450, 300, 150)] + [-3.5],
}


@pytest.mark.parametrize("words", sorted(_WORDS))
@pytest.mark.parametrize("kind", ["floor", "ceil", "trunc", "round"])
def test_integer_part_of_a_many_word_value(kind: str, words: str) -> None:
    """t = sum w (Fractions, e.g. 2^500 + 2^400 + 2^300 + 2^200 + 2^100 + 1/2), r = t - q(t)
    from the definitions (round: half to even). L = (r v)^2, dL/dv = 2 r^2 v, dL/dw_i = 2 r v^2
    (the step's derivative is 0). The integer part was taken in four float64 pieces and
    corrected by at most two: 2^100 - 3/2 was left as the fraction, certified to 308 digits."""
    ws = _WORDS[words]
    x = torch.ones(len(ws), dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    net = fpgrad.from_module(_Fraction(kind, ws), x, y, lambda o, t: ((o - t) ** 2).sum())
    try:
        ex = exact_graph(net.graph).result
    except fpgrad.errors.InputError as e:  # a one-line refusal is acceptable
        assert "\n" not in str(e)
        return
    t = sum((Fraction(w) for w in ws), Fraction(0))
    r = t - _q(kind, t)
    _claims(ex, "loss", np.array(_mpf(r * r), dtype=object).reshape(()), CTX.mpf(0))
    _claims(ex, "grads/v", np.array([_mpf(2 * r * r)], dtype=object), CTX.mpf(0))
    _claims(ex, "grads/w", np.array([_mpf(2 * r)] * len(ws), dtype=object), CTX.mpf(0))


def test_a_fresh_weight_norm_module_is_captured() -> None:
    """``nn.utils.weight_norm(nn.Linear(3, 2))`` before any forward holds ``weight`` as a
    non-leaf tensor (computed with grad at ``apply``), which ``copy.deepcopy`` refuses:
    ``from_module`` raised torch's RuntimeError (a traceback) on this valid model. Native
    float64 must equal the model's own eager autograd bit for bit, and the exact balls hold it."""
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        model = nn.utils.weight_norm(nn.Linear(3, 2).double(), dim=0)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.zeros(4, 2, dtype=torch.float64)
    net = fpgrad.from_module(model, x, y, nn.MSELoss())
    from fpgrad.graph.native import native_run

    tr = native_run(net.graph, "float64")
    torch.set_num_threads(1)
    out = nn.MSELoss()(model(x), y)
    out.backward()
    assert np.asarray(tr.loss, dtype=np.float64).item() == out.item()
    ex = exact_graph(net.graph).result
    for name, p in model.named_parameters():
        assert np.array_equal(np.asarray(tr.grads[name], dtype=np.float64).reshape(p.shape), p.grad.numpy())
        mid, rad = ex.enclosure(f"grads/{name}")
        m = np.array([float(v) for v in np.asarray(mid, dtype=object).reshape(-1)])
        assert np.all(np.abs(m - p.grad.numpy().reshape(-1)) <= np.asarray(rad).reshape(-1) + 1e-12)


class _LateMask(nn.Module):
    """Attention scores plus an additive ``-inf`` table ``c`` (``add`` saves no operand), with
    more ``-inf`` written into ``c`` after the scores have read it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (nn.Linear(3, 3).double() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.zeros(4, 4, dtype=x.dtype)
        c[0, 1:] = float("-inf")
        scores = self.q(x) @ self.k(x).T + c
        c[1, 0] = float("-inf")  # after the read: the scores never see it
        c[2, :2] = float("-inf")
        return torch.softmax(scores, -1) @ self.v(x)


def test_a_mask_written_after_its_read_proves_no_zero() -> None:
    """The softmax backward is 0 only where the scores read ``-inf``: row 0 beyond key 0. The
    structural rule took the table's final value (row 1 key 0, row 2 keys 0-1 too), proved
    three nonzero elements 0, and the run stopped in a RuntimeError ("a bug in fpgrad")."""
    from tests.oracle.native_exact import check

    torch.manual_seed(1)
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 3, dtype=torch.float64)
    check(_LateMask(), x, y, nn.MSELoss(), digits=17)
