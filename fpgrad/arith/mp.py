"""mpmath at a fixed precision: numpy object arrays of mpf in a private context.

Each instance owns an ``MPContext`` so its precision never leaks into, or depends on, the
global ``mpmath.mp``. Every operation is rounded to ``prec`` bits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpmath.ctx_mp import MPContext


class MPArith:
    """Numpy object arrays of mpmath numbers at ``prec`` bits (rounded, not enclosed: a
    high-precision comparison system for tests and benchmarks, never a certificate)."""

    exact = True  #: takes the exact reference's cancellation-free forms in evaluate

    def __init__(self, prec: int) -> None:
        self.prec = prec
        self.ctx = MPContext()
        self.ctx.prec = prec
        self.name = f"mpmath@{prec}"
        c = self.ctx
        self._exp = np.frompyfunc(c.exp, 1, 1)
        self._log = np.frompyfunc(c.log, 1, 1)
        self._log1p = np.frompyfunc(c.log1p, 1, 1)
        self._tanh = np.frompyfunc(c.tanh, 1, 1)
        self._sqrt = np.frompyfunc(c.sqrt, 1, 1)
        self._sigmoid = np.frompyfunc(lambda v: 1 / (1 + c.exp(-v)), 1, 1)
        self._ncdf = np.frompyfunc(c.ncdf, 1, 1)
        self._npdf = np.frompyfunc(c.npdf, 1, 1)
        self._sech2 = np.frompyfunc(lambda v: c.sech(v) ** 2, 1, 1)
        self._pos = np.frompyfunc(lambda v: v > 0, 1, 1)
        self._float = np.frompyfunc(float, 1, 1)
        self._mpf = np.frompyfunc(c.mpf, 1, 1)

    def asarray(self, x: np.ndarray) -> np.ndarray:
        return _obj(self._mpf(np.asarray(x, dtype=np.float64)))  # mpf(float) is exact

    def const(self, value: float) -> Any:
        return self.ctx.mpf(value)

    def add(self, a, b):  # noqa: ANN001, ANN201 - object arrays
        return a + b

    def sub(self, a, b):  # noqa: ANN001, ANN201
        return a - b

    def mul(self, a, b):  # noqa: ANN001, ANN201
        return a * b

    def div(self, a, b):  # noqa: ANN001, ANN201
        return a / b

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return _obj(np.matmul(a, b))

    def sum(self, a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
        return _obj(np.sum(a, axis=axis, keepdims=keepdims))

    def max(self, a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
        return _obj(np.max(a, axis=axis, keepdims=keepdims))

    def exp(self, a: np.ndarray) -> np.ndarray:
        return _obj(self._exp(a))

    def log(self, a: np.ndarray) -> np.ndarray:
        return _obj(self._log(a))

    def log1p(self, a: np.ndarray) -> np.ndarray:
        return _obj(self._log1p(a))

    def tanh(self, a: np.ndarray) -> np.ndarray:
        return _obj(self._tanh(a))

    def sigmoid(self, a: np.ndarray) -> np.ndarray:
        return _obj(self._sigmoid(a))

    def sqrt(self, a: np.ndarray) -> np.ndarray:
        return _obj(self._sqrt(a))

    def ncdf(self, a: np.ndarray) -> np.ndarray:
        """The standard normal CDF Phi (GELU)."""
        return _obj(self._ncdf(a))

    def npdf(self, a: np.ndarray) -> np.ndarray:
        """The standard normal density phi (GELU's derivative)."""
        return _obj(self._npdf(a))

    def abs(self, a: np.ndarray) -> np.ndarray:
        return _obj(np.abs(a))

    def positive(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(self._pos(a), dtype=bool)

    def where(self, mask: np.ndarray, a, b):  # noqa: ANN001, ANN201
        return _obj(np.where(mask, a, b))

    def to_float64(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(self._float(a), dtype=np.float64)

    # cancellation-free derivatives (mpmath has no overflow or underflow, only rounding)
    def tanh_deriv(self, z: np.ndarray, t: np.ndarray) -> np.ndarray:
        return _obj(self._sech2(z))  # 1 - tanh^2 = sech^2

    def sigmoid_deriv(self, z: np.ndarray, s: np.ndarray) -> np.ndarray:
        return _obj(s * self.sigmoid(-z))  # s (1 - s) = s(z) s(-z)


def _obj(a: Any) -> np.ndarray:
    """Keep results as object arrays (numpy returns bare scalars for 0-d results)."""
    arr = np.asarray(a, dtype=object)
    return arr
