"""Refit the constants of the exact product engines' cost model on this machine (issue 14).

Times the three engines as :class:`fpgrad.arith.ball.BallArith` calls them (k = 3 words out):
:func:`fpgrad.arith.crt.matmul_words` (int8 GEMMs and the CRT; the constants in ``crt.COSTS``
were fitted on its terms, before the renormalisation moved into it, which costs little more),
:func:`fpgrad.arith.ozaki.matmul_levels` (float64 slices) and
:func:`fpgrad.arith.digits.matmul_words` (int8 GEMMs of base-256 digits), on random shapes
(m, n, p from 10 to 1024) with the operands a trace gives them: 3-word balls, float64 data
(cut exactly) or one of each, at the products' precision of 150-bit balls; fastest of
``--repeats`` process CPU times, one thread. Fits each engine's terms
(:func:`fpgrad.arith.crt.crt_terms`, :func:`fpgrad.arith.crt.slice_terms`,
:func:`fpgrad.arith.digits.cost_terms`) by non-negative least squares, weighted three ways
(relative error, its square root, absolute time), prints the constants, and how often each
model (the three fits, this machine class's constants in ``crt.COSTS`` and ``digits.COSTS``,
and ``--try`` ones for the first two engines) chooses an engine that measured more than 10%
slower, and its total time against the best engine's.
Usage: ``python scripts/fit_crt_cost.py [--shapes N] [--repeats R] [--seed S]`` (scipy for its
non-negative least squares: installed with the dev extras, which scikit-learn needs).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import nnls  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpgrad.arith import crt, digits, ozaki  # noqa: E402

PREC = 133  # BallArith(150).mm_prec
SIZES = (10, 32, 64, 128, 256, 512, 1024)


def operand(rng: np.random.Generator, shape: tuple[int, int], words: int) -> np.ndarray:
    """3 words of random normal values with two lower words, or float64 data (1 word)."""
    out = np.zeros((3, *shape))
    out[0] = rng.normal(size=shape)
    if words == 3:
        out[1] = out[0] * 2.0**-53 * rng.uniform(-1, 1, shape)
        out[2] = out[1] * 2.0**-53 * rng.uniform(-1, 1, shape)
    return out


def best(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    t = math.inf
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        t = min(t, time.process_time() - t0)
    return t * 1e3


def features(m: int, n: int, p: int, a: np.ndarray, b: np.ndarray) -> tuple | None:
    """The terms of :func:`fpgrad.arith.crt.cost` for the CRT and slice engines, those of
    :func:`fpgrad.arith.digits.cost_terms` and the digit plan (None: no plan)."""
    widths = crt.exact_widths(a, b, n, PREC, 0.0)
    try:
        pl = crt.plan(n, PREC, 3, 3, 0.0, *widths)
        dp = digits.plan(n, PREC, 3, 3, 0.0, *widths)
    except ValueError:
        return None
    return (crt.crt_terms(m, n, p, 3, 3, pl), crt.slice_terms(m, n, p, 3, 3, pl, PREC),
            digits.cost_terms(m, n, p, dp), dp)  # fmt: skip


def fit(x: np.ndarray, y: np.ndarray, power: float) -> np.ndarray:
    """Non-negative least squares, rows weighted by ``y**-power`` (1: relative error, 0:
    absolute, which weighs the long products, and so the total time, the most)."""
    w = y**-power
    return nnls(x * w[:, None], y * w)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--try",
        dest="candidates",
        action="append",
        default=[],
        metavar="CRT/SLICES",
        help="also score these constants (8 comma-separated CRT ones, '/', 5 slice ones): a fit "
        "from another seed, checked on shapes it was not fitted to",
    )
    args = ap.parse_args()
    tries = []
    for c in args.candidates:
        try:
            kc, ko = (np.array(part.split(","), dtype=float) for part in c.split("/"))
        except ValueError:
            kc = ko = np.empty(0)
        if (len(kc), len(ko)) != (8, 5):
            ap.error(f"--try {c!r}: give 8 comma-separated CRT constants, '/', then 5 slice ones")
        tries.append((f"--try {c}", kc, ko))
    torch.set_num_threads(1)
    if not (crt.fast() and crt.usable()):
        print("this machine has no int8 CRT engine (crt.fast, crt.usable): nothing to fit")
        return 1
    rng = np.random.default_rng(args.seed)
    rows = []
    while len(rows) < args.shapes:
        m, n, p = (int(rng.choice(SIZES)) for _ in range(3))
        if m * n * p > 2**27:
            continue
        wa, wb = (int(w) for w in rng.choice([1, 3], 2))
        a, b = operand(rng, (m, n), wa), operand(rng, (n, p), wb)
        f = features(m, n, p, a, b)
        if f is None:
            continue
        tc = best(lambda: crt.matmul_words(a, b, PREC, 0.0, False, 3), args.repeats)  # noqa: B023
        to = best(lambda: ozaki.matmul_levels(a, b, PREC), args.repeats)  # noqa: B023
        td = best(lambda: digits.matmul_words(a, b, PREC, 0.0, 3, f[3]), args.repeats)  # noqa: B023
        rows.append((m, n, p, wa, wb, tc, to, f[0], f[1], td, f[2]))
    tc = np.array([r[5] for r in rows])
    to = np.array([r[6] for r in rows])
    xc = np.array([r[7] for r in rows])
    xo = np.array([r[8] for r in rows])
    td = np.array([r[9] for r in rows])
    xd = np.array([r[10] for r in rows])
    units = [f for f in crt.INT8_FEATURES if crt._capabilities().get(f)]
    print(f"{len(rows)} shapes, {args.repeats} repeats, torch {torch.__version__}, int8 units: "
          f"{', '.join(units)}; crt.cost now: the constants of crt.py for class {crt.machine()!r}")  # fmt: skip
    fits = []
    for power in (1.0, 0.5, 0.0):
        kc, ko, kd = fit(xc, tc, power), fit(xo, to, power), fit(xd, td, power)
        print(f"fit with weights y**-{power:g}:")
        print("  CRT constants:   ", ", ".join(f"{c:.4g}" for c in kc))
        print("  slices constants:", ", ".join(f"{c:.4g}" for c in ko))
        print("  digit constants: ", ", ".join(f"{c:.4g}" for c in kd))
        fits.append((f"fit y**-{power:g}", kc, ko, kd))
    kd_now = digits.COSTS.get(crt.machine())
    now = ("crt.cost now", *(np.array(k) for k in crt.COSTS[crt.machine()]),
           None if kd_now is None else np.array(kd_now))  # fmt: skip
    for name, kc, ko, kd in [*fits, now, *((*t, None) for t in tries)]:
        ec, eo = xc @ kc, xo @ ko
        ed = np.full(len(rows), np.inf) if kd is None else xd @ kd
        took = np.where(ed < np.minimum(ec, eo), td, np.where(ec < eo, tc, to))
        better = np.minimum(np.minimum(tc, to), td if kd is not None else np.inf)
        bad = took > 1.1 * better
        print(f"{name}: {int(bad.sum())} of {len(rows)} choices over 10% slower than the other "
              f"engine; {took.sum():.1f} ms in all against {better.sum():.1f} ms at best; "
              f"relative error of the estimates: CRT {np.median(abs(ec / tc - 1)):.0%}, "
              f"slices {np.median(abs(eo / to - 1)):.0%} (median)"
              + ("" if kd is None else f", digits {np.median(abs(ed / td - 1)):.0%}"))  # fmt: skip
    took_2 = np.minimum(tc, to)
    print(f"measured: the better of CRT and slices {took_2.sum():.1f} ms in all; with the digit "
          f"engine as a third choice {np.minimum(took_2, td).sum():.1f} ms; digits fastest on "
          f"{int((td < took_2).sum())} of {len(rows)} shapes")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
