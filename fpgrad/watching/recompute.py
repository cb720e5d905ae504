"""The float64 recompute of one aten op call, whole or at selected output elements."""

from __future__ import annotations

from typing import Any

import torch

from fpgrad.watching.families import _U64, FORMAT_OF, family
from fpgrad.watching.leaves import leaves, map_leaves


def _to64(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(torch.float64)
    if isinstance(x, torch.dtype) and x.is_floating_point:
        return torch.float64
    return x


def _abs64(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(torch.float64).abs()
    if isinstance(x, float):
        return abs(x)
    return x


def _ints64(x: Any) -> Any:
    """An integer (not bool) tensor as float64, exactly: every element is at most 2^53 in
    magnitude (else ``ValueError``); anything else as it is."""
    if isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex()):
        if x.dtype == torch.bool:
            return x
        if x.numel() and int(x.detach().abs().max()) > 2**53:
            raise ValueError("an integer beyond 2^53")
        return x.detach().to(torch.float64)
    return x


def _float_outputs(out: Any) -> list[torch.Tensor | None]:
    if isinstance(out, torch.Tensor):  # the common case, without walking a structure
        return [out if out.dtype in FORMAT_OF else None]
    flat = leaves(out)
    return [t if isinstance(t, torch.Tensor) and t.dtype in FORMAT_OF else None for t in flat]


def recompute(func: Any, args: tuple, kwargs: dict, absolute: bool = False) -> list | None:
    """The op's float64 outputs on the same inputs (on ``|inputs|`` if ``absolute``), or None
    when the op cannot run in float64. An op of integer tensors and float scalars (``arange(n) *
    0.5``) would run in the default dtype again: it runs with its integer tensors widened
    exactly (:func:`_ints64`); an output still not in float64 is None."""
    conv = _abs64 if absolute else _to64
    try:
        with torch.no_grad():
            out = func(*map_leaves(conv, args), **map_leaves(conv, kwargs))
            outs = _float_outputs(out)
            if any(o is not None and o.dtype != torch.float64 for o in outs):

                def wide(x: Any) -> Any:
                    return conv(_ints64(x))

                outs = _float_outputs(func(*map_leaves(wide, args), **map_leaves(wide, kwargs)))
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return None
    return [o if o is None or o.dtype == torch.float64 else None for o in outs]


def _inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    flat = leaves((args, kwargs))
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _mm_parts(func: Any, args: tuple, kwargs: dict) -> tuple | None:
    """(bias, a, b, beta, alpha) of an ``mm``/``addmm`` call, or None for other ops."""
    name = func.overloadpacket.__name__
    if name == "mm":
        return None, args[0], args[1], 1.0, 1.0
    if name == "addmm":
        beta = float(kwargs.get("beta", args[3] if len(args) > 3 else 1.0))
        alpha = float(kwargs.get("alpha", args[4] if len(args) > 4 else 1.0))
        return args[0], args[1], args[2], beta, alpha
    return None


class _Shadow:
    """The float64 recompute of one op call at selected output elements.

    ``mm``/``addmm`` recompute only the selected dot products and pointwise ops (torch's
    ``pointwise`` tag) only the selected elements, in float64; other ops are recomputed whole
    (once per call) and then indexed. The rounding-error bound of a dot product holds for any
    summation order, so the gathered sums are as good as the whole product."""

    def __init__(self, func: Any, args: tuple, kwargs: dict) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs
        self.fam = family(func)
        self._full: dict[bool, list | None] = {}
        self._inputs_finite: bool | None = None
        self._mm = _mm_parts(func, args, kwargs)
        self._pointwise = torch.Tag.pointwise in func.tags
        self._where: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rc: tuple | None = None

    def where(self, sel: torch.Tensor) -> torch.Tensor:
        """``sel.nonzero()`` (rows of indices, in row-major order), computed once per mask."""
        if self._where is None or self._where[0] is not sel:
            self._where = (sel, sel.nonzero())
        return self._where[1]

    def pick(self, x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """``x[sel]`` (same order) by integer indices: cheaper than a boolean mask index."""
        if sel.dim() == 0:
            return x[sel]
        return x[self.where(sel).unbind(1)]

    def _whole(self, k: int, absolute: bool) -> torch.Tensor | None:
        if absolute not in self._full:
            self._full[absolute] = recompute(self.func, self.args, self.kwargs, absolute)
        outs = self._full[absolute]
        return None if outs is None or k >= len(outs) else outs[k]

    def _gather_mm(self, sel: torch.Tensor, absolute: bool) -> torch.Tensor:
        bias, a, b, beta, alpha = self._mm
        conv = _abs64 if absolute else _to64
        if self._rc is None or self._rc[0] is not sel:  # once per mask
            i, j = self.where(sel).unbind(1)
            rows, ri = torch.unique(i, return_inverse=True)
            cols, ci = torch.unique(j, return_inverse=True)
            # gather first, then widen: only the rows and columns used (index_select: a fast
            # gather, the same values as a[rows] and b[:, cols])
            if rows.numel() * cols.numel() <= 4 * i.numel():
                # zeros come in whole rows/columns (dead units): one small float64 product
                parts = (True, _to64(a.index_select(0, rows)), _to64(b.index_select(1, cols)))
            else:
                parts = (False, _to64(a.index_select(0, i)), _to64(b.index_select(1, j)).T)
            self._rc = (sel, ri, ci, *parts)
        _, ri, ci, small, a64, b64 = self._rc
        if absolute:  # |a| and |b| of the same gathered float64 values
            a64, b64 = a64.abs(), b64.abs()
        if small:
            r = (a64 @ b64)[ri, ci] * conv(alpha)
        else:
            r = (a64 * b64).sum(1) * conv(alpha)
        if bias is not None and beta:
            c = conv(self.pick(bias.detach().broadcast_to(sel.shape), sel))
            r = r + conv(beta) * c
        return r

    def _gather_pointwise(self, sel: torch.Tensor, absolute: bool) -> torch.Tensor | None:
        conv = _abs64 if absolute else _to64

        def pick(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim():
                return conv(self.pick(x.detach().broadcast_to(sel.shape), sel))
            return conv(x)

        try:
            with torch.no_grad():
                out = self.func(*map_leaves(pick, self.args), **map_leaves(pick, self.kwargs))
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            return None
        return out if isinstance(out, torch.Tensor) and out.dtype == torch.float64 else None

    def at(self, k: int, sel: torch.Tensor | None, absolute: bool = False) -> torch.Tensor | None:
        """Float64 values of output ``k`` at the mask ``sel`` (1-D; all of it, in its shape,
        when ``sel`` is None), or None if unavailable."""
        if sel is None:
            return self._whole(k, absolute)
        if self._mm is not None and k == 0 and sel.dim() == 2:
            return self._gather_mm(sel, absolute)
        if self._pointwise and k == 0:
            r = self._gather_pointwise(sel, absolute)
            if r is not None and r.shape == (len(self.where(sel)),):
                return r
        r = self._whole(k, absolute)
        return None if r is None or r.shape != sel.shape else self.pick(r, sel)

    def inputs_finite(self) -> bool:
        if self._inputs_finite is None:
            self._inputs_finite = all(
                bool(torch.isfinite(t).all()) for t in _inputs(self.args, self.kwargs)
            )
        return self._inputs_finite

    def gamma(self) -> float:
        n = max([t.numel() for t in _inputs(self.args, self.kwargs)] + [1])
        return 1.01 * n * _U64 / (1 - n * _U64) if n * _U64 < 0.5 else float("inf")
