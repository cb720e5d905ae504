"""The precision-name grammar: a name to its format, machine kind, accumulation and mode.

This module only parses; :mod:`fpgrad.graph.precisions` attaches the runners and the precision
policies. A name is a format of the catalogue or a custom ``eXmY``, then qualifiers in any order
(``:emulated``, an accumulation ``:fp32|:per_op|:exact``, a rounding mode); a native format
without qualifiers is native torch, anything else the strict emulated machine.

>>> parse_name("bf16:per_op").canonical
'bfloat16:emulated:per_op'
>>> parse_name("float32").kind
'native'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fpgrad.errors import InputError
from fpgrad.numbers.formats import CATALOGUE, NATIVE, Format, get_format
from fpgrad.numbers.rounding import Mode, parse_mode

ACCUMULATIONS = ("fp32", "per_op", "exact")  # as fpgrad.arith.emulated.ACCUMULATIONS
DEFAULT_ACCUMULATION = "fp32"
_CUSTOM = re.compile(r"^e\d+m\d+$")


@dataclass(frozen=True)
class ParsedName:
    """A precision name taken apart (``accumulation`` and ``mode`` only for emulated ones)."""

    canonical: str
    fmt: Format
    kind: str  #: "native" or "emulated"
    accumulation: str | None = None
    mode: Mode = Mode.NEAREST_EVEN


def parse_name(
    name: str, known: Callable[[], str] | None = None, names: Sequence[str] = ()
) -> ParsedName:
    """Parse ``name``; errors end with ``known()`` (the names one may use) and suggest the
    closest of the catalogue, ``names`` and ``exact``."""
    from fpgrad.arith.emulated import check_emulable

    tail = f"; {known()}" if known else ""
    parts = [s.strip().lower() for s in name.strip().split(":")]
    try:
        fmt = get_format(parts[0])
    except InputError as exc:
        if _CUSTOM.match(parts[0]):  # a custom eXmY out of range: say which field
            raise InputError(f"precision {name!r}: {exc}") from None
        from fpgrad.suggest import did_you_mean

        hint = did_you_mean(parts[0], [*CATALOGUE, *names, "exact"])
        raise InputError(f"unknown precision {name!r}{hint}{tail}") from None
    qualifiers = parts[1:]
    if not qualifiers and fmt.name in NATIVE:
        return ParsedName(fmt.name, fmt, "native")
    accumulation: str | None = None
    mode: Mode | None = None
    seen: set[str] = set()
    for q in qualifiers:
        if q in seen:
            raise InputError(f"precision {name!r}: qualifier {q!r} given twice")
        seen.add(q)
        if q == "emulated":
            continue
        if q.replace("-", "_") in ACCUMULATIONS:
            if accumulation is not None:
                raise InputError(
                    f"precision {name!r}: two accumulations; give one of {ACCUMULATIONS}"
                )
            accumulation = q.replace("-", "_")
            continue
        try:
            m = parse_mode(q)
        except InputError:
            raise InputError(f"precision {name!r}: unknown qualifier {q!r}{tail}") from None
        if mode is not None:
            raise InputError(f"precision {name!r}: two rounding modes; give one")
        mode = m
    check_emulable(fmt)
    accumulation = accumulation or DEFAULT_ACCUMULATION
    mode = mode or Mode.NEAREST_EVEN
    canonical = fmt.name + (":emulated" if fmt.name in NATIVE else "")
    if accumulation != DEFAULT_ACCUMULATION:
        canonical += f":{accumulation}"
    if mode is not Mode.NEAREST_EVEN:
        canonical += f":{mode.value}"
    return ParsedName(canonical, fmt, "emulated", accumulation, mode)
