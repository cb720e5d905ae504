"""The advisor's result, :class:`Advice`, and its text and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from fpgrad.diagnose.advisor.scales import (
    _overflow,
)


@dataclass
class Advice:
    """The result of :func:`advise`: per power of two, how many values are lost; the safe range;
    the recommended static scale; what torch measures at each scale and where dynamic scaling
    settles (torch formats)."""

    network: str
    format: str
    scope: str
    headroom: int
    exact_bits: int
    exact_method: str
    certified_digits: float
    sizes: dict[str, dict[str, int]]
    log2_range: dict[str, list[float] | None]
    rows: list[dict[str, Any]]
    safe: list[int] | None
    safe_gradients: list[int] | None
    normal: list[int] | None
    recommended: int
    reason: str
    dynamic: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def recommended_scale(self) -> float:
        return math.ldexp(1.0, self.recommended)

    def row(self, exponent: int) -> dict[str, Any]:
        for r in self.rows:
            if r["exponent"] == exponent:
                return r
        raise KeyError(exponent)

    def to_dict(self) -> dict[str, Any]:
        from fpgrad.jsonutil import jsonable

        return jsonable(
            {
                "schema": "fpgrad.advise/1",
                "network": self.network,
                "format": self.format,
                "scope": self.scope,
                "headroom": self.headroom,
                "exact": {
                    "bits": self.exact_bits,
                    "method": self.exact_method,
                    "certified_digits": self.certified_digits,
                },
                "sizes": self.sizes,
                "log2_range": self.log2_range,
                "safe": self.safe,
                "safe_gradients": self.safe_gradients,
                "normal": self.normal,
                "recommended": {
                    "exponent": self.recommended,
                    "scale": self.recommended_scale,
                    "reason": self.reason,
                },
                "dynamic": self.dynamic,
                "rows": self.rows,
                "notes": self.notes,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and rows of the per-scale table (as :meth:`render` shows it)."""
        g, s = self.sizes["gradients"], self.sizes["signals"]
        measured = any(r.get("measured") for r in self.rows)
        heads = ["scale", "grads underflow", "grads subnormal", "signals underflow", "overflows"]
        if measured:
            heads += ["torch: rounding zeros", "torch: inf/NaN"]
        table = []
        for r in self.rows:
            gr, sg = r["gradients"], r["signals"]
            over = _overflow(r)
            mark = ""
            if r["exponent"] == self.recommended:
                mark = " <- recommended"
            elif self.dynamic and r["exponent"] == self.dynamic.get("settled"):
                mark = " <- dynamic"
            row = [
                f"2^{r['exponent']}{mark}",
                _share(gr["underflow"], g["nonzero"]),
                _share(gr["subnormal"], g["nonzero"]),
                _share(sg["underflow"], s["nonzero"]),
                str(over),
            ]
            if measured:
                m = r.get("measured")
                row += (
                    [
                        f"{m['rounding_zero']} ({m['underflow']} underflow, {m['lost']} lost)",
                        str(m["nonfinite"]),
                    ]
                    if m
                    else ["", ""]
                )
            table.append(row)
        return heads, table

    def summary_lines(self) -> list[str]:
        """The safe range, the recommendation and the dynamic scaler in words."""
        what = "gradient or backward signal" if self.scope == "all" else "gradient"
        lines = [
            f"Safe scales (no {what} underflows, nothing overflows): {_span(self.safe)}"
            + (f"; gradients alone: {_span(self.safe_gradients)}" if self.scope == "all" else ""),
            f"Every {what} also normal (full precision): {_span(self.normal)}",
            f"Recommended static scale: 2^{self.recommended} = {self.recommended_scale:g} "
            f"({self.reason})",
        ]
        if self.dynamic:
            d = self.dynamic
            lines.append(
                f"Dynamic scaling (GradScaler's rules, torch {self.format} at these parameters): "
                f"starts at 2^{d['start']}, skips {d['skipped']} step(s), settles at "
                f"2^{d['settled']}; {d['comparison']}"
            )
        return lines + [f"note: {n}" for n in self.notes]

    def render(self) -> str:
        from tabulate import tabulate

        g, s = self.sizes["gradients"], self.sizes["signals"]
        lines = [
            f"Loss-scale advice: {self.network} in {self.format} "
            f"(exact reference: {self.exact_method}, {self.exact_bits} bits, "
            f"{self.certified_digits:.1f} digits certified)",
            f"gradients: {g['nonzero']} non-zero of {g['elements']} elements, |exact| in "
            f"{_range_text(self.log2_range['gradients'])}",
            f"signals:   {s['nonzero']} non-zero of {s['elements']} backward values dL/d(output), "
            f"|exact| in {_range_text(self.log2_range['signals'])}; seed dL/dL = 1 (scaled: S)",
            "",
        ]
        heads, table = self.table()
        lines.append(tabulate(table, headers=heads, tablefmt="github", disable_numparse=True))
        lines.append("")
        lines += self.summary_lines()
        return "\n".join(lines)


def _range_text(r: list[float] | None) -> str:
    return "none" if r is None else f"2^{r[0]:.1f} .. 2^{r[1]:.1f}"


def _span(r: list[int] | None) -> str:
    if r is None:
        return "none"
    return f"2^{r[0]} .. 2^{r[1]}" if r[0] != r[1] else f"2^{r[0]}"


def _share(n: int, total: int) -> str:
    if n == 0:
        return "0"
    return f"{n} ({100 * n / total:.3g}%)" if total else str(n)
