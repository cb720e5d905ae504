"""``fpgrad explain VALUE``: what happens to one exact number in each format.

The value is parsed exactly (decimals, hex floats and a tiny expression grammar, all evaluated
with fractions), rounded once into each format with :func:`~fpgrad.numbers.rounding.round_exact`, and
described: bits, class, errors, ulp, the largest addend it swamps, and the traps on the way
(underflow, overflow, ties, a first rounding to float64, torch's double-rounding cast).

>>> r = explain("65520", ["float16", "bfloat16"])
>>> [(f["format"], f["value"]) for f in r["formats"]]
[('float16', 'inf'), ('bfloat16', 65536.0)]
>>> explain("1+2**-11", ["float16"])["formats"][0]["notes"][0]
'a tie between 1.0 and 1.0009765625: goes to the even one, 1.0'

Parsing the value exactly is :func:`fpgrad.present.explain_parse.parse_value`.
"""

from __future__ import annotations

import decimal
import math
from fractions import Fraction
from typing import Any

import numpy as np
from tabulate import tabulate

from fpgrad.errors import InputError
from fpgrad.jsonutil import jsonable
from fpgrad.numbers.formats import Format, get_format
from fpgrad.numbers.rounding import Mode, round_exact, round_to
from fpgrad.present.explain_parse import Value, parse_value

DEFAULT_FORMATS = ("float16", "bfloat16", "float32", "float64")
#: torch dtypes whose float64 cast ``explain`` checks against the correct rounding.
TORCH_DTYPE_NAMES = {
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float32": "float32",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


# ---- description -----------------------------------------------------------------------------


def exact_decimal(value: Value, digits: int = 50) -> str:
    """Decimal digits of ``value``: exact when they fit in ``digits``, else truncated + '...'.

    >>> exact_decimal(Fraction(1, 3), 5), exact_decimal(Fraction(2049, 2048))
    ('0.33333...', '1.00048828125')
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, float) and value == 0:
        return "-0" if math.copysign(1, value) < 0 else "0"
    fr = Fraction(value)
    with decimal.localcontext() as ctx:
        ctx.prec, ctx.rounding = digits, decimal.ROUND_DOWN
        ctx.Emax, ctx.Emin = decimal.MAX_EMAX, decimal.MIN_EMIN
        ctx.traps[decimal.Inexact] = False
        ctx.clear_flags()
        q = decimal.Decimal(fr.numerator) / decimal.Decimal(fr.denominator)
        inexact = ctx.flags[decimal.Inexact]
    text = str(q).replace("E", "e")
    if inexact:
        mant, _, exp = text.partition("e")
        text = mant + "..." + (f"e{exp}" if exp else "")
    return text


def _to_float(v: Fraction) -> float:
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def _kind(fmt: Format, v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    if v == 0:
        return "zero"
    return "subnormal" if abs(v) < fmt.smallest_normal else "normal"


def _is_even(fmt: Format, v: float) -> bool:
    """Whether the last significand bit of the finite value ``v`` is 0 (zero is even)."""
    return v == 0 or (fmt.encode(abs(v)) & 1) == 0


def _gap_up(fmt: Format, a: float) -> float:
    """Distance from the value ``a >= 0`` to the next value (unbounded exponent range)."""
    return fmt.ulp(a)


def _gap_down(fmt: Format, a: float) -> float:
    """Distance from the value ``a > 0`` to the previous value (half an ulp at a power of two)."""
    power_of_two = math.frexp(a)[0] == 0.5
    return fmt.ulp(a) / 2 if power_of_two and a > fmt.smallest_normal else fmt.ulp(a)


def _lost(fmt: Format, a: float, gap: float, sign: int) -> float | None:
    """Largest float64 ``t >= 0`` with round(a + sign*t) == a under nearest-even (a >= 0)."""
    half = gap / 2  # a power of two: a float64
    for t in (half, float(np.nextafter(half, 0.0))):
        if round_exact(Fraction(a) + sign * Fraction(t), fmt) == a:
            return t
    return None


def _torch_cast(name: str, x: float) -> float | None:
    """torch's cast of the float64 ``x`` to the dtype of format ``name`` (None: no torch)."""
    if name not in TORCH_DTYPE_NAMES:
        return None
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    dtype = getattr(torch, TORCH_DTYPE_NAMES[name], None)
    if dtype is None:
        return None
    return float(torch.tensor(x, dtype=torch.float64).to(dtype).to(torch.float64).item())


def _same(a: float, b: float) -> bool:
    return (a == b and math.copysign(1, a) == math.copysign(1, b)) or (
        math.isnan(a) and math.isnan(b)
    )


def _describe(
    fmt: Format, exact: Value, x64: float, mode: Mode = Mode.NEAREST_EVEN
) -> dict[str, Any]:
    r = round_exact(exact, fmt, mode)
    finite_in = not (isinstance(exact, float) and not math.isfinite(exact))
    ex = Fraction(exact) if finite_in else None
    notes: list[str] = []
    sign_bits, exp_bits, man_bits = fmt.split_bits(r)
    out: dict[str, Any] = {
        "format": fmt.name,
        "value": r,
        "repr": repr(r),
        "decimal": exact_decimal(r),
        "bits": {"sign": sign_bits, "exponent": exp_bits, "mantissa": man_bits},
        "bits_text": f"{sign_bits}|{exp_bits}|{man_bits}",
        "class": _kind(fmt, r),
        "exact": False,
    }
    # errors
    if ex is None:  # input inf or nan
        same = _same(float(exact), r)
        abs_err = rel_err = 0.0 if same else math.nan if math.isnan(r) else math.inf
        out["exact"] = same
        notes.append(f"the input is {exact}" + ("" if same else f"; {fmt.name} has {r!r}"))
    elif math.isfinite(r):
        diff = abs(Fraction(r) - ex)
        out["abs_error_exact"] = exact_decimal(diff, 20)
        abs_err = _to_float(diff)
        rel_err = _to_float(diff / abs(ex)) if ex != 0 else (0.0 if diff == 0 else math.inf)
        out["exact"] = diff == 0
    else:
        abs_err = rel_err = math.nan if math.isnan(r) else math.inf
    ulp = fmt.ulp(r)
    out.update(
        abs_error=abs_err,
        rel_error=rel_err,
        ulp=ulp,
        error_ulps=abs_err / ulp if math.isfinite(ulp) and math.isfinite(abs_err) else math.nan,
    )
    # swamping: the largest addends (toward larger / smaller magnitude) rounding back to r
    if math.isfinite(r):
        a = abs(r)
        out["lost_addend_up"] = _lost(fmt, a, _gap_up(fmt, a), +1)
        down = _lost(fmt, a, _gap_down(fmt, a), -1) if a else out["lost_addend_up"]
        out["lost_addend_down"] = down
    else:
        out["lost_addend_up"] = out["lost_addend_down"] = None
    if ex is not None and mode == Mode.NEAREST_EVEN:
        notes.extend(_notes(fmt, ex, r, x64))
    elif ex is not None:
        nearest = round_exact(ex, fmt)
        if not _same(nearest, r):
            notes.append(f"rounding {mode.value} gives {r!r}; nearest-even would give {nearest!r}")
    out["notes"] = notes
    return out


def _notes(fmt: Format, ex: Fraction, r: float, x64: float) -> list[str]:
    notes: list[str] = []
    a = abs(ex)
    ss, sn = Fraction(fmt.smallest_subnormal), Fraction(fmt.smallest_normal)
    if math.isfinite(r) and Fraction(r) == ex:
        notes.append(f"exactly representable in {fmt.name}")
    else:
        lo = round_exact(a, fmt, Mode.TOWARD_ZERO)
        up = round_exact(a, fmt, Mode.UP)
        hi = Fraction(up) if math.isfinite(up) and up <= fmt.max else None
        if hi is None:  # above max: the next point of the grid with an unbounded exponent
            hi = Fraction(fmt.max) + Fraction(fmt.ulp(fmt.max))
        if Fraction(lo) + hi == 2 * a:
            s = -1 if ex < 0 else 1
            lo_s, hi_s = repr(s * lo), repr(_to_float(s * hi))
            even = lo_s if _is_even(fmt, lo) else hi_s
            notes.append(f"a tie between {lo_s} and {hi_s}: goes to the even one, {even}")
    if r == 0 and ex != 0:
        if not fmt.subnormals:
            notes.append(f"flushed to zero: below the smallest normal {fmt.smallest_normal!r}")
        elif a < ss / 2:
            notes.append(
                f"underflows to zero: below half the smallest subnormal ({float(ss / 2)!r})"
            )
        else:
            notes.append(
                "underflows to zero: exactly half the smallest subnormal; the tie goes to even"
            )
    elif math.isfinite(r) and 0 < abs(r) < sn:
        bits = int(abs(Fraction(r)) / ss).bit_length()
        notes.append(
            f"subnormal: below the smallest normal {fmt.smallest_normal!r}, "
            f"{bits} significant bit{'s' if bits != 1 else ''} left of {fmt.precision}"
        )
    if not math.isfinite(r):
        what = "NaN" if math.isnan(r) else repr(r)
        why = f" ({fmt.name} has no inf)" if math.isnan(r) and not fmt.has_inf else ""
        notes.append(f"overflows to {what}{why}: above max {fmt.max!r} by half a gap or more")
    elif a > Fraction(fmt.max) and abs(r) == fmt.max:
        notes.append(f"saturates to max {fmt.max!r}")
    # the first rounding: the decimal as a float64
    if not math.isfinite(x64) or Fraction(x64) != ex:
        via64 = float(round_to(x64, fmt)) if math.isfinite(x64) else round_exact(x64, fmt)
        if not _same(via64, r):
            notes.append(
                f"rounding the input to float64 first ({x64!r}) gives {via64!r} here: "
                f"double rounding; the exact value rounds to {r!r}"
            )
    torch_val = _torch_cast(fmt.name, x64)
    if torch_val is not None and not _same(torch_val, r):
        if _same(torch_val, float(round_to(x64, fmt))):
            why = " (its float64 input was already rounded)"
        elif _same(torch_val, float(round_to(round_to(x64, "float32"), fmt))):
            why = " (it rounds through float32 first)"
        else:
            why = ""
        trap = "double rounding trap: " if why else ""
        notes.append(
            f"{trap}torch's float64->{fmt.name} cast gives {torch_val!r} here; "
            f"the correct result is {r!r}{why}"
        )
    return notes


def explain(
    value: str | float,
    formats: list[str] | None = None,
    mode: str = "nearest_even",
    other: str | float | None = None,
) -> dict[str, Any]:
    """How the exact ``value`` rounds (in rounding ``mode``, nearest-even by default) into each
    format; strict-JSON-ready. With ``other`` (a second value b), also ``pair``: per format
    what ``a + b`` (swamping) and ``a * b`` (underflow) give (:func:`pair`).

    Keys: ``input``, ``exact`` (decimal digits, '...' when truncated), ``exact_fraction``,
    ``float64`` (the nearest float64) and ``float64_exact``, and ``formats``: per format
    ``value``/``repr``/``decimal``, ``bits``, ``class`` (zero, subnormal, normal, inf, nan),
    ``abs_error`` (``abs_error_exact``: its decimal digits, for finite results), ``rel_error``,
    ``ulp`` (at the result), ``error_ulps``, ``lost_addend_up``
    and ``lost_addend_down`` (the largest float64 ``t >= 0`` whose addition to / subtraction
    from the result's magnitude rounds back to it under nearest-even: half the gap to the next
    value when the result's significand is even, since the tie goes to even, else the float64
    just below that half; the gap below a power of two is half the gap above), and ``notes``.
    """
    exact = parse_value(value)
    m = _deterministic(mode)
    x64 = round_exact(exact, "float64")  # the float64 nearest to the input
    names = list(formats) if formats else list(DEFAULT_FORMATS)
    fmts = [get_format(n) for n in names]
    fraction = None  # "n/d", when short
    short = isinstance(exact, Fraction) and (
        exact.numerator.bit_length() + exact.denominator.bit_length() <= 280
    )  # str() of a huge Fraction is slow, and refused above 4300 digits
    if short and len(str(exact)) <= 80:
        fraction = str(exact)
    result = {
        "input": str(value),
        "exact": exact_decimal(exact),
        "exact_fraction": fraction,
        "float64": x64,
        "float64_exact": not isinstance(exact, Fraction) or _float64_holds(exact, x64),
        "mode": m.value,
        "formats": [_describe(f, exact, x64, m) for f in fmts],
    }
    if other is not None:
        result["pair"] = pair(value, other, names, m.value)
    return jsonable(result)


def _deterministic(mode: str) -> Mode:
    from fpgrad.numbers.rounding import parse_mode

    m = parse_mode(mode)
    if m in (Mode.STOCHASTIC, Mode.STOCHASTIC_EQUAL):
        raise InputError(
            f"--mode {m.value}: explain rounds one value once; stochastic modes have no single "
            "result (use a deterministic mode: nearest_even, toward_zero, up, down, ...)"
        )
    return m


def pair(
    a: str | float, b: str | float, formats: list[str], mode: str = "nearest_even"
) -> list[dict[str, Any]]:
    """Per format: ``a`` and ``b`` rounded into it, then ``a + b`` and ``a * b`` computed as a
    machine of that format does (the exact result of the rounded operands, rounded once), next
    to the exact results, with what happened: ``swamped`` (b != 0 is lost: the sum is the
    rounded a), ``underflow`` (a non-zero product rounds to 0), ``subnormal``, ``overflow``,
    ``ok``.

    >>> [(p["format"], p["sum"]["what"]) for p in pair("1", "2**-12", ["float16", "float32"])]
    [('float16', 'swamped'), ('float32', 'ok')]
    """
    m = _deterministic(mode)
    ea, eb = parse_value(a), parse_value(b)
    if not all(isinstance(v, Fraction) for v in (ea, eb)):
        raise InputError("the values of a + b and a * b must be finite numbers")
    out = []
    for name in formats:
        fmt = get_format(name)
        ra, rb = round_exact(ea, fmt, m), round_exact(eb, fmt, m)
        row: dict[str, Any] = {"format": fmt.name, "a": ra, "b": rb}
        for op, exact_value in (("sum", ea + eb), ("product", ea * eb)):
            if math.isfinite(ra) and math.isfinite(rb):
                inputs = Fraction(ra) + Fraction(rb) if op == "sum" else Fraction(ra) * Fraction(rb)
                r = round_exact(inputs, fmt, m)
            else:
                r = ra + rb if op == "sum" else ra * rb
            row[op] = {
                "value": r,
                "exact": exact_decimal(exact_value, 20),
                "what": _what(op, fmt, r, ra, rb, exact_value),
            }
        out.append(row)
    return out


def _what(op: str, fmt: Format, r: float, ra: float, rb: float, exact: Fraction) -> str:
    if math.isnan(r) or math.isinf(r):
        return "overflow" if not math.isnan(r) or math.isfinite(ra) else "nan"
    if op == "sum" and rb != 0 and r == ra:
        return "swamped"
    if exact != 0 and r == 0:
        return "underflow"
    if r != 0 and abs(r) < fmt.smallest_normal:
        return "subnormal"
    return "ok"


#: plain-language notes printed under explain's tables
GLOSSARY = (
    "ulp: the gap between a value and its neighbour in the format (unit in the last place); "
    "nearest rounding errs by at most half an ulp",
    "binade: the values between two powers of two, [2^e, 2^(e+1)); inside one the ulp is "
    "constant, and it doubles at the next",
    "subnormal: below the smallest normal the exponent cannot shrink further, so significant "
    "bits are lost one by one until the value underflows to 0",
    "lost addend: the largest t for which x + t rounds back to x; an update smaller than that "
    "is swamped (w + lr*g == w)",
)


def _float64_holds(exact: Fraction, x64: float) -> bool:
    return math.isfinite(x64) and Fraction(x64) == exact


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def render_explain(result: dict[str, Any]) -> str:
    """A readable table of :func:`explain`'s result, with the notes below it."""
    x64 = result["float64"]
    frac = result.get("exact_fraction")
    head = [
        f"value    {result['input']}",
        f"exact    {result['exact']}" + (f"  (= {frac})" if frac and "/" in frac else ""),
        f"float64  {x64 if isinstance(x64, str) else repr(x64)}"
        + ("  (exact)" if result["float64_exact"] else "  (rounded)"),
    ]
    rows = [
        [
            f["format"],
            f["repr"],
            f["class"],
            f["bits_text"],
            _num(f["abs_error"]),
            _num(f["rel_error"]),
            _num(f["ulp"]),
            _num(f["lost_addend_up"]),
        ]
        for f in result["formats"]
    ]
    heads = ["format", "rounded", "class", "sign|exponent|mantissa"]
    heads += ["abs err", "rel err", "ulp", "lost addend"]
    table = tabulate(rows, headers=heads, tablefmt="github", disable_numparse=True)
    notes = [f"  {f['format']}: {n}" for f in result["formats"] for n in f["notes"]]
    lines = head + ["", table] + (["", "notes:"] + notes if notes else [])
    if result.get("mode", "nearest_even") != "nearest_even":
        lines.insert(3, f"mode     {result['mode']}")
    if result.get("pair"):
        rows = [
            [
                p["format"],
                _num(p["a"]),
                _num(p["b"]),
                f"{_num(p['sum']['value'])} ({p['sum']['what']})",
                f"{_num(p['product']['value'])} ({p['product']['what']})",
            ]
            for p in result["pair"]
        ]
        first = result["pair"][0]
        lines += [
            "",
            f"a + b and a * b (exact: {first['sum']['exact']} and {first['product']['exact']}), "
            "the rounded operands computed exactly and rounded once",
            tabulate(
                rows,
                headers=["format", "a", "b", "a + b", "a * b"],
                tablefmt="github",
                disable_numparse=True,
            ),
        ]
    return "\n".join(lines + ["", *(f"{g}" for g in GLOSSARY)])
