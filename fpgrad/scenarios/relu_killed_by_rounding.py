"""relu_killed_by_rounding: a ReLU unit alive in exact arithmetic whose pre-activation float16
rounds to 0, so its gradients are rounding zeros, not structural ones."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.diagnose.comparison import Comparison, compare
from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.present.report.plots import save_png
from fpgrad.run.torch_native import one_torch_thread, torch_trace
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs

NAME = "relu_killed_by_rounding"
CLAIM = (
    "A ReLU unit can be alive in exact arithmetic (pre-activation > 0) yet dead in float16 "
    "because its pre-activation rounds to 0: its gradients are rounding zeros (lost or "
    "underflowed), not structural zeros, while bfloat16 and float32 keep it alive."
)

TINY_W = 2.0**-13  # the tiny unit's weight on the tiny feature
HALF_SUB = 2.0**-25  # half of float16's smallest subnormal: correct rounding below it gives 0
UNITS = ("healthy", "tiny", "stored", "cancel")
MECHANISM = {
    "healthy": "z = x0 + 0.1 (control)",
    "tiny": "z = 2^-13 * x1 with x1 in 2^-14 [1, 3.9): a product below 2^-25",
    "stored": "z = (1 + 2^-12) * 1 - 1: the weight rounds to 1 when stored",
    "cancel": "z = (1 + 2^-10)^2 - (1 + 2^-9) = 2^-20: cancellation in the dot product",
}


def network(batch: int = 8, tiny_w: float = TINY_W) -> Network:
    """4 ReLU units over features x0 ~ U(0.5, 1), x1 ~ 2^-14 U(1, 3.9), x2 = 1, x3 = 1 + 2^-10."""
    rng = np.random.default_rng(3)
    a = 1.0 + 2.0**-10
    x = np.stack(
        [
            rng.uniform(0.5, 1.0, batch),
            2.0**-14 * rng.uniform(1.0, 3.9, batch),
            np.ones(batch),
            np.full(batch, a),
        ],
        axis=1,
    )
    y = rng.uniform(0.5, 1.5, size=(batch, 1))
    w = [
        [1.0, 0.0, 0.0, 0.0],  # healthy
        [0.0, tiny_w, 0.0, 0.0],  # tiny
        [0.0, 0.0, 1.0 + 2.0**-12, 0.0],  # stored
        [0.0, 0.0, 0.0, a],  # cancel
    ]
    doc = {
        "name": NAME,
        "layer": [
            {
                "type": "dense",
                "name": "hidden",
                "weight": w,
                "bias": [0.1, 0.0, -1.0, -(1 + 2.0**-9)],
            },
            {"type": "relu", "name": "act"},
            {"type": "dense", "name": "out", "weight": [[0.5] * 4], "bias": [0.0]},
        ],
        "loss": {"type": "mse"},
        "data": {"x": x.tolist(), "y": y.tolist()},
    }
    return parse_network(doc, source=NAME)


def exact_preactivations(net: Network) -> list[list[Fraction]]:
    """z = x W^T + b of the hidden layer in exact rational arithmetic, [sample][unit]."""
    w = net.params["hidden.weight"]
    b = net.params["hidden.bias"]
    return [
        [
            sum(
                (Fraction(xi) * Fraction(wi) for xi, wi in zip(row, w[u], strict=True)), Fraction(0)
            )
            + Fraction(b[u])
            for u in range(w.shape[0])
        ]
        for row in net.x
    ]


def _unit_verdicts(c: Comparison, unit: int, precision: str) -> dict[str, int]:
    """Verdict counts (rounding zeros split by kind) of the unit's incoming gradients."""
    n_in = len(c.verdicts("hidden.weight", precision)) // len(UNITS)
    entries = [c.gradient("hidden.weight", (unit, j)) for j in range(n_in)]
    entries.append(c.gradient("hidden.bias", (unit,)))
    out: dict[str, int] = {}
    for e in entries:
        col = e[precision]
        key = col["verdict"] + (f" ({col['kind']})" if col["kind"] else "")
        out[key] = out.get(key, 0) + 1
    return out


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def _kept(c: Comparison, unit: int, precision: str) -> float:
    """Computed / exact gradient of the unit's bias (1: intact, 0: lost)."""
    g = c.gradient("hidden.bias", (unit,))
    return g[precision]["value"] / float(g["exact"]) + 0.0  # no -0


@records_runs
def run(small: bool = False) -> ScenarioResult:
    with one_torch_thread():
        return _run(small)


def _run(small: bool) -> ScenarioResult:
    net = network()
    c = compare(net)
    c_rounded = compare(net, reference="rounded")
    precs = c.precisions
    z_exact = exact_preactivations(net)
    computed_z = {p: torch_trace(net, p).forward["hidden"] for p in precs}
    tiny = UNITS.index("tiny")

    unit_rows = []
    for u, name in enumerate(UNITS):
        zs = [z[u] for z in z_exact]
        lo, hi = min(zs), max(zs)
        row = [name, MECHANISM[name], f"{float(lo):.3g} .. {float(hi):.3g}"]
        row += [f"{int(np.sum(computed_z[p][:, u] > 0))}/{net.x.shape[0]}" for p in precs]
        unit_rows.append(row)

    verdict_rows = []
    for u, name in enumerate(UNITS):
        for p in precs:
            verdict_rows.append(
                [
                    name,
                    p,
                    _fmt_counts(_unit_verdicts(c, u, p)),
                    _fmt_counts(_unit_verdicts(c_rounded, u, p)),
                    c.gradient("out.weight", (0, u))[p]["verdict"]
                    + (
                        f" ({c.gradient('out.weight', (0, u))[p]['kind']})"
                        if c.gradient("out.weight", (0, u))[p]["kind"]
                        else ""
                    ),
                ]
            )

    att16 = c.attribution["float16"]
    place_rows = []
    for i, place in enumerate(att16["places"]):
        row = [f"{place['layer']} {place['quantity']}", place["op"]]
        row += [c.attribution[p]["places"][i]["rounding_zero"] for p in precs]
        place_rows.append(row)
    first_back = att16["first_rounding_zero_backward"]
    first_fwd = att16["first_rounding_zero_forward"]

    # the facts behind the verdict
    exact_alive = all(z[tiny] > 0 for z in z_exact)
    tiny_max = max(z[tiny] for z in z_exact)
    f16 = _unit_verdicts(c, tiny, "float16")
    f16_all_rz = all(k.startswith("rounding_zero") for k in f16)
    f16_structural = sum(n for k, n in f16.items() if k.startswith("structural_zero"))
    f16_rounded = _unit_verdicts(c_rounded, tiny, "float16")
    arithmetic = all(k.startswith("rounding_zero") for k in f16_rounded)
    exact_nonzero = (
        all(
            float(c.gradient("hidden.weight", (tiny, j))["exact"]) != 0
            for j in range(net.x.shape[1])
        )
        and float(c.gradient("hidden.bias", (tiny,))["exact"]) != 0
    )
    others_alive = {
        p: all(k == "ok" or k == "subnormal" for k in _unit_verdicts(c, tiny, p))
        for p in precs
        if p != "float16"
    }
    out_w = c.gradient("out.weight", (0, tiny))["float16"]
    relu_out_rz = next(
        pl["rounding_zero"]
        for pl in att16["places"]
        if pl["layer"] == "act" and pl["direction"] == "forward"
    )
    relu_first = first_back is not None and first_back["op"] == "act backward (relu)"
    holds = bool(
        exact_alive
        and exact_nonzero
        and f16_all_rz
        and f16_structural == 0
        and all(others_alive.values())
        and relu_first
    )

    # sweep of the tiny unit's weight: where does float16 lose it?
    ks = [10, 11, 12, 13, 14] if small else list(range(6, 18))
    sweep_rows, sweep = [], {p: [] for p in precs}
    x1max = float(np.max(net.x[:, 1]))
    x1min = float(np.min(net.x[:, 1]))
    zmax_log2 = []
    for k in ks:
        cs = compare(network(tiny_w=2.0**-k), precisions=precs)
        zmax_log2.append(math.log2(2.0**-k * x1max))
        kept = {p: _kept(cs, tiny, p) for p in precs}
        for p in precs:
            sweep[p].append(kept[p])
        sweep_rows.append(
            [f"2^-{k}", f"{2.0**-k * x1min:.3g} .. {2.0**-k * x1max:.3g}"]
            + [
                f"{kept[p]:.3f} ({cs.gradient('hidden.bias', (tiny,))[p]['verdict']})"
                for p in precs
            ]
        )
    whole = [k for k, v in zip(ks, sweep["float16"], strict=True) if v > 0.99]
    dead = [k for k, v in zip(ks, sweep["float16"], strict=True) if v == 0]
    partial = [k for k in ks if k not in whole and k not in dead]
    last_whole = max(whole) if whole else None
    first_dead = min(dead) if dead else None

    stored = UNITS.index("stored")
    st16 = _unit_verdicts(c, stored, "float16")
    st16r = _unit_verdicts(c_rounded, stored, "float16")
    cancel = UNITS.index("cancel")
    cancel_alive16 = bool(np.all(computed_z["float16"][:, cancel] > 0))
    cancel_bf16r = _unit_verdicts(c_rounded, cancel, "bfloat16")

    n = net.x.shape[0]
    if holds:
        verdict = (
            f"The 'tiny' unit's exact pre-activation is positive on every sample (at most "
            f"{float(tiny_max):.3g} = 2^{math.log2(float(tiny_max)):.2f}, below 2^-25), so it is "
            f"alive exactly; float16 rounds it to 0 on all {n} samples and all "
            f"{sum(f16.values())} incoming gradients of the unit are rounding zeros "
            f"({_fmt_counts(f16)}), none structural, while "
            f"{', '.join(others_alive)} keep them non-zero. The gradient of the output weight "
            f"reading the unit is a float16 {out_w['verdict']} ({out_w['kind']}). Going back "
            f"from the loss, float16's first rounding zeros are in {first_back['layer']} "
            f"{first_back['quantity']}, produced by {first_back['op']}; forward, the first values "
            f"rounded to zero are {first_fwd['layer']} {first_fwd['quantity']} "
            f"({first_fwd['op']})"
            + (f", then the ReLU output act a ({relu_out_rz} values)." if relu_out_rz else ".")
        )
    else:
        verdict = (
            "The tiny unit was not killed by float16 rounding alone: "
            f"float16 verdicts {_fmt_counts(f16)}, exact alive {exact_alive}, exact gradients "
            f"non-zero {exact_nonzero}, other precisions alive {others_alive}, first backward "
            f"place {first_back}."
        )
    verdict += (
        " Against the exact values at the float16-rounded inputs they "
        + (
            "stay rounding zeros: the arithmetic killed the unit, not storage"
            if arithmetic
            else f"become {_fmt_counts(f16_rounded)}"
        )
        + f"; the 'stored' unit's gradients instead become {_fmt_counts(st16r)} (against the "
        f"values as written: {_fmt_counts(st16)}): its weight rounded to 1 when stored. The "
        f"'cancel' unit {'survives' if cancel_alive16 else 'dies'} in float16 "
        f"({'torch accumulates the dot product and the bias in float32, so the cancellation is exact' if cancel_alive16 else 'the cancellation is rounded'})"
        f" and is {_fmt_counts(cancel_bf16r)} in bfloat16 at its rounded values. Sweeping the "
        "tiny weight, float16 "
        + (
            f"keeps the unit's gradient whole up to w = 2^-{last_whole}, keeps part of it "
            f"(samples with z above 2^-25) for w = {', '.join(f'2^-{k}' for k in partial) or 'none'}, "
            f"and loses all of it from w = 2^-{first_dead}."
            if last_whole is not None and first_dead is not None
            else "does not go from alive to dead in the swept range."
        )
    )

    p_cols = [*precs]
    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            f"4-4-1 ReLU network, MSE, batch {net.x.shape[0]}. Features: x0 ~ U(0.5, 1), "
            "x1 = 2^-14 U(1, 3.9) (tiny but a float16 normal number), x2 = 1, "
            "x3 = 1 + 2^-10. Four hidden units, each reading one feature: 'healthy' (control), "
            "'tiny' (w = 2^-13 on x1: the product lies below half of float16's smallest "
            "subnormal), 'stored' (weight 1 + 2^-12, bias -1: the weight rounds to 1 in float16 "
            "and bfloat16), 'cancel' (w = 1 + 2^-10 on x3, bias -(1 + 2^-9): exact z = 2^-20 "
            "after cancellation). One comparison against the exact gradients at the values as "
            "written, one against the exact gradients at the values rounded into each precision "
            "(storage vs arithmetic), and a sweep of the tiny unit's weight."
        ),
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "The units: exact pre-activations and where each precision keeps them alive",
                "Exact z is computed in rational arithmetic; the precision columns count the "
                "samples on which torch's computed z is > 0.",
                ["unit", "mechanism", "exact z (min .. max)", *p_cols],
                unit_rows,
            ),
            Section(
                "Verdicts of each unit's incoming gradients",
                "Reference 'original': exact gradients at the parameters and data as written; "
                "'rounded': at the values rounded into the precision (a zero there is "
                "structural for the stored values). Last column: the gradient of the output "
                "weight that reads the unit.",
                ["unit", "precision", "reference original", "reference rounded", "out.weight"],
                verdict_rows,
            ),
            Section(
                "Where the signal died",
                "Rounding zeros per tensor (forward values, then backward signals from the loss "
                "back), against the exact trace.",
                ["tensor", "produced by", *p_cols],
                place_rows,
            ),
            Section(
                "Sweep of the tiny unit's weight",
                "Computed / exact gradient of the tiny unit's bias (1: intact, 0: the unit is "
                "dead in that precision), with its verdict.",
                ["w", "exact z range", *p_cols],
                sweep_rows,
                figure=f"{NAME}_sweep.png",
            ),
        ],
        data={
            "exact_alive": exact_alive,
            "exact_nonzero": exact_nonzero,
            "float16_tiny_verdicts": f16,
            "float16_tiny_verdicts_rounded_reference": f16_rounded,
            "other_precisions_alive": others_alive,
            "first_rounding_zero_backward": first_back,
            "first_rounding_zero_forward": first_fwd,
            "out_weight_float16": {"verdict": out_w["verdict"], "kind": out_w["kind"]},
            "stored_float16": st16,
            "stored_float16_rounded_reference": st16r,
            "cancel_alive_in_float16": cancel_alive16,
            "cancel_bfloat16_rounded_reference": cancel_bf16r,
            "sweep": {
                "k": ks,
                "kept": sweep,
                "last_whole_k": last_whole,
                "partial_k": partial,
                "first_dead_k": first_dead,
            },
        },
        figures={
            f"{NAME}_sweep.png": lambda path: _sweep_figure(zmax_log2, sweep, path),
        },
    )


def _sweep_figure(zlog: list[float], sweep: dict[str, list[float]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles: dict[str, Any] = {"float16": "o-", "bfloat16": "s--", "float32": "^:", "float64": "x-."}
    for p, vals in sweep.items():
        ax.plot(zlog, vals, styles.get(p, "o-"), label=p)
    ax.axvline(math.log2(HALF_SUB), color="grey", ls="--")
    ax.text(math.log2(HALF_SUB), 0.5, " 2^-25: half of float16's\n smallest subnormal", fontsize=8)
    ax.set_xlabel("log2 of the tiny unit's largest exact pre-activation")
    ax.set_ylabel("computed / exact gradient of the unit's bias")
    ax.set_ylim(-0.08, 1.12)
    ax.set_title(f"{NAME}: the unit dies in float16 when z rounds to 0")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    save_png(fig, path)
