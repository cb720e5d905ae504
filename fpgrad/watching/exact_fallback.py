"""Exact rational recompute (python-flint ``fmpq``) of the few ``mm``/``addmm`` elements whose
zero-or-not status float64 cannot certify (a float64 result inside its rounding-error band)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: At most this many contested elements per op call are recomputed exactly; more are undecided.
EXACT_LIMIT = 256


def _q(x: float) -> Any:
    import flint

    return flint.fmpq(*float(x).as_integer_ratio())


def _dot(a: np.ndarray, b: np.ndarray) -> Any:
    import flint

    acc = flint.fmpq(0)
    for x, y in zip(a.tolist(), b.tolist(), strict=False):
        if x and y:
            acc += _q(x) * _q(y)
    return acc


def exact_elements(
    func: Any, args: tuple, kwargs: dict, positions: torch.Tensor
) -> tuple[int, int] | None:
    """(non-zero, zero) counts of the exact op result at ``positions`` (rows of output
    indices), or None when the op is not ``mm``/``addmm`` or there are more than
    :data:`EXACT_LIMIT`."""
    name = func.overloadpacket.__name__
    idx = positions.cpu().numpy()
    if name not in ("mm", "addmm") or len(idx) > EXACT_LIMIT:
        return None
    if name == "mm":
        a, b = args[0], args[1]
        bias, beta, alpha = None, 1.0, 1.0
    else:
        bias, a, b = args[0], args[1], args[2]
        beta = float(kwargs.get("beta", args[3] if len(args) > 3 else 1.0))
        alpha = float(kwargs.get("alpha", args[4] if len(args) > 4 else 1.0))
    a64 = a.detach().to(torch.float64).cpu().numpy()
    b64 = b.detach().to(torch.float64).cpu().numpy()
    c64 = None
    if bias is not None:
        c64 = np.broadcast_to(
            bias.detach().to(torch.float64).cpu().numpy(), (a64.shape[0], b64.shape[1])
        )
    nonzero = 0
    for i, j in idx.tolist():
        v = _q(alpha) * _dot(a64[i], b64[:, j])
        if c64 is not None and beta:
            v += _q(beta) * _q(c64[i, j])
        nonzero += v != 0
    return nonzero, len(idx) - nonzero
