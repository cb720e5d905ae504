"""chaotic_oscillation: beyond the edge of stability every precision leaves the exact
trajectory, after a number of steps set by its mantissa; on a small convergent problem the
finite formats end in a limit cycle while the exact run still converges."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.numbers.formats import get_format
from fpgrad.present.report.plots import save_png
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.training import TrainResult, train

NAME = "chaotic_oscillation"
CLAIM = (
    "At a learning rate beyond the edge of stability the iteration is chaotic and every "
    "precision leaves the exact trajectory, lower precisions first; on a small convergent "
    "problem float16 ends in a limit cycle or fixed point while the exact run still converges."
)

PRECISIONS = ("float16", "bfloat16", "float32", "float64")
CHAOS_LR, STABLE_LR = 3.0, 0.25  # L = tanh(w)^2 has L''(0) = 2: stable iff lr < 1
CYCLE_LR, TARGET = 0.95, 0.3  # w <- w - 2 lr (w - 0.3): error factor 1 - 2 lr = -0.9
THRESHOLD = 0.1  # the divergence detector's "left the exact trajectory"


def tanh_net() -> Network:
    """One weight w, L = tanh(w)^2: gradient descent is w <- w - 2 lr tanh(w) sech^2(w)."""
    doc = {
        "name": f"{NAME}_tanh",
        "layer": [
            {"type": "dense", "name": "w", "weight": [[0.3]], "bias": False},
            {"type": "tanh", "name": "act"},
        ],
        "loss": {"type": "mse"},
        "data": {"x": [[1.0]], "y": [[0.0]]},
    }
    return parse_network(doc, source=NAME)


def cycle_net() -> Network:
    """One weight w from 1.0, L = (w - 0.3)^2."""
    doc = {
        "name": f"{NAME}_cycle",
        "layer": [{"type": "dense", "name": "w", "weight": [[1.0]], "bias": False}],
        "loss": {"type": "mse"},
        "data": {"x": [[1.0]], "y": [[TARGET]]},
    }
    return parse_network(doc, source=NAME)


def _bits(p: str) -> int:
    return get_format(p).precision  # significand bits, hidden bit included


def lyapunov_bits(params: list[np.ndarray], lr: float) -> float:
    """Mean log2 |f'(w_t)| along an orbit of f(w) = w - 2 lr tanh(w) sech^2(w)."""
    w = np.array([p[0] for p in params[:-1]], dtype=np.float64)
    s2, t2 = 1 / np.cosh(w) ** 2, np.tanh(w) ** 2
    deriv = 1 - 2 * lr * s2 * (s2 - 2 * t2)
    return float(np.mean(np.log2(np.abs(deriv))))


def growth_before_leaving(dist: list[float], leaves: int | None) -> float | None:
    """Least-squares slope of log2 distance per step from step 1 until it leaves."""
    end = leaves if leaves is not None else len(dist)
    t = np.arange(1, end)
    d = np.asarray(dist[1:end], dtype=np.float64)
    ok = np.isfinite(d) & (d > 0)
    if ok.sum() < 2:
        return None
    return float(np.polyfit(t[ok], np.log2(d[ok]), 1)[0])


@records_runs
def run(small: bool = False) -> ScenarioResult:
    with one_torch_thread():
        return _run(small)


def _run(small: bool) -> ScenarioResult:
    chaos_steps, stable_steps, cycle_steps = (45, 20, 80) if small else (80, 60, 400)
    runs = ",".join(PRECISIONS)
    tnet = tanh_net()
    chaos = train(
        tnet,
        chaos_steps,
        OptimConfig(lr=CHAOS_LR),
        runs=runs,
        exact_bits=256,
        verdict_every=chaos_steps,
        perturb=True,
    )
    stable = train(
        tnet,
        stable_steps,
        OptimConfig(lr=STABLE_LR),
        runs=runs,
        exact_bits=128,
        verdict_every=stable_steps,
        perturb=True,
    )
    cyc = train(
        cycle_net(),
        cycle_steps,
        OptimConfig(lr=CYCLE_LR),
        runs=runs,
        exact_bits=128,
        verdict_every=cycle_steps,
        perturb=False,
    )

    # --- part 1: chaos
    lyap = lyapunov_bits(chaos.exact.params, CHAOS_LR)
    chaos_rows, chaos_data = [], {}
    for p in PRECISIONS:
        div, sdiv = chaos.detectors[p]["divergence"], stable.detectors[p]["divergence"]
        leaves = div["exceeds_at_step"]
        growth = growth_before_leaving(chaos.distance[p], leaves)
        dist = chaos.distance[p]
        t0 = next((t for t in range(1, len(dist)) if dist[t] > 0), None)  # first rounding
        d1 = dist[t0] if t0 is not None else 0.0
        predicted = t0 + math.log2(THRESHOLD / d1) / lyap if t0 is not None and lyap > 0 else None
        cycle = chaos.detectors[p]["limit_cycle"]
        chaos_data[p] = {
            "leaves_at": leaves,
            "predicted_leave": predicted,
            "growth_bits_per_step": growth,
            "twin": div["twin"]["verdict"],
            "twin_initial_separation": div["twin"]["initial_separation"],
            "cycle": cycle,
            "stable_leaves_at": sdiv["exceeds_at_step"],
            "stable_twin": sdiv["twin"]["verdict"],
            "stable_final_distance": sdiv["final_distance"],
        }
        chaos_rows.append(
            [
                p,
                _bits(p),
                "-" if t0 is None else f"{d1:.2g} at step {t0}",
                "never" if leaves is None else leaves,
                "-" if predicted is None else f"{predicted:.1f}",
                "-" if growth is None else f"{growth:.2f}",
                f"{div['twin']['verdict']} (from {div['twin']['initial_separation']:.2g})",
                f"period {cycle['period']} from step {cycle['first_step']}"
                if cycle["detected"]
                else "none",
                "never" if sdiv["exceeds_at_step"] is None else sdiv["exceeds_at_step"],
                sdiv["twin"]["verdict"],
            ]
        )
    leave_steps = [chaos_data[p]["leaves_at"] for p in PRECISIONS]
    all_leave = all(s is not None for s in leave_steps)
    order = sorted(PRECISIONS, key=_bits)
    ordered = all_leave and all(
        chaos_data[a]["leaves_at"] <= chaos_data[b]["leaves_at"]
        for a, b in zip(order, order[1:], strict=False)
    )
    steps_per_bit = None
    if all_leave:
        steps_per_bit = float(np.polyfit([_bits(p) for p in PRECISIONS], leave_steps, 1)[0])
    chaotic_twins = [p for p in PRECISIONS if chaos_data[p]["twin"] == "chaotic"]
    stable_ok = all(
        chaos_data[p]["stable_leaves_at"] is None and chaos_data[p]["stable_twin"] == "stable"
        for p in PRECISIONS
    )
    certified = min(chaos.exact_certified_digits, stable.exact_certified_digits)
    chaos_holds = all_leave and ordered and "float64" in chaotic_twins and stable_ok
    chaos_holds = chaos_holds and certified >= 17

    # --- part 2: limit cycle
    cyc_rows, cyc_data = [], {}
    exact_err = math.sqrt(cyc.exact.loss[-1])  # |w - 0.3| at the last step, from the exact loss
    for p in PRECISIONS:
        det = cyc.detectors[p]["limit_cycle"]
        w = cyc.histories[p].params[-1][0]
        ulp = get_format(p).ulp(TARGET)
        cyc_data[p] = {
            "detected": det["detected"],
            "first_step": det.get("first_step"),
            "period": det.get("period"),
            "fixed_point": det.get("fixed_point", False),
            "final_error": abs(w - TARGET),
            "final_error_ulps": abs(w - TARGET) / ulp,
            "loss_floor": cyc.detectors[p]["loss_floor"]["detected"],
        }
        cyc_rows.append(
            [
                p,
                _bits(p),
                ("fixed point" if det["fixed_point"] else f"period {det['period']}")
                if det["detected"]
                else f"none in {cycle_steps} steps",
                det.get("first_step", "-"),
                f"{abs(w - TARGET):.3g}",
                f"{abs(w - TARGET) / ulp:.3g}",
                f"{cyc.histories[p].loss[-1]:.3g}",
            ]
        )
    cyc_rows.append(
        [
            "exact",
            "-",
            "still moving" if cyc.exact.moved[-1] else "stopped",
            "-",
            f"{exact_err:.3g}",
            "-",
            f"{cyc.exact.loss[-1]:.3g}",
        ]
    )
    cycled = [p for p in PRECISIONS if cyc_data[p]["detected"]]
    onset = [cyc_data[p]["first_step"] for p in cycled]
    cycle_steps_per_bit = (
        float(np.polyfit([_bits(p) for p in cycled], onset, 1)[0]) if len(cycled) >= 2 else None
    )
    predicted_per_bit = 1 / math.log2(1 / abs(1 - 2 * CYCLE_LR))
    exact_converging = bool(cyc.exact.moved[-1]) and cyc.exact.loss[-1] < cyc.exact.loss[-2]
    f16 = cyc_data["float16"]
    cycle_holds = bool(f16["detected"]) and exact_converging
    holds = chaos_holds and cycle_holds

    def when(p: str) -> str:
        return f"{p} after {chaos_data[p]['leaves_at']}"

    verdict = (
        f"Chaos (lr = {CHAOS_LR:g}, 2 lr L''(0) = {4 * CHAOS_LR:g} > 2): "
        + (
            f"every precision left the exact trajectory (distance > {THRESHOLD:g}): "
            + ", ".join(when(p) for p in order)
            + f" steps, {'in' if ordered else 'not in'} order of mantissa bits "
            f"({steps_per_bit:.2f} more steps per bit; the exact orbit's Lyapunov exponent "
            f"is {lyap:.2f} bits per step, i.e. {1 / lyap:.2f} steps per bit)"
            if all_leave
            else "not every precision left the exact trajectory: "
            + ", ".join(f"{p}: {chaos_data[p]['leaves_at']}" for p in PRECISIONS)
        )
        + f". The one-ulp twin test says chaotic for {', '.join(chaotic_twins) or 'none'}"
    )
    not_chaotic = [p for p in PRECISIONS if p not in chaotic_twins]
    if not_chaotic:
        reasons = []
        for p in not_chaotic:
            c = chaos_data[p]["cycle"]
            reasons.append(
                f"{p} (its one-ulp nudge is already {chaos_data[p]['twin_initial_separation']:.2g}"
                " of the weight, so the bounded orbit cannot separate 2^10-fold"
                + (
                    f", and it fell into a period-{c['period']} cycle at step {c['first_step']}"
                    if c["detected"]
                    else ""
                )
                + ")"
            )
        verdict += "; not for " + "; ".join(reasons)
    verdict += (
        f". At lr = {STABLE_LR:g} "
        + (
            "no precision left the exact run and every twin test says stable"
            if stable_ok
            else "some precision left the exact run or a twin was not stable"
        )
        + f". The exact runs certify at least {certified:.1f} digits (256 bits for the chaotic one)."
    )
    verdict += (
        f" Limit cycle (lr = {CYCLE_LR:g}, error factor {1 - 2 * CYCLE_LR:g} per step): "
        + (
            "float16 enters a "
            + ("fixed point" if f16["fixed_point"] else f"period-{f16['period']} cycle")
            + f" at step {f16['first_step']}, {f16['final_error_ulps']:.3g} ulps from the "
            "optimum"
            if f16["detected"]
            else f"float16 found no cycle in {cycle_steps} steps"
        )
        + "; "
        + ", ".join(f"{p} at step {cyc_data[p]['first_step']}" for p in cycled if p != "float16")
        + (
            f" ({cycle_steps_per_bit:.2f} steps per mantissa bit; predicted "
            f"1/log2(1/{abs(1 - 2 * CYCLE_LR):g}) = {predicted_per_bit:.2f})"
            if cycle_steps_per_bit is not None
            else ""
        )
        + ", while the exact run "
        + (
            f"still converges (|w - 0.3| = {exact_err:.3g} at the last step)."
            if exact_converging
            else "has stopped too."
        )
    )

    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            "Two one-weight problems trained with plain full-batch SGD in float16, bfloat16, "
            "float32, float64 and exactly. Chaos: L(w) = tanh(w)^2 from w = 0.3 "
            "(a dense 1-1 layer, tanh, MSE to 0), so a step is w <- w - 2 lr tanh(w) sech^2(w); "
            f"L''(0) = 2, so lr < 1 is stable; lr = {CHAOS_LR:g} for {chaos_steps} steps "
            f"(exact at 256 bits, checked at 512) and lr = {STABLE_LR:g} for {stable_steps} steps. "
            "Every run has a twin whose weight starts one ulp higher. Limit cycle: "
            f"L(w) = (w - {TARGET:g})^2 from w = 1 at lr = {CYCLE_LR:g} for {cycle_steps} steps "
            "(exact at 128 bits): the exact error shrinks by 0.9 and flips sign every step; "
            "every finite format runs out of states near the optimum."
        ),
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "Chaos: when each precision leaves the exact trajectory",
                f"Distance = |w - w_exact| / max(|w_exact|, |w_0|); 'leaves' = first step with "
                f"distance > {THRESHOLD:g}; 'predicted' = t0 + log2({THRESHOLD:g} / d(t0)) / "
                "(Lyapunov exponent of the exact orbit), from the first non-zero distance "
                "d(t0); growth = slope of log2 distance per step before leaving. Twin: the one-ulp perturbed run's verdict "
                "(chaotic when the separation grows 2^10-fold at > 0.05 bits/step).",
                [
                    "precision",
                    "significand bits",
                    "first non-zero distance",
                    f"leaves (lr {CHAOS_LR:g})",
                    "predicted",
                    "growth (bits/step)",
                    "twin",
                    "cycle in the run",
                    f"leaves (lr {STABLE_LR:g})",
                    f"twin (lr {STABLE_LR:g})",
                ],
                chaos_rows,
                figure=f"{NAME}_chaos.png",
            ),
            Section(
                "Limit cycle: float formats stop converging, exact does not",
                "Whole-state recurrence (parameters and optimizer state) of each run; the error "
                "at the end in absolute terms and in ulps of the format at 0.3.",
                [
                    "run",
                    "significand bits",
                    "cycle",
                    "first step",
                    "|w - 0.3| at end",
                    "in ulps",
                    "loss at end",
                ],
                cyc_rows,
                figure=f"{NAME}_cycle.png",
            ),
        ],
        data={
            "chaos": chaos_data,
            "lyapunov_bits_per_step": lyap,
            "steps_per_bit": steps_per_bit,
            "chaos_in_bit_order": ordered,
            "chaotic_twins": chaotic_twins,
            "stable_ok": stable_ok,
            "certified_digits": certified,
            "cycle": cyc_data,
            "cycle_steps_per_bit": cycle_steps_per_bit,
            "cycle_predicted_steps_per_bit": predicted_per_bit,
            "exact_converging": exact_converging,
            "steps": {"chaos": chaos_steps, "stable": stable_steps, "cycle": cycle_steps},
        },
        figures={
            f"{NAME}_chaos.png": lambda path: _chaos_figure(chaos, stable, path),
            f"{NAME}_cycle.png": lambda path: _cycle_figure(cyc, path),
        },
    )


def _chaos_figure(chaos: TrainResult, stable: TrainResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, p in enumerate(PRECISIONS):
        d = np.asarray(chaos.distance[p], dtype=float)
        ax.plot(
            np.arange(len(d)),
            np.where(d > 0, d, np.nan),
            "-",
            color=f"C{i}",
            label=f"{p}, lr {CHAOS_LR:g}",
        )
        s = np.asarray(stable.distance[p], dtype=float)
        ax.plot(
            np.arange(len(s)),
            np.where(s > 0, s, np.nan),
            ":",
            color=f"C{i}",
            label=f"{p}, lr {STABLE_LR:g}",
        )
    ax.axhline(THRESHOLD, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("relative distance to the exact run")
    ax.set_title(f"{NAME}: tanh map, chaotic (solid) and stable (dotted)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)


def _cycle_figure(cyc: TrainResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    err = np.sqrt(np.asarray(cyc.exact.loss, dtype=float))  # |w - 0.3|, beyond float64
    ax.plot(np.arange(len(err)), err, "k-", lw=3, alpha=0.5, label="exact")
    for i, p in enumerate(PRECISIONS):
        e = np.abs(np.array([q[0] for q in cyc.histories[p].params]) - TARGET)
        ax.plot(np.arange(len(e)), np.where(e > 0, e, np.nan), "-", color=f"C{i}", label=p)
        det = cyc.detectors[p]["limit_cycle"]
        if det["detected"]:
            s = det["first_step"]
            ax.plot([s], [e[s]], "o", color=f"C{i}", ms=6)
    ax.set_yscale("log")
    ax.set_xlabel("step (dot: the cycle begins)")
    ax.set_ylabel("|w - 0.3|")
    ax.set_title(f"{NAME}: w <- w - 2 lr (w - 0.3), lr {CYCLE_LR:g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
