"""The requested update of ``torch.optim.Adam`` and ``AdamW`` in one compiled pass.

The float64 shadow (:mod:`~fpgrad.watching.shadow_optimizer`) copies weights, gradients and
state into float64 tensors and runs torch's own step on them: seven passes over the
parameters, and torch's float64 ``sqrt`` (not a correctly rounded one). For the plain forms of
Adam and AdamW (no amsgrad, maximize, capturable, differentiable or fused step; Python-number
hyperparameters; CPU float32/float64 contiguous parameters, gradients and state, state already
initialised) :func:`adam_updates` computes the same float64 update in one pass per parameter
from the tensors as they are, each operation correctly rounded, in the order of torch's
multi-tensor step (``torch.optim.adam._multi_tensor_adam``)::

    g' = g + wd w                       (L2 weight decay: Adam with weight_decay)
    w' = w (1 - lr wd)                  (decoupled: AdamW)
    m' = m + (1 - b1) (g' - m)          (torch's lerp; m' = g' - (g' - m) b1 when 1 - b1 >= 0.5)
    v' = v b2 + ((1 - b2) g') g'       (torch's addcmul: value * t1 * t2)
    u  = (w' + ((-lr / (1 - b1^t)) m') / (sqrt(v') / (1 - b2^t)^0.5 + eps)) - w

with t the state's step plus one (in the step's dtype: a float32 step stops at 2^24). torch's
own float64 step can differ from it in the last bit of an element (its vectorised lerp, addcmul
and ``add(alpha=)`` fuse multiply-adds; its float64 sqrt is not correctly rounded: 1.3% of
random inputs, measured), so a requested update that lands within a float64 rounding of
leaving ``w`` unchanged may be zero in one and not the other; the update norms differ in their
last bits at most (tests/test_watch_adam_pass.py). Anything else: None, and the float64 shadow
runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numba import njit

from fpgrad.watching.passes import flat_view
from fpgrad.watching.scratch import Scratch

#: numba options: IEEE division (0/0 is NaN, as in torch) lets the loops vectorise.
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(**_JIT)
def _adam(
    w: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    u: np.ndarray,
    wl: float,
    b2: float,
    c2: float,
    ss: float,
    bc2s: float,
    eps: float,
    wd: float,
    mode: int,
) -> None:
    """``u = the update`` (module docstring) per element; ``mode``: 0 no weight decay, 1 L2
    (``g + wd w``), 2 decoupled (``w (1 - lr wd)``, ``wd`` then holding ``1 - lr wd``), plus 3
    when the lerp weight ``wl`` is not below 0.5 (torch's other lerp formula). One loop per
    mode, so each vectorises."""
    big = mode >= 3
    mode = mode - 3 if big else mode
    n = u.size
    if mode == 0 and not big:
        for k in range(n):
            w0 = np.float64(w[k])
            gk = np.float64(g[k])
            mk = np.float64(m[k])
            mk = mk + wl * (gk - mk)
            vk = np.float64(v[k]) * b2 + (c2 * gk) * gk
            u[k] = (w0 + (ss * mk) / (np.sqrt(vk) / bc2s + eps)) - w0
        return
    for k in range(n):
        w0 = np.float64(w[k])
        gk = np.float64(g[k])
        mk = np.float64(m[k])
        wk = w0
        if mode == 1:
            gk = gk + wd * w0
        elif mode == 2:
            wk = w0 * wd
        if big:
            mk = gk - (gk - mk) * (1.0 - wl)
        else:
            mk = mk + wl * (gk - mk)
        vk = np.float64(v[k]) * b2 + (c2 * gk) * gk
        u[k] = (wk + (ss * mk) / (np.sqrt(vk) / bc2s + eps)) - w0


_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable", "fused")
_FLOATS = (torch.float32, torch.float64)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def adam_updates(
    opt: torch.optim.Optimizer, before: dict[int, torch.Tensor], scratch: Scratch
) -> dict[int, torch.Tensor] | None:
    """Per parameter in ``before`` (by ``id``; its float64 weights before the step), the float64
    update Adam or AdamW asks for (module docstring), in views of one buffer of ``scratch``
    kept until the next call; None where the pass does not apply (then the float64 shadow)."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
        return None
    jobs = []
    for g in opt.param_groups:
        if any(g.get(f) for f in _FLAGS):
            return None
        lr, eps, wd = g.get("lr"), g.get("eps"), g.get("weight_decay")
        betas = g.get("betas")
        if not (isinstance(betas, tuple) and len(betas) == 2):
            return None
        b1, b2 = betas
        if not all(_number(x) for x in (lr, eps, wd, b1, b2)):
            return None
        decoupled = g.get("decoupled_weight_decay", type(opt) is torch.optim.AdamW)
        for p in g["params"]:
            if id(p) not in before:
                continue
            st = opt.state.get(p)
            grad = p.grad
            if st is None or grad is None or set(st) != {"step", "exp_avg", "exp_avg_sq"}:
                return None
            step = st["step"]
            if isinstance(step, torch.Tensor) and (
                step.numel() != 1
                or not step.is_cpu
                or step.dtype in (torch.float16, torch.bfloat16)
            ):
                return None
            w = before[id(p)]
            arrays = [flat_view(x, _FLOATS) for x in (w, grad, st["exp_avg"], st["exp_avg_sq"])]
            if any(a is None for a in arrays) or len({a.size for a in arrays}) != 1:  # type: ignore[union-attr]
                return None
            if len({a.dtype for a in arrays[1:]}) != 1 or grad.dtype != p.dtype:  # type: ignore[union-attr]
                return None
            t = float(step) + 1  # torch: state_steps += 1 (in the step's dtype), then .item()
            if isinstance(step, torch.Tensor) and step.dtype == torch.float32:
                t = float(np.float32(t))  # float32 steps stop at 2^24 (torch's default dtype)
            mode = 0
            if wd != 0:
                mode = 2 if decoupled else 1
            wl = 1 - b1
            if not abs(wl) < 0.5:
                mode += 3
            try:  # a beta of 1 (lr / 0) or above (a complex root): torch's step raises itself
                ss = (lr / (1 - b1**t)) * -1
                bc2s = (1 - b2**t) ** 0.5
                factor = 1 - lr * wd if mode % 3 == 2 else wd
                consts = [float(x) for x in (wl, b2, 1 - b2, ss, bc2s, eps, factor)]
            except (ArithmeticError, TypeError):
                return None
            jobs.append((p, arrays, (*consts, mode)))
    if not jobs:
        return None
    shapes = [p.shape for p, _, _ in jobs]
    views = scratch.layout("requested", 1, shapes, torch.float64, jobs[0][0].device).views[0]
    got: dict[int, torch.Tensor] = {}
    for (p, (w, g_, m, v), consts), out in zip(jobs, views, strict=True):
        _adam(w, g_, m, v, out.numpy().reshape(-1), *consts)
        got[id(p)] = out
    return got
