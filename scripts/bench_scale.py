"""Scaling benchmark (issue 14): compare and advise on ReLU MLPs of 0.1M to 5.8M parameters,
and compare on the captured transformer block and CNN.

Each case runs in a child process of its own (so its peak RSS is its own) under an
address-space limit (``--limit-gib``, default 4, as ``ulimit -v``), with BLAS and torch on one
thread. Per case it prints the time of one torch float64 forward+backward of the same model
(fastest of a few, measured first in the same process; process CPU time, which on one thread
is the work done whatever else runs on a shared machine, and wall time), and as ratios to it:

* ``exact``: the certified exact trace alone (:func:`fpgrad.reference.exact.exact_trace`, fast method;
  captured models: :func:`fpgrad.graph.exact.exact_graph`);
* ``native``: one run of each of float16, bfloat16, float32 as compare runs them (torch,
  forward and backward, every intermediate kept; MLPs only);
* ``compare``: what ``fpgrad compare NET --precisions float16,bfloat16,float32`` does after
  loading the model: :func:`fpgrad.diagnose.comparison.compare` end to end (its own exact trace, the
  native runs, verdicts, where the signal died, the diagnosis with the advisor's counts), then
  ``render()`` (the default 60 rows), with where compare's time goes (CPU seconds in its
  parts, from a profile on the process clock) and the total as one ratio;
* ``json``: ``write_json`` of that comparison to a null sink (``--json``; one line per gradient
  element, so it grows with the parameters; MLPs only);
* ``advise``: :func:`fpgrad.diagnose.advisor.advise` (float16, no torch measurement), its own exact
  trace included (MLPs only here);

with the child's peak RSS after each phase (for the exact trace of an MLP also how many values
it holds and its RSS growth over the torch phase as a multiple of 4 float64 words per value: 3
midpoint words and a radius), and with ``--profile N`` each phase's N functions of largest own
CPU time. A phase that exceeds ``--timeout`` seconds or the memory limit ends the case and is
reported as such (the benchmark goes on with the next).
Usage: ``python scripts/bench_scale.py [--sizes 0.1,0.67,1.86,5.8,transformer,cnn]
[--tasks exact,compare,advise]``.
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
#: captured models (fpgrad.from_module): the shipped transformer block example, the tests' CNN,
#: and a wider transformer block (d = 32, 4 sequences of 16 tokens; not run by default)
GRAPHS = ("transformer", "cnn", "transformer-d32")
DEFAULT_CASES = (*SIZES, "transformer", "cnn")
TASKS = ("exact", "native", "compare", "json", "advise")
PRECISIONS = "float16,bfloat16,float32"
#: where compare's time goes: (file, function) whose cumulative CPU time is shown
PARTS = {
    "exact trace": (("exact.py", "exact_trace"), ("exact.py", "exact_graph")),
    "native runs": (("precisions.py", "run"), ("native.py", "native_run")),
    "gradient verdicts": (("compare.py", "_gradient_columns"), ("verdicts.py", "classify")),
    "where the signal died": (("compare.py", "_attribution"),),
    "diagnosis (advisor counts)": (("diagnosis.py", "diagnose"),),
}


def build_mlp(widths: tuple[int, ...], batch: int, seed: int = 0):  # noqa: ANN201
    """A ReLU MLP with torch.nn.Linear's default init, cross-entropy loss, fixed seed."""
    import math

    import numpy as np

    from fpgrad.model.network import Layer, Loss, Network

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


def build_graph(case: str):  # noqa: ANN201
    """(model, inputs, targets, loss) of a captured case."""
    import torch
    from torch import nn

    if case == "cnn":
        sys.path.insert(0, str(ROOT / "tests"))
        from graph_models import small_cnn

        model, x, y = small_cnn()
        return model, (x,), y, nn.CrossEntropyLoss()
    from fpgrad.examples.transformer_block import Block, build

    if case == "transformer":
        return build()
    torch.manual_seed(0)  # transformer-d32
    model = Block(vocab=32, d=32, heads=2)
    with torch.no_grad():
        model.emb.weight.mul_(30.0)
    tokens = torch.randint(0, 32, (4, 16))
    pad = torch.zeros(4, 16, dtype=torch.bool)
    pad[1, -3:] = True
    return model, (tokens, pad), torch.randint(0, 32, (64,)), nn.CrossEntropyLoss()


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


def _torch_f64_graph(model, inputs: tuple, y, loss, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    """Fastest (CPU, wall) times of one eager float64 forward+backward of a torch model."""
    import copy
    import time

    m = copy.deepcopy(model).double()
    xs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    best, best_wall = float("inf"), float("inf")
    for _ in range(repeats + 1):
        m.zero_grad()
        t0, w0 = time.process_time(), time.perf_counter()
        loss(m(*xs), y).backward()
        best = min(best, time.process_time() - t0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return best, best_wall


class _Null:
    """A text sink that counts what is written."""

    chars = 0

    def write(self, text: str) -> int:
        self.chars += len(text)
        return len(text)


def child(case: str, batch: int, tasks: list[str], bits: int, profile: int) -> None:
    """One case: prints one JSON line per phase (name, CPU and wall seconds, peak RSS in MiB,
    with ``profile`` the phase's top functions by own CPU time, for compare its parts)."""
    import cProfile
    import io
    import pstats
    import resource
    import time

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    import warnings

    warnings.filterwarnings("ignore", message="Support for mismatched")

    def timed(phase: str, fn, parts: bool = False, **extra: object):  # noqa: ANN001, ANN202
        prof = cProfile.Profile(time.process_time) if (profile or parts) else None
        t0, w0 = time.process_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        out = fn()
        if prof is not None:
            prof.disable()
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        top, split = [], {}
        if prof is not None:
            stats = pstats.Stats(prof, stream=io.StringIO()).stats  # type: ignore[attr-defined]
            rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:profile]
            top = [
                [f"{Path(f).name}:{line}({name})", round(v[2], 3)] for (f, line, name), v in rows
            ]
            if parts:
                for label, funcs in PARTS.items():
                    found = [
                        v[3] for (f, _, name), v in stats.items()
                        if (Path(f).name, name) in funcs
                    ]  # fmt: skip
                    if found:  # the outermost of them (recursion and nesting: the largest)
                        split[label] = round(max(found), 3)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        extra = {k: (v(out) if callable(v) else v) for k, v in extra.items()}
        row = {"phase": phase, "s": cpu, "wall": wall, "rss_mib": rss, "top": top, **extra}
        if split:
            row["parts"] = split
        print(json.dumps(row), flush=True)
        return out

    if case in GRAPHS:
        import fpgrad
        from fpgrad.diagnose.comparison import compare
        from fpgrad.graph.exact import exact_graph

        model, inputs, y, loss = build_graph(case)
        params = sum(p.numel() for p in model.parameters())
        cpu, wall = _torch_f64_graph(model, inputs, y, loss, 3)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row = {"phase": "torch float64", "s": cpu, "wall": wall, "rss_mib": rss}
        print(json.dumps({**row, "params": int(params)}), flush=True)
        net = fpgrad.from_module(model, inputs, y, loss)
        if "exact" in tasks:
            timed("exact", lambda: exact_graph(net.graph, bits), digits=lambda r: round(
                r.certified_digits, 1), method=lambda r: r.method)  # fmt: skip
        if "compare" in tasks:
            result = timed("compare", lambda: compare(net, PRECISIONS, bits), parts=True)
            timed("render", result.render)
        return

    from fpgrad.graph.layers import exact_trace

    net = build_mlp(SIZES[case], batch)
    params = sum(a.size for ly in net.layers for a in ly.params.values())
    cpu, wall = _torch_f64(net, 3)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"phase": "torch float64", "s": cpu, "wall": wall, "rss_mib": rss, "params": int(params)}
    print(json.dumps(row), flush=True)
    small = build_mlp((8, 8, 2), 4)
    exact_trace(small, bits, method="fast", progress=False)  # compile/load the kernels
    if "exact" in tasks:
        timed(
            "exact",
            lambda: exact_trace(net, bits, method="fast", progress=False),
            digits=lambda r: round(r.certified_digits, 1),
            values=lambda r: int(sum(d.size for d in r.digits.values())),
        )
    if "native" in tasks:
        from fpgrad.graph.precisions import parse_precisions

        for p in parse_precisions(PRECISIONS):
            p.run(small)  # load the rounding kernels
            timed(f"native {p.name}", lambda p=p: p.run(net))
    if "compare" in tasks or "json" in tasks:
        from fpgrad.diagnose.comparison import compare

        compare(small, PRECISIONS, bits, progress=False)  # imports, kernels
        result = timed(
            "compare", lambda: compare(net, PRECISIONS, bits, progress=False), parts=True
        )
        if "compare" in tasks:
            timed("render", result.render)
        if "json" in tasks:
            sink = _Null()
            timed("json", lambda: result.write_json(sink), chars=lambda _: sink.chars)
    if "advise" in tasks:
        from fpgrad.diagnose.advisor import advise

        advise(small, "float16", bits, measure=False, progress=False)  # imports
        timed("advise", lambda: advise(net, "float16", bits, measure=False, progress=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes",
        default=",".join(DEFAULT_CASES),
        help="MLPs by millions of parameters ("
        + ", ".join(SIZES)
        + ") and captured models ("
        + ", ".join(GRAPHS)
        + ")",
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
    if bad := [s for s in sizes if s not in SIZES and s not in GRAPHS]:
        ap.error(f"unknown size {bad[0]!r}; choose from {', '.join([*SIZES, *GRAPHS])}")
    env = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    env["PYTHONPATH"] = str(ROOT)
    limit = int(args.limit_gib * 2**30)
    print(
        f"ReLU MLPs, cross-entropy, batch {args.batch}, seed 0, and captured models; one thread; "
        f"address space limited to {args.limit_gib:g} GiB per case; exact: {args.bits} bits; "
        f"compare: {PRECISIONS}; times: process CPU (one thread: the work done, whatever else "
        "runs on the machine), ratio of CPU times, and wall"
    )
    for size in sizes:
        title = "-".join(map(str, SIZES[size])) if size in SIZES else f"captured {size}"
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
        params = f"{rows[0]['params'] / 1e6:.4g}M parameters" if rows else "?"
        print(f"\n{title} ({params}):")
        for r in rows:
            ratio = f"{r['s'] / base:8.1f}x" if base else ""
            extra = f"  certified {r['digits']} digits" if "digits" in r else ""
            extra += f" ({r['method']})" if "method" in r else ""
            extra += f"  {r['chars'] / 2**20:.0f} MiB of JSON" if "chars" in r else ""
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
            for label, secs in r.get("parts", {}).items():
                share = f"{secs / base:8.1f}x" if base else ""
                print(f"      {label:26s} {secs:9.3f} s {share}")
            for name, secs in r.get("top", []):
                print(f"      {secs:9.3f} s  {name}")
        by_phase = {r["phase"]: r for r in rows}
        if base and "compare" in by_phase and "render" in by_phase:
            total = by_phase["compare"]["s"] + by_phase["render"]["s"]
            print(
                f"  {'compare + render':24s} {total:9.3f} s {total / base:8.1f}x  "
                f"(what `fpgrad compare` does after loading the model)"
            )
        if status != "exit 0":
            last = err.strip().splitlines()[-1] if err.strip() else ""
            print(f"  stopped: {status} {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
