"""Compiled passes over a tensor's bit patterns: the counts and magnitudes of the watch.

For a CPU contiguous float16, bfloat16, float32 or float64 tensor, its bits (a zero-copy
unsigned-integer view) are read by compiled loops: first the smallest and largest ``b`` (a
plain tensor needs nothing more), else one counting pass. With ``b = bits & ~sign``, a zero is
``b == 0``, a subnormal ``0 < b < bits(smallest normal)``, an inf ``b == bits(inf)``, a NaN
``b > bits(inf)``, and for non-negative (or absolute) values ``|x| < y`` exactly when ``b <
bits(y)`` (IEEE bit patterns of non-negative numbers are ordered as the numbers). The smallest
and largest finite non-zero magnitudes are found as bit patterns and decoded once, so they are
the exact values. The kernels compile once per width (about 1.5 s, then cached on disk as
numba caches). Other tensors (non-contiguous, not on CPU) keep the torch paths of the callers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numba import njit

from fpgrad.arith.jit_words import JIT

#: dtype -> (the torch integer dtype of its width, numpy unsigned dtype, |x| mask, bits of inf,
#: bits of the smallest normal).
FIELDS: dict[torch.dtype, tuple[torch.dtype, Any, int, int, int]] = {
    torch.float16: (torch.int16, np.uint16, 0x7FFF, 0x7C00, 0x0400),
    torch.bfloat16: (torch.int16, np.uint16, 0x7FFF, 0x7F80, 0x0080),
    torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF, 0x7F800000, 0x00800000),
    torch.float64: (torch.int64, np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000, 1 << 52),
}
#: dtype -> (mask, inf bits, smallest-normal bits) as numpy scalars of the unsigned type.
_CONST = {d: (u(m), u(i), u(s)) for d, (_, u, m, i, s) in FIELDS.items()}


@njit(**JIT)
def _scan(a: np.ndarray, mask: Any, inf: Any, sn: Any, out: np.ndarray) -> None:
    """Into ``out``: counts of ``b == 0``, ``b < sn``, ``b < inf``, ``b <= inf``, then the
    smallest ``0 < b < inf`` (``inf`` when none) and the largest ``b < inf`` (``b = a[k] &
    mask``, unsigned)."""
    zero = a.dtype.type(0)
    c0 = c1 = c2 = c3 = 0
    mn = inf
    mx = zero
    for k in range(a.size):
        b = a[k] & mask
        c0 += b == zero
        c1 += b < sn
        c2 += b < inf
        c3 += b <= inf
        mn = min(mn, b if (b != zero) & (b < inf) else inf)
        mx = max(mx, b if b < inf else zero)
    out[0], out[1], out[2], out[3], out[4], out[5] = c0, c1, c2, c3, mn, mx


@njit(**JIT)
def _scan_finite(a: np.ndarray, mask: Any, inf: Any, sn: Any, out: np.ndarray) -> None:
    """:func:`_scan` of an ``a`` without inf or NaN (``b < inf`` everywhere): into ``out``
    the counts of ``b == 0`` and ``b < sn`` and the smallest ``b != 0`` (``inf`` when none)."""
    zero = a.dtype.type(0)
    c0 = c1 = 0
    mn = inf
    for k in range(a.size):
        b = a[k] & mask
        c0 += b == zero
        c1 += b < sn
        mn = min(mn, b if b != zero else inf)
    out[0], out[1], out[2] = c0, c1, mn


@njit(**JIT)
def _scan_state(
    a: np.ndarray, mask: Any, inf: Any, sn: Any, t1: Any, t2: Any, out: np.ndarray
) -> None:
    """Into ``out``: counts of ``b == 0``, ``b < sn``, ``b < t1``, ``b < t2``, the infinite or
    NaN elements and the negative ones (``-0.0`` excepted; ``b = a[k] & mask``)."""
    zero = a.dtype.type(0)
    c0 = c1 = c2 = c3 = c4 = c5 = 0
    for k in range(a.size):
        r = a[k]
        b = r & mask
        c0 += b == zero
        c1 += b < sn
        c2 += b < t1
        c3 += b < t2
        c4 += b >= inf
        c5 += (r != b) & (b != zero)
    out[0], out[1], out[2], out[3], out[4], out[5] = c0, c1, c2, c3, c4, c5


@njit(**JIT)
def _scan_dense(a: np.ndarray, mask: Any, out: np.ndarray) -> None:
    """Into ``out``: the counts of ``b == 0`` and ``b < out[0]`` (the smallest normal's bits on
    entry), the smallest ``b != 0`` (0 when none) and the largest ``b`` (``b = a[k] & mask``):
    with that largest below inf's bits, all that :func:`bit_stats` needs, in one pass."""
    zero, one = a.dtype.type(0), a.dtype.type(1)
    sn = a.dtype.type(out[0])
    c0 = c1 = 0
    mn = ~zero
    mx = zero
    for k in range(a.size):
        b = a[k] & mask
        c0 += b == zero
        c1 += b < sn
        v = b - one  # a zero wraps around to the largest pattern
        mn = min(mn, v)
        mx = max(mx, b)
    out[0], out[1], out[2], out[3] = c0, c1, mn + one, mx


@njit(**JIT)
def _range(a: np.ndarray, mask: Any, out: np.ndarray) -> None:
    """Into ``out``: the smallest and the largest ``a[k] & mask`` (``a`` non-empty)."""
    mn = mx = a[0] & mask
    for k in range(a.size):
        b = a[k] & mask
        mn = min(mn, b)
        mx = max(mx, b)
    out[0], out[1] = mn, mx


def bits_of(t: torch.Tensor) -> np.ndarray | None:
    """The bit patterns of ``t`` as a flat unsigned numpy view (no copy), or None when ``t`` is
    not a contiguous CPU tensor of one of the four formats."""
    f = FIELDS.get(t.dtype)
    if f is None or not t.is_cpu or not t.is_contiguous():
        return None
    if t.requires_grad:
        t = t.detach()
    try:  # (a tensor numpy cannot view, e.g. a subclass without storage: the torch path)
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().reshape(-1).view(f[1])
        return t.numpy().reshape(-1).view(f[1])
    except (RuntimeError, TypeError):
        return None


_PACK = {
    torch.float16: (struct.Struct("<H"), struct.Struct("<e"), 0),
    torch.bfloat16: (struct.Struct("<I"), struct.Struct("<f"), 16),
    torch.float32: (struct.Struct("<I"), struct.Struct("<f"), 0),
    torch.float64: (struct.Struct("<Q"), struct.Struct("<d"), 0),
}


def decode(dtype: torch.dtype, b: int) -> float:
    """The value of the non-negative bit pattern ``b`` of ``dtype`` (exact)."""
    pk, unpk, shift = _PACK[dtype]
    return float(unpk.unpack(pk.pack(b << shift))[0])


def to_bits(dtype: torch.dtype, x: float) -> int:
    """The bit pattern of the non-negative ``x`` of ``dtype`` (``x`` must be one of its values)."""
    pk, unpk, shift = _PACK[dtype]
    return int(pk.unpack(unpk.pack(x))[0]) >> shift


#: ids of state tensors whose latest count found zeros, subnormals or elements below the eps
#: threshold: :func:`state_counts` counts them at once (a speed hint only).
_STATE_DENSE: set[int] = set()


def state_counts(
    per: list[list[tuple[Any, torch.Tensor]]],
    eps_of: dict[int, float],
    threshold: Callable[[torch.dtype, float], float],
) -> tuple[list[tuple[list[int], list[Any]]], list[int | None]] | None:
    """The optimizer's state counts by one compiled pass per state tensor: for each parameter
    ``j`` (``per[j]``: its (key, state tensor) pairs) ([zeros, subnormals] per key, the keys),
    and for the parameters of ``eps_of`` the number of ``exp_avg_sq`` elements below
    ``threshold(dtype, eps)``, counted below ``threshold(eps (1 -+ 2^-30))`` (as
    ``optimizer._flat_state_counts``). None where that function returns None (a state tensor
    not finite, a negative ``exp_avg_sq``, formats of a key that differ, an element near eps)
    and where a tensor has no bit view."""
    dtypes: dict[Any, torch.dtype] = {}
    for kv in per:
        for k, v in kv:
            if dtypes.setdefault(k, v.dtype) != v.dtype or v.dtype not in FIELDS:
                return None
    t1 = t2 = 0
    if eps_of:
        eps = next(iter(eps_of.values()))
        if not 0 < eps < float("inf") or "exp_avg_sq" not in dtypes:
            return None
        d = dtypes["exp_avg_sq"]
        band = (threshold(d, eps * (1 - 2.0**-30)), threshold(d, eps * (1 + 2.0**-30)))
        if float("inf") in band:
            return None
        t1, t2 = to_bits(d, band[0]), to_bits(d, band[1])
    out = np.empty(6, np.uint64)
    state_vals: list[tuple[list[int], list[Any]]] = []
    eps_vals: list[int | None] = []
    for j, kv in enumerate(per):
        vals: list[int] = []
        below_eps = None
        for k, v in kv:
            bits = bits_of(v)
            if bits is None:
                return None
            mask, inf, sn = _CONST[v.dtype]
            u = FIELDS[v.dtype][1]
            with_eps = k == "exp_avg_sq" and bool(eps_of)
            # the cheap test first (skipped for a tensor that had something to count last
            # time: the count gives the same zeros there): with eps, the raw bits (a set sign
            # bit is above ``mask``)
            if not bits.size or id(v) not in _STATE_DENSE:
                if bits.size:
                    _range(bits, ~u(0) if with_eps else mask, out)
                lo, hi = (out[0], out[1]) if bits.size else (sn, 0)
                if hi < inf and lo >= sn and (not with_eps or lo >= t2):  # nothing to count
                    vals += [0, 0]
                    below_eps = 0 if with_eps else below_eps
                    continue
            _scan_state(
                bits, mask, inf, sn, u(t1 if with_eps else 0), u(t2 if with_eps else 0), out
            )
            z, below, lo, hi, bad, neg = out.tolist()
            if below or (with_eps and hi):
                if len(_STATE_DENSE) >= 4096:  # ids of tensors gone: keep the hint set small
                    _STATE_DENSE.clear()
                _STATE_DENSE.add(id(v))
            else:
                _STATE_DENSE.discard(id(v))
            if bad or (with_eps and neg) or lo != hi:
                return None
            vals += [z, below - z]
            if with_eps:
                below_eps = lo
        state_vals.append((vals, [k for k, _ in kv]))
        eps_vals.append(below_eps if j in eps_of else None)
    return state_vals, eps_vals


_COUNTS = ("zeros", "subnormals", "infs", "nans")
_NONE: dict[str, Any] = {"min_abs": None, "max_abs": None}


def bit_stats(t: torch.Tensor, dense: bool = False) -> dict[str, Any] | None:
    """``basic_stats`` of ``t`` in one compiled pass: the counts of zeros, subnormals, infs and
    NaNs and the smallest and largest finite non-zero magnitude (None when there is none); None
    when :func:`bits_of` cannot view ``t``. ``dense``: zeros or subnormals are expected (the
    same result, one counting pass instead of a range pass first)."""
    bits = bits_of(t)
    if bits is None:
        return None
    n = bits.size
    if n and dense:
        mask, inf, sn = _CONST[t.dtype]
        out = np.empty(4, np.uint64)
        out[0] = sn
        _scan_dense(bits, mask, out)
        z, below, mn, hi = out.tolist()
        if hi < inf:  # finite: the counts are all there is (mn: the smallest b when below == 0)
            if not below:
                return dict.fromkeys(_COUNTS, 0) | {
                    "min_abs": decode(t.dtype, mn),
                    "max_abs": decode(t.dtype, hi),
                }
            return _finite_stats(t.dtype, n, z, below, mn, hi)
    if n:  # first the cheap test: every magnitude normal and finite (two reductions)
        mask, inf, sn = _CONST[t.dtype]
        out = np.empty(2, np.uint64)
        _range(bits, mask, out)
        lo, hi = out.tolist()
        if lo >= sn and hi < inf:
            return dict.fromkeys(_COUNTS, 0) | {
                "min_abs": decode(t.dtype, lo),
                "max_abs": decode(t.dtype, hi),
            }
        if hi < inf:  # no inf, no NaN: fewer counts
            _scan_finite(bits, mask, inf, sn, out3 := np.empty(3, np.uint64))
            z, below, mn = out3.tolist()
            fin = notnan = n
            mx = hi
        else:
            out = np.empty(6, np.uint64)
            _scan(bits, mask, inf, sn, out)
            z, below, fin, notnan, mn, mx = out.tolist()
    else:
        z = below = fin = notnan = mn = mx = 0
    st: dict[str, Any] = {
        "zeros": z,
        "subnormals": below - z,
        "infs": notnan - fin,
        "nans": n - notnan,
    }
    if fin - z == 0:  # no finite non-zero element
        return st | _NONE
    st["min_abs"] = decode(t.dtype, mn)
    st["max_abs"] = decode(t.dtype, mx)
    return st


def _finite_stats(dtype: torch.dtype, n: int, z: int, below: int, mn: int, mx: int) -> dict:
    """:func:`bit_stats` of ``n`` finite elements, ``z`` zeros, ``below`` under the smallest
    normal, smallest non-zero / largest magnitude bits ``mn`` / ``mx``."""
    st: dict[str, Any] = {"zeros": z, "subnormals": below - z, "infs": 0, "nans": 0}
    if n == z:
        return st | _NONE
    return st | {"min_abs": decode(dtype, mn), "max_abs": decode(dtype, mx)}


@njit(**JIT)
def _supports(x: np.ndarray, mask: Any, lines: np.ndarray, by_row: bool, out: np.ndarray) -> Any:
    """Into ``out[ln]`` (64-bit words, zeroed): the bits ``k`` of ``x[ln, k] & mask != 0`` (rows
    ``ln`` of ``x``, or with ``by_row`` False, bits ``k`` of ``x[k, ln]``: columns) for the
    lines ``ln`` flagged in ``lines``; returns the largest ``x & mask`` (every element read, in memory
    order)."""
    mx = x.dtype.type(0)
    r, c = x.shape
    if x.strides[0] >= x.strides[1]:  # rows contiguous-ish: row outer
        for i in range(r):
            for j in range(c):
                v = x[i, j] & mask
                mx = max(mx, v)
                ln, k = (i, j) if by_row else (j, i)
                if lines[ln]:
                    out[ln, k >> 6] |= np.uint64(v != 0) << np.uint64(k & 63)
    else:
        for j in range(c):
            for i in range(r):
                v = x[i, j] & mask
                mx = max(mx, v)
                ln, k = (i, j) if by_row else (j, i)
                if lines[ln]:
                    out[ln, k >> 6] |= np.uint64(v != 0) << np.uint64(k & 63)
    return mx


@njit(**JIT)
def _mm_overlaps(a: np.ndarray, b: np.ndarray, t: np.ndarray, mask: Any, inf: Any) -> int:
    """For the bit patterns of ``t = a @ b`` (2-D, any strides): -1 when ``a``, ``b`` or ``t``
    holds an inf or NaN, else the number of zeros ``t[i, j]`` with some ``k`` where ``a[i, k]``
    and ``b[k, j]`` are both non-zero (``bits & mask``). The supports of the rows of ``a`` and
    columns of ``b`` that meet a zero of ``t`` are 64-bit words, tested a word at a time."""
    m, kk = a.shape
    n = b.shape[1]
    zero = t.dtype.type(0)
    zr = np.zeros(m, np.uint8)  # rows and columns of t holding a zero (0/1 bytes: bools
    zc = np.zeros(n, np.uint8)  # or-ed in place are many times slower here)
    mx = zero
    for i in range(m):
        r = np.uint8(0)
        for j in range(n):
            v = t[i, j] & mask
            mx = max(mx, v)
            z = np.uint8(v == zero)
            r |= z
            zc[j] |= z
        zr[i] = r
    if mx >= inf:
        return -1
    w = (kk + 63) // 64
    ra = np.zeros((m, w), np.uint64)
    cb = np.zeros((n, w), np.uint64)
    if _supports(a, mask, zr, True, ra) >= inf or _supports(b, mask, zc, False, cb) >= inf:
        return -1
    bad = 0
    for i in range(m):
        if zr[i]:
            for j in range(n):
                if zc[j] and t[i, j] & mask == zero:
                    hit = np.uint64(0)
                    for q in range(w):
                        hit |= ra[i, q] & cb[j, q]
                    bad += hit != 0
    return bad


def mm_overlaps(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> int | None:
    """:func:`_mm_overlaps` of ``t = a @ b`` (-1: an inf or NaN in ``a``, ``b`` or ``t``), or None when
    the three are not 2-D CPU tensors of one of the four formats with a numpy view."""
    f = FIELDS.get(t.dtype)
    if f is None or a.dtype != t.dtype or b.dtype != t.dtype:
        return None
    views = []
    for x in (a, b, t):
        if not x.is_cpu or x.dim() != 2 or x.layout != torch.strided:
            return None
        x = x.detach()
        try:
            v = x.view(f[0]).numpy() if x.dtype == torch.bfloat16 else x.numpy()
        except (RuntimeError, TypeError):
            return None
        views.append(v.view(f[1]))
    mask, inf, _ = _CONST[t.dtype]
    return int(_mm_overlaps(views[0], views[1], views[2], mask, inf))


@njit(**JIT)
def _update_counts(
    after: np.ndarray,
    before: np.ndarray,
    req: np.ndarray,
    d: np.ndarray,
    smap: np.ndarray,
    out: np.ndarray,
) -> None:
    """One pass over a parameter (flat): ``d = float64(after) - before`` (exact widening, one
    rounded subtraction, as torch's copy then sub), then into ``out`` the counts of ``d != 0``
    (moved), ``req != 0`` (asked) and both asked and not moved (swamped), the last also as 0/1
    bytes in ``smap`` when it has the parameter's size (``req`` empty: no request, two zeros)."""
    moved = asked = swamped = 0
    with_req = req.size == d.size
    with_map = smap.size == d.size
    for k in range(d.size):
        v = np.float64(after[k]) - before[k]
        d[k] = v
        m = v != 0.0
        moved += m
        if with_req:
            a = req[k] != 0.0
            s = a and not m
            asked += a
            swamped += s
            if with_map:
                smap[k] = s
    out[0], out[1], out[2] = moved, asked, swamped


def update_counts(
    after: list[torch.Tensor],
    before: list[torch.Tensor],
    req: list[torch.Tensor] | None,
    d: list[torch.Tensor],
    map_limit: int,
) -> tuple[list[list[float]], list[list[int] | None]] | None:
    """:func:`_update_counts` of each parameter (its values ``after`` a step, ``before`` it in
    float64, the requested float64 updates or None, ``d`` the float64 buffers receiving the
    update done): the counts [moved], [asked], [swamped] per parameter, as floats, and the
    swamped maps of parameters up to ``map_limit`` elements (None when ``req`` is None). None,
    with nothing written, unless every tensor is a contiguous CPU tensor, the parameters float32
    or float64 and the others float64."""
    arrays = []
    for j, p in enumerate(after):
        group = (p, before[j], d[j]) + ((req[j],) if req is not None else ())
        for x in group:
            if not (x.is_cpu and x.is_contiguous() and x.layout == torch.strided):
                return None
        if p.dtype not in (torch.float32, torch.float64) or any(
            x.dtype != torch.float64 for x in group[1:]
        ):
            return None
        try:
            arrays.append([x.detach().numpy().reshape(-1) for x in group])
        except (RuntimeError, TypeError):
            return None
    none = np.empty(0, np.float64)
    counts: list[list[float]] = [[], [], []]
    maps: list[list[int] | None] = []
    out = np.empty(3, np.int64)
    for a, b, dd, *r in arrays:
        smap = np.empty(a.size if r and a.size <= map_limit else 0, np.uint8)
        _update_counts(a, b, r[0] if r else none, dd, smap, out)
        for c, v in zip(counts, out.tolist(), strict=True):
            c.append(float(v))
        maps.append(smap.tolist() if r and a.size <= map_limit else None)
    return counts, maps
