"""Every op of the captured-model coverage list against an independent oracle.

:mod:`tests.oracle.graph_reference` writes each op's forward from its definition in mpmath at
120 digits (no fpgrad op code, no torch) and differentiates the loss by central differences
(error below 1e-40 relative). fpgrad's certified exact reference (``from_module`` +
``exact_graph``) must agree claim by claim: every ball contains the oracle's value (within the
oracle's error), every proven zero is 0, every certified digit is right; the loss too. The
oracle is also checked against torch float64 autograd (to 1e-9 relative), so a misreading of
torch's semantics by the oracle fails here rather than passing silently.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from tests.graph_models import RMSNorm
from tests.oracle import graph_reference as R
from tests.oracle.graph_reference import CTX

Oracle = Callable[..., Any]


def _tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _data(t: torch.Tensor) -> np.ndarray:
    return R.mp(t) if t.is_floating_point() else t.numpy()


def _claims(ex: Any, key: str, oracle: np.ndarray, err: Any) -> None:
    """Every claim of ``ex`` about ``key`` holds for the oracle's values."""
    mid, rad = ex.enclosure(key)
    mid = np.asarray(mid, dtype=object).reshape(oracle.shape)
    rad = np.asarray(rad, dtype=np.float64).reshape(oracle.shape)
    zero, und = ex.zero(key).reshape(oracle.shape), ex.undetermined(key).reshape(oracle.shape)
    digits = np.asarray(ex.digits[key], dtype=np.float64).reshape(oracle.shape)
    for idx in np.ndindex(oracle.shape):
        o, m, r = oracle[idx], CTX.mpf(mid[idx]), CTX.mpf(float(rad[idx]))
        where = f"{key}{list(idx)}: oracle {CTX.nstr(o, 25)}, fpgrad {CTX.nstr(m, 25)} +- {r}"
        assert abs(o - m) <= r + err, f"outside the ball: {where}"
        if zero[idx]:
            assert abs(o) <= err, f"claimed zero: {where}"
        elif not und[idx]:
            bound = abs(m) * CTX.mpf(10) ** -CTX.mpf(float(digits[idx])) * (1 + CTX.mpf(1e-9))
            assert abs(o - m) <= bound + err, f"{digits[idx]:.1f} digits claimed: {where}"


def check(model: nn.Module, inputs: Any, targets: torch.Tensor, loss: Any, forward: Oracle,
          undetermined: bool = False) -> None:  # fmt: skip
    """fpgrad's certified loss and gradients, and torch float64's, against the oracle
    ``forward(params, *inputs, targets)`` (params: name -> mpf arrays)."""
    net = fpgrad.from_module(model, inputs, targets, loss)
    ex = exact_graph(net.graph).result
    assert ex.certified_digits >= 17
    if not undetermined:
        assert ex.undetermined_count == 0
    params = {n: R.mp(p) for n, p in model.named_parameters()}
    xs, t = tuple(_data(x) for x in _tuple(inputs)), _data(targets)
    value, grads = R.gradients(lambda p: forward(p, *xs, t), params)
    scale = max([CTX.mpf(1), abs(value)] + [abs(v) for g in grads.values() for v in g.ravel()])
    err = R.REL_ERR * scale
    _claims(ex, "loss", np.array(value, dtype=object).reshape(()), err)
    for name, g in grads.items():
        _claims(ex, f"grads/{name}", g, err)
    # torch float64 autograd against the oracle
    m64 = copy.deepcopy(model).double()
    loss64 = copy.deepcopy(loss).double() if isinstance(loss, nn.Module) else loss
    x64 = tuple(x.double() if x.is_floating_point() else x for x in _tuple(inputs))
    y64 = targets.double() if targets.is_floating_point() else targets
    out = loss64(m64(*x64), y64)
    out.backward()
    fscale = float(scale)
    assert abs(out.item() - float(value)) <= 1e-9 * fscale
    for name, p in m64.named_parameters():
        o = np.array([float(v) for v in grads[name].ravel()]).reshape(grads[name].shape)
        np.testing.assert_allclose(p.grad.numpy(), o, rtol=1e-9, atol=1e-12 * fscale)


class Fn(nn.Module):
    """f(x, w) with a (3, 4) parameter w."""

    def __init__(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.f = f
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x, self.w)


def _views(x: Any, w: Any) -> Any:
    """reshape/view/flatten/permute/transpose/slice/cat/split/expand: the same code runs on
    torch tensors and on numpy object arrays."""
    torchy = isinstance(w, torch.Tensor)
    h = (w * x).reshape(4, 3)
    h = h.permute(1, 0) if torchy else h.transpose(1, 0)
    h = h.transpose(0, 1) if torchy else h.swapaxes(0, 1)
    h = h.flatten()[2:9]
    cat = torch.cat if torchy else np.concatenate
    parts = torch.split(w * 2.0, 2, dim=1) if torchy else np.split(w * 2, 2, axis=1)
    col = w[:, :1].expand(3, 4) if torchy else np.broadcast_to(w[:, :1], (3, 4))
    return cat([h, h[:3], (cat([parts[1], parts[0]], 1) + col).reshape(12)])


def _matmul(x: Any, w: Any) -> Any:
    if isinstance(w, torch.Tensor):
        return torch.bmm((w * x).view(3, 2, 2), x.view(3, 2, 2)).sum(0) + (w @ x.T)[:2, :2] \
            + torch.mm(w[:2], x[:2].T)  # fmt: skip
    return np.matmul((w * x).reshape(3, 2, 2), x.reshape(3, 2, 2)).sum(0) + np.matmul(w, x.T)[:2, :2] \
        + np.matmul(w[:2], x[:2].T)  # fmt: skip


def _qkv(x: Any, w: Any) -> tuple[Any, Any, Any]:
    shape = (1, 1, 3, 4)
    return (w * x).reshape(shape), (w + x).reshape(shape), x.reshape(shape)


BOOL_MASK = torch.tensor([[True, False, True], [True, True, False], [False, True, True]])
ADD_MASK = torch.tensor([[0.0, float("-inf"), 0.5], [0.25, 0.0, float("-inf")],
                         [float("-inf"), -1.0, 0.0]])  # fmt: skip


MASK = torch.tensor([[False, True, False, True], [True, False, False, False],
                     [False, False, True, False]])  # fmt: skip
ADD_BIAS = torch.tensor([[0.0, float("-inf"), 1.0, 0.5], [float("-inf"), 0.0, 0.0, 0.0],
                         [0.0, 0.0, float("-inf"), -2.0]])  # fmt: skip


def _sdpa(kind: str) -> tuple[Callable, Oracle]:
    def t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        q, k, v = _qkv(x, w)
        if kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=BOOL_MASK if kind == "bool" else ADD_MASK
        )

    def o(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        q, k, v = _qkv(x, w)
        if kind == "causal":
            bias = R.causal_bias(3)
        elif kind == "bool":
            bias = np.where(BOOL_MASK.numpy(), R.ZERO, R.NEG_INF)
        else:
            bias = R.mp(ADD_MASK)
        return R.attention(q, k, v, bias)

    return t, o


# (torch f(x, w), oracle f(x, w)) pairs; the loss is the mean squared error to random targets
POINTWISE: dict[str, tuple[Callable, Oracle]] = {
    "add_sub_mul_div_neg_residual": (
        lambda x, w: -(x * w - w / (x * x + 1)) + 0.5 * w + x,
        lambda x, w: -(x * w - w / (x * x + 1)) + CTX.mpf(0.5) * w + x,
    ),
    "exp_log_sqrt_rsqrt": (
        lambda x, w: torch.log(torch.exp(w) + 1) * torch.sqrt(x * x + 1) * torch.rsqrt(w * w + 2),
        lambda x, w: R.log(R.exp(w) + 1) * R.sqrt(x * x + 1) / R.sqrt(w * w + 2),
    ),
    "pow": (
        lambda x, w: w.pow(3) * (x.pow(2) + 1).pow(-1) + (w * w + 1).pow(-0.5) + (w * w).pow(0.5),
        lambda x, w: w**3 / (x**2 + 1) + 1 / R.sqrt(w * w + 1) + R.sqrt(w * w),
    ),
    "relu_leaky_relu_elu": (
        lambda x, w: F.relu(w * x) + F.leaky_relu(w - x, 0.2) + F.elu(w + x, 0.7),
        lambda x, w: R.relu(w * x) + R.leaky_relu(w - x, 0.2) + R.elu(w + x, 0.7),
    ),
    "sigmoid_tanh": (
        lambda x, w: torch.tanh(w * x) * torch.sigmoid(w + x),
        lambda x, w: R.tanh(w * x) * R.sigmoid(w + x),
    ),
    "gelu_silu": (
        lambda x, w: F.gelu(w * x) + F.silu(w - x),
        lambda x, w: R.gelu(w * x) + R.silu(w - x),
    ),
    "softmax_log_softmax": (
        lambda x, w: torch.softmax(w * x, -1) * x + F.log_softmax(w + x, 0),
        lambda x, w: R.softmax(w * x, -1) * x + R.log_softmax(w + x, 0),
    ),
    "mean_sum": (
        lambda x, w: (w * x).mean(0) * (w + x).sum(1, keepdim=True) + w.sum() + w.mean(),
        lambda x, w: (
            np.sum(w * x, axis=0) / 3 * np.sum(w + x, axis=1, keepdims=True)
            + np.sum(w)
            + np.sum(w) / 12
        ),
    ),
    "views": (_views, _views),
    "matmul_mm_bmm": (_matmul, _matmul),
    "sdpa_causal": _sdpa("causal"),
    "sdpa_bool_mask": _sdpa("bool"),
    "sdpa_additive_inf_mask": _sdpa("add"),
    "max_avg_pool": (
        lambda x, w: (
            F.max_pool2d((w * x).view(1, 1, 3, 4), 2) + F.avg_pool2d((w + x).view(1, 1, 3, 4), 2)
        ),
        lambda x, w: (
            R.max_pool2d((w * x).reshape(1, 1, 3, 4), 2, 2)
            + R.avg_pool2d((w + x).reshape(1, 1, 3, 4), 2, 2)
        ),
    ),
    "gelu_tanh": (
        lambda x, w: F.gelu(w * x * 3, approximate="tanh"),
        lambda x, w: R.gelu_tanh(w * x * 3),
    ),
    "var": (
        lambda x, w: torch.var(w * x, 1) + (w + x).var(0, correction=0)[:3] + w.var(),
        lambda x, w: R.var(w * x, 1, 1) + R.var(w + x, 0, 0)[:3] + R.var(w.reshape(-1), 0, 1),
    ),
    "max_avg_pool_padding_ceil_mode": (
        lambda x, w: torch.stack(
            [
                F.max_pool2d((w * x).view(1, 1, 3, 4), 2, padding=1, ceil_mode=True).sum(),
                F.max_pool2d((w - x).view(1, 1, 3, 4), 3, 2, padding=1).sum(),
                F.avg_pool2d((w + x).view(1, 1, 3, 4), 2, padding=1, ceil_mode=True).sum(),
                F.avg_pool2d((w * w).view(1, 1, 3, 4), 3, 2, 1, True, False).sum(),
            ]
        ),
        lambda x, w: np.array(
            [
                np.sum(R.max_pool2d((w * x).reshape(1, 1, 3, 4), 2, 2, 1, True)),
                np.sum(R.max_pool2d((w - x).reshape(1, 1, 3, 4), 3, 2, 1)),
                np.sum(R.avg_pool2d((w + x).reshape(1, 1, 3, 4), 2, 2, 1, True)),
                np.sum(R.avg_pool2d((w * w).reshape(1, 1, 3, 4), 3, 2, 1, True, False)),
            ],
            dtype=object,
        ),
    ),
    "masked_fill_neg_inf_softmax": (
        lambda x, w: (
            torch.softmax((w * x).masked_fill(MASK, float("-inf")), -1)
            + torch.softmax(w + x + ADD_BIAS, 0)
        ),
        lambda x, w: (
            R.softmax(np.where(MASK.numpy(), R.NEG_INF, w * x), -1)
            + R.softmax(w + x + R.mp(ADD_BIAS), 0)
        ),
    ),
    "adaptive_avg_pool": (
        lambda x, w: (
            F.adaptive_avg_pool2d((w * x).view(1, 1, 3, 4), (1, 2)).sum()
            + F.adaptive_avg_pool2d((w + x).view(1, 1, 3, 4), (2, 3))
        ),
        lambda x, w: (
            np.sum(R.adaptive_avg_pool2d((w * x).reshape(1, 1, 3, 4), 1, 2))
            + R.adaptive_avg_pool2d((w + x).reshape(1, 1, 3, 4), 2, 3)
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(POINTWISE))
def test_op(case: str) -> None:
    torch.manual_seed(3)
    tf, of = POINTWISE[case]
    model = Fn(tf)
    x = torch.randn(3, 4)
    y = torch.randn(model(x).shape)
    check(model, x, y, nn.MSELoss(), lambda p, x, y: R.mse(of(x, p["w"]), y))


def _lin(p: dict, name: str, x: np.ndarray) -> np.ndarray:
    b = p.get(f"{name}.bias")
    return R.linear(x, p[f"{name}.weight"], b)


def test_linear_residual_dropout_eval() -> None:
    torch.manual_seed(0)

    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.drop = nn.Linear(3, 3), nn.Linear(3, 2), nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.drop(x + torch.tanh(self.a(x))))

    model = Res().eval()
    check(model, torch.randn(4, 3), torch.randn(4, 2), nn.MSELoss(),
          lambda p, x, y: R.mse(_lin(p, "b", x + R.tanh(_lin(p, "a", x))), y))  # fmt: skip


def test_conv1d_stride_padding_groups() -> None:
    torch.manual_seed(1)
    model = nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2)
    x = torch.randn(2, 2, 5)
    check(model, x, torch.randn(model(x).shape), nn.MSELoss(),
          lambda p, x, y: R.mse(R.conv1d(x, p["weight"], p["bias"], 2, 1, 2), y))  # fmt: skip


def test_conv2d_stride_padding_groups_dilation() -> None:
    torch.manual_seed(2)
    model = nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    x = torch.randn(1, 2, 5, 4)

    def f(p: dict, x: np.ndarray, y: np.ndarray) -> Any:
        return R.mse(R.conv2d(x, p["weight"], p["bias"], (2, 1), (1, 0), (1, 2), 2), y)

    check(model, x, torch.randn(model(x).shape), nn.MSELoss(), f)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_norm_1d_2d(train: bool) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 2, 2, bias=False), nn.BatchNorm2d(2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(2 * 2 * 2, 3, bias=False),
                          nn.BatchNorm1d(3))  # fmt: skip
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    model.train(train)
    stats = {i: (R.mp(model[i].running_mean), R.mp(model[i].running_var)) for i in (1, 5)}

    def f(p: dict, x: np.ndarray, y: np.ndarray) -> Any:
        h = R.conv2d(x, p["0.weight"], None)
        h = R.tanh(R.batch_norm(h, p["1.weight"], p["1.bias"], 1e-5, None if train else stats[1]))
        h = R.linear(h.reshape(h.shape[0], -1), p["4.weight"], None)
        h = R.batch_norm(h, p["5.weight"], p["5.bias"], 1e-5, None if train else stats[5])
        return R.mse(h, y)

    check(model, torch.randn(3, 1, 3, 3), torch.randn(3, 3), nn.MSELoss(), f)


def test_layer_norm_and_hand_rms_norm() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), RMSNorm(4))

    def f(p: dict, x: np.ndarray, y: np.ndarray) -> Any:
        h = R.layer_norm(_lin(p, "0", x), p["1.weight"], p["1.bias"], 1e-5)
        ms = np.sum(h**2, axis=-1, keepdims=True) / 4
        return R.mse(h / R.sqrt(ms + CTX.mpf(1e-6)) * p["2.weight"], y)

    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[2].weight.uniform_(0.5, 1.5)
    check(model, torch.randn(3, 4), torch.randn(3, 4), nn.MSELoss(), f)


def test_multihead_attention_causal_and_padding_masks() -> None:
    torch.manual_seed(6)

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            causal = torch.triu(torch.full((3, 3), float("-inf")), diagonal=1)
            return self.attn(x, x, x, attn_mask=causal, key_padding_mask=pad,
                             need_weights=False)[0]  # fmt: skip

    pad = torch.tensor([[False, False, False], [False, False, True]])

    def f(p: dict, x: np.ndarray, pad: np.ndarray, y: np.ndarray) -> Any:
        return R.mse(R.multihead(x, p, "attn", 2, R.causal_bias(3), pad), y)

    # the key projection's bias has an exact zero gradient (softmax ignores a shift per
    # query) that no ball proves: undetermined, and the oracle checks those balls contain 0
    check(Attn(), (torch.randn(2, 3, 4), pad), torch.randn(2, 3, 4), nn.MSELoss(), f,
          undetermined=True)  # fmt: skip


def test_embedding_with_padding_idx() -> None:
    """The padding row's gradient is 0 by torch's definition: the oracle holds it fixed."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Embedding(6, 3, padding_idx=5), nn.Flatten(0), nn.Linear(12, 2))
    frozen = R.mp(model[0].weight)[5]

    def f(p: dict, tokens: np.ndarray, y: np.ndarray) -> Any:
        table = p["0.weight"].copy()
        table[5] = frozen
        return R.mse(_lin(p, "2", table[tokens].reshape(-1)), y, "sum")

    check(model, torch.tensor([1, 1, 4, 5]), torch.randn(2), nn.MSELoss(reduction="sum"), f)


TARGETS = torch.tensor([0, 1, 2, 1, 0])
WEIGHTS = torch.tensor([1.0, 2.0, 0.5])
CLASSIFICATION: dict[str, tuple[Any, Any, Oracle]] = {
    "ce_mean": (nn.CrossEntropyLoss(), TARGETS, lambda z, t: R.cross_entropy(z, t)),
    "ce_sum": (
        nn.CrossEntropyLoss(reduction="sum"),
        TARGETS,
        lambda z, t: R.cross_entropy(z, t, reduction="sum"),
    ),  # fmt: skip
    "ce_weights_ignore_index": (
        nn.CrossEntropyLoss(weight=WEIGHTS, ignore_index=1),
        TARGETS,
        lambda z, t: R.cross_entropy(z, t, R.mp(WEIGHTS), ignore_index=1),
    ),  # fmt: skip
    "ce_label_smoothing": (
        nn.CrossEntropyLoss(label_smoothing=0.1),
        TARGETS,
        lambda z, t: R.cross_entropy(z, t, smoothing=0.1),
    ),
    "ce_smoothing_weights_sum": (
        nn.CrossEntropyLoss(weight=WEIGHTS, label_smoothing=0.2, reduction="sum"),
        TARGETS,
        lambda z, t: R.cross_entropy(z, t, R.mp(WEIGHTS), smoothing=0.2, reduction="sum"),
    ),  # fmt: skip
    "ce_probabilities_smoothing": (
        nn.CrossEntropyLoss(label_smoothing=0.1),
        torch.softmax(torch.arange(15.0).view(5, 3).sin(), 1),
        lambda z, t: R.cross_entropy(z, t, smoothing=0.1),
    ),
    "ce_probabilities_weights_sum": (
        nn.CrossEntropyLoss(weight=WEIGHTS, reduction="sum"),
        torch.softmax(torch.arange(15.0).view(5, 3).cos(), 1),
        lambda z, t: R.cross_entropy(z, t, R.mp(WEIGHTS), reduction="sum"),
    ),
    "f_cross_entropy": (F.cross_entropy, TARGETS, lambda z, t: R.cross_entropy(z, t)),
    "nll_log_softmax": (
        lambda o, t: nn.NLLLoss()(F.log_softmax(o, 1), t),
        TARGETS,
        lambda z, t: R.nll(R.log_softmax(z, 1), t),
    ),
}


@pytest.mark.parametrize("case", sorted(CLASSIFICATION))
def test_classification_loss(case: str) -> None:
    torch.manual_seed(8)
    loss, targets, of = CLASSIFICATION[case]
    model = nn.Linear(4, 3)
    check(model, torch.randn(5, 4), targets, loss,
          lambda p, x, t: of(R.linear(x, p["weight"], p["bias"]), t))  # fmt: skip


REGRESSION: dict[str, tuple[Any, Oracle]] = {
    "mse_mean": (nn.MSELoss(), lambda y, t: R.mse(y, t)),
    "mse_sum": (nn.MSELoss(reduction="sum"), lambda y, t: R.mse(y, t, "sum")),
    "l1_mean": (nn.L1Loss(), lambda y, t: R.l1(y, t)),
    "l1_sum": (nn.L1Loss(reduction="sum"), lambda y, t: R.l1(y, t, "sum")),
    "huber": (nn.HuberLoss(delta=0.5), lambda y, t: R.huber(y, t, 0.5)),
    "bce_with_logits_mean": (nn.BCEWithLogitsLoss(), lambda y, t: R.bce_logits(y, t)),
    "bce_with_logits_pos_weight": (
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 0.5])),
        lambda y, t: R.bce_logits(y, t, R.mp(torch.tensor([3.0, 0.5]))),
    ),
    "bce_with_logits_sum": (
        nn.BCEWithLogitsLoss(reduction="sum"),
        lambda y, t: R.bce_logits(y, t, reduction="sum"),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(REGRESSION))
def test_regression_loss(case: str) -> None:
    torch.manual_seed(9)
    loss, of = REGRESSION[case]
    check(nn.Linear(4, 2), torch.randn(5, 4), torch.rand(5, 2), loss,
          lambda p, x, t: of(R.linear(x, p["weight"], p["bias"]), t))  # fmt: skip
