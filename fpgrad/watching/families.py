"""The op families of the watch's proofs, the formats it counts in, and exact float counting.

An aten op's **family** (exact, reduction, pointwise, other) says which proof decides whether a
float64 recompute of it tells a created special value from an inherited one (see
:mod:`fpgrad.watching.classify`). ``cummax``/``cummin`` copy input elements (exact, selection);
``atan2`` is pointwise (its float64 value is 0 only where y is 0); ``lerp``, ``addcmul``,
``addcdiv`` and ``logcumsumexp`` are other: a float64 recompute of a fused or scaled step can
round to 0 where the exact result is not, so their contested zeros stay undecided.
"""

from __future__ import annotations

from typing import Any

import torch

from fpgrad.numbers.formats import get_format

#: torch dtype -> fpgrad format name.
FORMAT_OF = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}

EXACT_OPS = frozenset(
    "mul add sub rsub neg abs relu relu_ threshold threshold_backward where clone _to_copy copy "
    "copy_ cat stack index index_select gather masked_fill clamp clamp_min clamp_max maximum "
    "minimum max min div detach fill zeros_like ones_like scatter sign square "
    "nll_loss_backward native_dropout_backward sigmoid_backward tanh_backward hardtanh "
    "hardtanh_backward leaky_relu leaky_relu_backward mul_ add_ sub_ div_ zero_ fill_ "
    "constant_pad_nd max_pool2d_with_indices _unsafe_index embedding floor ceil trunc round "
    "topk sort kthvalue median cummax cummin".split()
)
REDUCTION_OPS = frozenset(
    "mm addmm bmm baddbmm addmv mv dot matmul sum mean convolution convolution_backward linear "
    "embedding_dense_backward avg_pool2d avg_pool2d_backward scatter_add index_put "
    "max_pool2d_with_indices_backward".split()
)
POINTWISE_OPS = frozenset(
    "exp exp2 log log2 log1p expm1 tanh sigmoid pow sqrt rsqrt reciprocal gelu gelu_backward "
    "silu silu_backward sin cos softplus softplus_backward elu elu_backward erf log10 sinh cosh "
    "tan asin acos asinh acosh atanh atan atan2".split()
)
#: Ops whose every output element is one of their input elements or scalar arguments (or a
#: constant): with inputs and scalars exactly representable in the output's format, the float64
#: recompute equals the output, so each zero is inherited (see :func:`_selection_exact`).
SELECTION_OPS = frozenset(
    "relu relu_ threshold_backward clone detach copy copy_ _to_copy neg abs cat stack index "
    "index_select gather _unsafe_index embedding where masked_fill clamp clamp_min clamp_max "
    "maximum minimum max min max_pool2d_with_indices constant_pad_nd zero_ fill fill_ "
    "zeros_like ones_like topk sort kthvalue median cummax cummin".split()
)
#: Ops whose outputs are usually >= 0: their statistics try ``aminmax(t)`` before ``|t|``.
NONNEGATIVE_OPS = frozenset("relu relu_ abs exp sigmoid _softmax softmax square".split())
#: dtype -> the dtypes whose every value it holds exactly.
_WIDER = {
    torch.float16: (torch.float16,),
    torch.bfloat16: (torch.bfloat16,),
    torch.float32: (torch.float16, torch.bfloat16, torch.float32),
    torch.float64: (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
_U64 = 2.0**-53
_TINY64 = 2.0**-1022


def family(func: Any) -> str:
    """The proof family of an aten op: exact, reduction, pointwise or other."""
    name = func.overloadpacket.__name__
    if name == "scatter" and "reduce" in func._overloadname:  # sums or products of many
        return "other"
    if name == "round" and func._overloadname == "decimals":  # x * 10^d rounds first
        return "other"
    if name in EXACT_OPS:
        return "exact"
    if name in REDUCTION_OPS:
        return "reduction"
    if name in POINTWISE_OPS:
        return "pointwise"
    return "other"


def _positive(x: torch.Tensor) -> torch.Tensor:
    """1.0 where ``x > 0``, else 0.0 (``x`` without NaN): float arithmetic, no bool mask."""
    return torch.sign(torch.clamp(x, min=0))


def count(indicator: torch.Tensor) -> torch.Tensor:
    """The number of 1.0s in a tensor of 0.0s and 1.0s, as a 0-d tensor. A float32 tensor is
    summed in float32 up to 2^24 elements (every partial sum is an integer <= 2^24, so exact;
    several times faster on CPU than widening to float64), else in float64."""
    if indicator.dtype == torch.float64:
        return indicator.sum()
    if indicator.numel() <= 2**24:
        return indicator.sum(dtype=torch.float32)
    return indicator.sum(dtype=torch.float64)


#: dtype -> the smallest normal magnitude of its format.
SMALLEST_NORMAL = {d: get_format(f).smallest_normal for d, f in FORMAT_OF.items()}
_FITS: dict[tuple[float, torch.dtype], bool] = {}


def _fits(x: float, dtype: torch.dtype) -> bool:
    """Whether the number ``x`` is exactly representable in ``dtype`` (cached, up to 4096
    numbers; NaN never is)."""
    if x != x:
        return False
    key = (x, dtype)
    got = _FITS.get(key)
    if got is None:
        if len(_FITS) >= 4096:
            _FITS.clear()
        got = _FITS[key] = float(torch.tensor(x, dtype=dtype)) == x
    return got
