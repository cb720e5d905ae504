"""The gallery under reports/: Markdown and a self-contained HTML index. Reads results only."""

from fpgrad.report.gallery import write_reports

__all__ = ["write_reports"]
