"""The smooth elementwise ops (fpgrad.graph.ops.smooth): softplus, logsigmoid, mish, celu, log1p,
expm1, erf, sin, cos, atan.

(1) native float32/float64 columns equal torch eager autograd bit for bit; (2) the certified
exact reference against independent oracles: the mpmath forward of tests.oracle.graph_reference
differentiated by central differences, and, at the corners (ties at softplus's threshold,
saturation, 1e-300, a ball that can never decide its branch), derivatives written by hand in
mpmath; (3) the strict machine (bfloat16:emulated) against fpgrad.round_to op by op, and its new
correctly rounded kernels against MPFR on every float16 and bfloat16 input.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import gmpy2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fpgrad
from fpgrad.arith.emulated import EmulatedArith
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.interpret import interpret
from fpgrad.graph.native import native_run
from fpgrad.numbers.rounding import Mode
from tests.oracle import graph_reference as R
from tests.oracle.graph_reference import CTX
from tests.test_emulated_gelu import FORMATS, MODES, _inputs
from tests.test_graph_oracle import Fn, _claims, check

_u = R._u  # elementwise mpmath at 120 digits


def _softplus(z: np.ndarray, beta: float = 1.0, threshold: float = 20.0) -> np.ndarray:
    b = CTX.mpf(beta)
    log = _u(lambda v: CTX.log(1 + CTX.exp(b * v)) / b)(z)
    return np.where(R.gt0(z * b - CTX.mpf(threshold)), z, log)


ORACLES: dict[str, tuple[Callable, Callable]] = {
    "softplus": (lambda x, w: F.softplus(w * x * 12), lambda x, w: _softplus(w * x * 12)),
    "softplus_beta_threshold": (
        lambda x, w: F.softplus(w * x * 3, beta=2.0, threshold=5.0),
        lambda x, w: _softplus(w * x * 3, 2.0, 5.0),
    ),
    "softplus_negative_beta": (
        lambda x, w: F.softplus(w * x * 3, beta=-1.5, threshold=-2.0),
        lambda x, w: _softplus(w * x * 3, -1.5, -2.0),
    ),
    "logsigmoid": (
        lambda x, w: F.logsigmoid(w * x * 9),
        lambda x, w: _u(lambda v: -CTX.log(1 + CTX.exp(-v)))(w * x * 9),
    ),
    "mish": (
        lambda x, w: F.mish(w * x * 4),
        lambda x, w: _u(lambda v: v * CTX.tanh(CTX.log(1 + CTX.exp(v))))(w * x * 4),
    ),
    "celu_half": (  # alpha 0.5: torch's backward scale 1 / float32(alpha) is 2 exactly
        lambda x, w: F.celu(w * x * 2, 0.5),
        lambda x, w: np.where(
            R.gt0(w * x), w * x * 2, _u(lambda v: (CTX.exp(2 * v) - 1) / 2)(w * x * 2)
        ),
    ),
    "log1p": (
        lambda x, w: torch.log1p(w * w * x * x) + torch.log1p(w * x * 1e-20),
        lambda x, w: _u(CTX.log1p)(w * w * x * x) + _u(CTX.log1p)(w * x * CTX.mpf(1e-20)),
    ),
    "expm1": (lambda x, w: torch.expm1(w * x * 2), lambda x, w: _u(CTX.expm1)(w * x * 2)),
    "erf": (lambda x, w: torch.erf(w * x * 2), lambda x, w: _u(CTX.erf)(w * x * 2)),
    "sin_cos": (
        lambda x, w: torch.sin(w * x * 3) * torch.cos(w - x),
        lambda x, w: _u(CTX.sin)(w * x * 3) * _u(CTX.cos)(w - x),
    ),
    "atan": (lambda x, w: torch.atan(w * x * 3), lambda x, w: _u(CTX.atan)(w * x * 3)),
}


@pytest.mark.parametrize("case", sorted(ORACLES))
def test_exact_reference_against_the_oracle(case: str) -> None:
    torch.manual_seed(5)
    tf, of = ORACLES[case]
    model = Fn(tf)
    x = torch.randn(3, 4)
    y = torch.randn(model(x).shape)
    check(model, x, y, nn.MSELoss(), lambda p, x, y: R.mse(of(x, p["w"]), y))


def _same(a: Any, b: Any) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.array_equal(a.view(np.int64), b.view(np.int64))


@pytest.mark.parametrize("case", sorted(ORACLES))
def test_native_columns_are_torch_eager_bit_for_bit(case: str) -> None:
    torch.manual_seed(6)
    model = Fn(ORACLES[case][0])
    x = torch.randn(3, 4)
    y = torch.randn(model(x).shape)
    net = fpgrad.from_module(model, x, y, nn.MSELoss())
    for dtype, name in ((torch.float32, "float32"), (torch.float64, "float64")):
        m = copy.deepcopy(model).to(dtype)
        loss = nn.MSELoss()(m(x.to(dtype)), y.to(dtype))
        loss.backward()
        run = native_run(net.graph, name)
        assert _same(run.loss, loss.detach().numpy()), name
        assert _same(run.grads["w"], m.w.grad.numpy()), name
    result = fpgrad.compare(net, "float32,bfloat16:emulated")
    assert result.counts("bfloat16:emulated")["nan"] == 0


# ---- corners, with derivatives by hand ----------------------------------------------------
class Dot(nn.Module):
    """``sum(t * f(w * x))``: d/dw = t f'(w x) x, one element per parameter."""

    def __init__(self, f: Callable, w: list[float]) -> None:
        super().__init__()
        self.f = f
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.w * x)


def _dot(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (out * t).sum()


def _corner(f: Callable, w: list[float], x: list[float], deriv: Callable, **kw: Any) -> Any:
    """The certified gradient of ``sum(t f(w x))`` against ``t f'(w x) x`` (mpmath, 120
    digits, ``deriv`` the hand-written f'); returns the exact result."""
    model = Dot(f, w)
    xt = torch.tensor(x, dtype=torch.float64)
    t = torch.linspace(0.5, 1.5, len(w), dtype=torch.float64)
    net = fpgrad.from_module(model, xt, t, _dot)
    ex = exact_graph(net.graph, **kw).result
    z = [CTX.mpf(a) * CTX.mpf(b) for a, b in zip(w, x, strict=True)]
    want = np.array(
        [CTX.mpf(float(ti)) * deriv(zi) * CTX.mpf(xi) for ti, zi, xi in zip(t, z, x, strict=True)],
        dtype=object,
    )
    _claims(ex, "grads/w", want, CTX.mpf(10) ** -100 * max(abs(v) for v in want))
    return ex


def _sig(v: Any) -> Any:
    return 1 / (1 + CTX.exp(-v))


def test_softplus_tie_at_the_threshold_takes_the_log_branch() -> None:
    """beta x == threshold exactly: torch's ``>`` is false, so the derivative is sigmoid(beta
    x), not 1 (they differ by 2e-9 at 20: certified digits tell them apart)."""
    ex = _corner(F.softplus, [20.0, 10.0, 10.0, 21.0], [1.0, 2.0, 2.0 + 2**-40, 1.0],
                 lambda v: _sig(v) if v <= 20 else CTX.mpf(1))  # fmt: skip
    assert ex.undetermined_count == 0 and ex.certified_digits >= 17
    beta = lambda x: F.softplus(x, beta=4.0, threshold=2.0)  # noqa: E731
    ex = _corner(beta, [0.5, 0.25, 0.75], [1.0, 2.0, 1.0],
                 lambda v: _sig(4 * v) if 4 * v <= 2 else CTX.mpf(1))  # fmt: skip
    assert ex.undetermined_count == 0


def test_softplus_branch_no_ball_decides_is_not_guessed() -> None:
    """``exp(log(w))`` equals 20 exactly, but no ball of it is exact: both branches stay
    possible at every precision up to the cap, so the ball holds both derivatives (1 and
    sigmoid(20), 2e-9 apart: ~8.4 digits certified, not 17) and the loss holds both values."""

    def f(z: torch.Tensor) -> torch.Tensor:
        return F.softplus(torch.exp(torch.log(z)))

    model = Dot(f, [20.0, 3.0])
    xt = torch.tensor([1.0, 1.0], dtype=torch.float64)
    t = torch.tensor([1.0, 1.0], dtype=torch.float64)
    net = fpgrad.from_module(model, xt, t, _dot)
    ex = exact_graph(net.graph, max_bits=400, allow_uncertified=True).result
    assert ex.method == "arb" and ex.bits == 400  # escalated to the cap
    digits = ex.digits["grads/w"]
    assert 8 < digits[0] < 9 and digits[1] > 100
    mid, rad = ex.enclosure("grads/w")
    for d in (_sig(CTX.mpf(20)), CTX.mpf(1)):  # either branch's derivative lies in the ball
        assert abs(CTX.mpf(mid[0]) - d) <= CTX.mpf(float(rad[0]))
    assert abs(CTX.mpf(mid[1]) - _sig(CTX.mpf(3))) <= CTX.mpf(float(rad[1]))
    lmid, lrad = (np.asarray(v, dtype=object).reshape(-1)[0] for v in ex.enclosure("loss"))
    for v in (CTX.mpf(20), CTX.log1p(CTX.exp(20))):
        assert abs(CTX.mpf(lmid) - v - CTX.log1p(CTX.exp(3))) <= CTX.mpf(float(lrad)) * (1 + 1e-9)


def test_saturation_keeps_relative_accuracy() -> None:
    """Tails of 1e-300 and below (exp(-700) ~ 2**-1010) are certified relative to themselves."""
    _corner(F.softplus, [-700.0, -40.0, 700.0, 15.0], [1.0] * 4, _sig)
    _corner(F.logsigmoid, [700.0, -700.0, 40.0, -40.0], [1.0] * 4, lambda v: _sig(-v))
    big = lambda z: F.softplus(z, threshold=1e6)  # noqa: E731  the log branch at 1000
    _corner(big, [1000.0, -1000.0, 1e5], [1.0] * 3, _sig)
    mish = lambda v: CTX.diff(lambda s: s * CTX.tanh(CTX.log1p(CTX.exp(s))), v)  # noqa: E731
    _corner(F.mish, [-700.0, -30.0, 30.0, 0.5], [1.0] * 4, mish)
    _corner(torch.erf, [30.0, -5.0, 1e-300, 0.25], [1.0] * 4,
            lambda v: 2 / CTX.sqrt(CTX.pi) * CTX.exp(-v * v))  # fmt: skip
    _corner(torch.expm1, [-800.0, 1e-300, -1e-20, 3.0], [1.0] * 4, CTX.exp)
    # torch's expm1 backward is grad (expm1(x) + 1): read as exp(x), no cancellation at -300
    ex = _corner(torch.expm1, [-300.0, -40.0, 0.5], [1.0] * 3, CTX.exp)
    assert ex.method == "fast" and min(ex.digits["grads/w"]) > 40


def test_tiny_arguments() -> None:
    """1e-300: derivatives of 1 (log1p, expm1, sin, atan), 1/2 (softplus, logsigmoid),
    tanh(log 2) (mish), 0 of cos is not a zero claim (cos' = -sin(1e-300))."""
    w = [1e-300, -1e-300, 2.0**-1074]
    one = [1.0, 1.0, 1.0]
    _corner(torch.log1p, w, one, lambda v: 1 / (1 + v))
    _corner(torch.expm1, w, one, CTX.exp)
    _corner(torch.sin, w, one, CTX.cos)
    ex = _corner(torch.cos, w, one, lambda v: -CTX.sin(v))
    assert not ex.zero("grads/w").any()
    _corner(torch.atan, w, one, lambda v: 1 / (1 + v * v))
    _corner(F.softplus, w, one, _sig)
    _corner(F.logsigmoid, w, one, lambda v: _sig(-v))


def test_celu_backward_uses_one_over_alpha() -> None:
    """torch's celu backward scales by ``1 / float32(0.7)`` (derivatives.yaml): torch float64
    is off by 1.7e-8 relative; the exact reference is the derivative exp(x / 0.7)."""
    ex = _corner(lambda z: F.celu(z, 0.7), [-1.0, -0.25, 2.0], [1.0, 1.0, 1.0],
                 lambda v: CTX.exp(v / CTX.mpf(0.7)) if v <= 0 else CTX.mpf(1))  # fmt: skip
    assert ex.certified_digits >= 17


# ---- the strict machine -------------------------------------------------------------------
def test_bfloat16_emulated_by_hand() -> None:
    """softplus(beta x) / beta and its backward in bfloat16:emulated against round_to op by
    op, with correctly rounded functions from mpmath."""
    from fpgrad.numbers.formats import get_format
    from fpgrad.numbers.rounding import round_exact

    fmt = get_format("bfloat16")

    def rnd(v: Any) -> float:
        return float(fpgrad.round_to(np.float64(v), "bfloat16"))

    def cr(fn: Callable, v: float) -> float:  # correctly rounded through 200-digit mpmath
        from fractions import Fraction

        with CTX.workdps(200):
            m = fn(CTX.mpf(v))
            man, exp = CTX.mpf(m).man_exp
        return round_exact(Fraction(int(man)) * Fraction(2) ** int(exp), fmt, Mode.NEAREST_EVEN)

    def f(z: torch.Tensor) -> torch.Tensor:
        return F.softplus(z, beta=3.0, threshold=4.0)

    w = [0.3, -2.7, 1.6, 7.1]
    model = Dot(f, w)
    x = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    t = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    net = fpgrad.from_module(model, x, t, _dot)
    tr = interpret(net.graph, EmulatedArith("bfloat16"))
    node = next(n.name for n in net.graph.ops if str(n.target) == "aten.softplus.default")
    got = np.asarray(tr.values[node], dtype=np.float64)
    want, grads = [], []
    for wi in w:
        xv = rnd(wi)
        tb = rnd(xv * 3.0)
        if tb > 4.0:
            want.append(xv)
            grads.append(1.0)
        else:
            want.append(rnd(cr(lambda v: CTX.log1p(CTX.exp(v)), tb) / 3.0))
            grads.append(cr(lambda v: 1 / (1 + CTX.exp(-v)), tb))
    assert _same(got, want)
    assert _same(tr.grads["w"], grads)


_MP_FNS: dict[str, Callable[[Any], tuple[Any, Any]]] = {
    # (base, tail): the value is base + tail, the tail relative-accurate at 300 bits
    "softplus": lambda m: (m, gmpy2.log1p(gmpy2.exp(-m))) if m > 0 else (0, gmpy2.log1p(gmpy2.exp(m))),
    "expm1": lambda m: (-1, gmpy2.exp(m)) if m < -1 else (0, gmpy2.expm1(m)),
    "erf": lambda m: ((1 if m > 0 else -1), -gmpy2.erfc(abs(m)) * (1 if m > 0 else -1))
    if abs(m) > 1 else (0, gmpy2.erf(m)),
    "sin": lambda m: (0, gmpy2.sin(m)),
    "cos": lambda m: (1, -2 * gmpy2.sin(m / 2) ** 2) if abs(m) < 1 else (0, gmpy2.cos(m)),
    "atan": lambda m: (0, gmpy2.atan(m)),
}  # fmt: skip
_MPFR: dict[tuple[str, str], tuple[list, list, list, list]] = {}
_SPECS = {**FORMATS, "float32": (24, -148, 128)}  # MPFR's IEEE single


def _mpfr(fn: str, fmt: str, x: np.ndarray, mode: Mode) -> np.ndarray:
    """MPFR's correctly rounded value in the format (asserted robust to 2**-280 relative)."""
    if (fn, fmt) not in _MPFR:
        wide = gmpy2.context(precision=300, emin=gmpy2.get_emin_min(), emax=gmpy2.get_emax_max())
        eps = None
        with gmpy2.context(wide):
            eps = gmpy2.mpfr(2) ** -280
            base, tail = [], []
            for v in x.tolist():
                b, t = _MP_FNS[fn](gmpy2.mpfr(v))
                if t == 0 and v != 0:
                    assert fn in ("softplus", "expm1", "erf")  # e^-65504: below MPFR's range
                    t = gmpy2.mpfr(2) ** -(10**6) * (1 if fn != "erf" or v < 0 else -1)
                if gmpy2.is_infinite(t):  # e^(8e33): beyond MPFR's range, finite and huge
                    assert fn == "expm1" and v > 0
                    t = gmpy2.mpfr(2) ** (10**6)
                base.append(gmpy2.mpfr(b))
                tail.append(t)
            _MPFR[fn, fmt] = (base, tail, [t * (1 - eps) for t in tail],
                              [t * (1 + eps) for t in tail])  # fmt: skip
    prec, emin, emax = _SPECS[fmt]
    low = gmpy2.context(precision=prec, emin=emin, emax=emax, subnormalize=True,
                        round=MODES[mode])  # fmt: skip
    base, tail, below, above = _MPFR[fn, fmt]
    with gmpy2.context(low):
        out = np.array([float(b + t) for b, t in zip(base, tail, strict=True)])
        lo = np.array([float(b + t) for b, t in zip(base, below, strict=True)])
        hi = np.array([float(b + t) for b, t in zip(base, above, strict=True)])
    exact = (x == 0) & (fn != "softplus")
    assert np.all(((lo == out) & (hi == out)) | exact)
    return out


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [("float16", Mode.NEAREST_EVEN), ("float16", Mode.UP), ("float16", Mode.DOWN),
     ("bfloat16", Mode.NEAREST_EVEN)],
)  # fmt: skip
def test_new_kernels_correctly_rounded_on_every_input(fmt: str, mode: Mode) -> None:
    x = _inputs(fmt)
    ar = EmulatedArith(fmt, mode=mode)
    for fn in _MP_FNS:
        got = getattr(ar, fn)(ar.asarray(x))
        want = _mpfr(fn, fmt, x, mode)
        bad = np.flatnonzero(~((got == want) | (np.isnan(got) & np.isnan(want))))
        assert bad.size == 0, (
            f"{fn} {fmt} {mode}: {x[bad[:5]]} -> {got[bad[:5]]}, MPFR {want[bad[:5]]}"
        )


def _float32_sample() -> np.ndarray:
    """4000 random float32 bit patterns (finite: up to 3e38, where sin's argument reduction
    matters) and 4000 uniform values in [-40, 40]."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    with np.errstate(invalid="ignore"):
        x = bits.view(np.float32).astype(np.float64)
    dense = rng.uniform(-40, 40, 4000).astype(np.float32).astype(np.float64)
    return np.concatenate([x[np.isfinite(x)], dense])


@pytest.mark.parametrize("mode", [Mode.NEAREST_EVEN, Mode.DOWN])
def test_new_kernels_correctly_rounded_on_float32_samples(mode: Mode) -> None:
    """float32 (24 bits: the libm error bound 2**-40 is tighter there) on a sample."""
    x = _float32_sample()
    ar = EmulatedArith("float32", mode=mode)
    for fn in _MP_FNS:
        got = getattr(ar, fn)(ar.asarray(x))
        want = _mpfr(fn, "float32", x, mode)
        bad = np.flatnonzero(~((got == want) | (np.isnan(got) & np.isnan(want))))
        assert bad.size == 0, f"{fn} float32 {mode}: {x[bad[:5]]} -> {got[bad[:5]]}"


@pytest.mark.parametrize(
    ("f", "z", "value"),
    [
        (F.softplus, -700.0, lambda v: CTX.log1p(CTX.exp(v))),
        (F.logsigmoid, 700.0, lambda v: -CTX.log1p(CTX.exp(-v))),
        (F.mish, -700.0, lambda v: v * CTX.tanh(CTX.log1p(CTX.exp(v)))),
        (torch.erf, 1e-300, CTX.erf),
        (torch.expm1, -1e-300, CTX.expm1),
        (torch.log1p, 1e-300, CTX.log1p),
        (torch.sin, 1e-300, CTX.sin),
        (torch.atan, -1e-300, CTX.atan),
        (lambda x: F.celu(x, 0.7), -1e-300, lambda v: CTX.mpf(0.7) * CTX.expm1(v / CTX.mpf(0.7))),
    ],
)
def test_tiny_forward_values_are_certified_relative_to_themselves(
    f: Callable, z: float, value: Callable
) -> None:
    """One element: the loss is f(z) itself (tiny), every certified digit right."""
    model = Dot(f, [z])
    net = fpgrad.from_module(model, torch.ones(1, dtype=torch.float64),
                             torch.ones(1, dtype=torch.float64), _dot)  # fmt: skip
    ex = exact_graph(net.graph).result
    want = value(CTX.mpf(z))
    _claims(ex, "loss", np.array(want, dtype=object).reshape(()), abs(want) * CTX.mpf(10) ** -100)
    assert ex.digits["loss"] >= 17


@pytest.mark.parametrize("bits", [100, 150])
def test_ball_expm1_encloses_at_both_ends_of_every_ball(bits: int) -> None:
    """BallArith.expm1 (Taylor below 2**-4, exp - 1 above) against mpmath at 600 bits: e^x - 1
    is increasing, so a ball holding its values at both ends of the input ball holds all."""
    from fpgrad.arith import expansion as xp
    from fpgrad.arith.ball import BallArith
    from fpgrad.arith.ball_base import Ball

    ba = BallArith(bits)
    rng = np.random.default_rng(bits)
    edges = [0.0, 2.0**-790, -(2.0**-700), 2.0**-10, 0.0625, -0.0625, 0.0625 * (1 + 2**-52),
             1.0, -30.0, 20.0]  # fmt: skip
    xs = np.concatenate([edges, rng.uniform(-0.07, 0.07, 300), rng.uniform(-3, 3, 100),
                         np.ldexp(rng.uniform(-1, 1, 100), rng.integers(-790, -5, 100))])  # fmt: skip
    ctx = CTX.clone()
    ctx.prec = 600
    for rad in (0.0, 2.0**-1000, 2.0**-200, 2.0**-60, 2.0**-8):
        out = ba.expm1(Ball(xp.from_float(xs, ba.k), np.full(xs.shape, rad)))
        assert ba.range_errors == 0
        for i, x in enumerate(xs.tolist()):
            m = sum(ctx.mpf(float(w)) for w in out.mid[:, i])
            r = ctx.mpf(float(out.rad[i]))
            for end in (ctx.mpf(x) - rad, ctx.mpf(x) + rad):
                assert abs(ctx.expm1(end) - m) <= r, (x, rad)
            if rad == 0:  # relative accuracy of the eta the reference assumes
                assert r <= abs(m) * (2.0**-80 if ba.k == 2 else 2.0**-130)
