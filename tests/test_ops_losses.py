"""Smooth L1, BCE on probabilities, KL divergence (``xlogy``) and soft margin
(:mod:`fpgrad.graph.ops.losses2`).

Each loss on a small model: the native columns (bfloat16, float32, float64) equal torch eager
autograd bit for bit, the exact reference certifies and agrees with torch float64, an emulated
column runs; the exact enclosures contain the independent interval oracle
(:mod:`tests.oracle.losses`, each loss from torch's definition) at the corners: BCE inputs
exactly 0 and 1 (the log clamp at -100 and the backward's EPSILON), a saturated sigmoid into
BCE, smooth L1 exactly at |d| = beta, KL divergence with zero targets, 1e-300; a threshold
that no ball can decide ends undetermined; the emulated machine against
:func:`fpgrad.round_to` applied op by op.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.arith.emulated import EmulatedArith
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.ops import losses2
from tests.oracle import interval_ad as A
from tests.oracle import losses as L
from tests.test_attack5_certificates import _log_softmax_rows, _t, check

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mlp(sigmoid: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)]
    return nn.Sequential(*layers, nn.Sigmoid()) if sigmoid else nn.Sequential(*layers)


def _kl(log_target: bool, reduction: str = "batchmean") -> Loss:
    return lambda o, t: F.kl_div(F.log_softmax(o, -1), t, reduction=reduction,
                                 log_target=log_target)  # fmt: skip


def _soft(t: torch.Tensor) -> torch.Tensor:
    return torch.softmax(t, -1)


W = torch.tensor([0.5, 2.0, 1.0])
CASES: dict[str, tuple[bool, Loss, Callable[[], torch.Tensor]]] = {
    "smooth_l1": (False, nn.SmoothL1Loss(), lambda: torch.randn(4, 3)),
    "smooth_l1_beta_half_sum": (
        False,
        nn.SmoothL1Loss(reduction="sum", beta=0.5),
        lambda: torch.randn(4, 3),
    ),  # fmt: skip
    "smooth_l1_beta_0": (False, nn.SmoothL1Loss(beta=0.0), lambda: torch.randn(4, 3)),
    "smooth_l1_none": (
        False,
        lambda o, t: F.smooth_l1_loss(o, t, reduction="none", beta=2.0).sum(),
        lambda: torch.randn(4, 3),
    ),  # fmt: skip
    "bce": (True, nn.BCELoss(), lambda: torch.rand(4, 3)),
    "bce_weight_sum": (True, nn.BCELoss(weight=W, reduction="sum"), lambda: torch.rand(4, 3)),
    "bce_none_hard": (
        True,
        lambda o, t: F.binary_cross_entropy(o, t, reduction="none").mean(),
        lambda: (torch.rand(4, 3) > 0.5).double(),
    ),  # fmt: skip
    "kl_div": (False, _kl(False), lambda: _soft(torch.randn(4, 3))),
    "kl_div_zero_targets": (
        False,
        _kl(False, "sum"),
        lambda: torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]]),
    ),  # fmt: skip
    "kl_div_log_target": (False, _kl(True), lambda: torch.log_softmax(torch.randn(4, 3), -1)),
    "soft_margin": (False, nn.SoftMarginLoss(), lambda: torch.sign(torch.randn(4, 3))),
    "soft_margin_sum": (False, nn.SoftMarginLoss(reduction="sum"), lambda: torch.randn(4, 3)),
    "multi_margin": (False, nn.MultiMarginLoss(), lambda: torch.tensor([0, 1, 2, 0])),
    "multi_margin_p2_weight_sum": (
        False,
        nn.MultiMarginLoss(p=2, margin=0.5, weight=W, reduction="sum"),
        lambda: torch.tensor([2, 1, 2, 0]),
    ),
    "multi_margin_none": (
        False,
        lambda o, t: F.multi_margin_loss(o, t, margin=2.0, reduction="none").sum(),
        lambda: torch.tensor([1, 1, 0, 2]),
    ),
}


def _pair(o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two embeddings of 2 samples from one output of 4 rows: its halves."""
    return o[:2], o[2:]


# the ops of the traces of these losses beside the comparison ops (aten.norm.ScalarOpt_dim,
# empty_like, fill_, sub_, sqrt_): torch's forms, on this branch's ops alone
CASES.update(
    {
        "pairwise_distance": (False, lambda o, t: F.pairwise_distance(o, t).mean(),
                              lambda: torch.randn(4, 3)),
        "fill_sub_": (False, lambda o, t: torch.empty_like(o).fill_(1.5).sub_(o * t).pow(2).mean(),
                      lambda: torch.randn(4, 3)),
        "sqrt_": (False, lambda o, t: ((o - t) * (o - t) + 1).sqrt_().mean(),
                  lambda: torch.randn(4, 3)),
    }
)  # fmt: skip

#: losses whose traces also read the comparison ops (clamp_min_, ge, ne, eq, where)
CMP_CASES: dict[str, tuple[bool, Loss, Callable[[], torch.Tensor]]] = {
    "cosine_similarity": (False, lambda o, t: (1 - F.cosine_similarity(o, t)).mean(),
                          lambda: torch.randn(4, 3)),
    "margin_ranking": (False, lambda o, t: F.margin_ranking_loss(o[:, 0], o[:, 1], t, margin=0.5),
                       lambda: torch.tensor([1.0, -1.0, 1.0, -1.0])),
    "hinge_embedding": (False, lambda o, t: F.hinge_embedding_loss(o, t, margin=0.75),
                        lambda: torch.sign(torch.randn(4, 3))),
    "cosine_embedding": (False, lambda o, t: F.cosine_embedding_loss(*_pair(o), t, margin=0.1),
                         lambda: torch.tensor([1.0, -1.0])),
    "triplet_margin": (False, lambda o, t: F.triplet_margin_loss(*_pair(o), t, margin=2.0),
                       lambda: torch.randn(2, 3)),
}  # fmt: skip
ALL_CASES = {**CASES, **CMP_CASES}


def _eager(model: nn.Module, x: torch.Tensor, t: torch.Tensor, loss: Loss,
           dtype: torch.dtype) -> dict:  # fmt: skip
    m = copy.deepcopy(model).to(dtype)
    if isinstance(loss, nn.Module):  # class weights in the model's dtype (multi_margin needs it)
        loss = copy.deepcopy(loss).to(dtype)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loss(m(x.to(dtype)), t.to(dtype) if t.is_floating_point() else t).backward()
    finally:
        torch.set_num_threads(n)
    return {k: p.grad.double().numpy() for k, p in m.named_parameters()}


@pytest.mark.parametrize("case", sorted(ALL_CASES))
def test_native_bit_for_bit_exact_certified_emulated_runs(case: str) -> None:
    sigmoid, loss, target = ALL_CASES[case]
    torch.manual_seed(0)
    model, x = _mlp(sigmoid), torch.randn(4, 3)
    t = target()
    net = fpgrad.from_module(model, x, t, loss)
    natives = [("float32", torch.float32), ("float64", torch.float64)]
    if not case.startswith("multi_margin"):  # torch's CPU kernel has no bfloat16
        natives.insert(0, ("bfloat16", torch.bfloat16))
    cmp = fpgrad.compare(net, ",".join([*(p for p, _ in natives), "bfloat16:emulated"]))
    for prec, dtype in natives:
        ref = _eager(model, x, t, loss, dtype)
        for name in net.param_names:
            assert np.array_equal(cmp.values(prec)[name], ref[name]), (prec, name)
    assert cmp.certified_digits >= 17
    r64 = _eager(model, x, t, loss, torch.float64)
    scale = max(float(np.abs(r).max()) for r in r64.values())
    for name, r in r64.items():
        e = cmp.column(name).exact
        # sums of +-g/numel that cancel (L1's or hinge's signs) are 0 with a ball around it:
        # undetermined, never a proven zero; float64 gets exactly 0 there too
        und = e.undetermined_mask()
        assert not (und & (r != 0)).any(), name
        assert case in ("smooth_l1_beta_0", "hinge_embedding") or not und.any(), name
        noise = e.zero & (np.abs(r) <= 1e-12 * scale)
        np.testing.assert_allclose(
            e.hi[~noise], r[~noise], rtol=1e-8, atol=1e-14 * scale, err_msg=name
        )
    em = cmp.values("bfloat16:emulated")
    for name in net.param_names:
        assert np.isfinite(em[name]).all(), name
        if r64[name].any():  # rounded: not float64's values
            assert not np.array_equal(em[name], r64[name]), name


# ---- the interval oracle (tests.oracle.losses), each loss from torch's definition -----------
SYSTEMS = [None, 256]  # the fast balls first, and Arb from the start


class Scaled(nn.Module):
    """f(w * x), w of x's shape (a parameter per input element)."""

    def __init__(self, w: Any, f: Callable[[torch.Tensor], torch.Tensor] = lambda h: h) -> None:
        super().__init__()
        self.w, self.f = nn.Parameter(_t(w)), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.w * x)


def _reduce(terms: np.ndarray, reduction: str) -> A.V:
    total = A.total(terms)
    return total / terms.size if reduction == "mean" else total


@pytest.mark.parametrize("bits", SYSTEMS)
@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_smooth_l1_against_the_oracle_at_the_threshold(bits: int | None, beta: float) -> None:
    """d = w x - t exactly at +-beta (torch's linear branch, its backward the sign), exactly 0
    (sgn(0) = 0 with beta = 0), 1e-300 and 1e300 off, inside and outside the quadratic zone."""
    t = np.array([[0.5, -0.25, 1.0], [0.0, 0.0, -3.0]])
    d = np.array([[beta, -beta, 0.0], [1e-300, 1e300, 0.25]])
    x = np.ones((2, 3))
    w = t + d  # exact in float64 for these values
    assert np.array_equal(w - t, d)

    def oracle(p: dict, xx: torch.Tensor, tt: torch.Tensor) -> A.V:
        dd = p["w"] * A.arr(xx.numpy()) - A.arr(tt.numpy())
        return _reduce(L.elementwise(lambda v: L.smooth_l1(v, beta), dd), "mean")

    check(Scaled(w), _t(x), _t(t), nn.SmoothL1Loss(beta=beta), oracle, bits=bits)


def _bce_oracle(f: Callable[[np.ndarray], np.ndarray], reduction: str = "mean",
                weight: np.ndarray | None = None) -> Callable[..., A.V]:  # fmt: skip
    def oracle(p: dict, xx: torch.Tensor, tt: torch.Tensor) -> A.V:
        prob = f(p["w"] * A.arr(xx.numpy()))
        terms = L.elementwise(L.bce, prob, tt.numpy())
        if weight is not None:
            terms = terms * A.arr(weight)
        return _reduce(terms, reduction)

    return oracle


@pytest.mark.parametrize("bits", SYSTEMS)
def test_bce_against_the_oracle_at_exact_0_and_1(bits: int | None) -> None:
    """Probabilities exactly 0 and 1 (log clamped at -100; the backward's denominator
    clamped at EPSILON: gradients of +-1e12), 1e-300 (log -690.8: clamped), 1 - 2^-53
    (x (1 - x) < EPSILON, no log clamp), 0.5, against targets 0, 1 and 0.3."""
    w = np.array([[0.0, 1.0, 0.0, 1.0], [1e-300, 1 - 2**-53, 0.5, 0.25]])
    t = np.array([[0.0, 1.0, 1.0, 0.0], [0.3, 1.0, 0.0, 1.0]])
    x = np.ones_like(w)
    check(Scaled(w), _t(x), _t(t), nn.BCELoss(), _bce_oracle(lambda h: h), bits=bits)


@pytest.mark.parametrize("bits", SYSTEMS)
def test_bce_against_the_oracle_after_a_saturated_sigmoid(bits: int | None) -> None:
    """sigmoid(z) at z = +-40 (1 - s = 4e-18: x (1 - s) under EPSILON), +-100 (1 - s near
    e^-100: log(1 - s) = -100 - log1p(e^-100), under the clamp), +-800 (s beyond float64),
    1e-300; class weights and a sum."""
    z = np.array([[40.0, -40.0, 100.0, -100.0], [800.0, -800.0, 1e-300, 2.0]])
    t = np.array([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.5, 0.2]])
    weight = np.array([1.0, 0.5, 2.0, 3.0])
    loss = nn.BCELoss(weight=_t(weight), reduction="sum")
    check(Scaled(z, torch.sigmoid), _t(np.ones_like(z)), _t(t), loss,
          _bce_oracle(A.sigmoid, "sum", weight), bits=bits)  # fmt: skip


@pytest.mark.parametrize("bits", SYSTEMS)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_against_the_oracle_with_zero_targets(bits: int | None, log_target: bool) -> None:
    """F.kl_div(log_softmax(w x), t, "batchmean"): targets exactly 0 (xlogy(0, 0) = 0), 1e-300
    and 1 (log_target: log-probabilities -inf-free, -700 and 0); logits spread by 1000."""
    z = np.array([[1000.0, -1000.0, 0.5], [1.0, 2.0, 3.0], [1e-300, 0.0, -1e-300]])
    if log_target:
        t = np.array([[0.0, -700.0, -2.0], [-1.5, -0.25, -3.0], [-1e-300, 0.0, -1.0]])
    else:
        t = np.array([[0.0, 1.0, 0.0], [1e-300, 0.5, 0.5], [0.25, 0.0, 0.75]])

    def oracle(p: dict, xx: torch.Tensor, tt: torch.Tensor) -> A.V:
        ls = _log_softmax_rows(p["w"] * A.arr(xx.numpy()))
        tv = A.arr(tt.numpy())
        if log_target:
            terms = A.exp(tv) * (tv - ls)
        else:
            terms = L.elementwise(L.xlogy, tv, tv) - tv * ls
        return A.total(terms) / ls.shape[0]

    def loss(o: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return F.kl_div(torch.log_softmax(o, -1), tt, reduction="batchmean", log_target=log_target)

    check(Scaled(z), _t(np.ones_like(z)), _t(t), loss, oracle, bits=bits)


@pytest.mark.parametrize("bits", SYSTEMS)
def test_soft_margin_against_the_oracle_saturated(bits: int | None) -> None:
    """log(1 + e^(-x t)) at x t = +-1000 (e^1000 beyond float64: softplus without overflow),
    +-40, 1e-300, 0; targets +-1 and 0.5."""
    w = np.array([[1000.0, -1000.0, 40.0], [-40.0, 1e-300, 0.0]])
    t = np.array([[1.0, 1.0, -1.0], [0.5, -1.0, 1.0]])

    def oracle(p: dict, xx: torch.Tensor, tt: torch.Tensor) -> A.V:
        h = p["w"] * A.arr(xx.numpy())
        return _reduce(L.elementwise(L.soft_margin, h, tt.numpy()), "mean")

    check(Scaled(w), _t(np.ones_like(w)), _t(t), nn.SoftMarginLoss(), oracle, bits=bits)


@pytest.mark.parametrize("bits", SYSTEMS)
@pytest.mark.parametrize(("p", "margin", "reduction"), [(1, 1.0, "mean"), (2, 0.5, "sum")])
def test_multi_margin_against_the_oracle_at_ties(
    bits: int | None, p: int, margin: float, reduction: str
) -> None:
    """z = margin - x_t + x_d exactly 0 (torch: no term, no gradient), 1e-300 above it, 1e300,
    class weights: per row sum over d != t of relu(z)^p w[t] / C, relu'(0) = 0."""
    x = np.array(
        [[2.0, 2.0 - margin, 0.0, 1e300], [0.5, 0.5 - margin + 2**-40, -3.0, 0.25],
         [1e-300, 0.0, -1e-300, 2.0 - margin]]
    )  # fmt: skip
    tgt = torch.tensor([0, 0, 3])
    weight = np.array([0.5, 2.0, 1.0, 3.0])
    c = x.shape[1]

    def oracle(pp: dict, xx: torch.Tensor, tt: torch.Tensor) -> A.V:
        h = pp["w"] * A.arr(xx.numpy())
        rows = []
        for i, ti in enumerate(tt.tolist()):
            terms = [A.relu(margin - h[i, ti] + h[i, d]) for d in range(c) if d != ti]
            terms = [v * v for v in terms] if p == 2 else terms
            rows.append(A.total(np.array(terms, dtype=object)) * weight[ti] / c)
        return _reduce(np.array(rows, dtype=object), reduction)

    loss = nn.MultiMarginLoss(p=p, margin=margin, weight=_t(weight), reduction=reduction)
    check(Scaled(np.ones_like(x)), _t(x), tgt, loss, oracle, bits=bits)


@pytest.mark.parametrize("bits", SYSTEMS)
def test_margin_ranking_and_hinge_against_the_oracle_at_ties(bits: int | None) -> None:
    """margin - t (a - b) exactly 0 and hinge's margin - x exactly 0 (torch's clamp_min
    backward passes the gradient there: ``ge``), 1e-300 on either side, 1e300."""
    h = np.array([[1.0, 0.5], [0.0, 0.5], [1e-300, 0.5], [1e300, -3.0]])
    t = np.array([1.0, -1.0, 1.0, -1.0])

    def ranking(p: dict, xx: torch.Tensor, tt: torch.Tensor) -> A.V:
        v = p["w"] * A.arr(xx.numpy())
        ty = tt.numpy()
        terms = [L.clamp_min(-ty[i] * (v[i, 0] - v[i, 1]) + 0.5, 0.0) for i in range(4)]
        return _reduce(np.array(terms, dtype=object), "mean")

    def loss(o: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return F.margin_ranking_loss(o[:, 0], o[:, 1], tt, margin=0.5)

    check(Scaled(h), _t(np.ones_like(h)), _t(t), loss, ranking, bits=bits)
    x = np.array([[0.75, -1.0, 1e-300], [0.75 - 2**-52, 2.0, 0.0]])
    th = np.array([[-1.0, -1.0, -1.0], [-1.0, 1.0, 1.0]])

    def hinge(p: dict, xx: torch.Tensor, tt: torch.Tensor) -> A.V:
        v = p["w"] * A.arr(xx.numpy())
        ty = tt.numpy()
        terms = L.elementwise(lambda a, b: L.clamp_min(0.75 - a, 0.0) if b == -1 else a, v, ty)
        return _reduce(terms, "mean")

    check(Scaled(x), _t(np.ones_like(x)), _t(th),
          lambda o, tt: F.hinge_embedding_loss(o, tt, margin=0.75), hinge, bits=bits)  # fmt: skip


@pytest.mark.parametrize("bits", SYSTEMS)
def test_cosine_similarity_against_the_oracle_at_tiny_norms(bits: int | None) -> None:
    """1 - cos(h, t) per row, eps 1e-8: a zero row (norm exactly 0: clamped to eps, the norm's
    backward masked), a row of norm 1e-10 (clamped; torch clamps in place under no_grad, so
    the gradient flows as if unclamped), rows of 1e-300 and 1e200 (squares outside float64)."""
    h = np.array([[0.0, 0.0, 0.0], [1e-10, -2e-10, 2e-10], [1e-300, 2e-300, -1e-300],
                  [1e200, 3.0, -2e200]])  # fmt: skip
    t = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, -1.0], [2.0, -1.0, 0.25], [1.0, 1.0, 1.0]])

    def oracle(p: dict, xx: torch.Tensor, tt: torch.Tensor) -> A.V:
        v = p["w"] * A.arr(xx.numpy())
        tv = A.arr(tt.numpy())
        rows = []
        for i in range(v.shape[0]):
            nv = L.clamp_min_no_grad(L.norm2(v[i]), 1e-8)
            nt = L.clamp_min_no_grad(L.norm2(tv[i]), 1e-8)
            cos = A.total((v[i] / nv) * (tv[i] / nt))
            rows.append(1 - cos)
        return _reduce(np.array(rows, dtype=object), "mean")

    def loss(o: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return (1 - F.cosine_similarity(o, tt)).mean()

    check(Scaled(h), _t(np.ones_like(h)), _t(t), loss, oracle, bits=bits)


@pytest.mark.parametrize("bits", SYSTEMS)
def test_cosine_embedding_against_the_oracle_at_an_orthogonal_tie(bits: int | None) -> None:
    """cos = sum(a b) / sqrt((|a|^2 + EPS)(|b|^2 + EPS)), EPS torch's float32 1e-12 (a float64
    constant of the graph, taken as it is): t = -1 on orthogonal rows with margin 0 puts
    ``cos - margin`` exactly at clamp_min's 0 (the gradient passes: ``ge``); t = 1 on a row of
    1e-300 (squares below float64: EPS dominates) and on a pair scaled by 1e200."""
    a = np.array([[1.0, 0.0, 2.0], [1e-300, 2e-300, -1e-300], [3.0, -1.0, 0.5], [1e200, 1.0, 0.0]])
    b = np.array([[0.0, 5.0, 0.0], [0.5, 0.25, 1.0], [1.0, 3.0, 0.0], [2e200, -1.0, 1e200]])
    h = np.concatenate([a, b])
    t = np.array([-1.0, 1.0, -1.0, 1.0])
    eps = L.BCE_EPSILON  # the same float32 1e-12 (ATen's Loss.cpp EPSILON)

    def oracle(p: dict, xx: torch.Tensor, tt: torch.Tensor) -> A.V:
        v = p["w"] * A.arr(xx.numpy())
        rows = []
        for i, ti in enumerate(tt.tolist()):
            x1, x2 = v[i], v[i + 4]
            m1, m2 = A.total(x1 * x1) + eps, A.total(x2 * x2) + eps
            cos = A.total(x1 * x2) / A.sqrt(m1 * m2)
            rows.append(1 - cos if ti == 1 else L.clamp_min(cos - 0.0, 0.0))
        return _reduce(np.array(rows, dtype=object), "mean")

    def loss(o: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return F.cosine_embedding_loss(o[:4], o[4:], tt, margin=0.0)

    check(Scaled(np.ones_like(h)), _t(h), _t(t), loss, oracle, bits=bits)


@pytest.mark.parametrize("bits", SYSTEMS)
def test_triplet_margin_against_the_oracle_at_a_zero_distance(bits: int | None) -> None:
    """d(a, p) = ||a - p + 1e-6||_2 (F.pairwise_distance; 1e-6 the graph's float64): anchor 0
    and positive 1e-6 give a distance exactly 0 (the norm's backward masked to 0), anchor
    (3, 4, 0) gives exactly 5; a hinge 5 + d_pos - d_neg active in one row, clamped in the
    other."""
    a = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    pos = np.full((2, 3), 1e-6)
    neg = np.array([[1.0, 2.0, 2.0], [-30.0, 1.0, 2.0]])
    h = np.concatenate([a, pos, neg])

    def dist(x: np.ndarray, y: np.ndarray) -> A.V:
        return L.norm2(x - y + 1e-6)

    def oracle(p: dict, xx: torch.Tensor, tt: torch.Tensor) -> A.V:
        v = p["w"] * A.arr(xx.numpy())
        rows = [
            L.clamp_min(5.0 + dist(v[i], v[i + 2]) - dist(v[i], v[i + 4]), 0.0) for i in range(2)
        ]
        return _reduce(np.array(rows, dtype=object), "mean")

    def loss(o: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return F.triplet_margin_loss(o[:2], o[2:4], o[4:], margin=5.0) + 0 * tt.sum()

    check(Scaled(np.ones_like(h)), _t(h), _t(np.zeros(2)), loss, oracle, bits=bits)


class Straddle(nn.Module):
    """d = sqrt(w) sqrt(w) - w + c + v x is exactly c + v x, but no ball of it is exact: with
    x = 0 and c = beta no ball decides d < beta; with c = 0, no ball decides the sign of d."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c
        self.w = nn.Parameter(_t([2.0, 3.0, 5.0]))
        self.v = nn.Parameter(_t([0.5, -1.0, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.w) * torch.sqrt(self.w) - self.w + self.c + self.v * (x - 1)


def _straddle(beta: float) -> Any:
    x, t = _t([1.0, 1.0, 1.0]), _t([0.0, 0.0, 0.0])
    net = fpgrad.from_module(Straddle(beta), x, t, nn.SmoothL1Loss(beta=beta))
    r = exact_graph(net.graph, allow_uncertified=True, max_bits=512).result
    assert r.bits == 512 and "undecided" in r.escalations[-1]
    return r


def test_an_undecided_sign_in_l1_is_undetermined_never_guessed() -> None:
    """beta = 0 (L1): d is exactly 0, its balls only contain 0; sgn(d) is -1, 0 or 1 (torch
    float64 computes d = 4.4e-16: sign 1): the loss and every gradient end undetermined,
    none a proven zero (w's gradient is exactly 0, v's too: x - 1 = 0)."""
    r = _straddle(0.0)
    for key in ("loss", "grads/w"):
        assert np.all(r.undetermined_masks[key]), key
        assert not np.any(r.zeros[key]), key


def test_an_undecided_smooth_l1_threshold_takes_both_branches_which_agree_there() -> None:
    """d = beta = 1 exactly, undecided at every precision (escalation to the cap): both
    branches meet at the threshold (value beta / 2, derivative 1), so the union Arb takes
    encloses the exact loss 0.5 tightly; w's gradient (exactly 0, balls around 0) stays
    undetermined, never a proven zero."""
    r = _straddle(1.0)
    m, rad = r.enclosure("loss")
    m, rad = mpmath.mpf(np.asarray(m).ravel()[0]), float(np.asarray(rad).ravel()[0])
    assert abs(m - mpmath.mpf(0.5)) <= rad < 1e-100
    assert not r.undetermined_masks["loss"].any()
    assert np.all(r.undetermined_masks["grads/w"]) and not np.any(r.zeros["grads/w"])


# ---- the emulated machine by hand: fpgrad.round_to after every operation --------------------
def _cx(fmt: str) -> Any:
    return SimpleNamespace(ar=EmulatedArith(fmt, accumulation="per_op"), label=lambda: "op",
                           origin=lambda i: None)  # fmt: skip


def _rounded(fmt: str) -> Callable[[Any], np.ndarray]:
    return lambda v: fpgrad.round_to(np.asarray(v, dtype=np.float64), fmt)


def _fn(f: Callable[[Any], Any], fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    """A correctly rounded elementary function (mpmath at 60 digits, then one rounding)."""

    def one(v: float) -> float:
        if np.isnan(v):
            return float("nan")
        with mpmath.workdps(60):
            try:
                return float(f(mpmath.mpf(float(v))))
            except ValueError:  # log(0)
                return float("-inf")

    return lambda a: _rounded(fmt)(np.reshape([one(v) for v in np.ravel(a)], np.shape(a)))


def _sum(R: Callable[[Any], np.ndarray], v: np.ndarray) -> Any:
    """fpgrad's per-op sum of a matrix: every element left to right in row-major order, each
    add rounded (one accumulation over the reduced axes; it had summed each row into the
    format, then the rows: tests/test_attack21_emulated.py)."""
    flat = np.asarray(v).ravel()
    acc = flat[0]
    for e in flat[1:]:
        acc = R(acc + e)
    return acc


@pytest.mark.parametrize("fmt", ["bfloat16", "fp8_e4m3"])
def test_emulated_losses_by_hand(fmt: str) -> None:
    """Each add, mul, div, exp, log, log1p rounded once into the format, in torch's order."""
    R = _rounded(fmt)
    cx = _cx(fmt)
    ar = cx.ar
    x = R([[0.3, -1.7, 0.9], [2.5, 0.0, -0.6]])
    t = R([[0.25, 0.5, -1.0], [1.0, 0.0, 0.5]])
    g = R(0.75)
    n = x.size
    # smooth L1, beta 1: z < 1: 0.5 z z / 1, else z - 0.5
    z = np.abs(R(x - t))
    terms = np.where(z >= 1.0, R(z - 0.5), R(R(R(0.5 * z) * z) / 1.0))
    got = losses2.smooth_l1_loss(cx, ar.asarray(x), ar.asarray(t), 2, 1.0)
    np.testing.assert_array_equal(got, _sum(R, terms))
    d = R(x - t)
    deriv = np.where(np.abs(d) >= 1.0, np.where(d > 0, 1.0, -1.0), R(d / 1.0))
    want = R(R(R(1.0 / n) * deriv) * g)
    got = losses2.smooth_l1_loss_backward(cx, g, ar.asarray(x), ar.asarray(t), 1, 1.0)
    np.testing.assert_array_equal(got, want)
    # BCE of probabilities, 0 and 1 included
    p = R([[0.0, 1.0, 0.375], [0.5, 0.9, 1e-3]])
    q = R([[0.0, 1.0, 1.0], [0.0, 0.25, 1.0]])
    log1m = np.maximum(_fn(mpmath.log1p, fmt)(-p), R(-100.0))
    logp = np.maximum(_fn(mpmath.log, fmt)(p), R(-100.0))
    terms = R(R(R(q - 1.0) * log1m) - R(q * logp))
    got = losses2.binary_cross_entropy(cx, ar.asarray(p), ar.asarray(q), None, 0)
    np.testing.assert_array_equal(got, terms)
    den = np.maximum(R(R(1.0 - p) * p), R(losses2.BCE_EPSILON))
    want = R(R(R(g * R(p - q)) / den) / n)
    got = losses2.binary_cross_entropy_backward(cx, g, ar.asarray(p), ar.asarray(q), None, 1)
    np.testing.assert_array_equal(got, want)
    # xlogy: 0 where x = 0 (also at y = 0)
    got = losses2.xlogy(cx, ar.asarray(q), ar.asarray(p))
    want = np.where(q == 0, 0.0, R(q * _fn(mpmath.log, fmt)(p)))
    np.testing.assert_array_equal(got, want)
    # soft margin, "sum": log1p(exp(-x t)); backward (t z * -1) / (z + 1) * g
    u = R(R(-x) * t)
    e = _fn(mpmath.exp, fmt)(u)
    got = losses2.soft_margin_loss(cx, ar.asarray(x), ar.asarray(t), 2)
    np.testing.assert_array_equal(got, _sum(R, _fn(mpmath.log1p, fmt)(e)))
    u2 = R(R(-t) * x)
    z2 = _fn(mpmath.exp, fmt)(u2)
    want = R(R(R(R(t * z2) * -1.0) / R(z2 + 1.0)) * g)
    got = losses2.soft_margin_loss_backward(cx, g, ar.asarray(x), ar.asarray(t), 2)
    np.testing.assert_array_equal(got, want)


def test_emulated_float32_smooth_l1_and_bce_backward_equal_torch_float32() -> None:
    """Kernels without transcendental functions: the emulated float32 machine rounding torch's
    vectorized sequence gives torch float32's bits (16 elements: the vectorized path)."""
    torch.manual_seed(3)
    cx = _cx("float32")
    ar = cx.ar
    x = torch.rand(4, 4)
    x[0, :2] = torch.tensor([0.0, 1.0])
    t = torch.rand(4, 4)
    t[1, :2] = torch.tensor([0.0, 1.0])
    xs = x.clone().requires_grad_(True)
    F.binary_cross_entropy(xs, t).backward()
    got = losses2.binary_cross_entropy_backward(
        cx, ar.asarray(np.array(1.0)), ar.asarray(x.double().numpy()),
        ar.asarray(t.double().numpy()), None, 1)  # fmt: skip
    assert np.array_equal(got, xs.grad.double().numpy())
    a = torch.randn(4, 4) * 2
    a[0, 0] = t[0, 0] + 1.0  # |d| = beta (up to the float32 sum)
    a2 = a.clone().requires_grad_(True)
    (F.smooth_l1_loss(a2, t, beta=1.0) * 3).backward()
    got = losses2.smooth_l1_loss_backward(
        cx, ar.asarray(np.array(3.0)), ar.asarray(a.double().numpy()),
        ar.asarray(t.double().numpy()), 1, 1.0)  # fmt: skip
    assert np.array_equal(got, a2.grad.double().numpy())


@pytest.mark.parametrize("fmt", ["bfloat16", "fp8_e4m3"])
def test_emulated_multi_margin_by_hand(fmt: str) -> None:
    """p = 2, margin 0.5, weights, "mean": z = (margin - x_t) + x_d; row sums left to right,
    / C, then the rows, / N; backward h = (2 g) z w[t], -sum h at the target, times go."""
    R = _rounded(fmt)
    cx = _cx(fmt)
    ar = cx.ar
    x = R([[0.3, -1.7, 0.9], [2.5, 0.0, -0.6]])
    w = R([0.5, 2.0, 1.5])
    tgt = np.array([2, 0])
    n, c = x.shape
    z = R(R(0.5 - x[np.arange(n), tgt])[:, None] + x)
    off = np.ones((n, c), dtype=bool)
    off[np.arange(n), tgt] = False
    act = off & (z > 0)
    h = np.where(act, R(R(z * z) * w[tgt][:, None]), 0.0)
    rows = R(np.array([_sum(R, h[i : i + 1]) for i in range(n)]) / c)
    want = R(R(rows[0] + rows[1]) / n)
    got = losses2.multi_margin_loss(cx, ar.asarray(x), tgt, 2, 0.5, ar.asarray(w), 1)
    np.testing.assert_array_equal(got, want)
    go = R(1.25)
    g = R(1.0 / (n * c))
    hb = np.where(act, R(R(R(2.0 * g) * z) * w[tgt][:, None]), 0.0)
    grad = hb.copy()
    for i in range(n):
        grad[i, tgt[i]] = _sum(R, -hb[i : i + 1])
    want = R(grad * go)
    got = losses2.multi_margin_loss_backward(cx, go, ar.asarray(x), tgt, 2, 0.5, ar.asarray(w), 1)
    np.testing.assert_array_equal(got, want)


def test_emulated_float32_multi_margin_equals_torch_float32() -> None:
    """torch's scalar loops (row sums left to right, "none"; the backward at "mean") rounded
    by the emulated float32 machine give torch float32's bits."""
    torch.manual_seed(4)
    cx = _cx("float32")
    ar = cx.ar
    x = torch.randn(5, 7)
    tgt = torch.tensor([0, 6, 3, 3, 1])
    w = torch.rand(7) + 0.5
    out = F.multi_margin_loss(x, tgt, p=2, margin=0.7, weight=w, reduction="none")
    got = losses2.multi_margin_loss(
        cx, ar.asarray(x.double().numpy()), tgt.numpy(), 2, 0.7, ar.asarray(w.double().numpy()), 0
    )
    np.testing.assert_array_equal(got, out.double().numpy())
    xs = x.clone().requires_grad_(True)
    (F.multi_margin_loss(xs, tgt, p=1, margin=0.7, weight=w) * 3).backward()
    got = losses2.multi_margin_loss_backward(
        cx, ar.asarray(np.array(3.0)), ar.asarray(x.double().numpy()), tgt.numpy(), 1, 0.7,
        ar.asarray(w.double().numpy()), 1,
    )  # fmt: skip
    np.testing.assert_array_equal(got, xs.grad.double().numpy())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_multi_margin_of_one_sample_native_bit_for_bit(reduction: str) -> None:
    """A 1-D input and a 0-d target (torch's scalar output, also for "none")."""
    torch.manual_seed(2)
    model, x, t = nn.Linear(3, 4), torch.randn(3), torch.tensor(2)

    def loss(o: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        return F.multi_margin_loss(o, tt, p=2, margin=1.5, reduction=reduction) * 3

    net = fpgrad.from_module(model, x, t, loss)
    cmp = fpgrad.compare(net, "float32,float64")
    for prec, dtype in [("float32", torch.float32), ("float64", torch.float64)]:
        ref = _eager(model, x, t, loss, dtype)
        for name in net.param_names:
            assert np.array_equal(cmp.values(prec)[name], ref[name]), (prec, name)
    assert cmp.certified_digits >= 17
