"""Exact single floats add, subtract and multiply with radius 0 in the fast balls
(fpgrad.arith.jit_ball.binop): wherever the radius is 0 the words sum exactly to the exact
rational result, across exponents from 2**-1000 to 2**1000, zeros, signs and ties; operands
with a radius or a lower word keep their rounding term."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from fpgrad.arith.ball import Ball, BallArith


def _singles(n: int, seed: int, span: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    e = rng.integers(-span, span, n)
    x = np.ldexp(rng.uniform(0.5, 1.0, n), e) * rng.choice([-1.0, 1.0], n)
    x[::17] = 0.0
    x[5::23] = np.ldexp(1.0, rng.integers(-60, 60, x[5::23].size))  # powers of two: ties
    return x


def _exact(op: str, a: float, b: float) -> Fraction:
    fa, fb = Fraction(a), Fraction(b)
    return fa + fb if op == "add" else fa - fb if op == "sub" else fa * fb


@pytest.mark.parametrize("bits", [100, 150])
@pytest.mark.parametrize("op", ["add", "sub", "mul"])
@pytest.mark.parametrize("near", [False, True])
@pytest.mark.parametrize("span", [390, 1000])
def test_zero_radius_only_where_the_words_are_the_exact_value(
    op: str, bits: int, near: bool, span: int
) -> None:
    ar = BallArith(bits)
    a = _singles(3000, 1, span)
    b = _singles(3000, 2, span)
    if near:  # operands of close magnitude: cancellation, and products near 2**-969
        b = a * np.ldexp(1.0, np.random.default_rng(3).integers(-60, 1, a.size)) + np.where(
            a == 0, 1.0, 0.0
        )
        if op == "mul":
            a = np.ldexp(np.abs(a) / np.ldexp(1.0, np.frexp(a)[1]), -480)  # |a b| near 2**-969
            b = np.ldexp(np.abs(b) / np.ldexp(1.0, np.frexp(b)[1]), -490)
    out = getattr(ar, op)(ar.asarray(a), ar.asarray(b))
    ok = ar.range_errors == 0
    guarded = (np.abs(np.asarray(out.mid)[0]) < 2.0**-800) & (np.asarray(out.mid)[0] != 0)
    assert ok or guarded.any() or not np.all(np.isfinite(np.asarray(out.mid)[0]))
    mid, rad = np.asarray(out.mid), np.asarray(out.rad)
    exact_claims = 0
    for i in range(a.size):
        words = [float(w) for w in mid[:, i]]
        m0 = abs(words[0])
        if not np.isfinite(m0) or (m0 != 0 and not 2.0**-800 <= m0 <= 2.0**800):
            continue  # a range error: BallArith counts it and the evaluation is discarded
        if op == "mul" and m0 == 0 and a[i] != 0 and b[i] != 0:
            continue  # an underflow to 0: a range error too
        want = _exact(op, float(a[i]), float(b[i]))
        got = sum((Fraction(w) for w in words), Fraction(0))
        err = abs(got - want)
        if rad[i] == 0.0:
            exact_claims += 1
            assert err == 0, (op, a[i], b[i], words)
        else:
            assert err <= Fraction(float(rad[i])), (op, a[i], b[i])
    if span == 390 and not (near and op == "mul"):  # every result in the guarded range
        assert ok and exact_claims == a.size
    if op == "mul" and near:  # products near 2**-969, far below the guarded 2**-800: each
        # is a range error, so the evaluation is discarded whatever its radius
        assert ar.range_errors >= int(np.count_nonzero((a != 0) & (b != 0)))


def test_rounded_operands_keep_their_rounding_term() -> None:
    ar = BallArith(150)
    x = ar.asarray(np.array([0.1, 3.0]))
    third = ar.div(ar.asarray(np.array([1.0, 1.0])), ar.asarray(np.array([3.0, 7.0])))
    assert np.all(np.asarray(third.mid)[1] != 0)  # two words: not a single float
    for op in ("add", "sub", "mul"):
        assert np.all(np.asarray(getattr(ar, op)(x, third).rad) > 0)
    wide = Ball(np.asarray(x.mid).copy(), np.array([1e-30, 0.0]))
    assert np.asarray(ar.add(wide, x).rad)[0] > 0


def test_an_attention_mask_is_exact_and_finfo_min_is_a_range_error() -> None:
    # an additive attention mask (1 - mask) * c: exact for c = -1e4 (old BERT); with
    # c = finfo(float64).min (HF BERT, traced in float64) the constant itself is above the
    # guarded 2**800, a range error: that evaluation is discarded (Arb takes over)
    ar = BallArith(150)
    mask = ar.asarray(np.array([1.0, 0.0, 1.0]))
    ext = ar.mul(ar.sub(ar.asarray(np.ones(3)), mask), ar.asarray(np.full(3, -1e4)))
    assert np.asarray(ext.rad).tolist() == [0.0, 0.0, 0.0]
    assert np.asarray(ext.mid)[0].tolist() == [0.0, -1e4, 0.0]
    assert ar.range_errors == 0
    ar.asarray(np.full(3, np.finfo(float).min))
    assert ar.range_errors == 3
