"""The gallery under reports/ and reports of a user's own model: Markdown and self-contained
HTML. Reads results only."""

from __future__ import annotations

from typing import Any

__all__ = ["write_reports"]


def __getattr__(name: str) -> Any:
    # deferred: the scenarios import fpgrad.report.markdown, and the gallery imports them
    if name == "write_reports":
        from fpgrad.report.gallery import write_reports

        return write_reports
    raise AttributeError(name)
