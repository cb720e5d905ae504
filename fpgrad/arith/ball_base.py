"""The ball value of :mod:`fpgrad.arith.ball`: :class:`Ball` (k-word midpoints, float64 radii),
the constants that bound its words and radii, and the glue to the compiled kernels that
:mod:`fpgrad.arith.ball` (arithmetic) and :mod:`fpgrad.arith.ball_functions` (elementary
functions) share.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

RU = 1.0 + 2.0**-45  # upward inflation of radius formulas (a few float64 roundings)
HI_BOUND = 1.0 + 2.0**-48  # |value| <= |word 0| * HI_BOUND for the expansions used here
RANGE = (2.0**-800, 2.0**800)


class Ball:
    """Multi-word midpoints ``mid`` (k, *shape) and float64 radii ``rad`` (shape)."""

    __slots__ = ("mid", "rad")

    def __init__(self, mid: np.ndarray, rad: np.ndarray) -> None:
        self.mid = mid
        self.rad = rad

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rad.shape

    @property
    def size(self) -> int:
        return int(self.rad.size)

    @property
    def ndim(self) -> int:
        return self.rad.ndim

    @property
    def T(self) -> Ball:  # noqa: N802 - numpy's name
        return Ball(np.swapaxes(self.mid, -1, -2) if self.ndim >= 2 else self.mid, self.rad.T)

    def __getitem__(self, idx: Any) -> Ball:
        idx = idx if isinstance(idx, tuple) else (idx,)
        return Ball(self.mid[(slice(None), *idx)], self.rad[idx])

    def __len__(self) -> int:
        return self.shape[0]

    def words(self) -> list[np.ndarray]:
        return list(self.mid)

    def __repr__(self) -> str:
        return f"Ball(shape={self.shape}, words={self.mid.shape[0]})"


def _jit() -> tuple[ModuleType, ModuleType]:
    """The compiled kernels (numba is imported, and each kernel compiled, on first use)."""
    from fpgrad.arith import jit_ball, jit_elementary

    return jit_ball, jit_elementary


def _words_tag(k: int) -> tuple[float, ...]:
    return (0.0,) * k  # jit_words.words_tag: k as the length of a tuple


def exact_zeros(ball: Ball) -> np.ndarray:
    """Proven exact zeros: every midpoint word 0 and radius 0 (the ball is {0})."""
    return ~(ball.mid != 0).any(axis=0) & (ball.rad == 0)


def _flat(ball: Ball) -> tuple[np.ndarray, np.ndarray]:
    """C-contiguous (k, N) words and (N,) radii of a ball."""
    mid = np.ascontiguousarray(ball.mid, dtype=np.float64)
    rad = np.ascontiguousarray(ball.rad, dtype=np.float64)
    return mid.reshape(mid.shape[0], -1), rad.reshape(-1)
