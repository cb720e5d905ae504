"""Scaling benchmark (issue 14): compare and advise on ReLU MLPs of 0.1M to 5.8M parameters.

Each case runs in a child process of its own (so its peak RSS is its own) under an
address-space limit (``--limit-gib``, default 4, as ``ulimit -v``), with BLAS and torch on one
thread. Per case it prints the time of one torch float64 forward+backward of the same model
(fastest of a few, measured first in the same process; process CPU time, which on one thread
is the work done whatever else runs on a shared machine, and wall time), and as ratios to it:

* ``exact``: the certified exact trace alone (:func:`fpgrad.exact.exact_trace`, fast method);
* ``native`` (also run by ``compare``): one run of each of float16, bfloat16, float32 as compare
  runs them (torch, forward and backward, every intermediate kept);
* ``compare``: :func:`fpgrad.compare.compare` with float16, bfloat16, float32, reusing that
  exact trace (so compare's own time: native runs, verdicts, summaries), and its rendering;
* ``advise``: :func:`fpgrad.advisor.advise` (float16, no torch measurement), its own exact
  trace included;

with the child's peak RSS after each phase (for the exact trace also how many values it holds,
parameters, gradients and intermediates, and its RSS growth over the torch phase as a multiple
of 4 float64 words per value: 3 midpoint words and a radius), and with ``--profile N`` where its time goes (its N
functions of largest own time, cProfile). A phase that exceeds ``--timeout`` seconds or the
memory limit ends the case and is reported as such (the benchmark goes on with the next).
Usage: ``python scripts/bench_scale.py [--sizes 0.1,0.67,1.86,5.8] [--tasks exact,compare,advise]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# millions of parameters -> layer widths (input 784, 10 classes, as MNIST)
SIZES = {
    "0.1": (784, 128, 10),
    "0.67": (784, 512, 512, 10),
    "1.86": (784, 1024, 1024, 10),
    "5.8": (784, 2048, 2048, 10),
}
TASKS = ("exact", "native", "compare", "advise")


def build_mlp(widths: tuple[int, ...], batch: int, seed: int = 0):  # noqa: ANN201
    """A ReLU MLP with torch.nn.Linear's default init, cross-entropy loss, fixed seed."""
    import math

    import numpy as np

    from fpgrad.network import Layer, Loss, Network

    rng = np.random.default_rng(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        bound = 1.0 / math.sqrt(fan_in)
        weight = rng.uniform(-bound, bound, size=(fan_out, fan_in))
        bias = rng.uniform(-bound, bound, size=fan_out)
        layers.append(Layer(f"dense{2 * i}", "dense", {"weight": weight, "bias": bias}))
        if i < len(widths) - 2:
            layers.append(Layer(f"relu{2 * i + 1}", "relu"))
    x = rng.uniform(0.0, 1.0, size=(batch, widths[0]))  # pixel-like inputs
    y = rng.integers(0, widths[-1], size=batch).astype(np.float64)
    return Network(
        tuple(layers), Loss("cross_entropy"), x, y, name=f"mlp-{'-'.join(map(str, widths))}"
    )


def _torch_f64(net, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    """Fastest (CPU, wall) times of one torch float64 forward+backward of ``net``."""
    import time

    import torch

    x = torch.tensor(net.x)
    y = torch.tensor(net.y, dtype=torch.long)
    params = [
        (torch.tensor(ly.params["weight"], requires_grad=True),
         torch.tensor(ly.params["bias"], requires_grad=True))
        for ly in net.layers if ly.kind == "dense"
    ]  # fmt: skip
    best, best_wall = float("inf"), float("inf")
    for _ in range(repeats + 1):
        t0, w0 = time.process_time(), time.perf_counter()
        h = x
        for i, (w, b) in enumerate(params):
            h = torch.addmm(b, h, w.T)
            if i < len(params) - 1:
                h = torch.relu(h)
        torch.nn.functional.cross_entropy(h, y).backward()
        best = min(best, time.process_time() - t0)
        best_wall = min(best_wall, time.perf_counter() - w0)
        for w, b in params:
            w.grad = b.grad = None
    return best, best_wall


def child(size: str, batch: int, tasks: list[str], bits: int, profile: int) -> None:
    """One case: prints one JSON line per phase (name, CPU and wall seconds, peak RSS in MiB,
    with ``profile`` the phase's top functions by own time)."""
    import cProfile
    import io
    import pstats
    import resource
    import time

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from fpgrad.exact import exact_trace

    def timed(phase: str, fn, **extra: object):  # noqa: ANN001, ANN202
        prof = cProfile.Profile() if profile else None
        t0, w0 = time.process_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        out = fn()
        if prof is not None:
            prof.disable()
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        top = []
        if prof is not None:
            stats = pstats.Stats(prof, stream=io.StringIO()).stats  # type: ignore[attr-defined]
            rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:profile]
            top = [
                [f"{Path(f).name}:{line}({name})", round(v[2], 3)] for (f, line, name), v in rows
            ]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        extra = {k: (v(out) if callable(v) else v) for k, v in extra.items()}
        row = {"phase": phase, "s": cpu, "wall": wall, "rss_mib": rss, "top": top, **extra}
        print(json.dumps(row), flush=True)
        return out

    net = build_mlp(SIZES[size], batch)
    params = sum(a.size for ly in net.layers for a in ly.params.values())
    cpu, wall = _torch_f64(net, 3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"phase": "torch float64", "s": cpu, "wall": wall, "rss_mib": rss, "params": int(params)}
    print(json.dumps(row), flush=True)
    exact = None
    exact_trace(build_mlp((8, 8, 2), 4), bits, method="fast", progress=False)  # compile/load
    if "exact" in tasks or "compare" in tasks:
        exact = timed(
            "exact",
            lambda: exact_trace(net, bits, method="fast", progress=False),
            digits=lambda r: round(r.certified_digits, 1),
            values=lambda r: int(sum(d.size for d in r.digits.values())),
        )
    if "native" in tasks or "compare" in tasks:
        from fpgrad.precisions import parse_precisions

        precs = parse_precisions("float16,bfloat16,float32")
        for p in precs:
            timed(f"native {p.name}", lambda p=p: p.run(net))
    if "compare" in tasks:
        from fpgrad.compare import compare

        result = timed(
            "compare (exact reused)",
            lambda: compare(net, "float16,bfloat16,float32", bits, exact=exact, progress=False),
        )
        timed("render", result.render)
    if "advise" in tasks:
        from fpgrad.advisor import advise

        advise(build_mlp((8, 8, 2), 4), "float16", bits, measure=False, progress=False)  # imports
        timed("advise", lambda: advise(net, "float16", bits, measure=False, progress=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes", default=",".join(SIZES), help="millions of parameters: " + ", ".join(SIZES)
    )
    ap.add_argument("--tasks", default="exact,compare,advise", help="of: " + ", ".join(TASKS))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--bits", type=int, default=150, help="exact precision (fast method)")
    ap.add_argument("--limit-gib", type=float, default=4.0, help="address-space limit per case")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    ap.add_argument("--profile", type=int, default=0, help="show each phase's top N functions")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    if bad := [t for t in tasks if t not in TASKS]:
        ap.error(f"unknown task {bad[0]!r}; choose from {', '.join(TASKS)}")
    if args.child:
        child(args.child, args.batch, tasks, args.bits, args.profile)
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    if bad := [s for s in sizes if s not in SIZES]:
        ap.error(f"unknown size {bad[0]!r}; choose from {', '.join(SIZES)}")
    env = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env["PYTHONPATH"] = str(ROOT)
    limit = int(args.limit_gib * 2**30)
    print(
        f"ReLU MLPs, cross-entropy, batch {args.batch}, seed 0; one thread; address space limited "
        f"to {args.limit_gib:g} GiB per case; exact: fast method, {args.bits} bits; times: "
        "process CPU (one thread: the work done, whatever else runs on the machine), ratio of "
        "CPU times, and wall"
    )
    for size in sizes:
        widths = "-".join(map(str, SIZES[size]))
        cmd = [sys.executable, __file__, "--child", size, "--tasks", ",".join(tasks),
               "--batch", str(args.batch), "--bits", str(args.bits),
               "--profile", str(args.profile)]  # fmt: skip

        def limit_memory() -> None:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        try:
            proc = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                preexec_fn=limit_memory,
            )  # fmt: skip
            out, err, status = proc.stdout, proc.stderr, f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err, status = "", f"timed out after {args.timeout:g} s"
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        base = rows[0]["s"] if rows else None
        params = f"{rows[0]['params'] / 1e6:.2f}M parameters" if rows else "?"
        print(f"\n{widths} ({params}):")
        for r in rows:
            ratio = f"{r['s'] / base:8.1f}x" if base else ""
            extra = f"  certified {r['digits']} digits" if "digits" in r else ""
            if "values" in r:  # growth over the torch phase per value held (3 words + radius)
                grown = (r["rss_mib"] - rows[0]["rss_mib"]) * 2**20
                extra += (
                    f"; {r['values'] / 1e6:.2f}M values, RSS growth "
                    f"{grown / (r['values'] * 32):.1f}x their 4 float64 words"
                )
            print(
                f"  {r['phase']:24s} {r['s']:9.3f} s {ratio}  (wall {r['wall']:8.3f} s)  "
                f"peak RSS {r['rss_mib']:7.0f} MiB{extra}"
            )
            for name, secs in r.get("top", []):
                print(f"      {secs:9.3f} s  {name}")
        if status != "exit 0":
            last = err.strip().splitlines()[-1] if err.strip() else ""
            print(f"  stopped: {status} {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
