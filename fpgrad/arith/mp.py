"""mpmath at a fixed precision: numpy object arrays of mpf in a private context.

Each instance owns an ``MPContext`` so its precision never leaks into, or depends on, the
global ``mpmath.mp``. Every operation is rounded to ``prec`` bits; :mod:`fpgrad.exact`
certifies the results by evaluating twice at different precisions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpmath.ctx_mp import MPContext


class MPArith:
    """Numpy object arrays of mpmath numbers at ``prec`` bits."""

    def __init__(self, prec: int) -> None:
        self.prec = prec
        self.ctx = MPContext()
        self.ctx.prec = prec
        self.name = f"mpmath@{prec}"
        c = self.ctx
        self._exp = np.frompyfunc(c.exp, 1, 1)
        self._log = np.frompyfunc(c.log, 1, 1)
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

    def xent_grad(self, e: np.ndarray, total: np.ndarray, t: np.ndarray) -> np.ndarray:
        p = _obj(e / total)
        out = _obj(p * self.asarray(t.sum(axis=1, keepdims=True)) - self.asarray(t))
        for row in range(t.shape[0]):
            hot = np.flatnonzero(t[row])
            if hot.size == 1 and t[row, hot[0]] == 1.0:  # one-hot: p_k - 1 = -sum_{j!=k} p_j
                k = int(hot[0])
                others = [e[row, j] for j in range(t.shape[1]) if j != k]
                out[row, k] = -self.ctx.fsum(others) / total[row, 0]
        return out

    def bce_grad(self, z: np.ndarray, t: np.ndarray) -> np.ndarray:
        out = _obj(self.sigmoid(z) - self.asarray(t))
        ones = t == 1.0
        out[ones] = -self.sigmoid(-z[ones])  # sigmoid(z) - 1 = -sigmoid(-z)
        return out


def _obj(a: Any) -> np.ndarray:
    """Keep results as object arrays (numpy returns bare scalars for 0-d results)."""
    arr = np.asarray(a, dtype=object)
    return arr
