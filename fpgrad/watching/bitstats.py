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
#: unsigned numpy dtype -> the signed one of its width.
_SIGNED = {np.uint16: np.int16, np.uint32: np.int32, np.uint64: np.int64}
#: dtype -> (mask, inf bits, smallest-normal bits) as numpy scalars of the **signed** type of
#: its width: the kernels read signed views (``b = bits & mask`` is non-negative, so signed and
#: unsigned order agree on it, and signed minima and maxima vectorise on AVX2, unsigned ones
#: do not).
_CONST = {d: (_SIGNED[u](m), _SIGNED[u](i), _SIGNED[u](s)) for d, (_, u, m, i, s) in FIELDS.items()}
#: dtype -> the signed scalar with every bit set (the raw bits, sign included, as ``mask``).
_ALL = {d: _SIGNED[u](-1) for d, (_, u, *_) in FIELDS.items()}

# The kernels below take signed views. Every masked value ``b = T(a[k] & mask)`` is cast back
# to the element type ``T`` (numba widens ``&`` of small integers to int64; the value is
# unchanged, and in ``T`` the loops vectorise).


@njit(**JIT)
def _scan(a: np.ndarray, mask: Any, inf: Any, sn: Any, out: np.ndarray) -> None:
    """Into ``out``: counts of ``b == 0``, ``b < sn``, ``b < inf``, ``b <= inf``, then the
    smallest ``0 < b < inf`` (``inf`` when none) and the largest ``b < inf`` (``b = a[k] &
    mask``, non-negative)."""
    T = a.dtype.type
    zero = T(0)
    c0 = c1 = c2 = c3 = 0
    mn = T(inf)
    mx = zero
    for k in range(a.size):
        b = T(a[k] & mask)
        c0 += b == zero
        c1 += b < sn
        c2 += b < inf
        c3 += b <= inf
        mn = min(mn, T(b if (b != zero) & (b < inf) else inf))
        mx = max(mx, T(b if b < inf else zero))
    out[0], out[1], out[2], out[3], out[4], out[5] = c0, c1, c2, c3, mn, mx


@njit(**JIT)
def _scan_finite(a: np.ndarray, mask: Any, inf: Any, sn: Any, out: np.ndarray) -> None:
    """:func:`_scan` of an ``a`` without inf or NaN (``b < inf`` everywhere): into ``out``
    the counts of ``b == 0`` and ``b < sn`` and the smallest ``b != 0`` (``inf`` when none)."""
    T = a.dtype.type
    zero = T(0)
    c0 = c1 = 0
    mn = T(inf)
    for k in range(a.size):
        b = T(a[k] & mask)
        c0 += b == zero
        c1 += b < sn
        mn = min(mn, T(b if b != zero else inf))
    out[0], out[1], out[2] = c0, c1, mn


@njit(**JIT)
def _scan_state(
    a: np.ndarray, mask: Any, inf: Any, sn: Any, t1: Any, t2: Any, out: np.ndarray
) -> None:
    """Into ``out``: counts of ``b == 0``, ``b < sn``, ``b < t1``, ``b < t2``, the infinite or
    NaN elements and the negative ones (``-0.0`` excepted; ``b = a[k] & mask``)."""
    T = a.dtype.type
    zero = T(0)
    c0 = c1 = c2 = c3 = c4 = c5 = 0
    for k in range(a.size):
        r = a[k]
        b = T(r & mask)
        c0 += b == zero
        c1 += b < sn
        c2 += b < t1
        c3 += b < t2
        c4 += b >= inf
        c5 += (r != b) & (b != zero)
    out[0], out[1], out[2], out[3], out[4], out[5] = c0, c1, c2, c3, c4, c5


@njit(**JIT)
def _scan_dense(a: np.ndarray, mask: Any, sn: Any, out: np.ndarray) -> None:
    """Into ``out``: the counts of ``b == 0`` and ``b < sn``, the smallest ``b != 0`` (0 when
    none) and the largest ``b`` (``b = a[k] & mask``): with that largest below inf's bits,
    all that :func:`bit_stats` needs, in one pass."""
    T = a.dtype.type
    zero = T(0)
    top = T(mask)
    c0 = c1 = 0
    mn = top
    mx = zero
    for k in range(a.size):
        b = T(a[k] & mask)
        c0 += b == zero
        c1 += b < sn
        mn = min(mn, T(b if b != zero else top))  # (a b equal to the mask is a NaN: mx says so)
        mx = max(mx, b)
    out[0], out[1], out[2], out[3] = c0, c1, mn if c0 < a.size else zero, mx


@njit(**JIT)
def _range(a: np.ndarray, mask: Any, out: np.ndarray) -> None:
    """Into ``out``: the smallest and the largest ``a[k] & mask`` (``a`` non-empty)."""
    T = a.dtype.type
    mn = mx = T(a[0] & mask)
    for k in range(a.size):
        b = T(a[k] & mask)
        mn = min(mn, b)
        mx = max(mx, b)
    out[0], out[1] = mn, mx


def bits_of(t: torch.Tensor, signed: bool = False) -> np.ndarray | None:
    """The bit patterns of ``t`` as a flat unsigned (``signed``: signed) numpy view (no copy),
    or None when ``t`` is not a contiguous CPU tensor of one of the four formats."""
    f = FIELDS.get(t.dtype)
    if f is None or not t.is_cpu or not t.is_contiguous():
        return None
    if t.requires_grad:
        t = t.detach()
    try:  # (a tensor numpy cannot view, e.g. a subclass without storage: the torch path)
        if t.dtype == torch.bfloat16:
            a = t.view(torch.int16).numpy().reshape(-1)
        else:
            a = t.numpy().reshape(-1)
    except (RuntimeError, TypeError):
        return None
    return a.view(_SIGNED[f[1]] if signed else f[1])


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
    out = np.empty(6, np.int64)
    state_vals: list[tuple[list[int], list[Any]]] = []
    eps_vals: list[int | None] = []
    for j, kv in enumerate(per):
        vals: list[int] = []
        below_eps = None
        for k, v in kv:
            bits = bits_of(v, signed=True)
            if bits is None:
                return None
            mask, inf, sn = _CONST[v.dtype]
            s = type(mask)
            with_eps = k == "exp_avg_sq" and bool(eps_of)
            # the cheap test first (skipped for a tensor that had something to count last
            # time: the count gives the same zeros there): with eps, the raw bits (a set sign
            # bit makes them negative, below ``sn``)
            if not bits.size or id(v) not in _STATE_DENSE:
                if bits.size:
                    _range(bits, _ALL[v.dtype] if with_eps else mask, out)
                lo, hi = (out[0], out[1]) if bits.size else (sn, 0)
                if hi < inf and lo >= sn and (not with_eps or lo >= t2):  # nothing to count
                    vals += [0, 0]
                    below_eps = 0 if with_eps else below_eps
                    continue
            _scan_state(
                bits, mask, inf, sn, s(t1 if with_eps else 0), s(t2 if with_eps else 0), out
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
    got = bit_range(t, dense)
    if isinstance(got, tuple):
        return dict.fromkeys(_COUNTS, 0) | {"min_abs": got[0], "max_abs": got[1]}
    return got


#: dtype -> (mask, inf bits, smallest-normal bits) as Python ints (compared in Python: a
#: comparison with a numpy scalar costs about a microsecond).
_INTS = {d: (m, i, sn) for d, (_, _, m, i, sn) in FIELDS.items()}


def bit_range(t: torch.Tensor, dense: bool = False) -> tuple[float, float] | dict[str, Any] | None:
    """:func:`bit_stats` of ``t``, except that a non-empty ``t`` whose elements are all normal
    and finite gives only its (smallest, largest) magnitude as a pair (every count is 0)."""
    bits = bits_of(t, signed=True)
    if bits is None:
        return None
    n = bits.size
    dt = t.dtype
    if n and dense:
        _, inf, _ = _INTS[dt]
        out = np.empty(4, np.int64)
        _scan_dense(bits, _CONST[dt][0], _CONST[dt][2], out)
        z, below, mn, hi = out.tolist()
        if hi < inf:  # finite: the counts are all there is (mn: the smallest b when below == 0)
            if not below:
                return decode(dt, mn), decode(dt, hi)
            return _finite_stats(dt, n, z, below, mn, hi)
    if n:  # first the cheap test: every magnitude normal and finite (two reductions)
        _, inf, sn = _INTS[dt]
        mask_s, inf_s, sn_s = _CONST[dt]
        out = np.empty(2, np.int64)
        _range(bits, mask_s, out)
        lo, hi = out.tolist()
        if lo >= sn and hi < inf:
            return decode(dt, lo), decode(dt, hi)
        if hi < inf:  # no inf, no NaN: fewer counts
            _scan_finite(bits, mask_s, inf_s, sn_s, out3 := np.empty(3, np.int64))
            z, below, mn = out3.tolist()
            fin = notnan = n
            mx = hi
        else:
            out = np.empty(6, np.int64)
            _scan(bits, mask_s, inf_s, sn_s, out)
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
    st["min_abs"] = decode(dt, mn)
    st["max_abs"] = decode(dt, mx)
    return st


def _finite_stats(dtype: torch.dtype, n: int, z: int, below: int, mn: int, mx: int) -> dict:
    """:func:`bit_stats` of ``n`` finite elements, ``z`` zeros, ``below`` under the smallest
    normal, smallest non-zero / largest magnitude bits ``mn`` / ``mx``."""
    st: dict[str, Any] = {"zeros": z, "subnormals": below - z, "infs": 0, "nans": 0}
    if n == z:
        return st | _NONE
    return st | {"min_abs": decode(dtype, mn), "max_abs": decode(dtype, mx)}


@njit(**JIT)
def _max2d(x: np.ndarray, mask: Any) -> Any:
    """The largest ``x & mask`` of a 2-D ``x`` (any strides; read in memory order)."""
    T = x.dtype.type
    mx = T(0)
    r, c = x.shape
    if x.strides[0] >= x.strides[1]:
        for i in range(r):
            for j in range(c):
                mx = max(mx, T(x[i, j] & mask))
    else:
        for j in range(c):
            for i in range(r):
                mx = max(mx, T(x[i, j] & mask))
    return mx


@njit(**JIT)
def _supports(x: np.ndarray, mask: Any, lines: np.ndarray, by_row: bool, out: np.ndarray) -> Any:
    """Into ``out[ln]`` (64-bit words, zeroed): the bits ``k`` of ``x[ln, k] & mask != 0`` (rows
    ``ln`` of ``x``, or with ``by_row`` False, bits ``k`` of ``x[k, ln]``: columns) for the
    lines ``ln`` flagged in ``lines``; returns the largest ``x & mask`` (every element read, in
    memory order)."""
    T = x.dtype.type
    mx = T(0)
    r, c = x.shape
    if x.strides[0] >= x.strides[1]:  # rows contiguous-ish: row outer
        for i in range(r):
            for j in range(c):
                v = T(x[i, j] & mask)
                mx = max(mx, v)
                ln, k = (i, j) if by_row else (j, i)
                if lines[ln]:  # (no branch on v: half the elements may be zeros)
                    out[ln, k >> 6] |= np.uint64(v != 0) << np.uint64(k & 63)
    else:
        for j in range(c):
            for i in range(r):
                v = T(x[i, j] & mask)
                mx = max(mx, v)
                ln, k = (i, j) if by_row else (j, i)
                if lines[ln]:  # (no branch on v: half the elements may be zeros)
                    out[ln, k >> 6] |= np.uint64(v != 0) << np.uint64(k & 63)
    return mx


@njit(**JIT)
def _mm_overlaps(a: np.ndarray, b: np.ndarray, t: np.ndarray, mask: Any, inf: Any) -> int:
    """For the bit patterns of ``t = a @ b`` (2-D, any strides, signed views): -1 when ``a``,
    ``b`` or ``t`` holds an inf or NaN, else the number of zeros ``t[i, j]`` with some ``k``
    where ``a[i, k]`` and ``b[k, j]`` are both non-zero (``bits & mask``). The supports of the
    rows of ``a`` and columns of ``b`` that meet a zero of ``t`` are 64-bit words, tested a
    word at a time; with few zeros (at most (rows + columns) / 4), each zero is tested along
    ``k`` instead (no supports built; ``a`` and ``b`` still read in full for infs and NaNs)."""
    m, kk = a.shape
    n = b.shape[1]
    T = t.dtype.type
    zero = T(0)
    zr = np.zeros(m, np.uint8)  # rows and columns of t holding a zero (0/1 bytes: bools
    zc = np.zeros(n, np.uint8)  # or-ed in place are many times slower here)
    mx = zero
    zeros = 0
    for i in range(m):
        r = np.uint8(0)
        for j in range(n):
            v = T(t[i, j] & mask)
            mx = max(mx, v)
            z = np.uint8(v == zero)
            r |= z
            zc[j] |= z
            zeros += z
        zr[i] = r
    if mx >= inf:
        return -1
    if 4 * zeros <= m + n:  # few zeros: each tested along k (stops at the first overlap)
        if _max2d(a, mask) >= inf or _max2d(b, mask) >= inf:
            return -1
        bad = 0
        for i in range(m):
            if zr[i]:
                for j in range(n):
                    if T(t[i, j] & mask) == zero:
                        for k in range(kk):
                            if (a[i, k] & mask) != 0 and (b[k, j] & mask) != 0:
                                bad += 1
                                break
        return bad
    w = (kk + 63) // 64
    ra = np.zeros((m, w), np.uint64)
    cb = np.zeros((n, w), np.uint64)
    if _supports(a, mask, zr, True, ra) >= inf or _supports(b, mask, zc, False, cb) >= inf:
        return -1
    bad = 0
    for i in range(m):
        if zr[i]:
            for j in range(n):
                if zc[j] and T(t[i, j] & mask) == zero:
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
        views.append(v.view(_SIGNED[f[1]]))
    mask, inf, _ = _CONST[t.dtype]
    return int(_mm_overlaps(views[0], views[1], views[2], mask, inf))
