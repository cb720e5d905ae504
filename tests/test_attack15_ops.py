"""Adversarial checks on the newest op families (attack15): each test states a fact that the
certified reference or a native column must respect, with an oracle written independently of
fpgrad (exact rationals, mpmath from torch's definitions, torch eager autograd)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from tests.oracle.graph_reference import CTX, mp
from tests.test_graph_oracle import _claims


def _mpf(q: Fraction) -> object:
    return CTX.mpf(q.numerator) / q.denominator


class _VarAndAlpha(nn.Module):
    """``add(var(x, 1), (x - mean(x, 1)) * w, alpha=2/3)`` with x = p * input: the backward
    holds var's ``mul.Scalar(g, fl(2 / 3))`` and add's own ``mul.Scalar(g, alpha)``, the same
    float, each followed by a product with ``x - mean(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor([[1.0, 2.0, 4.0, 8.0], [0.5, -1.0, 3.0, 2.0]],
                                           dtype=torch.float64))  # fmt: skip
        self.w = nn.Parameter(torch.tensor([[1.0, 0.5, -2.0, 1.0], [1.0, 2.0, 1.0, 1.0]],
                                           dtype=torch.float64))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xx = self.p * x
        d = xx - xx.mean(1, keepdim=True)
        return torch.add(xx.var(1, keepdim=True), d * self.w, alpha=2 / 3)


def test_a_models_own_alpha_is_not_read_as_var_backward_divisor() -> None:
    """L = sum_ij (v_i + a d_ij w_ij)^2, v the unbiased variance of row i of p, d = p - mean,
    a = fl(2/3) (the float64 the model wrote); dL/dw_ij = 2 (v_i + a d_ij w_ij) a d_ij, every
    term an exact rational (Fractions). The add's backward scales by the float a, which equals
    var's float64 2 / (4 - 1): the exact reference read it as the rational 2/3 (values
    certified to 42 digits, 1e-16 off the true ones)."""
    model = _VarAndAlpha()
    x = torch.ones(2, 4, dtype=torch.float64)
    y = torch.zeros(2, 4, dtype=torch.float64)
    net = fpgrad.from_module(model, x, y, nn.MSELoss(reduction="sum"))
    ex = exact_graph(net.graph).result
    a = Fraction(2 / 3)
    p = [[Fraction(v) for v in row] for row in model.p.detach().tolist()]
    w = [[Fraction(v) for v in row] for row in model.w.detach().tolist()]
    gw = np.empty((2, 4), dtype=object)
    loss = Fraction(0)
    for i in range(2):
        mean = sum(p[i]) / 4
        d = [v - mean for v in p[i]]
        var = sum(e * e for e in d) / 3
        for j in range(4):
            gw[i, j] = _mpf(2 * (var + a * d[j] * w[i][j]) * a * d[j])
            loss += (var + a * d[j] * w[i][j]) ** 2
    _claims(ex, "loss", np.array(_mpf(loss), dtype=object).reshape(()), CTX.mpf(0))
    _claims(ex, "grads/w", gw, CTX.mpf(0))


class _EluAndCelu(nn.Module):
    """``elu(z, a) + 3 celu(z, a)``, z = w x, a = 1 + 2^-30: float32(a) = 1, so elu's backward
    (input_scale 1) carries the input_scale torch derives for celu's, 1 / float32(a)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([-1.5, -0.25, 2.0], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.w * x
        a = 1 + 2**-30
        return nn.functional.elu(z, alpha=a) + 3 * nn.functional.celu(z, alpha=a)


def test_elu_beside_celu_of_the_same_input_keeps_its_own_derivative() -> None:
    """L = sum_i f(w_i)^2, f(z) = a (e^z - 1) + 3 a (e^(z/a) - 1) for z <= 0 and 4 z above
    (torch's definitions of elu and celu); dL/dw = 2 f(w) f'(w), f'(z) = a e^z + 3 e^(z/a)
    for z <= 0 (mpmath). The elu_backward of F.elu matched celu_scale's test (input_scale 1
    is 1 / float32(a), and a celu of the same z with the same alpha exists), so its
    derivative was taken as e^(z/a): certified to 43 digits, 1e-9 off. The reference must
    enclose the oracle or refuse the model in one line."""
    from fpgrad.errors import InputError

    model = _EluAndCelu()
    x = torch.ones(3, dtype=torch.float64)
    net = fpgrad.from_module(
        model, x, torch.zeros(3, dtype=torch.float64), nn.MSELoss(reduction="sum")
    )
    try:
        ex = exact_graph(net.graph).result
    except InputError as e:
        assert "celu" in str(e) and "\n" not in str(e)
        return
    a = CTX.mpf(1 + 2**-30)
    grads, loss = [], CTX.mpf(0)
    for w in model.w.detach().tolist():
        z = CTX.mpf(w)
        if z > 0:
            f, d = 4 * z, CTX.mpf(4)
        else:
            f = a * (CTX.exp(z) - 1) + 3 * a * (CTX.exp(z / a) - 1)
            d = a * CTX.exp(z) + 3 * CTX.exp(z / a)
        grads.append(2 * f * d)
        loss += f * f
    _claims(ex, "loss", np.array(loss, dtype=object).reshape(()), CTX.mpf(10) ** -100)
    _claims(ex, "grads/w", np.array(grads, dtype=object), CTX.mpf(10) ** -100)


class _Logits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x


def _own_smoothing(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's own mix ``0.9 nll + 0.05 smooth`` through ``torch.add(alpha=)``, no
    label_smoothing: its backward scales the seed by ``mul.Scalar(g, 0.9)`` (into
    nll_loss_backward) and ``mul.Scalar(g, 0.05)``, the constants of label smoothing 0.1 over
    two classes."""
    lp = nn.functional.log_softmax(z, 1)
    nll = nn.functional.nll_loss(lp, t)
    smooth = -lp.sum(1).mean()
    return torch.add(torch.add(torch.zeros((), dtype=z.dtype), nll, alpha=0.9), smooth, alpha=0.05)


def test_a_models_own_alphas_are_not_read_as_label_smoothing() -> None:
    """L = 0.9 mean_i(-lp_i,t_i) + 0.05 mean_i(-sum_c lp_i,c), lp = log_softmax(w x), with the
    float64 constants 0.9 and 0.05 as written; the gradient by central differences in mpmath
    (120 digits, h = 1e-30). The backward's two mul.Scalar of the seed matched the label
    smoothing pattern (eps = 0.1, C = 2), so the exact reference used 1 - 0.1 and 0.1 / 2 as
    reals: the gradient certified to 43 digits, 4e-17 relative off."""
    from tests.oracle import graph_reference as R

    model, x, t = _Logits(), torch.ones(2, 2, dtype=torch.float64), torch.tensor([0, 1])
    net = fpgrad.from_module(model, x, t, _own_smoothing)
    ex = exact_graph(net.graph).result

    def f(p: dict) -> object:
        lp = R.log_softmax(p["w"] * R.mp(x), 1)
        nll = sum(-lp[i, int(t[i])] for i in range(2)) / 2
        smooth = sum(-lp[i, c] for i in range(2) for c in range(2)) / 2
        return CTX.mpf(0.9) * nll + CTX.mpf(0.05) * smooth

    value, grads = R.gradients(f, {"w": R.mp(model.w)})
    _claims(ex, "loss", np.array(value, dtype=object).reshape(()), R.REL_ERR)
    _claims(ex, "grads/w", grads["w"], R.REL_ERR)


_SOFT = torch.tensor([0.9, 0.1, 1.0, 0.3], dtype=torch.float64)
_POS_WEIGHT = torch.tensor([3.0, 0.7, 1.3, 2.9], dtype=torch.float64)


def test_bce_with_logits_against_constant_soft_targets_and_pos_weight() -> None:
    """BCE with logits, pos_weight p and soft targets t held by the loss (constants of the
    graph, not its targets): L = mean_i (p_i t_i sp(-z_i) + (1 - t_i) sp(z_i)), z = w x;
    dL/dw_i = ((p_i t_i + 1 - t_i) s(z_i) - p_i t_i) / 4 (torch's backward formula, which is
    the derivative; mpmath). The backward's ``p t + 1 - t`` reads only constants, so torch
    computed it once in float64 and the exact reference took the rounded number as exact:
    gradients certified to 43 digits, 2e-17 relative off (the forward's fused op uses the
    exact p t)."""
    model = _Logits()
    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)

    def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.BCEWithLogitsLoss(pos_weight=_POS_WEIGHT)(z.reshape(4), _SOFT)

    net = fpgrad.from_module(model, x, torch.zeros(4, dtype=torch.float64), loss)
    ex = exact_graph(net.graph).result
    z = (model.w * x).detach().reshape(4).tolist()
    grads, total = [], CTX.mpf(0)
    for zi, t, p in zip(z, _SOFT.tolist(), _POS_WEIGHT.tolist(), strict=True):
        zi, t, p = CTX.mpf(zi), CTX.mpf(t), CTX.mpf(p)
        s = 1 / (1 + CTX.exp(-zi))
        total += p * t * CTX.log1p(CTX.exp(-zi)) + (1 - t) * CTX.log1p(CTX.exp(zi))
        grads.append(((p * t + 1 - t) * s - p * t) / 4)
    gw = np.array(grads, dtype=object).reshape(2, 2) * mp(x)
    _claims(ex, "loss", np.array(total / 4, dtype=object).reshape(()), CTX.mpf(10) ** -100)
    _claims(ex, "grads/w", gw, CTX.mpf(10) ** -100)


_PRIOR = torch.tensor([[0.1, 0.2, 0.7], [0.3, 0.3, 0.4]], dtype=torch.float64)


class _LogSoftmax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.25]],
                                           dtype=torch.float64))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.log_softmax(self.w * x, 1)


def test_kl_div_against_a_constant_target_distribution() -> None:
    """KL divergence to a fixed prior the loss holds (a constant of the graph): L = sum_ij
    t_ij (log t_ij - lp_ij) / 2 (batchmean), lp = log_softmax(w x); loss and gradient by
    mpmath (120 digits; central differences). torch's ``xlogy(t, t)`` of the constant prior
    was its float64 rounding, certified as exact: the loss 0.080499811478866789588... +-
    1.3e-43 for the real 0.080499811478866798748... (fails with ``_exact_constant``
    disabled, the behaviour before)."""
    from tests.oracle import graph_reference as R

    model, x = _LogSoftmax(), torch.ones(2, 3, dtype=torch.float64)

    def loss(lp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.kl_div(lp, _PRIOR, reduction="batchmean")

    net = fpgrad.from_module(model, x, torch.zeros((), dtype=torch.float64), loss)
    ex = exact_graph(net.graph).result
    t = mp(_PRIOR)

    def f(p: dict) -> object:
        lp = R.log_softmax(p["w"] * mp(x), 1)
        return np.sum(t * (R.log(t) - lp)) / 2

    value, grads = R.gradients(f, {"w": mp(model.w)})
    _claims(ex, "loss", np.array(value, dtype=object).reshape(()), R.REL_ERR)
    _claims(ex, "grads/w", grads["w"], R.REL_ERR)


class _SinusoidalTable(nn.Module):
    """``lin(x + pe)`` with the sinusoidal table built in the forward, written in place into
    a fresh zeros tensor (``pe[:, 0::2] = sin(..)``, the usual positional encoding)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(3, dtype=x.dtype).unsqueeze(1)
        div = torch.exp(torch.arange(0, 4, 2, dtype=x.dtype) * (-9.210340371976184 / 4))
        pe = torch.zeros(3, 4, dtype=x.dtype)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        return self.lin(x + pe)


def test_a_positional_table_written_in_place_in_the_forward() -> None:
    """L = sum (W (x + pe) + b)^2 with pe the real table the forward defines: sin and cos of
    k exp(2 j c), c = fl(-9.210340371976184 / 4) (arithmetic on floating constants is computed
    exactly, docs/howto/torch-models.md; the writes carry those values, attack16), by mpmath
    at 120 digits. The interpreter entered the zeros tensor into the system before torch's
    in-place ``copy_`` into its slices, so the model's ``x + pe`` read zeros: loss
    1.7447925870689297 certified exactly (radius 0) for 3.2138728907268739."""
    model = _SinusoidalTable()
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.5, 0.0, -0.75, 1.0], [-2.0, 0.125, 1.0, -0.5]],
                     dtype=torch.float64)  # fmt: skip
    net = fpgrad.from_module(model, x, torch.zeros(3, 2, dtype=torch.float64),
                             nn.MSELoss(reduction="sum"))  # fmt: skip
    ex = exact_graph(net.graph).result
    c = CTX.mpf(-9.210340371976184 / 4)
    pe = [[f(k * CTX.exp(2 * j * c)) for j in range(2) for f in (CTX.sin, CTX.cos)] for k in range(3)]
    h = [[CTX.mpf(a) + p for a, p in zip(r, q, strict=True)] for r, q in zip(x.tolist(), pe, strict=True)]
    w = [[CTX.mpf(v) for v in r] for r in model.lin.weight.detach().tolist()]
    b = [CTX.mpf(v) for v in model.lin.bias.detach().tolist()]
    y = [[sum(w[o][k] * h[i][k] for k in range(4)) + b[o] for o in range(2)] for i in range(3)]
    loss = sum(v * v for r in y for v in r)
    gw = np.array([[sum(2 * y[i][o] * h[i][k] for i in range(3)) for k in range(4)]
                   for o in range(2)], dtype=object)  # fmt: skip
    gb = np.array([sum(2 * y[i][o] for i in range(3)) for o in range(2)], dtype=object)
    err = CTX.mpf(10) ** -100
    _claims(ex, "loss", np.array(loss, dtype=object).reshape(()), err)
    _claims(ex, "grads/lin.weight", gw, err)
    _claims(ex, "grads/lin.bias", gb, err)
    assert ex.certified_digits >= 30
