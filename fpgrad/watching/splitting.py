"""Each zero, inf and NaN of an output split into created / inherited / undecided.

The proofs per op family are in :mod:`fpgrad.watching.classify`'s docstring; here they are
applied to an output (or its selected elements) and its float64 recompute (:class:`_Shadow`).
"""

from __future__ import annotations

from typing import Any

import torch

from fpgrad.watching.exact_fallback import exact_elements
from fpgrad.watching.families import _TINY64, SELECTION_OPS, _positive
from fpgrad.watching.leaves import leaves
from fpgrad.watching.recompute import _inputs, _Shadow

_INF = float("inf")


def _scaled_sum(sh: _Shadow) -> bool:
    """An add/sub with ``alpha`` other than +-1: its float64 zero does not prove an exact one."""
    if sh.func.overloadpacket.__name__ not in ("add", "sub", "rsub", "add_", "sub_"):
        return False
    alpha = sh.kwargs.get("alpha", 1)
    return not isinstance(alpha, (int, float)) or abs(alpha) != 1


#: Scalars (and 0-d float64 tensors) within 2^-600..2^600 keep every product or quotient of
#: float32-range values by them normal-or-zero in float64 (2^-149 2^-600 > 2^-1074).
_SCALAR_RANGE = (2.0**-600, 2.0**600)


def _wide_scalar(sh: _Shadow) -> bool:
    """A numeric scalar or 0-d float64 tensor argument outside :data:`_SCALAR_RANGE`
    (``x * 1e-300``, ``x / 1e300``): the float64 recompute may underflow to 0 where the exact
    result is not 0, so its zero proves nothing. So does a Python int that float64 does not
    hold (``x + -(2**60 + 1)`` at ``x = 2**60``: 0 in float64, -1 exactly)."""
    lo, hi = _SCALAR_RANGE
    for x in leaves((sh.args, sh.kwargs)):
        if isinstance(x, torch.Tensor):
            if x.dim() or x.dtype != torch.float64:
                continue
            x = float(x)
        elif isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        elif isinstance(x, int) and not -(2**53) <= x <= 2**53:
            try:
                if float(x) != x:  # (exact comparison of an int and a float)
                    return True
            except OverflowError:
                return True
        a = abs(float(x))
        if a != 0 and a == a and (a < lo or hi < a < float("inf")):
            return True
    return False


#: Ops outside the exact and reduction families whose float64 recompute cannot overflow on
#: float32-or-narrower inputs (as :func:`_may_overflow` bounds them): ``_softmax`` and
#: ``_log_softmax`` subtract the row maximum (``exp <= 1``, a log of a sum in ``[0, log n]``),
#: ``_softmax_backward_data`` is ``y (g - sum(g y))`` (products of three float32 values),
#: ``nll_loss_forward`` a sum of products of two over a sum of weights (below 2^700; with no
#: negative weight, checked, the float64 sum of weights is 0 only when the exact one is),
#: ``_log_softmax_backward_data`` ``g - exp(y) sum(g)`` with ``y <= 80`` where finite
#: (checked; a log-probability is <= 0).
BOUNDED_OPS = frozenset(
    "_softmax _log_softmax _softmax_backward_data _log_softmax_backward_data "
    "nll_loss_forward".split()
)


def _bounded(sh: _Shadow) -> bool:
    """Whether a float64 inf or NaN of the recompute comes from a non-finite input (never an
    overflow): exact and reduction ops and :data:`BOUNDED_OPS`, unless :func:`_may_overflow`."""
    name = sh.func.overloadpacket.__name__
    if sh.fam not in ("exact", "reduction") and name not in BOUNDED_OPS:
        return False
    if name == "_log_softmax_backward_data":
        y = sh.args[1] if len(sh.args) > 1 else sh.kwargs.get("output")
        if not isinstance(y, torch.Tensor):
            return False
        y = y.detach()
        if y.numel() and float(torch.where(torch.isfinite(y), y, -_INF).amax()) > 80:
            return False
    if name == "nll_loss_forward":
        w = sh.args[2] if len(sh.args) > 2 else sh.kwargs.get("weight")
        if isinstance(w, torch.Tensor) and bool((w.detach() < 0).any()):
            return False
    return not _may_overflow(sh)


def _may_overflow(sh: _Shadow) -> bool:
    """Whether the float64 recompute may overflow where the exact value is finite: with a wide
    scalar (:func:`_wide_scalar`), or a float64 tensor input of an op that is not a selection
    (``sum(x, dtype=float32)`` of a float64 ``x = [1e308, 1e308]``). Otherwise an exact or
    reduction op sees float32-or-narrower values (products of at most three of them lie below
    2^384, sums of fewer than 2^600 such terms below 2^1000) or copies its inputs: no overflow."""
    if _wide_scalar(sh):
        return True
    if sh.func.overloadpacket.__name__ in SELECTION_OPS:
        return False
    return any(t.dtype == torch.float64 and t.dim() for t in _inputs(sh.args, sh.kwargs))


def _split_zeros(
    sh: _Shadow, k: int, sel: torch.Tensor | None, t: torch.Tensor, r: torch.Tensor
) -> tuple[int, int, int]:
    """Zeros of ``t`` (the output at ``sel``, or all of it; ``r`` its float64 recompute)."""
    if sel is None and sh.fam != "other" and bool(torch.isfinite(t).all() & ~torch.isnan(r.sum())):
        return _split_zeros_dense(sh, k, t, r)
    zero = t == 0
    total = int(zero.sum())
    ar = r.abs()
    if sh.fam == "exact":
        created = zero & (ar >= _TINY64)
        inherited = zero & (ar == 0)
        if _scaled_sum(sh) or _wide_scalar(sh):  # a + RN(alpha b) may cancel, s x underflow
            inherited = torch.zeros_like(zero)
    elif sh.fam == "reduction":
        aa = sh.at(k, sel, absolute=True)
        if aa is None:
            return 0, 0, total
        band = sh.gamma() * aa + 2 * _TINY64
        created = zero & (ar > band)
        inherited = zero & (aa == 0) & (not _wide_scalar(sh))
        contested = zero & ~created & ~inherited
        c, i = int(created.sum()), int(inherited.sum())
        if c + i < total:
            pos = contested.nonzero() if sel is None else sh.where(sel)[contested]
            ex = exact_elements(sh.func, sh.args, sh.kwargs, pos)
            if ex is not None:
                return c + ex[0], i + ex[1], total - c - i - ex[0] - ex[1]
        return c, i, total - c - i
    elif sh.fam == "pointwise":
        created = zero & (ar >= _TINY64) & torch.isfinite(r)
        inherited = torch.zeros_like(zero)
    else:
        return 0, 0, total
    c, i = int(created.sum()), int(inherited.sum())
    return c, i, total - c - i


def _split_zeros_dense(
    sh: _Shadow, k: int, t: torch.Tensor, r: torch.Tensor
) -> tuple[int, int, int]:
    """:func:`_split_zeros` on a whole finite output, with float indicators instead of bool
    masks (the same decisions: 1.0 marks an element, products are ands)."""
    zero = 1 - torch.sign(t.abs().to(torch.float64))
    ar = r.abs()
    aa = None
    if sh.fam == "reduction":
        aa = sh.at(k, None, absolute=True)
        if aa is None or aa.shape != r.shape:
            return 0, 0, int(zero.sum())
        created = zero * _positive(ar - (sh.gamma() * aa + 2 * _TINY64))
        inherited = zero * (1 - torch.sign(aa)) * (0.0 if _wide_scalar(sh) else 1.0)
    elif sh.fam == "exact":
        created = zero * _positive(ar - _TINY64)
        inherited = zero * (1 - torch.sign(ar))
        if _scaled_sum(sh) or _wide_scalar(sh):
            inherited = torch.zeros_like(zero)
    else:  # pointwise
        created = zero * _positive(ar - _TINY64)
        inherited = torch.zeros_like(zero)
    total, c, i = (
        int(v) for v in torch.stack([zero.sum(), created.sum(), inherited.sum()]).tolist()
    )
    if sh.fam == "reduction" and c + i < total:
        contested = zero * (1 - created) * (1 - inherited)
        ex = exact_elements(sh.func, sh.args, sh.kwargs, contested.nonzero())
        if ex is not None:
            return c + ex[0], i + ex[1], total - c - i - ex[0] - ex[1]
    return c, i, total - c - i


def _split_infs(
    sh: _Shadow, t: torch.Tensor, r: torch.Tensor, sel: torch.Tensor | None
) -> tuple[int, int, int]:
    """Infs of ``t`` (the output at ``sel``, or all of it): created where the float64 value is
    finite; else inherited where an input is not finite: for a pointwise op, an input element
    of *this* output element (``exp([1000, inf])``: the first inf is a float64 overflow from a
    finite input, undecided), for other ops any input element if float64 cannot overflow
    (:func:`_bounded`; ``cumprod`` can overflow); else undecided."""
    inf = torch.isinf(t)
    total = int(inf.sum())
    created = int((inf & torch.isfinite(r)).sum())
    rest = total - created
    if sh.inputs_finite():
        return created, 0, rest
    bad = _nonfinite_at(sh, t.shape if sel is None else sel.shape, sel)
    if bad is None:  # float64 cannot overflow (see _split_nans), else any inf may be its own
        if _bounded(sh):
            return created, rest, 0
        return created, 0, rest
    inherited = int((inf & ~torch.isfinite(r) & bad).sum())
    return created, inherited, rest - inherited


def _nonfinite_at(
    sh: _Shadow, shape: torch.Size, sel: torch.Tensor | None, nan_only: bool = False
) -> torch.Tensor | None:
    """For a pointwise op (torch's tag or the pointwise family): whether some input element
    at each output element (``sel``'s, or all of them) is not finite (is NaN if ``nan_only``);
    None for other ops or inputs that do not broadcast."""
    if not (sh._pointwise or sh.fam == "pointwise"):
        return None
    xs = _inputs(sh.args, sh.kwargs)
    bad = torch.zeros(shape, dtype=torch.bool, device=xs[0].device if xs else None)
    test = torch.isnan if nan_only else lambda x: ~torch.isfinite(x)
    try:
        for x in xs:
            bad |= test(x.detach().broadcast_to(shape))
    except RuntimeError:
        return None
    return bad if sel is None else sh.pick(bad, sel)


def _split_nans(
    sh: _Shadow, t: torch.Tensor, r: torch.Tensor, sel: torch.Tensor | None
) -> tuple[int, int, int]:
    """NaNs of ``t``: created where the float64 value is a number. A float64 NaN is inherited
    where the recompute cannot overflow (:func:`_bounded`: exact and reduction ops,
    ``0/0``, ``inf - inf`` of the inputs) or, for a pointwise op, where an input element of
    this output element is NaN (the exact value of an op at a NaN is NaN); elsewhere it may be
    a float64 overflow of a number (``softplus_backward`` at 1000, ``cumprod`` of 3e38s then 0,
    also beside an inf: ``softplus_backward(inf, 1000)`` is ``inf * e^1000 / (e^1000 + 1)``, inf
    exactly, NaN in float64; ``cumprod`` with an inf in another row): undecided."""
    nan = torch.isnan(t)
    total = int(nan.sum())
    created = int((nan & ~torch.isnan(r)).sum())
    if _bounded(sh):
        return created, total - created, 0
    if sh.inputs_finite():
        return created, 0, total - created
    bad = _nonfinite_at(sh, t.shape if sel is None else sel.shape, sel, nan_only=True)
    if bad is None:  # an inf input elsewhere does not stop a float64 overflow here
        return created, 0, total - created
    inherited = int((nan & torch.isnan(r) & bad).sum())
    return created, inherited, total - created - inherited


def _input_has_subnormal(func: Any, args: tuple, kwargs: dict, smallest_normal: float) -> bool:
    """Whether a floating input tensor, or a Python float argument of a selection op
    (:data:`SELECTION_OPS`: ``fill(x, 1e-40)`` writes the subnormal it was given), lies strictly
    between 0 and ``smallest_normal`` in magnitude. (A scalar factor is not an input here:
    ``x * 2^-20`` in float16 creates its subnormals.)"""
    if func.overloadpacket.__name__ in SELECTION_OPS:
        for x in leaves((args, kwargs)):
            if isinstance(x, float) and 0 < abs(x) < smallest_normal:
                return True
    for t in _inputs(args, kwargs):
        a = t.detach().abs()
        if bool(((a < smallest_normal) & (a > 0)).any()):
            return True
    return False
