"""The cell log ``DIR/cells.jsonl``: what a rerun reads to resume a sweep."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fpgrad.errors import InputError
from fpgrad.sweeps.grid import format_value

CELLS_FILE = "cells.jsonl"
LOG_SCHEMA = "fpgrad.sweeps.cells/1"


_NUM = "num"  # a JSON number or "inf"/"-inf"/"nan"
_RECORD = {"key": str, "axes": dict, "network_hash": str, "status": str}
_OK = {  # the fields of an "ok" record that the table, CSV and plot read, per task
    "compare": {
        "counts": "counts",
        "loss": {"value": _NUM, "verdict": str, "kind": (str, type(None))},
        "certified_digits": _NUM,
    },
    "train": {
        "counts": "counts",
        "verdict_step": int,
        "loss": {"first": _NUM, "last": _NUM, "exact_last": _NUM},
        "distance": _NUM,
        "swamped": _NUM,
        "skipped": int,
        "nonfinite": bool,
        "events": {
            "stall": bool,
            "loss_floor": bool,
            "limit_cycle": bool,
            "chaotic": bool,
            "first_overflow_step": (int, type(None)),
        },
    },
}


#: integers of a cell line are below this (JSON reads any number of digits)
_BIG = 2**63


def _fits(value: Any, spec: Any) -> bool:
    """Whether ``value`` is what fpgrad writes for ``spec``: non-finite numbers are written as
    the strings "inf", "-inf", "nan", never as JSON's NaN/Infinity literals."""
    if spec == _NUM:
        if isinstance(value, str):
            return value in ("inf", "-inf", "nan")
        if isinstance(value, int) and not isinstance(value, bool):
            return abs(value) < _BIG
        return isinstance(value, float) and math.isfinite(value)
    if spec == "counts":
        return isinstance(value, dict) and all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n < _BIG
            for n in value.values()
        )
    if isinstance(spec, dict):
        return isinstance(value, dict) and all(
            k in value and _fits(value[k], s) for k, s in spec.items()
        )
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < _BIG
    return isinstance(value, spec)


def record_problem(rec: Any, task: str) -> str | None:
    """Why a cell line cannot be reused (None if it can)."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for name, kind in _RECORD.items():
        if not isinstance(rec.get(name), kind):
            return f"field {name} missing or not a {kind.__name__}"
    status = rec["status"]
    if status in ("input_error", "internal_error"):
        return None if isinstance(rec.get("error"), str) else "field error missing"
    if status != "ok":
        return f"unknown status {status[:20]!r}"
    for name, spec in _OK.get(task, {}).items():
        if name not in rec or not _fits(rec[name], spec):
            return f"field {name} missing or ill-formed"
    return None


class CellLog:
    """A header line (task and options), then one JSON line per finished cell, appended and
    flushed to disk as each cell finishes. On reading, a truncated last line is dropped, and
    a damaged or ill-formed line is reported (``notes``) and left out, so that its cell runs
    again; the file is then rewritten without it."""

    def __init__(self, path: Path, header: dict[str, Any], restart: bool):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self._file = None
        try:
            if restart and path.exists():
                path.unlink()
            lines = self._read(header["task"]) if path.exists() else []
            if lines:
                self._check_header(lines[0], header)
                for rec in lines[1:]:
                    self.records[rec["key"]] = rec  # the last line of a key wins
            if self.notes:
                self._rewrite([lines[0], *self.records.values()])
            self._file = path.open("a", encoding="utf-8")
            if not lines:
                self._write(header)
        except OSError as exc:
            raise _write_error(path, exc, len(self.records)) from None

    def _read(self, task: str) -> list[dict[str, Any]]:
        from fpgrad.model.validate import read_bytes

        data = read_bytes(self.path, "cell log")
        out: list[dict[str, Any]] = []
        lines = data.split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            last = number == len(lines)  # no newline after it: cut short by an interruption
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                if last:
                    self.notes.append(f"{self.path}: line {number} was cut short; dropped")
                    continue
                obj = None
            if not out:  # the header
                if not isinstance(obj, dict):
                    raise InputError(
                        f"{self.path}: line {number} (the header) is damaged; use a new --out "
                        "or --restart"
                    )
                out.append(obj)
                continue
            problem = record_problem(obj, task) if obj is not None else "not JSON"
            if problem:
                self.notes.append(
                    f"{self.path}: line {number} is damaged ({problem}); skipped, its cell "
                    "runs again"
                )
                continue
            out.append(obj)
        return out

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        from fpgrad.jsonutil import dumps

        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _check_header(self, found: dict[str, Any], header: dict[str, Any]) -> None:
        if found.get("schema") != LOG_SCHEMA:
            raise InputError(
                f"{self.path} is not a fpgrad sweep's cell log; use a new --out or --restart"
            )
        if found.get("task") != header["task"]:
            diff = f"task {found.get('task')} (now {header['task']})"
        elif found.get("options") != header["options"]:
            old, new = found.get("options") or {}, header["options"]
            k = next(k for k in sorted({*old, *new}) if old.get(k) != new.get(k))
            diff = f"{k}={format_value(old.get(k))} (now {format_value(new.get(k))})"
        else:
            return
        raise InputError(
            f"{self.path} holds a sweep with {diff}; use a new --out, or --restart to discard it"
        )

    def _write(self, obj: dict[str, Any]) -> None:
        from fpgrad.jsonutil import dumps

        self._file.write(dumps(obj) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, record: dict[str, Any]) -> None:
        try:
            self._write(record)
        except OSError as exc:
            raise _write_error(self.path, exc, len(self.records)) from None
        self.records[record["key"]] = record

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # the write that failed has been reported
                pass


def _write_error(path: Path, exc: OSError, kept: int) -> InputError:
    """An unwritable or full output, as bad input: the cells written so far are kept."""
    return InputError(
        f"cannot write {path}: {exc.strerror or exc}; free space or choose another --out "
        f"(the {kept} cells read or finished before are kept there; rerun to continue)"
    )
