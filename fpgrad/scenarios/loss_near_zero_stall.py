"""loss_near_zero_stall: MSE training that reaches a loss floor in low precision while the exact
loss keeps falling, and a confident cross-entropy whose true-logit gradient float16 loses."""

from __future__ import annotations

import math
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fpgrad.diagnose.comparison import Comparison, compare
from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.numbers.formats import get_format
from fpgrad.present.report.plots import save_png, training_plots
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.training import TrainResult, train

NAME = "loss_near_zero_stall"
CLAIM = (
    "Near zero loss low precision stops learning: MSE training reaches a loss floor in "
    "float16 and bfloat16 while the exact loss keeps falling, and in a confident "
    "cross-entropy classifier softmax rounds to 1 so the true logit's gradient becomes 0 "
    "although its exact value is representable."
)

# (a) regression: targets exactly linear in x (exact loss minimum 0), slope and intercept
# not representable in float16 or bfloat16
W_STAR = 9.0 + 2.0**-13 + 2.0**-20
B_STAR = 3.0 + 2.0**-15
LR = 0.3
RUNS = "float16,bfloat16,float32,float64,float16+master"
PRECISIONS = ("float16", "bfloat16", "float32", "float64")


def regression() -> Network:
    """y = W_STAR x + B_STAR at x = -7/8 .. 7/8 (step 1/4), exact in float64; w = b = 0 initially."""
    x = (np.arange(8.0) - 3.5) / 4.0
    y = W_STAR * x + B_STAR  # exact: 24-bit slope times 3-bit x
    doc = {
        "name": f"{NAME}_mse",
        "layer": [{"type": "dense", "name": "lin", "weight": [[0.0]], "bias": [0.0]}],
        "loss": {"type": "mse"},
        "data": {"x": x[:, None].tolist(), "y": y[:, None].tolist()},
    }
    return parse_network(doc, source=NAME)


def exact_mse(net: Network, params: np.ndarray) -> float:
    """The MSE of the regression at float64 parameters [w, b], in exact rational arithmetic."""
    w, b = (Fraction(float(v)) for v in params)
    r = [
        w * Fraction(float(x)) + b - Fraction(float(y))
        for x, y in zip(net.x[:, 0], net.y[:, 0], strict=True)
    ]
    return float(sum(v * v for v in r) / len(r))


def classifier(margin: float) -> Network:
    """One sample, two classes, logits (margin, 0) through a dense layer: input 1, weight
    [[margin], [0]], bias 0; the true class is 0."""
    doc = {
        "name": f"{NAME}_ce",
        "layer": [
            {"type": "dense", "name": "logits", "weight": [[margin], [0.0]], "bias": [0.0, 0.0]}
        ],
        "loss": {"type": "cross_entropy"},
        "data": {"x": [[1.0]], "y": [0]},
    }
    return parse_network(doc, source=NAME)


def theory_margin(precision: str) -> float:
    """The margin from which the softmax normaliser 1 + e^-m rounds to 1 (e^-m <= 2^-p, p the
    precision in bits), so p(true) = 1 and its gradient p - 1 = 0."""
    return get_format(precision).precision * math.log(2.0)


def _true_grad(c: Comparison) -> dict[str, Any]:
    return c.gradient("logits.bias", (0,))


def lost_at(margin: float, precision: str) -> bool:
    c = compare(classifier(margin), precisions=precision)
    return _true_grad(c)[precision]["verdict"] == "rounding_zero"


def threshold(precision: str, lo: float, hi: float, resolution: float) -> tuple[float, float]:
    """Bisection between a kept margin ``lo`` and a lost margin ``hi`` (dyadic margins)."""
    while hi - lo > resolution:
        mid = (lo + hi) / 2
        if lost_at(mid, precision):
            hi = mid
        else:
            lo = mid
    return lo, hi


@records_runs
def run(small: bool = False) -> ScenarioResult:
    with one_torch_thread():
        return _run(small)


def _run(small: bool) -> ScenarioResult:
    # (a) MSE regression trained to its floor
    net = regression()
    steps = 60 if small else 150
    tr = train(
        net, steps=steps, cfg=OptimConfig(lr=LR), runs=RUNS, perturb=False, verdict_every=steps
    )
    ex = tr.exact.loss
    # loss[t] is computed at params[t]; the last entry at the final parameters, params[-1]
    true_loss = {label: exact_mse(net, tr.histories[label].params[-1]) for label in tr.runs}
    mse_rows = []
    for label in tr.runs:
        d = tr.detectors[label]
        lf, st = d["loss_floor"], d["stall"]
        mse_rows.append(
            [
                label,
                f"{tr.histories[label].loss[-1]:.3g}",
                f"{true_loss[label]:.3g}",
                "yes" if lf["detected"] else "no",
                lf.get("start_step", ""),
                f"{lf['ratio_to_exact']:.3g}" if lf.get("ratio_to_exact") else "",
                f"from step {st['start_step']}" if st["detected"] else "no",
                f"{100 * d['swamped_fraction']['total']:.0f}%",
            ]
        )
    mse_rows.append(["exact", f"{ex[-1]:.3g}", f"{ex[-1]:.3g}", "", "", "", "", ""])
    floors = {label: tr.detectors[label]["loss_floor"]["detected"] for label in tr.runs}
    tail = max(5, steps // 5)
    exact_falls = ex[-1] < ex[-tail]
    exact_drop = ex[-tail] / ex[-1] if ex[-1] > 0 else math.inf
    a_holds = bool(floors["float16"] and floors["bfloat16"] and exact_falls)

    # (b) cross-entropy: margin sweep, then bisection of each precision's threshold
    margins = list(range(2, 41, 2)) if small else list(range(1, 41))
    resolution = 0.25 if small else 1 / 16
    sweep: dict[float, Comparison] = {m: compare(classifier(float(m))) for m in margins}
    precs = sweep[margins[0]].precisions
    coarse: dict[str, int | None] = {}
    for p in precs:
        lost = [m for m in margins if _true_grad(sweep[m])[p]["verdict"] == "rounding_zero"]
        coarse[p] = min(lost) if lost else None
    bounds: dict[str, tuple[float, float] | None] = {}
    for p in precs:
        m = coarse[p]
        if m is None:
            bounds[p] = None
            continue
        kept = [k for k in margins if k < m]
        bounds[p] = threshold(p, float(max(kept)), float(m), resolution) if kept else None
    monotone = {
        p: coarse[p] is not None
        and all(
            (_true_grad(sweep[m])[p]["verdict"] == "rounding_zero") == (m >= coarse[p])
            for m in margins
        )
        for p in precs
    }
    ce_rows = []
    for m in margins:
        g = _true_grad(sweep[m])
        row: list[Any] = [m, f"{float(g['exact']):.4g}"]
        for p in precs:
            col = g[p]
            row.append(
                f"{col['value']:.3g} {col['verdict']}"
                + (f" ({col['kind']})" if col["kind"] else "")
            )
        row.append(f"{sweep[m].loss['float16']['value']:.3g}")
        ce_rows.append(row)
    thr_rows = []
    for p in precs:
        b = bounds[p]
        thr_rows.append(
            [
                p,
                f"{theory_margin(p):.4f}",
                "none" if b is None else f"{b[0]:g} .. {b[1]:g}",
                "" if b is None else ("yes" if b[0] <= theory_margin(p) <= b[1] else "no"),
            ]
        )
    m16 = coarse.get("float16")
    g16 = _true_grad(sweep[m16]) if m16 is not None else None
    other16 = sweep[m16].gradient("logits.bias", (1,))["float16"] if m16 is not None else None
    b_holds = bool(
        g16 is not None
        and g16["float16"]["kind"] == "lost"
        and float(g16["exact"]) != 0
        and coarse.get("bfloat16") is not None
        and all(coarse.get(p) is None or coarse[p] > m16 for p in ("float32", "float64"))
    )
    holds = a_holds and b_holds

    parts = []
    f16d, bfd = (tr.detectors[p]["loss_floor"] for p in ("float16", "bfloat16"))
    if a_holds:
        parts.append(
            f"(a) MSE: float16's loss is flat at {f16d['floor']:.3g} from step "
            f"{f16d['start_step']} and bfloat16's at {bfd['floor']:.3g} from step "
            f"{bfd['start_step']} (loss-floor detector), while the exact loss still falls "
            f"{exact_drop:.3g}-fold over the last {tail} steps to {ex[-1]:.3g}."
        )
    else:
        parts.append(
            f"(a) MSE: loss floor float16 {floors['float16']}, bfloat16 {floors['bfloat16']}, "
            f"exact still falling {exact_falls}: the claimed floor did not appear."
        )
    others = []
    for p in tr.runs:
        if p in ("float16", "bfloat16"):
            continue
        h, d = tr.histories[p], tr.detectors[p]
        txt = f"{p} " + (
            f"floors at {d['loss_floor']['floor']:.3g}"
            if floors[p]
            else f"has no floor (final loss {h.loss[-1]:.3g})"
        )
        if h.loss[-1] == 0 and true_loss[p] > 0:
            st = d["stall"]
            txt += (
                f", but its loss reads 0 only because it fits the targets as rounded to "
                f"{p.split('+')[0]}: its exact loss is {true_loss[p]:.3g}"
                + (
                    f", and with zero gradients it stalls from step {st['start_step']}"
                    if st["detected"]
                    else ""
                )
            )
        others.append(txt)
    parts.append("Also: " + "; ".join(others) + ".")
    p_true16 = logp_true16 = None
    if g16 is not None and m16 is not None:
        logits16 = torch.tensor([[float(m16), 0.0]], dtype=torch.float16)
        p_true16 = float(torch.softmax(logits16, dim=1)[0, 0])
        logp_true16 = float(torch.log_softmax(logits16, dim=1)[0, 0])
        thr = "; ".join(
            f"{p} from {bounds[p][1]:g} (theory {theory_margin(p):.4f})"
            if bounds[p] is not None
            else f"{p} never in 1..40"
            for p in precs
        )
        parts.append(
            f"(b) Cross-entropy with logit margin m: float16 first loses the true logit's "
            f"gradient at m = {m16} on the integer grid (exact {float(g16['exact']):.3g}, "
            f"float16 {g16['float16']['verdict']} ({g16['float16']['kind']}): representable). "
            + (
                "torch's cross-entropy works from log_softmax, whose normaliser 1 + e^-m "
                f"rounds to 1 there: log p(true) = {logp_true16:g} exactly, so the gradient "
                "exp(log p) - 1 is 0"
                if logp_true16 == 0
                else f"float16 log_softmax still gives log p(true) = {logp_true16:g}"
            )
            + f" (softmax on its own gives p(true) = {p_true16:g} at this margin"
            + (", rounded to 1)." if p_true16 == 1 else ", not 1).")
            + " The other class's gradient is still "
            f"{other16['verdict']} there, so the float16 gradients no longer sum to zero. "
            f"Thresholds (bisected to {resolution:g}): {thr}; theory: the normaliser "
            "1 + e^-m rounds to 1 once e^-m <= 2^-p (p bits of precision)."
        )
    else:
        parts.append("(b) float16 never lost the true logit's gradient in the swept margins.")
    verdict = " ".join(parts)

    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            "(a) One-weight linear regression y = w x + b on 8 points x = -7/8 .. 7/8 with "
            f"targets exactly on the line w* = 9 + 2^-13 + 2^-20, b* = 3 + 2^-15 (exact loss "
            "minimum 0; neither coefficient is representable in float16 or bfloat16), from "
            f"w = b = 0, plain SGD lr {LR}, {steps} full-batch steps in {RUNS.replace(',', ', ')} "
            "and exactly (128 bits, certified at 256). (b) One sample, two classes, logits "
            "(m, 0) with the true class first (a dense layer from input 1 with weight [[m], [0]]); "
            "the gradient of the true logit is p(true) - 1. Margins "
            f"{margins[0]} .. {margins[-1]}, then bisection of each precision's first lost "
            "margin."
        ),
        verdict=verdict,
        holds=holds,
        sections=[
            Section(
                "(a) MSE regression: loss floor per run",
                f"Loss-floor detector over the last {tail} "
                "steps (flat within 1e-3 relative, above the exact loss, which still falls); "
                "stall: parameters bit-identical for 5 steps while exact moves; swamped: share "
                "of requested updates with w + update == w.",
                [
                    "run",
                    "final loss (computed)",
                    "exact loss at its parameters",
                    "loss floor",
                    "from step",
                    "floor / exact",
                    "stall",
                    "swamped",
                ],
                mse_rows,
                figure=f"{NAME}_mse_loss.png",
            ),
            Section(
                "(b) Cross-entropy: the true logit's gradient against the margin",
                "Computed value and verdict per precision; last column: float16's loss.",
                ["margin", "exact", *precs, "float16 loss"],
                ce_rows,
                figure=f"{NAME}_ce_margin.png",
            ),
            Section(
                "(b) Thresholds",
                "Margin from which the true logit's gradient is a rounding zero: theory "
                "(p ln 2) against the bisected interval (last kept .. first lost).",
                ["precision", "theory p ln 2", "measured", "agrees"],
                thr_rows,
            ),
        ],
        data={
            "mse": {
                "exact_loss_at_final_params": true_loss,
                "loss_floor": {p: tr.detectors[p]["loss_floor"] for p in tr.runs},
                "stall": {p: tr.detectors[p]["stall"] for p in tr.runs},
                "exact_final": ex[-1],
                "exact_drop_last_window": exact_drop,
                "holds": a_holds,
            },
            "ce": {
                "first_lost_integer_margin": coarse,
                "bisected": bounds,
                "monotone": monotone,
                "theory": {p: theory_margin(p) for p in precs},
                "float16_at_first_lost": g16["float16"] if g16 else None,
                "other_class_float16_at_first_lost": other16,
                "torch_float16_at_first_lost": {"softmax": p_true16, "log_softmax": logp_true16},
                "holds": b_holds,
            },
        },
        figures={
            f"{NAME}_mse_loss.png": lambda path: _loss_figure(tr, path),
            f"{NAME}_ce_margin.png": lambda path: _margin_figure(margins, sweep, precs, path),
        },
    )


def _loss_figure(tr: TrainResult, path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        training_plots(tr, tmp)
        shutil.copyfile(Path(tmp) / "loss.png", path)


def _margin_figure(
    margins: list[int], sweep: dict[float, Comparison], precs: list[str], path: Path
) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    exact = [abs(float(_true_grad(sweep[m])["exact"])) for m in margins]
    ax.plot(margins, np.log10(exact), "k-", lw=2.5, label="exact |p - 1|")
    floor = math.floor(min(np.log10(exact))) - 2
    markers = {"float16": "o", "bfloat16": "s", "float32": "^", "float64": "x"}
    for i, p in enumerate(precs):
        vals = [abs(_true_grad(sweep[m])[p]["value"]) for m in margins]
        ys = [math.log10(v) if v > 0 else np.nan for v in vals]
        ax.plot(margins, ys, markers.get(p, "o"), mfc="none", color=f"C{i}", label=p)
        zeros = [m for m, v in zip(margins, vals, strict=True) if v == 0]
        if zeros:
            ax.plot(zeros, [floor + 0.3 * i] * len(zeros), "v", color=f"C{i}", ms=5)
        ax.axvline(theory_margin(p), color=f"C{i}", ls=":", lw=1)
    ax.set_xlabel("logit margin m   (dotted: p ln 2, where 1 + e^-m rounds to 1)")
    ax.set_ylabel("log10 |dL/dz_true|   (triangles: exactly 0)")
    ax.set_title(f"{NAME}: confident cross-entropy loses the true logit's gradient")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_png(fig, path)
