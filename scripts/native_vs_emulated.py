"""Where torch's CPU kernels differ from the strict emulated machine, op by op.

For float16 and bfloat16: every finite value through exp, log, tanh, sigmoid and sqrt (torch
against correct rounding); random matmuls of several inner sizes (torch against the emulated
accumulations per_op, fp32, exact); nn.functional.linear with a bias (torch against a separate
rounded bias add and against the bias added inside the float32 accumulator); sums.

    .venv/bin/python scripts/native_vs_emulated.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpgrad.arith.emulated import EmulatedArith, to_odd, two_sum  # noqa: E402
from fpgrad.numbers.formats import FLOAT32, get_format  # noqa: E402
from fpgrad.numbers.rounding import round_to  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def t64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def to_t(x: np.ndarray, name: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(DTYPES[name])  # exact: x in the format


def differ(a: np.ndarray, b: np.ndarray) -> int:
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    return int((~same).sum())


def functions(name: str) -> None:
    fmt = get_format(name)
    codes = np.arange(2**16)
    v = np.array([fmt.decode(int(c)) for c in codes])
    v = v[np.isfinite(v)]
    ar = EmulatedArith(fmt)
    t = to_t(v, name)
    ops = {
        "exp": (torch.exp, ar.exp),
        "log": (torch.log, ar.log),
        "tanh": (torch.tanh, ar.tanh),
        "sigmoid": (torch.sigmoid, ar.sigmoid),
        "sqrt": (torch.sqrt, ar.sqrt),
    }
    parts = []
    for op, (tf, ef) in ops.items():
        with np.errstate(all="ignore"):
            parts.append(f"{op} {differ(t64(tf(t)), ef(v))}")
    print(
        f"  {name} functions, {v.size} finite inputs, results differing from correct "
        f"rounding: " + ", ".join(parts)
    )


def matmuls(name: str, rng: np.random.Generator) -> None:
    fmt = get_format(name)
    print(f"  {name} matmul (64 x K) @ (K x 64), N(0,1) entries; elements differing from torch:")
    for k in (2, 3, 8, 16, 64, 256, 1024):
        a = round_to(rng.normal(size=(64, k)), fmt)
        b = round_to(rng.normal(size=(k, 64)), fmt)
        torch_r = t64(to_t(a, name) @ to_t(b, name))
        counts = {
            acc: differ(torch_r, EmulatedArith(fmt, acc).matmul(a, b))
            for acc in ("per_op", "fp32", "exact")
        }
        print(
            f"    K={k:5d}: "
            + ", ".join(f"{acc} {n}" for acc, n in counts.items())
            + f" (of {torch_r.size})"
        )


def fused_fp32(a: np.ndarray, w: np.ndarray, bias: np.ndarray, fmt_name: str) -> np.ndarray:
    """The bias first in a float32 accumulator, then the products, one rounding at the end."""
    acc = np.broadcast_to(bias, (a.shape[0], w.shape[0])).astype(np.float64)
    for j in range(a.shape[1]):
        s, e = two_sum(acc, np.multiply.outer(a[:, j], w[:, j]))
        acc = round_to(to_odd(s, e), FLOAT32)
    return round_to(acc, get_format(fmt_name))


def linear(name: str, rng: np.random.Generator) -> None:
    fmt = get_format(name)
    ar = EmulatedArith(fmt)
    for k in (4, 64):
        x = round_to(rng.normal(size=(64, k)), fmt)
        w = round_to(rng.normal(size=(32, k)), fmt)
        bias = round_to(rng.normal(size=32) * 4, fmt)
        torch_r = t64(F.linear(to_t(x, name), to_t(w, name), to_t(bias, name)))
        separate = ar.add(ar.matmul(x, w.T), bias[None, :])
        fused = fused_fp32(x, w, bias, name)
        print(
            f"  {name} linear with bias, K={k}: differing from torch: separately rounded bias "
            f"add {differ(torch_r, separate)}, bias in the float32 accumulator "
            f"{differ(torch_r, fused)} (of {torch_r.size})"
        )


def sums(name: str, rng: np.random.Generator) -> None:
    fmt = get_format(name)
    for n in (8, 100, 1000):
        x = round_to(rng.normal(size=(64, n)), fmt)
        torch_r = t64(to_t(x, name).sum(dim=1))
        counts = {
            acc: differ(torch_r, EmulatedArith(fmt, acc).sum(x, axis=1))
            for acc in ("per_op", "fp32", "exact")
        }
        print(
            f"  {name} sum of {n}: differing from torch: "
            + ", ".join(f"{acc} {c}" for acc, c in counts.items())
            + " (of 64)"
        )


def main() -> int:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in DTYPES:
        functions(name)
        matmuls(name, rng)
        linear(name, rng)
        sums(name, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
