"""Plots (matplotlib, Agg, PNG without timestamps) drawn from result objects."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fpgrad.numbers.formats import get_format  # noqa: E402

if TYPE_CHECKING:
    from fpgrad.diagnose.result import Comparison

_MARKERS = {
    "ok": "o",
    "subnormal": "s",
    "rounding_zero": "x",
    "overflow": "^",
    "nan": "v",
    "wrong_sign": "D",
    "spurious_nonzero": "+",
    "inaccurate": "*",
    "undetermined": "?",
}


def save_png(fig: plt.Figure, path: Path) -> None:
    """Save without metadata that changes between runs, so the gallery is bit-identical."""
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def gradient_magnitudes(c: Comparison, path: Path) -> None:
    """log2 |exact gradient| per element, one row per precision, marked by verdict,
    with each format's smallest subnormal and smallest normal drawn."""
    import numpy as np

    from fpgrad.diagnose.verdicts import VERDICTS

    precs = c.precisions
    nonzero = [(~g.exact.zero & ~g.exact.undetermined_mask()).ravel() for g in c.grads]
    mags = np.concatenate(
        [np.log2(np.abs(g.exact.hi.ravel()[nz])) for g, nz in zip(c.grads, nonzero, strict=True)]
        or [np.zeros(0)]
    )
    f16_tiny = math.log2(get_format("float16").smallest_subnormal)
    low = min(float(mags.min()) if mags.size else f16_tiny, f16_tiny) - 3
    high = max(float(mags.max()) if mags.size else 0.0, 0.0) + 3
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.7 * len(precs)))
    for row, p in enumerate(precs):
        codes = np.concatenate(
            [g.cols[p].code.ravel()[nz] for g, nz in zip(c.grads, nonzero, strict=True)]
            or [np.zeros(0, dtype=np.uint8)]
        )
        for verdict, marker in _MARKERS.items():
            xs = mags[codes == VERDICTS.index(verdict)]
            if xs.size:
                ax.scatter(
                    xs,
                    [row] * xs.size,
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


def _runs_figure(
    r,  # noqa: ANN001 - a TrainResult
    series: dict[str, tuple[object, object]],
    ylabel: str,
    title: str,
    path: Path,
    log: bool = True,
    exact: tuple[object, object] | None = None,
    beside: dict[str, tuple[object, object]] | None = None,
) -> str:
    """One line per run (x, y), optionally the exact run in bold and, per run, a dashed series
    with markers in the run's colour (``beside``, labelled ``RUN: exact loss at its
    parameters``); non-positive values are gaps on a log scale."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    if exact is not None:
        ax.plot(
            exact[0],
            np.maximum(np.asarray(exact[1], dtype=float), 1e-300),
            "k-",
            lw=2.5,
            label="exact",
        )
    for run, (x, y) in series.items():
        y = np.asarray(y, dtype=float)
        label = run
        if log and not np.any(y > 0):
            label += " (never > 0: off the log scale)"
        (line,) = ax.plot(x, np.where(y > 0, y, np.nan) if log else y, label=label)
        if beside and beside.get(run) is not None:
            bx, by = beside[run]
            by = np.asarray(by, dtype=float)
            ax.plot(
                bx,
                np.where(by > 0, by, np.nan) if log else by,
                "--o",
                ms=3,
                color=line.get_color(),
                label=f"{run}: exact loss at its parameters",
            )
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{r.network}: {title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    return str(path)


def training_plots(r, out_dir: str | Path) -> list[str]:  # noqa: ANN001 - a TrainResult
    """loss.png (log scale: the exact run, each run's own loss and, dashed, the exact loss at
    its parameters at the checked steps), distance.png, swamped.png in ``out_dir``."""
    import numpy as np

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = np.arange(len(r.exact.loss))
    loss = {
        label: (np.arange(len(r.histories[label].loss)), r.histories[label].loss)
        for label in r.runs
    }
    beside = {}
    for label in r.runs:
        at = sorted(r.histories[label].exact_loss_at_params.items())
        beside[label] = ([t for t, _ in at], [v for _, v in at])
    dist = {label: (np.arange(len(r.distance[label])), r.distance[label]) for label in r.runs}
    swamped = {}
    for label in r.runs:
        h = r.histories[label]
        frac = [s / u if u else 0.0 for s, u in zip(h.swamped, h.updated, strict=True)]
        swamped[label] = (np.arange(1, len(frac) + 1), frac)
    return [
        _runs_figure(
            r,
            loss,
            "loss",
            "loss per precision",
            out / "loss.png",
            exact=(steps, r.exact.loss),
            beside=beside,
        ),
        _runs_figure(
            r,
            dist,
            "||w - w_exact|| / max(||w_exact||, ||w_0||)",
            "distance to the exact run",
            out / "distance.png",
        ),
        _runs_figure(
            r,
            swamped,
            "swamped updates / requested updates",
            "swamped updates (w + update == w)",
            out / "swamped.png",
            log=False,
        ),
    ]
