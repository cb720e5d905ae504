"""Zeros proven inherited without a recompute: selections of values already in the output's
format, ``mm`` zeros where no product is non-zero, ``nll_loss_backward``'s off-target zeros."""

from __future__ import annotations

from typing import Any

import torch

from fpgrad.watching.bitstats import mm_overlaps
from fpgrad.watching.families import _WIDER, SELECTION_OPS, _fits, count
from fpgrad.watching.leaves import leaves
from fpgrad.watching.passes import count_not_equal


def _selection_exact(func: Any, args: tuple, kwargs: dict, dtype: torch.dtype) -> bool:
    """True when ``func`` is a selection op (:data:`SELECTION_OPS`) whose floating inputs and
    numeric scalars all lie in ``dtype``: its output then holds exactly what the float64
    recompute would give (selections and comparisons of the same values), so a zero of it is
    exactly zero and the recompute can be skipped."""
    if func.overloadpacket.__name__ not in SELECTION_OPS:
        return False
    flat = leaves((args, kwargs))
    ok = _WIDER[dtype]
    for x in flat:
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and x.dtype not in ok:
                return False
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            if not _fits(x, dtype):
                return False
        elif not isinstance(
            x, (bool, torch.dtype, torch.layout, torch.device, torch.memory_format, str, type(None))
        ):
            return False
    return True


def _mm_zeros_structural(
    func: Any, args: tuple, t: torch.Tensor, zeros: int, absolute: torch.Tensor | None = None
) -> bool:
    """True when every zero of ``t = mm(A, B)`` lies where each product ``A[i,k] B[k,j]`` has a
    zero factor (no overlap of the supports of row i and column j). There the exact result and
    its float64 recompute are 0 and so is ``fl64(|A| |B|)``: the zero is inherited, as the
    recompute would find. For CPU tensors of the four formats with ``A``, ``B`` and ``t`` finite:
    one compiled pass over their bits (:func:`~fpgrad.watching.bitstats.mm_overlaps`, the
    overlapping zeros counted exactly). Otherwise, with torch: checked at the zeros only (rows of A and columns of B gathered there)
    when they are few, else with a float32 product of the 0/1 support indicators; either way
    counts of overlapping pairs, integers up to 2^24, exact. First, when the zeros lie in few
    rows of ``t`` (``absolute``: ``|t|`` if already computed): the support product of those
    rows of A with B, checked at every element of them."""
    if func.overloadpacket.__name__ != "mm" or t.dim() != 2:
        return False
    a, b = args[0], args[1]
    if a.shape[1] > 2**24:
        return False
    overlaps = mm_overlaps(a, b, t)  # one compiled pass over the bits (CPU, all finite)
    if overlaps is not None and overlaps >= 0:
        return overlaps == 0
    if absolute is None:
        absolute = t.detach().abs()
    rows = (absolute.amin(1) == 0).nonzero().view(-1)  # the rows of t holding its zeros
    if rows.numel() * b.shape[0] * b.shape[1] <= 2**22:  # few: their support products
        sa = a.detach().index_select(0, rows).abs().sign_()  # sign first: a tiny non-zero
        sb = b.detach().abs().sign_()  # stays 1
        overlap = torch.sign(sa.float() @ sb.float())  # pair counts <= 2^24: exact
        # 1 at a zero of t whose pairs overlap, else 0 or -1
        bad = overlap.sub_(torch.sign(absolute.index_select(0, rows).float()))
        return float(bad.amax()) < 1
    if a.shape[1] and _zero_lines(a, b) == zeros:  # dead units: whole zero rows / columns
        return True
    if zeros * a.shape[1] <= 2**22:  # few zeros: test the supports at the zeros only
        i, j = (t.detach() == 0).nonzero().unbind(1)
        ai = a.detach().index_select(0, i).abs().sign_()  # gather, then indicators
        bj = b.detach().index_select(1, j).t().abs().sign_()
        overlap = ai.mul_(bj).sum(1, dtype=torch.float32)  # integers <= 2^24: exact
        return int(count(1 - torch.sign(overlap))) == zeros
    sa = a.detach().abs().sign_().float()  # sign first: a tiny non-zero stays 1
    sb = b.detach().abs().sign_().float()
    overlap = torch.sign(sa @ sb)
    zt = 1 - t.detach().abs().sign_().float()
    z = float(count(zt.mul_(1 - overlap)))
    return z == zeros


def _zero_lines(a: torch.Tensor, b: torch.Tensor) -> int:
    """The number of elements of ``A @ B`` in a row ``i`` where row ``i`` of A is all zeros or a
    column ``j`` where column ``j`` of B is: zeros with no non-zero product (a NaN row or column
    is not counted). Two ``amax`` passes instead of gathering rows and columns at every zero."""
    za = int((a.detach().abs().amax(1) == 0).sum())  # small: one value per row / column
    zb = int((b.detach().abs().amax(0) == 0).sum())
    return za * b.shape[1] + zb * a.shape[0] - za * zb


def _nll_zeros_structural(
    func: Any, args: tuple, kwargs: dict, t: torch.Tensor, zeros: int
) -> bool:
    """True when every zero of ``t = nll_loss_backward(...)`` lies off the target positions
    (``t[i, target[i]]`` for targets other than ``ignore_index``): the op writes exact zeros
    there (its exact value too, so the float64 recompute would call them inherited), and they
    are all the zeros exactly when their number, ``numel - valid targets``, is ``zeros``."""
    if func.overloadpacket.__name__ != "nll_loss_backward":
        return False
    target = args[2] if len(args) > 2 else kwargs.get("target")
    ignore = args[5] if len(args) > 5 else kwargs.get("ignore_index", -100)
    if not isinstance(target, torch.Tensor) or not isinstance(ignore, int):
        return False
    valid = count_not_equal(target, ignore)  # one compiled pass (CPU), else torch's
    if valid is None:
        valid = int((target != ignore).sum())
    return t.numel() - valid == zeros
