"""Arb matrix products: exact float64 slices (fpgrad.arith.arb_slices) against arb_dot.

Times both engines on the same balls in one run (fastest of N alternating calls, one thread)
for the five product shapes of an exact training step of the digits example (64-32-10,
batches of 64: the pixel data are small integers, the rest full-precision balls) at
precisions from 128 to 1600 bits, and prints each time and the ratio arb_dot / slices. The
precisions at which ArbArith takes the slices (``MIN_PREC``, ``FULL_PRECS`` in arb_slices)
come from these ratios. Run: ``python scripts/bench_arb_products.py [--precs 128,467,1600]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from flint import arb, ctx  # noqa: E402

from fpgrad.arith import arb_kernels, arb_slices  # noqa: E402

#: (m, n, p, which operand holds the pixel data: "a", "b" or "")
SHAPES = [
    (64, 64, 32, "a"),
    (64, 32, 10, ""),
    (64, 10, 32, ""),
    (10, 64, 32, ""),
    (32, 64, 64, "b"),
]


def _balls(rng: np.random.Generator, shape: tuple[int, int], pixels: bool, prec: int) -> np.ndarray:
    old = ctx.prec
    ctx.prec = prec
    try:
        if pixels:
            vals = [arb(int(v)) for v in rng.integers(0, 17, shape[0] * shape[1])]
        else:
            vals = [
                arb(float(v)) / 3 + arb(0, 2.0 ** -(prec - 8))
                for v in rng.standard_normal(shape[0] * shape[1])
            ]
    finally:
        ctx.prec = old
    out = np.empty(len(vals), dtype=object)
    out[:] = vals
    return out.reshape(shape)


def _best(fns: list, rounds: int) -> list[float]:  # noqa: ANN001 - callables
    best = [math.inf] * len(fns)
    for fn in fns:
        fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.process_time()
            fn()
            best[i] = min(best[i], time.process_time() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precs", default="128,200,300,467,800,1200,1600")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if not (arb_kernels.available() and arb_slices._jit() is not None):
        print("the compiled Arb kernels are not available here")
        return 1
    rng = np.random.default_rng(0)
    jit = arb_slices._jit()
    print(
        "CPU ms per product, fastest of alternating calls: slices / arb_dot (ratio); "
        "* where ArbArith keeps arb_dot"
    )
    print(
        "prec | "
        + " | ".join(f"{m}x{n}x{p}{' ' + w + '=pixels' if w else ''}" for m, n, p, w in SHAPES)
    )
    for prec in (int(x) for x in args.precs.split(",")):
        cells = []
        for m, n, p, which in SHAPES:
            a = _balls(rng, (m, n), which == "a", prec)
            b = _balls(rng, (n, p), which == "b", prec)
            slices = partial(arb_slices._product, a, b, prec, jit, False)  # the engine itself
            t_s, t_d = _best([slices, partial(arb_kernels.matmul, a, b, prec)], args.rounds)
            taken = prec >= arb_slices.MIN_PREC and arb_slices.matmul(a, b, prec) is not None
            cells.append(
                f"{t_s * 1e3:.2f} / {t_d * 1e3:.2f} ({t_d / t_s:.2f}x){'' if taken else '*'}"
            )
        print(f"{prec} | " + " | ".join(cells), flush=True)
    lo, hi = arb_slices.FULL_PRECS
    print(
        f"ArbArith(slice_products=True) takes the slices from {arb_slices.MIN_PREC} bits, "
        f"for two operands that both need more than one slice from {lo} to {hi} bits"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
