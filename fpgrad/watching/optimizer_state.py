"""Zero, subnormal and eps-dominated shares of optimizer state tensors (Adam's ``exp_avg_sq``
and friends), per parameter or for all parameters at once."""

from __future__ import annotations

import math
import struct
from typing import Any

import torch

from fpgrad.numbers.formats import get_format
from fpgrad.watching.bitstats import state_counts
from fpgrad.watching.families import FORMAT_OF, SMALLEST_NORMAL, count
from fpgrad.watching.scratch import Scratch


def _eps_threshold(dtype: torch.dtype, eps: float) -> float:
    """The smallest ``x >= 0`` of ``dtype`` with ``not (math.sqrt(x) < eps)`` (``0 < eps <
    inf``): the correctly rounded square root is non-decreasing, so for ``x >= 0`` of ``dtype``,
    ``math.sqrt(x) < eps`` exactly when ``x <`` this threshold. Found by bisection over the bit
    patterns of ``dtype``; cached. (torch's float64 ``sqrt`` is not always correctly rounded
    on CPU, so :func:`_flat_state_counts` uses this only away from ``eps``.)"""
    key = (dtype, eps)
    got = _THRESHOLDS.get(key)
    if got is not None:
        return got
    value = _FROM_BITS[dtype]
    inf_bits = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000}.get(
        dtype, 0x7FF0000000000000
    )
    lo, hi = 0, inf_bits  # sqrt(inf) = inf is not below eps: find the first bit pattern that fails
    while lo < hi:
        mid = (lo + hi) // 2
        if math.sqrt(value(mid)) < eps:
            lo = mid + 1
        else:
            hi = mid
    got = _THRESHOLDS[key] = value(lo)
    return got


#: dtype -> the value (a float) of a non-negative bit pattern of that format.
_FROM_BITS = {
    torch.float16: lambda k: struct.unpack("<e", struct.pack("<H", k))[0],
    torch.bfloat16: lambda k: struct.unpack("<f", struct.pack("<I", k << 16))[0],
    torch.float32: lambda k: struct.unpack("<f", struct.pack("<I", k))[0],
    torch.float64: lambda k: struct.unpack("<d", struct.pack("<Q", k))[0],
}
_THRESHOLDS: dict[tuple[torch.dtype, float], float] = {}


def _rsub(x: torch.Tensor, c: float, buf: torch.Tensor) -> torch.Tensor:
    """``c - x`` written into ``buf`` (as ``-x + c``: the same exact sum, so the same rounding)."""
    return buf.copy_(x).neg_().add_(c)


def _state_counts(
    state: dict, p: torch.Tensor, scratch: Scratch
) -> tuple[list[torch.Tensor], list[Any], dict[Any, tuple[float, float]]]:
    """(zero count, subnormal count) 0-d tensors of each floating state tensor shaped like
    ``p``, flattened, with the state keys they belong to and each tensor's (min, max)."""
    vals: list[torch.Tensor] = []
    keys = []
    bounds: dict[Any, tuple[float, float]] = {}
    for key, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() == p.numel():
            sn = get_format(FORMAT_OF.get(v.dtype, "float32")).smallest_normal
            # counted in the state's own format (float32 for narrower ones): a zero is a zero
            # and ``sn - |v|`` is positive exactly when ``|v| < sn`` (gradual underflow)
            v = v.detach()
            if not v.numel():  # nothing to count (and aminmax of nothing raises)
                vals += [torch.zeros((), dtype=torch.float64)] * 2
                keys.append(key)
                continue
            vlo, vhi = torch.stack(torch.aminmax(v)).tolist()
            bounds[key] = (vlo, vhi)
            if vlo >= 0:  # no negative, no NaN: |v| is v (up to the sign of zeros)
                a, lo, hi = v, vlo, vhi
            else:
                a = torch.abs(v, out=scratch.get("state", v.shape, v.dtype, v.device))
                lo, hi = torch.stack(torch.aminmax(a)).tolist()
            if lo >= sn and hi < float("inf"):  # no zero, subnormal, inf or NaN
                vals += [torch.zeros((), dtype=torch.float64)] * 2
                keys.append(key)
                continue
            if a.dtype != torch.float64:
                a = a.float()
            if hi < float("inf"):
                buf = scratch.get("state_ind", a.shape, a.dtype, a.device)
                zero = torch.sign(a, out=buf).sub_(1).neg_()  # 1 - sign(|v|)
                nz = count(zero)
                vals += [nz, count(_rsub(a, sn, buf).clamp_(min=0).sign_()) - nz]
            else:
                vals += [(a == 0).sum(), ((a > 0) & (a < sn)).sum()]
            keys.append(key)
    return vals, keys, bounds


def _eps_count(state: dict, group: dict) -> torch.Tensor | None:
    """For an Adam-like state (``exp_avg_sq`` and a float ``eps``): the number of elements whose
    float64 ``sqrt(exp_avg_sq)`` (torch's) is below ``eps``; else None."""
    v = state.get("exp_avg_sq")
    eps = group.get("eps")
    if not (isinstance(v, torch.Tensor) and isinstance(eps, float)):
        return None
    v = v.detach()
    root = v.to(torch.float64).sqrt()
    if bool(torch.isfinite(root.sum())):  # no NaN: eps - root > 0 exactly when root < eps
        return count((eps - root).clamp_(min=0).sign_())
    return (root < eps).sum()


def _eligible(state: dict, p: torch.Tensor) -> list[tuple[Any, torch.Tensor]]:
    return [
        (k, v)
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() == p.numel()
    ]


def _flat_state_counts(
    ents: list, states: list[dict], scratch: Scratch
) -> tuple[list[tuple[list[float], list[Any]]], list[float | None]] | None:
    """:func:`_state_counts` and :func:`_eps_count` of every parameter at once: the state
    tensors of one key copied into one flat buffer (float32 for narrower formats, as
    :func:`_state_counts` counts), indicator rows (non-zero, below the smallest normal, below
    the eps threshold) and per-parameter sums. None when a state tensor is not finite or
    negative where eps is counted, when the formats or eps values of a key differ, or anything
    else the flat path does not cover: then the per-parameter functions decide."""
    per = [_eligible(st, p) for st, (_, p) in zip(states, ents, strict=True)]
    eps_of: dict[int, float] = {}
    for j, ((g, _), st) in enumerate(zip(ents, states, strict=True)):
        v, eps = st.get("exp_avg_sq"), g.get("eps")
        if isinstance(v, torch.Tensor) and isinstance(eps, float):
            if not any(k == "exp_avg_sq" for k, _ in per[j]):
                return None
            eps_of[j] = eps
    if len(set(eps_of.values())) > 1:
        return None
    fast = state_counts(per, eps_of, _eps_threshold)  # one compiled pass per state tensor
    if fast is not None:
        return fast  # type: ignore[return-value]
    groups: dict[Any, list[tuple[int, torch.Tensor]]] = {}
    for j, kv in enumerate(per):
        for k, v in kv:
            groups.setdefault(k, []).append((j, v.detach()))
    plans, bounds = [], []
    for key, members in groups.items():
        dtypes = {v.dtype for _, v in members}
        if len(dtypes) != 1 or next(iter(dtypes)) not in FORMAT_OF:
            return None
        dtype = next(iter(dtypes))
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        with_eps = key == "exp_avg_sq" and bool(eps_of)
        rows = 4 if with_eps else 2
        shapes = [v.shape for _, v in members]
        lay = scratch.layout(f"state_{key}", rows + 1, shapes, cdt, members[0][1].device)
        torch._foreach_copy_(lay.views[0], [v for _, v in members])
        if not with_eps:  # |v| (exp_avg_sq must be >= 0 as it is: its eps share needs that)
            lay.row(0).abs_()
        bounds.append(torch.stack(torch.aminmax(lay.row(0))))
        plans.append((key, members, lay, dtype, rows, with_eps))
    got_b = torch.cat(bounds).tolist() if bounds else []
    counts: dict[tuple[Any, int], Any] = {}
    for (key, members, lay, dtype, rows, with_eps), lo, hi in zip(
        plans, got_b[0::2], got_b[1::2], strict=True
    ):
        if not (lo > float("-inf") and hi < float("inf")):  # an inf or NaN (NaN fails too)
            return None
        sn = SMALLEST_NORMAL[dtype]
        band = None
        if with_eps:
            eps = next(iter(eps_of.values()))
            if not (0 < eps < float("inf") and lo >= 0):
                return None
            # below t_lo, sqrt(v) < eps(1 - 2^-30) and so is torch's float64 sqrt (accurate to
            # far better than 2^-30); from t_hi on, neither is below eps. Elements between:
            # the per-parameter path computes torch's sqrt itself.
            band = (
                _eps_threshold(dtype, eps * (1 - 2.0**-30)),
                _eps_threshold(dtype, eps * (1 + 2.0**-30)),
            )
            if float("inf") in band:
                return None
        if lo >= sn and (band is None or lo >= band[1]):  # nothing below any threshold
            for j, v in members:
                counts[(key, j)] = [float(v.numel())] + [0.0] * (rows - 1)
            continue
        # 0/1 indicator rows, each one comparison written as floats (no NaN here)
        f = lay.row(0)
        torch.ne(f, 0, out=lay.row(1))  # non-zero
        torch.lt(f, sn, out=lay.row(2))  # |v| < sn
        if band is not None:
            torch.lt(f, band[0], out=lay.row(3))  # v < t_lo
            torch.lt(f, band[1], out=lay.row(4))  # v < t_hi
        for (j, _), part in zip(members, lay.parts(1, rows + 1), strict=True):
            counts[(key, j)] = part.sum(1)
    order = [c for c in counts if isinstance(counts[c], torch.Tensor)]
    got = torch.cat([counts[c] for c in order]).tolist() if order else []
    pos, i = {}, 0
    for c in order:
        pos[c] = got[i : i + counts[c].numel()]
        i += counts[c].numel()
    for c in counts:
        if c not in pos:
            pos[c] = counts[c]
    state_vals = []
    eps_vals: list[float | None] = []
    for j, kv in enumerate(per):
        vals: list[float] = []
        for k, v in kv:
            nonzero, below = pos[(k, j)][:2]
            zero = v.numel() - nonzero
            vals += [zero, below - zero]
        state_vals.append((vals, [k for k, _ in kv]))
        if j in eps_of:
            below_lo, below_hi = pos[("exp_avg_sq", j)][2:4]
            if below_lo != below_hi:  # an element within 2^-30 of eps: let torch's sqrt decide
                return None
            eps_vals.append(below_lo)
        else:
            eps_vals.append(None)
    return state_vals, eps_vals
