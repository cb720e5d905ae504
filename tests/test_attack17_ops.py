"""Adversarial checks on the newest op families (attack17): each test states a fact that the
certified reference must respect, with an oracle written independently of fpgrad (torch's own
eager autograd for the native columns and for integer semantics, exact rationals, mpmath at
120 digits, MPFR)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.graph.exact import exact_graph
from tests.oracle.graph_reference import CTX
from tests.oracle.native_exact import check
from tests.test_graph_oracle import _claims


class _Ints(nn.Module):
    """``w * x * k`` (or ``w * x + k``) where ``k`` is integer (or boolean) arithmetic on
    ``w * x > 0``: a value the parameters decide, so not a constant torch computes once."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], add: bool = False) -> None:
        super().__init__()
        self.f, self.add = f, add
        self.w = nn.Parameter(torch.linspace(0.3, 1.1, 4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.w * x
        k = self.f(z)
        return z + k if self.add else z * k


_INTEGER_MODELS: dict[str, tuple[Callable[[torch.Tensor], Any], bool]] = {
    # uint8: 0 - 1 wraps to 255
    "uint8_wrap": (lambda z: ((z > 0).to(torch.uint8) - 1).double(), False),
    # int8: 100 * 1 + 100 wraps to -56
    "int8_mul_wrap": (lambda z: ((z > 0).to(torch.int8) * 100 + 100).double(), False),
    # int64: (1 + 2^62) * 2 wraps to -2^63 + 2
    "int64_mul_wrap": (lambda z: (((z > 0).long() + 2**62) * 2).double() * 1e-19, True),
    # bool + bool is a logical or in torch (True + True = True)
    "bool_plus_bool": (lambda z: ((z > 0) + (z > 0.1)).double(), False),
    # int32 stays int32: 2^31 - 1 + 1 wraps
    "int32_wrap": (lambda z: ((z > 0).int() + (2**31 - 1)).double() * 1e-9, True),
    # a 0-d argmax minus 5 plus arange: negative indices wrap
    "argmax_index": (lambda z: z[z.argmax(0) - 5 + torch.arange(4)], True),
}


@pytest.mark.parametrize("kind", sorted(_INTEGER_MODELS))
def test_integer_arithmetic_follows_torch(kind: str) -> None:
    """Integer and boolean tensors computed from the parameters (``(w x > 0).to(uint8) - 1``)
    are torch's integers: wrap-around in their own dtype, bool + bool a logical or. add/sub
    forced int64, mul went through the system's floats (no wrap), a 0-d argmax crashed in
    the ball arithmetic (AttributeError): the loss was certified 862 where torch's is 4e-6."""
    f, add = _INTEGER_MODELS[kind]
    x = torch.linspace(-0.7, 0.9, 4, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.float64)
    check(_Ints(f, add), x, y, nn.MSELoss(), digits=15)


_LN2 = 0.6931471805599453


class _Exp2Grad(torch.autograd.Function):
    """forward 3 u; backward g * exp2(u) * fl(ln 2): a user's gradient, not exp2's derivative
    (no exp2 in the forward), written with torch's float ln 2."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u)
        return u * 3

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (u,) = ctx.saved_tensors
        return g * torch.exp2(u) * _LN2


class _Log2Grad(torch.autograd.Function):
    """forward 3 u; backward g / (u * fl(ln 2)), beside a detached log2 of the same u."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u)
        return u * 3

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (u,) = ctx.saved_tensors
        return g / (u * _LN2)


class _UserLn2(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.tensor([0.5, 1.25], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.w * x
        if self.kind == "exp2":
            return _Exp2Grad.apply(u)
        return _Log2Grad.apply(u) + torch.log2(u).detach()


@pytest.mark.parametrize("kind", ["exp2", "log2"])
def test_a_custom_backwards_float_ln2_stays_the_float(kind: str) -> None:
    """L = sum F(w x) with x = 1; dL/dw_i = 2^w_i fl(ln 2) (exp2) or 1 / (w_i fl(ln 2)) (log2),
    fl(ln 2) the float exactly (mpmath). The ``mul`` by 0.6931471805599453 matched exp2's
    (log2's) backward pattern and was read as the real ln 2: certified to 42 digits, 3e-17 off."""
    x, y = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    net = fpgrad.from_module(_UserLn2(kind), x, y, lambda o, t: o.sum())
    ex = exact_graph(net.graph).result
    c = CTX.mpf(_LN2)
    ws = [CTX.mpf(0.5), CTX.mpf(1.25)]
    want = [CTX.mpf(2) ** w * c if kind == "exp2" else 1 / (w * c) for w in ws]
    _claims(ex, "grads/w", np.array(want, dtype=object), CTX.mpf(10) ** -60)


class _Table(nn.Module):
    """``sum(w x + c)`` with a constant table ``c`` of four elements."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.arange(4, dtype=torch.float64)
        if self.kind == "exp_":
            c = k.clone()
            c.exp_()
        elif self.kind == "sin_slice":
            c = k.clone()
            c[1:].sin_()
        elif self.kind == "pow_":
            c = k.clone().pow_(0.5)
        elif self.kind == "lgamma":
            c = torch.lgamma(k + 1.5)
        elif self.kind == "diag_thirds":  # a selection the registry lacks, of computed values
            c = torch.diag_embed(k / 3).sum(0)
        elif self.kind == "split_thirds":  # a tuple-valued op of computed values
            c = torch.cat(list(torch.split(k / 3, 2)))
        elif self.kind == "atan2":
            c = torch.atan2(k, torch.tensor(3.0, dtype=torch.float64))
        else:  # integers beyond 2^53, as float64 and divided by 3 (float32)
            big = torch.tensor([2**60 + 1, 3, 2**53 + 1, -(2**62) - 3])
            c = big.double() * 2.0**-60 + (big / 3).double() * 2.0**-60
        return (self.w * x + c).sum().reshape(1)


def _table(kind: str, k: int) -> Any:
    if kind == "exp_":
        return CTX.exp(k)
    if kind == "sin_slice":
        return CTX.sin(k) if k else CTX.mpf(0)
    if kind == "pow_":
        return CTX.sqrt(k)
    if kind == "lgamma":
        return CTX.loggamma(k + CTX.mpf(1.5))
    if kind == "atan2":
        return CTX.atan2(k, 3)
    if kind.endswith("thirds"):
        return CTX.mpf(k) / 3
    big = [2**60 + 1, 3, 2**53 + 1, -(2**62) - 3][k]
    return CTX.mpf(big) * CTX.mpf(2) ** -60 * (1 + CTX.mpf(1) / 3)


@pytest.mark.parametrize(
    "kind", ["exp_", "sin_slice", "pow_", "lgamma", "atan2", "big_ints", "diag_thirds", "split_thirds"]
)
def test_a_constant_computed_by_torch_is_the_real_value_or_refused(kind: str) -> None:
    """L = (4 + sum_k c_k)^2 (mpmath): c = exp(k) by ``exp_``, sin(k) by ``c[1:].sin_()``,
    sqrt(k) by ``pow_(0.5)``, lgamma(k + 1.5), atan2(k, 3), integers beyond 2^53 cast and
    divided. ``torch.exp(k)`` is computed exactly, but an in-place op or an op the registry
    lacks entered torch's float64 values (1.5e-14 off at 43 certified digits), integers
    beyond 2^53 their float roundings, and diag_embed or split of ``arange(4) / 3`` torch's
    float64 thirds (6.7e-16 off). A one-line refusal is acceptable."""
    x, y = torch.ones(4, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    net = fpgrad.from_module(_Table(kind), x, y, nn.MSELoss())
    try:
        ex = exact_graph(net.graph).result
    except fpgrad.errors.InputError as e:
        assert "\n" not in str(e)
        return
    s = 4 + sum(_table(kind, k) for k in range(4))
    _claims(ex, "loss", np.array(s * s, dtype=object).reshape(()), CTX.mpf(10) ** -60)
    _claims(ex, "grads/w", np.array([2 * s] * 4, dtype=object), CTX.mpf(10) ** -60)
