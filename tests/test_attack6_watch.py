"""The watch's created/inherited verdicts (attack6) against an exact oracle of each op on its
actual inputs: Python fractions where the op is rational, mpmath at 300 digits otherwise. A
verdict may be undecided; it must never be wrong: every element counted created must have an
exact value without that status, every element counted inherited one with it.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

import mpmath
import pytest
import torch

import fpgrad
from fpgrad.watching.classify import op_stats

aten = torch.ops.aten
F32 = torch.float32
INF, NAN = float("inf"), float("nan")


def _f32(v: list[float]) -> torch.Tensor:
    return torch.tensor(v, dtype=F32)


def _status(x: Any) -> str:
    """ "zero", "inf", "nan" or "finite" of an exact value (None: not a number)."""
    if x is None:
        return "nan"
    if x == 0:
        return "zero"
    if isinstance(x, mpmath.mpf) and mpmath.isinf(x):
        return "inf"
    return "finite"


def _verdicts(func: Any, args: tuple, exact: list[Any]) -> dict[str, int]:
    """op_stats of ``func(*args)`` checked against the exact values per element."""
    out = func(*args)
    (row,) = op_stats(func, args, {}, out)
    flat = out.reshape(-1).tolist()
    truth = {"zeros": [0, 0], "infs": [0, 0], "nans": [0, 0]}  # [created, inherited]
    for got, ex in zip(flat, exact, strict=True):
        kind = "zeros" if got == 0 else "infs" if abs(got) == INF else "nans" if got != got else ""
        if kind:
            same = _status(ex) == {"zeros": "zero", "infs": "inf", "nans": "nan"}[kind]
            truth[kind][1 if same else 0] += 1
    for kind, (created, inherited) in truth.items():
        assert row[f"{kind}_created"] <= created, (kind, row, truth)
        assert row[f"{kind}_inherited"] <= inherited, (kind, row, truth)
        assert row[kind] == created + inherited
    return row


def _q(x: float) -> Any:
    return None if x != x or abs(x) == INF else Fraction(x)


@pytest.mark.parametrize(
    "op",
    [
        ("mul", aten.mul.Tensor, 1e-300, lambda q: q * Fraction(1e-300)),
        ("div", aten.div.Tensor, 1e300, lambda q: q / Fraction(1e300)),
        (
            "mul0d",
            aten.mul.Tensor,
            torch.tensor(1e-300, dtype=torch.float64),
            lambda q: q * Fraction(1e-300),
        ),
    ],  # fmt: skip
    ids=lambda o: o[0],
)
def test_zero_of_a_float64_underflow_is_never_inherited(op: tuple) -> None:
    """``x * 1e-300`` on float32: torch rounds the scalar to 0 and writes 0; the float64
    recompute of ``1e-30 * 1e-300`` underflows to 0 too, and that zero was taken as a proof
    that the exact product is 0 (inherited): 1e-330 is not 0. Now undecided."""
    _, f, scalar, exact = op
    x = _f32([1e-30, 2.0, 0.0, -3e-38])
    row = _verdicts(f, (x, scalar), [exact(_q(v)) for v in x.tolist()])
    assert row["zeros"] == 4 and row["zeros_created"] >= 1  # 2.0 * 1e-300 is decided


def test_scalars_in_range_keep_their_zero_proofs() -> None:
    """A scalar within 2^-600..2^600 keeps float64's proof: ``x * 1e-150`` of float32 values."""
    x = _f32([1e-30, 2.0, 0.0])
    exact = [_q(v) * Fraction(1e-150) for v in x.tolist()]
    row = _verdicts(aten.mul.Tensor, (x, 1e-150), exact)
    assert (row["zeros_created"], row["zeros_inherited"], row["zeros_undecided"]) == (2, 1, 0)


def _mp(f: Callable[[mpmath.mpf], Any]) -> Callable[[float], Any]:
    def run(v: float) -> Any:
        with mpmath.workdps(300):
            if v != v:
                return None
            return f(mpmath.mpf(v))

    return run


def test_inf_of_one_element_is_not_inherited_from_another() -> None:
    """``exp([1000, inf, 1])`` in float32: e^1000 is finite (its inf is created; float64
    overflows too, so undecided), e^inf is inherited. With the inf elsewhere in the tensor both
    infs were called inherited."""
    x = _f32([1000.0, INF, 1.0, -INF])
    row = _verdicts(aten.exp.default, (x,), [_mp(mpmath.exp)(v) for v in x.tolist()])
    assert (row["infs_inherited"], row["infs_undecided"]) == (1, 1)


def test_nan_of_a_float64_overflow_is_not_inherited() -> None:
    """``softplus_backward(1, 1000, beta=1, threshold=1e6)``: torch computes ``z / (z + 1)``
    with ``z = e^1000``, inf / inf in float32 and in float64 alike; the exact value is
    ``1 / (1 + e^-1000)``, a number: the NaN was called inherited."""
    g = torch.ones(3, dtype=F32)
    x = _f32([1000.0, 1.0, NAN])

    def exact(v: float) -> Any:
        return _mp(lambda z: mpmath.exp(z) / (mpmath.exp(z) + 1))(v)

    row = _verdicts(
        aten.softplus_backward.default, (g, x, 1.0, 1e6), [exact(v) for v in x.tolist()]
    )
    assert row["nans"] == 2 and row["nans_inherited"] == 1  # the NaN input's element


def test_cumprod_nan_after_overflow_is_not_inherited() -> None:
    """``cumprod([3e38] * 12 + [0])``: the last exact value is 0 (a number), float32 gives
    inf * 0 = NaN and float64 overflows to inf * 0 = NaN as well."""
    x = _f32([3e38] * 12 + [0.0])
    exact, p = [], Fraction(1)
    for v in x.tolist():
        p *= Fraction(v)
        exact.append(p)
    row = _verdicts(aten.cumprod.default, (x, 0), exact)
    assert row["nans"] == 1 and row["nans_inherited"] == 0


def test_zero_over_zero_stays_inherited() -> None:
    """0/0 of the inputs is not a number exactly: inherited (float64 cannot overflow here)."""
    a, b = _f32([0.0, 0.0, 1.0]), _f32([0.0, 1.0, 0.0])
    row = _verdicts(aten.div.Tensor, (a, b), [None, Fraction(0), None])
    assert row["nans_inherited"] == 1 and row["zeros_inherited"] == 1


def test_watch_end_to_end_on_an_exp_with_a_masked_inf() -> None:
    """Through ``fpgrad.watch``: a float32 forward ``exp(x + b)`` with one input +inf and one
    overflowing: one inf inherited, one not (created or undecided), never two inherited."""

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(x + self.b)

    model = M()
    with fpgrad.watch(model) as w:
        model(_f32([1000.0, INF, 0.5])).sum()
    recs = w.records()
    rows = recs.to_dict("records") if hasattr(recs, "to_dict") else recs
    (row,) = [r for r in rows if r.get("op") == "aten.exp.default"]
    assert row["infs"] == 2 and row["infs_inherited"] == 1
