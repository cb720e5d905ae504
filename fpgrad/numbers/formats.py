"""Binary floating-point formats as data; every constant is derived.

A :class:`Format` holds only its defining fields (exponent bits, stored mantissa bits,
subnormal support, special-value policy). Names follow ``numpy.finfo``: ``eps``,
``smallest_subnormal``, ``smallest_normal``, ``max``.

>>> FLOAT16.max, FLOAT16.smallest_subnormal == 2.0**-24
(65504.0, True)
>>> get_format("fp8_e4m3").max
448.0
>>> get_format("e5m7").precision
8
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

from fpgrad.errors import InputError


class Special(Enum):
    """How the all-ones exponent field is used."""

    IEEE = "ieee"  #: IEEE 754: all-ones exponent holds inf (mantissa 0) and NaNs.
    FN = "fn"  #: finite+NaN (OCP e4m3fn): all-ones exponent is normal, except S.1111.111 = NaN.


class Overflow(Enum):
    """What a rounded magnitude above ``max`` becomes (for round-to-nearest modes)."""

    INF = "inf"  #: +-inf (IEEE formats).
    NAN = "nan"  #: NaN (formats without inf, e.g. e4m3fn, as in ml_dtypes and the OCP spec).
    SATURATE = "saturate"  #: +-max.


@dataclass(frozen=True)
class Format:
    """A binary floating-point format with ``1 + exp_bits + man_bits`` bits."""

    name: str
    exp_bits: int  #: width of the biased exponent field.
    man_bits: int  #: stored fraction bits (the leading 1 of normals is implicit).
    subnormals: bool = True  #: gradual underflow; False flushes subnormal results to zero.
    special: Special = Special.IEEE  #: use of the all-ones exponent.
    overflow: Overflow | None = None  #: None: INF for IEEE, NAN for FN formats.

    def __post_init__(self) -> None:
        if not 2 <= self.exp_bits <= 11:
            raise InputError(
                f"format {self.name!r}: exponent bits must be 2..11 (got {self.exp_bits}); "
                "formats must fit inside float64"
            )
        if not 1 <= self.man_bits <= 52:
            raise InputError(
                f"format {self.name!r}: mantissa bits must be 1..52 (got {self.man_bits}); "
                "formats must fit inside float64"
            )

    # ---- derived constants -------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Total storage bits."""
        return 1 + self.exp_bits + self.man_bits

    @property
    def precision(self) -> int:
        """Significand bits including the implicit leading bit (p)."""
        return self.man_bits + 1

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emax(self) -> int:
        """Largest unbiased exponent of a finite value."""
        top = 2**self.exp_bits - 1  # all-ones biased exponent
        return (top - 1 if self.special is Special.IEEE else top) - self.bias

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def overflow_policy(self) -> Overflow:
        if self.overflow is not None:
            return self.overflow
        return Overflow.INF if self.special is Special.IEEE else Overflow.NAN

    @property
    def has_inf(self) -> bool:
        return self.special is Special.IEEE

    @property
    def eps(self) -> float:
        """Distance from 1.0 to the next larger number: 2**-man_bits."""
        return math.ldexp(1.0, -self.man_bits)

    @property
    def smallest_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive number (the smallest normal when subnormals are off)."""
        if not self.subnormals:
            return self.smallest_normal
        return math.ldexp(1.0, self.emin - self.man_bits)

    @property
    def max(self) -> float:
        """Largest finite value."""
        if self.special is Special.IEEE:
            frac = 2.0 - math.ldexp(1.0, -self.man_bits)  # all-ones mantissa
        else:
            frac = 2.0 - math.ldexp(1.0, 1 - self.man_bits)  # all-ones mantissa is NaN
        return math.ldexp(frac, self.emax)

    @property
    def quantum_min(self) -> int:
        """Exponent of the spacing of the subnormal grid: emin - man_bits."""
        return self.emin - self.man_bits

    def ulp(self, x: float) -> float:
        """Spacing of the grid of this format at the finite value ``x`` (ulp(x), Goldberg)."""
        if not math.isfinite(x):
            return math.nan
        if x == 0.0:
            return self.smallest_subnormal
        e = max(math.frexp(abs(x))[1] - 1, self.emin)
        return math.ldexp(1.0, e - self.man_bits)

    # ---- bit views ---------------------------------------------------------------------
    def encode(self, x: float) -> int:
        """Bit pattern of ``x``, which must be a value of this format (or inf/NaN)."""
        m = self.man_bits
        sign = 1 if math.copysign(1.0, x) < 0 else 0
        top = 2**self.exp_bits - 1
        if math.isnan(x):
            e_field, frac = top, 2**m - 1 if self.special is Special.FN else 2 ** (m - 1)
            return (sign << (self.exp_bits + m)) | (e_field << m) | frac
        a = abs(x)
        if math.isinf(a):
            if not self.has_inf:
                raise ValueError(f"{self.name} has no infinity")
            return (sign << (self.exp_bits + m)) | (top << m)
        if a == 0.0:
            return sign << (self.exp_bits + m)
        e = math.frexp(a)[1] - 1
        if e < self.emin:  # subnormal: integer multiple of the smallest subnormal
            frac_f = math.ldexp(a, -self.quantum_min)
            e_field = 0
        else:
            frac_f = math.ldexp(a, m - e) - 2**m
            e_field = e + self.bias
        if frac_f != int(frac_f) or e_field > (top if self.special is Special.FN else top - 1):
            raise ValueError(f"{x!r} is not a value of {self.name}")
        return (sign << (self.exp_bits + m)) | (e_field << m) | int(frac_f)

    def decode(self, code: int) -> float:
        """Value of the bit pattern ``code`` (an int in ``0 .. 2**bits - 1``)."""
        m = self.man_bits
        sign = -1.0 if (code >> (self.exp_bits + m)) & 1 else 1.0
        e_field = (code >> m) & (2**self.exp_bits - 1)
        frac = code & (2**m - 1)
        top = 2**self.exp_bits - 1
        if self.special is Special.IEEE and e_field == top:
            return sign * math.inf if frac == 0 else math.nan
        if self.special is Special.FN and e_field == top and frac == 2**m - 1:
            return math.nan
        if e_field == 0:
            return sign * math.ldexp(float(frac), self.quantum_min)
        return sign * math.ldexp(float(2**m + frac), e_field - self.bias - m)

    def split_bits(self, x: float) -> tuple[str, str, str]:
        """``(sign, exponent, mantissa)`` bit strings of a value of this format."""
        code = self.encode(x)
        m, e = self.man_bits, self.exp_bits
        return (
            str(code >> (e + m)),
            format((code >> m) & (2**e - 1), f"0{e}b"),
            format(code & (2**m - 1), f"0{m}b"),
        )

    def describe(self) -> dict[str, object]:
        """The format's fields and derived constants, JSON-ready."""
        return {
            "name": self.name,
            "bits": self.bits,
            "exponent_bits": self.exp_bits,
            "mantissa_bits": self.man_bits,
            "precision": self.precision,
            "subnormals": self.subnormals,
            "special": self.special.value,
            "overflow": self.overflow_policy.value,
            "emin": self.emin,
            "emax": self.emax,
            "eps": self.eps,
            "smallest_subnormal": self.smallest_subnormal,
            "smallest_normal": self.smallest_normal,
            "max": self.max,
        }


FLOAT16 = Format("float16", 5, 10)
BFLOAT16 = Format("bfloat16", 8, 7)
FLOAT32 = Format("float32", 8, 23)
FLOAT64 = Format("float64", 11, 52)
TF32 = Format("tf32", 8, 10)
FP8_E4M3 = Format("fp8_e4m3", 4, 3, special=Special.FN)
FP8_E5M2 = Format("fp8_e5m2", 5, 2)

#: The catalogue: one line per format.
CATALOGUE: dict[str, Format] = {
    f.name: f for f in (FLOAT16, BFLOAT16, FLOAT32, FLOAT64, TF32, FP8_E4M3, FP8_E5M2)
}
ALIASES: dict[str, str] = {
    "half": "float16",
    "fp16": "float16",
    "bf16": "bfloat16",
    "single": "float32",
    "fp32": "float32",
    "double": "float64",
    "fp64": "float64",
    "e4m3": "fp8_e4m3",
    "e4m3fn": "fp8_e4m3",
    "fp8_e4m3fn": "fp8_e4m3",
    "float8_e4m3fn": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
    "float8_e5m2": "fp8_e5m2",
}
#: The formats torch computes in natively on this CPU.
NATIVE = ("float16", "bfloat16", "float32", "float64")

_CUSTOM = re.compile(r"^e(\d{1,4})m(\d{1,4})$")  # more digits are out of range anyway


def get_format(name: str) -> Format:
    """The catalogue format called ``name`` (or an alias), or a custom IEEE ``eXmY``."""
    if not isinstance(name, str):
        raise InputError(
            f"a format name must be a string such as 'float16' or 'e5m2' (got {type(name).__name__})"
        )
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in CATALOGUE:
        return CATALOGUE[key]
    match = _CUSTOM.match(key)
    if match:
        return Format(key, int(match.group(1)), int(match.group(2)))
    from fpgrad.suggest import did_you_mean

    known = ", ".join(list(CATALOGUE) + ["eXmY"])
    shown = name if len(name) <= 40 else name[:40] + "..."
    hint = did_you_mean(key, [*CATALOGUE, *ALIASES]) if len(key) <= 40 else ""
    raise InputError(f"unknown format {shown!r}{hint}; known formats: {known}")
