"""What a run records per step (:class:`History`), and helpers on flat parameter vectors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fpgrad.model.network import Network


@dataclass
class History:
    """Per-step records of one run (index t: after t steps; index 0 is the initial state)."""

    label: str
    #: loss at the parameters after t steps, on step t+1's batch; the last entry (index
    #: ``steps``) is one extra forward pass at the final parameters, on the last step's batch
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    swamped: list[int] = field(default_factory=list)  # intended update != 0 but w unchanged
    updated: list[int] = field(default_factory=list)  # elements with a non-zero intended update
    nonfinite: list[bool] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    dead_units: list[int] = field(default_factory=list)
    moved: list[bool] = field(default_factory=list)  # any parameter changed in this step
    params: list[np.ndarray] = field(default_factory=list)  # float64 vector after t steps
    state_hash: list[str] = field(default_factory=list)  # whole state after t steps
    verdicts: dict[int, dict[str, int]] = field(default_factory=dict)  # step -> verdict counts
    overflow_place: dict[str, Any] | None = None
    #: step -> certified exact loss at the run's own parameters after that many steps
    exact_loss_at_params: dict[int, float] = field(default_factory=dict)


def _flat(arrays: list[np.ndarray]) -> np.ndarray:
    return (
        np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
        if arrays
        else np.zeros(0)
    )


def _dead_units(net: Network, outputs: dict[str, np.ndarray]) -> int:
    """Units of activation layers whose output is zero on every sample of the batch."""
    return sum(
        int(np.sum(np.all(outputs[ly.name] == 0, axis=0))) for ly in net.layers if ly.is_activation
    )
