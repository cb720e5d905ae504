"""The advice from exact values placed against a format: safe range, recommended scale,
measured rounding zeros (shared by layer networks and captured models)."""

from __future__ import annotations

import math
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

    def lowest(ok: Any) -> int | None:
        return next((k for k in span if ok(table[k])), None)

    # values that may grow during training must keep the headroom; the seed is S itself
    k_values = max((k for k in span if _overflow(table[k], seed=False) == 0), default=None)
    k_cap = max((k for k in span if table[k]["seed"]["overflow"] == 0), default=None)
    if k_values is None or k_cap is None:  # pragma: no cover - some scale always fits
        raise InputError(f"every scale overflows some value in {f.name}")
    k_hi = min(k_values, k_cap)
    in_scope = ("gradients",) if scope == "gradients" else GROUPS
    k_lo_g = lowest(lambda c: c["gradients"]["underflow"] == 0)
    k_lo = lowest(lambda c: all(c[g]["underflow"] == 0 for g in in_scope))
    k_norm = lowest(
        lambda c: all(c[g]["underflow"] == 0 and c[g]["subnormal"] == 0 for g in in_scope)
    )
    safe = [k_lo, k_hi] if k_lo is not None and k_lo <= k_hi else None
    safe_g = [k_lo_g, k_hi] if k_lo_g is not None and k_lo_g <= k_hi else None
    normal = [k_norm, k_hi] if k_norm is not None and k_norm <= k_hi else None
    cap_text = (
        f"capped at 2^{k_cap}, the largest scale {f.name} holds: the backward pass starts "
        "from the scale itself"
    )
    if normal is not None:  # every value keeps full precision: only the margins matter
        if normal[0] + headroom <= 0 <= min(k_cap, k_values - headroom):
            rec = 0
            reason = (
                f"no scaling: every value is already normal, with at least {headroom} binades "
                "of margin on both sides"
            )
        else:
            rec = min(k_cap, (normal[0] + k_values) // 2)
            reason = (
                "every value normal, halfway between the subnormal range and the overflow of any "
                f"gradient or signal: {rec - normal[0]} binades of margin above, "
                f"{k_values - rec} below" + (f"; {cap_text}" if rec == k_cap else "")
            )
    elif safe is not None:
        mid = (safe[0] + safe[1]) // 2
        rec = min(k_cap, max(mid, k_values - headroom))
        if rec == k_cap and k_cap < k_values - headroom:
            reason = (
                f"the largest safe scale: {cap_text}; the largest gradient or signal still has "
                f"{k_values - k_cap} binades below overflow (at least the headroom of {headroom})"
            )
        elif rec == k_values - headroom:
            reason = (
                f"the largest safe scale with {headroom} binades of headroom below the overflow "
                "of any gradient or signal; larger scales keep more small values normal, a static "
                "scale cannot back off"
            )
        else:
            reason = (
                f"the middle of the safe range: {rec - safe[0]} binades above underflow, "
                f"{k_hi - rec} below overflow (the range is narrower than twice the headroom "
                f"of {headroom})"
            )
    else:
        rec = k_hi
        lost = sum(table[k_hi][g]["underflow"] for g in in_scope)
        total = sum(groups[g].size for g in in_scope)
        reason = (
            f"no scale is safe: the largest scale without overflow, where {lost} of {total} "
            f"values still underflow (an overflow skips the step and loses every gradient)"
        )

    dynamic = None
    notes: list[str] = []
    if measurer is not None:
        dynamic = measurer.dynamic()
        d = dynamic["settled"]
        parts = ["the recommended scale"] if d == rec else []
        if d == k_values:
            parts.append(
                "the last scale before a gradient or signal overflows: no headroom for values that grow"
            )
        elif d == k_cap:
            parts.append(
                f"the cap of {f.name} (the scale itself must fit); gradients and signals keep "
                f"{k_values - d} binades below overflow"
            )
        elif d < k_hi:
            parts.append(f"{k_hi - d} binade(s) below the largest safe scale 2^{k_hi}")
        else:
            parts.append(f"above the predicted overflow limit 2^{k_hi}")
        if safe is not None and d < safe[0]:
            under = (table[d] if d in table else _row_counts(groups, seed, lim, d))["gradients"]
            parts.append(f"below the safe range: {under['underflow']} gradients underflow there")
        comparison = "; ".join(parts)
        dynamic["comparison"] = comparison
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

    if exponents is None:
        keys = [k for k in (0, k_hi, rec, *(safe or []), *(normal or [])) if k is not None]
        if dynamic:
            keys.append(dynamic["settled"])
        start, stop = min(keys), max(keys) + 2
        if safe is None and k_lo is not None:
            stop = max(stop, min(k_lo, k_hi + 8))
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
    rows = []
    for k in phase(ks, "fpgrad advise: rows" + (" (torch)" if measurer else ""), progress, "row"):
        counts = table.get(k) or _row_counts(groups, seed, lim, k)
        row: dict[str, Any] = {"exponent": k, "scale": math.ldexp(1.0, k), **counts}
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

    def log2_range(v: _Values) -> list[float] | None:
        if not v.size:
            return None
        return [math.log2(float(v.mag.min())), math.log2(float(v.mag.max()))]

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
        log2_range={name: log2_range(v) for name, v in groups.items()},
        rows=rows,
        safe=safe,
        safe_gradients=safe_g,
        normal=normal,
        recommended=rec,
        reason=reason,
        dynamic=dynamic,
        notes=notes,
    )
