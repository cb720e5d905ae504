"""lerp, addcmul, addcdiv, atan2, logcumsumexp, cummax/cummin and pow(tensor, tensor)
(``fpgrad/graph/ops/blend.py``, ``cumulative.py``, ``trig.atan2``, ``pointwise.pow_tensor``):
native float32/float64 bit for bit with eager autograd; the exact reference against an mpmath
oracle written from the definitions; the emulated kernels against MPFR (atan2, pow) and
against torch's own float16/bfloat16/float32 kernels bit for bit (the fused blends); ties of
cummax/cummin where torch sends them; refusals in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gmpy2 import mpfr
from torch import nn

import fpgrad
from fpgrad.arith.emulated import EmulatedArith
from fpgrad.errors import InputError
from fpgrad.graph.exact import exact_graph
from fpgrad.numbers.formats import get_format
from fpgrad.numbers.rounding import Mode
from tests.oracle import graph_reference as R
from tests.oracle.native_exact import check
from tests.test_emulated import DIRECTED, all_values, as_float, assert_same, context, finish
from tests.test_graph_oracle import check as oracle_check

C = R.CTX


class _Blend(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        w = torch.sigmoid(b)
        out = torch.lerp(a, b, 0.3) + torch.lerp(a, b, 0.75) + torch.lerp(a, b, w)
        out = out + torch.addcmul(a, b, w, value=0.7) + torch.addcdiv(a, b, w + 1, value=-0.5)
        return out + a.clone().addcmul_(b, b) + torch.atan2(a, b + 2)


def _blend_oracle(p: dict, x: np.ndarray, t: np.ndarray) -> object:
    a = R.linear(x, p["a.weight"], p["a.bias"])
    b = R.linear(x, p["b.weight"], p["b.bias"])
    sig = np.frompyfunc(lambda v: 1 / (1 + C.exp(-v)), 1, 1)
    w = np.asarray(sig(b), dtype=object)
    c3, c75, c7, c5 = C.mpf(0.3), C.mpf(0.75), C.mpf(0.7), C.mpf(-0.5)  # the float64 numbers
    out = a + c3 * (b - a) + a + c75 * (b - a) + a + w * (b - a)
    out = out + a + c7 * b * w + a + c5 * b / (w + 1) + a + b * b
    at2 = np.frompyfunc(lambda u, v: C.atan2(u, v + 2), 2, 1)
    return R.mse(out + np.asarray(at2(a, b), dtype=object), t)


def test_blends_and_atan2_native_bit_for_bit_and_exact_against_mpmath() -> None:
    torch.manual_seed(0)
    model, x, y = _Blend(), torch.randn(5, 3), torch.randn(5, 4)
    check(model, x, y, nn.MSELoss(), digits=30)
    oracle_check(model.double(), x.double(), y.double(), nn.MSELoss(), _blend_oracle)
    fpgrad.compare(fpgrad.from_module(_Blend(), x, y, nn.MSELoss()), "bfloat16:emulated,float16")


class _Cum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        base = torch.sigmoid(h) + 0.5
        return (torch.logcumsumexp(h, 1) + torch.cummax(h, 1).values + torch.cummin(h, 0)[0]
                + base ** h)  # fmt: skip


def _cum_oracle(p: dict, x: np.ndarray, t: np.ndarray) -> object:
    h = R.linear(x, p["lin.weight"], p["lin.bias"])
    n, k = h.shape
    out = np.empty(h.shape, dtype=object)
    for i in range(n):
        for j in range(k):
            lse = C.log(C.fsum(C.exp(h[i, m]) for m in range(j + 1)))
            mx = max(h[i, m] for m in range(j + 1))
            mn = min(h[m, j] for m in range(i + 1))
            base = 1 / (1 + C.exp(-h[i, j])) + C.mpf(0.5)
            out[i, j] = lse + mx + mn + C.power(base, h[i, j])
    return R.mse(out, t)


def test_cumulative_and_pow_native_bit_for_bit_and_exact_against_mpmath() -> None:
    torch.manual_seed(1)
    model, x, y = _Cum(), torch.randn(4, 3), torch.randn(4, 6)
    check(model, x, y, nn.MSELoss(), digits=30)
    oracle_check(model.double(), x.double(), y.double(), nn.MSELoss(), _cum_oracle)
    fpgrad.compare(fpgrad.from_module(_Cum(), x, y, nn.MSELoss()), "bfloat16:emulated,float16")


class _Ties(nn.Module):
    """cummax/cummin of relu outputs: exact zeros tie (torch takes the latest index)."""

    def __init__(self, fn: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -1.0, 2.0, -3.0, 1.0, 0.5], dtype=torch.float64))
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.w * x) - torch.relu(-self.w * x) * (self.fn == "cummin")
        v = getattr(torch, self.fn)(h, 1).values
        return v * torch.arange(1.0, 7.0, dtype=x.dtype)


@pytest.mark.parametrize("fn", ["cummax", "cummin"])
def test_ties_go_where_torch_sends_them(fn: str) -> None:
    """Equal values (exact relu zeros, equal products): the gradient lands on torch's index in
    every column (native bit for bit; the exact run proves the ties)."""
    x = torch.tensor([[1.0, 1.0, 0.5, 1.0, 2.0, 2.0], [-1.0, 2.0, 1.0, 1.0, -1.0, 0.0]],
                     dtype=torch.float64)  # fmt: skip
    y = torch.zeros(2, 6, dtype=torch.float64)
    model = _Ties(fn)
    ex = check(model, x, y, nn.MSELoss(), digits=30)
    assert ex.undetermined_count == 0
    # the tie rule itself: torch's kernel takes the latest of equal elements
    idx = getattr(torch, fn)(torch.tensor([0.0, 0.0, 0.0]), 0).indices
    assert idx.tolist() == [0, 1, 2]


def test_atan2_emulated_against_mpfr_every_fp8_pair_and_edges() -> None:
    for name in ("fp8_e4m3", "fp8_e5m2"):
        fmt = get_format(name)
        v = all_values(fmt)
        y, x = np.repeat(v, v.size), np.tile(v, v.size)
        keep = slice(None, None, 7)  # a seventh of the 65,536 pairs per mode (time)
        y, x = y[keep], x[keep]
        for mode in DIRECTED:
            ctx = context(fmt, mode)
            want = finish([float("nan") if a != a or b != b else as_float(ctx.atan2(mpfr(a), mpfr(b)))
                           for a, b in zip(y.tolist(), x.tolist(), strict=True)], fmt, mode)  # fmt: skip
            assert_same(EmulatedArith(fmt, mode=mode).atan2(y, x), want, y, x)
    fmt = get_format("float16")
    z = [0.0, -0.0]
    y = np.array(z * 2 + [1.0, -1.0, np.inf, -np.inf, np.inf, 3.0, -3.0, 1e-7, 65504.0, np.nan])
    x = np.array([1.0, 1.0, -1.0, -1.0, 0.0, -0.0, np.inf, -np.inf, 2.0, np.inf, -np.inf, 65504.0,
                  1e-7, 1.0])  # fmt: skip
    for mode in DIRECTED:
        ctx = context(fmt, mode)
        want = finish([float("nan") if a != a or b != b else as_float(ctx.atan2(mpfr(a), mpfr(b)))
                       for a, b in zip(y.tolist(), x.tolist(), strict=True)], fmt, mode)  # fmt: skip
        assert_same(EmulatedArith(fmt, mode=mode).atan2(y, x), want, y, x)
    # the native kernel's signed zeros and +-pi, as the emulated float16 machine's
    got = EmulatedArith(fmt).atan2(y, x)
    ref = torch.atan2(torch.tensor(y, dtype=torch.float16), torch.tensor(x, dtype=torch.float16))
    assert_same(got, ref.double().numpy(), y, x)


def test_pow_tensor_emulated_against_mpfr() -> None:
    """Every positive e5m2 base against a set of exponents, in every mode; exact powers
    (4 ** 0.5, 2 ** 10) sit on rounding boundaries."""
    fmt = get_format("fp8_e5m2")
    v = all_values(fmt)
    base = v[(v > 0) & np.isfinite(v)]
    exps = np.array([0.5, -0.5, 1.5, 3.0, -2.0, 0.3, 10.0, -0.75])
    a, b = np.repeat(base, exps.size), np.tile(exps, base.size)
    for mode in DIRECTED:
        ctx = context(fmt, mode)
        want = finish([as_float(ctx.pow(mpfr(p), mpfr(q))) for p, q in zip(a.tolist(), b.tolist(),
                       strict=True)], fmt, mode)  # fmt: skip
        assert_same(EmulatedArith(fmt, mode=mode).pow_tensor(a, b), want, a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blend_kernels_equal_torch_bit_for_bit(dtype: torch.dtype) -> None:
    """The emulated lerp/addcmul/addcdiv (float32 machine: its own steps; float16/bfloat16:
    torch's float32 opmath, one final rounding) against torch's CPU kernels, on vectorised
    lengths and scalar tails, weights 0, 0.5, 1, a Tensor weight around 0.5."""
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    from fpgrad.graph.ops.blend import addcdiv, addcmul, lerp

    class Cx:
        ar = EmulatedArith(name)

    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 16, 33, 1000):
        a, b, c = (torch.randn(n, generator=g).to(dtype) * 3 for _ in range(3))
        w = (torch.rand(n, generator=g) * 1.2 - 0.1).to(dtype)
        w[: n // 3] = 0.5
        A, B, Cc, W = (t.double().numpy() for t in (a, b, c, w))
        cases = [(lerp(Cx, A, B, s), torch.lerp(a, b, s)) for s in (0.0, 0.5, 1.0, 0.3, 0.7, -0.2)]
        cases += [(lerp(Cx, A, B, W), torch.lerp(a, b, w)),
                  (addcmul(Cx, A, B, Cc, value=0.7), torch.addcmul(a, b, c, value=0.7)),
                  (addcmul(Cx, A, B, Cc), torch.addcmul(a, b, c)),
                  (addcdiv(Cx, A, B, Cc, value=-1.3), torch.addcdiv(a, b, c, value=-1.3))]  # fmt: skip
        for got, want in cases:
            ref = want.double().numpy()
            assert np.array_equal(got, ref) and np.array_equal(np.signbit(got), np.signbit(ref))
    # lerp is exactly a at w = 0 and exactly b at w = 1 (the kernel's two branches)
    A = np.array([1.0, -0.0, 3.5])
    B = np.array([7.25, 2.0, -1.0])
    assert np.array_equal(lerp(Cx, A, B, 1.0), B) and np.array_equal(
        lerp(Cx, A, B, 0.0), [1.0, 0.0, 3.5]
    )


def test_logcumsumexp_machine_edges_match_torch() -> None:
    """-inf entries, a row of -inf, huge spread and NaN: torch's helper, exact results."""
    x = np.array([[-np.inf, -np.inf, 0.0, -np.inf, 1e30],
                  [-1e30, 0.0, 1e30, -np.inf, np.inf],
                  [-np.inf] * 5,
                  [1.0, np.nan, 2.0, 3.0, 4.0]])  # fmt: skip
    from fpgrad.graph.ops.cumulative import logcumsumexp

    class Cx:
        ar = EmulatedArith("float32")

    got = logcumsumexp(Cx, x.astype(np.float32).astype(np.float64), 1)
    want = torch.logcumsumexp(torch.tensor(x, dtype=torch.float32), 1).double().numpy()
    assert np.array_equal(got, want, equal_nan=True)


class _Bad(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.kind == "pow":
            return torch.relu(h) ** h  # a base exactly 0 where h <= 0
        return torch.atan2(torch.relu(h) * 0.0, -1.0 - h * h)  # y exactly 0, x < 0


@pytest.mark.parametrize("kind", ["pow", "atan2"])
def test_refused_in_one_line(kind: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(4, 2), torch.randn(4, 3)
    net = fpgrad.from_module(_Bad(kind), x, y, nn.MSELoss())
    with pytest.raises(InputError) as err:
        exact_graph(net.graph)
    msg = str(err.value)
    assert "\n" not in msg and ("pow(tensor, tensor)" in msg if kind == "pow" else "atan2" in msg)


def test_pow_tensor_negative_base_integer_power_refused_on_machines() -> None:
    from fpgrad.graph.ops.trig import pow_tensor

    class Cx:
        ar = EmulatedArith("float16")

        @staticmethod
        def label() -> str:
            return "x (aten.pow.Tensor_Tensor)"

    assert np.isnan(pow_tensor(Cx, np.array([-2.0]), np.array([0.5])))[0]
    with pytest.raises(InputError, match="negative base"):
        pow_tensor(Cx, np.array([-2.0]), np.array([3.0]))
    assert Mode.NEAREST_EVEN in DIRECTED


class _Watched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        return torch.cummax(torch.relu(h), 1).values + torch.atan2(torch.relu(h), h * h + 1)


def test_watch_families_of_the_new_ops() -> None:
    """cummax copies input elements (its zeros, relu's, are inherited); atan2's zeros (y = 0,
    x > 0) are exact zeros of a pointwise op: never created; lerp is in no proven family."""
    from fpgrad.watching.families import family

    assert family(torch.ops.aten.lerp.Scalar) == "other"
    assert family(torch.ops.aten.cummax.default) == "exact"
    assert family(torch.ops.aten.atan2.default) == "pointwise"
    torch.manual_seed(0)
    model = _Watched()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    with fpgrad.watch(model, opt) as w:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    rows = [r for r in w.records() if r.get("op") == "aten.cummax.default"]
    assert rows and any(r["zeros"] for r in rows)
    for r in rows:
        assert (
            r["zeros_undecided"] == 0
            and r["zeros_created"] == 0
            and r["zeros_inherited"] == r["zeros"]
        )
    assert all(r["zeros_created"] == 0 for r in w.records() if r.get("op") == "aten.atan2.default")


class _OwnMax(nn.Module):
    """A model's own float64-maximum constant: rounded into the format (inf in float16), as
    torch's float16 run holds it; only a backward formula's fill stands for the dtype's max."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        c = torch.tensor(1.7976931348623157e308, dtype=x.dtype)
        return torch.where(h > 0, h, c) * 1e-4


def test_a_models_own_float64_max_is_rounded_into_the_format() -> None:
    """Was: float16:emulated loss 5.59 (the constant taken as 65504) where torch float16 gives
    inf (attack19's open item)."""
    from fpgrad.graph.interpret import interpret
    from fpgrad.graph.native import native_run
    from fpgrad.graph.precisions import emulated_systems

    torch.manual_seed(0)
    net = fpgrad.from_module(_OwnMax(), torch.randn(4, 3), torch.randn(4, 2), nn.MSELoss())
    native = float(native_run(net.graph, "float16").loss)
    emulated = float(interpret(net.graph, emulated_systems()("float16:emulated")).loss)
    assert native == emulated == float("inf")
