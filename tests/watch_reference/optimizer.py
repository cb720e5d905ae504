"""What one optimizer step did to each parameter: swamped updates, update size, state underflow.

The **requested** update is what the same optimizer (same class, hyperparameters and state)
computes in float64 on the same weights and gradients; an element is **swamped** when that
update is non-zero but the real step left the weight unchanged (``w + u == w`` in the weight's
format, or the update itself rounded to zero). The user's optimizer is never touched: the
float64 step runs on copies (a :class:`ShadowOptimizer` built once per watch, its tensors
refilled on each sampled step).
"""

from __future__ import annotations

from typing import Any

import torch

from fpgrad.numbers.formats import get_format
from tests.watch_reference.classify import FORMAT_OF, count

#: Parameters up to this size keep their per-element swamped map in the records.
MAP_LIMIT = 4096


def _hyper(g: dict) -> dict:
    """A param_group's hyperparameters for the float64 shadow (single-tensor implementation)."""
    ng = {k: v for k, v in g.items() if k != "params"}
    for k in ("foreach", "fused", "capturable"):
        if k in ng:
            ng[k] = False
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
            for p, q in self._pairs:
                q.copy_(p.detach())
                if p.grad is None:
                    q.grad = None
                elif q.grad is None or q.grad.shape != p.grad.shape:
                    q.grad = p.grad.detach().to(torch.float64, copy=True)
                else:
                    q.grad.copy_(p.grad.detach())
                if p in opt.state:
                    st = shadow.state[q]
                    src = opt.state[p]
                    for k in [k for k in st if k not in src]:
                        del st[k]
                    for k, v in src.items():
                        _put(st, k, v)
                else:
                    shadow.state.pop(q, None)
            with torch.no_grad():
                shadow.step()
        except (TypeError, ValueError, RuntimeError, KeyError):
            self._key = self._shadow = None
            return None
        out = {}
        for p, q in self._pairs:
            if p.grad is not None:
                w = before.get(id(p)) if before is not None else None
                out[id(p)] = q.sub_(w if w is not None else p.detach().to(torch.float64))
        return out


def requested_updates(opt: torch.optim.Optimizer) -> dict[int, torch.Tensor] | None:
    """Per parameter (by ``id``), the float64 update the optimizer asks for (a fresh shadow; a
    :class:`ShadowOptimizer` kept across steps does the same with its tensors reused)."""
    return ShadowOptimizer().requested_updates(opt)


def param_stats(
    name: str,
    p: torch.Tensor,
    before: torch.Tensor,
    requested: torch.Tensor | None,
    state: dict,
    group: dict,
) -> dict[str, Any]:
    """The record of one parameter after a step (``before``: its value before the step)."""
    after = p.detach()
    n = max(p.numel(), 1)
    w64 = before.to(torch.float64)
    d64 = after.to(torch.float64, copy=True).sub_(w64)  # never the parameter itself
    # float indicators (1.0 / 0.0) where everything is finite: much faster than bool masks (a
    # non-finite weight before or after makes d64 non-finite, so d64 and requested suffice)
    check = d64.sum() + (requested.sum() if requested is not None else 0.0)
    finite = bool(torch.isfinite(check))
    moved = d64.abs().sign_() if finite else (after != before).to(torch.float64)
    vals = [moved.sum(), w64.norm(), d64.norm()]
    if requested is not None:
        asked = requested.abs().sign_() if finite else (requested != 0).to(torch.float64)
        swamped = (1 - moved).mul_(asked)
        vals += [asked.sum(), swamped.sum(), requested.norm()]
    keys = []
    for key, v in state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() == p.numel():
            sn = get_format(FORMAT_OF.get(v.dtype, "float32")).smallest_normal
            # counted in the state's own format (float32 for narrower ones): a zero is a zero
            # and ``sn - |v|`` is positive exactly when ``|v| < sn`` (gradual underflow)
            a = v.detach().abs()
            lo, hi = torch.stack(torch.aminmax(a)).tolist()
            if lo >= sn and hi < float("inf"):  # no zero, subnormal, inf or NaN
                vals += [torch.zeros((), dtype=torch.float64)] * 2
                keys.append(key)
                continue
            if a.dtype != torch.float64:
                a = a.float()
            if hi < float("inf"):
                zero = 1 - torch.sign(a)
                nz = count(zero)
                vals += [nz, count((sn - a).clamp_(min=0).sign_()) - nz]
            else:
                vals += [(a == 0).sum(), ((a > 0) & (a < sn)).sum()]
            keys.append(key)
    v = state.get("exp_avg_sq")
    eps = group.get("eps")
    adam = isinstance(v, torch.Tensor) and isinstance(eps, float)
    if adam:
        root = v.detach().to(torch.float64).sqrt()
        if bool(torch.isfinite(root.sum())):  # no NaN: eps - root > 0 exactly when root < eps
            vals.append(count((eps - root).clamp_(min=0).sign_()))
        else:
            vals.append((root < eps).sum())
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
    if requested is not None:
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
        eps_in = float(torch.tensor(eps, dtype=v.dtype))
        rec["eps_in_state_dtype"] = eps_in
        rec["eps_flushed"] = eps_in == 0.0
        rec["eps_dominated_share"] = got[i] / n
    return rec
