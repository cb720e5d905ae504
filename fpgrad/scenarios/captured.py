"""Shared by the gallery's captured-model scenarios: run :func:`fpgrad.graph.compare.compare_graph`
on a torch model with precisions and policies, and tabulate where the first inf or NaN
appeared in each column and what the gradients' verdicts were."""

from __future__ import annotations

from typing import Any

from fpgrad.graph.compare import GraphComparison
from fpgrad.run.runlog import HOW
from fpgrad.scenarios.base import Section

HEADERS = [
    "column", "ran", "first inf/NaN (module (op))", "gradients NaN", "gradients inf",
    "ok", "wrong sign", "inaccurate", "gradients computed in",
]  # fmt: skip


def _ran(result: GraphComparison, p: str) -> str:
    if p in result.policies:
        return str(result.policies[p]["ran"])
    return HOW["native"] if result.kinds[p] == "native" else HOW["emulated"]


def column_data(result: GraphComparison) -> dict[str, dict[str, Any]]:
    """Per column: how it ran, the first op with inf/NaN, verdict counts, gradient formats."""
    out = {}
    for p in result.precisions:
        c = result.counts(p)
        fmts = sorted(set(result.formats[p].values()))
        out[p] = {
            "ran": _ran(result, p),
            "first_nonfinite": result.first_nonfinite[p],
            "nan": c["nan"],
            "overflow": c["overflow"],
            "ok": c["ok"],
            "wrong_sign": c["wrong_sign"],
            "inaccurate": c.get("inaccurate", 0),
            "gradients": sum(c.values()),
            "gradient_formats": fmts,
            "loss": result.loss[p],
        }
    return out


def column_rows(data: dict[str, dict[str, Any]]) -> list[list[Any]]:
    return [
        [p, d["ran"], d["first_nonfinite"] or "none", d["nan"], d["overflow"], d["ok"],
         d["wrong_sign"], d["inaccurate"], ", ".join(d["gradient_formats"])]
        for p, d in data.items()
    ]  # fmt: skip


def clean(d: dict[str, Any]) -> bool:
    """No op produced inf or NaN and no gradient is inf or NaN."""
    return d["first_nonfinite"] is None and d["nan"] == 0 and d["overflow"] == 0


def columns_section(data: dict[str, dict[str, Any]]) -> Section:
    """The table of where the first inf appeared in each column, with the gradients' verdicts."""
    return Section(
        "Where the first inf appears, per column",
        "Gradient verdicts against the certified exact gradients; each gradient judged in "
        "the dtype torch computed it in.",
        HEADERS,
        column_rows(data),
    )
