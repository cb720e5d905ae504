"""The checks the held-out probes share (scripts/probe_heldout.py, scripts/heldout_models_g.py):
the model's own eager autograd in a dtype, bit-for-bit equality with a graph column, and the
native columns of a captured graph against eager."""

from __future__ import annotations

import copy
import traceback
from typing import Any

import numpy as np
import torch
from torch import nn

from fpgrad.graph.capture import copy_model


def _tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _cast(x: Any, dt: torch.dtype) -> Any:
    return x.to(dt) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def eager(
    m: nn.Module, inputs: Any, targets: torch.Tensor, loss: Any, dt: torch.dtype
) -> tuple[Any, dict]:
    """The loss and the parameter gradients of a copy of ``m`` in ``dt`` (eager autograd)."""
    mm = copy_model(m).to(dt)
    lf = copy.deepcopy(loss).to(dt) if isinstance(loss, nn.Module) else loss
    out = lf(mm(*[_cast(x, dt) for x in _tuple(inputs)]), _cast(targets, dt))
    out.backward()
    grads = {
        n: (p.grad if p.grad is not None else torch.zeros_like(p))
        for n, p in mm.named_parameters()
        if p.requires_grad  # a frozen parameter: torch computes no gradient
    }
    return out.detach(), grads


def same(a: Any, b: torch.Tensor) -> bool:
    """``a`` equals torch's ``b`` bit for bit (NaN with NaN, and the sign of zeros)."""
    b = b.detach().double().numpy()
    a = np.asarray(a, dtype=np.float64).reshape(b.shape)
    return bool(
        np.array_equal(a, b, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(b))
    )


def native_checks(
    net: Any,
    m: nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    loss: Any,
    dts: list[tuple[str, torch.dtype]],
    rec: dict[str, Any],
    crash: str = "",
) -> dict[str, str]:
    """Per precision of ``dts``: "yes" where the graph's native column equals eager bit for bit
    (loss and every gradient), else "NO: " and the first keys that differ, or ``crash`` and the
    exception's first line (its traceback into ``rec["trace"]``)."""
    from fpgrad.graph.native import native_run

    native = {}
    for prec, dt in dts:
        try:
            tr = native_run(net.graph, prec)
            el, eg = eager(m, inputs, targets, loss, dt)
            bad = [k for k in eg if not same(tr.grads[k], eg[k])]
            if not same(tr.loss, el):
                bad.insert(0, "loss")
            native[prec] = "yes" if not bad else "NO: " + ",".join(bad[:4])
        except Exception as e:  # noqa: BLE001
            native[prec] = f"{crash}{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rec["trace"] = traceback.format_exc()
    return native
