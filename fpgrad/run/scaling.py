"""Loss scaling: a static scale, or dynamic scaling with torch.amp.GradScaler's rules.

Usage, once per step::

    scale = scaler.scale                    # multiply the loss by it before backward
    ok = scaler.update(grads_are_finite)    # False: skip this optimizer step

Dynamic rules (GradScaler's defaults): the scale starts at 2**16; a step whose gradients hold
an inf or NaN is skipped and the scale is multiplied by ``backoff`` (0.5); after
``interval`` (2000) consecutive clean steps the scale is multiplied by ``growth`` (2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fpgrad.errors import InputError

FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class StaticScaler:
    """A fixed power-of-two loss scale; steps with non-finite gradients are skipped."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)) or math.frexp(self.scale)[0] != 0.5:
            raise InputError(
                f"loss scale must be a power of two (got {self.scale}): other scales round the gradients"
            )

    def update(self, finite: bool) -> bool:
        return finite


@dataclass
class DynamicScaler:
    """torch.amp.GradScaler's growth/backoff state machine, without the tensors."""

    scale: float = 2.0**16
    growth: float = 2.0
    backoff: float = 0.5
    interval: int = 2000
    clean_steps: int = 0

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise InputError(f"initial loss scale must be positive and finite (got {self.scale})")
        if not (self.growth > 1 and 0 < self.backoff < 1 and self.interval >= 1):
            raise InputError("dynamic scaling needs growth > 1, 0 < backoff < 1, interval >= 1")

    def update(self, finite: bool) -> bool:
        """Record one step; returns whether the optimizer step should be taken."""
        if not finite:
            self.scale *= self.backoff
            self.clean_steps = 0
            return False
        self.clean_steps += 1
        if self.clean_steps == self.interval:
            grown = self.scale * self.growth
            if grown <= FLOAT32_MAX:  # GradScaler keeps its scale in float32; it never grows to inf
                self.scale = grown
            self.clean_steps = 0
        return True
