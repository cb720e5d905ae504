"""A torch model captured for diagnosis: :func:`from_module`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fpgrad.graph.capture import Graph, LossFn, capture


@dataclass
class GraphNetwork:
    """A captured model: its joint forward+backward graph and the values it was traced with."""

    graph: Graph
    name: str = "model"

    @property
    def param_names(self) -> list[str]:
        """Parameter names, as ``model.named_parameters()`` gives them."""
        return list(self.graph.param_names)

    def compare(self, precisions: str | list[str] | None = None, **kwargs: Any) -> Any:
        """:func:`fpgrad.graph.compare.compare_graph` of this network."""
        from fpgrad.graph.compare import compare_graph

        return compare_graph(self, precisions, **kwargs)

    def train(self, steps: int, **kwargs: Any) -> Any:
        """:func:`fpgrad.graph.train.train_graph` of this network (a TrainResult)."""
        from fpgrad.graph.train import train_graph

        return train_graph(self, steps, **kwargs)


def from_module(
    model: nn.Module, inputs: Any, targets: torch.Tensor, loss: LossFn, name: str | None = None
) -> GraphNetwork:
    """Capture ``loss(model(*inputs), targets)`` and its gradients for every precision.

    ``inputs``: a tensor or a tuple of tensors; ``targets``: a tensor; ``loss``: a torch loss
    module, a functional loss (``F.cross_entropy``) or any callable of (output, targets).
    The values are taken as written (widened exactly to float64); the model is not modified.
    Raises :class:`~fpgrad.errors.InputError` naming every unsupported op.

    >>> import torch
    >>> from torch import nn
    >>> net = from_module(nn.Linear(3, 2), torch.ones(4, 3), torch.zeros(4, 2), nn.MSELoss())
    >>> net.param_names
    ['weight', 'bias']
    """
    graph = capture(model, inputs, targets, loss)
    return GraphNetwork(graph, name or type(model).__name__)
