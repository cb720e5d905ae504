"""Output directories are checked before any work is done."""

from __future__ import annotations

from pathlib import Path

from fpgrad.errors import InputError


def check_out_dir(out: str | Path) -> Path:
    """Create ``out`` if needed and prove it writable (a probe file), or a one-line InputError:
    called before the work, so that a bad path costs nothing."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fpgrad-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"cannot write to output directory {str(out)!r}: {reason}") from None
    return out
