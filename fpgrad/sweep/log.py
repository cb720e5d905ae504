"""The cell log ``DIR/cells.jsonl``: what a rerun reads to resume a sweep."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fpgrad.errors import InputError
from fpgrad.sweep.grid import format_value

CELLS_FILE = "cells.jsonl"
LOG_SCHEMA = "fpgrad.sweep.cells/1"


class CellLog:
    """A header line (task and options), then one JSON line per finished cell, appended and
    flushed to disk as each cell finishes; a truncated last line is dropped on reading."""

    def __init__(self, path: Path, header: dict[str, Any], restart: bool):
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if restart and path.exists():
            path.unlink()
        lines = self._read() if path.exists() else []
        if lines:
            self._check_header(lines[0], header)
            for rec in lines[1:]:
                self.records[str(rec.get("key"))] = rec  # the last line of a key wins
        try:
            self._file = path.open("a", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror}") from None
        if not lines:
            self._write(header)

    def _read(self) -> list[dict[str, Any]]:
        data = self.path.read_bytes()
        out: list[dict[str, Any]] = []
        good = 0  # bytes up to the end of the last complete line
        for number, line in enumerate(data.split(b"\n"), start=1):
            end = good + len(line) + 1
            if not line.strip():
                good = min(end, len(data))
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError
            except ValueError:
                if end >= len(data):  # a last line cut short by an interruption
                    break
                raise InputError(
                    f"{self.path}: line {number} is not a JSON object; the file is damaged: "
                    "use --restart (or a new --out)"
                ) from None
            out.append(obj)
            good = min(end, len(data))
        if good < len(data) or (data and not data.endswith(b"\n")):
            with self.path.open("r+b") as f:  # drop the partial line, end on a newline
                f.truncate(good)
                if good and not data[:good].endswith(b"\n"):
                    f.seek(good)
                    f.write(b"\n")
        return out

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
        self._write(record)
        self.records[record["key"]] = record

    def close(self) -> None:
        self._file.close()
