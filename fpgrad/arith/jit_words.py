"""Multi-word arithmetic for compiled kernels: numba intrinsics, inlined into the caller's loop.

The k = 2 and k = 3 algorithms of :mod:`.expansion` are written here once more, in plain
Python over :class:`V` (an LLVM value with float64 operators): an intrinsic runs them while
numba compiles the calling kernel and so emits their IEEE operations straight into the
kernel's loop, with no calls left, where LLVM can vectorise across elements. Operation for
operation they are the numpy kernels (missing words as 0.0, the same operand order), so
both give bit-identical words (tests/test_fast_exact.py checks this) and the error bounds
measured for one hold for the other. The one difference: :func:`two_prod` gets the exact
product error from a fused multiply-add instead of Dekker's splitting; both are exact, so
the words agree.

Kernels pass the number of words as the length of a tuple of zeros (``kw``, see
:func:`words_tag`), so it is a compile-time constant and each kernel compiles once per k;
operands are 3-tuples of floats (word 2 unused when k = 2), results 3-tuples (word 2 0.0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

JIT = {"cache": True, "nogil": True}
F64 = ir.DoubleType()
Num = Any  # a V or a Python float (a constant)


def words_tag(k: int) -> tuple[float, ...]:
    """The ``kw`` argument of the kernels: its length is k."""
    return (0.0,) * k


class V:
    """An LLVM float64 value in a builder; arithmetic emits strict IEEE instructions."""

    __slots__ = ("b", "v")

    def __init__(self, builder: ir.IRBuilder, value: ir.Value) -> None:
        self.b = builder
        self.v = value

    def _c(self, other: Num) -> ir.Value:
        return other.v if isinstance(other, V) else ir.Constant(F64, float(other))

    def _new(self, value: ir.Value) -> V:
        return V(self.b, value)

    def __add__(self, o: Num) -> V:
        return self._new(self.b.fadd(self.v, self._c(o)))

    def __radd__(self, o: Num) -> V:
        return self._new(self.b.fadd(self._c(o), self.v))

    def __sub__(self, o: Num) -> V:
        return self._new(self.b.fsub(self.v, self._c(o)))

    def __rsub__(self, o: Num) -> V:
        return self._new(self.b.fsub(self._c(o), self.v))

    def __mul__(self, o: Num) -> V:
        return self._new(self.b.fmul(self.v, self._c(o)))

    def __rmul__(self, o: Num) -> V:
        return self._new(self.b.fmul(self._c(o), self.v))

    def __truediv__(self, o: Num) -> V:
        return self._new(self.b.fdiv(self.v, self._c(o)))

    def __rtruediv__(self, o: Num) -> V:
        return self._new(self.b.fdiv(self._c(o), self.v))

    def __neg__(self) -> V:
        return self._new(self.b.fneg(self.v))


def _builder(*xs: Num) -> ir.IRBuilder:
    return next(x.b for x in xs if isinstance(x, V))


def _ll(x: Num) -> ir.Value:
    return x.v if isinstance(x, V) else ir.Constant(F64, float(x))


def fma(a: Num, b: Num, c: Num) -> Num:
    """a * b + c rounded once (LLVM's fma: the instruction where the CPU has it)."""
    if not any(isinstance(x, V) for x in (a, b, c)):
        return float(Fraction(a) * Fraction(b) + Fraction(c))
    return V(_builder(a, b, c), _builder(a, b, c).fma(_ll(a), _ll(b), _ll(c)))


def _unary_intrinsic(name: str, x: V) -> V:
    fn = x.b.module.declare_intrinsic(name, [F64])
    return V(x.b, x.b.call(fn, [x.v]))


def rint(x: V) -> V:
    """Round to the nearest integer, ties to even (as numpy.rint)."""
    return _unary_intrinsic("llvm.rint", x)


def fabs(x: V) -> V:
    return _unary_intrinsic("llvm.fabs", x)


def select(cond: ir.Value, x: Num, y: Num) -> V:
    """x where the i1 ``cond`` holds, else y."""
    b = _builder(x, y)
    return V(b, b.select(cond, _ll(x), _ll(y)))


def pow2(n: V) -> V:
    """2**n for an integral float n, clamped to [-1022, 1023] (normal numbers only)."""
    b = n.b
    i64 = ir.IntType(64)
    e = b.fptosi(n.v, i64)
    e = b.select(b.icmp_signed("<", e, ir.Constant(i64, -1022)), ir.Constant(i64, -1022), e)
    e = b.select(b.icmp_signed(">", e, ir.Constant(i64, 1023)), ir.Constant(i64, 1023), e)
    bits = b.shl(b.add(e, ir.Constant(i64, 1023)), ir.Constant(i64, 52))
    return V(b, b.bitcast(bits, F64))


# ---- the expansion kernels, operation for operation ------------------------------------------


def two_sum(a: Num, b: Num) -> tuple[Num, Num]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def fast_two_sum(a: Num, b: Num) -> tuple[Num, Num]:
    s = a + b
    return s, b - (s - a)


def two_prod(a: Num, b: Num) -> tuple[Num, Num]:
    p = a * b
    return p, fma(a, b, -p)


def _w(a: Sequence[Num], i: int) -> Num:
    return a[i] if i < len(a) else 0.0


def add(a: Sequence[Num], b: Sequence[Num], k: int) -> tuple[Num, ...]:
    """expansion.add (k = 2, 3)."""
    if k == 3:
        s0, e0 = two_sum(a[0], b[0])
        s1, e1 = two_sum(_w(a, 1), _w(b, 1))
        t1, e2 = two_sum(s1, e0)
        t2 = (_w(a, 2) + _w(b, 2)) + (e1 + e2)
        r0, u = two_sum(s0, t1)
        r1, r2 = two_sum(u, t2)
        r0, r1 = fast_two_sum(r0, r1)
        return r0, r1, r2
    s0, e0 = two_sum(a[0], b[0])
    e0 = e0 + (_w(a, 1) + _w(b, 1))
    return fast_two_sum(s0, e0)


def mul(a: Sequence[Num], b: Sequence[Num], k: int) -> tuple[Num, ...]:
    """expansion.mul (k = 2, 3)."""
    if len(b) > len(a):
        a, b = b, a
    if k == 3:
        a0, b0 = a[0], b[0]
        p00, q00 = two_prod(a0, b0)
        a1 = _w(a, 1)
        p10, q10 = two_prod(a1, b0)
        s2 = _w(a, 2) * b0 + q10
        if len(b) > 1:
            b1 = b[1]
            p01, q01 = two_prod(a0, b1)
            s1, e1 = two_sum(p01, p10)
            s2 = s2 + (a1 * b1 + _w(b, 2) * a0 + q01 + e1)
        else:
            s1 = p10
        s1, e2 = two_sum(s1, q00)
        s2 = s2 + e2
        r0, u = fast_two_sum(p00, s1)
        r1, r2 = fast_two_sum(u, s2)
        return r0, r1, r2
    p, q = two_prod(a[0], b[0])
    q = q + (a[0] * _w(b, 1) + _w(a, 1) * b[0])
    return fast_two_sum(p, q)


def div(a: Sequence[Num], b: Sequence[Num], k: int) -> tuple[Num, ...]:
    """expansion.div (k = 2, 3): long division."""
    b0 = b[0]
    q0 = a[0] / b0
    r = add(a, [-w for w in mul(b, [q0], k)], k)
    q1 = r[0] / b0
    if k == 2:
        return fast_two_sum(q0, q1)
    r = add(r, [-w for w in mul(b, [q1], k)], k)
    q2 = r[0] / b0
    r0, u = fast_two_sum(q0, q1)
    r1, r2 = fast_two_sum(u, q2)
    return r0, r1, r2


# ---- intrinsics ---------------------------------------------------------------------------------


def unpack(builder: ir.IRBuilder, ty: types.Type, value: ir.Value) -> list[V]:
    """The float64 members of a tuple argument (or the argument itself) as V values."""
    if isinstance(ty, types.BaseTuple):
        return [V(builder, builder.extract_value(value, i)) for i in range(len(ty))]
    return [V(builder, value)]


def pack(context: Any, builder: ir.IRBuilder, ty: types.Type, values: Sequence[Num]) -> Any:
    return context.make_tuple(builder, ty, [_ll(v) for v in values])


def words_intrinsic(fn: Callable[..., Sequence[Num]], kinds: str, nout: int = 3) -> Any:
    """A numba intrinsic ``f(kw, x1, .., xn)`` that runs ``fn(k, *operands)`` at compile time.

    ``kinds`` has one letter per operand: ``w``, a tuple of floats of which k words are used
    (a list of V); ``c``, a scalar (a V; a boolean is a V holding an i1) or a tuple of scalars
    (a list of V), passed whole. The result is a tuple of ``nout`` floats (padded with 0.0).
    """

    def typer(kw: types.Type, *args: types.Type) -> Any:
        k = len(kw)
        sig = types.UniTuple(types.float64, nout)(kw, *args)

        def codegen(context: Any, builder: ir.IRBuilder, signature: Any, llargs: Any) -> Any:
            ops: list[Any] = []
            for kind, ty, val in zip(kinds, signature.args[1:], llargs[1:], strict=True):
                vals = unpack(builder, ty, val)
                if kind == "w":
                    ops.append(vals[:k])
                else:
                    ops.append(vals if isinstance(ty, types.BaseTuple) else vals[0])
            out = list(fn(k, *ops))
            return pack(context, builder, signature.return_type, out + [0.0] * (nout - len(out)))

        return sig, codegen

    # numba's intrinsic decorator needs a fixed parameter list
    if len(kinds) == 1:

        def one(typingctx: Any, kw: Any, x: Any) -> Any:  # noqa: ARG001
            return typer(kw, x)

        return intrinsic(one)
    if len(kinds) == 2:

        def two(typingctx: Any, kw: Any, x: Any, y: Any) -> Any:  # noqa: ARG001
            return typer(kw, x, y)

        return intrinsic(two)
    if len(kinds) == 4:

        def four(typingctx: Any, kw: Any, x: Any, y: Any, z: Any, u: Any) -> Any:  # noqa: ARG001
            return typer(kw, x, y, z, u)

        return intrinsic(four)
    if len(kinds) == 6:

        def six(typingctx: Any, kw: Any, x: Any, y: Any, z: Any, u: Any, v: Any, w: Any) -> Any:  # noqa: ARG001
            return typer(kw, x, y, z, u, v, w)

        return intrinsic(six)
    raise ValueError(f"no intrinsic wrapper for {len(kinds)} operands")


w_add = words_intrinsic(lambda k, a, b: add(a, b, k), "ww")
w_mul = words_intrinsic(lambda k, a, b: mul(a, b, k), "ww")
w_div = words_intrinsic(lambda k, a, b: div(a, b, k), "ww")
