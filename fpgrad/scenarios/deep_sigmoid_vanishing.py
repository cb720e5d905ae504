"""deep_sigmoid_vanishing: per-layer gradient norms of a deep narrow sigmoid network, exact
against each precision; the layer from which float16 flushes to zero; tanh and ReLU for contrast."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.diagnose.comparison import Comparison, compare
from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.numbers.formats import get_format
from fpgrad.present.report.plots import save_png
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs

NAME = "deep_sigmoid_vanishing"
CLAIM = (
    "In a deep sigmoid network the gradient norm shrinks layer by layer going back from the "
    "output, and float16 flushes the gradients of the early layers to exactly zero while the "
    "exact gradients are not zero; tanh and ReLU (He init) networks of the same depth keep "
    "their gradients."
)

DEPTH = 16
WIDTH = 4
BATCH = 4
SEED = 3  # among seeds 0-5 at width 4, 3 of 6 ReLU nets have a structurally dead layer; 3 has none
ACTIVATIONS = (("sigmoid", "xavier_normal"), ("tanh", "xavier_normal"), ("relu", "he_normal"))
SWEEP_DEPTHS = (8, 12, 16, 20, 24)


def network(act: str, init: str, depth: int = DEPTH, width: int = WIDTH) -> Network:
    """``depth`` dense+activation layers of ``width`` units, then a dense output; MSE."""
    rng = np.random.default_rng(SEED)
    x = rng.uniform(-1.0, 1.0, size=(BATCH, width))
    y = rng.uniform(0.0, 1.0, size=(BATCH, 1))
    layers: list[dict[str, Any]] = []
    for i in range(1, depth + 1):
        layers.append({"type": "dense", "name": f"d{i}", "out": width, "init": init})
        layers.append({"type": act, "name": f"a{i}"})
    layers.append({"type": "dense", "name": "out", "out": 1, "init": "xavier_normal"})
    doc = {
        "name": f"{NAME}_{act}",
        "seed": SEED,
        "layer": layers,
        "loss": {"type": "mse"},
        "data": {"x": x.tolist(), "y": y.tolist()},
    }
    return parse_network(doc, source=NAME)


def _log2(v: float) -> float | None:
    return math.log2(v) if v > 0 else None


def layer_norms(c: Comparison, depth: int) -> dict[str, Any]:
    """Per hidden layer (index from the input) the norm of the weight gradient, exact and per
    precision, and float16's verdict counts."""
    exact, computed = [], {p: [] for p in c.precisions}
    counts16 = []
    for i in range(1, depth + 1):
        name = f"d{i}.weight"
        entries = [g for g in c.gradients if g["param"] == name]
        exact.append(float(np.linalg.norm([float(g["exact"]) for g in entries])))
        for p in c.precisions:
            computed[p].append(float(np.linalg.norm([g[p]["value"] for g in entries])))
        v = c.verdicts(name, "float16")
        counts16.append({k: v.count(k) for k in sorted(set(v))})
    return {"exact": exact, "computed": computed, "float16_counts": counts16}


def first_flush(norms: dict[str, Any], precision: str) -> int | None:
    """The first hidden layer, going back from the output, whose computed weight gradient is
    entirely zero while the exact one is not (index from the input), or None."""
    depth = len(norms["exact"])
    for i in range(depth, 0, -1):
        if norms["computed"][precision][i - 1] == 0 and norms["exact"][i - 1] > 0:
            return i
    return None


def decay_bits_per_layer(exact: list[float]) -> float | None:
    """Least-squares slope of log2 |exact gradient| per layer (positive: shrinks going back)."""
    pts = [(i, math.log2(v)) for i, v in enumerate(exact, start=1) if v > 0]
    if len(pts) < 3:
        return None
    xs, ys = zip(*pts, strict=True)
    return float(np.polyfit(xs, ys, 1)[0])


@records_runs
def run(small: bool = False) -> ScenarioResult:
    with one_torch_thread():
        return _run(small)


def _run(small: bool) -> ScenarioResult:
    results: dict[str, dict[str, Any]] = {}
    for act, init in ACTIVATIONS:
        c = compare(network(act, init))
        norms = layer_norms(c, DEPTH)
        results[act] = {
            "init": init,
            "norms": norms,
            "precisions": c.precisions,
            "flush": {p: first_flush(norms, p) for p in c.precisions},
            "exact_zero_layers": [i for i, v in enumerate(norms["exact"], 1) if v == 0],
            "decay": decay_bits_per_layer(norms["exact"]),
        }
    precs = results["sigmoid"]["precisions"]

    sections = []
    for act, _ in ACTIVATIONS:
        r = results[act]
        rows = []
        for i in range(DEPTH, 0, -1):
            e = r["norms"]["exact"][i - 1]
            row: list[Any] = [f"d{i}", DEPTH - i + 1, _fmt_log2(e)]
            for p in precs:
                v = r["norms"]["computed"][p][i - 1]
                row.append("0" if v == 0 else _fmt_log2(v))
            row.append(
                ", ".join(f"{n} {k}" for k, n in r["norms"]["float16_counts"][i - 1].items())
            )
            rows.append(row)
        sections.append(
            Section(
                f"{act} ({r['init']} init): per-layer weight-gradient norms",
                "log2 of the Frobenius norm of each hidden layer's weight gradient, from the "
                "output back to the input ('0': the computed gradient is entirely zero); last "
                "column: float16's verdicts of that layer's elements.",
                ["layer", "from output", "exact", *precs, "float16 verdicts"],
                rows,
                figure=f"{NAME}_norms.png" if act == "sigmoid" else None,
            )
        )

    sweep_rows, sweep = [], {}
    if not small:
        for depth in SWEEP_DEPTHS:
            c = compare(network("sigmoid", "xavier_normal", depth=depth), precisions="float16")
            norms = layer_norms(c, depth)
            k = first_flush(norms, "float16")
            sweep[depth] = k
            sweep_rows.append(
                [
                    depth,
                    "none" if k is None else f"d{k} ({depth - k + 1} from the output)",
                    _fmt_log2(norms["exact"][0]),
                    "none" if k is None else _fmt_log2(norms["exact"][k - 1]),
                ]
            )
        sections.append(
            Section(
                "Sigmoid networks of other depths",
                "Same width, data and init scheme; the first layer, going back from the output, "
                "whose float16 weight gradient is entirely zero.",
                ["depth", "float16 all-zero from", "exact norm at d1", "exact norm there"],
                sweep_rows,
            )
        )

    sig = results["sigmoid"]
    k16 = sig["flush"]["float16"]
    others_keep = all(sig["flush"][p] is None for p in precs if p != "float16")
    contrast = {act: results[act]["flush"]["float16"] for act in ("tanh", "relu")}
    structural = {act: results[act]["exact_zero_layers"] for act in ("tanh", "relu")}
    holds = bool(
        k16 is not None
        and others_keep
        and all(v is None for v in contrast.values())
        and not any(structural.values())
    )
    e = sig["norms"]["exact"]
    if k16 is not None:
        below = all(sig["norms"]["computed"]["float16"][i] == 0 and e[i] > 0 for i in range(k16))
        text = (
            f"In the depth-{DEPTH} sigmoid network the exact weight-gradient norm falls from "
            f"{_fmt_log2(e[-1])} at the last hidden layer to {_fmt_log2(e[0])} at the first, "
            f"{_decay_words(sig['decay'])}. float16's gradient is entirely zero from layer "
            f"d{k16} ({DEPTH - k16 + 1} layers from the output; exact norm {_fmt_log2(e[k16 - 1])}) "
            + ("down to the input" if below else "(with non-zero layers below it)")
            + ", while the exact gradients there are not zero; "
            + (
                f"{', '.join(p for p in precs if p != 'float16')} are non-zero at every layer."
                if others_keep
                else "another precision flushes too: "
                + ", ".join(
                    f"{p} from d{v}" for p, v in sig["flush"].items() if v and p != "float16"
                )
                + "."
            )
        )
    else:
        text = (
            f"float16 never flushes a whole layer of the depth-{DEPTH} sigmoid network "
            f"(exact norm at d1 {_fmt_log2(e[0])})."
        )
    for act in ("tanh", "relu"):
        r = results[act]
        ek = r["norms"]["exact"]
        text += (
            f" {act} ({r['init']}): exact norms between {_fmt_log2(min(ek))} and "
            f"{_fmt_log2(max(ek))}"
            + (f" ({_decay_words(r['decay'])})" if r["decay"] is not None else "")
            + (
                ", float16 never entirely zero"
                if contrast[act] is None
                else f", float16 entirely zero from d{contrast[act]}"
            )
            + (f", structurally zero layers {structural[act]}" if structural[act] else "")
            + "."
        )
    if sweep:
        text += (
            " Across depths "
            + ", ".join(
                f"{d}: {'none' if k is None else f'{d - k + 1} from the output'}"
                for d, k in sweep.items()
            )
            + " (first all-zero float16 layer)."
        )

    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            f"{DEPTH} hidden dense layers of width {WIDTH}, each followed by the activation, then "
            f"a dense output; MSE; batch {BATCH}, inputs U(-1, 1), targets U(0, 1); network seed "
            f"{SEED}. sigmoid and tanh use xavier_normal, ReLU he_normal, biases 0. One "
            "comparison per activation against the certified exact gradients; the norm of each "
            "layer's weight gradient in each precision."
            + (
                ""
                if small
                else f" Full run: sigmoid nets of depth {', '.join(map(str, SWEEP_DEPTHS))} too."
            )
        ),
        verdict=text,
        holds=holds,
        sections=sections,
        data={
            "depth": DEPTH,
            "first_flush": {act: results[act]["flush"] for act, _ in ACTIVATIONS},
            "decay_bits_per_layer": {act: results[act]["decay"] for act, _ in ACTIVATIONS},
            "exact_zero_layers": {act: results[act]["exact_zero_layers"] for act, _ in ACTIVATIONS},
            "norms": {act: results[act]["norms"] for act, _ in ACTIVATIONS},
            "depth_sweep": sweep,
        },
        figures={f"{NAME}_norms.png": lambda path: _figure(results, precs, path)},
    )


def _decay_words(bits: float) -> str:
    way = "shrinking" if bits >= 0 else "growing"
    return f"{way} {abs(bits):.2f} bits per layer going back"


def _fmt_log2(v: float) -> str:
    lg = _log2(v)
    return "0" if lg is None else f"2^{lg:.1f}"


def _figure(results: dict[str, dict[str, Any]], precs: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    f16 = get_format("float16")
    fig, axes = plt.subplots(1, len(results), figsize=(12, 4.2), sharey=True)
    markers = {"float16": "o", "bfloat16": "s", "float32": "^", "float64": "x"}
    allv = [math.log2(v) for r in results.values() for v in r["norms"]["exact"] if v > 0]
    floor = min(allv) - 4
    for ax, (act, r) in zip(axes, results.items(), strict=True):
        layers = np.arange(1, len(r["norms"]["exact"]) + 1)
        ex = [math.log2(v) if v > 0 else np.nan for v in r["norms"]["exact"]]
        ax.plot(layers, ex, "k-", lw=2.5, label="exact", zorder=1)
        for i, p in enumerate(precs):
            vals = r["norms"]["computed"][p]
            ys = [math.log2(v) if v > 0 else np.nan for v in vals]
            ax.plot(layers + 0.12 * (i - 1.5), ys, markers.get(p, "o"), ms=5, label=p, mfc="none")
            zeros = [layer for layer, v in zip(layers, vals, strict=True) if v == 0]
            if zeros:
                ax.plot(
                    np.asarray(zeros) + 0.12 * (i - 1.5),
                    [floor] * len(zeros),
                    "v",
                    color=f"C{i}",
                    ms=7,
                    label=f"{p} exactly 0",
                )
        for value, style, lab in (
            (f16.smallest_subnormal, ":", "float16 smallest subnormal"),
            (f16.smallest_normal, "--", "float16 smallest normal"),
        ):
            ax.axhline(math.log2(value), color="grey", ls=style, lw=1, label=lab)
        ax.set_title(f"{act} ({r['init']})")
        ax.set_xlabel("hidden layer (1 = next to the input)")
        ax.set_xticks([1, *range(4, len(layers) + 1, 4)])
        ax.invert_xaxis()
    axes[0].set_ylabel("log2 ||dL/dW|| of the layer")
    handles, labels = axes[0].get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=True))
    for ax in axes[1:]:
        h, lab = ax.get_legend_handles_labels()
        for k, v in zip(lab, h, strict=True):
            seen.setdefault(k, v)
    axes[-1].legend(seen.values(), seen.keys(), fontsize=7, loc="lower left")
    fig.suptitle(f"{NAME}: gradient norms from the output (left) back to the input (right)")
    fig.tight_layout()
    save_png(fig, path)
