"""What one optimizer step did to each parameter: swamped updates, update size, state underflow.

The **requested** update is what the same optimizer (same class, hyperparameters and state)
computes in float64 on the same weights and gradients; an element is **swamped** when that
update is non-zero but the real step left the weight unchanged (``w + u == w`` in the weight's
format, or the update itself rounded to zero). The user's optimizer is never touched: the
float64 step runs on copies (a :class:`ShadowOptimizer` built once per watch, its tensors
refilled on each sampled step: :mod:`~fpgrad.watching.shadow_optimizer`). State tensors' zero,
subnormal and eps-dominated shares: :mod:`~fpgrad.watching.optimizer_state`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fpgrad.watching.families import FORMAT_OF
from fpgrad.watching.optimizer_state import (
    _eps_count,
    _eps_threshold,
    _flat_state_counts,
    _state_counts,
)
from fpgrad.watching.passes import update_counts
from fpgrad.watching.scratch import Scratch
from fpgrad.watching.shadow_optimizer import (
    PendingUpdates,
    ShadowOptimizer,
    _plain_step,
    requested_updates,
)

__all__ = [
    "BATCH_LIMIT",
    "MAP_LIMIT",
    "ShadowOptimizer",
    "_eps_threshold",
    "_plain_step",
    "param_stats",
    "requested_updates",
    "step_records",
    "widen",
]


#: Parameters up to this size keep their per-element swamped map in the records.
MAP_LIMIT = 4096


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
    float32/float64 parameters one compiled pass each (``passes.update_counts``) writes the
    update done (the same values) and counts instead of the indicator rows. Falls back
    to :func:`param_stats` per parameter for anything the batch does not cover (non-finite
    updates, several devices, empty or very many parameters, a missing requested update)."""
    ents = [(g, p) for g in opt.param_groups for p in g["params"] if id(p) in before]
    n = sum(p.numel() for _, p in ents)
    pending = requested if isinstance(requested, PendingUpdates) else None
    if pending is not None and not pending.settled:
        reqs = [pending.raw(id(p)) for _, p in ents]  # new weights: w subtracted below
    else:
        reqs = None if requested is None else [requested.get(id(p)) for _, p in ents]
        pending = None
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
    # one compiled pass per parameter: d and the counts (CPU float32/float64 parameters); it
    # also turns pending new weights into the requested updates when it subtracts the same w
    sub = pending is not None and _same_subtrahends(pending, reqs, befores)
    if pending is not None and not sub:
        pending.settle()
    fused = update_counts([p for _, p in ents], befores, reqs, d, MAP_LIMIT, sub)
    if pending is not None:
        if fused is None:
            pending.settle()  # nothing written: torch's subtraction
        else:
            pending.mark_settled()
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


def _same_subtrahends(
    pending: PendingUpdates, reqs: list[torch.Tensor | None], befores: list[torch.Tensor]
) -> bool:
    """Whether settling ``pending`` subtracts exactly ``befores[j]`` from ``reqs[j]`` and
    nothing else (then the compiled pass may do that subtraction instead)."""
    subs = pending.subtrahends()
    if len(subs) != len(reqs):
        return False
    for r, w in zip(reqs, befores, strict=True):
        if r is None or subs.get(id(r)) is not w:
            return False
    return True


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
