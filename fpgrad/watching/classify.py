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
A widening cast (``_to_copy``) of a half-precision tensor counted earlier in the step takes
its counts from that tensor's, without a pass (:mod:`~fpgrad.watching.casts`, with the proof).

Modules: :mod:`~fpgrad.watching.families` (op families, formats),
:mod:`~fpgrad.watching.recompute` (the float64 recompute), :mod:`~fpgrad.watching.splitting`
(created / inherited / undecided), :mod:`~fpgrad.watching.structural` (zeros proven inherited
without a recompute); here the per-output statistics that use them (:func:`op_stats`).
"""

from __future__ import annotations

from typing import Any

import torch

from fpgrad.watching.bitstats import bit_range
from fpgrad.watching.casts import cast_stats, remember
from fpgrad.watching.families import (
    FORMAT_OF,
    NONNEGATIVE_OPS,
    SMALLEST_NORMAL,
    count,
    family,
)
from fpgrad.watching.recompute import _float_outputs, _Shadow
from fpgrad.watching.splitting import (
    _input_has_subnormal,
    _split_infs,
    _split_nans,
    _split_zeros,
)
from fpgrad.watching.structural import (
    _mm_zeros_structural,
    _nll_zeros_structural,
    _selection_exact,
)

__all__ = ["COUNTS", "FORMAT_OF", "SMALLEST_NORMAL", "TINY", "basic_stats", "count", "op_stats"]

COUNTS = ("zeros", "subnormals", "infs", "nans")
_COUNT_KEYS = [(n, f"{n}_created", f"{n}_inherited", f"{n}_undecided") for n in COUNTS]


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
    """One statistics dict per floating strided output of ``func(*args, **kwargs) -> out``
    (sparse outputs, e.g. an ``Embedding(sparse=True)`` gradient, are not recorded). Fast path:
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
        if t is None or t.layout != torch.strided:  # (a sparse gradient: no record)
            continue
        sn = SMALLEST_NORMAL[t.dtype]
        known = None
        # a widening cast of a tensor counted earlier in the step: the same counts
        st = cast_stats(func, args, t) if k == 0 else None
        if st is None and 0 < t.numel() <= TINY and t.is_cpu:  # a few numbers: in Python
            mags = [abs(v) for v in t.detach().reshape(-1).tolist()]  # exact floats
            lo, hi = min(mags), max(mags)
            if lo >= sn and hi < _INF and all(v == v for v in mags):  # (NaN: not plain)
                row = _PLAIN.copy()
                row.update(out=k, dtype=FORMAT_OF[t.dtype], numel=t.numel(), family=fam)
                row["min_abs"], row["max_abs"] = lo, hi
                remember(t, row)
                rows.append(row)
                continue
        if st is None:
            # one compiled pass over the bits (CPU contiguous tensors); a counting pass at
            # once where this op's output k held zeros or subnormals last time (the same result)
            got = bit_range(t, (id(func), k) in _DENSE)
            if isinstance(got, tuple):  # non-empty, every element normal and finite
                _DENSE.discard((id(func), k))
                row = _PLAIN.copy()
                row.update(out=k, dtype=FORMAT_OF[t.dtype], numel=t.numel(), family=fam)
                row["min_abs"], row["max_abs"] = got
                remember(t, row)
                rows.append(row)
                continue
            st = got
            if st is not None:
                if st["zeros"] or st["subnormals"]:
                    if len(_DENSE) >= 4096:  # (ids of ops gone: keep the hint set small)
                        _DENSE.clear()
                    _DENSE.add((id(func), k))
                else:
                    _DENSE.discard((id(func), k))
        if st is not None:
            remember(t, st)
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
                remember(t, row)
                rows.append(row)
                continue
            known = (a, lo, hi)
        absolute = known[0] if known is not None and known[0].dtype == t.dtype else None
        if st is None:
            st = basic_stats(t, sn, known)
            remember(t, st)
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
