"""Comparisons and piecewise-linear selections (fpgrad/graph/ops/select.py).

(1) each op in a small captured model: float32 and float64 columns equal torch eager autograd
bit for bit, the exact reference certified and inside an independent mpmath oracle (written
from the ops' definitions, central differences: tests/oracle/graph_reference.py);
(2) ties exactly at thresholds, saturation and tiny values against gradients written by hand
in exact rationals with torch's tie conventions (derivatives.yaml / the CPU kernels);
(3) a comparison no precision can decide is undetermined, never guessed;
(4) the emulated machine op by op against ``fpgrad.round_to``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.arith.emulated import EmulatedArith
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.interpret import interpret
from tests.oracle import graph_reference as R
from tests.oracle.graph_reference import CTX
from tests.test_graph_oracle import _claims

M = Callable[[np.ndarray], np.ndarray]


def _mp(fn: Callable[..., Any]) -> M:
    f = np.frompyfunc(fn, 1, 1)
    return lambda x: np.asarray(f(x), dtype=object)


def _clip(lo: Any, hi: Any) -> M:
    return _mp(lambda v: min(max(v, CTX.mpf(lo)), CTX.mpf(hi)))


def _hsig(v: Any) -> Any:
    return min(max(v / 6 + CTX.mpf(1) / 2, CTX.mpf(0)), CTX.mpf(1))  # the definition


def _gt(x: np.ndarray, c: float) -> np.ndarray:
    return np.asarray(np.frompyfunc(lambda v: v > c, 1, 1)(x), dtype=bool)


def _ge(x: np.ndarray, c: float) -> np.ndarray:
    return np.asarray(np.frompyfunc(lambda v: v >= c, 1, 1)(x), dtype=bool)


# name -> (torch function of h (5, 4), the same function on mpf arrays)
CASES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], M]] = {
    "hardtanh": (lambda t: F.hardtanh(t, -0.5, 0.5), _clip(-0.5, 0.5)),
    "relu6": (lambda t: F.relu6(4 * t), lambda x: _clip(0, 6)(4 * x)),
    "clamp": (lambda t: t.clamp(-0.5, 0.4), _clip(-0.5, 0.4)),
    "clamp_min": (lambda t: t.clamp_min(0.1), _mp(lambda v: max(v, CTX.mpf(0.1)))),
    "clamp_max_kw": (lambda t: t.clamp(max=0.2), _mp(lambda v: min(v, CTX.mpf(0.2)))),
    "clamp_tensor": (lambda t: t.clamp(min=-t, max=t * t), lambda x: np.asarray(
        [min(max(v, -v), v * v) for v in x.ravel()], dtype=object).reshape(x.shape)),
    "clamp_broadcast": (  # tensor bounds broadcast against (5, 4)
        lambda t: t.clamp(min=torch.tensor([-0.5, 0.0, 0.1, -1.0]), max=torch.tensor(0.6)),
        lambda x: np.minimum(np.maximum(x, R.mp(np.float32([-0.5, 0, 0.1, -1]))),
                             R.mp(np.float32(0.6))[()]),  # the float32 constants
    ),
    "hardsigmoid": (lambda t: F.hardsigmoid(6 * t), lambda x: _mp(_hsig)(6 * x)),
    "inplace_modules": (
        lambda t: nn.ReLU6(inplace=True)(4 * t) + nn.Hardswish(inplace=True)(6 * t)
        + nn.Hardsigmoid(inplace=True)(6 * t) + (2 * t).clamp_(-0.5, 0.4) + (3 * t).clamp_min_(0.1),
        lambda x: _clip(0, 6)(4 * x) + 6 * x * _mp(_hsig)(6 * x) + _mp(_hsig)(6 * x)
        + _clip(-0.5, 0.4)(2 * x) + _mp(lambda v: max(v, CTX.mpf(0.1)))(3 * x),
    ),
    "hardswish": (lambda t: F.hardswish(6 * t), lambda x: 6 * x * _mp(_hsig)(6 * x)),
    "where_logic": (
        lambda t: torch.where((t > 0) & ~(t >= 0.5) | (t <= -0.3), t, 0.1 * t),
        lambda x: np.where((_gt(x, 0) & ~_ge(x, 0.5) | ~_gt(x, -0.3)), x, x * CTX.mpf(0.1)),
    ),
    "masks_as_floats": (
        lambda t: t * (t > 0).float() + t * (t != 0.25) + t * torch.logical_xor(t < 0, t > 0.2),
        lambda x: x * _gt(x, 0) + x * (_gt(x, 0.25) | ~_ge(x, 0.25)) + x * (~_ge(x, 0) ^ _gt(x, 0.2)),
    ),
    "minimum": (lambda t: torch.minimum(t, torch.zeros(())), _mp(lambda v: min(v, 0))),
    "normalize_clamp_min": (  # F.normalize's formula, the norm written out
        lambda t: t / (t * t).sum(-1, keepdim=True).sqrt().clamp_min(1e-12),
        lambda x: x / np.maximum(R.sqrt(np.sum(x * x, axis=-1, keepdims=True)), CTX.mpf(1e-12)),
    ),
    "maximum": (lambda t: torch.maximum(t, 0.5 * t), _mp(lambda v: max(v, v / 2))),
    "amax_keepdim": (lambda t: t - t.amax(-1, keepdim=True),
                     lambda x: x - np.max(x, axis=-1, keepdims=True)),
    "amax_all": (lambda t: t * t.amax((0, 1)), lambda x: x * np.max(x)),
    # tanh's balls are never exact: the maximum's tie with itself is structural, not a sign
    "amax_of_tanh": (lambda t: t.tanh() * t.tanh().amax(-1, keepdim=True),
                     lambda x: R.tanh(x) * np.max(R.tanh(x), axis=-1, keepdims=True)),
    "amin_of_tanh": (lambda t: t.tanh() * t.tanh().amin(-1, keepdim=True) + t.amin((0, 1)),
                     lambda x: R.tanh(x) * np.min(R.tanh(x), axis=-1, keepdims=True) + np.min(x)),
    "amax_of_tanh_dims": (lambda t: t.tanh() * t.tanh().amax(-2) + t * t.tanh().amax((0, 1)),
                          lambda x: R.tanh(x) * np.max(R.tanh(x), axis=-2) + x * np.max(R.tanh(x))),
    "amax_negative_dim": (lambda t: t * t.amax(-2), lambda x: x * np.max(x, axis=-2)),
}  # fmt: skip


def check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward: Callable[..., Any],
          torch_rtol: float = 1e-9) -> None:  # fmt: skip
    """As tests/test_graph_oracle.check (cross-entropy loss): every claim of the certified
    reference against the oracle, and torch float64 against the oracle to ``torch_rtol``."""
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    ex = exact_graph(net.graph).result
    assert ex.certified_digits >= 17 and ex.undetermined_count == 0
    params = {n: R.mp(p) for n, p in model.named_parameters()}
    value, grads = R.gradients(lambda p: forward(p, R.mp(x), y.numpy()), params)
    scale = max([CTX.mpf(1), abs(value)] + [abs(v) for g in grads.values() for v in g.ravel()])
    _claims(ex, "loss", np.array(value, dtype=object).reshape(()), R.REL_ERR * scale)
    for name, g in grads.items():
        _claims(ex, f"grads/{name}", g, R.REL_ERR * scale)
    ref = _eager(model, x, y, torch.float64)
    for name, g in grads.items():
        o = np.array([float(v) for v in g.ravel()]).reshape(g.shape)
        np.testing.assert_allclose(ref[name], o, rtol=torch_rtol, atol=1e-12 * float(scale))


class Net(nn.Module):
    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.l, self.f, self.o = nn.Linear(4, 4), f, nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.f(self.l(x)))


def _eager(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> dict:
    m = copy.deepcopy(model).to(dtype)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nn.CrossEntropyLoss()(m(x.to(dtype)), y).backward()
    finally:
        torch.set_num_threads(n)
    return {k: p.grad.double().numpy() for k, p in m.named_parameters()}


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_bit_for_bit_and_exact_inside_the_oracle(case: str) -> None:
    f, fm = CASES[case]
    x, y = _data(11)
    model = Net(f)
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    cmp = fpgrad.compare(net, ["float32", "float64", "bfloat16:emulated"])
    for prec, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        ref = _eager(model, x, y, dtype)
        for name in net.param_names:
            assert np.array_equal(cmp.values(prec)[name], ref[name]), (prec, name)
    assert cmp.certified_digits >= 17

    def forward(p: dict, xs: np.ndarray, t: np.ndarray) -> Any:
        h = fm(R.linear(xs, p["l.weight"], p["l.bias"]))
        return R.cross_entropy(R.linear(h, p["o.weight"], p["o.bias"]), t)

    # torch's hardsigmoid_backward multiplies by float32's 1/6 in every dtype (its kernel's
    # float literal): float64 is 3e-8 off there; the exact reference divides by 6
    check(model, x, y, forward, 1e-7 if case in ("hardsigmoid", "inplace_modules") else 1e-9)


def test_prelu_native_and_oracle() -> None:
    x, y = _data(5)
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(4, 0.3), nn.Linear(4, 3))
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    cmp = fpgrad.compare(net, ["float32", "float64", "fp8_e4m3"])
    for prec, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        ref = _eager(model, x, y, dtype)
        for name in net.param_names:
            assert np.array_equal(cmp.values(prec)[name], ref[name]), (prec, name)

    def forward(p: dict, xs: np.ndarray, t: np.ndarray) -> Any:
        z = R.linear(xs, p["0.weight"], p["0.bias"])
        h = np.where(_gt(z, 0), z, z * p["1.weight"])
        return R.cross_entropy(R.linear(h, p["2.weight"], p["2.bias"]), t)

    check(model, x, y, forward)


# ---- ties, saturation, tiny values: gradients by hand in exact rationals ----------------------
class Scale(nn.Module):
    """out = f(w * x), w a parameter of x's shape: each gradient element sees one input."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], w: list[float]) -> None:
        super().__init__()
        self.f = f
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.w * x)


Q = Fraction
W = [-1e30, -6.0, -3.0, -1.0, -0.5, -1e-300, 0.0, 1e-300, 0.5, 1.0, 3.0, 6.0, 1e30]


def _step(lo: Q, hi: Q, closed: bool) -> Callable[[Q], tuple[Q, Q]]:
    def f(z: Q) -> tuple[Q, Q]:
        v = min(max(z, lo), hi)
        inside = lo <= z <= hi if closed else lo < z < hi
        return v, Q(1) if inside else Q(0)

    return f


def _hsig_q(z: Q) -> tuple[Q, Q]:
    return min(max(z / 6 + Q(1, 2), Q(0)), Q(1)), Q(1, 6) if -3 < z < 3 else Q(0)


def _hswish_q(z: Q) -> tuple[Q, Q]:
    d = Q(0) if z <= -3 else ((2 * z + 3) / 6 if z < 3 else Q(1))  # torch's kernel
    return z * _hsig_q(z)[0], d


def _max0_q(z: Q) -> tuple[Q, Q]:
    return max(z, Q(0)), Q(1) if z > 0 else (Q(1, 2) if z == 0 else Q(0))  # a tie splits


def _prelu_q(z: Q) -> tuple[Q, Q]:
    return (z, Q(1)) if z > 0 else (z / 4, Q(1, 4))


TIES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[Q], tuple[Q, Q]]]] = {
    "hardtanh": (lambda t: F.hardtanh(t, -1.0, 1.0), _step(Q(-1), Q(1), False)),
    "relu6": (F.relu6, _step(Q(0), Q(6), False)),
    "clamp": (lambda t: t.clamp(-1.0, 1.0), _step(Q(-1), Q(1), True)),
    "clamp_inverted": (lambda t: t.clamp(1.0, -1.0), lambda z: (Q(-1), Q(0))),  # max wins
    "clamp_min_tiny": (lambda t: t.clamp_min(1e-300), _step(Q(1e-300), Q(10**40), True)),
    "clamp_max": (lambda t: t.clamp_max(3.0), _step(Q(-(10**40)), Q(3), True)),
    "hardsigmoid": (F.hardsigmoid, _hsig_q),
    "hardswish": (F.hardswish, _hswish_q),
    "maximum_zero": (lambda t: torch.maximum(t, torch.zeros(())), _max0_q),
    "prelu_fixed": (lambda t: F.prelu(t, torch.tensor([0.25], dtype=t.dtype)), _prelu_q),
    "where_ge": (lambda t: torch.where(t >= 3, t, t * 0.25), lambda z: (z, Q(1)) if z >= 3
                 else (z / 4, Q(1, 4))),
}  # fmt: skip


def _exact_claims(net: Any, name: str, want: list[Q]) -> None:
    """Every element of the certified gradient decided (none undetermined), its ball around
    the exact rational ``want``, its zeros exact and its certified digits right."""
    ex = exact_graph(net.graph).result
    assert ex.undetermined_count == 0 and ex.certified_digits >= 17
    oracle = np.array([CTX.mpf(q.numerator) / q.denominator for q in want], dtype=object)
    shape = np.shape(ex.zero(f"grads/{name}"))
    scale = max([CTX.mpf(1)] + [abs(v) for v in oracle])
    _claims(ex, f"grads/{name}", oracle.reshape(shape), scale * CTX.mpf(10) ** -100)
    zero = np.asarray(ex.zero(f"grads/{name}")).ravel()
    assert all(zero[i] == (q == 0) for i, q in enumerate(want)), (zero, want)


@pytest.mark.parametrize("case", sorted(TIES))
def test_ties_saturation_and_tiny_values_by_hand(case: str) -> None:
    """L = sum((f(w x) - 1)^2) with x = 1: dL/dw_i = 2 (f(w_i) - 1) f'(w_i) exactly, f' by
    torch's convention at every threshold (w hits each one exactly)."""
    f, fq = TIES[case]
    x = torch.ones(1, len(W), dtype=torch.float64)
    y = torch.ones(1, len(W), dtype=torch.float64)
    model = Scale(f, W)
    loss = nn.MSELoss(reduction="sum")
    net = fpgrad.from_module(model, x, y, loss)
    cmp = fpgrad.compare(net, ["float64"])
    want = []
    for w in W:
        v, d = fq(Q(w))
        want.append(2 * (v - 1) * d)
    _exact_claims(net, "w", want)
    m = copy.deepcopy(model)
    loss(m(x), y).backward()
    g64 = m.w.grad.numpy().ravel()
    assert np.array_equal(cmp.values("float64")["w"].ravel(), g64)
    # the hand-written rule is torch's: the same zeros, and float64 near the exact values
    # (hardsigmoid: torch's float32 1/6, 3e-8 off)
    tol = 1e-7 if case == "hardsigmoid" else 1e-15
    for q, g in zip(want, g64, strict=True):
        assert (g == 0) == (q == 0) and abs(float(q) - g) <= tol * abs(g), (float(q), g)


def test_amax_ties_split_the_gradient_by_count() -> None:
    """out = amax(w * x, -1) * c per row; a row with k maxima gives each c / k."""
    w = [[2.0, 1.0, 2.0, 2.0], [-1.0, -1.0, -3.0, -2.0], [5.0, 0.0, 1.0, 4.0]]
    model = Scale(lambda t: t.amax(-1), [0.0])
    model.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
    x = torch.ones(3, 4, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.float64)
    loss = nn.MSELoss(reduction="sum")
    net = fpgrad.from_module(model, x, y, loss)
    cmp = fpgrad.compare(net, ["float32", "float64"])
    want = [Q(2 * 2, 3), 0, Q(4, 3), Q(4, 3), Q(-2, 2), Q(-2, 2), 0, 0, Q(10), 0, 0, 0]
    _exact_claims(net, "w", [Q(v) for v in want])
    for prec, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        m = copy.deepcopy(model).to(dtype)
        loss(m(x.to(dtype)), y.to(dtype)).backward()
        assert np.array_equal(cmp.values(prec)["w"], m.w.grad.double().numpy()), prec


# ---- undecidable comparisons ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("f", "union"),
    [
        pytest.param(lambda t: F.hardtanh(t, -2.0, 2.0), True, id="hardtanh"),
        pytest.param(lambda t: t.clamp_min(2.0), False, id="clamp_min"),
        pytest.param(lambda t: torch.where(t > 2.0, t, 3 * t), True, id="where_gt"),
        pytest.param(lambda t: t * t.amax(-1, keepdim=True), False, id="amax"),
    ],
)
def test_a_tie_no_precision_decides_is_undetermined(f: Callable[..., Any], union: bool) -> None:
    """exp(log 2) = 2 exactly, but no ball of it is exactly 2: the branch at 2 (or the tie
    of two maxima) is undecided at every precision, so those gradients are left
    undetermined at the cap, never certified on a guessed branch. A mask only ``where``
    reads (hardtanh's backward, ``where(t > 2)``) gives the union of both branches there and
    the other elements stay certified; a mask read otherwise (clamp's ``ge``, amax's ties)
    leaves the whole run undetermined."""
    model = Scale(lambda t: f(torch.exp(torch.log(t))), [2.0, 1.0, 2.0, 0.5])
    x = torch.ones(1, 4, dtype=torch.float64)
    y = torch.zeros(1, 4, dtype=torch.float64)
    net = fpgrad.from_module(model, x, y, nn.MSELoss(reduction="sum"))
    ex = exact_graph(net.graph, bits=150, allow_uncertified=True, max_bits=600).result
    und = np.asarray(ex.undetermined("grads/w")).ravel()
    digits = np.asarray(ex.digits["grads/w"]).ravel()
    assert und[0] and und[2], "a gradient at the undecidable tie was certified"
    assert any("undecided (the cap)" in s for s in ex.escalations), ex.escalations
    if union:
        assert not und[1] and not und[3] and min(digits[1], digits[3]) >= 17
    else:
        assert und.all() and not digits.any()


# ---- the emulated machine by hand --------------------------------------------------------------
def test_emulated_bfloat16_op_by_op() -> None:
    """bfloat16 emulated: hardswish, hardsigmoid and their backward ops, clamp_min at 0.1 (the
    bound rounded into the format, 0.10009765625, as torch casts it), hardtanh's backward
    (the bounds as given, as torch's kernel compares in float), each op's value from its
    inputs with round_to after every operation; ties at -3 and 3."""
    fmt = "bfloat16"
    rnd = lambda v: fpgrad.round_to(np.asarray(v, dtype=np.float64), fmt)  # noqa: E731
    f = lambda t: F.hardswish(t) + F.hardsigmoid(t) + t.clamp_min(0.1) + F.hardtanh(t, -3.0, 0.7)  # noqa: E731
    model = Scale(f, [-3.0, -2.9, -1.3, 0.05, 0.1, 0.7, 2.99, 3.0, 4.1])
    x = torch.ones(1, 9, dtype=torch.float64)
    y = torch.zeros(1, 9, dtype=torch.float64)
    net = fpgrad.from_module(model, x, y, nn.MSELoss())
    tr = interpret(net.graph, EmulatedArith(fmt))
    v = tr.values
    seen = set()
    for node in net.graph.gm.graph.nodes:
        key = str(node.target)
        args = [v[a.name] if hasattr(a, "name") else a for a in node.args]
        if key == "aten.hardswish.default":
            z = args[0]
            want = rnd(rnd(z * np.clip(rnd(z + 3), 0, 6)) / 6)
        elif key == "aten.hardsigmoid.default":
            want = rnd(np.clip(rnd(args[0] + 3), 0, 6) / 6)
        elif key == "aten.hardswish_backward.default":
            g, z = args
            want = np.where(z <= -3, 0.0, np.where(z < 3, rnd(g * rnd(rnd(z / 3) + 0.5)), g))
        elif key == "aten.hardsigmoid_backward.default":
            g, z = args
            want = np.where((z > -3) & (z < 3), rnd(g * rnd(float(np.float32(1) / 6))), 0.0)
        elif key == "aten.clamp_min.default":
            want = np.maximum(args[0], 0.10009765625)
        elif key == "aten.hardtanh_backward.default":  # bounds as given: bf16(0.7) < 0.7
            g, z = args[:2]
            want = np.where((z > -3.0) & (z < 0.7), g, 0.0)
            assert z[0, 5] == 0.69921875 and want[0, 5] != 0 and want[0, 0] == 0
        else:
            continue
        seen.add(key)
        assert np.array_equal(np.asarray(v[node.name]), want), key
    assert len(seen) == 6, seen


def test_an_operand_compared_with_itself_is_a_tie_without_a_sign() -> None:
    """maximum(t, t) and t >= t on tanh values (balls never exact): every element ties,
    decided structurally (a ball of t - t contains 0 at every precision); torch splits
    maximum's gradient in halves and passes t >= t everywhere."""
    f = lambda t: torch.maximum(t.tanh(), t.tanh()) + torch.where(t.tanh() >= t.tanh(), t, 0 * t)  # noqa: E731
    model = Scale(f, [0.5, -1.0, 2.0])
    x = torch.ones(1, 3, dtype=torch.float64)
    y = torch.zeros(1, 3, dtype=torch.float64)
    net = fpgrad.from_module(model, x, y, nn.MSELoss(reduction="sum"))
    ex = exact_graph(net.graph).result
    assert ex.undetermined_count == 0 and ex.certified_digits >= 17
    m = copy.deepcopy(model)
    nn.MSELoss(reduction="sum")(m(x), y).backward()
    mid, _ = ex.enclosure("grads/w")
    np.testing.assert_allclose(np.asarray(mid, dtype=float).ravel(), m.w.grad.numpy().ravel(),
                               rtol=1e-14)  # fmt: skip


def _chain(t: torch.Tensor) -> torch.Tensor:
    for _ in range(12):
        t = t * t * 0.5 + t.tanh()
    return t


def test_the_same_deep_computation_written_twice_ties() -> None:
    """maximum of two copies of a 48-op chain (tanh inside: never exact balls): the same pure
    ops of the same arguments, level by level, tie structurally."""
    model = Scale(lambda t: torch.maximum(_chain(t), _chain(t)), [0.1, -0.2])
    x = torch.ones(1, 2, dtype=torch.float64)
    y = torch.zeros(1, 2, dtype=torch.float64)
    net = fpgrad.from_module(model, x, y, nn.MSELoss(reduction="sum"))
    ex = exact_graph(net.graph).result
    assert ex.undetermined_count == 0 and ex.certified_digits >= 17
    m = copy.deepcopy(model)
    nn.MSELoss(reduction="sum")(m(x), y).backward()
    mid, _ = ex.enclosure("grads/w")
    np.testing.assert_allclose(np.asarray(mid, dtype=float).ravel(), m.w.grad.numpy().ravel(),
                               rtol=1e-14)  # fmt: skip


@pytest.mark.parametrize("case", ["clamp_tensor", "hardswish", "where_logic", "masks_as_floats",
                                  "maximum", "amax_of_tanh", "inplace_modules"])  # fmt: skip
def test_arb_decides_every_branch_and_agrees_with_the_fast_balls(case: str) -> None:
    """The Arb fallback runs the same ops (its masks, unions, structural ties): no branch
    left undecided or untracked, gradients within both enclosures."""
    from fpgrad.arith.arb import ArbArith
    from fpgrad.arith.ball import BallArith

    x, y = _data(11)
    net = fpgrad.from_module(Net(CASES[case][0]), x, y, nn.CrossEntropyLoss())
    arb, ball = ArbArith(300), BallArith(150)
    ta, tb = interpret(net.graph, arb, keep=False), interpret(net.graph, ball, keep=False)
    assert arb.uncertain_branches == 0 and not arb.untracked() and ball.uncertain_branches == 0
    for name in net.param_names:
        ga, gb = arb.to_float64(ta.grads[name]), ball.to_float64(tb.grads[name])
        np.testing.assert_allclose(ga, gb, rtol=1e-15, atol=1e-300)


class DataMasks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l, self.o = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.l(x)
        h = torch.where(keep, h, 0.5 * h)  # a boolean data tensor
        h = torch.where(x > 0, h, -h)  # a mask from the floating data itself
        return self.o(torch.where((x <= 0.3) & (h > 0), h, torch.zeros(())))


def test_masks_from_data() -> None:
    """where() on a boolean input and on comparisons of the data: float32/float64 bit for bit,
    exact inside the oracle."""
    x, y = _data(7)
    keep = torch.rand(5, 4) > 0.5
    model = DataMasks()
    net = fpgrad.from_module(model, (x, keep), y, nn.CrossEntropyLoss())
    cmp = fpgrad.compare(net, ["float32", "float64", "bfloat16:emulated"])
    assert cmp.certified_digits >= 17
    for prec, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        m = copy.deepcopy(model).to(dtype)
        nn.CrossEntropyLoss()(m(x.to(dtype), keep), y).backward()
        for name, p in m.named_parameters():
            assert np.array_equal(cmp.values(prec)[name], p.grad.double().numpy()), (prec, name)
    ex = exact_graph(net.graph).result
    params = {n: R.mp(p) for n, p in model.named_parameters()}
    xs, k = R.mp(x), keep.numpy()

    def forward(p: dict) -> Any:
        h = R.linear(xs, p["l.weight"], p["l.bias"])
        h = np.where(k, h, h * CTX.mpf(0.5))
        h = np.where(_gt(xs, 0), h, -h)
        h = np.where(~_gt(xs, 0.3) & _gt(h, 0), h, CTX.mpf(0))
        return R.cross_entropy(R.linear(h, p["o.weight"], p["o.bias"]), y.numpy())

    value, grads = R.gradients(forward, params)
    for name, g in grads.items():
        _claims(ex, f"grads/{name}", g, R.REL_ERR)


class Blind(nn.Module):
    """One mask read by two wheres: one of its own shape, one broadcasting it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[2.0, 1.0, 1.5, 0.5]], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.exp(torch.log(self.w * x))
        m = (t[:, :1] + 1e-200) > 2.0  # true, but no ball of exp(log 2) at 600 bits decides it
        u = torch.where(m, t[:, :1], t[:, :1])
        v = torch.where(m, 5.0 * t[:, 1:], t[:, 1:])  # the mask broadcast to (1, 3)
        return torch.cat([u, v], 1)


def test_a_broadcast_undecided_mask_is_never_a_blind_branch() -> None:
    """An undecided mask must not reach one ``where`` broadcast (a blind branch there: False)
    while another ``where`` takes its union (which would mark it tracked): every gradient
    is undetermined or its ball holds the true value, dL/dw = (2 w_0, 50 w_1, 50 w_2, 50 w_3)."""
    model = Blind()
    x = torch.ones(1, 4, dtype=torch.float64)
    y = torch.zeros(1, 4, dtype=torch.float64)
    net = fpgrad.from_module(model, x, y, nn.MSELoss(reduction="sum"))
    ex = exact_graph(net.graph, bits=150, allow_uncertified=True, max_bits=600).result
    want = np.array([Q(4), Q(50), Q(75), Q(25)], dtype=object)
    oracle = np.array([CTX.mpf(int(q)) for q in want], dtype=object).reshape(1, 4)
    _claims(ex, "grads/w", oracle, CTX.mpf(0))


class PReLUMax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[-3.0, -0.7, 0.0, 0.3, 1.1, 2.5]], dtype=torch.float64))
        self.prelu = nn.PReLU(1, 0.3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.w * x
        return torch.maximum(self.prelu(t), 0.5 * t) + t.amax(-1, keepdim=True)


def test_emulated_fp8_prelu_maximum_by_hand() -> None:
    """fp8_e4m3 (3 fraction bits): PReLU (0.3 -> 0.3125) and its backward, maximum with a
    tie (the first operand kept), amax, each against round_to applied op by op."""
    fmt = "fp8_e4m3"
    rnd = lambda v: fpgrad.round_to(np.asarray(v, dtype=np.float64), fmt)  # noqa: E731
    model = PReLUMax()
    x = torch.ones(1, 6, dtype=torch.float64)
    net = fpgrad.from_module(model, x, torch.zeros(1, 6, dtype=torch.float64), nn.MSELoss())
    v = interpret(net.graph, EmulatedArith(fmt)).values
    seen = set()
    for node in net.graph.gm.graph.nodes:
        key = str(node.target)
        args = [v[a.name] if hasattr(a, "name") else a for a in node.args]
        if key == "aten._prelu_kernel.default":
            z, w = args
            assert float(np.ravel(w)[0]) == 0.3125
            want = np.where(z > 0, z, rnd(w * z))
        elif key == "aten._prelu_kernel_backward.default":
            g, z, w = args
            want_dx, want_dw = np.where(z > 0, g, rnd(w * g)), np.where(z > 0, 0.0, rnd(z * g))
            got_dx, got_dw = v[node.name]
            assert np.array_equal(got_dx, want_dx) and np.array_equal(got_dw, want_dw), key
            seen.add(key)
            continue
        elif key == "aten.maximum.default":
            a, b = args
            want = np.where(b > a, b, a)
            assert np.sum(a == b) >= 1  # z = 0: a tie
        elif key == "aten.amax.default":
            want = np.max(args[0], axis=-1, keepdims=True)
        else:
            continue
        seen.add(key)
        assert np.array_equal(np.asarray(v[node.name]), want), key
    assert len(seen) == 4, seen


class TiedFeatures(nn.Module):
    """tanh features with duplicated rows of weights: equal values at different positions,
    whose tanh balls are identical but never exact; max over the features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        w = torch.randn(2, 4)
        self.l = nn.Linear(4, 4)
        with torch.no_grad():
            self.l.weight.copy_(torch.cat([w, w]))
            self.l.bias.copy_(torch.tensor([0.1, -0.2, 0.1, -0.2]))
        self.o = nn.Linear(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.l(x)).amax(-1, keepdim=True))


def test_amax_ties_of_tanh_values_are_decided_on_tanh_inputs() -> None:
    """Rows 0 and 2 of the weights are equal: every maximum is a tie of two tanh values.
    tanh is strictly increasing, so the ties are decided on its (exact) inputs; torch shares
    the gradient between them, and so does the certified reference."""
    x, y = _data(3)
    model = TiedFeatures()
    net = fpgrad.from_module(model, x, y, nn.CrossEntropyLoss())
    cmp = fpgrad.compare(net, ["float64"])
    assert cmp.certified_digits >= 17
    ref = _eager(model, x, y, torch.float64)
    for name in net.param_names:
        assert np.array_equal(cmp.values("float64")[name], ref[name]), name
        e = cmp.column(name).exact
        np.testing.assert_allclose(e.hi, ref[name], rtol=1e-12, atol=1e-15)
    assert np.array_equal(ref["l.weight"][0], ref["l.weight"][2])  # shared by the tie


class ClampParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([[-2.0, -1.0, 0.5, 1.0, 3.0]], dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(self.w) * x + self.w.clamp(-1.0, 1.0) * x + torch.maximum(self.w, x)


def test_ties_of_exact_values_are_decided_by_the_fast_balls() -> None:
    """A parameter exactly at its bounds, or equal to the data (balls of radius 0 with the
    same words: one exact value): decided by the fast balls, no escalation to Arb."""
    model = ClampParam()
    x = torch.tensor([[1.5, 2.0, 0.5, 0.25, 3.0]], dtype=torch.float64)
    net = fpgrad.from_module(model, x, torch.zeros(1, 5, dtype=torch.float64), nn.MSELoss())
    ex = exact_graph(net.graph).result
    assert ex.method == "fast" and not ex.escalations, ex.escalations
    m = copy.deepcopy(model)
    nn.MSELoss()(m(x), torch.zeros(1, 5, dtype=torch.float64)).backward()
    mid, _ = ex.enclosure("grads/w")
    np.testing.assert_allclose(np.asarray(mid, dtype=float), m.w.grad.numpy(), rtol=1e-15)


def test_emulated_float32_is_torchs_float32_kernel_on_special_values() -> None:
    """Each op on float32 emulated (one correctly rounded operation at a time) against
    torch's float32 CPU kernel on NaN, infinities, signed zeros and every threshold, 64
    elements (torch's vectorised path, whose NaN branches this machine follows: 0 from
    hardtanh_backward, NaN from hardswish_backward; the scalar tail would give g)."""
    import types

    from fpgrad.graph.ops import select as S

    base = [np.nan, -np.inf, -4, -3, -2.9, -1, -0.5, -0.0, 0.0, 0.3, 1, 2.99, 3, 3.5, 6, 7, np.inf]
    vals = np.resize(np.array(base, dtype=np.float32), 64)
    grads = np.linspace(-2, 2, 64).astype(np.float32)
    x, g = vals.astype(np.float64), grads.astype(np.float64)
    tx, tg, flip = torch.tensor(vals), torch.tensor(grads), torch.tensor(vals[::-1].copy())
    cx = types.SimpleNamespace(ar=EmulatedArith("float32"))
    A = torch.ops.aten
    cases = {
        "hardtanh": (S.clamp_value(cx, x, -1.0, 1.0), A.hardtanh(tx, -1.0, 1.0)),
        "hardtanh_backward": (S.hardtanh_backward(cx, g, x, -1.0, 1.0),
                              A.hardtanh_backward(tg, tx, -1.0, 1.0)),
        "hardsigmoid": (S.hardsigmoid(cx, x), A.hardsigmoid(tx)),
        "hardsigmoid_backward": (S.hardsigmoid_backward(cx, g, x), A.hardsigmoid_backward(tg, tx)),
        "hardswish": (S.hardswish(cx, x), A.hardswish(tx)),
        "hardswish_backward": (S.hardswish_backward(cx, g, x), A.hardswish_backward(tg, tx)),
        "clamp": (S.clamp_value(cx, x, -1.0, 3.0), A.clamp(tx, -1.0, 3.0)),
        "clamp_inverted": (S.clamp_value(cx, x, 3.0, -1.0), A.clamp(tx, 3.0, -1.0)),
        "maximum": (S.maximum(cx, x, vals[::-1].astype(np.float64)), A.maximum(tx, flip)),
        "minimum": (S.minimum(cx, x, vals[::-1].astype(np.float64)), A.minimum(tx, flip)),
    }  # fmt: skip
    for name, (ours, theirs) in cases.items():
        o, t = np.asarray(ours, dtype=np.float64), theirs.double().numpy()
        nan = np.isnan(o) & np.isnan(t)  # a NaN's sign is not compared
        same = (o == t) & (np.signbit(o) == np.signbit(t))
        assert np.all(same | nan), (name, x[~(same | nan)], o[~(same | nan)], t[~(same | nan)])
