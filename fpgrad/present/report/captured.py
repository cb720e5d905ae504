"""A report of a captured torch model: ``fpgrad compare script.py:build --out DIR``.

Writes ``compare.md``, ``compare.html`` (self-contained, the figures embedded), ``magnitudes.png``
and ``verdicts.png``, ``compare.json`` (as ``--json``) and ``gradients.npz`` (the same keys as
for layer networks) from a :class:`~fpgrad.graph.compare.GraphComparison`, with the figures,
page and npz writer of :mod:`fpgrad.present.report.own`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fpgrad.diagnose.verdicts import VERDICTS
from fpgrad.present.report.markdown import md_table
from fpgrad.present.report.outdir import check_out_dir
from fpgrad.present.report.own import (
    html_page,
    magnitudes_figure,
    save_columns,
    verdict_bars_figure,
)

if TYPE_CHECKING:
    from fpgrad.diagnose.comparison import GradColumns
    from fpgrad.graph.compare import GraphComparison

__all__ = ["columns", "write_graph_report"]

Section = tuple[str, str, list[str], list[list[Any]]]


def columns(gc: GraphComparison) -> list[GradColumns]:
    """The comparison as one :class:`~fpgrad.diagnose.comparison.GradColumns` per parameter (arrays shared,
    not copied)."""
    from fpgrad.diagnose.comparison import Column, GradColumns

    arrays = gc.exact.arrays
    out = []
    for name in gc.exact.trace.grads:
        key = f"grads/{name}"
        cols = {}
        for p in gc.precisions:
            v = gc.verdicts[p][name]
            assert v.code is not None and v.kind is not None
            value = np.asarray(gc.grads[p][name], dtype=np.float64)
            cols[p] = Column(value, v.code, v.kind, v.rel_err, v.ulps, v.digits)
        ex = arrays[key]
        out.append(GradColumns(name, tuple(np.shape(ex.hi)), ex, gc.exact.digits[key], cols))
    return out


def write_graph_report(gc: GraphComparison, out: str | Path) -> list[str]:
    """Write the report into ``out`` (checked writable first); returns the paths written."""
    from fpgrad.numbers.formats import get_format

    out = check_out_dir(out)
    grads = columns(gc)
    fmts = [(p, get_format(gc.format_of(p))) for p in gc.precisions]
    figures: dict[str, tuple[str, Callable[[Path], None]]] = {
        "magnitudes.png": (
            "Exact gradient magnitudes per parameter against each format's thresholds",
            lambda path: magnitudes_figure(gc.network, grads, fmts, path),
        ),
        "verdicts.png": (
            "Verdict counts per parameter and precision",
            lambda path: verdict_bars_figure(gc.network, gc.precisions, grads, path),
        ),
    }
    for fname, (_, draw) in figures.items():
        draw(out / fname)
    sections = _sections(gc, grads)
    title = f"fpgrad compare: {gc.network}"
    paragraphs = [
        f"Captured torch model; exact = {gc.exact.method}, certified "
        f"{gc.exact.certified_digits:.1f} significant digits.",
        *(f"Note: {n}." for n in gc.notes),
    ]
    lost = [(p, where) for p, where in gc.first_lost.items() if where]
    died = [f"{p}: the first op computing 0 where the exact value is not: {w}" for p, w in lost]
    md = [f"# {title}", "", *paragraphs, ""]
    if died:
        md += [
            "## Diagnosis",
            "",
            *(
                f"- {p}: the first op computing 0 where the exact value is not: `{w}`"
                for p, w in lost
            ),
            "",
        ]
    for name, text, heads, rows in sections:
        md += [f"## {name}", ""] + ([text, ""] if text else []) + [md_table(rows, heads), ""]
    md += ["## Figures", "", *(f"![{cap}]({fname})\n" for fname, (cap, _) in figures.items())]
    md += ["Every element: gradients.npz (numpy arrays per tensor); counts: compare.json.", ""]
    (out / "compare.md").write_text("\n".join(md))
    (out / "compare.html").write_text(
        html_page(title, paragraphs, [html.escape(d) for d in died], sections, figures, out)
    )
    (out / "compare.json").write_text(gc.to_json() + "\n")
    save_columns(gc.precisions, grads, out / "gradients.npz")
    names = ["compare.md", "compare.html", *figures, "compare.json", "gradients.npz"]
    return [str(out / n) for n in names]


def _sections(gc: GraphComparison, grads: list[GradColumns]) -> list[Section]:
    from fpgrad.graph.compare import decimal_string_of
    from fpgrad.present.render import fmt_value

    loss_rows = [["exact", decimal_string_of(gc.exact)]]
    loss_rows += [[p, fmt_value(gc.loss[p])] for p in gc.precisions]
    counts = {p: gc.counts(p) for p in gc.precisions}
    shown = [v for v in VERDICTS if any(counts[p][v] for p in gc.precisions)] or ["ok"]
    rows = [
        [p, gc.kinds[p], *(counts[p][v] for v in shown), gc.first_nonfinite[p] or "-"]
        for p in gc.precisions
    ]
    prow = []
    for g in grads:
        mags = np.abs(g.exact.hi[g.exact.hi != 0])  # undetermined: hi = 0
        span = (
            f"2^{math.floor(math.log2(mags.min()))} .. 2^{math.floor(math.log2(mags.max()))}"
            if mags.size
            else "-"
        )
        for p in gc.precisions:
            n = g.counts(p)
            prow.append([g.param, p, g.size, *(int(n[VERDICTS.index(v)]) for v in shown), span])
    return [
        ("Loss", "", ["precision", "loss"], loss_rows),
        (
            "Gradient verdicts (counts)",
            "",
            ["precision", "ran", *shown, "first inf/nan"],
            rows,
        ),
        (
            "Per parameter",
            "Counts per verdict and the range of the non-zero exact magnitudes.",
            ["parameter", "precision", "elements", *shown, "exact |g|"],
            prow,
        ),
    ]
