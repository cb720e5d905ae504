"""Upper bounds of the radius products of :meth:`fpgrad.arith.ball.BallArith.matmul` in float32.

A radius needs an upper bound, not an accurate value, so ``|A| rB + rA |B|`` runs as a float32
GEMM (half the float64 one) on operands rounded *up* into float32, with the GEMM's rounding
bounded from above. :func:`upper_matmul` bounds ``X @ Y`` for non-negative ``X = |x0|
HI_BOUND + xr`` and ``Y = |y0| HI_BOUND + yr`` (either part may be absent), evaluated in real
arithmetic. The proof, with ``u = 2**-24`` (float32 rounding) and ``eta = 2**-126`` (the least
normal float32):

1. Scaling: ``X 2**sx`` with ``sx = 40 - e``, ``max X`` in ``[2**(e-1), 2**e)`` up to a float64
   rounding, so every scaled element is below ``2**41`` (and ``Y`` alike). Exact in float64 unless it underflows there
   (then an absolute error below ``2**-1074``, covered by step 2's ``eta``).
2. Rounding up (:func:`_up32`): each non-zero element ``x`` (computed in float64 with at most
   three roundings of ``2**-53``) becomes ``f = float32(x (1 + 2**-22) + eta)``. If ``f`` is
   normal, ``f >= (x (1 + 2**-22) + eta)(1 - u)(1 - 2**-53)**5 >= x``; float32 values below
   ``eta`` are never produced (``f >= eta (1 - u)`` rounds to ``eta`` at least). So ``f >= x``
   and ``f >= eta``: the inputs are normal floats, and a machine that flushes subnormal inputs
   (DAZ) reads them unchanged. Exact zeros stay 0; NaN stays NaN (no bound, as in float64);
   overflow gives inf, an upper bound.
3. The GEMM: ``s = sum_k f_k g_k`` of non-negative terms in any order, with or without fused
   multiply-adds, gradual underflow or flush-to-zero: every operation returns at least ``z (1 -
   u) - eta`` of its exact result ``z``; with ``n`` products and ``n - 1`` additions the
   computed ``C >= (1 - u)**n s - 2 n eta``, so ``s <= (C + 2 n eta) / (1 - n u)``, and
   ``1 / (1 - n u) <= 1 + 2 n u`` for ``n u <= 1/2``. No overflow: ``s <= n 2**83 < 2**128``.
4. Unscaling: ``(C + 2 n eta) 2**-(sx + sy) (1 + (n + 2) 2**-23)``; with ``|sx|, |sy| <= 400``
   every quantity is a normal float64, so the power of two is exact, and the two float64
   roundings (the sum, the factor) are covered by the ``2 * 2**-23`` added to ``2 n u``.

Operands whose largest element is not finite, or needs a shift beyond 400, or ``n > 2**20``,
return None: the caller bounds them in float64 (as it does products of fewer than
:data:`MIN_MACS` multiply-adds).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fpgrad.arith.jit_words import JIT

HI_BOUND = 1.0 + 2.0**-48  # as fpgrad.arith.ball
TOP = 40  # scaled operands stay below 2**(TOP + 1)
MAX_SHIFT = 400
ETA32 = 2.0**-126  # the least normal float32
UP = 1.0 + 2.0**-22
MIN_MACS = 2**20  # smaller products: float64 BLAS is as fast (measured)


@njit(**JIT)
def _up32(m0: np.ndarray, r: np.ndarray, use_m: bool, use_r: bool, scale: float,
          out: np.ndarray) -> None:  # fmt: skip
    """out = float32 upper bounds of ``(|m0| HI_BOUND + r) scale`` (step 2 of the module)."""
    rows, cols = out.shape
    for i in range(rows):
        for j in range(cols):
            x = abs(m0[i, j]) * HI_BOUND if use_m else 0.0
            if use_r:
                x = x + r[i, j]
            # zero tested before scaling: a positive x may underflow to 0 when scaled down
            out[i, j] = np.float32(x * scale * UP + ETA32) if x != 0.0 else np.float32(0.0)


@njit(**JIT)
def _unscale(c: np.ndarray, add: float, factor: float, acc: np.ndarray, out: np.ndarray) -> None:
    """out = acc + (c + add) factor, c float32 (step 4 of the module)."""
    rows, cols = out.shape
    for i in range(rows):
        for j in range(cols):
            out[i, j] = acc[i, j] + (np.float64(c[i, j]) + add) * factor


def _scaled(m0: np.ndarray | None, r: np.ndarray | None) -> tuple[np.ndarray, int] | None:
    """(the float32 upper bounds of ``(|m0| HI_BOUND + r) 2**s``, s), or None (see module)."""
    ref = r if r is not None else m0
    assert ref is not None
    m0_ = ref if m0 is None else m0
    r_ = ref if r is None else r
    if ref.size == 0:
        return None
    top = 0.0  # >= max(|m0| HI_BOUND + r) up to float64 rounding; NaN propagates
    if m0 is not None:
        top = float(np.maximum(m0.max(), -m0.min())) * HI_BOUND
    if r is not None:
        top += float(r.max())
    if not math.isfinite(top):
        return None
    shift = 0 if top == 0.0 else TOP - math.frexp(top)[1]
    if abs(shift) > MAX_SHIFT:
        return None
    flip = not ref.flags.c_contiguous and ref.flags.f_contiguous  # walk memory in order
    out = np.empty(ref.shape, dtype=np.float32, order="F" if flip else "C")
    if flip:  # the transposes are C-contiguous views; BLAS reads ``out`` transposed
        m0_, r_, view = m0_.T, r_.T, out.T
    else:
        view = out
    _up32(m0_, r_, m0 is not None, r is not None, math.ldexp(1.0, shift), view)
    return out, shift


def upper_matmul(
    x0: np.ndarray | None,
    xr: np.ndarray | None,
    y0: np.ndarray | None,
    yr: np.ndarray | None,
    acc: np.ndarray,
) -> np.ndarray | None:
    """``acc`` plus an elementwise upper bound of ``(|x0| HI_BOUND + xr) @ (|y0| HI_BOUND +
    yr)`` (float64 2-D arrays, None for an absent part, at least one per side), by one float32
    GEMM, in float64 rounded to nearest (the caller's inflation covers that addition); None
    when the operands are out of its range (the module's proof)."""
    x, y = (xr if xr is not None else x0), (yr if yr is not None else y0)
    assert x is not None and y is not None
    (rows, n), cols = x.shape, y.shape[1]
    if acc.shape != (rows, cols) or n > 2**20 or rows * n * cols < MIN_MACS:
        return None
    xs, ys = _scaled(x0, xr), _scaled(y0, yr)
    if xs is None or ys is None:
        return None
    # 2**-s times the factor is exact (a power of two, normal): one rounding, as in step 4
    factor = math.ldexp(1.0 + (n + 2) * 2.0**-23, -(xs[1] + ys[1]))
    out = np.empty(acc.shape)
    _unscale(xs[0] @ ys[0], 2 * n * ETA32, factor, acc, out)
    return out
