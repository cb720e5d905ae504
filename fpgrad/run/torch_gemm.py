"""torch's CPU float16/bfloat16 ``mm`` of two row-major matrices, bit for bit and fast.

On a CPU without native half-precision matrix units, torch computes ``a @ b`` for contiguous
float16 or bfloat16 ``a`` and ``b`` (the input gradient of a linear layer in backward) in
``gemm_notrans_`` of ATen's BlasKernel.cpp: every element is a float32 dot product with four
interleaved partial sums (term l goes to sum ``l % 4``; a tail of ``K % 4`` terms to sum 0),
added as ``((s0 + s1) + s2) + s3`` and rounded to the format, with strided loads that make it
about 40x slower than the transposed layouts. :func:`mm` computes the same sums in the same
order in a compiled kernel. Each product of two float16 or bfloat16 values is exact in float32
while it stays in float32's normal range (checked; otherwise torch computes it), so fused or
separate multiply-adds agree and the result is the same bits.

:func:`linear` is ``F.linear`` with torch's own backward formulas, the input gradient by
:func:`mm`, used only after :func:`reproduces` has checked, once per process and format, that
this torch build's kernel gives exactly these bits (a CPU with native half-precision matrix
units uses another kernel). A Python dispatch mode would do the same without restating the
backward, but entering one imports torch._dynamo (1.2-1.7 s of CPU here).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_FORMATS = (torch.float16, torch.bfloat16)
_NORMAL = 2.0**-126  # float32's smallest normal: products above it are exact
_HUGE = 2.0**127  # and below this they do not overflow


@functools.cache
def _kernel() -> Any:
    import numba

    @numba.njit(cache=True)
    def gemm4(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover
        m, k = a.shape
        n = b.shape[1]
        part = np.zeros((4, n), dtype=np.float32)
        for i in range(m):
            part[:] = 0
            head = k - k % 4
            for l0 in range(0, head, 4):
                for r in range(4):
                    x = a[i, l0 + r]
                    for j in range(n):
                        part[r, j] += x * b[l0 + r, j]
            for t in range(head, k):
                x = a[i, t]
                for j in range(n):
                    part[0, j] += x * b[t, j]
            for j in range(n):
                out[i, j] = ((part[0, j] + part[1, j]) + part[2, j]) + part[3, j]

    return gemm4


def _exact_products(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Every product of an element of ``a`` and one of ``b`` is exact in float32: finite
    operands (float16: always then); bfloat16: the products within float32's normal range."""
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return False
    if a.dtype == torch.float16:  # 11-bit significands, |x| in [2**-24, 65504]: always exact
        return True
    ma, mb = a.abs().float(), b.abs().float()
    if float(ma.max()) * float(mb.max()) >= _HUGE:
        return False
    inf = torch.tensor(float("inf"))
    low_a = float(torch.where(ma > 0, ma, inf).min())
    low_b = float(torch.where(mb > 0, mb, inf).min())
    return low_a == float("inf") or low_b == float("inf") or low_a * low_b >= _NORMAL


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D, float16 or bfloat16) as gemm_notrans_ computes it."""
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.float32)
    _kernel()(a.float().numpy(), b.float().numpy(), out)
    return torch.from_numpy(out).to(a.dtype)


def _eligible(a: Any, b: Any) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.dtype in _FORMATS
        and b.dtype == a.dtype
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and a.dim() == 2
        and b.dim() == 2
        and a.is_contiguous()
        and b.is_contiguous()
        and a.shape[1] == b.shape[0]
        and min(a.shape[0], a.shape[1], b.shape[1]) > 0
    )


def _native_units() -> bool:
    """Whether the CPU has the units for which torch's half-precision products go to oneDNN
    (perhaps from some size on, which the probe of :func:`reproduces` might not reach)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported")
    return any(getattr(torch.cpu, name, lambda: True)() for name in checks)


@functools.cache
def reproduces(dtype: torch.dtype) -> bool:
    """Whether :func:`mm` gives torch's bits for ``dtype`` here (random operands of several
    shapes, each inner size modulo 4)."""
    if dtype not in _FORMATS or _native_units():
        return False
    gen = torch.Generator().manual_seed(0)
    for m, k, n in ((7, 61, 9), (16, 130, 33), (5, 259, 12), (24, 512, 40)):
        a = (torch.randn(m, k, generator=gen) * 0.1).to(dtype)
        b = (torch.rand(k, n, generator=gen) - 0.5).to(dtype)
        if not torch.equal(torch.mm(a, b), mm(a, b)):
            return False
    return True


def _plain(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The layouts for which torch's linear backward computes ``grad @ w`` and ``grad.t() @ x``
    (ATen's mm_mat1_backward and mm_mat2_backward: row-major input, contiguous weight)."""
    column_major = x.stride(0) == 1 and x.stride(1) == x.shape[0]
    return x.dim() == 2 and x.is_contiguous() and not column_major and w.is_contiguous()


class _Linear(torch.autograd.Function):
    """``F.linear`` whose backward is torch's (addmm's derivatives, the bias reduced by
    ``sum_to``), the input gradient through :func:`mm` where it gives torch's bits."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.bias = b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, Any, Any]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            fast = _eligible(grad, w) and reproduces(grad.dtype) and _exact_products(grad, w)
            gx = mm(grad, w) if fast else grad.mm(w)
        if ctx.needs_input_grad[1]:
            gw = grad.t().mm(x)
        if ctx.bias and ctx.needs_input_grad[2]:
            gb = grad.sum([0], keepdim=True).view(grad.shape[1])
        return gx, gw, gb


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` with the same forward and backward bits; float16/bfloat16 on the
    CPU with the layouts of :func:`_plain` computes its input gradient by :func:`mm`."""
    same = w.dtype == x.dtype and (b is None or b.dtype == x.dtype)
    if (
        x.dtype in _FORMATS
        and same
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")  # autocast would cast inside the forward
        and _plain(x, w)
        and reproduces(x.dtype)
    ):
        return _Linear.apply(x, w, b)  # type: ignore[no-any-return]
    return F.linear(x, w, b)
