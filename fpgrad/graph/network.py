"""A torch model captured for diagnosis: :func:`from_module`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fpgrad.graph.capture import Graph, LossFn, capture
from fpgrad.model.policy import Policy, parse_policy


@dataclass
class GraphNetwork:
    """A captured model: its joint forward+backward graph and the values it was traced with."""

    graph: Graph
    name: str = "model"
    #: the model's own precision policies by name (:mod:`fpgrad.graph.policy`)
    policies: dict[str, Policy] = field(default_factory=dict)

    @property
    def param_names(self) -> list[str]:
        """Parameter names, as ``model.named_parameters()`` gives them (those that require
        gradients)."""
        return list(self.graph.param_names)


def from_module(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor,
    loss: LossFn,
    name: str | None = None,
    policies: Mapping[str, Any] | None = None,
) -> GraphNetwork:
    """Capture ``loss(model(*inputs), targets)`` and its gradients for every precision.

    ``inputs``: a tensor or a tuple of tensors; ``targets``: a tensor; ``loss``: a torch loss
    module, a functional loss (``F.cross_entropy``) or any callable of (output, targets).
    The values are taken as written (widened exactly to float64); the model is not modified.
    ``policies``: name -> a :class:`~fpgrad.model.policy.Policy` or a table as in a network file's
    ``[policy.NAME]`` (op classes, ``layers`` keyed by module path, ``extends``, ...).
    Raises :class:`~fpgrad.errors.InputError` naming every unsupported op.

    >>> import torch
    >>> from torch import nn
    >>> net = from_module(nn.Linear(3, 2), torch.ones(4, 3), torch.zeros(4, 2), nn.MSELoss())
    >>> net.param_names
    ['weight', 'bias']
    """
    from fpgrad.model.validate import check_name

    if name is not None:
        check_name(name, "from_module: name")
    own = parse_policies(policies or {}, "from_module")
    graph = capture(model, inputs, targets, loss)
    return GraphNetwork(graph, name or type(model).__name__, own)


def parse_policies(tables: Any, where: str) -> dict[str, Policy]:
    """Policies from name -> Policy or ``[policy.NAME]``-style table (InputError otherwise)."""
    from fpgrad.errors import InputError

    if not isinstance(tables, Mapping):
        raise InputError(f"{where}: policies must be a dict of name -> policy table")
    out: dict[str, Policy] = {}
    for key, table in tables.items():
        from fpgrad.model.validate import check_policy_name

        check_policy_name(key, where)
        if isinstance(table, Policy):
            out[key] = table
        else:
            out[key] = parse_policy(key, table, where)
    return out
