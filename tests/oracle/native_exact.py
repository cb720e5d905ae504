"""The native-and-exact check of a captured torch model, shared by the op tests: native
float32/float64 columns bit for bit against the model's own eager autograd, the exact balls
around torch float64's loss and gradients (plus 1e-9 of the case's largest value for float64's
own rounding), certified digits and no undetermined element unless said."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

import fpgrad
from fpgrad.graph.capture import copy_model
from fpgrad.graph.exact import exact_graph
from fpgrad.graph.native import native_run


def _tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _eager(model: nn.Module, inputs: Any, targets: torch.Tensor, loss: Any,
           dt: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    m = copy_model(model).to(dt)  # deepcopy, also of torch.nn.utils.weight_norm's modules
    lf = copy.deepcopy(loss).to(dt) if isinstance(loss, nn.Module) else loss
    xs = [x.to(dt) if x.is_floating_point() else x for x in _tuple(inputs)]
    y = targets.to(dt) if targets.is_floating_point() else targets
    torch.set_num_threads(1)
    out = lf(m(*xs), y)
    out.backward()
    return out.detach(), {n: p.grad if p.grad is not None else torch.zeros_like(p)
                          for n, p in m.named_parameters() if p.requires_grad}  # fmt: skip


def _bits(a: Any, b: torch.Tensor) -> None:
    ref = b.detach().double().numpy()
    got = np.asarray(a, dtype=np.float64).reshape(ref.shape)
    assert np.array_equal(got, ref, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(ref))


NATIVE = ("float32", "float64")


def check(model: nn.Module, inputs: Any, targets: torch.Tensor, loss: Any,
          digits: float = 17.0, undetermined: int = 0,
          native: tuple[str, ...] = NATIVE) -> Any:  # fmt: skip
    """Native columns (float32/float64, or ``native``) bit for bit against eager torch; exact
    balls around torch float64; certified digits; the exact result is returned for further
    claims."""
    net = fpgrad.from_module(model, inputs, targets, loss)
    for prec in native:
        dt = getattr(torch, prec)
        tr = native_run(net.graph, prec)
        el, eg = _eager(model, inputs, targets, loss, dt)
        _bits(tr.loss, el)
        for k, g in eg.items():
            _bits(tr.grads[k], g)
    ex = exact_graph(net.graph).result
    el, eg = _eager(model, inputs, targets, loss, torch.float64)
    scale = max([abs(el.item())] + [float(g.abs().max()) for g in eg.values()])
    for key, ref in [("loss", el)] + [(f"grads/{k}", g) for k, g in eg.items()]:
        mid, rad = ex.enclosure(key)
        r = ref.numpy().reshape(-1)
        m = np.array([float(v) for v in np.asarray(mid, dtype=object).reshape(-1)])
        np.testing.assert_array_less(np.abs(r - m), np.asarray(rad).reshape(-1) + 1e-9 * scale)
    assert ex.certified_digits >= digits
    assert ex.undetermined_count == undetermined
    return ex
