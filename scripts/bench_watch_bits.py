"""Watched-step CPU time with the bit-pattern statistics on and off, interleaved in one process.

The same run as ``bench_watch_ab.py`` (64-256-256-10 MLP, Adam, every=1, turns of 12 steps)
with this tree's compiled statistics (:mod:`fpgrad.watching.bitstats`) switched off for every
other turn (then the torch paths run, as before them), the order alternating per round.

    PYTHONPATH=. python scripts/bench_watch_bits.py [--rounds 16] [--autocast]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_watch_ab as ab  # noqa: E402

import fpgrad  # noqa: E402
from fpgrad.watching import classify, optimizer_state  # noqa: E402

_ON = (classify.bit_stats, optimizer_state.state_counts)


def _mode(k: str) -> None:
    if k == "torch path":
        classify.bit_stats = lambda t: None  # type: ignore[assignment]
        optimizer_state.state_counts = lambda *a: None  # type: ignore[assignment]
    else:
        classify.bit_stats, optimizer_state.state_counts = _ON


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--autocast", action="store_true", help="autocast bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    keys = ["unwatched", "torch path", "bit path"]
    for k in keys:
        _mode(k)
        ab._run(None if k == "unwatched" else fpgrad, 3, args.autocast)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in keys}
    try:
        for r in range(args.rounds):
            for k in keys if r % 2 else [keys[0], keys[2], keys[1]]:
                _mode(k)
                t = ab._run(None if k == "unwatched" else fpgrad, 12, args.autocast)[0]
                times[k] += t[2:]
    finally:
        _mode("bit path")

    def q(v: list[float], f: float) -> float:
        return sorted(v)[int(f * (len(v) - 1))]

    u = times["unwatched"]
    print(f"{'autocast bfloat16' if args.autocast else 'float32'}, {args.rounds} rounds")
    print("| step | p25 ms | median ms | ratio p25 | ratio median |")
    print("|---|---|---|---|---|")
    for k, v in times.items():
        print(
            f"| {k} | {q(v, 0.25) * 1e3:.3f} | {q(v, 0.5) * 1e3:.3f} | "
            f"{q(v, 0.25) / q(u, 0.25):.2f}x | {q(v, 0.5) / q(u, 0.5):.2f}x |"
        )


if __name__ == "__main__":
    main()
