"""Arb products and Adam's update straight from object arrays of python-flint balls.

:meth:`fpgrad.arith.arb.ArbArith.matmul` spends about a third of its time building an arb_mat
from the operands' balls (``arb_mat(a.tolist())``: a Python list and a deep copy per ball) and
a new python-flint ball per entry of the product (``arb_mat.entries``). :func:`matmul` computes
the same product with FLINT's own routine and no copies: a compiled loop (numba) gathers the
operands' ``arb_struct`` values (shallow copies, as FLINT's classical product gathers the
columns of B) and calls FLINT's ``arb_dot`` for each entry straight into a fresh python-flint
ball, exactly as ``arb_mat_mul_classical`` does (FLINT 3: ``tmp[j * br + i] = B[i][j]``, then
``arb_dot(C[i][j], NULL, 0, A->rows[i], 1, tmp + j * br, 1, br, prec)``). ``arb_mat_mul``
takes that classical path whenever a dimension is at most 40 on one thread, so the balls are
identical bit for bit to ``arb_mat`` products (tests/test_arb_kernels.py); elsewhere (larger
products, several FLINT threads, an inner dimension of 2 or less, A and B the same matrix)
:func:`usable` says no and the caller keeps arb_mat.

:func:`adam_update` does Adam's elementwise update (m, v, the update and the parameter) in
one compiled pass through the same FLINT calls, in the same order and with the same operands,
that :class:`fpgrad.run.optim.ArithOptimizer` makes through ArbArith's ufuncs (arb_mul,
arb_add, arb_ge against 0 for ArbArith.sqrt's plain case, arb_sqrt, arb_div, arb_sub at the
working precision), so the balls are the same, without a python-flint object per
intermediate (13 per element before, 4 now).

It reads python-flint's objects in memory: where a ball's ``arb_struct`` lies in its object is
found on a known value and checked on products against python-flint's own arithmetic when the
kernel is first used; any mismatch (another python-flint layout, no numba, no FLINT library
found) leaves :func:`available` False and the arb_mat path in place.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import numpy as np
from flint import arb, ctx

_ARB_BYTES = 48  #: sizeof(arb_struct): arf (exponent, size, two limbs), mag (exponent, limb)
#: arb_mat_mul's classical path for any precision: a dimension at most this (FLINT 3 cutoffs
#: 60, 50 and 40 by precision)
CLASSICAL_MAX_DIM = 40

_RND_NEAR = 4  #: FLINT's ARF_RND_NEAR (python-flint's float(): arf_get_d(mid, ARF_RND_NEAR))

_state: dict[str, Any] = {}


def _find_offset() -> int | None:
    """Byte offset of the arb_struct in a python-flint arb object: where arb(3) shows
    arf exponent 2, size 2 (one limb, positive), limb 0xC000..., mag 0 (radius 0)."""
    probe = arb(3)
    size = type(probe).__basicsize__
    words = (ctypes.c_uint64 * (size // 8)).from_address(id(probe))
    for word in range(2, size // 8 - 5):
        if list(words[word : word + 6]) == [2, 2, 0xC000000000000000, 0, 0, 0]:
            if size - 8 * word == _ARB_BYTES:
                return 8 * word
    return None


def _load() -> bool:
    """Find FLINT's functions through python-flint's own extension module (the library it
    loaded), compile the kernel and check it against python-flint's products."""
    try:
        import numba

        offset = _find_offset()
        if offset is None:
            return False
        lib = ctypes.CDLL(sys.modules[arb.__module__].__file__)  # dlsym follows its libflint
        i64 = ctypes.c_int64
        dot = lib.arb_dot
        dot.argtypes = [i64] * 9
        dot.restype = None
        ops = {}
        for name, args in (("add", 4), ("sub", 4), ("mul", 4), ("div", 4), ("sqrt", 3)):
            fn = getattr(lib, "arb_" + name)
            fn.argtypes = [i64] * args
            fn.restype = None
            ops[name] = fn
        ge, gt, le = lib.arb_ge, lib.arb_gt, lib.arb_le
        for fn in (ge, gt, le):
            fn.argtypes = [i64, i64]
            fn.restype = ctypes.c_int
        get_d = lib.arf_get_d
        get_d.argtypes = [i64, ctypes.c_int]
        get_d.restype = ctypes.c_double
        threads = lib.flint_get_num_threads
        threads.argtypes = []
        threads.restype = ctypes.c_int
        copy = ctypes.CDLL(None).memcpy
        copy.argtypes = [i64, i64, i64]
        copy.restype = i64
    except (ImportError, OSError, AttributeError, TypeError):
        return False

    @numba.njit(cache=False)  # ctypes functions: numba cannot cache it on disk
    def kernel(
        out: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
        shape: tuple[int, int, int],
        prec: int,
        tp: int,
        word: np.ndarray,
        sa: np.ndarray,
        sb: np.ndarray,
    ) -> bool:  # pragma: no cover - compiled
        # the scratch arrays come from the caller: an array made here could be freed by
        # numba's reference counting right after its address is taken
        m, n, p = shape
        pw = word.ctypes.data
        for ptrs in (out, a, b):  # every object an arb ball (its type pointer), or nothing done
            for q in ptrs:
                copy(pw, q + 8, 8)
                if word[0] != tp:
                    return False
        pa, pb = sa.ctypes.data, sb.ctypes.data  # A's rows, B's columns, gathered
        for i in range(m * n):
            copy(pa + _ARB_BYTES * i, a[i] + offset, _ARB_BYTES)
        for k in range(n):
            for j in range(p):
                copy(pb + _ARB_BYTES * (j * n + k), b[k * p + j] + offset, _ARB_BYTES)
        for i in range(m):
            for j in range(p):
                dot(out[i * p + j] + offset, 0, 0, pa + _ARB_BYTES * i * n, 1,
                    pb + _ARB_BYTES * j * n, 1, n, prec)  # fmt: skip
        return True

    add, sub, mul, div, sqrt = (ops[k] for k in ("add", "sub", "mul", "div", "sqrt"))

    @numba.njit(cache=False)  # ctypes functions: numba cannot cache it on disk
    def adam(
        outs: np.ndarray,
        ins: np.ndarray,
        scal: np.ndarray,
        tmp: np.ndarray,
        prec: int,
        tp: int,
        word: np.ndarray,
    ) -> bool:  # pragma: no cover - compiled
        pw = word.ctypes.data
        for ptrs in (outs.ravel(), ins.ravel(), scal, tmp):  # all arb balls, or nothing done
            for q in ptrs:
                copy(pw, q + 8, 8)
                if word[0] != tp:
                    return False
        b1, c1, b2, c2, sb, eps, rate, zero = scal + offset
        t1, t2, t3, t4, t5, s, dq, den, d = tmp + offset
        for i in range(ins.shape[1]):
            m, v, g, w = (
                ins[0, i] + offset,
                ins[1, i] + offset,
                ins[2, i] + offset,
                ins[3, i] + offset,
            )
            m2, v2, u, w2 = (
                outs[0, i] + offset,
                outs[1, i] + offset,
                outs[2, i] + offset,
                outs[3, i] + offset,
            )
            mul(t1, m, b1, prec)  # m = m b1 + g (1 - b1)
            mul(t2, g, c1, prec)
            add(m2, t1, t2, prec)
            mul(t3, v, b2, prec)  # v = v b2 + g g (1 - b2)
            mul(t4, g, g, prec)
            mul(t5, t4, c2, prec)
            add(v2, t3, t5, prec)
            if ge(v2, zero) == 0:  # ArbArith.sqrt's cut to [0, inf): the Python path
                return False
            sqrt(s, v2, prec)  # denom = sqrt(v) / sqrt(bc2) + eps
            div(dq, s, sb, prec)
            add(den, dq, eps, prec)
            div(d, m2, den, prec)  # update = lr / bc1 * (m / denom)
            mul(u, rate, d, prec)
            sub(w2, w, u, prec)
        return True

    @numba.njit(cache=False)  # ctypes functions: numba cannot cache it on disk
    def floats(ptrs: np.ndarray, out: np.ndarray, tp: int, word: np.ndarray) -> bool:
        """float(ball) for each: arf_get_d of the midpoint, to nearest (ARF_RND_NEAR)."""
        pw = word.ctypes.data  # pragma: no cover - compiled
        for q in ptrs:
            copy(pw, q + 8, 8)
            if word[0] != tp:
                return False
        for i in range(ptrs.size):
            out[i] = get_d(ptrs[i] + offset, _RND_NEAR)
        return True

    @numba.njit(cache=False)  # ctypes functions: numba cannot cache it on disk
    def signs(
        ptrs: np.ndarray, zero: int, yes: np.ndarray, no: np.ndarray, tp: int, word: np.ndarray
    ) -> bool:
        """ball > 0 and ball <= 0 (arb_gt, arb_le against ``zero``) for each."""
        pw = word.ctypes.data  # pragma: no cover - compiled
        for q in ptrs:
            copy(pw, q + 8, 8)
            if word[0] != tp:
                return False
        for i in range(ptrs.size):
            yes[i] = gt(ptrs[i] + offset, zero + offset) != 0
            no[i] = le(ptrs[i] + offset, zero + offset) != 0
        return True

    _state.update(kernel=kernel, threads=threads, adam=adam, floats=floats, signs=signs)
    return _self_check()


def _self_check() -> bool:
    """Products of inexact balls of mixed signs and exponents, an exact operand and exact
    zeros, at three precisions, against arb_mat, and an Adam update against python-flint's
    operations (midpoints and radii)."""
    from flint import arb_mat

    rng = np.random.default_rng(1)
    old = ctx.prec
    try:
        for prec, (m, n, p) in ((64, (3, 5, 4)), (200, (7, 3, 2)), (700, (4, 9, 6))):
            ctx.prec = prec
            vals = rng.standard_normal((2, 16, 16)) * np.exp2(rng.integers(-60, 60, (2, 16, 16)))
            a = np.array([arb(v) / 3 for v in vals[0, :m, :n].ravel()], dtype=object)
            b = np.array([arb(v) for v in vals[1, :n, :p].ravel()], dtype=object)
            a[0], b[1] = arb(0), arb(0)
            a, b = a.reshape(m, n), b.reshape(n, p)
            got = _product(a, b, prec)
            want = arb_mat(a.tolist()) * arb_mat(b.tolist())
            for x, y in zip(got.ravel(), want.entries(), strict=True):
                if not (x.mid() == y.mid() and x.rad() == y.rad()):
                    return False
        ctx.prec = 300
        ma, va, ga, wa = (
            np.array([arb(x) / 7 for x in rng.standard_normal(5)], dtype=object) for _ in range(4)
        )
        va = va * va
        scal = [arb(x) / 3 for x in rng.random(7)]
        b1, c1, b2, c2, sb, eps, rate = scal
        m2 = ma * b1 + ga * c1
        v2 = va * b2 + ga * ga * c2
        u = rate * (m2 / (np.array([x.sqrt() for x in v2], dtype=object) / sb + eps))
        fused = _adam(ma, va, ga, wa, scal, 300)
        if fused is None:
            return False
        for x, y in zip(np.concatenate(fused), np.concatenate((m2, v2, u, wa - u)), strict=True):
            if not (x.mid() == y.mid() and x.rad() == y.rad()):
                return False
        # float(): ties to even, below and above the halfway points, tiny and huge values
        tie = arb(2) ** -53
        vals = [arb(1) + tie, arb(1) + 3 * tie, arb(-1) - tie * (1 + tie), arb(1) / 3]
        vals += [arb(2) ** -1080, arb(2) ** 1030, arb(0), -arb(0.5), arb(0, 1), arb("nan")]
        vals += list(ma) + list(u)
        arr = np.array(vals, dtype=object)
        flo = np.empty(arr.size)
        if not _state["floats"](*_addresses(arr)[:1], flo, id(arb), np.empty(1, np.int64)):
            return False
        want_f = np.array([float(x) for x in vals])
        if not np.array_equal(flo, want_f, equal_nan=True):
            return False
        yes, no = np.empty(arr.size, bool), np.empty(arr.size, bool)
        zero = arb(0)
        ptrs = _addresses(arr)[0]
        if not _state["signs"](ptrs, id(zero), yes, no, id(arb), np.empty(1, np.int64)):
            return False
        if [bool(x > zero) for x in vals] != yes.tolist():
            return False
        if [bool(x <= zero) for x in vals] != no.tolist():
            return False
    finally:
        ctx.prec = old
    return True


def available() -> bool:
    """Is the kernel compiled and checked (loaded on first call)?"""
    if "ok" not in _state:
        _state["ok"] = False  # a failing load is not retried
        _state["ok"] = _load()
    return bool(_state["ok"])


def usable(a: np.ndarray, b: np.ndarray) -> bool:
    """Will :func:`matmul` give arb_mat's balls for ``a @ b`` (2-D object arrays)?"""
    m, n = a.shape
    p = b.shape[1]
    return (
        a is not b
        and n >= 3
        and min(m, n, p) <= CLASSICAL_MAX_DIM
        and available()
        and _state["threads"]() == 1
    )


def _addresses(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The object pointers of ``a`` in row-major order (and the array that holds them)."""
    held = np.ascontiguousarray(a)
    ptrs = np.ctypeslib.as_array((ctypes.c_int64 * held.size).from_address(held.ctypes.data))
    return ptrs.copy(), held


def _product(a: np.ndarray, b: np.ndarray, prec: int) -> np.ndarray:
    m, n = a.shape
    p = b.shape[1]
    out = np.negative(np.full((m, p), arb(0), dtype=object))  # fresh zero balls (-0 = 0)
    pa, ha = _addresses(a)
    pb, hb = _addresses(b)
    po, ho = _addresses(out)
    word = np.empty(1, dtype=np.int64)
    sa = np.empty(m * n * 6, dtype=np.int64)
    sb = np.empty(n * p * 6, dtype=np.int64)
    done = _state["kernel"](po, pa, pb, (m, n, p), prec, id(arb), word, sa, sb)
    del ha, hb, ho  # the operands and the result stayed alive through the kernel
    if not done:  # checked before anything was read: an element is not an arb ball
        raise TypeError("object arrays of python-flint arb balls only")
    return out


def adam_update(
    m: np.ndarray, v: np.ndarray, g: np.ndarray, w: np.ndarray, scalars: list[Any], prec: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Adam's m, v, update and parameter, every element through the arb calls that
    :class:`fpgrad.run.optim.ArithOptimizer` makes through ArbArith (the same balls), without
    a python-flint ball per intermediate. ``scalars``: beta1, 1 - beta1, beta2, 1 - beta2,
    sqrt(1 - beta2^t), eps, lr / (1 - beta1^t) as arb balls. None where it does not apply
    (not loaded, another shape, an element that is not an arb ball, a second moment whose
    ball reaches below 0): the caller takes its own path."""
    if not (available() and m.shape == v.shape == g.shape == w.shape and m.size):
        return None
    return _adam(m, v, g, w, scalars, prec)


def _adam(
    m: np.ndarray, v: np.ndarray, g: np.ndarray, w: np.ndarray, scalars: list[Any], prec: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    arrays = [np.asarray(a, dtype=object) for a in (m, v, g, w)]
    if any(a.dtype != object for a in arrays):
        return None
    ins = np.stack([np.ascontiguousarray(a).ravel() for a in arrays])
    outs = np.negative(np.full(ins.shape, arb(0), dtype=object))  # fresh zero balls
    tmp = np.negative(np.full(9, arb(0), dtype=object))
    scal = np.array([*scalars, arb(0)], dtype=object)
    held = [_addresses(a) for a in (outs, ins, scal, tmp)]
    done = _state["adam"](
        held[0][0].reshape(outs.shape), held[1][0].reshape(ins.shape), held[2][0],
        held[3][0], prec, id(arb), np.empty(1, dtype=np.int64),
    )  # fmt: skip
    del held  # every ball stayed alive through the kernel
    if not done:
        return None
    shape = m.shape
    return (
        outs[0].reshape(shape),
        outs[1].reshape(shape),
        outs[2].reshape(shape),
        outs[3].reshape(shape),
    )


def to_float64(a: np.ndarray) -> np.ndarray | None:
    """``float(ball)`` of every element (nearest float64 to the midpoint), as python-flint
    gives it; None where not loaded or an element is not an arb ball."""
    if not available():
        return None
    ptrs, held = _addresses(a)
    out = np.empty(a.size, dtype=np.float64)
    done = _state["floats"](ptrs, out, id(arb), np.empty(1, dtype=np.int64))
    del held
    return out.reshape(a.shape) if done else None


def signs(a: np.ndarray, zero: arb) -> tuple[np.ndarray, np.ndarray] | None:
    """(``a > zero``, ``a <= zero``) elementwise as python-flint compares balls (True only
    where every point of the ball satisfies it); None where it does not apply."""
    if not available() or type(zero) is not arb:
        return None
    ptrs, held = _addresses(a)
    yes, no = np.empty(a.size, dtype=bool), np.empty(a.size, dtype=bool)
    done = _state["signs"](ptrs, id(zero), yes, no, id(arb), np.empty(1, dtype=np.int64))
    del held
    return (yes.reshape(a.shape), no.reshape(a.shape)) if done else None


def matmul(a: np.ndarray, b: np.ndarray, prec: int) -> np.ndarray:
    """``a @ b`` at ``prec`` bits, the balls of ``arb_mat_mul`` (only where :func:`usable`)."""
    return _product(a, b, prec)
