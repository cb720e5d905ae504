"""Certified digits of the fast exact path are made when read (fpgrad.reference.digits
LazyDigits, jit_ball.flags): the same arrays, zeros, undetermined masks and least digits as
the eager pass (ball_summary), for a trace and for balls with exact zeros, undetermined
elements, radius 0 and NaN."""

from __future__ import annotations

import numpy as np

from fpgrad.arith.ball import Ball
from fpgrad.graph.layers import exact_trace
from fpgrad.reference.digits import LazyDigits, ball_flags, ball_summary
from scripts.bench_exact import build_mlp


def test_flags_agree_with_the_eager_pass_on_edge_balls() -> None:
    mid = np.zeros((3, 9))
    mid[0] = [0.0, 0.0, 1.0, -2.0, 1e-300, 3.0, np.nan, 5.0, 1.0]
    rad = np.array([0.0, 1e-30, 0.0, 2.0**-100, 1e-290, 2.0**-60, 0.0, np.nan, 0.9])
    ball = Ball(mid, rad)
    for cap in (45.0, 10.0):
        d, z, u, r, low = ball_summary(ball, cap)
        none, z2, u2, r2, low2 = ball_flags(ball, cap)
        assert none is None and low2 == low
        assert (
            np.array_equal(z, z2)
            and np.array_equal(u, u2)
            and np.array_equal(r, r2, equal_nan=True)
        )
    only_zero = Ball(np.zeros((3, 2)), np.zeros(2))
    assert ball_flags(only_zero, 45.0)[4] == ball_summary(only_zero, 45.0)[4] == 45.0


def test_a_trace_reads_the_same_digits_lazily() -> None:
    res = exact_trace(build_mlp(16, sizes=(8, 12, 12, 3)), 150)
    assert isinstance(res.digits, LazyDigits)
    assert list(res.digits) == list(res.values) and len(res.digits) == len(res.values)
    low = np.inf
    for key in res.digits:
        d, z, u, _, lo = ball_summary(res.values[key], res.digits._cap)
        assert np.array_equal(res.digits[key], d)
        assert np.array_equal(res.zeros[key], z) and np.array_equal(res.undetermined_masks[key], u)
        low = min(low, lo)
    assert low == res.certified_digits
    key = next(iter(res.digits))
    res.digits[key] = np.zeros(3)  # a value set replaces the one that would be made
    assert np.array_equal(res.digits[key], np.zeros(3)) and len(res.digits) == len(res.values)
