"""Zeros proven by linear forms (:mod:`fpgrad.graph.identities_linear`) and the attention key
bias through ``stack`` (ALiBi): each proof against torch float64 and the exact balls, and the
near misses that must not be claimed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import fpgrad
from fpgrad.graph.identities import prove_zeros
from fpgrad.graph.identities_linear import LinearForms
from tests.oracle.native_exact import check


class Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.pairwise_distance(self.enc(a), self.enc(b))


def test_siamese_shared_bias_gradient_is_a_proven_zero() -> None:
    """``enc(a) - enc(b)``: the last bias cancels, its gradient is ``sum(g) + sum(-g)`` = 0."""
    torch.manual_seed(0)
    ex = check(Siamese(), (torch.randn(5, 4), torch.randn(5, 4)), torch.randn(5), nn.MSELoss())
    assert ex.zero("grads/enc.2.bias").all()
    assert not ex.zero("grads/enc.0.bias").any() and not ex.zero("grads/enc.2.weight").any()


class Alibi(nn.Module):
    """Attention with one qkv projection split by reshape/permute (its backward stacks the
    three gradients) and an ALiBi distance bias before a causal mask."""

    def __init__(self, d: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.h, self.qkv, self.head = heads, nn.Linear(d, 3 * d), nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(d // self.h)
        pos = torch.arange(t, dtype=x.dtype)
        slopes = torch.tensor([0.5, 0.25], dtype=x.dtype)
        s = s - slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.head(o).flatten(0, 1)


def test_alibi_key_bias_through_stack_is_a_proven_zero() -> None:
    torch.manual_seed(1)
    ex = check(Alibi(), torch.randn(2, 3, 4), torch.randint(0, 3, (6,)), nn.CrossEntropyLoss())
    zero = ex.zero("grads/qkv.bias").reshape(-1)
    assert zero[4:8].all() and not zero[:4].any() and not zero[8:].any()


class Mix(nn.Module):
    """``lin(x) + (c1 t + c2 t - c3 t)`` with t = tanh(lin2(x)): 0 exactly when the rationals of
    the float coefficients cancel; also ``t - t.detach()`` (a straight-through trick)."""

    def __init__(self, coeffs: tuple[float, float, float], detach: bool = False) -> None:
        super().__init__()
        self.lin, self.lin2, self.c, self.detach = nn.Linear(3, 2), nn.Linear(3, 2), coeffs, detach

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(self.lin2(x))
        c1, c2, c3 = self.c
        extra = t - t.detach() if self.detach else t * c1 + t * c2 - t * c3
        return self.lin(x) + extra


def _claims(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    net = fpgrad.from_module(model, x, y, nn.MSELoss())
    return prove_zeros(net.graph).zeros


def test_exact_rational_coefficients_cancel() -> None:
    torch.manual_seed(2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    zeros = _claims(Mix((0.5, 0.25, 0.75)), x, y)
    assert any(m.all() for m in zeros.values())
    check(Mix((0.5, 0.25, 0.75)), x, y, nn.MSELoss())


def test_float_coefficients_that_only_round_to_cancel_are_no_zero() -> None:
    """0.1 + 0.2 - 0.3 is 2**-54 * 5.55e-17-ish in rationals, not 0: nothing claimed, and the
    exact loss still contains torch float64's."""
    torch.manual_seed(2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    assert not _claims(Mix((0.1, 0.2, 0.3)), x, y)
    assert not _claims(Mix((0.5, 0.25, 0.75 * (1 + 2**-52))), x, y)
    check(Mix((0.1, 0.2, 0.3)), x, y, nn.MSELoss())


def test_value_minus_its_detached_copy_is_zero_and_gradients_stay_exact() -> None:
    torch.manual_seed(3)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    assert _claims(Mix((0, 0, 0), detach=True), x, y)
    ex = check(Mix((0, 0, 0), detach=True), x, y, nn.MSELoss())
    assert not ex.zero("grads/lin2.weight").any()  # the gradient flows through t


class WrittenBetweenReads(nn.Module):
    """``a = u * 1; u.add_(1); a - u``: the graph reads the in-place op's output (a new node),
    so ``a - u`` is no cancellation. (The gradient into ``u``, ``g * 1 - g``, is 0.)"""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.lin(x).clone()
        a = u * 1.0
        u.add_(1.0)
        return a - u + self.lin(x)


def test_in_place_write_is_a_new_value() -> None:
    torch.manual_seed(4)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    net = fpgrad.from_module(WrittenBetweenReads(), x, y, nn.MSELoss())
    zeros = prove_zeros(net.graph).zeros
    subs = [n.name for n in net.graph.gm.graph.nodes if str(n.target) == "aten.sub.Tensor"]
    assert len(subs) == 1 and subs[0] not in zeros  # the forward a - u: -1
    assert zeros  # the backward's neg(g) + g * 1.0 into the first branch: 0
    check(WrittenBetweenReads(), x, y, nn.MSELoss())


def test_a_view_written_between_its_reads_has_no_form() -> None:
    """``v = u.view(..); a = v * 1; u.add_(1); a - v`` is -1: the graph reads ``v``'s node
    twice, with different values (capture refuses such models; the forms must not rely on it)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        u = x.clone()
        v = u.view(2, 4)
        a = v * 1.0
        u.add_(1.0)
        return a - v

    gm = make_fx(f)(torch.randn(4, 2))
    sub = next(n for n in gm.graph.nodes if str(n.target) == "aten.sub.Tensor")
    assert not LinearForms(gm.graph).cancels(sub)

    def g(x: torch.Tensor) -> torch.Tensor:  # the same without the write: 0
        v = x.clone().view(2, 4)
        return v * 1.0 - v

    gm = make_fx(g)(torch.randn(4, 2))
    sub = next(n for n in gm.graph.nodes if str(n.target) == "aten.sub.Tensor")
    assert LinearForms(gm.graph).cancels(sub)


class Broadcast(nn.Module):
    """``h + b - b.expand_as(h)`` with ``b`` a (2,) parameter: the broadcast terms cancel, but
    ``h.sum(0) - b`` and ``(h + b).sum(0) - b.sum()`` do not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.b = nn.Linear(3, 2), nn.Parameter(torch.randn(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        zero = (h + self.b) - self.b.expand_as(h) - h
        near = (h + self.b).sum(0) - self.b - h.sum(0)  # = (n - 1) b, not 0
        return h + zero + near


def test_broadcast_terms_cancel_only_when_they_match() -> None:
    torch.manual_seed(5)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    net = fpgrad.from_module(Broadcast(), x, y, nn.MSELoss())
    zeros = prove_zeros(net.graph).zeros
    ops = {n.name: n for n in net.graph.gm.graph.nodes}
    assert zeros and all(m.all() for m in zeros.values())
    assert all(tuple(ops[k].meta["val"].shape) == (4, 2) for k in zeros)  # only `zero`
    check(Broadcast(), x, y, nn.MSELoss())


def _triplet(z: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    a, p, n = z.chunk(3, 0)
    return nn.TripletMarginLoss(margin=1.0)(a, p, n)


def test_triplet_shared_bias_through_cat_is_a_proven_zero() -> None:
    """The last bias cancels in a - p and a - n: its gradient sums
    ``cat([g1 + g2, -g1, -g2])`` over the batch (torch float64 gives 1e-16 there)."""
    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    ex = check(m, torch.randn(9, 4), torch.zeros(9), _triplet)
    assert ex.zero("grads/2.bias").all() and not ex.zero("grads/0.bias").any()


def test_sum_of_cat_only_over_its_axis() -> None:
    """``cat([t, -t], 0)`` summed over axis 0 is 0; over axis 1 it is not."""

    def over(dim: int) -> bool:
        def f(x: torch.Tensor) -> torch.Tensor:
            t = torch.tanh(x)
            return torch.cat([t, -t], 0).sum([dim], keepdim=True)

        gm = make_fx(f)(torch.randn(2, 3))
        node = next(n for n in gm.graph.nodes if str(n.target) == "aten.sum.dim_IntList")
        return LinearForms(gm.graph).cancels(node)

    assert over(0) and over(-2) and not over(1)
