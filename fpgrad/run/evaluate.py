"""The values of one forward and backward pass of a layer network, layer by layer.

Every number system computes them on the graph path (:mod:`fpgrad.graph.layers`: the captured
graph interpreted, one function per aten op); torch's dtypes by running the layer modules
(:mod:`fpgrad.run.torch_native`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trace:
    """Everything one evaluation produced.

    ``forward[layer]`` is the layer's output (pre-activation z for dense and the batch norms,
    activation a otherwise); ``backward[layer]`` is dL/d(that output); ``grads`` maps
    ``layer.param`` to dL/dparam. Values are arrays of the number system (float64 arrays of
    exactly converted values for torch dtypes).
    """

    system: str
    loss: Any
    forward: dict[str, Any] = field(default_factory=dict)
    backward: dict[str, Any] = field(default_factory=dict)
    grads: dict[str, Any] = field(default_factory=dict)
    #: key ("loss", "forward/L", "backward/L", "grads/P") -> the format the value was in,
    #: where it differs between tensors (precision policies); missing: the system's format
    formats: dict[str, str] = field(default_factory=dict)
    #: layer name or "loss" -> observed dtypes of what the op computed on (torch runs)
    ran_in: dict[str, dict[str, str | None]] = field(default_factory=dict)
