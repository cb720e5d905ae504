"""similar_gradients_from_init: constant initialisation makes every hidden unit's gradient
identical (a structural symmetry, exact too); a tiny initialisation makes them nearly
identical, and low precisions round them to identical values; Xavier and He do neither."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.diagnose.comparison import Comparison, compare
from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.present.report.plots import save_png
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.training import TrainResult, train

NAME = "similar_gradients_from_init"
CLAIM = (
    "Symmetric (constant) or tiny initialisation gives hidden units identical or near-identical "
    "gradients: with constant init they are identical exactly (a structural symmetry no "
    "precision breaks); with tiny init they differ exactly, but float16 and bfloat16 round "
    "them to identical values; Xavier and He init give distinct gradients."
)

PRECISIONS = ("float16", "bfloat16", "float32", "float64")
HIDDEN, INPUTS = 6, 4
TINY_STD = 1e-4
INITS: dict[str, tuple[Any, Any]] = {
    # name: (hidden weight init, output weight init); biases start at zero
    "constant": ({"scheme": "constant", "value": 0.5}, {"scheme": "constant", "value": 0.5}),
    "tiny": ({"scheme": "normal", "std": TINY_STD}, {"scheme": "normal", "std": TINY_STD}),
    "xavier": ("xavier_uniform", "xavier_uniform"),
    "he": ("he_normal", "he_normal"),
}
PARAMS = ("hidden.weight", "hidden.bias", "out.weight")  # the per-unit parameters


def network(init: str, batch: int = 8) -> Network:
    """4-6-1 sigmoid network, MSE; inputs on a 1/16 grid in [-1, 1], targets in [0, 1]."""
    rng = np.random.default_rng(3)
    x = np.round(rng.uniform(-1.0, 1.0, size=(batch, INPUTS)) * 16) / 16
    y = np.round(rng.uniform(0.0, 1.0, size=(batch, 1)) * 16) / 16
    hidden_init, out_init = INITS[init]
    doc = {
        "name": f"{NAME}_{init}",
        "seed": 5,
        "layer": [
            {"type": "dense", "name": "hidden", "out": HIDDEN, "init": hidden_init},
            {"type": "sigmoid", "name": "act"},
            {"type": "dense", "name": "out", "out": 1, "init": out_init},
        ],
        "loss": {"type": "mse"},
        "data": {"x": x.tolist(), "y": y.tolist()},
    }
    return parse_network(doc, source=NAME)


def _per_unit(values: list[Any], param: str) -> list[tuple[Any, ...]]:
    """Row-major gradient elements of ``param`` grouped by hidden unit."""
    if param == "hidden.weight":
        return [tuple(values[u * INPUTS : (u + 1) * INPUTS]) for u in range(HIDDEN)]
    return [(v,) for v in values]  # hidden.bias [H], out.weight [1, H]


def unit_stats(cmp: Comparison, param: str, column: str) -> dict[str, Any]:
    """Distinct per-unit gradient vectors and their relative spread across units.

    ``column`` is "exact" (the certified decimal strings: equal strings are equal values) or
    a precision (its computed values)."""
    entries = [g for g in cmp.gradients if g["param"] == param]
    if column == "exact":
        keys = [g["exact"] for g in entries]
        floats = np.array([float(k) for k in keys])
    else:
        floats = np.array([g[column]["value"] for g in entries])
        keys = list(floats)
    units = _per_unit(keys, param)
    vec = np.array(_per_unit(list(floats), param))  # [units, elements]
    scale = float(np.max(np.abs(vec)))
    spread = float(np.max(vec.max(axis=0) - vec.min(axis=0)) / scale) if scale > 0 else 0.0
    return {"distinct": len(set(units)), "spread": spread, "scale": scale}


def units_after(tr: TrainResult, label: str) -> dict[str, Any]:
    """Distinct hidden units (weights, bias, outgoing weight) at the end of a run, which
    units form each group, and the largest difference between units relative to the largest
    parameter."""
    h = tr.exact if label == "exact" else tr.histories[label]
    p = h.params[-1]
    w = p[: HIDDEN * INPUTS].reshape(HIDDEN, INPUTS)
    b = p[HIDDEN * INPUTS : HIDDEN * (INPUTS + 1)]
    v = p[HIDDEN * (INPUTS + 1) : HIDDEN * (INPUTS + 2)]
    units = np.column_stack([w, b, v])
    groups: dict[tuple[float, ...], list[int]] = {}
    for u in range(HIDDEN):
        groups.setdefault(tuple(units[u]), []).append(u)
    scale = float(np.max(np.abs(units)))
    split = float(np.max(np.ptp(units, axis=0)) / scale) if scale > 0 else 0.0
    return {"distinct": len(groups), "groups": sorted(groups.values()), "split": split}


@records_runs
def run(small: bool = False) -> ScenarioResult:
    with one_torch_thread():
        return _run(small)


def _run(small: bool) -> ScenarioResult:
    cmps = {name: compare(network(name), precisions=",".join(PRECISIONS)) for name in INITS}
    stats: dict[str, dict[str, dict[str, Any]]] = {}
    rows = []
    for name, cmp in cmps.items():
        stats[name] = {}
        for param in PARAMS:
            st = {col: unit_stats(cmp, param, col) for col in ("exact", *PRECISIONS)}
            stats[name][param] = st
            rows.append(
                [
                    name,
                    param,
                    f"{st['exact']['distinct']}/{HIDDEN}",
                    f"{st['exact']['spread']:.3g}",
                    *[f"{st[p]['distinct']}/{HIDDEN}" for p in PRECISIONS],
                    f"{st['exact']['scale']:.3g}",
                ]
            )

    steps = 8 if small else 40
    tr = train(
        network("constant"),
        steps=steps,
        cfg=OptimConfig(lr=0.5),
        runs=",".join(PRECISIONS),
        perturb=False,
        verdict_every=steps,
    )
    after = {label: units_after(tr, label) for label in ("exact", *PRECISIONS)}
    moved = bool(np.any(tr.exact.params[-1] != tr.exact.params[0]))

    const = stats["constant"]
    constant_exact_identical = all(const[q]["exact"]["distinct"] == 1 for q in PARAMS)
    constant_all_identical = all(const[q][p]["distinct"] == 1 for q in PARAMS for p in PRECISIONS)
    max_split = max(a["split"] for a in after.values())
    # kept in every useful sense: the exact run keeps one unit, and no run's units differ by
    # more than a millionth of the parameters' size
    symmetry_kept = after["exact"]["distinct"] == 1 and max_split < 1e-6 and moved
    split_runs = [k for k, a in after.items() if a["distinct"] > 1]

    tiny = stats["tiny"]
    near = [
        q
        for q in PARAMS
        if tiny[q]["exact"]["distinct"] == HIDDEN and tiny[q]["exact"]["spread"] < 2.0**-8
    ]
    collapsed = {
        q: [p for p in PRECISIONS if tiny[q][p]["distinct"] < tiny[q]["exact"]["distinct"]]
        for q in PARAMS
    }
    tiny_ok = bool(near) and all("float16" in collapsed[q] for q in near)
    contrast_ok = all(
        stats[name][q][col]["distinct"] == HIDDEN
        for name in ("xavier", "he")
        for q in PARAMS
        for col in ("exact", *PRECISIONS)
    )
    holds = constant_exact_identical and constant_all_identical and symmetry_kept
    holds = holds and tiny_ok and contrast_ok

    verdict = (
        "Constant init: "
        + (
            f"the exact gradients of every per-unit parameter ({', '.join(PARAMS)}) are "
            f"identical across all {HIDDEN} hidden units, a structural symmetry"
            if constant_exact_identical
            else "the exact gradients are not all identical across units"
        )
        + (
            "; every precision computes them identical too"
            if constant_all_identical
            else "; some precision computes distinct values: "
            + ", ".join(
                f"{p} {q} {const[q][p]['distinct']}"
                for q in PARAMS
                for p in PRECISIONS
                if const[q][p]["distinct"] != 1
            )
        )
        + (
            f". After {steps} SGD steps the exact units are "
            + ("still identical" if after["exact"]["distinct"] == 1 else "no longer identical")
        )
        + (
            "; so are the units of every precision. "
            if not split_runs
            else "; "
            + ", ".join(
                f"{k} splits them into {after[k]['distinct']} groups "
                + "/".join(",".join(str(u) for u in g) for g in after[k]["groups"])
                + f" differing by {after[k]['split']:.2g} of the largest parameter"
                for k in split_runs
            )
            + ": torch's kernels sum some output columns in a different order (a vector "
            "block and its tail), so the symmetry breaks by rounding, "
            + (
                "but only by an ulp-sized split that does not make the units useful. "
                if max_split < 1e-6
                else "and the split grows. "
            )
        )
    )
    if near:
        parts = []
        for q in near:
            st = tiny[q]
            parts.append(
                f"{q}: exact {st['exact']['distinct']} distinct values with relative spread "
                f"{st['exact']['spread']:.2g}; "
                + ", ".join(f"{p} {st[p]['distinct']}" for p in PRECISIONS)
            )
        verdict += (
            f"Tiny init (normal, std {TINY_STD:g}): the sigmoid units all sit at 0.5, so the "
            "near-identical exact gradients are " + "; ".join(parts) + " distinct. "
        )
    else:
        verdict += "Tiny init: no parameter has near-identical exact gradients across units. "
    far = [q for q in PARAMS if q not in near]
    if far:
        verdict += (
            f"Its other per-unit gradients ({', '.join(far)}) scale with the random outgoing "
            "weights and stay distinct. "
        )
    verdict += (
        f"Xavier and He init: {HIDDEN} distinct gradients per parameter exactly and in every "
        "precision"
        + (
            ""
            if contrast_ok
            else " except "
            + ", ".join(
                f"{name} {q} {col}"
                for name in ("xavier", "he")
                for q in PARAMS
                for col in ("exact", *PRECISIONS)
                if stats[name][q][col]["distinct"] != HIDDEN
            )
        )
        + f" (relative spread at least "
        f"{min(stats[n][q]['exact']['spread'] for n in ('xavier', 'he') for q in PARAMS):.2g})."
    )

    train_rows = [
        [
            label,
            f"{after[label]['distinct']}/{HIDDEN}",
            " | ".join(",".join(str(u) for u in g) for g in after[label]["groups"]),
            f"{after[label]['split']:.3g}",
        ]
        for label in ("exact", *PRECISIONS)
    ]
    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            f"A 4-{HIDDEN}-1 network with sigmoid hidden units, MSE, batch 8 (inputs on a 1/16 "
            "grid in [-1, 1], targets in [0, 1]), biases zero, evaluated once per "
            "initialisation in float16, bfloat16, float32, float64 and exactly (certified): "
            "constant (every weight 0.5), tiny (normal with std "
            f"{TINY_STD:g}), Xavier uniform and He normal (seed 5). The constant network is "
            f"then trained with plain SGD (lr 0.5) for {steps} steps in every precision and "
            "exactly."
        ),
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "Distinct per-unit gradients",
                f"For each parameter, the number of distinct gradient vectors across the "
                f"{HIDDEN} hidden units (a unit's row of hidden.weight, its bias, its outgoing "
                "weight); spread = largest difference between units / largest |gradient|, "
                "from the exact values.",
                [
                    "init",
                    "parameter",
                    "exact distinct",
                    "exact spread",
                    *PRECISIONS,
                    "largest |exact gradient|",
                ],
                rows,
                figure=f"{NAME}_spread.png",
            ),
            Section(
                "Constant init under training",
                f"Distinct hidden units (weights, bias and outgoing weight) after {steps} "
                "steps, the groups of identical units, and the largest difference between "
                "units relative to the largest parameter.",
                ["run", "distinct units", "groups", "split"],
                train_rows,
            ),
        ],
        data={
            "stats": stats,
            "constant_exact_identical": constant_exact_identical,
            "constant_all_identical": constant_all_identical,
            "units_after_training": after,
            "max_split": max_split,
            "symmetry_kept": symmetry_kept,
            "tiny_near_identical": near,
            "tiny_collapsed": collapsed,
            "contrast_ok": contrast_ok,
            "steps": steps,
        },
        figures={f"{NAME}_spread.png": lambda path: _spread_figure(cmps, path)},
        cpu_dependent=(
            'the float32 and float64 rows of the "Constant init under training" table (distinct '
            "units, groups, split) and the verdict's split sentence: whether torch's kernels sum "
            "an output column in a vector block or in its tail depends on this CPU's vector "
            "width, so another CPU can split the constant-init units by an ulp where this one "
            f"{'does' if split_runs else 'does not'}; the verdict holds either way."
        ),
    )


def _spread_figure(cmps: dict[str, Comparison], path: Path) -> None:
    """out.weight gradients per unit, as deviations from their own mean relative to the exact
    mean, per init and precision; the tick labels give the number of distinct values."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cmps), figsize=(11, 4))
    for ax, (name, cmp) in zip(axes, cmps.items(), strict=True):
        entries = [g for g in cmp.gradients if g["param"] == "out.weight"]
        exact = np.array([float(g["exact"]) for g in entries])
        ref = abs(float(np.mean(exact))) or 1.0
        cols = ["exact", *PRECISIONS]
        ticks = []
        for i, col in enumerate(cols):
            vals = exact if col == "exact" else np.array([g[col]["value"] for g in entries])
            dev = (vals - np.median(vals)) / ref
            ax.scatter([i] * len(dev), dev, s=28, color="k" if col == "exact" else f"C{i - 1}")
            distinct = len({g["exact"] for g in entries}) if col == "exact" else len(set(vals))
            ticks.append(f"{col}\n{distinct} distinct")
        ax.set_xticks(range(len(cols)), ticks, rotation=60, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.tick_params(axis="y", labelsize=7)
    axes[0].set_ylabel("(g_unit - median) / |exact mean|")
    fig.suptitle(
        f"{NAME}: out.weight gradient of each of the {HIDDEN} hidden units, per init",
        fontsize=10,
    )
    fig.tight_layout()
    save_png(fig, path)
