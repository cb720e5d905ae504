"""Exact zeros of certified matrix products: every term has a proven-zero factor (dead ReLU units).

A gradient ``dW[i, j] = sum_b dz[b, i] h[b, j]`` is exactly 0 when, for every sample, unit i's
ReLU is off or unit j's output is 0, though neither whole row nor whole column is zero; the
product's normwise error bound used to leave such a ball holding 0 (undetermined). Checked
against exact rationals (tests/oracle), and against products whose balls hold 0 while the
value is not 0 (those must never become zeros).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from fpgrad.arith import expansion as xp
from fpgrad.arith.ball import Ball, BallArith
from fpgrad.graph.layers import exact_trace
from fpgrad.reference.exact import ball_digits
from tests.nets import net_from
from tests.oracle.claims import check
from tests.oracle.reference import ZERO, oracle


def _dead_net() -> object:
    """h1 = relu(x) is 0 on samples 2, 3 in unit 0; unit 0 of layer 2 is off on samples 0, 1."""
    x = [[1.0, -1.0], [2.0, -1.0], [-1.0, 1.0], [-2.0, 3.0]]
    layers = [
        {"type": "dense", "out": 2, "weight": [[1.0, 0.0], [0.0, 1.0]], "bias": [0.0, 0.0]},
        {"type": "relu"},
        {"type": "dense", "out": 2, "weight": [[-1.0, 1.0], [1.0, 1.0]], "bias": [0.0, 0.25]},
        {"type": "relu"},
        {"type": "dense", "out": 1, "weight": [[0.5, -0.75]], "bias": [0.125]},
    ]
    return net_from(layers, "mse", x, [[1.0], [-1.0], [0.5], [2.0]])


def test_dead_units_give_proven_zeros_that_the_rationals_confirm() -> None:
    net = _dead_net()
    result = exact_trace(net, method="fast", allow_uncertified=True)
    ref = oracle(net)
    tally = check(result, ref, "dead")
    assert tally.wrong == 0, tally.failures
    key = "grads/dense2.weight"
    assert result.zero(key)[0, 0]  # every term has a dead factor; row and column are not 0
    assert ref.status[key][0, 0] == ZERO
    assert not result.zero(key)[0, 1] and ref.status[key][0, 1] != ZERO
    assert result.undetermined_count == 0
    assert result.method == "fast" and not result.escalations


@pytest.mark.parametrize("seed", range(6))
def test_random_relu_nets_with_dead_units_against_rationals(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 5, size=(6, 5)) / 4.0
    layers: list[dict] = []
    width = 5
    for out in (7, 6):
        w = rng.integers(-4, 5, size=(out, width)) / 4.0
        layers += [
            {
                "type": "dense",
                "out": out,
                "weight": w.tolist(),
                "bias": (-rng.random(out)).tolist(),
            },
            {"type": "relu"},
        ]
        width = out
    layers.append({"type": "dense", "out": 2, "weight": rng.standard_normal((2, width)).tolist()})
    net = net_from(layers, "mse", x.tolist(), rng.standard_normal((6, 2)).tolist())
    result = exact_trace(net, method="fast", allow_uncertified=True)
    ref = oracle(net)
    tally = check(result, ref, f"seed {seed}")
    assert tally.wrong == 0, tally.failures
    # every exact zero of the gradients is proven (all inputs are exact: only dead units and
    # exact zeros of the data make zeros here, and those are sums of exact-zero products)
    for key in result.keys():
        if key.startswith("grads/"):
            assert np.array_equal(result.zero(key), ref.status[key] == ZERO), key


def _exact(rows: list[list[float]]) -> Ball:
    a = np.array(rows, dtype=np.float64)
    return Ball(xp.from_float(a, 3), np.zeros(a.shape))


def _zeros(ball: Ball) -> np.ndarray:
    return ball_digits(ball, 45.0)[1]


def test_support_product_against_fractions() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((9, 12)) * (rng.random((9, 12)) < 0.3)
    b = rng.standard_normal((12, 8)) * (rng.random((12, 8)) < 0.3)
    a[0, :] = 0.0  # a whole row: the old bound already saw it
    ar = BallArith(150)
    out = ar.matmul(_exact(a.tolist()), _exact(b.tolist()))
    truth = [[sum(Fraction(a[i, k]) * Fraction(b[k, j]) for k in range(12)) for j in range(8)]
             for i in range(9)]  # fmt: skip
    structural = (a != 0).astype(int) @ (b != 0).astype(int) == 0
    assert structural.sum() > 9  # more than the zero row: the case this proves
    zeros = _zeros(out)
    assert np.array_equal(zeros, structural)
    assert all(truth[i][j] == 0 for i, j in zip(*np.nonzero(zeros), strict=True))


def test_balls_holding_zero_are_not_zeros() -> None:
    ar = BallArith(150)
    # midpoint 0 with radius > 0 in an operand: the value may be anything in the ball
    b = Ball(xp.from_float(np.array([[1.0], [-1.0]]), 3), np.array([[2.0**-60], [2.0**-60]]))
    out = ar.matmul(_exact([[1.0, 1.0]]), b)
    assert out.mid[0, 0, 0] == 0.0 and out.rad[0, 0] > 0
    assert not _zeros(out).any()
    # exact operands, value 2**-400, below the product's working precision: midpoint 0
    out = ar.matmul(_exact([[1.0, 1.0, 1.0]]), _exact([[2.0**100], [-(2.0**100)], [2.0**-400]]))
    assert not _zeros(out).any()
    assert abs(2.0**-400 - float(out.mid[:, 0, 0].sum())) <= out.rad[0, 0]


def test_arb_products_keep_the_same_zeros() -> None:
    """The Arb fallback: arb_mat products of exact zeros are exact zeros (no bound added)."""
    from fpgrad.arith import arb as arbmod
    from fpgrad.arith.arb import ArbArith

    rng = np.random.default_rng(4)
    a = rng.standard_normal((7, 10)) * (rng.random((7, 10)) < 0.3)
    b = rng.standard_normal((10, 6)) * (rng.random((10, 6)) < 0.3)
    ar = ArbArith(256)
    out = ar.matmul(ar.asarray(a), ar.asarray(b))
    structural = (a != 0).astype(int) @ (b != 0).astype(int) == 0
    assert structural.any() and not structural.all()
    assert np.array_equal(arbmod.exact_zero(out), structural)
