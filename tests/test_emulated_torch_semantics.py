"""Emulated ops against torch's own kernels on special inputs (NaN, +-inf, +-0, negatives):
the graph ops and the layer path's relu give torch's values bit for bit, sign of zero included.

float16 inputs, each exact in float16, so that the emulated float16 machine's results can be
compared with torch's float16 eager ops (torch's float16 relu and threshold_backward compute
nothing but a selection: no rounding is involved).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fpgrad.arith.emulated import EmulatedArith
from fpgrad.graph.ops import loss as loss_ops
from fpgrad.graph.ops import pointwise

SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, -1.5, 2.0, -(2.0**-24), 2.0**-24])
GRAD = np.array([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0])


class _Cx:
    """The slice of an interpreter context the pointwise ops read."""

    def __init__(self, ar: Any) -> None:
        self.ar = ar

    def label(self) -> str:
        return "test"

    def origin(self, i: int) -> None:
        return None


def _bits(a: Any) -> list[tuple[bool, float | str]]:
    a = np.asarray(a, dtype=np.float64)
    return [(bool(np.signbit(v)), "nan" if np.isnan(v) else float(v)) for v in a]


def _torch(values: np.ndarray) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float16)


@pytest.mark.parametrize("grad_sign", [1.0, -1.0])
@pytest.mark.parametrize("size", [9, 1024])  # torch's scalar tail and its vectorized body
def test_graph_relu_and_threshold_backward_match_torch(grad_sign: float, size: int) -> None:
    ar = EmulatedArith("float16")
    cx = _Cx(ar)
    x = np.resize(SPECIAL, size)
    out = pointwise.relu(cx, x)
    ref = torch.relu(_torch(x))
    assert _bits(out) == _bits(ref.double().numpy())
    g = grad_sign * np.resize(GRAD, size)
    back = pointwise.threshold_backward(cx, g, out, 0)
    ref_back = torch.ops.aten.threshold_backward(_torch(g), ref, 0)
    assert _bits(back) == _bits(ref_back.double().numpy())


def test_elu_backward_of_nan_is_nan_as_torchs_vectorized_kernel() -> None:
    """torch's elu_backward selects by ``x > 0`` in its vectorized body (NaN: the negative
    branch, NaN) and by ``x <= 0`` in its scalar tail (NaN: grad * scale); a tensor of 1024
    elements takes the vectorized body at element 0."""
    ar = EmulatedArith("float16")
    x, g = np.full(1024, -1.0), np.ones(1024)
    x[0] = np.nan
    ref = torch.ops.aten.elu_backward(_torch(g), 1.0, 1.0, 1.0, False, _torch(x))
    out = pointwise.elu_backward(_Cx(ar), g, 1.0, 1.0, 1.0, False, x)
    assert bool(ref[0].isnan()) and np.isnan(out[0])


def test_zero_nll_loss_is_positive_zero_as_torch() -> None:
    """A log-probability of exactly 0 (a saturated softmax): torch's loss is +0.0."""
    ar = EmulatedArith("fp8_e4m3")
    logp = np.array([[0.0, -8.0], [-8.0, 0.0]])
    target = np.array([0, 1])
    for reduction in (1, 2):
        got, _ = loss_ops.nll_loss_forward(_Cx(ar), logp, target, None, reduction, -100)
        ref, _ = torch.ops.aten.nll_loss_forward(
            torch.tensor(logp, dtype=torch.float16), torch.tensor(target), None, reduction, -100
        )
        assert _bits([got]) == _bits([float(ref)]) == [(False, 0.0)], reduction


def test_nll_backward_zeros_are_positive_as_torch() -> None:
    ar = EmulatedArith("float16")
    logp = np.array([[-0.5, -1.0, -2.0], [-1.0, -0.25, -3.0], [-2.0, -1.0, -0.125]])
    target = np.array([0, 2, -100])
    got = loss_ops.nll_loss_backward(_Cx(ar), np.array(1.0), logp, target, None, 1, -100, 2.0)
    ref = torch.ops.aten.nll_loss_backward(
        torch.tensor(1.0, dtype=torch.float16), torch.tensor(logp, dtype=torch.float16),
        torch.tensor(target), None, 1, -100, torch.tensor(2.0, dtype=torch.float16),
    )  # fmt: skip
    assert _bits(got.ravel()) == _bits(ref.double().numpy().ravel())


def test_mse_backward_rounds_torchs_norm_times_difference() -> None:
    """float16, 3 elements: torch rounds 2/3 into float16, then (2/3) (a - b), then * g."""
    ar = EmulatedArith("float16")
    a, b = np.array([[0.5, 1.25, -3.0]]), np.array([[0.125, -1.0, 2.0]])
    got = loss_ops.mse_loss_backward(_Cx(ar), np.array(1.0), a, b, 1)
    ref = torch.ops.aten.mse_loss_backward(
        torch.tensor(1.0, dtype=torch.float16), torch.tensor(a, dtype=torch.float16),
        torch.tensor(b, dtype=torch.float16), 1,
    )  # fmt: skip
    assert _bits(got.ravel()) == _bits(ref.double().numpy().ravel())


def test_threshold_backward_with_a_threshold_matches_torch() -> None:
    ar = EmulatedArith("float16")
    x = np.resize(np.concatenate([SPECIAL, [0.5, 0.75, 0.25]]), 1024)
    g = np.resize(np.concatenate([GRAD, [1.0, -1.0, 2.0]]), 1024)
    got = pointwise.threshold_backward(_Cx(ar), g, x, 0.5)
    ref = torch.ops.aten.threshold_backward(_torch(g), _torch(x), 0.5)
    assert _bits(got) == _bits(ref.double().numpy())


def test_torchs_bce_with_logits_is_one_minus_t_z_minus_log_sigmoid() -> None:
    """The sequence the strict machines round (:func:`fpgrad.run.evaluate.bce_terms_torch`) is
    torch's: its float16 kernel equals ``(1 - t) * z - logsigmoid(z)`` computed op by op."""
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(0, 3, 4096), dtype=torch.float16)
    t = torch.tensor(rng.uniform(0, 1, 4096), dtype=torch.float16)
    ref = torch.ops.aten.binary_cross_entropy_with_logits(z, t, None, None, 0)
    ops = (1 - t) * z - torch.nn.functional.logsigmoid(z)
    assert torch.equal(ref, ops)
