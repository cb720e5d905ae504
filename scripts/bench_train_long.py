"""Long certified exact training (issue 14): how many steps the ball run keeps 17 digits.

Builds the README's digits example (scripts/digits_example.py: 64-32-10 ReLU classifier,
cross-entropy, 256 samples) in a temporary directory and runs the exact trajectory in ball
arithmetic (150 bits) with Adam, AdamW and SGD with momentum, batches of 64, up to ``--steps``
steps or until the balls stop vouching for 17 digits. Prints the certified digits of every
parameter every ``--every`` steps, the first step below 17 with the widest relative radii
there, then the run ``fpgrad train`` falls back to: Arb balls from the precision forecast
from the digits lost per step (:func:`fpgrad.training.arb_bits_for`; ``--arb-bits`` sets it),
the working precision lowered step by step as :meth:`fpgrad.training.ExactRun.working_bits`
decides (``--fixed``: one precision throughout), over all the steps, with its certified digits
and the mean working precision. CPU times per step against one torch float64 training step
(forward, backward, torch.optim step) of the same model, one thread each, measured in the same
run (the Arb run's time excludes the digit checks the script makes after every step).

``--sensitivity N`` measures instead (no certificate) whether the exact trajectory itself
amplifies small errors over N Adam steps: the 150-bit ball midpoints against the 100-bit
ball midpoints (each step's rounding, 2^-100, carried along) and against a run from initial
weights moved by 1e-20 relative (random signs, in the second word), beside the 150-bit radii.
``--profile N`` profiles N Adam steps of the Arb run at ``--arb-bits`` (default 467, the mean
working precision of the 1,000-step run) after one warm-up step: CPU time per step of the trace
(forward and backward; of which the matrix products), of the optimizer and of the rest, then
cProfile's top functions by own and by cumulative time.
``--products PRECS`` times Adam steps of the Arb run at each of these fixed precisions with
the matrix products through exact float64 slices (:mod:`fpgrad.arith.arb_slices`, what the run
takes) and through FLINT's arb_dot, alternating (5 rounds of 8 steps, the fastest round), and
prints both and their ratio.
Usage: ``python scripts/bench_train_long.py [--steps 1000] [--every 25] [--optimizers adam]
[--arb-bits B] [--fixed] [--no-arb] [--sensitivity N] [--profile N] [--products 200,467]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fpgrad.arith import expansion as xp  # noqa: E402
from fpgrad.model.from_torch import load_model_file  # noqa: E402
from fpgrad.model.network import Network  # noqa: E402
from fpgrad.reference.exact import DEFAULT_MAX_BITS  # noqa: E402
from fpgrad.run.optim import OptimConfig  # noqa: E402
from fpgrad.training import ExactRun, arb_bits_for, batch_schedule  # noqa: E402

OPTIMIZERS = {
    "adam": OptimConfig(name="adam", lr=1e-3),
    "adamw": OptimConfig(name="adam", lr=1e-3, weight_decay=0.01, decoupled=True),
    "sgd+momentum": OptimConfig(name="sgd", lr=0.1, momentum=0.9),
}
BATCH = 64


def torch_step_time(net: Network, cfg: OptimConfig, schedule: list[np.ndarray]) -> float:
    """Fastest CPU time of one torch float64 training step (dense/relu/tanh layers)."""
    layers: list[torch.nn.Module] = []
    for ly in net.layers:
        if ly.kind == "dense":
            lin = torch.nn.Linear(*ly.params["weight"].shape[::-1], dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(torch.tensor(ly.params["weight"]))
                lin.bias.copy_(torch.tensor(ly.params["bias"]))
            layers.append(lin)
        else:
            layers.append({"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[ly.kind]())
    model = torch.nn.Sequential(*layers)
    if cfg.name == "adam":
        cls = torch.optim.AdamW if cfg.decoupled else torch.optim.Adam
        opt: torch.optim.Optimizer = cls(
            model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    x, y = torch.tensor(net.x), torch.tensor(net.y, dtype=torch.long)
    best = float("inf")
    for rows in schedule[:50]:
        t0 = time.process_time()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        best = min(best, time.process_time() - t0)
    return best


def run_exact(
    run: ExactRun, schedule: list[np.ndarray], every: int
) -> tuple[list[str], tuple[int, str] | None, float, float, list[int]]:
    """Step ``run`` until the end or the first step below 17 digits: (digits every ``every``
    steps, (that step, why) or None, CPU seconds per step, digits lost per step after step 1,
    the working precision of every step)."""
    run.record_initial()
    trail, below, spent, first, d = [], None, 0.0, None, 0.0
    bits: list[int] = []
    for t, rows in enumerate(schedule, start=1):
        t0 = time.process_time()
        run.step(rows)
        spent += time.process_time() - t0
        bits.append(getattr(run.ar, "prec", run.bits))
        if run.failed():
            below = (t, "a value out of range or a ReLU branch undecided")
            break
        d = run.digits_now()
        first = d if first is None else first
        if t % every == 0:
            trail.append(f"{t}: {d:.1f}")
        if d < 17:
            below = (t, f"{d:.1f} digits")
            break
    steps = len(run.history.loss)
    lost = ((first or d) - d) / max(steps - 1, 1)
    return trail, below, spent / max(steps, 1), lost, bits


def _rel_dev(a: dict, b: dict) -> float:
    """Largest |a - b| / |a| over the parameters (multi-word midpoints, float64 result)."""
    worst = 0.0
    for k in a:
        ha, la = xp.hi_lo(a[k].mid)
        hb, lb = xp.hi_lo(b[k].mid)
        d, m = np.abs((ha - hb) + (la - lb)), np.abs(ha)
        worst = max(worst, float(np.max(d[m > 0] / m[m > 0])))
    return worst


def sensitivity(net: Network, steps: int, every: int) -> None:
    """The trajectory's own amplification of small errors (a measurement, not a proof)."""
    cfg = OPTIMIZERS["adam"]
    schedule = batch_schedule(net.x.shape[0], steps, BATCH, 0)
    ref, low, moved = (ExactRun(net, cfg, bits, balls=True) for bits in (150, 100, 150))
    rng = np.random.default_rng(0)
    for ball in moved.params.values():
        ball.mid[1] += ball.mid[0] * 1e-20 * rng.choice([-1.0, 1.0], ball.mid[0].shape)
    print(
        f"\nadam (lr {cfg.lr:g}): 150-bit ball radii against the spread of the trajectory "
        "itself (midpoints; relative, largest over the parameters)"
    )
    print("step | 150-bit radius | 100-bit midpoints | start moved by 1e-20 (growth)")
    for t, rows in enumerate(schedule, start=1):
        for run in (ref, low, moved):
            run.step(rows)
        if t % every == 0 or t == 1:
            rad = max(
                float(np.max(b.rad[np.abs(b.mid[0]) > 0] / np.abs(b.mid[0][np.abs(b.mid[0]) > 0])))
                for b in ref.params.values()
            )
            dev = _rel_dev(ref.params, moved.params)
            print(
                f"{t:4d} | {rad:.1e} | {_rel_dev(ref.params, low.params):.1e} | "
                f"{dev:.1e} ({dev / 1e-20:.2f}x)",
                flush=True,
            )


def profile(net: Network, steps: int, bits: int) -> None:
    """Where an Arb step's time goes (see the module docstring; a measurement, CPU times)."""
    import cProfile
    import pstats

    from fpgrad.arith.arb import ArbArith

    schedule = batch_schedule(net.x.shape[0], steps + 1, BATCH, 0)
    run = ExactRun(net, OPTIMIZERS["adam"], bits)
    run.adaptive = False
    run.record_initial()
    run.step(schedule[0])  # the graph's capture and first conversions
    spent = {"trace": 0.0, "products": 0.0, "optimizer": 0.0}

    def timed(what: str, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            t0 = time.process_time()
            out = fn(*args)
            spent[what] += time.process_time() - t0
            return out

        return call

    matmul = ArbArith.matmul
    ArbArith.matmul = timed("products", matmul)  # type: ignore[method-assign]
    run.trace = timed("trace", run.trace)  # type: ignore[method-assign]
    run.opt.step = timed("optimizer", run.opt.step)  # type: ignore[method-assign]
    t0 = time.process_time()
    try:
        for rows in schedule[1:]:
            run.step(rows)
    finally:
        ArbArith.matmul = matmul  # type: ignore[method-assign]
    total = time.process_time() - t0
    rest = total - spent["trace"] - spent["optimizer"]
    print(
        f"Adam, Arb balls at {bits} bits, {steps} steps: {total / steps * 1e3:.1f} ms per step: "
        f"trace {spent['trace'] / steps * 1e3:.1f} (matrix products "
        f"{spent['products'] / steps * 1e3:.1f}), optimizer {spent['optimizer'] / steps * 1e3:.1f}, "
        f"rest {rest / steps * 1e3:.1f}"
    )
    prof = cProfile.Profile()
    prof.enable()
    for rows in schedule[1:]:
        run.step(rows)
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(15)
    stats.sort_stats("cumtime").print_stats(15)


def products(net: Network, precs: list[int]) -> None:
    """Adam steps with the slice products against arb_dot's, alternating (a measurement)."""
    schedule = batch_schedule(net.x.shape[0], 41, BATCH, 0)
    print("Adam steps of the Arb run, CPU ms per step (fastest of 5 rounds of 8 steps):")
    for prec in precs:
        runs, best = {}, {}
        for slices in (True, False):
            run = ExactRun(net, OPTIMIZERS["adam"], prec)
            run.adaptive = False
            run.ar.slice_products = slices
            run.record_initial()
            run.step(schedule[0])  # the graph's capture, the kernels' first use
            runs[slices], best[slices] = run, float("inf")
        for k in range(5):
            for slices in (True, False):
                t0 = time.process_time()
                for rows in schedule[1 + 8 * k : 9 + 8 * k]:
                    runs[slices].step(rows)
                best[slices] = min(best[slices], (time.process_time() - t0) / 8)
        print(
            f"  {prec} bits: slice products {best[True] * 1e3:.2f} ms, arb_dot "
            f"{best[False] * 1e3:.2f} ms ({best[False] / best[True]:.2f}x)",
            flush=True,
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--no-arb", action="store_true", help="skip the Arb run after the balls")
    ap.add_argument(
        "--arb-bits", type=int, default=0, help="start the Arb run here (default: forecast)"
    )
    ap.add_argument(
        "--fixed", action="store_true", help="Arb run at one precision throughout (not adaptive)"
    )
    ap.add_argument("--sensitivity", type=int, default=0, metavar="N")
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--products", default="", metavar="PRECS")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        script = ROOT / "scripts" / "digits_example.py"
        subprocess.run([sys.executable, str(script), "--out", tmp], check=True, capture_output=True)
        net = load_model_file(Path(tmp, "digits.toml")).network
    if args.sensitivity:
        sensitivity(net, args.sensitivity, args.every)
        return 0
    if args.profile:
        profile(net, args.profile, args.arb_bits or 467)
        return 0
    if args.products:
        products(net, [int(x) for x in args.products.split(",")])
        return 0
    print(
        f"digits example ({net.name}: {net.x.shape[0]} samples), batches of {BATCH}, exact run in "
        f"balls at 150 bits; one thread; CPU times"
    )
    for name in args.optimizers.split(","):
        cfg = OPTIMIZERS[name]
        schedule = batch_schedule(net.x.shape[0], args.steps, BATCH, 0)
        t_torch = torch_step_time(net, cfg, schedule)
        run = ExactRun(net, cfg, 150, balls=True)
        trail, below, per, lost, _ = run_exact(run, schedule, args.every)
        print(f"\n{name} (lr {cfg.lr:g}): certified digits by step: {', '.join(trail)}")
        if below is None:
            print(f"  {len(schedule)} steps, >= 17 digits throughout")
        else:
            print(f"  below 17 digits at step {below[0]} ({below[1]}); {run.radius_report()}")
        print(
            f"  {per * 1e3:.2f} ms per ball step vs torch float64 {t_torch * 1e3:.3f} ms "
            f"({per / t_torch:.0f}x); about {lost:.2f} digits lost per step"
        )
        if below is None or args.no_arb:
            continue
        bits = args.arb_bits or arb_bits_for(lost, len(schedule), DEFAULT_MAX_BITS)
        arb = ExactRun(net, cfg, bits)
        arb.horizon, arb.adaptive = len(schedule), not args.fixed
        trail, below, per, lost, used = run_exact(arb, schedule, args.every)
        print(
            f"  Arb balls from {bits} bits (working precision: mean {np.mean(used):.0f}, "
            f"last {used[-1]}): certified digits by step: {', '.join(trail)}"
        )
        print(
            f"  {len(arb.history.loss)} steps, "
            + ("certified digits >= 17 throughout" if below is None else f"below 17 at {below}")
            + f"; {per * 1e3:.1f} ms per step ({per / t_torch:.0f}x torch float64)"
            # adaptive: the digits follow the working precision, not only the radii's growth
            + (f", about {lost:.3f} digits lost per step" if args.fixed else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
