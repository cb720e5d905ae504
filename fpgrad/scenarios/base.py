"""What a scenario returns: the claim, the setup, sections with tables and figures, and a
verdict computed from the results (never written by hand).

A scenario module defines ``NAME``, ``CLAIM`` and ``run(small: bool = False) -> ScenarioResult``.
``small=True`` is a reduced configuration for the test suite; the verdict logic is the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fpgrad.present.report.markdown import md_table
from fpgrad.run.runlog import recording, runs_line

Figure = Callable[[Path], None]


@dataclass
class Section:
    """A titled block: Markdown text, an optional table and an optional figure file name."""

    title: str
    text: str = ""
    headers: list[str] | None = None
    rows: list[list[Any]] | None = None
    figure: str | None = None  # file name; drawn by ScenarioResult.figures[figure]

    def markdown(self) -> str:
        parts = [f"## {self.title}", ""]
        if self.text:
            parts += [self.text, ""]
        if self.rows is not None:
            parts += [md_table(self.rows, self.headers or []), ""]
        if self.figure:
            parts += [f"![{self.title}]({self.figure})", ""]
        return "\n".join(parts)


@dataclass
class ScenarioResult:
    """Everything a report shows. ``holds`` says whether the claim survived the data
    (True, False, or None for "it depends", explained in ``verdict``)."""

    name: str
    claim: str
    setup: str
    verdict: str
    holds: bool | None
    sections: list[Section] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # the numbers behind the verdict
    figures: dict[str, Figure] = field(default_factory=dict)
    #: name -> how it computed (fpgrad.run.runlog.HOW); filled by :func:`records_runs`
    runs: dict[str, str] = field(default_factory=dict)
    #: which figures of the report depend on this CPU's kernels, and how ("" when none known)
    cpu_dependent: str = ""

    def cpu_line(self) -> str:
        """The report's "CPU-dependent" paragraph."""
        if self.cpu_dependent:
            return f"**CPU-dependent.** {self.cpu_dependent}"
        native = [n for n, how in self.runs.items() if how not in ("emulated", "exact")]
        if not native:
            return "**CPU-dependent.** nothing: no run used torch's kernels."
        return (
            f"**CPU-dependent.** no figure is marked; the runs by torch's kernels "
            f"({', '.join(native)}) may round differently on another CPU."
        )

    def markdown(self) -> str:
        status = {True: "the claim holds", False: "the claim fails", None: "it depends"}[self.holds]
        parts = [
            f"# {self.name}",
            "",
            f"**Claim.** {self.claim}",
            "",
            f"**Verdict ({status}).** {self.verdict}",
            "",
            runs_line(self.runs),
            "",
            self.cpu_line(),
            "",
            "## Setup",
            "",
            self.setup,
            "",
        ]
        parts += [s.markdown() for s in self.sections]
        parts += [
            f"Regenerate with `fpgrad report --only {self.name}` (or `fpgrad run {self.name}`).",
            "",
        ]
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        from fpgrad.jsonutil import jsonable

        return jsonable(
            {
                "schema": "fpgrad.scenario/1",
                "name": self.name,
                "claim": self.claim,
                "verdict": self.verdict,
                "holds": self.holds,
                "runs": self.runs,
                "cpu_dependent": self.cpu_dependent,
                "data": self.data,
                "sections": [
                    {"title": s.title, "text": s.text, "headers": s.headers, "rows": s.rows}
                    for s in self.sections
                ],
            }
        )


def records_runs(run: Callable[..., ScenarioResult]) -> Callable[..., ScenarioResult]:
    """Decorate a scenario's ``run``: its result's ``runs`` become what it ran
    (:func:`fpgrad.run.runlog.recording`), plus any the scenario recorded itself."""

    @functools.wraps(run)
    def wrapped(*args: Any, **kwargs: Any) -> ScenarioResult:
        with recording() as runs:
            result = run(*args, **kwargs)
        result.runs = {**runs, **result.runs}
        return result

    return wrapped
