"""Benchmark of the exact reference against torch float64 (issue 5), ratios within one run.

Builds a 64-256-256-10 tanh MLP with MSE loss and batch 128 (fixed seed), times one forward
and backward pass in torch float64 and in fpgrad's fast exact reference (multi-word balls,
certified by their radii), checks that every gradient certifies at least 100 significant
bits, and prints the ratio. Also: the plain mpmath object-array reference on a smaller batch
(two evaluations, N and 2N bits, as fpgrad.reference.exact's mpmath method), the peak memory of the
exact run, and exact training steps per second on fpgrad/examples/showcase.toml.

BLAS and torch run on ``--threads`` threads (default 1: the machine is shared, and both sides
get the same resources). The fast path's kernels are compiled by numba on first use and cached
on disk: the first call's time (compile or cache load, and one evaluation) is printed apart.
Usage: ``python scripts/bench_exact.py [--threads N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import tracemalloc
from pathlib import Path


def _threads_from_argv() -> int:
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return 1


_T = str(_threads_from_argv())  # before numpy loads its BLAS
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _T

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fpgrad.arith.ball import BallArith  # noqa: E402
from fpgrad.arith.mp import MPArith  # noqa: E402
from fpgrad.graph.layers import evaluate, exact_trace  # noqa: E402
from fpgrad.model.netfile import load_network  # noqa: E402
from fpgrad.model.network import Layer, Loss, Network  # noqa: E402

SIZES = (64, 256, 256, 10)
SHOWCASE = Path(__file__).resolve().parents[1] / "fpgrad" / "examples" / "showcase.toml"


def build_mlp(batch: int, seed: int = 0, sizes: tuple[int, ...] = SIZES) -> Network:
    rng = np.random.default_rng(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Linear's default init
        weight = rng.uniform(-bound, bound, size=(fan_out, fan_in))
        bias = rng.uniform(-bound, bound, size=fan_out)
        layers.append(Layer(f"dense{2 * i}", "dense", {"weight": weight, "bias": bias}))
        if i < len(sizes) - 2:
            layers.append(Layer(f"tanh{2 * i + 1}", "tanh"))
    x = rng.normal(size=(batch, sizes[0]))
    y = rng.normal(size=(batch, sizes[-1]))
    return Network(tuple(layers), Loss("mse"), x, y, name=f"mlp-{batch}")


def torch_step(net: Network):  # noqa: ANN201 - a closure
    x = torch.tensor(net.x)
    y = torch.tensor(net.y)
    params = []
    for ly in net.layers:
        if ly.kind == "dense":
            w = torch.tensor(ly.params["weight"], requires_grad=True)
            b = torch.tensor(ly.params["bias"], requires_grad=True)
            params.append((w, b))

    def run() -> None:
        for w, b in params:
            w.grad = None
            b.grad = None
        h = x
        for i, (w, b) in enumerate(params):
            h = torch.addmm(b, h, w.T)
            if i < len(params) - 1:
                h = torch.tanh(h)
        loss = torch.mean((h - y) ** 2)
        loss.backward()

    return run


# CPU time of this process: with one thread on each side it is the work done, and unlike
# wall time it does not count the time slices other processes take on a shared machine.
# With more threads CPU time adds the threads up (and their spinning): wall time then.
clock = time.process_time if _T == "1" else time.perf_counter


def timeit(fn, repeats: int) -> float:  # noqa: ANN001
    """Fastest CPU time of ``repeats`` calls (after one warm-up call)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def interleaved(fns: list, rounds: int, inner: list[int]) -> list[float]:  # noqa: ANN001
    """Fastest time of each function, measured in alternation so load changes hit all alike."""
    best = [math.inf] * len(fns)
    for fn in fns:
        fn()
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            for _ in range(inner[i]):
                t0 = clock()
                fn()
                best[i] = min(best[i], clock() - t0)
    return best


def float64_only(fn):  # noqa: ANN001, ANN201 - a wrapper
    """``fn`` with every product on the float64 slices (fpgrad.arith.ozaki), not int8 CRT."""
    from fpgrad.arith import crt

    def run():  # noqa: ANN202
        saved = crt.applies
        crt.applies = lambda m, n, p: False  # type: ignore[assignment]
        try:
            return fn()
        finally:
            crt.applies = saved  # type: ignore[assignment]

    return run


def int8_forced(fn):  # noqa: ANN001, ANN201 - a wrapper
    """``fn`` with the int8 CRT engine taken wherever fpgrad.arith.crt.cost chooses it, whatever
    this CPU's int8 unit (fpgrad.arith.crt.fast forced on): the engine choice before issue 14's
    capability gate."""
    from fpgrad.arith import crt

    def run():  # noqa: ANN202
        saved = crt.fast
        crt.fast = lambda: True  # type: ignore[assignment]
        try:
            return fn()
        finally:
            crt.fast = saved  # type: ignore[assignment]

    return run


def float64_radii(fn):  # noqa: ANN001, ANN201 - a wrapper
    """``fn`` with the radius products in float64 BLAS (fpgrad.arith.radius off)."""
    from fpgrad.arith import radius

    def run():  # noqa: ANN202
        saved = radius.MIN_MACS
        radius.MIN_MACS = math.inf  # type: ignore[assignment]
        try:
            return fn()
        finally:
            radius.MIN_MACS = saved

    return run


def plain_mpmath(net: Network, bits: int) -> None:
    evaluate(net, MPArith(bits))
    evaluate(net, MPArith(2 * bits))


def exact_training(path: Path, steps: int, lr: float, bits: int) -> tuple[float, float]:
    """Steps per second of SGD in the exact system, and the certified bits at the end."""
    net = load_network(path)
    ar = BallArith(bits)
    params = {k: ar.asarray(v) for k, v in net.params.items()}
    lr_ball = ar.const(lr)
    t0 = clock()
    for _ in range(steps):
        trace = evaluate(net, ar, params=params)
        params = {k: ar.sub(params[k], ar.mul(lr_ball, trace.grads[k])) for k in params}
    elapsed = clock() - t0
    worst = math.inf
    for p in params.values():
        m = np.abs(p.mid[0])
        nz = m > 0
        if nz.any():
            worst = min(worst, float(np.min(-np.log2(np.maximum(p.rad[nz], 2.0**-2000) / m[nz]))))
    if ar.range_errors or ar.uncertain_branches:
        worst = -math.inf
    return steps / elapsed, worst


def arb_product(bits: int, shape: tuple[int, int, int] = (128, 256, 256)) -> str | None:
    """One product of random float64 matrices as balls (this engine) and as python-flint
    arb_mat at the same precision, times side by side; None without python-flint."""
    try:
        import flint
    except ImportError:
        return None
    m, n, p = shape
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(m, n)), rng.normal(size=(n, p))
    ar = BallArith(bits)
    ba, bb = ar.asarray(a), ar.asarray(b)
    flint.ctx.prec = bits
    t0 = clock()
    fa, fb = flint.arb_mat(a.tolist()), flint.arb_mat(b.tolist())
    t_conv = clock() - t0
    t_ball, t_arb, t_gemm = interleaved(
        [lambda: ar._matmul(ba, bb), lambda: fa * fb, lambda: a @ b], 3, [3, 1, 10]
    )
    return (
        f"one {m}x{n}x{p} product at {bits} bits: float64 GEMM {t_gemm * 1e3:.2f} ms, "
        f"balls {t_ball * 1e3:.1f} ms ({t_ball / t_gemm:.0f} GEMMs), "
        f"python-flint arb_mat {t_arb * 1e3:.1f} ms ({t_arb / t_ball:.1f}x; converting the "
        f"operands to arb_mat {t_conv * 1e3:.0f} ms more)"
    )


def profile(net: Network, bits: int, top: int, runs: int = 5) -> None:
    """The ``top`` functions by own process CPU time in ``runs`` exact runs, per run."""
    import cProfile
    import pstats

    prof = cProfile.Profile(time.process_time)
    prof.enable()
    for _ in range(runs):
        exact_trace(net, bits, method="fast", progress=False)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"profile (cProfile, own CPU time per exact run, {runs} runs):")
    for (path, line, name), (_, calls, own, _, _) in rows:
        where = f"{Path(path).name}:{line}({name})" if line else name
        print(f"  {own / runs * 1e3:8.2f} ms  {calls // runs:5d} calls  {where}")


def slice_gemm_time(net: Network, bits: int, repeats: int) -> tuple[float, int]:
    """CPU time of the GEMMs of the product engines in one exact run (fastest of
    ``repeats``), and their number: the float64 BLAS calls inside fpgrad.arith.ozaki (slice
    products) and the int8 ``torch._int_mm`` calls of fpgrad.arith.crt (one per modulus);
    the floor the products set."""
    import types

    from fpgrad.arith import ozaki

    spent = [0.0, 0]
    real, real_int = np.matmul, torch._int_mm

    def timer(fn):  # noqa: ANN001, ANN202
        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t0 = clock()
            out = fn(*args, **kwargs)
            spent[0] += clock() - t0
            spent[1] += 1
            return out

        return timed

    proxy = types.ModuleType("numpy")
    proxy.__dict__.update(np.__dict__)
    proxy.matmul = timer(real)  # type: ignore[attr-defined]
    ozaki.np = proxy  # type: ignore[attr-defined]
    torch._int_mm = timer(real_int)
    best, calls = math.inf, 0
    try:
        for _ in range(repeats):
            spent[:] = [0.0, 0]
            exact_trace(net, bits, method="fast", progress=False)
            best, calls = min(best, spent[0]), int(spent[1])
    finally:
        ozaki.np = np  # type: ignore[attr-defined]
        torch._int_mm = real_int
    return best, calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="BLAS and torch threads (default 1)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--bits", type=int, default=150, help="fast exact precision (100, 128, 150)")
    ap.add_argument("--repeats", type=int, default=10, help="rounds of interleaved timing")
    ap.add_argument("--mp-batch", type=int, default=2, help="batch of the plain mpmath run")
    ap.add_argument("--mp-bits", type=int, default=128, help="N of the plain mpmath run (N and 2N)")
    ap.add_argument("--train-steps", type=int, default=50)
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="print the N functions of the exact run with the most own CPU time (per run)",
    )
    ap.add_argument(
        "--mm-prec", type=int, default=None,
        help="products to 2**-(P+2) of n max|a row| max|b col| (BallArith.mm_prec; a study)",
    )  # fmt: skip
    ap.add_argument(
        "--widths", default="64,256,512,1024",
        help="hidden widths W of 64-W-W-10 MLPs whose ratios are printed too ('' for none)",
    )  # fmt: skip
    ap.add_argument(
        "--float64-radii", action="store_true",
        help="also time, in the same rounds, the exact run with its radius products in float64 "
        "BLAS instead of float32 upper bounds (fpgrad.arith.radius)",
    )  # fmt: skip
    ap.add_argument(
        "--int8", action="store_true",
        help="also time, in the same rounds, the int8 CRT engine forced on where this CPU has "
        "no int8 dot-product unit (fpgrad.arith.crt.fast False: the choice before the gate)",
    )  # fmt: skip
    ap.add_argument(
        "--engine", choices=("auto", "float64"), default="auto",
        help="products: auto (int8 CRT where torch._int_mm is exact, fpgrad.arith.crt) or "
        "float64 (Ozaki slices only, fpgrad.arith.ozaki)",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.engine == "float64":
        from fpgrad.arith import crt

        crt.applies = lambda m, n, p: False  # type: ignore[assignment]
    if args.mm_prec is not None:
        init = BallArith.__init__

        def at_prec(self: BallArith, bits: int = args.bits) -> None:
            init(self, bits)
            self.mm_prec = args.mm_prec

        BallArith.__init__ = at_prec  # type: ignore[method-assign]

    net = build_mlp(args.batch)
    t0 = time.perf_counter()
    exact_trace(net, args.bits, method="fast", progress=False)
    t_first = time.perf_counter() - t0
    from fpgrad.arith import crt

    exact_run = lambda: exact_trace(net, args.bits, method="fast", progress=False)  # noqa: E731
    fns = [torch_step(net), exact_run]
    crt_on = args.engine == "auto" and crt.fast() and crt.usable()
    forced = args.int8 and args.engine == "auto" and not crt.fast() and crt.usable()
    if crt_on:  # the float64 engine alone, in the same rounds
        fns.append(float64_only(exact_run))
    if forced:  # the int8 engine on a CPU without an int8 unit, in the same rounds
        fns.append(int8_forced(exact_run))
    at_radii = len(fns)
    if args.float64_radii:
        fns.append(float64_radii(exact_run))
    times = interleaved(fns, args.repeats, [10] + [1] * (len(fns) - 1))
    t_torch, t_exact = times[0], times[1]
    result = exact_trace(net, args.bits, method="fast", progress=False)
    grad_digits = min(
        float(result.digits[k].min()) for k in result.digits if k.startswith("grads/")
    )
    grad_bits = grad_digits / math.log10(2)
    all_bits = result.certified_digits / math.log10(2)

    small = build_mlp(args.mp_batch)
    t_torch_small = timeit(torch_step(small), 100)
    t0 = clock()
    plain_mpmath(small, args.mp_bits)
    t_mp_small = clock() - t0

    tracemalloc.start()
    exact_trace(net, args.bits, method="fast", progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    steps_per_s, train_bits = exact_training(SHOWCASE, args.train_steps, 0.1, args.bits)
    ratio = t_exact / t_torch
    print(
        f"network: {'-'.join(map(str, SIZES))} tanh MLP, MSE, batch {args.batch}, seed 0; "
        f"{args.threads} BLAS/torch thread(s); times are fastest-of-N "
        f"{'process CPU' if args.threads == 1 else 'wall'} times"
    )
    if args.engine == "float64":
        engine = "float64 slices (--engine float64)"
    elif crt_on:
        engine = (
            "int8 CRT or int8 digits where fpgrad.arith.products' cost model chooses them (this "
            "CPU has an int8 unit; float32/float64 operands cut exactly), else float64 slices"
        )
    else:
        why = "torch._int_mm inexact or absent" if crt.fast() else "no int8 dot-product unit"
        engine = f"float64 slices ({why}: fpgrad.arith.crt.fast/usable)"
    print(f"products: {engine}")
    print(f"torch float64 forward+backward: {t_torch * 1e3:9.2f} ms")
    print(
        f"fpgrad exact (fast, {args.bits} bits): {t_exact * 1e3:9.2f} ms   "
        f"(exact_trace: evaluation + certification)"
    )
    print(f"ratio exact / torch float64:   {ratio:9.1f}x   (target <= 10, bar 30)")
    if args.float64_radii:
        t_r = times[at_radii]
        print(
            f"the same with the radius products in float64 BLAS: {t_r * 1e3:.2f} ms = "
            f"{t_r / t_torch:.1f}x (same rounds)"
        )
    if crt_on:
        print(
            f"the same with every product on float64 slices (no int8 engine): {times[2] * 1e3:.2f} ms "
            f"= {times[2] / t_torch:.1f}x (same rounds)"
        )
    if forced:
        print(
            f"the same with the int8 CRT engine forced on (no int8 unit here): "
            f"{times[2] * 1e3:.2f} ms = {times[2] / t_torch:.1f}x (same rounds)"
        )
    if args.profile:
        profile(net, args.bits, args.profile)
    t_gemm, n_gemm = slice_gemm_time(net, args.bits, max(3, args.repeats // 2))
    print(
        f"of which the product engines' GEMMs ({n_gemm}): {t_gemm * 1e3:9.2f} ms = "
        f"{t_gemm / t_torch:.1f}x torch float64 (the floor of these product engines)"
    )
    print(
        f"first exact call in this process: {t_first:.2f} s wall "
        f"(numba compile, or load from its cache, and one evaluation)"
    )
    print(
        f"certified: every gradient >= {grad_bits:.1f} bits ({grad_digits:.1f} digits); "
        f"every value of the trace >= {all_bits:.1f} bits; vanishing values: {result.vanishing}"
    )
    status = "PASS" if grad_bits >= 100 else "FAIL"
    print(f"check: every gradient certifies >= 100 bits: {status}")
    print(
        f"plain mpmath object arrays ({args.mp_bits}/{2 * args.mp_bits} bits), batch {args.mp_batch}: "
        f"{t_mp_small:.2f} s = {t_mp_small / t_torch_small:,.0f}x torch float64 at that batch; "
        f"scaled to batch {args.batch}: {t_mp_small * args.batch / args.mp_batch / t_torch:,.0f}x"
    )
    print(
        f"speed-up of the fast path over plain mpmath (batch {args.batch}, scaled): "
        f"{t_mp_small * args.batch / args.mp_batch / t_exact:,.0f}x"
    )
    print(
        f"peak memory of one exact run (tracemalloc): {peak / 2**20:.1f} MiB; "
        f"process max RSS {rss:.0f} MiB"
    )
    print(
        f"exact training on {SHOWCASE.name} (SGD lr 0.1, {args.bits} bits, {args.train_steps} steps): "
        f"{steps_per_s:.1f} steps/s; parameters certified to {train_bits:.1f} bits at the end"
    )
    arb = arb_product(args.bits)
    if arb is not None:
        print(arb)
    from fpgrad.arith import crt

    both = crt_on  # then also the float64 engine alone
    for width in [int(w) for w in args.widths.split(",") if w]:
        wide = build_mlp(args.batch, sizes=(SIZES[0], width, width, SIZES[-1]))
        fns = [
            torch_step(wide),
            lambda w=wide: exact_trace(w, args.bits, method="fast", progress=False),
        ]
        if both:
            fns.append(float64_only(fns[1]))
        if forced:
            fns.append(int8_forced(fns[1]))
        times = interleaved(fns, max(2, args.repeats // 2), [10, 1, 1])
        t_t, t_e = times[0], times[1]
        res = exact_trace(wide, args.bits, method="fast", progress=False)
        bits_w = min(float(res.digits[k].min()) for k in res.digits if k.startswith("grads/"))
        alone = f"; float64 slices alone {times[2] / t_t:6.1f}x" if both else ""
        alone += f"; int8 CRT forced on {times[2] / t_t:6.1f}x" if forced else ""
        print(
            f"width {width:5d} (64-{width}-{width}-10): torch {t_t * 1e3:8.2f} ms, "
            f"exact {t_e * 1e3:9.2f} ms, ratio {t_e / t_t:6.1f}x{alone}; "
            f"gradients >= {bits_w / math.log10(2):.1f} bits"
        )
    return 0 if grad_bits >= 100 else 1


if __name__ == "__main__":
    sys.exit(main())
