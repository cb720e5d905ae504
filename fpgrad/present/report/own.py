"""A report of a user's own model: ``fpgrad compare NET --out DIR`` (and ``advise --out``).

Writes ``compare.md`` (the diagnosis and the tables), ``compare.html`` (the same, self-contained,
the figures embedded), three PNG figures, ``compare.json`` (every element, written streaming)
and ``gradients.npz`` (the per-element arrays, columnar: numpy and pandas read them directly).
It reads a :class:`~fpgrad.diagnose.comparison.Comparison` only, so any network that compare takes (a TOML
network, a model file, a captured torch model) gets the same report.

Its figures are drawn by :mod:`fpgrad.present.report.own_figures`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fpgrad.diagnose.verdicts import SUBKINDS, VERDICTS
from fpgrad.present.report.markdown import md_table
from fpgrad.present.report.outdir import check_out_dir
from fpgrad.present.report.own_figures import (
    _formats,
    _signal,
    magnitudes_figure,
    verdict_bars_figure,
)

if TYPE_CHECKING:
    from fpgrad.diagnose.advisor import Advice
    from fpgrad.diagnose.result import Comparison, GradColumns
    from fpgrad.training import TrainResult

__all__ = [
    "check_out_dir",
    "magnitudes_figure",
    "save_columns",
    "verdict_bars_figure",
    "write_advise_report",
    "write_compare_report",
    "write_npz",
]


def write_npz(c: Comparison, path: Path) -> None:
    """The per-element arrays of ``c`` (see :func:`save_columns`)."""
    save_columns(c.precisions, c.grads, path)


def save_columns(precisions: list[str], grads: list[GradColumns], path: Path) -> None:
    """The per-element arrays: ``PARAM/exact_hi``, ``exact_lo`` (the exact value is their sum,
    double-double), ``exact_zero``, ``exact_digits`` (certified), and per precision
    ``PARAM/PRECISION/value``, ``verdict`` (uint8 index into the array ``verdicts``), ``kind``
    (index into ``kinds``: "", underflow, lost), ``rel_err``, ``ulps``, ``digits``."""
    arrays: dict[str, np.ndarray] = {
        "verdicts": np.array(VERDICTS),
        "kinds": np.array(SUBKINDS),
        "precisions": np.array(precisions),
    }
    for g in grads:
        arrays[f"{g.param}/exact_hi"] = g.exact.hi
        arrays[f"{g.param}/exact_lo"] = g.exact.lo
        arrays[f"{g.param}/exact_zero"] = g.exact.zero
        arrays[f"{g.param}/exact_digits"] = g.digits
        for p in precisions:
            col = g.cols[p]
            for name, a in (
                ("value", col.value),
                ("verdict", col.code),
                ("kind", col.kind),
                ("rel_err", col.rel_err),
                ("ulps", col.ulps),
                ("digits", col.digits),
            ):
                arrays[f"{g.param}/{p}/{name}"] = np.asarray(a)
    np.savez(path, **arrays)  # type: ignore[arg-type]  # uncompressed: zlib would dominate


def _figures(c: Comparison) -> dict[str, tuple[str, Callable[[Path], None]]]:
    return {
        "magnitudes.png": (
            "Exact gradient magnitudes per parameter against each format's thresholds",
            lambda path: magnitudes_figure(c.network, c.grads, _formats(c), path),
        ),
        "verdicts.png": (
            "Verdict counts per parameter and precision",
            lambda path: verdict_bars_figure(c.network, c.precisions, c.grads, path),
        ),
        "signal.png": (
            "Where the signal died along the network",
            lambda path: _signal(c, path),
        ),
    }


def write_compare_report(c: Comparison, out: str | Path) -> list[str]:
    """Write the report into ``out`` (checked writable first); returns the paths written."""
    out = check_out_dir(out)
    figures = _figures(c)
    for fname, (_, draw) in figures.items():
        draw(out / fname)
    sections = _sections(c)
    (out / "compare.md").write_text(_markdown(c, sections, figures))
    (out / "compare.html").write_text(_html(c, sections, figures, out))
    with (out / "compare.json").open("w") as fp:
        c.write_json(fp)
    write_npz(c, out / "gradients.npz")
    names = ["compare.md", "compare.html", *figures, "compare.json", "gradients.npz"]
    return [str(out / n) for n in names]


# ---- content: sections of (title, text, headers, rows) shared by Markdown and HTML ----------


def _sections(c: Comparison) -> list[tuple[str, str, list[str], list[list[Any]]]]:
    from fpgrad.present.render import (
        _loss_cell,
        element_rows,
        fmt_value,
        parameter_rows,
        select_rows,
        signal_rows,
    )

    out = []
    loss_rows = [["exact", c.loss["exact"], ""]]
    loss_rows += [[p, fmt_value(c.loss[p]["value"]), _loss_cell(c.loss[p])] for p in c.precisions]
    out.append(("Loss", "", ["precision", "loss", "verdict"], loss_rows))
    shown = [v for v in VERDICTS if any(c.summary[p][v] for p in c.precisions)] or ["ok"]
    rows = [[p, *(c.summary[p][v] for v in shown), c.policies[p]["summary"]] for p in c.precisions]
    title = "Gradient verdicts (counts)" + (
        f", loss scale {c.loss_scale:g}" if c.loss_scale != 1 else ""
    )
    out.append((title, "", ["precision", *shown, "policy"], rows))
    heads, prow = parameter_rows(c)
    out.append(
        (
            "Per parameter",
            "Counts per verdict, the range of the non-zero exact magnitudes, and how many of "
            "them lie below the format's smallest normal.",
            heads,
            prow,
        )
    )
    chosen, total = select_rows(c, 60)
    erows = element_rows(c, chosen)
    more = total - len(erows)
    out.append(
        (
            "Gradient elements (the rows that matter first)",
            "Rounding zeros, overflows, NaN, wrong signs and inaccurate values before subnormals, "
            "ok values and structural zeros"
            + (f"; {more} more rows in compare.json and gradients.npz." if more else "."),
            ["gradient", "exact", *c.precisions],
            erows,
        )
    )
    att_rows, hidden = signal_rows(c, 60)
    out.append(
        (
            "Where the signal died",
            (
                "Counts per op output with a count (captured model)"
                if c.kinds
                else "Counts per tensor"
            )
            + ": rounding zeros / subnormals / overflows."
            + (f" {hidden} more in compare.json." if hidden else ""),
            ["tensor", "produced by", *c.precisions],
            att_rows,
        )
    )
    return out


def _intro(c: Comparison) -> list[str]:
    from fpgrad.present.render import exact_method_text, findings_lines

    lines = [
        f"Reference: {c.reference}; exact = {exact_method_text(c.exact_method, c.working_bits)}, "
        f"certified {c.certified_digits:.1f} significant digits.",
    ]
    lines += [f"Note: {n}." for n in c.notes[1:]]
    return [*lines, "", "## Diagnosis", "", *findings_lines(c)]


def _markdown(
    c: Comparison,
    sections: list[tuple[str, str, list[str], list[list[Any]]]],
    figures: dict[str, tuple[str, Any]],
) -> str:
    parts = [f"# fpgrad compare: {c.network}", "", *_intro(c), ""]
    for title, text, heads, rows in sections:
        parts += [f"## {title}", ""]
        if text:
            parts += [text, ""]
        parts += [md_table(rows, heads), ""]
    parts += ["## Figures", ""]
    for fname, (title, _) in figures.items():
        parts += [f"![{title}]({fname})", ""]
    parts += [
        "Every element: compare.json (strict JSON) and gradients.npz (numpy arrays per tensor).",
        "",
    ]
    return "\n".join(parts)


def _html(
    c: Comparison,
    sections: list[tuple[str, str, list[str], list[list[Any]]]],
    figures: dict[str, tuple[str, Any]],
    out: Path,
) -> str:
    from fpgrad.present.render import exact_method_text

    esc = html.escape
    paragraphs = [
        f"Reference: {c.reference}; exact = {exact_method_text(c.exact_method, c.working_bits)}, "
        f"certified {c.certified_digits:.1f} significant digits.",
        *(f"Note: {n}." for n in c.notes[1:]),
    ]
    items = []
    for f in c.findings:
        text = esc(f["text"])
        if f.get("command"):
            command = f["command"].replace("{net}", c.source)
            text += f"; check: <code>{esc(command)}</code>"
        items.append(("<b>remedy:</b> " if f["kind"] == "remedy" else "") + text)
    return html_page(f"fpgrad compare: {c.network}", paragraphs, items, sections, figures, out)


def html_page(
    title: str,
    paragraphs: list[str],
    diagnosis: list[str],
    sections: list[tuple[str, str, list[str], list[list[Any]]]],
    figures: dict[str, tuple[str, Any]],
    out: Path,
    preformatted: str = "",
) -> str:
    """A self-contained HTML page: paragraphs (plain text), a diagnosis list (HTML items),
    tables, text shown as is (``preformatted``), and the figures embedded as data URIs."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        f"<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}code{background:#f4f4f4}"
        "</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    parts += [f"<p>{esc(p)}</p>" for p in paragraphs]
    if diagnosis:
        parts.append("<h2>Diagnosis</h2><ul>")
        parts += [f"<li>{item}</li>" for item in diagnosis]
        parts.append("</ul>")
    for name, text, heads, rows in sections:
        parts.append(f"<h2>{esc(name)}</h2>")
        if text:
            parts.append(f"<p>{esc(text)}</p>")
        head = "".join(f"<th>{esc(str(h))}</th>" for h in heads)
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(str(x))}</td>" for x in row) + "</tr>" for row in rows
        )
        parts.append(f"<table><tr>{head}</tr>{body}</table>")
    if preformatted:
        parts.append(f"<pre>{esc(preformatted)}</pre>")
    parts.append("<h2>Figures</h2>")
    for fname, (caption, _) in figures.items():
        data = base64.b64encode((out / fname).read_bytes()).decode("ascii")
        parts.append(f"<h3>{esc(caption)}</h3>")
        parts.append(f"<p><img alt='{esc(caption)}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_advise_report(adv: Advice, out: str | Path) -> list[str]:
    """``fpgrad advise --out DIR``: advise.md, advise.html (self-contained), lost_share.png
    (the lost share of exact gradients and signals per loss scale) and advise.json."""
    out = check_out_dir(out)
    figures = {
        "lost_share.png": (
            f"Lost share per loss scale in {adv.format}",
            lambda path: _lost_share(adv, path),
        )
    }
    for fname, (_, draw) in figures.items():
        draw(out / fname)
    g, s = adv.sizes["gradients"], adv.sizes["signals"]
    paragraphs = [
        f"Exact reference: {adv.exact_method}, {adv.exact_bits} bits, "
        f"{adv.certified_digits:.1f} digits certified.",
        f"Gradients: {g['nonzero']} non-zero of {g['elements']} elements; backward signals: "
        f"{s['nonzero']} non-zero of {s['elements']}.",
    ]
    heads, rows = adv.table()
    sections = [("Per loss scale", "", heads, rows)]
    summary = adv.summary_lines()
    title = f"fpgrad advise: {adv.network} in {adv.format}"
    md = [f"# {title}", "", *paragraphs, "", "## Recommendation", ""]
    md += [f"- {line}" for line in summary]
    md += ["", "## Per loss scale", "", md_table(rows, heads), "", "## Figures", ""]
    md += [f"![{cap}]({fname})" for fname, (cap, _) in figures.items()] + [""]
    (out / "advise.md").write_text("\n".join(md))
    items = [html.escape(line) for line in summary]
    (out / "advise.html").write_text(html_page(title, paragraphs, items, sections, figures, out))
    (out / "advise.json").write_text(adv.to_json())
    return [str(out / n) for n in ("advise.md", "advise.html", *figures, "advise.json")]


def write_train_report(result: TrainResult, out: str | Path) -> list[str]:
    """``fpgrad train --out DIR``: train.md and train.html (self-contained) around the
    training tables as printed, the plots (loss, distance to exact, swamped updates) and
    train.json."""
    out = check_out_dir(out)
    pngs = [Path(p).name for p in result.plot(str(out))]
    captions = {
        "loss.png": "Loss per step, and the exact loss at each run's parameters",
        "distance.png": "Relative distance of each run's parameters from the exact run",
        "swamped.png": "Share of swamped updates per step",
    }
    figures = {name: (captions.get(name, name), None) for name in pngs}
    text = result.render()
    title = f"fpgrad train: {result.network}"
    md = [f"# {title}", "", "```", text, "```", "", "## Figures", ""]
    md += [f"![{cap}]({fname})" for fname, (cap, _) in figures.items()] + [""]
    (out / "train.md").write_text("\n".join(md))
    page = html_page(title, [], [], [], figures, out, preformatted=text)
    (out / "train.html").write_text(page)
    (out / "train.json").write_text(result.to_json())
    return [str(out / n) for n in ("train.md", "train.html", *pngs, "train.json")]


def _lost_share(adv: Advice, path: Path) -> None:
    """Per power of two: the share of non-zero exact gradients that underflow or are
    subnormal, of backward signals that underflow, and (measured) torch's rounding zeros;
    overflows marked; the recommended scale and the safe range drawn."""
    from fpgrad.present.report.plots import plt, save_png

    g, s = adv.sizes["gradients"], adv.sizes["signals"]
    ks = np.array([r["exponent"] for r in adv.rows])

    def share(values: list[int], n: int) -> np.ndarray:
        return 100 * np.asarray(values, dtype=float) / max(1, n)

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(
        ks,
        share([r["gradients"]["underflow"] for r in adv.rows], g["nonzero"]),
        "-o",
        label="gradients underflow (exact)",
    )
    ax.plot(
        ks,
        share([r["gradients"]["subnormal"] for r in adv.rows], g["nonzero"]),
        "--s",
        label="gradients subnormal (exact)",
    )
    ax.plot(
        ks,
        share([r["signals"]["underflow"] for r in adv.rows], s["nonzero"]),
        ":^",
        label="signals underflow (exact)",
    )
    measured = [r.get("measured") for r in adv.rows]
    if any(measured):
        mk = [k for k, m in zip(ks, measured, strict=True) if m]
        mv = [m["rounding_zero"] for m in measured if m]
        ax.plot(mk, share(mv, g["nonzero"]), "-x", label="torch: rounding zeros (measured)")
    over = [k for k, r in zip(ks, adv.rows, strict=True) if _overflows(r)]
    if over:
        ax.scatter(over, [100] * len(over), marker="v", color="black", label="overflow")
    if adv.safe is not None:
        ax.axvspan(
            adv.safe[0] - 0.5, adv.safe[1] + 0.5, color="#4daf4a", alpha=0.15, label="safe range"
        )
    ax.axvline(adv.recommended, color="#b2182b", label=f"recommended 2^{adv.recommended}")
    ax.set_xlabel("loss scale (log2)")
    ax.set_ylabel("% of non-zero exact values")
    ax.legend(fontsize=7)
    ax.set_title(f"{adv.network}: lost share per loss scale in {adv.format}")
    fig.tight_layout()
    save_png(fig, path)


def _overflows(row: dict[str, Any]) -> bool:
    from fpgrad.diagnose.advisor.scales import _overflow

    return _overflow(row) > 0
