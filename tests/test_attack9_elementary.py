"""Adversarial review of the elementwise ball kernels at the edges of their range (attack 9).

Regimes: subnormal and underflowing radii (2**-1074 .. 2**-600), radii up to float64's
largest, midpoints at the range edges (exp near its domain 700 and where exp(x) is
subnormal, log near 2**-800 and 2**800, tanh saturated at |z| > 19 and at its clip
|z| = 350, the tiny-argument path near 2**-9, ncdf's range edge 12, exact zeros).
Oracle: mpmath at 2300 bits (every float64 endpoint ``mid +- rad`` exactly), never fpgrad:
each function is monotone (exp, log, tanh, sigmoid, sqrt, ncdf, log1p) or even and peaked at 0
(sech^2, s(z) s(-z), npdf), so its range over a ball is spanned by the endpoints (and 0).
An element not enclosed is a finding only if it is certified: recomputed alone, it raises
no range error (a counted range error sends the run to Arb balls).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import mpmath
import numpy as np
import pytest

from fpgrad.arith.ball import Ball, BallArith, exact_zeros

MP = mpmath.MPContext()
MP.prec = 2300  # holds mid +- rad exactly: words from 2**800 down to radii of 2**-1074

Fn = Callable[[BallArith, Ball], Ball]
UNARY: dict[str, tuple[Fn, Callable[[Any], Any], bool]] = {
    "exp": (lambda ba, b: ba.exp(b), MP.exp, False),
    "log": (lambda ba, b: ba.log(b), lambda x: MP.log(x) if x > 0 else None, False),
    "tanh": (lambda ba, b: ba.tanh(b), MP.tanh, False),
    "sech2": (lambda ba, b: ba.tanh_deriv(b, ba.tanh(b)), lambda x: MP.sech(x) ** 2, True),
    "sigmoid": (lambda ba, b: ba.sigmoid(b), lambda x: 1 / (1 + MP.exp(-x)), False),
    "sigmoid'": (
        lambda ba, b: ba.sigmoid_deriv(b, ba.sigmoid(b)),
        lambda x: 1 / ((1 + MP.exp(-x)) * (1 + MP.exp(x))),
        True,
    ),
    "sqrt": (lambda ba, b: ba.sqrt(b), lambda x: MP.sqrt(x) if x >= 0 else None, False),
    "ncdf": (lambda ba, b: ba.ncdf(b), lambda x: MP.erfc(-x / MP.sqrt(2)) / 2, False),
    "npdf": (lambda ba, b: ba.npdf(b), lambda x: MP.exp(-x * x / 2) / MP.sqrt(2 * MP.pi), True),
    "log1p": (lambda ba, b: ba.log1p(b), lambda x: MP.log1p(x) if x > -1 else None, False),
}
BINARY: dict[str, tuple[Callable[[BallArith, Ball, Ball], Ball], Callable[[Any, Any], Any]]] = {
    "add": (lambda ba, a, b: ba.add(a, b), lambda x, y: x + y),
    "sub": (lambda ba, a, b: ba.sub(a, b), lambda x, y: x - y),
    "mul": (lambda ba, a, b: ba.mul(a, b), lambda x, y: x * y),
    "div": (lambda ba, a, b: ba.div(a, b), lambda x, y: x / y),
}

Gen = Callable[[np.random.Generator, int], np.ndarray]


def _sign(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], n)


MIDS: dict[str, Gen] = {
    "exp_top": lambda rng, n: rng.uniform(550, 701, n),
    "exp_domain": lambda rng, n: 700 + rng.integers(-3, 4, n) * 2.0**-43,
    "exp_low_range": lambda rng, n: -rng.uniform(540, 560, n),
    "exp_subnormal": lambda rng, n: -rng.uniform(700, 746, n),
    "near_2^-800": lambda rng, n: 2.0 ** rng.uniform(-801, -780, n),
    "near_one": lambda rng, n: 1 + _sign(rng, n) * 2.0 ** rng.integers(-60, -2, n),
    "near_2^800": lambda rng, n: 2.0 ** rng.uniform(780, 801, n),
    "saturated": lambda rng, n: _sign(rng, n) * rng.uniform(18, 40, n),
    "clip_350": lambda rng, n: _sign(rng, n) * (350 + rng.uniform(-0.01, 0.01, n)),
    "tiny_path": lambda rng, n: _sign(rng, n) * 2.0 ** rng.uniform(-12, -8, n),
    "tiny": lambda rng, n: _sign(rng, n) * 2.0 ** rng.uniform(-800, -700, n),
    "zero": lambda rng, n: np.zeros(n),
    "unit": lambda rng, n: rng.uniform(-5, 5, n),
    "ncdf_edge": lambda rng, n: _sign(rng, n) * (12 + rng.uniform(-0.5, 0.5, n)),
    "huge": lambda rng, n: _sign(rng, n) * 2.0 ** rng.uniform(100, 790, n),
}
RADII = [
    0.0, 2.0**-1074, 3 * 2.0**-1074, 2.0**-1060, 2.0**-1023, 2.0**-1022, 2.0**-600, 2.0**-300,
    2.0**-150, 2.0**-60, 2.0**-12, 2.0**-11, math.nextafter(2.0**-11, 1.0), 2.0**-10,
    1.5 * 2.0**-10, 0.01, 0.5, 1.0, 10.0, 400.0, 2.0**100, 2.0**1000, 2.0**1023, 1.7e308,
]  # fmt: skip


def _words(rng: np.random.Generator, w0: np.ndarray) -> np.ndarray:
    """Canonical 3-word midpoints: each lower word below half an ulp of the one above."""
    out = np.zeros((3, w0.size))
    out[0] = w0
    for i in (1, 2):
        ulp = np.array([math.ulp(v) if v != 0 else 0.0 for v in out[i - 1]])
        low = rng.uniform(-0.5, 0.5, w0.size) * ulp
        out[i] = np.where(rng.random(w0.size) < 0.3, 0.0, low)
    return out


def _radii(rng: np.random.Generator, n: int) -> np.ndarray:
    r = rng.choice(RADII, n)
    return np.where(rng.random(n) < 0.3, r * rng.uniform(0.5, 1.0, n), r)


def _value(mid: np.ndarray, i: int) -> Any:
    return sum((MP.mpf(float(w)) for w in mid[:, i]), MP.mpf(0))


def _encloses(out: Ball, i: int, values: list[Any]) -> bool:
    r = float(np.asarray(out.rad).reshape(-1)[i])
    if not r < math.inf:  # inf or NaN: encloses everything, certifies nothing
        return True
    mid = np.asarray(out.mid).reshape(out.mid.shape[0], -1)
    return all(abs(v - _value(mid, i)) <= MP.mpf(r) for v in values)


def _certified(run: Callable[[BallArith], Ball], bits: int) -> bool:
    ba = BallArith(bits)
    with np.errstate(all="ignore"):
        np.asarray(run(ba).rad)
    return ba.range_errors == 0


def unary_misses(name: str, bits: int, mid: np.ndarray, rad: np.ndarray) -> list[tuple]:
    """Certified elements of ``name`` over the balls (mid, rad) that miss the exact range."""
    fn, f, peaked = UNARY[name]
    k = BallArith(bits).k
    with np.errstate(all="ignore"):
        out = fn(BallArith(bits), Ball(mid[:k].copy(), rad.copy()))
    misses = []
    for i in range(rad.size):
        m, r = _value(mid[:k], i), MP.mpf(float(rad[i]))
        points = [m - r, m + r] + ([MP.mpf(0)] if peaked and m - r <= 0 <= m + r else [])
        values = [f(x) for x in points]
        if any(v is None for v in values):  # outside the domain: a range error (tested below)
            continue
        if not _encloses(out, i, values):
            one = Ball(mid[:k, i : i + 1].copy(), rad[i : i + 1].copy())
            if _certified(lambda ba, one=one: fn(ba, one), bits):  # type: ignore[misc]
                misses.append((name, bits, float(mid[0, i]), float(rad[i])))
    return misses


def binary_misses(
    name: str, bits: int, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
) -> list[tuple]:
    fn, f = BINARY[name]
    k = BallArith(bits).k
    (am, ar), (bm, br) = a, b
    with np.errstate(all="ignore"):
        out = fn(BallArith(bits), Ball(am[:k].copy(), ar.copy()), Ball(bm[:k].copy(), br.copy()))
    misses = []
    for i in range(ar.size):
        x, rx = _value(am[:k], i), MP.mpf(float(ar[i]))
        y, ry = _value(bm[:k], i), MP.mpf(float(br[i]))
        if name == "div" and y - ry <= 0 <= y + ry:
            values = None  # no enclosure exists: only inf or NaN radii, or a range error
        else:
            values = [f(p, q) for p in (x - rx, x + rx) for q in (y - ry, y + ry)]
        finite = float(np.asarray(out.rad).reshape(-1)[i]) < math.inf
        if finite if values is None else not _encloses(out, i, values):
            one_a = Ball(am[:k, i : i + 1].copy(), ar[i : i + 1].copy())
            one_b = Ball(bm[:k, i : i + 1].copy(), br[i : i + 1].copy())
            run = lambda ba, p=one_a, q=one_b: fn(ba, p, q)  # noqa: E731
            if _certified(run, bits):
                misses.append((name, bits, float(am[0, i]), float(ar[i]), float(bm[0, i])))
    return misses


def test_seeded_property_unary() -> None:
    """600 balls per function (every regime, both precisions) are enclosed or flagged."""
    rng = np.random.default_rng(9)
    misses: list[tuple] = []
    for name in UNARY:
        for regime in MIDS.values():
            for bits in (100, 150):
                w0 = regime(rng, 20)
                misses += unary_misses(name, bits, _words(rng, w0), _radii(rng, 20))
    assert not misses, misses[:5]


def test_seeded_property_binary() -> None:
    """1440 pairs of balls from every pair of regimes per operation: enclosed or flagged."""
    rng = np.random.default_rng(19)
    names = list(MIDS)
    misses: list[tuple] = []
    for name in BINARY:
        for bits in (100, 150):
            for _ in range(24):
                ra, rb = rng.choice(names, 2)
                a = (_words(rng, MIDS[ra](rng, 30)), _radii(rng, 30))
                b = (_words(rng, MIDS[rb](rng, 30)), _radii(rng, 30))
                misses += binary_misses(name, bits, a, b)
    assert not misses, misses[:5]


@pytest.mark.parametrize("bits", [100, 150])
@pytest.mark.parametrize(
    "num_rad, den",
    [(2.0**-1074, 23.2), (7 * 2.0**-1074, 3.0), (2.0**-1022, 1.6e238), (2.0**-1023, 700.0)],
)
def test_zero_over_a_number_with_a_tiny_radius_is_not_a_proven_zero(
    bits: int, num_rad: float, den: float
) -> None:
    """(0 +- r) / d for a subnormal r / d: the quotient's radius must hold r / d, which rounds
    below 2**-1074 (to 0: a proven zero of a value that is not 0, with no range error)."""
    ba = BallArith(bits)
    num = Ball(np.zeros((ba.k, 1)), np.array([num_rad]))
    q = ba.div(num, ba.asarray(np.array([den])))
    assert ba.range_errors == 0
    assert not exact_zeros(q)[0], "a proven zero that is not"
    assert MP.mpf(float(q.rad[0])) >= MP.mpf(num_rad) / MP.mpf(den)


@pytest.mark.parametrize("bits", [100, 150])
@pytest.mark.parametrize("rad", [2.0**-1074, 5 * 2.0**-1074, 2.0**-1040])
def test_log1p_of_zero_with_a_subnormal_radius_encloses(bits: int, rad: float) -> None:
    """log1p(0 +- r) reaches log1p(-r) = -r - r^2/2 - ...: the tiny branch's ``bound 2**-200``
    underflows to 0 and ``r RU`` rounds to r, so the ball [-r, r] missed log1p(-r)."""
    ba = BallArith(bits)
    out = ba.log1p(Ball(np.zeros((ba.k, 1)), np.array([rad])))
    assert ba.range_errors == 0
    low = MP.log1p(-MP.mpf(rad))
    assert abs(low - _value(np.asarray(out.mid).reshape(ba.k, 1), 0)) <= MP.mpf(float(out.rad[0]))


@pytest.mark.parametrize("bits", [100, 150])
def test_out_of_domain_and_out_of_range_are_counted(bits: int) -> None:
    """What the property tests skip: log of <= 0, sqrt of < 0, exp beyond 700, and the
    saturated derivatives that underflow, each raise the range count."""
    cases: list[tuple[Fn, float]] = [
        (lambda ba, b: ba.log(b), 0.0),
        (lambda ba, b: ba.log(b), -1.0),
        (lambda ba, b: ba.sqrt(b), -1.0),
        (lambda ba, b: ba.exp(b), 700.5),
        (lambda ba, b: ba.exp(b), -600.0),  # exp below 2**-800
        (lambda ba, b: ba.tanh_deriv(b, ba.tanh(b)), 351.0),  # E clipped to 0: sech^2 {0}
        (lambda ba, b: ba.sigmoid(b), -701.0),  # sigmoid clipped to {0}
        (lambda ba, b: ba.sigmoid_deriv(b, ba.sigmoid(b)), 701.0),
    ]
    for fn, x in cases:
        ba = BallArith(bits)
        with np.errstate(all="ignore"):
            np.asarray(fn(ba, ba.asarray(np.array([x]))).rad)
        assert ba.range_errors > 0, x


_NAN_SCRIPT = """
import numpy as np
from fpgrad.arith.ball import Ball, BallArith
for bits in (100, 150):
    ba = BallArith(bits)
    mid = np.zeros((ba.k, 3))
    mid[0] = [np.nan, 1.0, -2.0]
    for name in ("exp", "tanh", "sigmoid"):
        before = ba.range_errors
        out = getattr(ba, name)(Ball(mid.copy(), np.zeros(3)))
        assert ba.range_errors - before >= 1, name  # the NaN is counted
        assert np.isnan(out.mid[0, 0]) and not np.isnan(out.mid[0, 1:]).any(), name
print("ok")
"""


def test_nan_midpoints_stay_inside_the_exp_tables(tmp_path: Any) -> None:
    """A NaN midpoint (counted upstream as a range error) gave the table look-ups of
    jit_elementary._reduce_block an index int(NaN) + J1, read out of bounds before attack 9 (numba checks no
    bounds): a crash or garbage read, not a certificate. Compiled here with bounds checks."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=root)
    run = subprocess.run(
        [sys.executable, "-c", _NAN_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


def _word_zero_bound_misses(out: Ball) -> int:
    """Elements whose words break ``|value| <= |w0| HI_BOUND`` and ``|w0| <= |value|
    HI_BOUND`` (every radius formula reads ``|w0|`` for ``|value|``), or whose zero word 0
    sits over non-zero words; exact rationals."""
    mid = np.asarray(out.mid).reshape(out.mid.shape[0], -1)
    hi = Fraction(2**48 + 1, 2**48)
    bad = 0
    for i in range(mid.shape[1]):
        ws = [float(w) for w in mid[:, i]]
        if not all(math.isfinite(w) for w in ws):
            continue
        value: Fraction = sum((Fraction(w) for w in ws), Fraction(0))
        w0 = Fraction(ws[0])
        bad += not (abs(value) <= abs(w0) * hi and abs(w0) <= abs(value) * hi)
    return bad


def test_outputs_keep_the_word_zero_bound() -> None:
    """The premise of the radius formulas, on the outputs of every kernel above over the
    regimes (ties of half an ulp in the lower words included)."""
    rng = np.random.default_rng(29)
    names = list(MIDS)
    bad = 0
    for bits in (100, 150):
        for _ in range(16):
            ra, rb = rng.choice(names, 2)
            a, b = _words(rng, MIDS[ra](rng, 24)), _words(rng, MIDS[rb](rng, 24))
            tie = rng.random(24) < 0.3
            a[1] = np.where(tie, np.array([math.ulp(x) / 2 if x else 0.0 for x in a[0]]), a[1])
            ba = BallArith(bits)
            x, y = Ball(a[: ba.k].copy(), np.zeros(24)), Ball(b[: ba.k].copy(), np.zeros(24))
            with np.errstate(all="ignore"):
                outs = [fn(ba, x, y) for fn, _ in BINARY.values()]
                outs += [
                    fn(ba, x) for name, (fn, _, _) in UNARY.items() if name not in ("log", "sqrt")
                ]
                outs += [ba.log(ba.abs(x)), ba.sqrt(ba.abs(x))]
                both = Ball(np.stack([a[: ba.k], b[: ba.k]], 1), np.zeros((2, 24)))
                outs.append(ba.sum(both, axis=0))
            bad += sum(_word_zero_bound_misses(o) for o in outs)
    assert bad == 0


@pytest.mark.parametrize("bits", [100, 150])
@pytest.mark.parametrize(
    "axis",
    [
        0,  # row after row: the finding (fixed)
        1,  # numpy's pairwise total keeps the small terms
    ],
)
def test_sum_radius_holds_its_bound_with_the_exact_magnitudes(bits: int, axis: int) -> None:
    """BallArith.sum's radius is proven as ``sum r_i + depth ETA sum |x_i|``; the float64
    total of |word 0| (row after row, or numpy's pairwise) loses up to (n - 1) 2**-53 of it:
    1 followed by 4095 terms 0.99 2**-53 sums to 1, 2**-41 below the exact total, which
    RU (2**-45) did not cover before attack 9. Checked in exact rationals against the bound."""
    n = 4096
    ba = BallArith(bits)
    col = np.full(n, 0.99 * 2.0**-53)
    col[0] = 1.0
    mid = np.zeros((ba.k, n, 2))
    mid[0] = col[:, None]
    a = Ball(mid, np.zeros((n, 2)))
    if axis == 1:
        a = Ball(np.ascontiguousarray(np.swapaxes(mid, 1, 2)), np.zeros((2, n)))
    out = ba.sum(a, axis=axis)
    depth = 12  # ceil(log2(4096))
    need = depth * Fraction(ba.eta) * sum(Fraction(float(v)) for v in col)
    assert all(Fraction(float(r)) >= need for r in np.ravel(out.rad))
