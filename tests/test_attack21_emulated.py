"""Adversarial round 21: emulated columns of convolutions, pooling, norms, softmax and the
activations against an independent step-by-step MPFR oracle (gmpy2 contexts with the format's
precision, exponent range and subnormals, as ``tests/test_emulated.py``), in the four
deterministic rounding modes, following the documented rule of each op.
"""

from __future__ import annotations

import gmpy2
import numpy as np
import pytest
import torch
from gmpy2 import mpfr
from torch import nn

import fpgrad
from fpgrad.graph.interpret import interpret
from fpgrad.graph.precisions import emulated_systems
from fpgrad.numbers.formats import get_format
from fpgrad.numbers.rounding import Mode
from tests.test_emulated import DIRECTED, as_float, context, finish

MODE_NAME = {
    Mode.NEAREST_EVEN: "nearest_even",
    Mode.TOWARD_ZERO: "toward_zero",
    Mode.UP: "up",
    Mode.DOWN: "down",
}
WIDE = gmpy2.context(precision=400, emax=1 << 24, emin=-(1 << 24))
F32 = gmpy2.context(precision=24, emin=-148, emax=128, subnormalize=True,
                    round=gmpy2.RoundToNearest)  # fmt: skip


class Oracle:
    """One correctly rounded operation per documented step, in MPFR."""

    def __init__(self, name: str, mode: Mode) -> None:
        self.fmt, self.mode = get_format(name), mode
        self.ctx = context(self.fmt, mode)

    def _fin(self, r: mpfr) -> float:
        return float(finish(as_float(r), self.fmt, self.mode))

    def store(self, x: float) -> float:  # storage: nearest even
        return float(finish(as_float(context(self.fmt, Mode.NEAREST_EVEN).plus(mpfr(x))),
                            self.fmt, Mode.NEAREST_EVEN))  # fmt: skip

    def add(self, a: float, b: float) -> float:
        return self._fin(self.ctx.add(mpfr(a), mpfr(b)))

    def sub(self, a: float, b: float) -> float:
        return self._fin(self.ctx.sub(mpfr(a), mpfr(b)))

    def mul(self, a: float, b: float) -> float:
        return self._fin(self.ctx.mul(mpfr(a), mpfr(b)))

    def div(self, a: float, b: float) -> float:
        return self._fin(self.ctx.div(mpfr(a), mpfr(b)))

    def sum_fp32(self, terms: list[float]) -> float:
        """The default accumulation: exact terms into a float32 accumulator rounded to nearest
        even after every add, left to right, then one rounding into the format."""
        acc = F32.plus(mpfr(terms[0]))
        for t in terms[1:]:
            acc = F32.add(acc, mpfr(t))
        return self._fin(self.ctx.plus(acc))

    def dot_fp32(self, a: list[float], b: list[float]) -> float:
        acc = F32.plus(WIDE.mul(mpfr(a[0]), mpfr(b[0])))
        for x, y in zip(a[1:], b[1:], strict=True):
            acc = F32.add(acc, WIDE.mul(mpfr(x), mpfr(y)))
        return self._fin(self.ctx.plus(acc))


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: object, name: str):  # noqa: ANN202
    net = fpgrad.from_module(model, x, y, loss)
    return interpret(net.graph, emulated_systems()(name))


def _value(trace, prefix: str) -> np.ndarray:  # noqa: ANN001
    keys = [k for k in trace.values if k == prefix or k.startswith(prefix)]
    return np.asarray(trace.values[keys[0]], dtype=np.float64)


# ---- finding 1: element counts were stored in the format before dividing ---------------------


class _Mean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True) * self.w


@pytest.mark.parametrize("mode", DIRECTED)
def test_mean_divides_by_the_count_not_the_count_rounded_into_the_format(mode: Mode) -> None:
    """fp8_e5m2 ``x.mean(1)`` of [1]*8 + [2] (sum 10, n = 9): the column divided by 9 stored in
    e5m2, which is 8: 10 / 8 = 1.25 in every mode; the documented rule (the machine's sum, one
    correctly rounded division by n) gives 10 / 9 = 1.11 rounded: 1.0 (nearest, toward zero,
    down), 1.25 (up). Same for layer/batch/group norm statistics, avg pooling's divisor, var's
    n - correction and the losses' "mean"; float16 held 2049 as 2048."""
    name = f"fp8_e5m2:{MODE_NAME[mode]}"
    x = torch.tensor([[1.0] * 8 + [2.0]], dtype=torch.float64)
    tr = _run(_Mean(), x, torch.zeros(1, 1, dtype=torch.float64), nn.MSELoss(), name)
    o = Oracle("fp8_e5m2", mode)
    want = o.div(o.sum_fp32([1.0] * 8 + [2.0]), 9.0)
    assert float(_value(tr, "mean").ravel()[0]) == want


@pytest.mark.parametrize("mode", DIRECTED)
def test_avg_pool_and_layer_norm_divide_by_exact_counts(mode: Mode) -> None:
    """avg_pool2d 3x3 and LayerNorm(9)'s saved mean in fp8_e5m2 over a window summing to 10
    (was 10 / 8 = 1.25: the divisor 9 stored in e5m2 as 8)."""
    name = f"fp8_e5m2:{MODE_NAME[mode]}"
    o = Oracle("fp8_e5m2", mode)
    vals = [1.0] * 8 + [2.0]
    want = o.div(o.sum_fp32(vals), 9.0)
    x = torch.tensor(vals, dtype=torch.float64).reshape(1, 1, 3, 3)
    pool = nn.Sequential(nn.AvgPool2d(3), nn.Flatten(), nn.Linear(1, 1).double())
    tr = _run(pool, x, torch.zeros(1, 1, dtype=torch.float64), nn.MSELoss(), name)
    assert float(_value(tr, "avg_pool2d").ravel()[0]) == want
    ln = nn.Sequential(nn.LayerNorm(9).double(), nn.Linear(9, 1).double())
    tr = _run(ln, x.reshape(1, 9), torch.zeros(1, 1, dtype=torch.float64), nn.MSELoss(), name)
    out = next(v for k, v in tr.values.items() if k.startswith("native_layer_norm"))
    assert float(np.asarray(out[1], dtype=np.float64).ravel()[0]) == want


# ---- finding 2: a sum over several axes was rounded into the format once per axis ------------


class _SumAll(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).sum(dim=(1, 2)) * self.w


@pytest.mark.parametrize("mode", DIRECTED)
def test_sum_over_several_axes_rounds_once(mode: Mode) -> None:
    """fp8_e5m2 ``x.sum(dim=(1, 2))`` of three rows [2, 0.25] (exact 6.75): the column summed
    each row into the format (2.25 -> 2 to nearest), then 2 + 2 + 2 = 6; the documented fp32
    accumulation (one float32 accumulator, one rounding into the format) gives 6.75 rounded:
    7 (nearest, up), 6 (toward zero, down). Also batch norm's statistics, the conv bias
    gradient over (N, H, W), ``sum()``, ``mean()``; float16 gave 3072 for torch's 3074 on rows
    [1024, 0.5]."""
    name = f"fp8_e5m2:{MODE_NAME[mode]}"
    vals = [2.0, 0.25] * 3
    x = torch.tensor(vals, dtype=torch.float64).reshape(1, 3, 2)
    tr = _run(_SumAll(), x, torch.zeros(1, dtype=torch.float64), nn.MSELoss(), name)
    o = Oracle("fp8_e5m2", mode)
    got = [float(np.asarray(v).ravel()[0]) for k, v in tr.values.items() if k.startswith("sum")]
    assert got[0] == o.sum_fp32(vals)


def test_float16_emulated_sum_of_a_matrix_is_torchs() -> None:
    """float16:emulated ``sum()`` of three rows [1024, 0.5] equals torch's float16 sum (3074;
    the column gave 3072, rounding each row's 1024.5 to 1024 first)."""
    from fpgrad.arith.emulated import EmulatedArith
    from fpgrad.graph.ops._util import sum_dims

    class Cx:
        ar = EmulatedArith("float16")

    x16 = torch.tensor([[1024.0, 0.5]] * 3, dtype=torch.float16)
    got = float(sum_dims(Cx(), x16.double().numpy(), None, False))
    assert got == x16.sum().item() == 3074.0


# ---- held: conv2d forward and its weight/bias gradients, fp8_e4m3, every deterministic mode --


@pytest.mark.parametrize("mode", DIRECTED)
def test_conv2d_forward_and_weight_bias_grads_follow_the_documented_steps(mode: Mode) -> None:
    """fp8_e4m3 Conv2d(1, 1, 2) with bias on a 3x3 input: each output is the window's dot
    product in the fp32 accumulator (offsets ki-major) rounded once, then the bias added with
    one rounding; dW the dot of the upstream gradient with each offset's column, db the fp32
    sum of the gradient (all held, in all four modes)."""
    fmt = "fp8_e4m3"
    conv = nn.Conv2d(1, 1, 2).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.5, -0.625], [0.875, 3.25]]]]))
        conv.bias.fill_(0.4375)
    xs = [[1.125, -2.5, 0.75], [3.5, 0.3125, -1.75], [2.25, 1.375, -0.5]]
    x = torch.tensor([[xs]], dtype=torch.float64)
    y = torch.tensor([[[[0.1, 0.2], [0.3, -0.4]]]], dtype=torch.float64)
    tr = _run(conv, x, y, nn.MSELoss(reduction="sum"), f"{fmt}:{MODE_NAME[mode]}")
    o = Oracle(fmt, mode)
    w = [o.store(v) for v in conv.weight.detach().numpy().ravel().tolist()]
    xr = [[o.store(v) for v in r] for r in xs]
    cols = [
        [xr[i + a][j + c] for i in range(2) for j in range(2)] for a in range(2) for c in range(2)
    ]
    wins = [
        [xr[i][j], xr[i][j + 1], xr[i + 1][j], xr[i + 1][j + 1]] for i in range(2) for j in range(2)
    ]
    want = [o.add(o.dot_fp32(w, win), o.store(0.4375)) for win in wins]
    assert np.asarray(tr.values["convolution"]).ravel().tolist() == want
    g = np.asarray(_value(tr, "mse_loss_backward")).ravel().tolist()
    _, dw, db = tr.values[next(k for k in tr.values if k.startswith("convolution_backward"))]
    assert np.asarray(dw).ravel().tolist() == [o.dot_fp32(g, col) for col in cols]
    assert float(np.asarray(db).ravel()[0]) == o.sum_fp32(g)


# ---- held: softmax and log_softmax step by step, three formats, four modes --------------------


class _Cx:
    def __init__(self, ar: object) -> None:
        self.ar = ar

    def origin(self, i: int) -> None:
        return None

    def label(self) -> str:
        return "test"


@pytest.mark.parametrize("fmt", ["fp8_e5m2", "fp8_e4m3", "float16"])
@pytest.mark.parametrize("mode", DIRECTED)
def test_softmax_and_log_softmax_follow_the_documented_steps(fmt: str, mode: Mode) -> None:
    """Row [1.5, -0.75, 3, -12, 0, -0]: ``z - max`` rounded, exp correctly rounded (MPFR),
    the fp32 sum rounded once, then ``e / sum`` and ``(z - max) - log(sum)`` one rounding
    each (held: exp(-15) underflows e4m3/e5m2 to 0 or the smallest subnormal by mode)."""
    from fpgrad.arith.emulated import EmulatedArith
    from fpgrad.graph.ops import loss as loss_ops

    ar, o = EmulatedArith(fmt, mode=mode), Oracle(fmt, mode)
    z = ar.asarray(np.array([[1.5, -0.75, 3.0, -12.0, 0.0, -0.0]]))
    zl = z.ravel().tolist()
    s = [o.sub(v, max(zl)) for v in zl]
    e = [o._fin(o.ctx.exp(mpfr(v))) for v in s]
    total = o.sum_fp32(e)
    assert loss_ops.softmax(_Cx(ar), z, 1).ravel().tolist() == [o.div(v, total) for v in e]
    lt = o._fin(o.ctx.log(mpfr(total)))
    assert loss_ops.log_softmax(_Cx(ar), z, 1).ravel().tolist() == [o.sub(v, lt) for v in s]


def test_machine_max_pool_takes_the_last_nan_of_a_window() -> None:
    """torch's CPU pooling kernels keep ``val > best || isnan(val)``: a window with NaN (an
    fp8 overflow, say) sends its gradient to its last NaN; the machine took offset 0."""
    from types import SimpleNamespace

    import torch
    import torch.nn.functional as F

    from fpgrad.arith.emulated import EmulatedArith
    from fpgrad.graph.ops import OPS

    nan = float("nan")
    x = np.array([[[[1.0, nan, 3.0, nan], [nan, 5.0, 2.0, 0.5]]]])
    cx = SimpleNamespace(ar=EmulatedArith("float32", "fp32"), label=lambda: "test",
                         node=SimpleNamespace(target="aten.max_pool2d_with_indices.default"))  # fmt: skip
    _, idx = OPS["aten.max_pool2d_with_indices.default"](cx, cx.ar.asarray(x), [1, 4], [1, 4])
    _, want = F.max_pool2d_with_indices(torch.from_numpy(x).float(), (1, 4))
    assert np.array_equal(np.asarray(idx).reshape(-1), want.numpy().reshape(-1) % 4)
