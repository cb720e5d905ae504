"""Plots (matplotlib, Agg, PNG without timestamps) drawn from result objects."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fpgrad.formats import get_format  # noqa: E402

if TYPE_CHECKING:
    from fpgrad.compare import Comparison

_MARKERS = {
    "ok": "o",
    "subnormal": "s",
    "rounding_zero": "x",
    "overflow": "^",
    "nan": "v",
    "wrong_sign": "D",
    "spurious_nonzero": "+",
}


def save_png(fig: plt.Figure, path: Path) -> None:
    """Save without metadata that changes between runs, so the gallery is bit-identical."""
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def gradient_magnitudes(c: Comparison, path: Path) -> None:
    """log2 |exact gradient| per element, one row per precision, marked by verdict,
    with each format's smallest subnormal and smallest normal drawn."""
    precs = c.precisions
    mags = [math.log2(abs(float(g["exact"]))) for g in c.gradients if float(g["exact"]) != 0]
    low = min([*mags, math.log2(get_format("float16").smallest_subnormal)]) - 3
    high = max([*mags, 0.0]) + 3
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * len(precs)))
    for row, p in enumerate(precs):
        for verdict, marker in _MARKERS.items():
            xs = [
                math.log2(abs(float(g["exact"])))
                for g in c.gradients
                if g[p]["verdict"] == verdict and float(g["exact"]) != 0
            ]
            if xs:
                ax.scatter(
                    xs,
                    [row] * len(xs),
                    marker=marker,
                    label=verdict,
                    color=f"C{list(_MARKERS).index(verdict)}",
                    s=30,
                )
        fmt = get_format(p)
        for value, style in ((fmt.smallest_subnormal, ":"), (fmt.smallest_normal, "--")):
            if not low <= math.log2(value) <= high:
                continue  # off the plotted range (e.g. float64's 2^-1074)
            ax.plot([math.log2(value)] * 2, [row - 0.4, row + 0.4], style, color="grey")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper left", fontsize=7, ncol=4)
    ax.set_yticks(range(len(precs)), precs)
    ax.set_ylim(-0.6, len(precs) - 0.4 + 0.6)
    ax.set_xlim(low, high)
    ax.set_xlabel("log2 |exact gradient|  (dotted: smallest subnormal, dashed: smallest normal)")
    ax.set_title(f"{c.network}: gradient verdicts by exact magnitude")
    fig.tight_layout()
    save_png(fig, path)


def training_plots(r, out_dir: str | Path) -> list[str]:  # noqa: ANN001 - a TrainResult
    """loss.png (log scale, with the exact run), distance.png, swamped.png in ``out_dir``."""
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.arange(len(r.exact.loss))
    ax.plot(steps, np.maximum(r.exact.loss, 1e-300), "k-", lw=2.5, label="exact")
    for label in r.runs:
        loss = np.asarray(r.histories[label].loss, dtype=float)
        ax.plot(steps, np.where(loss > 0, loss, np.nan), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{r.network}: loss per precision")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "loss.png")
    written.append(str(out / "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for label in r.runs:
        d = np.asarray(r.distance[label], dtype=float)
        ax.plot(np.arange(len(d)), np.where(d > 0, d, np.nan), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||w - w_exact|| / max(||w_exact||, ||w_0||)")
    ax.set_title(f"{r.network}: distance to the exact run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "distance.png")
    written.append(str(out / "distance.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for label in r.runs:
        h = r.histories[label]
        frac = [s / u if u else 0.0 for s, u in zip(h.swamped, h.updated, strict=True)]
        ax.plot(np.arange(1, len(frac) + 1), frac, label=label)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("swamped updates / requested updates")
    ax.set_title(f"{r.network}: swamped updates (w + update == w)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out / "swamped.png")
    written.append(str(out / "swamped.png"))
    return written
