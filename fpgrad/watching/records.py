"""Watch records on disk: one JSON object per line in ``DIR/records.jsonl``, flushed per step,
so a report can read a run while it goes on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fpgrad.errors import InputError
from fpgrad.jsonutil import jsonable

FILENAME = "records.jsonl"
KINDS = ("meta", "op", "optimizer", "step")


def unwritable(option: str, directory: str | Path, exc: OSError) -> InputError:
    """The one-line error for a watch output directory that cannot be written."""
    return InputError(
        f"watch {option}={str(directory)!r}: cannot write there ({exc.strerror}); "
        "pass a writable directory"
    )


class JsonlWriter:
    """Appends records to ``DIR/records.jsonl`` (the file is created empty on open)."""

    def __init__(self, directory: str | Path) -> None:
        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._fh = open(d / FILENAME, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise unwritable("out", directory, exc) from exc

    def write(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self._fh.write(json.dumps(jsonable(r), allow_nan=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _float(v: Any) -> Any:
    if v in ("inf", "-inf", "nan"):
        return float(v)
    return v


def read_records(directory: str | Path) -> list[dict[str, Any]]:
    """The records of a watch directory; a bad file raises InputError naming the line (a last
    line without its newline is a run still writing it, and is left out)."""
    from fpgrad.model.validate import read_bytes
    from fpgrad.watching.schema import check_record

    path = Path(directory) / FILENAME
    if not path.exists() and not path.is_symlink():
        raise InputError(
            f"{str(directory)!r} holds no {FILENAME}; pass the out= directory of fpgrad.watching"
        )
    data = read_bytes(path, "watch records file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text (byte {exc.start}); is this a watch directory?"
        ) from None
    lines = text.split("\n")
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n > 1 and n == len(lines):
                break  # the run is still writing this line
            raise InputError(f"{path}:{n}: not a JSON line; is this a watch directory?") from None
        except RecursionError:
            raise InputError(f"{path}:{n}: arrays or objects nest too deep; is this a watch "
                             "directory?") from None  # fmt: skip
        except ValueError as exc:  # an integer beyond Python's 4300 digits
            raise InputError(f"{path}:{n}: a number has too many digits ({exc}); is this a "
                             "watch directory?") from None  # fmt: skip
        if not isinstance(rec, dict) or rec.get("kind") not in KINDS:
            raise InputError(
                f"{path}:{n}: not a watch record (kind must be one of {', '.join(KINDS)})"
            )
        rec = {k: _float(v) for k, v in rec.items()}
        check_record(rec, f"{path}:{n} ({rec['kind']} record)")
        out.append(rec)
    return out
