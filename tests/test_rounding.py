"""fpgrad.numbers.rounding against independent oracles.

Oracles:
- MPFR (through gmpy2), one context per rounding direction, with the format's precision and an
  exponent range whose ``subnormalize`` reproduces the format's subnormal grid (derivation at
  :func:`mpfr_contexts`); nearest-away and round-to-odd are built from MPFR's RNDN/RNDZ/RNDA
  results (:func:`mpfr_oracle`). The exponent range is unbounded above; the IEEE overflow
  rules are applied by :func:`expected_overflow`, which is itself checked against MPFR's own
  overflow handling (true ``emax``) for the IEEE formats.
- A tiny exact oracle with ``fractions.Fraction`` that finds the two neighbours in a table of the
  format's values (or through numpy's float32) and decides between them, used on random samples
  to cross-check the MPFR set-up (:func:`fraction_oracle`).

Coverage (each test asserts its counts, so a generator that misses a range fails):
- exhaustive, every deterministic mode, both signs: every finite value of float16, bfloat16,
  fp8_e4m3, fp8_e5m2 and e5m7, every midpoint between neighbours (and the one above max), and
  the float64 numbers just beside each value and each midpoint; the same points with subnormals
  off near the bottom of the range;
- random float64 over the whole range, focused on each format's range, and float64 subnormals,
  for every catalogue format in every deterministic mode, with and without subnormals;
- explicit cases for the bugs of other tools (double rounding, finite overflow, subnormal
  midpoints, ties away posing as ties to even) and the stochastic modes' statistics.
"""

from __future__ import annotations

import bisect
import doctest
import importlib.util
import math
from fractions import Fraction

import gmpy2
import mpmath
import numpy as np
import pytest
import torch
from gmpy2 import mpfr, mpq

import fpgrad.numbers.rounding as rounding
from fpgrad.errors import InputError
from fpgrad.numbers.formats import Format, Overflow, Special, get_format
from fpgrad.numbers.rounding import (
    STOCHASTIC_MODES,
    Mode,
    parse_mode,
    round_exact,
    round_exact_array,
    round_to,
)

DETERMINISTIC = [m for m in Mode if m not in STOCHASTIC_MODES]
SMALL_FORMATS = ["float16", "bfloat16", "fp8_e4m3", "fp8_e5m2", "e5m7"]  # all codes enumerable
CATALOGUE = ["float16", "bfloat16", "float32", "tf32", "fp8_e4m3", "fp8_e5m2", "e5m7"]
INF = math.inf
HAVE_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """Load the compiled kernel before the first test, so that every round_to in this module
    runs it (round_to's default path once it is loaded); None without numba."""
    return rounding._load_kernel()


def kernel_active() -> bool:
    return bool(rounding._kernel)


# ---- the format's values, decoded independently of Format.decode ----------------------------


def expected_count(fmt: Format) -> int:
    """Number of finite non-negative values (codes with sign bit 0 that are not inf/NaN)."""
    half = 2 ** (fmt.bits - 1)
    return half - 2**fmt.man_bits if fmt.special is Special.IEEE else half - 1


def value_table(fmt: Format) -> np.ndarray:
    """The finite non-negative values in code order (so index parity = significand parity)."""
    codes = np.arange(expected_count(fmt), dtype=np.int64)
    m = fmt.man_bits
    e_field, frac = codes >> m, codes & (2**m - 1)
    sub = np.ldexp(frac.astype(np.float64), fmt.emin - m)
    norm = np.ldexp((2**m + frac).astype(np.float64), e_field - fmt.bias - m)
    vals = np.where(e_field == 0, sub, norm)
    assert np.all(np.diff(vals) > 0), "codes of non-negative values must be increasing"
    return vals


def next_above_max(fmt: Format) -> float:
    """The grid point after max with an unbounded exponent range (max + its spacing)."""
    return fmt.max + fmt.ulp(fmt.max)


# ---- oracle 1: MPFR --------------------------------------------------------------------------


def mpfr_contexts(fmt: Format, subnormals: bool, emax: int | None = None):
    """MPFR contexts for ``fmt``: ``{"N","Z","U","D","A"}`` directions plus ``"coarse"``.

    MPFR writes x = 0.1b...b * 2**E, so a format value 1.f * 2**e has MPFR exponent e + 1. With
    ``subnormalize``, the smallest positive number of a context is 0.1 * 2**emin = 2**(emin - 1);
    the format's smallest subnormal is 2**(fmt.emin - man_bits), hence
    ``emin = fmt.emin - man_bits + 1``; MPFR then gives a value of exponent E the precision
    E - emin + 1 when that is below p, which is exactly the subnormal grid (verified in
    :func:`test_mpfr_contexts_reproduce_the_grid`). ``emax=None`` leaves the range unbounded
    above (overflow applied by the test); ``fmt.emax + 1`` is the IEEE format's own range.
    The "coarse" context (precision p - 1, grid twice as coarse, nearest) tells even from odd.
    """
    p = fmt.precision
    emin = fmt.emin - fmt.man_bits + 1 if subnormals else -(10**7)  # unbounded below when FTZ
    emax = fmt.emax + 64 if emax is None else emax
    directions = {
        "N": gmpy2.RoundToNearest,
        "Z": gmpy2.RoundToZero,
        "U": gmpy2.RoundUp,
        "D": gmpy2.RoundDown,
        "A": gmpy2.RoundAwayZero,
    }
    ctxs = {
        k: gmpy2.context(precision=p, emin=emin, emax=emax, subnormalize=subnormals, round=r)
        for k, r in directions.items()
    }
    ctxs["coarse"] = gmpy2.context(
        precision=p - 1,
        emin=emin + 1 if subnormals else emin,
        emax=emax,
        subnormalize=subnormals,
        round=gmpy2.RoundToNearest,
    )
    return ctxs


def expected_overflow(fmt: Format, mode: Mode, negative: bool) -> float:
    """IEEE 754 7.4 overflow results, written out as a table (catalogue policies only)."""
    table = {  # (positive result, negative result); "inf" is the format's infinity
        Mode.NEAREST_EVEN: ("inf", "inf"),
        Mode.NEAREST_AWAY: ("inf", "inf"),
        Mode.TOWARD_ZERO: ("max", "max"),
        Mode.UP: ("inf", "max"),
        Mode.DOWN: ("max", "inf"),
        Mode.ODD: ("max", "max"),
    }
    kind = table[mode][int(negative)]
    if kind == "max":
        mag = fmt.max
    else:
        assert fmt.overflow_policy is (Overflow.INF if fmt.has_inf else Overflow.NAN)
        mag = INF if fmt.has_inf else math.nan
    return -mag if negative else mag


def _run(ctx, ms) -> np.ndarray:
    return np.fromiter(map(float, map(ctx.plus, ms)), np.float64, count=len(ms))


def mpfr_oracle(
    xs: np.ndarray, fmt: Format, subnormals: bool = True, emax: int | None = None
) -> dict[Mode, np.ndarray]:
    """Correct rounding of every float64 in ``xs`` in every deterministic mode, from MPFR."""
    ctx = mpfr_contexts(fmt, subnormals, emax)
    ms = [mpfr(v, 53) for v in xs.tolist()]  # exact conversions
    rz_m = list(map(ctx["Z"].plus, ms))
    rz = np.fromiter(map(float, rz_m), np.float64, count=len(ms))
    ra = _run(ctx["A"], ms)
    rn = _run(ctx["N"], ms)
    out = {
        Mode.NEAREST_EVEN: rn,
        Mode.TOWARD_ZERO: rz,
        Mode.UP: _run(ctx["U"], ms),
        Mode.DOWN: _run(ctx["D"], ms),
    }
    inexact = np.nonzero(rz != ra)[0]
    # nearest away: RNDN unless x is exactly halfway between RNDZ and RNDA (then RNDA)
    away = rn.copy()
    for i in inexact[np.isfinite(ra[inexact])].tolist():
        if mpq(rz[i]) + mpq(ra[i]) == 2 * mpq(xs[i]):
            away[i] = ra[i]
    out[Mode.NEAREST_AWAY] = away
    # round to odd: RNDZ if exact, else whichever of RNDZ, RNDA has an odd last bit
    odd = rz.copy()
    coarse = ctx["coarse"].plus
    for i in inexact.tolist():
        if coarse(rz_m[i]) == rz_m[i]:  # on the grid of precision p - 1: last bit even
            odd[i] = ra[i]
    out[Mode.ODD] = odd
    neg = np.signbit(xs)
    for mode, r in out.items():
        if not subnormals:  # flush results below the smallest normal (tininess after rounding)
            r[np.abs(r) < fmt.smallest_normal] = 0.0
            r[:] = np.copysign(r, np.where(np.isnan(r), 1.0, xs))
        over = np.nonzero(np.abs(r) > fmt.max)[0]
        r[over] = [expected_overflow(fmt, mode, bool(neg[i])) for i in over.tolist()]
    return out


# ---- oracle 2: exact fractions between table neighbours -------------------------------------


def neighbours(a: float, fmt: Format, table: np.ndarray | None) -> tuple[float, float, int, int]:
    """Values lo <= a <= hi of the format (unbounded above) and their codes, for a >= 0."""
    if table is None:  # float32: numpy's correctly rounded cast and float32 nextafter
        assert fmt.name == "float32"
        with np.errstate(over="ignore"):
            f = np.float32(a)
        if math.isinf(f) or (float(f) == fmt.max and a > fmt.max):
            top = int(np.float32(fmt.max).view(np.uint32))
            return fmt.max, next_above_max(fmt), top, top + 1
        if float(f) <= a:
            lo, hi = f, np.nextafter(f, np.float32(INF))
        else:
            lo, hi = np.nextafter(f, np.float32(0)), f
        hi_v = float(hi) if math.isfinite(hi) else next_above_max(fmt)
        return float(lo), hi_v, int(lo.view(np.uint32)), int(hi.view(np.uint32))
    if a >= table[-1]:
        return float(table[-1]), next_above_max(fmt), len(table) - 1, len(table)
    i = bisect.bisect_right(table, a)  # table[i - 1] <= a < table[i]
    return float(table[i - 1]), float(table[i]), i - 1, i


def fraction_oracle(x: float, fmt: Format, mode: Mode, table: np.ndarray | None) -> float:
    """Correct rounding of one float64 with subnormals on, by exact comparisons."""
    if x == 0:
        return x
    neg = x < 0
    a = abs(x)
    lo, hi, lo_code, hi_code = neighbours(a, fmt, table)
    X, L, H = Fraction(a), Fraction(lo), Fraction(hi)
    if X == L:
        mag = lo
    else:
        below, above = X - L, H - X
        if mode is Mode.NEAREST_EVEN:
            mag = lo if below < above else hi if above < below else (lo if lo_code % 2 == 0 else hi)
        elif mode is Mode.NEAREST_AWAY:
            mag = lo if below < above else hi
        elif mode is Mode.TOWARD_ZERO:
            mag = lo
        elif mode is Mode.UP:
            mag = lo if neg else hi
        elif mode is Mode.DOWN:
            mag = hi if neg else lo
        else:
            mag = lo if lo_code % 2 == 1 else hi
    if mag > fmt.max:
        return expected_overflow(fmt, mode, neg)
    return -mag if neg else mag


# ---- comparison ------------------------------------------------------------------------------


def assert_same(got: np.ndarray, want: np.ndarray, xs: np.ndarray, what: str) -> None:
    """Bit-exact agreement: equal values, equal signs of zero, NaN where NaN."""
    same = ((got == want) & (np.signbit(got) == np.signbit(want))) | (
        np.isnan(got) & np.isnan(want)
    )
    if not same.all():
        bad = np.nonzero(~same)[0]
        shown = ", ".join(
            f"x={float(xs[i]).hex()} got {got[i]!r} want {want[i]!r}" for i in bad[:5]
        )
        raise AssertionError(f"{what}: {len(bad)} of {len(xs)} differ: {shown}")


def check_all_modes(xs: np.ndarray, fmt: Format, subnormals: bool, what: str) -> int:
    """Compare round_to with MPFR in every deterministic mode; the number of comparisons."""
    assert kernel_active() or not HAVE_NUMBA  # round_to runs the compiled kernel
    want = mpfr_oracle(xs, fmt, subnormals)
    for mode in DETERMINISTIC:
        got = round_to(xs, fmt, mode, subnormals=subnormals)
        assert got.shape == xs.shape and got.dtype == np.float64
        assert_same(got, want[mode], xs, f"{what} {fmt.name} {mode.value} sub={subnormals}")
    return len(DETERMINISTIC) * len(xs)


# ---- points ----------------------------------------------------------------------------------


def exhaustive_points(fmt: Format) -> tuple[np.ndarray, dict[str, int]]:
    """Every value, every midpoint, and the float64 neighbours of each; both signs."""
    vals = value_table(fmt)
    grid = np.append(vals, next_above_max(fmt))
    mids = (grid[:-1] + grid[1:]) / 2  # exact: the sum of two short significands
    assert np.all((grid[:-1] < mids) & (mids < grid[1:]) & (2 * mids == grid[:-1] + grid[1:]))
    beside = [np.nextafter(v, d) for v in (vals, mids) for d in (-INF, INF)]
    pos = np.concatenate([vals, mids, *beside])
    counts = {"values": len(vals), "midpoints": len(mids), "beside": sum(map(len, beside))}
    return np.concatenate([pos, -pos]), counts


def random_points(fmt: Format, n: int, seed: int) -> np.ndarray:
    """float64 with random sign and mantissa bits: a third log-uniform over the whole range,
    half log-uniform over the format's range (+-3 binades), the rest float64 subnormals."""
    rng = np.random.default_rng(seed)
    n_whole, n_focus = n // 3, n // 2
    n_sub = n - n_whole - n_focus
    lo = max(1, 1023 + fmt.quantum_min - 3)
    hi = min(2046, 1023 + fmt.emax + 3)
    exps = np.concatenate(
        [
            rng.integers(0, 2047, n_whole),  # biased exponent fields; 0 = float64 subnormal
            rng.integers(lo, hi + 1, n_focus),
            np.zeros(n_sub, dtype=np.int64),
        ]
    ).astype(np.uint64)
    sign = rng.integers(0, 2, n).astype(np.uint64)
    man = rng.integers(0, 2**52, n, dtype=np.uint64)
    bits = (sign << np.uint64(63)) | (exps << np.uint64(52)) | man
    xs = bits.view(np.float64)
    assert np.all(np.isfinite(xs))
    return xs


# ---- the oracles themselves ------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL_FORMATS)
def test_value_table_matches_format_decode(name: str) -> None:
    fmt = get_format(name)
    vals = value_table(fmt)
    decoded = [fmt.decode(c) for c in range(len(vals))]
    assert np.array_equal(vals, decoded)
    assert vals[-1] == fmt.max and vals[1] == fmt.smallest_subnormal


@pytest.mark.parametrize("name", CATALOGUE)
def test_mpfr_contexts_reproduce_the_grid(name: str) -> None:
    fmt = get_format(name)
    ctx = mpfr_contexts(fmt, subnormals=True)
    ss, sn = fmt.smallest_subnormal, fmt.smallest_normal
    z = ctx["Z"].plus
    up = ctx["U"].plus
    assert float(z(mpfr(ss, 53))) == ss  # the smallest subnormal is a value
    assert float(z(mpfr(ss * 0.75, 53))) == 0.0  # nothing between 0 and ss
    assert float(up(mpfr(ss * 0.25, 53))) == ss
    assert float(z(mpfr(ss * 2.5, 53))) == 2 * ss  # the subnormal spacing is ss
    assert float(up(mpfr(sn - ss / 2, 53))) == sn  # the last subnormal is sn - ss
    assert float(z(mpfr(sn - ss / 2, 53))) == sn - ss
    assert float(up(mpfr(sn, 53))) == sn
    assert float(up(mpfr(sn * (1 + fmt.eps / 2), 53))) == sn * (1 + fmt.eps)  # normal spacing
    if fmt.has_inf:  # with the IEEE range, MPFR's own overflow threshold is the format's
        ieee = mpfr_contexts(fmt, subnormals=True, emax=fmt.emax + 1)
        assert float(ieee["Z"].plus(mpfr(1e300, 53))) == fmt.max
        assert float(ieee["N"].plus(mpfr(fmt.max, 53))) == fmt.max
        assert float(ieee["U"].plus(mpfr(fmt.max, 53))) == fmt.max
    ftz = mpfr_contexts(fmt, subnormals=False)  # unbounded below: precision p everywhere
    tiny = sn * 2.0**-40 * (1 + 3 * fmt.eps)
    assert float(ftz["N"].plus(mpfr(tiny, 53))) == tiny


@pytest.mark.parametrize("name", CATALOGUE)
def test_mpfr_oracle_agrees_with_fraction_oracle(name: str) -> None:
    """Cross-check of the MPFR set-up by a second, exact oracle on a random sample."""
    fmt = get_format(name)
    table = None if name == "float32" else value_table(fmt)
    rng = np.random.default_rng(11)
    parts = [random_points(fmt, 1500, seed=5)]
    if table is not None:
        pts, _ = exhaustive_points(fmt)
        parts.append(rng.choice(pts, min(1500, len(pts)), replace=False))
    else:  # float32: midpoints of random float32 neighbours, and their float64 neighbours
        with np.errstate(over="ignore"):
            f = random_points(fmt, 500, seed=6).astype(np.float32)
        f = f[np.isfinite(f)]
        g = np.nextafter(f, np.float32(INF))
        mids = (f.astype(np.float64) + g.astype(np.float64)) / 2
        parts += [mids, np.nextafter(mids, INF), np.nextafter(mids, -INF)]
    xs = np.concatenate(parts)
    want = mpfr_oracle(xs, fmt)
    n = 0
    for mode in DETERMINISTIC:
        exact = np.array([fraction_oracle(x, fmt, mode, table) for x in xs.tolist()])
        assert_same(want[mode], exact, xs, f"MPFR vs Fraction oracle {name} {mode.value}")
        n += len(xs)
    assert n == len(DETERMINISTIC) * len(xs) and len(xs) >= 2700


def test_numpy_float32_and_float16_casts_agree_with_the_oracle() -> None:
    """numpy's casts are correctly rounded (nearest even): a hardware check of the oracle."""
    for name, dtype in (("float32", np.float32), ("float16", np.float16)):
        fmt = get_format(name)
        xs = random_points(fmt, 20000, seed=7)
        with np.errstate(over="ignore"):
            cast = xs.astype(dtype).astype(np.float64)
        assert_same(mpfr_oracle(xs, fmt)[Mode.NEAREST_EVEN], cast, xs, f"numpy {name}")


# ---- exhaustive ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL_FORMATS)
def test_exhaustive_values_midpoints_and_neighbours(name: str) -> None:
    fmt = get_format(name)
    xs, counts = exhaustive_points(fmt)
    n_vals = expected_count(fmt)
    assert counts == {"values": n_vals, "midpoints": n_vals, "beside": 4 * n_vals}
    assert len(xs) == 2 * 6 * n_vals  # both signs
    if name == "float16":
        assert n_vals == 31744 and 65520.0 in xs and -(2.0**-25) in xs
    n = check_all_modes(xs, fmt, subnormals=True, what="exhaustive")
    assert n == len(DETERMINISTIC) * 12 * n_vals


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL_FORMATS)
def test_exhaustive_flush_to_zero_near_the_bottom(name: str) -> None:
    fmt = get_format(name)
    xs, _ = exhaustive_points(fmt)
    low = xs[np.abs(xs) < 4 * fmt.smallest_normal]
    # subnormal values and midpoints, values and midpoints of the two lowest binades, neighbours
    n_low = 2 * 6 * 3 * 2**fmt.man_bits
    assert len(low) >= n_low - 8
    high = xs[np.abs(xs) > fmt.max / 2]
    n = check_all_modes(np.concatenate([low, high]), fmt, subnormals=False, what="FTZ")
    assert n >= len(DETERMINISTIC) * n_low


# ---- random over the whole float64 range -----------------------------------------------------


@pytest.mark.parametrize("name", CATALOGUE)
def test_random_float64_every_mode(name: str) -> None:
    fmt = get_format(name)
    xs = random_points(fmt, 100_000, seed=CATALOGUE.index(name))
    sub64 = np.abs(xs) < 2.0**-1022
    assert sub64.sum() >= 100_000 // 6  # float64 subnormals are there
    inside = (np.abs(xs) >= fmt.smallest_subnormal / 4) & (np.abs(xs) <= 4 * fmt.max)
    assert inside.sum() >= 100_000 // 3  # most of the focused part hits the format's range
    n = check_all_modes(xs, fmt, subnormals=True, what="random")
    n += check_all_modes(xs[:20_000], fmt, subnormals=False, what="random FTZ")
    assert n == len(DETERMINISTIC) * 120_000


def test_ieee_overflow_table_matches_mpfr_native_overflow() -> None:
    """The test's overflow table equals MPFR's own overflow with the IEEE exponent range."""
    for name in ("float16", "bfloat16", "fp8_e5m2", "e5m7", "float32"):
        fmt = get_format(name)
        top = fmt.max
        base = np.array([top, top * (1 + fmt.eps / 4), top + fmt.ulp(top) / 2, 1e300, 2 * top])
        xs = np.concatenate([base, np.nextafter(base, INF), np.nextafter(base, -INF)])
        xs = np.concatenate([xs, -xs])
        ieee = mpfr_oracle(xs, fmt, emax=fmt.emax + 1)
        unbounded = mpfr_oracle(xs, fmt)
        for mode in DETERMINISTIC:
            assert_same(unbounded[mode], ieee[mode], xs, f"overflow table {name} {mode.value}")
            assert_same(round_to(xs, fmt, mode), ieee[mode], xs, f"overflow {name} {mode.value}")


# ---- edges and known bugs of other tools -----------------------------------------------------


def double_rounded(x: np.ndarray) -> np.ndarray:
    """What a cast through float32 does: two correct roundings in a row."""
    return np.asarray(x, np.float64).astype(np.float32).astype(np.float16).astype(np.float64)


def test_double_rounding_is_caught() -> None:
    x = np.array([1 + 2**-11 + 2**-40])  # float32 rounds it onto the tie 1 + 2**-11
    correct = 1 + 2**-10
    assert mpfr_oracle(x, get_format("float16"))[Mode.NEAREST_EVEN][0] == correct
    assert round_to(x, "float16")[0] == correct
    assert double_rounded(x)[0] == 1.0  # wrong
    torch_cast = torch.tensor(x, dtype=torch.float64).to(torch.float16).double().numpy()
    assert torch_cast[0] == 1.0  # torch's cast rounds through float32 on this build
    # just beside the float16 midpoints, float32 lands on the midpoint: a second rounding
    vals = value_table(get_format("float16"))
    mids = (vals[:-1] + vals[1:]) / 2
    xs = np.concatenate([np.nextafter(mids, INF), np.nextafter(mids, -INF)])
    want = mpfr_oracle(xs, get_format("float16"))[Mode.NEAREST_EVEN]
    wrong = int((double_rounded(xs) != want).sum())
    assert len(xs) // 3 < wrong < len(xs) * 2 // 3  # about half of them
    assert_same(round_to(xs, "float16"), want, xs, "float16 RNE")


def test_overflow_is_not_finite() -> None:
    xs = np.array([65519.99, 65520.0, 65535.9, 65536.0, -65520.0, 1e300])
    want = [65504.0, INF, INF, INF, -INF, INF]
    assert round_to(xs, "float16").tolist() == want
    naive = np.rint(xs / 32) * 32  # round on the top binade's grid and forget the range
    assert naive[1] == 65536.0 and not np.array_equal(naive, want)
    assert round_to(xs, "float16", "toward_zero").tolist()[:4] == [65504.0] * 4
    e4m3 = round_to([448, 463.9, 464, 464.1, 480, -1e9], "fp8_e4m3")
    assert e4m3[:3].tolist() == [448, 448, 448]  # 464 is a tie; 448 (1.110b) is even
    assert np.isnan(e4m3[3:]).all()  # no inf in e4m3fn: NaN


def test_subnormal_midpoints_and_ties() -> None:
    s = 2.0**-24  # float16's smallest subnormal
    xs = np.array([0.5, 0.5 + 2**-30, 1.5, 2.5, 3.5, 1023.5, 1024.5]) * s
    want = np.array([0.0, 1, 2, 2, 4, 1024, 1024]) * s
    assert np.array_equal(round_to(xs, "float16"), want)
    assert round_to(-0.5 * s, "float16").item() == 0 and np.signbit(round_to(-0.5 * s, "float16"))
    away = np.array([1.0, 1, 2, 3, 4, 1024, 1025]) * s  # ties away from zero
    assert np.array_equal(round_to(xs, "float16", "nearest_away"), away)
    assert round_to(2.5 * s, "float16").item() == 2 * s  # not 3 * s: ties go to even
    assert round_to(s / 2, "float16", "up").item() == s
    assert round_to(-s / 2, "float16", "up").item() == 0.0
    assert round_to(s / 2**30, "float16", "odd").item() == s  # inexact zero becomes odd


def test_carries_into_the_exponent() -> None:
    fmt = get_format("float16")
    twos = np.ldexp(1.0, np.arange(-13, 16))  # powers of two above the smallest normal
    tie = twos * (1 - 2.0**-12)  # halfway between 2**k (1 - 2**-11) (odd) and 2**k (even)
    assert np.array_equal(round_to(tie, fmt), twos)
    assert np.array_equal(round_to(np.nextafter(tie, INF), fmt, "nearest_away"), twos)
    assert np.array_equal(round_to(np.nextafter(tie, 0), fmt), twos * (1 - 2**-11))
    assert np.array_equal(round_to(np.nextafter(twos, 0), fmt, "up"), twos)
    assert np.array_equal(round_to(np.nextafter(twos, 0), fmt, "toward_zero"), twos * (1 - 2**-11))


def test_flush_to_zero_is_tininess_after_rounding() -> None:
    sn = 2.0**-14
    xs = np.array([sn, sn * (1 - 2**-13), sn * (1 - 2**-12), sn * (1 - 2**-11), -sn / 3, 2**-24])
    got = round_to(xs, "float16", subnormals=False)
    # at precision 11 the spacing just below sn is sn 2**-11: sn(1 - 2**-13) rounds up to sn and
    # stays; sn(1 - 2**-12) is a tie that goes to the even sn; sn(1 - 2**-11) is a value of the
    # unbounded grid below sn: flushed
    assert got.tolist() == [sn, sn, sn, 0.0, -0.0, 0.0]
    assert np.signbit(got[4])
    assert round_to(sn * (1 - 2**-13), "float16", "toward_zero", subnormals=False).item() == 0.0


def test_float64_is_the_identity() -> None:
    xs = random_points(get_format("float64"), 200_000, seed=3)
    xs = np.concatenate([xs, [5e-324, -5e-324, 2.0**-1022, np.nextafter(2.0**-1022, 0), 1.8e308]])
    for mode in DETERMINISTIC:
        assert_same(round_to(xs, "float64", mode), xs, xs, f"float64 {mode.value}")
    ftz = round_to(xs, "float64", subnormals=False)
    assert np.array_equal(ftz, np.where(np.abs(xs) < 2.0**-1022, 0.0, xs))


def test_specials() -> None:
    xs = np.array([INF, -INF, math.nan, 0.0, -0.0])
    got = round_to(xs, "float16")
    assert got[:2].tolist() == [INF, -INF] and np.isnan(got[2])
    assert got[3] == 0 and not np.signbit(got[3]) and np.signbit(got[4])
    assert np.isnan(round_to(xs, "fp8_e4m3")[:3]).all()
    sat = Format("sat16", 5, 10, overflow=Overflow.SATURATE)
    assert round_to([INF, -INF, 1e9, -65520.0], sat).tolist() == [65504, -65504, 65504, -65504]
    assert round_to([1e9, -1e9], sat, "up").tolist() == [65504, -65504]
    nanfmt = Format("nan16", 5, 10, overflow=Overflow.NAN)
    assert np.isnan(round_to(65520.0, nanfmt)) and round_to(INF, nanfmt).item() == INF
    assert round_to(1e9, nanfmt, "toward_zero").item() == 65504


def test_shapes_and_inputs() -> None:
    assert round_to(1.5, "float16").shape == ()
    assert round_to([[1.0, 2.0]], "bf16").shape == (1, 2)
    assert round_to(np.float32(0.1), "float16").item() == round_to(float(np.float32(0.1)), "fp16")
    assert round_to(np.arange(4), "e5m2").dtype == np.float64


def test_round_to_odd_then_nearest_equals_nearest() -> None:
    """Round to odd at p + 2 bits, then to nearest at p, is one correct rounding (Boldo and
    Melquiond): a property check of the odd mode against the nearest mode."""
    xs, _ = exhaustive_points(get_format("float16"))
    xs = np.concatenate([xs, random_points(get_format("float16"), 50_000, seed=9)])
    via_odd = round_to(round_to(xs, "e5m12", "odd"), "float16")
    assert_same(via_odd, round_to(xs, "float16"), xs, "odd then nearest")


def test_parse_mode() -> None:
    assert parse_mode("nearest_even") is Mode.NEAREST_EVEN
    assert parse_mode("Toward-Zero") is Mode.TOWARD_ZERO
    assert parse_mode(Mode.UP) is Mode.UP
    with pytest.raises(InputError, match="unknown rounding mode 'nearest'; known modes: "):
        parse_mode("nearest")


def test_doctests() -> None:
    result = doctest.testmod(rounding)
    assert result.failed == 0 and result.attempted >= 6


# ---- stochastic ------------------------------------------------------------------------------

N_DRAWS = 20_000
STOCHASTIC_CASES = {  # x: (range, probability of rounding up = frac distance to the lower value)
    1 + 0.3 * 2**-10: "normal",
    -(1 + 0.3 * 2**-10): "normal negative",
    3.25 * 2**-24: "subnormal",
    0.1 * 2**-24: "below the smallest subnormal",
    65504 + 0.75 * 32: "near overflow",
    2.0**-14 * (1 - 0.6 * 2**-10): "just below the smallest normal",
}


@pytest.mark.parametrize("x", list(STOCHASTIC_CASES))
def test_stochastic_draws_are_neighbours_with_the_right_frequency(x: float) -> None:
    fmt = get_format("float16")
    lo, hi = round_to(x, fmt, "toward_zero").item(), round_to(x, fmt, "nearest_away").item()
    if abs(hi) <= abs(lo):
        hi = round_to(x, fmt, "up" if x > 0 else "down").item()
    # the exact fractional distance from lo towards hi (hi may be inf: use the grid point)
    a, b = abs(lo), (abs(hi) if math.isfinite(hi) else next_above_max(fmt))
    p = float((Fraction(abs(x)) - Fraction(a)) / (Fraction(b) - Fraction(a)))
    draws = round_to(np.full(N_DRAWS, x), fmt, "stochastic", rng=123)
    assert np.all((draws == lo) | (draws == hi)), STOCHASTIC_CASES[x]
    ups = int((draws == hi).sum())
    bound = 5 * math.sqrt(N_DRAWS * p * (1 - p)) + 1  # 5 binomial standard deviations
    assert abs(ups - N_DRAWS * p) <= bound, (STOCHASTIC_CASES[x], ups, N_DRAWS * p)
    eq = round_to(np.full(N_DRAWS, x), fmt, "stochastic_equal", rng=np.random.default_rng(5))
    assert np.all((eq == lo) | (eq == hi))
    assert abs(int((eq == hi).sum()) - N_DRAWS / 2) <= 5 * math.sqrt(N_DRAWS / 4) + 1


def test_stochastic_is_reproducible_and_exact_values_stay() -> None:
    xs = random_points(get_format("bfloat16"), 5000, seed=1)
    a = round_to(xs, "bfloat16", "stochastic", rng=7)
    assert np.array_equal(a, round_to(xs, "bfloat16", "stochastic", rng=7))
    assert np.array_equal(
        round_to(xs, "bfloat16", "stochastic"), round_to(xs, "bfloat16", "stochastic", rng=0)
    )
    down, up = round_to(xs, "bfloat16", "down"), round_to(xs, "bfloat16", "up")
    assert np.all((a == down) | (a == up))
    vals = value_table(get_format("bfloat16"))
    vals = np.concatenate([vals, -vals])
    for mode in STOCHASTIC_MODES:
        assert_same(round_to(vals, "bfloat16", mode), vals, vals, f"exact values {mode.value}")


# ---- the compiled kernel against the numpy path ----------------------------------------------

NEEDS_NUMBA = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")
EXTRA_FORMATS = [  # policies and shapes the catalogue lacks
    Format("sat16", 5, 10, overflow=Overflow.SATURATE),
    Format("nan16", 5, 10, overflow=Overflow.NAN),
    Format("e4m3sat", 4, 3, special=Special.FN, overflow=Overflow.SATURATE),
    Format("ftz16", 5, 10, subnormals=False),
    get_format("float64"),
    get_format("e2m1"),
    get_format("e11m10"),
    get_format("e11m52"),
]
_F64_MAX = float(np.finfo(np.float64).max)
SPECIALS = np.concatenate(
    [
        [0.0, -0.0, INF, -INF, math.nan, -math.nan, _F64_MAX, -_F64_MAX, 2.0**-1022, -(2.0**-1022)],
        [5e-324, -5e-324, np.nextafter(2.0**-1022, 0), np.nextafter(-(2.0**-1022), 0)],
        np.array([0x7FF0_0000_0000_0001, 0x7FF4_0000_0000_0000], np.int64).view(np.float64),  # sNaN
        np.array([-0x0007_FFFF_FFFF_FFFF], np.int64).view(np.float64),  # a negative NaN, payload
    ]
)


def assert_same_bits(got: np.ndarray, want: np.ndarray, xs: np.ndarray, what: str) -> None:
    """Identical float64 bit patterns (so NaN matches only the same NaN: both paths give np.nan)."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.float64, what
    g, w = got.reshape(-1).view(np.int64), want.reshape(-1).view(np.int64)
    if not np.array_equal(g, w):
        bad = np.nonzero(g != w)[0]
        shown = ", ".join(
            f"x={float(xs.reshape(-1)[i]).hex()} kernel {got.reshape(-1)[i]!r} "
            f"numpy {want.reshape(-1)[i]!r}"
            for i in bad[:5]
        )
        raise AssertionError(f"{what}: {len(bad)} of {g.size} differ: {shown}")


def check_kernel_matches_numpy(xs: np.ndarray, fmt: Format, what: str) -> int:
    """The kernel against the numpy path: every mode (stochastic with the same seed), subnormals
    on and off; the number of comparisons."""
    n = 0
    for mode in Mode:
        for sub in (True, False):
            got = rounding._round_to_kernel(xs, fmt, mode, sub, rng=17)
            want = rounding._round_to_numpy(xs, fmt, mode, sub, rng=17)
            assert_same_bits(got, want, xs, f"{what} {fmt.name} {mode.value} sub={sub}")
            n += xs.size
    return n


@pytest.mark.slow
@NEEDS_NUMBA
@pytest.mark.parametrize("name", SMALL_FORMATS)
def test_kernel_matches_numpy_path_exhaustive(name: str) -> None:
    """Every value, midpoint and float64 neighbour of each (the oracle tests' points), both
    signs, and the float64 specials, in all 8 modes with subnormals on and off."""
    fmt = get_format(name)
    xs, _ = exhaustive_points(fmt)
    xs = np.concatenate([xs, SPECIALS])
    assert check_kernel_matches_numpy(xs, fmt, "exhaustive") == 2 * len(Mode) * len(xs)


@NEEDS_NUMBA
@pytest.mark.parametrize(
    "fmt", [get_format(n) for n in CATALOGUE] + EXTRA_FORMATS, ids=lambda f: f.name
)
def test_kernel_matches_numpy_path_random(fmt: Format) -> None:
    """Random float64 over the whole range (focused on the format's range, float64 subnormals,
    and raw random bit patterns, NaN and inf among them) for every catalogue format and formats
    with the other overflow policies, flush to zero, 1 and 52 mantissa bits, 11 exponent bits."""
    rng = np.random.default_rng(100 + len(fmt.name))
    raw = rng.integers(-(2**63), 2**63 - 1, 20_000, dtype=np.int64).view(np.float64)
    xs = np.concatenate([random_points(fmt, 40_000, seed=21), raw, SPECIALS])
    assert np.isnan(xs).any() and np.isinf(xs).any() and (np.abs(xs) < 2.0**-1022).sum() > 5000
    assert check_kernel_matches_numpy(xs, fmt, "random") == 2 * len(Mode) * len(xs)


@NEEDS_NUMBA
def test_kernel_layouts_and_inputs() -> None:
    """Shapes, strides, read-only and converted inputs: the same results as the numpy path."""
    x = random_points(get_format("float16"), 3000, seed=4).reshape(50, 60)
    ro = x.copy()
    ro.flags.writeable = False
    f32 = np.array([0.1, -2.5e-6, 65519.0, 3e38], np.float32)
    strided = [x.T, x[::3, 1::2], np.asfortranarray(x), x[7, 9:10], np.broadcast_to(x[0], (4, 60))]
    buf = np.zeros(8 * 60 + 1, np.uint8)
    buf[1:] = x[5].view(np.uint8)
    unaligned = np.frombuffer(buf.data, dtype=np.float64, count=60, offset=1)
    assert not unaligned.flags.aligned and np.array_equal(unaligned, x[5])
    strided.append(unaligned)
    scalars = [np.array(x[1, 2]), float(x[3, 4]), -0.0, 7]
    inputs = [x, ro, x.tolist(), f32, np.arange(-9, 9), np.empty((0, 3)), *strided, *scalars]
    for v in inputs:
        for mode in (Mode.NEAREST_EVEN, Mode.UP, Mode.STOCHASTIC):
            want = rounding._round_to_numpy(v, "float16", mode, rng=3)
            got = rounding._round_to_kernel(v, "float16", mode, rng=3)
            assert got.shape == np.shape(v) and got.flags.c_contiguous
            assert_same_bits(got, want, np.asarray(v, np.float64), f"{type(v).__name__} {mode}")
            assert_same_bits(round_to(v, "float16", mode, rng=3), want, np.asarray(v, float), "")


def test_round_to_loads_the_kernel_after_enough_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rounding, "_kernel", None)
    monkeypatch.setattr(rounding, "_numpy_values", 0)
    small = np.linspace(-3, 3, 1000)
    want = rounding._round_to_numpy(small, "bf16")
    assert_same_bits(round_to(small, "bf16"), want, small, "small")
    assert rounding._kernel is None and rounding._numpy_values == 1000  # numba not even loaded
    big = np.full(rounding.KERNEL_AFTER - 1000, 1.0 + 2.0**-8)  # a tie: to the even 1.0
    assert np.all(round_to(big, "bf16") == 1.0)
    assert kernel_active() is HAVE_NUMBA  # loaded now, and round_to keeps using it
    assert_same_bits(round_to(small, "bf16"), want, small, "small, after")
    monkeypatch.setattr(rounding, "_kernel", None)
    monkeypatch.setenv(rounding.KERNEL_ENV, "0")  # switched off: the numpy path serves
    assert rounding._load_kernel() is None and not rounding._use_kernel(10**9)
    assert np.all(round_to(big, "bf16") == 1.0)
    with pytest.raises(ImportError, match="numba"):
        rounding._round_to_kernel(small, "bf16")


# ---- the exact path --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["float16", "bfloat16", "fp8_e4m3", "float32", "e5m7"])
def test_round_exact_matches_round_to_on_floats(name: str) -> None:
    fmt = get_format(name)
    pts, _ = exhaustive_points(fmt) if name != "float32" else (None, None)
    xs = random_points(fmt, 4000, seed=2)
    if pts is not None:
        xs = np.concatenate([xs, np.random.default_rng(0).choice(pts, 4000)])
    for mode in DETERMINISTIC:
        assert_same(round_exact_array(xs, fmt, mode), round_to(xs, fmt, mode), xs, mode.value)
        assert_same(
            round_exact_array(xs[:1000], fmt, mode, subnormals=False),
            round_to(xs[:1000], fmt, mode, subnormals=False),
            xs[:1000],
            f"FTZ {mode.value}",
        )


@pytest.mark.parametrize("name", ["float16", "bfloat16", "fp8_e5m2", "float32"])
def test_round_exact_of_rationals_against_mpfr(name: str) -> None:
    """Values that no float64 holds (long rationals, near midpoints) against MPFR's mpq path."""
    fmt = get_format(name)
    rng = np.random.default_rng(4)
    table_pts = random_points(fmt, 600, seed=8)
    values = []
    for x in table_pts.tolist():
        mid = Fraction(x)
        nudge = Fraction(int(rng.integers(-3, 4)), 10**30) * abs(mid)  # 1e-30 relative, or 0
        values.append(mid + nudge)
    for k in range(200):  # rationals with large denominators across the range
        e = int(rng.integers(fmt.quantum_min - 3, fmt.emax + 2))
        values.append(Fraction(int(rng.integers(1, 10**12)), 3 * 10**11 + k) * Fraction(2) ** e)
    ctx = mpfr_contexts(fmt, subnormals=True)
    for mode, key in [
        (Mode.NEAREST_EVEN, "N"),
        (Mode.TOWARD_ZERO, "Z"),
        (Mode.UP, "U"),
        (Mode.DOWN, "D"),
    ]:
        want = []
        for v in values:
            with gmpy2.context(ctx[key]):
                r = float(mpfr(mpq(v.numerator, v.denominator)))
            want.append(expected_overflow(fmt, mode, v < 0) if abs(r) > fmt.max else r)
        got = [round_exact(v, fmt, mode) for v in values]
        xs = np.array([float(v) for v in values])
        assert_same(np.array(got), np.array(want), xs, f"rationals {name} {mode.value}")
    assert len(values) == 800


def test_round_exact_inputs() -> None:
    third = Fraction(1, 3)
    want = round_exact(third, "float16")
    assert round_exact(mpmath.mpf(1) / 3 + mpmath.mpf(2) ** -200, "float16") == want
    assert round_exact(gmpy2.mpq(1, 3), "float16") == want
    with gmpy2.context(precision=300):
        assert round_exact(gmpy2.mpfr(1) / 3, "float16") == want
    assert round_exact(-(10**400), "float16") == -INF
    assert round_exact(10**400, "float16", "toward_zero") == 65504
    assert round_exact(Fraction(1, 10**400), "float16", "up") == 2.0**-24
    assert (
        round_exact(-Fraction(1, 10**400), "float16") == 0
        and math.copysign(1, round_exact(-Fraction(1, 10**400), "float16")) < 0
    )
    assert round_exact(mpmath.mpf("-1e-100000"), "float16", "down") == -(2.0**-24)
    assert math.isnan(round_exact(mpmath.mpf("inf"), "fp8_e4m3"))
    assert round_exact(mpmath.mpf("-inf"), "float16") == -INF
    assert round_exact(-0.0, "float16") == 0 and math.copysign(1, round_exact(-0.0, "bf16")) < 0
    assert round_exact(Fraction(65520), "float16") == INF
    assert round_exact(Fraction(464), "fp8_e4m3") == 448
    assert math.isnan(round_exact(Fraction(465), "fp8_e4m3"))
    with pytest.raises(InputError, match="deterministic"):
        round_exact(1.0, "float16", "stochastic")
    with pytest.raises(InputError, match="cannot round"):
        round_exact("1.0", "float16")
    out = round_exact_array([[Fraction(1, 3), 2], [0.1, mpmath.mpf(5)]], "bf16")
    assert out.shape == (2, 2) and out[1, 1] == 5.0


def test_round_exact_reads_private_context_values_at_their_own_precision() -> None:
    # a 300-bit value just above a float16 tie must not be rounded to 53 bits first
    from mpmath.ctx_mp import MPContext

    from fpgrad.numbers.rounding import round_exact

    c = MPContext()
    c.prec = 300
    v = c.mpf(1) + c.mpf(2) ** -11 + c.mpf(2) ** -60
    assert round_exact(v, "float16") == 1.0 + 2.0**-10
    assert round_exact(-v, "float16") == -(1.0 + 2.0**-10)
