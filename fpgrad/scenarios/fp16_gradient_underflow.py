"""fp16_gradient_underflow: the exact gradient magnitudes against float16's and bfloat16's
ranges, the share float16 flushes, and a loss-scale sweep, predicted and measured (after
Micikevicius et al., Mixed Precision Training, 2018)."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from fpgrad.diagnose.comparison import Comparison, compare
from fpgrad.model.netfile import parse_network
from fpgrad.model.network import Network
from fpgrad.numbers.formats import get_format
from fpgrad.present.report.plots import save_png
from fpgrad.run.optim import OptimConfig
from fpgrad.run.torch_native import one_torch_thread
from fpgrad.scenarios.base import ScenarioResult, Section, records_runs
from fpgrad.training import train

NAME = "fp16_gradient_underflow"
CLAIM = (
    "Exact gradients span more binades than float16 holds near zero: float16 flushes a share "
    "of them to zero (bfloat16 does not), and a loss scale S (a power of two) exists that "
    "shifts every gradient into float16's range without overflowing any (Micikevicius et al., "
    "2018)."
)

FEATURES = 10
HIDDEN = 16
BATCH = 8
FEATURE_STEP = 1.5  # feature j has magnitude ~2^(-1.5 j): inputs from 2^0 down to 2^-13.5
OUT_STD = 2.0**-16  # small output weights: small backward signals into the hidden layer
TARGET = 4.0  # targets U(-4, 4)
F16_FLUSH = Fraction(1, 2**25)  # |v| <= 2^-25 rounds to 0 in float16 (ties to even)
F16_INF = Fraction(65520)  # |v| >= 65504 + half an ulp rounds to inf


def network() -> Network:
    """10 inputs of decreasing magnitude, 16 tanh units with xavier_normal weights, one output
    with weights N(0, 2^-16); MSE on targets U(-4, 4)."""
    rng = np.random.default_rng(0)
    scales = 2.0 ** (-FEATURE_STEP * np.arange(FEATURES))
    signs = rng.choice([-1.0, 1.0], size=(BATCH, FEATURES))
    x = rng.uniform(0.5, 1.0, size=(BATCH, FEATURES)) * signs * scales
    y = TARGET * rng.uniform(-1.0, 1.0, size=(BATCH, 1))
    doc = {
        "name": NAME,
        "seed": 1,
        "layer": [
            {"type": "dense", "name": "hidden", "out": HIDDEN, "init": "xavier_normal"},
            {"type": "tanh", "name": "act"},
            {
                "type": "dense",
                "name": "out",
                "out": 1,
                "init": {"scheme": "normal", "std": OUT_STD},
            },
        ],
        "loss": {"type": "mse"},
        "data": {"x": x.tolist(), "y": y.tolist()},
    }
    return parse_network(doc, source=NAME)


def predicted(exact: list[Fraction], k: int) -> tuple[int, int]:
    """(underflow, overflow) counts when every exact gradient is multiplied by 2^k and
    correctly rounded into float16."""
    s = Fraction(2) ** k
    under = sum(1 for e in exact if e != 0 and abs(e) * s <= F16_FLUSH)
    over = sum(1 for e in exact if abs(e) * s >= F16_INF)
    return under, over


def _window(ks: list[int], clean: list[bool]) -> list[int]:
    return [k for k, ok in zip(ks, clean, strict=True) if ok]


def _range_text(window: list[int]) -> str:
    if not window:
        return "none"
    contiguous = window == list(range(window[0], window[-1] + 1))
    if contiguous or len(window) == 1:
        return f"2^{window[0]} .. 2^{window[-1]}" if len(window) > 1 else f"2^{window[0]}"
    return ", ".join(f"2^{k}" for k in window)


@records_runs
def run(small: bool = False) -> ScenarioResult:
    with one_torch_thread():
        return _run(small)


def _run(small: bool) -> ScenarioResult:
    net = network()
    c = compare(net)
    exact = [Fraction(g["exact"]) for g in c.gradients]
    nonzero = [e for e in exact if e != 0]
    logs = [math.log2(abs(float(e))) for e in nonzero]
    n_total, n_nonzero = len(exact), len(nonzero)

    share_rows = []
    for p in c.precisions:
        s = c.summary[p]
        share_rows.append(
            [
                p,
                s["rounding_zero"],
                f"{100 * s['rounding_zero'] / n_nonzero:.1f}%",
                s["rounding_zero_underflow"],
                s["rounding_zero_lost"],
                s["subnormal"],
                s["wrong_sign"],
                s["ok"],
            ]
        )

    ks = list(range(0, 25, 2)) if small else list(range(0, 25))
    pred = {k: predicted(exact, k) for k in ks}
    runs_master = [f"float16+master+scale={2**k}" for k in ks]
    runs_plain = [f"float16+scale={2**k}" for k in ks]
    tr = train(
        net,
        steps=1,
        cfg=OptimConfig(lr=0.01),
        runs=runs_master + runs_plain,
        perturb=False,
        verdict_every=1,
        exact_bits=128,
    )

    def measured(label: str) -> dict[str, Any]:
        h = tr.histories[label]
        counts = h.verdicts[0]
        return {
            "rounding_zero": counts.get("rounding_zero", 0),
            "nonfinite": counts.get("overflow", 0) + counts.get("nan", 0),
            "first_overflow": h.overflow_place,
        }

    meas_m = {k: measured(r) for k, r in zip(ks, runs_master, strict=True)}
    meas_p = {k: measured(r) for k, r in zip(ks, runs_plain, strict=True)}
    win_pred = _window(ks, [pred[k] == (0, 0) for k in ks])
    win_m = _window(
        ks, [meas_m[k]["rounding_zero"] == 0 and meas_m[k]["nonfinite"] == 0 for k in ks]
    )
    win_p = _window(
        ks, [meas_p[k]["rounding_zero"] == 0 and meas_p[k]["nonfinite"] == 0 for k in ks]
    )

    sweep_rows = []
    for k in ks:
        sweep_rows.append(
            [
                f"2^{k}",
                pred[k][0],
                pred[k][1],
                meas_m[k]["rounding_zero"],
                meas_m[k]["nonfinite"],
                meas_p[k]["rounding_zero"],
                meas_p[k]["nonfinite"],
            ]
        )

    f16 = c.summary["float16"]
    bf16 = c.summary["bfloat16"]
    lo, hi = min(logs), max(logs)
    f16_span = math.log2(65504 / 2.0**-25)
    text = (
        f"Of {n_nonzero} non-zero exact gradient elements (|g| from 2^{lo:.1f} to 2^{hi:.1f}, "
        f"{hi - lo:.1f} binades), float16 flushes {f16['rounding_zero']} "
        f"({100 * f16['rounding_zero'] / n_nonzero:.1f}%; {f16['rounding_zero_underflow']} "
        f"underflow, {f16['rounding_zero_lost']} lost) and keeps {f16['subnormal']} only as "
        f"subnormals; bfloat16 flushes {bf16['rounding_zero']}. "
    )
    text += (
        f"From the exact gradients alone (float16 spans {f16_span:.1f} binades between 2^-25 "
        f"and 65504), the scales with no underflow and no overflow are {_range_text(win_pred)}. "
    )
    text += (
        f"Measured in float16 with fp32 master gradients (+master+scale=S, unscaled in "
        f"float32): {_range_text(win_m)}"
    )
    bad_m = [k for k in ks if k not in win_m and (not win_m or k > win_m[-1])]
    if bad_m and meas_m[bad_m[0]]["nonfinite"]:
        k0 = bad_m[0]
        place = meas_m[k0]["first_overflow"]
        text += (
            f"; from S = 2^{k0} every gradient is non-finite ({meas_m[k0]['nonfinite']} of "
            f"{n_total}), first in {place['layer']} {place['quantity']} ({place['op']})"
            if place
            else f"; from S = 2^{k0} gradients overflow"
        )
        if 2.0**k0 > get_format("float16").max:
            text += (
                ": the scale itself exceeds float16's max 65504, and this loss is computed in "
                "float16 (mixed-precision training keeps the scaled loss in float32)"
            )
    text += ". "
    best_plain = min(ks, key=lambda k: (meas_p[k]["rounding_zero"] + meas_p[k]["nonfinite"], k))
    text += (
        f"Unscaled in float16 (+scale=S without master weights) the window is "
        f"{_range_text(win_p)}"
        + (
            f": at best (S = 2^{best_plain}) {meas_p[best_plain]['rounding_zero']} rounding zeros "
            f"remain, because dividing by S in float16 flushes the small gradients again."
            if not win_p
            else "."
        )
    )
    holds = bool(f16["rounding_zero"] > 0 and bf16["rounding_zero"] == 0 and win_m)
    if not win_m:
        best = min(ks, key=lambda k: (meas_m[k]["rounding_zero"] + meas_m[k]["nonfinite"], k))
        text += (
            f" No measured scale is clean: the best, 2^{best}, loses "
            f"{meas_m[best]['rounding_zero'] + meas_m[best]['nonfinite']} elements."
        )

    return ScenarioResult(
        name=NAME,
        claim=CLAIM,
        setup=(
            f"{FEATURES}-{HIDDEN}-1 tanh network, MSE, batch {BATCH}. Input feature j has "
            f"magnitude U(0.5, 1) 2^(-{FEATURE_STEP} j) with random signs (2^0 down to "
            f"2^-{FEATURE_STEP * (FEATURES - 1)}, all non-zero in float16), hidden weights "
            f"xavier_normal, output weights N(0, 2^-16), targets U(-{TARGET:g}, {TARGET:g}): "
            "small backward signals times small inputs give gradients far below float16's "
            "smallest subnormal. The histogram and shares come from one comparison against "
            "the certified exact gradients; the prediction multiplies the exact gradients by S "
            "and rounds into float16; the measurement takes one float16 training step per "
            "scale (torch autograd on loss * S) and counts verdicts of the unscaled gradients "
            "against the exact ones."
        ),
        verdict=text,
        holds=holds,
        sections=[
            Section(
                "Exact gradient magnitudes and the formats' ranges",
                "All gradient elements by log2 of their exact magnitude, coloured by float16's "
                "verdict; below, the ranges of float16 and bfloat16 on the same exponent axis.",
                figure=f"{NAME}_histogram.png",
            ),
            Section(
                "What each precision does with them (no scaling)",
                f"{n_nonzero} non-zero exact gradient elements of {n_total}.",
                [
                    "precision",
                    "rounding zeros",
                    "share",
                    "underflow",
                    "lost",
                    "subnormal",
                    "wrong sign",
                    "ok",
                ],
                share_rows,
            ),
            Section(
                "Loss-scale sweep",
                "Predicted: exact gradient times S rounded into float16 (underflow: |g S| <= "
                "2^-25; overflow: |g S| >= 65520). Measured: rounding zeros and non-finite "
                "elements of the unscaled gradients of one float16 step, with fp32 master "
                "gradients and without (unscaled in float16).",
                [
                    "S",
                    "pred. underflow",
                    "pred. overflow",
                    "master: rounding zeros",
                    "master: non-finite",
                    "float16 unscale: rounding zeros",
                    "float16 unscale: non-finite",
                ],
                sweep_rows,
                figure=f"{NAME}_scale_sweep.png",
            ),
        ],
        data={
            "elements": n_total,
            "nonzero": n_nonzero,
            "log2_range": [lo, hi],
            "summary": {p: c.summary[p] for p in c.precisions},
            "scales_log2": ks,
            "predicted": {k: {"underflow": u, "overflow": o} for k, (u, o) in pred.items()},
            "measured_master": meas_m,
            "measured_float16_unscale": meas_p,
            "window_predicted": win_pred,
            "window_measured_master": win_m,
            "window_measured_float16_unscale": win_p,
        },
        figures={
            f"{NAME}_histogram.png": lambda path: _histogram(c, path),
            f"{NAME}_scale_sweep.png": lambda path: _sweep_figure(
                ks, pred, meas_m, meas_p, win_pred, win_m, path
            ),
        },
    )


def _histogram(c: Comparison, path: Path) -> None:
    import matplotlib.pyplot as plt

    f16, bf16 = get_format("float16"), get_format("bfloat16")
    groups: dict[str, list[float]] = {}
    for g in c.gradients:
        e = float(g["exact"])
        if e == 0:
            continue
        v = g["float16"]["verdict"]
        groups.setdefault(v, []).append(math.log2(abs(e)))
    allv = [v for vs in groups.values() for v in vs]
    lo, hi = math.floor(min(allv)) - 2, math.ceil(max(allv)) + 2
    bins = np.arange(lo, hi + 1, 1.0)
    fig, (ax, ax2) = plt.subplots(
        2, 1, figsize=(8, 5.5), gridspec_kw={"height_ratios": [3, 1.3]}, constrained_layout=True
    )
    order = [v for v in ("ok", "subnormal", "rounding_zero") if v in groups]
    order += [v for v in groups if v not in order]
    colors = {"ok": "C2", "subnormal": "C1", "rounding_zero": "C3"}
    ax.hist(
        [groups[v] for v in order],
        bins=bins,
        stacked=True,
        label=[f"float16 {v} ({len(groups[v])})" for v in order],
        color=[colors.get(v, "C0") for v in order],
    )
    marks = (
        (math.log2(f16.smallest_subnormal), ":", "float16 smallest subnormal 2^-24"),
        (math.log2(f16.smallest_normal), "--", "float16 smallest normal 2^-14"),
        (math.log2(f16.smallest_subnormal / 2), "-.", "2^-25: below it float16 rounds to 0"),
    )
    for x, style, lab in marks:
        ax.axvline(x, color="k", ls=style, lw=1.2, label=lab)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("log2 |exact gradient|")
    ax.set_ylabel("elements")
    ax.set_title(f"{NAME}: exact gradient magnitudes and float16's verdicts")
    ax.legend(fontsize=7, loc="upper right")

    # the formats' exponent ranges on one axis
    top = 20
    for row, fmt in enumerate((f16, bf16)):
        sub, norm = math.log2(fmt.smallest_subnormal), math.log2(fmt.smallest_normal)
        mx = min(math.log2(fmt.max), top)
        ax2.barh(row, norm - sub, left=sub, color="C1", alpha=0.6, height=0.6)
        ax2.barh(row, mx - norm, left=norm, color="C2", alpha=0.6, height=0.6)
    ax2.barh(2, hi - lo - 4, left=lo + 2, color="C0", alpha=0.8, height=0.6)
    ax2.set_yticks([0, 1, 2], ["float16", "bfloat16", "exact grads"])
    ax2.set_xlim(-140, top)
    ax2.set_title(
        f"exponent ranges: bfloat16 reaches 2^{math.log2(bf16.smallest_normal):.0f} (normal) "
        f"and 2^{math.log2(bf16.smallest_subnormal):.0f} (subnormal)",
        fontsize=9,
    )
    ax2.set_xlabel("log2 magnitude  (orange: subnormal range, green: normal range)")
    save_png(fig, path)


def _sweep_figure(
    ks: list[int],
    pred: dict[int, tuple[int, int]],
    meas_m: dict[int, dict[str, Any]],
    meas_p: dict[int, dict[str, Any]],
    win_pred: list[int],
    win_m: list[int],
    path: Path,
) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(ks, [pred[k][0] for k in ks], "C0--", label="predicted underflow")
    ax.plot(ks, [pred[k][1] for k in ks], "C3--", label="predicted overflow")
    ax.plot(ks, [meas_m[k]["rounding_zero"] for k in ks], "C0o-", label="measured zeros (+master)")
    ax.plot(ks, [meas_m[k]["nonfinite"] for k in ks], "C3o-", label="measured inf/NaN (+master)")
    ax.plot(
        ks,
        [meas_p[k]["rounding_zero"] for k in ks],
        "C4s:",
        label="measured zeros (unscaled in float16)",
    )
    for win, color, lab in ((win_pred, "C2", "predicted window"), (win_m, "C8", "measured window")):
        if win:
            ax.axvspan(win[0] - 0.5, win[-1] + 0.5, color=color, alpha=0.15, label=lab)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("log2 S (loss scale)")
    ax.set_ylabel("gradient elements")
    ax.set_title(f"{NAME}: loss-scale sweep in float16")
    ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    save_png(fig, path)
