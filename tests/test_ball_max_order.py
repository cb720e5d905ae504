"""BallArith.max on midpoints whose words are not canonical (attack13's open note): the
lexicographic choice can be below another midpoint; the ball must still hold the maximum."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from fpgrad.arith.ball import BallArith
from fpgrad.arith.ball_base import Ball


def _value(words: np.ndarray) -> Fraction:
    return sum((Fraction(float(w)) for w in words), Fraction(0))


def test_a_tie_rounded_word_zero_does_not_hide_the_larger_value() -> None:
    ar = BallArith(150)
    k = ar.k
    assert k >= 3
    a = [1 + 2.0**-52, -(2.0**-53)] + [0.0] * (k - 2)  # word 0 one unit above the nearest
    b = [1.0, 2.0**-53, 2.0**-107] + [0.0] * (k - 3)  # canonical, and larger by 2**-107
    mid = np.array([a, b]).T.copy()  # (k, 2)
    out = ar.max(Ball(mid, np.zeros(2)), axis=0)
    top = max(_value(mid[:, 0]), _value(mid[:, 1]))
    centre, radius = _value(np.asarray(out.mid).reshape(k)), Fraction(float(out.rad))
    assert abs(top - centre) <= radius  # before the fix: radius 0, centre 2**-107 below


def test_canonical_and_equal_words_keep_their_radius() -> None:
    ar = BallArith(150)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 9))
    balls = ar.asarray(x)
    out = ar.max(balls, axis=1)
    assert np.all(np.asarray(out.rad) == 0)  # exact inputs: an exact maximum
    same = ar.asarray(np.zeros((3, 5)))
    assert np.all(np.asarray(ar.max(same, axis=0).rad) == 0)  # ties: still a proven value
