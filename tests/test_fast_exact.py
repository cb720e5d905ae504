"""The fast exact reference (multi-word balls) against mpmath and exact rationals.

Every error bound the ball arithmetic relies on is checked here with a margin: the
multi-word kernels (ETA), the elementary functions (eta_fn), the error-free slice products
(exact against Fractions), and whole networks (the exact value lies in every ball). The
compiled kernels (fpgrad.arith.jit_*) that BallArith runs are checked to give the numpy
kernels' words bit for bit, so the bounds measured on those carry over.
"""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpgrad.arith import elementary as el
from fpgrad.arith import expansion as xp
from fpgrad.arith import jit_ball, ozaki
from fpgrad.arith.ball import HI_BOUND, RU, Ball, BallArith
from fpgrad.arith.mp import MPArith
from fpgrad.diagnose.verdicts import ExactArray
from fpgrad.errors import InputError
from fpgrad.graph.layers import evaluate, exact_trace
from tests.nets import net_from

CTX = mpmath.MPContext()
CTX.prec = 700
MARGIN = 2.0**-3  # measured errors must stay 8x below the bounds the radii use


def mp_of(words: np.ndarray) -> np.ndarray:
    return xp.to_mpf(np.asarray(words, dtype=np.float64), CTX)


def random_words(
    rng: np.random.Generator, n: int, k: int, lo: int = -60, hi: int = 60
) -> np.ndarray:
    """k-word values with magnitudes 2**lo .. 2**hi and random signs."""
    head = (
        rng.uniform(1, 2, n) * np.ldexp(1.0, rng.integers(lo, hi + 1, n)) * rng.choice([-1, 1], n)
    )
    terms = [head] + [head * rng.normal(size=n) * 2.0 ** (-53 * i) for i in range(1, k)]
    return xp.renorm(terms, k)


def rel_errors(got: np.ndarray, want: np.ndarray, scale: np.ndarray | None = None) -> list[float]:
    out = []
    for i, (g, w) in enumerate(zip(mp_of(got).ravel(), want.ravel(), strict=True)):
        s = abs(w) if scale is None else scale.ravel()[i]
        out.append(float(abs(g - w) / s) if s else float(abs(g)))
    return out


# ---- multi-word kernels ------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_kernels_within_eta(k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 64
    a = random_words(rng, n, k)
    b = random_words(rng, n, k)
    b[:, : n // 4] = -a[:, : n // 4] * (1 + rng.normal(size=n // 4) * 2.0**-40)  # cancellation
    b = xp.renorm(list(b), k)
    A, B = mp_of(a), mp_of(b)
    eta = xp.ETA[k] * MARGIN
    mags = np.array([abs(x) + abs(y) for x, y in zip(A, B, strict=True)], dtype=object)
    assert max(rel_errors(xp.add(a, b, k), A + B, mags)) <= eta
    assert max(rel_errors(xp.sub(a, b, k), A - B, mags)) <= eta
    assert max(rel_errors(xp.mul(a, b, k), A * B)) <= eta
    assert max(rel_errors(xp.div(a, b, k), A / B)) <= eta
    pos = np.where(a[0] < 0, -a, a)
    assert max(rel_errors(xp.sqrt(pos, k), np.array([CTX.sqrt(v) for v in mp_of(pos)]))) <= eta
    # one operand a float64 (weights, constants)
    assert max(rel_errors(xp.mul(a, b[:1], k), A * mp_of(b[:1]))) <= eta


def test_hi_lo_is_the_interchange_pair() -> None:
    rng = np.random.default_rng(1)
    a = random_words(rng, 200, 3)
    hi, lo = xp.hi_lo(a)
    for h, l_, v in zip(hi, lo, mp_of(a), strict=True):
        assert h == float(v)  # nearest float64
        assert abs(l_ - float(v - h)) <= abs(float(v - h)) * 2.0**-50


# ---- elementary functions ----------------------------------------------------------------


def _points(rng: np.random.Generator) -> np.ndarray:
    saturating = np.concatenate([rng.uniform(20, 800, 40), [20.0, 36.5, 100.0, 349.0, 800.0]])
    tiny = np.ldexp(rng.uniform(1, 2, 30), rng.integers(-700, -20, 30))
    moderate = np.concatenate(
        [rng.normal(size=60) * 3, np.ldexp(rng.uniform(1, 2, 40), rng.integers(-13, -4, 40))]
    )
    near_table = np.array(
        [j / 1024 for j in range(-5, 6)] + [1e-300, 2.0**-21, -(2.0**-21), 0.3466, 0.35]
    )
    x = np.concatenate([saturating, -saturating, tiny, -tiny, moderate, near_table])
    return xp.renorm(
        [x, x * rng.normal(size=x.size) * 2.0**-54, x * rng.normal(size=x.size) * 2.0**-108], 3
    )


@pytest.mark.parametrize("bits", [100, 150])
def test_elementary_functions_against_mpmath(bits: int) -> None:
    ar = BallArith(bits)
    k = ar.k
    z = _points(np.random.default_rng(7))[:k]
    Z = mp_of(z)
    eta = ar.eta_fn * MARGIN
    ball = Ball(z, np.zeros(z.shape[1:]))

    t = ar.tanh(ball)
    assert max(rel_errors(t.mid, np.array([CTX.tanh(v) for v in Z]))) <= eta
    ok = np.abs(z[0]) <= 270  # beyond, sech^2 < 2**-800 leaves the guarded range: flagged
    d = BallArith(bits).tanh_deriv(Ball(z[:, ok], np.zeros(ok.sum())), None)  # type: ignore[arg-type]
    assert max(rel_errors(d.mid, np.array([CTX.sech(v) ** 2 for v in Z[ok]]))) <= eta

    s = ar.sigmoid(ball)
    want = np.array([1 / (1 + CTX.exp(-v)) for v in Z])
    inside = z[0] >= -540  # below, sigmoid < 2**-800 leaves the guarded range: flagged
    assert max(rel_errors(s.mid[:, inside], want[inside])) <= eta

    small = np.abs(z[0]) <= 300
    e = BallArith(bits).exp(Ball(z[:, small], np.zeros(small.sum())))
    assert max(rel_errors(e.mid, np.array([CTX.exp(v) for v in Z[small]]))) <= eta

    pos = np.where(z[0] < 0, -z, z)
    lg = BallArith(bits).log(Ball(pos, np.zeros(pos.shape[1:])))
    want_log = np.array([CTX.log(v) for v in mp_of(pos)])
    scale = np.array([abs(v) + 1 for v in want_log], dtype=object)  # log's bound is absolute near 1
    assert max(rel_errors(lg.mid, want_log, scale)) <= eta


def test_saturation_never_rounds_to_zero_and_range_is_flagged() -> None:
    ar = BallArith(150)
    z = np.array([20.0, 40.0, 200.0, 270.0])
    d = ar.tanh_deriv(ar.asarray(z), None)  # type: ignore[arg-type]
    assert np.all(d.mid[0] > 0)
    assert ar.range_errors == 0
    s = ar.sigmoid(ar.asarray(-z))
    assert np.all(s.mid[0] > 0)
    ar.sigmoid(ar.asarray(np.array([-800.0])))  # e^-800 is below float64: flagged, not zero
    assert ar.range_errors > 0
    ar2 = BallArith(150)
    ar2.tanh_deriv(ar2.asarray(np.array([800.0])), None)  # type: ignore[arg-type]
    assert ar2.range_errors > 0


# ---- error-free matrix products -------------------------------------------------------------


def _fraction_product(a: np.ndarray, b: np.ndarray) -> list[list[Fraction]]:
    fa = [
        [sum(Fraction(float(w)) for w in a[:, i, j]) for j in range(a.shape[2])]
        for i in range(a.shape[1])
    ]
    fb = [
        [sum(Fraction(float(w)) for w in b[:, i, j]) for j in range(b.shape[2])]
        for i in range(b.shape[1])
    ]
    return [
        [sum(fa[i][q] * fb[q][j] for q in range(len(fb))) for j in range(len(fb[0]))]
        for i in range(len(fa))
    ]


def _fraction_sum(mats: list[np.ndarray]) -> list[list[Fraction]]:
    m, p = mats[0].shape
    return [[sum(Fraction(float(c[i, j])) for c in mats) for j in range(p)] for i in range(m)]


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["integers", "wide", "multiword", "cancel"]),
    shape=st.tuples(st.integers(1, 6), st.integers(1, 40), st.integers(1, 5)),
)
def test_exact_products_equal_fractions(seed: int, kind: str, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(seed)
    m, n, p = shape
    if kind == "integers":
        a = rng.integers(-(2**52), 2**52, (1, m, n)).astype(np.float64)
        b = rng.integers(-(2**52), 2**52, (1, n, p)).astype(np.float64)
    elif kind == "wide":  # values spanning 2**-60 .. 2**60 inside one row
        a = (rng.normal(size=(m, n)) * np.ldexp(1.0, rng.integers(-60, 61, (m, n))))[None]
        b = (rng.normal(size=(n, p)) * np.ldexp(1.0, rng.integers(-60, 61, (n, p))))[None]
    elif kind == "multiword":
        a = random_words(rng, m * n, 3).reshape(3, m, n)
        b = random_words(rng, n * p, 2).reshape(2, n, p)
    else:  # rows that cancel exactly or nearly
        a = rng.normal(size=(1, m, n))
        b = rng.normal(size=(1, n, p))
        if n > 1:
            a[0, :, -1] = -a[0, :, 0] * b[0, 0, 0] / b[0, -1, 0]
    got = _fraction_sum(ozaki.exact_products(a, b))
    assert got == _fraction_product(a, b)


@settings(max_examples=16, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    prec=st.sampled_from([60, 100, 108, 130]),
    kb=st.sampled_from([1, 3]),
    transposed=st.booleans(),
)
def test_truncated_products_stay_within_their_bound(
    seed: int, prec: int, kb: int, transposed: bool
) -> None:
    rng = np.random.default_rng(seed)
    a = random_words(rng, 4 * 30, 3, -20, 20).reshape(3, 4, 30)
    a[:, 1] = 0.0  # a zero row
    if kb == 1:
        b = (rng.normal(size=(30, 3)) * np.ldexp(1.0, rng.integers(-20, 21, (30, 3))))[None]
    else:
        b = random_words(rng, 30 * 3, 3, -20, 20).reshape(3, 30, 3)
    if transposed:  # views as BallArith passes them (x.T of a C-contiguous array)
        a = np.ascontiguousarray(a.transpose(0, 2, 1)).transpose(0, 2, 1)
        b = np.ascontiguousarray(b.transpose(0, 2, 1)).transpose(0, 2, 1)
    terms, bound, risk = ozaki.matmul_levels(a, b, prec)
    assert not risk
    assert len(terms) <= ozaki.exact_levels(30, prec, 3, kb)[0] + 1
    exact = _fraction_product(a, b)
    approx = _fraction_sum(list(terms))
    for i in range(4):
        for j in range(3):
            assert abs(exact[i][j] - approx[i][j]) <= Fraction(float(bound[i, j]))
    assert not bound[1].any() and all(approx[1][j] == 0 for j in range(3))


def test_tail_keeps_the_precision_the_truncation_had() -> None:
    # 150-bit level: the bound stays below 2**-132 n max|a| max|b| with 5 exact levels
    for n in (10, 64, 128, 256, 1024):
        levels, bits = ozaki.exact_levels(n, 130, 3, 3)
        assert ozaki.tail_factor(n, levels, bits, 3, 3) <= 2.0**-132
        assert levels <= 6


# ---- compiled kernels: the numpy kernels' words, bit for bit --------------------------------


def _ball_pair(rng: np.random.Generator, k: int, n: int) -> tuple[Ball, Ball]:
    a = random_words(rng, n, k)
    b = random_words(rng, n, k)
    b[:, : n // 4] = -a[:, : n // 4] * (1 + rng.normal(size=n // 4) * 2.0**-40)
    b = xp.renorm(list(b), k)
    ra = np.abs(a[0]) * rng.uniform(0, 2.0**-120, n)
    rb = np.abs(b[0]) * rng.uniform(0, 2.0**-120, n)
    ra[::7] = 0.0
    return Ball(a, ra), Ball(b, rb)


@pytest.mark.parametrize("bits", [100, 150])
def test_compiled_arithmetic_matches_numpy_bit_for_bit(bits: int) -> None:
    ar = BallArith(bits)
    k, eta = ar.k, ar.eta
    a, b = _ball_pair(np.random.default_rng(bits), k, 200)
    a0, b0 = np.abs(a.mid[0]), np.abs(b.mid[0])
    for op, ref in ((ar.add, xp.add), (ar.sub, xp.sub), (ar.mul, xp.mul), (ar.div, xp.div)):
        got = op(a, b)
        assert np.array_equal(got.mid, ref(a.mid, b.mid, k)), op.__name__
    # the radii are BallArith's formulas, evaluated in the same order
    rad = (a.rad + b.rad + eta * (a0 + b0)) * RU
    assert np.array_equal(ar.add(a, b).rad, rad)
    m = ar.mul(a, b)
    rad = ((a0 * b.rad + b0 * a.rad) * HI_BOUND + a.rad * b.rad + eta * np.abs(m.mid[0])) * RU
    assert np.array_equal(m.rad, rad)
    q = ar.div(a, b)
    q0 = np.abs(q.mid[0])
    prop = (a.rad + q0 * HI_BOUND * b.rad) / (b0 / HI_BOUND - b.rad)
    prop = np.where((a.rad == 0) & (b.rad == 0), 0.0, prop)
    assert np.array_equal(q.rad, (prop * RU + eta * q0) * RU)
    assert ar.range_errors == 0
    # broadcasting as the network code uses it: a bias row, a column, a scalar, a 1-D array
    x = Ball(a.mid.reshape(k, 20, 10), a.rad.reshape(20, 10))
    column = Ball(b.mid[:, :20].reshape(k, 20, 1), b.rad[:20].reshape(20, 1))
    for y in (b[:10][None, :], column, b[0], b[:10]):
        got = ar.mul(x, y)
        ym = y.mid.reshape(k, *(1,) * (2 - y.ndim), *y.shape)
        assert np.array_equal(got.mid, xp.mul(x.mid, np.broadcast_to(ym, x.mid.shape), k))
    x3 = Ball(a.mid.reshape(k, 2, 10, 10), a.rad.reshape(2, 10, 10))  # more than two axes
    got = ar.add(x3, x[:10])
    assert np.array_equal(
        got.mid, xp.add(x3.mid, np.broadcast_to(x[:10].mid[:, None], x3.mid.shape), k)
    )


@pytest.mark.parametrize("k", [2, 3])
def test_compiled_sums_and_renormalisation_match_numpy(k: int) -> None:
    rng = np.random.default_rng(k)
    ar = BallArith(100 if k == 2 else 150)
    for n in (1, 2, 7, 64, 129):
        w = random_words(rng, 3 * n, k).reshape(k, 3, n)
        want = w
        while want.shape[-1] > 1:  # the pairwise tree of the numpy implementation
            m, h = want.shape[-1], want.shape[-1] // 2
            s = xp.add(list(want[..., :h]), list(want[..., h : 2 * h]), k)
            want = np.concatenate([s, want[..., 2 * h :]], axis=-1) if m % 2 else s
        assert np.array_equal(ar.sum(Ball(w, np.zeros((3, n))), axis=1).mid, want[..., 0])
    for count in range(1, 8):
        terms = [rng.normal(size=50) * 2.0 ** (-20 * t) for t in range(count)]
        out = np.empty((k, 50))
        assert jit_ball.renorm(xp_tag(k), np.array(terms), out) == 0
        assert np.array_equal(out, xp.renorm(terms, k))


def xp_tag(k: int) -> tuple[float, ...]:
    return (0.0,) * k


@pytest.mark.parametrize("bits", [100, 150])
def test_compiled_elementary_functions_match_numpy_bit_for_bit(bits: int) -> None:
    ar = BallArith(bits)
    k = ar.k
    z = _points(np.random.default_rng(9))[:k]
    ball = Ball(z, np.zeros(z.shape[1:]))
    t, e, r = el.tanh_parts(z, k, bits)
    assert np.array_equal(ar.tanh(ball).mid, t)
    assert np.array_equal(ar.tanh_deriv(ball, None).mid, el.sech2(e, r, k))  # type: ignore[arg-type]
    s, e, r = el.sigmoid_parts(z, k, bits)
    assert np.array_equal(ar.sigmoid(ball).mid, s)
    assert np.array_equal(ar.sigmoid_deriv(ball, None).mid, xp.mul(e, xp.mul(r, r, k), k))  # type: ignore[arg-type]
    inside = np.abs(z[0]) <= el.EXP_DOMAIN
    assert np.array_equal(
        ar.exp(Ball(z[:, inside], ball.rad[inside])).mid, el.exp(z[:, inside], k, bits)
    )


@pytest.mark.parametrize("fn", ["tanh", "tanh_deriv", "sigmoid", "sigmoid_deriv", "exp"])
def test_compiled_radii_enclose_the_function_on_the_ball(fn: str) -> None:
    rng = np.random.default_rng(17)
    x = np.concatenate(
        [rng.normal(size=30) * 3, np.ldexp(rng.uniform(1, 2, 10), rng.integers(-40, -9, 10)), [0.0]]
    )
    x = np.concatenate([x, -x[:10]])
    n = x.size
    # radii: none, relative 2**-100, and large ones (the one-by-one libm path)
    r = np.concatenate([np.zeros(n), np.abs(x) * 2.0**-100, np.full(n, 2.0**-9), np.full(n, 0.3)])
    z = np.tile(x, 4)
    ar = BallArith(150)
    ball = Ball(xp.from_float(z, 3), r)
    f = {
        "tanh": CTX.tanh,
        "tanh_deriv": lambda v: CTX.sech(v) ** 2,
        "sigmoid": lambda v: 1 / (1 + CTX.exp(-v)),
        "sigmoid_deriv": lambda v: CTX.exp(-v) / (1 + CTX.exp(-v)) ** 2,
        "exp": CTX.exp,
    }[fn]
    out = getattr(ar, fn)(ball, None) if fn.endswith("deriv") else getattr(ar, fn)(ball)
    assert ar.range_errors == 0
    mids = mp_of(out.mid)
    for zi, ri, mi, rad in zip(z, r, mids, out.rad, strict=True):
        for frac in (-1, -0.5, 0, 0.5, 1):
            v = CTX.mpf(float(zi)) + CTX.mpf(float(ri)) * frac
            assert abs(f(v) - mi) <= CTX.mpf(float(rad)), (fn, zi, ri, frac)


# ---- whole networks: the exact value lies in every ball ---------------------------------------


def _random_net(rng: np.random.Generator, act: str, loss: str, spread: int, cancel: bool):  # noqa: ANN202
    def arr(*shape: int) -> np.ndarray:
        return rng.normal(size=shape) * np.ldexp(1.0, rng.integers(-spread, spread + 1, shape))

    b, i, h, o = 4, 3, 5, 3
    x = arr(b, i)
    if cancel:  # duplicate inputs with opposite signs: exact cancellations in the first layer
        x[:, -1] = -x[:, 0]
    w0 = arr(h, i)
    if cancel:
        w0[:, -1] = w0[:, 0]
    layers = [
        {"type": "dense", "weight": w0.tolist(), "bias": arr(h).tolist()},
        {"type": act},
        {"type": "dense", "weight": (rng.normal(size=(o, h))).tolist(), "bias": [0.0] * o},
    ]
    if loss == "cross_entropy":
        y = rng.integers(0, o, b).tolist()
    elif loss == "bce":
        y = rng.integers(0, 2, (b, o)).astype(float).tolist()
    else:
        y = arr(b, o).tolist()
    return net_from(layers, loss, x.tolist(), y)


def _check_balls(net, bits: int) -> None:  # noqa: ANN001
    ar = BallArith(bits)
    balls = evaluate(net, ar)
    if ar.range_errors or ar.uncertain_branches:
        return  # the fast path declines such runs (exact_trace falls back to mpmath)
    ref = evaluate(net, MPArith(600))
    pairs = [(balls.loss, ref.loss)]
    for section in ("forward", "backward", "grads"):
        pairs += [
            (getattr(balls, section)[k], getattr(ref, section)[k]) for k in getattr(ref, section)
        ]
    for ball, want in pairs:
        mids = mp_of(ball.mid).ravel()
        rads = np.asarray(ball.rad).ravel()
        for m_, r_, w_ in zip(mids, rads, np.asarray(want, dtype=object).ravel(), strict=True):
            assert abs(m_ - w_) <= CTX.mpf(float(r_)) + abs(w_) * CTX.mpf(2) ** -590


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    act=st.sampled_from(["tanh", "sigmoid", "relu", "leaky_relu", "softmax"]),
    loss=st.sampled_from(["mse", "cross_entropy", "bce"]),
    spread=st.sampled_from([0, 20, 60]),
    cancel=st.booleans(),
)
def test_exact_value_lies_in_every_ball(
    seed: int, act: str, loss: str, spread: int, cancel: bool
) -> None:
    net = _random_net(np.random.default_rng(seed), act, loss, spread, cancel)
    _check_balls(net, 150)


def test_batch_norm_and_dk_levels() -> None:
    rng = np.random.default_rng(3)
    net = net_from(
        [
            {
                "type": "dense",
                "weight": rng.normal(size=(4, 3)).tolist(),
                "bias": [0.5, -1.0, 0.0, 2.0],
            },
            {"type": "batch_norm", "weight": [1.0, 2.0, 0.5, 1.0], "bias": [0.0, 0.1, 0.0, -0.2]},
            {"type": "tanh"},
            {"type": "dense", "weight": rng.normal(size=(2, 4)).tolist(), "bias": [0.0, 0.0]},
        ],
        "cross_entropy",
        rng.normal(size=(6, 3)).tolist(),
        [0, 1, 1, 0, 1, 0],
    )
    for bits in (100, 150):
        _check_balls(net, bits)


# ---- exact_trace integration -------------------------------------------------------------------


def _small_tanh_net(seed: int = 0):  # noqa: ANN202
    rng = np.random.default_rng(seed)
    return net_from(
        [
            {
                "type": "dense",
                "weight": rng.normal(size=(6, 4)).tolist(),
                "bias": rng.normal(size=6).tolist(),
            },
            {"type": "tanh"},
            {"type": "dense", "weight": rng.normal(size=(3, 6)).tolist(), "bias": [0.0] * 3},
        ],
        "mse",
        rng.normal(size=(5, 4)).tolist(),
        rng.normal(size=(5, 3)).tolist(),
    )


def test_fast_and_arb_agree_to_the_certified_digits() -> None:
    net = _small_tanh_net()
    fast = exact_trace(net, 150, method="fast")
    slow = exact_trace(net, 256, method="arb")
    assert fast.method == "fast" and slow.method == "arb"
    assert fast.certified_digits >= 30
    for key in fast.keys():
        f = np.asarray(
            fast.trace.grads[key.split("/", 1)[1]] if key.startswith("grads/") else 0, dtype=object
        )
        if not key.startswith("grads/"):
            continue
        s = np.asarray(slow.trace.grads[key.split("/", 1)[1]], dtype=object)
        for a, b, d in zip(f.ravel(), s.ravel(), fast.digits[key].ravel(), strict=True):
            if b != 0:
                assert float(abs(a - b) / abs(b)) <= 10.0 ** -(d - 0.5)
        ex = fast.exact_array(key)
        ref = ExactArray.from_mp(s)
        assert np.array_equal(ex.hi, ref.hi)
        assert np.allclose(ex.lo, ref.lo, rtol=2.0**-40, atol=0)


def test_auto_method_choice_and_fallback() -> None:
    net = _small_tanh_net()
    assert exact_trace(net).method == "fast"
    assert exact_trace(net, 256).method == "arb"  # beyond what the fast path carries
    with pytest.raises(InputError):
        exact_trace(net, 256, method="fast")
    far = net_from(  # sigmoid(-900): below float64, the fast path declines
        [{"type": "dense", "weight": [[900.0]], "bias": [0.0]}, {"type": "sigmoid"}],
        "mse",
        [[-1.0], [1.0]],
        [[0.0], [1.0]],
    )
    assert exact_trace(far, 128, allow_uncertified=True).method == "arb"
    with pytest.raises(InputError):
        exact_trace(far, 128, method="fast")
    with pytest.raises(InputError):
        exact_trace(net, 128, method="nope")


def test_exact_cancellation_gives_exact_zeros_not_noise() -> None:
    # hidden unit 0 sees x - x: its pre-activation is exactly 0 for every input, in both systems
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 1)) * np.ldexp(1.0, rng.integers(-60, 4, (4, 1)))
    net = net_from(
        [
            {
                "type": "dense",
                "weight": [[3.0, 3.0], [1.0, -0.5], [0.25, 2.0]],
                "bias": [0.0, 0.1, -0.2],
            },
            {"type": "tanh"},
            {"type": "dense", "weight": rng.normal(size=(1, 3)).tolist(), "bias": [0.0]},
        ],
        "mse",
        np.hstack([x, -x]).tolist(),
        rng.normal(size=(4, 1)).tolist(),
    )
    # the fast balls bound the cancelled sum but cannot prove it 0: undetermined, never zero
    fast = exact_trace(net, 150, method="fast")
    assert np.all(fast.undetermined("forward/dense0")[:, 0])
    assert not fast.zero("forward/dense0")[:, 0].any()
    # Arb carries the float64 products exactly and proves the zero; auto falls back to it
    auto = exact_trace(net, 150)
    slow = exact_trace(net, 128, method="arb")
    assert auto.method == "arb"
    for result in (auto, slow):
        assert np.all(result.exact_array("forward/dense0").zero[:, 0])
        assert np.all(np.isinf(result.digits["forward/dense0"][:, 0]))
        assert np.all(
            result.exact_array("grads/dense2.weight").zero[:, 0]
        )  # its input is tanh(0) = 0


def test_progress_bar_is_quiet_for_short_runs(capsys: pytest.CaptureFixture[str]) -> None:
    exact_trace(_small_tanh_net(), 150, progress=True)  # shown only after 2 s
    assert capsys.readouterr().err == ""


def test_loss_is_an_mpf_scalar_with_its_own_precision() -> None:
    fast = exact_trace(_small_tanh_net(), 150)
    loss = fast.trace.loss
    assert type(loss).__name__ == "mpf"  # of a private context, as MPArith makes them
    assert loss.context.prec > 53
    assert math.isfinite(float(loss))
