"""Attack 9 on exact zeros after products, in the int8 CRT engine (and the float64 slices on
a smaller shape): is a ReLU input ever "exactly 0" (radius 0 at 0) or decided in sign
without being so, after a product the engine computed?

Rows of A (columns of B) are built so that the truncation to B-bit integers drops whole
products (a row 1, 2**-300 against a column that is non-zero only under the 2**-300), the
exact product is 0 by cancellation, tiny or negative zeros fill a row, or lower words carry
everything the product sees. Oracle: Python integers (every word times 2**1074).
"""

from __future__ import annotations

import numpy as np
import pytest

from fpgrad.arith import crt
from fpgrad.arith.ball import Ball, BallArith, exact_zeros
from tests.test_attack7_crt import SHIFT, _ints, spy_crt

SHAPES = {"crt": (64, 192, 64), "float64": (8, 16, 8)}  # CRT: its smallest shape


def _operands(k: int, seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    m, n, p = shape
    rng = np.random.default_rng(seed)
    a = np.zeros((k, m, n))
    b = np.zeros((k, n, p))
    a[0] = rng.normal(size=(m, n))
    b[0] = rng.normal(size=(n, p))
    a[0, 0] = 0.0  # a zero row: every product in it is exactly 0
    a[0, 1] = -0.0
    a[0, 2] = 0.0
    a[0, 2, 5] = 2.0**-200  # a tiny row: its products are not 0
    a[0, 3] = 0.0
    a[0, 3, 0], a[0, 3, 1] = 1.0, 2.0**-300  # truncated to 0 at B bits
    b[0, :, 0] = 0.0
    b[0, 1, 0] = 1.0  # column 0 sees only a[:, 1]: row 3 gives exactly 2**-300
    a[0, 4] = 0.0
    a[0, 4, 2], a[0, 4, 3] = 1.0, -1.0
    b[0, 2, 1], b[0, 3, 1] = 3.0, 3.0  # row 4, column 1: 3 - 3 = 0 exactly
    b[0, :, 2] = 0.0  # a zero column
    b[0, :, 3] = 0.0
    b[0, 7, 3] = 2.0**-150  # meets row 2 only where a[2, 7] is 0: exactly 0
    b[0, 5, 4] = 2.0**-150  # ... but here: 2**-350, not 0
    if k > 1:  # lower words: half a unit of word 0 at most (canonical), random signs
        for x in (a, b):
            ulp = np.spacing(np.abs(x[0]))
            x[1] = np.where(x[0] != 0, rng.uniform(-0.5, 0.5, x[0].shape) * ulp, 0.0)
    return a, b


@pytest.mark.parametrize("engine", list(SHAPES))
@pytest.mark.parametrize("bits", [100, 150])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_zeros_and_signs_after_products_are_proven(
    engine: str, bits: int, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CRT engine (and, on a smaller shape, the float64 slices) claim 0 only for products
    that are 0, and positive() decides only true signs."""
    if engine == "crt" and not crt.usable():
        pytest.skip("torch._int_mm absent or inexact here")
    ba = BallArith(bits)
    used = spy_crt(monkeypatch)
    monkeypatch.setattr(crt, "fast", lambda: True)  # the engine, whatever this CPU's int8 unit
    monkeypatch.setattr(crt, "machine", lambda: "vnni")  # whose costs give the shapes' engines
    m, n, p = SHAPES[engine]
    a, b = _operands(ba.k, seed, SHAPES[engine])
    out = ba.matmul(Ball(a, np.zeros((m, n))), Ball(b, np.zeros((n, p))))
    mid, rad = out.mid, out.rad
    assert used == [True] if engine == "crt" else not any(used), "run in that engine"
    exact = _ints(a) @ _ints(b)  # times 2**(2 SHIFT)
    got = _ints(mid)  # times 2**SHIFT
    zero = exact_zeros(out)
    # every claimed zero is one: rows 0, 1 and column 2, and row 2 against column 3
    for i, j in zip(*np.nonzero(zero), strict=True):
        assert exact[i, j] == 0, (i, j)
    assert zero[0].all() and zero[1].all() and zero[:, 2].all() and zero[2, 3]
    assert not zero[3, 0] and not zero[2, 4]
    assert not zero[4, 1]  # 0 by cancellation: not proven by a normwise bound
    # enclosure, exactly: |exact - mid| <= rad
    for idx in np.ndindex(m, p):
        r = float(rad[idx])
        num, den = r.as_integer_ratio()
        assert abs(exact[idx] - got[idx] * 2**SHIFT) * den <= num * 2 ** (2 * SHIFT), idx
    # signs: positive() decides only signs it can prove
    before = ba.uncertain_branches
    pos = ba.positive(out)
    unsure = ~(rad <= 0) & ~(np.abs(mid[0]) / (1 + 2.0**-48) > rad)
    assert ba.uncertain_branches - before == int(unsure.sum())
    decided = ~unsure
    truth = np.vectorize(lambda v: v > 0)(exact).astype(bool)
    assert np.array_equal(pos[decided], truth[decided])
    assert unsure[3, 0]  # 2**-300 exactly, mid 0: undecided, never "0"
    assert ba.range_errors == 0  # every verdict above stands (no fallback to Arb)
