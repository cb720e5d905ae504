"""The network as torch modules in a torch dtype, run with real autograd on the CPU.

This is the native truth of the framework: whatever torch's kernels do (float32
accumulation in float16 matmuls, fused bias, functions computed in float32...). Parameters
and data enter the dtype by fpgrad's correctly rounded :func:`~fpgrad.rounding.round_to`,
never by torch's float64 casts, which round twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fpgrad.evaluate import Trace
from fpgrad.formats import get_format
from fpgrad.network import Layer, Network
from fpgrad.rounding import round_to

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread, restoring the setting after.

    fpgrad's networks are tiny: threads gain nothing, and on a busy machine every float16 or
    bfloat16 kernel then waits milliseconds for a descheduled OpenMP thread (measured here:
    15 ms against 0.015 ms per small linear). Results are identical at these sizes.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def to_dtype(values: np.ndarray, precision: str) -> torch.Tensor:
    """float64 values correctly rounded into a torch dtype (exact cast after rounding)."""
    rounded = round_to(np.asarray(values, dtype=np.float64), get_format(precision))
    return torch.from_numpy(np.ascontiguousarray(rounded)).to(DTYPES[precision])


def to_float64(t: torch.Tensor) -> np.ndarray:
    """Exact widening of a tensor to float64 numpy."""
    return t.detach().to(torch.float64).numpy().copy()


def build_module(layer: Layer, width: int, precision: str) -> tuple[nn.Module, int]:
    """The torch module for ``layer``, parameters rounded into ``precision``."""
    dtype = DTYPES[precision]
    if layer.kind == "dense":
        w = layer.params["weight"]
        lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in layer.params, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(to_dtype(w, precision))
            if lin.bias is not None:
                lin.bias.copy_(to_dtype(layer.params["bias"], precision))
        return lin, w.shape[0]
    if layer.kind == "batch_norm":
        bn = nn.BatchNorm1d(width, eps=layer.eps, momentum=None, dtype=dtype)
        bn.train()
        with torch.no_grad():
            bn.weight.copy_(to_dtype(layer.params["weight"], precision))
            bn.bias.copy_(to_dtype(layer.params["bias"], precision))
        return bn, width
    simple: dict[str, nn.Module] = {
        "relu": nn.ReLU(),
        "leaky_relu": nn.LeakyReLU(negative_slope=layer.slope),
        "sigmoid": nn.Sigmoid(),
        "tanh": nn.Tanh(),
        "softmax": nn.Softmax(dim=1),
    }
    return simple[layer.kind], width


def build_modules(net: Network, precision: str) -> list[nn.Module]:
    modules = []
    width = net.x.shape[1]
    for layer in net.layers:
        module, width = build_module(layer, width, precision)
        modules.append(module)
    return modules


def loss_fn(net: Network, out: torch.Tensor, precision: str) -> torch.Tensor:
    """torch's own loss functions, mean reduction."""
    kind = net.loss.kind
    if kind == "mse":
        return F.mse_loss(out, to_dtype(net.y, precision))
    if kind == "cross_entropy":
        if net.class_targets:
            return F.cross_entropy(out, torch.from_numpy(net.y.astype(np.int64)))
        return F.cross_entropy(out, to_dtype(net.y, precision))
    return F.binary_cross_entropy_with_logits(out, to_dtype(net.y, precision))


def torch_trace(net: Network, precision: str) -> Trace:
    """Forward and backward of ``net`` with torch autograd in ``precision``."""
    with one_torch_thread():
        return _torch_trace(net, precision)


def _torch_trace(net: Network, precision: str) -> Trace:
    modules = build_modules(net, precision)
    h = to_dtype(net.x, precision)
    outputs: dict[str, torch.Tensor] = {}
    for layer, module in zip(net.layers, modules, strict=True):
        h = module(h)
        h.retain_grad()
        outputs[layer.name] = h
    loss = loss_fn(net, h, precision)
    loss.backward()
    trace = Trace(system=f"torch.{precision}", loss=float(loss.detach().to(torch.float64)))
    for layer, module in zip(net.layers, modules, strict=True):
        out = outputs[layer.name]
        trace.forward[layer.name] = to_float64(out)
        grad = out.grad if out.grad is not None else torch.zeros_like(out)
        trace.backward[layer.name] = to_float64(grad)
        for pname, param in module.named_parameters():
            g = param.grad if param.grad is not None else torch.zeros_like(param)
            trace.grads[f"{layer.name}.{pname}"] = to_float64(g)
    trace.grads = {name: trace.grads[name] for name in net.params}
    return trace
