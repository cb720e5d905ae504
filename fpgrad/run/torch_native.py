"""The network as torch modules in a torch dtype, run with real autograd on the CPU.

This is the native truth of the framework: whatever torch's kernels do (float32
accumulation in float16 matmuls, fused bias, functions computed in float32...). Parameters
and data enter the dtype by fpgrad's correctly rounded :func:`~fpgrad.numbers.rounding.round_to`,
never by torch's float64 casts, which round twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fpgrad.errors import InputError
from fpgrad.model.network import Layer, Network
from fpgrad.model.policy import Plan
from fpgrad.numbers.formats import get_format
from fpgrad.numbers.rounding import round_to
from fpgrad.run import torch_gemm
from fpgrad.run.evaluate import Trace

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
    arr = np.asarray(values, dtype=np.float64)
    rounded = np.ascontiguousarray(round_to(arr, get_format(precision))).reshape(arr.shape)
    return torch.from_numpy(rounded).to(DTYPES[precision])  # 0-d stays 0-d


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
    if layer.kind == "batch_norm_eval":
        return _eval_batch_norm(layer, width, precision), width
    simple: dict[str, nn.Module] = {
        "relu": nn.ReLU(),
        "leaky_relu": nn.LeakyReLU(negative_slope=layer.slope),
        "sigmoid": nn.Sigmoid(),
        "tanh": nn.Tanh(),
        "softmax": nn.Softmax(dim=1),
    }
    return simple[layer.kind], width


def _eval_batch_norm(layer: Layer, width: int, precision: str) -> nn.BatchNorm1d:
    """An eval-mode BatchNorm1d: running statistics, weight and bias rounded into
    ``precision``; no weight and bias is affine=False, no bias is bias=False."""
    affine = "weight" in layer.params
    bn = nn.BatchNorm1d(
        width,
        eps=layer.eps,
        affine=affine,
        bias="bias" in layer.params or not affine,
        dtype=DTYPES[precision],
    )
    bn.eval()
    with torch.no_grad():
        for name, values in (*layer.stats.items(), *layer.params.items()):
            getattr(bn, name).copy_(to_dtype(values, precision))
    return bn


def build_modules(net: Network, precision: str) -> list[nn.Module]:
    modules = []
    width = net.x.shape[1]
    for layer in net.layers:
        module, width = build_module(layer, width, precision)
        modules.append(module)
    return modules


def loss_fn(
    net: Network, out: torch.Tensor, precision: str, data: str | None = None
) -> torch.Tensor:
    """torch's own loss functions, mean reduction, on ``out`` in ``precision``; float targets
    stored in ``data`` (default: ``precision``) and cast."""
    kind = net.loss.kind
    if kind == "cross_entropy" and net.class_targets:
        return F.cross_entropy(out, torch.from_numpy(net.y.astype(np.int64)))
    t = cast(to_dtype(net.y, data or precision), DTYPES[precision])
    if kind == "mse":
        return F.mse_loss(out, t)
    if kind == "cross_entropy":
        return F.cross_entropy(out, t)
    return F.binary_cross_entropy_with_logits(out, t)


def _dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def _exact_in(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every value of ``src`` is a value of ``dst`` (the cast is exact)."""
    return dst == torch.float64 or (dst == torch.float32 and src != torch.float64)


def cast_values(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: exact widening, or one correct rounding (never torch's float64
    casts, which round twice through float32)."""
    if t.dtype == dtype or _exact_in(t.dtype, dtype):
        return t.to(dtype)
    return to_dtype(to_float64(t), _dtype_name(dtype))


class _Cast(torch.autograd.Function):
    """A differentiable cast: the gradient is cast back to the input's dtype, as torch's."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        ctx.src = t.dtype
        return cast_values(t, dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return cast_values(grad, ctx.src), None


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` inside autograd (no-op when already there)."""
    return t if t.dtype == dtype else _Cast.apply(t, dtype)


class TorchModel:
    """The network's torch modules run by a :class:`~fpgrad.model.policy.Plan`: parameters stored in
    ``plan.params``, each layer computing in its planned precision, the loss in its own.
    A uniform plan runs exactly the modules of :func:`build_modules` on same-dtype tensors."""

    def __init__(self, net: Network, plan: Plan):
        self.net, self.plan = net, plan
        self.modules = build_modules(net, plan.params)
        self.ran_in: dict[str, dict[str, str | None]] = {}  #: observed dtypes, last forward

    def named_params(self) -> dict[str, torch.Tensor]:
        """Parameters by ``layer.param`` name, in the network's order."""
        named = {
            f"{ly.name}.{n}": p
            for ly, m in zip(self.net.layers, self.modules, strict=True)
            for n, p in m.named_parameters()
        }
        return {k: named[k] for k in self.net.params}

    def inputs(self, net: Network) -> torch.Tensor:
        return to_dtype(net.x, self.plan.data)

    def layer(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Layer ``index`` on ``h`` in its planned precision."""
        layer, module, lp = self.net.layers[index], self.modules[index], self.plan.layers[index]
        dtype = DTYPES[lp.compute]
        h = cast(h, dtype)
        used: str | None = None
        if layer.kind == "dense":
            w, b = module.weight, module.bias
            w = cast(w, dtype)
            b = cast(b, dtype) if b is not None else None
            used = _dtype_name(w.dtype)
            out = torch_gemm.linear(h, w, b)  # F.linear, faster float16 backward
        elif layer.kind == "batch_norm":
            if h.shape[0] < 2:  # torch's training-mode BatchNorm1d refuses a batch of one
                raise InputError(
                    f"layer {layer.name} (batch_norm): torch normalises over the batch and needs "
                    "at least 2 samples (the batch has 1); give more samples or a larger "
                    "--batch-size"
                )
            pd = DTYPES[lp.params or lp.compute]
            if module.weight.dtype == pd:
                out = module(h)
            else:
                w, b = cast(module.weight, pd), cast(module.bias, pd)
                out = F.batch_norm(h, None, None, w, b, True, 0.0, layer.eps)
            used = _dtype_name(pd)
        elif layer.kind == "batch_norm_eval":
            pd = DTYPES[lp.params or lp.compute]
            if module.running_mean.dtype == pd:
                out = module(h)
            else:  # the statistics and parameters as the op uses them, cast into pd
                w, b = module.weight, module.bias
                out = F.batch_norm(
                    h,
                    cast_values(module.running_mean, pd),
                    cast_values(module.running_var, pd),
                    cast(w, pd) if w is not None else None,
                    cast(b, pd) if b is not None else None,
                    False,
                    0.0,
                    layer.eps,
                )
            used = _dtype_name(pd)
        else:
            out = module(h)
        self.ran_in[layer.name] = {
            "compute": _dtype_name(h.dtype),
            "params": used,
            "output": _dtype_name(out.dtype),
        }
        return out

    def loss(self, net: Network, out: torch.Tensor) -> torch.Tensor:
        """The loss in the planned precision; targets stored in ``plan.data`` and cast."""
        out = cast(out, DTYPES[self.plan.loss])
        loss = loss_fn(net, out, self.plan.loss, self.plan.data)
        self.ran_in["loss"] = {
            "compute": _dtype_name(out.dtype),
            "params": None,
            "output": _dtype_name(loss.dtype),
        }
        return loss


def torch_trace(net: Network, precision: str | Plan, loss_scale: float = 1.0) -> Trace:
    """Forward and backward of ``net`` with torch autograd in ``precision`` (a native dtype
    name or a policy's plan); with ``loss_scale`` S, backward starts from S * loss."""
    if isinstance(precision, str):
        from fpgrad.run.runlog import record

        record(precision, "native")
    with one_torch_thread():
        return _torch_trace(net, precision, loss_scale)


def _torch_trace(net: Network, precision: str | Plan, loss_scale: float) -> Trace:
    plan = Plan.uniform(net, precision) if isinstance(precision, str) else precision
    model = TorchModel(net, plan)
    h = model.inputs(net)
    outputs: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(net.layers):
        h = model.layer(index, h)
        h.retain_grad()
        outputs[layer.name] = h
    loss = model.loss(net, h)
    (loss * loss_scale if loss_scale != 1.0 else loss).backward()
    label = precision if isinstance(precision, str) else plan.policy
    trace = Trace(system=f"torch.{label}", loss=float(loss.detach().to(torch.float64)))
    trace.formats["loss"] = _dtype_name(loss.dtype)
    params = model.named_params()
    for layer in net.layers:
        out = outputs[layer.name]
        trace.forward[layer.name] = to_float64(out)
        grad = out.grad if out.grad is not None else torch.zeros_like(out)
        trace.backward[layer.name] = to_float64(grad)
        trace.formats[f"forward/{layer.name}"] = _dtype_name(out.dtype)
        trace.formats[f"backward/{layer.name}"] = _dtype_name(grad.dtype)
    for name, param in params.items():
        g = param.grad if param.grad is not None else torch.zeros_like(param)
        trace.grads[name] = to_float64(g)
        trace.formats[f"grads/{name}"] = _dtype_name(g.dtype)
    trace.ran_in = dict(model.ran_in)
    return trace
