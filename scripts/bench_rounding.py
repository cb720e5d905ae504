"""Speed and correctness of fpgrad's round_to against other tools, in one run.

For each format, 10**7 float64 values spread over the whole range of the format (and a little
beyond, both ends): 80% log-uniform magnitudes with random 52-bit significands, 10% exact
midpoints between neighbouring values (ties), 10% midpoints nudged by 1 to 2**20 float64 ulps
(where rounding twice, through float32, goes wrong), plus zeros, infinities, NaN, max and the
smallest subnormal. Times are the best of ``--repeat`` runs, as a ratio to one numpy float64
multiply of the same array (``x * 1.0000000000000002``, a fresh output array like every tool's).
Every tool is timed from float64 to float64 (a cast into the format and back).

``round_to`` is timed as users call it, on its default path: the compiled numba kernel (one pass
over the float64 bit patterns, :mod:`fpgrad.numbers._rounding_kernel`), loaded before the first timing
(the load time is printed). Beside it, for contrast, the numpy path ``_round_to_numpy`` (several
vectorised passes; the fallback without numba), whose results must be bit-identical to the
kernel's: the column ``!=kernel`` counts the values where they are not (must be 0).

Wrong results are counted against an exact oracle that shares no code with round_to: the
float64's integer significand and exponent, shifted and rounded with integer arithmetic
(remainder against half, parity for ties), vectorised in numpy int64. The oracle is itself
checked against MPFR (gmpy2, subnormalize) on a random subsample and on every edge value
first, and the run stops if it disagrees anywhere.

Other tools (round to nearest even only): pychop's ``Chop(exp_bits, man_bits, rmode=1)``
(IEEE-style formats: its e4m3 has an infinity and max 240, so it cannot express e4m3fn;
timed on the first 10**6 values, as it runs at about 1-2 microseconds a value), ml_dtypes
casts (bfloat16, float8_e4m3fn, float8_e5m2), torch casts (float16, bfloat16, float8_e4m3fn,
float8_e5m2) and numpy's float16 cast.

    .venv/bin/python scripts/bench_rounding.py            # 10**7 values, about 5 minutes
    .venv/bin/python scripts/bench_rounding.py --n 1000000 --repeat 1   # a quick look
    .venv/bin/python scripts/bench_rounding.py --no-numpy-path   # skip the numpy path's timings

Needs the ``bench`` extra (pychop, ml_dtypes); a missing tool is skipped with a note.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpgrad.numbers import rounding  # noqa: E402
from fpgrad.numbers.formats import Format, Special, get_format  # noqa: E402
from fpgrad.numbers.rounding import Mode, round_to  # noqa: E402

FORMATS = ["float16", "bfloat16", "tf32", "fp8_e4m3", "fp8_e5m2", "e5m7", "float32"]
DETERMINISTIC = [
    Mode.NEAREST_EVEN,
    Mode.NEAREST_AWAY,
    Mode.TOWARD_ZERO,
    Mode.UP,
    Mode.DOWN,
    Mode.ODD,
]
STOCHASTIC = [Mode.STOCHASTIC, Mode.STOCHASTIC_EQUAL]
TARGET_RATIO = 5.0
PYCHOP_N = 10**6


# ---- data ------------------------------------------------------------------------------------


def sample(fmt: Format, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_mid = n // 10
    n_near = n // 10
    n_log = n - n_mid - n_near
    lo_exp, hi_exp = fmt.quantum_min - 3, fmt.emax + 2  # a little beyond both ends
    e = rng.integers(lo_exp, hi_exp, n_log)
    m = 1.0 + rng.integers(0, 2**52, n_log) / 2.0**52  # random 52-bit significands
    log_part = np.ldexp(m, e)
    # midpoints: (2q + 1) * 2**(qexp - 1), q a random significand of the format
    qexp = rng.integers(fmt.quantum_min, fmt.emax - fmt.man_bits + 1, n_mid + n_near)
    top = np.where(qexp == fmt.quantum_min, 2**fmt.precision, 2**fmt.precision)
    low = np.where(qexp == fmt.quantum_min, 0, 2**fmt.man_bits)
    q = rng.integers(low, top)
    mids = np.ldexp(2.0 * q + 1.0, qexp - 1)
    k = rng.integers(1, 2**20, n_near) * rng.choice([-1.0, 1.0], n_near)
    near = mids[n_mid:] * (1.0 + k * 2.0**-52)
    x = np.concatenate([log_part, mids[:n_mid], near])
    x *= rng.choice([-1.0, 1.0], n)
    edges = [
        0.0,
        -0.0,
        math.inf,
        -math.inf,
        math.nan,
        fmt.max,
        -fmt.max,
        fmt.smallest_subnormal,
        fmt.smallest_subnormal / 2,
        fmt.smallest_normal,
    ]
    x[: len(edges)] = edges
    return x


# ---- the exact integer oracle ----------------------------------------------------------------


def oracle(x: np.ndarray, fmt: Format, mode: Mode) -> np.ndarray:
    """Correct rounding by integer arithmetic on the float64 fields (subnormals on)."""
    bits = x.view(np.uint64)
    neg = (bits >> np.uint64(63)).astype(bool)
    e_field = ((bits >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
    frac = (bits & np.uint64(2**52 - 1)).astype(np.int64)
    normal64 = e_field > 0
    sig = np.where(normal64, frac | (1 << 52), frac)  # |x| = sig * 2**exp2 exactly
    exp2 = np.where(normal64, e_field - 1075, -1074)
    bitlen = np.frexp(sig.astype(np.float64))[1]  # exact: sig < 2**53; 0 for sig == 0
    lead = exp2 + bitlen - 1  # floor(log2 |x|)
    qexp = np.maximum(lead, fmt.emin) - fmt.man_bits  # quantum of the format at |x|
    shift = np.clip(qexp - exp2, 0, 62)  # bits of sig below the quantum (62: all of them)
    q = sig >> shift
    rem = sig & ((np.int64(1) << shift) - 1)
    half = np.where(shift > 0, np.int64(1) << np.maximum(shift - 1, 0), 1)  # 1 > rem = 0
    inexact = rem != 0
    if mode is Mode.NEAREST_EVEN:
        up = (rem > half) | ((rem == half) & (q & 1 == 1))
    elif mode is Mode.NEAREST_AWAY:
        up = rem >= half
    elif mode is Mode.TOWARD_ZERO:
        up = np.zeros_like(inexact)
    elif mode is Mode.UP:
        up = inexact & ~neg
    elif mode is Mode.DOWN:
        up = inexact & neg
    elif mode is Mode.ODD:
        up = inexact & (q & 1 == 0)
    else:
        raise ValueError(mode)
    with np.errstate(over="ignore"):
        mag = np.where(qexp > exp2, np.ldexp((q + up).astype(np.float64), qexp), np.abs(x))
    inf_value = math.inf if fmt.special is Special.IEEE else math.nan
    if mode in (Mode.NEAREST_EVEN, Mode.NEAREST_AWAY):
        over_pos = over_neg = inf_value
    elif mode is Mode.UP:
        over_pos, over_neg = inf_value, fmt.max
    elif mode is Mode.DOWN:
        over_pos, over_neg = fmt.max, inf_value
    else:  # toward zero, odd (max has an odd significand)
        over_pos = over_neg = fmt.max
    finite = e_field != 0x7FF
    mag = np.where(finite & (mag > fmt.max), np.where(neg, over_neg, over_pos), mag)
    mag = np.where(np.isinf(x), inf_value, mag)
    mag = np.where(np.isnan(x), math.nan, mag)
    return np.where(np.isnan(mag), math.nan, np.where(neg, -mag, mag))


def mpfr_check(fmt: Format, x: np.ndarray) -> int:
    """Mismatches of the integer oracle against MPFR on ``x`` (every deterministic IEEE mode)."""
    import gmpy2

    rounds = {
        Mode.NEAREST_EVEN: gmpy2.RoundToNearest,
        Mode.TOWARD_ZERO: gmpy2.RoundToZero,
        Mode.UP: gmpy2.RoundUp,
        Mode.DOWN: gmpy2.RoundDown,
    }
    bad = 0
    for mode, rnd in rounds.items():
        ctx = gmpy2.context(
            precision=fmt.precision,
            emin=fmt.quantum_min + 1,
            emax=1 << 20,
            subnormalize=True,
            round=rnd,
        )
        got = oracle(x, fmt, mode)
        want = np.array([float(ctx.plus(gmpy2.mpfr(v))) for v in x.tolist()])
        want = oracle(want, fmt, mode)  # MPFR has no overflow at this emax; apply the rules
        bad += int((~same(got, want)).sum())
    return bad


def same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    eq = (a == b) & (np.signbit(a) == np.signbit(b))
    return eq | (np.isnan(a) & np.isnan(b))


# ---- timing ----------------------------------------------------------------------------------


def best_time(fn: Callable[[], object], repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def mul_time(x: np.ndarray, repeat: int) -> float:
    return best_time(lambda: x * 1.0000000000000002, max(repeat, 3))


def other_tools() -> dict[str, dict[str, Callable[[np.ndarray], np.ndarray]]]:
    """tool -> format -> float64 to float64 rounding function."""
    tools: dict[str, dict[str, Callable[[np.ndarray], np.ndarray]]] = {}
    try:
        import torch

        dt = {
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "fp8_e4m3": torch.float8_e4m3fn,
            "fp8_e5m2": torch.float8_e5m2,
        }
        tools["torch"] = {
            name: (lambda x, d=d: torch.from_numpy(x).to(d).to(torch.float64).numpy())
            for name, d in dt.items()
        }
    except ImportError:
        print("note: torch not installed; skipped")
    try:
        import ml_dtypes

        md = {
            "bfloat16": ml_dtypes.bfloat16,
            "fp8_e4m3": ml_dtypes.float8_e4m3fn,
            "fp8_e5m2": ml_dtypes.float8_e5m2,
        }
        tools["ml_dtypes"] = {
            name: (lambda x, d=d: x.astype(d).astype(np.float64)) for name, d in md.items()
        }
    except ImportError:
        print("note: ml_dtypes not installed (pip install -e '.[bench]'); skipped")
    tools["numpy"] = {"float16": lambda x: x.astype(np.float16).astype(np.float64)}
    try:
        import warnings

        warnings.filterwarnings("ignore")
        from pychop import Chop

        tools["pychop"] = {}
        for name in FORMATS:
            fmt = get_format(name)
            chop = Chop(fmt.exp_bits, fmt.man_bits, rmode=1)
            tools["pychop"][name] = lambda x, c=chop: np.asarray(c(x), dtype=np.float64)
    except ImportError:
        print("note: pychop not installed (pip install -e '.[bench]'); skipped")
    return tools


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the memory allocated (numpy arrays included) while ``fn`` runs."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def bits_differ(a: np.ndarray, b: np.ndarray) -> int:
    return int((a.view(np.int64) != b.view(np.int64)).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10**7, help="values per format (default 10**7)")
    parser.add_argument("--repeat", type=int, default=2, help="timing runs, best kept (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument(
        "--no-numpy-path",
        action="store_true",
        help="do not time the numpy path (its results are still compared with the kernel's)",
    )
    args = parser.parse_args()
    import platform

    import torch

    print(
        f"bench_rounding: n = {args.n:,} per format, best of {args.repeat}; numpy "
        f"{np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{platform.processor() or platform.machine()}"
    )
    t0 = time.perf_counter()
    if rounding._load_kernel() is None:
        print(
            "note: numba not installed (or FPGRAD_ROUNDING_KERNEL=0): round_to runs the numpy path"
        )
    else:
        rounding._round_to_kernel(np.ones(4), "float16")
        import numba

        print(
            f"round_to runs the numba kernel (numba {numba.__version__}); importing numba and "
            f"compiling or loading the kernel from its cache took {time.perf_counter() - t0:.2f} s"
        )
    tools = other_tools()
    rows = []
    for name in args.formats.split(","):
        fmt = get_format(name)
        x = sample(fmt, args.n, args.seed)
        t_mul = mul_time(x, args.repeat)
        # the oracle against MPFR: edges and 3,000 random values of this sample
        check = np.concatenate([x[:10], x[np.random.default_rng(1).integers(0, x.size, 3000)]])
        bad = mpfr_check(fmt, check)
        if bad:
            print(f"ORACLE DISAGREES WITH MPFR on {bad} values for {name}; stopping")
            return 1
        print(f"\n{name}: multiply {t_mul * 1e3:.1f} ms; oracle = MPFR on {check.size} values")
        print(
            f"  {'tool':<10} {'mode':<17} {'ratio':>7} {'wrong':>10}   numpy path: "
            f"{'ratio':>5} {'!=kernel':>8}"
        )
        for mode in DETERMINISTIC + STOCHASTIC:
            t = best_time(lambda m=mode, v=x, f=fmt: round_to(v, f, m), args.repeat)
            got = round_to(x, fmt, mode)
            ref = rounding._round_to_numpy(x, fmt, mode)  # the same seed in stochastic modes
            differ = bits_differ(got, ref)
            del ref
            np_ratio = "-"
            if not args.no_numpy_path:
                t_np = best_time(lambda m=mode, v=x, f=fmt: rounding._round_to_numpy(v, f, m), 1)
                np_ratio = f"{t_np / t_mul:.1f}"
            if mode in STOCHASTIC:
                lo, hi = oracle(x, fmt, Mode.DOWN), oracle(x, fmt, Mode.UP)
                wrong = int((~(same(got, lo) | same(got, hi))).sum())  # not a neighbour
            else:
                wrong = int((~same(got, oracle(x, fmt, mode))).sum())
            del got
            flag = (
                ""
                if mode is not Mode.NEAREST_EVEN
                else ("  <= target" if t / t_mul <= TARGET_RATIO else "  ABOVE TARGET")
            )
            print(
                f"  {'round_to':<10} {mode.value:<17} {t / t_mul:7.1f} {wrong:10,d}   "
                f"{'':<11} {np_ratio:>5} {differ:8,d}{flag}"
            )
            rows.append((name, "round_to", mode.value, t / t_mul, wrong + differ))
        t_draw = best_time(lambda v=x: np.random.default_rng(0).random(v.size), args.repeat)
        draws = "(stochastic's draw)"
        print(f"  {'rng.random':<10} {draws:<17} {t_draw / t_mul:7.1f}")
        want = oracle(x, fmt, Mode.NEAREST_EVEN)
        for tool, fns in tools.items():
            if name not in fns:
                continue
            xs, ws = (x[:PYCHOP_N], want[:PYCHOP_N]) if tool == "pychop" else (x, want)
            tm = mul_time(xs, args.repeat) if tool == "pychop" else t_mul
            try:
                t = best_time(
                    lambda f=fns[name], v=xs: f(v), 1 if tool == "pychop" else args.repeat
                )
                wrong = int((~same(fns[name](xs), ws)).sum())
            except Exception as exc:  # noqa: BLE001 - report a tool that fails, go on
                print(f"  {tool:<10} {'nearest_even':<17} failed: {type(exc).__name__}: {exc}")
                continue
            note = f" (first {xs.size:,})" if xs.size != x.size else ""
            print(f"  {tool:<10} {'nearest_even':<17} {t / tm:7.1f} {wrong:10,d}{note}")
            rows.append((name, tool, "nearest_even", t / tm, wrong))
        del x, want
    f16 = get_format("float16")
    x = sample(f16, args.n, args.seed)
    print(
        f"\npeak allocation while rounding (tracemalloc; float16, input {x.nbytes / 2**20:,.0f} MiB):"
    )
    for label, fn in [
        ("round_to, nearest even", lambda: round_to(x, f16)),
        ("round_to, stochastic", lambda: round_to(x, f16, Mode.STOCHASTIC)),
        ("numpy path, nearest even", lambda: rounding._round_to_numpy(x, f16)),
        ("numpy path, stochastic", lambda: rounding._round_to_numpy(x, f16, Mode.STOCHASTIC)),
    ]:
        peak = peak_bytes(fn)
        print(f"  {label:<26} {peak / 2**20:7,.0f} MiB = {peak / x.nbytes:.1f}x the input array")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak resident memory of this run: {rss:,.0f} MiB")
    ne = [r for r in rows if r[1] == "round_to" and r[2] == "nearest_even"]
    worst = max(ne, key=lambda r: r[3])
    wrong = sum(r[4] for r in rows if r[1] == "round_to")  # wrong, or not the numpy path's
    print(
        f"round_to nearest even: worst ratio {worst[3]:.1f} ({worst[0]}), target "
        f"{TARGET_RATIO:.0f}: {'met' if worst[3] <= TARGET_RATIO else 'NOT met'}; "
        f"wrong results over all modes: {wrong}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
