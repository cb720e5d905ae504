"""fpgrad.arith.arb_slices: Arb products through exact float64 slices enclose the exact ones."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from flint import arb, arb_mat, ctx

from fpgrad.arith import arb_slices as S
from fpgrad.arith.arb import ArbArith
from tests.arb_exact import engine as _engine
from tests.arb_exact import q as _q
from tests.arb_exact import r as _r

pytestmark = pytest.mark.skipif(S._jit() is None, reason="no compiled Arb kernels here")


def _balls(rng: np.random.Generator, shape: tuple[int, int], prec: int, spread: int) -> np.ndarray:
    """Inexact full-precision balls, exact small integers, exact zeros, zero midpoints with a
    radius and balls wider than their midpoints, over 2**+-spread."""
    old = ctx.prec
    ctx.prec = prec
    try:
        out = np.empty(shape, dtype=object)
        for idx in np.ndindex(shape):
            v = float(rng.standard_normal())
            e = int(rng.integers(-spread, spread + 1))
            kind = int(rng.integers(6))
            if kind == 0:
                out[idx] = arb(v) * arb(2) ** e / 3 + arb(0, 2.0 ** (e - prec + 4))
            elif kind == 1:
                out[idx] = arb(int(rng.integers(-16, 17)))
            elif kind == 2:
                out[idx] = arb(0)
            elif kind == 3:
                out[idx] = arb(0, 2.0 ** (e - prec))
            elif kind == 4:
                out[idx] = arb(v) * arb(2) ** e / 7
            else:
                out[idx] = arb(arb(v) * arb(2) ** e / 5, abs(v) * 2.0 ** (e + 1))
        return out
    finally:
        ctx.prec = old


def _points(
    rng: np.random.Generator, a: np.ndarray, corners: int
) -> list[np.ndarray]:  # a list of exact matrices in the balls: midpoints, then corners
    mids = np.vectorize(_q, otypes=[object])(a)
    rads = np.vectorize(_r, otypes=[object])(a)
    out = [mids]
    for _ in range(corners):
        signs = rng.choice([-1, 1], size=a.shape)
        out.append(mids + signs * rads)
    return out


def _encloses(got: np.ndarray, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> None:
    for pa in _points(rng, a, 3):
        for pb in _points(rng, b, 3):
            want = pa @ pb
            for idx in np.ndindex(want.shape):
                ball = got[idx]
                assert abs(_q(ball) - want[idx]) <= _r(ball), (idx, ball, float(want[idx]))


@pytest.mark.parametrize("prec", [128, 300, 467, 960, 1200])
@pytest.mark.parametrize("spread", [0, 40, 400])
def test_encloses_every_product_of_points_in_the_balls(prec: int, spread: int) -> None:
    rng = np.random.default_rng([prec, spread])
    for m, n, p in ((3, 5, 4), (1, 7, 1), (4, 1, 3), (2, 33, 3)):
        a = _balls(rng, (m, n), prec, spread)
        b = _balls(rng, (n, p), prec, spread)
        got = _engine(a, b, prec)
        if got is None:  # radii over 1,000 binades in a row: declined where a floor could show
            assert prec + S.GUARD > S.FLOORED_PRECS
            continue
        _encloses(got, a, b, rng)


def test_declines_above_the_floors_precision_only_where_a_floor_was_hit() -> None:
    """Above FLOORED_PRECS, radii 1,100 binades apart in a row decline; uniform radii (the
    exact run's balls) do not."""
    prec = 1200
    ctx.prec = prec
    try:
        third = arb(1) / 3
        wide = np.array([[third + arb(0, 2.0**-10), third + arb(0, 2.0**-1110)]], dtype=object)
        even = np.array([[third + arb(0, 2.0**-1190), third + arb(0, 2.0**-1195)]], dtype=object)
        b = np.array([[arb(3)], [arb(5)]], dtype=object)
    finally:
        ctx.prec = 53
    assert S.matmul(wide, b, prec) is None
    got = S.matmul(even, b, prec)
    assert got is not None
    _encloses(got, even, b, np.random.default_rng(0))


def test_exact_operands_give_exact_products() -> None:
    """Small integers and float64 values times the same: every slice pair kept, radius 0,
    the exact integer or dyadic product (as arb_mat gives it)."""
    rng = np.random.default_rng(3)
    a = np.array([arb(int(v)) for v in rng.integers(-16, 17, 60)], dtype=object).reshape(6, 10)
    floats = rng.standard_normal(40) * np.exp2(rng.integers(-20, 20, 40))
    b = np.array([arb(float(v)) for v in floats], dtype=object).reshape(10, 4)
    got = S.matmul(a, b, 300)
    assert got is not None
    want = np.vectorize(_q, otypes=[object])(a) @ np.vectorize(_q, otypes=[object])(b)
    for x, y in zip(got.ravel(), want.ravel(), strict=True):
        assert x.rad() == 0 and _q(x) == y


def test_zero_rows_and_columns_stay_exact_zeros() -> None:
    """A dead ReLU row: the product is exactly 0 (no cut bound where no term is non-zero)."""
    ctx.prec = 467
    try:
        a = np.array([[arb(1) / 3, arb(2) / 7], [arb(0), arb(0)]], dtype=object)
        b = np.array([[arb(5) / 11, arb(0)], [arb(1) / 13, arb(0)]], dtype=object)
    finally:
        ctx.prec = 53
    got = _engine(a, b, 467)
    assert got is not None
    assert got[1, 0] == 0 and got[1, 0].rad() == 0
    assert got[0, 1] == 0 and got[0, 1].rad() == 0
    assert got[0, 0].rad() > 0  # truncated operands: a bound, not zero


def test_as_sharp_as_arb_mat() -> None:
    """Full-precision balls of similar magnitudes: the midpoint error is far below the
    working precision, so the radii are those the inputs' radii give (arb_mat's, to 1%)."""
    rng = np.random.default_rng(5)
    prec = 467
    ctx.prec = prec
    try:
        vals = rng.standard_normal((2, 20, 20))
        a = np.array([arb(v) / 3 + arb(0, 2.0 ** -(prec - 20)) for v in vals[0].ravel()])
        b = np.array([arb(v) / 7 for v in vals[1].ravel()])
        a, b = a.astype(object).reshape(20, 20), b.astype(object).reshape(20, 20)
        want = arb_mat(a.tolist()) * arb_mat(b.tolist())
    finally:
        ctx.prec = 53
    got = _engine(a, b, prec)
    assert got is not None
    for x, y in zip(got.ravel(), want.entries(), strict=True):
        assert x.overlaps(y)
        assert _r(x) <= Fraction(101, 100) * _r(y) + Fraction(1, 2 ** (prec - 2))


@pytest.mark.parametrize(
    "bad", [arb("nan"), arb("inf"), arb(1, "inf"), arb(2) ** (2**41), arb(2) ** -(2**41)]
)
def test_declines_what_it_cannot_read(bad: arb) -> None:
    a = np.array([[arb(1), bad]], dtype=object)
    b = np.array([[arb(3)], [arb(5)]], dtype=object)
    assert S.matmul(a, b, 200) is None
    assert S.matmul(b.T.copy(), a.T.copy(), 200) is None


def test_declines_objects_that_are_not_balls() -> None:
    a = np.array([[1, 2]], dtype=object)
    b = np.array([[arb(3)], [arb(5)]], dtype=object)
    assert S.matmul(a, b, 200) is None


@pytest.mark.parametrize("n", [1, 10, 64, 1000, 100_000])
@pytest.mark.parametrize("prec", [128, 467, 1200])
def test_plan_keeps_products_exact_and_within_guard(n: int, prec: int) -> None:
    for wa, wb in ((5, 5), (5, 10_000), (10_000, 10_000), (0, 300)):
        pl = S.plan(n, prec, wa, wb)
        assert pl is not None
        beta, ta, tb, last, eps = pl
        assert n * max(1, min(ta, tb)) * (2**beta - 1) ** 2 < 2**53
        assert eps <= Fraction(1, 2 ** (prec + S.GUARD))
        if ta and tb and wa <= ta * beta and wb <= tb * beta and eps == 0:
            assert last == ta + tb - 2  # exact operands: every diagonal kept


def test_arbarith_takes_slices_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = S.matmul

    def spy(a: np.ndarray, b: np.ndarray, prec: int) -> np.ndarray | None:
        calls.append(prec)
        return real(a, b, prec)

    monkeypatch.setattr(S, "matmul", spy)
    rng = np.random.default_rng(9)
    a = _balls(rng, (4, 6), 300, 10)
    b = _balls(rng, (6, 3), 300, 10)
    plain = ArbArith(300).matmul(a, b)
    assert calls == []
    ctx.prec = 300
    try:
        want = arb_mat(a.tolist()) * arb_mat(b.tolist())
    finally:
        ctx.prec = 53
    assert all(_q(x) == _q(y) for x, y in zip(plain.ravel(), want.entries(), strict=True))
    got = ArbArith(300, slice_products=True).matmul(a, b)
    assert calls == [300]
    _encloses(got, a, b, rng)
    ArbArith(S.MIN_PREC - 1, slice_products=True).matmul(a, b)
    assert calls == [300]


def test_full_operands_outside_their_precisions_keep_arb_dot() -> None:
    """Two full-precision operands above FULL_PRECS: declined (arb_dot is faster there);
    a narrow operand (small integers) still takes the slices."""
    rng = np.random.default_rng(11)
    prec = S.FULL_PRECS[1] + 200
    ctx.prec = prec
    try:
        full = np.array([arb(float(v)) / 3 for v in rng.standard_normal(12)], dtype=object)
    finally:
        ctx.prec = 53
    ints = np.array([arb(int(v)) for v in rng.integers(0, 17, 12)], dtype=object)
    assert S.matmul(full.reshape(3, 4), full.reshape(4, 3), prec) is None
    got = S.matmul(ints.reshape(3, 4), full.reshape(4, 3), prec)
    assert got is not None
    _encloses(got, ints.reshape(3, 4), full.reshape(4, 3), rng)


def test_exact_training_run_with_slice_products(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact run takes the slice products: its parameter balls after a few Adam steps
    overlap those of the same run on arb_dot's products, with about as many certified digits."""
    from fpgrad.run.optim import OptimConfig
    from fpgrad.training import ExactRun, batch_schedule
    from tests.nets import net_from

    calls: list[int] = []
    real = S.matmul
    monkeypatch.setattr(S, "matmul", lambda a, b, prec: calls.append(prec) or real(a, b, prec))
    rng = np.random.default_rng(5)
    layers = [{"type": "dense", "out": 8, "init": "he_normal"}, {"type": "relu"}]
    layers.append({"type": "dense", "out": 4})
    x = (rng.integers(0, 17, (12, 6)) / 16).tolist()
    net = net_from(layers, "cross_entropy", x, rng.integers(0, 4, 12).tolist(), seed=2)
    runs = []
    for slices in (True, False):
        run = ExactRun(net, OptimConfig(name="adam", lr=1e-2), 300)
        assert run.ar.slice_products  # the exact run's default
        run.ar.slice_products = slices
        for rows in batch_schedule(12, 6, 6, 0):
            run.step(rows)
        runs.append(run)
    assert calls and all(p == 300 for p in calls)
    for k, v in runs[0].params.items():
        for x_, y_ in zip(v.ravel(), runs[1].params[k].ravel(), strict=True):
            assert x_.overlaps(y_)
    assert abs(runs[0].digits_now() - runs[1].digits_now()) < 1.0


def test_switched_off_with_the_arb_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """FPGRAD_ARB_KERNELS=0 also keeps FLINT's own products (the slices read the balls'
    memory as the kernels do): a fresh decision, not the cached one."""
    from fpgrad.arith import arb_kernels as K

    monkeypatch.setattr(K, "_state", {})
    monkeypatch.setattr(S, "_state", {})
    monkeypatch.setenv(K.KERNELS_ENV, "0")
    a = np.array([[arb(1), arb(2), arb(3)]], dtype=object)
    assert S.matmul(a, a.T.copy(), 200) is None
    got = ArbArith(200, slice_products=True).matmul(a, a.T.copy())
    assert got[0, 0] == 14
