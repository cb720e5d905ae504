"""Markdown tables whose cells are escaped, so every row keeps its number of cells."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def escape_cell(value: Any) -> Any:
    """A table cell with ``|`` escaped and line breaks joined; numbers pass unchanged (tabulate
    aligns and formats them).

    >>> escape_cell("|w - 0.3|")
    '\\\\|w - 0.3\\\\|'
    """
    if isinstance(value, str):
        return value.replace("\\|", "|").replace("|", "\\|").replace("\n", " ")
    return value


def md_table(rows: Sequence[Sequence[Any]], headers: Sequence[Any]) -> str:
    """A GitHub Markdown table (tabulate's ``github`` format) with escaped cells."""
    return tabulate(
        [[escape_cell(c) for c in row] for row in rows],
        headers=[escape_cell(h) for h in headers],
        tablefmt="github",
    )


def table_cells(line: str) -> list[str]:
    """The cells of one Markdown table row (split at unescaped ``|``)."""
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return _UNESCAPED_PIPE.split(inner)


def tables(text: str) -> list[list[list[str]]]:
    """Every table of a Markdown text (runs of lines starting with ``|``, outside code fences),
    as rows of cells."""
    out: list[list[list[str]]] = []
    current: list[list[str]] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.lstrip().startswith("|"):
            current.append(table_cells(line))
            continue
        if current:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out
