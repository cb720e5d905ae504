"""Adversarial round 22: emulated columns of pooling backward, convolution input gradients,
upsampling, recurrent cells, group/RMS norm and the activations against the step oracle of
``tests/test_attack21_emulated.py`` (MPFR, one correctly rounded operation per documented step)
and against torch's float16/bfloat16/float32 CPU kernels where the docs claim bit equality.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fpgrad.arith.emulated import EmulatedArith
from fpgrad.graph.ops import OPS
from fpgrad.numbers.rounding import Mode
from tests.test_attack21_emulated import Oracle
from tests.test_emulated import DIRECTED

MAXPOOL = "aten.max_pool2d_with_indices.default"


def _cx(fmt: str, mode: Mode = Mode.NEAREST_EVEN, target: str = MAXPOOL) -> SimpleNamespace:
    return SimpleNamespace(ar=EmulatedArith(fmt, mode=mode), label=lambda: "test",
                           origin=lambda i: None, node=SimpleNamespace(target=target))  # fmt: skip


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ---- finding 1: 2-D pooling backward added a cell's addends in reverse window order ----------


@pytest.mark.parametrize("mode", DIRECTED)
def test_pool2d_backward_adds_in_output_order(mode: Mode) -> None:
    """fp8_e5m2 max_pool2d (1, 3), stride 1, of [0, 0, 5, 0, 0]: all three windows pick the 5,
    upstream gradient [1, 0.125, 0.125]. torch's CPU backward adds output after output, each
    add rounded: (1 + 0.125) + 0.125 = 1 (nearest, toward zero, down), 1.5 (up). The column
    placed window offsets ki-major, which reaches a cell from the last window first:
    (0.125 + 0.125) + 1 = 1.25 in every mode. avg_pool2d's backward (gradient 3x, divisor 3)
    the same."""
    o, cx = Oracle("fp8_e5m2", mode), _cx("fp8_e5m2", mode)
    want = o.add(o.add(1.0, 0.125), 0.125)
    x = np.array([[[[0.0, 0.0, 5.0, 0.0, 0.0]]]])
    g = np.array([[[[1.0, 0.125, 0.125]]]])
    geo = ([1, 3], [1, 1], [0, 0])
    _, idx = OPS[MAXPOOL](cx, x, *geo, [1, 1], False)
    dx = OPS["aten.max_pool2d_with_indices_backward.default"](cx, g, x, *geo, [1, 1], False, idx)
    assert dx.ravel()[2] == want
    dx = OPS["aten.avg_pool2d_backward.default"](cx, 3 * g, x, *geo, False, True, None)
    assert dx.ravel()[2] == want


@pytest.mark.parametrize(("dtype", "fmt"), [(torch.float16, "float16"),
                                            (torch.bfloat16, "bfloat16"), (torch.float32, "float32")])  # fmt: skip
def test_pool2d_backward_equals_torchs_kernels(dtype: torch.dtype, fmt: str) -> None:
    """Overlapping windows (padding, ceil_mode, dilation, count_include_pad either way,
    divisor_override): the machine's max/avg pool backward equals torch's CPU kernel bit for
    bit (float16 differed on 19 of 294 cells of a 3x3/1/1 max pool, float32 avg on 168)."""
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 7, 7) * 3).to(dtype)
    cx = _cx(fmt)
    for k, s, p, ceil, cip, div in [(3, 1, 1, False, True, None), (3, 2, 1, True, False, None),
                                    (2, 1, 0, False, True, 3), (3, 1, 1, False, False, None)]:  # fmt: skip
        xr = x.clone().requires_grad_()
        y = F.avg_pool2d(xr, k, s, p, ceil, cip, div)
        g = torch.randn_like(y)
        y.backward(g)
        got = OPS["aten.avg_pool2d_backward.default"](cx, _np(g), _np(x), [k, k], [s, s],
                                                      [p, p], ceil, cip, div)  # fmt: skip
        assert np.array_equal(got, _np(xr.grad))
    for k, s, p, d, ceil in [(3, 1, 1, 1, False), (3, 2, 1, 1, True), (2, 1, 0, 2, False)]:
        xr = x.clone().requires_grad_()
        y, _ = F.max_pool2d_with_indices(xr, k, s, p, d, ceil)
        g = torch.randn_like(y)
        y.backward(g)
        geo = ([k, k], [s, s], [p, p], [d, d], ceil)
        _, idx = OPS[MAXPOOL](cx, _np(x), *geo)
        got = OPS["aten.max_pool2d_with_indices_backward.default"](cx, _np(g), _np(x), *geo, idx)
        assert np.array_equal(got, _np(xr.grad))
