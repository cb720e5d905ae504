"""Exact rationals of python-flint balls, and the Arb slice engine called directly: the
shared pieces of the tests of :mod:`fpgrad.arith.arb_slices` (an oracle independent of FLINT's
arithmetic: Fraction)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from flint import arb, arb_mat, arf, ctx

from fpgrad.arith import arb_slices


def engine(a: np.ndarray, b: np.ndarray, prec: int) -> np.ndarray | None:
    """The engine itself at any precision and operand widths (matmul leaves some to
    arb_dot)."""
    return arb_slices._product(a, b, prec, arb_slices._jit(), choose=False)


def q(x: arb) -> Fraction:
    """The exact midpoint."""
    man, exp = x.mid().man_exp()
    return Fraction(int(man)) * Fraction(2) ** int(exp)


def r(x: arb) -> Fraction:
    """The exact radius."""
    return q(arb(x.rad()))


def arf_of(v: Fraction | int) -> arf:
    """A dyadic rational as an exact arf (any number of limbs)."""
    v = Fraction(v)
    if v == 0:
        return arf(0)
    d = v.denominator
    assert d & (d - 1) == 0, "dyadic values only"
    return arf((v.numerator, -(d.bit_length() - 1)))


def ball(mid: Fraction | int, rad: Fraction | int = 0) -> arb:
    """An exact dyadic midpoint (any number of limbs) and radius (rounded up by arb)."""
    return arb(arf_of(mid), arf_of(rad))


def obj(rows: list[list[arb]]) -> np.ndarray:
    """A 2-D object array of these balls (no conversion of its elements)."""
    out = np.empty((len(rows), len(rows[0])), dtype=object)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            out[i, j] = v
    return out


def flint_product(a: np.ndarray, b: np.ndarray, prec: int) -> arb_mat:
    """FLINT's own product of the same balls at ``prec`` bits."""
    old = ctx.prec
    ctx.prec = prec
    try:
        return arb_mat(a.tolist()) * arb_mat(b.tolist())
    finally:
        ctx.prec = old
