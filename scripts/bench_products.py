"""The two exact product engines side by side, one product shape at a time (issue 14).

For each m x n x p: one float64 GEMM, the int8 GEMMs alone (``torch._int_mm``, one per CRT
modulus), the CRT engine (fpgrad.arith.crt.matmul) and the float64 slices
(fpgrad.arith.ozaki.matmul_levels), on 3-word operands (random normal values with two lower
words) at the products' precision of 150-bit balls; fastest of ``--repeats`` process CPU times,
one thread, interleaved. Usage: ``python scripts/bench_products.py [--repeats R]``.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpgrad.arith import crt, ozaki  # noqa: E402
from fpgrad.arith import expansion as xp  # noqa: E402
from fpgrad.arith.ball import BallArith  # noqa: E402

SHAPES = (
    (128, 256, 256),
    (128, 1024, 1024),
    (256, 128, 256),
    (1024, 128, 1024),
    (128, 64, 256),
    (128, 256, 10),
)


def _words(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    top = rng.normal(size=shape)
    return xp.renorm([top, top * rng.normal(size=shape) * 2.0**-53, top * 2.0**-106], 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not crt.usable():
        print("torch._int_mm is absent or inexact here: only the float64 engine runs")
        return 0
    if not crt.fast():
        print(
            "no int8 dot-product unit here (fpgrad.arith.crt.fast): exact runs take the float64 "
            "slices for every shape; the int8 engine is timed anyway"
        )
    ar = BallArith(150)
    prec, rounding = ar.mm_prec, 8 * ar.eta
    rng = np.random.default_rng(0)
    print(f"products to 2**-{prec} (150-bit balls), 3-word operands, one thread, fastest CPU times")
    for m, n, p in SHAPES:
        a, b = _words(rng, (m, n)), _words(rng, (n, p))
        nm = len(crt.plan(n, prec, 3, 3, rounding).mods)
        ia = torch.randint(-127, 128, (m, n), dtype=torch.int8)
        ib = torch.randint(-127, 128, (n, p), dtype=torch.int8)
        fns = [
            lambda a=a, b=b: a[0] @ b[0],
            lambda ia=ia, ib=ib, nm=nm: [torch._int_mm(ia, ib) for _ in range(nm)],
            lambda a=a, b=b: crt.matmul(a, b, prec, rounding),
            lambda a=a, b=b: ozaki.matmul_levels(a, b, prec, rounding),
        ]
        best = [math.inf] * len(fns)
        for fn in fns:
            fn()
        for _ in range(args.repeats):
            for i, fn in enumerate(fns):
                t0 = time.process_time()
                fn()
                best[i] = min(best[i], time.process_time() - t0)
        gemm, ints, crt_t, f64_t = (t * 1e3 for t in best)
        print(
            f"{m}x{n}x{p}: float64 GEMM {gemm:.2f} ms; {nm} int8 GEMMs {ints:.2f} ms; "
            f"CRT engine {crt_t:.2f} ms, float64 slices {f64_t:.2f} ms: "
            f"CRT {f64_t / crt_t:.2f}x as fast"
            + ("" if crt.applies(m, n, p) else " (the float64 slices take this shape)")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
