"""Arb products and Adam's update straight from object arrays of python-flint balls.

:meth:`fpgrad.arith.arb.ArbArith.matmul` spends about a third of its time building an arb_mat
from the operands' balls (``arb_mat(a.tolist())``: a Python list and a deep copy per ball) and
a new python-flint ball per entry of the product (``arb_mat.entries``). :func:`matmul` computes
the same product with FLINT's own routine and no copies: a compiled loop
(:mod:`fpgrad.arith.jit_arb`, numba, cached on disk) gathers the
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
intermediate (13 per element before, 4 now). :func:`signs` (ArbArith.positive's arb_gt and
arb_le against 0) and :func:`to_float64` (python-flint's float(): arf_get_d of the midpoint,
to nearest) likewise, without a Python call per element.

It reads python-flint's objects in memory: where a ball's ``arb_struct`` lies in its object is
found on a known value, FLINT's functions are those of the libflint python-flint loaded (found
in /proc/self/maps), and every kernel is checked against python-flint's own arithmetic when
first used; any mismatch or failure (another python-flint layout, no numba, no libflint in the
mappings) leaves :func:`available` False and python-flint's own paths in place.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
from flint import arb, ctx

_ARB_BYTES = 48  #: sizeof(arb_struct): arf (exponent, size, two limbs), mag (exponent, limb)
#: arb_mat_mul's classical path for any precision: a dimension at most this (FLINT 3 cutoffs
#: 60, 50 and 40 by precision)
CLASSICAL_MAX_DIM = 40

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


def _flint_library() -> str | None:
    """The path of the libflint that python-flint loaded (from the process's mappings): the
    one in python-flint's own folder (its wheel's ``python_flint.libs``) or else the only one
    mapped; None when that is not clear."""
    import os

    import flint

    try:
        with open("/proc/self/maps") as maps:
            found = {
                line.split()[-1]
                for line in maps
                if "libflint" in line.split()[-1].rsplit("/", 1)[-1]
            }
    except OSError:
        return None
    home = os.path.dirname(os.path.dirname(os.path.realpath(flint.__file__)))
    own = [f for f in found if os.path.realpath(f).startswith(home + os.sep)]
    if len(own) == 1:
        return own[0]
    return found.pop() if len(found) == 1 and not own else None


def _load() -> bool:
    """Make python-flint's libflint visible to LLVM, compile (or load from numba's cache)
    the kernels of :mod:`fpgrad.arith.jit_arb` and check them against python-flint."""
    try:
        import llvmlite.binding as llvm

        offset = _find_offset()
        path = _flint_library()
        if offset is None or path is None:
            return False
        llvm.load_library_permanently(path)  # the library already loaded: the same one
        lib = ctypes.CDLL(path)
        threads = lib.flint_get_num_threads
        threads.argtypes = []
        threads.restype = ctypes.c_int
        from fpgrad.arith import jit_arb
    except (ImportError, OSError, AttributeError, RuntimeError):
        return False
    _state.update(jit=jit_arb, off=offset, threads=threads)
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
        balls = [arb(1) + tie, arb(1) + 3 * tie, arb(-1) - tie * (1 + tie), arb(1) / 3]
        balls += [arb(2) ** -1080, arb(2) ** 1030, arb(0), -arb(0.5), arb(0, 1), arb("nan")]
        balls += list(ma) + list(u)
        arr = np.array(balls, dtype=object)
        flo = np.empty(arr.size)
        ptrs = _addresses(arr)[0]
        if not _state["jit"].floats(ptrs, flo, _state["off"], id(arb)):
            return False
        want_f = np.array([float(x) for x in balls])
        if not np.array_equal(flo, want_f, equal_nan=True):
            return False
        yes, no = np.empty(arr.size, bool), np.empty(arr.size, bool)
        zero = arb(0)
        if not _state["jit"].signs(ptrs, id(zero), yes, no, _state["off"], id(arb)):
            return False
        if [bool(x > zero) for x in balls] != yes.tolist():
            return False
        if [bool(x <= zero) for x in balls] != no.tolist():
            return False
    finally:
        ctx.prec = old
    return True


#: "0" (or "off", "false", "no") keeps python-flint's own paths: the balls are the same, slower
KERNELS_ENV = "FPGRAD_ARB_KERNELS"


def available() -> bool:
    """Is the kernel compiled and checked (loaded on first call; never where
    :data:`KERNELS_ENV` switches it off)?"""
    if "ok" not in _state:
        _state["ok"] = False  # a failing load is not retried
        from fpgrad.errors import switch

        _state["ok"] = switch(KERNELS_ENV) is not False and _load()
    return bool(_state["ok"])


def usable(a: np.ndarray, b: np.ndarray) -> bool:
    """Will :func:`matmul` give arb_mat's balls for ``a @ b``? Only for 2-D object arrays
    whose shapes match (b has as many rows as a has columns: the kernel reads exactly
    ``n * p`` of b's pointers; arb_mat raises ValueError otherwise)."""
    if not (_objects(a) and _objects(b) and a.shape[1] == b.shape[0]):
        return False
    m, n = a.shape
    p = b.shape[1]
    return (
        a is not b
        and n >= 3
        and min(m, n, p) <= CLASSICAL_MAX_DIM
        and available()
        and _state["threads"]() == 1
    )


def fresh(shape: int | tuple[int, ...]) -> np.ndarray:
    """New zero balls, one object each (-0 = 0), for a kernel to write into."""
    return np.negative(np.full(shape, arb(0), dtype=object))


def _objects(a: object) -> bool:
    """A 2-D numpy array of Python objects (its cells are object pointers)?"""
    return isinstance(a, np.ndarray) and a.dtype == object and a.ndim == 2


def _addresses(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The object pointers of ``a`` in row-major order (and the array that holds them);
    TypeError unless ``a`` holds Python objects (numbers are not pointers to read)."""
    held = np.ascontiguousarray(a)
    if held.dtype != object:
        raise TypeError("object arrays of python-flint arb balls only")
    ptrs = np.ctypeslib.as_array((ctypes.c_int64 * held.size).from_address(held.ctypes.data))
    return ptrs.copy(), held


def _product(a: np.ndarray, b: np.ndarray, prec: int) -> np.ndarray:
    if not (_objects(a) and _objects(b)):
        raise TypeError("object arrays of python-flint arb balls only")
    m, n = a.shape
    p = b.shape[1]
    if b.shape[0] != n:  # checked before the kernel reads n * p of b's pointers
        raise ValueError("incompatible shapes for matrix multiplication")
    out = fresh((m, p))
    pa, ha = _addresses(a)
    pb, hb = _addresses(b)
    po, ho = _addresses(out)
    sa = np.empty(m * n * 6, dtype=np.int64)  # scratch: A's rows and B's columns, gathered
    sb = np.empty(n * p * 6, dtype=np.int64)
    done = _state["jit"].product(
        po, pa, pb, (m, n, p), prec, _state["off"], id(arb), sa.ctypes.data, sb.ctypes.data
    )
    del ha, hb, ho, sa, sb  # the operands, the result and the scratch lived through it
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
    if len(scalars) != 7:  # the kernel unpacks exactly seven
        return None
    return _adam(m, v, g, w, scalars, prec)


def _adam(
    m: np.ndarray, v: np.ndarray, g: np.ndarray, w: np.ndarray, scalars: list[Any], prec: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    arrays = [np.asarray(a, dtype=object) for a in (m, v, g, w)]
    if any(a.dtype != object for a in arrays):
        return None
    ins = np.stack([np.ascontiguousarray(a).ravel() for a in arrays])
    outs = fresh(ins.shape)
    tmp = fresh(9)
    scal = np.array([*scalars, arb(0)], dtype=object)
    held = [_addresses(a) for a in (outs, ins, scal, tmp)]
    done = _state["jit"].adam(
        held[0][0].reshape(outs.shape), held[1][0].reshape(ins.shape), held[2][0],
        held[3][0], prec, _state["off"], id(arb),
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
    a = np.asarray(a)
    if not (available() and a.dtype == object):
        return None
    ptrs, held = _addresses(a)
    out = np.empty(a.size, dtype=np.float64)
    done = _state["jit"].floats(ptrs, out, _state["off"], id(arb))
    del held
    return out.reshape(a.shape) if done else None


def signs(a: np.ndarray, zero: arb) -> tuple[np.ndarray, np.ndarray] | None:
    """(``a > zero``, ``a <= zero``) elementwise as python-flint compares balls (True only
    where every point of the ball satisfies it); None where it does not apply."""
    a = np.asarray(a)
    if not (available() and type(zero) is arb and a.dtype == object):
        return None
    ptrs, held = _addresses(a)
    yes, no = np.empty(a.size, dtype=bool), np.empty(a.size, dtype=bool)
    done = _state["jit"].signs(ptrs, id(zero), yes, no, _state["off"], id(arb))
    del held
    return (yes.reshape(a.shape), no.reshape(a.shape)) if done else None


def matmul(a: np.ndarray, b: np.ndarray, prec: int) -> np.ndarray:
    """``a @ b`` at ``prec`` bits, the balls of ``arb_mat_mul`` (only where :func:`usable`)."""
    if not available():  # loads the kernels; a direct call before usable() found none
        raise RuntimeError("arb_kernels.matmul: the kernels are not available here (see usable)")
    return _product(a, b, prec)
