"""The exact reference's claims are proofs: zeros, undetermined values and certified digits.

Each case is checked against values computed here independently: exact rationals
(``fractions.Fraction``) where the network is rational, and mpmath at thousands of bits on
closed forms written from the mathematics otherwise (a test oracle, not a certificate).
"""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest

from fpgrad.diagnose.verdicts import ExactArray, classify
from fpgrad.graph.layers import exact_trace
from fpgrad.numbers.formats import get_format
from tests.nets import net_from


def _claims_hold(res, key: str, exact_values) -> None:  # noqa: ANN001
    """Every element: enclosed; zero only if exactly 0; certified => same sign and digits."""
    mid, rad = res.enclosure(key)
    zero, und, digits = res.zero(key), res.undetermined(key), res.digits[key]
    with mpmath.workprec(20000):
        for idx in np.ndindex(np.shape(exact_values)):
            e = (
                mpmath.mpf(exact_values[idx])
                if not isinstance(exact_values[idx], Fraction)
                else (mpmath.mpf(exact_values[idx].numerator) / exact_values[idx].denominator)
            )
            m = mpmath.mpf(mid[idx])
            assert abs(m - e) <= mpmath.mpf(float(rad[idx])) or (rad[idx] == 0 and m == e), (
                key,
                idx,
                m,
                e,
                rad[idx],
            )
            if zero[idx]:
                assert e == 0, (key, idx, e)
            elif not und[idx]:
                assert e != 0 and mpmath.sign(m) == mpmath.sign(e), (key, idx, m, e)
                assert abs(m - e) <= abs(m) * mpmath.mpf(10) ** (-digits[idx]) * (1 + 1e-9)


# ---- kind 1: a ReLU input that rounds to 0 at 150 and 300 bits alike ------------------------


def _relu_net(w: list[float], x: list[float]):  # noqa: ANN202
    return net_from(
        [
            {"type": "dense", "weight": [w], "bias": [0.0]},
            {"type": "relu"},
            {"type": "dense", "weight": [[-2.0]], "bias": [0.0]},
        ],
        "mse",
        [x],
        [[0.0]],
    )


def test_relu_branch_decided_exactly_not_by_agreement() -> None:
    res = exact_trace(_relu_net([1.0, 2.0**-400, -1.0], [1.0, 1.0, 1.0]))
    z = Fraction(2) ** -400  # the exact pre-activation: positive, so the unit is alive
    out = -2 * z
    g_out = 2 * out  # d mean((out - 0)^2) / d out
    g_z = g_out * -2
    _claims_hold(res, "forward/dense0", np.array([[z]], dtype=object))
    _claims_hold(res, "grads/dense0.weight", np.array([[g_z, g_z, g_z]], dtype=object))
    assert not res.zero("grads/dense0.weight").any()
    assert res.certified_digits >= 17


def test_exact_zero_relu_input_is_proven_zero() -> None:
    res = exact_trace(_relu_net([1.0, 1.0, -2.0], [1.0, 1.0, 1.0]))
    assert res.zero("forward/dense0").all() and res.zero("grads/dense0.weight").all()


def test_undecided_branch_at_the_cap_is_undetermined_and_still_enclosed() -> None:
    # 1 + 2^-2148 - 1 needs about 2,150 bits to decide; a cap of 1024 cannot
    tiny = 2.0**-1074
    net = _relu_net([1.0, tiny, -1.0], [1.0, tiny, 1.0])
    res = exact_trace(net, max_bits=1024, allow_uncertified=True)
    assert res.method == "arb" and res.bits == 1024
    assert res.undetermined("forward/dense0").all()
    z = Fraction(2) ** -2148
    g_z = 2 * (-2 * z) * -2
    _claims_hold(res, "forward/dense0", np.array([[z]], dtype=object))
    _claims_hold(res, "grads/dense0.weight", np.array([[g_z, g_z * Fraction(tiny), g_z]]))
    # with a higher cap the same branch is decided and the gradients certified
    full = exact_trace(net, max_bits=4096)
    assert not full.undetermined("forward/dense0").any()
    _claims_hold(full, "grads/dense0.weight", np.array([[g_z, g_z * Fraction(tiny), g_z]]))


# ---- kind 2: genuinely tiny values are never zeroed -------------------------------------------


def test_tiny_genuine_values_are_certified_not_zero() -> None:
    net = net_from(
        [{"type": "dense", "weight": [[0.5, 3.0]], "bias": [0.25]}, {"type": "tanh"}],
        "mse",
        [[2.0**-200, 1.0], [1.0, -40.0]],  # a 2^-200 feature; a unit saturated at tanh(-119.75)
        [[0.3], [0.2]],
    )
    res = exact_trace(net)
    g = res.exact_array("grads/dense0.weight")
    assert not g.zero.any() and not res.undetermined("grads/dense0.weight").any()
    with mpmath.workprec(3000):
        zs = [mpmath.mpf(0.5) * mpmath.mpf(2) ** -200 + 3 + mpmath.mpf(0.25),
              mpmath.mpf(0.5) - 120 + mpmath.mpf(0.25)]  # fmt: skip
        ts = [mpmath.mpf(0.3), mpmath.mpf(0.2)]
        xs = [[mpmath.mpf(2) ** -200, mpmath.mpf(1)], [mpmath.mpf(1), mpmath.mpf(-40)]]
        # loss = mean((tanh z - t)^2) over 2 elements: dL/dz = (tanh z - t) sech^2 z
        dz = [(mpmath.tanh(z) - t) * mpmath.sech(z) ** 2 for z, t in zip(zs, ts, strict=True)]
        gw = [sum(dz[b] * xs[b][j] for b in range(2)) for j in range(2)]
    _claims_hold(res, "grads/dense0.weight", np.array([gw], dtype=object))
    assert float(abs(gw[0])) < 1e-50  # the saturated unit's share is tiny, and not zero


# ---- kind 3: saturated softmax, cross-entropy and BCE -----------------------------------------


def test_cross_entropy_with_logit_gap_440_is_certified_with_the_right_sign() -> None:
    net = net_from(
        [{"type": "dense", "weight": [[220.0], [-220.0]], "bias": [0.0, 0.0]}],
        "cross_entropy",
        [[1.0], [1.0]],
        [0, 0],
    )
    res = exact_trace(net)
    with mpmath.workprec(4000):
        p1 = mpmath.exp(-440) / (1 + mpmath.exp(-440))
        loss = mpmath.log1p(mpmath.exp(-440))
        # dL/dz = (p - onehot) / B per row; dW = sum_b dz_b x_b = 2 rows * (p - t) / 2
        gw = np.array([[-p1], [p1]], dtype=object)
    _claims_hold(res, "loss", np.array(loss, dtype=object))
    _claims_hold(res, "grads/dense0.weight", gw)
    assert res.certified_digits >= 17


def test_softmax_layer_backward_near_one_hot() -> None:
    net = net_from(
        [{"type": "dense", "weight": [[50.0], [-50.0]], "bias": [0.0, 0.0]}, {"type": "softmax"}],
        "mse",
        [[1.0]],
        [[0.3, 0.7]],
    )
    res = exact_trace(net)
    with mpmath.workprec(4000):
        e = mpmath.exp(-100)
        s = [1 / (1 + e), e / (1 + e)]
        dy = [(s[0] - mpmath.mpf(0.3)), (s[1] - mpmath.mpf(0.7))]  # 2 (s - t) / 2
        inner = s[0] * dy[0] + s[1] * dy[1]
        dz = [s[i] * (dy[i] - inner) for i in range(2)]
    _claims_hold(res, "grads/dense0.weight", np.array([[dz[0]], [dz[1]]], dtype=object))
    assert res.certified_digits >= 17


def test_bce_saturated_loss_and_gradient() -> None:
    net = net_from(
        [{"type": "dense", "weight": [[100.0]], "bias": [0.0]}],
        "bce",
        [[1.0], [-1.0], [0.5]],
        [[1.0], [0.0], [0.25]],
    )
    res = exact_trace(net, allow_uncertified=True)
    with mpmath.workprec(4000):
        sp = mpmath.log1p(mpmath.exp(-100))  # softplus(-100)
        z3, t3 = mpmath.mpf(50), mpmath.mpf(0.25)
        l3 = z3 * (1 - t3) + mpmath.log1p(mpmath.exp(-z3))
        loss = (sp + sp + l3) / 3
        s = 1 / (1 + mpmath.exp(100))
        g3 = 1 / (1 + mpmath.exp(-z3)) - t3
        gw = (-s * 1 + s * -1 + g3 * mpmath.mpf(0.5)) / 3
    _claims_hold(res, "loss", np.array(loss, dtype=object))
    _claims_hold(res, "grads/dense0.weight", np.array([[gw]], dtype=object))


# ---- kind 4: soft targets summed exactly ------------------------------------------------------


def test_soft_target_sum_is_exact_near_the_optimum() -> None:
    t = [0.2, 0.8]  # float64 entries whose exact sum is 1 + 2^-54, not 1
    assert Fraction(0.2) + Fraction(0.8) != 1
    z = [math.log(0.2), math.log(0.8)]
    net = net_from(
        [{"type": "dense", "weight": [[z[0]], [z[1]]], "bias": [0.0, 0.0]}],
        "cross_entropy",
        [[1.0]],
        [t],
    )
    res = exact_trace(net, allow_uncertified=True)
    with mpmath.workprec(4000):
        zs = [mpmath.mpf(v) for v in z]
        ts = [mpmath.mpf(v) for v in t]
        tot = mpmath.exp(zs[0]) + mpmath.exp(zs[1])
        p = [mpmath.exp(v) / tot for v in zs]
        tsum = ts[0] + ts[1]
        g = [p[i] * tsum - ts[i] for i in range(2)]
    _claims_hold(res, "grads/dense0.weight", np.array([[g[0]], [g[1]]], dtype=object))


# ---- kind 5: products beyond the fast range -----------------------------------------------------


@pytest.mark.parametrize("e", [-600, 593])
def test_products_beyond_the_fast_range_are_never_exact_zeros(e: int) -> None:
    w, x = 2.0**e, 2.0 ** (e + 1)
    net = net_from([{"type": "dense", "weight": [[w]], "bias": [0.0]}], "mse", [[x]], [[0.0]])
    res = exact_trace(net)
    assert res.method == "arb"
    z = Fraction(w) * Fraction(x)
    gw = 2 * z * Fraction(x)  # d (z - 0)^2 / dw
    _claims_hold(res, "grads/dense0.weight", np.array([[gw]], dtype=object))
    assert not res.zero("grads/dense0.weight").any()


# ---- zeros by structural identity ---------------------------------------------------------------


def test_bias_before_batch_norm_has_a_proven_zero_gradient() -> None:
    rng = np.random.default_rng(1)
    net = net_from(
        [
            {"type": "dense", "weight": rng.normal(size=(3, 2)).tolist(), "bias": [0.5, -1, 2]},
            {"type": "batch_norm", "weight": [1.0, 2.0, 0.5], "bias": [0.0, 0.1, 0.0]},
            {"type": "tanh"},
            {"type": "dense", "weight": rng.normal(size=(1, 3)).tolist(), "bias": [0.0]},
        ],
        "mse",
        rng.normal(size=(5, 2)).tolist(),
        rng.normal(size=(5, 1)).tolist(),
    )
    res = exact_trace(net)
    assert res.method == "fast" and res.zero("grads/dense0.bias").all()
    assert not res.zero("grads/dense0.weight").any()


# ---- verdicts -------------------------------------------------------------------------------------


def test_undetermined_exact_values_get_their_own_verdict() -> None:
    fmt = get_format("float16")
    ex = ExactArray(
        np.zeros(3), np.zeros(3), np.zeros(3, bool), np.full(3, 1e-30), np.ones(3, bool)
    )
    v = classify(ex, np.array([0.0, 1.0, np.nan]), fmt)
    assert list(v.verdict) == ["undetermined", "undetermined", "nan"]


@pytest.mark.parametrize(
    ("mode", "value", "kind"),
    [
        ("nearest_even", 0.75, "lost"),  # rounds to the smallest subnormal
        ("nearest_even", 0.5, "underflow"),  # the tie goes to the even 0
        ("nearest_away", 0.5, "lost"),  # the tie goes away from 0
        ("toward_zero", 0.75, "underflow"),
        ("up", 0.75, "lost"),
        ("up", -0.75, "underflow"),
        ("down", 0.75, "underflow"),
        ("down", -0.75, "lost"),
        ("odd", 0.25, "lost"),  # the smallest subnormal is odd
        ("stochastic", 0.25, "underflow"),  # 0 is one of the outcomes
    ],
)
def test_underflow_follows_the_rounding_mode(mode: str, value: float, kind: str) -> None:
    fmt = get_format("float16")
    e = value * fmt.smallest_subnormal
    ex = ExactArray(np.array([e]), np.zeros(1), np.zeros(1, bool))
    v = classify(ex, np.zeros(1), fmt, mode)
    assert v.verdict[0] == "rounding_zero" and v.subkind[0] == kind


def test_weight_gradient_product_below_the_fast_range_is_checked() -> None:
    # forward values and dL/dz stay inside 2^-800..2^800; only the lazy weight-gradient
    # product dz^T x ~ e^-347 * 2^-700 ~ 2^-1200 leaves it: it must not become (0, 0)
    x = 2.0**-700
    net = net_from(
        [{"type": "dense", "weight": [[1.0, 173.5], [1.0, -173.5]], "bias": [0.0, 0.0]}],
        "cross_entropy",
        [[x, 1.0]],
        [0],
    )
    res = exact_trace(net)
    assert not res.zero("grads/dense0.weight").any()
    with mpmath.workprec(6000):
        z = [mpmath.mpf(x) + mpmath.mpf(173.5), mpmath.mpf(x) - mpmath.mpf(173.5)]
        p1 = mpmath.exp(z[1]) / (mpmath.exp(z[0]) + mpmath.exp(z[1]))
        dz = [-p1, p1]
        gw = np.array([[dz[0] * mpmath.mpf(x), dz[0]], [dz[1] * mpmath.mpf(x), dz[1]]])
    _claims_hold(res, "grads/dense0.weight", gw)


@pytest.mark.parametrize("bits", [100, 150])
def test_ball_log1p_encloses_in_every_regime(bits: int) -> None:
    from fpgrad.arith import expansion
    from fpgrad.arith.ball import BallArith

    rng = np.random.default_rng(bits)
    xs = np.concatenate(
        [
            [0.0, 2.0**-700, 2.0**-200, 2.0**-199, 2.0**-8, 2.0**-8 * (1 + 2.0**-52), 0.5, 1e10],
            rng.uniform(-0.5, 0.5, 40) * 2.0 ** rng.integers(-300, 0, 40),
        ]
    )
    ar = BallArith(bits)
    # inputs with a radius, as the exact reference feeds them (the sum of the others' exps)
    b = ar.add(ar.asarray(xs), ar.mul(ar.asarray(xs), ar.asarray(np.full(xs.shape, 1 / 3))))
    out = ar.log1p(b)
    assert ar.range_errors == 0
    ctx = mpmath.MPContext()
    ctx.prec = 2000
    x_in = expansion.to_mpf(b.mid, ctx)
    got = expansion.to_mpf(out.mid, ctx)
    for i in range(xs.size):
        # the exact log1p of any point of the input ball lies in the output ball: check the
        # midpoint and both ends
        for x in (x_in[i] - b.rad[i], x_in[i], x_in[i] + b.rad[i]):
            assert abs(got[i] - ctx.log1p(x)) <= out.rad[i], (i, xs[i])
        if xs[i] != 0:
            assert out.rad[i] <= abs(got[i]) * 2.0 ** -(bits - 60)  # narrow: digits kept


def test_confident_classifier_is_certified_by_the_fast_path() -> None:
    net = net_from(
        [{"type": "dense", "weight": [[30.0, 0.5], [-30.0, 0.25]], "bias": [0.0, 0.0]}],
        "cross_entropy",
        [[1.0, 0.5], [2.0, -1.0], [-1.5, 0.0]],
        [0, 0, 1],
    )
    res = exact_trace(net)
    assert res.method == "fast" and res.certified_digits >= 17


# ---- options and messages -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--exact-max-bits", "32"], "--exact-max-bits 32 is out of range"),
        (["--exact-max-bits", "100000"], "--exact-max-bits 100000 is out of range"),
        (["--exact-bits", "300", "--exact-max-bits", "256"], "above the cap"),
    ],
)
def test_exact_cap_options_are_one_line_errors(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fpgrad.cli import main

    code = main(["compare", "fpgrad/examples/showcase.toml", "--precisions", "float32", *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_exact_training_fallback_is_announced_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fpgrad.run.optim import OptimConfig
    from fpgrad.training import train

    net = net_from(  # 2^-500 * 2^-500 leaves the fast balls' range
        [{"type": "dense", "out": 1, "weight": [[2.0**-500]], "bias": False}],
        "mse",
        [[2.0**-500]],
        [[1.0]],
    )
    r = train(net, 2, OptimConfig(lr=0.1), runs="float32", perturb=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert r.config["exact_method"] == "arb"
    assert len(err) == 1 and "recomputing in Arb balls" in err[0] and "step 1" in err[0]


def test_arb_radii_are_upper_bounds_across_float64s_range() -> None:
    from flint import arb

    from fpgrad.arith.arb import radii

    big = arb("1 +/- 1e300") * arb(2) ** 3000
    vals = np.array(
        [
            arb(1),
            big,
            arb("1 +/- inf"),
            arb("1 +/- 1e-320"),
            arb("1 +/- 1e-400"),
            arb("0 +/- 1e307") * 8,
        ],
        dtype=object,
    )
    r = radii(vals)
    assert r[0] == 0 and r[1] == r[2] == math.inf
    for v, bound in zip(vals[3:], r[3:], strict=True):
        assert bound > 0 and arb(float(bound)) >= v.rad()


def test_arb_escalation_stops_at_the_memory_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    import fpgrad.reference.exact as exact_mod

    monkeypatch.setattr(exact_mod, "ARB_MEMORY", 2**13)  # 8 KiB: about 600 bits here
    tiny = 2.0**-1074
    res = exact_trace(_relu_net([1.0, tiny, -1.0], [1.0, tiny, 1.0]), allow_uncertified=True)
    assert res.method == "arb" and res.bits < 2048
    assert any("memory bound" in e for e in res.escalations)
    assert res.undetermined("forward/dense0").all()  # 2,150 bits would decide it: honest


def test_cli_exact_cap_default_is_the_library_default() -> None:
    from fpgrad.cli import build_parser
    from fpgrad.reference.exact import DEFAULT_MAX_BITS

    parser = build_parser()
    for command in (
        ["compare", "n.toml"],
        ["advise", "n.toml"],
        ["train", "n.toml", "--steps", "1"],
    ):
        assert parser.parse_args(command).exact_max_bits == DEFAULT_MAX_BITS
