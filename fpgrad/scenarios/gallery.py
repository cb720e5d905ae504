"""Write the gallery: one Markdown report per scenario (tables, PNG figures, the computed
verdict) and one self-contained HTML index with the images embedded.

Content is deterministic (fixed seeds, no timestamps or paths), so the committed gallery is
regenerated bit-identically by ``make report``.
"""

from __future__ import annotations

import base64
import html
import sys
from pathlib import Path

from fpgrad import scenarios
from fpgrad.errors import InputError
from fpgrad.present.report.markdown import escape_cell
from fpgrad.present.report.outdir import check_out_dir
from fpgrad.scenarios.base import ScenarioResult


def _names(only: str | None) -> list[str]:
    known = scenarios.available()
    if not only:
        return known
    names = [n.strip() for n in only.split(",") if n.strip()]
    for n in names:
        if n not in known:
            raise InputError(f"unknown scenario {n!r}; known: {', '.join(known)} (see fpgrad list)")
    return names


def _writable(out: Path) -> None:
    check_out_dir(out)


def write_reports(
    out: str | Path, only: str | None = None, progress: bool | None = None
) -> list[str]:
    """Write the gallery into ``out``; returns the names of scenarios that failed (their
    reports say why; the others are written all the same)."""
    out = Path(out)
    names = _names(only)
    _writable(out)
    if progress is None:
        progress = sys.stderr.isatty()
    failures: list[str] = []
    results: list[tuple[str, ScenarioResult | None, str]] = []
    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="fpgrad report", unit="scenario")
    for name in iterator:
        try:
            result = scenarios.get(name).run()
            for fname, draw in result.figures.items():
                draw(out / fname)
            (out / f"{name}.md").write_text(result.markdown())
            results.append((name, result, ""))
        except Exception as exc:  # noqa: BLE001 - a failed scenario is reported, others go on
            failures.append(name)
            message = f"{type(exc).__name__}: {exc}"
            (out / f"{name}.md").write_text(f"# {name}\n\n**This scenario failed:** {message}\n")
            results.append((name, None, message))
    if only is None:
        (out / "index.html").write_text(_index_html(out, results))
        (out / "README.md").write_text(_index_md(results))
    return failures


def _status(result: ScenarioResult | None) -> str:
    if result is None:
        return "FAILED"
    return {True: "holds", False: "fails", None: "depends"}[result.holds]


def _index_md(results: list[tuple[str, ScenarioResult | None, str]]) -> str:
    lines = [
        "# fpgrad gallery",
        "",
        "Each report tests one claim about zero gradients; verdicts are computed.",
        "",
        "| scenario | claim | verdict |",
        "| --- | --- | --- |",
    ]
    for name, result, error in results:
        claim = result.claim if result else ""
        verdict = f"**{_status(result)}**: " + (result.verdict if result else error)
        lines.append(f"| [{name}]({name}.md) | {escape_cell(claim)} | {escape_cell(verdict)} |")
    return (
        "\n".join(lines) + "\n\nOpen index.html in a browser for the reports with their figures.\n"
    )


def _index_html(out: Path, results: list[tuple[str, ScenarioResult | None, str]]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'><title>fpgrad gallery</title>",
        "<style>body{font-family:sans-serif;max-width:62em;margin:2em auto;padding:0 1em}"
        "img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}"
        ".holds{color:#060}.fails{color:#a00}.depends{color:#850}.FAILED{color:#a00}</style>",
        "</head><body><h1>fpgrad gallery</h1>",
        "<p>Each scenario tests one claim about zero gradients against exact arithmetic; "
        "every verdict is computed from the results.</p><ul>",
    ]
    for name, result, _ in results:
        parts.append(
            f"<li><a href='#{esc(name)}'>{esc(name)}</a> "
            f"<span class='{_status(result)}'>({_status(result)})</span></li>"
        )
    parts.append("</ul>")
    for name, result, error in results:
        parts.append(f"<section id='{esc(name)}'><h2>{esc(name)}</h2>")
        if result is None:
            parts.append(f"<p class='FAILED'>This scenario failed: {esc(error)}</p></section>")
            continue
        parts.append(f"<p><b>Claim.</b> {esc(result.claim)}</p>")
        parts.append(
            f"<p><b>Verdict (<span class='{_status(result)}'>{_status(result)}</span>).</b> "
            f"{esc(result.verdict)}</p>"
        )
        parts.append(f"<p><b>Setup.</b> {esc(result.setup)}</p>")
        for sec in result.sections:
            parts.append(f"<h3>{esc(sec.title)}</h3>")
            if sec.text:
                parts.append(f"<p>{esc(sec.text)}</p>")
            if sec.rows is not None:
                head = "".join(f"<th>{esc(str(h))}</th>" for h in (sec.headers or []))
                body = "".join(
                    "<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>"
                    for row in sec.rows
                )
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
            if sec.figure:
                data = base64.b64encode((out / sec.figure).read_bytes()).decode("ascii")
                parts.append(
                    f"<p><img alt='{esc(sec.title)}' src='data:image/png;base64,{data}'></p>"
                )
        parts.append(f"<p><a href='{esc(name)}.md'>{esc(name)}.md</a></p></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
