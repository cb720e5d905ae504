"""Where compare's time goes after the exact trace, on an MNIST-sized MLP (columnar results).

    python scripts/bench_compare_columnar.py [--width 784] [--batch 256] [--json]

Builds a 784-W-64-10 ReLU MLP (W = 784: 0.67M parameters) with cross-entropy on random data,
and times in one run: one torch float64 forward+backward (the unit), the certified exact
trace, ``compare`` (float16, bfloat16, float32; the exact trace reused: native runs, verdicts,
attribution, diagnosis), ``render()`` (the bounded tables), ``gradients.npz`` and, with
``--json``, the streaming JSON of every element. Prints each as seconds and as a ratio to the
unit, and the peak RSS. Timings depend on the CPU and its load; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fpgrad.diagnose.comparison import compare  # noqa: E402
from fpgrad.graph.layers import exact_trace  # noqa: E402
from fpgrad.model.netfile import parse_network  # noqa: E402
from fpgrad.present.report.own import write_npz  # noqa: E402


def network(width: int, batch: int):  # noqa: ANN201 - a Network
    rng = np.random.default_rng(0)
    doc = {
        "name": f"mlp784-{width}-64-10",
        "seed": 0,
        "layer": [
            {"type": "dense", "out": width},
            {"type": "relu"},
            {"type": "dense", "out": 64},
            {"type": "relu"},
            {"type": "dense", "out": 10},
        ],
        "loss": {"type": "cross_entropy"},
        "data": {"x": rng.random((batch, 784)).tolist(), "y": rng.integers(0, 10, batch).tolist()},
    }
    return parse_network(doc, source="bench")


def torch_unit(net) -> float:  # noqa: ANN001
    """Seconds of one torch float64 forward+backward (best of 5), one thread."""
    from fpgrad.run.torch_native import torch_trace

    torch.set_num_threads(1)
    torch_trace(net, "float64")  # warm-up
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch_trace(net, "float64")
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=784)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="also time the streaming JSON")
    args = parser.parse_args()
    net = network(args.width, args.batch)
    params = sum(v.size for v in net.params.values())
    unit = torch_unit(net)
    rows = []

    def timed(label: str, fn):  # noqa: ANN001, ANN202
        t = time.perf_counter()
        out = fn()
        rows.append((label, time.perf_counter() - t))
        return out

    ex = timed("exact trace (certified)", lambda: exact_trace(net))
    c = timed(
        "compare, exact reused (3 precisions)",
        lambda: compare(net, precisions="float16,bfloat16,float32", exact=ex),
    )
    text = timed("render() (60 element rows)", c.render)
    with tempfile.TemporaryDirectory() as tmp:
        timed("gradients.npz", lambda: write_npz(c, Path(tmp) / "g.npz"))
    if args.json:
        buf = io.StringIO()
        timed("JSON, every element (streaming)", lambda: c.write_json(buf))
    print(f"{net.name}: {params:,} parameters, batch {args.batch}")
    print(f"unit: torch float64 forward+backward, one thread: {unit * 1e3:.1f} ms")
    for label, sec in rows:
        print(f"{label:40s} {sec:8.2f} s  {sec / unit:9.0f}x")
    print(f"render printed {len(text.splitlines())} lines")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
