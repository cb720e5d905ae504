"""What fpgrad's exact reference claims, element by element, checked against the oracle.

The claims API (:meth:`ExactResult.enclosure`, ``zero``, ``undetermined``) is used when the
result has it; otherwise the claims are derived from today's fields: the midpoint is the value
in ``result.trace``, a zero claim is ``digits == inf``, an undetermined value is one with
``digits <= 0`` (no digit certified: the ball may contain 0), and the radius is the one the
digits imply, ``|mid| 10**-digits`` (checked as the digits are, not as a float64 radius). The checks per element:

- enclosure: ``|oracle - mid| <= rad``;
- zero claim: the oracle is exactly 0;
- certified (neither zero nor undetermined): the oracle is not 0, has the sign of ``mid`` and
  ``|oracle - mid| <= |mid| 10**-digits`` (a relative slack of 1e-9 on the digit value only).

An element whose oracle class is UNKNOWN is not checked; it is counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mpmath
import numpy as np
from gmpy2 import mpq

from fpgrad.errors import InputError
from fpgrad.graph.layers import exact_trace
from tests.oracle.reference import UNKNOWN, ZERO, OracleResult, oracle

DIGIT_SLACK = 1e-9  # relative slack on 10**-digits (the float digit value)
ORACLE_SLACK = mpmath.ldexp(1, -900)  # relative error of an oracle mpf (runs agree to 2**-1000)
#: comparisons at 30,000 bits (exponents unbounded): exact for the dyadic values of the exact
#: cases, and far below ORACLE_SLACK otherwise; exact rationals of huge exponents never built
_CMP = mpmath.MPContext()
_CMP.prec = 30000


@dataclass
class Claims:
    """One key's claims: midpoints (object array of mpf), radii, masks and digits."""

    mid: np.ndarray
    rad: np.ndarray
    zero: np.ndarray
    undetermined: np.ndarray
    digits: np.ndarray
    #: claims derived from digits (no enclosure API): the radius is implied by the digits,
    #: so the digit check covers it (a float64 radius would underflow below 1e-308)
    derived: bool = False


def claims(result: Any, key: str) -> Claims:
    """The claims of ``result`` (an :class:`fpgrad.reference.exact.ExactResult`) about ``key``."""
    digits = np.asarray(result.digits[key], dtype=np.float64)
    if hasattr(result, "enclosure"):
        mid, rad = result.enclosure(key)
        return Claims(
            np.asarray(mid, dtype=object),
            np.asarray(rad, dtype=np.float64),
            np.asarray(result.zero(key), dtype=bool),
            np.asarray(result.undetermined(key), dtype=bool),
            digits,
        )
    mid = np.asarray(_lookup(result.trace, key), dtype=object)
    zero = np.isinf(digits)
    undetermined = ~zero & (digits <= 0)
    mag = np.array([float(abs(v)) for v in mid.ravel()]).reshape(mid.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        rad = np.where(zero, 0.0, np.where(undetermined, np.inf, mag * 10.0**-digits))
    return Claims(mid, rad, zero, undetermined, digits, derived=True)


def _lookup(trace: Any, key: str) -> Any:
    if key == "loss":
        return trace.loss
    section, name = key.split("/", 1)
    return getattr(trace, section)[name]


@dataclass
class Tally:
    """Counts over many checks, and the first few failures (for the message)."""

    networks: int = 0
    values: int = 0
    wrong_certified: int = 0
    false_zeros: int = 0
    enclosure_failures: int = 0
    undetermined: int = 0
    oracle_unknown: int = 0
    refused: int = 0  # exact_trace raised InputError (allowed: a refusal claims nothing)
    failures: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        for name in (
            "networks",
            "values",
            "wrong_certified",
            "false_zeros",
            "enclosure_failures",
            "undetermined",
            "oracle_unknown",
            "refused",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.extend(other.failures[: max(0, 20 - len(self.failures))])

    @property
    def wrong(self) -> int:
        return self.wrong_certified + self.false_zeros + self.enclosure_failures

    def line(self) -> str:
        return (
            f"networks {self.networks}, values checked {self.values}, wrong certified "
            f"{self.wrong_certified}, false zeros {self.false_zeros}, enclosure failures "
            f"{self.enclosure_failures}, undetermined {self.undetermined}, oracle unknown "
            f"{self.oracle_unknown}, refused {self.refused}"
        )


def check(result: Any, ref: OracleResult, label: str = "") -> Tally:
    """Every claim of ``result`` against the oracle ``ref``."""
    tally = Tally(networks=1)
    for key in result.keys():
        c = claims(result, key)
        values, status = ref.values[key], ref.status[key]
        if c.mid.shape != values.shape:
            raise AssertionError(f"{label} {key}: shape {c.mid.shape} vs oracle {values.shape}")
        for i in np.ndindex(values.shape):
            why = _check_one(c, i, values[i], int(status[i]))
            if why is None:
                continue
            kind, text = why
            if kind == "unknown":
                tally.oracle_unknown += 1
                continue
            if kind == "undetermined":
                tally.undetermined += 1
                tally.values += 1
                continue
            tally.values += 1
            if kind == "ok":
                continue
            setattr(tally, kind, getattr(tally, kind) + 1)
            if len(tally.failures) < 20:
                tally.failures.append(f"{label} {key}{list(i)}: {text}")
    return tally


def _check_one(c: Claims, i: tuple[int, ...], truth: Any, status: int) -> tuple[str, str] | None:
    if status == UNKNOWN:
        return "unknown", ""
    mid, rad = c.mid[i], float(c.rad[i])
    exact_zero = status == ZERO
    t = _CMP.mpf(0) if exact_zero else _to_cmp(truth)
    m = _to_cmp(mid)
    err = abs(t - m)
    slack = abs(t) * ORACLE_SLACK
    # one category per element, the most severe first
    if c.zero[i]:
        if not exact_zero:
            return "false_zeros", f"claimed exact zero, oracle {_show(t)}"
    elif not c.undetermined[i]:
        d = float(c.digits[i])
        if exact_zero:
            return "wrong_certified", f"{d:.1f} digits certified for {_show(m)}, oracle exactly 0"
        if (t > 0) != (m > 0):
            return "wrong_certified", f"sign: mid {_show(m)}, oracle {_show(t)} ({d:.1f} digits)"
        bound = abs(m) * _CMP.mpf(10.0 ** -min(d, 300)) * (1 + DIGIT_SLACK) if d <= 300 else 0
        if err > bound + slack:
            rel = float(err / abs(t))
            return "wrong_certified", (
                f"{d:.1f} digits certified, relative error {rel:.2e} "
                f"(oracle {_show(t)}, mid {_show(m)})"
            )
    if not c.derived and math.isfinite(rad) and err > rad + slack:
        return "enclosure_failures", (
            f"|oracle - mid| = {float(err):.3e} > rad {rad:.3e} (oracle {_show(t)}, mid {_show(m)})"
        )
    return ("undetermined", "") if c.undetermined[i] and not c.zero[i] else ("ok", "")


def _to_cmp(v: Any) -> Any:
    """An mpq, mpf (any context) or float at the comparison precision."""
    if isinstance(v, type(mpq(0))):
        return _CMP.mpf(int(v.numerator)) / _CMP.mpf(int(v.denominator))
    return _CMP.mpf(v)


def _show(v: Any) -> str:
    return "0" if v == 0 else mpmath.nstr(mpmath.mpf(v), 8)


def run_one(net: Any, bits: int | None = None) -> Tally:
    """``exact_trace(net, allow_uncertified=True)`` (at ``bits`` if given) against the oracle."""
    try:
        if bits is None:
            result = exact_trace(net, allow_uncertified=True)
        else:
            result = exact_trace(net, bits, allow_uncertified=True)
    except InputError:
        return Tally(networks=1, refused=1)
    return check(result, oracle(net), net.name)
