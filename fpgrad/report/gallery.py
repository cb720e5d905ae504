"""Write one Markdown report per shipped example and a self-contained HTML index."""

from __future__ import annotations

import base64
import html
import sys
from importlib import resources
from pathlib import Path

from tabulate import tabulate

from fpgrad.compare import Comparison, compare
from fpgrad.errors import InputError
from fpgrad.netfile import load_network
from fpgrad.report.plots import gradient_magnitudes


def example_paths() -> dict[str, Path]:
    """The networks shipped in fpgrad/examples, by name."""
    root = resources.files("fpgrad") / "examples"
    return {
        p.stem: Path(str(p))
        for p in sorted(root.iterdir(), key=lambda q: q.name)
        if p.name.endswith(".toml")
    }


def write_reports(out: str | Path, only: str | None = None) -> list[str]:
    """Write the gallery into ``out``; returns the names of reports that failed."""
    out = Path(out)
    examples = example_paths()
    names = list(examples)
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in examples]
        if unknown:
            raise InputError(f"unknown report {unknown[0]!r}; known: {', '.join(examples)}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fpgrad-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"cannot write to output directory {str(out)!r}: {exc.strerror}") from None
    failures: list[str] = []
    entries: list[tuple[str, str, str]] = []
    for name in names:
        print(f"fpgrad report: {name} ...", file=sys.stderr)
        try:
            result = compare(load_network(examples[name]))
            png = f"{name}.png"
            gradient_magnitudes(result, out / png)
            md = _markdown(name, examples[name], result, png)
            summary = _one_line(result)
        except Exception as exc:  # noqa: BLE001 - a failed report is written, others go on
            failures.append(name)
            md = f"# {name}\n\nThis report failed: {type(exc).__name__}: {exc}\n"
            png, summary = "", f"FAILED: {exc}"
        (out / f"{name}.md").write_text(md)
        entries.append((name, summary, png))
    (out / "index.html").write_text(_index_html(out, entries))
    return failures


def _one_line(c: Comparison) -> str:
    parts = []
    for p in c.precisions:
        s = c.summary[p]
        parts.append(f"{p}: {s['rounding_zero']} rounding zeros, {s['structural_zero']} structural")
    return "; ".join(parts)


def _markdown(name: str, path: Path, c: Comparison, png: str) -> str:
    rows = [
        [p]
        + [
            c.summary[p][v]
            for v in (
                "ok",
                "structural_zero",
                "rounding_zero",
                "rounding_zero_underflow",
                "rounding_zero_lost",
                "subnormal",
                "overflow",
                "nan",
            )
        ]
        for p in c.precisions
    ]
    heads = [
        "precision",
        "ok",
        "structural 0",
        "rounding 0",
        "underflow",
        "lost",
        "subnormal",
        "overflow",
        "nan",
    ]
    lines = [
        f"# {name}: gradients in every precision against the exact ones",
        "",
        f"Network file: `fpgrad/examples/{path.name}`. Regenerate with `fpgrad report --only {name}`.",
        "",
        f"Exact reference: mpmath at {c.exact_bits} bits, certified to {c.certified_digits:.1f} "
        f"significant digits (checked at {2 * c.exact_bits} bits); reference point: {c.reference}.",
        "",
        "## Verdict counts",
        "",
        tabulate(rows, headers=heads, tablefmt="github"),
        "",
        f"![gradient magnitudes]({png})",
        "",
        "## Full comparison",
        "",
        "```",
        c.render(max_rows=None),
        "```",
        "",
    ]
    return "\n".join(lines)


def _index_html(out: Path, entries: list[tuple[str, str, str]]) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>fpgrad reports</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}img{max-width:100%}</style>",
        "</head><body><h1>fpgrad reports</h1>",
    ]
    for name, summary, png in entries:
        parts.append(f"<h2><a href='{html.escape(name)}.md'>{html.escape(name)}</a></h2>")
        parts.append(f"<p>{html.escape(summary)}</p>")
        if png:
            data = base64.b64encode((out / png).read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
