"""The result of a sweep: its records, the table, JSON and CSV, and the plot."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fpgrad.sweeps.cells import COUNTS, DEFAULT_LR
from fpgrad.sweeps.grid import Grid, format_value

_SCHEMA = "fpgrad.sweep/1"


@dataclass
class SweepResult:
    """Every cell of the grid in grid order (``records``; ``status`` "pending" for cells not
    run yet), with the files written."""

    network: str
    task: str
    grid: Grid
    options: dict[str, Any]
    records: list[dict[str, Any]]
    out_dir: Path
    ran: int = 0  #: cells computed by this call
    reused: int = 0  #: cells read from cells.jsonl
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  #: damaged log lines skipped, one each

    @property
    def complete(self) -> bool:
        return all(r["status"] != "pending" for r in self.records)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Cells whose run raised (``input_error`` or ``internal_error``)."""
        return [r for r in self.records if r["status"].endswith("_error")]

    @property
    def exit_code(self) -> int:
        """1 when a cell failed with an internal error, else 0."""
        return 1 if any(r["status"] == "internal_error" for r in self.records) else 0

    def record(self, key: str) -> dict[str, Any]:
        """The record of the cell ``key`` (e.g. ``precision=float16,loss_scale=1024``)."""
        for r in self.records:
            if r["key"] == key:
                return r
        raise KeyError(key)

    def counts(self, key: str) -> dict[str, int]:
        """Verdict counts of the gradients of one cell."""
        return self.record(key)["counts"]

    def to_dict(self) -> dict[str, Any]:
        from fpgrad.jsonutil import jsonable

        return jsonable(
            {
                "schema": _SCHEMA,
                "network": self.network,
                "task": self.task,
                "options": self.options,
                "axes": {a: list(v) for a, v in self.grid.axes},
                "complete": self.complete,
                "cells": self.records,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def _columns(self) -> list[str]:
        """Count columns: the first six always, others when a cell has them."""
        seen = {k for r in self.records for k, n in r.get("counts", {}).items() if n}
        others = sorted(k for k in seen - set(COUNTS) if not k.startswith("rounding_zero_"))
        return [*COUNTS[:6], *(k for k in COUNTS[6:] if k in seen), *others]

    def rows(self) -> tuple[list[str], list[list[Any]]]:
        """Headers and one row per cell: axes, verdict counts, the task's headline values."""
        from fpgrad.present.render import fmt_value

        axes = [a for a, _ in self.grid.axes]
        counts = self._columns()
        # a captured model's cells: no loss verdict; the first op whose output holds inf/NaN
        captured = any("first_nonfinite" in r for r in self.records)
        extra = (
            ["loss", "first inf/nan" if captured else "loss verdict", "digits"]
            if self.task == "compare"
            else [
                "step",
                "loss[0]",
                "loss[end]",
                "exact loss[end]",
                "distance",
                "swamped",
                "events",
            ]
        )
        errors = any(r["status"] != "ok" for r in self.records)
        rows = []
        for r in self.records:
            row: list[Any] = [format_value(r["axes"][a]) for a in axes]
            if r["status"] != "ok":
                row += [""] * (len(counts) + len(extra))
                row.append(r.get("error") or r["status"])
                rows.append(row)
                continue
            row += [r["counts"].get(c, 0) for c in counts]
            if self.task == "compare":
                loss = r["loss"]
                row += [
                    fmt_value(_num(loss["value"])),
                    (r.get("first_nonfinite") or "-")
                    if captured
                    else loss["verdict"] + (f" ({loss['kind']})" if loss["kind"] else ""),
                    f"{_num(r['certified_digits']):.1f}",
                ]
            else:
                ev = r["events"]
                events = [
                    k.replace("_", " ") for k in ("stall", "loss_floor", "limit_cycle") if ev[k]
                ]
                events += ["chaotic"] if ev["chaotic"] else []
                if ev["first_overflow_step"] is not None:
                    events.append(f"overflow at step {ev['first_overflow_step']}")
                if r["nonfinite"]:
                    events.append("inf/nan")
                if r["skipped"]:
                    events.append(f"{r['skipped']} skipped")
                row += [
                    r["verdict_step"],
                    fmt_value(_num(r["loss"]["first"])),
                    fmt_value(_num(r["loss"]["last"])),
                    fmt_value(_num(r["loss"]["exact_last"])),
                    fmt_value(_num(r["distance"])),
                    f"{100 * _num(r['swamped']):.1f}%",
                    ", ".join(events) or "-",
                ]
            if errors:
                row.append("")
            rows.append(row)
        heads = axes + counts + extra + (["error"] if errors else [])
        return heads, rows

    def render(self) -> str:
        """The Markdown of ``sweep.md``: a heading, the configuration and one table."""
        from tabulate import tabulate

        o = self.options
        if self.task == "compare":
            what = f"exact reference {o['exact_bits']} bits, reference {o['reference']}"
        else:
            what = (
                f"{o['steps']} steps, {o['optimizer']}"
                + ("" if "lr" in self.grid.values else f" lr={DEFAULT_LR}")
                + (f" momentum={o['momentum']}" if o["momentum"] else "")
                + (f" weight_decay={o['weight_decay']}" if o["weight_decay"] else "")
                + (" (decoupled)" if o["decoupled"] else "")
                + (f", batch {o['batch_size']}" if o["batch_size"] else ", full batch")
                + f"; exact run at {o['exact_bits']} bits. Verdicts: the gradients of the "
                "last checked step against the exact gradients at the run's own parameters"
            )
        done = sum(r["status"] != "pending" for r in self.records)
        lines = [
            f"# fpgrad sweep: {self.network} ({self.task})",
            "",
            f"{len(self.records)} cells ({self.grid.describe()}), {done} done; {what}.",
            "",
        ]
        heads, rows = self.rows()
        counts = set(self._columns())  # right-aligned; the rest is text as written
        text = [i for i, h in enumerate(heads) if h not in counts]
        lines.append(tabulate(rows, headers=heads, tablefmt="github", disable_numparse=text))
        policies: dict[str, str] = {}
        for r in self.records:
            if r["status"] == "ok" and r.get("policy"):
                policies.setdefault(str(r["axes"]["precision"]), r["policy"])
        if policies:
            lines += ["", "What each precision computed in (its policy):", ""]
            lines += [f"- {p}: {text}" for p, text in policies.items()]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        axes = [a for a, _ in self.grid.axes]
        counts = sorted(
            {k for r in self.records for k in r.get("counts", {})},
            key=lambda k: (COUNTS.index(k) if k in COUNTS else len(COUNTS), k),
        )
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["key", *axes, "status", *counts, "loss", "certified_digits", "error"])
        for r in self.records:
            loss = r.get("loss", {})
            w.writerow(
                [
                    r["key"],
                    *(format_value(r["axes"][a]) for a in axes),
                    r["status"],
                    *(r.get("counts", {}).get(c, "") for c in counts),
                    loss.get("value", loss.get("last", "")),
                    r.get("certified_digits", ""),
                    r.get("error", ""),
                ]
            )
        return buf.getvalue()

    def plot(self, path: str | Path) -> str:
        """``sweep.png``: one stacked bar of gradient verdict counts per cell."""
        return _plot(self, Path(path))


def _num(x: Any) -> float:
    return float(x)  # "inf"/"nan" strings of strict JSON too


_GROUPS = (  # (label, verdicts, colour) in stacking order
    ("ok", ("ok",), "#4daf4a"),
    ("inaccurate", ("inaccurate",), "#a6d96a"),
    ("structural_zero", ("structural_zero",), "#bdbdbd"),
    ("subnormal", ("subnormal",), "#ffbf00"),
    ("rounding_zero (underflow)", ("rounding_zero_underflow",), "#b2182b"),
    ("rounding_zero (lost)", ("rounding_zero_lost",), "#f4a582"),
    ("rounding_zero", ("rounding_zero",), "#d6604d"),
    ("overflow / nan", ("overflow", "nan"), "#7b3294"),
    ("wrong_sign / spurious_nonzero", ("wrong_sign", "spurious_nonzero"), "#252525"),
    ("undetermined", ("undetermined",), "#2166ac"),
    ("no_reference", ("no_reference",), "#80cdc1"),
)


def _plot(result: SweepResult, path: Path) -> str:
    from matplotlib.ticker import MaxNLocator

    from fpgrad.present.report.plots import plt, save_png

    varying = result.grid.varying() or [a for a, _ in result.grid.axes]
    fixed = [a for a, _ in result.grid.axes if a not in varying]
    recs = result.records
    n = len(recs)
    row_h = 0.32 if n <= 60 else 0.18
    fig, ax = plt.subplots(figsize=(9, 1.8 + row_h * n))
    labels = []
    for r in recs:
        label = ", ".join(f"{a}={format_value(r['axes'][a])}" for a in varying)
        labels.append(label if r["status"] == "ok" else f"{label} ({r['status']})")
    left = [0.0] * n
    for name, verdicts, colour in _GROUPS:
        widths = []
        for r in recs:
            c = r.get("counts", {}) if r["status"] == "ok" else {}
            if name == "rounding_zero" and "rounding_zero_underflow" in c:
                widths.append(0.0)  # drawn by its two kinds
            elif name.startswith("rounding_zero (") and "rounding_zero_underflow" not in c:
                widths.append(0.0)
            else:
                widths.append(float(sum(c.get(v, 0) for v in verdicts)))
        if any(widths):
            ax.barh(range(n), widths, left=left, color=colour, label=name, height=0.75)
            left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(n), labels, fontsize=8 if n <= 60 else 6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(n - 0.5, -0.5)  # grid order from the top
    ax.set_xlabel(
        "gradient elements" + (" (last checked step of each run)" if result.task == "train" else "")
    )
    title = f"{result.network}: gradient verdicts per cell ({result.task})"
    if fixed:
        title += "\n" + ", ".join(f"{a}={format_value(result.grid.values[a][0])}" for a in fixed)
    ax.set_title(title, fontsize=10)
    if any(left):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    save_png(fig, path)
    return str(path)
