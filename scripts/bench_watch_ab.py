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

``--processes K`` (with ``--against``) instead runs 2K child processes, alternately the
reference and this tree, each timing only its own watch beside the unwatched step (interleaved,
``--rounds`` rounds): two packages in one process can speed each other up or slow each other
down (shared allocator and caches), so the per-process costs (watched minus unwatched, p25 and
median) are compared, as medians over the K processes of each side. No record comparison.

    PYTHONPATH=. python scripts/bench_watch_ab.py --against /tmp/ref --processes 6 --rounds 6

``--parts`` instead times this tree's watched step with its parts switched off one after
another (as ``bench_watch.py --breakdown``: op records, optimizer records, the float64 shadow
step, the per-op bookkeeping, module tracking), interleaved the same way.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import shutil
import statistics
import subprocess
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
    # module paths in strings too: the package's lazy attributes name "fpgrad.watching" etc.
    # (without this, ``fpgrad_ref.watch`` was this tree's watch: the A/B compared a tree with
    # itself)
    quoted = re.compile(r"([\"'])fpgrad(\.|[\"'])")
    for f in dst.rglob("*.py"):
        text = pat.sub(lambda m: f"{m.group(1)} fpgrad_ref{m.group(2)}", f.read_text())
        f.write_text(quoted.sub(lambda m: f"{m.group(1)}fpgrad_ref{m.group(2)}", text))
    sys.path.insert(0, str(tmp))
    pkg = importlib.import_module("fpgrad_ref")
    if not pkg.watch.__module__.startswith("fpgrad_ref"):
        raise SystemExit(f"--against: the reference's watch comes from {pkg.watch.__module__}")
    return pkg


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


#: Fields that may differ in their last bits between two trees: the requested update of Adam
#: and AdamW is fpgrad.watching.adam_pass's correctly rounded float64 pass since 2026-12-07,
#: torch's own float64 step before.
NEAR = ("requested_update_weight_ratio",)


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b), (len(a), len(b))
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys(), (x.keys(), y.keys())
        for k in x:
            nan = isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k])
            if k in NEAR and isinstance(x[k], float) and isinstance(y[k], float):
                assert math.isclose(x[k], y[k], rel_tol=1e-12) or nan, (k, x[k], y[k])
                continue
            assert x[k] == y[k] or nan, (k, x[k], y[k])


def _q(v: list[float], f: float) -> float:
    return sorted(v)[int(f * (len(v) - 1))]


def _processes(args: argparse.Namespace) -> None:
    """``--processes``: a child times one package's watch beside the unwatched step and prints
    its quantiles; the parent alternates children and compares the per-process costs."""
    if args.child:
        pkg = _load_ref(args.against) if args.child == "reference" else fpgrad
        u: list[float] = []
        w: list[float] = []
        for p in (None, pkg):
            _run(p, 3, args.autocast)  # warm-up
        for _ in range(args.rounds):
            u += _run(None, 12, args.autocast)[0][2:]
            w += _run(pkg, 12, args.autocast)[0][2:]
        print(json.dumps({f: [_q(u, f) * 1e3, _q(w, f) * 1e3] for f in (0.25, 0.5)}))
        return
    got: dict[str, list[dict]] = {"reference": [], "this tree": []}
    for _ in range(args.processes):
        for side in got:
            cmd = [sys.executable, __file__, "--against", str(args.against), "--child", side]
            cmd += ["--rounds", str(args.rounds)] + (["--autocast"] if args.autocast else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            got[side].append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"torch {torch.__version__}, 1 thread, process clock, {args.processes} processes per "
        f"side (alternating), {args.rounds} rounds of 12 steps each, "
        f"{'autocast bfloat16' if args.autocast else 'float32'}; medians over the processes"
    )
    print("| watch | unwatched p25 ms | watched p25 ms | cost p25 ms | ratio p25 | "
          "cost median ms | ratio median | costs p25 per process |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for side, runs in got.items():
        cost = {f: [r[f][1] - r[f][0] for r in runs] for f in ("0.25", "0.5")}
        ratio = {f: [r[f][1] / r[f][0] for r in runs] for f in ("0.25", "0.5")}
        med = statistics.median
        print(
            f"| {side} | {med(r['0.25'][0] for r in runs):.3f} | "
            f"{med(r['0.25'][1] for r in runs):.3f} | {med(cost['0.25']):.3f} | "
            f"{med(ratio['0.25']):.2f}x | {med(cost['0.5']):.3f} | {med(ratio['0.5']):.2f}x | "
            f"{', '.join(f'{c:.2f}' for c in cost['0.25'])} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, help="folder holding fpgrad/")
    ap.add_argument("--parts", action="store_true", help="time the watch's parts instead")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--autocast", action="store_true", help="autocast bfloat16")
    ap.add_argument("--processes", type=int, default=0, help="K alternating processes per side")
    ap.add_argument("--child", choices=("reference", "this tree"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if (args.against is None) == (not args.parts):
        ap.error("give --against DIR or --parts")
    torch.set_num_threads(1)
    if args.child or args.processes:
        _processes(args)
        return
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
    print(
        f"records equal field for field ({', '.join(NEAR)} within 1e-12 relative); watched "
        "parameters bit for bit the unwatched ones"
    )


if __name__ == "__main__":
    main()
