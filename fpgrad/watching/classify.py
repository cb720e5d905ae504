"""Per-op statistics of one output tensor, each special value split into created / inherited.

An element's status (zero, subnormal, inf, NaN) is **created** by the op when the op's exact
result on the same inputs does not have that status (a zero whose exact value is non-zero, an
inf whose exact value is finite, a NaN whose exact value is a number), and **inherited** when the
exact result has it too (the inputs make it so). The exact result is decided by recomputing the
op in float64 on the same (exactly representable) inputs, with a proof per op family:

* ``exact`` ops (pointwise ``+ - * /``, copies, casts, masks, ReLU and friends): float64 rounds
  each step correctly and cannot underflow on float32-or-narrower inputs, so the float64 result
  is zero / non-zero exactly when the exact one is. A float64-subnormal result is undecided, and
  so is a float64 zero of ``add``/``sub`` with ``alpha`` other than +-1 (the product rounds).
* ``reduction`` ops (``mm``, ``addmm``, ``sum``, convolutions, accumulating scatters, ...):
  each output is a sum of products, so ``|fl64 - exact| <= gamma_n * fl64(op on |inputs|)``
  (with 1% slack) where ``n`` is the largest input size. An element inside that band is recomputed exactly with python-flint rationals for
  ``mm``/``addmm`` (up to :data:`EXACT_LIMIT` elements per call), otherwise undecided.
* ``pointwise`` transcendental ops: float64 is accurate to a few ulps, so a normal non-zero
  float64 result proves a non-zero exact one; a zero one is undecided.
* any other op: every contested element is undecided.

A numeric scalar (or 0-d float64 tensor) outside 2^-600..2^600 voids the float64 proofs of
zeros (``x * 1e-300`` underflows in float64 where the exact product does not): such zeros are
created or undecided, never inherited.

Infs: created when the float64 result is finite; inherited when it is not and an input is
non-finite (an input element of that output element for pointwise ops; any, for ops whose
recompute cannot overflow: exact, reduction, softmax and a few more); undecided otherwise (a
pole or a float64 overflow). NaNs: created when the float64 result is not NaN; inherited when
it is and the recompute cannot overflow or, for pointwise ops, an input element of that output
element is NaN; undecided otherwise. Subnormals are split per call: created when no floating
input of the op (a tensor, or a Python float that a selection op writes) holds a subnormal
of the output's format, inherited otherwise.

Cost: an output with no zero, subnormal, inf or NaN costs one ``abs`` and one ``aminmax`` pass;
counts use float indicators (``sign``, ``clamp``) summed in float32, not boolean masks (several
times slower on CPU). A zeros-only output of a selection op (:data:`SELECTION_OPS`: ReLU, its
backward, copies, gathers, ...) whose inputs and scalars all lie in the output's format is not
recomputed: its float64 recompute would equal the output, so every zero is inherited. Nor is
an ``mm`` whose zeros all lie where no product is non-zero (zero rows of A or columns of B,
e.g. dead units, else checked at the zeros), nor an ``nll_loss_backward`` whose zeros are
exactly its off-target elements: the recompute would find those zeros inherited too.

Long module: the per-op statistics and the created/inherited decision share one pass over each
output (the watch's fast path); splitting them would cost a second pass.
"""

from __future__ import annotations

from typing import Any

import torch

from fpgrad.numbers.formats import get_format
from fpgrad.watching.bitstats import bit_stats, mm_overlaps
from fpgrad.watching.exact_fallback import exact_elements
from fpgrad.watching.leaves import leaves, map_leaves

#: torch dtype -> fpgrad format name.
FORMAT_OF = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}

EXACT_OPS = frozenset(
    "mul add sub rsub neg abs relu relu_ threshold threshold_backward where clone _to_copy copy "
    "copy_ cat stack index index_select gather masked_fill clamp clamp_min clamp_max maximum "
    "minimum max min div detach fill zeros_like ones_like scatter sign square "
    "nll_loss_backward native_dropout_backward sigmoid_backward tanh_backward hardtanh "
    "hardtanh_backward leaky_relu leaky_relu_backward mul_ add_ sub_ div_ zero_ fill_ "
    "constant_pad_nd max_pool2d_with_indices _unsafe_index embedding".split()
)
REDUCTION_OPS = frozenset(
    "mm addmm bmm baddbmm addmv mv dot matmul sum mean convolution convolution_backward linear "
    "embedding_dense_backward avg_pool2d avg_pool2d_backward scatter_add index_put "
    "max_pool2d_with_indices_backward".split()
)
POINTWISE_OPS = frozenset(
    "exp exp2 log log2 log1p expm1 tanh sigmoid pow sqrt rsqrt reciprocal gelu gelu_backward "
    "silu silu_backward sin cos softplus softplus_backward elu elu_backward erf".split()
)
#: Ops whose every output element is one of their input elements or scalar arguments (or a
#: constant): with inputs and scalars exactly representable in the output's format, the float64
#: recompute equals the output, so each zero is inherited (see :func:`_selection_exact`).
SELECTION_OPS = frozenset(
    "relu relu_ threshold_backward clone detach copy copy_ _to_copy neg abs cat stack index "
    "index_select gather _unsafe_index embedding where masked_fill clamp clamp_min clamp_max "
    "maximum minimum max min max_pool2d_with_indices constant_pad_nd zero_ fill fill_ "
    "zeros_like ones_like".split()
)
#: Ops whose outputs are usually >= 0: their statistics try ``aminmax(t)`` before ``|t|``.
NONNEGATIVE_OPS = frozenset("relu relu_ abs exp sigmoid _softmax softmax square".split())
#: dtype -> the dtypes whose every value it holds exactly.
_WIDER = {
    torch.float16: (torch.float16,),
    torch.bfloat16: (torch.bfloat16,),
    torch.float32: (torch.float16, torch.bfloat16, torch.float32),
    torch.float64: (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
_U64 = 2.0**-53
_TINY64 = 2.0**-1022
COUNTS = ("zeros", "subnormals", "infs", "nans")
_COUNT_KEYS = [(n, f"{n}_created", f"{n}_inherited", f"{n}_undecided") for n in COUNTS]


def family(func: Any) -> str:
    """The proof family of an aten op: exact, reduction, pointwise or other."""
    name = func.overloadpacket.__name__
    if name == "scatter" and "reduce" in func._overloadname:  # sums or products of many
        return "other"
    if name in EXACT_OPS:
        return "exact"
    if name in REDUCTION_OPS:
        return "reduction"
    if name in POINTWISE_OPS:
        return "pointwise"
    return "other"


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


def _positive(x: torch.Tensor) -> torch.Tensor:
    """1.0 where ``x > 0``, else 0.0 (``x`` without NaN): float arithmetic, no bool mask."""
    return torch.sign(torch.clamp(x, min=0))


def count(indicator: torch.Tensor) -> torch.Tensor:
    """The number of 1.0s in a tensor of 0.0s and 1.0s, as a 0-d tensor. A float32 tensor is
    summed in float32 up to 2^24 elements (every partial sum is an integer <= 2^24, so exact;
    several times faster on CPU than widening to float64), else in float64."""
    if indicator.dtype == torch.float64:
        return indicator.sum()
    if indicator.numel() <= 2**24:
        return indicator.sum(dtype=torch.float32)
    return indicator.sum(dtype=torch.float64)


def basic_stats(
    t: torch.Tensor, smallest_normal: float, known: tuple | None = None
) -> dict[str, Any]:
    """Counts and magnitudes (of the finite non-zero elements) of one tensor. Fast path: one
    ``aminmax`` pass proves there is no zero, subnormal, inf or NaN. ``known``: ``(|t|, min,
    max)`` already computed (``|t|`` is only read: it may be ``t`` itself)."""
    if known is not None:
        a, lo, hi = known
    else:
        a = t.detach().abs()
        if not a.numel():
            return dict.fromkeys(COUNTS, 0) | {"min_abs": None, "max_abs": None}
        lo, hi = _bounds(a)
    if lo >= smallest_normal and hi < float("inf"):
        return dict.fromkeys(COUNTS, 0) | {"min_abs": lo, "max_abs": hi}
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()  # exact; half-precision kernels are slow on CPU
    inf = float("inf")
    if hi < inf:  # no inf, no NaN: count with float arithmetic (much faster than bool masks)
        zero = torch.eq(a, 0, out=torch.empty_like(a))  # 0/1 floats, one pass
        nzero = count(zero)
        # the smallest non-zero magnitude: zeros replaced by the largest finite value, as
        # a + big * zero: exact (one term is 0)
        masked = torch.add(a, zero, alpha=torch.finfo(a.dtype).max, out=zero)
        z_mn = _bounds_pair(nzero, masked.amin())
        z = int(z_mn[0])
        s = 0
        if z < a.numel() and z_mn[1] < smallest_normal:  # a subnormal exists: count them
            # the zeros are "big" in masked: below the smallest normal are the subnormals
            s = int(count(torch.lt(masked, smallest_normal, out=masked)))
        return {
            "zeros": z,
            "subnormals": s,
            "infs": 0,
            "nans": 0,
            "min_abs": z_mn[1] if z < a.numel() else None,
            "max_abs": hi if z < a.numel() else None,
        }
    checks = [(a == 0).sum(), (a < smallest_normal).sum()]
    if hi != hi:  # a NaN
        checks.append(torch.isnan(a).sum())
    if hi != hi or hi == inf:
        checks.append((a == inf).sum())
    got = torch.stack(checks).tolist()
    z, below = int(got[0]), int(got[1])
    s = below - z
    n = int(got[2]) if hi != hi else 0
    i = int(got[-1]) if (hi != hi or hi == inf) else 0
    mm = None
    if z + i + n < a.numel():
        if hi != hi or hi == inf:
            fin = a.nan_to_num(nan=0.0, posinf=0.0)
            mx = fin.max()
        else:
            fin, mx = a, torch.tensor(hi, device=a.device)
        mn = (
            fin.masked_fill(fin == 0, inf).min()
            if z or fin is not a
            else torch.tensor(lo, device=a.device)
        )
        mm = [float(v) for v in torch.stack([mn.to(torch.float64), mx.to(torch.float64)]).tolist()]
    return {
        "zeros": z,
        "subnormals": s,
        "infs": i,
        "nans": n,
        "min_abs": mm[0] if mm else None,
        "max_abs": mm[1] if mm else None,
    }


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
    valid = int((target != ignore).sum())
    return t.numel() - valid == zeros


#: dtype -> the smallest normal magnitude of its format.
SMALLEST_NORMAL = {d: get_format(f).smallest_normal for d, f in FORMAT_OF.items()}
#: id of an aten op -> (the op, its family, whether it draws random numbers, whether it is in
#: :data:`NONNEGATIVE_OPS`): keyed by ``id``
#: (an OpOverload's own ``__hash__`` is Python code), the op kept to check the entry is its own.
_FUNC_INFO: dict[int, tuple[Any, str, bool, bool]] = {}


def _bounds(a: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty tensor as floats: one ``aminmax`` pass, one host transfer."""
    lo, hi = torch.aminmax(a)
    if a.is_cpu:
        return lo.item(), hi.item()
    lo_hi = torch.stack([lo, hi]).tolist()
    return lo_hi[0], lo_hi[1]


def _bounds_pair(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Two 0-d tensors as floats (widened exactly): one host transfer off CPU."""
    if x.is_cpu:
        return [float(x.item()), float(y.item())]
    return torch.stack([x.to(torch.float64), y.to(torch.float64)]).tolist()


_FITS: dict[tuple[float, torch.dtype], bool] = {}


def _fits(x: float, dtype: torch.dtype) -> bool:
    """Whether the number ``x`` is exactly representable in ``dtype`` (cached, up to 4096
    numbers; NaN never is)."""
    if x != x:
        return False
    key = (x, dtype)
    got = _FITS.get(key)
    if got is None:
        if len(_FITS) >= 4096:
            _FITS.clear()
        got = _FITS[key] = float(torch.tensor(x, dtype=dtype)) == x
    return got


#: The record of an output with no zero, subnormal, inf or NaN (what the full path gives), less
#: its ``min_abs``, ``max_abs``, ``out``, ``dtype``, ``numel`` and ``family``: copied per output.
_PLAIN: dict[str, Any] = {
    "zeros": 0, "subnormals": 0, "infs": 0, "nans": 0, "min_abs": None, "max_abs": None,
    "out": 0, "dtype": "", "numel": 0, "family": "",
    "zeros_created": 0, "zeros_inherited": 0, "zeros_undecided": 0,
    "subnormals_created": 0, "subnormals_inherited": 0, "subnormals_undecided": 0,
    "infs_created": 0, "infs_inherited": 0, "infs_undecided": 0,
    "nans_created": 0, "nans_inherited": 0, "nans_undecided": 0,
    "subnormal_share": 0.0, "underflow_share": 0.0,
}  # fmt: skip
_INF = float("inf")
#: (id of an aten op, output index) whose latest output held zeros or subnormals: its next one
#: is counted at once (:func:`~fpgrad.watching.bitstats.bit_stats` ``dense``; a speed hint only).
_DENSE: set[tuple[int, int]] = set()
#: Outputs of at most this many elements (on CPU) are first checked in Python (one ``tolist``
#: instead of ``abs``, ``aminmax`` and two reads): the same minimum and maximum magnitude.
TINY = 16


def op_stats(func: Any, args: tuple, kwargs: dict, out: Any) -> list[dict[str, Any]]:
    """One statistics dict per floating output of ``func(*args, **kwargs) -> out``. Fast path:
    one ``abs`` and one ``aminmax`` pass prove an output has nothing to classify (up to
    :data:`TINY` elements: their magnitudes in Python)."""
    rows = []
    info = _FUNC_INFO.get(id(func))
    if info is None or info[0] is not func:
        nonneg = func.overloadpacket.__name__ in NONNEGATIVE_OPS
        info = (func, family(func), torch.Tag.nondeterministic_seeded in func.tags, nonneg)
        _FUNC_INFO[id(func)] = info
    _, fam, seeded, nonneg = info
    sh: _Shadow | None = None
    for k, t in enumerate(_float_outputs(out)):
        if t is None:
            continue
        sn = SMALLEST_NORMAL[t.dtype]
        known = None
        if 0 < t.numel() <= TINY and t.is_cpu:  # a few numbers: their magnitudes in Python
            mags = [abs(v) for v in t.detach().reshape(-1).tolist()]  # exact floats
            lo, hi = min(mags), max(mags)
            if lo >= sn and hi < _INF and all(v == v for v in mags):  # (NaN: not plain)
                row = _PLAIN.copy()
                row.update(out=k, dtype=FORMAT_OF[t.dtype], numel=t.numel(), family=fam)
                row["min_abs"], row["max_abs"] = lo, hi
                rows.append(row)
                continue
        # one compiled pass over the bits (CPU contiguous tensors); a counting pass at once
        # where this op's output k held zeros or subnormals last time (the same result)
        st = bit_stats(t, (id(func), k) in _DENSE)
        if st is not None:
            if st["zeros"] or st["subnormals"]:
                if len(_DENSE) >= 4096:  # (ids of ops gone: keep the hint set small)
                    _DENSE.clear()
                _DENSE.add((id(func), k))
            else:
                _DENSE.discard((id(func), k))
            if t.numel() and not (st["zeros"] or st["subnormals"] or st["infs"] or st["nans"]):
                row = _PLAIN.copy()
                row.update(out=k, dtype=FORMAT_OF[t.dtype], numel=t.numel(), family=fam)
                row["min_abs"], row["max_abs"] = st["min_abs"], st["max_abs"]
                rows.append(row)
                continue
        elif t.numel():
            a = t.detach() if t.requires_grad else t
            lo = -1.0
            if nonneg:  # an output that is usually >= 0: |t| is t when its minimum is >= 0
                lo, hi = _bounds(a)  # (a NaN fails the test; -0.0 and 0.0 compare equal)
            if not lo >= 0:
                a = a.abs()
                lo, hi = _bounds(a)
            if lo >= sn and hi < _INF:
                row = _PLAIN.copy()
                row.update(out=k, dtype=FORMAT_OF[t.dtype], numel=t.numel(), family=fam)
                row["min_abs"], row["max_abs"] = lo, hi
                rows.append(row)
                continue
            known = (a, lo, hi)
        absolute = known[0] if known is not None and known[0].dtype == t.dtype else None
        if st is None:
            st = basic_stats(t, sn, known)
        st.update({"out": k, "dtype": FORMAT_OF[t.dtype], "numel": t.numel(), "family": fam})
        for name, created, inherited, undecided in _COUNT_KEYS:
            st[created] = st[inherited] = 0
            st[undecided] = st[name]
        if st["subnormals"]:
            inh = _input_has_subnormal(func, args, kwargs, sn)
            st["subnormals_created"] = 0 if inh else st["subnormals"]
            st["subnormals_inherited"] = st["subnormals"] if inh else 0
            st["subnormals_undecided"] = 0
        needs = st["zeros"] or st["infs"] or st["nans"]
        if needs and t.dtype != torch.float64 and not seeded and not (st["infs"] or st["nans"]):
            if (
                _selection_exact(func, args, kwargs, t.dtype)
                or (k == 0 and _mm_zeros_structural(func, args, t, st["zeros"], absolute))
                or (k == 0 and _nll_zeros_structural(func, args, kwargs, t, st["zeros"]))
            ):
                st.update(zeros_inherited=st["zeros"], zeros_undecided=0)
                needs = 0
        if needs and t.dtype != torch.float64 and not seeded:
            if sh is None:  # one per op call, shared by its outputs
                sh = _Shadow(func, args, kwargs)
            t = t.detach()
            # few special elements: recompute only those; many: recompute all (masked indexing
            # of many elements costs more than a whole pointwise recompute)
            sel = None
            if 8 * (st["zeros"] + st["infs"] + st["nans"]) <= t.numel():
                sel = t == 0 if not (st["infs"] or st["nans"]) else ~torch.isfinite(t) | (t == 0)
            r = sh.at(k, sel)
            if r is not None and (sel is not None or r.shape == t.shape):
                ts = t if sel is None else sh.pick(t, sel)
                if st["zeros"]:
                    c, i, u = _split_zeros(sh, k, sel, ts, r)
                    st.update(zeros_created=c, zeros_inherited=i, zeros_undecided=u)
                if st["infs"]:
                    c, i, u = _split_infs(sh, ts, r, sel)
                    st.update(infs_created=c, infs_inherited=i, infs_undecided=u)
                if st["nans"]:
                    c, i, u = _split_nans(sh, ts, r, sel)
                    st.update(nans_created=c, nans_inherited=i, nans_undecided=u)
        n = max(st["numel"], 1)
        st["subnormal_share"] = st["subnormals"] / n
        st["underflow_share"] = (st["subnormals"] + st["zeros_created"]) / n
        rows.append(st)
    return rows
