"""``fpgrad watch-report DIR``: the records of a watch directory, handed to the report writer
(:mod:`fpgrad.present.report.watch`)."""

from __future__ import annotations

from pathlib import Path

from fpgrad.present.report.watch import write_report as _write
from fpgrad.watching.records import read_records
from fpgrad.watching.tensorboard import TensorBoardWriter


def write_report(
    directory: str | Path, out: str | Path | None = None, tensorboard: str | Path | None = None
) -> Path:
    """Write watch.md, watch.html and the PNGs for a watch directory (and, with
    ``tensorboard=TB``, its scalars as TensorBoard events in TB); returns the output dir."""
    recs = read_records(directory)
    if tensorboard is not None:
        tb = TensorBoardWriter(tensorboard)
        tb.write(recs)
        tb.close()
    return _write(recs, Path(out) if out is not None else Path(directory))
