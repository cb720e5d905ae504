"""The vectorised classify (codes written last rule first, subkinds judged on the rounding
zeros only, names made on request) against the verdict table applied rule by rule."""

from __future__ import annotations

import numpy as np
import pytest

from fpgrad.diagnose.verdicts import (
    SUBKINDS,
    VERDICTS,
    ExactArray,
    classify,
    exact_exponent,
    inaccurate_threshold,
    underflows,
)
from fpgrad.numbers.formats import get_format
from fpgrad.numbers.rounding import Mode


def reference(ex: ExactArray, c: np.ndarray, fmt, mode) -> tuple:  # noqa: ANN001
    """The module docstring's table, the first rule that holds, one mask per rule."""
    with np.errstate(all="ignore"):
        err = np.abs((c - ex.hi) - ex.lo)
        rel = np.where(ex.zero, np.where(c == 0, 0.0, np.inf), err / np.abs(ex.hi))
        e_exp = np.maximum(exact_exponent(ex), fmt.emin)
        ulp = np.ldexp(1.0, (e_exp - fmt.man_bits).astype(np.int64))
        ulps = np.where(
            ex.zero, np.where(c == 0, 0.0, np.abs(c) / fmt.smallest_subnormal), err / ulp
        )
        digits = np.maximum(np.where(rel > 0, -np.log10(rel), np.inf), 0.0)
    zc, fin, und = c == 0, np.isfinite(c), ex.undetermined_mask()
    rules = [
        (np.isnan(c), "nan"),
        (np.isinf(c), "overflow"),
        (und, "undetermined"),
        (ex.zero & zc, "structural_zero"),
        (ex.zero & ~zc, "spurious_nonzero"),
        (~ex.zero & zc, "rounding_zero"),
        (fin & ~zc & ~ex.zero & ~und & (np.sign(c) != np.sign(ex.hi)), "wrong_sign"),
        (fin & ~zc & (np.abs(c) < fmt.smallest_normal), "subnormal"),
        (fin & ~zc & (rel > inaccurate_threshold(fmt)), "inaccurate"),
    ]
    code = np.zeros(c.shape, dtype=np.uint8)
    done = np.zeros(c.shape, dtype=bool)
    for mask, name in rules:
        code[mask & ~done] = VERDICTS.index(name)
        done |= mask
    rz = code == VERDICTS.index("rounding_zero")
    under = underflows(ex, fmt, mode)
    kind = np.where(rz, np.where(under, 1, 2), 0).astype(np.uint8)
    return rel, ulps, digits, code, kind


def hostile(n: int, fmt, seed: int) -> tuple[ExactArray, np.ndarray]:  # noqa: ANN001
    """Exact values around every threshold of ``fmt`` (its subnormals, their halves, its
    normal range, powers of two with low words of each sign), exact zeros, undetermined
    values, and computed values that are 0, -0, inf, nan, of either sign, rounded or not."""
    rng = np.random.default_rng(seed)
    tiny, normal = fmt.smallest_subnormal, fmt.smallest_normal
    edges = np.array([tiny / 4, tiny / 2, tiny, tiny * 1.5, normal, 1.0, 2.0**-30, fmt.max])
    spread = np.where(
        rng.random(n) < 0.5, np.exp2(rng.integers(-40, 20, n)), np.exp2(rng.uniform(-40, 20, n))
    )
    hi = np.where(rng.random(n) < 0.3, edges[rng.integers(0, edges.size, n)], spread)
    hi *= rng.choice([-1.0, 1.0], n)
    lo = hi * rng.choice([-1.0, 0.0, 1.0], n) * 2.0**-70
    zero = rng.random(n) < 0.15
    und = ~zero & (rng.random(n) < 0.1)
    hi[zero | und] = 0.0
    lo[zero | und] = 0.0
    rad = np.where(und, 1e-30, np.abs(hi) * 2.0**-140)
    pick = rng.integers(0, 7, n)
    with np.errstate(over="ignore"):  # float64's max overflows: a computed inf
        noisy = hi * (1 + rng.normal(size=n) * np.where(rng.random(n) < 0.5, 1e-4, 0.3))
    c = np.choose(
        pick,
        [
            hi,
            noisy,
            np.zeros(n),
            -np.zeros(n),
            np.full(n, np.inf) * rng.choice([-1.0, 1.0], n),
            np.full(n, np.nan),
            -noisy + rng.normal(size=n) * tiny,
        ],
    )
    return ExactArray(hi, lo, zero, rad, und), c


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "fp8_e4m3", "float64"])
@pytest.mark.parametrize("mode", [Mode.NEAREST_EVEN, Mode.TOWARD_ZERO, Mode.UP, "odd"])
def test_classify_matches_the_table(name: str, mode) -> None:  # noqa: ANN001
    fmt = get_format(name)
    ex, c = hostile(4000, fmt, seed=len(name))
    got = classify(ex, c, fmt, mode)
    want = reference(ex, c, fmt, Mode(mode))
    for a, b in zip((got.rel_err, got.ulps, got.digits, got.code, got.kind), want, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)  # bit for bit, nan where nan
    assert len(np.unique(want[3])) >= 8 and np.any(want[4] == 2)
    if name != "float64":  # (float64: no exact value here lies below its subnormals)
        assert np.any(want[4] == 1) == (mode != "odd")  # round to odd never makes a zero
    assert list(got.verdict) == [VERDICTS[k] for k in want[3]]
    assert list(got.subkind) == [SUBKINDS[k] for k in want[4]]


def test_classify_zero_dimensional_and_shaped() -> None:
    fmt = get_format("float16")
    ex = ExactArray(np.array(1e-9), np.array(0.0), np.array(False))
    v = classify(ex, np.array(0.0), fmt)
    assert v.code.shape == () and v.verdict.shape == () and v.subkind.shape == ()
    assert str(v.verdict[()]) == "rounding_zero" and str(v.subkind[()]) == "underflow"
    ex2, c2 = hostile(60, fmt, seed=3)
    shaped = ExactArray(*(a.reshape(6, 10) for a in (ex2.hi, ex2.lo, ex2.zero, ex2.rad)))
    shaped.undetermined = ex2.undetermined.reshape(6, 10)
    v2 = classify(shaped, c2.reshape(6, 10), fmt)
    flat = classify(ex2, c2, fmt)
    assert v2.code.shape == (6, 10)
    np.testing.assert_array_equal(v2.code.ravel(), flat.code)
    np.testing.assert_array_equal(v2.kind.ravel(), flat.kind)


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "fp8_e5m2"])
def test_signal_counts_are_classify_counts(name: str) -> None:
    from fpgrad.diagnose.verdicts import signal_counts

    fmt = get_format(name)
    ex, c = hostile(4000, fmt, seed=7 * len(name))
    code = classify(ex, c, fmt).code
    n = np.bincount(code, minlength=len(VERDICTS))
    got = signal_counts(ex, c, fmt)
    assert got == {
        "rounding_zero": n[VERDICTS.index("rounding_zero")],
        "subnormal": n[VERDICTS.index("subnormal")],
        "overflow": n[VERDICTS.index("overflow")] + n[VERDICTS.index("nan")],
        "structural_zero": n[VERDICTS.index("structural_zero")],
        "exact_subnormal_range": int(
            np.sum(~ex.zero & ~ex.undetermined & (np.abs(ex.hi) < fmt.smallest_normal))
        ),
    }
    assert min(got.values()) > 0 and n[VERDICTS.index("wrong_sign")] > 0
