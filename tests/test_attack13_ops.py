"""Adversarial checks on today's ops (attack13): each test states a fact the certified
reference or an emulated column must respect, with an oracle written independently of
fpgrad (mpmath, Fraction, torch float64 on exactly representable data)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from tests.oracle.graph_reference import CTX
from tests.test_graph_oracle import _claims


class _AmaxOfAView(nn.Module):
    """``t == amax(t.reshape(1, 2, 2), dim=(0, 2), keepdim=True)`` with t of shape (2, 2, 1):
    the comparison's shapes are those of amax's own backward (t against t's maxima over
    dims 0 and 2), but the maxima are taken over another grouping of t's elements (the rows
    of the reshaped view, not t's columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[[1.0], [3.0]], [[2.0], [0.5]]], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(self.w * x)
        m = t.reshape(1, 2, 2).amax(dim=(0, 2), keepdim=True)
        return torch.where(t == m, t, 0.0 * t).sum().reshape(1)


def test_eq_with_the_amax_of_a_reshaped_view_is_not_amax_backward() -> None:
    """Here t[i, j] == max(t[j, 0], t[j, 1]) holds nowhere (tanh is injective, and each
    t[i, j] differs from both values of row j unless i = j and t[j, j] is row j's larger
    one, which it is not): the loss is exactly 0 and so is every gradient (torch float64
    gives exactly 0 too). A structural tie rule that reads the maxima as t's own column
    maxima would certify a nonzero loss."""
    x = torch.ones(2, 2, 1, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    model, loss = _AmaxOfAView(), nn.MSELoss(reduction="sum")
    net = fpgrad.from_module(model, x, y, loss)
    ex = exact_graph(net.graph).result
    m = copy.deepcopy(model)
    value = loss(m(x), y)
    value.backward()
    assert value.item() == 0.0 and not m.w.grad.any()  # torch agrees with the hand analysis
    _claims(ex, "loss", np.array(CTX.mpf(0), dtype=object), CTX.mpf(0))
    _claims(ex, "grads/w", np.zeros((2, 2, 1), dtype=object) + CTX.mpf(0), CTX.mpf(0))


class _Celu(nn.Module):
    def __init__(self, alpha: float, w: list[float]) -> None:
        super().__init__()
        self.alpha = alpha
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.celu(self.w * x, alpha=self.alpha)


@pytest.mark.parametrize("alpha", [1e-300, 1e-46, 2e-45])
def test_celu_with_an_alpha_float32_cannot_hold(alpha: float) -> None:
    """celu(t, alpha) = alpha (e^(t / alpha) - 1) for t <= 0: torch runs it (its backward's
    ``1 / float32(alpha)`` is inf in C++ where float32(alpha) is 0); the exact reference must not raise, and its
    gradient of sum celu(w x)^2 must enclose 2 celu(t) celu'(t) x, celu'(t) = e^(t / alpha)
    below 0 and 1 above (mpmath, from the definition)."""
    w = [0.5, -alpha, -2 * alpha]
    x = torch.ones(1, 3, dtype=torch.float64)
    y = torch.zeros(1, 3, dtype=torch.float64)
    net = fpgrad.from_module(_Celu(alpha, w), x, y, nn.MSELoss(reduction="sum"))
    ex = exact_graph(net.graph).result
    a = CTX.mpf(alpha)
    want = []
    for v in w:
        t = CTX.mpf(v)
        if t > 0:
            want.append(2 * t)
        else:
            e = CTX.exp(t / a)
            want.append(2 * a * (e - 1) * e)
    assert ex.undetermined_count == 0
    _claims(ex, "grads/w", np.array([want], dtype=object), CTX.mpf(0))


def test_emulated_hardtanh_backward_compares_with_torchs_float32_bounds() -> None:
    """torch's hardtanh_backward (``x <= lo || x >= hi ? 0 : g``) converts its bounds to its
    compute type, float, in float32, bfloat16 and float16: where float32(bound) differs from
    the bound, an input equal to float32(bound) is on the boundary (gradient 0). The
    emulated machines must give torch's kernel's result there (its forward already does)."""
    import types

    from fpgrad.arith.emulated import EmulatedArith
    from fpgrad.graph.ops import select as S

    aten = torch.ops.aten
    for fmt, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                    ("float16", torch.float16)):  # fmt: skip
        cx = types.SimpleNamespace(ar=EmulatedArith(fmt))
        for lo, hi in ((-0.7, 0.7), (-(1 + 2**-30), 1 + 2**-30), (-(0.5 + 2**-20), 0.5 + 2**-20)):
            xs = sorted({float(torch.tensor(v, dtype=dt).double())
                         for b in (lo, hi) for v in (b, float(np.float32(b)))})  # fmt: skip
            tx = torch.tensor(xs, dtype=dt)
            g = np.linspace(1.0, 2.0, len(xs))
            ours = np.asarray(S.hardtanh_backward(cx, g, tx.double().numpy(), lo, hi))
            theirs = aten.hardtanh_backward(torch.tensor(g, dtype=dt), tx, lo, hi).double().numpy()
            assert np.array_equal(ours, theirs), (fmt, lo, hi, xs, ours, theirs)


class _OfOneElement(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.5, -1.0, 2.0, 3.0]], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.w * x
        return (torch.sin(t[0, 0]) + torch.atan(t[0, 2]) * torch.erf(t[0, 3])).reshape(1)


def test_sin_of_one_selected_element_in_arb() -> None:
    """sin, atan and erf have no fast-ball slot, so the exact reference runs in Arb; the
    gradient of a function of single elements t[0, k] goes through select_backward with
    0-d values. L = (sin t0 + atan t2 erf t3)^2 (mean over one element): dL/dw_k from the
    definitions in mpmath (x = 1, so t = w)."""
    x = torch.ones(1, 4, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    net = fpgrad.from_module(_OfOneElement(), x, y, nn.MSELoss())
    cmp = fpgrad.compare(net, ["float32"])
    assert cmp.certified_digits >= 17
    ex = exact_graph(net.graph).result
    t0, t2, t3 = (CTX.mpf(v) for v in (0.5, 2.0, 3.0))
    f = CTX.sin(t0) + CTX.atan(t2) * CTX.erf(t3)
    want = [2 * f * CTX.cos(t0), CTX.mpf(0), 2 * f * CTX.erf(t3) / (1 + t2 * t2),
            2 * f * CTX.atan(t2) * 2 / CTX.sqrt(CTX.pi) * CTX.exp(-t3 * t3)]  # fmt: skip
    assert ex.undetermined_count == 0
    _claims(ex, "grads/w", np.array([want], dtype=object), CTX.mpf(0))


class _LogsumexpOfNothing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.w * x
        return (torch.logsumexp(t[:, :0], 1).clamp(-5.0, 5.0) + t.sum()).reshape(1)


def test_logsumexp_over_an_empty_dimension_is_refused_cleanly() -> None:
    """torch's logsumexp over an empty dimension is -inf (here clamped to -5, a valid model);
    the exact reference has no -inf, so fpgrad must refuse it with an InputError that says
    so, not fail inside numpy."""
    from fpgrad.errors import InputError

    x = torch.ones(1, 3, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    model = _LogsumexpOfNothing()
    assert model(x).item() == -5.0 + 1.5  # torch runs it
    net = fpgrad.from_module(model, x, y, nn.MSELoss())
    with pytest.raises(InputError, match="empty"):
        fpgrad.compare(net, ["float32", "bfloat16:emulated"])


class _ErfPlusItsOwnSlope(nn.Module):
    """erf(t) + c exp(-t^2) with c the float64 2 / sqrt(pi), written in the forward: the
    same ops as torch's erf backward, but the constant is the user's float."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[0.5, 1.0]], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.w * x
        return torch.erf(t) + (2.0 / math.sqrt(math.pi)) * torch.exp(-(t**2))


def test_a_forward_constant_equal_to_erfs_backward_scale_is_its_float() -> None:
    """The exact reference evaluates the model's own constant as the float64 it is; only
    torch's backward constant stands for the real 2 / sqrt(pi). Oracle: mpmath with the
    float64 constant."""
    x = torch.ones(1, 2, dtype=torch.float64)
    y = torch.zeros(1, 2, dtype=torch.float64)
    net = fpgrad.from_module(_ErfPlusItsOwnSlope(), x, y, nn.MSELoss(reduction="sum"))
    ex = exact_graph(net.graph).result
    c = CTX.mpf(2.0 / math.sqrt(math.pi))
    ws = [CTX.mpf(0.5), CTX.mpf(1.0)]
    f = [CTX.erf(w) + c * CTX.exp(-w * w) for w in ws]
    loss = sum(v * v for v in f)
    grads = [2 * v * (2 / CTX.sqrt(CTX.pi) - 2 * w * c) * CTX.exp(-w * w)
             for v, w in zip(f, ws, strict=True)]  # fmt: skip
    _claims(ex, "loss", np.array(loss, dtype=object), CTX.mpf(0))
    _claims(ex, "grads/w", np.array([grads], dtype=object), CTX.mpf(0))


class _Upsample(nn.Module):
    def __init__(self, shape: tuple[int, ...], kw: dict) -> None:
        super().__init__()
        self.kw = kw
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randint(-8, 8, shape, generator=g).double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self.w, **self.kw) * x


UPSAMPLES = {
    "same_size_1d": ((1, 1, 3), {"scale_factor": 1.0001, "mode": "nearest"}),
    "double_size_1d": ((1, 2, 5), {"scale_factor": 2.1, "mode": "nearest"}),
    "mixed_2d": ((1, 1, 4, 6), {"scale_factor": (1.1, 2.05), "mode": "nearest"}),
    "mixed_3d": ((1, 1, 2, 3, 4), {"scale_factor": (2.2, 1.2, 1.7), "mode": "nearest"}),
}


@pytest.mark.parametrize("case", sorted(UPSAMPLES))
def test_nearest_upsampling_backward_is_torchs_kernel(case: str) -> None:
    """Integer data: torch float64's gradient is exact, so the exact reference (which
    evaluates torch's backward op) must give it exactly, and float32 emulated must equal
    torch float32 (sums of small integers are exact in both)."""
    shape, kw = UPSAMPLES[case]
    model = _Upsample(shape, kw)
    out = model(torch.ones(()))
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-9, 9, out.shape, generator=g).double()
    y = torch.zeros_like(out)
    loss = nn.MSELoss(reduction="sum")
    m = copy.deepcopy(model)
    loss(m(x), y).backward()
    net = fpgrad.from_module(model, x, y, loss)
    ex = exact_graph(net.graph).result
    mid, _ = ex.enclosure("grads/w")
    assert np.array_equal(np.asarray(mid, dtype=float).reshape(shape), m.w.grad.numpy())
    cmp = fpgrad.compare(net, ["float32:emulated"])
    assert np.array_equal(cmp.values("float32:emulated")["w"].reshape(shape), m.w.grad.numpy())
