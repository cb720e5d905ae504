"""The strict machine's normal CDF and density (GELU) against MPFR, on every float16 and
bfloat16 input: correctly rounded in each mode tested (gmpy2 at 300 bits, then one MPFR
rounding into the format, with a check that the 300-bit value is far from every rounding
boundary, so the reference is itself correctly rounded)."""

from __future__ import annotations

import gmpy2
import numpy as np
import pytest
import torch
from torch import nn

import fpgrad
from fpgrad.arith.emulated import EmulatedArith
from fpgrad.numbers.rounding import Mode

#: (precision, emin, emax) of MPFR contexts with subnormals, as gmpy2.ieee() builds them
FORMATS = {"float16": (11, -23, 16), "bfloat16": (8, -132, 128)}
MODES = {Mode.NEAREST_EVEN: gmpy2.RoundToNearest, Mode.UP: gmpy2.RoundUp,
         Mode.DOWN: gmpy2.RoundDown}  # fmt: skip


def _inputs(fmt: str) -> np.ndarray:
    bits = np.arange(2**16, dtype=np.uint16)
    if fmt == "float16":
        x = bits.view(np.float16).astype(np.float64)
    else:
        x = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).to(torch.float64).numpy()
    return x[np.isfinite(x)]


_VALUES: dict[tuple[str, str], tuple[list, list, list, list]] = {}


def _exact(fn: str, fmt: str, x: np.ndarray) -> tuple[list, list, list, list]:
    """Per input: the value as base (0 or 1, exact) + tail (300 bits), and the tail
    perturbed by -+2**-280 relative (cached). Phi(x) = 1 - erfc(x / sqrt 2) / 2 for x > 0:
    the tail keeps its relative accuracy where Phi(x) is 1 to 300 bits."""
    if (fn, fmt) not in _VALUES:
        wide = gmpy2.context(precision=300, emin=gmpy2.get_emin_min(), emax=gmpy2.get_emax_max())
        with gmpy2.context(wide):  # Phi(-65504) ~ 2**-3e9: below MPFR's default range
            r2, rpi = gmpy2.sqrt(gmpy2.mpfr(2)), gmpy2.sqrt(2 * gmpy2.const_pi())
            eps = gmpy2.mpfr(2) ** -280
            base, tail = [], []
            for v in x.tolist():
                m = gmpy2.mpfr(v)
                if fn == "npdf":
                    t = gmpy2.exp(-m * m / 2) / rpi
                else:
                    t = gmpy2.erfc(abs(m) / r2) / 2
                if t == 0:  # MPFR underflows near 2**-2**30 (|x| > 38000): the value is
                    assert abs(v) > 1000  # positive and below 2**-10**6, as is this
                    t = gmpy2.mpfr(2) ** -(10**6)  # stand-in: both round alike in the format
                base.append(1 if fn == "ncdf" and v > 0 else 0)
                tail.append(-t if fn == "ncdf" and v > 0 else t)
            _VALUES[fn, fmt] = (base, tail, [t * (1 - eps) for t in tail],
                                [t * (1 + eps) for t in tail])  # fmt: skip
    return _VALUES[fn, fmt]


def _reference(fn: str, x: np.ndarray, fmt: str, mode: Mode) -> np.ndarray:
    """MPFR's correctly rounded ``base + tail`` in the format; asserts that every tail within
    2**-280 of the 300-bit one rounds the same (so the exact value does), except exact
    results (Phi(0) = 1/2)."""
    prec, emin, emax = FORMATS[fmt]
    low = gmpy2.context(precision=prec, emin=emin, emax=emax, subnormalize=True,
                        round=MODES[mode])  # fmt: skip
    base, tail, below, above = _exact(fn, fmt, x)
    with gmpy2.context(low):
        out = np.array([float(b + t) for b, t in zip(base, tail, strict=True)])
        lo = np.array([float(b + t) for b, t in zip(base, below, strict=True)])
        hi = np.array([float(b + t) for b, t in zip(base, above, strict=True)])
    exact = (x == 0) & (fn == "ncdf")
    assert np.all(((lo == out) & (hi == out)) | exact)
    return out


@pytest.mark.parametrize(
    ("fmt", "mode"),
    [
        ("float16", Mode.NEAREST_EVEN),
        ("float16", Mode.UP),
        ("float16", Mode.DOWN),
        ("bfloat16", Mode.NEAREST_EVEN),
    ],  # fmt: skip
)
def test_ncdf_npdf_correctly_rounded_on_every_input(fmt: str, mode: Mode) -> None:
    x = _inputs(fmt)
    ar = EmulatedArith(fmt, mode=mode)
    for fn in ("ncdf", "npdf"):
        got = getattr(ar, fn)(ar.asarray(x))
        want = _reference(fn, x, fmt, mode)
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, (
            f"{fn} {fmt} {mode}: {x[bad[:5]]} -> {got[bad[:5]]}, MPFR {want[bad[:5]]}"
        )


def test_gelu_model_has_an_emulated_column() -> None:
    from fpgrad.diagnose.comparison import compare

    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    net = fpgrad.from_module(model, torch.randn(5, 3), torch.randn(5, 2), nn.MSELoss())
    result = compare(net, "float32:emulated,bfloat16:emulated")
    counts = result.counts("float32:emulated")
    assert counts["ok"] == sum(p.numel() for p in model.parameters())
    assert result.counts("bfloat16:emulated")["nan"] == 0
