"""Cost of `fpgrad train`'s certified exact run: ball arithmetic against mpmath (N and 2N bits).

Prints per step, on the shipped example and on a 64-32-10 ReLU classifier with a batch of 256
(the size of the README's digits example), the time of each method and their ratio, measured in
one run. Run: python scripts/bench_train_exact.py [--steps N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fpgrad.model.netfile import load_network, parse_network
from fpgrad.model.network import Network
from fpgrad.run.optim import OptimConfig
from fpgrad.training import batch_schedule, exact_trajectory


def classifier() -> Network:
    rng = np.random.default_rng(0)
    doc = {
        "seed": 0,
        "layer": [
            {"type": "dense", "out": 32, "init": "he_normal"},
            {"type": "relu"},
            {"type": "dense", "out": 10},
        ],
        "loss": {"type": "cross_entropy"},
        "data": {
            "x": rng.random((256, 64)).round(4).tolist(),
            "y": rng.integers(0, 10, 256).tolist(),
        },
    }
    return parse_network(doc, source="classifier_64_32_10")


def per_step(net: Network, steps: int, method: str) -> tuple[float, float]:
    schedule = batch_schedule(net.x.shape[0], steps, None, 0)
    start = time.perf_counter()
    _, digits, used = exact_trajectory(net, OptimConfig(lr=0.1), schedule, 128, method)
    assert used == method, used
    return (time.perf_counter() - start) / steps, digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    showcase = load_network(Path(__file__).parent.parent / "fpgrad/examples/showcase.toml")
    exact_trajectory(showcase, OptimConfig(), batch_schedule(2, 2, None, 0), 128, "fast")  # jit
    for net, steps in ((showcase, 20 * args.steps), (classifier(), max(2, args.steps // 10))):
        fast, d_fast = per_step(net, steps, "fast")
        slow, d_slow = per_step(net, steps, "mpmath")
        print(
            f"{net.name}: {steps} steps; balls {fast * 1e3:.2f} ms/step ({d_fast:.1f} digits), "
            f"mpmath pair {slow * 1e3:.2f} ms/step ({d_slow:.1f} digits): "
            f"mpmath / balls = {slow / fast:.1f}"
        )


if __name__ == "__main__":
    main()
