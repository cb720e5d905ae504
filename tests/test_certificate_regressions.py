"""One explicit network per failure kind 1-5 of issue 12, checked against the independent oracle.

Each asserts that every value fpgrad's exact reference reports is right (enclosures hold, zero
claims are exact zeros, certified digits are correct with the right sign) or honestly
undetermined, and that the oracle itself is conclusive on every value (tests/oracle).
"""

from __future__ import annotations

import numpy as np
import pytest

from fpgrad.graph.layers import exact_trace
from fpgrad.model.network import Layer, Loss, Network
from tests.oracle.claims import check
from tests.oracle.reference import oracle


def dense(name: str, w: list[list[float]], b: list[float] | None = None) -> Layer:
    params = {"weight": np.array(w, dtype=np.float64)}
    if b is not None:
        params["bias"] = np.array(b, dtype=np.float64)
    return Layer(name, "dense", params)


def act(name: str, kind: str) -> Layer:
    return Layer(name, kind)


def net(layers: list[Layer], loss: str, x: list[list[float]], y: object) -> Network:
    return Network(tuple(layers), Loss(loss), np.array(x, dtype=np.float64), np.array(y))


def assert_right(n: Network) -> None:
    """Right or undetermined on every value, at the default precision (the fast path, with
    its fallback) and at 300 bits (the mpmath path, as ``--exact-bits 300``)."""
    ref = oracle(n)
    report = []
    for bits in (150, 300):
        tally = check(exact_trace(n, bits, allow_uncertified=True), ref, f"{bits} bits:")
        assert tally.oracle_unknown == 0, "the oracle is inconclusive"
        if tally.wrong:
            report.append(tally.line() + "\n" + "\n".join(tally.failures[:6]))
    assert not report, "\n".join(report)


# ---- kind 1: agreement is not a certificate -----------------------------------------------


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_kind1_one_plus_tiny_minus_one_before_relu(sign: float) -> None:
    """Pre-activation 1 + s 2**-400 - 1 (exactly +-2**-400): the ReLU branch is decided by its
    sign, so gradients through it are -2-ish (s = +1) or exactly 0 (s = -1)."""
    x = [[1.0, sign * 2.0**-400, -1.0], [0.5, 0.25, 0.125]]
    layers = [dense("d0", [[1.0, 1.0, 1.0]]), act("r", "relu"), dense("d1", [[2.0]], [0.0])]
    assert_right(net(layers, "mse", x, [[1.0], [0.0]]))


# ---- kind 2: the vanishing rule zeroes genuine values --------------------------------------


def test_kind2_tiny_input_feature() -> None:
    """Feature 2**-200 taken exactly into a pre-activation (6.2e-61): a genuine value."""
    x = [[2.0**-200, 1.0], [2.0**-200, -0.5]]
    layers = [dense("d0", [[1.0, 0.0], [0.5, 1.0]]), act("t", "tanh"), dense("d1", [[1.0, -1.0]])]
    assert_right(net(layers, "mse", x, [[0.3], [-0.2]]))


def test_kind2_saturated_tanh_in_a_random_net() -> None:
    """One tanh unit at ~79: sech**2 ~ 4.9e-69, a genuine gradient, not a structural zero."""
    rng = np.random.default_rng(12)
    w0 = rng.normal(size=(3, 3))
    b0 = [79.0, 0.1, -0.3]
    x = rng.normal(size=(2, 3)) * 1e-3
    layers = [
        dense("d0", w0.tolist(), b0),
        act("t", "tanh"),
        dense("d1", rng.normal(size=(2, 3)).tolist()),
    ]
    assert_right(net(layers, "mse", x.tolist(), rng.normal(size=(2, 2)).tolist()))


def test_kind2_tiny_softmax_gradients() -> None:
    """Softmax outputs ~e**-100: their gradients ~7e-44 are the largest of their array."""
    x = [[1.0, 0.5], [0.25, -1.0]]
    layers = [
        dense("d0", [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], [100.0, 0.0, 0.0]),
        act("s", "softmax"),
        dense("d1", [[1.0, 2.0, 3.0]]),
    ]
    assert_right(net(layers, "mse", x, [[0.5], [1.5]]))


# ---- kind 3: softmax, cross-entropy and BCE near saturation -------------------------------


def test_kind3_cross_entropy_loss_e_minus_100() -> None:
    """Logits [0, 100], class 1: loss log(1 + e**-100) ~ 3.7e-44, gradients +-e**-100 / B."""
    x = [[1.0], [1.0]]
    layers = [dense("d0", [[0.0], [100.0]])]
    assert_right(net(layers, "cross_entropy", x, [1, 1]))


def test_kind3_two_unit_softmax_gap_440() -> None:
    x = [[1.0, -1.0], [0.5, 2.0]]
    layers = [
        dense("d0", [[220.0, -3.0], [-220.0, 1.0]]),
        act("s", "softmax"),
        dense("d1", [[1.5, -0.5]]),
    ]
    assert_right(net(layers, "mse", x, [[0.25], [1.0]]))


def test_kind3_bce_saturated() -> None:
    x = [[1.0], [-1.0]]
    layers = [dense("d0", [[90.0], [-40.0]])]
    assert_right(net(layers, "bce", x, [[1.0, 0.0], [0.0, 1.0]]))


# ---- kind 4: soft targets summed in float64 ------------------------------------------------


def test_kind4_soft_targets_near_optimum() -> None:
    """Targets 0.2 + 0.8 (a float64 sum of 1 + 2**-54) and logits at the optimum log(4)."""
    x = [[1.0], [1.0]]
    layers = [dense("d0", [[0.0], [float(np.log(4.0))]])]
    assert_right(net(layers, "cross_entropy", x, [[0.2, 0.8], [0.2, 0.8]]))


def test_kind4_label_smoothing() -> None:
    eps = 0.1
    t = [1 - eps + eps / 3, eps / 3, eps / 3]
    logits = np.log(np.array(t))
    x = [[1.0], [1.0]]
    layers = [dense("d0", [[v] for v in logits.tolist()])]
    assert_right(net(layers, "cross_entropy", x, [t, t[::-1]]))


# ---- kind 5: lazy products escape the range check ------------------------------------------


@pytest.mark.parametrize("k, a", [(-600, -598), (600, 586)])
def test_kind5_weight_gradient_products_out_of_range(k: int, a: int) -> None:
    """x = [2**k, 1], d0 = [[0, 2**-a]], d1 = [[2**a]], target 0.5: z1 = 1, dz1 = 1, dz0 = 2**a,
    every forward and backward value within 2**-800 .. 2**800, but dW0[0, 0] = dz0 x0 is
    exactly 2**-1198 or 2**1186."""
    layers = [dense("d0", [[0.0, 2.0**-a]]), dense("d1", [[2.0**a]])]
    assert_right(net(layers, "mse", [[2.0**k, 1.0]], [[0.5]]))
