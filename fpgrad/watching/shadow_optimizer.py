"""The user's optimizer rebuilt in float64 on copies of its weights: the **requested** update.

The float64 step runs on copies (a :class:`ShadowOptimizer` built once per watch, its tensors
refilled on each sampled step); the user's optimizer is never touched.
"""

from __future__ import annotations

from typing import Any

import torch


def _hyper(g: dict) -> dict:
    """A param_group's hyperparameters for the float64 shadow: the multi-tensor (``foreach``)
    implementation where the optimizer has one (fewer Python calls; elementwise the same
    operations as the single-tensor one: tests/test_watch_fast.py compares the two bit for bit
    for six optimizers), never ``fused`` or ``capturable``; the single-tensor one when a
    hyperparameter is a tensor."""
    ng = {k: v for k, v in g.items() if k != "params"}
    for k in ("foreach", "fused", "capturable"):
        if k in ng:
            ng[k] = False
    # a tensor hyperparameter (lr, betas) is refused by the multi-tensor step when not
    # capturable (Adam's constructor raises): the single-tensor step then, as torch's default
    tensors = any(
        isinstance(v, torch.Tensor)
        or (isinstance(v, tuple) and any(isinstance(x, torch.Tensor) for x in v))
        for v in ng.values()
    )
    if "foreach" in ng and not ng.get("differentiable") and not tensors:
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
        """:meth:`_requested_updates` with torch's CPU and CUDA generators restored after it: the
        shadow is the user's class, whose step may draw random numbers (noise, stochastic
        rounding) that must not advance the user's generators."""
        cuda = {p.device.index or 0 for g in opt.param_groups for p in g["params"] if p.is_cuda}
        with torch.random.fork_rng(devices=sorted(cuda), device_type="cuda"):
            return self._requested_updates(opt, before)

    def _requested_updates(
        self, opt: torch.optim.Optimizer, before: dict[int, torch.Tensor] | None = None
    ) -> dict[int, torch.Tensor] | None:
        """Per parameter (by ``id``), the float64 update the optimizer asks for, or None when the
        optimizer cannot be rebuilt from its param_groups (then swamping is not reported).
        ``before``: the weights now, already in float64 (saves widening them again); then a
        :class:`PendingUpdates` (the subtraction done on first read). The updates live in the
        shadow's tensors until the next call."""
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
        except Exception:  # of the user's class in float64 (a dtype assert, a NaN check)
            self._key = self._shadow = None
            return None
        qs, ws = [], []
        for p, q in self._pairs:
            if p.grad is not None:
                w = before.get(id(p)) if before is not None else None
                qs.append(q)
                ws.append(w if w is not None else p.detach().to(torch.float64))
        got = {id(p): q for p, q in self._pairs if p.grad is not None}
        if before is not None:  # the subtraction waits for its first reader
            return PendingUpdates(got, qs, ws)
        if qs:
            torch._foreach_sub_(qs, ws)
        return got


class PendingUpdates(dict):
    """The requested updates by ``id`` as :meth:`ShadowOptimizer.requested_updates` returns
    them when given the weights before the step: the values still hold the shadow's new
    weights ``q`` until the first read (``get``, ``[]``, ``values``, ``items``) subtracts the
    weights before (``q - w`` in place, torch's ``_foreach_sub_``), so every reader sees the
    updates. :func:`~fpgrad.watching.optimizer.step_records` instead does that subtraction in
    its compiled pass over the same tensors (:meth:`raw`, :meth:`subtrahends`,
    :meth:`mark_settled`): the same values, one pass less."""

    def __init__(self, got: dict, qs: list[torch.Tensor], ws: list[torch.Tensor]) -> None:
        super().__init__(got)
        self._qs, self._ws = qs, ws
        self.settled = not qs

    def settle(self) -> None:
        """Subtract the weights before, once (torch's ``_foreach_sub_``)."""
        if not self.settled:
            torch._foreach_sub_(self._qs, self._ws)
            self.settled = True

    def mark_settled(self) -> None:
        """The caller has written ``q - w`` into every value itself."""
        self.settled = True

    def raw(self, key: Any) -> torch.Tensor | None:
        """The value of ``key`` as it is now (new weights until settled)."""
        return super().get(key)

    def subtrahends(self) -> dict[int, torch.Tensor]:
        """``id`` of each value ``q`` -> the weights ``w`` that settling subtracts from it."""
        return {id(q): w for q, w in zip(self._qs, self._ws, strict=True)}

    def get(self, key: Any, default: Any = None) -> Any:
        self.settle()
        return super().get(key, default)

    def __getitem__(self, key: Any) -> torch.Tensor:
        self.settle()
        return super().__getitem__(key)

    def values(self) -> Any:
        self.settle()
        return super().values()

    def items(self) -> Any:
        self.settle()
        return super().items()

    def __iter__(self) -> Any:  # also sends dict(x) and **x through __getitem__ (CPython)
        self.settle()
        return super().__iter__()

    def copy(self) -> dict:  # type: ignore[override]
        self.settle()
        return dict(super().items())


def requested_updates(opt: torch.optim.Optimizer) -> dict[int, torch.Tensor] | None:
    """Per parameter (by ``id``), the float64 update the optimizer asks for (a fresh shadow; a
    :class:`ShadowOptimizer` kept across steps does the same with its tensors reused)."""
    return ShadowOptimizer().requested_updates(opt)
