"""fpgrad.arith.arb_kernels: Arb products from object arrays, the balls of arb_mat bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from flint import arb, arb_mat, ctx

from fpgrad.arith import arb_kernels as K
from fpgrad.arith import arb_slices
from fpgrad.arith.arb import ArbArith


def _eq(x: arb, y: arb) -> bool:
    """Exactly the same value (NaN equal to NaN)."""
    return bool(x == y) or (x.is_nan() and y.is_nan())


def _same(got: np.ndarray, want: arb_mat) -> bool:
    return all(
        _eq(x.mid(), y.mid()) and _eq(x.rad(), y.rad())
        for x, y in zip(got.ravel(), want.entries(), strict=True)
    )


def _balls(rng: np.random.Generator, shape: tuple[int, int], kind: str) -> np.ndarray:
    """Inexact balls over a wide exponent range, exact float64 values and exact zeros."""
    vals = rng.standard_normal(shape) * np.exp2(rng.integers(-80, 80, shape))
    out = np.empty(shape, dtype=object)
    for idx, v in np.ndenumerate(vals):
        pick = rng.integers(4) if kind == "mixed" else 0
        out[idx] = [arb(v) / 7, arb(float(v)), arb(0), arb(v, abs(v) * 1e-30)][pick]
    return out


def test_kernel_loads() -> None:
    assert K.available()


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """FPGRAD_ARB_KERNELS=0 keeps python-flint's paths (a fresh decision, not the cached one)."""
    monkeypatch.setattr(K, "_state", {})
    monkeypatch.setenv(K.KERNELS_ENV, "0")
    assert not K.available()
    a = np.array([[arb(1), arb(2), arb(3)]], dtype=object)
    assert not K.usable(a, a.T.copy())


@pytest.mark.parametrize("prec", [53, 128, 300, 467, 1100])
@pytest.mark.parametrize("shape", [(64, 64, 32), (64, 10, 32), (10, 64, 32), (3, 3, 3), (1, 7, 40)])
def test_products_equal_arb_mat(prec: int, shape: tuple[int, int, int]) -> None:
    m, n, p = shape
    rng = np.random.default_rng(prec + m)
    old = ctx.prec
    ctx.prec = prec
    try:
        a, b = _balls(rng, (m, n), "mixed"), _balls(rng, (n, p), "mixed")
        want = arb_mat(a.tolist()) * arb_mat(b.tolist())
        assert K.usable(a, b)
        assert _same(K.matmul(a, b, prec), want)
        # transposed views (the backward's operands) and ArbArith's own product
        at = np.ascontiguousarray(a.T)
        assert _same(K.matmul(at.T, b, prec), want)
        assert _same(ArbArith(prec).matmul(at.T, b), want)
    finally:
        ctx.prec = old


def test_special_balls() -> None:
    """NaN and unbounded balls (arb_dot's simple path) come out as arb_mat's."""
    old = ctx.prec
    ctx.prec = 200
    try:
        rng = np.random.default_rng(3)
        a, b = _balls(rng, (5, 6), "mixed"), _balls(rng, (6, 4), "mixed")
        a[1, 2], b[3, 1] = arb("nan"), arb(0, float("inf"))
        got = K.matmul(a, b, 200)
        assert any(v.is_nan() for v in got.ravel()) and any(not v.is_finite() for v in got.ravel())
        assert _same(got, arb_mat(a.tolist()) * arb_mat(b.tolist()))
    finally:
        ctx.prec = old


def test_not_usable_where_arb_mat_differs() -> None:
    a = np.full((50, 50), arb(1), dtype=object)
    assert not K.usable(a, np.full((50, 50), arb(1), dtype=object))  # block product
    assert not K.usable(a[:, :2], np.full((2, 3), arb(1), dtype=object))  # inner dim <= 2
    sq = np.full((4, 4), arb(1), dtype=object)
    assert not K.usable(sq, sq)  # arb_mat squares A == B


def test_not_arb_elements() -> None:
    """An element that is not an arb ball: the kernel refuses before reading anything, and
    ArbArith's product converts it through arb_mat."""
    a = np.full((3, 4), arb(1) / 3, dtype=object)
    b = np.full((4, 2), arb(2), dtype=object)
    a[1, 1] = 5  # a Python int
    with pytest.raises(TypeError):
        K.matmul(a, b, 64)
    got = ArbArith(64).matmul(a, b)
    old = ctx.prec
    ctx.prec = 64
    try:
        assert _same(got, arb_mat(a.tolist()) * arb_mat(b.tolist()))
    finally:
        ctx.prec = old


@pytest.mark.parametrize(
    "cfg",
    [
        {"name": "adam", "lr": 1e-3},
        {"name": "adam", "lr": 1e-2, "weight_decay": 0.1, "decoupled": True},
        {"name": "adam", "lr": 1e-2, "weight_decay": 0.1},
        {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    ],
)
def test_exact_run_unchanged(monkeypatch: pytest.MonkeyPatch, cfg: dict) -> None:
    """A few steps of a small ReLU classifier: the same balls (parameters, Adam's m and v)
    and the same float64 history with the kernels and without them."""
    from fpgrad.run.optim import OptimConfig
    from fpgrad.training import ExactRun, batch_schedule
    from tests.nets import net_from

    rng = np.random.default_rng(5)
    layers = [
        {"type": "dense", "out": 8, "init": "he_normal"},
        {"type": "relu"},
        {"type": "dense", "out": 4},
    ]
    x = (rng.integers(0, 17, (12, 6)) / 16).tolist()
    net = net_from(layers, "cross_entropy", x, rng.integers(0, 4, 12).tolist(), seed=2)
    schedule = batch_schedule(12, 5, 6, 0)
    runs, calls = [], []
    real, fast = K.matmul, ArbArith.adam_update
    monkeypatch.setattr(arb_slices, "MIN_PREC", 10**9)  # arb_dot's products, not the slices'
    for use in (True, False):
        if use:
            monkeypatch.setattr(K, "matmul", lambda *args: calls.append("mm") or real(*args))
            monkeypatch.setattr(
                ArbArith, "adam_update", lambda *args: calls.append("adam") or fast(*args)
            )
        else:  # every kernel off: arb_mat, one ufunc per operation, Python floats
            monkeypatch.setattr(K, "available", lambda: False)
        run = ExactRun(net, OptimConfig(**cfg), 300)
        for rows in schedule:
            run.step(rows)
        runs.append(run)
    assert "mm" in calls and (("adam" in calls) == (cfg["name"] == "adam"))
    assert runs[0].history.loss == runs[1].history.loss
    assert all(np.array_equal(a, b) for a, b in zip(*(r.history.params for r in runs), strict=True))
    assert runs[0].history.dead_units == runs[1].history.dead_units
    for which in ("params", "m", "v"):
        got = runs[0].params if which == "params" else getattr(runs[0].opt, which)
        want = runs[1].params if which == "params" else getattr(runs[1].opt, which)
        assert got.keys() == want.keys()
        for k, v in got.items():
            pairs = zip(v.ravel(), want[k].ravel(), strict=True)
            assert all(a.mid() == b.mid() and a.rad() == b.rad() for a, b in pairs)


def test_adam_update_declines() -> None:
    """A second moment whose ball reaches below 0 (ArbArith.sqrt cuts it) or an element
    that is not an arb ball: None, the optimizer's own operations instead."""
    ar = ArbArith(128)
    ones = np.full((2, 3), arb(1) / 3, dtype=object)
    scal = [arb(0.9), arb(0.1), arb(0.999), arb(0.001), arb(1), arb(1e-8), arb(1e-3)]
    assert ar.adam_update(ones, ones, ones, ones, scal) is not None
    g = ones.copy()
    g[0, 1] = arb(0, 1e-3)  # g * g reaches below 0
    assert ar.adam_update(ones, np.full((2, 3), arb(0), dtype=object), g, ones, scal) is None
    w = ones.copy()
    w[1, 2] = 0.5
    assert ar.adam_update(ones, ones, ones, w, scal) is None


def test_floats_and_signs_as_python_flint() -> None:
    """float(ball) and the sign tests of ArbArith.positive, element by element, on balls of
    every kind (ties, huge, tiny, zero, straddling 0, NaN, unbounded) and several shapes."""
    rng = np.random.default_rng(7)
    old = ctx.prec
    ctx.prec = 300
    try:
        tie = arb(2) ** -53
        vals = [arb(1) + tie, arb(1) + 3 * tie, arb(-1) - tie * (1 + tie), arb(2) ** -1075]
        vals += [arb(2) ** 1100, -(arb(2) ** 1100), arb(0), arb(0, 1e-9), arb("nan")]
        vals += [arb(0, float("inf")), arb(3, float("inf")), -(arb(2) ** -1074)]
        vals += [arb(v) / 3 for v in rng.standard_normal(40)]
        arr = np.array(vals, dtype=object)
        for a in (arr, arr[:50].reshape(5, 10), arr[:50].reshape(5, 10).T, arr[3:4].reshape(())):
            want = np.array([float(x) for x in a.ravel()]).reshape(a.shape)
            got = K.to_float64(a)
            assert got is not None and np.array_equal(got, want, equal_nan=True)
            assert np.array_equal(ArbArith(64).to_float64(a), want, equal_nan=True)
            both = K.signs(a, arb(0))
            assert both is not None
            assert both[0].tolist() == np.vectorize(lambda x: bool(x > 0))(a).tolist()
            assert both[1].tolist() == np.vectorize(lambda x: bool(x <= 0))(a).tolist()
        mask = ArbArith(64).positive(arr)
        assert mask.tolist() == [bool(x > 0) for x in vals]
        assert mask.unsure.tolist() == [not (x > 0) and not (x <= 0) for x in vals]
        assert K.to_float64(np.array([arb(1), 2.0], dtype=object)) is None  # not all arb
    finally:
        ctx.prec = old


def test_direct_matmul_loads_or_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """matmul called before anything loaded the kernels loads them (no KeyError), and refuses
    in one exception where they are off."""
    a = np.array([[arb(1), arb(2), arb(3)]], dtype=object)
    b = np.array([[arb(4)], [arb(5)], [arb(6)]], dtype=object)
    monkeypatch.setattr(K, "_state", {})
    assert K.matmul(a, b, 64)[0, 0] == 32
    monkeypatch.setattr(K, "_state", {})
    monkeypatch.setenv(K.KERNELS_ENV, "0")
    with pytest.raises(RuntimeError, match="not available"):
        K.matmul(a, b, 64)
