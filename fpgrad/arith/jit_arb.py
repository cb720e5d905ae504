"""Compiled loops over python-flint balls for :mod:`fpgrad.arith.arb_kernels`.

FLINT's functions are called by symbol (numba ``ExternalFunction``; the caller first makes
python-flint's own libflint visible to LLVM), so the kernels are cached on disk like the
other compiled kernels. Balls are passed as addresses: the object pointers of an object array
(int64) plus ``off``, the byte offset of the ``arb_struct`` inside a python-flint object, and
``tp``, the address of the arb type, which every object's type pointer (at byte 8) must equal
before anything is read or written. Every pointer argument of a FLINT call is an int64 (the
same register as a pointer); ``int`` arguments and results are int32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

JIT = {"cache": True}  # not nogil: the loops read and write python-flint objects
ARB_BYTES = 48  #: sizeof(arb_struct)
RND_NEAR = 4  #: FLINT's ARF_RND_NEAR

_I = types.int64
_V = types.void
arb_dot = types.ExternalFunction("arb_dot", _V(_I, _I, types.int32, _I, _I, _I, _I, _I, _I))
arb_add = types.ExternalFunction("arb_add", _V(_I, _I, _I, _I))
arb_sub = types.ExternalFunction("arb_sub", _V(_I, _I, _I, _I))
arb_mul = types.ExternalFunction("arb_mul", _V(_I, _I, _I, _I))
arb_div = types.ExternalFunction("arb_div", _V(_I, _I, _I, _I))
arb_sqrt = types.ExternalFunction("arb_sqrt", _V(_I, _I, _I))
arb_ge = types.ExternalFunction("arb_ge", types.int32(_I, _I))
arb_gt = types.ExternalFunction("arb_gt", types.int32(_I, _I))
arb_le = types.ExternalFunction("arb_le", types.int32(_I, _I))
arf_get_d = types.ExternalFunction("arf_get_d", types.float64(_I, types.int32))


@intrinsic
def load_word(typingctx: Any, addr: Any) -> Any:
    """The int64 at address ``addr``."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> Any:
        return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()))

    return types.int64(types.int64), codegen


@intrinsic
def store_word(typingctx: Any, addr: Any, value: Any) -> Any:
    """Write the int64 ``value`` at address ``addr``."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Any) -> Any:
        builder.store(args[1], builder.inttoptr(args[0], ir.IntType(64).as_pointer()))
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@njit(**JIT)
def all_arb(ptrs: np.ndarray, tp: int) -> bool:
    """Is every object an arb ball (its type pointer ``tp``)?"""
    for q in ptrs:
        if load_word(q + 8) != tp:
            return False
    return True


@njit(**JIT)
def gather(dst: int, src: int) -> None:
    """Shallow copy of one arb_struct (6 words), as FLINT gathers B's columns."""
    for w in range(ARB_BYTES // 8):
        store_word(dst + 8 * w, load_word(src + 8 * w))


@njit(**JIT)
def product(
    out: np.ndarray, a: np.ndarray, b: np.ndarray, shape: tuple[int, int, int], prec: int,
    off: int, tp: int, pa: int, pb: int,
) -> bool:  # fmt: skip
    """``out = a @ b`` as arb_mat_mul_classical (A's rows and B's columns gathered at the
    scratch addresses ``pa`` and ``pb``, then arb_dot per entry)."""
    if not (all_arb(out, tp) and all_arb(a, tp) and all_arb(b, tp)):
        return False
    m, n, p = shape
    for i in range(m * n):
        gather(pa + ARB_BYTES * i, a[i] + off)
    for k in range(n):
        for j in range(p):
            gather(pb + ARB_BYTES * (j * n + k), b[k * p + j] + off)
    for i in range(m):
        for j in range(p):
            arb_dot(out[i * p + j] + off, 0, 0, pa + ARB_BYTES * i * n, 1,
                    pb + ARB_BYTES * j * n, 1, n, prec)  # fmt: skip
    return True


@njit(**JIT)
def adam(
    outs: np.ndarray, ins: np.ndarray, scal: np.ndarray, tmp: np.ndarray, prec: int, off: int,
    tp: int,
) -> bool:  # fmt: skip
    """Adam's m, v, update and parameter (rows of ``outs``) from m, v, g, w (rows of
    ``ins``): the calls of ArithOptimizer.step through ArbArith, in its order; False (before
    any sqrt) where v's ball is not >= 0 (ArbArith.sqrt's cut) or an object is not a ball."""
    if not (all_arb(outs.ravel(), tp) and all_arb(ins.ravel(), tp)):
        return False
    if not (all_arb(scal, tp) and all_arb(tmp, tp)):
        return False
    b1, c1, b2, c2, sb, eps, rate, zero = scal + off
    t1, t2, t3, t4, t5, s, dq, den, d = tmp + off
    for i in range(ins.shape[1]):
        m, v, g, w = ins[0, i] + off, ins[1, i] + off, ins[2, i] + off, ins[3, i] + off
        m2, v2, u, w2 = outs[0, i] + off, outs[1, i] + off, outs[2, i] + off, outs[3, i] + off
        arb_mul(t1, m, b1, prec)  # m = m b1 + g (1 - b1)
        arb_mul(t2, g, c1, prec)
        arb_add(m2, t1, t2, prec)
        arb_mul(t3, v, b2, prec)  # v = v b2 + g g (1 - b2)
        arb_mul(t4, g, g, prec)
        arb_mul(t5, t4, c2, prec)
        arb_add(v2, t3, t5, prec)
        if arb_ge(v2, zero) == 0:  # ArbArith.sqrt's cut to [0, inf): the Python path
            return False
        arb_sqrt(s, v2, prec)  # denom = sqrt(v) / sqrt(bc2) + eps
        arb_div(dq, s, sb, prec)
        arb_add(den, dq, eps, prec)
        arb_div(d, m2, den, prec)  # update = lr / bc1 * (m / denom)
        arb_mul(u, rate, d, prec)
        arb_sub(w2, w, u, prec)
    return True


@njit(**JIT)
def floats(ptrs: np.ndarray, out: np.ndarray, off: int, tp: int) -> bool:
    """float(ball) of each: arf_get_d of the midpoint to nearest, as python-flint."""
    if not all_arb(ptrs, tp):
        return False
    for i in range(ptrs.size):
        out[i] = arf_get_d(ptrs[i] + off, RND_NEAR)
    return True


@njit(**JIT)
def signs(ptrs: np.ndarray, zero: int, yes: np.ndarray, no: np.ndarray, off: int, tp: int) -> bool:
    """ball > 0 and ball <= 0 (arb_gt, arb_le against the ball at ``zero``) for each."""
    if not all_arb(ptrs, tp):
        return False
    for i in range(ptrs.size):
        yes[i] = arb_gt(ptrs[i] + off, zero + off) != 0
        no[i] = arb_le(ptrs[i] + off, zero + off) != 0
    return True
