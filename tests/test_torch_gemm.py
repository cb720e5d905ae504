"""fpgrad.run.torch_gemm: torch's float16/bfloat16 mm and linear backward, the same bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fpgrad.run import torch_gemm
from fpgrad.run.torch_native import torch_trace
from tests.nets import net_from

FORMATS = (torch.float16, torch.bfloat16)


def _need(dtype: torch.dtype) -> None:
    if not torch_gemm.reproduces(dtype):
        pytest.skip(f"this torch build's {dtype} mm is not gemm_notrans_ (native units)")


@pytest.mark.parametrize("dtype", FORMATS)
def test_mm_is_torchs_bits(dtype: torch.dtype) -> None:
    _need(dtype)
    gen = torch.Generator().manual_seed(5)
    for m, k, n in ((1, 1, 1), (3, 2, 5), (9, 67, 1), (40, 1023, 31), (17, 4096, 8)):
        for scale in (1.0, 1e-4, 300.0):
            a = (torch.randn(m, k, generator=gen) * scale).to(dtype)
            b = (torch.randn(k, n, generator=gen) / scale).to(dtype)
            assert torch.equal(torch.mm(a, b), torch_gemm.mm(a, b)), (m, k, n, scale)


def test_the_summation_order_matters() -> None:
    """A plain float32 sum (BLAS order) gives other bits: the tests above can fail."""
    _need(torch.float16)
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(64, 2048, generator=gen).half()
    b = torch.randn(2048, 64, generator=gen).half()
    assert not torch.equal((a.float() @ b.float()).half(), torch_gemm.mm(a, b))


def test_inexact_products_are_left_to_torch() -> None:
    a = torch.tensor([[2.0**-70, 1.0]]).to(torch.bfloat16)
    b = torch.tensor([[2.0**-70], [1.0]]).to(torch.bfloat16)
    assert not torch_gemm._exact_products(a, b)  # 2**-140: below float32's normal range
    big = torch.tensor([[2.0**100]]).to(torch.bfloat16)
    assert not torch_gemm._exact_products(big, big)
    assert not torch_gemm._exact_products(torch.tensor([[float("inf")]]).half(), a[:, :1])
    assert torch_gemm._exact_products(torch.tensor([[2.0**-24]]).half(), a.T[:1].half())


def _random_net(seed: int, batch: int, widths: tuple[int, ...], act: str, loss: str) -> object:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, widths[0]))
    layers: list[dict] = []
    for i, out in enumerate(widths[1:]):
        w = rng.standard_normal((out, widths[i])) / np.sqrt(widths[i])
        layers.append({"type": "dense", "out": out, "weight": w.tolist(), "bias": [0.1] * out})
        if i < len(widths) - 2:
            layers.append({"type": act})
    if loss == "mse":
        y = rng.standard_normal((batch, widths[-1])).tolist()
    else:
        y = rng.integers(0, widths[-1], size=batch).astype(float).tolist()
    return net_from(layers, loss, x.tolist(), y)


@pytest.mark.parametrize(
    ("seed", "batch", "widths", "act", "loss"),
    [
        (0, 8, (5, 13, 7, 3), "relu", "cross_entropy"),
        (1, 1, (4, 6, 2), "tanh", "mse"),
        (2, 33, (9, 130, 65, 4), "relu", "mse"),
        (3, 2, (1, 3, 1), "relu", "mse"),
        (4, 64, (9, 300, 517, 6), "relu", "cross_entropy"),
    ],
)
@pytest.mark.parametrize("precision", ["float16", "bfloat16", "float32"])
def test_traces_are_those_of_torch_autograd(
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
    batch: int,
    widths: tuple[int, ...],
    act: str,
    loss: str,
    precision: str,
) -> None:
    net = _random_net(seed, batch, widths, act, loss)
    for scale in (1.0, 2.0**14):
        new = torch_trace(net, precision, scale)
        with monkeypatch.context() as m:
            m.setattr(torch_gemm, "linear", F.linear)
            old = torch_trace(net, precision, scale)
        assert new.loss == old.loss
        for part in ("forward", "backward", "grads"):
            for key, value in getattr(old, part).items():
                assert np.array_equal(getattr(new, part)[key], value, equal_nan=True), key


def test_autocast_and_mixed_dtypes_keep_torchs_linear() -> None:
    x = torch.randn(4, 8).half().requires_grad_()
    w = torch.randn(3, 8).requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        out = torch_gemm.linear(x, w.half(), None)
    assert out.grad_fn is not None and "Linear" not in type(out.grad_fn).__name__
    with pytest.raises(RuntimeError, match="dtype"):  # torch's own error, not a wrong gradient
        torch_gemm.linear(x, w, None)
    plain = torch_gemm.linear(x, w.half(), None)
    assert torch_gemm.reproduces(torch.float16) <= ("Linear" in type(plain.grad_fn).__name__)


def test_cpus_with_native_half_units_keep_torchs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert not torch_gemm.reproduces.__wrapped__(torch.float16)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert torch_gemm._native_units()  # a torch without the probe: assume the units
