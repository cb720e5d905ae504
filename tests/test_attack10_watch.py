"""The watch's created/inherited verdicts (attack10) against an exact oracle: Python fractions
of each input element with the op's exact semantics (the scalar arguments unrounded, as in
tests/test_attack6_watch.py). A verdict may be undecided; it must never be wrong: an element
counted created must have an exact value without that status, one counted inherited one with
it. This round: integer tensors, Python ints beyond 2^53, scatter's accumulating overloads,
non-pointwise ops with a non-finite input elsewhere, and cases that held (kept as guards).
"""

from __future__ import annotations

import warnings
from fractions import Fraction
from typing import Any

import pytest
import torch

import fpgrad
from fpgrad.watching.classify import op_stats

aten = torch.ops.aten
F32 = torch.float32
INF, NAN = float("inf"), float("nan")


def _status(x: Any) -> str:
    """ "zero", "inf", "nan" or "finite" of an exact value (None: not a number; "inf" for
    the strings "+inf" / "-inf")."""
    if x is None:
        return "nan"
    if isinstance(x, str):
        return "inf"
    return "zero" if x == 0 else "finite"


def _check(func: Any, args: tuple, kwargs: dict, exact: list[Any]) -> dict[str, Any]:
    """op_stats of ``func(*args, **kwargs)`` checked against the exact value of each output
    element (row-major): created <= truly created, inherited <= truly inherited."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = func(*args, **kwargs)
    (row,) = op_stats(func, args, kwargs, out)
    truth = {"zeros": [0, 0], "infs": [0, 0], "nans": [0, 0]}  # [created, inherited]
    for got, ex in zip(out.reshape(-1).tolist(), exact, strict=True):
        kind = "zeros" if got == 0 else "infs" if abs(got) == INF else "nans" if got != got else ""
        if kind:
            same = _status(ex) == {"zeros": "zero", "infs": "inf", "nans": "nan"}[kind]
            truth[kind][1 if same else 0] += 1
    for kind, (created, inherited) in truth.items():
        assert row[kind] == created + inherited, (kind, row, truth)
        assert row[f"{kind}_created"] <= created, (kind, row, truth)
        assert row[f"{kind}_inherited"] <= inherited, (kind, row, truth)
    return row


# ---- found: false "inherited" verdicts ---------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        ("mul", aten.mul.Tensor, lambda q: q * Fraction(1e-50)),
        ("div", aten.div.Tensor, lambda q: q / Fraction(1e50)),
    ],
    ids=lambda c: c[0],
)
def test_integer_tensor_times_a_small_scalar(case: tuple) -> None:
    """``int64 tensor * 1e-50`` is a float32 tensor of zeros (the scalar rounds to 0 in
    float32). The "float64 recompute" left the integer tensor as it was, so it ran in float32
    again and its zeros were taken as proofs: 3e-50 is not 0."""
    _, func, exact = case
    x = torch.tensor([3, 0, -1])
    scalar = 1e-50 if func is aten.mul.Tensor else 1e50
    row = _check(func, (x, scalar), {}, [exact(Fraction(v)) for v in x.tolist()])
    assert (row["zeros_created"], row["zeros_inherited"]) == (2, 1)  # widened exactly


def test_integer_tensors_are_widened_exactly_or_not_at_all() -> None:
    """``arange(4) * -2e-46`` (a positional-encoding pattern; the scalar rounds to -0.0 in
    float32): the recompute widens the integers exactly, so 0 * c is inherited and k * c
    created; an integer beyond 2^53 is not widened (undecided)."""
    x = torch.arange(4)
    c = -2e-46
    row = _check(aten.mul.Tensor, (x, c), {}, [Fraction(v) * Fraction(c) for v in x.tolist()])
    assert (row["zeros_created"], row["zeros_inherited"]) == (3, 1)
    big = torch.tensor([2**60 + 1, 0])
    exact = [Fraction(v) * Fraction(1e-50) for v in big.tolist()]
    row = _check(aten.mul.Tensor, (big, 1e-50), {}, exact)
    assert row["zeros"] == 2 and row["zeros_undecided"] == 2


def test_where_on_an_integer_tensor_with_a_small_scalar() -> None:
    """``where(c, int64 tensor, 1e-50)``: float32, 1e-50 written as 0; the recompute ran in
    float32 too and called that zero inherited."""
    c = torch.tensor([True, False, True])
    x = torch.tensor([3, 7, 0])
    exact = [Fraction(3), Fraction(1e-50), Fraction(0)]
    row = _check(aten.where.ScalarOther, (c, x, 1e-50), {}, exact)
    assert (row["zeros_created"], row["zeros_inherited"]) == (1, 1)


def test_python_int_beyond_float64() -> None:
    """``x + (-(2^60 + 1))`` on float32 ``x = 2^60``: the int rounds to ``-2^60`` in float32
    and in float64 alike, so both give 0; exactly it is -1. The zero was called inherited."""
    x = torch.tensor([2.0**60, 1.0], dtype=F32)
    s = -(2**60 + 1)
    row = _check(aten.add.Tensor, (x, s), {}, [Fraction(v) + s for v in x.tolist()])
    assert row["zeros"] == 1


def test_scatter_add_cancellation() -> None:
    """``scatter(zeros(1), 0, [0, 0, 0], [2^100, 1, -2^100], reduce="add")``: an accumulating
    overload of an op filed as exact (one rounding): float64 rounds 2^100 + 1 to 2^100 as
    float32 does, the zero was called inherited; exactly the sum is 1."""
    src = torch.tensor([2.0**100, 1.0, -(2.0**100)], dtype=F32)
    idx = torch.zeros(3, dtype=torch.int64)
    args = (torch.zeros(1, dtype=F32), 0, idx, src)
    row = _check(aten.scatter.reduce, args, {"reduce": "add"}, [Fraction(1)])
    assert row["zeros"] == 1


def test_scatter_multiply_underflow() -> None:
    """``scatter(ones(1), 0, [0] * 12, [1e-30] * 12, reduce="multiply")``: 1e-360 underflows
    in float64 as well; the zero was called inherited."""
    src = torch.full((12,), 1e-30, dtype=F32)
    idx = torch.zeros(12, dtype=torch.int64)
    args = (torch.ones(1, dtype=F32), 0, idx, src)
    exact = Fraction(1)
    for v in src.tolist():
        exact *= Fraction(v)
    row = _check(aten.scatter.reduce, args, {"reduce": "multiply"}, [exact])
    assert row["zeros"] == 1


def _cumprod_exact(x: torch.Tensor) -> list[Any]:
    out: list[Any] = []
    for r in x.tolist():
        p: Any = Fraction(1)
        for v in r:
            if p is None or v != v:
                p = None
            elif isinstance(p, str) or abs(v) == INF:  # an infinite factor (or product)
                p = None if p == 0 or (v == 0) else "inf"
            else:
                p *= Fraction(v)
            out.append(p)
    return out


def test_cumprod_overflow_beside_an_inf_input() -> None:
    """``cumprod`` along rows of ``[[3e38] * 12 + [0], [inf] * 13]``: row 0 overflows float64
    from the 9th product on (finite exactly) and ends in inf * 0 = NaN (0 exactly). Row 1's
    infs made every float64 inf and NaN of the call "inherited" (any input not finite)."""
    x = torch.tensor([[3e38] * 12 + [0.0], [INF] * 13], dtype=F32)
    row = _check(aten.cumprod.default, (x, 1), {}, _cumprod_exact(x))
    assert row["infs"] == 24 and row["nans"] == 1


def test_float64_input_sum_overflow_beside_an_inf() -> None:
    """``sum(x, 1, dtype=float32)`` of float64 rows ``[1e308, 1e308, 1]`` and ``[inf, 1, 1]``:
    row 0 is finite exactly (2e308 + 1), inf in float32 and in float64 (the recompute can
    overflow on float64 inputs); row 1's inf made it inherited."""
    x = torch.tensor([[1e308, 1e308, 1.0], [INF, 1.0, 1.0]], dtype=torch.float64)
    exact = [Fraction(1e308) * 2 + 1, "inf"]
    row = _check(aten.sum.dim_IntList, (x, [1]), {"dtype": F32}, exact)
    assert row["infs"] == 2


def test_softplus_backward_of_an_inf_gradient() -> None:
    """``softplus_backward(inf, 1000)``: ``inf * z / (z + 1)`` with ``z = e^1000`` is inf
    exactly (the factor is about 1), NaN in float32 and float64 (inf / inf); the inf input at
    that element made the NaN inherited. A NaN input still makes it inherited."""
    g = torch.tensor([INF, 1.0, NAN], dtype=F32)
    x = torch.tensor([1000.0, 1.0, 1.0], dtype=F32)
    exact = ["inf", Fraction(1), None]  # (the middle element is a number: not checked)
    row = _check(aten.softplus_backward.default, (g, x, 1.0, 1e6), {}, exact)
    assert row["nans"] == 2 and row["nans_inherited"] == 1


@pytest.mark.parametrize(
    "case",
    [
        ("fill", aten.fill.Scalar, lambda x: (x, 1e-40)),
        ("where", aten.where.ScalarOther, lambda x: (torch.tensor([True, False, False]), x, 1e-40)),
    ],
    ids=lambda c: c[0],
)
def test_subnormal_scalar_argument_is_inherited(case: tuple) -> None:
    """Subnormals are split per call: created when no input holds a subnormal of the output's
    format. ``fill(x, 1e-40)`` and ``where(c, x, 1e-40)`` write the subnormal they were given
    (as ``where(c, x, tensor(1e-40))`` does, called inherited); the Python scalar was not seen
    as an input and the subnormals were called created. (``x * 1e-40`` stays created: a scalar
    factor is not an input there, as ``x * 2^-20`` in float16 creates its subnormals.)"""
    _, func, make = case
    args = make(torch.ones(3, dtype=F32))
    (row,) = op_stats(func, args, {}, func(*args))
    assert row["subnormals"] >= 2 and row["subnormals_created"] == 0
    assert row["subnormals_inherited"] == row["subnormals"]


# ---- held: guards for what did not break -------------------------------------------------------


def test_sum_cancellation_is_never_inherited() -> None:
    """``sum([2^100, 1, -2^100])``: float32 and float64 both give 0, exactly 1: undecided."""
    x = torch.tensor([2.0**100, 1.0, -(2.0**100)], dtype=F32)
    row = _check(aten.sum.default, (x,), {}, [Fraction(1)])
    assert row["zeros"] == 1 and row["zeros_inherited"] == 0


def test_mm_cancellation_is_decided_exactly() -> None:
    """``mm([[2^100, 1, -2^100]], [[1], [1], [1]])``: 0 in float32 and in float64; the exact
    fallback finds 1: created."""
    a = torch.tensor([[2.0**100, 1.0, -(2.0**100)], [0.0, 0.0, 0.0]], dtype=F32)
    b = torch.ones(3, 1, dtype=F32)
    row = _check(aten.mm.default, (a, b), {}, [Fraction(1), Fraction(0)])
    assert (row["zeros_created"], row["zeros_inherited"]) == (1, 1)


def test_mm_signed_zero_rows_are_structural() -> None:
    """Rows of ``-0.0`` meeting any column (and a column of zeros): exact zeros, inherited;
    with ``inf * 0`` the output holds a NaN (not a zero) and the shortcut is not taken."""
    a = torch.tensor([[-0.0, -0.0], [1.0, 2.0]], dtype=F32)
    b = torch.tensor([[1.0, 0.0], [3.0, -0.0]], dtype=F32)
    row = _check(aten.mm.default, (a, b), {}, [Fraction(0), Fraction(0), Fraction(7), Fraction(0)])
    assert row["zeros_inherited"] == 3
    a2 = torch.tensor([[INF, 0.0], [1.0, 2.0]], dtype=F32)
    b2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=F32)
    row2 = _check(aten.mm.default, (a2, b2), {}, [None, "inf", Fraction(0), Fraction(3)])
    assert row2["zeros"] == 1 and row2["nans"] == 1


def test_casts_to_half_formats_create_zeros_and_infs() -> None:
    """float32 -> float16 / bfloat16: 1e-8 (and 2^-149) become 0, 1e5 inf (float16): created;
    a 0 stays inherited."""
    x = torch.tensor([1e-8, 2.0**-149, 0.0, 1e5, 1.0], dtype=F32)
    q = [Fraction(v) for v in x.tolist()]
    row = _check(aten._to_copy.default, (x,), {"dtype": torch.float16}, q)
    assert (row["zeros_created"], row["zeros_inherited"], row["infs_created"]) == (2, 1, 1)
    row = _check(aten._to_copy.default, (x,), {"dtype": torch.bfloat16}, q)
    assert (row["zeros_created"], row["zeros_inherited"]) == (1, 1)  # 1e-8 is normal there


def test_division_by_zero_and_exp_underflow() -> None:
    """``[1, -1, 0] / 0``: inf, -inf (not finite exactly: inherited or undecided), 0/0 NaN;
    ``exp(-200)`` in float32 is 0 (created), ``exp(-inf)`` 0 (never created)."""
    a, b = torch.tensor([1.0, -1.0, 0.0]), torch.zeros(3)
    _check(aten.div.Tensor, (a, b), {}, ["inf", "inf", None])
    x = torch.tensor([-200.0, -INF, 0.0])
    row = _check(aten.exp.default, (x,), {}, [Fraction(1), Fraction(0), Fraction(1)])
    assert row["zeros_created"] == 1


def test_in_place_op_is_judged_on_its_inputs_before() -> None:
    """``x.mul_(y)`` under a watch: the record is of ``x * y`` on the old ``x``: 1e-30 * 1e-30
    is created, 0 * 5 inherited (not judged on the overwritten x)."""

    class M(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.clone()
            return y.mul_(torch.tensor([1e-30, 5.0, 2.0]))

    model = M()
    with fpgrad.watch(model) as w:
        model(torch.tensor([1e-30, 0.0, 3.0]))
    recs = w.records()
    rows = recs.to_dict("records") if hasattr(recs, "to_dict") else recs
    (row,) = [r for r in rows if r.get("op") == "aten.mul_.Tensor"]
    assert (row["zeros_created"], row["zeros_inherited"]) == (1, 1)


def test_log_softmax_nan_rows_stay_inherited_and_nll_weights_are_checked() -> None:
    """The ops whose float64 recompute cannot overflow keep their NaN proofs: a NaN input row
    of ``_log_softmax`` gives NaNs inherited. ``nll_loss_forward`` with class weights
    ``[2^100, 1, -2^100]`` (targets 0, 1, 2, picked inputs 1, 0, 1): 0 / 0 in float32 and in
    float64 (the weights cancel), ``0 / 1`` exactly: never inherited (negative weights void the
    bound)."""
    x = torch.tensor([[NAN, 1.0], [0.0, 1.0]], dtype=F32)
    exact = [None, None, Fraction(-1), Fraction(-1)]  # row 1: non-zero numbers (status only)
    row = _check(aten._log_softmax.default, (x, 1, False), {}, exact)
    assert row["nans_inherited"] == 2
    logp = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -1.0]], dtype=F32)
    target = torch.tensor([0, 1, 2])
    w = torch.tensor([2.0**100, 1.0, -(2.0**100)], dtype=F32)
    func = aten.nll_loss_forward.default
    out = func(logp, target, w, 1, -100)
    rows = op_stats(func, (logp, target, w, 1, -100), {}, out)
    assert out[0].isnan() and rows[0]["nans"] == 1 and rows[0]["nans_inherited"] == 0


def test_log_softmax_backward_of_a_large_output_is_not_bounded() -> None:
    """``_log_softmax_backward_data(g, y)`` is ``g - exp(y) sum(g)``: at ``y = 1000`` (not a
    log-probability, but a valid call) ``1 - e^1000 * 2`` is finite exactly, -inf in float32
    and float64; an inf gradient in row 1 must not make it inherited."""
    g = torch.tensor([[1.0, 1.0], [INF, 1.0]], dtype=F32)
    y = torch.tensor([[1000.0, 0.0], [0.0, 0.0]], dtype=F32)
    func = aten._log_softmax_backward_data.default
    out = func(g, y, 1, F32)
    (row,) = op_stats(func, (g, y, 1, F32), {}, out)
    assert out[0, 0] == -INF and row["infs_inherited"] <= row["infs"] - 1


def test_first_nonfinite_of_an_undecided_overflow_is_not_called_inherited(tmp_path) -> None:
    """``exp(1000)`` in float32: inf, and float64 overflows too, so the watch cannot prove it
    created (undecided; e^1000 is finite: created in truth). The step's ``first_nonfinite``
    said ``created: False`` and the watch report printed that as "inherited"."""
    from fpgrad.present.report.watch import build

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = torch.nn.Parameter(torch.zeros(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(x + self.b).sum()

    model = M()
    with fpgrad.watch(model) as w:
        model(torch.tensor([1000.0, 1.0])).backward()
    recs = w.records()
    rows = recs.to_dict("records") if hasattr(recs, "to_dict") else recs
    (exp_row,) = [r for r in rows if r.get("op") == "aten.exp.default"]
    assert exp_row["infs"] == 1 and exp_row["infs_undecided"] == 1
    (step,) = [r for r in rows if r.get("kind") == "step"]
    first = step["first_nonfinite"]
    assert first["op"] == "aten.exp.default" and not first["created"]
    md, _ = build(rows, tmp_path)
    (line,) = [x for x in md.splitlines() if "aten.exp.default" in x and "forward" in x][:1]
    assert "inherited" not in line and "undecided" in line
