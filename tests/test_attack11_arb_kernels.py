"""Adversarial round 11: the compiled Arb kernels (fpgrad.arith.arb_kernels, jit_arb).

Oracles: python-flint's own arithmetic (arb_mat products, the arb operations of the
optimizer's Python path in their order, float(), the comparisons) and mpmath at 3000 bits
for enclosure; never the kernels themselves. Balls are compared by ``arb.repr()``, an exact
round trip of midpoint and radius. Cases that could crash the interpreter run in a
subprocess.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mpmath
import numpy as np
import pytest
from flint import acb, arb, arb_mat, arf, ctx, fmpq, fmpz

from fpgrad.arith import arb_kernels as K
from fpgrad.arith.arb import ArbArith

ROOT = Path(__file__).resolve().parents[1]


class SubArb(arb):
    """A subclass of arb: python-flint accepts it, the kernels must not read it as arb."""


def _reprs(values: object) -> list[str]:
    return [x.repr() for x in np.ravel(np.asarray(values, dtype=object))]


def _arb_mat(a: np.ndarray, b: np.ndarray, prec: int) -> list[str]:
    """python-flint's product at ``prec`` (the oracle)."""
    old = ctx.prec
    ctx.prec = prec
    try:
        return [x.repr() for x in (arb_mat(a.tolist()) * arb_mat(b.tolist())).entries()]
    finally:
        ctx.prec = old


def _objs(shape: tuple[int, ...], make: Callable[[int], arb]) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    for k, idx in enumerate(np.ndindex(*shape)):
        out[idx] = make(k)
    return out


def _plain(shape: tuple[int, ...], seed: int = 0, prec: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    old = ctx.prec
    ctx.prec = prec
    try:
        return _objs(shape, lambda k: arb(float(rng.standard_normal())) / 7)
    finally:
        ctx.prec = old


def _check_product(a: np.ndarray, b: np.ndarray, prec: int, expect_usable: bool) -> None:
    want = _arb_mat(a, b, prec)
    assert K.usable(a, b) == expect_usable
    if expect_usable:
        assert _reprs(K.matmul(a, b, prec)) == want
    assert _reprs(ArbArith(prec).matmul(a, b)) == want


#: exponents that FLINT keeps as pointers to GMP integers (not inline words), and specials
HUGE = [
    arb((3, 2**70)),
    arb((5, -(2**66))),
    arb((-7, 2**70 + 5), (1, 2**70 - 100)),
    arb(0, (1, 2**70)),
    arb((1, -(2**66)), (1, -(2**66) - 3)),
]
SPECIAL = [
    arb(0),
    arb(-0.0),
    arb("nan"),
    arb(float("inf")),
    arb(float("-inf")),
    arb(0, float("inf")),
    arb(1, float("inf")),
    arb(0, 1),
    arb(0, (1, -(2**66))),
]


def test_kernels_loaded() -> None:
    assert K.available()


@pytest.mark.parametrize("prec", [53, 128, 300, 5000])
def test_huge_exponents_and_long_mantissas(prec: int) -> None:
    a, b = _plain((3, 5), 1), _plain((5, 4), 2)
    a[0, 0], a[1, 1], a[2, 2], b[0, 0], b[4, 3] = HUGE
    b[1, 1] = arb((1, 2**69)) / 3
    _check_product(a, b, prec, True)
    old = ctx.prec
    ctx.prec = 5000  # 5000-bit mantissas (heap limbs) read at any working precision
    try:
        lm = _objs((4, 6), lambda k: arb(1) / (3 + 7 * k))
        lm2 = _objs((6, 3), lambda k: arb.pi() * (k - 5) / (11 + k))
    finally:
        ctx.prec = old
    _check_product(lm, lm2, prec, True)


def test_special_balls_everywhere() -> None:
    """Every pair of special balls (zeros, -0, NaN, infinities, unbounded and radius-only
    balls) inside a product, and matrices of only zeros or only radii."""
    for s in SPECIAL:
        for t in SPECIAL:
            a, b = _plain((3, 3), 3), _plain((3, 4), 4)
            a[1, 1], b[1, 2], a[0, 0] = s, t, t
            assert _reprs(K.matmul(a, b, 64)) == _arb_mat(a, b, 64)
    zeros = np.full((3, 4), arb(0), dtype=object)
    _check_product(zeros, zeros.T.copy(), 64, True)
    radii = _objs((3, 4), lambda k: arb(0, 2.0**-k))
    _check_product(radii, radii.T.copy(), 200, True)


def test_products_enclose_the_exact_value() -> None:
    """mpmath at 3000 bits (exact here): the exact product of the midpoints lies in every
    ball, for exact inputs and for inexact ones (the midpoints are points of the balls)."""
    rng = np.random.default_rng(9)
    vals = rng.standard_normal((2, 6, 6)) * np.exp2(rng.integers(-200, 200, (2, 6, 6)))
    mp = mpmath.MPContext()
    mp.prec = 3000

    def exact(x: arb) -> mpmath.mpf:
        man, exp = x.man_exp()
        return mp.mpf((int(man), int(exp)))

    for inexact in (False, True):
        a = np.array([arb(x) / (3 if inexact else 1) for x in vals[0, :4].ravel()]).reshape(4, 6)
        b = np.array([arb(x) / (7 if inexact else 1) for x in vals[1, :, :5].ravel()])
        b = b.reshape(6, 5)
        got = K.matmul(a, b, 64)
        for i in range(4):
            for j in range(5):
                true = mp.fsum(exact(a[i, k].mid()) * exact(b[k, j].mid()) for k in range(6))
                mid, rad = exact(got[i, j].mid()), exact(got[i, j].rad())
                assert abs(mid - true) <= rad
                assert inexact or rad <= abs(true) * mp.ldexp(1, -60)


def test_layouts_and_shared_elements() -> None:
    a, b = _plain((5, 7), 5), _plain((7, 6), 6)
    big = _plain((8, 8), 7)
    one = np.full((4, 4), arb(1) / 3, dtype=object)  # the same object in every cell
    cases = [
        (a[::-1], b),
        (a[:, ::-1], b[::-1]),
        (_plain((10, 7), 8)[::2], _plain((7, 12), 9)[:, ::2]),
        (np.asfortranarray(a), np.asfortranarray(b)),
        (np.ascontiguousarray(a.T).T, np.ascontiguousarray(b.T).T),
        (big[:4, :], big[:, :3]),
        (big, big.T),
        (big, big[:, :]),
        (one, one[:, :]),
    ]
    for x, y in cases:
        _check_product(x, y, 64, True)
    assert not K.usable(big, big)  # A == B: arb_mat may square
    _check_product(big[:3, :3].copy(), big[:3, :3].copy(), 2000, True)


@pytest.mark.parametrize(
    ("shape", "usable"),
    [
        ((40, 41, 41), True),
        ((41, 40, 41), True),
        ((41, 41, 40), True),
        ((41, 41, 41), False),
        ((3, 2, 3), False),
        ((3, 3, 3), True),
        ((1, 3, 1), True),
    ],
)
def test_cutoffs(shape: tuple[int, int, int], usable: bool) -> None:
    m, n, p = shape
    a, b = _plain((m, n), m), _plain((n, p), p)
    for prec in (64, 129, 600):
        _check_product(a, b, prec, usable)


def test_wrong_types_fall_back() -> None:
    """Anything that is not exactly an arb ball: the kernels refuse (TypeError, None) and
    ArbArith gives python-flint's own answer (or its own error)."""
    a, b = _plain((3, 4), 10), _plain((4, 2), 11)
    for bad in [acb(1, 2), fmpq(1, 3), 0.5, 3, None, SubArb(1), arf(2), fmpz(5), np.float64(2)]:
        x = a.copy()
        x[1, 2] = bad
        with pytest.raises(TypeError):
            K.matmul(x, b, 64)
        try:
            want: object = _arb_mat(x, b, 64)
        except TypeError as err:
            want = type(err)
        try:
            got: object = _reprs(ArbArith(64).matmul(x, b))
        except TypeError as err:
            got = type(err)
        assert got == want
        row = np.array([arb(1), bad, arb(-2)], dtype=object)
        assert K.to_float64(row) is None and K.signs(row, arb(0)) is None
    assert K.signs(a, 0) is None  # type: ignore[arg-type]


def test_floats_and_signs_of_hostile_balls() -> None:
    vals = [*SPECIAL, *HUGE, arb(2.0**-1075), arb(2.0**1023) * 2, arb(1) + arb(2) ** -53]
    old = ctx.prec
    ctx.prec = 5000
    try:
        vals += [arb(1) / 3, -arb.pi() * 2**1100, arb(2) ** -1074 * (1 + arb(2) ** -4000)]
    finally:
        ctx.prec = old
    arr = np.array(vals, dtype=object)
    m = _plain((4, 5), 12)
    for x in (arr, arr.reshape(-1, 1)[::-1], m.T, m[::-1, ::2], np.asfortranarray(m), m[:0]):
        got = K.to_float64(x)
        want = np.array([float(v) for v in x.ravel()]).reshape(x.shape)
        assert got is not None
        assert np.array_equal(got, want, equal_nan=True)
        assert np.array_equal(np.signbit(got), np.signbit(want))
        both = K.signs(x, arb(0))
        assert both is not None
        assert both[0].ravel().tolist() == [bool(v > 0) for v in x.ravel()]
        assert both[1].ravel().tolist() == [bool(v <= 0) for v in x.ravel()]


def _adam_ref(ar: ArbArith, m: Any, v: Any, g: Any, w: Any, s: list[arb]) -> tuple[Any, ...]:
    """ArithOptimizer.step's Python path for Adam, through ArbArith's operations."""
    b1, c1, b2, c2, sb, eps, rate = s
    m2 = ar.add(ar.mul(m, b1), ar.mul(g, c1))
    v2 = ar.add(ar.mul(v, b2), ar.mul(ar.mul(g, g), c2))
    den = ar.add(ar.div(ar.sqrt(v2), sb), eps)
    u = ar.mul(rate, ar.div(m2, den))
    return m2, v2, u, ar.sub(w, u)


def _scalars() -> list[arb]:
    old = ctx.prec
    ctx.prec = 300
    try:
        b1, b2 = arb(0.9), arb(0.999)
        return [b1, 1 - b1, b2, 1 - b2, (1 - b2**3).sqrt(), arb(1e-8), arb(1e-3) / (1 - b1**3)]
    finally:
        ctx.prec = old


def test_adam_hostile_inputs() -> None:
    s = _scalars()
    m, g, w = _plain((3, 4), 13), _plain((3, 4), 14), _plain((3, 4), 15)
    v = _objs((3, 4), lambda k: (arb(k + 1) / 3) ** 2)
    one = np.full(4, arb(1), dtype=object)
    hm = np.array(HUGE[:2] + [arb(0), arb(1)], dtype=object)
    hv = np.array([arb((9, 2**71)), arb((25, -(2**67))), arb((1, 2**70), (1, 2**69)), arb(0)])
    nan = np.array([arb("nan"), arb(float("inf")), arb(0, float("inf")), arb(1)], dtype=object)
    x = arb(1) / 3
    cases = [
        (53, (m, v, g, w)),
        (5000, (m, v, g, w)),
        (300, (np.asfortranarray(m), v.T.copy().T, g[::-1][::-1], w)),
        (300, (m.T, v.T, np.ascontiguousarray(g.T), np.asfortranarray(w.T))),
        (300, tuple(t[0, :1].reshape(()) for t in (m, v, g, w))),  # 0-d
        (300, (g, v, g, g)),  # shared arrays
        (300, tuple(np.full((2, 3), x, dtype=object) for _ in range(4))),  # one object
        (300, tuple(np.full(3, c, dtype=object) for c in (s[0], s[2], s[5], s[6]))),
        (300, (hm, hv.astype(object), hm[::-1].copy(), hm)),  # pointer exponents
        (5000, (hm, hv.astype(object), hm[::-1].copy(), hm)),
        (300, (nan, one, one, nan)),  # NaN and infinities in m and w
        (300, (one, np.full(4, arb(0, (1, -(2**66))) ** 2, dtype=object), one, one)),
    ]
    for prec, (mm, vv, gg, ww) in cases:
        ar = ArbArith(prec)
        got = ar.adam_update(mm, vv, gg, ww, s)
        want = _adam_ref(ar, mm, vv, gg, ww, s)
        if got is None:  # declined: only where the Python path cuts v below 0
            assert not all(bool(t >= 0) for t in np.ravel(want[1]))
            continue
        for x1, y1 in zip(got, want, strict=True):
            assert np.shape(x1) == np.shape(y1) and _reprs(x1) == _reprs(y1)


def test_user_precision_and_threads_setting() -> None:
    """The kernels take ArbArith's precision, not the context's; several FLINT threads
    (arb_mat_mul may go threaded) make the product unusable; the context is left alone."""
    a, b = _plain((5, 6), 16), _plain((6, 4), 17)
    old, threads = ctx.prec, ctx.threads
    try:
        for user in (2, 53, 777, 20000):
            ctx.prec = user
            assert _reprs(ArbArith(300).matmul(a, b)) == _arb_mat(a, b, 300)
            assert ctx.prec == user
        ctx.threads = 2
        assert not K.usable(a, b)
        assert _reprs(ArbArith(300).matmul(a, b)) == _arb_mat(a, b, 300)
        assert ctx.threads == 2
    finally:
        ctx.prec, ctx.threads = old, threads
    assert K.usable(a, b)


def test_results_own_their_references() -> None:
    """Fresh, distinct result objects with the refcounts of fresh objects; inputs' refcounts
    unchanged; results survive the inputs' deletion and collection, also under a gc storm."""
    a = _objs((4, 5), lambda k: arb((k + 1, 2**70)) / 3)
    b = _plain((5, 3), 18, prec=300)
    want = _arb_mat(a, b, 80)
    before = [sys.getrefcount(x) for x in [*a.ravel(), *b.ravel()]]
    out = K.matmul(a, b, 80)
    for _ in range(50):
        K.matmul(a, b, 80), K.to_float64(a), K.signs(a, arb(0))
        K.adam_update(a, a * a, a, a, _scalars(), 80)
    assert [sys.getrefcount(x) for x in [*a.ravel(), *b.ravel()]] == before
    assert len({id(x) for x in out.ravel()}) == out.size
    fresh = [arb(1) / 3]  # held by a list only, as the results below
    kept = list(out.ravel())
    del a, b, out
    gc.collect()
    assert {sys.getrefcount(x) for x in kept} == {sys.getrefcount(x) for x in fresh}
    assert _reprs(kept) == want
    storm: list[int] = []

    def hook(phase: str, info: dict) -> None:
        if phase == "start":
            storm.append(len([arb(i) / 3 for i in range(5)]))

    gc.callbacks.append(hook)
    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        for _ in range(30):
            x, y = _plain((4, 5), 19, prec=300), _plain((5, 3), 20, prec=300)
            assert _reprs(K.matmul(x.T.copy().T, y[::-1][::-1], 53)) == _arb_mat(x, y, 53)
    finally:
        gc.callbacks.remove(hook)
        gc.set_threshold(*thresholds)
    assert storm


def test_two_python_threads() -> None:
    errors: list[int] = []
    lock = threading.Lock()  # the oracle sets the global context precision

    def work(seed: int) -> None:
        for k in range(60):
            with lock:  # _plain sets the global precision too (unlocked, it raced the oracle's)
                x, y = _plain((5, 6), seed + k), _plain((6, 4), seed + 1000 + k)
            got = _reprs(K.matmul(x, y, 64 + seed))
            fl = K.to_float64(x)
            with lock:
                want = _arb_mat(x, y, 64 + seed)
            if got != want or fl is None or fl.ravel().tolist() != [float(v) for v in x.ravel()]:
                errors.append(seed)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in (0, 100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_no_leak() -> None:
    """Results with heap limbs and pointer exponents, 20000 rounds of every kernel: resident
    memory flat (a leak of the results' limbs would be ~60 MB)."""
    old = ctx.prec
    ctx.prec = 2000
    try:
        a = _objs((2, 3), lambda k: [arb((3 + k, 2**70)) / 7, arb(1) / 7, HUGE[4]][k % 3])
        b = _objs((3, 2), lambda k: arb(1) / (k + 3))
        m = np.array([arb(1) / 3, arb((1, 2**70)) / 3], dtype=object)
        v = m * m
    finally:
        ctx.prec = old
    s = _scalars()

    def rounds(n: int) -> None:
        for _ in range(n):
            K.matmul(a, b, 1500), K.adam_update(m, v, m, m, s, 1500)
            K.to_float64(a), K.signs(a, s[0])

    rounds(2000)
    gc.collect()
    start = _rss_kib()
    rounds(20000)
    gc.collect()
    assert _rss_kib() - start < 4096


def _isolated(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a segfault there is a return code here)."""
    head = "import numpy as np\nfrom flint import arb\nfrom fpgrad.arith import arb_kernels as K\n"
    head += "from fpgrad.arith.arb import ArbArith\nassert K.available()\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", head + code], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def test_incompatible_shapes_raise_as_arb_mat() -> None:
    """a (m x n) @ b (n' x p) with n != n': arb_mat raises ValueError. The kernel read
    only b's first n rows (n < n': a silent wrong product) or past b's pointers (n > n':
    a segfault)."""
    a = np.full((2, 3), arb(1) / 3, dtype=object)
    b = _plain((4, 2), 21)
    with pytest.raises(ValueError):
        _arb_mat(a, b, 64)
    assert not K.usable(a, b)
    with pytest.raises(ValueError):
        ArbArith(64).matmul(a, b)
    run = _isolated(
        "a = np.full((2, 6), arb(1) / 3, dtype=object)\n"
        "b = np.full((3, 2), arb(2) / 7, dtype=object)\n"
        "try:\n    ArbArith(64).matmul(a, b)\nexcept ValueError:\n    print('ValueError')\n"
    )
    assert run.returncode == 0 and run.stdout.strip() == "ValueError", run.stderr[-500:]


def test_numeric_arrays_refused() -> None:
    """The module's public functions on float or int arrays: their values were read as
    object pointers (a segfault at address 8); usable() said True."""
    assert not K.usable(np.zeros((3, 3)), np.zeros((3, 3)))
    run = _isolated(
        "print(K.to_float64(np.zeros(3)), K.signs(np.arange(3), arb(0)))\n"
        "try:\n    K.matmul(np.zeros((3, 3)), np.ones((3, 3)), 64)\n"
        "except TypeError:\n    print('TypeError')\n"
    )
    assert run.returncode == 0 and run.stdout.split() == ["None", "None", "TypeError"], run.stderr[
        -500:
    ]
