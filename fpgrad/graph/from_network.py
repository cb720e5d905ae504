"""A layer network (:class:`~fpgrad.model.network.Network`) compiled to a torch module and captured.

:func:`from_network` builds the modules :mod:`fpgrad.run.torch_native` runs (its own
:func:`~fpgrad.run.torch_native.build_module`, in float64, so the values are the network's
exactly) under one ``nn.Module`` whose submodules are named by the layers, and the loss
:func:`~fpgrad.run.torch_native.loss_fn` computes, then captures them with
:func:`~fpgrad.graph.network.from_module`. Parameters keep the network's keys
(``hidden.weight``), module paths are layer names. For a uniform precision the eager run in a
torch dtype is the same sequence of kernels on the same correctly rounded values as
:func:`fpgrad.run.torch_native.torch_trace` (tests/test_graph_from_network.py checks it bit for bit).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fpgrad.errors import InputError
from fpgrad.graph.capture import TAPS
from fpgrad.graph.network import GraphNetwork, from_module
from fpgrad.model.network import Network
from fpgrad.run.torch_native import build_module


class LayerStack(nn.Module):
    """The layers of a network, in order, each a submodule named by its layer."""

    def __init__(self, net: Network, taps: bool = False) -> None:
        super().__init__()
        self.names: list[str] = []
        self._tap = taps
        self._batch_norm = [ly.name for ly in net.layers if ly.kind == "batch_norm"]
        width = net.x.shape[1]
        for layer in net.layers:
            if "." in layer.name or hasattr(self, layer.name):
                raise InputError(
                    f"layer {layer.name!r}: a torch submodule cannot take this name (a dot, or "
                    "an nn.Module attribute); rename the layer to compare it on the graph path"
                )
            module, width = build_module(layer, width, "float64")
            if layer.kind == "batch_norm":
                # momentum only weights the running-statistics update, which no output or
                # gradient reads; torch_native's None (a cumulative average) divides by the
                # step counter with .item(), which make_fx cannot trace
                module.momentum = 0.0
            self.add_module(layer.name, module)
            self.names.append(layer.name)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self._batch_norm and h.shape[0] < 2:  # as fpgrad.run.torch_native.TorchModel.layer
            raise InputError(
                f"layer {self._batch_norm[0]} (batch_norm): torch normalises over the batch and "
                f"needs at least 2 samples (the batch has {h.shape[0]}); give more samples or a "
                "larger --batch-size"
            )
        taps: list[tuple[str, torch.Tensor]] = []
        if self._tap and not h.requires_grad:  # dL/d(every layer's output) is asked for
            h = h.detach().requires_grad_()
        for name in self.names:
            h = getattr(self, name)(h)
            taps.append((name, h))
        if self._tap:
            setattr(self, TAPS, taps)
        return h


class LayerLoss:
    """The network's loss as :func:`fpgrad.run.torch_native.loss_fn` computes it (mean reduction;
    targets arrive rounded into the column's dtype, class indices as int64)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return F.mse_loss(out, targets)
        if self.kind == "cross_entropy":
            return F.cross_entropy(out, targets)
        return F.binary_cross_entropy_with_logits(out, targets)


def from_network(net: Network, taps: bool = False) -> GraphNetwork:
    """``net`` as a captured torch model: the same parameters (same keys), data and loss.
    ``taps``: the graph also returns every layer's output and dL/d(output) (the layer values
    of a :class:`~fpgrad.run.evaluate.Trace`). Raises :class:`~fpgrad.errors.InputError` for a
    layer name torch cannot take."""
    if not isinstance(net, Network):
        raise InputError(f"from_network needs a layer Network, got {type(net).__name__}")
    model = LayerStack(net, taps)
    x = torch.from_numpy(np.ascontiguousarray(net.x, dtype=np.float64))
    if net.class_targets:
        y = torch.from_numpy(np.ascontiguousarray(net.y).astype(np.int64))
    else:
        y = torch.from_numpy(np.ascontiguousarray(net.y, dtype=np.float64))
    graph_net = from_module(model, x, y, LayerLoss(net.loss.kind), name=net.name)
    names = graph_net.param_names
    if names != list(net.params):
        raise InputError(
            f"{net.name}: the compiled module's parameters {names} are not the network's "
            f"{list(net.params)}"
        )
    return graph_net
