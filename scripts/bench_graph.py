"""Benchmark of the exact reference on captured models (issue 13), ratios within one run.

Times one forward+backward of torch float64 (eager autograd) and one certified exact
evaluation of the captured graph (:func:`fpgrad.graph.exact.exact_graph`) for the CNN and the
transformer block of the tests (tests/graph_models.py), a wider transformer block, and a wider
residual MLP with hand-written RMSNorm. Prints each time, the ratio exact / float64, the exact method (fast
balls, or Arb where an op has no ball slot: GELU) and the certified digits.
Usage: ``python scripts/bench_graph.py [--repeats R]`` (one thread for BLAS and torch).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from graph_models import ResidualMLP, TransformerBlock, small_cnn, transformer_block  # noqa: E402

import fpgrad  # noqa: E402
from fpgrad.graph.exact import exact_graph  # noqa: E402


def _f64_time(model: nn.Module, inputs: tuple, y: torch.Tensor, repeats: int) -> float:
    m = copy.deepcopy(model).double()
    xs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    best = float("inf")
    for _ in range(repeats):
        m.zero_grad()
        t0 = time.perf_counter()
        nn.CrossEntropyLoss()(m(*xs), y).backward()
        best = min(best, time.perf_counter() - t0)
    return best


def _wider_transformer() -> tuple:
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (4, 8))
    pad = torch.zeros(4, 8, dtype=torch.bool)
    pad[1, -2:] = True
    return TransformerBlock(11, 16, 4), (tokens, pad), torch.randint(0, 11, (32,))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Support for mismatched")
    torch.manual_seed(0)
    mlp = ResidualMLP(16, 32, 10)
    cases = {
        "residual MLP (RMSNorm, 32 wide, batch 64)": (
            mlp, (torch.randn(64, 16),), torch.randint(0, 10, (64,))),
        "CNN (tests/graph_models.py)": (lambda m, x, y: (m, (x,), y))(*small_cnn()),
        "transformer block (tests/graph_models.py)": transformer_block(),
        "transformer block (16 wide, 4 heads, 4 x 8)": _wider_transformer(),
    }  # fmt: skip
    print(f"{'model':45s} {'float64 s':>10s} {'exact s':>9s} {'ratio':>8s}  method  digits")
    for name, (model, inputs, y) in cases.items():
        net = fpgrad.from_module(model, inputs, y, nn.CrossEntropyLoss())
        exact_graph(net.graph)  # compile / warm the kernels
        t64 = _f64_time(model, inputs, y, args.repeats)
        best, ex = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ex = exact_graph(net.graph)
            best = min(best, time.perf_counter() - t0)
        assert ex is not None
        print(
            f"{name:45s} {t64:10.5f} {best:9.3f} {best / t64:8.0f}x  {ex.method:6s}  "
            f"{ex.certified_digits:.1f}"
        )


if __name__ == "__main__":
    main()
