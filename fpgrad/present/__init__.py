"""Presentation: text tables, the teaching view of a value, reports (Markdown, HTML, figures)."""
