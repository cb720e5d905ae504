"""The advice from exact values placed against a format: safe range, recommended scale,
measured rounding zeros (shared by layer networks and captured models)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fpgrad.diagnose.advisor.advice import Advice
from fpgrad.diagnose.advisor.scales import (
    _K_LIMIT,
    GROUPS,
    MAX_ROWS,
    TORCH_FORMATS,
    _Limits,
    _log2_ratio,
    _overflow,
    _row_counts,
    _Values,
)
from fpgrad.errors import InputError
from fpgrad.numbers.formats import Format
from fpgrad.progress import phase


@dataclass(frozen=True)
class _Range:
    """Where the scales stand (exponents k of S = 2^k): ``k_values`` the largest before a
    gradient or signal overflows, ``k_cap`` the largest the format holds (the seed is S),
    ``k_hi`` the lower of the two; ``safe`` [lowest without an underflow in scope, k_hi] (None
    when empty), ``safe_g`` the same for gradients alone, ``normal`` [lowest with every value
    in scope normal, k_hi]; ``k_lo`` the lowest without an underflow in scope."""

    k_values: int
    k_cap: int
    k_hi: int
    k_lo: int | None
    safe: list[int] | None
    safe_g: list[int] | None
    normal: list[int] | None


def _range(table: dict[int, Any], span: range, in_scope: tuple[str, ...], f: Format) -> _Range:
    def lowest(ok: Any) -> int | None:
        return next((k for k in span if ok(table[k])), None)

    # values that may grow during training must keep the headroom; the seed is S itself
    k_values = max((k for k in span if _overflow(table[k], seed=False) == 0), default=None)
    k_cap = max((k for k in span if table[k]["seed"]["overflow"] == 0), default=None)
    if k_values is None or k_cap is None:  # pragma: no cover - some scale always fits
        raise InputError(f"every scale overflows some value in {f.name}")
    k_hi = min(k_values, k_cap)
    k_lo_g = lowest(lambda c: c["gradients"]["underflow"] == 0)
    k_lo = lowest(lambda c: all(c[g]["underflow"] == 0 for g in in_scope))
    k_norm = lowest(
        lambda c: all(c[g]["underflow"] == 0 and c[g]["subnormal"] == 0 for g in in_scope)
    )

    def up_to_hi(k: int | None) -> list[int] | None:
        return [k, k_hi] if k is not None and k <= k_hi else None

    return _Range(k_values, k_cap, k_hi, k_lo, up_to_hi(k_lo), up_to_hi(k_lo_g), up_to_hi(k_norm))


def _recommend(
    r: _Range, f: Format, headroom: int, table: dict[int, Any], sizes: dict[str, int],
    in_scope: tuple[str, ...],
) -> tuple[int, str]:  # fmt: skip
    """The recommended exponent and why."""
    cap_text = (
        f"capped at 2^{r.k_cap}, the largest scale {f.name} holds: the backward pass starts "
        "from the scale itself"
    )
    if r.normal is not None:  # every value keeps full precision: only the margins matter
        if r.normal[0] + headroom <= 0 <= min(r.k_cap, r.k_values - headroom):
            return 0, (
                f"no scaling: every value is already normal, with at least {headroom} binades "
                "of margin on both sides"
            )
        rec = min(r.k_cap, (r.normal[0] + r.k_values) // 2)
        return rec, (
            "every value normal, halfway between the subnormal range and the overflow of any "
            f"gradient or signal: {rec - r.normal[0]} binades of margin above, "
            f"{r.k_values - rec} below" + (f"; {cap_text}" if rec == r.k_cap else "")
        )
    if r.safe is not None:
        mid = (r.safe[0] + r.safe[1]) // 2
        rec = min(r.k_cap, max(mid, r.k_values - headroom))
        if rec == r.k_cap and r.k_cap < r.k_values - headroom:
            return rec, (
                f"the largest safe scale: {cap_text}; the largest gradient or signal still has "
                f"{r.k_values - r.k_cap} binades below overflow (at least the headroom of "
                f"{headroom})"
            )
        if rec == r.k_values - headroom:
            return rec, (
                f"the largest safe scale with {headroom} binades of headroom below the overflow "
                "of any gradient or signal; larger scales keep more small values normal, a static "
                "scale cannot back off"
            )
        return rec, (
            f"the middle of the safe range: {rec - r.safe[0]} binades above underflow, "
            f"{r.k_hi - rec} below overflow (the range is narrower than twice the headroom "
            f"of {headroom})"
        )
    lost = sum(table[r.k_hi][g]["underflow"] for g in in_scope)
    total = sum(sizes[g] for g in in_scope)
    return r.k_hi, (
        f"no scale is safe: the largest scale without overflow, where {lost} of {total} "
        f"values still underflow (an overflow skips the step and loses every gradient)"
    )


def _dynamic(measurer: Any, rec: int, r: _Range, f: Format, counts: Any) -> dict[str, Any]:
    """torch's dynamic scaler run by ``measurer``, with where it settled against the
    prediction (``counts(k)``: the predicted counts at 2^k)."""
    dynamic: dict[str, Any] = measurer.dynamic()
    d = dynamic["settled"]
    parts = ["the recommended scale"] if d == rec else []
    if d == r.k_values:
        parts.append(
            "the last scale before a gradient or signal overflows: no headroom for values that grow"
        )
    elif d == r.k_cap:
        parts.append(
            f"the cap of {f.name} (the scale itself must fit); gradients and signals keep "
            f"{r.k_values - d} binades below overflow"
        )
    elif d < r.k_hi:
        parts.append(f"{r.k_hi - d} binade(s) below the largest safe scale 2^{r.k_hi}")
    else:
        parts.append(f"above the predicted overflow limit 2^{r.k_hi}")
    if r.safe is not None and d < r.safe[0]:
        under = counts(d)["gradients"]
        parts.append(f"below the safe range: {under['underflow']} gradients underflow there")
    dynamic["comparison"] = "; ".join(parts)
    return dynamic


def _exponents(
    exponents: tuple[int, int] | None, r: _Range, rec: int, dynamic: dict[str, Any] | None
) -> list[int]:
    """The exponents of the table's rows: the given range, or one around every key scale
    (at most :data:`MAX_ROWS` rows, key scales always kept)."""
    if exponents is None:
        keys = [k for k in (0, r.k_hi, rec, *(r.safe or []), *(r.normal or [])) if k is not None]
        if dynamic:
            keys.append(dynamic["settled"])
        start, stop = min(keys), max(keys) + 2
        if r.safe is None and r.k_lo is not None:
            stop = max(stop, min(r.k_lo, r.k_hi + 8))
    else:
        start, stop = exponents
        if start > stop:
            raise InputError(f"exponent range {start}..{stop} is empty; give lo <= hi")
        keys = []
    start, stop = max(start, -_K_LIMIT), min(stop, _K_LIMIT)
    ks = list(range(start, stop + 1))
    if len(ks) > MAX_ROWS and exponents is None:
        stride = math.ceil(len(ks) / MAX_ROWS)
        ks = sorted({*ks[::stride], *(k for k in keys if start <= k <= stop)})
    return ks


def _log2_range(v: _Values) -> list[float] | None:
    if not v.size:
        return None
    return [math.log2(float(v.mag.min())), math.log2(float(v.mag.max()))]


def advice_from_values(
    name: str,
    f: Format,
    exact: Any,
    bits: int,
    grads: _Values,
    signals: _Values,
    seed: _Values,
    measurer: Any,
    *,
    scope: str,
    headroom: int,
    exponents: tuple[int, int] | None,
    measure: bool,
    progress: bool | None,
    policy: str | None = None,
    policy_note: str | None = None,
) -> Advice:
    """The advice from the exact non-zero magnitudes of each group (any kind of network):
    ``measurer`` (or None) gives torch's measured backward per scale (``at``, ``dynamic``)."""
    lim = _Limits.of(f)
    groups = {"gradients": grads, "signals": signals}
    nonzero = [v for v in (grads, signals, seed) if v.size]
    if not nonzero:
        under = f" under policy {policy}" if policy else ""
        raise InputError(
            f"{name}: no exact non-zero value is computed in {f.name}{under}, so no loss scale "
            f"changes anything; advise for a format the network{under} computes in"
            + (" (drop --format to take the policy's narrowest)" if policy else "")
        )
    lo_all = min(float(v.mag.min()) for v in nonzero)
    hi_all = max(float(v.mag.max()) for v in nonzero)
    # log2 of each side (a ratio overflows for subnormal values), clamped before rounding
    ka = max(-_K_LIMIT, math.floor(_log2_ratio(lim.underflow, hi_all)) - 2)
    kb = min(_K_LIMIT, math.ceil(_log2_ratio(lim.overflow, lo_all)) + 2)
    span = range(ka, kb + 1)
    table = {
        k: _row_counts(groups, seed, lim, k)
        for k in phase(span, "fpgrad advise: counts per scale", progress, "scale")
    }

    def counts(k: int) -> Any:
        return table.get(k) or _row_counts(groups, seed, lim, k)

    in_scope = ("gradients",) if scope == "gradients" else GROUPS
    r = _range(table, span, in_scope, f)
    rec, reason = _recommend(
        r, f, headroom, table, {g: v.size for g, v in groups.items()}, in_scope
    )
    dynamic = None
    notes: list[str] = []
    if measurer is not None:
        dynamic = _dynamic(measurer, rec, r, f, counts)
    elif measure and f.name not in TORCH_FORMATS:
        notes.append(
            f"{f.name} has no torch dtype: the table is predicted only (no measured backward, "
            "no dynamic scaler)"
        )
    elif measure:
        notes.append(
            "the policy runs emulated: the table is predicted only (no measured backward, "
            "no dynamic scaler)"
        )
    rows = []
    ks = _exponents(exponents, r, rec, dynamic)
    for k in phase(ks, "fpgrad advise: rows" + (" (torch)" if measurer else ""), progress, "row"):
        row: dict[str, Any] = {"exponent": k, "scale": math.ldexp(1.0, k), **counts(k)}
        if measurer is not None:
            row["measured"] = measurer.at(k)
        rows.append(row)
    if measurer is not None:
        m = measurer.at(rec)
        if m["rounding_zero"]:
            notes.append(
                f"at 2^{rec} torch still gives {m['rounding_zero']} rounding zeros "
                f"({m['lost']} lost: a value on the way underflowed, an input, a forward value or a "
                "backward signal; fpgrad compare shows where, --signals counts the signals)"
            )
    if policy_note is not None:
        notes.append(policy_note)
    elif f.name == "float16":
        notes.append(
            "unscale in float32 (fpgrad train: float16+master+scale=S): unscaling in float16 "
            "underflows the same small gradients again"
        )
    sizes = {
        name: {
            "elements": v.size + v.zeros + v.undetermined,
            "nonzero": v.size,
            "exact_zero": v.zeros,
            "undetermined": v.undetermined,
        }
        for name, v in groups.items()
    }
    unknown = sum(v.undetermined for v in groups.values())
    if unknown:
        notes.append(
            f"{unknown} exact values are undetermined (their certified balls still contain 0 "
            f"at {exact.max_bits} bits) and are left out of the advice"
        )
    return Advice(
        network=name,
        format=f.name if policy is None else f"{f.name} (policy {policy})",
        scope=scope,
        headroom=headroom,
        exact_bits=max(bits, exact.bits),  # the precision the reference worked at
        exact_method=exact.method,
        certified_digits=exact.certified_digits,
        sizes=sizes,
        log2_range={name: _log2_range(v) for name, v in groups.items()},
        rows=rows,
        safe=r.safe,
        safe_gradients=r.safe_g,
        normal=r.normal,
        recommended=rec,
        reason=reason,
        dynamic=dynamic,
        notes=notes,
    )
