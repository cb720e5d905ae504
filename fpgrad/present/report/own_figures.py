"""The figures of the own-model report (:mod:`fpgrad.present.report.own`): gradient
magnitudes against each format's thresholds, verdict counts, where the signal died.
Columnar: histograms and counts, never a point per element.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fpgrad.diagnose.verdicts import VERDICTS

if TYPE_CHECKING:
    from fpgrad.diagnose.result import Comparison, GradColumns
    from fpgrad.numbers.formats import Format

#: colours of the verdicts in the stacked bars (a verdict added later gets a grey)
_COLOURS = {
    "ok": "#4daf4a",
    "inaccurate": "#a6d96a",
    "structural_zero": "#bdbdbd",
    "subnormal": "#ffbf00",
    "rounding_zero": "#d6604d",
    "overflow": "#7b3294",
    "nan": "#c2a5cf",
    "wrong_sign": "#252525",
    "spurious_nonzero": "#636363",
}


def _formats(c: Comparison) -> list[tuple[str, Format]]:
    """Each precision's format; a policy column: its narrowest format."""
    from fpgrad.model.policy import format_of
    from fpgrad.numbers.formats import get_format

    fmts = []
    for p in c.precisions:
        try:
            fmts.append((p, get_format(p.split(":")[0])))
        except Exception:  # noqa: BLE001 - a policy column: its narrowest format
            plan = c.policies[p]
            names = (
                set(plan["gradient_formats"].values())
                if plan.get("graph")
                else {lp["compute"] for lp in plan["layers"]} | {plan["loss"]["compute"]}
            )
            fmts.append((p, min((format_of(n) for n in names), key=lambda f: f.bits)))
    return fmts


def magnitudes_figure(
    network: str, grads: list[GradColumns], fmts: list[tuple[str, Format]], path: Path
) -> None:
    """Per parameter, a histogram of log2 |exact gradient| (non-zero, determined), with each
    precision's smallest subnormal (dotted), smallest normal (dashed) and largest finite value
    (solid) drawn."""
    from fpgrad.present.report.plots import plt, save_png

    # non-zero and determined (an undetermined element's ball holds 0: hi = 0 there)
    logs = {g.param: np.log2(np.abs(g.exact.hi[g.exact.hi != 0])) for g in grads}
    logs = {name: v for name, v in logs.items() if v.size}
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.45 * max(1, len(logs))))
    if logs:
        lo = min(float(v.min()) for v in logs.values())
        hi = max(float(v.max()) for v in logs.values())
        bins = np.arange(math.floor(lo) - 1, math.ceil(hi) + 2, 1.0)
        for row, v in enumerate(logs.values()):
            counts, edges = np.histogram(v, bins=bins)
            scale = 0.8 / max(1, counts.max())
            ax.bar(
                edges[:-1],
                counts * scale,
                width=1.0,
                bottom=row - 0.4,
                align="edge",
                color="#4a7ab5",
                edgecolor="none",
            )
        span = (bins[0] - 4, bins[-1] + 4)
        off = []
        for i, (p, fmt) in enumerate(fmts):
            for what, value, style in (
                ("smallest subnormal", fmt.smallest_subnormal, ":"),
                ("smallest normal", fmt.smallest_normal, "--"),
                ("max", fmt.max, "-"),
            ):
                x = math.log2(value)
                if span[0] <= x <= span[1]:
                    ax.axvline(x, linestyle=style, color=f"C{i + 1}", label=p)
                elif what != "max" or x < span[0]:
                    off.append(f"{p} {what} 2^{x:.0f}")
        if off:  # thresholds beyond the data's range, named rather than drawn
            ax.text(
                0.99,
                0.02,
                "off the plot: " + ", ".join(off),
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=6,
                color="#555555",
                wrap=True,
            )
        ax.set_xlim(*span)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=False))
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left")
    ax.set_yticks(range(len(logs)), list(logs))
    ax.set_ylim(-0.6, max(1, len(logs)) - 0.4)
    ax.set_xlabel(
        "log2 |exact gradient|  (dotted: smallest subnormal, dashed: smallest normal, solid: max)"
    )
    ax.set_title(f"{network}: exact gradient magnitudes per parameter")
    fig.tight_layout()
    save_png(fig, path)


def verdict_bars_figure(
    network: str, precisions: list[str], grads: list[GradColumns], path: Path
) -> None:
    """One stacked bar per parameter and precision: its gradient's verdict counts."""
    from fpgrad.present.report.plots import plt, save_png

    labels, counts = [], []
    for g in grads:
        for p in precisions:
            labels.append(f"{g.param} {p}")
            counts.append(g.counts(p))
    n = len(labels)
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.28 * n))
    left = np.zeros(n)
    for i, v in enumerate(VERDICTS):
        widths = np.array([float(cnt[i]) for cnt in counts])
        if widths.any():
            ax.barh(range(n), widths, left=left, color=_COLOURS.get(v, "#999999"), label=v)
            left += widths
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("gradient elements")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{network}: gradient verdicts per parameter and precision")
    fig.tight_layout()
    save_png(fig, path)


def _signal(c: Comparison, path: Path) -> None:
    """Share of each tensor's elements that are rounding zeros (solid) and subnormal (dashed),
    forward from the input, then backward from the loss: where the signal died."""
    from fpgrad.present.render import signal_indices
    from fpgrad.present.report.plots import plt, save_png

    keep = signal_indices(c)[:40] or [0]
    precisions = [p for p in c.precisions if c.attribution[p]["places"]]  # fused LSTM: none
    places = [c.attribution[precisions[0]]["places"][j] for j in keep] if precisions else []
    labels = [f"{r['direction'][:3]} {r['layer']} {r['quantity']}" for r in places]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for i, p in enumerate(precisions):
        rows = [c.attribution[p]["places"][j] for j in keep]
        size = np.array([max(1, r["size"]) for r in rows], dtype=float)
        rz = np.array([r["rounding_zero"] for r in rows]) / size
        sub = np.array([r["subnormal"] for r in rows]) / size
        ax.plot(range(len(rows)), 100 * rz, "-o", color=f"C{i}", label=f"{p}: rounding zeros")
        ax.plot(range(len(rows)), 100 * sub, "--s", color=f"C{i}", label=f"{p}: subnormal")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("% of the tensor's elements")
    ax.legend(fontsize=7)
    ax.set_title(f"{c.network}: where the signal died (forward, then backward from the loss)")
    fig.tight_layout()
    save_png(fig, path)
