"""Exact values as the rest of fpgrad reads them: ``hi + lo`` float64 pairs per element, the
mask of proven exact zeros, and (from certified balls) radii and undetermined elements."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ExactArray:
    """An exact array as ``hi + lo`` float64 pairs, a mask of proven exact zeros, and
    (from certified balls) radii ``rad`` and the mask of ``undetermined`` elements (the ball
    contains 0 but is not proven zero; ``hi = lo = 0`` there)."""

    hi: np.ndarray
    lo: np.ndarray
    zero: np.ndarray
    rad: np.ndarray | None = None
    undetermined: np.ndarray | None = None

    def undetermined_mask(self) -> np.ndarray:
        if self.undetermined is None:
            return np.zeros(np.shape(self.hi), dtype=bool)
        return self.undetermined

    @classmethod
    def from_mp(cls, values: np.ndarray) -> ExactArray:
        arr = np.asarray(values, dtype=object)
        flat = arr.ravel()
        hi = np.empty(flat.size)
        lo = np.empty(flat.size)
        zero = np.empty(flat.size, dtype=bool)
        for i, v in enumerate(flat):  # v keeps its own context and precision
            zero[i] = v == 0
            h = float(v)
            hi[i] = h
            lo[i] = float(v - h) if np.isfinite(h) else 0.0
        return cls(hi.reshape(arr.shape), lo.reshape(arr.shape), zero.reshape(arr.shape))
