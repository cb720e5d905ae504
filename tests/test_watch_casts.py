"""A widening cast's counts taken from its counted input (fpgrad.watching.casts) equal a pass."""

from __future__ import annotations

import math

import pytest
import torch

from fpgrad.watching import casts, classify
from fpgrad.watching.classify import op_stats
from fpgrad.watching.families import _WIDER

_CLONE = torch.ops.aten.clone.default
_TO_COPY = torch.ops.aten._to_copy.default
_F32_MAX = torch.finfo(torch.float32).max


def _sources(dt: torch.dtype) -> list[torch.Tensor]:
    """Tensors of ``dt`` with every kind of special value, and near the narrowing limits."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 8, generator=g, dtype=torch.float64)
    tiny = torch.finfo(dt).tiny
    xs = [
        base,
        base * (base > 0),  # zeros
        base * tiny / 8,  # subnormals of dt
        torch.where(base > 1, math.inf, base),
        torch.where(base > 1, math.nan, base),
        torch.zeros(64, 8, dtype=torch.float64),
        base * 2.0**-126,  # at bfloat16's smallest normal: some round to it, some below
        base * 2.0**-14,  # float16's smallest normal
        base.abs() * 2.0**-110 + 2.0**-126,  # all above float32's and bfloat16's
        base * 3.3e38 if dt != torch.float16 else base * 65000,  # may overflow bfloat16
        base * 1e5,  # overflows float16
        base.clamp(-1.5, 1.5) * 3.38e38 if dt in (torch.float32, torch.float64) else base,
    ]
    return [x.clamp(-_F32_MAX, _F32_MAX).to(dt) if dt != torch.float64 else x for x in xs]


PAIRS = [
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.float64),
    (torch.bfloat16, torch.float64),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.float64, torch.float32),
    (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
]


def _cast_rows(x: torch.Tensor, out_dt: torch.dtype, view: str) -> list[dict]:
    """op_stats of ``clone(x)`` (counted), then of a cast of it (or of a view of all of it)."""
    casts.forget()
    y = _CLONE(x)
    op_stats(_CLONE, (x,), {}, y)
    src = {"same": y, "view": y.view(-1), "t": y.t(), "part": y[1:]}[view]
    out = _TO_COPY(src, dtype=out_dt)
    return op_stats(_TO_COPY, (src,), {"dtype": out_dt}, out)


@pytest.mark.parametrize(("in_dt", "out_dt"), PAIRS)
def test_cast_counts_from_the_input_equal_a_pass(
    monkeypatch: pytest.MonkeyPatch, in_dt: torch.dtype, out_dt: torch.dtype
) -> None:
    used = []
    real = casts.cast_stats

    def spy(func, args, t):  # type: ignore[no-untyped-def]
        got = real(func, args, t)
        used.append(got is not None)
        return got

    for x in _sources(in_dt):
        for view in ("same", "view", "t", "part"):
            monkeypatch.setattr(classify, "cast_stats", spy)
            fast = _cast_rows(x, out_dt, view)
            monkeypatch.setattr(classify, "cast_stats", lambda *a: None)
            slow = _cast_rows(x, out_dt, view)
            assert len(fast) == len(slow) == 1
            for k in slow[0]:
                a, b = fast[0][k], slow[0][k]
                assert a == b or (a != a and b != b), (view, k, a, b, x.flatten()[:4])
    if in_dt in casts.KEPT and in_dt in _WIDER[out_dt]:
        assert any(used)  # the widening derivation ran
        if in_dt == torch.float16 and out_dt == torch.float32:
            assert not all(used)  # and declined: float16 subnormals are float32 normals
    else:
        assert not any(used)  # narrowing, or a float32 / float64 input: counted


def test_a_cast_after_an_in_place_change_is_counted_again() -> None:
    casts.forget()
    x = torch.ones(8, dtype=torch.bfloat16)
    op_stats(_CLONE, (x,), {}, x)  # counted: no zero
    x[0] = 0  # changed since (its version moves on)
    out = _TO_COPY(x, dtype=torch.float32)
    assert op_stats(_TO_COPY, (x,), {"dtype": torch.float32}, out)[0]["zeros"] == 1


def test_forget_drops_the_counts() -> None:
    x = torch.ones(8, dtype=torch.bfloat16)
    op_stats(_CLONE, (x,), {}, x)
    assert casts.cast_stats(_TO_COPY, (x,), x.float()) is not None
    casts.forget()
    assert casts.cast_stats(_TO_COPY, (x,), x.float()) is None
