"""Adversarial findings against the exact reference (each test fails until fixed).

Every network here is valid input (finite float64 data and weights, legal layer options);
the exact reference must either certify correct claims or refuse with an InputError, never
raise anything else and never claim something wrong.
"""

from __future__ import annotations

import pytest

from fpgrad.errors import InputError
from fpgrad.exact import exact_trace
from fpgrad.optim import OptimConfig
from fpgrad.train import train
from tests.nets import net_from


def _exact_or_refuse(net, **kw):  # noqa: ANN001, ANN202
    """exact_trace may refuse (InputError) but must not crash with anything else."""
    try:
        return exact_trace(net, allow_uncertified=True, **kw)
    except InputError:
        return None


# ---- 1. arb.radii: a radius at or above 2**1024 (but with exponent < 2000) -> OverflowError ----
def test_arb_radius_beyond_float64_does_not_crash() -> None:
    # mse of an output 1e200 * 1e200 = 1e400 (fast path: out of 2**800, falls back to Arb);
    # the loss 1e800 / 3 has a radius ~ 2**2650 * 2**-256 > 2**1024: math.ldexp overflows
    # in fpgrad/arith/arb.py radii() (the `exp < 2000` guard misses mantissa + exponent).
    layers = [{"type": "dense", "in": 1, "out": 1, "weight": [[1e200]], "bias": [0.0]}]
    net = net_from(layers, "mse", [[1e200], [1.0], [2.0]], [[0.0], [0.0], [0.0]])
    _exact_or_refuse(net)


# ---- 2. arb.radii: a non-finite Arb ball (nan +/- inf) -> ValueError before escalation -------
def test_cross_entropy_huge_close_logits_does_not_crash() -> None:
    # logits 1e200 + 1e-200 and 1e200: at 256 bits the difference has radius ~1e123, its exp is
    # [nan +/- inf]; radii() calls man_exp on the infinite radius (ValueError) inside
    # _summarise, so the escalation to 1024+ bits (where the sum is exact) never happens.
    layers = [
        {"type": "dense", "in": 2, "out": 2, "weight": [[1.0, 1.0], [1.0, 0.0]], "bias": [0.0, 0.0]}
    ]
    net = net_from(layers, "cross_entropy", [[1e200, 1e-200]], [0])
    _exact_or_refuse(net)


def test_batch_norm_constant_column_tiny_eps_does_not_crash() -> None:
    # a constant irrational column (tanh(0.5) three times): mean = 3t/3 is inexact in Arb, so
    # var is a ball [0 +/- 2**-5xx] that straddles 0; with eps = 1e-300 Arb's sqrt of
    # var + eps is nan -> radii() ValueError.  (Exact values: xhat = 0, output = beta.)
    layers = [
        {"type": "dense", "in": 1, "out": 1, "weight": [[0.5]], "bias": [0.0]},
        {"type": "tanh"},
        {"type": "batch_norm", "eps": 1e-300},
    ]
    net = net_from(layers, "mse", [[1.0], [1.0], [1.0]], [[0.0], [1.0], [0.0]])
    _exact_or_refuse(net)


def test_adam_exact_trajectory_with_a_zero_gradient_does_not_crash() -> None:
    # dL/db = 0 exactly (odd symmetry: tanh(w) + tanh(-w)), enclosed by Arb as [0 +/- r];
    # Adam's v = (1 - b2) g*g straddles 0 and Arb's sqrt(v) is nan (fpgrad/optim.py
    # ArithOptimizer.step); ExactRun.ball_digits -> arb_digits -> radii() raises ValueError.
    layers = [{"type": "dense", "in": 1, "out": 1, "weight": [[0.5]], "bias": [0.0]}, {"type": "tanh"}]
    net = net_from(layers, "mse", [[1.0], [-1.0]], [[0.0], [0.0]])
    try:
        train(
            net,
            1,
            OptimConfig(name="adam", lr=0.01),
            runs="float32",
            perturb=False,
            verdict_every=1000,
            exact_method="arb",
            exact_max_bits=256,
        )
    except InputError:
        pass
