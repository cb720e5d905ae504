"""What one optimizer step did to each parameter: swamped updates, update size, state underflow.

The **requested** update is what the same optimizer (same class, hyperparameters and state)
computes in float64 on the same weights and gradients; an element is **swamped** when that
update is non-zero but the real step left the weight unchanged (``w + u == w`` in the weight's
format, or the update itself rounded to zero). The user's optimizer is never touched: the
float64 step runs on copies (a :class:`ShadowOptimizer` built once per watch, its tensors
refilled on each sampled step).

Long module: the optimizer record (swamped updates, update-to-weight ratios, state underflow) is
one float64 shadow step over shared columnar buffers.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import torch

from fpgrad.numbers.formats import get_format
from fpgrad.watching.bitstats import state_counts, update_counts
from fpgrad.watching.classify import FORMAT_OF, SMALLEST_NORMAL, count
from fpgrad.watching.scratch import Scratch

#: Parameters up to this size keep their per-element swamped map in the records.
MAP_LIMIT = 4096


def _hyper(g: dict) -> dict:
    """A param_group's hyperparameters for the float64 shadow: the multi-tensor (``foreach``)
    implementation where the optimizer has one (fewer Python calls; elementwise the same
    operations as the single-tensor one: tests/test_watch_fast.py compares the two bit for bit
    for six optimizers), never ``fused`` or ``capturable``."""
    ng = {k: v for k, v in g.items() if k != "params"}
    for k in ("foreach", "fused", "capturable"):
        if k in ng:
            ng[k] = False
    if "foreach" in ng and not ng.get("differentiable"):
        ng["foreach"] = True
    return ng


def _put(dst: dict, key: Any, v: Any) -> None:
    """``dst[key] = v`` for a state entry: a float64 copy of a floating tensor (``step`` keeps its
    dtype), reusing the tensor already there when its shape and dtype fit."""
    if not isinstance(v, torch.Tensor):
        dst[key] = v
        return
    dtype = torch.float64 if v.is_floating_point() and key != "step" else v.dtype
    old = dst.get(key)
    if isinstance(old, torch.Tensor) and old.shape == v.shape and old.dtype == dtype:
        old.copy_(v.detach())
    else:
        dst[key] = v.detach().to(dtype, copy=True)


def _refill(dst: dict, key: Any, v: Any, into: list[torch.Tensor], src: list[torch.Tensor]) -> bool:
    """For :func:`_put` of a tensor that fits the one already in ``dst``: queue the copy
    (``into``, ``src``) instead of doing it; False when :func:`_put` must do it."""
    if not isinstance(v, torch.Tensor):
        return False
    old = dst.get(key)
    dtype = torch.float64 if v.is_floating_point() and key != "step" else v.dtype
    if isinstance(old, torch.Tensor) and old.shape == v.shape and old.dtype == dtype:
        into.append(old)
        src.append(v.detach())
        return True
    return False


def _plain_step(opt: torch.optim.Optimizer) -> None:
    """``opt.step()`` without torch's step wrapper (``Optimizer.profile_hook_step``: a profiler
    range and the global and per-optimizer step hooks) where the class has it: the same
    update, and no hook of the user's sees the shadow (about 60 us less on the bench MLP)."""
    step = type(opt).step
    inner = getattr(step, "__wrapped__", None)
    if getattr(step, "hooked", False) and callable(inner):
        inner(opt)
    else:
        opt.step()


class ShadowOptimizer:
    """The user's optimizer rebuilt once in float64 on copies of the weights; each
    :meth:`requested_updates` copies the current weights, gradients, state and hyperparameters
    into it (reusing its tensors) and steps it. The user's optimizer is never touched."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._shadow: torch.optim.Optimizer | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _build(self, opt: torch.optim.Optimizer) -> None:
        groups, self._pairs = [], []
        for g in opt.param_groups:
            ps = []
            for p in g["params"]:
                q = p.detach().to(torch.float64, copy=True)
                ps.append(q)
                self._pairs.append((p, q))
            groups.append(_hyper(g) | {"params": ps})
        self._shadow = type(opt)(groups)

    def requested_updates(
        self, opt: torch.optim.Optimizer, before: dict[int, torch.Tensor] | None = None
    ) -> dict[int, torch.Tensor] | None:
        """Per parameter (by ``id``), the float64 update the optimizer asks for, or None when the
        optimizer cannot be rebuilt from its param_groups (then swamping is not reported).
        ``before``: the weights now, already in float64 (saves widening them again). The
        updates live in the shadow's tensors until the next call."""
        key = (type(opt), tuple(tuple(map(id, g["params"])) for g in opt.param_groups))
        try:
            if key != self._key or self._shadow is None:
                self._key = None
                self._build(opt)
                self._key = key
            shadow = self._shadow
            assert shadow is not None
            for g, sg in zip(opt.param_groups, shadow.param_groups, strict=True):
                sg.update(_hyper(g))
            dst: list[torch.Tensor] = []  # refilled with one _foreach_copy_ (same values
            src: list[torch.Tensor] = []  # as a copy_ per tensor, fewer calls)
            ostate, sstate = opt.state, shadow.state
            with torch.no_grad():  # copies of tensors that require grad: no graph recorded
                for p, q in self._pairs:
                    dst.append(q)
                    src.append(p)
                    grad = p.grad
                    if grad is None:
                        q.grad = None
                    elif q.grad is None or q.grad.shape != grad.shape:
                        q.grad = grad.to(torch.float64, copy=True)
                    else:
                        dst.append(q.grad)
                        src.append(grad)
                    state = ostate.get(p)
                    if state is None:
                        sstate.pop(q, None)
                        continue
                    st = sstate[q]
                    if st.keys() != state.keys():
                        for k in [k for k in st if k not in state]:
                            del st[k]
                    for k, v in state.items():
                        if not _refill(st, k, v, dst, src):
                            _put(st, k, v)
                torch._foreach_copy_(dst, src)
                _plain_step(shadow)
        except (TypeError, ValueError, RuntimeError, KeyError):
            self._key = self._shadow = None
            return None
        qs, ws = [], []
        for p, q in self._pairs:
            if p.grad is not None:
                w = before.get(id(p)) if before is not None else None
                qs.append(q)
                ws.append(w if w is not None else p.detach().to(torch.float64))
        if qs:
            torch._foreach_sub_(qs, ws)
        return {id(p): q for p, q in self._pairs if p.grad is not None}


def requested_updates(opt: torch.optim.Optimizer) -> dict[int, torch.Tensor] | None:
    """Per parameter (by ``id``), the float64 update the optimizer asks for (a fresh shadow; a
    :class:`ShadowOptimizer` kept across steps does the same with its tensors reused)."""
    return ShadowOptimizer().requested_updates(opt)


def _eps_threshold(dtype: torch.dtype, eps: float) -> float:
    """The smallest ``x >= 0`` of ``dtype`` with ``not (math.sqrt(x) < eps)`` (``0 < eps <
    inf``): the correctly rounded square root is non-decreasing, so for ``x >= 0`` of ``dtype``,
    ``math.sqrt(x) < eps`` exactly when ``x <`` this threshold. Found by bisection over the bit
    patterns of ``dtype``; cached. (torch's float64 ``sqrt`` is not always correctly rounded
    on CPU, so :func:`_flat_state_counts` uses this only away from ``eps``.)"""
    key = (dtype, eps)
    got = _THRESHOLDS.get(key)
    if got is not None:
        return got
    value = _FROM_BITS[dtype]
    inf_bits = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000}.get(
        dtype, 0x7FF0000000000000
    )
    lo, hi = 0, inf_bits  # sqrt(inf) = inf is not below eps: find the first bit pattern that fails
    while lo < hi:
        mid = (lo + hi) // 2
        if math.sqrt(value(mid)) < eps:
            lo = mid + 1
        else:
            hi = mid
    got = _THRESHOLDS[key] = value(lo)
    return got


#: dtype -> the value (a float) of a non-negative bit pattern of that format.
_FROM_BITS = {
    torch.float16: lambda k: struct.unpack("<e", struct.pack("<H", k))[0],
    torch.bfloat16: lambda k: struct.unpack("<f", struct.pack("<I", k << 16))[0],
    torch.float32: lambda k: struct.unpack("<f", struct.pack("<I", k))[0],
    torch.float64: lambda k: struct.unpack("<d", struct.pack("<Q", k))[0],
}
_THRESHOLDS: dict[tuple[torch.dtype, float], float] = {}


def _rsub(x: torch.Tensor, c: float, buf: torch.Tensor) -> torch.Tensor:
    """``c - x`` written into ``buf`` (as ``-x + c``: the same exact sum, so the same rounding)."""
    return buf.copy_(x).neg_().add_(c)


def _state_counts(
    state: dict, p: torch.Tensor, scratch: Scratch
) -> tuple[list[torch.Tensor], list[Any], dict[Any, tuple[float, float]]]:
    """(zero count, subnormal count) 0-d tensors of each floating state tensor shaped like
    ``p``, flattened, with the state keys they belong to and each tensor's (min, max)."""
    vals: list[torch.Tensor] = []
    keys = []
    bounds: dict[Any, tuple[float, float]] = {}
    for key, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() == p.numel():
            sn = get_format(FORMAT_OF.get(v.dtype, "float32")).smallest_normal
            # counted in the state's own format (float32 for narrower ones): a zero is a zero
            # and ``sn - |v|`` is positive exactly when ``|v| < sn`` (gradual underflow)
            v = v.detach()
            vlo, vhi = torch.stack(torch.aminmax(v)).tolist()
            bounds[key] = (vlo, vhi)
            if vlo >= 0:  # no negative, no NaN: |v| is v (up to the sign of zeros)
                a, lo, hi = v, vlo, vhi
            else:
                a = torch.abs(v, out=scratch.get("state", v.shape, v.dtype, v.device))
                lo, hi = torch.stack(torch.aminmax(a)).tolist()
            if lo >= sn and hi < float("inf"):  # no zero, subnormal, inf or NaN
                vals += [torch.zeros((), dtype=torch.float64)] * 2
                keys.append(key)
                continue
            if a.dtype != torch.float64:
                a = a.float()
            if hi < float("inf"):
                buf = scratch.get("state_ind", a.shape, a.dtype, a.device)
                zero = torch.sign(a, out=buf).sub_(1).neg_()  # 1 - sign(|v|)
                nz = count(zero)
                vals += [nz, count(_rsub(a, sn, buf).clamp_(min=0).sign_()) - nz]
            else:
                vals += [(a == 0).sum(), ((a > 0) & (a < sn)).sum()]
            keys.append(key)
    return vals, keys, bounds


def _eps_count(state: dict, group: dict) -> torch.Tensor | None:
    """For an Adam-like state (``exp_avg_sq`` and a float ``eps``): the number of elements whose
    float64 ``sqrt(exp_avg_sq)`` (torch's) is below ``eps``; else None."""
    v = state.get("exp_avg_sq")
    eps = group.get("eps")
    if not (isinstance(v, torch.Tensor) and isinstance(eps, float)):
        return None
    v = v.detach()
    root = v.to(torch.float64).sqrt()
    if bool(torch.isfinite(root.sum())):  # no NaN: eps - root > 0 exactly when root < eps
        return count((eps - root).clamp_(min=0).sign_())
    return (root < eps).sum()


def param_stats(
    name: str,
    p: torch.Tensor,
    before: torch.Tensor,
    requested: torch.Tensor | None,
    state: dict,
    group: dict,
    scratch: Scratch | None = None,
) -> dict[str, Any]:
    """The record of one parameter after a step (``before``: its value before the step, in
    float64). Temporaries live in ``scratch`` (fresh buffers when None)."""
    scratch = scratch if scratch is not None else Scratch()
    after = p.detach()
    n = max(p.numel(), 1)
    dev = p.device
    w64 = before if before.dtype == torch.float64 else before.to(torch.float64)
    d64 = scratch.get("d64", p.shape, torch.float64, dev)
    d64.copy_(after).sub_(w64)  # never the parameter itself
    # float indicators (1.0 / 0.0) where everything is finite: much faster than bool masks (a
    # non-finite weight before or after makes d64 non-finite, so d64 and requested suffice)
    check = d64.sum() + (requested.sum() if requested is not None else 0.0)
    finite = bool(torch.isfinite(check))
    if finite:
        moved = torch.abs(d64, out=scratch.get("moved", p.shape, torch.float64, dev)).sign_()
    else:
        moved = (after != before).to(torch.float64)
    vals = [moved.sum(), w64.norm(), d64.norm()]
    swamped = None
    if requested is not None:
        if finite:
            asked = torch.abs(
                requested, out=scratch.get("asked", p.shape, torch.float64, dev)
            ).sign_()
        else:
            asked = (requested != 0).to(torch.float64)
        swamped = moved.sub_(1).neg_().mul_(asked)  # (1 - moved) * asked, in moved's buffer
        vals += [asked.sum(), swamped.sum(), requested.norm()]
    svals, keys, _ = _state_counts(state, p, scratch)
    vals += svals
    e = _eps_count(state, group)
    adam = e is not None
    if e is not None:
        vals.append(e)
    got = torch.stack([x.to(torch.float64) for x in vals]).tolist()
    nmoved, wn, dn = got[:3]
    rec: dict[str, Any] = {
        "param": name,
        "dtype": FORMAT_OF.get(p.dtype, str(p.dtype)),
        "numel": p.numel(),
        "moved_share": nmoved / n,
        "update_weight_ratio": dn / wn if wn else None,
    }
    i = 3
    if requested is not None and swamped is not None:
        nasked, nswamped, rn = got[3:6]
        i = 6
        rec["requested_nonzero"] = int(nasked)
        rec["swamped"] = int(nswamped)
        rec["swamped_share"] = nswamped / max(nasked, 1)
        rec["requested_update_weight_ratio"] = rn / wn if wn else None
        rec["swamped_map"] = (
            swamped.reshape(-1).to(torch.uint8).tolist() if p.numel() <= MAP_LIMIT else None
        )
    for key in keys:
        rec[f"state_{key}_zero_share"] = got[i] / n
        rec[f"state_{key}_subnormal_share"] = got[i + 1] / n
        i += 2
    if adam:
        v = state["exp_avg_sq"]
        eps_in = float(torch.tensor(group["eps"], dtype=v.dtype))
        rec["eps_in_state_dtype"] = eps_in
        rec["eps_flushed"] = eps_in == 0.0
        rec["eps_dominated_share"] = got[i] / n
    return rec


#: Steps whose parameters hold more elements than this are summarised parameter by parameter
#: (the batched path keeps four float64 work buffers of this size).
BATCH_LIMIT = 2**22


def widen(params: list[torch.Tensor], scratch: Scratch) -> dict[int, torch.Tensor]:
    """Float64 copies of ``params`` (by ``id``), as views of one reused buffer when they share a
    device and are few enough elements (:data:`BATCH_LIMIT`), else fresh tensors."""
    n = sum(p.numel() for p in params)
    if not params or n > BATCH_LIMIT or len({p.device for p in params}) > 1:
        return {id(p): p.detach().to(torch.float64, copy=True) for p in params}
    shapes = [p.shape for p in params]
    views = scratch.layout("before", 1, shapes, torch.float64, params[0].device).views[0]
    torch._foreach_copy_(views, [p.detach() for p in params])
    return {id(p): v for p, v in zip(params, views, strict=True)}


def step_records(
    opt: torch.optim.Optimizer,
    names: dict[int, str],
    before: dict[int, torch.Tensor],
    requested: dict[int, torch.Tensor] | None,
    scratch: Scratch,
) -> list[dict[str, Any]]:
    """The :func:`param_stats` record of every parameter in ``before`` (param_groups order),
    computed for all of them at once: one flat float64 buffer per indicator, segment sums for
    the counts, ``_foreach`` norms (the same kernel per tensor as ``Tensor.norm``); for CPU
    float32/float64 parameters one compiled pass each (``bitstats.update_counts``) writes the
    update done (the same values) and counts instead of the indicator rows. Falls back
    to :func:`param_stats` per parameter for anything the batch does not cover (non-finite
    updates, several devices, empty or very many parameters, a missing requested update)."""
    ents = [(g, p) for g in opt.param_groups for p in g["params"] if id(p) in before]
    n = sum(p.numel() for _, p in ents)
    reqs = None if requested is None else [requested.get(id(p)) for _, p in ents]
    if (
        not ents
        or n > BATCH_LIMIT
        or len({p.device for _, p in ents}) > 1
        or any(p.numel() == 0 for _, p in ents)
        or (reqs is not None and any(r is None for r in reqs))
    ):
        return _one_by_one(ents, names, before, requested, opt, scratch)
    lay = scratch.layout(
        "indicators", 3, [p.shape for _, p in ents], torch.float64, ents[0][1].device
    )
    rows = lay.views
    d = rows[0]  # the update done, then the "moved" indicator in the same place
    befores = [before[id(p)] for _, p in ents]
    P = len(ents)
    # one compiled pass per parameter: d and the counts (CPU float32/float64 parameters)
    fused = update_counts([p for _, p in ents], befores, reqs, d, MAP_LIMIT)
    if fused is None:
        torch._foreach_copy_(d, [p.detach() for _, p in ents])
        torch._foreach_sub_(d, befores)
    norms = [torch._foreach_norm(befores, 2), torch._foreach_norm(d, 2)]
    if fused is not None:
        if reqs is not None:
            norms.append(torch._foreach_norm(reqs, 2))
        got = torch.stack([x for ns in norms for x in ns]).tolist()
        nrm = [got[k * P : (k + 1) * P] for k in range(len(norms))]
        if not all(math.isfinite(v) for ns in nrm[1:] for v in ns):
            return _one_by_one(ents, names, before, requested, opt, scratch)
        cnt, maps = fused
        return _finish(ents, names, opt, scratch, reqs is not None, nrm, cnt, maps)
    k_rows = 1
    if reqs is not None:
        norms.append(torch._foreach_norm(reqs, 2))
        torch._foreach_copy_(rows[1], reqs)
        k_rows = 2
    head = lay.head(k_rows).abs_()  # |update done|, |update asked|
    got = torch.cat([head.amin(1), torch.stack([x for ns in norms for x in ns])]).tolist()
    nrm = [got[k_rows + k * P : k_rows + (k + 1) * P] for k in range(len(norms))]
    # a finite 2-norm proves every element finite (an overflowing one only sends us the slow way)
    if not all(math.isfinite(v) for ns in nrm[1:] for v in ns):
        return _one_by_one(ents, names, before, requested, opt, scratch)
    if min(got[:k_rows]) > 0:  # every weight moved (and every update was asked): no swamping
        cnt = [[float(p.numel()) for _, p in ents]] * 2 + [[0.0] * P]
        small = None
    else:
        head.sign_()  # moved, asked: 0/1
        if reqs is not None:  # asked and not moved: swamped (asked - moved * asked, exact)
            torch.addcmul(lay.row(1), lay.row(0), lay.row(1), value=-1, out=lay.row(2))
        k_rows = 3 if reqs is not None else 1
        # per-parameter sums of the 0/1 indicators: exact integers (fewer than 2^53 of them)
        sums = torch.stack([t.sum(1) for t in lay.parts(0, k_rows)], dim=1).reshape(-1).tolist()
        cnt = [sums[k * P : (k + 1) * P] for k in range(k_rows)]
        small = rows[2]
    maps: list[list[int] | None] = []
    for j, (_, p) in enumerate(ents):
        if reqs is None or p.numel() > MAP_LIMIT:
            maps.append(None)
        elif small is None:
            maps.append([0] * p.numel())
        else:
            maps.append(small[j].reshape(-1).to(torch.uint8).tolist())
    return _finish(ents, names, opt, scratch, reqs is not None, nrm, cnt, maps)


def _finish(
    ents: list,
    names: dict[int, str],
    opt: torch.optim.Optimizer,
    scratch: Scratch,
    with_req: bool,
    nrm: list[list[float]],
    cnt: list[list[float]],
    maps: list[list[int] | None],
) -> list[dict[str, Any]]:
    """The records of :func:`step_records` from the norms (before, done, requested), the counts
    (moved, asked, swamped) and the swamped maps per parameter, with the state statistics."""
    # state tensors (zero and subnormal shares) and Adam's eps share
    states = [opt.state.get(p, {}) for _, p in ents]
    flat_state = _flat_state_counts(ents, states, scratch)
    if flat_state is not None:
        state_vals, eps_vals = flat_state
    else:
        state_vals = [
            _state_counts(st, p, scratch)[:2] for st, (_, p) in zip(states, ents, strict=True)
        ]
        eps_vals = [_eps_count(st, g) for st, (g, _) in zip(states, ents, strict=True)]
    tail: list[Any] = []
    for sv, e in zip(state_vals, eps_vals, strict=True):  # per parameter: state, then eps
        tail += sv[0] + ([e] if e is not None else [])
    if tail and isinstance(tail[0], torch.Tensor):  # the per-parameter functions' 0-d tensors
        tail = torch.stack([x.to(torch.float64) for x in tail]).tolist()
    got, i = tail, 0
    out = []
    for j, (g, p) in enumerate(ents):
        m = max(p.numel(), 1)
        wn, dn = nrm[0][j], nrm[1][j]
        rec: dict[str, Any] = {
            "param": names.get(id(p), f"param{j}"),
            "dtype": FORMAT_OF.get(p.dtype, str(p.dtype)),
            "numel": p.numel(),
            "moved_share": cnt[0][j] / m,
            "update_weight_ratio": dn / wn if wn else None,
        }
        if with_req:
            nasked, nswamped, rn = cnt[1][j], cnt[2][j], nrm[2][j]
            rec["requested_nonzero"] = int(nasked)
            rec["swamped"] = int(nswamped)
            rec["swamped_share"] = nswamped / max(nasked, 1)
            rec["requested_update_weight_ratio"] = rn / wn if wn else None
            rec["swamped_map"] = maps[j]
        for key in state_vals[j][1]:
            rec[f"state_{key}_zero_share"] = got[i] / m
            rec[f"state_{key}_subnormal_share"] = got[i + 1] / m
            i += 2
        if eps_vals[j] is not None:
            v = states[j]["exp_avg_sq"]
            eps_in = _rounded(g["eps"], v.dtype)
            rec["eps_in_state_dtype"] = eps_in
            rec["eps_flushed"] = eps_in == 0.0
            rec["eps_dominated_share"] = got[i] / m
            i += 1
        out.append(rec)
    return out


_ROUNDED: dict[tuple[float, torch.dtype], float] = {}


def _rounded(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded into ``dtype`` (as ``torch.tensor`` rounds it), cached (up to 256 pairs)."""
    key = (x, dtype)
    got = _ROUNDED.get(key)
    if got is None:
        if len(_ROUNDED) >= 256:
            _ROUNDED.clear()
        got = _ROUNDED[key] = float(torch.tensor(x, dtype=dtype))
    return got


def _eligible(state: dict, p: torch.Tensor) -> list[tuple[Any, torch.Tensor]]:
    return [
        (k, v)
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() == p.numel()
    ]


def _flat_state_counts(
    ents: list, states: list[dict], scratch: Scratch
) -> tuple[list[tuple[list[float], list[Any]]], list[float | None]] | None:
    """:func:`_state_counts` and :func:`_eps_count` of every parameter at once: the state
    tensors of one key copied into one flat buffer (float32 for narrower formats, as
    :func:`_state_counts` counts), indicator rows (non-zero, below the smallest normal, below
    the eps threshold) and per-parameter sums. None when a state tensor is not finite or
    negative where eps is counted, when the formats or eps values of a key differ, or anything
    else the flat path does not cover: then the per-parameter functions decide."""
    per = [_eligible(st, p) for st, (_, p) in zip(states, ents, strict=True)]
    eps_of: dict[int, float] = {}
    for j, ((g, _), st) in enumerate(zip(ents, states, strict=True)):
        v, eps = st.get("exp_avg_sq"), g.get("eps")
        if isinstance(v, torch.Tensor) and isinstance(eps, float):
            if not any(k == "exp_avg_sq" for k, _ in per[j]):
                return None
            eps_of[j] = eps
    if len(set(eps_of.values())) > 1:
        return None
    fast = state_counts(per, eps_of, _eps_threshold)  # one compiled pass per state tensor
    if fast is not None:
        return fast  # type: ignore[return-value]
    groups: dict[Any, list[tuple[int, torch.Tensor]]] = {}
    for j, kv in enumerate(per):
        for k, v in kv:
            groups.setdefault(k, []).append((j, v.detach()))
    plans, bounds = [], []
    for key, members in groups.items():
        dtypes = {v.dtype for _, v in members}
        if len(dtypes) != 1 or next(iter(dtypes)) not in FORMAT_OF:
            return None
        dtype = next(iter(dtypes))
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        with_eps = key == "exp_avg_sq" and bool(eps_of)
        rows = 4 if with_eps else 2
        shapes = [v.shape for _, v in members]
        lay = scratch.layout(f"state_{key}", rows + 1, shapes, cdt, members[0][1].device)
        torch._foreach_copy_(lay.views[0], [v for _, v in members])
        if not with_eps:  # |v| (exp_avg_sq must be >= 0 as it is: its eps share needs that)
            lay.row(0).abs_()
        bounds.append(torch.stack(torch.aminmax(lay.row(0))))
        plans.append((key, members, lay, dtype, rows, with_eps))
    got_b = torch.cat(bounds).tolist() if bounds else []
    counts: dict[tuple[Any, int], Any] = {}
    for (key, members, lay, dtype, rows, with_eps), lo, hi in zip(
        plans, got_b[0::2], got_b[1::2], strict=True
    ):
        if not (lo > float("-inf") and hi < float("inf")):  # an inf or NaN (NaN fails too)
            return None
        sn = SMALLEST_NORMAL[dtype]
        band = None
        if with_eps:
            eps = next(iter(eps_of.values()))
            if not (0 < eps < float("inf") and lo >= 0):
                return None
            # below t_lo, sqrt(v) < eps(1 - 2^-30) and so is torch's float64 sqrt (accurate to
            # far better than 2^-30); from t_hi on, neither is below eps. Elements between:
            # the per-parameter path computes torch's sqrt itself.
            band = (
                _eps_threshold(dtype, eps * (1 - 2.0**-30)),
                _eps_threshold(dtype, eps * (1 + 2.0**-30)),
            )
            if float("inf") in band:
                return None
        if lo >= sn and (band is None or lo >= band[1]):  # nothing below any threshold
            for j, v in members:
                counts[(key, j)] = [float(v.numel())] + [0.0] * (rows - 1)
            continue
        # 0/1 indicator rows, each one comparison written as floats (no NaN here)
        f = lay.row(0)
        torch.ne(f, 0, out=lay.row(1))  # non-zero
        torch.lt(f, sn, out=lay.row(2))  # |v| < sn
        if band is not None:
            torch.lt(f, band[0], out=lay.row(3))  # v < t_lo
            torch.lt(f, band[1], out=lay.row(4))  # v < t_hi
        for (j, _), part in zip(members, lay.parts(1, rows + 1), strict=True):
            counts[(key, j)] = part.sum(1)
    order = [c for c in counts if isinstance(counts[c], torch.Tensor)]
    got = torch.cat([counts[c] for c in order]).tolist() if order else []
    pos, i = {}, 0
    for c in order:
        pos[c] = got[i : i + counts[c].numel()]
        i += counts[c].numel()
    for c in counts:
        if c not in pos:
            pos[c] = counts[c]
    state_vals = []
    eps_vals: list[float | None] = []
    for j, kv in enumerate(per):
        vals: list[float] = []
        for k, v in kv:
            nonzero, below = pos[(k, j)][:2]
            zero = v.numel() - nonzero
            vals += [zero, below - zero]
        state_vals.append((vals, [k for k, _ in kv]))
        if j in eps_of:
            below_lo, below_hi = pos[("exp_avg_sq", j)][2:4]
            if below_lo != below_hi:  # an element within 2^-30 of eps: let torch's sqrt decide
                return None
            eps_vals.append(below_lo)
        else:
            eps_vals.append(None)
    return state_vals, eps_vals


def _one_by_one(
    ents: list, names: dict, before: dict, requested: dict | None, opt: Any, scratch: Scratch
) -> list[dict[str, Any]]:
    recs = []
    for g, p in ents:
        req = None if requested is None else requested.get(id(p))
        recs.append(
            param_stats(
                names.get(id(p), f"param{len(recs)}"),
                p,
                before[id(p)],
                req,
                opt.state.get(p, {}),
                g,
                scratch=scratch,
            )
        )
    return recs
