"""Watched-step CPU time of this tree against another fpgrad, interleaved in one process.

On a shared machine two benchmark runs minutes apart see different loads; here the unwatched
step, the step watched by another fpgrad (``--against DIR``: a checkout or ``git archive`` of
the package, loaded under the name ``fpgrad_ref``) and the step watched by this tree run in
turns of 12 steps in one process, and the quantiles of the per-step CPU times are compared.
The same 64-256-256-10 MLP, batch 256, Adam and data as ``bench_watch.py``; every=1. At the
end the two watches' records must be equal field for field and the trained parameters bit for
bit equal to the unwatched ones (else it fails).

    git archive <commit> fpgrad | tar -x -C /tmp/ref
    PYTHONPATH=. python scripts/bench_watch_ab.py --against /tmp/ref [--rounds 12] [--autocast]
    PYTHONPATH=. python scripts/bench_watch_ab.py --parts [--rounds 10]

``--parts`` instead times this tree's watched step with its parts switched off one after
another (as ``bench_watch.py --breakdown``: op records, optimizer records, the float64 shadow
step, the per-op bookkeeping, module tracking), interleaved the same way.
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_watch import PARTS, parts_off  # the script folder is on sys.path

import fpgrad


def _load_ref(src: Path) -> Any:
    """``src/fpgrad`` copied to a temporary folder as the package ``fpgrad_ref``."""
    tmp = Path(tempfile.mkdtemp())
    dst = tmp / "fpgrad_ref"
    shutil.copytree(src / "fpgrad", dst)
    pat = re.compile(r"\b(from|import) fpgrad(\.|\b)")
    for f in dst.rglob("*.py"):
        f.write_text(pat.sub(lambda m: f"{m.group(1)} fpgrad_ref{m.group(2)}", f.read_text()))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("fpgrad_ref")


def _run(pkg: Any, n: int, autocast: bool) -> tuple[list[float], list[dict], list[torch.Tensor]]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    w = pkg.watch(m, opt) if pkg is not None else None
    times = []
    if w is not None:
        w.__enter__()
    for _ in range(n):
        t0 = time.process_time()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(m(x).float(), y)
        loss.backward()
        opt.step()
        times.append(time.process_time() - t0)
    recs: list[dict] = []
    if w is not None:
        w.__exit__(None, None, None)
        got = w.records()
        recs = got.to_dict("records") if hasattr(got, "to_dict") else got
    return times, recs, [p.detach().clone() for p in m.parameters()]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b), (len(a), len(b))
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys(), (x.keys(), y.keys())
        for k in x:
            nan = isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k])
            assert x[k] == y[k] or nan, (k, x[k], y[k])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, help="folder holding fpgrad/")
    ap.add_argument("--parts", action="store_true", help="time the watch's parts instead")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--autocast", action="store_true", help="autocast bfloat16")
    args = ap.parse_args()
    if (args.against is None) == (not args.parts):
        ap.error("give --against DIR or --parts")
    torch.set_num_threads(1)
    if args.parts:
        cfg: dict[str, Any] = {"unwatched": None, **dict.fromkeys(PARTS, fpgrad)}
    else:
        cfg = {"unwatched": None, "reference": _load_ref(args.against), "this tree": fpgrad}
    for pkg in cfg.values():
        _run(pkg, 3, args.autocast)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in cfg}
    last: dict[str, tuple[list[dict], list[torch.Tensor]]] = {}
    try:
        for _ in range(args.rounds):
            for k, pkg in cfg.items():
                if args.parts:
                    parts_off(PARTS.index(k) if k in PARTS else 0)
                t, recs, params = _run(pkg, 12, args.autocast)
                times[k] += t[2:]  # the first two steps of a run build the shadow and buffers
                last[k] = (recs, params)
    finally:
        if args.parts:
            parts_off(0)

    def q(v: list[float], f: float) -> float:
        return sorted(v)[int(f * (len(v) - 1))]

    u = times["unwatched"]
    print(
        f"torch {torch.__version__}, 1 thread, process clock, {args.rounds} interleaved rounds "
        f"of 12 steps, {'autocast bfloat16' if args.autocast else 'float32'}; per-step quantiles"
    )
    print("| step | p10 ms | p25 ms | median ms | ratio p10 | ratio p25 | ratio median |")
    print("|---|---|---|---|---|---|---|")
    for k, v in times.items():
        print(
            f"| {k} | {q(v, 0.1) * 1e3:.3f} | {q(v, 0.25) * 1e3:.3f} | {q(v, 0.5) * 1e3:.3f} | "
            f"{q(v, 0.1) / q(u, 0.1):.2f}x | {q(v, 0.25) / q(u, 0.25):.2f}x | "
            f"{q(v, 0.5) / q(u, 0.5):.2f}x |"
        )
    if args.parts:
        return
    _same(last["reference"][0], last["this tree"][0])
    for a, b in zip(last["unwatched"][1], last["this tree"][1], strict=True):
        assert torch.equal(a, b)
    print("records equal field for field; watched parameters bit for bit the unwatched ones")


if __name__ == "__main__":
    main()
