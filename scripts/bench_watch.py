"""Overhead of fpgrad.watching: watched / unwatched training-step time, measured in one run.

A small MLP (64-256-256-10, batch 256) trained with Adam, in float32 and under
torch.autocast(bfloat16), unwatched, watched on every step (every=1: every aten op shadowed)
and watched on every 10th step (every=10). Each configuration runs the same steps on a copy of
the same model; the mean step time of the best of
several interleaved rounds is compared (the machine may be shared).

    PYTHONPATH=. python scripts/bench_watch.py [--steps 40] [--clock process] [--breakdown|--per-op]

``--breakdown`` instead times the float32 watched step with its parts switched off one after
another (op records, optimizer records, the float64 shadow step, the rest of the per-op
bookkeeping, module tracking), interleaved: the differences are what each part costs.

``--per-op`` instead times the op records of a watched float32 step per aten op (the statistics
of its outputs, ``fpgrad.watching.classify.op_stats``), split by whether an output held a zero.

``--clock process`` times CPU time of this process (time.process_time) instead of wall time: on
a shared machine it leaves out the time the process waits for a core.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch

import fpgrad

PARTS = [
    "watched (every=1)",
    "- op records",
    "- optimizer records",
    "- float64 shadow step",
    "- per-op bookkeeping",
    "- module tracking (the dispatch mode alone)",
]  #: --breakdown's rows: PARTS[k] (k >= 1) is the step with parts_off(k)

SAVED: dict[tuple[Any, str], Any] = {}  # (owner, attribute) -> the watch's own function


def parts_off(level: int) -> None:
    """Switch off the watch's parts up to ``level`` (0: none), as ``bench_watch --breakdown``."""
    from fpgrad.watching import modules, watcher

    init = SAVED.setdefault((modules.ModuleStack, "__init__"), modules.ModuleStack.__init__)
    stubs: list[tuple[int, Any, str, Any]] = [
        (1, watcher, "op_stats", lambda *a, **k: []),
        (2, watcher, "step_records", lambda *a, **k: []),
        (3, watcher.ShadowOptimizer, "requested_updates", lambda *a, **k: None),
        (3, watcher, "widen", lambda *a, **k: {}),
        (4, watcher.Watcher, "_on_op", lambda self, func, args, kwargs: func(*args, **kwargs)),
        (
            5,
            modules.ModuleStack,
            "__init__",
            lambda self, model, active: init(self, torch.nn.Module(), active),
        ),
    ]
    for at, owner, name, stub in stubs:
        own = SAVED.setdefault((owner, name), getattr(owner, name))
        setattr(owner, name, stub if level >= at else own)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )


CLOCK = time.perf_counter


def _steps(m: torch.nn.Module, n: int, autocast: bool, every: int | None) -> list[float]:
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    times = []
    ctx = fpgrad.watch(m, opt, every=every) if every else nullcontext()
    with ctx:
        for _ in range(n):
            t0 = CLOCK()
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = torch.nn.functional.cross_entropy(m(x).float(), y)
            loss.backward()
            opt.step()
            times.append(CLOCK() - t0)
    return times


def _breakdown(steps: int, rounds: int) -> None:
    """Watched float32 step time with the watch's parts switched off cumulatively."""
    labels = PARTS
    base = _model()
    _steps(copy.deepcopy(base), 3, False, 1)
    best: dict[int, float] = {}
    try:
        for _ in range(rounds):
            for level in range(-1, len(labels)):
                if level >= 0:
                    parts_off(level)
                t = statistics.mean(
                    _steps(copy.deepcopy(base), steps, False, None if level < 0 else 1)
                )
                best[level] = min(best.get(level, float("inf")), t)
    finally:
        parts_off(0)
    calls = []
    for every in (None, 1):  # aten calls per step (torch.profiler), unwatched and watched
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _steps(copy.deepcopy(base), 10, False, every)
        ka = prof.key_averages()
        calls.append(sum(e.count for e in ka if e.key.startswith("aten::")) / 10)
    print(f"aten calls per step: unwatched {calls[0]:.0f}, watched {calls[1]:.0f}")
    print("| float32 step | ms/step | ratio to unwatched |")
    print("|---|---|---|")
    print(f"| unwatched | {best[-1] * 1e3:.2f} | 1.00x |")
    for level, label in enumerate(labels):
        print(f"| {label} | {best[level] * 1e3:.2f} | {best[level] / best[-1]:.2f}x |")


def _per_op(steps: int) -> None:
    """Time spent in the op records of a watched float32 step, per aten op."""
    from fpgrad.watching import watcher

    acc: dict[tuple[str, bool], list[float]] = {}
    stats = watcher.op_stats

    def timed(func: Any, args: tuple, kwargs: dict, out: Any) -> list[dict[str, Any]]:
        t0 = CLOCK()
        rows = stats(func, args, kwargs, out)
        key = (str(func), any(r["zeros"] for r in rows))
        e = acc.setdefault(key, [0, 0.0])
        e[0] += 1
        e[1] += CLOCK() - t0
        return rows

    base = _model()
    _steps(copy.deepcopy(base), 3, False, 1)
    watcher.op_stats = timed
    try:
        _steps(copy.deepcopy(base), steps, False, 1)
    finally:
        watcher.op_stats = stats
    print("| aten op | output with zeros | calls/step | us/call | ms/step |")
    print("|---|---|---|---|---|")
    total = 0.0
    for (op, zeros), (n, t) in sorted(acc.items(), key=lambda kv: -kv[1][1]):
        total += t
        print(
            f"| {op} | {'yes' if zeros else 'no'} | {n / steps:.1f} | {t / n * 1e6:.0f} | "
            f"{t / steps * 1e3:.3f} |"
        )
    print(f"| all | | | | {total / steps * 1e3:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clock", choices=("wall", "process"), default="wall")
    ap.add_argument("--breakdown", action="store_true", help="time the watch's parts (float32)")
    ap.add_argument("--per-op", action="store_true", help="time the op records per aten op")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter
    torch.set_num_threads(1)
    base = _model()
    print(
        f"torch {torch.__version__}, 1 thread, {args.clock} clock, {args.rounds} interleaved rounds of "
        f"{args.steps} steps per configuration; per configuration the best round"
    )
    if args.breakdown:
        _breakdown(args.steps, args.rounds)
        return
    if args.per_op:
        _per_op(args.steps)
        return
    print("| compute | unwatched ms/step | every=1 ms/step | ratio | every=10 ms/step | ratio |")
    print("|---|---|---|---|---|---|")
    for autocast in (False, True):
        _steps(copy.deepcopy(base), 3, autocast, 1)  # warm-up (imports, allocator)
        best: dict[int | None, float] = {}
        for _ in range(args.rounds):
            for every in (None, 1, 10):
                # the mean step: with every=10 a run pays 1 sampled + 9 light steps
                t = statistics.mean(_steps(copy.deepcopy(base), args.steps, autocast, every))
                best[every] = min(best.get(every, float("inf")), t)
        plain, w1, w10 = best[None], best[1], best[10]
        name = "autocast bfloat16" if autocast else "float32"
        print(
            f"| {name} | {plain * 1e3:.2f} | {w1 * 1e3:.2f} | {w1 / plain:.2f}x | "
            f"{w10 * 1e3:.2f} | {w10 / plain:.2f}x |"
        )


if __name__ == "__main__":
    main()
