"""extreme_values_overflow: large inputs times large weights overflow float16 to inf, inf
meets -inf and becomes NaN; where each first happens; bfloat16 keeps the range."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.diagnose.comparison import Comparison, compare, places
from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.numbers.formats import get_format
from fpgrad.numbers.rounding import round_to
from fpgrad.present.report.plots import save_png
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread, torch_trace
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.training import TrainResult, train

NAME = "extreme_values_overflow"
CLAIM = (
    "Large inputs or weights overflow float16 (max 65504) to inf, and inf then turns into NaN "
    "that poisons every gradient; fpgrad names the first operation where each happens, and "
    "bfloat16, with float32's range, keeps every value finite."
)

PRECISIONS = ("float16", "bfloat16", "float32", "float64")
TRAIN_LR = 0.002


def fitted_network() -> Network:
    """A 2-3-1 ReLU network that fits its data: raw inputs up to 255 times weights up to 256
    give hidden values up to 68160, small output weights bring the output back to ~1-9, and
    the targets sit 0.1-0.27 from it (data and weights exact in every format)."""
    x = np.array([[255.0, 200.0], [100.0, 60.0], [80.0, 150.0], [30.0, 40.0]])
    w1 = np.array([[192.0, 96.0], [160.0, 128.0], [64.0, 256.0]])
    w2 = np.array([[2.0**-12, -(2.0**-12), 2.0**-13]])
    out = np.maximum(x @ w1.T, 0) @ w2.T
    y = round_to(out + np.array([[0.25], [-0.2], [0.15], [-0.1]]), get_format("bfloat16"))
    doc = {
        "name": f"{NAME}_fitted",
        "layer": [
            {"type": "dense", "name": "hidden", "weight": w1.tolist(), "bias": [0.0] * 3},
            {"type": "relu", "name": "act"},
            {"type": "dense", "name": "out", "weight": w2.tolist(), "bias": [0.0]},
        ],
        "loss": {"type": "mse"},
        "data": {"x": x.tolist(), "y": y.tolist()},
    }
    return parse_network(doc, source=NAME)


def diverging_network() -> Network:
    """Linear regression on raw (unstandardised) inputs in [5, 30]: lr 0.002 is beyond
    2 / (largest curvature), so gradient descent diverges, exactly too."""
    rng = np.random.default_rng(11)
    x = rng.integers(5, 31, size=(8, 3)).astype(float)
    y = np.round(rng.uniform(0.0, 1.0, size=(8, 1)) * 16) / 16
    doc = {
        "name": f"{NAME}_diverging",
        "seed": 3,
        "layer": [{"type": "dense", "name": "lin", "out": 1, "init": "xavier_uniform"}],
        "loss": {"type": "mse"},
        "data": {"x": x.tolist(), "y": y.tolist()},
    }
    return parse_network(doc, source=NAME)


def _place_counts(net: Network) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """inf and NaN counts per traced tensor and precision (torch traces), and the largest
    magnitude of each tensor in float64."""
    traces = {p: torch_trace(net, p) for p in PRECISIONS}
    rows, biggest = [], {}
    for pl in places(net):
        row: dict[str, Any] = {"place": pl.label(), "direction": pl.direction, "op": pl.op}
        for p, tr in traces.items():
            v = getattr(tr, pl.direction)[pl.layer]
            row[p] = (int(np.isinf(v).sum()), int(np.isnan(v).sum()))
        biggest[pl.label()] = float(
            np.max(np.abs(getattr(traces["float64"], pl.direction)[pl.layer]))
        )
        rows.append(row)
    return rows, biggest


def _first(rows: list[dict[str, Any]], p: str, which: int) -> dict[str, Any] | None:
    return next((r for r in rows if r[p][which]), None)


@records_runs
def run(small: bool = False) -> ScenarioResult:
    with one_torch_thread():
        return _run(small)


def _run(small: bool) -> ScenarioResult:
    f16 = get_format("float16")
    net = fitted_network()
    cmp = compare(net, precisions=",".join(PRECISIONS))
    place_rows, biggest = _place_counts(net)
    exact_grads = [abs(float(g["exact"])) for g in cmp.gradients]
    max_exact_grad = max(exact_grads)
    first_inf = _first(place_rows, "float16", 0)
    first_nan = _first(place_rows, "float16", 1)
    attribution = {p: cmp.attribution[p]["first_overflow"] for p in PRECISIONS}
    s16 = cmp.summary["float16"]
    n = len(cmp.gradients)
    bf_bad = sum(cmp.summary["bfloat16"][k] for k in ("overflow", "nan"))
    bf_place_bad = sum(sum(r["bfloat16"]) for r in place_rows)
    bf_rel = max(g["bfloat16"]["rel_err"] for g in cmp.gradients)
    compare_holds = (
        attribution["float16"] is not None
        and s16["nan"] + s16["overflow"] == n
        and max_exact_grad < f16.max
        and bf_bad == 0
        and bf_place_bad == 0
        and attribution["bfloat16"] is None
    )

    steps = 12 if small else 30
    dnet = diverging_network()
    tr = train(
        dnet,
        steps=steps,
        cfg=OptimConfig(lr=TRAIN_LR),
        runs=",".join(PRECISIONS),
        perturb=False,
        verdict_every=steps,
    )
    xb = np.hstack([dnet.x, np.ones((dnet.x.shape[0], 1))])
    lam = float(np.max(np.linalg.eigvalsh(2 * xb.T @ xb / xb.shape[0])))
    growth = abs(1 - TRAIN_LR * lam)
    events = {p: _events(tr, p) for p in PRECISIONS}
    e16 = events["float16"]
    train_holds = (
        e16["loss_inf"] is not None
        and e16["weight_nan"] is not None
        and e16["loss_inf"] < e16["weight_nan"]
        and events["bfloat16"]["first_nonfinite"] is None
    )
    holds = compare_holds and train_holds

    def where(r: dict[str, Any] | None) -> str:
        return "nowhere" if r is None else f"{r['place']} ({r['op']})"

    verdict = (
        f"Fitted network: the exact loss is {float(cmp.loss['exact']):.3g} and every exact "
        f"gradient is finite and at most {max_exact_grad:.4g} in magnitude (below float16's "
        f"{f16.max:g}), yet float16 returns {s16['nan']} NaN and {s16['overflow']} inf of "
        f"{n} gradients and a {cmp.loss['float16']['value']} loss. The first inf appears in "
        f"{where(first_inf)} ({first_inf['float16'][0] if first_inf else 0} elements, the "
        f"largest exact value there is {biggest[first_inf['place']] if first_inf else 0:.6g}); "
        f"the first NaN in {where(first_nan)}, where +inf and -inf meet. bfloat16 has "
        f"{bf_bad} inf/NaN gradients and {bf_place_bad} inf/NaN values in the traced tensors"
        if first_inf
        else "float16 produced no inf"
    )
    verdict += (
        f"; its range holds, but with 8 significant bits its gradients are off by up to "
        f"{bf_rel:.0%} (float32's by {max(g['float32']['rel_err'] for g in cmp.gradients):.2g})."
    )
    verdict += (
        f" Training on raw inputs in [5, 30] with lr = {TRAIN_LR:g} (lr x largest curvature = "
        f"{TRAIN_LR * lam:.3g} > 2): the exact run diverges too, its error growing "
        f"{growth:.3g}x per step. float16: the loss is inf from step {e16['loss_inf']} "
        "(the square in the loss overflows first)"
        + (
            f", the first inf gradient comes at step {e16['grad_nonfinite']}"
            if e16["grad_nonfinite"] is not None
            else ""
        )
        + (
            f"; the first-overflow detector points at step {e16['detector']['step']}: "
            f"{e16['detector']['layer']} {e16['detector']['quantity']} "
            f"({e16['detector']['op']})"
            if e16["detector"]
            else ""
        )
        + (
            f"; step {e16['weight_inf']} writes inf weights"
            if e16["weight_inf"] is not None and e16["weight_inf"] < e16["weight_nan"]
            else ""
        )
        + f", step {e16['weight_nan']} NaN weights (inf - inf in w - lr g)"
        + (
            f", and from step {e16['loss_nan']} the loss is NaN. "
            if e16["loss_nan"] is not None
            else ". "
        )
    )
    finite = [p for p in ("bfloat16", "float32") if events[p]["first_nonfinite"] is None]
    verdict += (
        f"{' and '.join(finite)} stay finite for all {steps} steps"
        + (
            f" (final loss {tr.histories['bfloat16'].loss[-1]:.3g} against the exact "
            f"{tr.exact.loss[-1]:.3g}): the range only postpones what the divergence makes "
            "inevitable."
            if "bfloat16" in finite
            else "."
        )
        if finite
        else "bfloat16 and float32 overflowed too."
    )

    table_places = []
    for r in place_rows:
        table_places.append(
            [r["place"], r["op"], f"{biggest[r['place']]:.6g}"]
            + [f"{r[p][0]} / {r[p][1]}" for p in PRECISIONS]
        )
    grad_rows = [
        [p]
        + [cmp.summary[p][k] for k in ("ok", "overflow", "nan", "rounding_zero", "subnormal")]
        + [
            f"{max(g[p]['rel_err'] for g in cmp.gradients):.3g}",
            "-"
            if attribution[p] is None
            else f"{attribution[p]['layer']} {attribution[p]['quantity']} ({attribution[p]['op']})",
        ]
        for p in PRECISIONS
    ]
    train_rows = [
        [
            p,
            _step(events[p]["loss_inf"]),
            _step(events[p]["grad_nonfinite"]),
            "never"
            if not events[p]["detector"]
            else f"{events[p]['detector']['step']}: {events[p]['detector']['layer']} "
            f"{events[p]['detector']['quantity']} ({events[p]['detector']['op']})",
            _step(events[p]["weight_inf"]),
            _step(events[p]["weight_nan"]),
            _step(events[p]["loss_nan"]),
            f"{tr.histories[p].loss[-1]:.4g}",
        ]
        for p in PRECISIONS
    ]
    train_rows.append(["exact", "-", "-", "-", "-", "-", "-", f"{tr.exact.loss[-1]:.4g}"])

    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            "Two networks, evaluated and trained in float16, bfloat16, float32, float64 and "
            "exactly. (1) A fitted 2-3-1 ReLU regressor, MSE, 4 samples: raw inputs up to 255 "
            "times first-layer weights up to 256 give hidden values up to 68160 (float16's "
            "max is 65504); output weights of 2^-12 and 2^-13 bring the output back to 1-9, "
            "and the targets lie 0.1-0.27 from it, so the exact loss and gradients are "
            "modest. Inputs, weights and targets are exact in every format. (2) Linear "
            f"regression (3 raw inputs in [5, 30], bias, 8 samples, MSE) trained with plain "
            f"SGD at lr = {TRAIN_LR:g} for {steps} steps (exact at 128 bits, certified "
            f"{tr.exact_certified_digits:.1f} digits), a learning rate that would be "
            "harmless for standardised inputs."
        ),
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "Where inf and NaN appear (fitted network)",
                "inf / NaN counts per traced tensor, forward from the input, then backward from "
                "the loss; 'largest |value|' is float64's (float16's max is 65504).",
                ["tensor", "produced by", "largest |value|", *PRECISIONS],
                table_places,
                figure=f"{NAME}_magnitudes.png",
            ),
            Section(
                "Gradient verdicts (fitted network)",
                f"Counts over the {n} gradient elements; largest relative error; the first "
                "overflow (inf or NaN) that fpgrad's attribution names.",
                [
                    "precision",
                    "ok",
                    "overflow",
                    "nan",
                    "rounding zero",
                    "subnormal",
                    "max rel. error",
                    "first overflow",
                ],
                grad_rows,
            ),
            Section(
                "Training until it overflows (diverging regression)",
                "Step t (from 0) computes the loss and gradients at the weights after t steps "
                "and writes the weights after t + 1. The first-overflow detector checks, in the order "
                "they are computed, the parameters, the layer outputs, the loss, the backward "
                "signals and the parameter gradients.",
                [
                    "run",
                    "loss inf",
                    "gradient inf/NaN",
                    "first inf/NaN layer tensor",
                    "writes inf weight",
                    "writes NaN weight",
                    "loss NaN",
                    "loss at end",
                ],
                train_rows,
                figure=f"{NAME}_training.png",
            ),
        ],
        data={
            "compare": {
                "summary": cmp.summary,
                "first_overflow": attribution,
                "first_inf_place": first_inf and first_inf["place"],
                "first_nan_place": first_nan and first_nan["place"],
                "max_exact_gradient": max_exact_grad,
                "bfloat16_max_rel_err": bf_rel,
                "holds": compare_holds,
            },
            "training": {
                "lr_times_curvature": TRAIN_LR * lam,
                "growth_per_step": growth,
                "events": events,
                "steps": steps,
                "holds": train_holds,
                "exact_certified_digits": tr.exact_certified_digits,
            },
        },
        figures={
            f"{NAME}_magnitudes.png": lambda path: _magnitude_figure(
                cmp, biggest, place_rows, path
            ),
            f"{NAME}_training.png": lambda path: _training_figure(tr, events, path),
        },
    )


def _step(s: int | None) -> str:
    return "never" if s is None else str(s)


def _events(tr: TrainResult, p: str) -> dict[str, Any]:
    """Steps (0-based: step t computes the loss and gradients at the weights after t steps
    and writes the weights after t + 1) of the first non-finite values of each kind."""
    h = tr.histories[p]

    def first(flags: list[bool]) -> int | None:
        return next((t for t, bad in enumerate(flags) if bad), None)

    return {
        "loss_inf": first([math.isinf(v) for v in h.loss]),
        "loss_nan": first([math.isnan(v) for v in h.loss]),
        "grad_nonfinite": first([not math.isfinite(v) for v in h.grad_norm]),
        "first_nonfinite": first(h.nonfinite),
        "detector": tr.detectors[p]["first_overflow"],
        "weight_inf": first([bool(np.isinf(v).any()) for v in h.params[1:]]),
        "weight_nan": first([bool(np.isnan(v).any()) for v in h.params[1:]]),
    }


def _magnitude_figure(
    cmp: Comparison, biggest: dict[str, float], rows: list[dict[str, Any]], path: Path
) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    labels = [r["place"] for r in rows]
    values = [biggest[k] for k in labels]
    colors = ["C3" if r["float16"][1] else ("C1" if r["float16"][0] else "C0") for r in rows]
    ax.bar(range(len(labels)), values, color=colors)
    for value, name in ((get_format("float16").max, "float16 max 65504"),):
        ax.axhline(value, color="k", ls="--", lw=1)
        ax.text(len(labels) - 0.5, value * 1.3, name, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_ylabel("largest |value| (float64)")
    ax.set_title(
        f"{NAME}: largest exact |value| per tensor\n"
        "bar colour: float16 holds inf (orange), NaN (red) or finite values (blue) there",
        fontsize=10,
    )
    fig.tight_layout()
    save_png(fig, path)


def _training_figure(tr: TrainResult, events: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    steps = np.arange(len(tr.exact.loss))
    ax.plot(steps, tr.exact.loss, "k-", lw=3, alpha=0.5, label="exact")
    top = max(max(v for v in tr.exact.loss if math.isfinite(v)), 1.0) * 100
    for i, p in enumerate(PRECISIONS):
        loss = np.asarray(tr.histories[p].loss, dtype=float)
        ax.plot(steps, np.where(np.isfinite(loss), loss, np.nan), "-", color=f"C{i}", label=p)
        inf = np.isinf(loss)
        nan = np.isnan(loss)
        if inf.any():
            ax.plot(steps[inf], [top] * int(inf.sum()), "^", color=f"C{i}", label=f"{p}: loss inf")
        if nan.any():
            ax.plot(
                steps[nan], [top * 10] * int(nan.sum()), "x", color=f"C{i}", label=f"{p}: loss NaN"
            )
    ax.axhline(get_format("float16").max, color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE); dotted: 65504")
    ax.set_title(f"{NAME}: diverging training, lr {TRAIN_LR:g} on raw inputs")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)
