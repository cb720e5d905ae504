"""Loss-scale advisor: which static loss scales S keep every gradient inside a format's range.

From the certified exact trace (:func:`fpgrad.exact.exact_trace`), every non-zero exact value
``e`` of the backward pass is placed against the format, scaled by each power of two ``S``:

- **underflow**: ``|e S| <= smallest_subnormal / 2``: correct rounding gives 0 (the tie goes
  to the even neighbour, 0);
- **subnormal**: it rounds to a non-zero value below the smallest normal (precision already
  lost);
- **overflow**: it rounds to inf (or NaN in formats without inf).

The values: the **gradients** (every parameter gradient), the **signals** (the backward
signals dL/d(output) of every layer) and the **seed** of the backward pass, dL/dL = 1, which
becomes S itself: fpgrad's float16 runs compute the scaled loss in float16, so S must be a
float16 value. Exact zeros are never lost and are not counted.

A scale is *safe* when no gradient underflows (with ``scope="all"``: no backward signal either)
and no value of either group overflows (an overflow anywhere in the backward pass makes
gradients inf or NaN, and the step is skipped). Underflow counts fall and overflow counts rise
with S, so the safe scales are one range of exponents ``lo..hi`` (possibly empty).

The recommended static scale:

1. when some scales keep every value *normal* (full precision) and nothing overflows: 1 if it
   is one of them with ``headroom`` binades of margin on both sides, else the scale halfway
   between the subnormal range and the overflow of the largest gradient or signal (inside that
   range a scale changes no relative precision, only the margins), capped by the seed;
2. else, when the safe range is not empty: the largest safe scale that keeps ``headroom``
   binades (default 3: the largest value may grow 8x) below the overflow of any gradient or
   signal, but not below the middle of the safe range. A larger scale only moves more small
   values out of the subnormal range (Micikevicius et al., 2018: no downside to a large
   scaling factor as long as it does not cause overflow), and a static scale cannot back off
   when training makes some value grow. The seed caps it without headroom (it never grows);
3. with no safe scale: the largest scale without overflow (an overflowing step loses every
   gradient; an underflow loses only the values that underflow).

For torch formats (float16, bfloat16, float32) the advisor also measures: per scale, the rounding zeros
of torch's real backward at that scale against the exact gradients times S, and where dynamic
loss scaling (torch.amp.GradScaler's rules, :class:`fpgrad.scaling.DynamicScaler`: start at
2^16, halve and skip on inf/NaN, double after 2000 clean steps) settles at these parameters.
"""

from __future__ import annotations

import json
import math
from dataclasses import InitVar, dataclass, field
from typing import Any

import numpy as np

from fpgrad.errors import InputError
from fpgrad.exact import DEFAULT_BITS, DEFAULT_MAX_BITS, ExactResult, exact_trace
from fpgrad.formats import Format, get_format
from fpgrad.network import Network
from fpgrad.policy import Plan, format_of
from fpgrad.progress import phase
from fpgrad.verdicts import ExactArray, classify

GROUPS = ("gradients", "signals")
SCOPES = ("gradients", "all")
TORCH_FORMATS = ("float16", "bfloat16", "float32")
MAX_ROWS = 40
_K_LIMIT = 600  # scale exponents considered: 2^-600 .. 2^600


def _log2_ratio(a: float, b: float) -> float:
    """log2(a / b) of positive floats without forming a / b, within +-4 * _K_LIMIT (a zero
    side counts as the far end)."""
    if a <= 0 or b <= 0:
        return -4.0 * _K_LIMIT if a <= 0 else 4.0 * _K_LIMIT
    return min(4.0 * _K_LIMIT, max(-4.0 * _K_LIMIT, math.log2(a) - math.log2(b)))


@dataclass
class _Values:
    """Non-zero exact magnitudes of one group as |hi| sorted, and apart the sorted |hi| of those
    whose low word's signed rest is negative or zero (for ties at a threshold), so that each
    threshold count is a few binary searches, not a pass. Built from ``mag`` and ``rest``."""

    mag: np.ndarray
    rest: InitVar[np.ndarray]
    zeros: int
    undetermined: int = 0  #: exact values whose certified ball still contains 0 (not judged)
    _neg: np.ndarray = field(init=False, repr=False)  # sorted |hi| whose rest < 0
    _nil: np.ndarray = field(init=False, repr=False)  # sorted |hi| whose rest == 0

    def __post_init__(self, rest: np.ndarray) -> None:
        self._neg = np.sort(self.mag[rest < 0])
        self._nil = np.sort(self.mag[rest == 0])
        self.mag = np.sort(self.mag)

    @classmethod
    def of(cls, arrays: list[ExactArray]) -> _Values:
        hi = np.concatenate([a.hi.ravel() for a in arrays]) if arrays else np.zeros(0)
        lo = np.concatenate([a.lo.ravel() for a in arrays]) if arrays else np.zeros(0)
        zero = np.concatenate([a.zero.ravel() for a in arrays]) if arrays else np.zeros(0, bool)
        und = (
            np.concatenate([a.undetermined_mask().ravel() for a in arrays])
            if arrays
            else np.zeros(0, bool)
        )
        keep = ~zero & ~und & (hi != 0)
        return cls(
            np.abs(hi[keep]),
            (lo * np.sign(hi))[keep],
            int((~keep & ~und).sum()),
            int(und.sum()),
        )

    @property
    def size(self) -> int:
        return int(self.mag.size)

    def _count(self, t: float, side: str) -> int:
        """How many |e| < t, plus those with |hi| == t whose rest is <= 0 (side "right") or
        < 0 (side "left")."""

        def at(a: np.ndarray) -> int:  # how many of ``a`` equal t
            return int(np.searchsorted(a, t, "right") - np.searchsorted(a, t, "left"))

        below = int(np.searchsorted(self.mag, t, "left"))
        if below == self.mag.size or self.mag[below] != t:  # no tie (the common case)
            return below
        return below + at(self._neg) + (at(self._nil) if side == "right" else 0)

    def le(self, t: float) -> int:  # how many |e| <= t
        return self._count(t, "right")

    def lt(self, t: float) -> int:  # how many |e| < t
        return self._count(t, "left")


@dataclass
class _Limits:
    """A format's thresholds at scale 1; tie rules of round-to-nearest-even."""

    underflow: float  # |v| <= this rounds to 0
    normal: float  # |v| < this rounds below the smallest normal
    overflow: float  # |v| >= this (or >, see tie) rounds to inf/NaN
    overflow_tie: bool  # True: a value exactly at ``overflow`` overflows

    @classmethod
    def of(cls, fmt: Format) -> _Limits:
        from fpgrad.rounding import round_to

        sub = fmt.smallest_subnormal
        top = fmt.max + fmt.ulp(fmt.max) / 2
        tie = not bool(np.isfinite(round_to(np.array([top]), fmt))[0])
        normal = fmt.smallest_normal - sub / 2 if fmt.subnormals else fmt.smallest_normal
        return cls(sub / 2, normal, top, tie)


def _row_counts(
    groups: dict[str, _Values], seed: _Values, lim: _Limits, k: int
) -> dict[str, dict[str, int]]:
    counts = {name: _counts(v, lim, k) for name, v in groups.items()}
    counts["seed"] = _counts(seed, lim, k)
    return counts


def _overflow(c: dict[str, dict[str, int]], seed: bool = True) -> int:
    return sum(c[g]["overflow"] for g in (*GROUPS, *(("seed",) if seed else ())))


def _counts(v: _Values, lim: _Limits, k: int) -> dict[str, int]:
    """Underflow / subnormal / overflow counts of ``v`` scaled by 2^k (exact thresholds)."""
    under = v.le(math.ldexp(lim.underflow, -k))
    sub = v.lt(math.ldexp(lim.normal, -k)) - under  # underflow < normal: a subset
    t = math.ldexp(lim.overflow, -k)
    over = v.size - (v.lt(t) if lim.overflow_tie else v.le(t))
    return {"underflow": under, "subnormal": sub, "overflow": over}


def _in_format(net: Network, plan: Plan | None, fmt: str) -> dict[str, Any]:
    """Layers whose parameter gradients, outputs (and so backward signals) and loss the plan
    computes in ``fmt``; everything without a plan."""
    if plan is None:
        names = {ly.name for ly in net.layers}
        return {"params": names, "out": names, "loss": True}

    def same(p: str | None) -> bool:
        return p is not None and format_of(p).name == fmt

    return {
        "params": {lp.layer for lp in plan.layers if same(lp.params)},
        "out": {lp.layer for lp in plan.layers if same(lp.output)},
        "loss": same(plan.loss),
    }


def _sizes_text(in_f: dict[str, Any]) -> str:
    params = ", ".join(sorted(in_f["params"])) or "none"
    return f"gradients of {params}; signals of {len(in_f['out'])} layer(s)" + (
        "; the seed" if in_f["loss"] else ""
    )


@dataclass
class Advice:
    """The result of :func:`advise`: per power of two, how many values are lost; the safe range;
    the recommended static scale; what torch measures at each scale and where dynamic scaling
    settles (torch formats)."""

    network: str
    format: str
    scope: str
    headroom: int
    exact_bits: int
    exact_method: str
    certified_digits: float
    sizes: dict[str, dict[str, int]]
    log2_range: dict[str, list[float] | None]
    rows: list[dict[str, Any]]
    safe: list[int] | None
    safe_gradients: list[int] | None
    normal: list[int] | None
    recommended: int
    reason: str
    dynamic: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    @property
    def recommended_scale(self) -> float:
        return math.ldexp(1.0, self.recommended)

    def row(self, exponent: int) -> dict[str, Any]:
        for r in self.rows:
            if r["exponent"] == exponent:
                return r
        raise KeyError(exponent)

    def to_dict(self) -> dict[str, Any]:
        from fpgrad.jsonutil import jsonable

        return jsonable(
            {
                "schema": "fpgrad.advise/1",
                "network": self.network,
                "format": self.format,
                "scope": self.scope,
                "headroom": self.headroom,
                "exact": {
                    "bits": self.exact_bits,
                    "method": self.exact_method,
                    "certified_digits": self.certified_digits,
                },
                "sizes": self.sizes,
                "log2_range": self.log2_range,
                "safe": self.safe,
                "safe_gradients": self.safe_gradients,
                "normal": self.normal,
                "recommended": {
                    "exponent": self.recommended,
                    "scale": self.recommended_scale,
                    "reason": self.reason,
                },
                "dynamic": self.dynamic,
                "rows": self.rows,
                "notes": self.notes,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Headers and rows of the per-scale table (as :meth:`render` shows it)."""
        g, s = self.sizes["gradients"], self.sizes["signals"]
        measured = any(r.get("measured") for r in self.rows)
        heads = ["scale", "grads underflow", "grads subnormal", "signals underflow", "overflows"]
        if measured:
            heads += ["torch: rounding zeros", "torch: inf/NaN"]
        table = []
        for r in self.rows:
            gr, sg = r["gradients"], r["signals"]
            over = _overflow(r)
            mark = ""
            if r["exponent"] == self.recommended:
                mark = " <- recommended"
            elif self.dynamic and r["exponent"] == self.dynamic.get("settled"):
                mark = " <- dynamic"
            row = [
                f"2^{r['exponent']}{mark}",
                _share(gr["underflow"], g["nonzero"]),
                _share(gr["subnormal"], g["nonzero"]),
                _share(sg["underflow"], s["nonzero"]),
                str(over),
            ]
            if measured:
                m = r.get("measured")
                row += (
                    [
                        f"{m['rounding_zero']} ({m['underflow']} underflow, {m['lost']} lost)",
                        str(m["nonfinite"]),
                    ]
                    if m
                    else ["", ""]
                )
            table.append(row)
        return heads, table

    def summary_lines(self) -> list[str]:
        """The safe range, the recommendation and the dynamic scaler in words."""
        what = "gradient or backward signal" if self.scope == "all" else "gradient"
        lines = [
            f"Safe scales (no {what} underflows, nothing overflows): {_span(self.safe)}"
            + (f"; gradients alone: {_span(self.safe_gradients)}" if self.scope == "all" else ""),
            f"Every {what} also normal (full precision): {_span(self.normal)}",
            f"Recommended static scale: 2^{self.recommended} = {self.recommended_scale:g} "
            f"({self.reason})",
        ]
        if self.dynamic:
            d = self.dynamic
            lines.append(
                f"Dynamic scaling (GradScaler's rules, torch {self.format} at these parameters): "
                f"starts at 2^{d['start']}, skips {d['skipped']} step(s), settles at "
                f"2^{d['settled']}; {d['comparison']}"
            )
        return lines + [f"note: {n}" for n in self.notes]

    def render(self) -> str:
        from tabulate import tabulate

        g, s = self.sizes["gradients"], self.sizes["signals"]
        lines = [
            f"Loss-scale advice: {self.network} in {self.format} "
            f"(exact reference: {self.exact_method}, {self.exact_bits} bits, "
            f"{self.certified_digits:.1f} digits certified)",
            f"gradients: {g['nonzero']} non-zero of {g['elements']} elements, |exact| in "
            f"{_range_text(self.log2_range['gradients'])}",
            f"signals:   {s['nonzero']} non-zero of {s['elements']} backward values dL/d(output), "
            f"|exact| in {_range_text(self.log2_range['signals'])}; seed dL/dL = 1 (scaled: S)",
            "",
        ]
        heads, table = self.table()
        lines.append(tabulate(table, headers=heads, tablefmt="github", disable_numparse=True))
        lines.append("")
        lines += self.summary_lines()
        return "\n".join(lines)


def _range_text(r: list[float] | None) -> str:
    return "none" if r is None else f"2^{r[0]:.1f} .. 2^{r[1]:.1f}"


def _span(r: list[int] | None) -> str:
    if r is None:
        return "none"
    return f"2^{r[0]} .. 2^{r[1]}" if r[0] != r[1] else f"2^{r[0]}"


def _share(n: int, total: int) -> str:
    if n == 0:
        return "0"
    return f"{n} ({100 * n / total:.3g}%)" if total else str(n)


def advise(
    net: Network,
    fmt: str | None = None,
    bits: int = DEFAULT_BITS,
    *,
    policy: str | None = None,
    scope: str = "gradients",
    headroom: int = 3,
    exponents: tuple[int, int] | None = None,
    measure: bool = True,
    allow_uncertified: bool = False,
    exact_max_bits: int = DEFAULT_MAX_BITS,
    exact: ExactResult | None = None,
    progress: bool | None = None,
    values_cache: dict[tuple[str, ...], Any] | None = None,
) -> Advice:
    """Loss-scale advice for ``net`` in the format ``fmt`` (see the module docstring).

    ``scope``: "gradients" (underflow of parameter gradients decides the safe range) or "all"
    (backward signals too). ``exponents``: the table's rows (lo, hi) as powers of two; default
    around the safe range. ``measure``: torch's backward at each row's scale and the dynamic
    scaler (torch formats only). ``fmt`` defaults to float16, or with a precision ``policy``
    (``autocast``, a network file's own) to its narrowest format: only values the policy
    computes in ``fmt`` are judged (gradients of layers computing in it, signals output in it,
    the seed if the loss is), and torch is measured running the policy. ``exact``: a
    precomputed ``exact_trace(net, bits)`` of this same network, reused. ``progress``: bars on
    stderr for phases over 2 s (None: when stderr is a terminal). ``values_cache``: a dict
    shared by calls with the same ``exact`` (the sorted magnitudes of each group of keys are
    built once; compare's diagnosis advises float16 and bfloat16 on one trace).
    """
    plan = None
    if policy is not None:
        from fpgrad.policy import BUILTIN, get_policy

        pol = get_policy(policy, net.policies)
        if pol is None:
            known = ", ".join([*BUILTIN, *net.policies])
            from fpgrad.suggest import did_you_mean

            hint = did_you_mean(policy, [*BUILTIN, *net.policies])
            raise InputError(f"unknown policy {policy!r}{hint}; known: {known}")
        plan = pol.resolve(net)
    if fmt is None:
        fmt = plan.lowest().split(":")[0] if plan is not None else "float16"
    if scope not in SCOPES:
        raise InputError(f"unknown scope {scope!r}; use gradients or all")
    if not isinstance(headroom, int) or headroom < 0:
        raise InputError(f"headroom must be a non-negative integer of binades (got {headroom!r})")
    f = get_format(fmt)
    if f.exp_bits > 8:
        raise InputError(
            f"{f.name} needs no loss scale (its range covers every exact gradient here); "
            "advise for float16, bfloat16 or an 8-bit format"
        )
    if exact is None:
        exact = exact_trace(
            net,
            bits,
            allow_uncertified=allow_uncertified,
            max_bits=exact_max_bits,
            progress=progress,
        )
    in_f = _in_format(net, plan, f.name)

    def values(keys: list[str]) -> _Values:
        if values_cache is None:
            return _Values.of([exact.exact_array(k) for k in keys])
        if tuple(keys) not in values_cache:
            values_cache[tuple(keys)] = _Values.of([exact.exact_array(k) for k in keys])
        return values_cache[tuple(keys)]

    grads = values(
        [
            f"grads/{ly.name}.{p}"
            for ly in net.layers
            if ly.name in in_f["params"]
            for p in ly.params
        ]
    )
    signals = values([f"backward/{ly.name}" for ly in net.layers if ly.name in in_f["out"]])
    n_seed = 1 if in_f["loss"] else 0  # dL/dL = 1: the backward pass starts at S
    seed = _Values(np.ones(n_seed), np.zeros(n_seed), 0)
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
    measurer = (
        _TorchMeasure(net, f.name, exact, lim, plan)
        if measure and f.name in TORCH_FORMATS and (plan is None or not plan.emulated)
        else None
    )
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
    if plan is not None:
        notes.append(
            f"policy {plan.policy} ({plan.describe()}): judged are the values it computes in "
            f"{f.name}: {_sizes_text(in_f)}"
            + ("; measured: torch running the policy" if measurer is not None else "")
        )
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
        network=net.name,
        format=f.name if plan is None else f"{f.name} (policy {plan.policy})",
        scope=scope,
        headroom=headroom,
        exact_bits=bits,
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


class _TorchMeasure:
    """torch's real backward at a loss scale, as fpgrad.train computes it (loss * S, backward):
    in one precision, or running a policy's plan."""

    def __init__(
        self, net: Network, precision: str, exact: Any, lim: _Limits, plan: Plan | None = None
    ):
        from fpgrad.torch_native import TorchModel

        self.net = net
        self.model = TorchModel(net, plan or Plan.uniform(net, precision))
        self.params = list(self.model.named_params().values())
        self.exact = [exact.exact_array(f"grads/{k}") for k in net.params]
        # the format each gradient is computed in (a dense layer's: its compute format)
        self.fmts = [
            get_format(lp.params or lp.compute)
            for ly, lp in zip(net.layers, self.model.plan.layers, strict=True)
            for _ in ly.params
        ]
        self.cache: dict[int, list[np.ndarray]] = {}

    def grads(self, k: int) -> list[np.ndarray]:
        if k not in self.cache:
            from fpgrad.torch_native import one_torch_thread

            with one_torch_thread():
                for p in self.params:
                    p.grad = None
                h = self.model.inputs(self.net)
                for index in range(len(self.net.layers)):
                    h = self.model.layer(index, h)
                loss = self.model.loss(self.net, h)
                scale = math.ldexp(1.0, k)
                (loss * scale if scale != 1.0 else loss).backward()
                self.cache[k] = [
                    p.grad.detach().double().numpy().copy()
                    if p.grad is not None
                    else np.zeros(tuple(p.shape))
                    for p in self.params
                ]
        return self.cache[k]

    def at(self, k: int) -> dict[str, int]:
        out = {"rounding_zero": 0, "underflow": 0, "lost": 0, "nonfinite": 0}
        for ex, g, fmt in zip(self.exact, self.grads(k), self.fmts, strict=True):
            scaled = ExactArray(np.ldexp(ex.hi, k), np.ldexp(ex.lo, k), ex.zero)
            v = classify(scaled, g, fmt)
            rz = v.verdict == "rounding_zero"
            out["rounding_zero"] += int(rz.sum())
            out["underflow"] += int((rz & (v.subkind == "underflow")).sum())
            out["lost"] += int((rz & (v.subkind == "lost")).sum())
            out["nonfinite"] += int(np.isin(v.verdict, ("overflow", "nan")).sum())
        return out

    def dynamic(self, max_steps: int = 200) -> dict[str, Any]:
        """Where torch.amp.GradScaler's rules settle at these parameters: start at 2^16, halve
        and skip on inf/NaN; growth needs 2000 clean steps, so the first clean scale stays."""
        from fpgrad.scaling import DynamicScaler

        scaler = DynamicScaler()
        start = int(math.log2(scaler.scale))
        history = []
        for _ in range(max_steps):
            k = int(math.log2(scaler.scale))
            finite = all(bool(np.all(np.isfinite(g))) for g in self.grads(k))
            history.append({"exponent": k, "finite": finite})
            if scaler.update(finite):
                break
        return {
            "start": start,
            "settled": int(math.log2(scaler.scale)),
            "skipped": sum(not h["finite"] for h in history),
            "steps": history,
        }


__all__ = ["Advice", "advise", "GROUPS", "SCOPES"]
