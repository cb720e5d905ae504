"""The shape of a watch record, checked when ``records.jsonl`` is read back (``fpgrad
watch-report``): every field the report reads is present with its type and within its range, so
that a damaged or hand-edited file is refused in one line naming the line and the field, never a
KeyError deep in the report or a table built from a wrong value. Unknown extra fields are
ignored (a newer writer may add some)."""

from __future__ import annotations

import math
from typing import Any

from fpgrad.errors import InputError

_BIG = 2**63
_COUNTS = tuple(
    f"{what}{part}"
    for what in ("zeros", "subnormals", "infs", "nans")
    for part in ("", "_created", "_inherited", "_undecided")
)


def _int(
    rec: dict, key: str, where: str, low: int = 0, high: int = _BIG, need: bool = True
) -> None:
    if key not in rec and not need:
        return
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v < high:
        raise InputError(f"{where}: field {key!r} must be an integer in {low}..{high - 1} "
                         f"(got {_shown(v)}); is this a watch directory?")  # fmt: skip


def _str(rec: dict, key: str, where: str, need: bool = True, none: bool = False) -> None:
    if key not in rec and not need:
        return
    v = rec.get(key)
    if not (isinstance(v, str) or (none and v is None)):
        raise InputError(f"{where}: field {key!r} must be a string (got {_shown(v)})")


def _bool(rec: dict, key: str, where: str, need: bool = True, none: bool = False) -> None:
    if key not in rec and not need:
        return
    v = rec.get(key)
    if not (isinstance(v, bool) or (none and v is None)):
        raise InputError(f"{where}: field {key!r} must be true or false (got {_shown(v)})")


def _number(rec: dict, key: str, where: str, low: float = -math.inf, high: float = math.inf,
            finite: bool = False) -> None:  # fmt: skip
    """An optional number (or null) within [low, high]; non-finite only when not ``finite``."""
    v = rec.get(key)
    if v is None:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok and math.isnan(v):
        ok = not finite
    elif ok:
        ok = (math.isfinite(v) or not finite) and low <= v <= high
    if not ok:
        raise InputError(f"{where}: field {key!r} must be a number in [{low:g}, {high:g}] or "
                         f"null (got {_shown(v)})")  # fmt: skip


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:40] + "..."


def _op(rec: dict, where: str) -> None:
    for key in ("step", "seq", "numel"):
        _int(rec, key, where)
    for key in ("module", "op", "direction"):
        _str(rec, key, where)
    _str(rec, "dtype", where, need=False)
    for key in _COUNTS:
        _int(rec, key, where, 0, rec["numel"] + 1, need=key in ("zeros", "subnormals",
             "zeros_created", "zeros_inherited", "infs_created", "nans_created"))  # fmt: skip
    for key in ("subnormal_share", "underflow_share"):
        _number(rec, key, where, 0.0, 1.0, finite=True)


def _optimizer(rec: dict, where: str) -> None:
    _str(rec, "param", where)
    _int(rec, "step", where)
    _int(rec, "numel", where)
    for key in ("requested_nonzero", "swamped"):
        _int(rec, key, where, 0, rec["numel"] + 1, need=False)
    for key in ("swamped_share", "moved_share"):
        _number(rec, key, where, 0.0, 1.0, finite=True)
    for key in list(rec):
        if key.endswith("_share") and key not in ("swamped_share", "moved_share"):
            _number(rec, key, where, 0.0, 1.0)
        elif key.endswith("_ratio") or key == "eps_in_state_dtype":
            _number(rec, key, where, 0.0)
    smap = rec.get("swamped_map")
    if smap is not None and not (
        isinstance(smap, list)
        and len(smap) == rec["numel"]
        and all(v in (0, 1) and not isinstance(v, float) for v in smap)
    ):
        raise InputError(f"{where}: field 'swamped_map' must be null or a list of {rec['numel']} "
                         "zeros and ones (one per element of the parameter)")  # fmt: skip


def _step(rec: dict, where: str) -> None:
    _int(rec, "step", where)
    _int(rec, "ops", where, need=False)
    _bool(rec, "sampled", where)
    _bool(rec, "skipped", where, none=True)
    for key in ("scale", "next_scale"):
        _number(rec, key, where, 0.0, finite=True)
        if key not in rec:
            raise InputError(f"{where}: field {key!r} is missing (a number or null)")
    if "first_nonfinite" not in rec:
        raise InputError(f"{where}: field 'first_nonfinite' is missing (null or a table)")
    first = rec["first_nonfinite"]
    if first is None:
        return
    if not isinstance(first, dict):
        raise InputError(f"{where}: field 'first_nonfinite' must be null or a table")
    at = f"{where}: first_nonfinite"
    for key in ("module", "op", "direction"):
        _str(first, key, at)
    _bool(first, "created", at)
    _bool(first, "inherited", at, need=False)
    _int(first, "seq", at, need=False)


def _meta(rec: dict, where: str) -> None:
    _int(rec, "every", where, 1, need=False)
    _str(rec, "model", where, need=False)
    _str(rec, "optimizer", where, need=False, none=True)
    _bool(rec, "scaler", where, need=False)


CHECKS = {"meta": _meta, "op": _op, "optimizer": _optimizer, "step": _step}


def check_record(rec: dict[str, Any], where: str) -> None:
    """Refuse (InputError naming ``where`` and the field) a record the report cannot read."""
    CHECKS[rec["kind"]](rec, where)
