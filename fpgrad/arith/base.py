"""The slots a number system fills so that :mod:`fpgrad.run.evaluate` can run a network in it.

After mpmath's contexts: generic algorithms take the number system as first argument and
use only these operations, so a new number system is one class. Arrays are whatever the
system likes (numpy object arrays of mpf, float64 arrays of rounded values...); masks and
shapes are plain numpy.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

Array = Any


class Arith(Protocol):
    """Elementwise and reduction operations on arrays of one number system."""

    name: str

    def asarray(self, x: np.ndarray) -> Array:
        """Arrays of float64 values, taken exactly (or rounded into the system)."""

    def const(self, value: float) -> Any:
        """A scalar of the system."""

    def add(self, a: Array, b: Array) -> Array: ...
    def sub(self, a: Array, b: Array) -> Array: ...
    def mul(self, a: Array, b: Array) -> Array: ...
    def div(self, a: Array, b: Array) -> Array: ...
    def matmul(self, a: Array, b: Array) -> Array: ...
    def sum(self, a: Array, axis: int, keepdims: bool = False) -> Array: ...
    def max(self, a: Array, axis: int, keepdims: bool = False) -> Array: ...
    def exp(self, a: Array) -> Array: ...
    def log(self, a: Array) -> Array: ...
    def tanh(self, a: Array) -> Array: ...
    def sigmoid(self, a: Array) -> Array: ...
    def sqrt(self, a: Array) -> Array: ...
    def abs(self, a: Array) -> Array: ...

    def positive(self, a: Array) -> np.ndarray:
        """Boolean mask of a > 0 (exact comparison)."""

    def where(self, mask: np.ndarray, a: Array, b: Array) -> Array: ...

    def to_float64(self, a: Array) -> np.ndarray:
        """Nearest float64 values (for display and tolerances, never for verdicts)."""

    # Local derivatives where formulas differ between number systems: a strict machine
    # computes them from the outputs as torch does (1 - t*t, s*(1 - s), p - onehot); the
    # exact reference uses cancellation-free forms, so saturation never rounds it to 0.
    def tanh_deriv(self, z: Array, t: Array) -> Array: ...
    def sigmoid_deriv(self, z: Array, s: Array) -> Array: ...
    def xent_grad(self, e: Array, total: Array, t: np.ndarray) -> Array:
        """d(-sum t log softmax)/dz per row: p * sum(t) - t, with p = e / total."""

    def bce_grad(self, z: Array, t: np.ndarray) -> Array:
        """d(bce with logits)/dz: sigmoid(z) - t."""


class ExactDerivatives:
    """Loss derivatives of the exact systems, without cancellation, over the slots: the
    target sum is taken in the system (never in float64), and on one-hot rows
    ``p_c - 1 = -(sum_{j != c} e_j) / total``, so a saturated softmax never cancels."""

    def xent_grad(self, e: Array, total: Array, t: np.ndarray) -> Array:
        ar: Arith = self  # type: ignore[assignment]
        tt = ar.asarray(t)
        tsum = ar.sum(tt, axis=1, keepdims=True)
        grad = ar.sub(ar.mul(ar.div(e, total), tsum), tt)
        nz = t != 0
        onehot = nz & (t == 1.0) & (nz.sum(axis=1, keepdims=True) == 1)
        if onehot.any():
            rest = ar.sum(
                ar.mul(e, ar.asarray((~onehot).astype(np.float64))), axis=1, keepdims=True
            )
            grad = ar.where(onehot, ar.sub(ar.const(0.0), ar.div(rest, total)), grad)
        return grad

    def bce_grad(self, z: Array, t: np.ndarray) -> Array:
        ar: Arith = self  # type: ignore[assignment]
        grad = ar.sub(ar.sigmoid(z), ar.asarray(t))
        ones = t == 1.0
        if ones.any():  # sigmoid(z) - 1 = -sigmoid(-z)
            neg = ar.sub(ar.const(0.0), ar.sigmoid(ar.sub(ar.const(0.0), z)))
            grad = ar.where(ones, neg, grad)
        return grad


class OutputDerivatives:
    """The naive derivative formulas, rounded per operation: what torch's kernels compute."""

    def tanh_deriv(self, z: Array, t: Array) -> Array:
        return self.sub(self.const(1.0), self.mul(t, t))  # type: ignore[attr-defined]

    def sigmoid_deriv(self, z: Array, s: Array) -> Array:
        return self.mul(s, self.sub(self.const(1.0), s))  # type: ignore[attr-defined]

    def xent_grad(self, e: Array, total: Array, t: np.ndarray) -> Array:
        ar: Arith = self  # type: ignore[assignment]
        p = ar.div(e, total)
        tsum = ar.asarray(t.sum(axis=1, keepdims=True))
        return ar.sub(ar.mul(p, tsum), ar.asarray(t))

    def bce_grad(self, z: Array, t: np.ndarray) -> Array:
        ar: Arith = self  # type: ignore[assignment]
        return ar.sub(ar.sigmoid(z), ar.asarray(t))
