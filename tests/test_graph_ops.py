"""Each supported op on tiny shapes: exact gradients against torch float64, and the fast
balls against mpmath at 200 bits (two independent implementations of the arithmetic)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.arith.ball import BallArith
from fpgrad.arith.mp import MPArith
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.interpret import interpret
from fpgrad.graph.ops.pointwise import MissingSlot


class Fn(nn.Module):
    """f(x, w) with a (3, 4) parameter w."""

    def __init__(self, f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.f = f
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x, self.w)


def _views(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = (w * x).view(4, 3).permute(1, 0).transpose(0, 1).reshape(12)[2:9]
    return torch.cat([h, h[:3]]) * 2.0


def _sdpa(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    q, k, v = (w * x).view(1, 1, 3, 4), (w + x).view(1, 1, 3, 4), x.view(1, 1, 3, 4)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


CASES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "add_mul_div_sub_neg": lambda x, w: -(x * w - w / (x * x + 1)) + 0.5 * w,
    "exp_log_sqrt": lambda x, w: torch.log(torch.exp(w) + 1) * torch.sqrt(x * x + 1),
    "pow_rsqrt": lambda x, w: w.pow(3) * torch.rsqrt(x.pow(2) + 1),
    "relu_leaky_relu": lambda x, w: F.relu(w * x) + F.leaky_relu(w - x, 0.2),
    "tanh_sigmoid": lambda x, w: torch.tanh(w * x) * torch.sigmoid(w + x),
    "gelu_silu": lambda x, w: F.gelu(w * x) + F.silu(w - x),
    "softmax": lambda x, w: torch.softmax(w * x, -1) * x,
    "log_softmax": lambda x, w: F.log_softmax(w * x, 0),
    "mean_sum": lambda x, w: (w * x).mean(0) * (w + x).sum(1, keepdim=True),
    "view_permute_transpose_slice_cat": _views,
    "split_expand": lambda x, w: (
        torch.cat(torch.split(w * x, 2, dim=1)[::-1], 1) + w[:, :1].expand(3, 4)
    ),
    "matmul_mm_bmm": lambda x, w: (
        torch.bmm((w * x).view(3, 2, 2), x.view(3, 2, 2)) + (w @ x.T).sum()
    ),
    "layer_norm": lambda x, w: F.layer_norm(w * x, (4,)),
    "sdpa_causal": _sdpa,
    "conv1d_groups": lambda x, w: F.conv1d(
        x.view(1, 3, 4), w.view(3, 1, 4)[:, :, :3], padding=1, groups=3
    ),  # fmt: skip
    "conv2d_stride": lambda x, w: F.conv2d(
        x.view(1, 1, 3, 4), w.view(3, 1, 2, 2)[:2], stride=(1, 2)
    ),  # fmt: skip
    "adaptive_avg_pool": lambda x, w: F.adaptive_avg_pool2d((w * x).view(1, 1, 3, 4), (1, 2)),
    "abs": lambda x, w: torch.abs(w - x) * x,
    "elu_selu": lambda x, w: F.elu(w * x, 0.7) + F.selu(w - x),
    "max_avg_pool": lambda x, w: (
        F.max_pool2d((w * x).view(1, 1, 3, 4), 2) + F.avg_pool2d((w + x).view(1, 1, 3, 4), 2)
    ),
}


def _check(model: nn.Module, x, y, loss) -> None:  # noqa: ANN001
    net = fpgrad.from_module(model, x, y, loss)
    ex = exact_graph(net.graph)
    assert ex.certified_digits >= 17
    xs = x if isinstance(x, tuple) else (x,)
    m64 = copy.deepcopy(model).double()
    loss64 = copy.deepcopy(loss).double() if isinstance(loss, nn.Module) else loss
    y64 = y.double() if y.is_floating_point() else y
    loss64(m64(*(t.double() if t.is_floating_point() else t for t in xs)), y64).backward()
    scale = max(float(p.grad.abs().max()) for p in m64.parameters())
    for name, p in m64.named_parameters():
        e, r = ex.arrays[f"grads/{name}"], p.grad.numpy()
        noise = e.zero & (np.abs(r) <= 1e-12 * scale)
        np.testing.assert_allclose(e.hi[~noise], r[~noise], rtol=1e-8, atol=1e-14 * scale)
    try:  # the balls against mpmath: two implementations of the same real numbers
        ball = interpret(net.graph, BallArith(150), keep=False)
    except MissingSlot:
        return  # GELU: the exact reference is mpmath itself (checked above against float64)
    mp = MPArith(200)
    high = interpret(net.graph, mp, keep=False)
    for name in net.param_names:
        b = BallArith(150).to_float64(ball.grads[name])
        np.testing.assert_allclose(b, mp.to_float64(high.grads[name]), rtol=1e-14, atol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_against_float64_and_mpmath(case: str) -> None:
    torch.manual_seed(3)
    model = Fn(CASES[case])
    x = torch.randn(3, 4)
    out = model(x)
    y = torch.randn(out.shape)
    _check(model, x, y, nn.MSELoss())


@pytest.mark.parametrize(
    "loss",
    [
        pytest.param(nn.CrossEntropyLoss(reduction="sum"), id="ce-sum"),
        pytest.param(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5])), id="ce-weights"),
        pytest.param(nn.CrossEntropyLoss(ignore_index=1), id="ce-ignore"),
        pytest.param(lambda o, t: F.nll_loss(F.log_softmax(o, 1), t), id="nll"),
    ],
)
def test_classification_losses(loss) -> None:  # noqa: ANN001
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    _check(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]), loss)


def test_embedding_with_repeated_and_unused_tokens() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Embedding(6, 3, padding_idx=5), nn.Flatten(0), nn.Linear(12, 2))
    tokens = torch.tensor([1, 1, 4, 5])
    _check(model, tokens, torch.randn(2), nn.MSELoss(reduction="sum"))


def test_l1_loss() -> None:
    torch.manual_seed(6)
    _check(nn.Linear(4, 2), torch.randn(5, 4), torch.randn(5, 2), nn.L1Loss())


@pytest.mark.parametrize(
    "loss",
    [
        pytest.param(nn.BCEWithLogitsLoss(), id="bce-with-logits"),
        pytest.param(nn.HuberLoss(delta=0.5), id="huber"),
        pytest.param(nn.MSELoss(reduction="sum"), id="mse-sum"),
    ],
)
def test_regression_losses(loss) -> None:  # noqa: ANN001
    torch.manual_seed(7)
    _check(nn.Linear(4, 2), torch.randn(5, 4), torch.rand(5, 2), loss)


def test_label_smoothing() -> None:
    torch.manual_seed(8)
    model = nn.Linear(4, 3)
    _check(model, torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0]),
           nn.CrossEntropyLoss(label_smoothing=0.1))  # fmt: skip


def test_in_place_op_on_a_tensor_read_later_is_refused() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x) * 1.0
            first = h[0]  # a view: eager sees the in-place product through it
            h.mul_(2.0)
            return h + first

    from fpgrad.errors import InputError

    with pytest.raises(InputError, match="read after the in-place op or through a view"):
        fpgrad.from_module(InPlace(), torch.randn(2, 3), torch.zeros(2, 3), nn.MSELoss())


def test_neg_inf_mask_read_by_anything_but_softmax_is_refused() -> None:
    from fpgrad.errors import InputError

    mask = torch.tensor([[True, False, False, False]] * 3)
    model = Fn(lambda x, w: torch.exp((w * x).masked_fill(mask, float("-inf"))))
    with pytest.raises(InputError, match="only softmax reads"):
        fpgrad.from_module(model, torch.randn(3, 4), torch.randn(3, 4), nn.MSELoss())
    bias = torch.where(mask, float("-inf"), 0.0)
    model = Fn(lambda x, w: torch.relu(w * x + bias))
    net = fpgrad.from_module(model, torch.randn(3, 4), torch.randn(3, 4), nn.MSELoss())
    with pytest.raises(InputError, match="only softmax reads"):
        exact_graph(net.graph)


def test_fully_masked_softmax_row_is_refused() -> None:
    from fpgrad.errors import InputError

    mask = torch.tensor([[True] * 4, [False] * 4, [False] * 4])
    model = Fn(lambda x, w: torch.softmax((w * x).masked_fill(mask, float("-inf")), 1))
    net = fpgrad.from_module(model, torch.randn(3, 4), torch.randn(3, 4), nn.MSELoss())
    with pytest.raises(InputError, match="-inf everywhere"):
        exact_graph(net.graph)


def test_gelu_tanh_and_padded_pooling_run_in_every_column() -> None:
    """Native and emulated columns of the ops added for issue 13 (the oracle checks the
    exact values): float32 native and emulated agree with torch float32 to rounding."""
    from fpgrad.diagnose.comparison import compare

    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GELU(approximate="tanh"),
                          nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
                          nn.AvgPool2d(2, padding=1, ceil_mode=True, count_include_pad=False),
                          nn.Flatten(), nn.Linear(8, 3))  # fmt: skip
    x, y = torch.randn(2, 1, 5, 5), torch.tensor([0, 2])
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    result = compare(net, "float32,float32:emulated")
    for p in ("float32", "float32:emulated"):
        counts = result.counts(p)
        assert counts["nan"] == counts["overflow"] == counts["wrong_sign"] == 0
        assert counts["ok"] + counts["structural_zero"] == sum(
            int(np.size(v)) for v in result.values(p).values()
        )
